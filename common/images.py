"""Image reading with clear errors, gray / YCrCb (BT.601 full range) conversion, and OpenCV-style bilinear resizing.

Every reader decodes the whole file, so a truncated or corrupt image fails here, naming the file, instead of
somewhere inside a training loop. Arrays are numpy: uint8 gray ``(H, W)`` or RGB ``(H, W, 3)``.
"""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File extensions read as images (compared case-insensitively)."""

HighBitDepth = Literal["minmax", "reject"]
"""What to do with 16-bit or float images: scale each image min-max to 0..255 (with a warning), or refuse."""

_GRAY_WEIGHTS = (0.299, 0.587, 0.114)
_HIGH_BIT_DEPTH_MODES = ("I", "F")  # every "I;16*" mode starts with "I"


def read_image(path: str | Path, *, high_bit_depth: HighBitDepth = "minmax") -> np.ndarray:
    """Read an image file completely and return uint8 gray ``(H, W)`` or RGB ``(H, W, 3)``.

    Palette, RGBA, CMYK and other colour modes become RGB (alpha dropped); LA becomes gray (alpha dropped);
    1-bit becomes 0/255 gray. 16-bit and float images are scaled per image (min-max) to 0..255 with a warning,
    or raise :class:`DataError` when ``high_bit_depth="reject"``.

    Raises:
        DataError: the file is missing, not an image, truncated or corrupt, or has a refused bit depth.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path} (check the path and the data folder)")
    try:
        with Image.open(path) as image:
            image.load()
            return image_to_array(image, name=str(path), high_bit_depth=high_bit_depth)
    except UnidentifiedImageError as error:
        raise DataError(f"not a readable image: {path} ({error}); replace or remove the file") from error
    except (OSError, SyntaxError, ValueError, zlib.error) as error:
        raise DataError(f"cannot decode image {path}: truncated or corrupt ({error}); "
                        "replace or remove the file") from error


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the file header, without decoding the pixels.

    Raises:
        DataError: the file is missing or not a readable image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path} (check the path and the data folder)")
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"not a readable image: {path} ({error}); replace or remove the file") from error


def image_to_array(image: Image.Image, *, name: str, high_bit_depth: HighBitDepth = "minmax") -> np.ndarray:
    """Convert a decoded PIL image to uint8 gray ``(H, W)`` or RGB ``(H, W, 3)`` (rules of :func:`read_image`).

    ``name`` identifies the image in warnings and errors (a file path, or a dataset row).
    """
    mode = image.mode
    if mode == "L":
        return np.asarray(image, dtype=np.uint8)
    if mode in ("1", "LA"):
        return np.asarray(image.convert("L"), dtype=np.uint8)
    if mode.startswith(_HIGH_BIT_DEPTH_MODES):
        if high_bit_depth == "reject":
            raise DataError(f"{name}: {mode} image (16-bit or float) is not accepted here; "
                            "convert it to 8-bit first")
        return _minmax_to_uint8(np.asarray(image, dtype=np.float64), name, mode)
    if mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def _minmax_to_uint8(values: np.ndarray, name: str, mode: str) -> np.ndarray:
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise DataError(f"{name}: {mode} image holds {bad} NaN or infinite pixel(s); repair or remove the file")
    warnings.warn(f"{name}: {mode} image scaled per image (min-max) to 0..255", stacklevel=3)
    low, high = float(values.min()), float(values.max())
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.rint(255.0 * (values - low) / (high - low)), 0, 255).astype(np.uint8)


def read_gray(path: str | Path, *, high_bit_depth: HighBitDepth = "minmax") -> np.ndarray:
    """Read an image as uint8 gray ``(H, W)``: gray files as they are, colour files via :func:`rgb_to_gray`."""
    return to_gray(read_image(path, high_bit_depth=high_bit_depth))


def to_gray(image: np.ndarray) -> np.ndarray:
    """uint8 gray from a gray ``(H, W)`` or RGB ``(H, W, 3)`` uint8 array (gray is returned unchanged)."""
    if image.ndim == 2:
        return image
    return rgb_to_gray(image)


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma ``rint(0.299 R + 0.587 G + 0.114 B)`` in float64, clipped, as uint8 ``(H, W)``.

    Equals OpenCV's float BGR->GRAY followed by rounding (CDDFuse) up to float32 ties; pure red gives 76.
    """
    return np.clip(np.rint(rgb_to_luma(rgb)), 0, 255).astype(np.uint8)


def rgb_to_luma(rgb: np.ndarray) -> np.ndarray:
    """Unrounded BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` as float64 ``(H, W)`` from RGB ``(H, W, 3)``."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB array of shape (H, W, 3), got {rgb.shape}")
    rgb = rgb.astype(np.float64)
    red, green, blue = _GRAY_WEIGHTS
    return red * rgb[..., 0] + green * rgb[..., 1] + blue * rgb[..., 2]


def rgb_to_ycrcb(rgb: np.ndarray) -> np.ndarray:
    """BT.601 full-range YCrCb as float64 ``(H, W, 3)`` in channel order (Y, Cr, Cb), unrounded.

    Y = 0.299 R + 0.587 G + 0.114 B, Cr = 128 + 0.713 (R - Y), Cb = 128 + 0.564 (B - Y) (OpenCV's constants).
    """
    luma = rgb_to_luma(rgb)
    rgb = rgb.astype(np.float64)
    chroma_red = 128.0 + 0.713 * (rgb[..., 0] - luma)
    chroma_blue = 128.0 + 0.564 * (rgb[..., 2] - luma)
    return np.stack([luma, chroma_red, chroma_blue], axis=-1)


def ycrcb_to_rgb(ycrcb: np.ndarray) -> np.ndarray:
    """Exact inverse of :func:`rgb_to_ycrcb`: float64 RGB ``(H, W, 3)``, unrounded and unclipped."""
    ycrcb = ycrcb.astype(np.float64)
    luma = ycrcb[..., 0]
    red = luma + (ycrcb[..., 1] - 128.0) / 0.713
    blue = luma + (ycrcb[..., 2] - 128.0) / 0.564
    weight_red, weight_green, weight_blue = _GRAY_WEIGHTS
    green = (luma - weight_red * red - weight_blue * blue) / weight_green
    return np.stack([red, green, blue], axis=-1)


def resize_bilinear_half_pixel(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres and no antialiasing (OpenCV ``INTER_LINEAR``), in float64.

    Output pixel i samples the input at ``(i + 0.5) * in_size / out_size - 0.5``, clamped to the image
    (edge replication). Works on ``(H, W)`` and ``(H, W, C)``; returns unrounded float64 (callers rint and clip).
    OpenCV itself computes the sample positions in float32 and, for uint8, uses 11-bit fixed-point weights,
    so its uint8 output can differ from ``rint`` of this result by 1.
    """
    values = np.asarray(image, dtype=np.float64)
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    rows_low, rows_high, row_weights = _linear_taps(values.shape[0], height)
    columns_low, columns_high, column_weights = _linear_taps(values.shape[1], width)
    row_shape = (-1,) + (1,) * (values.ndim - 1)
    column_shape = (1, -1) + (1,) * (values.ndim - 2)
    row_weights = row_weights.reshape(row_shape)
    column_weights = column_weights.reshape(column_shape)
    rows = values[rows_low] * (1.0 - row_weights) + values[rows_high] * row_weights
    return rows[:, columns_low] * (1.0 - column_weights) + rows[:, columns_high] * column_weights


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    positions = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    positions = np.clip(positions, 0.0, in_size - 1)
    low = np.floor(positions).astype(np.intp)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, positions - low


def resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a uint8 image with :func:`resize_bilinear_half_pixel`, then ``rint`` and clip to uint8."""
    if image.shape[:2] == (height, width):
        return image
    return np.clip(np.rint(resize_bilinear_half_pixel(image, height, width)), 0, 255).astype(np.uint8)
