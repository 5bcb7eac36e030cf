"""Command lines from frozen dataclasses (tyro), accepting the original scripts' other spelling of flags.

Trainers with hyphenated flags (``--save-dir``) accept the notes' underscores (``--quick_test``), and trainers
whose public flags use underscores (MaeFuse's ``--data_path``) accept hyphens.
"""

from __future__ import annotations

import sys
from typing import Sequence, TypeVar

T = TypeVar("T")


def normalise_flags(argv: Sequence[str], use_underscores: bool = False) -> list[str]:
    """Long option names rewritten to the parser's spelling (``--quick_test`` -> ``--quick-test``, or the
    reverse with ``use_underscores``); values are left alone."""
    old, new = ("-", "_") if use_underscores else ("_", "-")
    result = []
    for arg in argv:
        if arg.startswith("--") and not arg.startswith("---"):
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace(old, new) + sep + value
        result.append(arg)
    return result


def parse(config_type: type[T], argv: Sequence[str] | None = None, description: str | None = None,
          default: T | None = None, use_underscores: bool = False) -> T:
    """Parse ``argv`` (default ``sys.argv[1:]``) into ``config_type`` with tyro, either spelling accepted."""
    import tyro

    args = normalise_flags(sys.argv[1:] if argv is None else argv, use_underscores)
    return tyro.cli(config_type, args=args, description=description, default=default, use_underscores=use_underscores)
