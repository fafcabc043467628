"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for megatron-core.

megatron-core's local ``DotProductAttention`` materialises the ``[b * heads, s, s]`` score
matrix (baddbmm, masked softmax, bmm). :class:`SDPAttention` computes the same function with
PyTorch's fused attention (flash kernels on CPU and GPU when the mask is the causal one), and
plugs in as the ``core_attention`` submodule of megatron's self-attention spec. It holds no
parameters, so checkpoints are the same with either core.

Legend: S query positions, K key positions, B batch, H query heads, G key/value heads
(query groups, G divides H), Dh head width.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    """Self-attention core: softmax(q k^T * scale + mask) v with grouped-query heads.

    Built by megatron's ``SelfAttention`` with the arguments it gives any core attention.
    Masks follow megatron's convention (bool, True = may not attend). When the mask is the
    plain causal one (or absent with a causal mask type) SDPA runs with ``is_causal=True``,
    which selects its fused causal kernels; any other mask is passed to SDPA inverted.
    Dropout on the attention probabilities uses ``config.attention_dropout`` in training mode,
    drawn under megatron's model-parallel RNG tracker as ``DotProductAttention`` does.

    A row whose keys are all masked gives NaN here, where megatron's softmax (masking with
    -10000) gives a uniform row; causal and padding-after-content masks never produce one.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        k_channels: int | None = None,
        v_channels: int | None = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention supports context_parallel_size=1 only")
        if config.window_size is not None:
            raise ValueError("SDPAttention does not implement sliding-window attention")
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"SDPAttention supports softmax_type='vanilla', not {config.softmax_type!r}"
            )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        # Query-key layer scaling divides the scores by the layer number and the softmax
        # multiplies them back (an fp16 range trick), so the function's scale is the plain one.
        # Multi-head latent attention passes its query/key head size (k_channels) and value
        # head size (v_channels), which differ, and its own (YaRN) scale.
        self.softmax_scale = (
            1.0 / math.sqrt(k_channels or config.kv_channels)
            if softmax_scale is None
            else softmax_scale
        )
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        self._causal_masks: dict[tuple[int, torch.device], torch.Tensor] = {}
        # (mask, its version counter, verdict) of the last mask checked: the trainer passes the
        # same mask every step, and re-checking it would cost a device sync per layer on GPU.
        self._last_verdict: tuple[weakref.ref, int, bool] | None = None

    def forward(
        self,
        query_SBHD: torch.Tensor,
        key_KBGD: torch.Tensor,
        value_KBGD: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """[S, B, H, Dh] queries, [K, B, G, Dh] keys, [K, B, G, Dv] values, a bool mask
        broadcastable to [B, H, S, K] (True = masked) or None -> [S, B, H * Dv]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        seq_q, batch, num_heads, _ = query_SBHD.shape
        is_causal, sdpa_mask = self._sdpa_mask(
            attention_mask, attn_mask_type or self.attn_mask_type, seq_q, key_KBGD.shape[0]
        )
        # SDPA takes [B, heads, positions, Dh]; permuted views, its kernels read the strides.
        q_BHSD, k_BGKD, v_BGKD = (t.permute(1, 2, 0, 3) for t in (query_SBHD, key_KBGD, value_KBGD))
        dropout_p = self.dropout_p if self.training else 0.0
        kwargs = dict(
            attn_mask=sdpa_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=key_KBGD.shape[2] != num_heads,
        )
        if dropout_p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out_BHSD = F.scaled_dot_product_attention(q_BHSD, k_BGKD, v_BGKD, **kwargs)
        else:
            out_BHSD = F.scaled_dot_product_attention(q_BHSD, k_BGKD, v_BGKD, **kwargs)
        v_head_dim = value_KBGD.shape[-1]
        return out_BHSD.permute(2, 0, 1, 3).reshape(seq_q, batch, num_heads * v_head_dim)

    def _sdpa_mask(
        self,
        mask: torch.Tensor | None,
        mask_type: AttnMaskType,
        seq_q: int,
        seq_k: int,
    ) -> tuple[bool, torch.Tensor | None]:
        """(is_causal, SDPA's boolean mask with True = attend) for megatron's mask."""
        if mask is None:
            # As megatron: a causal type without a mask means the causal mask, except for a
            # single query position (decoding with a cache sees every key).
            if mask_type == AttnMaskType.causal and seq_q > 1:
                if seq_q != seq_k:
                    raise ValueError(
                        f"causal attention needs as many queries as keys: {seq_q} vs {seq_k}"
                    )
                return True, None
            return False, None
        if mask.dtype != torch.bool:
            raise ValueError(f"SDPAttention takes boolean masks (True = masked), got {mask.dtype}")
        if seq_q == seq_k and self._is_plain_causal(mask, seq_q):
            return True, None
        return False, ~mask

    def _is_plain_causal(self, mask: torch.Tensor, seq: int) -> bool:
        """Whether every [S, S] slice of ``mask`` is True exactly above the diagonal."""
        if mask.shape[-2:] != (seq, seq):
            return False
        last = self._last_verdict
        if last is not None and last[0]() is mask and last[1] == mask._version:
            return last[2]
        key = (seq, mask.device)
        causal_SS = self._causal_masks.get(key)
        if causal_SS is None:
            ones_SS = torch.ones(seq, seq, dtype=torch.bool, device=mask.device)
            causal_SS = self._causal_masks.setdefault(key, torch.triu(ones_SS, 1))
        verdict = bool((mask == causal_SS).all())
        self._last_verdict = (weakref.ref(mask), mask._version, verdict)
        return verdict
