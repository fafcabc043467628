"""Composing a run's configuration: ``config.yaml`` and the Hydra groups under
``mone_train/configs/`` with command-line overrides, into the typed :class:`Config`.

Every command that takes mone-train's overrides (``mone-train``, ``mone-plan``, the launchers'
preflight, ``mone-eval``) composes through :func:`compose_config`, and reports a composition
error as one line through :func:`describe_error`.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from mone_train.config import Config, register_configs
from mone_train.errors import ConfigError

# The YAML configs ship inside the package, so wheels and editable installs find them alike.
CONFIG_DIR = Path(str(files("mone_train") / "configs"))


def compose_config(overrides: list[str], config_dir: Path = CONFIG_DIR):
    """Compose ``config.yaml`` with overrides (Hydra's compose API) into a typed Config."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        dcfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_object(dcfg)


def describe_error(err: BaseException) -> str:
    """One line for a composition error: the key, the value and what would be valid."""
    from hydra.errors import MissingConfigException

    chain = []
    cause: BaseException | None = err
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for exc in chain:
        if isinstance(exc, ConfigError):  # raised by our resolvers: already one line
            return str(exc)
    for exc in chain:
        if isinstance(exc, (ConfigAttributeError, ConfigKeyError)) and getattr(
            exc, "full_key", None
        ):
            full_key = exc.full_key
            parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
            valid = _keys_under(parent)
            where = f" under {parent}" if parent else ""
            return f"unknown config key '{full_key}'; valid keys{where}: {', '.join(valid)}"
        if isinstance(exc, OmegaConfBaseException) and getattr(exc, "full_key", None):
            return f"{exc.full_key}: {str(exc).splitlines()[0]}"
        if isinstance(exc, MissingConfigException) and exc.options and exc.missing_cfg_file:
            group, _, option = exc.missing_cfg_file.rpartition("/")
            return (
                f"{group}={option} is not a config option; valid: {', '.join(sorted(exc.options))}"
            )
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _keys_under(parent: str) -> list[str]:
    node = OmegaConf.structured(Config)
    if parent:
        node = OmegaConf.select(node, parent)
    return sorted(node.keys()) if node is not None and hasattr(node, "keys") else []
