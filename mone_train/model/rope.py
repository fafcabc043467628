"""Fused rotary position embedding for megatron-core on CPU, through its RoPE-fusion slot.

With ``config.apply_rope_fusion`` megatron-core applies RoPE through
``rope_utils.fused_apply_rotary_pos_emb``, which it imports from TransformerEngine and leaves
None without it. :func:`install_fused_rope` fills that slot, only when it is empty, with
:func:`fused_apply_rotary_pos_emb`: ``mone_kernels``' one-pass C++ operator for CPU tensors
(megatron's own function, same bits), and megatron's unfused implementation for anything else
(CUDA without TransformerEngine, interleaved or partial rotation, per-sample frequencies). Models built without
``apply_rope_fusion`` (``model.rope_fusion=false``, or megatron-core used directly) keep the
unfused path even after the slot is filled. Packed sequences (THD) are not covered: their
slot stays empty, and megatron-core says so if asked.

The scaled RoPE of released checkpoints (``model.rope_scaling``: Llama 3's, YaRN) is
megatron-core's own too: :func:`gpt_rope_kwargs` picks its embedding, :func:`yarn_config_attributes`
and :func:`set_llama3_frequencies` give it the checkpoint's parameters. Both change only the
frequencies (which the fused kernel takes as they come), except YaRN's factor on cos and sin,
which megatron applies unfused only (:func:`scales_cos_sin`).
"""

from __future__ import annotations

import math

import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from mone_kernels.cpu_kernel import cpu_kernel_error, rope_cpu
from mone_train.config import ModelConfig


def fused_apply_rotary_pos_emb(
    t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False, **_unused
) -> torch.Tensor:
    """RoPE of ``t [S, B, H, D]`` by ``freqs [S, 1, 1, R]`` as megatron-core's unfused
    ``_apply_rotary_pos_emb_bshd`` computes it (TransformerEngine's calling convention)."""
    fused = (
        t.device.type == "cpu"
        and t.dim() == 4
        and not interleaved
        and freqs.dim() == 4
        and freqs.shape[:3] == (t.shape[0], 1, 1)  # one frequency row per position
        and freqs.shape[-1] == t.shape[-1]  # the whole head rotated
        and cpu_kernel_error() is None
    )
    if fused:
        return rope_cpu(t, freqs)
    return rope_utils._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)


def install_fused_rope() -> None:
    """Fill megatron-core's empty RoPE-fusion slot (TransformerEngine's, when it is installed,
    is kept)."""
    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_apply_rotary_pos_emb


# ------------------------------------------------------------ scaled RoPE (model.rope_scaling)


def gpt_rope_kwargs(m: ModelConfig) -> dict:
    """GPTModel's positional-embedding arguments for ``model.rope_scaling``: plain RoPE and
    Llama 3 scaling are megatron's ``RotaryEmbedding`` (``rope_scaling``), YaRN its
    ``YarnRotaryEmbedding`` (``position_embedding_type='yarn'``, which reads the
    ``yarn_*`` attributes of :func:`yarn_config_attributes`)."""
    rs = m.rope_scaling
    kwargs = {"position_embedding_type": "rope", "rotary_base": m.rotary_base}
    if rs.rope_type == "llama3":
        kwargs.update(rope_scaling=True, rope_scaling_factor=rs.factor)
    elif rs.rope_type == "yarn":
        kwargs["position_embedding_type"] = "yarn"
    return kwargs


def yarn_config_attributes(m: ModelConfig) -> dict:
    """The ``yarn_*`` TransformerConfig attributes megatron's GPTModel and attention read for
    YaRN ({} otherwise). megatron scales cos and sin by mscale(s, yarn_mscale) /
    mscale(s, yarn_mscale_all_dim) (mscale(s) alone when they are None); transformers by
    ``attention_factor`` or its own rule (:meth:`RopeScalingConfig.yarn_attention_factor`):
    the pair is chosen so megatron's factor is transformers'. Multi-head latent attention
    takes YaRN from its own config fields instead (:func:`mla_rope_settings`)."""
    rs = m.rope_scaling
    if rs.rope_type != "yarn" or m.multi_latent_attention:
        return {}
    factor, target = rs.yarn_attention_factor(), rs.factor
    if rs.attention_factor is None and rs.mscale and rs.mscale_all_dim:
        mscale, mscale_all_dim = rs.mscale, rs.mscale_all_dim  # the same formula in both
    elif factor == (1.0 if target <= 1 else 0.1 * math.log(target) + 1.0):
        mscale, mscale_all_dim = None, None
    else:  # 0.1 * w * ln(s) + 1 = factor, over a denominator of 1 (validated: s > 1)
        mscale, mscale_all_dim = (factor - 1.0) / (0.1 * math.log(target)), 0.0
    return {
        "yarn_rotary_scaling_factor": rs.factor,
        "yarn_original_max_position_embeddings": rs.original_context(m.max_position_embeddings),
        "yarn_beta_fast": rs.beta_fast,
        "yarn_beta_slow": rs.beta_slow,
        "yarn_mscale": mscale,
        "yarn_mscale_all_dim": mscale_all_dim,
        "yarn_correction_range_round_to_int": rs.truncate,
    }


def scales_cos_sin(m: ModelConfig) -> bool:
    """Whether RoPE's cos and sin carry a factor (YaRN's): megatron applies such a RoPE
    unfused only (its fused slot takes no factor), so the model is built without fusion."""
    return m.rope_scaling.rope_type == "yarn" and m.rope_scaling.yarn_attention_factor() != 1.0


def set_llama3_frequencies(rotary: RotaryEmbedding, m: ModelConfig) -> None:
    """Give megatron's Llama 3 RotaryEmbedding the checkpoint's own low/high frequency factors
    and original context (its constructor applies only the factor, with Llama 3.1's others),
    through the same ``_apply_scaling``. Call before the first forward (it caches)."""
    rs = m.rope_scaling
    dim = m.attention_head_dim()
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=rotary.inv_freq.device) / dim
    rotary.inv_freq = rotary._apply_scaling(
        1.0 / (m.rotary_base**exponents),
        factor=rs.factor,
        low_freq_factor=rs.low_freq_factor,
        high_freq_factor=rs.high_freq_factor,
        original_max_position_embeddings=rs.original_context(m.max_position_embeddings),
    )


# ------------------------------------------------- multi-head latent attention's own RoPE


def _yarn_mscale(scale: float, weight: float) -> float:
    """YaRN's 0.1 w ln(s) + 1 (1 for s <= 1), as both megatron and transformers define it."""
    return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0


def mla_rope_settings(m: ModelConfig) -> dict:
    """MLATransformerConfig's RoPE fields for ``model.rope_scaling`` (default or yarn).

    megatron's MLA rotates only each head's ``qk_pos_emb_head_dim`` part, with its own
    ``RotaryEmbedding`` or ``YarnRotaryEmbedding``; it scales the softmax by
    mscale(s, mscale_all_dim)^2 and cos/sin by mscale(s, mscale) / mscale(s, mscale_all_dim).
    transformers' DeepSeek-V3 scales the softmax the same way and cos/sin by
    :meth:`RopeScalingConfig.yarn_attention_factor`: ``mscale_all_dim`` is therefore the
    checkpoint's, and ``mscale`` the weight that gives transformers' cos/sin factor.
    """
    rs = m.rope_scaling
    if rs.rope_type != "yarn":
        return {"rope_type": "rope", "rotary_base": m.rotary_base, "rotary_scaling_factor": 1.0,
                "mscale": 1.0, "mscale_all_dim": 0.0}  # fmt: skip
    mscale_all_dim = rs.mscale_all_dim or 0.0
    if rs.attention_factor is None and rs.mscale and rs.mscale_all_dim:
        mscale = rs.mscale  # transformers' ratio is megatron's formula
    elif rs.factor <= 1:
        mscale = 1.0
    else:  # mscale(s, w) = factor x mscale(s, mscale_all_dim), solved for w
        target = rs.yarn_attention_factor() * _yarn_mscale(rs.factor, mscale_all_dim)
        mscale = (target - 1.0) / (0.1 * math.log(rs.factor))
    return {
        "rope_type": "yarn",
        "rotary_base": m.rotary_base,
        "rotary_scaling_factor": rs.factor,
        "original_max_position_embeddings": rs.original_context(m.max_position_embeddings),
        "beta_fast": rs.beta_fast,
        "beta_slow": rs.beta_slow,
        "mscale": mscale,
        "mscale_all_dim": mscale_all_dim,
    }


def position_embedding_kwargs(m: ModelConfig) -> dict:
    """GPTModel's positional-embedding arguments: none of its own with multi-head latent
    attention (which rotates inside the attention), else :func:`gpt_rope_kwargs`."""
    if m.multi_latent_attention:
        return {"position_embedding_type": "none"}
    return gpt_rope_kwargs(m)
