"""Sparse decode of one MoNE expert: read only the kept neurons' rows of W_up and W_down.

Legend: T rows routed to the expert (tokens), D hidden size, F neurons per expert, K kept
neurons per row.

Weights, in the layout this file reads (one expert):

    gate_up_2FD  [2F, D]  megatron's fc1: the F rows of W_gate, then the F rows of W_up
    down_t_FD    [F, D]   W_down transposed: neuron j's output weights are one contiguous row

The computation (the same as training's, docs/method.md):

    g_TF    = SiLU(x_TD W_gate^T)                  (fp32)
    mask_TF = top-K of |g_TF| per row, ties to the lower neuron index (exactly K per row)
              (of |g_TF| * w_F with the expert's selection weights w, when it has them)
    h_TF    = g_TF * mask_TF * (x_TD W_up^T) * probs_T
    out_TD  = h_TF @ down_t_FD

:func:`dense_masked_expert_forward` computes it over all F neurons. :func:`sparse_expert_forward`
computes the gate projection in full (its magnitudes choose the neurons), then reads only each
row's K kept rows of W_up (one dot product with x each) and of ``down_t`` (summed with weights
h), in place, without a gathered copy: D*F + 2*T*D*K weights read instead of 3*D*F. At T = 1
that is a byte ceiling of 3 / (1 + 2*rho) on the speedup, 1.5x at rho = 0.5. Both functions
return the same values (fp32: to rounding).

This file imports torch only: a model exported by ``mone-export`` carries a copy of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DECODE_PATHS = ("auto", "dense", "sparse")

# `auto` takes the sparse path only where it pays on the CPU of benchmarks/decode_bench.py:
# - at most SPARSE_MAX_ROWS rows: with T rows the sparse path reads D*F*(1 + 2*T*rho) weights
#   against dense's 3*D*F, so it saves bytes only while T*rho < 1 (at T = 4 it is slower for
#   every rho >= 0.5);
# - K <= SPARSE_MAX_KEEP_RATIO * F: above it the bytes saved (1/6 at rho = 0.75) do not pay for
#   reading rows one by one, which runs below a streamed matmul's rate (measured 0.8-1.0x);
# - D*F >= SPARSE_MIN_WEIGHTS: below it the sparse path's few extra small operations (0.1-0.2 ms
#   per call) outweigh the bytes saved (the default 128 x 256 model decodes about 25% slower).
SPARSE_MAX_ROWS = 1
SPARSE_MAX_KEEP_RATIO = 0.5
SPARSE_MIN_WEIGHTS = 1024 * 4096

# Without the fused dot kernel (bf16, GPU), W_up rows are gathered this many bytes at a time: a
# chunk stays in a core's L2 and the allocator reuses it, where one large gather faults in
# fresh pages on every call (2-7x slower on the benchmark CPU at D x F = 2048 x 8192).
GATHER_CHUNK_BYTES = 1 << 20
SUM_BAGS = 8  # embedding_bag parallelises over bags: a few per core for the weighted row sum


def kept_neuron_mask(score_TF: torch.Tensor, k: int) -> torch.Tensor:
    """[T, F] bool mask with exactly ``k`` True per row at the largest scores, ties to the lower
    neuron index (the rule of ``mone_kernels.reference.neuron_topk_mask``).

    Args:
        score_TF: [T, F] non-negative scores (|SiLU(gate)|), any float dtype.
        k: neurons kept per row, 1 <= k <= F.
    """
    num_rows, num_neurons = score_TF.shape
    if not 1 <= k <= num_neurons:
        raise ValueError(f"k={k} must be in [1, {num_neurons}]")
    if k == num_neurons or num_rows == 0:
        return torch.ones_like(score_TF, dtype=torch.bool)
    # The k-th largest score is the threshold: rows without ties at it have exactly k scores
    # >= it; rows with ties keep the tied scores of lowest index until k are kept.
    kth_T1 = torch.topk(score_TF, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    mask_TF = score_TF >= kth_T1
    tied_rows = (mask_TF.sum(dim=-1) > k).nonzero().squeeze(-1)
    if tied_rows.numel():
        score_RF, kth_R1 = score_TF[tied_rows], kth_T1[tied_rows]
        above_RF = score_RF > kth_R1
        tied_RF = score_RF == kth_R1
        slots_R1 = k - above_RF.sum(dim=-1, keepdim=True)
        mask_TF[tied_rows] = above_RF | (tied_RF & (tied_RF.cumsum(dim=-1) <= slots_R1))
    return mask_TF


def kept_neuron_indices(score_TF: torch.Tensor, k: int) -> torch.Tensor:
    """[T, K] int64 indices of :func:`kept_neuron_mask`'s True entries, ascending in each row."""
    mask_TF = kept_neuron_mask(score_TF, k)
    return mask_TF.nonzero()[:, 1].view(score_TF.shape[0], k)


def _check(x_TD: torch.Tensor, gate_up_2FD: torch.Tensor, down_t_FD: torch.Tensor, k: int) -> int:
    num_neurons, hidden = down_t_FD.shape
    if x_TD.dim() != 2 or x_TD.shape[1] != hidden:
        raise ValueError(f"x must be [T, {hidden}], got {tuple(x_TD.shape)}")
    if tuple(gate_up_2FD.shape) != (2 * num_neurons, hidden):
        raise ValueError(
            f"gate_up must be [2F, D] = [{2 * num_neurons}, {hidden}], got "
            f"{tuple(gate_up_2FD.shape)}"
        )
    if not 1 <= k <= num_neurons:
        raise ValueError(f"num_kept={k} must be in [1, {num_neurons}]")
    return num_neurons


def _scores(g_TF: torch.Tensor, selection_weight_F: torch.Tensor | None) -> torch.Tensor:
    """The selection scores: |g|, or |g| * w (the neuron-level balance's weights)."""
    return g_TF.abs() if selection_weight_F is None else g_TF.abs() * selection_weight_F.float()


def dense_masked_expert_forward(
    x_TD: torch.Tensor,
    gate_up_2FD: torch.Tensor,
    down_t_FD: torch.Tensor,
    num_kept: int,
    probs_T: torch.Tensor | None = None,
    selection_weight_F: torch.Tensor | None = None,
) -> torch.Tensor:
    """The expert over all F neurons with the top-K mask applied: [T, D] in ``x``'s dtype.

    Args:
        x_TD: [T, D] rows routed to the expert.
        gate_up_2FD: [2F, D] fc1 weight (gate rows, then up rows).
        down_t_FD: [F, D] W_down transposed.
        num_kept: K, neurons kept per row (K = F: the plain SwiGLU expert).
        probs_T: [T] router probabilities multiplied into the output, or None.
        selection_weight_F: [F] positive selection weights (rank |g| * w), or None.
    """
    num_neurons = _check(x_TD, gate_up_2FD, down_t_FD, num_kept)
    gate_TF, up_TF = F.linear(x_TD, gate_up_2FD).float().chunk(2, dim=-1)
    g_TF = F.silu(gate_TF)
    if num_kept < num_neurons:
        g_TF = g_TF * kept_neuron_mask(_scores(g_TF, selection_weight_F), num_kept)
    h_TF = g_TF * up_TF
    if probs_T is not None:
        h_TF = h_TF * probs_T.float().unsqueeze(-1)
    return h_TF.to(x_TD.dtype) @ down_t_FD


def _fused_row_dots(rows_RD: torch.Tensor) -> bool:
    """Whether :func:`_row_dots` can read the rows in place (CPU, fp32/fp64: BLAS dots)."""
    return (
        rows_RD.device.type == "cpu"
        and rows_RD.dtype in (torch.float32, torch.float64)
        and hasattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward")
    )


def _row_dots(
    rows_RD: torch.Tensor, idx_TK: torch.Tensor, x_TD: torch.Tensor, fused: bool | None = None
) -> torch.Tensor:
    """[T, K] u[t, k] = rows_RD[idx_TK[t, k]] . x_TD[t], in ``rows_RD``'s dtype.

    Fused: ``embedding_bag``'s per-sample-weight gradient kernel is exactly this (one dot per
    index, the row read in place, parallel over indices); ATen exposes it only under its
    private name. Otherwise the rows are gathered in chunks of GATHER_CHUNK_BYTES, each chunk
    multiplied while it is still in cache.
    """
    num_rows, k = idx_TK.shape
    if fused if fused is not None else _fused_row_dots(rows_RD):
        flat = idx_TK.reshape(-1)
        rows_T = torch.arange(num_rows, device=flat.device)
        bag_of = rows_T.repeat_interleave(k) if num_rows > 1 else torch.zeros_like(flat)
        starts = rows_T * k
        dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            x_TD.to(rows_RD.dtype).contiguous(), rows_RD, flat, starts, bag_of, 0, -1
        )
        return dots.view(num_rows, k)
    chunk = max(1, GATHER_CHUNK_BYTES // (rows_RD.shape[1] * rows_RD.element_size()))
    parts = [
        F.linear(x_TD[t : t + 1], rows_RD.index_select(0, idx_TK[t, start : start + chunk]))
        for t in range(num_rows)
        for start in range(0, k, chunk)
    ]
    return torch.cat(parts, dim=-1).view(num_rows, k)


def _weighted_row_sums(
    rows_RD: torch.Tensor, idx_TK: torch.Tensor, h_TK: torch.Tensor
) -> torch.Tensor:
    """[T, D] fp32 out[t] = sum_k h_TK[t, k] * rows_RD[idx_TK[t, k]], each row read in place.

    ``embedding_bag`` sums one bag per thread, so every row's K indices are split into enough
    bags for SUM_BAGS in all, whose partial sums are added at the end.
    """
    num_rows, k = idx_TK.shape
    per_bag = -(-k // max(1, SUM_BAGS // num_rows))
    bags_per_row = -(-k // per_bag)
    starts = torch.arange(0, k, per_bag, device=idx_TK.device)
    offsets = (starts + k * torch.arange(num_rows, device=idx_TK.device)[:, None]).reshape(-1)
    partial_BD = F.embedding_bag(
        idx_TK.reshape(-1),
        rows_RD,
        offsets,
        mode="sum",
        per_sample_weights=h_TK.reshape(-1).to(rows_RD.dtype),
    )
    return partial_BD.float().view(num_rows, bags_per_row, -1).sum(dim=1)


def sparse_expert_forward(
    x_TD: torch.Tensor,
    gate_up_2FD: torch.Tensor,
    down_t_FD: torch.Tensor,
    num_kept: int,
    probs_T: torch.Tensor | None = None,
    selection_weight_F: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`dense_masked_expert_forward` reading only the kept neurons of W_up and W_down.

    Same arguments and result. The gate projection runs over all F rows; then for each row t
    only its K kept rows of W_up (dot products with x_t) and of ``down_t`` (summed with weights
    h) are read, in place: D*F + 2*D*K weights per row instead of 3*D*F.
    """
    num_neurons = _check(x_TD, gate_up_2FD, down_t_FD, num_kept)
    if x_TD.shape[0] == 0:
        return x_TD.new_zeros(0, down_t_FD.shape[1])
    g_TF = F.silu(F.linear(x_TD, gate_up_2FD[:num_neurons]).float())
    idx_TK = kept_neuron_indices(_scores(g_TF, selection_weight_F), num_kept)
    u_TK = _row_dots(gate_up_2FD[num_neurons:], idx_TK, x_TD).float()
    h_TK = torch.gather(g_TF, 1, idx_TK) * u_TK
    if probs_T is not None:
        h_TK = h_TK * probs_T.float().unsqueeze(-1)
    return _weighted_row_sums(down_t_FD, idx_TK, h_TK).to(x_TD.dtype)


def use_sparse_path(
    num_rows: int, num_kept: int, num_neurons: int, hidden: int, path: str = "auto"
) -> bool:
    """Whether :func:`expert_forward` takes the sparse path for an expert with ``num_rows`` rows.

    ``dense`` and ``sparse`` force a path; ``auto`` is sparse for at most SPARSE_MAX_ROWS rows,
    K <= SPARSE_MAX_KEEP_RATIO * F and D * F >= SPARSE_MIN_WEIGHTS (see their reasons above).
    """
    if path not in DECODE_PATHS:
        raise ValueError(f"decode path {path!r} is not one of {', '.join(DECODE_PATHS)}")
    if path == "auto":
        return (
            0 < num_rows <= SPARSE_MAX_ROWS
            and num_kept <= SPARSE_MAX_KEEP_RATIO * num_neurons
            and hidden * num_neurons >= SPARSE_MIN_WEIGHTS
        )
    return path == "sparse"


def expert_forward(
    x_TD: torch.Tensor,
    gate_up_2FD: torch.Tensor,
    down_t_FD: torch.Tensor,
    num_kept: int,
    probs_T: torch.Tensor | None = None,
    path: str = "auto",
    selection_weight_F: torch.Tensor | None = None,
) -> torch.Tensor:
    """One MoNE expert on its [T, D] rows by the path :func:`use_sparse_path` chooses."""
    num_neurons, hidden = down_t_FD.shape
    args = (x_TD, gate_up_2FD, down_t_FD, num_kept, probs_T, selection_weight_F)
    if use_sparse_path(x_TD.shape[0], num_kept, num_neurons, hidden, path):
        return sparse_expert_forward(*args)
    return dense_masked_expert_forward(*args)
