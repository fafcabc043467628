"""Runs that survive: non-finite steps are skipped (and too many stop the run), a kill at any
moment is followed by the same command going on exactly, finished runs are protected, and
preemption signals reach the workers through the launcher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from mone_train.components.checkpoint import CHECKPOINTS, MARKER
from mone_train.compose import compose_config
from mone_train.errors import EXIT_DIVERGED, EXIT_PREEMPTED, ConfigError
from tests.helpers.distributed import TINY_RUN, free_port

REPO = Path(__file__).resolve().parent.parent
BASE = [*TINY_RUN, "trainer.eval_interval=30"]
# MKL_DYNAMIC=FALSE: MKL may otherwise pick fewer threads on a loaded machine, which changes
# float32 summation order; the exact comparisons below need the same order in every process.
ENV = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "MKL_DYNAMIC": "FALSE"}


def _strict_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl through a strict JSON parser (NaN or Infinity tokens fail)."""

    def refuse(token):
        raise ValueError(f"non-JSON number {token}")

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


def _complete(run_dir: Path) -> list[Path]:
    folder = run_dir / CHECKPOINTS
    return sorted(p for p in folder.glob("step_*") if (p / MARKER).is_file())


def test_a_non_finite_step_leaves_weights_and_optimizer_state_untouched(megatron_single):
    import itertools

    from mone_train.components.optimizer import build_optimizer
    from mone_train.components.train_step import TrainStep
    from mone_train.model.builder import build_model
    from mone_train.model.lm import causal_mask

    cfg = compose_config(["model=tiny"])
    model, params = build_model(cfg, 258)
    optimizer = build_optimizer(cfg.optim, params)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(2, 16),
             "position_ids": torch.arange(16).expand(2, -1)}  # fmt: skip
    step = TrainStep(model, optimizer, params, causal_mask(16, torch.device("cpu")),
                     megatron_single, accum=1, clip_grad=1.0)  # fmt: skip
    assert step(itertools.repeat(batch), lr=1e-3).applied  # optimizer state now exists
    weights = [p.detach().clone() for p in params]
    moments = [s["exp_avg_sq"].clone() for s in optimizer.state.values()]
    params[0].register_hook(lambda grad: grad * float("nan"))
    result = step(itertools.repeat(batch), lr=1e-3)
    assert not result.applied and result.grad_norm != result.grad_norm  # NaN
    assert all(torch.equal(a, b) for a, b in zip(weights, params))
    assert all(torch.equal(a, s["exp_avg_sq"]) for a, s in zip(moments, optimizer.state.values()))


@pytest.mark.slow
def test_a_poisoned_step_is_skipped_counted_and_training_goes_on(tmp_path, monkeypatch):
    from mone_train import trainer
    from mone_train.trainer import run
    from tests.helpers.faults import poisoned_builder

    monkeypatch.setattr(trainer, "build_model", poisoned_builder(trainer.build_model, {3}))
    summary = run(compose_config([*BASE, "trainer.steps=6", f"trainer.run_dir={tmp_path}"]))
    records = [r for r in _strict_records(tmp_path) if "skipped_steps" in r]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 0, 0, 0]
    assert records[2]["loss"] is not None and records[2]["grad_norm"] is None
    assert records[-1]["nonfinite_steps_total"] == 1
    assert summary["steps"] == 6 and summary["val_loss"] < 6


def _distcp_tensors(checkpoint: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(flat))
    state = torch.load(flat, weights_only=False)
    out = {}

    def walk(prefix, value):
        if torch.is_tensor(value):
            out[prefix] = value
        elif isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}/{key}", inner)

    walk("", state)
    return out


@pytest.mark.slow
def test_a_non_finite_streak_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cmd = [sys.executable, "-m", "tests.helpers.faults", "4,5,6,7,8", *BASE, "trainer.steps=12",
           "trainer.save_interval=2", "trainer.keep_last=1", f"trainer.run_dir={tmp_path}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_DIVERGED, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mone-train: error: training diverged: non-finite gradient norm at ")
    assert "steps 4-6" in last and last.endswith("step_00000002")
    assert [p.name for p in _complete(tmp_path)] == ["step_00000002"]  # keep_last spared it
    tensors = _distcp_tensors(_complete(tmp_path)[0])
    assert len(tensors) > 10 and all(t.isfinite().all() for t in tensors.values())
    records = _strict_records(tmp_path)  # null, never NaN, for the non-finite norms
    assert [r["grad_norm"] is None for r in records if "skipped_steps" in r][3:6] == [True] * 3


def _kill_when(cmd: list[str], condition, what: str) -> None:
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 180
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before {what}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _steps_logged(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return max((json.loads(line)["step"] for line in lines if "loss" in line), default=0)
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_the_same_command_goes_on_after_a_kill_at_any_moment(tmp_path):
    common = [*BASE, "trainer.steps=16", "trainer.save_interval=6", "trainer.eval_interval=16"]

    def command(run_dir):
        return [sys.executable, "-m", "mone_train.train", *common, f"trainer.run_dir={run_dir}"]

    def final_val_loss(run_dir):
        done = subprocess.run(command(run_dir), cwd=REPO, env=ENV, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return [r["val_loss"] for r in _strict_records(run_dir) if "val_loss" in r][-1]

    reference = final_val_loss(tmp_path / "uninterrupted")
    # Each window spans whole steps or a forked writer's run, not a moment: 4 steps and a save
    # before the first checkpoint; .tmp-step_* lives from a save's start until a later step
    # finalizes the forked writer (async_save), three saves to catch; steps 8-16 between saves.
    moments = {
        "before the first checkpoint": lambda d: _steps_logged(d) >= 2 and not _complete(d),
        "inside a save": lambda d: any((d / CHECKPOINTS).glob(".tmp-step_*")),
        "between saves": lambda d: bool(_complete(d)) and _steps_logged(d) >= 8,
    }
    for i, (what, condition) in enumerate(moments.items()):
        run_dir = tmp_path / f"killed{i}"
        _kill_when(command(run_dir), lambda d=run_dir, c=condition: c(d), what)
        assert final_val_loss(run_dir) == reference, what
        steps = [r["step"] for r in _strict_records(run_dir) if "loss" in r]
        assert steps == list(range(1, 17)), what  # one clean history; the rest moved aside
    assert list((tmp_path / "killed2").glob("metrics-superseded-*.jsonl"))
    # A finished run is never written to again by the same command: a rerun (a requeue, a
    # restart, a resubmit) finds nothing to do and succeeds.
    from tests.test_resilience import _stamps

    finished = tmp_path / "killed2"
    before = _stamps(finished)
    done = subprocess.run(command(finished), cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == (
        f"mone-train: {finished} already finished at step 16 (FINISHED.json); nothing to do"
    )
    assert _stamps(finished) == before


@pytest.mark.slow
def test_a_finished_run_is_left_alone_in_process_and_extended_on_request(tmp_path):
    from mone_train.trainer import run

    overrides = [*BASE, "trainer.steps=4", "trainer.save_interval=4", f"trainer.run_dir={tmp_path}"]
    first = run(compose_config(overrides))
    before = (tmp_path / "metrics.jsonl").read_text()
    again = run(compose_config(overrides))  # nothing to do: the finished run's summary
    assert again["steps"] == 4 and again["val_loss"] == first["val_loss"]
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert run(compose_config([*overrides, "trainer.steps=6"]))["steps"] == 6
    for checkpoint in (tmp_path / "checkpoints").glob("step_*"):
        shutil.rmtree(checkpoint)  # without a checkpoint it cannot be trained further
    with pytest.raises(ConfigError, match="without a checkpoint to train it further"):
        run(compose_config([*overrides, "trainer.steps=8"]))


def _torchrun(run_dir: Path, *extra: str) -> list[str]:
    return ["bash", "launch/torchrun.sh", "2", *BASE, "trainer.expert_parallel_size=2",
            "trainer.micro_batch_size=4", "trainer.global_batch_size=8",
            f"trainer.run_dir={run_dir}", *extra]  # fmt: skip


def _launch_env() -> dict:
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {
        **env,
        "MASTER_PORT": str(free_port()),
        "TORCHRUN": str(Path(sys.executable).parent / "torchrun"),
    }


@pytest.mark.slow
def test_a_signal_to_the_launcher_saves_once_exits_75_and_the_job_resumes(tmp_path):
    cmd = _torchrun(tmp_path, "trainer.steps=60", "trainer.eval_interval=60")
    proc = subprocess.Popen(cmd, cwd=REPO, env=_launch_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while _steps_logged(tmp_path) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    # 58 steps left: the signal reaches the workers well before the run could end.
    proc.send_signal(signal.SIGUSR1)  # as SLURM's --signal=USR1@T does to a job step's task
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    assert len(_complete(tmp_path)) == 1
    saved_at = int(_complete(tmp_path)[0].name[5:])
    assert 2 <= saved_at < 60
    done = subprocess.run(cmd, cwd=REPO, env=_launch_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r["step"] for r in _strict_records(tmp_path) if "loss" in r]
    assert steps == list(range(1, 61))


@pytest.mark.slow
def test_one_killed_rank_ends_the_job_and_the_same_command_resumes(tmp_path):
    cmd = _torchrun(tmp_path, "trainer.steps=30", "trainer.save_interval=5",
                    "trainer.eval_interval=30")  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=_launch_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 180
    while not _complete(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    # The step-5 save completes a step or two later (async): over 20 steps and 4 saves left.
    (torchrun,) = psutil.Process(proc.pid).children()  # the launcher script's one child
    workers = torchrun.children()  # direct children only: not the checkpoint writers
    assert len(workers) == 2
    workers[1].kill()
    assert proc.wait(timeout=180) not in (0, EXIT_PREEMPTED)
    done = subprocess.run(cmd, cwd=REPO, env=_launch_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in _strict_records(tmp_path) if "loss" in r] == list(range(1, 31))


def test_a_corrupt_index_ends_in_one_line_naming_the_file(tmp_path, megatron_single):
    from mone_train.data.dataset import DataError, check_prefixes
    from mone_train.data.preprocess import preprocess
    from mone_train.data.tokenizer import ByteTokenizer

    source = tmp_path / "docs.txt"
    source.write_text("hello world, " * 200)
    prefix = str(tmp_path / "data")
    preprocess([str(source)], prefix, progress=False)
    Path(prefix + ".idx").write_bytes(b"garbage" * 10)
    with pytest.raises(DataError, match=r"data\.paths\[0\].*data\.idx is not a readable"):
        check_prefixes([prefix], ByteTokenizer())
    preprocess([str(source)], prefix, progress=False, overwrite=True)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match=r"data\.bin has 100 bytes but its index needs"):
        check_prefixes([prefix], ByteTokenizer())


def test_the_slurm_script_asks_for_a_warning_signal_and_requeues():
    script = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=USR1@" in script and "#SBATCH --requeue" in script
    assert "srun --kill-on-bad-exit=1 launch/torchrun.sh" in script  # the forwarding launcher
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    done = subprocess.run(["bash", "-n", str(REPO / "launch" / "slurm.sbatch")])
    assert done.returncode == 0
