"""The one place that chooses how the MoNE activation is computed.

Layers call :func:`neuron_topk_swiglu` (one group of rows) or
:func:`neuron_topk_swiglu_grouped` (one group per local expert) only; which implementation
runs is decided here from the tensors' device and the requested ``impl``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mone_kernels.reference import neuron_topk_swiglu_reference

IMPLS = ("auto", "reference")


class MoNEActivation(NamedTuple):
    """Result for one group of rows: ``h [T, F]``, ``mask [T, F]`` bool, balance loss L."""

    h: torch.Tensor
    mask: torch.Tensor | None
    balance: torch.Tensor | None


def resolve_impl(impl: str, device: torch.device) -> str:
    """Name of the implementation that ``impl`` selects for tensors on ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"kernel impl={impl!r} is not one of {list(IMPLS)}")
    return "reference"


def neuron_topk_swiglu(
    fc1_T2F: torch.Tensor, k: int, impl: str = "auto", with_balance: bool = False
) -> MoNEActivation:
    """MoNE activation ``(SiLU(gate) * top-k mask) * up`` for every row of ``[T, 2F]``.

    See :mod:`mone_kernels.reference` for the exact definition, the tie rule and the balance
    loss (which treats all ``T`` rows as one expert's tokens).
    """
    resolve_impl(impl, fc1_T2F.device)
    return MoNEActivation(*neuron_topk_swiglu_reference(fc1_T2F, k, with_balance))


def neuron_topk_swiglu_grouped(
    fc1_chunks: list[torch.Tensor], k: int, impl: str = "auto", with_balance: bool = False
) -> list[MoNEActivation]:
    """The MoNE activation for several experts at once, one ``[T_e, 2F]`` chunk each.

    Rows are independent, so ``h`` and ``mask`` equal one call on the concatenation; the
    balance loss is per expert. The reference runs chunk by chunk: on CPU there is no launch
    to save, and concatenating would only copy.
    """
    if fc1_chunks:
        resolve_impl(impl, fc1_chunks[0].device)
    return [
        MoNEActivation(*neuron_topk_swiglu_reference(fc1, k, with_balance)) for fc1 in fc1_chunks
    ]
