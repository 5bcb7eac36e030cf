"""Decoding of raw YOLOv5 head outputs and the evaluation post-processing (spec/fred.md §2.4, §7).

Decoding (σ on all outputs): x = (2σ(tx) − .5 + gx)·stride, w = (2σ(tw))²·anchor_w (likewise y, h);
objectness σ(obj), class probabilities σ(cls). Post-processing per image: score = σ(obj)·max_c σ(cls_c) with
class = argmax (bubbliiiing); keep the top ``pre_nms_topk`` (3000) with score ≥ ``conf_thres`` (.001); per-class
NMS at ``nms_iou`` (.5) through ``torchvision.ops.batched_nms`` when importable, else :func:`batched_nms_torch`
(the same result; ties broken by index); keep the best ``max_det`` (100); undo the letterbox; clip; float boxes.

Shapes are (height, width) throughout: ``input_shape`` is the network input, ``image_shapes`` the original
image sizes. Detections are float32 ``[K, 6] = x1, y1, x2, y2, score, class`` in original-image pixels.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from fred.augment import letterbox_geometry
from fred.model import ANCHORS, ANCHORS_MASK

@functools.lru_cache(maxsize=1)
def torchvision_batched_nms():
    """``torchvision.ops.batched_nms``, or None without torchvision (optional). Looked up on first use: importing
    torchvision.ops costs seconds (it pulls in torch._dynamo), which every process start would pay otherwise."""
    try:
        from torchvision.ops import batched_nms
    except ImportError:
        return None
    return batched_nms


def undo_letterbox(boxes: torch.Tensor, image_shape: Sequence[int], input_shape: Sequence[int]) -> torch.Tensor:
    """Map [K, 4] xyxy boxes from input pixels to original-image pixels and clip them to the image.

    Inverts the dataset's letterbox exactly: it shares :func:`fred.augment.letterbox_geometry`.
    """
    image_h, image_w = int(image_shape[0]), int(image_shape[1])
    new_w, new_h, dx, dy = letterbox_geometry((image_w, image_h), input_shape)
    out = boxes.clone()
    out[:, [0, 2]] = ((boxes[:, [0, 2]] - dx) * (image_w / new_w)).clamp(0, image_w)
    out[:, [1, 3]] = ((boxes[:, [1, 3]] - dy) * (image_h / new_h)).clamp(0, image_h)
    return out


def decode_outputs(outputs: Sequence[torch.Tensor], input_shape: Sequence[int],
                   anchors: Sequence[Sequence[float]] = ANCHORS,
                   anchors_mask: Sequence[Sequence[int]] = ANCHORS_MASK) -> torch.Tensor:
    """Raw head outputs (out0, out1, out2) -> [B, N, 5+nc] fp32 rows: x1, y1, x2, y2 (input pixels), σ(obj), σ(cls).

    N = Σ_l 3·H_l·W_l, ordered by level, anchor, row, column.
    """
    input_h, input_w = int(input_shape[0]), int(input_shape[1])
    rows = []
    for output, mask in zip(outputs, anchors_mask):
        batch, channels, grid_h, grid_w = output.shape
        n_anchors = len(mask)
        attrs = channels // n_anchors
        stride_h, stride_w = input_h / grid_h, input_w / grid_w
        sig = torch.sigmoid(output.float().view(batch, n_anchors, attrs, grid_h, grid_w).permute(0, 1, 3, 4, 2))
        grid_y, grid_x = torch.meshgrid(torch.arange(grid_h, device=output.device, dtype=torch.float32),
                                        torch.arange(grid_w, device=output.device, dtype=torch.float32), indexing="ij")
        anchor_wh = torch.tensor([anchors[i] for i in mask], device=output.device, dtype=torch.float32)
        cx = (sig[..., 0] * 2 - 0.5 + grid_x) * stride_w
        cy = (sig[..., 1] * 2 - 0.5 + grid_y) * stride_h
        w = (sig[..., 2] * 2) ** 2 * anchor_wh[:, 0].view(1, n_anchors, 1, 1)
        h = (sig[..., 3] * 2) ** 2 * anchor_wh[:, 1].view(1, n_anchors, 1, 1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
        rows.append(torch.cat([boxes, sig[..., 4:]], -1).reshape(batch, -1, attrs))
    return torch.cat(rows, 1)


def nms_torch(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS in plain torch, operation for operation like torchvision's CPU kernel.

    Boxes are sorted by score (descending, stable); a box is dropped when its IoU with a kept one is
    > ``iou_threshold``. Returns the kept indices in decreasing score order.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inter_w = (torch.minimum(b[:, None, 2], b[None, :, 2]) - torch.maximum(b[:, None, 0], b[None, :, 0])).clamp(min=0)
    inter_h = (torch.minimum(b[:, None, 3], b[None, :, 3]) - torch.maximum(b[:, None, 1], b[None, :, 1])).clamp(min=0)
    inter = inter_w * inter_h
    overlaps = (inter / (areas[:, None] + areas[None, :] - inter) > iou_threshold).cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    kept = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed |= overlaps[i]
    return order[torch.tensor(kept, dtype=torch.int64, device=boxes.device)]


def batched_nms_torch(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                      iou_threshold: float) -> torch.Tensor:
    """Per-class NMS (each class on its own, exact coordinates); kept indices in decreasing score order.

    Equals ``torchvision.ops.batched_nms`` exactly for one class and whenever torchvision runs its per-class
    path (> 1000 boxes on CPU); its coordinate-offset path for small multi-class sets can differ only where
    float rounding of the offsets moves an IoU across the threshold.
    """
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for class_id in torch.unique(idxs):
        members = torch.nonzero(idxs == class_id).squeeze(1)
        kept[members[nms_torch(boxes[members], scores[members], iou_threshold)]] = True
    kept_indices = torch.nonzero(kept).squeeze(1)
    return kept_indices[torch.sort(scores[kept_indices], descending=True, stable=True).indices]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``torchvision.ops.batched_nms`` when torchvision is importable, else :func:`batched_nms_torch`."""
    fast = torchvision_batched_nms()
    if fast is not None:
        return fast(boxes, scores, idxs, iou_threshold)
    return batched_nms_torch(boxes, scores, idxs, iou_threshold)


def postprocess(decoded: torch.Tensor, input_shape: Sequence[int],
                image_shapes: Sequence[Sequence[int]] | None = None, conf_thres: float = 0.001,
                nms_iou: float = 0.5, pre_nms_topk: int = 3000, max_det: int = 100) -> list[torch.Tensor]:
    """Per image: score filter, top-k, per-class NMS, top ``max_det``, letterbox undo and clipping.

    ``decoded`` comes from :func:`decode_outputs`. ``image_shapes``: per-image original (height, width); None
    keeps boxes in input pixels (clipped to the input). Returns float32 [K, 6] tensors (x1, y1, x2, y2, score,
    class), sorted by decreasing score, on ``decoded``'s device.
    """
    if image_shapes is not None and len(image_shapes) != decoded.shape[0]:
        raise ValueError(f"{len(image_shapes)} image shapes for a batch of {decoded.shape[0]}")
    results = []
    for index, rows in enumerate(decoded):
        class_prob, class_id = rows[:, 5:].max(-1)
        scores = rows[:, 4] * class_prob
        candidates = torch.nonzero(scores >= conf_thres).squeeze(1)
        # Stable orders everywhere (ties by index), so both NMS back ends give the same rows in the same order.
        candidates = candidates[torch.sort(scores[candidates], descending=True, stable=True).indices[:pre_nms_topk]]
        boxes, scores, class_id = rows[candidates, :4], scores[candidates], class_id[candidates]
        keep = torch.sort(batched_nms(boxes, scores, class_id, nms_iou)).values[:max_det]
        boxes, scores, class_id = boxes[keep], scores[keep], class_id[keep]
        if image_shapes is None:
            boxes = undo_letterbox(boxes, input_shape, input_shape)
        else:
            boxes = undo_letterbox(boxes, image_shapes[index], input_shape)
        results.append(torch.cat([boxes, scores[:, None], class_id[:, None].to(boxes.dtype)], 1).float())
    return results


def detect(outputs: Sequence[torch.Tensor], input_shape: Sequence[int],
           image_shapes: Sequence[Sequence[int]] | None = None, conf_thres: float = 0.001, nms_iou: float = 0.5,
           pre_nms_topk: int = 3000, max_det: int = 100, anchors: Sequence[Sequence[float]] = ANCHORS,
           anchors_mask: Sequence[Sequence[int]] = ANCHORS_MASK) -> list[torch.Tensor]:
    """:func:`decode_outputs` then :func:`postprocess`: per image float32 [K, 6] x1, y1, x2, y2, score, class."""
    decoded = decode_outputs(outputs, input_shape, anchors, anchors_mask)
    return postprocess(decoded, input_shape, image_shapes, conf_thres, nms_iou, pre_nms_topk, max_det)
