"""User-facing errors.

Anything a user can cause (bad config, missing data, wrong checkpoint) raises an
:class:`IaatError`; the CLI prints its message as one paragraph and exits non-zero
instead of showing a traceback from deep inside torch.
"""

from __future__ import annotations


class IaatError(Exception):
    """An error caused by input the user can fix; the message says how."""


class ConfigError(IaatError):
    """A config file, override or option value is invalid."""


class DataError(IaatError):
    """A data set is missing, malformed or inconsistent."""


class CheckpointError(IaatError):
    """A checkpoint or run folder is missing, damaged or does not match."""
