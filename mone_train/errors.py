"""Errors every module may raise, and the one-line rendering of an exception.

This module imports nothing of the project, so config, data, model, checkpoint and CLI code can
all share it without import cycles.
"""

from __future__ import annotations

import sys
import traceback

# The exit codes the launchers read (launch/*.sh take them from ``python -m mone_train.errors``).
EXIT_CONFIG_ERROR = 2  # a bad value or input: one line on stderr, nothing written
EXIT_DIVERGED = 3  # too many consecutive non-finite steps: one line, the last good checkpoint
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved on SIGTERM/SIGUSR1, requeue and resume
EXIT_HANG = 76  # the hang watchdog ended a rank without progress: restart or requeue
EXIT_CODES = {
    "EXIT_CONFIG_ERROR": EXIT_CONFIG_ERROR,
    "EXIT_DIVERGED": EXIT_DIVERGED,
    "EXIT_PREEMPTED": EXIT_PREEMPTED,
    "EXIT_HANG": EXIT_HANG,
}


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


def report_failure(
    prog: str, err: Exception, bad_input: tuple[type[Exception], ...] = (ConfigError,)
) -> int:
    """How every ``mone-*`` command ends on ``err``: bad input (``bad_input`` types) as one line
    and :data:`EXIT_CONFIG_ERROR`; anything else with its traceback, one summary line and 1."""
    if isinstance(err, bad_input):
        print(f"{prog}: {first_line(err, 500)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    traceback.print_exc()
    print(f"{prog}: failed: {type(err).__name__}: {err}", file=sys.stderr)
    return 1


if __name__ == "__main__":  # the launchers' source of the exit codes: NAME=value lines
    print("\n".join(f"{name}={code}" for name, code in EXIT_CODES.items()))
