"""The run directory: what may be written where, and which checkpoint a run resumes from."""

from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

from mone_train.checkpoint import find_checkpoint, model_signature, signature_mismatch
from mone_train.config import Config
from mone_train.errors import ConfigError
from mone_train.tracking import METRICS_FILE


def prepare_run_dir(cfg: Config, is_main: bool) -> tuple[Path, Path | None]:
    """Create the run directory and find the checkpoint to resume from, if any.

    A directory that already holds a run is only accepted when resuming it, and only with the
    same model shape unless ``trainer.force_resume``; nothing existing is overwritten.
    """
    run_dir = Path(cfg.trainer.run_dir).expanduser().resolve()
    checkpoint = find_checkpoint(run_dir, cfg.trainer.resume)
    previous = run_dir / "config.yaml"
    if (run_dir / METRICS_FILE).exists() and checkpoint is None:
        raise ConfigError(
            f"trainer.run_dir={str(run_dir)!r} is invalid: expected a directory without a previous "
            f"run ({METRICS_FILE} exists there and no checkpoint to resume from)"
        )
    if checkpoint is not None and previous.is_file() and not cfg.trainer.force_resume:
        _check_same_shape(run_dir, previous, cfg)
    dist.barrier()  # every rank has looked before the main rank writes anything
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        name = (
            "config.yaml"
            if not previous.exists()
            else f"config-resumed-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        )
        (run_dir / name).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return run_dir, checkpoint


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
