"""Check command-line overrides before Hydra runs, so that a bad value ends in one line.

Hydra reports composition errors over several lines with hints; a user who typed
``trainer.stpes=10`` or ``moe.neuron_keep_ratio=1.5`` should instead see one line naming the key
and what would be valid, and get a non-zero exit. Sweeps (``--multirun``) and Hydra's own flags
are left to Hydra: each job of a sweep still validates its config when it starts. Hydra's
``--config-dir DIR`` (how an imported model trains: ``--config-dir DIR arch=imported``) is
composed in, so its overrides get the same checks.

The launchers run ``python -m mone_train.preflight --world-size N [overrides]`` before they
start any worker, so that a bad value or a layout that does not fit the job's processes is
one line from the launcher, not one per worker followed by the launcher's own report.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mone_train.compose import compose_config, describe_error
from mone_train.config import register_configs
from mone_train.errors import EXIT_CONFIG_ERROR, ConfigError

CONFIG_DIR_FLAGS = ("--config-dir", "-cd")  # Hydra's: one more folder of config groups


def composable_overrides(argv: list[str]) -> list[str] | None:
    """The overrides that compose ``argv``'s config as Hydra will (``--config-dir DIR`` as a
    search path, e.g. a mone-import output's ``arch=imported``); None when Hydra's other flags
    or a sweep leave the check to Hydra. Exits with one line for a missing ``--config-dir``."""
    search, rest = [], []
    args = iter(argv)
    for arg in args:
        flag, equals, value = arg.partition("=")
        if flag in CONFIG_DIR_FLAGS:
            value = value if equals else next(args, "")
            if not value:
                _fail(f"{flag} needs a folder of config groups (e.g. a mone-import output)")
            folder = Path(value).expanduser().absolute()
            if not folder.is_dir():
                _fail(f"{flag} {folder}: no such folder (expected a folder of config groups, "
                      "e.g. a mone-import output)")  # fmt: skip
            search.append(f"file://{folder}")
        else:
            rest.append(arg)
    if any(arg.startswith("-") for arg in rest):
        return None
    overrides = [a for a in rest if not a.lstrip("+~").startswith("hydra.")]
    if _has_sweep(overrides):
        return None  # a sweep (e.g. over an experiment's multirun): each job validates itself
    return ([f"hydra.searchpath=[{','.join(search)}]"] if search else []) + overrides


def check_overrides(argv: list[str]) -> None:
    """Exit with one line on stderr if the overrides in ``argv`` do not make a valid config."""
    overrides = composable_overrides(argv)
    if overrides is None:
        return
    try:
        cfg = compose_config(overrides)
        cfg.validate()
        if cfg.moe.kernel_impl in ("triton", "cpu"):  # a forced kernel this machine may lack
            from mone_train.runtime import check_kernel_impl

            check_kernel_impl(cfg)
    except ConfigError as err:
        _fail(str(err))
    except Exception as err:  # Hydra / OmegaConf composition errors
        _fail(describe_error(err))


def _has_sweep(overrides: list[str]) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:
        return False  # a malformed override: composing reports it in one line
    return any(o.is_sweep_override() for o in parsed)


def _fail(message: str) -> None:
    print(f"mone-train: error: {message}", file=sys.stderr)
    sys.exit(EXIT_CONFIG_ERROR)


def main(argv: list[str] | None = None) -> None:
    """``--world-size N [overrides]``: the overrides' config and its layout on N processes."""
    args = list(sys.argv[1:] if argv is None else argv)
    world_size = None
    if args[:1] == ["--world-size"] and len(args) > 1 and args[1].isdigit():
        world_size, args = int(args[1]), args[2:]
    if world_size is None or world_size < 1:
        _fail("usage: python -m mone_train.preflight --world-size N [overrides]")
    from mone_train import silence_megatron_notices

    silence_megatron_notices()
    register_configs()
    check_overrides(args)
    overrides = composable_overrides(args)
    if overrides is None:
        return  # Hydra's flags and sweeps: each job checks itself
    try:
        compose_config(overrides).validate_layout(world_size)
    except ConfigError as err:
        _fail(str(err))


if __name__ == "__main__":
    main()
