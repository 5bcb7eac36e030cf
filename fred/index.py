"""FRED sequences → time-paired RGB/Event index: the COCO-style fusion annotation files (spec/fred.md §5.1-5.5).

Layout (§5.1): a sequence is a folder holding ``coordinates.txt``, directly under ``fred_root`` or under
``fred_root/{train,test}/``. Frames come from ``PADDED_RGB/`` (the padded RGB that shares the event camera's
pixel frame) and ``Event/Frames/`` (3-channel PNGs whose last integer in the name is the time in µs).

Pairing (§5.2): RGB frame i (natural sort) is at t = round((i+1)·0.033333, 6) s, an event frame at
t_us·1e-6 + ``event_time_offset``. RGB and event frames that are each other's nearest neighbour in time and at most
``pair_max_dt`` apart form one ``dual`` entry; every other frame is an ``rgb_only`` or ``event_only`` entry, so no
frame is used twice. Boxes come from the annotation time nearest the entry's reference time (RGB time, else event
time) within 1/60 s; entries outside the annotated time range are ``annotated: false``.

The entries are written as ``instances_{train,val,test}.json`` (field names of the fork's converter) with a source
signature, reused while it matches and rebuilt when the sequences, frame counts or a ``coordinates.txt`` change.
``fusion_threshold`` never changes the files: at load, a ``dual`` entry is an effective pair iff its ``time_diff``
is at most the threshold, otherwise it counts as rgb_only + event_only.
"""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
from PIL import Image

from common.checkpoint import atomic_write_text
from common.errors import DataError
from common.frames import list_frames, natural_key

FORMAT_VERSION = 1
DEFAULT_ANNOTATION_DIR = Path("datasets/fred_fusion/annotations")
SPLITS: tuple[str, ...] = ("train", "val", "test")
RGB_FRAME_PERIOD = 0.033333  # the official FRED index rule: t_rgb(i) = round((i+1)·0.033333, 6)
BOX_TIME_TOLERANCE = 1.0 / 60.0
RGB_DIR = Path("PADDED_RGB")
EVENT_DIR = Path("Event") / "Frames"
RGB_SUFFIXES = (".jpg", ".jpeg", ".png")
EVENT_SUFFIXES = (".png", ".jpg", ".jpeg")
COORDINATES = "coordinates.txt"
CLASS_NAMES: tuple[str, ...] = ("drone",)
FUSION_STATS_COLUMNS: tuple[str, ...] = ("epoch", "split", "total", "dual", "rgb_only", "event_only", "dual_rate",
                                         "avg_time_diff_ms", "max_time_diff_ms", "threshold_s", "used")


class FredDataError(DataError):
    """Bad FRED input (missing root, sequence, frame or file); the message names the path and what to do."""


class FredDataWarning(UserWarning):
    """Recoverable FRED input problems: malformed annotation lines, frames of different sizes."""


@dataclass(frozen=True)
class IndexParams:
    """Parameters that shape the fusion annotation files (all recorded in their ``info``; a change rebuilds)."""

    pair_max_dt: float = 0.5
    event_time_offset: float = 0.0
    rgb_time: Literal["index", "filename"] = "index"
    split: Literal["canonical", "challenging"] = "canonical"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0


@dataclass(frozen=True)
class SequenceInfo:
    """One sequence folder: its id (folder name), path and the ``train``/``test`` folder it sits in, if any."""

    sequence_id: str
    path: Path
    group: str | None


@dataclass(frozen=True)
class CoordinateBox:
    """One parsed ``coordinates.txt`` line: time (s), absolute xyxy pixels, track id and drone model."""

    time: float
    box: tuple[float, float, float, float]
    track_id: int
    drone_model: str


@dataclass
class FrameEntry:
    """One index entry (an ``images`` record of the fusion annotation file) with its boxes.

    ``status`` is the stored pairing status; ``paired`` is the effective one after ``fusion_threshold``.
    ``boxes`` are clipped xyxy pixels in the ``width`` × ``height`` frame, class 0 (``drone``) for every model.
    """

    image_id: int
    sequence_id: str
    frame_index: int
    rgb_path: Path | None
    event_path: Path | None
    rgb_timestamp: float | None
    event_timestamp: float | None
    time_diff: float | None
    status: str
    annotated: bool
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    track_ids: tuple[int, ...] = ()
    drone_models: tuple[str, ...] = ()
    paired: bool = False

    @property
    def has_rgb(self) -> bool:
        """Whether the entry has an RGB frame."""
        return self.rgb_path is not None

    @property
    def has_event(self) -> bool:
        """Whether the entry has an event frame."""
        return self.event_path is not None


@dataclass
class FredIndex:
    """The loaded splits: ``splits[name]`` lists the entries of ``train``, ``val`` and ``test`` (all entries,
    annotated or not), with ``paired`` set from ``threshold``."""

    fred_root: Path
    annotation_dir: Path
    threshold: float
    splits: dict[str, list[FrameEntry]]

    def stats(self, split: str, used: int | None = None) -> "FusionStats":
        """Fusion statistics of one split (§5.4)."""
        return fusion_stats(self.splits[split], self.threshold, used)


# ----------------------------------------------------------------------------------------------- discovery

def _looks_like_sequence(path: Path) -> bool:
    return (path / RGB_DIR).is_dir() or (path / "Event").is_dir() or (path / "RGB").is_dir()


def discover_sequences(fred_root: str | Path) -> list[SequenceInfo]:
    """Sequence folders (holding ``coordinates.txt``) under ``fred_root`` or ``fred_root/{train,test}/``.

    Raises :class:`FredDataError` for a missing root, a folder with frames but no ``coordinates.txt``, duplicate
    sequence ids, or a root without any sequence.
    """
    root = Path(fred_root)
    if not root.is_dir():
        raise FredDataError(f"FRED root {root} does not exist or is not a folder; pass --fred-root pointing at the "
                            "folder holding the sequence folders (or its train/ and test/ folders)")
    found: dict[str, SequenceInfo] = {}
    for group, parent in ((None, root), ("train", root / "train"), ("test", root / "test")):
        if not parent.is_dir():
            continue
        for child in sorted(parent.iterdir(), key=lambda p: natural_key(p.name)):
            if not child.is_dir() or (group is None and child.name in ("train", "test", "dataset_splits")):
                continue
            if not (child / COORDINATES).is_file():
                if _looks_like_sequence(child):
                    raise FredDataError(
                        f"sequence folder {child} has no {COORDINATES}; every sequence needs one, with lines "
                        "'time: x1, y1, x2, y2, id, class' (e.g. '1.33332: 490.0, 413.0, 539.0, 448.0, 1, DJI Mini 2')"
                        "; add it or move the folder out of the FRED root")
                continue
            if child.name in found:
                raise FredDataError(f"sequence id {child.name!r} occurs twice: {found[child.name].path} and {child}; "
                                    "sequence folder names must be unique")
            found[child.name] = SequenceInfo(child.name, child, group)
    if not found:
        raise FredDataError(f"no sequence folders (folders holding {COORDINATES}) under {root} or {root}/train, "
                            f"{root}/test; check --fred-root")
    return sorted(found.values(), key=lambda s: natural_key(s.sequence_id))


def _frame_files(folder: Path, suffixes: Sequence[str], sequence: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise FredDataError(f"sequence {sequence} has no {what} folder {folder}; a FRED sequence needs "
                            f"{RGB_DIR}/ (RGB .jpg frames) and {EVENT_DIR}/ (event .png frames)")
    return list_frames(folder, suffixes)


def rgb_frames(sequence: Path) -> list[Path]:
    """Natural-sorted RGB frames of a sequence (``PADDED_RGB/``)."""
    return _frame_files(sequence / RGB_DIR, RGB_SUFFIXES, sequence, "RGB")


def event_time_us(path: Path) -> int:
    """The event frame time in µs: the last integer in the file name."""
    numbers = re.findall(r"\d+", path.stem)
    if not numbers:
        raise FredDataError(f"event frame {path} has no time in its name; expected Video_<seq>_[frame_]<t_us>.png")
    return int(numbers[-1])


def event_frames(sequence: Path) -> list[tuple[int, Path]]:
    """Event frames of a sequence as (t_us, path), sorted by time."""
    files = _frame_files(sequence / EVENT_DIR, EVENT_SUFFIXES, sequence, "event")
    return sorted(((event_time_us(p), p) for p in files), key=lambda item: (item[0], natural_key(item[1].name)))


def rgb_time_index(i: int) -> float:
    """The official FRED RGB time of frame i (seconds)."""
    return round((i + 1) * RGB_FRAME_PERIOD, 6)


_CLOCK = re.compile(r"(\d{1,2})_(\d{1,2})_(\d{1,2}(?:\.\d+)?)$")


def rgb_times(files: Sequence[Path], rule: Literal["index", "filename"] = "index") -> np.ndarray:
    """RGB frame times: the index rule (default), or with ``filename`` the clock in the name relative to the
    first frame, shifted so that frame 0 keeps the index rule's time (opt-in quirk, §8)."""
    if rule == "index":
        return np.array([rgb_time_index(i) for i in range(len(files))], dtype=np.float64)
    clocks = []
    for path in files:
        match = _CLOCK.search(path.stem)
        if match is None:
            raise FredDataError(f"RGB frame {path} has no clock HH_MM_SS.ffffff in its name; use rgb_time=index")
        hours, minutes, seconds = match.groups()
        clocks.append(int(hours) * 3600 + int(minutes) * 60 + float(seconds))
    clocks = np.asarray(clocks)
    return np.round(clocks - clocks[0] + rgb_time_index(0), 6)


# ------------------------------------------------------------------------------------------------ parsing

def parse_coordinates(path: str | Path) -> tuple[list[CoordinateBox], list[int]]:
    """Parse ``coordinates.txt``: ``time: x1, y1, x2, y2, id, class`` per line.

    Each line is split at the first ``:`` and then at the first 5 commas (the class name may hold commas).
    Returns the boxes and the 1-based numbers of malformed lines (blank lines are skipped, not counted).
    """
    boxes: list[CoordinateBox] = []
    bad: list[int] = []
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line:
                continue
            time_text, sep, rest = line.partition(":")
            parts = rest.split(",", 5)
            if not sep or len(parts) != 6:
                bad.append(number)
                continue
            try:
                time = float(time_text)
                x1, y1, x2, y2 = (float(v) for v in parts[:4])
                track_id = int(float(parts[4]))
            except ValueError:
                bad.append(number)
                continue
            if not all(math.isfinite(v) for v in (time, x1, y1, x2, y2)):
                bad.append(number)
                continue
            boxes.append(CoordinateBox(time, (x1, y1, x2, y2), track_id, parts[5].strip()))
    return boxes, bad


# ------------------------------------------------------------------------------------------------ pairing

def nearest_indices(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """For each time in sorted ``source``, the index of the nearest time in sorted ``target`` (two pointers).

    Ties go to the earlier target (the lower index). ``target`` must not be empty.
    """
    result = np.empty(len(source), dtype=np.int64)
    floor = 0  # last target index with target[floor] <= t (0 if none); non-decreasing because source is sorted
    for i, t in enumerate(source):
        while floor + 1 < len(target) and target[floor + 1] <= t:
            floor += 1
        best = floor
        if target[floor] <= t and floor + 1 < len(target) and target[floor + 1] - t < t - target[floor]:
            best = floor + 1
        while best > 0 and target[best - 1] == target[best]:
            best -= 1
        result[i] = best
    return result


def mutual_pairs(rgb_t: np.ndarray, event_t: np.ndarray, pair_max_dt: float) -> list[tuple[int, int]]:
    """(rgb index, event index) of mutual nearest neighbours in time at most ``pair_max_dt`` apart."""
    if len(rgb_t) == 0 or len(event_t) == 0:
        return []
    nearest_event = nearest_indices(rgb_t, event_t)
    nearest_rgb = nearest_indices(event_t, rgb_t)
    return [(i, int(j)) for i, j in enumerate(nearest_event)
            if nearest_rgb[j] == i and abs(event_t[j] - rgb_t[i]) <= pair_max_dt]


def time_difference(rgb_t: float, event_t: float) -> float:
    """|Δt| in seconds, rounded to 1 ns so threshold comparisons are exact for µs/6-decimal times."""
    return round(abs(float(event_t) - float(rgb_t)), 9)


def _clip_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float] | None:
    x1, y1 = min(max(box[0], 0.0), width), min(max(box[1], 0.0), height)
    x2, y2 = min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)
    if x2 - x1 < 1.0 or y2 - y1 < 1.0:
        return None
    return x1, y1, x2, y2


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError) as error:
        raise FredDataError(f"cannot read frame {path}: {error}; replace or remove the file") from error


def index_sequence(sequence: SequenceInfo, params: IndexParams, fred_root: Path,
                   first_image_id: int) -> tuple[list[dict], list[dict], dict]:
    """Pair and annotate one sequence. Returns COCO ``images`` and ``annotations`` records and a report
    (frame counts, status counts, malformed lines)."""
    rgb_files = rgb_frames(sequence.path)
    events = event_frames(sequence.path)
    rgb_t = rgb_times(rgb_files, params.rgb_time)
    event_t = np.array([t_us * 1e-6 + params.event_time_offset for t_us, _ in events], dtype=np.float64)
    width, height = _image_size(rgb_files[0])
    event_size = _image_size(events[0][1])
    for path in [*rgb_files[1:], *(path for _, path in events[1:])]:
        _image_size(path)  # every header, once per build: a broken frame stops the run before it trains
    if event_size != (width, height):
        warnings.warn(f"sequence {sequence.path}: event frames are {event_size[0]}x{event_size[1]} but RGB frames "
                      f"are {width}x{height}; event frames are resized to the RGB size", FredDataWarning, stacklevel=2)

    coordinates_path = sequence.path / COORDINATES
    coordinates, bad_lines = parse_coordinates(coordinates_path) if coordinates_path.is_file() else ([], [])
    if bad_lines:
        shown = ", ".join(str(n) for n in bad_lines[:5]) + (", ..." if len(bad_lines) > 5 else "")
        warnings.warn(f"{coordinates_path}: {len(bad_lines)} malformed line(s) skipped (line {shown}); expected "
                      "'time: x1, y1, x2, y2, id, class'", FredDataWarning, stacklevel=2)
    annotation_times = np.array(sorted({c.time for c in coordinates}), dtype=np.float64)
    boxes_at: dict[float, list[CoordinateBox]] = {}
    for c in coordinates:
        boxes_at.setdefault(c.time, []).append(c)

    pairs = mutual_pairs(rgb_t, event_t, params.pair_max_dt)
    paired_rgb = {i: j for i, j in pairs}
    paired_events = {j for _, j in pairs}
    rows = []  # (reference time, rgb index or None, event index or None)
    for i in range(len(rgb_files)):
        rows.append((rgb_t[i], i, paired_rgb.get(i)))
    rows += [(event_t[j], None, j) for j in range(len(events)) if j not in paired_events]
    rows.sort(key=lambda row: (row[0], row[1] is None))

    images, annotations = [], []
    counts = {"dual": 0, "rgb_only": 0, "event_only": 0, "annotated": 0}
    for offset, (ref_t, i, j) in enumerate(rows):
        image_id = first_image_id + offset
        status = "dual" if i is not None and j is not None else ("rgb_only" if i is not None else "event_only")
        counts[status] += 1
        annotated = bool(len(annotation_times)) and bool(
            annotation_times[0] - BOX_TIME_TOLERANCE <= ref_t <= annotation_times[-1] + BOX_TIME_TOLERANCE)
        counts["annotated"] += int(annotated)
        rgb_name = rgb_files[i].relative_to(fred_root).as_posix() if i is not None else None
        event_name = events[j][1].relative_to(fred_root).as_posix() if j is not None else None
        images.append({
            "id": image_id,
            "file_name": rgb_name if rgb_name is not None else event_name,
            "rgb_file_name": rgb_name,
            "event_file_name": event_name,
            "width": width,
            "height": height,
            "sequence_id": sequence.sequence_id,
            "frame_index": i if i is not None else j,
            "rgb_timestamp": float(rgb_t[i]) if i is not None else None,
            "event_timestamp": float(event_t[j]) if j is not None else None,
            "time_diff": time_difference(rgb_t[i], event_t[j]) if status == "dual" else None,
            "status": status,
            "annotated": annotated,
        })
        if not annotated:
            continue
        k = int(np.searchsorted(annotation_times, ref_t))
        candidates = [c for c in (k - 1, k) if 0 <= c < len(annotation_times)]
        nearest = min(candidates, key=lambda c: (abs(annotation_times[c] - ref_t), c))
        if abs(annotation_times[nearest] - ref_t) > BOX_TIME_TOLERANCE:
            continue
        for c in boxes_at[float(annotation_times[nearest])]:
            clipped = _clip_box(c.box, width, height)
            if clipped is None:
                continue
            x1, y1, x2, y2 = clipped
            annotations.append({
                "image_id": image_id,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1),
                "category_id": 1,
                "iscrowd": 0,
                "track_id": c.track_id,
                "drone_model": c.drone_model,
            })
    report = {"rgb_frames": len(rgb_files), "event_frames": len(events), "bad_lines": len(bad_lines), **counts}
    return images, annotations, report


# ------------------------------------------------------------------------------------------------- splits

def read_split_file(path: Path) -> list[str]:
    """Sequence ids of a split file: one per line, ``#`` comments and blank lines ignored, a path's last
    component taken as the id."""
    ids = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            ids.append(Path(line.replace("\\", "/").rstrip("/")).name)
    return ids


def split_files(fred_root: Path, split: str) -> tuple[Path, Path]:
    """The (train, test) split files of ``canonical`` or ``challenging`` (§5.3)."""
    base = fred_root / "dataset_splits"
    if split == "challenging":
        return base / "challenging" / "challenging_train_split.txt", base / "challenging" / "challenging_test_split.txt"
    return base / "canonical" / "train_split.txt", base / "canonical" / "test_split.txt"


def _carve_count(n: int, fraction: float, minimum_from: int) -> int:
    count = int(round(n * fraction))
    if n >= minimum_from:
        count = max(count, 1)
    return min(count, n - 1) if n > 1 else 0


def assign_splits(sequences: Sequence[SequenceInfo], fred_root: Path, params: IndexParams,
                  notify: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Sequence ids per split (§5.3): split files, else the train/test folders, else a seeded split; val is
    always carved from train by sequence. Frames are never split."""
    ids = [s.sequence_id for s in sequences]
    known = set(ids)
    rng = np.random.default_rng(params.split_seed)
    train_file, test_file = split_files(fred_root, params.split)
    if train_file.is_file() and test_file.is_file():
        listed = {"train": read_split_file(train_file), "test": read_split_file(test_file)}
        unknown = sorted({i for group in listed.values() for i in group} - known, key=natural_key)
        if unknown:
            warnings.warn(f"split files {train_file.parent} list {len(unknown)} sequence(s) not found under "
                          f"{fred_root} ({', '.join(unknown[:5])}); they are ignored", FredDataWarning, stacklevel=2)
        train = [i for i in ids if i in set(listed["train"])]
        test = [i for i in ids if i in set(listed["test"]) and i not in set(train)]
        left_out = [i for i in ids if i not in set(train) | set(test)]
        if left_out:
            notify(f"FRED: {len(left_out)} sequence(s) are in neither split file and are not used")
        source = f"split files in {train_file.parent}"
    elif any(s.group is not None for s in sequences):
        train = [s.sequence_id for s in sequences if s.group == "train"]
        test = [s.sequence_id for s in sequences if s.group == "test"]
        source = "train/ and test/ folders"
    else:
        order = list(rng.permutation(len(ids)))
        n_test = _carve_count(len(ids), params.test_fraction, 3)
        test = sorted((ids[k] for k in order[:n_test]), key=natural_key)
        train = [i for i in ids if i not in set(test)]
        source = f"seeded split (seed {params.split_seed})"
    n_val = _carve_count(len(train), params.val_fraction, 2)
    val_positions = set(rng.permutation(len(train))[:n_val].tolist())
    val = [i for k, i in enumerate(train) if k in val_positions]
    train = [i for k, i in enumerate(train) if k not in val_positions]
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test)), "splits overlap"
    notify(f"FRED splits from {source}: train {len(train)}, val {len(val)}, test {len(test)} sequences")
    return {"train": train, "val": val, "test": test}


# -------------------------------------------------------------------------------------- annotation files

def source_signature(fred_root: Path, sequences: Sequence[SequenceInfo], params: IndexParams) -> dict:
    """What the annotation files were built from: sequence names, frame counts, size and mtime of each
    ``coordinates.txt`` and split file, and the pairing/split parameters. A mismatch means stale files."""
    entries = []
    for s in sequences:
        stat = (s.path / COORDINATES).stat()
        count = {}
        for key, folder, suffixes in (("rgb", s.path / RGB_DIR, RGB_SUFFIXES), ("event", s.path / EVENT_DIR,
                                                                               EVENT_SUFFIXES)):
            count[key] = sum(1 for p in folder.iterdir() if p.suffix.lower() in suffixes) if folder.is_dir() else 0
        entries.append({"id": s.sequence_id, "path": s.path.relative_to(fred_root).as_posix(),
                        "rgb_frames": count["rgb"], "event_frames": count["event"],
                        "coordinates_size": stat.st_size, "coordinates_mtime_ns": stat.st_mtime_ns})
    split_stats = []
    for path in split_files(fred_root, params.split):
        if path.is_file():
            stat = path.stat()
            split_stats.append({"path": path.relative_to(fred_root).as_posix(), "size": stat.st_size,
                                "mtime_ns": stat.st_mtime_ns})
    return {"format_version": FORMAT_VERSION, "fred_root": str(fred_root.resolve()), "params": asdict(params),
            "sequences": entries, "split_files": split_stats}


def annotation_path(annotation_dir: str | Path, split: str) -> Path:
    """``<annotation_dir>/instances_<split>.json``."""
    return Path(annotation_dir) / f"instances_{split}.json"


def build_fusion_annotations(fred_root: str | Path, annotation_dir: str | Path = DEFAULT_ANNOTATION_DIR,
                             params: IndexParams = IndexParams(),
                             notify: Callable[[str], None] = print) -> dict[str, Path]:
    """Write (or reuse, when their signature matches) ``instances_{train,val,test}.json`` for ``fred_root``.

    Returns the three paths. Files are written atomically; malformed ``coordinates.txt`` lines are warned about.
    """
    root = Path(fred_root)
    sequences = discover_sequences(root)
    signature = source_signature(root, sequences, params)
    paths = {split: annotation_path(annotation_dir, split) for split in SPLITS}
    if all(p.is_file() for p in paths.values()):
        try:
            stored = [json.loads(p.read_text(encoding="utf-8")).get("info", {}).get("source_signature")
                      for p in paths.values()]
        except (OSError, json.JSONDecodeError):
            stored = [None]
        if all(s == signature for s in stored):
            notify(f"FRED: reusing fusion annotations in {annotation_dir} (source unchanged)")
            return paths
        notify(f"FRED: fusion annotations in {annotation_dir} are stale or from another source; rebuilding")

    assignment = assign_splits(sequences, root, params, notify)
    split_of = {sid: split for split, ids in assignment.items() for sid in ids}
    records = {split: {"images": [], "annotations": [], "report": {}} for split in SPLITS}
    next_image_id = 1
    for sequence in sequences:
        split = split_of.get(sequence.sequence_id)
        images, annotations, report = index_sequence(sequence, params, root, next_image_id)
        next_image_id += len(images)
        if split is None:
            continue
        records[split]["images"] += images
        records[split]["annotations"] += annotations
        records[split]["report"][sequence.sequence_id] = report
    next_annotation_id = 1
    for split in SPLITS:
        for annotation in records[split]["annotations"]:
            annotation["id"] = next_annotation_id
            next_annotation_id += 1
        document = {
            "info": {"description": "FRED RGB+Event fusion annotations (spec/fred.md §5.2)",
                     "version": FORMAT_VERSION, "split": split, "sequences": assignment[split],
                     "pairing": {"rule": "mutual nearest neighbours", "pair_max_dt": params.pair_max_dt,
                                 "event_time_offset": params.event_time_offset, "rgb_time": params.rgb_time,
                                 "box_time_tolerance": BOX_TIME_TOLERANCE},
                     "report": records[split]["report"], "source_signature": signature},
            "categories": [{"id": 1, "name": CLASS_NAMES[0]}],
            "images": records[split]["images"],
            "annotations": records[split]["annotations"],
        }
        atomic_write_text(paths[split], json.dumps(document, separators=(",", ":")))
    totals = {key: sum(r[key] for rec in records.values() for r in rec["report"].values())
              for key in ("dual", "rgb_only", "event_only", "annotated", "bad_lines")}
    notify(f"FRED: built fusion annotations in {annotation_dir}: {totals['dual']} dual, {totals['rgb_only']} "
           f"rgb_only, {totals['event_only']} event_only entries ({totals['annotated']} annotated, "
           f"{totals['bad_lines']} malformed coordinate lines)")
    return paths


def load_fusion_split(path: str | Path, fred_root: str | Path | None, threshold: float) -> list[FrameEntry]:
    """Read one ``instances_<split>.json`` into entries; a ``dual`` entry is ``paired`` iff ``time_diff`` ≤
    ``threshold``. Relative file names resolve against ``fred_root`` (default: the root recorded in the file).
    Files of the fork's converter (no ``annotated`` field) load too: their entries count as annotated."""
    path = Path(path)
    if not path.is_file():
        raise FredDataError(f"fusion annotation file {path} does not exist; build it (omit --fusion-annotations) "
                            "or point --fusion-annotations at the folder holding instances_{train,val,test}.json")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        images = document["images"]
        annotations = document.get("annotations", [])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise FredDataError(f"fusion annotation file {path} is not a COCO-style file with 'images' "
                            f"({error}); rebuild it") from error
    if fred_root is None:
        recorded = document.get("info", {}).get("source_signature", {}).get("fred_root")
        fred_root = recorded if recorded else path.parent
    try:
        return entries_from_records(images, annotations, Path(fred_root), threshold)
    except (KeyError, TypeError, ValueError) as error:
        raise FredDataError(f"fusion annotation file {path} has a malformed image or annotation record "
                            f"({type(error).__name__}: {error}); rebuild it") from error


def entries_from_records(images: Sequence[dict], annotations: Sequence[dict], fred_root: Path,
                         threshold: float) -> list[FrameEntry]:
    """COCO ``images``/``annotations`` records of a fusion annotation file → entries (threshold applied)."""
    by_image: dict[int, list[dict]] = {}
    for annotation in annotations:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    entries = []
    for image in images:
        rgb_name, event_name = image.get("rgb_file_name"), image.get("event_file_name")
        time_diff = image.get("time_diff")
        status = image.get("status", "dual" if rgb_name and event_name else ("rgb_only" if rgb_name else "event_only"))
        own = by_image.get(image["id"], [])
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in own], dtype=np.float32).reshape(-1, 4)
        entries.append(FrameEntry(
            image_id=int(image["id"]),
            sequence_id=str(image.get("sequence_id", "")),
            frame_index=int(image.get("frame_index", 0)),
            rgb_path=fred_root / rgb_name if rgb_name else None,
            event_path=fred_root / event_name if event_name else None,
            rgb_timestamp=image.get("rgb_timestamp"),
            event_timestamp=image.get("event_timestamp"),
            time_diff=time_diff,
            status=status,
            annotated=bool(image.get("annotated", True)),
            width=int(image["width"]),
            height=int(image["height"]),
            boxes=boxes,
            track_ids=tuple(int(a.get("track_id", 0)) for a in own),
            drone_models=tuple(str(a.get("drone_model", "")) for a in own),
            paired=status == "dual" and rgb_name is not None and event_name is not None
            and time_diff is not None and time_diff <= threshold,
        ))
    return entries


def sequence_entries(sequence_dir: str | Path, fusion_threshold: float = 0.1,
                     params: IndexParams = IndexParams()) -> list[FrameEntry]:
    """Pair one sequence folder directly (e.g. for prediction), without annotation files or splits. Without a
    ``coordinates.txt`` every entry is ``annotated: false`` and has no boxes."""
    folder = Path(sequence_dir)
    if not folder.is_dir():
        raise FredDataError(f"sequence folder {folder} does not exist")
    info = SequenceInfo(folder.name, folder, None)
    images, annotations, _ = index_sequence(info, params, folder.parent, first_image_id=1)
    return entries_from_records(images, annotations, folder.parent, fusion_threshold)


def load_fred_index(fred_root: str | Path | None, fusion_threshold: float = 0.1,
                    annotation_dir: str | Path = DEFAULT_ANNOTATION_DIR, fusion_annotations: str | Path | None = None,
                    params: IndexParams = IndexParams(), notify: Callable[[str], None] = print) -> FredIndex:
    """Build or reuse the fusion annotation files and load all three splits with ``fusion_threshold`` applied.

    With ``fusion_annotations`` (``--fusion-annotations DIR``) that folder's files are used as is: no build, no
    staleness check (a notice says so); relative file names resolve against ``fred_root`` if given.
    """
    if fusion_annotations is not None:
        directory = Path(fusion_annotations)
        notify(f"FRED: using the given fusion annotations in {directory} as is (no staleness check)")
        root = Path(fred_root) if fred_root is not None else None
        splits = {split: load_fusion_split(annotation_path(directory, split), root, fusion_threshold)
                  for split in SPLITS}
        resolved_root = root if root is not None else directory
        # Files used as is may name frames that moved or were deleted: find them now, not in a loader worker.
        missing = next((path for entries in splits.values() for entry in entries
                        for path in (entry.rgb_path, entry.event_path) if path is not None and not path.is_file()), None)
        if missing is not None:
            raise FredDataError(f"frame {missing}, named in the fusion annotations in {directory}, does not exist; "
                                "pass the --fred-root the files were built from, or rebuild them (omit "
                                "--fusion-annotations)")
    else:
        if fred_root is None:
            raise FredDataError("no FRED root given; pass --fred-root (or --fusion-annotations with built files)")
        directory = Path(annotation_dir)
        paths = build_fusion_annotations(fred_root, directory, params, notify)
        resolved_root = Path(fred_root)
        splits = {split: load_fusion_split(paths[split], resolved_root, fusion_threshold) for split in SPLITS}
    return FredIndex(fred_root=resolved_root, annotation_dir=directory, threshold=fusion_threshold, splits=splits)


# ------------------------------------------------------------------------------------ samples and stats

@dataclass(frozen=True)
class Sample:
    """One served sample: an entry and which of its streams are used (a missing stream is zeroed)."""

    entry: FrameEntry
    use_rgb: bool
    use_event: bool


def select_samples(entries: Iterable[FrameEntry], modality: Literal["rgb", "event", "dual"],
                   subset: Literal["modality", "paired"] = "modality",
                   include_unpaired: bool = False) -> list[Sample]:
    """Samples of a split for a modality (§5.5).

    ``subset='paired'`` (evaluation): the effective pairs, so every modality sees identical frames.
    ``subset='modality'`` (training): dual → effective pairs (plus, with ``include_unpaired``, every other
    entry's RGB or event frame with the other stream zeroed; an over-threshold pair gives one of each);
    rgb → annotated entries with RGB; event → annotated entries with events.
    Only annotated entries are served.
    """
    wants_rgb, wants_event = modality in ("rgb", "dual"), modality in ("event", "dual")
    samples = []
    for entry in entries:
        if not entry.annotated:
            continue
        if subset == "paired" or modality == "dual":
            if entry.paired:
                samples.append(Sample(entry, wants_rgb, wants_event))
            elif subset == "modality" and include_unpaired:
                if entry.has_rgb:
                    samples.append(Sample(entry, True, False))
                if entry.has_event:
                    samples.append(Sample(entry, False, True))
        elif (wants_rgb and entry.has_rgb) or (wants_event and entry.has_event):
            samples.append(Sample(entry, wants_rgb, wants_event))
    return samples


@dataclass(frozen=True)
class FusionStats:
    """§5.4 statistics of one split: over annotated entries, ``dual`` counts effective pairs; a stored pair above
    the threshold counts once in ``rgb_only`` and once in ``event_only``."""

    total: int
    dual: int
    rgb_only: int
    event_only: int
    avg_time_diff_ms: float | None
    max_time_diff_ms: float | None
    threshold_s: float
    used: int | None = None

    @property
    def dual_rate(self) -> float:
        """dual / total (0 for an empty split)."""
        return self.dual / self.total if self.total else 0.0

    def line(self) -> str:
        """``Dual Rate: a/b (p.p%), Avg Time Diff: x.xxms`` (``n/a`` without pairs)."""
        average = f"{self.avg_time_diff_ms:.2f}ms" if self.avg_time_diff_ms is not None else "n/a"
        return f"Dual Rate: {self.dual}/{self.total} ({100.0 * self.dual_rate:.1f}%), Avg Time Diff: {average}"

    def csv_row(self, epoch: int, split: str) -> dict:
        """One ``fusion_stats.csv`` row (columns :data:`FUSION_STATS_COLUMNS`)."""
        def number(value: float | None) -> str:
            return "" if value is None else f"{value:.6f}"
        return {"epoch": epoch, "split": split, "total": self.total, "dual": self.dual, "rgb_only": self.rgb_only,
                "event_only": self.event_only, "dual_rate": f"{self.dual_rate:.6f}",
                "avg_time_diff_ms": number(self.avg_time_diff_ms), "max_time_diff_ms": number(self.max_time_diff_ms),
                "threshold_s": self.threshold_s, "used": "" if self.used is None else self.used}


def fusion_stats(entries: Iterable[FrameEntry], threshold: float, used: int | None = None) -> FusionStats:
    """Fusion statistics (§5.4) of a split's entries; ``used`` = samples served to the current modality."""
    annotated = [e for e in entries if e.annotated]
    diffs = [e.time_diff for e in annotated if e.paired]
    return FusionStats(
        total=len(annotated),
        dual=len(diffs),
        rgb_only=sum(1 for e in annotated if e.has_rgb and not e.paired),
        event_only=sum(1 for e in annotated if e.has_event and not e.paired),
        avg_time_diff_ms=1000.0 * float(np.mean(diffs)) if diffs else None,
        max_time_diff_ms=1000.0 * float(np.max(diffs)) if diffs else None,
        threshold_s=threshold,
        used=used,
    )


def append_fusion_stats_csv(path: str | Path, epoch: int, split: str, stats: FusionStats) -> None:
    """Append one row to ``fusion_stats.csv`` (header written when the file is new)."""
    path = Path(path)
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=FUSION_STATS_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(stats.csv_row(epoch, split))
