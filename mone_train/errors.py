"""Errors every module may raise, and the one-line rendering of an exception.

This module imports nothing of the project, so config, data, model, checkpoint and CLI code can
all share it without import cycles.
"""

from __future__ import annotations

EXIT_CONFIG_ERROR = 2  # a bad value or input: one line on stderr, nothing written
EXIT_DIVERGED = 3  # too many consecutive non-finite steps: one line, the last good checkpoint


class ConfigError(ValueError):
    """A configuration value, input file or launch environment that cannot be used.

    The message names the key (or file) and the value, and says what would be valid; CLIs print
    it as one line and exit with :data:`EXIT_CONFIG_ERROR`.
    """


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of ``err``'s message (its type name when the message is empty)."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]


class TrainingDiverged(RuntimeError):
    """Training produced non-finite values for too long; the message says where and names the
    last good checkpoint. CLIs print it as one line and exit with :data:`EXIT_DIVERGED`."""
