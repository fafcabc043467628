"""Data: tokenizers, the default corpus, and megatron-core GPT datasets over indexed files."""
