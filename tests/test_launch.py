"""Launchers (torchrun, deepspeed) start a 2-process CPU job; a bad launch environment ends
in one line and a non-zero exit, never a hang."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mone_train.distributed import LaunchError, launch_environment
from tests.distributed import free_port

# Training runs, subprocesses or process groups: the full tier only (make test).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SMOKE = [
    "model=tiny",
    "trainer=smoke",
    "trainer.steps=10",
    "trainer.log_interval=5",
    "trainer.eval_interval=10",
    "trainer.micro_batch_size=4",
    "logging.wandb_mode=disabled",
]


def _env(**extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
    }
    env.update(TORCHDYNAMO_DISABLE="1", **extra)
    return env


def _launch(script, nproc, run_dir, *extra, timeout=240):
    return subprocess.run(
        ["bash", f"launch/{script}", str(nproc), *SMOKE, f"trainer.run_dir={run_dir}", *extra],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(
            MASTER_PORT=str(free_port()),
            TORCHRUN=str(BIN / "torchrun"),
            DEEPSPEED=str(BIN / "deepspeed"),
        ),
        timeout=timeout,
    )


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh"])
def test_launcher_runs_two_cpu_processes_with_output_from_rank_zero(tmp_path, script):
    result = _launch(script, 2, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert (
        "world size 2: tensor parallel 1, pipeline parallel 1, expert parallel 1, data parallel 2"
        in out
    )
    assert out.count("final validation loss") == 1
    assert out.count("run directory:") == 2  # first and last line of rank 0, none from rank 1
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_layout_that_does_not_divide_the_world_fails_the_whole_job(tmp_path):
    result = _launch(
        "torchrun.sh", 2, tmp_path / "run", "trainer.expert_parallel_size=4", timeout=120
    )
    assert result.returncode != 0
    assert (
        "trainer.expert_parallel_size=4 is invalid: expected a divisor of the world size 2"
        in result.stderr
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _trainer(tmp_path, env, *extra):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mone_train.train",
            *SMOKE,
            f"trainer.run_dir={tmp_path / 'run'}",
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(**env),
        timeout=120,
    )


def test_missing_rendezvous_variables_are_named(tmp_path):
    result = _trainer(tmp_path, {"RANK": "0", "WORLD_SIZE": "2"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "MASTER_ADDR, MASTER_PORT not set" in lines[0]


def test_unreachable_master_times_out_with_one_line(tmp_path):
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    result = _trainer(tmp_path, env, "trainer.init_timeout_s=2")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "rank 1 of 2: could not reach the master" in lines[0]


@pytest.mark.parametrize(
    "env,message",
    [
        (
            {"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
            "must be integers",
        ),
        (
            {"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
            "0 <= RANK < WORLD_SIZE",
        ),
        ({"WORLD_SIZE": "4"}, "RANK, MASTER_ADDR, MASTER_PORT not set"),
    ],
)
def test_launch_environment_is_checked(env, message):
    with pytest.raises(LaunchError, match=message):
        launch_environment(env)
    assert launch_environment({}) is None
    assert launch_environment(
        {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    ) == (1, 2)


def test_dockerfile_installs_through_the_one_install_script():
    dockerfile = (REPO / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if line and not line.startswith("#")]
    assert any("scripts/install.sh" in line for line in instructions)
    assert not any("==" in line for line in instructions), "versions belong in pyproject.toml"
    for copied in ("scripts/", "mone_train/", "mone_kernels/", "launch/"):
        assert f"COPY {copied}" in dockerfile
        assert (REPO / copied).is_dir()
