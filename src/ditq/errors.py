"""Errors a user can cause.

Every such error is a :class:`DitqError` whose message says what was wrong and
what to do about it, in one line. The CLI prints that line and exits with
status 2; anything else escaping is a bug.
"""


class DitqError(Exception):
    """Base class of all user-facing ditq errors."""


class UnknownModelError(DitqError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(DitqError):
    """A checkpoint file that is missing, truncated, or does not fit the model."""


class DownloadError(DitqError):
    """Official weights that could not be fetched (offline, bad hash, ...)."""


class InvalidArgumentError(DitqError, ValueError):
    """A value out of range: a class label, a sample count, a step count, ..."""


class MissingDependencyError(DitqError, ImportError):
    """An optional dependency (an extra) that is not installed."""
