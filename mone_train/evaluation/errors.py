"""The evaluation's bad-input error."""

from __future__ import annotations

from mone_train.errors import ConfigError


class EvaluationError(ConfigError):
    """A task file, validation set or keep ratio that cannot be evaluated; one line naming the
    file (and line) or key and what would be valid."""
