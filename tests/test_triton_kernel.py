"""The Triton MoNE kernel against the PyTorch reference (interpreter on CPU, compiled on GPU)."""

from __future__ import annotations

import pytest
import torch

from mone_kernels import (
    neuron_topk_swiglu,
    neuron_topk_swiglu_grouped,
    neuron_topk_swiglu_reference,
)
from mone_kernels.reference import expert_balance_loss
from mone_kernels.triton_topk_swiglu import (
    neuron_topk_balance_stats,
    neuron_topk_swiglu_fwd,
    triton_runnable,
    unpack_mask,
)
from tests.helpers.kernels import kernel_and_reference
from tests.helpers.references import ng_lbl_literal

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [
    pytest.mark.skipif(
        not triton_runnable(DEVICE), reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest)"
    ),
    # Compiled on a GPU: there these belong to the gpu tier (run last, without the CPU patches
    # of earlier tests: tests/conftest.py).
    *([pytest.mark.gpu] if DEVICE.type == "cuda" else []),
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _fc1(rows, neurons, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2 * neurons, generator=gen).to(DEVICE, dtype)


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("neurons", [8, 96, 257])
@pytest.mark.parametrize(
    "k_of", [lambda f: 1, lambda f: f // 2, lambda f: f], ids=["k1", "khalf", "kall"]
)
def test_forward_and_gradients_match_reference(rows, neurons, k_of):
    k = k_of(neurons)
    (h, packed, grad), (h_ref, mask_ref, grad_ref) = kernel_and_reference(
        _fc1(rows, neurons, seed=neurons), k
    )
    mask = unpack_mask(packed, neurons)
    assert (mask.sum(dim=-1) == k).all()
    if mask_ref is not None:
        assert torch.equal(mask, mask_ref)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)


def test_ties_and_all_negative_gates():
    neurons, k = 96, 40
    fc1 = _fc1(6, neurons, seed=3)
    fc1[0, :neurons] = 1.0  # all tied
    fc1[1, :neurons] = torch.arange(neurons, device=DEVICE) % 4 - 1.5  # four tied levels
    fc1[2, :neurons] = 0.0  # SiLU(0) = 0 everywhere: all tied at zero
    fc1[3, :neurons] = -fc1[3, :neurons].abs() - 0.05  # all negative
    fc1[4, :neurons] = -1.278  # near SiLU's minimum, tied
    (h, packed, grad), (h_ref, mask_ref, grad_ref) = kernel_and_reference(fc1, k)
    mask = unpack_mask(packed, neurons)
    assert torch.equal(mask, mask_ref)
    assert torch.equal(mask[0], torch.arange(neurons, device=DEVICE) < k)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_storage_with_fp32_compute(dtype):
    neurons, k = 96, 48
    fc1 = _fc1(16, neurons, dtype, seed=5)
    (h, packed, grad), (h_ref, mask_ref, grad_ref) = kernel_and_reference(fc1, k)
    assert h.dtype == dtype and grad.dtype == dtype
    assert torch.equal(unpack_mask(packed, neurons), mask_ref)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(h.float(), h_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.float(), grad_ref, rtol=tol, atol=tol)


def test_saved_mask_is_bit_packed_with_k_bits_per_row():
    neurons, k = 257, 100
    _, packed = neuron_topk_swiglu_fwd(_fc1(9, neurons), k)
    assert packed.dtype == torch.uint8 and packed.shape == (9, 33)
    popcount = sum(((packed >> bit) & 1).sum(dim=-1) for bit in range(8))
    assert (popcount == k).all()


def test_grouped_launch_equals_reference_per_expert_including_balance():
    chunks = [_fc1(n, 24, seed=n) for n in (5, 0, 11)]
    got = neuron_topk_swiglu_grouped(chunks, 6, impl="triton", with_balance=True)
    for chunk, act in zip(chunks, got):
        h_ref, mask_ref, balance_ref = neuron_topk_swiglu_reference(chunk, 6, with_balance=True)
        assert torch.equal(act.mask, mask_ref)
        torch.testing.assert_close(act.h, h_ref, rtol=1e-5, atol=1e-5)
        if chunk.shape[0]:
            torch.testing.assert_close(act.balance, balance_ref, rtol=1e-5, atol=1e-6)
            g_abs = torch.nn.functional.silu(chunk[:, :24]).abs()
            torch.testing.assert_close(
                act.balance, ng_lbl_literal(g_abs, mask_ref), rtol=1e-5, atol=1e-6
            )


def test_autograd_balance_loss_gradient_matches_fused_reference():
    fc1 = _fc1(20, 16, seed=9)
    x = fc1.clone().requires_grad_()
    _, mask, fused = neuron_topk_swiglu_reference(x, 4, with_balance=True)
    fused.backward()
    y = fc1.clone().requires_grad_()
    expert_balance_loss(y, mask).backward()
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-5, atol=1e-7)


def _grouped_with_balance(chunks, k, impl, dh_chunks, beta=0.7):
    """Activation + beta * NG-LBL per expert, backward through both; returns acts and grads."""
    xs = [chunk.clone().requires_grad_() for chunk in chunks]
    acts = neuron_topk_swiglu_grouped(xs, k, impl=impl, with_balance=True)
    loss = sum((act.h.float() * dh).sum() + beta * act.balance for act, dh in zip(acts, dh_chunks))
    loss.backward()
    return acts, [x.grad for x in xs]


@pytest.mark.parametrize(
    ("rows", "neurons", "k"),
    [((5, 0, 11), 24, 6), ((1,), 37, 1), ((3, 9), 257, 100), ((2, 6), 96, 40)],
    ids=["experts-24", "one-row-k1", "odd-width-257", "ties-96"],
)
def test_balance_loss_from_packed_mask_matches_reference(rows, neurons, k):
    chunks = [_fc1(n, neurons, seed=n + neurons) for n in rows]
    if neurons == 96:  # ties at the threshold: tied rows and a row of zeros (SiLU(0) = 0)
        chunks[0][0, :neurons] = 1.0
        chunks[1][1, :neurons] = 0.0
    gen = torch.Generator().manual_seed(1)
    dh_chunks = [torch.randn(n, neurons, generator=gen).to(DEVICE) for n in rows]
    acts, grads = _grouped_with_balance(chunks, k, "triton", dh_chunks)
    refs, grads_ref = _grouped_with_balance(chunks, k, "reference", dh_chunks)
    for chunk, act, ref, grad, grad_ref in zip(chunks, acts, refs, grads, grads_ref):
        assert torch.equal(act.mask, ref.mask)
        torch.testing.assert_close(act.h, ref.h, rtol=1e-5, atol=1e-5)
        if chunk.shape[0]:
            torch.testing.assert_close(act.balance, ref.balance, rtol=1e-5, atol=1e-6)
            g_abs = torch.nn.functional.silu(chunk[:, :neurons]).abs()
            if g_abs.sum(dim=-1).min() > 0:  # the literal formula has no clamp for s_t = 0
                literal = ng_lbl_literal(g_abs, ref.mask)
                torch.testing.assert_close(act.balance, literal, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)


def test_balance_loss_with_bf16_storage():
    chunks = [_fc1(n, 64, torch.bfloat16, seed=n) for n in (7, 12)]
    dh_chunks = [torch.randn(n, 64).to(DEVICE) for n in (7, 12)]
    acts, grads = _grouped_with_balance(chunks, 20, "triton", dh_chunks)
    refs, grads_ref = _grouped_with_balance(chunks, 20, "reference", dh_chunks)
    tol = TOLERANCE[torch.bfloat16]
    for act, ref, grad, grad_ref in zip(acts, refs, grads, grads_ref):
        assert torch.equal(act.mask, ref.mask) and grad.dtype == torch.bfloat16
        torch.testing.assert_close(act.balance, ref.balance, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.float(), grad_ref.float(), rtol=tol, atol=tol)


def test_without_mask_no_bool_mask_and_same_results():
    chunks = [_fc1(n, 40, seed=n) for n in (6, 3)]
    for impl in ("triton", "reference"):
        with_mask = neuron_topk_swiglu_grouped(chunks, 9, impl=impl, with_balance=True)
        without = neuron_topk_swiglu_grouped(
            chunks, 9, impl=impl, with_balance=True, with_mask=False
        )
        for a, b in zip(with_mask, without):
            assert a.mask is not None and b.mask is None
            assert torch.equal(a.h, b.h) and torch.equal(a.balance, b.balance)
    single = neuron_topk_swiglu(chunks[0], 9, impl="triton", with_mask=False)
    assert single.mask is None and single.balance is None


def test_balance_statistics_of_many_rows_split_over_ctas():
    # 9000 rows of F = 16 span two popcount CTAs per expert (8192 rows each), plus an expert
    # with a single row: c_e must still be the exact column counts of each expert's mask.
    neurons, row_counts = 16, [9000, 1, 0, 40]
    num_rows = sum(row_counts)
    gen = torch.Generator().manual_seed(4)
    mask_NF = torch.rand(num_rows, neurons, generator=gen) < 0.3
    packed = mask_NF.view(num_rows, 2, 8).to(torch.uint8) << torch.arange(8, dtype=torch.uint8)
    packed_NB = packed.sum(dim=-1, dtype=torch.uint8).to(DEVICE)
    fc1 = _fc1(num_rows, neurons, seed=4)
    counts_EF, sums_N, shares_N = neuron_topk_balance_stats(fc1, packed_NB, row_counts)
    assert torch.equal(unpack_mask(packed_NB, neurons).cpu(), mask_NF)
    expected_EF = torch.stack([m.float().sum(dim=0) for m in mask_NF.split(row_counts)])
    assert torch.equal(counts_EF.cpu(), expected_EF)
    g_abs = torch.nn.functional.silu(fc1[:, :neurons].float()).abs()
    torch.testing.assert_close(sums_N, g_abs.sum(dim=-1), rtol=1e-6, atol=1e-6)
    expert_N = torch.repeat_interleave(torch.arange(4), torch.tensor(row_counts)).to(DEVICE)
    shares_ref = (g_abs * counts_EF[expert_N]).sum(dim=-1) / g_abs.sum(dim=-1)
    torch.testing.assert_close(shares_N, shares_ref, rtol=1e-5, atol=1e-5)


def test_custom_ops_pass_torch_library_checks():
    fc1 = _fc1(4, 16, seed=2)
    torch.library.opcheck(torch.ops.mone_kernels.neuron_topk_swiglu_fwd.default, (fc1, 5))
    h, packed = neuron_topk_swiglu_fwd(fc1, 5)
    torch.library.opcheck(
        torch.ops.mone_kernels.neuron_topk_swiglu_bwd.default, (fc1, packed, torch.randn_like(h))
    )
    stats = torch.ops.mone_kernels.neuron_topk_balance_stats.default
    torch.library.opcheck(stats, (fc1, packed, [3, 1]))
    counts_EF, sums_N, shares_N = neuron_topk_balance_stats(fc1, packed, [3, 1])
    expert_N = torch.tensor([0, 0, 0, 1], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(
        torch.ops.mone_kernels.neuron_topk_swiglu_bwd.default,
        (fc1, packed, torch.randn_like(h), expert_N, counts_EF, shares_N, 1.0 / sums_N),
    )


@pytest.mark.slow  # about 40 s on 2 CPU cores: two 5-step training runs
def test_five_training_steps_match_the_reference_path(tmp_path):
    pytest.importorskip("megatron.core")
    from tests.helpers.gpt_parity import kernel_run_losses

    reference = kernel_run_losses(tmp_path / "reference", "reference", DEVICE.type)
    triton = kernel_run_losses(tmp_path / "triton", "triton", DEVICE.type)
    assert len(triton) == 6
    for got, want in zip(triton, reference):
        assert abs(got - want) <= 1e-5


@pytest.mark.parametrize("rows, neurons, k", [(7, 96, 40), (33, 64, 1), (5, 257, 128)])
def test_selection_weights_rank_weighted_scores_like_the_reference(rows, neurons, k):
    """The neuron-level balance bias in the kernel: per-expert weights looked up by each row's
    expert; the masks are the reference's (ties of |g| w at the same rule), h and the gradient
    as without weights on those masks."""
    chunks = [_fc1(rows, neurons, seed=s) for s in (1, 2)]
    chunks[0][0, :neurons] = 1.0  # all tied: the weights alone decide
    gen = torch.Generator().manual_seed(3)
    weights = [(torch.rand(neurons, generator=gen) * 4 + 0.25).to(DEVICE) for _ in chunks]
    got = neuron_topk_swiglu_grouped(chunks, k, impl="triton", selection_weights=weights)
    for chunk, weight, act in zip(chunks, weights, got):
        h_ref, mask_ref, _ = neuron_topk_swiglu_reference(chunk, k, selection_weight_F=weight)
        assert torch.equal(act.mask, mask_ref)
        torch.testing.assert_close(act.h, h_ref, rtol=1e-5, atol=1e-5)
