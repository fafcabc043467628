"""RMSNorm for megatron-core's layer specs, with a fused backward on CPU.

megatron-core's local spec builds its norms through ``WrappedTorchNorm``, i.e.
``torch.nn.RMSNorm``. On CPU torch fuses only its forward; the backward is the composite's
chain of elementwise nodes, and a step has 2 per layer plus the final one
(``benchmarks/trainer_throughput.py``: the fused one makes the `small` step 1.02x faster). :class:`RMSNorm` is the same
function with the same parameter (``weight``, ones at init), so checkpoints interchange with
megatron's; it runs ``mone_kernels``' C++ operator on CPU tensors and torch's
``rms_norm`` elsewhere (fused by torch on CUDA). Unlike ``WrappedTorchNorm`` it works with
sequence parallelism (tensor parallelism > 1), as megatron's apex and TE norms do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from mone_kernels.cpu_kernel import cpu_kernel_error, rms_norm_cpu


class RMSNorm(torch.nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the hidden dimension.

    Built by megatron's layer and block specs with the arguments it gives any norm class
    (those ``WrappedTorchNorm`` rejects are rejected here too).
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ) -> None:
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"RMSNorm built for normalization={config.normalization!r}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("RMSNorm does not support zero-centred gamma")
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        # With sequence parallelism each tensor-parallel rank normalises its own positions:
        # megatron's finalize_model_grads sums the weight's gradient over the TP group.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and cpu_kernel_error() is None:
            return rms_norm_cpu(x, self.weight, self.eps)
        return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
