"""End-to-end training runs on the default corpus, and the pieces of the loop."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from mone_train.components.optimizer import lr_at
from mone_train.compose import compose_config
from mone_train.config import OptimConfig
from mone_train.errors import ConfigError


def _smoke(run_dir, *extra):
    return compose_config(["model=tiny", "trainer=smoke", f"trainer.run_dir={run_dir}", *extra])


@pytest.mark.slow
def test_tiny_run_learns_and_writes_its_run_directory(tmp_path, monkeypatch, corpus):
    from mone_train.trainer import run

    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    cfg = _smoke(run_dir, "logging.wandb_mode=offline")
    summary = run(cfg)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [30, 60]
    # Uniform bytes score ln(258) = 5.55 nats; a model that knows only the byte frequencies
    # scores the unigram entropy H (about 3.2 nats on this split), over 2 nats lower. The loss
    # must fall by at least half of that gain from the first logged loss (mean of steps 1-10).
    counts = np.bincount(np.fromfile(f"{corpus.valid_prefix}.bin", dtype=np.uint16))
    freq = counts[counts > 0] / counts.sum()
    entropy = float(-(freq * np.log(freq)).sum())
    assert train[0]["loss"] - evals[-1]["val_loss"] >= (math.log(258) - entropy) / 2
    assert summary["val_loss"] == evals[-1]["val_loss"]
    for r in train:
        assert r["aux_loss"] > 0 and r["ng_lbl"] > 0 and r["tokens_per_s"] > 0

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["moe"]["flavour"] == "mone" and saved["trainer"]["steps"] == 60
    params = json.loads((run_dir / "params.json").read_text())
    assert params == summary["params"] and params["activated"] < params["activated_moe"]
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].iterdir())


@pytest.mark.slow
def test_plain_moe_run_logs_no_ng_lbl(tmp_path):
    from mone_train.trainer import run

    run_dir = tmp_path / "moe"
    run(
        _smoke(
            run_dir,
            "moe=moe",
            "trainer.steps=20",
            "trainer.eval_interval=20",
            "logging.wandb_mode=disabled",
        )
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("ng_lbl") is None for r in records)
    assert not (run_dir / "wandb").exists()


def test_existing_run_is_never_overwritten(tmp_path):
    from mone_train.trainer import run

    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="trainer.run_dir"):
        run(_smoke(run_dir, "logging.wandb_mode=disabled"))
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cfg, 100) == pytest.approx(0.1)
    assert lr_at(9, cfg, 100) == pytest.approx(1.0)
    assert lr_at(10, cfg, 100) == pytest.approx(1.0)
    assert lr_at(55, cfg, 100) == pytest.approx(0.55)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    linear = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, schedule="linear")
    assert lr_at(50, linear, 100) == pytest.approx(0.5)


def test_fused_adamw_matches_torch_default_and_refuses_strided_weights():
    """optim.fused: torch's fused kernel, the default AdamW's updates to 1e-6; a strided weight
    (on which the fused CPU kernel computes wrong updates) is refused, not silently stepped."""
    import torch

    from mone_train.components.optimizer import build_optimizer

    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    grads = [torch.randn_like(w) for w in start]
    results = []
    for fused in (True, False):
        weights = [torch.nn.Parameter(w.clone()) for w in start]
        optimizer = build_optimizer(OptimConfig(fused=fused, lr=0.1), weights)
        for _ in range(3):
            for w, g in zip(weights, grads):
                w.grad = g.clone()
            optimizer.step()
        results.append(weights)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    strided = torch.nn.Parameter(torch.randn(32, 64).t())
    with pytest.raises(ValueError, match=r"optim.fused=true needs contiguous.*\(64, 32\)"):
        build_optimizer(OptimConfig(fused=True), [strided])
    build_optimizer(OptimConfig(fused=False), [strided])


def test_each_step_sees_only_its_own_gradient(megatron_single):
    """Regression: the optimizer reads DDP's buffer through param.grad; left attached, the next
    backward accumulated into it and DDP's hook added it again (gradients doubled)."""
    import itertools

    import torch

    from mone_train.components.optimizer import build_optimizer
    from mone_train.components.train_step import TrainStep
    from mone_train.model.builder import build_model
    from mone_train.model.lm import causal_mask

    cfg = compose_config(
        ["model=tiny", "optim.lr=0", "optim.warmup_steps=0", "optim.weight_decay=0"]
    )
    model, params = build_model(cfg, 258)
    optimizer = build_optimizer(cfg.optim, params)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (2, 16))
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(2, 16),
             "position_ids": torch.arange(16).expand(2, -1)}  # fmt: skip
    mask = causal_mask(16, torch.device("cpu"))
    step = TrainStep(model, optimizer, params, mask, megatron_single, accum=1, clip_grad=0.0)
    norms = [step(itertools.repeat(batch), lr=0.0).grad_norm for _ in range(3)]
    assert norms[0] > 0 and norms[1] == pytest.approx(norms[0], rel=1e-6) == norms[2]
