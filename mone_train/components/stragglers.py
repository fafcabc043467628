"""The straggler report: which rank is slow, from each rank's own compute time.

A slow rank (a throttled GPU, a noisy neighbour) slows every rank, because the others wait for
it in collectives; their step times all look alike. What tells them apart is each rank's time
*outside* collectives: per log interval, the wall time of its steps minus the time it spent in
collectives (``comm_stats``' clock) and in the gradient synchronisation (whose waits happen
in ``Work.wait`` calls inside megatron's DDP, so the whole phase is timed: wall clock on CPU,
CUDA events on GPU), per step. One small all-gather at the log interval brings
every rank's figure to all of them; the record gets

    straggler/rank            the rank with the largest compute time per step
    straggler/ratio           its compute time over the median rank's
    straggler/compute_s       [every rank's compute seconds per step]          (JSONL only)

and when one rank stays above ``RATIO_WARN`` x the median for ``WARN_INTERVALS`` intervals in
a row, a warning names it. One process: no report.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.distributed as dist

from mone_train.parallel import comm_stats

RATIO_WARN = 1.25
WARN_INTERVALS = 3


class StragglerReport:
    """Per-interval compute times of every rank; ``collect`` at each log interval."""

    def __init__(self, world_size: int, device: torch.device, is_main: bool) -> None:
        self.world_size, self.device, self.is_main = world_size, device, is_main
        self._streak_rank: int | None = None
        self._streak = 0
        self._in_sync: object = None  # the start of the gradient sync in progress
        self._sync_seconds = 0.0
        self._sync_events: list = []
        if world_size > 1:
            comm_stats.install_clock()
            comm_stats.take_collective_seconds()  # start from zero

    def on_phase(self, phase: str) -> None:
        """The training step entered ``phase``: time the gradient synchronisation whole."""
        if self.world_size == 1:
            return
        cuda = self.device.type == "cuda"
        if phase == "grad_sync" and self._in_sync is None:
            comm_stats.pause_clock(True)
            self._in_sync = _cuda_event() if cuda else time.perf_counter()
        elif phase != "grad_sync" and self._in_sync is not None:
            if cuda:
                self._sync_events.append((self._in_sync, _cuda_event()))
            else:
                self._sync_seconds += time.perf_counter() - self._in_sync
            self._in_sync = None
            comm_stats.pause_clock(False)

    def _take_sync_seconds(self) -> float:
        seconds = self._sync_seconds
        if self._sync_events:
            torch.cuda.synchronize()
            seconds += sum(a.elapsed_time(b) for a, b in self._sync_events) / 1e3
        self._sync_seconds, self._sync_events = 0.0, []
        return seconds

    def collective_seconds(self) -> float:
        """Seconds this rank spent in collectives since the last call (0 on one process)."""
        return comm_stats.take_collective_seconds() if self.world_size > 1 else 0.0

    def collect(self, step_seconds: float, in_collectives: float, steps: int) -> dict:
        """The report for an interval of ``steps`` steps that took ``step_seconds`` of wall time
        (evaluation and saves excluded), ``in_collectives`` of it in collectives."""
        if self.world_size == 1 or steps == 0:
            return {}
        in_collectives += self._take_sync_seconds()
        mine = torch.tensor([max(0.0, step_seconds - in_collectives) / steps],
                            dtype=torch.float64, device=self.device)  # fmt: skip
        every = torch.empty(self.world_size, dtype=torch.float64, device=self.device)
        dist.all_gather_into_tensor(every, mine)
        comm_stats.take_collective_seconds()  # this gather is not the next interval's wait
        times = every.cpu().tolist()
        median = statistics.median(times)
        slowest = max(range(self.world_size), key=times.__getitem__)
        ratio = times[slowest] / median if median > 0 else float("nan")
        self._warn(slowest, ratio)
        return {
            "straggler/rank": slowest,
            "straggler/ratio": ratio,
            "straggler/compute_s": [round(t, 6) for t in times],
        }

    def _warn(self, slowest: int, ratio: float) -> None:
        if ratio > RATIO_WARN:
            same = slowest == self._streak_rank
            self._streak = self._streak + 1 if same else 1
            self._streak_rank = slowest
        else:
            self._streak, self._streak_rank = 0, None
        if self._streak == WARN_INTERVALS and self.is_main:
            print(
                f"mone-train: warning: rank {slowest} is a straggler: its compute time per step "
                f"has been {ratio:.2f}x the median rank's for {WARN_INTERVALS} log intervals "
                f"(> {RATIO_WARN}x); the whole job runs at its pace",
                file=sys.stderr,
                flush=True,
            )


def _cuda_event():
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event
