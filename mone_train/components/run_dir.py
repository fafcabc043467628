"""The run directory: what may be written where, and where a run starts or goes on.

Rules (docs/checkpoints.md), checked on every rank before anything is written:

- A directory whose run finished (``FINISHED.json``) is never written to again, unless the
  config asks for more steps than it finished with and it has a checkpoint: then training goes
  on from there (the finish marker is removed until the longer run finishes). The same command
  again (a requeued or restarted job, a resubmit) finds nothing to do and ends successfully
  (:class:`RunFinished`); with another model shape it is refused like any other run.
- A directory holding ``metrics.jsonl`` without our ``config.yaml`` is not a run of ours and
  is refused; one whose ``config.yaml`` describes another model shape is refused unless
  ``trainer.force_resume``.
- Otherwise the same command always goes on: from the newest complete checkpoint, or from
  scratch when none completed (a kill before the first save). Metric records past the point
  it goes on from are moved to ``metrics-superseded-<time>.jsonl`` (kept, not mixed into the
  new history), and staging folders of interrupted saves (``checkpoints/.tmp-*``) are deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

from mone_train.components.checkpoint import (
    CHECKPOINTS,
    find_checkpoint,
    model_signature,
    read_marker,
    signature_mismatch,
)
from mone_train.components.tracking import METRICS_FILE
from mone_train.config import Config
from mone_train.errors import ConfigError

FINISHED = "FINISHED.json"
CONFIG_FILE = "config.yaml"


class RunFinished(Exception):
    """The run directory's run already finished the steps asked for: nothing to do."""

    def __init__(self, run_dir: Path, steps: int, summary: dict) -> None:
        super().__init__(f"{run_dir} already finished at step {steps} ({FINISHED}); nothing to do")
        self.summary = summary


def prepare_run_dir(cfg: Config, is_main: bool) -> tuple[Path, Path | None]:
    """Check the run directory against the rules above, then (main rank) set it up.

    Returns the directory and the checkpoint to resume from (None: from scratch).
    """
    run_dir = Path(cfg.trainer.run_dir).expanduser().resolve()
    checkpoint = find_checkpoint(run_dir, cfg.trainer.resume)
    previous = run_dir / CONFIG_FILE
    if (run_dir / METRICS_FILE).exists() and not previous.is_file():
        raise ConfigError(
            f"trainer.run_dir={str(run_dir)!r} is invalid: expected a directory without a previous "
            f"run ({METRICS_FILE} exists there but no {CONFIG_FILE} of a mone-train run)"
        )
    if previous.is_file() and not cfg.trainer.force_resume:
        _check_same_shape(run_dir, previous, cfg)
    _check_finished(run_dir, cfg, checkpoint)
    dist.barrier()  # every rank has looked before the main rank writes anything
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / FINISHED).unlink(missing_ok=True)
        for stale in (run_dir / CHECKPOINTS).glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        start_step = read_marker(checkpoint)["step"] if checkpoint is not None else 0
        supersede_metrics(run_dir, start_step)
        name = (
            CONFIG_FILE
            if not previous.exists()
            else f"config-resumed-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        )
        (run_dir / name).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    dist.barrier()
    return run_dir, checkpoint


def mark_finished(run_dir: Path, summary: dict) -> None:
    """Write ``FINISHED.json`` (atomically): the run completed all its steps."""
    tmp = run_dir / f".{FINISHED}.tmp"
    tmp.write_text(json.dumps({**summary, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    os.replace(tmp, run_dir / FINISHED)


def supersede_metrics(run_dir: Path, start_step: int) -> Path | None:
    """Move records of steps after ``start_step`` out of ``metrics.jsonl``; return where."""
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        return None
    keep, moved = [], []
    for line in metrics.read_text().splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except ValueError:  # a line cut short by the kill
            step = start_step + 1
        (keep if step <= start_step else moved).append(line)
    if not moved:
        return None
    aside = run_dir / f"metrics-superseded-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    with open(aside, "a") as f:
        f.write("\n".join(moved) + "\n")
    tmp = run_dir / f".{METRICS_FILE}.tmp"
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, metrics)
    return aside


def _check_finished(run_dir: Path, cfg: Config, checkpoint: Path | None) -> None:
    marker = run_dir / FINISHED
    if not marker.is_file():
        return
    try:
        summary = json.loads(marker.read_text())
    except ValueError:
        summary = {}
    done = summary.get("steps", 0)
    if cfg.trainer.steps <= done:
        raise RunFinished(run_dir, done, summary)
    if checkpoint is None:
        raise ConfigError(
            f"trainer.run_dir={str(run_dir)!r} holds a finished run ({FINISHED}: {done} steps) "
            f"without a checkpoint to train it further to trainer.steps={cfg.trainer.steps}; "
            "choose another trainer.run_dir"
        )


def _check_same_shape(run_dir: Path, previous: Path, cfg: Config) -> None:
    saved = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(previous))
    )
    mismatched = signature_mismatch(model_signature(saved, None), model_signature(cfg, None))
    if mismatched:
        raise ConfigError(
            f"trainer.run_dir={str(run_dir)!r} holds a run of another model shape "
            f"({'; '.join(m.replace('(checkpoint)', '(run_dir)') for m in mismatched)}); "
            "set trainer.force_resume=true to resume it anyway"
        )
