"""Plain-PyTorch reference of the MoNE activation (the other paths are tested against it).

Legend: T rows (tokens routed to one expert, or any stack of rows), F neurons, K kept per row.

    fc1_T2F = [gate_TF | up_TF]              (megatron's gated-linear-unit layout)
    g_TF    = SiLU(gate_TF)
    mask_TF = top-K of |g_TF| per row, ties to the lower neuron index (exactly K per row)
    h_TF    = (g_TF * mask_TF) * up_TF

With per-neuron selection weights w_F (the neuron-level loss-free balance, docs/method.md) the
selection ranks ``|g_TF| * w_F`` instead of ``|g_TF|``; h, the balance loss and every gradient
are otherwise unchanged (w only moves which neurons are kept).

The mask is a constant for autograd, like expert routing: gradients reach the gate through the
kept g only, and only the kept columns of ``up``. Arithmetic is fp32 whatever the input dtype.

Optionally the same pass returns the expert's neuron-granular balance loss (docs/method.md)
for the rows given, which must all belong to one expert:

    L = F sum_j f_j p_j,  f_j = (1/(T K)) sum_t m_tj,  p_j = (1/T) sum_t |g_tj| / sum_i |g_ti|
      = F / (T^2 K) * sum_t (|g_t| . c) / s_t        with c = sum_t m_t, s_t = sum_i |g_ti|

Its gradient (through p only; f is a constant) is folded into the activation's backward, so it
costs two reductions in forward and one extra term in backward instead of a second graph over
[T, F] tensors.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_TINY = torch.finfo(torch.float32).tiny


def _kth_largest(score_TF: torch.Tensor, k: int) -> torch.Tensor:
    """[T, 1] value of the k-th largest score of each row (exact)."""
    if score_TF.device.type == "cpu" and score_TF.dtype == torch.float32:
        # Non-negative IEEE floats order like their bit patterns read as int32, and numpy's
        # introselect on int32 is about 8x faster than torch.topk on a 2-core CPU.
        bits_TF = score_TF.contiguous().numpy().view(np.int32)
        column = score_TF.shape[-1] - k
        kth_T = np.partition(bits_TF, column, axis=-1)[:, column]
        return torch.from_numpy(kth_T.view(np.float32).copy()).unsqueeze(-1)
    return torch.topk(score_TF, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)


@torch.no_grad()
def neuron_topk_mask(score_TF: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask with exactly ``k`` True per row at the largest scores, ties to lower index.

    Args:
        score_TF: [T, F] non-negative selection scores (|SiLU(gate)| for MoNE), float dtype.
        k: neurons to keep per row, 1 <= k <= F.
    """
    num_neurons = score_TF.shape[-1]
    if not 1 <= k <= num_neurons:
        raise ValueError(f"k={k} must be in [1, {num_neurons}]")
    if score_TF.shape[0] and bool(score_TF.min() < 0):
        raise ValueError("neuron_topk_mask needs non-negative scores")
    return _topk_mask_nonnegative(score_TF, k)


def _topk_mask_nonnegative(score_TF: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`neuron_topk_mask` without argument checks (scores known to be >= 0)."""
    if k == score_TF.shape[-1]:
        return torch.ones_like(score_TF, dtype=torch.bool)
    # The K-th largest score is the threshold. Without ties at it, "score >= threshold" already
    # has exactly K per row; rows with ties there keep the tied scores of lowest index.
    kth_T1 = _kth_largest(score_TF, k)
    mask_TF = score_TF >= kth_T1
    row_counts_T = mask_TF.view(torch.uint8).sum(dim=-1, dtype=torch.int32)
    tied_rows = (row_counts_T > k).nonzero().squeeze(-1)
    if tied_rows.numel():
        score_RF, kth_R1 = score_TF[tied_rows], kth_T1[tied_rows]
        above_RF = score_RF > kth_R1
        slots_R1 = k - above_RF.sum(dim=-1, keepdim=True)
        tied_RF = score_RF == kth_R1
        mask_TF[tied_rows] = above_RF | (tied_RF & (tied_RF.cumsum(dim=-1) <= slots_R1))
    return mask_TF


class _NeuronTopkSwiGLU(torch.autograd.Function):
    """h = SiLU(gate) * mask * up (mask constant), and optionally the expert's balance loss."""

    @staticmethod
    def forward(ctx, fc1_T2F: torch.Tensor, k: int, with_balance: bool, weight_F):
        gate_TF, up_TF = fc1_T2F.float().chunk(2, dim=-1)
        num_rows, num_neurons = gate_TF.shape
        g_TF = F.silu(gate_TF)
        g_abs_TF = g_TF.abs()
        score_TF = g_abs_TF if weight_F is None else g_abs_TF * weight_F
        mask_TF = _topk_mask_nonnegative(score_TF, k)
        # Bool tensors convert to float several times faster through a uint8 view on CPU, and
        # multiplying by the float mask is ~10x faster there than torch.where / masked_fill.
        mask_f_TF = mask_TF.view(torch.uint8).to(torch.float32)
        balance = torch.zeros((), device=fc1_T2F.device)
        ctx.with_balance = with_balance and num_rows > 0
        if ctx.with_balance:
            counts_F = mask_f_TF.sum(dim=0)
            sums_T = g_abs_TF.sum(dim=-1).clamp_min_(_TINY)
            shares_T = (g_abs_TF @ counts_F).div_(sums_T)
            ctx.scale = num_neurons / (num_rows * num_rows * k)
            balance = shares_T.sum() * ctx.scale
            ctx.save_for_backward(fc1_T2F, mask_TF, counts_F, sums_T, shares_T)
        else:
            ctx.save_for_backward(fc1_T2F, mask_TF)
        h_TF = g_TF.mul_(mask_f_TF).mul_(up_TF)
        ctx.mark_non_differentiable(mask_TF)
        return h_TF.to(fc1_T2F.dtype), mask_TF, balance

    @staticmethod
    def backward(ctx, dh_TF, _dmask, dbalance):
        fc1_T2F, mask_TF = ctx.saved_tensors[:2]
        gate_TF, up_TF = fc1_T2F.float().chunk(2, dim=-1)
        dfc1_T2F = torch.empty(fc1_T2F.shape, dtype=torch.float32, device=fc1_T2F.device)
        dgate_TF, dup_TF = dfc1_T2F.chunk(2, dim=-1)
        # Few passes over [T, F] (memory-bound on CPU): the mask, two products, one fused
        # SiLU derivative, and the balance term when there is one.
        dh_TF = dh_TF.float() * mask_TF.view(torch.uint8).to(torch.float32)
        torch.mul(dh_TF, F.silu(gate_TF), out=dup_TF)
        dg_TF = dh_TF.mul_(up_TF)
        if ctx.with_balance and dbalance is not None:
            counts_F, sums_T, shares_T = ctx.saved_tensors[2:]
            # d balance / d|g_tj| = scale / s_t * (c_j - share_t); d|g| / dg = sign(g) = sign(gate)
            row_w_T1 = (dbalance * ctx.scale / sums_T).unsqueeze(-1)
            dabs_TF = torch.sub(counts_F, shares_T.unsqueeze(-1)).mul_(row_w_T1)
            dg_TF.addcmul_(dabs_TF, torch.sign(gate_TF))
        # d SiLU(x) / dx in one fused pass, written into the gate half.
        torch.ops.aten.silu_backward.grad_input(dg_TF, gate_TF, grad_input=dgate_TF)
        return dfc1_T2F.to(fc1_T2F.dtype), None, None, None


def check_selection_weight(weight_F: torch.Tensor | None, num_neurons: int) -> None:
    """Selection weights must be [F] fp32 and positive (they scale non-negative scores)."""
    if weight_F is None:
        return
    if weight_F.shape != (num_neurons,) or weight_F.dtype != torch.float32:
        raise ValueError(
            f"selection weights must be a float32 [{num_neurons}] tensor, got "
            f"{weight_F.dtype} {tuple(weight_F.shape)}"
        )


def neuron_topk_swiglu_reference(
    fc1_T2F: torch.Tensor,
    k: int,
    with_balance: bool = False,
    selection_weight_F: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """MoNE activation in plain PyTorch (fp32 inside, output in the input dtype).

    Args:
        fc1_T2F: [T, 2F] expert fc1 output, gate half first.
        k: neurons kept per row; ``k == F`` is the plain SwiGLU (no mask, no balance loss).
        with_balance: also return the balance loss L of these rows as one expert's tokens.
        selection_weight_F: optional [F] fp32 positive weights; the top-K is then taken of
            ``|g| * w`` (a constant: no gradient flows to it).

    Returns:
        h_TF: [T, F] masked SwiGLU product, differentiable w.r.t. ``fc1_T2F``.
        mask_TF: [T, F] bool selection, or None when ``k == F``.
        balance: scalar fp32 L (differentiable), or None when not asked for or ``k == F``.
    """
    if fc1_T2F.dim() != 2 or fc1_T2F.shape[-1] % 2:
        raise ValueError(f"fc1 output must be [T, 2F], got {tuple(fc1_T2F.shape)}")
    num_neurons = fc1_T2F.shape[-1] // 2
    if not 1 <= k <= num_neurons:
        raise ValueError(f"k={k} must be in [1, {num_neurons}]")
    if k == num_neurons:
        gate_TF, up_TF = fc1_T2F.float().chunk(2, dim=-1)
        return (F.silu(gate_TF) * up_TF).to(fc1_T2F.dtype), None, None
    check_selection_weight(selection_weight_F, num_neurons)
    h_TF, mask_TF, balance = _NeuronTopkSwiGLU.apply(fc1_T2F, k, with_balance, selection_weight_F)
    return h_TF, mask_TF, (balance if with_balance else None)


def expert_balance_loss(fc1_T2F: torch.Tensor, mask_TF: torch.Tensor) -> torch.Tensor:
    """The balance loss L of one expert's rows for a given [T, F] bool mask, through autograd.

    Same definition as the fused one above and the Triton path's (which works from the packed
    mask); kept as an independent check of both.
    """
    num_rows, num_neurons = mask_TF.shape
    if num_rows == 0:
        return fc1_T2F.sum() * 0.0
    g_abs_TF = F.silu(fc1_T2F[:, :num_neurons].float()).abs()
    counts_F = mask_TF.view(torch.uint8).to(torch.float32).sum(dim=0)
    num_kept = counts_F.sum() / num_rows
    shares_T = (g_abs_TF @ counts_F) / g_abs_TF.sum(dim=-1).clamp_min(_TINY)
    return shares_T.sum() * (num_neurons / (num_rows * num_rows * num_kept))
