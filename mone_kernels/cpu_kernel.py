"""Fused CPU operators built on first use: the MoNE activation, RMSNorm and RoPE.

The eager reference (:mod:`mone_kernels.reference`) makes about ten memory-bound passes over
[T, F] per direction and hands the selection to numpy; on CPU that made the activation a fifth
of a training step. ``csrc/topk_swiglu_cpu.cpp`` does the same arithmetic row by row in cache
(forward: selection by a bit-by-bit search of the K-th largest |g|, mask, h, balance statistics;
backward: one pass writing both halves of the fc1 gradient), split over torch's intra-op
threads (it links torch's own OpenMP runtime). The forward's SiLU stays torch's, so that the selection scores are the reference's bits
and the mask is identical; the backward computes its sigmoid itself (Cephes' expf, ~1 ulp).

``csrc/rms_norm_cpu.cpp`` is RMSNorm with its backward fused too (torch fuses only the CPU
forward; its backward is the composite's chain of elementwise nodes),
and ``csrc/rope_cpu.cpp`` rotary position embedding in one pass per direction (megatron-core's
unfused version makes about ten).

Legend: T rows of one expert, F neurons, K kept per row; R rows, H hidden size.

How the library is built, cached and loaded (once per machine, with a lock the operating system
releases), and how its AVX-512 / AVX2 / baseline row loops are chosen (the same bits from
each): :mod:`mone_kernels.cpu_build`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mone_kernels.cpu_build import load_error
from mone_kernels.reference import check_selection_weight


def _register_fakes() -> None:
    """Shape functions, so that tracing (torch.compile, opcheck) can go through the operators."""

    @torch.library.register_fake("mone_cpu::topk_swiglu_fwd")
    def _(g, up, k, with_balance, row_scale, weight):
        num_rows, num_neurons = g.shape
        stats = (num_neurons, num_rows, num_rows) if with_balance else (0, 0, 0)
        return (
            g.new_empty(num_rows, num_neurons),
            g.new_empty(num_rows, num_neurons, dtype=torch.bool),
            *(g.new_empty(n) for n in stats),
        )

    @torch.library.register_fake("mone_cpu::topk_swiglu_bwd")
    def _(dh, gate, up, mask, counts, sums, shares, balance_scale, row_scale):
        num_rows = gate.shape[0] if row_scale is not None else 0
        return gate.new_empty(gate.shape[0], 2 * gate.shape[1]), gate.new_empty(num_rows)

    @torch.library.register_fake("mone_cpu::rms_norm_fwd")
    def _(x, weight, eps):
        return x.new_empty(x.shape), x.new_empty(x.shape[0])

    @torch.library.register_fake("mone_cpu::rms_norm_bwd")
    def _(dy, x, weight, rstd):
        return x.new_empty(x.shape), weight.new_empty(weight.shape)

    @torch.library.register_fake("mone_cpu::rope_fwd")
    def _(x, cos, sin):
        return x.new_empty(x.shape)

    @torch.library.register_fake("mone_cpu::rope_bwd")
    def _(dy, cos, sin):
        return dy.new_empty(dy.shape)


@functools.cache
def cpu_kernel_error() -> str | None:
    """None when the CPU operators are usable in this process, else why not (one line)."""
    error = load_error()
    if error is None:
        _register_fakes()
    return error


class _NeuronTopkSwiGLUCPU(torch.autograd.Function):
    """h = SiLU(gate) * mask * up (mask constant), optionally times a per-row factor, and
    optionally the expert's balance loss; the reference's definition and results, two C++
    passes."""

    @staticmethod
    def forward(ctx, fc1_T2F, k: int, with_balance: bool, row_scale_T, weight_F):
        gate_TF, up_TF = fc1_T2F.float().chunk(2, dim=-1)
        num_rows, num_neurons = gate_TF.shape
        ctx.with_balance = with_balance and num_rows > 0
        if row_scale_T is not None:
            ctx.row_scale_dtype = row_scale_T.dtype
            row_scale_T = row_scale_T.float().contiguous()
        h_TF, mask_TF, counts_F, sums_T, shares_T = torch.ops.mone_cpu.topk_swiglu_fwd(
            F.silu(gate_TF), up_TF, k, ctx.with_balance, row_scale_T, weight_F
        )
        balance = torch.zeros((), device=fc1_T2F.device)
        if ctx.with_balance:
            ctx.scale = num_neurons / (num_rows * num_rows * k)
            balance = shares_T.sum() * ctx.scale
        ctx.save_for_backward(fc1_T2F, mask_TF, counts_F, sums_T, shares_T, row_scale_T)
        ctx.mark_non_differentiable(mask_TF)
        return h_TF.to(fc1_T2F.dtype), mask_TF, balance

    @staticmethod
    def backward(ctx, dh_TF, _dmask, dbalance):
        fc1_T2F, mask_TF, counts_F, sums_T, shares_T, row_scale_T = ctx.saved_tensors
        gate_TF, up_TF = fc1_T2F.float().chunk(2, dim=-1)
        dh_TF = dh_TF.float()
        if dh_TF.stride(-1) != 1:  # e.g. the expanded gradient of a sum
            dh_TF = dh_TF.contiguous()
        balance_scale = 0.0
        if ctx.with_balance and dbalance is not None:
            balance_scale = float(dbalance) * ctx.scale
        dfc1_T2F, drow_scale_T = torch.ops.mone_cpu.topk_swiglu_bwd(
            dh_TF,
            gate_TF,
            up_TF,
            mask_TF,
            counts_F,
            sums_T,
            shares_T,
            balance_scale,
            row_scale_T,
        )
        if row_scale_T is None:
            drow_scale_T = None
        else:
            drow_scale_T = drow_scale_T.to(ctx.row_scale_dtype)
        return dfc1_T2F.to(fc1_T2F.dtype), None, None, drow_scale_T, None


def neuron_topk_swiglu_cpu(
    fc1_T2F: torch.Tensor,
    k: int,
    with_balance: bool = False,
    row_scale_T: torch.Tensor | None = None,
    selection_weight_F: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The MoNE activation of :func:`mone_kernels.reference.neuron_topk_swiglu_reference`
    (same arguments and results; ``k < F``) through the fused CPU operator.

    ``row_scale_T`` ([T], optional, differentiable): a factor applied to each row of ``h``
    inside the same pass, as ``(h * row_scale_T[:, None]).to(h.dtype)`` would (the experts'
    router probabilities); the balance loss does not see it. ``selection_weight_F`` ([F] fp32,
    positive, optional): the top-K is taken of ``|g| * w``.
    """
    if fc1_T2F.device.type != "cpu":
        raise ValueError(f"the CPU kernel needs CPU tensors, got {fc1_T2F.device}")
    error = cpu_kernel_error()
    if error is not None:
        raise RuntimeError(f"the MoNE CPU kernel could not be built: {error}")
    check_selection_weight(selection_weight_F, fc1_T2F.shape[-1] // 2)
    h_TF, mask_TF, balance = _NeuronTopkSwiGLUCPU.apply(
        fc1_T2F, k, with_balance, row_scale_T, selection_weight_F
    )
    return h_TF, mask_TF, (balance if with_balance else None)


class _RMSNormCPU(torch.autograd.Function):
    """y = x / sqrt(mean(x^2) + eps) * w over the last dimension, fp32 inside."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        x_RH = x.reshape(-1, x.shape[-1]).float().contiguous()
        weight_H = weight.float().contiguous()
        y_RH, rstd_R = torch.ops.mone_cpu.rms_norm_fwd(x_RH, weight_H, eps)
        ctx.save_for_backward(x_RH, weight_H, rstd_R)
        ctx.dtypes = (x.dtype, weight.dtype)
        return y_RH.view(x.shape).to(torch.promote_types(x.dtype, weight.dtype))

    @staticmethod
    def backward(ctx, dy):
        x_RH, weight_H, rstd_R = ctx.saved_tensors
        dy_RH = dy.reshape(-1, x_RH.shape[-1]).float().contiguous()
        dx_RH, dweight_H = torch.ops.mone_cpu.rms_norm_bwd(dy_RH, x_RH, weight_H, rstd_R)
        x_dtype, weight_dtype = ctx.dtypes
        return dx_RH.view(dy.shape).to(x_dtype), dweight_H.to(weight_dtype), None


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``torch.nn.functional.rms_norm(x, weight.shape, weight, eps)`` for CPU tensors, with a
    fused backward; fp32 arithmetic, result in the promoted dtype of ``x`` and ``weight``."""
    error = cpu_kernel_error()
    if error is not None:
        raise RuntimeError(f"the CPU RMSNorm kernel could not be built: {error}")
    return _RMSNormCPU.apply(x, weight, eps)


class _RoPECPU(torch.autograd.Function):
    """Non-interleaved rotary embedding of [S, B, H, D] with per-position cos/sin [S, D]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor):
        ctx.save_for_backward(cos_SD, sin_SD)
        ctx.dtype = x.dtype
        x = x.float()
        if x.stride(-1) != 1:
            x = x.contiguous()
        return torch.ops.mone_cpu.rope_fwd(x, cos_SD, sin_SD).to(ctx.dtype)

    @staticmethod
    def backward(ctx, dy):
        cos_SD, sin_SD = ctx.saved_tensors
        dy = dy.float()
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        return torch.ops.mone_cpu.rope_bwd(dy, cos_SD, sin_SD).to(ctx.dtype), None, None


def rope_cpu(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """megatron-core's non-interleaved RoPE of ``x [S, B, H, D]`` by ``freqs [S, 1, 1, D]``
    (``x * cos + rotate_half(x) * sin``, cos/sin rounded to ``x``'s dtype as megatron does),
    fp32 arithmetic, one pass per direction."""
    error = cpu_kernel_error()
    if error is not None:
        raise RuntimeError(f"the CPU RoPE kernel could not be built: {error}")
    num_positions, width = freqs.shape[0], freqs.shape[-1]
    cos_SD = torch.cos(freqs).to(x.dtype).float().reshape(num_positions, width).contiguous()
    sin_SD = torch.sin(freqs).to(x.dtype).float().reshape(num_positions, width).contiguous()
    return _RoPECPU.apply(x, cos_SD, sin_SD)
