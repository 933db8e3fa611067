"""Exceptions for problems the user can fix.

The CLI prints a :class:`UserError` as one message and exits non-zero without a
traceback; anything else is a bug and keeps its traceback.
"""


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

    Not an error: the CLI exits with :data:`radiodiff_resume.cli.EXIT_STOPPED` and the
    same command resumes from that checkpoint. ``reason`` is what asked first (a signal's name).
    """

    def __init__(self, message: str, reason: str = "requested") -> None:
        super().__init__(message)
        self.reason = reason
