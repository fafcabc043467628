"""The trainer's checkpointing component: resume, periodic saves, and saves on preemption.

The format (atomic folders, completion marker, resharding) is :mod:`mone_train.components.checkpoint`;
this component decides when to save, restores the loop's position on resume, and turns
SIGTERM/SIGUSR1 (what SLURM sends before a job's time ends) into a save and exit code 75.
"""

from __future__ import annotations

import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mone_train.components.checkpoint import (
    checkpoint_bytes_share,
    free_bytes,
    load_checkpoint,
    save_checkpoint,
)
from mone_train.config import TrainerConfig
from mone_train.errors import EXIT_PREEMPTED, TrainingDiverged
from mone_train.parallel.process_groups import DistInfo


@dataclass
class TrainState:
    """What the loop advances: optimizer steps done and samples consumed (the data position)."""

    step: int = 0
    consumed_samples: int = 0


class PreemptionFlag:
    """Set by SIGTERM or SIGUSR1; install it before anything is written, so a signal saves.

    Before the training loop runs (start-up: process groups, data, model, resume) there is
    nothing to save and no loop to read the flag: a signal then ends the process at once with
    EXIT_PREEMPTED (the launcher requeues or restarts it like any preempted run).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self._set = False
        self.loop_running = False  # set by the trainer when the step loop starts
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self._set = True
        if not self.loop_running:
            print(f"mone-train: signal {signum} during start-up: exiting with code "
                  f"{EXIT_PREEMPTED}", file=sys.stderr, flush=True)  # fmt: skip
            raise SystemExit(EXIT_PREEMPTED)

    def requested(self, info: DistInfo) -> bool:
        """Whether any rank was signalled (all ranks must agree to save together)."""
        if info.world_size == 1:
            return self._set
        flag = torch.tensor([int(self._set)], device=info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Checkpointer:
    """Saves and restores model, optimizer, RNG and :class:`TrainState` for one run.

    Saves are asynchronous with ``trainer.async_save``: the loop goes on while a forked writer
    writes the tensors, :meth:`poll` (called every step) finalizes a finished save on all ranks,
    and a new save, the end of the run, or a preemption first waits for the one in flight.
    """

    def __init__(
        self,
        run_dir: Path,
        model,
        optimizer: torch.optim.Optimizer,
        cfg: TrainerConfig,
        *,
        signature: dict,
        resolved_config: dict,
        preemption: PreemptionFlag,
        info: DistInfo,
    ) -> None:
        self.run_dir = run_dir
        self.model = model
        self.optimizer = optimizer
        self.cfg = cfg
        self.signature = signature
        self.resolved_config = resolved_config
        self.preemption = preemption
        self.info = info
        self.wandb_id: str | None = None  # set by the trainer once the metrics logger exists
        self.last_saved: Path | None = None  # newest checkpoint written (or resumed from)
        self.protected: Path | None = None  # kept by keep_last while a bad streak lasts
        self._queue = _async_queue() if cfg.async_save else None
        self._pending: Path | None = None

    def resume(self, checkpoint: Path | None) -> tuple[TrainState, str | None]:
        """Load ``checkpoint`` (None: a fresh start); return the state and the wandb run id."""
        if checkpoint is None:
            return TrainState(), None
        point = load_checkpoint(checkpoint, self.model, self.optimizer, self.signature)
        self.last_saved = checkpoint
        return TrainState(point.step, point.consumed_samples), point.wandb_id

    def save(self, state: TrainState, wait: bool = False) -> Path | None:
        """Save now (every rank calls this); return the folder the checkpoint becomes.

        Refuses (raises TrainingDiverged) to save non-finite weights; skips the save with a
        warning, keeping the previous checkpoint, when the disk cannot hold it.
        """
        self.wait()
        self._check_finite(state)
        if not self._fits():
            return None
        path = save_checkpoint(
            self.run_dir,
            self.model,
            self.optimizer,
            step=state.step,
            consumed_samples=state.consumed_samples,
            signature=self.signature,
            resolved_config=self.resolved_config,
            wandb_id=self.wandb_id if self.info.is_main else None,
            keep_last=self.cfg.keep_last,
            protect=self.protected,
            async_queue=None if wait else self._queue,
        )
        self._pending = path if (self._queue is not None and not wait) else None
        if self._pending is None:
            self.last_saved = path
        return path

    @property
    def newest(self) -> Path | None:
        """The newest checkpoint, counting one still being written (it completes before the
        process exits)."""
        return self._pending or self.last_saved

    def poll(self) -> None:
        """Finalize an asynchronous save whose data is on disk on every rank (non-blocking)."""
        if self._pending is not None and self._queue.maybe_finalize_async_calls(blocking=False):
            self.last_saved, self._pending = self._pending, None

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete and finalized."""
        if self._pending is not None:
            self._queue.maybe_finalize_async_calls(blocking=True)
            self.last_saved, self._pending = self._pending, None

    def close(self) -> None:
        """Wait for the save in flight, then stop the asynchronous writer."""
        if self._queue is not None:
            self.wait()
            self._queue.close()
            self._queue = None

    def save_due(self, state: TrainState) -> bool:
        """Whether the schedule asks for a save after this step (the last step always saves)."""
        interval = self.cfg.save_interval
        return bool(interval) and (state.step % interval == 0 or state.step == self.cfg.steps)

    def after_step(
        self, state: TrainState, in_bad_streak: bool = False
    ) -> tuple[Path | None, bool]:
        """Save when due or when any rank was signalled; return (saved folder, preempted).

        During a streak of skipped (non-finite) steps scheduled saves wait for a good step, and
        a preemption save keeps the checkpoint from before the streak. After a preemption save
        (written synchronously) the caller exits with ``EXIT_PREEMPTED``.
        """
        self.poll()
        preempted = self.preemption.requested(self.info)
        if preempted:
            self.protected = self.last_saved if in_bad_streak else None
            return self.save(state, wait=True), True
        if in_bad_streak or not self.save_due(state):
            return None, False
        self.protected = None
        return self.save(state), False

    def _check_finite(self, state: TrainState) -> None:
        finite = torch.stack(
            [p.detach().isfinite().all() for g in self.optimizer.param_groups for p in g["params"]]
        ).all()
        flag = finite.to(torch.int32).reshape(1)
        if self.info.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not bool(flag.item()):
            raise TrainingDiverged(
                f"step {state.step}: the weights are not finite, so no checkpoint is written; "
                f"last good checkpoint: {self.newest or 'none'}"
            )

    def _fits(self) -> bool:
        """Whether the file system has room for one more checkpoint (decided on rank 0)."""
        need = torch.tensor([checkpoint_bytes_share(self.model)], dtype=torch.float64)
        if self.info.world_size > 1:
            need = need.to(self.info.device)
            dist.all_reduce(need)
        need = float(need)
        folder = self.run_dir / "checkpoints"
        ok = torch.tensor([1], dtype=torch.int32)
        if self.info.is_main:
            free = free_bytes(folder)
            if free < need * 1.1:  # a margin for metadata and file-system blocks
                ok[0] = 0
                warnings.warn(
                    f"not saving: a checkpoint needs about {need / 2**30:.2f} GiB and {folder} "
                    f"has {free / 2**30:.2f} GiB free; training goes on, the previous checkpoint "
                    f"({self.last_saved or 'none'}) stays",
                    stacklevel=2,
                )
        if self.info.world_size > 1:
            ok = ok.to(self.info.device)
            dist.broadcast(ok, src=0)
        return bool(ok.item())


def _async_queue():
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    return AsyncCallsQueue()
