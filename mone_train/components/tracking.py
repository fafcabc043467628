"""Where metrics go: the terminal, ``metrics.jsonl`` in the run directory, and wandb.

Only the main rank writes. Every record is one JSON object per line with at least ``step``;
evaluation records carry ``val_loss`` (nats per token) and the evaluator's other metrics
(``eval/<set>/...``, ``task/<task>/...``, ``rho<r>/...``: docs/evaluation.md).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mone_train.config import LoggingConfig

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Writes metric records; a no-op on ranks other than the main one."""

    def __init__(
        self,
        run_dir: Path,
        cfg: LoggingConfig,
        resolved_config: dict,
        enabled: bool,
        wandb_id: str | None = None,
    ) -> None:
        self.enabled = enabled
        self._file = None
        self._wandb_run = None
        if not enabled:
            return
        self._file = open(run_dir / METRICS_FILE, "a", buffering=1)
        mode = os.environ.get("WANDB_MODE", cfg.wandb_mode)
        if mode != "disabled":
            import wandb

            where = cfg.wandb_dir or os.environ.get("WANDB_DIR") or run_dir
            Path(where).expanduser().mkdir(parents=True, exist_ok=True)
            self._wandb_run = wandb.init(
                project=cfg.wandb_project,
                entity=cfg.wandb_entity,
                name=cfg.wandb_run_name or run_dir.name,
                group=cfg.wandb_group,
                tags=list(cfg.wandb_tags),
                config=resolved_config,
                dir=str(Path(where).expanduser()),
                mode=mode,
                settings=wandb.Settings(quiet=True),
                # A resumed run continues the same wandb run.
                id=wandb_id,
                resume="allow" if wandb_id else None,
            )

    @property
    def wandb_id(self) -> str | None:
        """Id of the wandb run (saved in checkpoints so that a resume continues it)."""
        return self._wandb_run.id if self._wandb_run is not None else None

    @property
    def wandb_dir(self) -> str | None:
        """Folder of the wandb run files (None when wandb is disabled)."""
        return self._wandb_run.dir if self._wandb_run is not None else None

    def log(self, record: dict[str, Any], echo: str | None = None) -> None:
        """Append ``record`` (must hold ``step``) and print ``echo`` if given."""
        if not self.enabled:
            return
        record = finite_record(record)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        if self._wandb_run is not None:
            # Scalars only: per-expert lists stay in metrics.jsonl.
            scalars = {
                k: v
                for k, v in record.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            }  # None (a non-finite number) is left out
            self._wandb_run.log(scalars, step=record["step"])
        if echo:
            tqdm.write(echo)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def finite_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with NaN and infinities (also inside lists) replaced by None, so that the JSON
    lines stay strict JSON and wandb is never sent them."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return {key: clean(value) for key, value in record.items()}
