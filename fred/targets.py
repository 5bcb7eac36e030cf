"""YOLOv5 v5.0 training targets (bubbliiiing ``get_target``; spec/fred.md §5.7), computed per sample in the dataset.

Input boxes are **letterboxed input pixels** ``[N, 5] = x1, y1, x2, y2, class`` (the network input frame, after
augmentation). Output, per level in head order (out0 stride 32, out1 stride 16, out2 stride 8), a float32 array
``(3, H_l, W_l, 5 + nc)`` holding ``[cx, cy, w, h]`` in that level's **grid units**, 1 (object), one-hot class.

Assignment: with r_k = max(w/a_k, a_k/w, h/b_k, b_k/h) over all 9 anchors (grid units), the candidates are
r_k < 4 plus the argmin; each candidate of the level's mask writes the box into the centre cell and two
neighbours picked by the centre's fractional position; off-grid cells are skipped; when two boxes claim the same
(anchor, cell) the one with the smaller r keeps it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fred.model import ANCHORS, ANCHORS_MASK, STRIDES

ANCHOR_RATIO_THRESHOLD = 4.0


def neighbour_offsets(fx: float, fy: float) -> tuple[tuple[int, int], ...]:
    """(di, dj) of the centre cell and its two extra cells, from the centre's fractional offsets in the cell."""
    if fx > 0.5 and fy > 0.5:
        return (0, 0), (1, 0), (0, 1)
    if fx < 0.5 and fy > 0.5:
        return (0, 0), (-1, 0), (0, 1)
    if fx < 0.5 and fy < 0.5:
        return (0, 0), (-1, 0), (0, -1)
    return (0, 0), (1, 0), (0, -1)


def get_target(boxes: np.ndarray, input_shape: Sequence[int], num_classes: int,
               anchors: Sequence[Sequence[float]] = ANCHORS,
               anchors_mask: Sequence[Sequence[int]] = ANCHORS_MASK) -> list[np.ndarray]:
    """Build the three y_true arrays for one sample.

    ``boxes``: [N, 5] x1, y1, x2, y2 in input pixels and an integer class id (N may be 0); every box must have
    positive width and height (the dataset drops boxes ≤ 1 px). ``input_shape``: (height, width), multiples of 32.
    Returns ``[y_true_out0, y_true_out1, y_true_out2]``, each float32 (3, H/stride, W/stride, 5 + num_classes).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    in_h, in_w = int(input_shape[0]), int(input_shape[1])
    grids = [(in_h // stride, in_w // stride) for stride in STRIDES[:len(anchors_mask)]]
    y_true = [np.zeros((len(mask), gh, gw, 5 + num_classes), dtype=np.float32)
              for mask, (gh, gw) in zip(anchors_mask, grids)]
    if len(boxes) == 0:
        return y_true
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    if np.any(widths <= 0) or np.any(heights <= 0):
        raise ValueError(f"get_target needs boxes with positive width and height (x1<x2, y1<y2), got {boxes[:, :4]}")
    classes = boxes[:, 4].astype(np.int64)
    if np.any(classes < 0) or np.any(classes >= num_classes) or np.any(classes != boxes[:, 4]):
        raise ValueError(f"class ids must be integers in [0, {num_classes}), got {boxes[:, 4]}")
    anchors_px = np.asarray(anchors, dtype=np.float64)

    for level, (mask, stride, (gh, gw)) in enumerate(zip(anchors_mask, STRIDES, grids)):
        best_ratio = np.zeros((len(mask), gh, gw), dtype=np.float32)
        cx = (boxes[:, 0] + boxes[:, 2]) / 2 / stride
        cy = (boxes[:, 1] + boxes[:, 3]) / 2 / stride
        w, h = widths / stride, heights / stride
        level_anchors = anchors_px / stride
        ratios = np.max(np.stack([w[:, None] / level_anchors[None, :, 0], level_anchors[None, :, 0] / w[:, None],
                                  h[:, None] / level_anchors[None, :, 1], level_anchors[None, :, 1] / h[:, None]],
                                 axis=-1), axis=-1)
        for t, box_ratios in enumerate(ratios):
            candidate = box_ratios < ANCHOR_RATIO_THRESHOLD
            candidate[np.argmin(box_ratios)] = True
            i, j = int(np.floor(cx[t])), int(np.floor(cy[t]))
            offsets = neighbour_offsets(cx[t] - i, cy[t] - j)
            for k, anchor_index in enumerate(mask):
                if not candidate[anchor_index]:
                    continue
                ratio = box_ratios[anchor_index]
                for di, dj in offsets:
                    ci, cj = i + di, j + dj
                    if not (0 <= ci < gw and 0 <= cj < gh):
                        continue
                    if best_ratio[k, cj, ci] != 0:
                        if best_ratio[k, cj, ci] > ratio:
                            y_true[level][k, cj, ci, :] = 0
                        else:
                            continue
                    y_true[level][k, cj, ci, :4] = (cx[t], cy[t], w[t], h[t])
                    y_true[level][k, cj, ci, 4] = 1
                    y_true[level][k, cj, ci, 5 + classes[t]] = 1
                    best_ratio[k, cj, ci] = ratio
    return y_true
