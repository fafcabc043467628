"""``mone-train`` (also ``python -m mone_train.train``): the command line around
:func:`mone_train.trainer.run`.

Hydra composes the packaged ``configs/config.yaml`` with the command-line overrides; bad
overrides end in one line before Hydra starts (``mone_train.preflight``). Library code never
imports this module.
"""

from __future__ import annotations

import os
import sys
import traceback

import hydra
from omegaconf import DictConfig, OmegaConf

from mone_train import silence_megatron_notices
from mone_train.compose import CONFIG_DIR
from mone_train.config import Config, register_configs
from mone_train.errors import EXIT_CONFIG_ERROR, EXIT_DIVERGED, ConfigError, TrainingDiverged
from mone_train.preflight import check_overrides


class JobFailed(RuntimeError):
    """One job of a sweep failed (its message is already printed); the sweep goes on."""


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def hydra_main(dcfg: DictConfig) -> None:
    """Hydra task: one training run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    # Imported here so that --help and bad overrides answer before torch and megatron load.
    from mone_train.trainer import run

    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        cfg: Config = OmegaConf.to_object(dcfg)
        if sweep:
            # Each job of a sweep trains in its own job folder.
            cfg.trainer.run_dir = HydraConfig.get().runtime.output_dir
        run(cfg)
    except Exception as err:
        if isinstance(err, (ConfigError, TrainingDiverged)):  # one line, no traceback
            message = str(err)
            code = EXIT_CONFIG_ERROR if isinstance(err, ConfigError) else EXIT_DIVERGED
            print(f"mone-train: error: {message}", file=sys.stderr)
        else:
            traceback.print_exc()
            message, code = f"{type(err).__name__}: {err}", 1
            rank = os.environ.get("RANK", "0")
            print(f"mone-train: rank {rank} failed: {message}", file=sys.stderr)
        if sweep:  # Hydra records the job as failed and goes on with the next one
            raise JobFailed(message) from None
        sys.exit(code)


def main() -> None:
    """Console entry point: one-line errors for bad overrides, then Hydra."""
    silence_megatron_notices()
    register_configs()
    check_overrides(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
