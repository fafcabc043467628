"""mone_kernels: the MoNE neuron top-k SwiGLU activation, independent of megatron-core.

The design card calls this package ``kernels/``; its import name is ``mone_kernels`` because a
top-level package named ``kernels`` already exists on PyPI and ``transformers`` probes for it.
It depends on torch only (Triton joins it for the GPU path), so an inference engine can use it
alone.
"""

from __future__ import annotations

import importlib
from typing import Any

from mone_kernels.rules import IMPLS, num_kept_neurons

# torch (and triton) load on first use of these names, so that ``mone_kernels.rules`` (all
# that configuration code needs) imports without them.
_LAZY = {
    "MoNEActivation": "mone_kernels.dispatch",
    "neuron_topk_swiglu": "mone_kernels.dispatch",
    "neuron_topk_swiglu_grouped": "mone_kernels.dispatch",
    "resolve_impl": "mone_kernels.dispatch",
    "neuron_topk_mask": "mone_kernels.reference",
    "neuron_topk_swiglu_reference": "mone_kernels.reference",
}

__all__ = ["IMPLS", "num_kept_neurons", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mone_kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
