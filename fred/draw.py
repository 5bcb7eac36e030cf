"""Detections drawn on frames (prediction sheets, the training run's sample grid)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DETECTION_COLOUR = (255, 220, 0)
TRUTH_COLOUR = (0, 220, 90)


def draw_boxes(image: Image.Image, detections: np.ndarray, names: Sequence[str],
               truth: np.ndarray | None = None) -> Image.Image:
    """A copy of ``image`` with detections ``[x1, y1, x2, y2, score, label]`` labelled ``drone 0.87`` (PIL's
    default font) and, optionally, ground-truth boxes ``[x1, y1, x2, y2]`` in another colour."""
    canvas = image.copy()
    pen = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for x1, y1, x2, y2 in ([] if truth is None else np.asarray(truth)[:, :4].tolist()):
        pen.rectangle([x1, y1, x2, y2], outline=TRUTH_COLOUR, width=1)
    for x1, y1, x2, y2, score, label in np.asarray(detections).tolist():
        pen.rectangle([x1, y1, x2, y2], outline=DETECTION_COLOUR, width=1)
        pen.text((x1, max(y1 - 11, 0)), f"{names[int(label)]} {score:.2f}", fill=DETECTION_COLOUR, font=font)
    return canvas
