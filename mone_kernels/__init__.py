"""mone_kernels: the MoNE neuron top-k SwiGLU activation, independent of megatron-core.

The design card calls this package ``kernels/``; its import name is ``mone_kernels`` because a
top-level package named ``kernels`` already exists on PyPI and ``transformers`` probes for it.
It depends on torch only (Triton joins it for the GPU path), so an inference engine can use it
alone.
"""

from mone_kernels.dispatch import (
    IMPLS,
    MoNEActivation,
    neuron_topk_swiglu,
    neuron_topk_swiglu_grouped,
    resolve_impl,
)
from mone_kernels.reference import (
    neuron_topk_mask,
    neuron_topk_swiglu_reference,
    num_kept_neurons,
)

__all__ = [
    "IMPLS",
    "MoNEActivation",
    "neuron_topk_mask",
    "neuron_topk_swiglu",
    "neuron_topk_swiglu_grouped",
    "neuron_topk_swiglu_reference",
    "num_kept_neurons",
    "resolve_impl",
]
