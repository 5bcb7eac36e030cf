"""Video clips, references and validation sequences (spec/colorize.md §5).

Layouts, detected per root:

- DAVIS: ``ROOT/JPEGImages/480p/<seq>/*.jpg`` with optional ``ROOT/ImageSets/2017/{train,val}.txt`` (no file = all
  sequences).
- generic: ``ROOT/<seq>/*.{jpg,jpeg,png}``.

Frames are naturally sorted; sequences shorter than T are skipped and counted. A clip is T consecutive frames
starting at 0, T, 2T, ...; each frame is resized (shorter side to S, bicubic with antialiasing, or stretched to
S x S), cropped to S x S (random in training, centre otherwise) and flipped with one coin per clip, then converted
to normalised LAB. References: ``mixed`` takes a folder image with probability 0.7 (the folder's ``<seq>/``
subfolder when it exists: sequence-matched exemplars), else the clip's first frame; ``first_frame`` always the
first frame. A folder image that is nearly gray (mean chroma < 2) is redrawn, up to 5 tries.

Every random choice of item ``i`` in epoch ``e`` comes from a generator seeded by (seed, e, i), so the data do not
depend on workers or on where a run resumed; call :meth:`ClipDataset.set_epoch` before each epoch's iterator.
Batches from ``torch.utils.data.default_collate`` are the §2.1 dict: ``frames_lab`` [B,T,3,S,S], ``reference_lab``
[B,3,S,S], ``reference_is_frame`` bool [B], ``sequence`` list[str], ``frame_ids`` int64 [B,T].
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from colorize.config import DataConfig
from colorize.lab import AB_SCALE, uint8_to_normalized_lab
from common.errors import DataError
from common.frames import list_frames, natural_key
from common.images import image_size, read_image

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
DAVIS_FRAMES = Path("JPEGImages") / "480p"
DAVIS_SPLITS = Path("ImageSets") / "2017"
GRAY_CHROMA = 2.0
REFERENCE_TRIES = 5
Layout = Literal["davis", "generic"]


@dataclass(frozen=True)
class VideoSequence:
    """One video: its name, naturally sorted frame files and frame size (width, height)."""

    name: str
    frames: tuple[Path, ...]
    size: tuple[int, int]


def detect_layout(root: Path) -> Layout:
    """``davis`` when ``ROOT/JPEGImages/480p`` exists, else ``generic``."""
    return "davis" if (root / DAVIS_FRAMES).is_dir() else "generic"


def _davis_names(root: Path, split: str) -> list[str]:
    folders = sorted((p.name for p in (root / DAVIS_FRAMES).iterdir() if p.is_dir()), key=natural_key)
    split_file = root / DAVIS_SPLITS / f"{split}.txt"
    if split == "all" or not split_file.is_file():
        return folders
    names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    missing = [name for name in names if name not in folders]
    if missing:
        raise DataError(f"{split_file} lists sequences without a frame folder under {root / DAVIS_FRAMES}: "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return names


def _read_sequence(name: str, folder: Path) -> VideoSequence:
    frames = list_frames(folder, FRAME_SUFFIXES)
    sizes = [image_size(path) for path in frames]
    for path, size in zip(frames, sizes):
        if size != sizes[0]:
            raise DataError(f"{path} is {size[0]}x{size[1]} but {frames[0].name} is {sizes[0][0]}x{sizes[0][1]}: "
                            "all frames of a sequence must have one size")
    return VideoSequence(name, tuple(frames), sizes[0])


def find_sequences(roots: Sequence[str | Path], split: str = "all", min_frames: int = 1,
                   short: Literal["skip", "error"] = "skip") -> tuple[list[VideoSequence], int]:
    """Sequences of every root (DAVIS or generic layout), with the number skipped for having < ``min_frames``.

    ``split`` selects a DAVIS split file (``all`` or a missing file: every sequence); generic roots ignore it.
    ``short="error"`` refuses short sequences instead of skipping them (evaluation).

    Raises:
        DataError: a root is missing or holds no sequence, a frame is unreadable, frames of one sequence differ
            in size, a name appears in two roots, or no sequence is long enough.
    """
    if not roots:
        raise DataError("no data root given (--data.dataset ROOT)")
    sequences: list[VideoSequence] = []
    skipped = 0
    origin: dict[str, Path] = {}
    for root in map(Path, roots):
        if not root.is_dir():
            raise DataError(f"data root {root} does not exist or is not a folder (check --data.dataset)")
        if detect_layout(root) == "davis":
            found = [_read_sequence(name, root / DAVIS_FRAMES / name) for name in _davis_names(root, split)]
        else:
            folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name))
            found = [_read_sequence(p.name, p) for p in folders
                     if any(f.suffix.lower() in FRAME_SUFFIXES for f in p.iterdir() if f.is_file())]
        if not found:
            raise DataError(f"data root {root} holds no video sequence (expected {DAVIS_FRAMES}/<seq>/*.jpg or "
                            "<seq>/*.jpg|png)")
        for sequence in found:
            if sequence.name in origin:
                raise DataError(f"sequence {sequence.name} appears in {origin[sequence.name]} and {root}; "
                                "rename one of them")
            origin[sequence.name] = root
            if len(sequence.frames) >= min_frames:
                sequences.append(sequence)
            elif short == "error":
                raise DataError(f"sequence {sequence.frames[0].parent} has {len(sequence.frames)} frames, fewer "
                                f"than {min_frames}")
            else:
                skipped += 1
    if not sequences:
        raise DataError(f"no sequence in {', '.join(map(str, roots))} has at least {min_frames} frames "
                        f"({skipped} shorter ones skipped)")
    return sequences, skipped


def find_validation_sequences(cfg: DataConfig, min_frames: int = 1) -> list[VideoSequence]:
    """Validation sequences: ``--data.val-dataset`` (its val split where it is DAVIS), else the val split of
    the DAVIS training roots that have a val split file; [] when there is none."""
    roots = list(cfg.val_dataset) or [Path(r) for r in cfg.dataset if detect_layout(Path(r)) == "davis"
                                      and (Path(r) / DAVIS_SPLITS / "val.txt").is_file()]
    if not roots:
        return []
    return find_sequences(roots, "val", min_frames, short="error")[0]


class ReferencePool:
    """Exemplar images: ImageNet layout ``DIR/<class>/*.{JPEG,jpg,png}`` or flat ``DIR/*``; a ``DIR/<sequence>/``
    folder is preferred for that sequence. Folders are listed when first drawn from."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"reference folder {self.folder} does not exist (--data.imagenet)")
        entries = sorted(self.folder.iterdir(), key=lambda p: natural_key(p.name))
        self.subfolders = {p.name: p for p in entries if p.is_dir()}
        self.flat = [p for p in entries if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES]
        if not self.subfolders and not self.flat:
            raise DataError(f"reference folder {self.folder} holds no images (expected <class>/*.JPEG or *.jpg)")
        self._classes = list(self.subfolders.values()) + ([self.folder] if self.flat else [])
        self._listing: dict[Path, list[Path]] = {}

    def images(self, folder: Path) -> list[Path]:
        """Images of one class folder (or of the flat root), naturally sorted; an empty folder is an error."""
        if folder not in self._listing:
            if folder == self.folder:
                self._listing[folder] = self.flat
            else:
                try:
                    self._listing[folder] = list_frames(folder, FRAME_SUFFIXES)
                except DataError as error:
                    raise DataError(f"reference folder {folder} holds no images ({error})") from error
        return self._listing[folder]

    def matched_folder(self, sequence: str) -> Path | None:
        """``DIR/<sequence>/`` when it exists."""
        return self.subfolders.get(sequence)

    def choose_folder(self, sequence: str, rng: np.random.Generator) -> Path:
        """The sequence-matched folder if present, else a class folder drawn uniformly."""
        matched = self.matched_folder(sequence)
        return matched if matched is not None else self._classes[int(rng.integers(len(self._classes)))]

    def validation_image(self, sequence: str) -> Path | None:
        """First sorted image of ``DIR/<sequence>/`` (the validation reference), if that folder exists."""
        matched = self.matched_folder(sequence)
        return None if matched is None else self.images(matched)[0]


def _rgb(path: Path) -> np.ndarray:
    image = read_image(path)
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def resized_size(width: int, height: int, size: int, resize: str) -> tuple[int, int]:
    """(width, height) after ``shorter`` (shorter side to ``size``) or ``stretch`` resizing."""
    if resize == "stretch":
        return size, size
    if width <= height:
        return size, max(size, round(height * size / width))
    return max(size, round(width * size / height)), size


def load_square(path: Path, size: int, resize: str, crop_fraction: tuple[float, float], flip: bool) -> np.ndarray:
    """Read an image as RGB, resize (bicubic, antialiased), crop ``size x size`` at ``crop_fraction`` of the free
    range (0.5 = centre), flip horizontally if asked; uint8 ``[size, size, 3]``."""
    rgb = _rgb(path)
    width, height = resized_size(rgb.shape[1], rgb.shape[0], size, resize)
    if (width, height) != (rgb.shape[1], rgb.shape[0]):
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC))
    top = min(int(crop_fraction[0] * (height - size + 1)), height - size)
    left = min(int(crop_fraction[1] * (width - size + 1)), width - size)
    rgb = rgb[top:top + size, left:left + size]
    return np.ascontiguousarray(rgb[:, ::-1] if flip else rgb)


def to_lab(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 RGB images ``[H, W, 3]`` -> float32 normalised LAB ``[N, 3, H, W]``."""
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return uint8_to_normalized_lab(stacked)


def mean_chroma(lab_normalized: torch.Tensor) -> float:
    """Mean sqrt(a^2 + b^2) of a normalised LAB image, in raw LAB units."""
    return float((lab_normalized[1:3] * AB_SCALE).square().sum(dim=0).sqrt().mean())


CENTRE = (0.5, 0.5)


@dataclass(frozen=True)
class ClipPlan:
    """Every random choice of one training item, drawn before any file is read."""

    sequence: int
    start: int
    flip: bool
    crop_fraction: tuple[float, float]
    reference_folder: Path | None
    """Folder the reference image is drawn from; None = the clip's first frame."""


class ClipDataset(Dataset):
    """Clips of T consecutive frames with one reference each (training: random crop, flip and references;
    ``train=False``: centre crop, no flip, and the validation reference rule)."""

    def __init__(self, sequences: Sequence[VideoSequence], cfg: DataConfig, train: bool = True, seed: int = 0):
        self.sequences = list(sequences)
        self.cfg = cfg
        self.length = cfg.sequence_length
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.clips = [(index, start) for index, sequence in enumerate(self.sequences)
                      for start in range(0, len(sequence.frames) - self.length + 1, self.length)]
        self.pool = ReferencePool(cfg.imagenet) if cfg.imagenet is not None else None
        self.reference_mode = cfg.reference
        if cfg.reference == "mixed" and self.pool is None:
            warnings.warn("--data.reference mixed without --data.imagenet: every reference is the clip's first "
                          "frame (first_frame)", stacklevel=2)
            self.reference_mode = "first_frame"

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random choices ``__getitem__`` makes."""
        self.epoch = epoch

    def _rng(self, index: int, stream: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index, stream])

    def plan(self, index: int) -> ClipPlan:
        """The random choices of item ``index`` in the current epoch."""
        sequence, start = self.clips[index]
        name = self.sequences[sequence].name
        if not self.train:
            folder = self.pool.matched_folder(name) if self.reference_mode == "mixed" else None
            return ClipPlan(sequence, start, False, CENTRE, folder)
        rng = self._rng(index)
        flip = bool(rng.random() < 0.5)
        crop_fraction = (float(rng.random()), float(rng.random()))
        folder = None
        if self.reference_mode == "mixed" and rng.random() < self.cfg.real_reference_probability:
            folder = self.pool.choose_folder(name, rng)
        return ClipPlan(sequence, start, flip, crop_fraction, folder)

    def __getitem__(self, index: int) -> dict:
        plan = self.plan(index)
        sequence = self.sequences[plan.sequence]
        size, resize = self.cfg.image_size, self.cfg.resize
        paths = sequence.frames[plan.start:plan.start + self.length]
        frames_lab = to_lab([load_square(path, size, resize, plan.crop_fraction, plan.flip) for path in paths])
        reference_lab = None
        if plan.reference_folder is not None:
            reference_lab = self._folder_reference(index, plan.reference_folder)
        return {
            "frames_lab": frames_lab,
            "reference_lab": frames_lab[0].clone() if reference_lab is None else reference_lab,
            "reference_is_frame": reference_lab is None,
            "sequence": sequence.name,
            "frame_ids": torch.arange(plan.start, plan.start + self.length, dtype=torch.int64),
        }

    def _folder_reference(self, index: int, folder: Path) -> torch.Tensor:
        """A folder image (first sorted one in validation); nearly gray draws are redrawn up to 5 times."""
        images = self.pool.images(folder)
        size, resize = self.cfg.image_size, self.cfg.resize
        if not self.train:
            return to_lab([load_square(images[0], size, resize, CENTRE, False)])[0]
        rng = self._rng(index, stream=1)
        for _ in range(REFERENCE_TRIES):
            path = images[int(rng.integers(len(images)))]
            crop_fraction = (float(rng.random()), float(rng.random()))
            reference = to_lab([load_square(path, size, resize, crop_fraction, bool(rng.random() < 0.5))])[0]
            if mean_chroma(reference) >= GRAY_CHROMA:
                break
        return reference


@dataclass
class ValidationSequence:
    """One whole sequence for evaluation: normalised LAB frames at S (centre crop) and its reference."""

    name: str
    frames_lab: torch.Tensor
    """``[N, 3, S, S]``."""
    reference_lab: torch.Tensor
    """``[3, S, S]``."""
    reference_is_frame: bool
    reference_path: Path


def load_validation_sequence(sequence: VideoSequence, cfg: DataConfig, pool: ReferencePool | None = None,
                             max_frames: int | None = None) -> ValidationSequence:
    """Read a sequence for evaluation: all frames (or the first ``max_frames``) at S with a centre crop; the
    reference is the first sorted image of ``DIR/<seq>/`` when present, else the first frame."""
    paths = sequence.frames[:max_frames] if max_frames else sequence.frames
    frames_lab = to_lab([load_square(path, cfg.image_size, cfg.resize, CENTRE, False) for path in paths])
    reference_path = pool.validation_image(sequence.name) if pool is not None else None
    if reference_path is None:
        return ValidationSequence(sequence.name, frames_lab, frames_lab[0].clone(), True, paths[0])
    reference = to_lab([load_square(reference_path, cfg.image_size, cfg.resize, CENTRE, False)])[0]
    return ValidationSequence(sequence.name, frames_lab, reference, False, reference_path)
