"""What every ``mone-*`` command line shares: the parser and the quiet, offline start.

Each area keeps its command in ``<area>/cli.py`` (``mone-train``, whose overrides Hydra reads, in
``train.py``) and builds it with :class:`CommandParser`, so that a usage error is one line from
the :class:`~mone_train.errors.ConfigError` hierarchy (exit code 2 through
:func:`~mone_train.errors.report_failure`) and ``--help`` ends with examples.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Sequence

from mone_train.errors import ConfigError


class UsageError(ConfigError):
    """A command line argparse cannot parse (unknown option, missing or malformed value)."""


class CommandParser(argparse.ArgumentParser):
    """argparse whose usage errors raise :class:`UsageError` (one line, exit code 2) and whose
    ``--help`` ends with ``examples`` (a list of command lines, each with an optional
    ``  # comment``)."""

    def __init__(self, *args, examples: Sequence[str] = (), **kwargs) -> None:
        if examples:
            kwargs["epilog"] = "examples:\n" + "\n".join(f"  {line}" for line in examples)
            kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def quiet_libraries() -> None:
    """Silence megatron's and torch.distributed.checkpoint's start-up notices; stay offline."""
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (is|are) not installed")
    warnings.filterwarnings("ignore", message=r"full scope is deprecated")
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights"
