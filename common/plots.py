"""Curves as PNG files (matplotlib with the Agg backend, so no display is needed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def plot_curves(path: str | Path, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str = "",
                xlabel: str = "step", ylabel: str = "", logy: bool = False, vlines: Sequence[float] = ()) -> Path:
    """Write a line plot of ``{label: (x, y)}`` to ``path`` (atomically); non-finite points are skipped."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from common.checkpoint import atomic_write_bytes

    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    for label, (x, y) in curves.items():
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        keep = np.isfinite(x) & np.isfinite(y)
        if logy:
            keep &= y > 0
        # Few points (per-epoch curves, evaluations every N epochs) get markers, so a single point is visible too.
        axis.plot(x[keep], y[keep], label=label, linewidth=1.2, marker="o" if keep.sum() <= 40 else None,
                  markersize=3)
    for position in vlines:
        axis.axvline(position, color="grey", linestyle=":", linewidth=0.8)
    if logy:
        axis.set_yscale("log")
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(True, alpha=0.3)
    if len(curves) > 1:
        axis.legend()
    figure.tight_layout()

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3 from a gray or RGB array (floats are clipped to 0..255)."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64)), 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return array


def save_image_grid(path: str | Path, rows: Sequence[Sequence[np.ndarray]], columns: Sequence[str] = (),
                    row_labels: Sequence[str] = (), min_cell: int = 128, gap: int = 4) -> Path:
    """Write a PNG grid of images (``rows`` of gray or RGB uint8 arrays, any sizes) with column titles and row
    labels, so a person can compare inputs, baselines and outputs side by side. Small images are enlarged by an
    integer factor (nearest) to about ``min_cell`` pixels, so a 48-pixel demo image stays visible."""
    from PIL import Image, ImageDraw

    from common.checkpoint import atomic_write_bytes

    images = [[_as_rgb(image) for image in row] for row in rows]
    if not images or not images[0]:
        raise ValueError("an image grid needs at least one image")
    smallest = min(min(image.shape[:2]) for row in images for image in row)
    scale = max(1, -(-min_cell // smallest)) if smallest < min_cell else 1
    row_h = [max(image.shape[0] for image in row) * scale for row in images]
    cell_w = max(image.shape[1] for row in images for image in row) * scale
    label_w = 8 + 7 * max((len(label) for label in row_labels), default=0)
    title_h = 16 if columns else 0
    n_cols = max(len(row) for row in images)
    width = label_w + n_cols * (cell_w + gap) + gap
    height = title_h + sum(row_h) + gap * (len(images) + 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(columns):
        draw.text((label_w + gap + c * (cell_w + gap), 2), title, fill=(0, 0, 0))
    for r, row in enumerate(images):
        top, cell_h = title_h + gap + sum(row_h[:r]) + gap * r, row_h[r]
        if r < len(row_labels):
            draw.text((4, top + cell_h // 2 - 6), row_labels[r], fill=(0, 0, 0))
        for c, image in enumerate(row):
            tile = Image.fromarray(image)
            if scale > 1:
                tile = tile.resize((image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.NEAREST)
            left = label_w + gap + c * (cell_w + gap)
            canvas.paste(tile, (left + (cell_w - tile.width) // 2, top + (cell_h - tile.height) // 2))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())
