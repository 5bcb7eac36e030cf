"""Infrared/visible pair data shared by CrossFuse and MaeFuse: layout discovery, pairing, selection, dataset.

Layouts (folder names case-insensitive; ``auto`` picks ``kaist`` when any ``lwir/`` folder pair exists):

- ``kaist``: every ``lwir/`` with a sibling ``visible/``, flat (``root/{lwir,visible}``) or nested
  (``root/setXX/V00Y/{lwir,visible}``);
- ``paired``: an IR folder ``ir/`` or ``infrared/`` with a sibling VIS folder ``vi/``, ``vis/`` or ``visible/``,
  flat or nested; ``split`` selects LLVIP-style ``infrared/<split>`` and ``visible/<split>``;
- a local Hugging Face ``datasets`` folder written by ``save_to_disk`` (image columns by name); a hub id only
  with ``allow_download=True``.

A pair's key is the POSIX path of its folder pair's parent relative to the root, then the stem
(``set00/V000/I00001``; just the stem when flat). Pairs are sorted by key and matched by stem (never by listing
order); files without a partner are skipped with one warning; zero pairs is an error.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from common.errors import DataError
from common.images import HighBitDepth, image_size, image_to_array, read_image, resize_uint8, to_gray
from common.pairing import describe_files, pair_by_stem

Layout = Literal["auto", "kaist", "paired"]
Selection = Literal["first", "uniform"]

KAIST_FOLDERS = (("lwir",), ("visible",))
PAIRED_FOLDERS = (("ir", "infrared"), ("vi", "vis", "visible"))


@dataclass(frozen=True)
class FilePair:
    """An IR/VIS pair of image files; ``root`` is the data root the key is relative to."""

    key: str
    ir: Path
    vi: Path
    root: Path

    def read(self, high_bit_depth: HighBitDepth = "minmax") -> tuple[np.ndarray, np.ndarray]:
        """The IR and VIS images as uint8 gray ``(H, W)`` (colour VIS via BT.601 luma, rounded)."""
        return (to_gray(read_image(self.ir, high_bit_depth=high_bit_depth)),
                to_gray(read_image(self.vi, high_bit_depth=high_bit_depth)))

    def describe(self) -> str:
        """``key<TAB>ir<TAB>vi``, paths given as ``<root folder name>/<path below the root>`` (machine-independent)."""
        root_name = self.root.resolve().name
        return (f"{self.key}\t{root_name}/{self.ir.relative_to(self.root).as_posix()}\t"
                f"{root_name}/{self.vi.relative_to(self.root).as_posix()}")

    def names(self) -> str:
        """The two file paths, for error messages."""
        return f"{self.ir} and {self.vi}"


@dataclass(frozen=True)
class DatasetTable:
    """A Hugging Face ``datasets.Dataset`` with the names of its IR and VIS image columns."""

    dataset: Any = field(compare=False, repr=False)
    origin: str
    ir_column: str
    vi_column: str


@dataclass(frozen=True)
class DatasetPair:
    """An IR/VIS pair stored in one row of a Hugging Face dataset."""

    key: str
    row: int
    table: DatasetTable

    def read(self, high_bit_depth: HighBitDepth = "minmax") -> tuple[np.ndarray, np.ndarray]:
        """The IR and VIS images of the row as uint8 gray ``(H, W)``."""
        record = self.table.dataset[self.row]
        return (self._image(record, self.table.ir_column, high_bit_depth),
                self._image(record, self.table.vi_column, high_bit_depth))

    def _image(self, record: dict, column: str, high_bit_depth: HighBitDepth) -> np.ndarray:
        name = f"{self.table.origin} row {self.row} column '{column}' (key {self.key})"
        value = record[column]
        try:
            if isinstance(value, dict) and value.get("bytes") is not None:
                value = Image.open(io.BytesIO(value["bytes"]))
            elif isinstance(value, dict) and value.get("path"):
                value = value["path"]
            if isinstance(value, (str, os.PathLike)):
                return to_gray(read_image(value, high_bit_depth=high_bit_depth))
            if isinstance(value, Image.Image):
                value.load()
                return to_gray(image_to_array(value, name=name, high_bit_depth=high_bit_depth))
        except (OSError, SyntaxError, ValueError) as error:
            raise DataError(f"cannot decode image {name}: truncated or corrupt ({error})") from error
        array = np.asarray(value)
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
            raise DataError(f"{name}: expected an image or a uint8 (H, W) / (H, W, 3) array, got "
                            f"{type(value).__name__} {array.dtype} {array.shape}")
        return to_gray(array)

    def describe(self) -> str:
        """``key<TAB>origin#row``."""
        return f"{self.key}\t{self.table.origin}#{self.row}"

    def names(self) -> str:
        """The dataset row, for error messages."""
        return f"{self.table.origin} row {self.row} (key {self.key})"


Pair = FilePair | DatasetPair


def find_folder_pairs(root: str | Path, layout: Layout = "auto", split: str | None = None
                      ) -> list[tuple[str, Path, Path]]:
    """Folder pairs under ``root`` as ``(relative parent, ir_dir, vis_dir)``, sorted by relative parent.

    Raises:
        DataError: the root is missing, holds no folder pair, or a folder has two IR (or VIS) folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root not found: {root} (check --data.root / --data_path)")
    if layout == "auto":
        groups, _ = _scan_folder_pairs(root, KAIST_FOLDERS)
        if not groups:
            groups, lonely = _scan_folder_pairs(root, PAIRED_FOLDERS)
            layout_names = PAIRED_FOLDERS
        else:
            lonely, layout_names = [], KAIST_FOLDERS
    else:
        layout_names = KAIST_FOLDERS if layout == "kaist" else PAIRED_FOLDERS
        groups, lonely = _scan_folder_pairs(root, layout_names)
    if not groups:
        found = f"; found only {', '.join(str(path) for path in lonely[:5])}" if lonely else ""
        raise DataError(f"no IR/VIS folder pair under {root}: expected an IR folder "
                        f"({'/'.join(layout_names[0])}) with a sibling VIS folder "
                        f"({'/'.join(layout_names[1])}){found}")
    if lonely:
        warnings.warn(f"folders without a partner folder skipped: {describe_files(lonely)}", stacklevel=2)
    if split is not None:
        groups = [(relative, ir_dir / split, vis_dir / split) for relative, ir_dir, vis_dir in groups]
    return groups


def _scan_folder_pairs(root: Path, names: tuple[tuple[str, ...], tuple[str, ...]]
                       ) -> tuple[list[tuple[str, Path, Path]], list[Path]]:
    """Walk directories (not into the pair folders themselves) and collect folder pairs and lone halves."""
    ir_names, vis_names = names
    groups: list[tuple[str, Path, Path]] = []
    lonely: list[Path] = []
    visited: set[str] = set()
    pending = [root]
    while pending:
        folder = pending.pop()
        real = os.path.realpath(folder)
        if real in visited:
            continue
        visited.add(real)
        subfolders = sorted(entry.name for entry in os.scandir(folder)
                            if entry.is_dir() and not entry.name.startswith("."))
        ir_dirs = [name for name in subfolders if name.lower() in ir_names]
        vis_dirs = [name for name in subfolders if name.lower() in vis_names]
        for kind, found in (("IR", ir_dirs), ("VIS", vis_dirs)):
            if len(found) > 1:
                raise DataError(f"{folder} has {len(found)} {kind} folders ({', '.join(found)}); keep one")
        if ir_dirs and vis_dirs:
            relative = folder.relative_to(root).as_posix()
            groups.append((relative, folder / ir_dirs[0], folder / vis_dirs[0]))
        elif ir_dirs or vis_dirs:
            lonely.append(folder / (ir_dirs or vis_dirs)[0])
        skip = set(ir_dirs + vis_dirs) if ir_dirs and vis_dirs else set()
        pending.extend(folder / name for name in reversed(subfolders) if name not in skip)
    groups.sort(key=lambda group: group[0])
    return groups, lonely


def discover_file_pairs(root: str | Path, layout: Layout = "auto", split: str | None = None,
                        modality_tokens: bool = True) -> list[FilePair]:
    """All file pairs under one root, sorted by key; unpaired files give one warning (count + first 5).

    ``modality_tokens`` also pairs leftover ``IR7`` with ``VIS7`` (see :func:`common.pairing.pair_by_stem`).

    Raises:
        DataError: no folder pair, an empty or missing image folder, a duplicate stem, or zero pairs.
    """
    root = Path(root)
    pairs: list[FilePair] = []
    unpaired: list[Path] = []
    for relative, ir_dir, vis_dir in find_folder_pairs(root, layout, split):
        pairing = pair_by_stem(ir_dir, vis_dir, modality_tokens=modality_tokens)
        prefix = "" if relative == "." else relative + "/"
        pairs.extend(FilePair(prefix + stem, ir, vi, root) for stem, ir, vi in pairing.pairs)
        unpaired.extend(pairing.only_a + pairing.only_b)
    if not pairs:
        raise DataError(f"zero IR/VIS pairs under {root}: no file stem occurs in both folders "
                        f"({describe_files(unpaired, root=root)} unpaired); pairs must share a file stem")
    if unpaired:
        warnings.warn(f"{root}: {describe_files(unpaired, root=root)} without a partner skipped", stacklevel=2)
    pairs.sort(key=lambda pair: pair.key)
    return pairs


def is_saved_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    path = Path(path)
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def load_dataset_pairs(source: str | Path, *, ir_column: str = "ir", vi_column: str = "vi",
                       name_column: str | None = "name", split: str = "train",
                       allow_download: bool = False) -> list[DatasetPair]:
    """Pairs from a Hugging Face dataset: a local ``save_to_disk`` folder, or a hub id if downloads are allowed.

    Keys come from ``name_column`` (row numbers ``000000``... if it is absent) and are sorted; the image
    columns may hold images, encoded bytes, file paths or uint8 arrays.

    Raises:
        DataError: not a saved dataset and downloads not allowed, a missing split or column, duplicate names.
    """
    import datasets  # heavy; only needed for this source

    if Path(source).is_dir():
        if not is_saved_dataset(source):
            raise DataError(f"{source} is not a dataset folder written by save_to_disk "
                            "(no dataset_dict.json or state.json)")
        loaded = datasets.load_from_disk(str(source))
    elif allow_download:
        loaded = datasets.load_dataset(str(source), split=split)
    else:
        raise DataError(f"{source} is not a local folder; fetching the hub dataset needs an explicit "
                        "opt-in (allow_download / --data.allow-download), or save it locally with save_to_disk")
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{source} has no split '{split}' (splits: {', '.join(loaded)})")
        loaded = loaded[split]
    missing = [column for column in (ir_column, vi_column) if column not in loaded.column_names]
    if missing:
        raise DataError(f"{source}: image column(s) {', '.join(missing)} not found "
                        f"(columns: {', '.join(loaded.column_names)}); set the IR/VIS column names")
    if name_column is not None and name_column in loaded.column_names:
        keys = [str(name) for name in loaded[name_column]]
    else:
        keys = [f"{row:06d}" for row in range(len(loaded))]
    if len(set(keys)) != len(keys):
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        raise DataError(f"{source}: duplicate names in column '{name_column}': {', '.join(repeated[:5])}")
    if not keys:
        raise DataError(f"{source}: the dataset has zero rows")
    table = DatasetTable(loaded, str(source), ir_column, vi_column)
    return sorted((DatasetPair(key, row, table) for row, key in enumerate(keys)), key=lambda pair: pair.key)


def load_pairs(roots: Sequence[str | Path], layout: Layout = "auto", split: str | None = None, *,
               modality_tokens: bool = True, ir_column: str = "ir", vi_column: str = "vi",
               name_column: str | None = "name", dataset_split: str = "train",
               allow_download: bool = False) -> list[Pair]:
    """Pairs of one or more roots, concatenated in root order (each root sorted by key).

    A root that is a ``save_to_disk`` folder (or, with ``allow_download``, a hub id that is not a local path)
    is read through :func:`load_dataset_pairs`; any other root through :func:`discover_file_pairs`.
    """
    if not roots:
        raise DataError("no data root given")
    pairs: list[Pair] = []
    for root in roots:
        if is_saved_dataset(root) or (allow_download and not Path(root).exists()):
            pairs.extend(load_dataset_pairs(root, ir_column=ir_column, vi_column=vi_column,
                                            name_column=name_column, split=dataset_split,
                                            allow_download=allow_download))
        else:
            pairs.extend(discover_file_pairs(root, layout, split, modality_tokens))
    return pairs


def select_pairs(pairs: Sequence[Pair], count: int | None, selection: Selection = "first") -> list[Pair]:
    """The first ``count`` pairs in key order, or ``count`` evenly spaced ones (``uniform``).

    ``None`` keeps all; a count above the number of pairs keeps all with a warning.
    """
    if count is None or count == len(pairs):
        return list(pairs)
    if count < 1:
        raise ValueError(f"pair count must be positive, got {count}")
    if count > len(pairs):
        warnings.warn(f"{count} pairs requested but only {len(pairs)} available; using all", stacklevel=2)
        return list(pairs)
    if selection == "first":
        return list(pairs[:count])
    indices = (np.arange(count) * len(pairs)) // count
    return [pairs[index] for index in indices]


def pairs_listing(pairs: Sequence[Pair]) -> str:
    """The text of ``pairs.txt``: one ``key<TAB>ir<TAB>vi`` (or ``key<TAB>dataset#row``) line per pair."""
    return "".join(pair.describe() + "\n" for pair in pairs)


def write_pairs_file(path: str | Path, pairs: Sequence[Pair]) -> str:
    """Write ``pairs.txt`` atomically and return the SHA-256 (hex) of its bytes (the data-list hash)."""
    path = Path(path)
    data = pairs_listing(pairs).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
    return hashlib.sha256(data).hexdigest()


def check_pair_headers(pairs: Sequence[Pair]) -> None:
    """Fail fast, before training: every file pair's images must be readable images of equal size.

    Reads only the file headers (a truncated body is still caught when the image is decoded); dataset rows
    are not checked here.

    Raises:
        DataError: naming the first unreadable file or the first pair whose sizes differ.
    """
    for pair in pairs:
        if isinstance(pair, FilePair):
            ir_size, vi_size = image_size(pair.ir), image_size(pair.vi)
            if ir_size != vi_size:
                raise DataError(f"IR and VIS sizes differ for {pair.names()}: {ir_size[0]}x{ir_size[1]} vs "
                                f"{vi_size[0]}x{vi_size[1]} (W x H); pairs must be registered images")


class IVIFPairDataset(torch.utils.data.Dataset):
    """Gray IR/VIS pairs as float32 ``(1, H, W)`` tensors holding integers 0..255, plus the key.

    Each image is read (colour -> rint BT.601 luma; 16-bit -> per-image min-max, warned), optionally resized to
    ``size = (height, width)`` with half-pixel bilinear (OpenCV ``INTER_LINEAR``), then rint and clipped.
    ``hflip`` flips both images of a pair together, decided by ``(seed, epoch, index)`` so that any worker,
    process count or resume gives the same flips; call :meth:`set_epoch` each epoch.

    Raises (on access):
        DataError: an unreadable image, or IR and VIS sizes that differ.
    """

    def __init__(self, pairs: Sequence[Pair], size: tuple[int, int] | None = None, *, hflip: bool = False,
                 seed: int = 0, high_bit_depth: HighBitDepth = "minmax"):
        if not pairs:
            raise DataError("the pair list is empty")
        self.pairs = list(pairs)
        self.size = size
        self.hflip = hflip
        self.seed = seed
        self.high_bit_depth = high_bit_depth
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flips ``__getitem__`` applies."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        pair = self.pairs[index]
        ir, vi = pair.read(self.high_bit_depth)
        if ir.shape != vi.shape:
            raise DataError(f"IR and VIS sizes differ for {pair.names()}: {ir.shape[1]}x{ir.shape[0]} vs "
                            f"{vi.shape[1]}x{vi.shape[0]} (W x H); pairs must be registered images")
        if self.size is not None:
            ir = resize_uint8(ir, *self.size)
            vi = resize_uint8(vi, *self.size)
        if self.hflip and np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5:
            ir, vi = ir[:, ::-1], vi[:, ::-1]
        return {"ir": _to_tensor(ir), "vi": _to_tensor(vi), "key": pair.key}


def _to_tensor(gray: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32)[None])
