"""Resumable checkpoints: atomic writes, safe loads, retention, discovery and resume checks.

A checkpoint is one ``.pth`` file holding a dict of tensors and plain Python values (never pickled objects),
so every load can use ``torch.load(weights_only=True)``. Each trainer chooses the layout of its dict (its spec
names the keys); the kit adds a ``meta`` sub-dict that the resume checks read.

File names follow ``<stage>_<epoch|step>_<N>[_weights].pth`` (for example ``freeze_epoch_10_weights.pth`` or
``end-to-end_step_000500.pth``). Discovery parses N from the name and compares the stage exactly, so the
newest checkpoint is found by number, never by modification time, and ``freeze`` never matches ``unfreeze``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Mapping

import numpy as np
import torch

from common.ckpt_names import checkpoint_name, find_latest, list_checkpoints, parse_checkpoint_name
from common.errors import UserError

__all__ = ["checkpoint_name", "find_latest", "list_checkpoints", "parse_checkpoint_name"]

TEMP_SUFFIX = ".tmp"
# mkstemp names: ".<final name>." + 8 random characters + ".tmp"; only such files are ever cleaned up.
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# Errors of the output location rather than of the program: one message saying what to do, exit code 2.
OUTPUT_ERRNOS = {errno.ENOSPC: "the disk is full: free space or choose another output folder",
                 errno.EDQUOT: "the disk quota is exceeded: free space or choose another output folder",
                 errno.EROFS: "the file system is read-only: choose a writable output folder",
                 errno.EACCES: "permission denied: choose an output folder you can write to",
                 errno.EPERM: "permission denied: choose an output folder you can write to"}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# What open() and mkdir() would give: mkstemp/mkdtemp alone make files 0o600 and folders 0o700 (private).
FILE_MODE = 0o666 & ~_umask()
DIRECTORY_MODE = 0o777 & ~_umask()


class CheckpointError(UserError):
    """A checkpoint or weight file cannot be read: missing, truncated, corrupt or holding pickled objects."""


class ResumeRefused(UserError):
    """A checkpoint does not belong to this run (other script, stage, trainable set, precision or world size)."""


class OutputError(UserError):
    """An output file cannot be written (full disk, read-only or foreign folder); nothing was damaged."""


def output_error(path: Path, error: OSError) -> OutputError | OSError:
    """The user-facing error for an ``OSError`` raised while writing ``path`` (other errors are returned as is)."""
    advice = OUTPUT_ERRNOS.get(error.errno)
    if advice is None:
        return error
    return OutputError(f"cannot write {path}: {advice} (earlier files are intact)")


def _check_plain(value: Any, where: str) -> None:
    """Refuse values that ``torch.load(weights_only=True)`` could not read back."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device)):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is not a str or int")
            _check_plain(item, f"{where}.{key}")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; checkpoints hold only tensors and plain values")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_dirs(path: str | Path) -> Path:
    """``mkdir -p``; a full disk or a read-only/foreign location becomes one :class:`OutputError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise output_error(path, error) from error
    return path


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(handle)`` into a temporary file in the same folder, then ``os.replace``.

    A crash at any point leaves either the old file or the new one under ``path``, never a partial file (a
    kill -9 can leave the temporary file, which :func:`remove_orphan_temps` deletes at the next start). The file
    gets the usual permissions (readable by others unless the umask says otherwise). A full disk or an
    unwritable folder raises :class:`OutputError` naming the file.
    """
    path = Path(path)
    make_dirs(path.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as error:
        raise output_error(path, error) from error
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(error, OSError):
            raise output_error(path, error) from error
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Atomically write ``data`` to ``path`` (see :func:`atomic_write`)."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write a UTF-8 text file (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def remove_orphan_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed atomic writes left under ``folder`` (recursively).

    Call it before anything writes into ``folder`` (a run's start, on the main process): a temporary file is
    then never a write in progress.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.rglob(f".*{TEMP_SUFFIX}"):
        if TEMP_NAME.match(path.name) and path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Atomically save ``state`` (tensors and plain values only) with ``torch.save``, streamed to the file."""
    _check_plain(state, "checkpoint")
    return atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False,
                    safe_globals: Iterable[Any] = (), what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` with one clear :class:`CheckpointError` for every failure.

    Every ``torch.load`` of the project goes through here. ``mmap=True`` reads plain fields without loading the
    tensors' bytes (peeking at a large file); ``safe_globals`` allow-lists extra types (MAE files carry an
    ``argparse.Namespace``); ``what`` names the kind of file in messages.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; a cut-off write loses the central directory
        raise CheckpointError(f"{what} {path} is truncated or corrupt (not a complete PyTorch archive); use an "
                              "earlier file or delete this one")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as error:
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise CheckpointError(_pickled_message(path, what)) from None
        first = (str(error).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(
            f"{what} {path} is truncated or corrupt ({type(error).__name__}: {first}); use an earlier file or "
            "delete this one") from None
    except Exception as error:  # the weights_only unpickler raises UnpicklingError for pickled objects
        if "weights_only" in str(error) or "Unsupported global" in str(error) or "pickle" in type(error).__name__.lower():
            raise CheckpointError(_pickled_message(path, what)) from None
        first = (str(error).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{what} {path} cannot be read ({type(error).__name__}: {first})") from None


def _pickled_message(path: Path, what: str) -> str:
    return (f"{what} {path} holds pickled Python objects, which are refused for safety (only tensors and plain "
            "values are loaded): it was not written by this project; re-save it as a plain state dict")


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove any number of leading ``module.`` (DDP/DataParallel) and ``_orig_mod.`` (torch.compile) prefixes."""
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks (weights, data lists, recorded in run files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trainable_fingerprint(names: Iterable[str]) -> str:
    """SHA-256 of the sorted trainable parameter names (recorded in checkpoints, checked on resume)."""
    digest = hashlib.sha256("\n".join(sorted(names)).encode("utf-8"))
    return digest.hexdigest()


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must agree on to be resumed by the current process."""

    script: str
    stage: str
    trainable: str
    mixed_precision: str
    world_size: int

    def as_meta(self) -> dict:
        """Plain-dict form stored under ``state['meta']``."""
        return {
            "script": self.script,
            "stage": self.stage,
            "trainable": self.trainable,
            "mixed_precision": self.mixed_precision,
            "world_size": self.world_size,
        }


RESUME_FIELDS = ("script", "stage", "trainable", "mixed_precision", "world_size")


def check_resume(path: str | Path, meta: dict, current: RunIdentity, allow: Iterable[str] = ()) -> None:
    """Refuse to resume ``meta`` (a checkpoint's ``meta``) into ``current`` unless each difference is allowed.

    ``allow`` names fields whose difference is accepted (``world_size`` for an elastic restart, say).
    """
    allowed = set(allow)
    unknown = allowed - set(RESUME_FIELDS)
    if unknown:
        raise ValueError(f"unknown resume checks {sorted(unknown)}; choose from {RESUME_FIELDS}")
    problems = []
    for field in RESUME_FIELDS:
        theirs = meta.get(field)
        ours = getattr(current, field)
        if theirs != ours and field not in allowed:
            shown = (str(theirs)[:12], str(ours)[:12]) if field == "trainable" else (theirs, ours)
            problems.append(f"{field}: checkpoint {shown[0]!r}, this run {shown[1]!r}")
    if problems:
        raise ResumeRefused(
            f"refusing to resume from {path}: " + "; ".join(problems)
            + ". Start a new run directory, pick the matching checkpoint, or allow the difference explicitly."
        )


def capture_rng() -> dict:
    """This process's RNG states (Python, NumPy, torch CPU and CUDA) as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "python": [list(item) if isinstance(item, tuple) else item for item in random.getstate()],
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Restore the states captured by :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng(accelerator) -> list[dict]:
    """RNG states of every rank, in rank order (collective: call on all processes)."""
    from accelerate.utils import gather_object

    local = capture_rng()
    if accelerator.num_processes == 1:
        return [local]
    return list(gather_object([local]))


def restore_rank_rng(accelerator, states: list[dict]) -> None:
    """Restore this rank's entry of :func:`gather_rng`'s list."""
    restore_rng(states[accelerator.process_index])


class CheckpointManager:
    """Names, writes and prunes one stage's checkpoints in one folder.

    Keeps the newest ``keep_last`` checkpoints plus the one marked best; the newest complete checkpoint is never
    deleted. The best pointer lives in ``best.json`` beside the files.
    """

    def __init__(self, directory: str | Path, stage: str, unit: str = "step", keep_last: int = 2,
                 suffix: str = "", width: int = 0):
        if keep_last < 1 and keep_last != 0:
            raise ValueError("keep_last must be >= 1, or 0 to keep every checkpoint")
        self.directory = Path(directory)
        self.stage = stage
        self.unit = unit
        self.keep_last = keep_last
        self.suffix = suffix
        self.width = width

    def path_for(self, n: int) -> Path:
        """Path of this stage's checkpoint number ``n``."""
        return self.directory / checkpoint_name(self.stage, n, self.unit, self.suffix, self.width)

    @property
    def best_number(self) -> int | None:
        """Number of the checkpoint marked best, if any."""
        pointer = self.directory / f"{self.stage}_best.json"
        if not pointer.is_file():
            return None
        return int(json.loads(pointer.read_text())["n"])

    def save(self, state: dict, n: int, best: bool = False) -> Path:
        """Write checkpoint ``n`` atomically, mark it best if asked, then prune older ones."""
        path = save_checkpoint(self.path_for(n), state)
        if best:
            atomic_write_json(self.directory / f"{self.stage}_best.json", {"n": n, "file": path.name})
        self.prune()
        return path

    def prune(self) -> list[Path]:
        """Delete all but the newest ``keep_last`` and the best checkpoint; returns what was deleted."""
        if self.keep_last == 0:
            return []
        found = list_checkpoints(self.directory, self.stage, recursive=False)
        keep = {p for _, p in found[-self.keep_last:]}
        best = self.best_number
        deleted = []
        for n, path in found:
            if path in keep or n == best:
                continue
            path.unlink(missing_ok=True)
            deleted.append(path)
        return deleted

    def paths(self) -> list[Path]:
        """This stage's checkpoints in this folder, oldest first."""
        return [path for _, path in list_checkpoints(self.directory, self.stage, recursive=False)]

    def latest(self) -> Path | None:
        """Newest checkpoint of this stage in this folder."""
        return find_latest(self.directory, self.stage, recursive=False)
