"""The hang watchdog: a rank that makes no progress for too long dumps where it is and exits.

A rank that hangs (an all-to-all that never completes, a stuck data read, a dead NIC) blocks
every other rank inside a collective until the collective time-out, often with no hint of which
rank or where. Each rank runs a :class:`HangWatchdog` thread; the training loop reports its
phase (``data``, ``forward``, ``backward``, ``grad_sync``, ``optimizer``, ``eval``, ``save``)
as it goes, and the thread checks that some report came within the time-out:

- ``trainer.hang_timeout_s``: a number of seconds, or null for automatic: the larger of
  ``MIN_TIMEOUT_S`` and ``STEP_TIME_FACTOR`` x the median step time measured so far (until
  steps have been measured: ``STARTUP_TIMEOUT_S``, which covers the first step's one-time
  work); 0 turns the watchdog off. Evaluation and checkpoint saves report their own phase and
  get ``SLOW_PHASE_FACTOR`` x the time-out.
- On expiry the rank writes ``<run_dir>/hangs/rank<r>.txt`` (step, phase, seconds without
  progress, then every thread's Python stack) and, on GPUs where the NCCL flight recorder is
  on (``TORCH_NCCL_TRACE_BUFFER_SIZE``), ``rank<r>-nccl.pkl``; prints one line; and ends the
  process with :data:`EXIT_HANG`. Every rank blocked behind a hung one times out the same way,
  so the job ends within the time-out and the files say which rank was where.

``launch/torchrun.sh`` restarts the workers after such an exit when given a restart budget,
and the run resumes from its newest checkpoint; ``launch/slurm.sbatch`` requeues on it.

For tests, ``MONE_INJECT_HANG=rank:step:phase[:seconds]`` makes that rank sleep when it enters
that phase of that step (1-based; once per job: not again after a restart, when torchrun's
``TORCHELASTIC_RESTART_COUNT`` is above 0). Steps in the stack files are 1-based too.
``MONE_INJECT_DELAY=rank:seconds`` slows that rank's every forward (a straggler).
"""

from __future__ import annotations

import faulthandler
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from mone_train.errors import EXIT_HANG

PHASES = ("startup", "data", "forward", "backward", "grad_sync", "optimizer", "eval", "save")
SLOW_PHASES = ("eval", "save")
MIN_TIMEOUT_S = 120.0  # automatic time-out floor: GC pauses, page cache, a neighbour's load
STARTUP_TIMEOUT_S = 900.0  # before a step was measured: kernel builds, first-step compiles
STEP_TIME_FACTOR = 20.0  # automatic time-out: this many median steps without progress
SLOW_PHASE_FACTOR = 4.0  # evaluation and saves run several steps' worth of work
CHECK_INTERVAL_S = 1.0


class HangWatchdog:
    """One rank's watchdog thread (a daemon: it never keeps a finished process alive).

    Args:
        run_dir: where ``hangs/`` goes.
        rank: this process's global rank.
        timeout_s: seconds without progress before it fires; None: automatic; 0: off.
    """

    def __init__(self, run_dir: Path, rank: int, timeout_s: float | None) -> None:
        self.run_dir, self.rank = Path(run_dir), rank
        self.fixed_timeout = timeout_s
        self.enabled = timeout_s != 0
        self.step = 0
        self.phase = "startup"
        self._last = time.monotonic()
        self._step_started: float | None = None
        self._step_times: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._inject = _parse_injection(os.environ.get("MONE_INJECT_HANG"), rank)
        self._delay = _parse_delay(os.environ.get("MONE_INJECT_DELAY"), rank)
        self._thread = None
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, name="mone-watchdog", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ the loop's side

    def enter(self, phase: str, step: int | None = None) -> None:
        """The loop entered ``phase`` (of ``step``, default: the current one): progress."""
        with self._lock:
            self.phase = phase
            if step is not None:
                self.step = step
            self._last = time.monotonic()
        if self._inject is not None and self._inject[:2] == (self.step + 1, phase):
            seconds, self._inject = self._inject[2], None
            time.sleep(seconds)  # the injected hang (tests)
        if self._delay is not None and phase == "forward":
            time.sleep(self._delay)  # the injected straggler (tests)

    def step_done(self, step: int) -> None:
        """Step ``step`` finished: record its time for the automatic time-out."""
        now = time.monotonic()
        with self._lock:
            if self._step_started is not None:
                self._step_times.append(now - self._step_started)
                del self._step_times[:-50]  # the recent past decides
            self._step_started = now
            self.step = step
            self._last = now

    def timeout_s(self) -> float:
        """The current time-out of the phase the loop is in."""
        if self.phase == "startup":  # data, model, resume: one-time work of unknown length
            return max(STARTUP_TIMEOUT_S, float(self.fixed_timeout or 0))
        if self.fixed_timeout is not None:
            base = float(self.fixed_timeout)
        elif len(self._step_times) < 3:
            base = STARTUP_TIMEOUT_S
        else:
            base = max(MIN_TIMEOUT_S, STEP_TIME_FACTOR * statistics.median(self._step_times))
        return base * (SLOW_PHASE_FACTOR if self.phase in SLOW_PHASES else 1.0)

    def close(self) -> None:
        """Stop watching (the run ended or failed by itself)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ---------------------------------------------------------------- the thread's side

    def _watch(self) -> None:
        while not self._stop.wait(CHECK_INTERVAL_S):
            with self._lock:
                idle = time.monotonic() - self._last
                step, phase, limit = self.step, self.phase, self.timeout_s()
            if idle > limit:
                self._fire(step, phase, idle, limit)

    def _fire(self, step: int, phase: str, idle: float, limit: float) -> None:
        folder = self.run_dir / "hangs"
        path = folder / f"rank{self.rank}.txt"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                record = {"rank": self.rank, "step": step + 1, "phase": phase,
                          "seconds_without_progress": round(idle, 1), "timeout_s": limit,
                          "pid": os.getpid(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
                f.write(json.dumps(record) + "\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            _dump_nccl_trace(folder / f"rank{self.rank}-nccl.pkl")
            code_file = os.environ.get("MONE_EXIT_CODE_FILE")  # launch/torchrun.sh reads it
            if code_file:
                with open(code_file, "a") as f:
                    f.write(f"{EXIT_HANG}\n")
        except OSError:
            path = None  # a full or gone disk must not keep the rank alive
        print(
            f"mone-train: rank {self.rank} hung in {phase} of step {step + 1}: no progress for "
            f"{idle:.0f} s (timeout {limit:.0f} s); stacks in {path}; exiting with code "
            f"{EXIT_HANG}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_HANG)  # the main thread may be stuck in a collective: no clean-up


def _dump_nccl_trace(path: Path) -> None:
    """torch's NCCL flight recorder, where the GPU build records one (else nothing)."""
    if not os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE"):
        return
    try:
        import torch

        dump = torch._C._distributed_c10d._dump_nccl_trace()  # bytes (pickle)
    except Exception:  # a CPU build or an older torch: nothing to add
        return
    path.write_bytes(dump)


def _parse_injection(spec: str | None, rank: int) -> tuple[int, str, float] | None:
    """``rank:step:phase[:seconds]`` -> (step, phase, seconds) for this rank, else None."""
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return None
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[2] not in PHASES:
        raise ValueError(
            f"MONE_INJECT_HANG={spec!r} is invalid: expected rank:step:phase[:seconds], "
            f"phase one of {', '.join(PHASES)}"
        )
    if int(parts[0]) != rank:
        return None
    return int(parts[1]), parts[2], float(parts[3]) if len(parts) == 4 else 3600.0


def _parse_delay(spec: str | None, rank: int) -> float | None:
    """``rank:seconds`` -> seconds for this rank, else None."""
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) != 2:
        raise ValueError(f"MONE_INJECT_DELAY={spec!r} is invalid: expected rank:seconds")
    return float(parts[1]) if int(parts[0]) == rank else None
