"""User-facing errors.

Anything a user can cause (bad config, missing data, wrong checkpoint) raises an
:class:`IaatError`; the CLI prints its message as one paragraph and exits non-zero
instead of showing a traceback from deep inside torch.
"""

from __future__ import annotations


class IaatError(Exception):
    """An error caused by input the user can fix; the message says how."""


class ConfigError(IaatError, ValueError):
    """A config file, override, option or argument value is invalid (a ``ValueError`` for Python callers)."""


class DataError(IaatError):
    """A data set is missing, malformed or inconsistent."""


class CheckpointError(IaatError):
    """A checkpoint or run folder is missing, damaged or does not match."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of ``error``'s message, at most ``limit`` characters ("" when it has none): what an
    :class:`IaatError` quotes of a lower-level error."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else ""


class OutputError(IaatError):
    """A file of a run or an evaluation could not be written (disk full, read-only folder, no permission)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM; the message says where the state was saved and how to resume.

    A :class:`KeyboardInterrupt`, not an :class:`IaatError`: like Ctrl-C anywhere in Python it passes through
    ``except Exception:``, so a script that trains several runs and carries on past failed ones still stops
    at the first Ctrl-C instead of starting the next run. ``exit_code`` follows the shell convention 128 +
    signal number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
