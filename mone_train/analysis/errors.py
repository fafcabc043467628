"""The one error type of the analysis tools: bad input, reported as one line and exit code 2."""

from __future__ import annotations

from mone_train.errors import ConfigError


class AnalysisError(ConfigError):
    """A model path, data file, option value or output folder that cannot be used.

    The message is one line naming the option or file and what would be valid.
    """
