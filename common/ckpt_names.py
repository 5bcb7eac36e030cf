"""Checkpoint file names and discovery, without importing torch (``resume_training.py`` must start fast).

Names follow ``<stage>_<epoch|step>_<N>[_weights].pth``. Discovery parses N and compares the stage exactly, so
the newest checkpoint is chosen by number (never by modification time) and ``freeze`` never matches
``unfreeze``. Files are written under these names only by an atomic rename, so a name means a complete file.
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_NAME = re.compile(r"^(?P<stage>[A-Za-z0-9][A-Za-z0-9-]*?)_(?P<unit>epoch|step)_(?P<n>\d+)(?:_weights)?\.pth$")


def checkpoint_name(stage: str, n: int, unit: str = "step", suffix: str = "", width: int = 0) -> str:
    """File name of a checkpoint of ``stage`` at epoch or step ``n`` (e.g. ``freeze_epoch_10_weights.pth``)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", stage):
        raise ValueError(f"stage name {stage!r} must be letters, digits and '-' (no '_')")
    return f"{stage}_{unit}_{n:0{width}d}{suffix}.pth"


def parse_checkpoint_name(name: str) -> tuple[str, int] | None:
    """``(stage, N)`` parsed from a checkpoint file name, or None if the name is not a kit checkpoint."""
    match = CHECKPOINT_NAME.match(name)
    if match is None:
        return None
    return match["stage"], int(match["n"])


def list_checkpoints(run_dir: str | Path, stage: str | None = None, recursive: bool = True) -> list[tuple[int, Path]]:
    """All checkpoints under ``run_dir`` of ``stage`` (any if None), sorted by number.

    ``recursive=False`` looks only at files directly in ``run_dir`` (FRED keeps a ``quick_test/`` sub-run with
    the same file names beside its real checkpoints).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in (run_dir.rglob("*.pth") if recursive else run_dir.glob("*.pth")):
        parsed = parse_checkpoint_name(path.name)
        if parsed is None or (stage is not None and parsed[0] != stage):
            continue
        found.append((parsed[1], path))
    found.sort(key=lambda item: (item[0], str(item[1])))
    return found


def find_latest(run_dir: str | Path, stage: str | None = None, recursive: bool = True) -> Path | None:
    """The checkpoint with the highest parsed number under ``run_dir`` for ``stage`` (any stage if None)."""
    found = list_checkpoints(run_dir, stage, recursive)
    return found[-1][1] if found else None
