"""The Triton MoNE kernel against the PyTorch reference (interpreter on CPU, compiled on GPU)."""

from __future__ import annotations

import json

import pytest
import torch

from mone_kernels import neuron_topk_swiglu_grouped, neuron_topk_swiglu_reference
from mone_kernels.reference import expert_balance_loss
from mone_kernels.triton_topk_swiglu import (
    neuron_topk_swiglu_fwd,
    neuron_topk_swiglu_triton,
    triton_runnable,
    unpack_mask,
)
from tests.references import ng_lbl_literal

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_runnable(DEVICE), reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest)"
)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _fc1(rows, neurons, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2 * neurons, generator=gen).to(DEVICE, dtype)


def _compare(fc1, k):
    """Run kernel and reference (fp32) on the same input; return both results and grads."""
    dh = torch.randn(fc1.shape[0], fc1.shape[1] // 2, device=DEVICE)
    x = fc1.clone().requires_grad_()
    h, packed = neuron_topk_swiglu_triton(x, k)
    (h.float() * dh).sum().backward()
    x_ref = fc1.float().clone().requires_grad_()
    h_ref, mask_ref, _ = neuron_topk_swiglu_reference(x_ref, k)
    (h_ref * dh).sum().backward()
    return (h, packed, x.grad), (h_ref, mask_ref, x_ref.grad)


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("neurons", [8, 96, 257])
@pytest.mark.parametrize(
    "k_of", [lambda f: 1, lambda f: f // 2, lambda f: f], ids=["k1", "khalf", "kall"]
)
def test_forward_and_gradients_match_reference(rows, neurons, k_of):
    k = k_of(neurons)
    (h, packed, grad), (h_ref, mask_ref, grad_ref) = _compare(_fc1(rows, neurons, seed=neurons), k)
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
    (h, packed, grad), (h_ref, mask_ref, grad_ref) = _compare(fc1, k)
    mask = unpack_mask(packed, neurons)
    assert torch.equal(mask, mask_ref)
    assert torch.equal(mask[0], torch.arange(neurons, device=DEVICE) < k)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_storage_with_fp32_compute(dtype):
    neurons, k = 96, 48
    fc1 = _fc1(16, neurons, dtype, seed=5)
    (h, packed, grad), (h_ref, mask_ref, grad_ref) = _compare(fc1, k)
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


def test_custom_ops_pass_torch_library_checks():
    fc1 = _fc1(4, 16, seed=2)
    torch.library.opcheck(torch.ops.mone_kernels.neuron_topk_swiglu_fwd.default, (fc1, 5))
    h, packed = neuron_topk_swiglu_fwd(fc1, 5)
    torch.library.opcheck(
        torch.ops.mone_kernels.neuron_topk_swiglu_bwd.default, (fc1, packed, torch.randn_like(h))
    )


def test_five_training_steps_match_the_reference_path(tmp_path):
    pytest.importorskip("megatron.core")
    from mone_train.preflight import compose_config
    from mone_train.trainer import run

    losses = {}
    for impl in ("reference", "triton"):
        run_dir = tmp_path / impl
        cfg = compose_config(
            [
                "model=tiny",
                "trainer=smoke",
                "trainer.steps=5",
                "trainer.log_interval=1",
                "trainer.eval_interval=5",
                "trainer.eval_iters=1",
                "trainer.micro_batch_size=4",
                "trainer.global_batch_size=4",
                "trainer.seq_length=32",
                f"moe.kernel_impl={impl}",
                f"trainer.run_dir={run_dir}",
                "logging.wandb_mode=disabled",
            ]
        )
        run(cfg)
        records = [
            json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        losses[impl] = [r.get("loss", r.get("val_loss")) for r in records]
    assert len(losses["triton"]) == 6
    for got, want in zip(losses["triton"], losses["reference"]):
        assert abs(got - want) <= 1e-5
