"""Tiny random Hugging Face models built locally from transformers' config classes (nothing is
downloaded), saved the way released checkpoints are (``save_pretrained``: per-expert tensors)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
    tie_word_embeddings=False, attention_dropout=0.0, pad_token_id=None, eos_token_id=1,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
)  # fmt: skip
MOE = dict(num_experts_per_tok=2)

CONFIGS = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=4, **MOE,
                                      sliding_window=None, router_jitter_noise=0.0)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=48, num_experts=4, **MOE,
                                  norm_topk_prob=False, clip_qkv=None)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=96, moe_intermediate_size=48,
                                         shared_expert_intermediate_size=80, num_experts=4, **MOE,
                                         norm_topk_prob=False, qkv_bias=True,
                                         decoder_sparse_step=1, mlp_only_layers=[],
                                         use_sliding_window=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=96, moe_intermediate_size=48,
                                         num_experts=4, **MOE, norm_topk_prob=True, head_dim=24,
                                         decoder_sparse_step=1, mlp_only_layers=[0],
                                         use_sliding_window=False)),
    "llama": ("LlamaConfig", dict(intermediate_size=96)),
    "qwen2": ("Qwen2Config", dict(intermediate_size=96, use_sliding_window=False)),
    "qwen3": ("Qwen3Config", dict(intermediate_size=96, head_dim=16, use_sliding_window=False)),
}  # fmt: skip
MOE_TYPES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
DENSE_TYPES = ("llama", "qwen2", "qwen3")


def build_hf_model(model_type: str, seed: int = 0):
    """A tiny random model of ``model_type`` (fp32, eager attention and experts, eval mode)."""
    import transformers

    config_name, fields = CONFIGS[model_type]
    config = getattr(transformers, config_name)(**COMMON, **fields)
    config._attn_implementation = "eager"
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # norms away from 1 and every bias nonzero: each must map right
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")) or param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def save_hf_model(model, out: Path, max_shard_size: str | None = None) -> Path:
    """``save_pretrained`` (per-expert tensors on disk, as released checkpoints hold them)."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def tokens(batch: int = 2, length: int = 24, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
