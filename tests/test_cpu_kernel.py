"""The fused C++ CPU MoNE kernel against the PyTorch reference.

The forward's selection scores are torch's SiLU bits and its products are the reference's in
the same order, so ``h`` and the mask must be identical, not close. The balance loss and the
gradients are not: their sums run in another order, and the backward's sigmoid is another
implementation. Their tolerances come from that (see ``_gradient_tolerance``), not from what
one machine happened to show. The AVX-512, AVX2 and baseline copies of the row loops must give
the same bits as each other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mone_kernels import neuron_topk_swiglu_grouped, neuron_topk_swiglu_reference, resolve_impl
from mone_kernels.cpu_build import ISAS, supported_isas, using_isa
from mone_kernels.cpu_kernel import (
    cpu_kernel_error,
    neuron_topk_swiglu_cpu,
    rms_norm_cpu,
    rope_cpu,
)
from tests.helpers.references import ng_lbl_literal

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


def _gamma(n: int) -> float:
    """Higham's bound on the relative error of an n-term fp32 sum in any order: n u / (1 - n u)."""
    u = 2.0**-24
    return n * u / (1 - n * u)


def _gradient_tolerance(fc1, k, mask, beta):
    """Per-element bound on |C++ - reference| of d fc1 (fp32).

    Without the balance term both compute the same few products; the sigmoid differs (Cephes'
    expf vs torch's, each within 2 ulp), so a relative 1e-5 (~80 ulp) covers the four products
    after it, and an absolute 1e-5 covers SiLU's derivative near its zero at x = -1.28, where a
    relative error is unbounded. The balance term's gradient on g is
    beta * scale / s_t * (c_j - share_t) * sign: s_t and share_t are F-term sums taken in
    another order, each within gamma_F relative of the exact value, and c_j - share_t can cancel,
    so its error is bounded by beta * scale / s_t * (2 gamma_F share_t + gamma_F |c_j - share_t|),
    twice (two implementations), times |SiLU'| <= 1.1.
    """
    rows, neurons = mask.shape
    g_abs = torch.nn.functional.silu(fc1[:, :neurons].double()).abs()
    s_t = g_abs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    counts = mask.double().sum(dim=0)
    share_t = (g_abs * counts).sum(dim=-1, keepdim=True) / s_t
    scale = neurons / (rows * rows * k)
    gamma = _gamma(neurons)
    balance = beta * scale / s_t * (2 * gamma * share_t + gamma * (counts - share_t).abs())
    return 2 * 1.1 * balance.float()


def _assert_matches_reference(fc1, k, beta=0.7):
    dh = torch.randn(fc1.shape[0], fc1.shape[1] // 2, generator=torch.Generator().manual_seed(1))
    h, mask, balance, grad = _run(neuron_topk_swiglu_cpu, fc1, k, dh, beta)
    h_ref, mask_ref, balance_ref, grad_ref = _run(neuron_topk_swiglu_reference, fc1, k, dh, beta)
    assert h.dtype == fc1.dtype and grad.dtype == fc1.dtype
    assert torch.equal(mask, mask_ref)
    assert (mask.sum(dim=-1) == k).all()
    assert torch.equal(h, h_ref)
    # the loss: T shares (each an F-term sum over an F-term sum) summed, in two orders
    rows, neurons = mask.shape
    torch.testing.assert_close(
        balance, balance_ref, rtol=2 * (_gamma(rows) + 2 * _gamma(neurons)), atol=0
    )
    if fc1.dtype == torch.float32:
        allowed = 1e-5 * grad_ref.abs() + 1e-5
        allowed[:, :neurons] += _gradient_tolerance(fc1, k, mask, beta)
        assert ((grad - grad_ref).abs() <= allowed).all()
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
    # Subnormal SiLUs: selected exactly; NG-LBL's gradient divides by their row sum (~1e33
    # here), which is where the cancellation term of the gradient bound matters.
    gen = torch.Generator().manual_seed(6)
    tiny = _fc1(3, neurons, seed=7)
    tiny[:, :neurons] = torch.randn(3, neurons, generator=gen) * 1e-38
    _assert_matches_reference(tiny, k)


def test_bf16_storage_gives_the_references_bf16_results():
    """bf16 in, bf16 out: the mask and h are the reference's; the gradient is rounded to bf16
    from fp32 values within the fp32 bound, so it may differ by one bf16 rounding (2^-8)."""
    fc1 = _fc1(33, 64, torch.bfloat16, seed=5)
    dh = torch.randn(33, 64, generator=torch.Generator().manual_seed(1))
    h, mask, _, grad = _run(neuron_topk_swiglu_cpu, fc1, 20, dh)
    h_ref, mask_ref, _, grad_ref = _run(neuron_topk_swiglu_reference, fc1, 20, dh)
    assert h.dtype == grad.dtype == torch.bfloat16
    assert torch.equal(mask, mask_ref) and torch.equal(h, h_ref)
    torch.testing.assert_close(grad.float(), grad_ref.float(), rtol=2**-8, atol=1e-5)


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


@pytest.mark.parametrize("rows, neurons, k", [(33, 257, 100), (7, 16, 1), (20, 96, 95)])
def test_selection_weights_rank_weighted_scores_and_change_nothing_else(rows, neurons, k):
    """With weights w the mask is the reference's top-K of |g| * w (bit for bit); h is
    SiLU(gate) * up on that mask, unweighted; gradients and balance as without weights."""
    fc1 = _fc1(rows, neurons, seed=rows)
    fc1[0, :neurons] = 1.0  # all tied: the weights alone decide
    weight = torch.rand(neurons, generator=torch.Generator().manual_seed(2)) * 4 + 0.25
    dh = torch.randn(rows, neurons, generator=torch.Generator().manual_seed(3))
    results = []
    for fn in (neuron_topk_swiglu_cpu, neuron_topk_swiglu_reference):
        x = fc1.clone().requires_grad_()
        h, mask, balance = fn(x, k, True, selection_weight_F=weight)
        ((h * dh).sum() + 0.5 * balance).backward()
        results.append((h, mask, balance, x.grad))
    (h, mask, balance, grad), (h_ref, mask_ref, balance_ref, grad_ref) = results
    g = torch.nn.functional.silu(fc1[:, :neurons])
    scores = g.abs() * weight
    kth = scores.sort(dim=-1, descending=True, stable=True).values[:, k - 1 : k]
    assert torch.equal(mask, mask_ref) and (mask.sum(-1) == k).all()
    assert bool((scores[mask] >= kth.expand_as(scores)[mask]).all())
    assert torch.equal(mask[0], torch.zeros(neurons, dtype=torch.bool).index_fill_(
        0, weight.argsort(descending=True, stable=True)[:k], True))  # fmt: skip
    assert torch.equal(h, h_ref) and torch.equal(h, g * mask * fc1[:, neurons:])
    torch.testing.assert_close(balance, balance_ref, rtol=2 * (_gamma(rows) + 2 * _gamma(neurons)),
                               atol=0)  # fmt: skip
    allowed = 1e-5 * grad_ref.abs() + 1e-5
    allowed[:, :neurons] += _gradient_tolerance(fc1, k, mask, 0.5)
    assert ((grad - grad_ref).abs() <= allowed).all()
    unit = neuron_topk_swiglu_cpu(fc1, k, selection_weight_F=torch.ones(neurons))
    assert torch.equal(unit[1], neuron_topk_swiglu_cpu(fc1, k)[1])  # w = 1: the plain selection


def test_an_empty_input_with_zero_strides_is_accepted():
    """numpy's zero-size arrays carry zero strides; the reference takes them, and so must the
    operator (it refused them as "rows must be contiguous")."""
    import numpy as np

    x = torch.tensor(np.zeros((0, 32)), dtype=torch.float32).requires_grad_()
    assert x.stride() == (0, 0)
    h, mask, balance = neuron_topk_swiglu_cpu(x, 4, True)
    assert h.shape == mask.shape == (0, 16) and float(balance.detach()) == 0.0
    h.sum().backward()
    assert x.grad.shape == (0, 32)


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
            for weight in (None, torch.rand(16) + 0.5):
                torch.library.opcheck(
                    torch.ops.mone_cpu.topk_swiglu_fwd.default,
                    (g, up, 5, with_balance, scale, weight),
                )
    _, mask, counts, sums, shares = torch.ops.mone_cpu.topk_swiglu_fwd(g, up, 5, True, None, None)
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


def _isa_results():
    """Everything the operators compute on a few awkward inputs (ties, extremes, odd widths)."""
    out = []
    for rows, neurons, k in ((33, 257, 1), (33, 257, 128), (20, 96, 95), (7, 16, 8)):
        fc1 = _fc1(rows, neurons, seed=rows + neurons)
        fc1[0, :neurons] = 1.0  # all tied
        fc1[1, :neurons:3] = 1e30
        dh = torch.randn(rows, neurons, generator=torch.Generator().manual_seed(k))
        x, p = fc1.clone().requires_grad_(), torch.rand(rows).requires_grad_()
        h, mask, balance = neuron_topk_swiglu_cpu(x, k, True, row_scale_T=p)
        ((h * dh).sum() + 0.3 * balance).backward()
        out += [h, mask, balance, x.grad, p.grad]
    x = torch.randn(37, 2, 4, 50, requires_grad=True)
    w = torch.rand(50, requires_grad=True)
    y = rms_norm_cpu(x, w, 1e-5)
    y.backward(torch.randn_like(y))
    out += [y, x.grad, w.grad]
    x = torch.randn(9, 2, 3, 34, requires_grad=True)
    y = rope_cpu(x, torch.randn(9, 1, 1, 34))
    y.backward(torch.randn_like(y))
    return out + [y, x.grad]


def test_every_instruction_set_gives_the_same_bits():
    """The AVX-512, AVX2 and baseline loops this CPU can run: identical results, forward and
    backward, for all three operators (sums over explicit lanes, nothing contracted)."""
    isas = supported_isas()
    results = {}
    for isa in isas:
        with using_isa(isa) as used:
            assert used == isa
            torch.manual_seed(0)
            results[isa] = _isa_results()
    for isa in isas[1:]:
        for got, want in zip(results[isa], results[isas[0]]):
            assert torch.equal(got, want), isa


def test_the_instruction_sets_are_those_the_cpu_has():
    flags = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    want = ["baseline"]
    if {"avx2", "popcnt"} <= flags:
        want.insert(0, "avx2")
        if {"avx512f", "avx512bw", "avx512vl"} <= flags:
            want.insert(0, "avx512")
    assert supported_isas() == want
    assert ISAS == ("avx512", "avx2", "baseline")


_ISA_PROBE = """
import torch
from mone_kernels.cpu_kernel import cpu_kernel_error
error = cpu_kernel_error()
print(error if error else torch.ops.mone_cpu.isa())
"""


@pytest.mark.slow  # fresh interpreters: a few seconds
def test_the_environment_caps_the_instruction_set():
    """MONE_CPU_ISA caps the set; without it torch's ATEN_CPU_CAPABILITY does (so that switch
    alone makes torch and the operators run as on a CPU without AVX-512); a bad name is one
    line."""
    best = supported_isas()

    def capped(name):
        return next(isa for isa in ISAS[ISAS.index(name) :] if isa in best)

    cases = [
        ({"MONE_CPU_ISA": "", "ATEN_CPU_CAPABILITY": ""}, best[0]),
        ({"MONE_CPU_ISA": "baseline", "ATEN_CPU_CAPABILITY": ""}, "baseline"),
        ({"MONE_CPU_ISA": "", "ATEN_CPU_CAPABILITY": "avx2"}, capped("avx2")),
        ({"MONE_CPU_ISA": "", "ATEN_CPU_CAPABILITY": "default"}, "baseline"),
        ({"MONE_CPU_ISA": "avx512", "ATEN_CPU_CAPABILITY": "default"}, best[0]),
        ({"MONE_CPU_ISA": "sse9", "ATEN_CPU_CAPABILITY": ""},
         "MONE_CPU_ISA=sse9 is invalid: expected one of avx512, avx2, baseline"),
    ]  # fmt: skip
    for env, want in cases:
        assert _probe(_ISA_PROBE, **env).strip() == want, env


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
    from tests.helpers.gpt_parity import kernel_run_losses

    reference = kernel_run_losses(tmp_path / "reference", "reference")
    fused = kernel_run_losses(tmp_path / "cpu", "cpu")
    assert len(fused) == 6
    for got, want in zip(fused, reference):
        assert abs(got - want) <= 1e-5
