"""Helpers for the MaeFuse package tests: offline mode, seeded tiny networks, small image files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"  # the spec's acceptance checks run without network

from maefuse.model import MaeFuse, build_model  # noqa: E402  (after the offline switch)


def tiny_model(seed: int = 0, **options) -> MaeFuse:
    """A `tiny` MaeFuse with seeded random weights (fusion layer included)."""
    torch.manual_seed(seed)
    return build_model("tiny", **options)


def write_image(path: Path, pixels: np.ndarray) -> Path:
    """Save a uint8 gray (H, W) or RGB (H, W, 3) array (or a uint16 gray one) with PIL, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def random_image(rng: np.random.Generator, height: int, width: int, colour: bool = False) -> np.ndarray:
    """Smooth random uint8 content (a blurred noise field), gray or RGB."""
    shape = (height, width, 3) if colour else (height, width)
    noise = rng.uniform(0, 255, size=shape)
    kernel = np.ones(5) / 5
    for axis in (0, 1):
        noise = np.apply_along_axis(lambda line: np.convolve(line, kernel, mode="same"), axis, noise)
    return np.clip(np.rint(noise + rng.uniform(-20, 20, size=shape)), 0, 255).astype(np.uint8)
