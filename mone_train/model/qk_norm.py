"""RMSNorm of the whole query / key projection, over all heads at once (OLMoE's QK-norm).

megatron-core's ``qk_layernorm`` normalises each head's vector (``model.qk_layernorm=head``,
Qwen3's). OLMoE normalises the query projection's output of all heads together, and the keys'
likewise, before splitting into heads. megatron's attention calls its ``q_layernorm`` /
``k_layernorm`` on ``[s, b, heads, head_dim]`` and builds them with ``hidden_size=head_dim``,
so these modules flatten the heads, normalise over ``heads * head_dim`` with one weight of that
size, and restore the shape. Tensor parallelism would split the heads over ranks and need the
sum of squares all-reduced; it is refused (``model.qk_layernorm=full`` with TP = 1 only).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from mone_train.model.norm import RMSNorm


class _FullWidthNorm(RMSNorm):
    heads_attr = ""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        if config.tensor_model_parallel_size != 1:
            raise ValueError("model.qk_layernorm=full supports tensor parallel size 1 only")
        self.num_heads = self.heads(config)
        super().__init__(config, hidden_size * self.num_heads, eps, **kwargs)

    @staticmethod
    def heads(config: TransformerConfig) -> int:
        raise NotImplementedError

    def forward(self, x_SBND: torch.Tensor) -> torch.Tensor:
        s, b, n, d = x_SBND.shape
        return super().forward(x_SBND.reshape(s, b, n * d)).view(s, b, n, d)


class FullWidthQueryNorm(_FullWidthNorm):
    """RMSNorm over all query heads together (weight: heads x head_dim)."""

    @staticmethod
    def heads(config: TransformerConfig) -> int:
        return config.num_attention_heads


class FullWidthKeyNorm(_FullWidthNorm):
    """RMSNorm over all key heads (query groups) together (weight: groups x head_dim)."""

    @staticmethod
    def heads(config: TransformerConfig) -> int:
        return config.num_query_groups or config.num_attention_heads
