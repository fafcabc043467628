"""Launchers (torchrun, deepspeed) start a 2-process CPU job; a bad launch environment ends
in one line and a non-zero exit, never a hang."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mone_train.parallel.process_groups import LaunchError, launch_environment
from tests.helpers.distributed import TINY_RUN, free_port

# Training runs, subprocesses or process groups: the full tier only (make test).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SMOKE = [*TINY_RUN, "trainer.steps=10", "trainer.log_interval=5", "trainer.micro_batch_size=4"]


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
            PYTHON=sys.executable,
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


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh"])
@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.expert_parallel_size=4",
         "trainer.expert_parallel_size=4 is invalid: expected a divisor of the world size 2"),
        ("trainer.tensor_parallel_size=3",
         "model.num_attention_heads=4 is invalid: expected a multiple of "
         "trainer.tensor_parallel_size=3"),
        ("trainer.stpes=3", "unknown config key 'trainer.stpes'"),
    ],
)  # fmt: skip
def test_a_bad_layout_or_key_is_one_line_from_the_launcher(tmp_path, script, override, message):
    """Checked once for the job's world size before any worker starts: one line, exit 2, no
    worker's copy of it and no launcher report after it."""
    result = _launch(script, 2, tmp_path / "run", override, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


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
