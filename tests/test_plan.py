"""``mone-plan``: exact model-state bytes against built models, activations against measurement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mone_train.compose import compose_config
from mone_train.errors import EXIT_CONFIG_ERROR
from mone_train.planning.plan import (
    activation_bytes,
    all_to_all_bytes,
    format_plan,
    make_plan,
    model_state_bytes,
    parameter_numbers,
    shape_of,
    stage_layers,
    suggestions,
)
from tests.helpers.gpt_parity import meta_parameter_count

REPO = Path(__file__).resolve().parents[1]
BENCHMARK = REPO / "benchmarks" / "memory_plan_check.py"

VOCAB = 258
LAYOUTS = {
    "tiny": ["model=tiny"],
    "small": ["model=small"],
    "tiny-moe": ["model=tiny", "moe=moe"],
    # dense layers between MoE layers, grouped queries, tied embeddings
    "tiny-mixed": [
        "model=tiny",
        "model.num_layers=3",
        "model.moe_layer_freq=2",
        "model.num_query_groups=2",
        "model.tie_embeddings=true",
    ],
    # the families: shared experts (a MoNE one too), a dense first layer, fine-grained experts,
    # QK-norm per head and over all heads, q/k/v biases, a head size of its own
    "tiny-deepseek": ["model=tiny", "arch=deepseek", "moe.neuron_balance=bias"],
    "tiny-qwen2": ["model=tiny", "arch=qwen2_moe", "moe.shared_expert_mone=true"],
    "tiny-olmoe": ["model=tiny", "arch=olmoe"],
    "tiny-qwen3": ["model=tiny", "arch=qwen3_moe", "model.head_dim=24"],
}


@pytest.mark.parametrize(
    "layout,precision", [(name, "fp32") for name in LAYOUTS] + [("tiny", "bf16")]
)
def test_parameter_gradient_and_optimizer_bytes_equal_the_built_model(
    megatron_single, layout, precision
):
    from mone_train.components.optimizer import (
        attach_main_grads,
        build_optimizer,
        detach_main_grads,
    )
    from mone_train.model.builder import build_model
    from mone_train.model.params import count_parameters

    cfg = compose_config([*LAYOUTS[layout], f"trainer.precision={precision}"])
    model, params = build_model(cfg, VOCAB)
    shape = shape_of(cfg, VOCAB)
    states = model_state_bytes(shape, precision)
    assert states.params == sum(p.numel() * p.element_size() for p in params)
    buffers = list(model.buffers) + list(model.expert_parallel_buffers)
    assert states.grads == sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
    optimizer = build_optimizer(cfg.optim, params)
    attach_main_grads(params)
    optimizer.step()
    detach_main_grads(params)
    moments = [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    # bf16: the optimizer also holds the fp32 masters (fp32: the weights are their own)
    masters = [p.main_param for p in params if hasattr(p, "main_param")]
    assert len(masters) == (len(params) if precision == "bf16" else 0)
    assert states.optimizer == sum(m.numel() * m.element_size() for m in moments + masters)
    counts = count_parameters(model, cfg.model.router_topk)
    assert parameter_numbers(shape).total == counts.total


# (world size, overrides): tensor, pipeline and expert parallelism folded together, with the
# recipes whose weights split differently (shared experts, dense first layer, GQA, QK-norm)
PARALLEL_LAYOUTS = {
    "tp2": (2, ["model=tiny", "trainer.tensor_parallel_size=2"]),
    "pp2": (2, ["model=tiny", "trainer.pipeline_parallel_size=2"]),
    "tp2-pp2-ep2-deepseek": (8, ["model=tiny", "arch=deepseek", "trainer.tensor_parallel_size=2",
                                 "trainer.pipeline_parallel_size=2",
                                 "trainer.expert_parallel_size=2", "trainer.global_batch_size=32"]),
    "tp4-ep4-qwen3": (4, ["model=tiny", "arch=qwen3_moe", "model.head_dim=24",
                          "trainer.tensor_parallel_size=4", "trainer.expert_parallel_size=4"]),
    "pp2-tp2-mixed-gqa": (4, ["model=small", "model.num_layers=4", "model.moe_layer_freq=2",
                              "model.num_query_groups=2", "trainer.tensor_parallel_size=2",
                              "trainer.pipeline_parallel_size=2"]),
    "pp4-qwen2": (4, ["model=small", "arch=qwen2_moe", "trainer.pipeline_parallel_size=4"]),
    # MLA with latents that do not divide by TP (replicated down-projections); the MTP layer
    # and its copy of the embedding on the last stage
    "tp2-pp2-deepseek_v3": (4, ["model=tiny", "arch=deepseek_v3", "model.kv_lora_rank=15",
                                "model.q_lora_rank=21", "trainer.tensor_parallel_size=2",
                                "trainer.pipeline_parallel_size=2"]),
}  # fmt: skip


@pytest.mark.slow  # a subprocess builds every rank's model (megatron import: seconds)
@pytest.mark.parametrize("layout", list(PARALLEL_LAYOUTS))
def test_per_device_parameters_equal_every_ranks_built_model(layout):
    """Each rank of the layout built on the meta device (tests/helpers/layout_probe.py, torch's fake
    process group for the others): the planner's per-device count of its stage, exactly.
    Gradient buffers and optimizer state are fixed bytes per parameter (4 and 8 or 12, checked
    against built buffers above), so they are exact too."""
    world_size, overrides = PARALLEL_LAYOUTS[layout]
    result = subprocess.run(
        [sys.executable, "tests/helpers/layout_probe.py", str(world_size), *overrides],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == world_size
    cfg = compose_config(overrides)
    shape = shape_of(cfg, VOCAB)
    stages = stage_layers(shape)
    for row in rows:
        expected = parameter_numbers(shape, stages[row["pp_rank"]]).local
        assert row["params"] == expected, (row, expected)
    states = make_plan(cfg, VOCAB, world_size).stages
    assert [s.states.params for s in states] == [
        4 * next(r["params"] for r in rows if r["pp_rank"] == i) for i in range(shape.pp)
    ]


def test_flops_use_the_trainers_activated_counts(megatron_single):
    from mone_train.components.health import model_flops_per_token
    from mone_train.model.builder import build_model
    from mone_train.model.params import count_parameters

    cfg = compose_config(["model=small", "moe.neuron_keep_ratio=0.25"])
    model, _ = build_model(cfg, VOCAB)
    counts = count_parameters(model, cfg.model.router_topk)
    flops = make_plan(cfg, VOCAB, world_size=1).flops
    m, s = cfg.model, cfg.trainer.seq_length
    assert flops.executed == model_flops_per_token(
        counts.activated_moe, m.num_layers, m.hidden_size, s
    )
    assert flops.mone_activated == model_flops_per_token(
        counts.activated, m.num_layers, m.hidden_size, s
    )
    assert flops.mone_activated < flops.executed < flops.dense_equivalent


@pytest.mark.parametrize("model,total_b", [("1b", 0.951), ("3b", 2.988)])
def test_real_scale_counts_equal_the_meta_device_model(megatron_single, model, total_b):
    cfg = compose_config([f"model={model}", "trainer=gpu", "trainer.expert_parallel_size=1"])
    numbers = parameter_numbers(shape_of(cfg, 50304))
    assert numbers.local == meta_parameter_count(cfg, 50304)
    assert model_state_bytes(shape_of(cfg, 50304), "fp32").params == 4 * numbers.local
    assert round(numbers.total / 1e9, 3) == total_b  # as the config's comment and docs say
    # At EP = 8 a device holds the dense weights and 1/8 of the experts of every layer.
    at_ep8 = parameter_numbers(shape_of(cfg, 50304, ep_size=8))
    assert at_ep8.local == numbers.dense + numbers.expert_total // 8
    assert at_ep8.total == numbers.total
    # trainer=gpu (bf16, ZeRO-1 over 8 data-parallel ranks, expert data parallel 1): state
    # bytes per device as mone-plan prints them
    states = model_state_bytes(shape_of(cfg, 50304, ep_size=8), "bf16", 8, 1)
    assert states.params == 2 * at_ep8.local and states.grads == 4 * at_ep8.local
    assert abs(states.optimizer - 12 * (at_ep8.dense / 8 + at_ep8.expert_local)) < 1


@pytest.mark.parametrize("family", ["deepseek", "qwen3_moe", "qwen2_moe", "olmoe", "mixtral"])
# 3b builds take seconds each on the meta device: the full tier only
@pytest.mark.parametrize("model", ["1b", pytest.param("3b", marks=pytest.mark.slow)])
def test_family_counts_equal_the_meta_device_model(megatron_single, family, model):
    """Analytic counts per family at GPU scale (built on the meta device: no memory)."""
    cfg = compose_config([f"arch={family}", f"model={model}", "trainer=gpu",
                          "trainer.expert_parallel_size=1"])  # fmt: skip
    numbers = parameter_numbers(shape_of(cfg, 50304))
    assert numbers.local == meta_parameter_count(cfg, 50304)


@pytest.mark.parametrize("family", ["deepseek", "qwen3_moe"])
@pytest.mark.parametrize("model", ["1b", "3b"])
def test_the_gpu_recipes_of_the_families_fit_one_node_of_80gb(family, model):
    plan = make_plan(compose_config([f"arch={family}", f"model={model}", "trainer=gpu"]),
                     50304, world_size=8)  # fmt: skip
    assert plan.fits, format_plan(plan, 50304)


def _kept_bytes(cfg) -> int:
    """Bytes of the storages autograd keeps in one training forward, parameters excluded."""
    from mone_train.model.builder import build_model
    from mone_train.model.lm import causal_mask

    model, params = build_model(cfg, VOCAB)
    t = cfg.trainer
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (t.micro_batch_size, t.seq_length + 1), generator=gen)
    positions = torch.arange(t.seq_length).expand(t.micro_batch_size, -1)
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    kept: dict[int, int] = {}

    def pack(x):
        storage = x.untyped_storage()
        if storage.data_ptr() not in param_storages:
            kept[storage.data_ptr()] = storage.nbytes()
        return x

    model.train()
    mask = causal_mask(t.seq_length, torch.device("cpu"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(tokens[:, :-1], positions, mask, labels=tokens[:, 1:]).mean().backward()
    return sum(kept.values())


TINY = ["model=tiny", "trainer.micro_batch_size=16", "trainer.seq_length=128"]


def test_kept_activations_are_counted_tensor_by_tensor(megatron_single):
    cfg = compose_config(TINY)
    estimate = activation_bytes(shape_of(cfg, VOCAB, device="cpu"), "none")
    kept = _kept_bytes(cfg)
    assert abs(estimate.kept - kept) <= 0.05 * kept, (estimate.kept, kept)


@pytest.mark.slow  # a real training step per case
@pytest.mark.parametrize("recompute", ["none", "moe", "full"])
def test_activation_estimate_matches_the_measured_cpu_peak(recompute):
    """The allocator peak of one forward + backward, measured in a fresh process by the
    benchmark's own measurement (benchmarks/memory_plan_check.py)."""
    overrides = TINY + [f"trainer.recompute={recompute}"]
    estimate = activation_bytes(shape_of(compose_config(overrides), VOCAB, device="cpu"), recompute)
    out = subprocess.run(
        [sys.executable, str(BENCHMARK), "--child", "allocator", *overrides],
        capture_output=True,
        text=True,
        check=True,
    )
    peak = json.loads(out.stdout.strip().splitlines()[-1])["allocator"]
    assert abs(estimate.peak - peak) <= 0.25 * peak, (estimate.peak, peak)


@pytest.mark.slow  # two gloo ranks under torchrun
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_activation_estimate_matches_each_stages_measured_peak(layout):
    """TP 2 (a rank's half of the positions and heads) and PP 2 (1F1B over 4 micro batches:
    2 in flight on the first stage): every rank's allocator peak, measured by the benchmark,
    within 25 % of the planner's estimate for its stage."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_plan_check", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    rows = benchmark.run_case("tiny", 64, "none", layout)
    assert len(rows) == (2 if layout == "pp2" else 1)
    for row in rows:
        assert abs(row["error"]) <= 0.25, row


def test_recompute_and_expert_parallelism_shrink_the_plan():
    cfg = compose_config(["model=1b", "trainer.seq_length=2048", "trainer.micro_batch_size=4"])
    shape = shape_of(cfg, 50304)
    peaks = [activation_bytes(shape, rc).peak for rc in ("none", "moe", "full")]
    assert peaks[0] > peaks[1] > peaks[2]
    one = model_state_bytes(shape, "fp32")
    eight = model_state_bytes(shape_of(cfg, 50304, ep_size=8), "fp32")
    assert eight.total < one.total / 3


def test_all_to_all_bytes_follow_the_formula_and_do_not_depend_on_mone():
    cfg = compose_config(["model=tiny", "trainer.expert_parallel_size=2"])
    shape = shape_of(cfg, VOCAB)
    t, m = cfg.trainer, cfg.model
    rows = t.micro_batch_size * t.seq_length * m.router_topk
    per_pass = rows * (m.hidden_size * 4 + 4) + rows * m.hidden_size * 4
    expected = 2 * m.num_layers * 3 * per_pass  # 2 MoE layers; fwd + bwd; 3 micro batches
    assert all_to_all_bytes(shape, 2, 3, "none") == expected
    assert all_to_all_bytes(shape, 2, 3, "full") == expected // 2 * 3
    assert all_to_all_bytes(shape, 1, 3, "none") == 0
    moe = shape_of(compose_config(["model=tiny", "moe=moe"]), VOCAB)
    assert all_to_all_bytes(moe, 2, 3, "none") == expected


@pytest.mark.parametrize("gib,knobs", [(24, 1), (12, 3)])
def test_a_plan_that_does_not_fit_names_settings_that_do(gib, knobs):
    from dataclasses import replace

    cfg = compose_config(
        ["model=1b", "trainer.seq_length=4096", "trainer.micro_batch_size=8"]
        + ["trainer.global_batch_size=64", "trainer.expert_parallel_size=1"]
    )
    plan = make_plan(cfg, 50304, world_size=8, gpu_memory_gib=gib)
    assert not plan.fits
    fixes = suggestions(plan, 50304)
    assert fixes and all(len(fix) == knobs for fix in fixes)  # at 12 GiB only all three together
    for fix in fixes:
        fixed = replace(cfg, trainer=replace(cfg.trainer, **fix))
        assert make_plan(fixed, 50304, world_size=8, gpu_memory_gib=gib).fits
    assert "DOES NOT FIT" in format_plan(plan, 50304)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mone_train.planning.cli", *args], capture_output=True, text=True
    )


def test_cli_prints_the_plan():
    out = _cli("model=tiny", "--world-size", "2", "trainer.expert_parallel_size=2",
               "trainer.global_batch_size=32", "--gpu-memory-gib", "40")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "fits in 40.00 GiB" in out.stdout
    assert "all-to-all per device and step" in out.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["trainer.stpes=3"], "unknown config key 'trainer.stpes'"),
        (["moe.neuron_keep_ratio=1.5"], "moe.neuron_keep_ratio=1.5 is invalid"),
        (
            ["trainer.expert_parallel_size=2", "--world-size", "3"],
            "--world-size=3: trainer.expert_parallel_size=2 is invalid",
        ),
        (["--mfu", "2"], "--mfu=2.0 is invalid"),
        (["--bogus"], "unknown option --bogus"),
    ],
)
def test_cli_bad_input_is_one_line(args, message):
    out = _cli(*args)
    assert out.returncode == EXIT_CONFIG_ERROR
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mone-plan: error: "), out.stderr
    assert message in lines[0]
