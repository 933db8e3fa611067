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
