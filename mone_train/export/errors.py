"""The export's error type: bad input or a checkpoint it cannot convert, shown as one line."""

from __future__ import annotations

from mone_train.errors import ConfigError


class ExportError(ConfigError):
    """A source path, output folder or checkpoint content that cannot be exported.

    The message is one line naming the path or option and what would be valid; the CLIs print
    it and exit with code 2.
    """
