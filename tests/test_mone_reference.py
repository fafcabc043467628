"""The PyTorch reference of the MoNE activation and its fused balance loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mone_kernels import (
    neuron_topk_mask,
    neuron_topk_swiglu,
    neuron_topk_swiglu_grouped,
    neuron_topk_swiglu_reference,
    num_kept_neurons,
)
from tests.helpers.references import mone_activation_explicit, ng_lbl_literal, topk_mask_by_sort


@pytest.mark.parametrize("rows,neurons", [(1, 8), (7, 96), (64, 257)])
@pytest.mark.parametrize("k_of", [lambda f: 1, lambda f: f // 2, lambda f: f - 1, lambda f: f])
def test_mask_has_exactly_k_per_row_and_matches_stable_sort(rows, neurons, k_of):
    torch.manual_seed(rows * neurons)
    k = k_of(neurons)
    score = torch.randn(rows, neurons).abs()
    mask = neuron_topk_mask(score, k)
    assert mask.dtype == torch.bool
    assert (mask.sum(dim=-1) == k).all()
    assert torch.equal(mask, topk_mask_by_sort(score, k))


def test_ties_go_to_the_lower_index():
    score = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # all tied: the first k win
            [0.5, 2.0, 0.5, 0.5, 3.0, 0.5],  # two clear winners, then the first tied 0.5
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all zero (dead neurons)
        ]
    )
    mask = neuron_topk_mask(score, 3)
    expected = torch.tensor(
        [
            [True, True, True, False, False, False],
            [True, True, False, False, True, False],
            [True, True, True, False, False, False],
        ]
    )
    assert torch.equal(mask, expected)


def test_mask_rejects_bad_k_and_negative_scores():
    with pytest.raises(ValueError, match="k=0"):
        neuron_topk_mask(torch.ones(2, 4), 0)
    with pytest.raises(ValueError, match="k=5"):
        neuron_topk_mask(torch.ones(2, 4), 5)
    with pytest.raises(ValueError, match="non-negative"):
        neuron_topk_mask(-torch.ones(2, 4), 2)


@pytest.mark.parametrize(
    "ratio,neurons,expected", [(0.5, 256, 128), (0.5, 257, 129), (0.01, 8, 1), (1.0, 7, 7)]
)
def test_num_kept_neurons_rounds_half_up_and_keeps_one(ratio, neurons, expected):
    assert num_kept_neurons(ratio, neurons) == expected


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01])
def test_num_kept_neurons_rejects_ratio_outside_unit_interval(bad):
    with pytest.raises(ValueError, match="outside"):
        num_kept_neurons(bad, 8)


@pytest.mark.parametrize("rows,neurons,k", [(1, 8, 1), (7, 96, 48), (64, 257, 128), (5, 16, 15)])
@pytest.mark.parametrize("all_negative", [False, True])
def test_forward_and_gradient_match_explicit_mask_autograd(rows, neurons, k, all_negative):
    torch.manual_seed(k)
    fc1 = torch.randn(rows, 2 * neurons, dtype=torch.float64).float()
    if all_negative:
        fc1[:, :neurons] = -fc1[:, :neurons].abs() - 0.1
    dh = torch.randn(rows, neurons)

    x_ref = fc1.clone().requires_grad_()
    h_ref, mask_ref = mone_activation_explicit(x_ref, k)
    (h_ref * dh).sum().backward()

    x = fc1.clone().requires_grad_()
    h, mask, balance = neuron_topk_swiglu_reference(x, k)
    (h * dh).sum().backward()

    assert balance is None
    assert torch.equal(mask, mask_ref)
    torch.testing.assert_close(h, h_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_gradient_reaches_only_kept_neurons():
    torch.manual_seed(0)
    rows, neurons, k = 16, 32, 8
    x = torch.randn(rows, 2 * neurons, requires_grad=True)
    h, mask, _ = neuron_topk_swiglu_reference(x, k)
    h.sum().backward()
    dgate, dup = x.grad.chunk(2, dim=-1)
    assert (dgate[~mask] == 0).all() and (dup[~mask] == 0).all()
    assert (dup[mask] != 0).all()


def test_keep_all_is_plain_swiglu():
    torch.manual_seed(0)
    fc1 = torch.randn(9, 2 * 24)
    h, mask, balance = neuron_topk_swiglu_reference(fc1, 24, with_balance=True)
    gate, up = fc1.chunk(2, dim=-1)
    assert mask is None and balance is None
    torch.testing.assert_close(h, F.silu(gate) * up, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_computes_in_fp32(dtype):
    torch.manual_seed(0)
    fc1 = torch.randn(32, 2 * 64).to(dtype)
    h, mask, _ = neuron_topk_swiglu_reference(fc1, 16)
    h_ref, mask_ref = mone_activation_explicit(fc1.float(), 16)
    assert h.dtype == dtype
    assert torch.equal(mask, mask_ref)
    torch.testing.assert_close(h.float(), h_ref, rtol=1e-2, atol=1e-2)


def test_balance_loss_and_its_gradient_match_the_literal_definition():
    torch.manual_seed(0)
    rows, neurons, k = 40, 24, 6
    fc1 = torch.randn(rows, 2 * neurons)
    dh = torch.randn(rows, neurons)

    x_ref = fc1.clone().requires_grad_()
    h_ref, mask_ref = mone_activation_explicit(x_ref, k)
    g_abs = F.silu(x_ref[:, :neurons]).abs()
    loss_ref = ng_lbl_literal(g_abs, mask_ref)
    ((h_ref * dh).sum() + 0.7 * loss_ref).backward()

    x = fc1.clone().requires_grad_()
    h, mask, balance = neuron_topk_swiglu_reference(x, k, with_balance=True)
    ((h * dh).sum() + 0.7 * balance).backward()

    torch.testing.assert_close(balance, loss_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_ng_lbl_is_one_when_uniform_and_rises_when_skewed():
    neurons, k = 8, 2
    # Every neuron wins equally often and carries equal magnitude share: L = 1.
    mask = torch.zeros(4, neurons, dtype=torch.bool)
    for t in range(4):
        mask[t, 2 * t : 2 * t + 2] = True
    g_abs = torch.ones(4, neurons)
    assert ng_lbl_literal(g_abs, mask).item() == pytest.approx(1.0)
    # The same two neurons always win and hold most of the magnitude: L > 1.
    skewed_mask = torch.zeros(4, neurons, dtype=torch.bool)
    skewed_mask[:, :2] = True
    skewed_g = torch.full((4, neurons), 0.1)
    skewed_g[:, :2] = 5.0
    assert ng_lbl_literal(skewed_g, skewed_mask).item() > 3.0
    # And the fused implementation agrees on both (gate values whose |SiLU| give those shares).
    for g, expected in [(g_abs, 1.0), (skewed_g, ng_lbl_literal(skewed_g, skewed_mask).item())]:
        gate = _silu_inverse(g)
        fc1 = torch.cat([gate, torch.ones_like(gate)], dim=-1)
        _, fused_mask, balance = neuron_topk_swiglu_reference(fc1, k, with_balance=True)
        assert (fused_mask.sum(dim=-1) == k).all()
        assert balance.item() == pytest.approx(expected, rel=1e-4)


def _silu_inverse(y: torch.Tensor) -> torch.Tensor:
    """x >= 0 with SiLU(x) = y for y >= 0 (Newton's method)."""
    x = y.clone() + 0.5
    for _ in range(50):
        s = torch.sigmoid(x)
        x = x - (x * s - y) / (s * (1 + x * (1 - s)))
    return x


def test_grouped_equals_per_chunk_and_dispatch_validates_impl():
    torch.manual_seed(0)
    chunks = [torch.randn(n, 2 * 16) for n in (5, 0, 9)]
    grouped = neuron_topk_swiglu_grouped(chunks, 4, with_balance=True)
    for chunk, act in zip(chunks, grouped):
        single = neuron_topk_swiglu(chunk, 4, with_balance=True)
        assert torch.equal(act.h, single.h) and torch.equal(act.mask, single.mask)
    assert grouped[1].h.shape == (0, 16)
    with pytest.raises(ValueError, match="impl='cuda-magic'"):
        neuron_topk_swiglu(chunks[0], 4, impl="cuda-magic")
