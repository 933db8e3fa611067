"""Exceptions for problems the user can fix, and the exit statuses they become.

The CLI prints a :class:`UserError` as one message and exits non-zero without a
traceback; anything else is a bug and keeps its traceback.
"""

EXIT_USER_ERROR = 2
EXIT_STOPPED = 3
"""Stopped on request after committing a checkpoint; run the same command to resume."""
EXIT_HALTED = 4
"""Halted to protect the run's state (guards exhausted, a save refused or failed): resuming as is
would meet the same problem, so a scheduler must not requeue it blindly."""


class UserError(Exception):
    """A problem in the user's config, files or environment, with what to do about it."""


class ConfigError(UserError):
    """The configuration is invalid; the message lists every problem found."""


class DataError(UserError):
    """The dataset folder is missing, incomplete or unreadable."""


class HaltError(UserError):
    """The run stopped to protect its state (e.g. refusing to save non-finite weights)."""


class StopRequested(Exception):
    """A stop was requested (signal, operator); a checkpoint was committed first.

    Not an error: the CLI exits with :data:`EXIT_STOPPED` and the
    same command resumes from that checkpoint. ``reason`` is what asked first (a signal's name).
    """

    def __init__(self, message: str, reason: str = "requested") -> None:
        super().__init__(message)
        self.reason = reason
