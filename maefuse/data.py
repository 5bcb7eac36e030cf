"""MaeFuse training data (spec §5): IR/VIS pairs by file stem, PIL preprocessing, decoder-pretraining images.

Pairs come from the shared IR/VIS discovery (`common.ivif.data`: `vi`/`vis`/`visible` with `ir`/`infrared`, any
nesting, LLVIP `--split`, or a local `save_to_disk` dataset), matched by exact stem; unmatched stems are skipped
with one warning, duplicate stems and zero pairs are errors, and every file header is checked before training.

Preprocessing (as the public PIL loader): VIS `convert('YCbCr')` -> Y, IR `convert('L')` (16-bit files min-max
scaled per image, with a warning), resized to S x S with PIL bilinear (antialiased when shrinking; aspect not
kept), replicated to 3 channels, /255, ImageNet-normalised. No augmentation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image

from common.errors import ConfigError, DataError
from common.images import image_size, read_image
from common.ivif.data import FilePair, Pair, check_pair_headers, load_pairs, select_pairs
from common.pairing import list_images
from maefuse.model import gray_to_input

Modality = Literal["vi", "ir"]


def discover_pairs(data_path: str | Path, split: str | None = None, max_pairs: int | None = None) -> list[Pair]:
    """Training pairs under `data_path`, sorted by key (the stem), the first `max_pairs` of them, headers checked.

    Raises:
        DataError: no IR/VIS folders, an empty folder, a duplicate stem, zero pairs, an unreadable image header, or
            IR and VIS sizes that differ.
    """
    pairs = select_pairs(load_pairs([data_path], layout="paired", split=split, modality_tokens=False), max_pairs)
    check_pair_headers(pairs)
    return pairs


def discover_extra_images(folder: str | Path) -> list[Path]:
    """The unpaired natural images of `--extra_images` (directly in `folder`), sorted by stem, headers checked.

    Raises:
        DataError: a missing or empty folder, a duplicate stem, or an unreadable header.
    """
    paths = list(list_images(folder).values())
    for path in paths:
        image_size(path)
    return paths


def training_gray(path: str | Path, modality: Modality) -> np.ndarray:
    """One image file as the uint8 gray (H, W) the model trains on: VIS -> YCbCr Y, IR -> L (PIL conversions)."""
    image = read_image(path)
    if image.ndim == 2:
        return image
    colour = Image.fromarray(image)
    if modality == "vi":
        return np.ascontiguousarray(np.asarray(colour.convert("YCbCr"))[..., 0])
    return np.asarray(colour.convert("L"))


def to_model_input(gray: np.ndarray, img_size: int) -> torch.Tensor:
    """uint8 gray (H, W) -> normalised (3, S, S) float32: PIL bilinear resize to S x S, 3 channels, /255, ImageNet."""
    resized = np.asarray(Image.fromarray(gray).resize((img_size, img_size), Image.Resampling.BILINEAR))
    return gray_to_input(torch.from_numpy(resized.copy())[None])[0]


def _pair_grays(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """(VIS, IR) training grays of a pair; dataset rows give BT.601 luma (their raw pixels are not kept)."""
    if isinstance(pair, FilePair):
        return training_gray(pair.vi, "vi"), training_gray(pair.ir, "ir")
    ir, vi = pair.read()
    return vi, ir


class PairDataset(torch.utils.data.Dataset):
    """IR/VIS pairs as {'vi': (3,S,S), 'ir': (3,S,S), 'key': str}, normalised model inputs."""

    def __init__(self, pairs: Sequence[Pair], img_size: int):
        if not pairs:
            raise DataError("the pair list is empty")
        self.pairs = list(pairs)
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        pair = self.pairs[index]
        vi, ir = _pair_grays(pair)
        return {"vi": to_model_input(vi, self.img_size), "ir": to_model_input(ir, self.img_size), "key": pair.key}


class ExtraImageDataset(torch.utils.data.Dataset):
    """Unpaired natural images for decoder pretraining, served two per item in the pair format
    ({'vi', 'ir', 'key'}, both processed like VIS), so that a step of B items always encodes and reconstructs 2B
    images. Images pair up consecutively in stem order; an odd last image is paired with the first."""

    def __init__(self, paths: Sequence[Path], img_size: int):
        if not paths:
            raise DataError("the extra image list is empty")
        self.paths = list(paths)
        self.img_size = img_size

    def __len__(self) -> int:
        return (len(self.paths) + 1) // 2

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        first = self.paths[2 * index]
        second = self.paths[(2 * index + 1) % len(self.paths)]
        return {"vi": to_model_input(training_gray(first, "vi"), self.img_size),
                "ir": to_model_input(training_gray(second, "vi"), self.img_size),
                "key": f"extra/{first.stem}+{second.stem}"}


def build_training_dataset(pairs: Sequence[Pair], img_size: int, training_mode: str,
                           extra_images: Sequence[Path] = ()) -> torch.utils.data.Dataset:
    """The dataset of a mode: the pairs, plus the `--extra_images` for `train_decoder_only` (refused elsewhere).

    Raises:
        ConfigError: extra images given to a mode other than `train_decoder_only`.
    """
    dataset = PairDataset(pairs, img_size)
    if not extra_images:
        return dataset
    if training_mode != "train_decoder_only":
        raise ConfigError(f"--extra_images only serves train_decoder_only (decoder pretraining), not {training_mode}")
    return torch.utils.data.ConcatDataset([dataset, ExtraImageDataset(extra_images, img_size)])
