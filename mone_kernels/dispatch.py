"""The one place that chooses how the MoNE activation is computed.

Layers call :func:`neuron_topk_swiglu` (one group of rows) or
:func:`neuron_topk_swiglu_grouped` (one group per local expert) only. ``impl``:

- ``auto``: the Triton kernel for CUDA tensors, the fused C++ operator for CPU tensors (built
  on first use; the PyTorch reference, with one warning, where it cannot be built);
- ``triton``: the Triton kernel, also on CPU when ``TRITON_INTERPRET=1`` (how the tests run it);
- ``cpu``: the fused C++ operator (:mod:`mone_kernels.cpu_kernel`), CPU tensors only;
- ``reference``: the PyTorch reference anywhere.

Legend: T rows of one expert, N rows of all experts stacked, F neurons, K kept per row,
B = ceil(F / 8) bytes of a packed mask row.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch

from mone_kernels.cpu_kernel import cpu_kernel_error, neuron_topk_swiglu_cpu
from mone_kernels.reference import neuron_topk_swiglu_reference
from mone_kernels.rules import IMPLS
from mone_kernels.triton_topk_swiglu import (
    expert_of_rows,
    neuron_topk_swiglu_triton,
    triton_runnable,
    unpack_mask,
)


class MoNEActivation(NamedTuple):
    """Result for one expert's rows.

    ``h``: [T, F] masked SwiGLU product in the input dtype (times the row scale when one was
    given). ``mask``: [T, F] bool selection, or None when not asked for (``with_mask=False``)
    or when K = F. ``balance``: the expert's NG-LBL, a differentiable fp32 scalar, or None
    when not asked for.
    """

    h: torch.Tensor
    mask: torch.Tensor | None
    balance: torch.Tensor | None


def resolve_impl(impl: str, device: torch.device) -> str:
    """Name of the implementation that ``impl`` selects for tensors on ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"kernel impl={impl!r} is not one of {list(IMPLS)}")
    if impl == "auto":
        if device.type == "cuda" and triton_runnable(device):
            return "triton"
        if device.type == "cpu":
            error = cpu_kernel_error()
            if error is None:
                return "cpu"
            _warn_cpu_fallback(error)
        return "reference"
    if impl == "triton" and not triton_runnable(device):
        raise RuntimeError(
            f"kernel impl='triton' cannot run on {device}: it needs a CUDA device, or "
            "TRITON_INTERPRET=1 set before triton is imported (CPU, for tests)"
        )
    if impl == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"kernel impl='cpu' cannot run on {device}: it takes CPU tensors")
        error = cpu_kernel_error()
        if error is not None:
            raise RuntimeError(f"kernel impl='cpu': the C++ operator could not be built ({error})")
    return impl


@functools.cache
def _warn_cpu_fallback(error: str) -> None:
    warnings.warn(
        f"MoNE CPU kernel unavailable ({error}); using the PyTorch reference (slower)",
        stacklevel=3,
    )


def neuron_topk_swiglu(
    fc1_T2F: torch.Tensor,
    k: int,
    impl: str = "auto",
    with_balance: bool = False,
    with_mask: bool = True,
    row_scale_T: torch.Tensor | None = None,
    selection_weight_F: torch.Tensor | None = None,
) -> MoNEActivation:
    """MoNE activation ``(SiLU(gate) * top-k mask) * up`` for every row of ``[T, 2F]``.

    See :mod:`mone_kernels.reference` for the exact definition, the tie rule, the balance
    loss (which treats all ``T`` rows as one expert's tokens) and the selection weights.
    """
    row_scales = None if row_scale_T is None else [row_scale_T]
    weights = None if selection_weight_F is None else [selection_weight_F]
    return neuron_topk_swiglu_grouped(
        [fc1_T2F], k, impl, with_balance, with_mask, row_scales, weights
    )[0]


def neuron_topk_swiglu_grouped(
    fc1_chunks: list[torch.Tensor],
    k: int,
    impl: str = "auto",
    with_balance: bool = False,
    with_mask: bool = True,
    row_scales: list[torch.Tensor] | None = None,
    selection_weights: list[torch.Tensor] | None = None,
) -> list[MoNEActivation]:
    """The MoNE activation for several experts at once, one ``fc1_T2F`` chunk each.

    ``row_scales`` (optional, one differentiable ``[T]`` tensor per chunk) multiplies each
    row's ``h``, as ``(h * row_scale_T[:, None]).to(h.dtype)``: the experts' router
    probabilities. The CPU operator applies it in its own pass; the other paths after it.
    ``selection_weights`` (optional, one fp32 ``[F]`` positive tensor per chunk): that expert's
    top-K is taken of ``|g| * w`` (the neuron-level balance bias; no gradient).

    Rows are independent, so ``h`` and ``mask`` equal one call on the concatenation; the
    balance loss is per expert. The Triton path concatenates and launches once for all
    experts, and computes the balance loss from the packed mask it saves anyway: the
    ``[T, F]`` bool mask is built only when ``with_mask`` asks for it (health metrics). The
    CPU operator and the reference run chunk by chunk; their mask is a by-product and is
    dropped unless asked for.
    """
    if not fc1_chunks:
        return []
    num_neurons = fc1_chunks[0].shape[-1] // 2
    resolved = resolve_impl(impl, fc1_chunks[0].device)
    if resolved != "triton" or k == num_neurons:
        # Chunk by chunk: on CPU there is no launch to save, and concatenating would only copy.
        # K = F is the plain SwiGLU, which the reference computes.
        cpu = resolved == "cpu" and k < num_neurons
        results = []
        for e, fc1_T2F in enumerate(fc1_chunks):
            row_scale_T = None if row_scales is None else row_scales[e]
            weight_F = None if selection_weights is None else selection_weights[e]
            if cpu:
                h_TF, mask_TF, balance = neuron_topk_swiglu_cpu(
                    fc1_T2F, k, with_balance, row_scale_T, weight_F
                )
            else:
                h_TF, mask_TF, balance = neuron_topk_swiglu_reference(
                    fc1_T2F, k, with_balance, weight_F
                )
                h_TF = _scaled(h_TF, row_scale_T)
            results.append(MoNEActivation(h_TF, mask_TF if with_mask else None, balance))
        return results
    row_counts = [fc1_T2F.shape[0] for fc1_T2F in fc1_chunks]
    fc1_N2F = fc1_chunks[0] if len(fc1_chunks) == 1 else torch.cat(fc1_chunks, dim=0)
    weights = None
    if selection_weights is not None:
        weights = (torch.stack(selection_weights), expert_of_rows(row_counts, fc1_N2F.device))
    h_NF, mask_NB, shares_N = neuron_topk_swiglu_triton(
        fc1_N2F, k, row_counts if with_balance else None, weights
    )
    masks = unpack_mask(mask_NB, num_neurons).split(row_counts) if with_mask else None
    balances = _balance_from_shares(shares_N, row_counts, num_neurons, k) if with_balance else None
    return [
        MoNEActivation(
            _scaled(h_TF, None if row_scales is None else row_scales[e]),
            masks[e] if masks else None,
            balances[e] if balances else None,
        )
        for e, h_TF in enumerate(h_NF.split(row_counts))
    ]


def _scaled(h_TF: torch.Tensor, row_scale_T: torch.Tensor | None) -> torch.Tensor:
    if row_scale_T is None:
        return h_TF
    return (h_TF * row_scale_T.unsqueeze(-1)).to(h_TF.dtype)


def _balance_from_shares(
    shares_N: torch.Tensor, row_counts: list[int], num_neurons: int, k: int
) -> list[torch.Tensor]:
    """Expert e's NG-LBL F / (T_e^2 K) * sum of its rows' shares (0 for an expert without
    rows), differentiable through the shares."""
    return [
        shares_T.sum() * (num_neurons / (num_rows * num_rows * k) if num_rows else 0.0)
        for shares_T, num_rows in zip(shares_N.split(row_counts), row_counts)
    ]
