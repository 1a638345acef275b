"""Errors a user can cause.

Every such error is a :class:`DitqError` whose message says what was wrong and
what to do about it, in one line. The CLI prints that line and exits with
status 2; anything else escaping is a bug.
"""

EXIT_USAGE = 2
"""Exit status of a user error: a bad argument or file, or a run folder another process holds."""

EXIT_OUTPUT = 74
"""Exit status when an output cannot be written: disk full, read-only or unwritable folder (EX_IOERR)."""

EXIT_STOPPED = 75
"""Exit status of a run stopped by SIGTERM, SIGINT or SIGUSR1 after saving its state (EX_TEMPFAIL:
run the same command again, or the printed resume command, to continue)."""


class DitqError(Exception):
    """Base class of all user-facing ditq errors; ``exit_status`` is what the CLI exits with."""

    exit_status = EXIT_USAGE


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


class OutputError(DitqError):
    """An output that cannot be written (disk full, read-only or unwritable folder); the last good file
    is kept and no partial one is left."""

    exit_status = EXIT_OUTPUT


class RunLockedError(DitqError):
    """A run folder, shard folder or search state that another live process is using."""


class StoppedBySignal(DitqError):
    """A long run that stopped cleanly on SIGTERM, SIGINT or SIGUSR1 after saving what it had done; the
    message says where it stopped and how to resume."""

    exit_status = EXIT_STOPPED
