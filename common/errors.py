"""Exception raised for bad input data, so that command lines can turn it into one message and exit code 2."""

from __future__ import annotations


class DataError(Exception):
    """Bad input data: a missing or empty folder, unpaired files, an unreadable image, mismatched sizes.

    The message names the offending files and says what to do; command lines print it and exit with code 2.
    """
