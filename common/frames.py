"""Frame folders: natural sort and listing (video sequences, FRED's RGB/event frames, colorization clips)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from common.errors import DataError


def natural_key(name: str) -> tuple:
    """Sort key comparing digit runs as numbers (``frame_9`` < ``frame_10``)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


def list_frames(folder: str | Path, suffixes: Sequence[str]) -> list[Path]:
    """Files of ``folder`` whose lower-case suffix is one of ``suffixes``, in natural order.

    A missing folder or one without such files raises :class:`DataError` naming the folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"frame folder {folder} does not exist")
    wanted = {suffix.lower() for suffix in suffixes}
    files = [path for path in folder.iterdir() if path.suffix.lower() in wanted and path.is_file()]
    if not files:
        raise DataError(f"frame folder {folder} holds no frames ({', '.join(sorted(wanted))})")
    return sorted(files, key=lambda path: natural_key(path.name))
