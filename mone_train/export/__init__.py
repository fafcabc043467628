"""After training: a mone-train checkpoint as a Hugging Face model directory.

``convert.py`` maps megatron-core's weights to Hugging Face names (and picks the architecture),
``megatron_source.py`` loads a checkpoint in one process, ``writer.py`` writes the directory,
``tokenizer_files.py`` the tokenizer, ``remote_code/`` holds the modeling code that ships with
MoNE exports, and ``cli.py`` is ``mone-export``. See docs/inference.md.
"""
