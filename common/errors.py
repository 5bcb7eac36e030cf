"""User-facing errors: each becomes one ``error:`` line and exit code 2 (:func:`common.run.exit_on_user_error`).

Every trainer's own input errors subclass :class:`UserError`, so the kit turns them into the same one-line
message without a traceback, wherever they are raised (including inside a data-loader worker).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: the message names the file or flag and says what to do."""


class DataError(UserError):
    """Bad input data: a missing or empty folder, unpaired files, an unreadable image, mismatched sizes."""


class ConfigError(UserError):
    """Settings that cannot work together; the message names the flags to change."""
