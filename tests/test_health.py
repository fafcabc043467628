"""Health metrics: constructed cases with known answers, and what a training run logs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mone_train.components.health import HealthMonitor, histogram_summary
from mone_train.compose import compose_config


@pytest.fixture
def tiny_mone(megatron_single):
    from mone_train.model.builder import build_model

    cfg = compose_config(["model=tiny", "moe.neuron_keep_ratio=0.25"])
    model, _ = build_model(cfg, vocab_size=258)
    return model, cfg


def test_router_sending_everything_to_one_expert_pair(tiny_mone):
    model, cfg = tiny_mone
    monitor = HealthMonitor(model)
    layers = monitor.layers
    assert layers == [0, 1]
    tokens = 100
    routing = torch.zeros(tokens, cfg.model.num_experts, dtype=torch.bool)
    routing[:, 0] = routing[:, 1] = True  # top-2: every token to experts 0 and 1
    monitor.observe_routing(0, routing)
    even = torch.zeros_like(routing)
    even[torch.arange(tokens), torch.arange(tokens) % 4] = True
    even[torch.arange(tokens), (torch.arange(tokens) + 1) % 4] = True
    monitor.observe_routing(1, even)
    metrics = monitor.collect()
    assert metrics["load/0/tokens"] == [100, 100, 0, 0]
    assert metrics["load/0/imbalance"] == pytest.approx(2.0)  # max 100 / mean 50
    assert metrics["load/1/imbalance"] == pytest.approx(1.0)
    assert metrics["load/imbalance"] == pytest.approx(2.0)
    # collect() starts a new interval
    assert monitor.collect()["load/0/tokens"] == [0, 0, 0, 0]


def test_mask_that_never_picks_some_neurons(tiny_mone):
    model, cfg = tiny_mone
    monitor = HealthMonitor(model)
    F = cfg.model.moe_ffn_hidden_size
    mask = torch.zeros(7, F, dtype=torch.bool)
    mask[:, :3] = True  # only neurons 0..2 are ever selected
    # expert 0: 3 neurons used; expert 1: all; experts 2, 3: no tokens (nothing used)
    monitor.observe_masks(0, 0, [mask, torch.ones(5, F, dtype=torch.bool), None, mask[:0]])
    metrics = monitor.collect()
    per_expert = metrics["neurons/0/per_expert"]
    assert per_expert == [pytest.approx(3 / F, abs=1e-4), 1.0, 0.0, 0.0]
    assert metrics["neurons/0/never_selected"] == (F - 3) + 0 + F + F
    assert metrics["neurons/0/utilisation"] == pytest.approx((3 / F + 1) / 4, abs=1e-4)
    assert metrics["neurons/1/never_selected"] == 4 * F  # layer 1 saw nothing
    monitor.remove()  # undoes the hooks and the MoNE callbacks
    assert all(getattr(m, "monitor", None) is None for m in model.modules())


def test_gate_quantiles_from_the_histogram():
    # |SiLU(g)| for g = silu^-1 of known magnitudes: take gates with silu(g) = 10^u,
    # u uniform in [-4, 0]: the median is 10^-2 and 10 % lie below 10^-3.6.
    u = torch.linspace(-4, 0, 20001)
    target = 10**u
    g = target.clone()
    for _ in range(60):  # Newton on silu(g) = target, g > 0
        s = torch.sigmoid(g)
        g = g - (g * s - target) / (s + g * s * (1 - s))
    monitor_hist = torch.zeros(220, dtype=torch.float64)
    from mone_train.components import health

    magnitude = torch.nn.functional.silu(g).abs().log10()
    monitor_hist += torch.histc(magnitude, bins=220, min=health.LOG10_MIN, max=health.LOG10_MAX)
    out = histogram_summary(monitor_hist)
    assert math.log10(out["gate_abs/q50"]) == pytest.approx(-2.0, abs=0.03)
    assert math.log10(out["gate_abs/q10"]) == pytest.approx(-3.6, abs=0.03)
    assert out["gate_abs/frac_below_0.01"] == pytest.approx(0.5, abs=0.01)
    assert out["gate_abs/frac_below_0.1"] == pytest.approx(0.75, abs=0.01)


@pytest.mark.slow
def test_training_run_logs_consistent_health_metrics(tmp_path):
    from mone_train.trainer import run

    cfg = compose_config(
        [
            "model=tiny",
            "trainer=smoke",
            "trainer.steps=6",
            "trainer.log_interval=3",
            "moe.neuron_keep_ratio=0.25",
            f"trainer.run_dir={tmp_path}",
            "logging.wandb_mode=disabled",
        ]
    )
    run(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [3, 6]
    t = cfg.trainer
    pairs = 3 * t.global_batch_size * t.seq_length * cfg.model.router_topk
    for r in train:
        for layer in (0, 1):
            assert sum(r[f"load/{layer}/tokens"]) == pairs  # evaluation is not counted
            assert 0 < r[f"neurons/{layer}/utilisation"] <= 1
        assert r["gate_abs/q10"] <= r["gate_abs/q50"] <= r["gate_abs/q90"] <= r["gate_abs/q99"]
        assert r["params/activated"] < r["params/activated_moe"]
        assert r["ng_lbl"] > 0 and r["aux_loss"] > 0 and r["tokens_per_s"] > 0


def test_flops_and_peak_lookup():
    from mone_train.components.health import model_flops_per_token, peak_tflops

    assert model_flops_per_token(1_000_000, 4, 128, 256) == 6e6 + 12 * 4 * 128 * 256
    assert peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert peak_tflops("Some Unknown GPU", "bf16") is None


@pytest.mark.slow
def test_auxiliary_losses_are_interval_means_whatever_the_log_interval(tmp_path):
    """aux_loss and ng_lbl of an interval are the mean over its steps: logged every step or
    every third, the same run gives the same numbers (a checkpoint or evaluation pause between
    steps must not drop the steps before it)."""
    from mone_train.trainer import run

    logged = {}
    for interval in (1, 3):
        run_dir = tmp_path / f"every{interval}"
        run(compose_config(["model=tiny", "trainer=smoke", "trainer.steps=3",
                            f"trainer.log_interval={interval}", "trainer.eval_interval=2",
                            f"trainer.run_dir={run_dir}", "logging.wandb_mode=disabled"]))  # fmt: skip
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        logged[interval] = [r for r in map(json.loads, lines) if "aux_loss" in r]
    assert [r["step"] for r in logged[1]] == [1, 2, 3] and [r["step"] for r in logged[3]] == [3]
    for name in ("aux_loss", "ng_lbl"):
        mean = sum(r[name] for r in logged[1]) / 3
        assert logged[3][0][name] == pytest.approx(mean, rel=1e-5), name
        assert logged[3][0][name] > 0.5  # a balance loss near 1 at initialisation, not 1/3 of it


@pytest.mark.slow
def test_steps_between_logs_read_no_activations_and_evaluate_nothing(tmp_path, monkeypatch):
    """A step that will not be logged only counts routed tokens: no neuron mask, no gate
    histogram, no collect (where every health collective is); evaluation runs only at its
    interval. The logged load counts still cover the whole interval."""
    from mone_train.components.metrics import TrainMetrics
    from mone_train.components.train_step import TrainStep
    from mone_train.evaluation.forward import Forward
    from mone_train.trainer import run

    events: dict[str, list[str]] = {}  # phase ("train 3": step 3's forwards and backwards;
    phase = [""]  # "after 3": what follows it, logging and evaluation) -> calls in it

    def wrap(cls, name, call):
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda *a, **k: (call(*a), original(*a, **k))[1])

    def enter(label):
        phase[0] = label
        events[label] = []

    for name in ("observe_routing", "observe_masks", "observe_gate", "collect"):
        wrap(HealthMonitor, name, lambda *a, name=name: events[phase[0]].append(name))
    for name in ("dataset_sums", "row_scores"):
        wrap(Forward, name, lambda *a, name=name: events[phase[0]].append(name))
    wrap(TrainStep, "__call__", lambda *a: enter(f"train {len(events) // 2 + 1}"))
    wrap(TrainMetrics, "step_done", lambda self, state, *a: enter(f"after {state.step}"))
    cfg = compose_config(["model=tiny", "trainer=smoke", "trainer.steps=4",
                          "trainer.log_interval=2", "trainer.eval_interval=3",
                          "moe.neuron_keep_ratio=0.25", "evaluation.stdlib_task_examples=0",
                          f"trainer.run_dir={tmp_path}", "logging.wandb_mode=disabled"])  # fmt: skip
    run(cfg)
    kinds = {p: sorted(set(e)) for p, e in events.items()}
    assert kinds == {
        "train 1": ["observe_routing"],
        "after 1": [],
        "train 2": ["observe_gate", "observe_masks", "observe_routing"],
        "after 2": ["collect"],
        "train 3": ["observe_routing"],
        "after 3": ["dataset_sums"],  # the evaluation at eval_interval
        "train 4": ["observe_gate", "observe_masks", "observe_routing"],
        "after 4": ["collect", "dataset_sums"],  # the last step: logged and evaluated
    }
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    t = cfg.trainer
    pairs = 2 * t.global_batch_size * t.seq_length * cfg.model.router_topk  # 2 steps
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        assert sum(r["load/0/tokens"]) == pairs and 0 < r["neurons/0/utilisation"] <= 1
