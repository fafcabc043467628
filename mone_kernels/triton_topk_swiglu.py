"""Fused MoNE activation in Triton: neuron top-K + SwiGLU, forward and backward.

Legend: N rows (every token routed to every local expert, stacked: rows are independent, so
one launch serves all local experts), F neurons, K kept per row, B = ceil(F / 8) mask bytes,
E local experts (each owns a contiguous run of rows).

Forward, one CTA per BLOCK_N rows x BLOCK_F (>= F) columns, all arithmetic in fp32:

    a = |SiLU(gate)| read as int32 bits (non-negative floats order like their bits); with
        selection weights, |SiLU(gate)| * w[expert of the row] (w > 0: still non-negative)
    t = the largest bit pattern with count(a >= t) >= K, built bit by bit from bit 30 down:
        31 passes of compare + row sum, exact, linear in F (no sort)
    keep = (a > t) | (a == t and column <= c)                                 ties: lower index
        c = the largest column with count(a == t, column < c) < K - count(a > t), bisected
        the same way over the column bits; only tiles whose rows tie past K run it
    h = keep ? SiLU(gate) * up : 0     -> [N, F] in the input dtype
    mask = keep, 8 neurons per byte    -> [N, B] uint8 (the only thing saved for backward)

Only ``a`` stays in registers through the search; gate and up are read again (from cache) to
form ``h``. With that, and warps scaled with F, a whole row fits in 64 registers per thread.

Backward recomputes SiLU from the saved fc1 and reads the packed mask; it is elementwise, so it
tiles [rows, bytes of the mask, 8 neurons of a byte] with a small footprint per thread:

    dup = keep * dh * g;  dgate = (keep * dh * up + dbal) * sigmoid(gate) * (1 + gate - g)

The neuron-granular balance loss (see :mod:`mone_kernels.reference`) needs, per expert e,
the column counts c_e = sum_t m_t and, per row, s_t = sum_j |g_tj| and the share
share_t = (|g_t| . c_e) / s_t. Two small passes compute them from the packed mask and fc1
(no [N, F] bool or float tensor): a column popcount per expert, then one row pass. The
loss of expert e is F / (T_e^2 K) * sum_t share_t; its gradient enters the backward kernel as

    dbal = sign(gate) * (dshare_t / s_t) * (c_e[j] - share_t)

The module has three parts, as kernel libraries do: the ``@triton.jit`` kernels, launchers
that check shapes and pick block sizes (registered as ``torch.library`` custom ops with fake
implementations, so ``torch.compile`` traces through them), and the autograd Function.
It imports on machines without a GPU; launching there needs ``TRITON_INTERPRET=1`` set before
triton is first imported (the tests do this).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the CPU reference still works without triton
    HAVE_TRITON = False

MAX_NEURONS = 16384  # one forward CTA holds a whole row: 16384 fills 32 warps at 16 per thread
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Forward. The threshold search needs the whole row, so a CTA holds whole rows and the warp
# count grows with F instead: <= 16 scores per thread (at F = 16384 that is the 1024-thread
# limit of a CTA). Rows of F <= 1024 share 1024-element tiles (8 scores per thread), so that
# the per-pass row sums stay inside a warp for small F.
_FWD_ELEMS_PER_THREAD = 16
_FWD_MIN_TILE = 1024
_FWD_MAX_WARPS = 32
# 64 registers x 32 lanes x 32 warps fill the 64K-register file: 32 resident warps per SM.
# Unbounded, ptxas takes 75-95 for the same code, which halves residency; the static check
# (tests/test_kernel_static.py) proves the cap costs no spills on sm_80 and sm_90. Rows whose
# width is not a multiple of 16 get unvectorised stores with one address per element, which
# needs 72 (still >= 16 resident warps).
_FWD_MAX_REGS = 64
_FWD_MAX_REGS_UNALIGNED = 72
# Backward and the statistics passes stream: 1024-element tiles over 4 warps are 8 elements
# (one 16-byte bf16 vector) per thread, which needs few registers.
_STREAM_TILE = 1024
_STREAM_WARPS = 4
_BWD_BYTES = 32  # mask bytes (256 neurons) per backward row tile, so short rows still fill it
_COUNT_BYTES = 64  # popcount tiles are 1024 mask bytes, at most 64 (512 neurons) per row
_COUNT_STEPS = 16  # row tiles per popcount CTA: few atomics, and far below the 255 lane limit


class LaunchConfig(NamedTuple):
    """Compile-time block sizes, warp count and register cap of one kernel launch."""

    constexprs: dict
    num_warps: int
    maxnreg: int | None = None


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def forward_config(num_neurons: int, weighted: bool = False) -> LaunchConfig:
    """Tile of the forward kernel: whole rows, warps scaled so each thread holds <= 16 scores;
    ``weighted``: the selection ranks weighted scores (the neuron-level balance bias)."""
    block_f = max(16, _pow2(num_neurons))
    block_n = max(1, _FWD_MIN_TILE // block_f)
    threads = block_n * block_f // _FWD_ELEMS_PER_THREAD
    num_warps = min(_FWD_MAX_WARPS, max(_STREAM_WARPS, threads // 32))
    constexprs = {
        "BLOCK_N": block_n, "BLOCK_F": block_f, "LOG2_F": block_f.bit_length() - 1,
        "WEIGHTED": weighted,
    }  # fmt: skip
    max_regs = _FWD_MAX_REGS if num_neurons % 16 == 0 else _FWD_MAX_REGS_UNALIGNED
    return LaunchConfig(constexprs, num_warps, max_regs)


def backward_config(num_neurons: int, with_balance: bool = False) -> LaunchConfig:
    """Tile of the backward kernel: [rows, mask bytes, 8] elements, 8 per thread."""
    block_b = min(_BWD_BYTES, _pow2((num_neurons + 7) // 8))
    block_n = _STREAM_TILE // (8 * block_b)
    constexprs = {"BLOCK_N": block_n, "BLOCK_B": block_b, "WITH_BALANCE": with_balance}
    return LaunchConfig(constexprs, _STREAM_WARPS)


def share_config(num_neurons: int) -> LaunchConfig:
    """Tile of the row pass of the balance statistics (loops over column chunks)."""
    block_f = min(_STREAM_TILE, max(16, _pow2(num_neurons)))
    return LaunchConfig({"BLOCK_N": _STREAM_TILE // block_f, "BLOCK_F": block_f}, _STREAM_WARPS)


def count_config(num_neurons: int) -> LaunchConfig:
    """Tile of the column popcount: [rows, mask bytes], NUM_STEPS row tiles per CTA."""
    block_b = min(_COUNT_BYTES, _pow2((num_neurons + 7) // 8))
    constexprs = {"BLOCK_R": _STREAM_TILE // block_b, "BLOCK_B": block_b, "NUM_STEPS": _COUNT_STEPS}
    return LaunchConfig(constexprs, _STREAM_WARPS)


def triton_runnable(device: torch.device) -> bool:
    """Whether the Triton kernels can launch on ``device`` in this process."""
    if not HAVE_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


if HAVE_TRITON:
    # torch.finfo(float32).tiny: s_t is clamped to it, as the reference does.
    _TINY = tl.constexpr(1.1754943508222875e-38)

    @triton.jit
    def _mone_fwd_kernel(
        fc1_ptr,
        h_ptr,
        mask_ptr,
        weight_ptr,
        expert_ptr,
        num_rows,
        num_neurons,
        num_kept,
        stride_fc1,
        stride_h,
        stride_mask,
        stride_weight,
        BLOCK_N: tl.constexpr,
        BLOCK_F: tl.constexpr,
        LOG2_F: tl.constexpr,
        WEIGHTED: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_F)
        row_ok = rows < num_rows
        valid = row_ok[:, None] & (cols < num_neurons)[None, :]
        gate_ptrs = fc1_ptr + rows.to(tl.int64)[:, None] * stride_fc1 + cols[None, :]
        # Upcast right after loading: fp32 inside whatever the storage dtype.
        gate = tl.load(gate_ptrs, mask=valid, other=0.0).to(tl.float32)
        score = tl.abs(gate * tl.sigmoid(gate))
        if WEIGHTED:  # the neuron-level balance: rank |g| * w of the row's expert
            expert = tl.load(expert_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            w_ptrs = weight_ptr + expert[:, None] * stride_weight + cols[None, :]
            score = score * tl.load(w_ptrs, mask=valid, other=1.0)
        bits = score.to(tl.int32, bitcast=True)
        bits = tl.where(valid, bits, -1)  # padding never counts: every real score is >= 0

        threshold = tl.zeros([BLOCK_N], dtype=tl.int32)
        for i in range(31):
            candidate = threshold | (1 << (30 - i))
            count = tl.sum((bits >= candidate[:, None]).to(tl.int32), axis=1)
            threshold = tl.where(count >= num_kept, candidate, threshold)

        above = bits > threshold[:, None]
        tied = bits == threshold[:, None]
        slots = num_kept - tl.sum(above.to(tl.int32), axis=1)
        # Ties at the threshold keep the lowest columns: the last kept column is the largest
        # c with count(tied, column < c) < slots, bisected bit by bit like the threshold.
        last = tl.full([BLOCK_N], BLOCK_F, dtype=tl.int32)
        if tl.max(tl.sum(tied.to(tl.int32), axis=1) - slots) > 0:
            last = tl.zeros([BLOCK_N], dtype=tl.int32)
            for i in range(LOG2_F):
                candidate = last | (1 << (LOG2_F - 1 - i))
                count = tl.sum((tied & (cols[None, :] < candidate[:, None])).to(tl.int32), axis=1)
                last = tl.where(count < slots, candidate, last)
        keep = above | (tied & (cols[None, :] <= last[:, None]))

        # Second read of gate and up (cache hits): nothing but the scores lived through the
        # search, which is what keeps whole-row tiles free of spills. The L2-only hint also
        # keeps the compiler from merging this load with the first (gate would stay live).
        gate = tl.load(gate_ptrs, mask=valid, other=0.0, cache_modifier=".cg").to(tl.float32)
        up = tl.load(gate_ptrs + num_neurons, mask=valid, other=0.0).to(tl.float32)
        h = tl.where(keep, gate * tl.sigmoid(gate) * up, 0.0)
        h_offs = rows.to(tl.int64)[:, None] * stride_h + cols[None, :]
        tl.store(h_ptr + h_offs, h.to(h_ptr.dtype.element_ty), mask=valid)

        keep_bits = tl.reshape(keep.to(tl.int32), (BLOCK_N, BLOCK_F // 8, 8))
        packed = tl.sum(keep_bits << tl.arange(0, 8)[None, None, :], axis=2)
        byte_cols = tl.arange(0, BLOCK_F // 8)
        byte_ok = row_ok[:, None] & (byte_cols < (num_neurons + 7) // 8)[None, :]
        mask_offs = rows.to(tl.int64)[:, None] * stride_mask + byte_cols[None, :]
        tl.store(mask_ptr + mask_offs, packed.to(tl.uint8), mask=byte_ok)

    @triton.jit
    def _mone_bwd_kernel(
        fc1_ptr,
        dh_ptr,
        mask_ptr,
        dfc1_ptr,
        expert_ptr,
        counts_ptr,
        shares_ptr,
        coef_ptr,
        num_rows,
        num_neurons,
        stride_fc1,
        stride_dh,
        stride_mask,
        stride_dfc1,
        stride_counts,
        BLOCK_N: tl.constexpr,
        BLOCK_B: tl.constexpr,
        WITH_BALANCE: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        byte_cols = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        # cols[0, b, j] = 8 b + j: the 8 neurons of mask byte b sit in one thread's registers.
        cols = byte_cols[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
        row_ok = rows < num_rows
        valid = row_ok[:, None, None] & (cols < num_neurons)
        rows64 = rows.to(tl.int64)[:, None, None]
        packed = tl.load(
            mask_ptr + rows.to(tl.int64)[:, None] * stride_mask + byte_cols[None, :],
            mask=row_ok[:, None] & (byte_cols < (num_neurons + 7) // 8)[None, :],
            other=0,
        )
        keep = ((packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1) != 0
        in_offs = rows64 * stride_fc1 + cols
        gate = tl.load(fc1_ptr + in_offs, mask=valid, other=0.0).to(tl.float32)
        up = tl.load(fc1_ptr + in_offs + num_neurons, mask=valid, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + rows64 * stride_dh + cols, mask=valid, other=0.0)

        sig = tl.sigmoid(gate)
        g = gate * sig
        dh_kept = tl.where(keep, dh.to(tl.float32), 0.0)
        dup = dh_kept * g
        dg = dh_kept * up
        if WITH_BALANCE:
            expert = tl.load(expert_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            share = tl.load(shares_ptr + rows, mask=row_ok, other=0.0)[:, None, None]
            coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)[:, None, None]
            c_offs = expert[:, None, None] * stride_counts + cols
            count = tl.load(counts_ptr + c_offs, mask=valid, other=0.0)
            sign = tl.where(gate > 0, 1.0, tl.where(gate < 0, -1.0, 0.0))
            dg += (count - share) * coef * sign
        dgate = dg * sig * (1.0 + gate - g)
        out = rows64 * stride_dfc1 + cols
        tl.store(dfc1_ptr + out, dgate.to(dfc1_ptr.dtype.element_ty), mask=valid)
        tl.store(dfc1_ptr + out + num_neurons, dup.to(dfc1_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _mone_count_kernel(
        mask_ptr,
        offsets_ptr,
        counts_ptr,
        num_neurons,
        stride_mask,
        stride_counts,
        BLOCK_R: tl.constexpr,
        BLOCK_B: tl.constexpr,
        NUM_STEPS: tl.constexpr,
    ):
        expert = tl.program_id(0)
        first = tl.load(offsets_ptr + expert) + tl.program_id(2) * (BLOCK_R * NUM_STEPS)
        end = tl.minimum(tl.load(offsets_ptr + expert + 1), first + BLOCK_R * NUM_STEPS)
        byte_cols = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        byte_ok = byte_cols < (num_neurons + 7) // 8
        # Four 8-bit counters per int32: bit j of a mask byte is added to byte lane j of `low`
        # (j < 4) or j - 4 of `high`. A lane gains at most 1 per step and NUM_STEPS < 256.
        low = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.int32)
        high = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.int32)
        for start in range(first, end, BLOCK_R):
            rows = start + tl.arange(0, BLOCK_R)
            offs = rows.to(tl.int64)[:, None] * stride_mask + byte_cols[None, :]
            ok = (rows < end)[:, None] & byte_ok[None, :]
            byte = tl.load(mask_ptr + offs, mask=ok, other=0).to(tl.int32)
            low += (byte & 1) | ((byte & 2) << 7) | ((byte & 4) << 14) | ((byte & 8) << 21)
            byte = byte >> 4
            high += (byte & 1) | ((byte & 2) << 7) | ((byte & 4) << 14) | ((byte & 8) << 21)
        lanes = 8 * tl.arange(0, 4)[None, None, :]
        low_counts = tl.sum((low[:, :, None] >> lanes) & 255, axis=0).to(tl.float32)
        high_counts = tl.sum((high[:, :, None] >> lanes) & 255, axis=0).to(tl.float32)
        cols = byte_cols[:, None] * 8 + tl.arange(0, 4)[None, :]
        counts = counts_ptr + expert.to(tl.int64) * stride_counts + cols
        # Integer-valued fp32 adds are exact below 2^24 rows, so the order of atomics is moot.
        tl.atomic_add(counts, low_counts, mask=(cols < num_neurons) & (end > first))
        tl.atomic_add(counts + 4, high_counts, mask=(cols + 4 < num_neurons) & (end > first))

    @triton.jit
    def _mone_share_kernel(
        fc1_ptr,
        expert_ptr,
        counts_ptr,
        sums_ptr,
        shares_ptr,
        num_rows,
        num_neurons,
        stride_fc1,
        stride_counts,
        BLOCK_N: tl.constexpr,
        BLOCK_F: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < num_rows
        expert = tl.load(expert_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        gate_row = fc1_ptr + rows.to(tl.int64)[:, None] * stride_fc1
        count_row = counts_ptr + expert[:, None] * stride_counts
        abs_sum = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
        dot = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
        for start in range(0, num_neurons, BLOCK_F):
            cols = start + tl.arange(0, BLOCK_F)[None, :]
            ok = row_ok[:, None] & (cols < num_neurons)
            gate = tl.load(gate_row + cols, mask=ok, other=0.0).to(tl.float32)
            score = tl.abs(gate * tl.sigmoid(gate))
            abs_sum += score
            dot += score * tl.load(count_row + cols, mask=ok, other=0.0)
        sums = tl.maximum(tl.sum(abs_sum, axis=1), _TINY)
        tl.store(sums_ptr + rows, sums, mask=row_ok)
        tl.store(shares_ptr + rows, tl.sum(dot, axis=1) / sums, mask=row_ok)


def _check_fc1(fc1_N2F: torch.Tensor) -> int:
    if not HAVE_TRITON:
        raise RuntimeError("the Triton MoNE kernel needs the triton package")
    if fc1_N2F.dim() != 2 or fc1_N2F.shape[1] % 2:
        raise ValueError(f"fc1 output must be [N, 2F], got {tuple(fc1_N2F.shape)}")
    if fc1_N2F.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fc1 dtype {fc1_N2F.dtype} is not one of {SUPPORTED_DTYPES}")
    num_neurons = fc1_N2F.shape[1] // 2
    if num_neurons > MAX_NEURONS:
        raise ValueError(f"F={num_neurons} neurons exceeds the kernel's maximum {MAX_NEURONS}")
    if not triton_runnable(fc1_N2F.device):
        raise RuntimeError(
            "the Triton MoNE kernel needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU), "
            f"got a tensor on {fc1_N2F.device}"
        )
    return num_neurons


@torch.library.custom_op("mone_kernels::neuron_topk_swiglu_fwd", mutates_args=())
def neuron_topk_swiglu_fwd(
    fc1_N2F: torch.Tensor,
    k: int,
    weight_EF: torch.Tensor | None = None,
    expert_N: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: ``(h [N, F] in fc1's dtype, packed mask [N, ceil(F/8)] uint8)``.

    With ``weight_EF`` (fp32 positive selection weights per expert) and ``expert_N`` (int32
    expert of each row) the top-K is taken of ``|g| * weight_EF[expert_N]``.
    """
    num_neurons = _check_fc1(fc1_N2F)
    if not 1 <= k <= num_neurons:
        raise ValueError(f"k={k} must be in [1, {num_neurons}]")
    weighted = weight_EF is not None
    if weighted != (expert_N is not None):
        raise ValueError("selection weights need the expert of every row, and vice versa")
    fc1_N2F = fc1_N2F.contiguous()
    num_rows = fc1_N2F.shape[0]
    h_NF = fc1_N2F.new_empty(num_rows, num_neurons)
    mask_NB = fc1_N2F.new_empty(num_rows, (num_neurons + 7) // 8, dtype=torch.uint8)
    if num_rows:
        config = forward_config(num_neurons, weighted)
        if weighted:
            weight_EF, expert_N = weight_EF.float().contiguous(), expert_N.contiguous()
        else:  # never read: WEIGHTED is a compile-time False
            weight_EF, expert_N = h_NF, mask_NB
        _mone_fwd_kernel[(triton.cdiv(num_rows, config.constexprs["BLOCK_N"]),)](
            fc1_N2F, h_NF, mask_NB, weight_EF, expert_N, num_rows, num_neurons, k,
            fc1_N2F.stride(0), h_NF.stride(0), mask_NB.stride(0), weight_EF.stride(0),
            **config.constexprs, num_warps=config.num_warps, maxnreg=config.maxnreg,
        )  # fmt: skip
    return h_NF, mask_NB


@neuron_topk_swiglu_fwd.register_fake
def _(
    fc1_N2F: torch.Tensor,
    k: int,
    weight_EF: torch.Tensor | None = None,
    expert_N: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_rows, num_neurons = fc1_N2F.shape[0], fc1_N2F.shape[1] // 2
    return (
        fc1_N2F.new_empty(num_rows, num_neurons),
        fc1_N2F.new_empty(num_rows, (num_neurons + 7) // 8, dtype=torch.uint8),
    )


def expert_of_rows(row_counts: list[int], device: torch.device) -> torch.Tensor:
    """[N] int32 index of the expert that owns each row, for rows stacked expert by expert."""
    num_rows = sum(row_counts)
    experts_E = torch.arange(len(row_counts), device=device, dtype=torch.int32)
    repeats_E = torch.tensor(row_counts, device=device)
    return torch.repeat_interleave(experts_E, repeats_E, output_size=num_rows)


@torch.library.custom_op("mone_kernels::neuron_topk_balance_stats", mutates_args=())
def neuron_topk_balance_stats(
    fc1_N2F: torch.Tensor, mask_NB: torch.Tensor, row_counts: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balance-loss statistics from fc1 and the packed mask, rows stacked expert by expert.

    Returns ``counts_EF`` (fp32 column counts c_e of the mask), ``sums_N`` (s_t, clamped to the
    smallest normal float as the reference does) and ``shares_N`` ((|g_t| . c_e) / s_t).
    """
    num_neurons = _check_fc1(fc1_N2F)
    fc1_N2F, mask_NB = fc1_N2F.contiguous(), mask_NB.contiguous()
    num_rows, device = fc1_N2F.shape[0], fc1_N2F.device
    if sum(row_counts) != num_rows:
        raise ValueError(f"row_counts {row_counts} do not add up to the {num_rows} rows")
    counts_EF = torch.zeros(len(row_counts), num_neurons, device=device)
    sums_N = torch.empty(num_rows, device=device)
    shares_N = torch.empty(num_rows, device=device)
    if num_rows == 0:
        return counts_EF, sums_N, shares_N
    offsets = [0]
    for count in row_counts:
        offsets.append(offsets[-1] + count)
    offsets_E1 = torch.tensor(offsets, device=device, dtype=torch.int32)
    count_cfg = count_config(num_neurons)
    rows_per_cta = count_cfg.constexprs["BLOCK_R"] * count_cfg.constexprs["NUM_STEPS"]
    grid = (
        len(row_counts),
        triton.cdiv(mask_NB.shape[1], count_cfg.constexprs["BLOCK_B"]),
        triton.cdiv(max(row_counts), rows_per_cta),
    )
    _mone_count_kernel[grid](
        mask_NB, offsets_E1, counts_EF, num_neurons, mask_NB.stride(0), counts_EF.stride(0),
        **count_cfg.constexprs, num_warps=count_cfg.num_warps,
    )  # fmt: skip
    share_cfg = share_config(num_neurons)
    _mone_share_kernel[(triton.cdiv(num_rows, share_cfg.constexprs["BLOCK_N"]),)](
        fc1_N2F, expert_of_rows(row_counts, device), counts_EF, sums_N, shares_N,
        num_rows, num_neurons, fc1_N2F.stride(0), counts_EF.stride(0),
        **share_cfg.constexprs, num_warps=share_cfg.num_warps,
    )  # fmt: skip
    return counts_EF, sums_N, shares_N


@neuron_topk_balance_stats.register_fake
def _(
    fc1_N2F: torch.Tensor, mask_NB: torch.Tensor, row_counts: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_rows, num_neurons = fc1_N2F.shape[0], fc1_N2F.shape[1] // 2
    new = fc1_N2F.new_empty
    return (
        new(len(row_counts), num_neurons, dtype=torch.float32),
        new(num_rows, dtype=torch.float32),
        new(num_rows, dtype=torch.float32),
    )


@torch.library.custom_op("mone_kernels::neuron_topk_swiglu_bwd", mutates_args=())
def neuron_topk_swiglu_bwd(
    fc1_N2F: torch.Tensor,
    mask_NB: torch.Tensor,
    dh_NF: torch.Tensor,
    expert_N: torch.Tensor | None = None,
    counts_EF: torch.Tensor | None = None,
    shares_N: torch.Tensor | None = None,
    coef_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the backward kernel: ``d fc1 [N, 2F]`` in fc1's dtype.

    With the balance statistics (``expert_N`` [N] int32, ``counts_EF``, ``shares_N`` and
    ``coef_N`` = d loss / d share_t / s_t, all fp32) the balance loss's gradient is added.
    """
    num_neurons = _check_fc1(fc1_N2F)
    fc1_N2F, mask_NB, dh_NF = fc1_N2F.contiguous(), mask_NB.contiguous(), dh_NF.contiguous()
    balance = (expert_N, counts_EF, shares_N, coef_N)
    with_balance = all(t is not None for t in balance)
    if not with_balance and any(t is not None for t in balance):
        raise ValueError("the balance statistics come all together or not at all")
    num_rows = fc1_N2F.shape[0]
    dfc1_N2F = torch.empty_like(fc1_N2F)
    if num_rows:
        if with_balance:
            counts_EF = counts_EF.contiguous()
            extra = (expert_N.contiguous(), counts_EF, shares_N.contiguous(), coef_N.contiguous())
        else:  # never read: WITH_BALANCE is a compile-time False
            counts_EF, extra = mask_NB, (mask_NB,) * 4
        config = backward_config(num_neurons, with_balance)
        grid = (
            triton.cdiv(num_rows, config.constexprs["BLOCK_N"]),
            triton.cdiv(mask_NB.shape[1], config.constexprs["BLOCK_B"]),
        )
        _mone_bwd_kernel[grid](
            fc1_N2F, dh_NF, mask_NB, dfc1_N2F, *extra, num_rows, num_neurons,
            fc1_N2F.stride(0), dh_NF.stride(0), mask_NB.stride(0), dfc1_N2F.stride(0),
            counts_EF.stride(0), **config.constexprs, num_warps=config.num_warps,
        )  # fmt: skip
    return dfc1_N2F


@neuron_topk_swiglu_bwd.register_fake
def _(
    fc1_N2F: torch.Tensor,
    mask_NB: torch.Tensor,
    dh_NF: torch.Tensor,
    expert_N: torch.Tensor | None = None,
    counts_EF: torch.Tensor | None = None,
    shares_N: torch.Tensor | None = None,
    coef_N: torch.Tensor | None = None,
) -> torch.Tensor:
    return torch.empty_like(fc1_N2F)


class NeuronTopkSwiGLUFunction(torch.autograd.Function):
    """Autograd over the custom ops; saves fc1, the packed mask and [N]/[E, F] statistics."""

    @staticmethod
    def forward(
        ctx,
        fc1_N2F: torch.Tensor,
        k: int,
        row_counts: list[int] | None,
        weights: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h_NF, mask_NB = neuron_topk_swiglu_fwd(fc1_N2F, k, *(weights or (None, None)))
        ctx.mark_non_differentiable(mask_NB)
        ctx.with_balance = row_counts is not None
        if not ctx.with_balance:
            ctx.save_for_backward(fc1_N2F, mask_NB)
            shares_N = fc1_N2F.new_empty(0, dtype=torch.float32)
            ctx.mark_non_differentiable(shares_N)
            return h_NF, mask_NB, shares_N
        counts_EF, sums_N, shares_N = neuron_topk_balance_stats(fc1_N2F, mask_NB, row_counts)
        expert_N = expert_of_rows(row_counts, fc1_N2F.device)
        ctx.save_for_backward(fc1_N2F, mask_NB, expert_N, counts_EF, sums_N, shares_N)
        return h_NF, mask_NB, shares_N

    @staticmethod
    def backward(
        ctx, dh_NF: torch.Tensor | None, _dmask: None, dshares_N: torch.Tensor | None
    ) -> tuple[torch.Tensor, None, None]:
        fc1_N2F, mask_NB = ctx.saved_tensors[:2]
        if dh_NF is None:
            dh_NF = fc1_N2F.new_zeros(fc1_N2F.shape[0], fc1_N2F.shape[1] // 2)
        if ctx.with_balance and dshares_N is not None:
            expert_N, counts_EF, sums_N, shares_N = ctx.saved_tensors[2:]
            coef_N = dshares_N.float() / sums_N
            dfc1 = neuron_topk_swiglu_bwd(
                fc1_N2F, mask_NB, dh_NF, expert_N, counts_EF, shares_N, coef_N
            )
        else:
            dfc1 = neuron_topk_swiglu_bwd(fc1_N2F, mask_NB, dh_NF)
        return dfc1, None, None, None


def unpack_mask(mask_NB: torch.Tensor, num_neurons: int) -> torch.Tensor:
    """[N, ceil(F/8)] uint8 (bit j of byte b is neuron 8b + j) -> [N, F] bool."""
    shifts = torch.arange(8, device=mask_NB.device, dtype=torch.uint8)
    bits = (mask_NB.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(mask_NB.shape[0], -1)[:, :num_neurons].bool()


def neuron_topk_swiglu_triton(
    fc1_N2F: torch.Tensor,
    k: int,
    row_counts: list[int] | None = None,
    selection_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MoNE activation through the Triton kernels.

    Args:
        fc1_N2F: [N, 2F] fc1 output, gate half first.
        k: neurons kept per row.
        row_counts: rows of each expert (stacked in order) when the balance statistics are
            wanted; None skips them.
        selection_weights: optional (``weight_EF`` [E, F] fp32 > 0, ``expert_N`` [N] int32):
            rank ``|g| * weight_EF[expert of the row]`` (a constant, no gradient).

    Returns:
        ``h_NF`` [N, F], the packed mask [N, ceil(F/8)] uint8, and ``shares_N`` [N] fp32
        (differentiable; empty without ``row_counts``): expert e's balance loss is
        F / (T_e^2 K) times the sum of its rows' shares.
    """
    return NeuronTopkSwiGLUFunction.apply(fc1_N2F, k, row_counts, selection_weights)
