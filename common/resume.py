"""One resume policy for every trainer: ``--resume auto|never|PATH``, ``--overwrite``, ``--resume-force``.

- ``auto`` (default): a finished stage (its completion marker) is skipped; an interrupted one continues from its
  newest checkpoint; otherwise training starts fresh. Rerunning the same command therefore continues, which is
  what a scheduler's requeue does.
- ``never``: start fresh; refused where earlier checkpoints or a completion marker exist (nothing is ever
  overwritten silently) unless ``--overwrite`` is given, which deletes them and the stage's outputs first.
- ``PATH``: continue from that checkpoint file (it must exist).

``--resume-force`` accepts a checkpoint whose model, data order, precision or world size differ (reported).
The original scripts' spellings are accepted: FRED's bare ``--resume`` (= ``auto``) and ``--resume-from PATH``
(= ``--resume PATH``), see :func:`normalise_resume_flags`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from common.checkpoint import CheckpointError, ResumeRefused, atomic_write_json
from common.state import newest_checkpoint

COMPLETE_MARKER = "DONE.json"


@dataclass(frozen=True)
class RunOptions:
    """Checkpointing, resuming and stopping (the same flags in every trainer)."""

    overwrite: bool = False
    """Start over: delete this run's earlier checkpoints and outputs (with --resume never or auto)."""
    resume_force: bool = False
    """Continue from a checkpoint whose model, data order, precision or world size differ (reported)."""
    checkpoint_every: int = 0
    """Also write a resumable checkpoint every N iterations (micro-batches; optimizer steps without gradient
    accumulation); 0: only where the trainer always does."""
    keep_checkpoints: int = 2
    """Resumable checkpoints kept per stage (the newest ones; 0 keeps all)."""
    prune_finished: bool = False
    """Delete a stage's resumable checkpoints once it has finished (its exported weights stay; it can then not
    be extended with more epochs)."""
    stop_after: int = 0
    """Stop (with a checkpoint) after this many iterations of a stage, as an interrupted run would (0: run to the
    end); rerun the command to continue."""


@dataclass(frozen=True)
class ResumePlan:
    """What a stage does: start fresh, continue from ``path``, or nothing (``complete``, with its record).

    ``remove`` lists earlier files to delete first (``--overwrite``; main process only).
    """

    action: Literal["fresh", "resume", "complete"]
    path: Path | None = None
    record: dict | None = None
    remove: tuple[Path, ...] = field(default_factory=tuple)


def read_complete(directory: str | Path) -> dict | None:
    """The completion record of a stage folder (its ``DONE.json``), or None."""
    path = Path(directory) / COMPLETE_MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def mark_complete(directory: str | Path, record: dict) -> Path:
    """Write a stage folder's completion record (atomically; main process)."""
    return atomic_write_json(Path(directory) / COMPLETE_MARKER, record)


def plan_resume(value: str, checkpoints: Sequence[Path], marker_dir: str | Path, *, overwrite: bool = False,
                outputs: Sequence[Path] = (), epochs: int | None = None, flag: str = "--resume",
                folder_flag: str = "--save-dir") -> ResumePlan:
    """Decide what a stage does under ``--resume value``.

    Args:
        value: ``auto``, ``never`` or a checkpoint path.
        checkpoints: the stage's resumable checkpoint files that exist (any order).
        marker_dir: the folder holding the stage's completion marker.
        overwrite: ``--overwrite``: delete earlier checkpoints, the marker and ``outputs`` and start fresh.
        outputs: the stage's other earlier files (exports, loss dumps) that ``--overwrite`` deletes.
        epochs: the epochs asked for now; a stage finished with fewer (its marker's ``epochs``) continues from its
            newest checkpoint (the caller reports the extension; the plan carries the record).
        flag, folder_flag: the trainer's names of the resume and output-folder flags (for messages).
    """
    marker = Path(marker_dir) / COMPLETE_MARKER
    record = read_complete(marker_dir)
    earlier = [*checkpoints, *([marker] if record is not None else [])]
    if overwrite:
        return ResumePlan("fresh", remove=tuple([*earlier, *outputs]))
    if value == "never":
        if earlier:
            newest = newest_checkpoint(checkpoints) or marker
            raise ResumeRefused(
                f"{Path(marker_dir)} already holds an earlier run (newest: {newest}); continue it with "
                f"{flag} auto, start over with --overwrite (deletes it), or choose another {folder_flag}")
        return ResumePlan("fresh")
    if value == "auto":
        if record is not None and (epochs is None or record.get("epochs", 0) >= epochs):
            return ResumePlan("complete", record=record)
        newest = newest_checkpoint(checkpoints)
        return ResumePlan("resume", newest, record) if newest is not None else ResumePlan("fresh", record=record)
    path = Path(value)
    if not path.is_file():
        raise CheckpointError(f"{flag} {path}: no such checkpoint file; pass an existing checkpoint, or {flag} auto")
    return ResumePlan("resume", path)


def normalise_resume_flags(argv: Sequence[str], flag: str = "--resume", from_flag: str = "--resume-from") -> list[str]:
    """Accept the original spellings: a bare ``--resume`` means ``--resume auto``; ``--resume-from PATH`` means
    ``--resume PATH`` (underscores already normalised to hyphens)."""
    result: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg == flag and (index >= len(argv) or argv[index].startswith("--")):
            result += [flag, "auto"]
        elif arg == from_flag:
            result.append(flag)
        elif arg.startswith(from_flag + "="):
            result.append(flag + "=" + arg.split("=", 1)[1])
        else:
            result.append(arg)
    return result
