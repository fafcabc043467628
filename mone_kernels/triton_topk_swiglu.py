"""Fused MoNE activation in Triton: neuron top-K + SwiGLU, forward and backward.

Legend: N rows (every token routed to every local expert, stacked: rows are independent, so
one launch serves all local experts), F neurons, K kept per row, B = ceil(F / 8) mask bytes.

Forward, per tile of BLOCK_N rows x BLOCK_F (>= F) columns, all arithmetic in fp32:

    g = SiLU(gate); a = |g| read as int32 bits (non-negative floats order like their bits)
    t = the largest bit pattern with count(a >= t) >= K, built bit by bit from bit 30 down:
        31 passes of compare + row sum, exact, linear in F (no sort)
    keep = (a > t) | (a == t and rank among the ties <= K - count(a > t))   ties: lower index
    h = keep ? g * up : 0              -> [N, F] in the input dtype
    mask = keep, 8 neurons per byte    -> [N, B] uint8 (the only thing saved for backward)

Backward recomputes SiLU from the saved fc1 and reads the packed mask:

    dup = keep * dh * g;  dgate = keep * dh * up * sigmoid(gate) * (1 + gate - g)

The module has three parts, as kernel libraries do: the ``@triton.jit`` kernels, launchers
that check shapes and pick block sizes (registered as ``torch.library`` custom ops with fake
implementations, so ``torch.compile`` traces through them), and the autograd Function.
It imports on machines without a GPU; launching there needs ``TRITON_INTERPRET=1`` set before
triton is first imported (the tests do this).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the CPU reference still works without triton
    HAVE_TRITON = False

MAX_NEURONS = 16384  # one tile spans a whole row (register spills grow with F; untested on GPU)
_TILE_ELEMENTS = 4096  # rows per tile = 4096 / BLOCK_F: small F gets several rows per program
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_runnable(device: torch.device) -> bool:
    """Whether the Triton kernels can launch on ``device`` in this process."""
    if not HAVE_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


if HAVE_TRITON:

    @triton.jit
    def _mone_fwd_kernel(
        fc1_ptr,
        h_ptr,
        mask_ptr,
        num_rows,
        num_neurons,
        num_kept,
        stride_fc1,
        stride_h,
        stride_mask,
        BLOCK_N: tl.constexpr,
        BLOCK_F: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_F)
        row_ok = rows < num_rows
        valid = row_ok[:, None] & (cols < num_neurons)[None, :]
        base = rows.to(tl.int64)[:, None] * stride_fc1 + cols[None, :]
        # Upcast right after loading: fp32 inside whatever the storage dtype.
        gate = tl.load(fc1_ptr + base, mask=valid, other=0.0).to(tl.float32)
        up = tl.load(fc1_ptr + base + num_neurons, mask=valid, other=0.0).to(tl.float32)
        g = gate * tl.sigmoid(gate)
        bits = tl.abs(g).to(tl.int32, bitcast=True)
        bits = tl.where(valid, bits, -1)  # padding never counts: every real score is >= 0

        threshold = tl.zeros([BLOCK_N], dtype=tl.int32)
        for i in tl.static_range(31):
            candidate = threshold | (1 << (30 - i))
            count = tl.sum((bits >= candidate[:, None]).to(tl.int32), axis=1)
            threshold = tl.where(count >= num_kept, candidate, threshold)

        above = bits > threshold[:, None]
        slots = num_kept - tl.sum(above.to(tl.int32), axis=1)
        tied = (bits == threshold[:, None]).to(tl.int32)
        keep = above | ((tied != 0) & (tl.cumsum(tied, axis=1) <= slots[:, None]))

        h = tl.where(keep, g * up, 0.0)
        h_offs = rows.to(tl.int64)[:, None] * stride_h + cols[None, :]
        tl.store(h_ptr + h_offs, h.to(h_ptr.dtype.element_ty), mask=valid)

        keep_bits = tl.reshape(keep.to(tl.int32), (BLOCK_N, BLOCK_F // 8, 8))
        weights = (1 << tl.arange(0, 8))[None, None, :]
        packed = tl.sum(keep_bits * weights, axis=2)
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
        num_rows,
        num_neurons,
        stride_fc1,
        stride_dh,
        stride_mask,
        stride_dfc1,
        BLOCK_N: tl.constexpr,
        BLOCK_F: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_F)
        valid = (rows < num_rows)[:, None] & (cols < num_neurons)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        base = rows64 * stride_fc1 + cols[None, :]
        gate = tl.load(fc1_ptr + base, mask=valid, other=0.0).to(tl.float32)
        up = tl.load(fc1_ptr + base + num_neurons, mask=valid, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + rows64 * stride_dh + cols[None, :], mask=valid, other=0.0)
        packed = tl.load(mask_ptr + rows64 * stride_mask + cols[None, :] // 8, mask=valid, other=0)
        keep = ((packed.to(tl.int32) >> (cols[None, :] % 8)) & 1) != 0

        sig = tl.sigmoid(gate)
        g = gate * sig
        dh_kept = tl.where(keep, dh.to(tl.float32), 0.0)
        dup = dh_kept * g
        dgate = dh_kept * up * sig * (1.0 + gate - g)
        out = rows64 * stride_dfc1 + cols[None, :]
        tl.store(dfc1_ptr + out, dgate.to(dfc1_ptr.dtype.element_ty), mask=valid)
        tl.store(dfc1_ptr + out + num_neurons, dup.to(dfc1_ptr.dtype.element_ty), mask=valid)


def _blocks(num_neurons: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_F, num_warps) for rows of ``num_neurons``."""
    block_f = max(16, triton.next_power_of_2(num_neurons))
    block_n = max(1, _TILE_ELEMENTS // block_f)
    num_warps = 4 if block_f * block_n <= 4096 else 8 if block_f <= 8192 else 16
    return block_n, block_f, num_warps


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
def neuron_topk_swiglu_fwd(fc1_N2F: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: ``(h [N, F] in fc1's dtype, packed mask [N, ceil(F/8)] uint8)``."""
    num_neurons = _check_fc1(fc1_N2F)
    if not 1 <= k <= num_neurons:
        raise ValueError(f"k={k} must be in [1, {num_neurons}]")
    fc1_N2F = fc1_N2F.contiguous()
    num_rows = fc1_N2F.shape[0]
    h_NF = fc1_N2F.new_empty(num_rows, num_neurons)
    mask_NB = fc1_N2F.new_empty(num_rows, (num_neurons + 7) // 8, dtype=torch.uint8)
    if num_rows:
        block_n, block_f, num_warps = _blocks(num_neurons)
        _mone_fwd_kernel[(triton.cdiv(num_rows, block_n),)](
            fc1_N2F, h_NF, mask_NB, num_rows, num_neurons, k,
            fc1_N2F.stride(0), h_NF.stride(0), mask_NB.stride(0),
            BLOCK_N=block_n, BLOCK_F=block_f, num_warps=num_warps,
        )  # fmt: skip
    return h_NF, mask_NB


@neuron_topk_swiglu_fwd.register_fake
def _(fc1_N2F: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_rows, num_neurons = fc1_N2F.shape[0], fc1_N2F.shape[1] // 2
    return (
        fc1_N2F.new_empty(num_rows, num_neurons),
        fc1_N2F.new_empty(num_rows, (num_neurons + 7) // 8, dtype=torch.uint8),
    )


@torch.library.custom_op("mone_kernels::neuron_topk_swiglu_bwd", mutates_args=())
def neuron_topk_swiglu_bwd(
    fc1_N2F: torch.Tensor, mask_NB: torch.Tensor, dh_NF: torch.Tensor
) -> torch.Tensor:
    """Launch the backward kernel: ``d fc1 [N, 2F]`` in fc1's dtype."""
    num_neurons = _check_fc1(fc1_N2F)
    fc1_N2F, mask_NB, dh_NF = fc1_N2F.contiguous(), mask_NB.contiguous(), dh_NF.contiguous()
    num_rows = fc1_N2F.shape[0]
    dfc1_N2F = torch.empty_like(fc1_N2F)
    if num_rows:
        block_n, block_f, num_warps = _blocks(num_neurons)
        _mone_bwd_kernel[(triton.cdiv(num_rows, block_n),)](
            fc1_N2F, dh_NF, mask_NB, dfc1_N2F, num_rows, num_neurons,
            fc1_N2F.stride(0), dh_NF.stride(0), mask_NB.stride(0), dfc1_N2F.stride(0),
            BLOCK_N=block_n, BLOCK_F=block_f, num_warps=num_warps,
        )  # fmt: skip
    return dfc1_N2F


@neuron_topk_swiglu_bwd.register_fake
def _(fc1_N2F: torch.Tensor, mask_NB: torch.Tensor, dh_NF: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(fc1_N2F)


class NeuronTopkSwiGLUFunction(torch.autograd.Function):
    """Autograd over the two custom ops; saves fc1 and the packed mask only."""

    @staticmethod
    def forward(ctx, fc1_N2F: torch.Tensor, k: int):
        h_NF, mask_NB = neuron_topk_swiglu_fwd(fc1_N2F, k)
        ctx.save_for_backward(fc1_N2F, mask_NB)
        ctx.mark_non_differentiable(mask_NB)
        return h_NF, mask_NB

    @staticmethod
    def backward(ctx, dh_NF, _dmask):
        fc1_N2F, mask_NB = ctx.saved_tensors
        return neuron_topk_swiglu_bwd(fc1_N2F, mask_NB, dh_NF), None


def unpack_mask(mask_NB: torch.Tensor, num_neurons: int) -> torch.Tensor:
    """[N, ceil(F/8)] uint8 (bit j of byte b is neuron 8b + j) -> [N, F] bool."""
    shifts = torch.arange(8, device=mask_NB.device, dtype=torch.uint8)
    bits = (mask_NB.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(mask_NB.shape[0], -1)[:, :num_neurons].bool()


def neuron_topk_swiglu_triton(fc1_N2F: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MoNE activation through the Triton kernels: ``(h [N, F], packed mask [N, ceil(F/8)])``."""
    return NeuronTopkSwiGLUFunction.apply(fc1_N2F, k)
