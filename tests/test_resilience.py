"""Runs that survive at scale: the hang watchdog, in-place restarts, the straggler report, a
build lock no killed process can leave behind, start-up signals, idempotent reruns, and the
rough edges that printed tracebacks."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.distributed import TINY_RUN, free_port, losses, metrics

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = REPO / "launch" / "torchrun.sh"
ENV = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "WANDB_MODE": "disabled"}


def _torchrun(nproc: int, run_dir: Path, *overrides: str, timeout: float = 300, **env):
    """launch/torchrun.sh NPROC with TINY_RUN (4 sequences per rank) + overrides; (exit code,
    stderr, seconds)."""
    start = time.monotonic()
    batch = ["trainer.micro_batch_size=4", f"trainer.global_batch_size={4 * nproc}"]
    done = subprocess.run(
        [str(TORCHRUN), str(nproc), *TINY_RUN, *batch, f"trainer.run_dir={run_dir}", *overrides],
        env={**ENV, "MASTER_PORT": str(free_port()), **env},
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip
    return done.returncode, done.stderr, time.monotonic() - start


# ----------------------------------------------------------------------------- the watchdog


@pytest.mark.slow  # waits for the watchdog to fire
def test_watchdog_reports_progress_and_fires_on_none(tmp_path):
    """In a thread of this process: progress keeps it quiet; a stopped loop is detected and
    reported (the exit is replaced so that the test survives it)."""
    from mone_train.components import watchdog as wd

    fired = []
    dog = wd.HangWatchdog(tmp_path, rank=3, timeout_s=0.5)
    dog._fire = lambda step, phase, idle, limit: fired.append((step, phase, idle, limit))
    try:
        dog.step_done(0)
        for _ in range(8):  # 2 s of steady progress: nothing fires
            dog.enter("forward")
            time.sleep(0.25)
        assert fired == []
        dog.enter("backward")
        time.sleep(wd.CHECK_INTERVAL_S + 1.0)
        assert fired and fired[0][:2] == (0, "backward") and fired[0][3] == 0.5
    finally:
        dog.close()
    off = wd.HangWatchdog(tmp_path, rank=0, timeout_s=0)
    assert off._thread is None and not off.enabled


def test_automatic_timeout_follows_the_step_time(tmp_path):
    from mone_train.components import watchdog as wd

    dog = wd.HangWatchdog(tmp_path, rank=0, timeout_s=None)
    try:
        assert dog.timeout_s() == wd.STARTUP_TIMEOUT_S
        dog.enter("forward")
        assert dog.timeout_s() == wd.STARTUP_TIMEOUT_S  # no step measured yet
        dog._step_times = [30.0] * 5
        assert dog.timeout_s() == 30.0 * wd.STEP_TIME_FACTOR
        dog._step_times = [0.1] * 5
        assert dog.timeout_s() == wd.MIN_TIMEOUT_S
        dog.enter("save")
        assert dog.timeout_s() == wd.MIN_TIMEOUT_S * wd.SLOW_PHASE_FACTOR
    finally:
        dog.close()


@pytest.mark.slow  # two 2-process jobs through torchrun
def test_a_frozen_rank_ends_the_job_within_the_timeout_with_stacks(tmp_path):
    """Rank 1 sleeps in the forward of step 3: both ranks exit within the 5 s time-out plus
    start-up and a margin (not the 30-minute collective time-out), the launcher exits with the
    watchdog's code, and each rank's stack file names where it was."""
    from mone_train.errors import EXIT_HANG

    run_dir = tmp_path / "run"
    code, stderr, seconds = _torchrun(
        2, run_dir, "trainer.hang_timeout_s=5", "trainer.steps=10",
        MONE_INJECT_HANG="1:3:forward:600",
    )  # fmt: skip
    assert code == EXIT_HANG, stderr[-3000:]
    assert seconds < 120, seconds
    reports = {}
    for rank in (0, 1):
        text = (run_dir / "hangs" / f"rank{rank}.txt").read_text()
        reports[rank] = json.loads(text.splitlines()[0])
        assert "Thread" in text and "File" in text  # the Python stacks follow
    assert (reports[1]["step"], reports[1]["phase"]) == (3, "forward")
    assert "train_step.py" in (run_dir / "hangs" / "rank1.txt").read_text()  # inside the step
    assert reports[0]["step"] == 3 and reports[0]["phase"] in ("forward", "backward", "grad_sync")
    assert "rank 1 hung in forward of step 3" in stderr


@pytest.mark.slow
def test_with_a_restart_budget_the_job_resumes_and_matches_an_uninterrupted_run(tmp_path):
    common = ("trainer.steps=8", "trainer.save_interval=2")
    code, stderr, _ = _torchrun(2, tmp_path / "straight", *common)
    assert code == 0, stderr[-3000:]
    code, stderr, _ = _torchrun(
        2, tmp_path / "restarted", "trainer.hang_timeout_s=5", *common,
        MONE_INJECT_HANG="0:5:backward:600", MAX_RESTARTS="1",
    )  # fmt: skip
    assert code == 0, stderr[-3000:]
    assert (tmp_path / "restarted" / "hangs" / "rank0.txt").is_file()  # it did hang once
    assert losses(tmp_path / "restarted") == losses(tmp_path / "straight")


@pytest.mark.slow
def test_the_straggler_report_names_the_slow_rank(tmp_path):
    run_dir = tmp_path / "run"
    code, stderr, _ = _torchrun(2, run_dir, "trainer.steps=12", "trainer.log_interval=3",
                                MONE_INJECT_DELAY="1:0.2")  # fmt: skip
    assert code == 0, stderr[-3000:]
    records = [r for r in metrics(run_dir) if "loss" in r]
    assert len(records) == 4
    for record in records[1:]:  # the first interval includes one-time work
        assert record["straggler/rank"] == 1 and record["straggler/ratio"] > 1.25, record
        assert len(record["straggler/compute_s"]) == 2
    assert "rank 1 is a straggler" in stderr


def test_one_process_has_no_straggler_report(tmp_path, megatron_single):
    from mone_train.components.stragglers import StragglerReport

    report = StragglerReport(1, megatron_single.device, True)
    assert report.collect(1.0, 0.0, 5) == {}


# ------------------------------------------------------------------- the CPU build lock


_HOLD_LOCK = """
import fcntl, sys, time
handle = open(sys.argv[1], "a")
fcntl.flock(handle, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""

_LOAD = """
import time
start = time.monotonic()
from mone_kernels.cpu_build import load_error, cpu_isa
error = load_error()
print(error or cpu_isa(), round(time.monotonic() - start, 1))
"""


def _kill_while_holding(lock: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(lock)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)


@pytest.mark.slow  # a fresh interpreter
def test_a_process_killed_holding_the_lock_does_not_stop_the_next_start(tmp_path):
    """The built library loads without any lock; a build lock left by a killed process (and
    torch's own loader's lock file, which a kill leaves behind for good) change nothing."""
    from mone_kernels import cpu_build

    here = cpu_build.library_path()
    if not here.exists():
        pytest.skip("the CPU operators are not built on this machine")
    target = tmp_path / here.parent.name
    target.mkdir()
    shutil.copy(here, target / here.name)
    _kill_while_holding(target / "build.lock")
    (target / "lock").write_text("")  # the file torch's FileBaton waits on for ever
    done = subprocess.run([sys.executable, "-c", _LOAD], env={**ENV, "TORCH_EXTENSIONS_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    isa, seconds = done.stdout.split()
    assert isa in ("avx512", "avx2", "baseline") and float(seconds) < 30, done.stderr


@pytest.mark.slow  # builds the operators once (about 15 s)
def test_a_builder_killed_mid_build_leaves_the_next_process_free_to_build(tmp_path):
    """The lock is an fcntl lock, released by the operating system when its holder dies."""
    from mone_kernels import cpu_build

    env = {**ENV, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    folder = subprocess.run(
        [sys.executable, "-c", "from mone_kernels.cpu_build import cache_dir; print(cache_dir())"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(folder).mkdir(parents=True)
    _kill_while_holding(Path(folder) / "build.lock")
    (Path(folder) / ".build-dead").mkdir()  # the half-built leftover of the killed builder
    done = subprocess.run([sys.executable, "-c", _LOAD], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.stdout.split()[0] in ("avx512", "avx2", "baseline"), done.stderr[-2000:]
    assert (Path(folder) / cpu_build.library_path().name).is_file()
    assert not (Path(folder) / ".build-dead").exists()


def test_waiting_for_a_living_builder_gives_up_after_the_timeout(tmp_path, monkeypatch):
    from mone_kernels import cpu_build

    lock = tmp_path / "build.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        monkeypatch.setenv("MONE_KERNEL_BUILD_TIMEOUT_S", "1")
        with open(lock, "a") as waiting, pytest.raises(TimeoutError, match="held .* for over 1 s"):
            cpu_build._wait_for_lock(waiting, lock)


# ------------------------------------------------------------------- signals and reruns


@pytest.mark.slow
def test_a_signal_during_start_up_ends_the_process_promptly(tmp_path):
    """SIGTERM while the run is still starting (here held in start-up by an injected sleep)
    ends it at once with the preemption code, instead of setting a flag nothing reads."""
    from mone_train.errors import EXIT_PREEMPTED

    proc = subprocess.Popen(
        [sys.executable, "-m", "mone_train.train", *TINY_RUN, f"trainer.run_dir={tmp_path}"],
        env={**ENV, "MONE_INJECT_HANG": "0:1:startup:600"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in proc.stdout:
        if line.startswith("run directory"):
            break
    time.sleep(2)  # well inside the injected start-up sleep
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == EXIT_PREEMPTED and time.monotonic() - sent < 10
    assert "during start-up" in proc.stderr.read()


@pytest.mark.slow
def test_rerunning_a_finished_run_exits_zero_and_changes_nothing(tmp_path):
    command = [sys.executable, "-m", "mone_train.train", *TINY_RUN, "trainer.steps=5",
               f"trainer.run_dir={tmp_path}"]  # fmt: skip
    first = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    before = _stamps(tmp_path)
    again = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already finished at step 5" in again.stdout and "nothing to do" in again.stdout
    assert _stamps(tmp_path) == before
    other_shape = subprocess.run([*command, "model.hidden_size=32"], env=ENV,
                                 capture_output=True, text=True, timeout=300)  # fmt: skip
    assert other_shape.returncode == 2
    lines = other_shape.stderr.strip().splitlines()
    assert len(lines) == 1 and "another model shape" in lines[0]


def _stamps(run_dir: Path) -> dict:
    """Every file of the run and its modification time, but Hydra's record of each command
    (it appends the command's log to train-rank<r>.log and rewrites .hydra/)."""
    return {
        str(p.relative_to(run_dir)): p.stat().st_mtime_ns
        for p in run_dir.rglob("*")
        if p.is_file() and not p.name.startswith("train-rank") and ".hydra" not in p.parts
    }


# ------------------------------------------------------------------------- rough edges


@pytest.mark.slow  # a fresh interpreter
def test_a_corrupt_index_is_one_line_without_a_traceback_after_it(tmp_path, corpus):
    prefix = tmp_path / "data"
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{corpus.valid_prefix}{suffix}", f"{prefix}{suffix}")
    Path(f"{prefix}.idx").write_bytes(b"not an index" * 4)
    done = subprocess.run(
        [sys.executable, "-m", "mone_train.train", "model=tiny", "trainer=smoke", "data=indexed",
         f"data.paths=[{prefix}]", f"trainer.run_dir={tmp_path / 'run'}"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a readable megatron-core index" in lines[0], lines


@pytest.mark.slow  # a fresh interpreter
def test_a_triton_kernel_on_a_machine_without_cuda_is_a_config_error_before_any_work(tmp_path):
    env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "mone_train.train", "model=tiny", "trainer=smoke",
         "moe.kernel_impl=triton", f"trainer.run_dir={tmp_path / 'run'}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if done.returncode == 0:
        pytest.skip("this machine runs the Triton kernel")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert "moe.kernel_impl=triton is invalid on this machine" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing was started
