"""The trainer's checkpointing component: resume, periodic saves, and saves on preemption.

The format (atomic folders, completion marker, resharding) is :mod:`mone_train.checkpoint`;
this component decides when to save, restores the loop's position on resume, and turns
SIGTERM/SIGUSR1 (what SLURM sends before a job's time ends) into a save and exit code 75.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mone_train.checkpoint import load_checkpoint, save_checkpoint
from mone_train.config import TrainerConfig
from mone_train.distributed import DistInfo


@dataclass
class TrainState:
    """What the loop advances: optimizer steps done and samples consumed (the data position)."""

    step: int = 0
    consumed_samples: int = 0


class PreemptionFlag:
    """Set by SIGTERM or SIGUSR1; install it before anything is written, so a signal saves."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self._set = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self._set = True

    def requested(self, info: DistInfo) -> bool:
        """Whether any rank was signalled (all ranks must agree to save together)."""
        if info.world_size == 1:
            return self._set
        flag = torch.tensor([int(self._set)], device=info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Checkpointer:
    """Saves and restores model, optimizer, RNG and :class:`TrainState` for one run."""

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

    def resume(self, checkpoint: Path | None) -> tuple[TrainState, str | None]:
        """Load ``checkpoint`` (None: a fresh start); return the state and the wandb run id."""
        if checkpoint is None:
            return TrainState(), None
        point = load_checkpoint(checkpoint, self.model, self.optimizer, self.signature)
        return TrainState(point.step, point.consumed_samples), point.wandb_id

    def save(self, state: TrainState) -> Path:
        """Save now (every rank calls this); return the checkpoint folder."""
        return save_checkpoint(
            self.run_dir,
            self.model,
            self.optimizer,
            step=state.step,
            consumed_samples=state.consumed_samples,
            signature=self.signature,
            resolved_config=self.resolved_config,
            wandb_id=self.wandb_id if self.info.is_main else None,
            keep_last=self.cfg.keep_last,
        )

    def save_due(self, state: TrainState) -> bool:
        """Whether the schedule asks for a save after this step (the last step always saves)."""
        interval = self.cfg.save_interval
        return bool(interval) and (state.step % interval == 0 or state.step == self.cfg.steps)

    def after_step(self, state: TrainState) -> tuple[Path | None, bool]:
        """Save when due or when any rank was signalled; return (saved folder, preempted).

        After a preemption save the caller exits with ``EXIT_PREEMPTED``.
        """
        preempted = self.preemption.requested(self.info)
        if not (preempted or self.save_due(state)):
            return None, False
        return self.save(state), preempted
