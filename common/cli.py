"""Command lines from frozen dataclasses (tyro), accepting the original scripts' underscore spellings."""

from __future__ import annotations

import sys
from typing import Sequence, TypeVar

T = TypeVar("T")


def normalise_flags(argv: Sequence[str]) -> list[str]:
    """``--quick_test`` -> ``--quick-test`` in long option names (values are left alone)."""
    result = []
    for arg in argv:
        if arg.startswith("--") and not arg.startswith("---"):
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("_", "-") + sep + value
        result.append(arg)
    return result


def parse(config_type: type[T], argv: Sequence[str] | None = None, description: str | None = None,
          default: T | None = None) -> T:
    """Parse ``argv`` (default ``sys.argv[1:]``) into ``config_type`` with tyro; underscores in flags accepted."""
    import tyro

    args = normalise_flags(sys.argv[1:] if argv is None else argv)
    return tyro.cli(config_type, args=args, description=description, default=default)
