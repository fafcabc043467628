"""The fused C++ CPU MoNE kernel against the PyTorch reference.

The forward's selection scores are torch's SiLU bits and its products are the reference's in
the same order, so ``h`` and the mask must be identical, not close; the balance loss and the
gradients are sums taken in another order (1e-6 / 1e-5).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mone_kernels import neuron_topk_swiglu_grouped, neuron_topk_swiglu_reference, resolve_impl
from mone_kernels.cpu_kernel import cpu_kernel_error, neuron_topk_swiglu_cpu
from tests.references import ng_lbl_literal

pytestmark = pytest.mark.skipif(
    cpu_kernel_error() is not None, reason=f"CPU kernel not buildable: {cpu_kernel_error()}"
)


def _fc1(rows, neurons, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2 * neurons, generator=gen).to(dtype)


def _run(fn, fc1, k, dh, beta=0.7):
    """Activation + beta * NG-LBL, backward through both; results and fc1's gradient."""
    x = fc1.clone().requires_grad_()
    h, mask, balance = fn(x, k, with_balance=True)
    ((h.float() * dh).sum() + beta * balance).backward()
    return h, mask, balance, x.grad


def _assert_matches_reference(fc1, k, grad_rtol=1e-5):
    dh = torch.randn(fc1.shape[0], fc1.shape[1] // 2, generator=torch.Generator().manual_seed(1))
    h, mask, balance, grad = _run(neuron_topk_swiglu_cpu, fc1, k, dh)
    h_ref, mask_ref, balance_ref, grad_ref = _run(neuron_topk_swiglu_reference, fc1, k, dh)
    assert h.dtype == fc1.dtype and grad.dtype == fc1.dtype
    assert torch.equal(mask, mask_ref)
    assert (mask.sum(dim=-1) == k).all()
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(balance, balance_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, grad_ref, rtol=grad_rtol, atol=1e-5)
    return mask


@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("neurons", [8, 96, 257])
@pytest.mark.parametrize(
    "k_of", [lambda f: 1, lambda f: f // 2, lambda f: f - 1], ids=["k1", "khalf", "kmost"]
)
def test_forward_balance_and_gradients_match_reference(rows, neurons, k_of):
    _assert_matches_reference(_fc1(rows, neurons, seed=rows * neurons), k_of(neurons))


def test_ties_all_negative_and_extreme_gates():
    neurons, k = 96, 40
    fc1 = _fc1(7, neurons, seed=3)
    fc1[0, :neurons] = 1.0  # all tied
    fc1[1, :neurons] = torch.arange(neurons) % 4 - 1.5  # four tied levels
    fc1[2, :neurons] = 0.0  # SiLU(0) = 0 everywhere: all tied at zero
    fc1[3, :neurons] = -fc1[3, :neurons].abs() - 0.05  # all negative
    fc1[4, :neurons] = -1.278  # near SiLU's minimum, tied
    fc1[5, :neurons:3] = 1e30  # huge (exponent bits near the top), a third of the row
    fc1[6, 1:neurons:2] = fc1[6, 0:neurons:2]  # pairs of equal scores
    mask = _assert_matches_reference(fc1, k)
    assert torch.equal(mask[0], torch.arange(neurons) < k)
    # Subnormal SiLUs: selected exactly; their row sum keeps fewer mantissa bits, and NG-LBL's
    # gradient divides by it (~1e33 here), so the two summation orders differ by up to ~2e-5
    # relative (measured over 300 draws).
    gen = torch.Generator().manual_seed(6)
    tiny = _fc1(3, neurons, seed=7)
    tiny[:, :neurons] = torch.randn(3, neurons, generator=gen) * 1e-38
    _assert_matches_reference(tiny, k, grad_rtol=1e-4)


def test_bf16_storage_gives_the_references_bf16_results():
    _assert_matches_reference(_fc1(33, 64, torch.bfloat16, seed=5), 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_scale_fused_equals_scaling_after_the_activation(dtype):
    fc1 = _fc1(40, 48, dtype, seed=8)
    probs = torch.rand(40, generator=torch.Generator().manual_seed(9))
    dh = torch.randn(40, 48, generator=torch.Generator().manual_seed(10))
    results = []
    for fused in (True, False):
        x, p = fc1.clone().requires_grad_(), probs.clone().requires_grad_()
        if fused:
            h, _, balance = neuron_topk_swiglu_cpu(x, 12, True, row_scale_T=p)
        else:
            h, _, balance = neuron_topk_swiglu_reference(x, 12, True)
            h = (h * p.unsqueeze(-1)).to(h.dtype)
        ((h.float() * dh).sum() + 0.3 * balance).backward()
        results.append((h, x.grad, p.grad))
    (h, dx, dp), (h_ref, dx_ref, dp_ref) = results
    assert h.dtype == dx.dtype == dtype and dp.dtype == torch.float32
    if dtype == torch.float32:  # same products in the same order
        assert torch.equal(h, h_ref)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dp, dp_ref, rtol=1e-5, atol=1e-5)
    else:  # one rounding to bf16 instead of two
        torch.testing.assert_close(h.float(), h_ref.float(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(dx.float(), dx_ref.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(dp, dp_ref, rtol=2e-2, atol=2e-2)


def test_results_do_not_depend_on_the_thread_count():
    fc1, dh = _fc1(301, 64, seed=11), torch.randn(301, 64)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(_run(neuron_topk_swiglu_cpu, fc1, 17, dh))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            assert torch.equal(got, want)


def test_expanded_output_gradient_and_strided_input():
    fc1 = _fc1(12, 32, seed=4)[:, :64]  # a view with row stride 2F
    x, x_ref = fc1.clone().requires_grad_(), fc1.clone().requires_grad_()
    neuron_topk_swiglu_cpu(x, 9)[0].sum().backward()  # dh expanded from a scalar: stride 0
    neuron_topk_swiglu_reference(x_ref, 9)[0].sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    wide = torch.randn(5, 3 * 16)[:, :32]  # fc1 that is itself a strided view
    h, mask, _ = neuron_topk_swiglu_cpu(wide, 4)
    h_ref, mask_ref, _ = neuron_topk_swiglu_reference(wide, 4)
    assert torch.equal(mask, mask_ref) and torch.equal(h, h_ref)


def test_dispatch_auto_picks_it_on_cpu_and_grouped_experts_match_reference():
    assert resolve_impl("auto", torch.device("cpu")) == "cpu"
    chunks = [_fc1(n, 24, seed=n) for n in (5, 0, 11)]
    for impl in ("auto", "cpu"):
        got = neuron_topk_swiglu_grouped(chunks, 6, impl=impl, with_balance=True)
        for chunk, act in zip(chunks, got):
            h_ref, mask_ref, balance_ref = neuron_topk_swiglu_reference(chunk, 6, with_balance=True)
            assert torch.equal(act.mask, mask_ref) and torch.equal(act.h, h_ref)
            assert act.h.shape == (chunk.shape[0], 24)
            if chunk.shape[0]:
                torch.testing.assert_close(act.balance, balance_ref, rtol=1e-6, atol=1e-7)
                g_abs = torch.nn.functional.silu(chunk[:, :24]).abs()
                torch.testing.assert_close(
                    act.balance, ng_lbl_literal(g_abs, mask_ref), rtol=1e-5, atol=1e-6
                )


def test_operators_pass_torch_library_checks():
    fc1 = _fc1(6, 16, seed=2)
    gate, up = fc1.chunk(2, dim=-1)
    g = torch.nn.functional.silu(gate)
    for with_balance in (False, True):
        for scale in (None, torch.rand(6)):
            torch.library.opcheck(
                torch.ops.mone_cpu.topk_swiglu_fwd.default, (g, up, 5, with_balance, scale)
            )
    _, mask, counts, sums, shares = torch.ops.mone_cpu.topk_swiglu_fwd(g, up, 5, True, None)
    for scale in (None, torch.rand(6)):
        torch.library.opcheck(
            torch.ops.mone_cpu.topk_swiglu_bwd.default,
            (torch.randn_like(g), gate, up, mask, counts, sums, shares, 0.1, scale),
        )


def _probe(code: str, **env: str) -> str:
    """stdout of ``code`` run by a fresh interpreter with ``env`` added (it must succeed)."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


_PORTABLE_PROBE = """
import torch
from mone_kernels.cpu_kernel import cpu_kernel_error, neuron_topk_swiglu_cpu
from mone_kernels.reference import neuron_topk_swiglu_reference
assert cpu_kernel_error() is None
print(torch.ops.mone_cpu.uses_avx512())
gen = torch.Generator().manual_seed(0)
for rows, neurons, k in ((33, 257, 1), (33, 257, 128), (20, 96, 95), (7, 16, 8)):
    fc1 = torch.randn(rows, 2 * neurons, generator=gen)
    fc1[0, :neurons] = 1.0  # all tied
    fc1[1, :neurons:3] = 1e30
    got, want = neuron_topk_swiglu_cpu(fc1, k, True), neuron_topk_swiglu_reference(fc1, k, True)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), (rows, neurons, k)
print("same")
"""


@pytest.mark.slow  # a fresh interpreter: a few seconds
def test_portable_selection_matches_the_reference():
    """The search without AVX-512 (what CPUs without it run), forced by the environment."""
    assert _probe(_PORTABLE_PROBE, MONE_CPU_KERNEL_NO_AVX512="1").split() == ["False", "same"]


def test_the_avx512_selection_runs_where_the_cpu_has_it():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    has_avx512 = " avx512f" in flags and " popcnt" in flags
    assert torch.ops.mone_cpu.uses_avx512() == has_avx512


_FALLBACK_PROBE = """
import warnings, torch
from mone_kernels import neuron_topk_swiglu
fc1 = torch.randn(4, 16)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    neuron_topk_swiglu(fc1, 3)
    neuron_topk_swiglu(fc1, 3)
print(len(caught), caught[0].message if caught else "")
try:
    neuron_topk_swiglu(fc1, 3, impl="cpu")
except RuntimeError as err:
    print(err)
"""


@pytest.mark.slow  # a fresh interpreter and a failed build: about 10 s
def test_without_a_compiler_auto_warns_once_and_uses_the_reference(tmp_path):
    stdout = _probe(
        _FALLBACK_PROBE, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path)
    )
    warned, error = stdout.strip().splitlines()
    assert warned.startswith("1 MoNE CPU kernel unavailable") and "PyTorch reference" in warned
    assert error.startswith("kernel impl='cpu': the C++ operator could not be built")


@pytest.mark.slow  # about 15 s on 2 CPU cores: two 5-step training runs
def test_five_training_steps_match_the_reference_path(tmp_path):
    pytest.importorskip("megatron.core")
    from tests.gpt_parity import kernel_run_losses

    reference = kernel_run_losses(tmp_path / "reference", "reference")
    fused = kernel_run_losses(tmp_path / "cpu", "cpu")
    assert len(fused) == 6
    for got, want in zip(fused, reference):
        assert abs(got - want) <= 1e-5
