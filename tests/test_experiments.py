"""Experiment tooling: shipped sweep configs, a real multirun sweep, mone-report, wandb."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mone_train.compose import CONFIG_DIR, compose_config
from mone_train.report.cli import main as report_main

# Training runs, subprocesses or process groups: the full tier only (make test).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _mone_train(*args: str) -> subprocess.CompletedProcess:
    """``mone-train ARGS`` in a subprocess (Hydra sweeps own their process)."""
    return subprocess.run(
        [sys.executable, "-m", "mone_train.train", *args],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "TORCHDYNAMO_DISABLE": "1"},
    )  # fmt: skip


def _compose_experiment(name: str, *extra: str):
    from hydra import compose, initialize_config_dir

    from mone_train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[f"+experiment={name}", *extra],
            return_hydra_config=True,
        )


def test_shipped_sweeps_are_multiruns_of_the_intended_settings():
    rho = _compose_experiment("sweep_rho")
    assert str(rho.hydra.mode) == "RunMode.MULTIRUN" and rho.moe.flavour == "mone"
    values = rho.hydra.sweeper.params["moe.neuron_keep_ratio"].split(",")
    assert [float(v) for v in values] == [0.125, 0.25, 0.5, 0.75, 1.0]
    base = _compose_experiment("moe_baseline")
    assert base.moe.flavour == "moe" and base.model == rho.model  # same total parameters
    matched = _compose_experiment("moe_matched_active")
    assert matched.moe.flavour == "moe"
    assert matched.model.moe_ffn_hidden_size != rho.model.moe_ffn_hidden_size


def test_matched_moe_has_the_activated_parameters_of_mone_at_half(megatron_single):
    from mone_train.model.builder import build_model
    from mone_train.model.params import count_parameters

    def activated(overrides):
        cfg = compose_config(overrides)
        model, _ = build_model(cfg, vocab_size=258)
        return count_parameters(model, cfg.model.router_topk)

    mone = activated(["moe=mone", "moe.neuron_keep_ratio=0.5"])
    matched_cfg = _compose_experiment("moe_matched_active")
    matched = activated(
        ["moe=moe", f"model.moe_ffn_hidden_size={matched_cfg.model.moe_ffn_hidden_size}"]
    )
    assert matched.activated == matched.activated_moe  # plain MoE: one figure
    assert abs(matched.activated / mone.activated - 1) < 0.005
    assert matched.total < mone.total


def test_two_run_sweep_then_report(tmp_path):
    sweep = tmp_path / "sweep"
    result = _mone_train(
        "+experiment=sweep_rho",
        "moe.neuron_keep_ratio=0.25,1.0", "model=tiny", "trainer=smoke", "trainer.steps=6",
        "trainer.eval_interval=3", "trainer.log_interval=3", "logging.wandb_mode=disabled",
        f"hydra.sweep.dir={sweep}"
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for job, ratio in [("0", 0.25), ("1", 1.0)]:
        saved = yaml.safe_load((sweep / job / "config.yaml").read_text())
        assert saved["moe"]["neuron_keep_ratio"] == ratio
        assert saved["logging"]["wandb_group"] == "sweep-rho"
        assert (sweep / job / "metrics.jsonl").exists()

    # Beside them: a run cut short and a job that died before its first log.
    shutil.copytree(sweep / "0", sweep / "2", ignore=shutil.ignore_patterns("checkpoints"))
    lines = (sweep / "2" / "metrics.jsonl").read_text().splitlines()
    (sweep / "2" / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (sweep / "3" / ".hydra").mkdir(parents=True)
    shutil.copy(sweep / "0" / "config.yaml", sweep / "3" / "config.yaml")

    out = tmp_path / "report"
    assert report_main([str(sweep), "--out", str(out)]) == 0
    table = (out / "report.md").read_text()
    assert "MoNE rho=0.25" in table and "MoNE rho=1" in table
    assert f"`{sweep / '2'}`: unfinished: last logged step 3 of 6" in table
    assert f"`{sweep / '3'}`: no metrics.jsonl" in table
    data = json.loads((out / "report.json").read_text())
    assert len(data["runs"]) == 2 and len(data["skipped"]) == 2
    for run in data["runs"]:
        assert run["steps"] == 6 and run["best_val_loss"] <= run["final_val_loss"]
        assert run["activated"] <= run["activated_moe"] and run["tokens_per_s"] > 0
    for png in ("val_loss.png", "loss_vs_activated.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_report_with_nothing_finished_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report_main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to report" in err[0] and "no run directories" in err[0]
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_wandb_offline_files_settings_and_resume_keep_the_run(tmp_path, monkeypatch):
    from mone_train.trainer import run

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "tracking"
    common = [
        "model=tiny", "trainer=smoke", "trainer.eval_interval=4", "trainer.log_interval=2",
        "trainer.save_interval=4", f"trainer.run_dir={run_dir}", "logging.wandb_mode=offline",
        f"logging.wandb_dir={wandb_dir}", "logging.wandb_project=proj",
        "logging.wandb_run_name=rho-half", "logging.wandb_group=grp", "logging.wandb_tags=[a,b]",
    ]  # fmt: skip
    first = run(compose_config([*common, "trainer.steps=4"]))
    assert not (run_dir / "wandb").exists()  # written where configured instead
    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = runs[0].name.rsplit("-", 1)[1]
    assert (runs[0] / f"run-{run_id}.wandb").stat().st_size > 0  # the offline run's records

    second = run(compose_config([*common, "trainer.steps=8"]))  # resumes from step 4
    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[1] for r in runs} == {run_id}
    assert second["steps"] == 8 and first["wandb_dir"] is not None


def test_wandb_run_settings_come_from_config(tmp_path, monkeypatch):
    from mone_train.components.tracking import MetricsLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_config(
        ["logging.wandb_project=proj", "logging.wandb_run_name=name", "logging.wandb_group=grp",
        "logging.wandb_tags=[x,y]"]
    )  # fmt: skip
    logger = MetricsLogger(tmp_path, cfg.logging, {"k": 1}, enabled=True)
    try:
        wb = logger._wandb_run
        assert (wb.project, wb.name, wb.group, tuple(wb.tags)) == (
            "proj",
            "name",
            "grp",
            ("x", "y"),
        )
        assert wb.config["k"] == 1
    finally:
        logger.close()
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment wins over the config
    (tmp_path / "x").mkdir()
    logger = MetricsLogger(tmp_path / "x", cfg.logging, {}, enabled=True)
    assert logger.wandb_id is None and not (tmp_path / "x" / "wandb").exists()
    logger.close()


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_wandb_mode_from_config(tmp_path, monkeypatch, mode):
    from mone_train.components.tracking import MetricsLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_config([f"logging.wandb_mode={mode}"])
    logger = MetricsLogger(tmp_path, cfg.logging, {}, enabled=True)
    assert (logger.wandb_id is not None) == (mode == "offline")
    logger.close()


def test_sweep_through_the_submitit_launcher(tmp_path):
    """The Hydra launcher the SLURM instructions use, in its local mode (no cluster here)."""
    sweep = tmp_path / "sweep"
    result = _mone_train(
        "+experiment=sweep_rho",
        "moe.neuron_keep_ratio=0.25,1.0", "model=tiny", "trainer=smoke", "trainer.steps=2",
        "trainer.eval_interval=2", "trainer.eval_iters=1", "logging.wandb_mode=disabled",
        "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}"
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for job in ("0", "1"):
        records = (sweep / job / "metrics.jsonl").read_text().splitlines()
        assert any('"val_loss"' in line for line in records)


def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = _mone_train(
        "--multirun", "model=tiny", "trainer=smoke",
        "trainer.steps=2", "trainer.eval_interval=2", "trainer.eval_iters=1",
        "logging.wandb_mode=disabled", "trainer.global_batch_size=7,8",
        f"hydra.sweep.dir={sweep}"
    )  # fmt: skip
    assert result.returncode != 0  # the sweep reports its failure ...
    assert "trainer.global_batch_size=7 is invalid" in result.stderr
    assert (sweep / "1" / "metrics.jsonl").exists()  # ... after running the next job
