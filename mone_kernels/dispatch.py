"""The one place that chooses how the MoNE activation is computed.

Layers call :func:`neuron_topk_swiglu` (one group of rows) or
:func:`neuron_topk_swiglu_grouped` (one group per local expert) only. ``impl``:

- ``auto``: the Triton kernel for CUDA tensors, the PyTorch reference for CPU tensors (the
  Triton interpreter is far too slow to train with);
- ``triton``: the Triton kernel, also on CPU when ``TRITON_INTERPRET=1`` (how the tests run it);
- ``reference``: the PyTorch reference anywhere.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mone_kernels.reference import expert_balance_loss, neuron_topk_swiglu_reference
from mone_kernels.rules import IMPLS
from mone_kernels.triton_topk_swiglu import (
    neuron_topk_swiglu_triton,
    triton_runnable,
    unpack_mask,
)


class MoNEActivation(NamedTuple):
    """Result for one group of rows: ``h [T, F]``, ``mask [T, F]`` bool, balance loss L."""

    h: torch.Tensor
    mask: torch.Tensor | None
    balance: torch.Tensor | None


def resolve_impl(impl: str, device: torch.device) -> str:
    """Name of the implementation that ``impl`` selects for tensors on ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"kernel impl={impl!r} is not one of {list(IMPLS)}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_runnable(device) else "reference"
    if impl == "triton" and not triton_runnable(device):
        raise RuntimeError(
            f"kernel impl='triton' cannot run on {device}: it needs a CUDA device, or "
            "TRITON_INTERPRET=1 set before triton is imported (CPU, for tests)"
        )
    return impl


def neuron_topk_swiglu(
    fc1_T2F: torch.Tensor, k: int, impl: str = "auto", with_balance: bool = False
) -> MoNEActivation:
    """MoNE activation ``(SiLU(gate) * top-k mask) * up`` for every row of ``[T, 2F]``.

    See :mod:`mone_kernels.reference` for the exact definition, the tie rule and the balance
    loss (which treats all ``T`` rows as one expert's tokens).
    """
    return neuron_topk_swiglu_grouped([fc1_T2F], k, impl, with_balance)[0]


def neuron_topk_swiglu_grouped(
    fc1_chunks: list[torch.Tensor], k: int, impl: str = "auto", with_balance: bool = False
) -> list[MoNEActivation]:
    """The MoNE activation for several experts at once, one ``[T_e, 2F]`` chunk each.

    Rows are independent, so ``h`` and ``mask`` equal one call on the concatenation; the
    balance loss is per expert. The Triton path concatenates and launches once for all
    experts; the reference runs chunk by chunk (on CPU there is no launch to save, and
    concatenating would only copy).
    """
    if not fc1_chunks:
        return []
    num_neurons = fc1_chunks[0].shape[-1] // 2
    if resolve_impl(impl, fc1_chunks[0].device) == "reference" or k == num_neurons:
        return [
            MoNEActivation(*neuron_topk_swiglu_reference(fc1, k, with_balance))
            for fc1 in fc1_chunks
        ]
    counts = [fc1.shape[0] for fc1 in fc1_chunks]
    fc1_N2F = fc1_chunks[0] if len(fc1_chunks) == 1 else torch.cat(fc1_chunks, dim=0)
    h_NF, packed_NB = neuron_topk_swiglu_triton(fc1_N2F, k)
    mask_NF = unpack_mask(packed_NB, num_neurons)
    results = []
    for fc1, h, mask in zip(fc1_chunks, h_NF.split(counts), mask_NF.split(counts)):
        balance = expert_balance_loss(fc1, mask) if with_balance else None
        results.append(MoNEActivation(h, mask, balance))
    return results
