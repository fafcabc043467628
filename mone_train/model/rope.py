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
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils

from mone_kernels.cpu_kernel import cpu_kernel_error, rope_cpu


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
