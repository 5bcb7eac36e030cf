"""Pairing of image files in two folders by file stem, never by listing order.

``pair_by_stem`` is the kit's one file-pairing rule, used by every trainer and by the metric command lines:
``a/7.png`` pairs with ``b/7.jpg``; files whose stem exists on one side only are returned (never paired), and a
stem that occurs twice in one folder (``7.png`` and ``7.jpg``) is an error. Optionally, leftovers pair by the
stem without a leading ``IR``/``VIS``/``VI`` token (``IR7`` with ``VIS7``, the official CrossFuse test archives).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from common.errors import DataError
from common.images import IMAGE_EXTENSIONS

_MODALITY_TOKEN = re.compile(r"^(?:vis|vi|ir)[_-]?(.+)$", re.IGNORECASE)


@dataclass(frozen=True)
class StemPairing:
    """Result of :func:`pair_by_stem`.

    Attributes:
        pairs: ``(key, path_a, path_b)`` sorted by key; the key is the stem (the side-a stem for token pairs).
        only_a: files of folder a whose stem has no partner, sorted by stem.
        only_b: files of folder b whose stem has no partner, sorted by stem.
    """

    pairs: list[tuple[str, Path, Path]]
    only_a: list[Path]
    only_b: list[Path]


def list_images(folder: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, Path]:
    """Image files directly inside ``folder`` keyed by stem, sorted by stem (extensions case-insensitive).

    Hidden files (leading dot) and other file types are skipped.

    Raises:
        DataError: the folder is missing or not a folder, holds no image, or holds two images with one stem.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder} (check the data path)")
    wanted = {extension.lower() for extension in extensions}
    by_stem: dict[str, list[Path]] = {}
    for path in folder.iterdir():
        if path.name.startswith(".") or path.suffix.lower() not in wanted or not path.is_file():
            continue
        by_stem.setdefault(path.stem, []).append(path)
    if not by_stem:
        raise DataError(f"no images ({', '.join(sorted(wanted))}) in {folder}; "
                        "put the images there or point to the right folder")
    duplicates = {stem: sorted(paths) for stem, paths in by_stem.items() if len(paths) > 1}
    if duplicates:
        listed = "; ".join(" and ".join(path.name for path in paths) for paths in duplicates.values())
        raise DataError(f"{len(duplicates)} duplicate stem(s) in {folder}: {listed}; keep one file per stem")
    return {stem: by_stem[stem][0] for stem in sorted(by_stem)}


def pair_by_stem(dir_a: str | Path, dir_b: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS, *,
                 modality_tokens: bool = False) -> StemPairing:
    """Pair the images of two folders by exact file stem.

    With ``modality_tokens``, files left over after exact matching pair by their stem without a leading
    ``IR``/``VIS``/``VI`` token (case-insensitive, optional ``_`` or ``-``: ``IR7`` with ``VIS7``).

    Raises:
        DataError: as :func:`list_images`, or a token match is ambiguous.
    """
    images_a = list_images(dir_a, extensions)
    images_b = list_images(dir_b, extensions)
    pairs = [(stem, images_a[stem], images_b[stem]) for stem in images_a if stem in images_b]
    left_a = {stem: path for stem, path in images_a.items() if stem not in images_b}
    left_b = {stem: path for stem, path in images_b.items() if stem not in images_a}
    if modality_tokens and left_a and left_b:
        core_a = _cores(left_a, dir_a)
        core_b = _cores(left_b, dir_b)
        for core in sorted(core_a.keys() & core_b.keys()):
            stem_a, stem_b = core_a[core], core_b[core]
            pairs.append((stem_a, left_a.pop(stem_a), left_b.pop(stem_b)))
        pairs.sort(key=lambda pair: pair[0])
    return StemPairing(pairs=pairs, only_a=list(left_a.values()), only_b=list(left_b.values()))


def _cores(leftovers: dict[str, Path], folder: str | Path) -> dict[str, str]:
    """Stem without its modality token -> stem, for the leftover stems that carry such a token."""
    cores: dict[str, str] = {}
    for stem in leftovers:
        match = _MODALITY_TOKEN.match(stem)
        if match is None:
            continue
        core = match.group(1)
        if core in cores:
            raise DataError(f"ambiguous pairing in {folder}: {leftovers[cores[core]].name} and "
                            f"{leftovers[stem].name} both reduce to '{core}'; rename one of them")
        cores[core] = stem
    return cores


def describe_files(paths: Iterable[Path], limit: int = 5, root: Path | None = None) -> str:
    """``"3 files (a.png, b.png, c.png)"``, naming at most ``limit`` files (relative to ``root`` if given)."""
    names = [path.relative_to(root).as_posix() if root is not None else path.name for path in paths]
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{len(names)} file{'s' if len(names) != 1 else ''} ({shown})"


def warn_unpaired(pairing: StemPairing, dir_a: str | Path, dir_b: str | Path) -> None:
    """One warning naming the count and first five unpaired files of each side, if there are any."""
    parts = []
    if pairing.only_a:
        parts.append(f"{describe_files(pairing.only_a)} in {dir_a} have no partner in {dir_b}")
    if pairing.only_b:
        parts.append(f"{describe_files(pairing.only_b)} in {dir_b} have no partner in {dir_a}")
    if parts:
        warnings.warn("unpaired images skipped: " + "; ".join(parts), stacklevel=2)
