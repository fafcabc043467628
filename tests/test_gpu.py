"""The GPU tier (``make test-gpu``, ``pytest -m gpu``): the CPU suite's parity checks on CUDA.

Each test names CUDA itself (the rest of the suite stays on the CPU: tests/conftest.py) and
reuses the CPU tests' helpers with the device as a parameter. Bounds are stated where the
numbers may differ from the CPU's; bf16 runs are held to fp32 ones within stated margins.
Skipped without a CUDA device (shown as skipped, never passing). ``MONE_TEST_GPU_TIER=cpu``
runs the tier on the CPU at toy sizes (the kernels under Triton's interpreter): how
``DRY_RUN=1 benchmarks/gpu_check.sh`` checks this file without a GPU.

Training runs go to a fresh process each (the test process may hold the CPU patches of
mone_train/parallel/cpu_compat.py); in-process CUDA work starts with those taken out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mone_kernels import neuron_topk_swiglu_grouped, neuron_topk_swiglu_reference
from mone_kernels import sparse_decode as sd
from mone_kernels.dispatch import resolve_impl
from mone_kernels.triton_topk_swiglu import unpack_mask
from tests.conftest import GPU_TIER_DEVICE
from tests.helpers.distributed import TINY_RUN, losses, metrics, train_in_fresh_process
from tests.helpers.kernels import kernel_and_reference
from tests.helpers.references import ng_lbl_literal

pytestmark = pytest.mark.gpu

DEVICE = torch.device(GPU_TIER_DEVICE)
ON_GPU = DEVICE.type == "cuda"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Kernel shapes: the `1b` expert (F = 1024 neurons at granularity 1), a batch of rows, rho 0.5.
ROWS, NEURONS = (2048, 1024) if ON_GPU else (7, 96)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# Rows whose kept set may differ from the reference's: near-ties at the k-th score, which one
# ulp of SiLU (the GPU's and torch's) can reorder. Compared values are on the other rows.
MAX_MASK_MISMATCH_FRAC = 1e-3


def _fc1(rows: int, neurons: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2 * neurons, generator=gen).to(DEVICE, dtype)


def _same_rows(mask, mask_ref) -> torch.Tensor:
    """Rows whose masks agree; fails when more than MAX_MASK_MISMATCH_FRAC of them differ."""
    same = (mask == mask_ref).all(dim=-1)
    assert (~same).float().mean().item() <= MAX_MASK_MISMATCH_FRAC, int((~same).sum())
    return same


# --- compiled Triton kernels against the reference ---------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_compiled_kernel_forward_and_backward_match_reference(dtype):
    """h and d fc1 of the kernel (storage in ``dtype``, fp32 compute) against the fp32
    reference on the same rounded input: within 1e-5 (fp32) / 2e-2 (bf16)."""
    torch_dtype = DTYPES[dtype]
    k = NEURONS // 2
    fc1 = _fc1(ROWS, NEURONS, torch_dtype, seed=1)
    assert resolve_impl("auto", fc1.device) == ("triton" if ON_GPU else "cpu")
    (h, packed, grad), (h_ref, mask_ref, grad_ref) = kernel_and_reference(fc1, k)
    mask = unpack_mask(packed, NEURONS)
    assert h.dtype == torch_dtype and (mask.sum(dim=-1) == k).all()
    same = _same_rows(mask, mask_ref)
    tol = TOLERANCE[torch_dtype]
    torch.testing.assert_close(h.float()[same], h_ref[same], rtol=tol, atol=tol)
    torch.testing.assert_close(grad.float()[same], grad_ref[same], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_compiled_ng_lbl_and_its_gradient_match_reference(dtype):
    """Per-expert NG-LBL (uneven experts, an empty one) and d fc1 through h and the loss:
    the loss within 1e-4 relative of the reference and of the paper's literal formula."""
    torch_dtype = DTYPES[dtype]
    rows, k = ((ROWS, 0, ROWS // 3) if ON_GPU else (5, 0, 11)), NEURONS // 4
    chunks = [_fc1(n, NEURONS, torch_dtype, seed=n + 2) for n in rows]
    dh = [torch.randn(n, NEURONS, device=DEVICE) for n in rows]

    def run(impl):
        xs = [c.clone().requires_grad_() for c in chunks]
        acts = neuron_topk_swiglu_grouped(xs, k, impl=impl, with_balance=True)
        loss = sum((a.h.float() * d).sum() + 0.7 * a.balance for a, d in zip(acts, dh))
        loss.backward()
        return acts, [x.grad for x in xs]

    (acts, grads), (refs, grads_ref) = run("triton"), run("reference")
    tol = TOLERANCE[torch_dtype]
    for chunk, act, ref, grad, grad_ref in zip(chunks, acts, refs, grads, grads_ref):
        if not chunk.shape[0]:
            continue
        same = _same_rows(act.mask, ref.mask)
        torch.testing.assert_close(act.balance, ref.balance, rtol=1e-4, atol=1e-6)
        g_abs = torch.nn.functional.silu(chunk[:, :NEURONS].float()).abs()
        literal = ng_lbl_literal(g_abs, ref.mask)
        torch.testing.assert_close(act.balance.float(), literal, rtol=1e-4, atol=1e-6)
        # the balance term's gradient reaches every row of the expert: compare where masks agree
        torch.testing.assert_close(grad.float()[same], grad_ref.float()[same], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_compiled_neuron_balance_weights_select_like_the_reference(dtype):
    """Selection by |g| x per-expert weight (the neuron-level balance bias): masks and h as
    the reference's, within the kernel tolerances."""
    torch_dtype = DTYPES[dtype]
    k = NEURONS // 3
    chunks = [_fc1(ROWS // 2 + 1, NEURONS, torch_dtype, seed=s) for s in (3, 4)]
    gen = torch.Generator().manual_seed(5)
    weights = [(torch.rand(NEURONS, generator=gen) * 4 + 0.25).to(DEVICE) for _ in chunks]
    got = neuron_topk_swiglu_grouped(chunks, k, impl="triton", selection_weights=weights)
    tol = TOLERANCE[torch_dtype]
    for chunk, weight, act in zip(chunks, weights, got):
        h_ref, mask_ref, _ = neuron_topk_swiglu_reference(
            chunk.float(), k, selection_weight_F=weight
        )
        same = _same_rows(act.mask, mask_ref)
        torch.testing.assert_close(act.h.float()[same], h_ref[same], rtol=tol, atol=tol)


# --- sparse decode -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sparse_decode_equals_dense_masked_on_the_device(dtype):
    """The decode path (kept rows of fc1/fc2 only) against the dense masked expert, at decode
    batch sizes and the `1b` expert's width: within 1e-4 (fp32) / 3e-2 (bf16)."""
    from tests.test_sparse_decode import _expert

    torch_dtype = DTYPES[dtype]
    hidden = 1024 if ON_GPU else 32
    for rows in (1, 4):
        x, gate_up, down_t, probs = (
            t.to(DEVICE) for t in _expert(rows, hidden, NEURONS, seed=rows, dtype=torch_dtype)
        )
        k = NEURONS // 2
        sparse = sd.sparse_expert_forward(x, gate_up, down_t, k, probs)
        dense = sd.dense_masked_expert_forward(x, gate_up, down_t, k, probs)
        tol = 1e-4 if torch_dtype == torch.float32 else 3e-2
        assert sparse.device.type == DEVICE.type
        torch.testing.assert_close(sparse.float(), dense.float(), rtol=tol, atol=tol)


# --- megatron-core on the device: grouped experts, the process group -----------------------------


@pytest.fixture
def megatron_on_device():
    """A one-process group on DEVICE (NCCL on a GPU) with megatron-core's parallel state."""
    from mone_train.parallel.process_groups import init_distributed, shutdown_distributed

    info = init_distributed(1, device=DEVICE.type)
    yield info
    shutdown_distributed()


def test_one_process_group_runs_collectives_on_the_device_without_cpu_patches(
    megatron_on_device,
):
    """NCCL on a GPU: the device is cuda:LOCAL_RANK, no CPU patch is installed, megatron's RNG
    tracker keeps CUDA states, and collective time is taken with CUDA events (> 0 s)."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from mone_train.parallel import comm_stats, cpu_compat
    from mone_train.parallel.process_groups import on_cuda, run_device

    info = megatron_on_device
    assert info.device.type == DEVICE.type and on_cuda() == ON_GPU
    assert dist.get_backend() == ("nccl" if ON_GPU else "gloo")
    assert run_device(DEVICE.type) == DEVICE.type
    assert bool(cpu_compat.applied_patches()) != ON_GPU
    if ON_GPU:
        assert isinstance(torch.cuda.current_device(), int)
        assert type(get_cuda_rng_tracker()).__name__ == "CudaRNGStatesTracker"
    comm_stats.install_clock()
    comm_stats.take_collective_seconds()
    total = torch.ones(1 << 20, device=info.device)
    dist.all_reduce(total)
    assert total[0].item() == 1.0
    assert comm_stats.take_collective_seconds() > 0


def test_gradient_sync_is_timed_with_device_events(megatron_on_device):
    """The straggler report's timing of a gradient synchronisation (CUDA events on a GPU,
    the wall clock on a CPU) measures the work between the phases: > 0 s, < 60 s."""
    from mone_train.components.stragglers import StragglerReport

    report = StragglerReport(2, megatron_on_device.device, True)  # as rank 0 of 2 would
    a = torch.randn(2048 if ON_GPU else 64, 2048 if ON_GPU else 64, device=DEVICE)
    report.on_phase("grad_sync")
    for _ in range(8):
        a = a @ a / a.shape[0] ** 0.5
    report.on_phase("optimizer")
    assert 0 < report._take_sync_seconds() < 60


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_grouped_experts_match_expert_by_expert_on_the_device(megatron_on_device, dtype, impl):
    """torch._grouped_mm experts against the expert-by-expert MoNE module (and at rho = 1
    against megatron's SequentialMLP): outputs and every gradient within 1e-4 (fp32; matmuls
    without TF32) / 3e-2 (bf16), including an expert without tokens."""
    from tests.test_grouped_experts import _experts, _inputs, _run

    torch_dtype = DTYPES[dtype]
    counts = [5, 0, 7, 3] if not ON_GPU else [300, 0, 700, 24]
    tol = 1e-4 if torch_dtype == torch.float32 else 3e-2
    for reference_kind, params in [
        ("mone", {"neuron_keep_ratio": 0.5, "ng_lbl_coeff": 0.3, "kernel_impl": impl}),
        ("sequential", {"neuron_keep_ratio": 1.0}),
    ]:
        if reference_kind == "sequential" and impl == "triton":
            continue
        reference = _experts(reference_kind, **params).to(DEVICE, torch_dtype)
        grouped = _experts("grouped", **params).to(DEVICE, torch_dtype)
        grouped.load_state_dict(reference.state_dict())
        x, counts_t, probs = _inputs(counts)
        x, probs = x.to(DEVICE, torch_dtype), probs.to(DEVICE, torch_dtype)
        dout = torch.randn_like(x)
        got = _run(grouped, x, counts_t, probs, dout)
        want = _run(reference, x, counts_t, probs, dout)
        for a, b in zip(got[:3], want[:3]):
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
        for name in want[3]:
            torch.testing.assert_close(
                got[3][name].float(), want[3][name].float(), rtol=tol, atol=tol, msg=name
            )


# --- training on the device --------------------------------------------------------------------

# A one-GPU slice of `1b` (2 of its 16 layers, all experts, 512-token sequences) in
# trainer=gpu's settings; the toy run on the CPU.
SLICE = (
    ["model=1b", "trainer=gpu", "model.num_layers=2", "trainer.seq_length=512",
     "trainer.expert_parallel_size=1", "trainer.shard_optimizer=false",
     "trainer.micro_batch_size=2", "trainer.global_batch_size=2", "trainer.async_save=false"]
    if ON_GPU else ["model=tiny", "trainer=smoke", "trainer.seq_length=32"]
)  # fmt: skip
# 6 steps, a short warm-up so that the loss falls within them
STEPS = ["trainer.steps=6", "trainer.log_interval=1", "trainer.eval_interval=6",
         "trainer.eval_iters=1", "optim.warmup_steps=2", "logging.wandb_mode=disabled"]  # fmt: skip
# bf16 against fp32 from the same initial weights over 6 steps: the losses differ by
# rounding only, at most this share of the fp32 loss (about 0.1 nats at the first loss).
BF16_LOSS_REL = 0.02


@pytest.mark.slow  # training runs in fresh processes
def test_every_family_trains_a_1b_slice_in_bf16_close_to_fp32(tmp_path, corpus):
    """Every family's recipe, MoNE, a few steps in bf16 and in fp32 on the device: finite
    losses that fall, bf16 within BF16_LOSS_REL of fp32 step by step; on a GPU the trainer
    logs MFU and peak memory, and the peak stays under 1.5 x mone-plan's prediction."""
    from mone_train.families import family_names

    runs = {
        (family, precision): [*SLICE, *STEPS, f"arch={family}", "moe=mone",
                              f"trainer.precision={precision}",
                              f"trainer.run_dir={tmp_path / f'{family}-{precision}'}"]
        for family in family_names() for precision in ("fp32", "bf16")
    }  # fmt: skip
    train_in_fresh_process(list(runs.values()), DEVICE.type, timeout_s=900)
    for family in family_names():
        fp32, bf16 = (
            [r["loss"] for r in metrics(tmp_path / f"{family}-{p}") if "loss" in r]
            for p in ("fp32", "bf16")
        )
        assert len(fp32) == len(bf16) == 6 and all(map(math.isfinite, fp32 + bf16)), family
        assert fp32[-1] < fp32[0], (family, fp32)
        for a, b in zip(fp32, bf16):
            assert abs(a - b) <= BF16_LOSS_REL * a, (family, fp32, bf16)
        if ON_GPU:
            _check_gpu_metrics(runs[family, "bf16"], family)


def _check_gpu_metrics(overrides: list[str], family: str) -> None:
    """MFU in (0, 1) and peak memory under 1.5 x mone-plan's prediction for the run."""
    from mone_train.compose import compose_config
    from mone_train.planning.cli import vocab_size_of
    from mone_train.planning.plan import make_plan

    run_dir = Path(overrides[-1].split("=", 1)[1])
    records = [r for r in metrics(run_dir) if r.get("mfu") is not None]
    assert records and all(0 < r["mfu"] < 1 for r in records), family
    peak_gib = max(r["peak_memory_gib"] for r in records)
    cfg = compose_config(overrides)
    predicted_gib = make_plan(cfg, vocab_size_of(cfg), world_size=1).total_bytes() / 2**30
    assert peak_gib <= 1.5 * predicted_gib, (family, peak_gib, predicted_gib)


@pytest.mark.skipif(ON_GPU and torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.slow  # training runs in fresh processes
def test_two_ranks_expert_and_pipeline_parallel_on_the_device(tmp_path, corpus):
    """2 ranks over NCCL (gloo on the CPU), one GPU each: expert parallel 2 with a family
    that has multi-token prediction (job-wide auxiliary and MTP losses) and pipeline parallel 2
    (batched p2p on GPUs), each against one process: losses within 1e-3 relative."""
    from mone_train.families import family_names
    from tests.helpers.distributed import run_processes

    mtp = [f for f in family_names() if "mtp_num_layers: 1" in _arch_yaml(f)]
    layouts = {
        "ep": ([f"arch={(mtp or ['deepseek'])[0]}", "trainer.expert_parallel_size=2"], 2),
        "pp": (["moe=moe", "trainer.pipeline_parallel_size=2"], 2),
    }
    base = [*TINY_RUN, *STEPS, "trainer.micro_batch_size=4", "trainer.global_batch_size=8"]
    for name, (extra, ranks) in layouts.items():
        run_processes(ranks, [*base, *extra, f"trainer.run_dir={tmp_path / name}"],
                      device=DEVICE.type)  # fmt: skip
    train_in_fresh_process(
        [[*base, *extra[:-1], f"trainer.run_dir={tmp_path / (name + '1')}"]
         for name, (extra, _) in layouts.items()],
        DEVICE.type,
    )  # fmt: skip
    for name in layouts:
        got, want = losses(tmp_path / name), losses(tmp_path / (name + "1"))
        assert len(got) == len(want) > 0
        assert all(abs(a - b) <= 1e-3 * abs(b) for a, b in zip(got, want)), (name, got, want)
    records = [r for r in metrics(tmp_path / "ep") if "loss" in r]
    assert all("straggler/rank" in r for r in records[1:])
    if mtp:
        assert all(math.isfinite(r["mtp_loss"]) for r in records)


def _arch_yaml(family: str) -> str:
    from mone_train.families import ARCH_FILE, FAMILIES_DIR

    return (FAMILIES_DIR / family / ARCH_FILE).read_text()


@pytest.mark.slow  # training runs in fresh processes
def test_resume_after_a_stop_is_bit_exact_on_the_device(tmp_path, corpus):
    """Stopped at step 5 (checkpoint) and resumed to 10 against 10 straight steps, with
    deterministic kernels: the same losses to the bit (RNG states, CUDA's included)."""
    base = [*TINY_RUN, "moe=mone", "trainer.save_interval=5", "trainer.eval_interval=5",
            "trainer.async_save=false"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_in_fresh_process(
        [
            [*base, "trainer.steps=10", f"trainer.run_dir={straight}"],
            [*base, "trainer.steps=5", f"trainer.run_dir={resumed}"],
            [*base, "trainer.steps=10", f"trainer.run_dir={resumed}"],
        ],
        DEVICE.type,
        deterministic=True,
    )
    assert losses(resumed) == losses(straight)


@pytest.mark.slow  # training runs in fresh processes
def test_compile_on_and_off_train_alike(tmp_path, corpus):
    """trainer.compile=true (megatron's fused functions through torch.compile) against false:
    the same 6 fp32 losses within 1e-4 relative (fusion reorders float operations)."""
    runs = {c: tmp_path / f"compile-{c}" for c in ("true", "false")}
    train_in_fresh_process(
        [
            [*TINY_RUN, *STEPS, f"trainer.compile={c}", f"trainer.run_dir={d}"]
            for c, d in runs.items()
        ],
        DEVICE.type,
    )
    on, off = losses(runs["true"]), losses(runs["false"])
    assert len(on) == len(off) > 0
    for a, b in zip(on, off):
        assert abs(a - b) <= 1e-4 * abs(b)


# --- export, generation and analysis of a run trained on the device -----------------------------


@pytest.fixture(scope="module")
def device_runs(tmp_path_factory, corpus):
    """`tiny` runs trained and checkpointed on DEVICE, and their exports: {flavour: (run,
    export)} for MoNE (our model code) and plain MoE (transformers' Mixtral)."""
    from tests.test_export import MOE, MONE, TRAIN, _export

    root = tmp_path_factory.mktemp("gpu-runs")
    flavours = {"mone": MONE, "moe": MOE}
    train_in_fresh_process(
        [[*TRAIN, *extra, f"trainer.run_dir={root / name}"] for name, extra in flavours.items()],
        DEVICE.type,
    )
    return {name: (root / name, _export(root / name, root / f"{name}-hf")) for name in flavours}


@pytest.fixture(scope="module")
def device_run(device_runs):
    return device_runs["mone"]


@pytest.mark.slow  # training runs in fresh processes
def test_export_of_a_device_run_reproduces_megatrons_logits(device_run):
    """The exported model (our code) against megatron-core's on the checkpoint: 1e-4."""
    from tests.test_export import _load, _megatron_logits, _tokens

    run_dir, exported = device_run
    tokens = _tokens()
    want = _megatron_logits(run_dir, tokens)
    with torch.no_grad():
        got = _load(exported)(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # training runs in fresh processes
def test_generation_and_the_sparse_decode_path_on_the_device(device_run, capsys):
    """On DEVICE: logits as on the CPU (1e-4), KV-cached as uncached (1e-4), the sparse decode
    path as the dense one (1e-4), and mone-generate from the export and from the run dir."""
    from mone_train.inference.cli import main as generate_main
    from tests.test_export import _load, _tokens

    run_dir, exported = device_run
    prompt = _tokens(1, 12)
    model = _load(exported)
    with torch.no_grad():
        on_cpu = model(prompt).logits
        model = model.to(DEVICE)
        prompt = prompt.to(DEVICE)
        full = model(prompt).logits
        torch.testing.assert_close(full.cpu(), on_cpu, rtol=1e-4, atol=1e-4)
        first = model(prompt[:, :7], use_cache=True)
        rest = model(prompt[:, 7:], cache=first.cache, use_cache=True)
        cached = torch.cat([first.logits, rest.logits], dim=1)
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
        steps = {}
        for path in ("sparse", "dense"):
            model.config.decode_path = path
            first = model(prompt[:, :11], use_cache=True)
            steps[path] = model(prompt[:, 11:], cache=first.cache, use_cache=True).logits
        torch.testing.assert_close(steps["sparse"], steps["dense"], rtol=1e-4, atol=1e-4)
    for source in (exported, run_dir):
        code = generate_main([str(source), "--prompt", "def f(", "--max-new-tokens", "8",
                              "--greedy", "--device", DEVICE.type])  # fmt: skip
        assert code == 0
    assert "8 tokens in" in capsys.readouterr().err


@pytest.mark.slow  # training runs in fresh processes
def test_analysis_runs_on_the_device(device_runs, tmp_path):
    """mone-analyze sparsify with --device on a MoNE run directory (megatron-core) and on an
    exported Mixtral (transformers, bf16 on a GPU): finite numbers in its JSON."""
    from mone_train.analysis.cli import main as analyze_main

    text = tmp_path / "held_out.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    for model in (device_runs["mone"][0], device_runs["moe"][1]):
        out = tmp_path / f"analysis-{model.name}"
        code = analyze_main(["sparsify", "--model", str(model), "--text", str(text),
                             "--p", "0,0.5", "--max-tokens", "256", "--seq-length", "32",
                             "--device", DEVICE.type, "--out", str(out), "--no-progress"])  # fmt: skip
        assert code == 0, model
        numbers = _numbers(json.loads((out / "sparsify.json").read_text()))
        assert numbers and all(map(math.isfinite, numbers)), model


def _numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [v for x in tree.values() for v in _numbers(x)]
    if isinstance(tree, list):
        return [v for x in tree for v in _numbers(x)]
    return [float(tree)] if isinstance(tree, float) else []
