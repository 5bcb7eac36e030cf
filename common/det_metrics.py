"""Streaming detection evaluator: COCO (pycocotools ``COCOeval`` bbox semantics) and VOC AP (spec/metrics.md §5).

Each ``update`` matches one image at once, because matching never crosses images, and keeps only small records
per kept detection: its score, its rank within the image and class, its image id and, for COCO, 10-bit
match/ignore masks (one bit per IoU threshold) for each of the four area ranges; for VOC a TP/FP/ignored flag.
Ground truth is reduced to counts. Memory therefore grows with the number of kept detections only (about 63
bytes each, at most twice that with buffer growth), never with image sizes or input objects.

Typical use (the trainer streams per batch; with several processes each one updates its own evaluator)::

    evaluator = DetectionEvaluator(num_classes=1, class_names=["drone"])
    for image_id, pred, gt in batches:
        evaluator.update(image_id, pred.boxes, pred.scores, pred.labels, gt.boxes, gt.labels)
    states = accelerate.utils.gather_object([evaluator.state()])
    if accelerator.is_main_process:
        merged = DetectionEvaluator.from_state(states[0])
        for other in states[1:]:
            merged.merge(other)
        results = merged.compute()
        print(format_log_line(results))

Records are ordered by (score descending, image id, rank) before accumulation, which is pycocotools' order
(images by id, stable score sort), so results do not depend on update order or on the number of processes.
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Any

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
MAX_DETS = (1, 10, 100)
AREA_RANGES = {"all": (0.0, 1e10), "small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, 1e10)}
COCO_METRIC_KEYS = (
    "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
    "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large",
)  # fmt: skip

_AREA_LOW = np.array([lo for lo, _ in AREA_RANGES.values()])
_AREA_HIGH = np.array([hi for _, hi in AREA_RANGES.values()])
# pycocotools compares against min(t, 1 - 1e-10) so that a perfect box still matches at t = 1.
_MATCH_THRESHOLDS = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)
_THRESHOLD_BITS = np.arange(len(IOU_THRESHOLDS), dtype=np.uint16)
_N_AREAS = len(AREA_RANGES)

_COCO_RECORD = np.dtype(
    [
        ("image_id", np.int64),
        ("score", np.float64),
        ("label", np.int32),
        ("rank", np.int16),
        ("match", np.uint16, (_N_AREAS,)),
        ("ignore", np.uint16, (_N_AREAS,)),
    ]
)
_VOC_FP, _VOC_TP, _VOC_IGNORED = 0, 1, 2
_VOC_RECORD = np.dtype(
    [("image_id", np.int64), ("score", np.float64), ("label", np.int32), ("rank", np.int32), ("flag", np.int8)]
)
_STATE_FORMAT = "DetectionEvaluator/1"
_CONFIG_KEYS = ("num_classes", "class_names", "coco", "voc", "voc_iou", "voc_pixel_inclusive", "voc07")


class DetectionEvaluatorError(ValueError):
    """Invalid input to the detection evaluator (shapes, labels, values, duplicate images, incompatible states)."""


class _RecordBuffer:
    """A growable array of structured records (capacity doubles), so appends are amortised O(1)."""

    def __init__(self, dtype: np.dtype, capacity: int = 256):
        self._data = np.empty(capacity, dtype=dtype)
        self._size = 0

    def append(self, records: np.ndarray) -> None:
        """Copy ``records`` to the end of the buffer."""
        needed = self._size + len(records)
        if needed > len(self._data):
            grown = np.empty(max(needed, 2 * len(self._data)), dtype=self._data.dtype)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : needed] = records
        self._size = needed

    def view(self) -> np.ndarray:
        """The stored records (a view; copy before handing out)."""
        return self._data[: self._size]

    @property
    def nbytes(self) -> int:
        """Allocated bytes, including unused capacity."""
        return self._data.nbytes


def _to_numpy(value: Any, dtype: type, name: str) -> np.ndarray:
    """Convert a numpy array, sequence or (CPU or GPU) torch tensor to a numpy array of ``dtype``."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if value.is_floating_point():  # bfloat16/float16 have no numpy equivalent in every version
            value = value.double()
        value = value.numpy()
    array = np.asarray(value)
    if array.dtype == object:
        raise DetectionEvaluatorError(f"update(): {name} must be numeric, got an object array")
    if dtype is np.int64 and array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise DetectionEvaluatorError(f"update(): {name} must hold integers, got {array.dtype} values")
    return array.astype(dtype, copy=False)


def _boxes(value: Any, name: str) -> np.ndarray:
    """[N, 4] float64 xyxy boxes with x2 >= x1, y2 >= y1, all finite."""
    boxes = _to_numpy(value, np.float64, name)
    if boxes.size == 0:
        return np.zeros((0, 4))
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise DetectionEvaluatorError(f"update(): {name} must have shape [N, 4] (x1, y1, x2, y2), got {boxes.shape}")
    if not np.all(np.isfinite(boxes)):
        raise DetectionEvaluatorError(f"update(): {name} contains NaN or inf")
    if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
        raise DetectionEvaluatorError(f"update(): {name} must be xyxy with x2 >= x1 and y2 >= y1")
    return boxes


def _vector(value: Any, dtype: type, name: str, length: int, default: Any = None) -> np.ndarray:
    """A 1-D array of ``length`` values; ``default`` fills it when ``value`` is None."""
    if value is None:
        return np.full(length, default, dtype=dtype)
    array = _to_numpy(value, dtype, name).reshape(-1)
    if len(array) != length:
        raise DetectionEvaluatorError(f"update(): {name} has {len(array)} entries, expected {length}")
    return array


def _outside_area_ranges(areas: np.ndarray) -> np.ndarray:
    """[A, N]: whether each area lies outside each COCO area range (ranges include both ends)."""
    return (areas[None, :] < _AREA_LOW[:, None]) | (areas[None, :] > _AREA_HIGH[:, None])


def _coco_iou(det_boxes: np.ndarray, gt_boxes: np.ndarray, gt_crowd: np.ndarray) -> np.ndarray:
    """[D, G] IoU exactly as pycocotools' ``bbIou`` on xywh boxes; crowd GT: intersection / detection area."""
    det_xywh = np.concatenate([det_boxes[:, :2], det_boxes[:, 2:] - det_boxes[:, :2]], axis=1)
    gt_xywh = np.concatenate([gt_boxes[:, :2], gt_boxes[:, 2:] - gt_boxes[:, :2]], axis=1)
    d = det_xywh[:, None, :]
    g = gt_xywh[None, :, :]
    width = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
    height = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
    overlaps = (width > 0) & (height > 0)
    intersection = np.where(overlaps, width * height, 0.0)
    det_area = d[..., 2] * d[..., 3]
    union = np.where(gt_crowd[None, :], det_area, det_area + g[..., 2] * g[..., 3] - intersection)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(overlaps, intersection / union, 0.0)


def _voc_iou(det_boxes: np.ndarray, gt_boxes: np.ndarray, pixel_inclusive: bool) -> np.ndarray:
    """[D, G] VOC IoU; ``pixel_inclusive`` adds the devkit's +1 to every width and height."""
    one = 1.0 if pixel_inclusive else 0.0
    d = det_boxes[:, None, :]
    g = gt_boxes[None, :, :]
    width = np.minimum(d[..., 2], g[..., 2]) - np.maximum(d[..., 0], g[..., 0]) + one
    height = np.minimum(d[..., 3], g[..., 3]) - np.maximum(d[..., 1], g[..., 1]) + one
    overlaps = (width > 0) & (height > 0)
    intersection = np.where(overlaps, width * height, 0.0)
    det_area = (d[..., 2] - d[..., 0] + one) * (d[..., 3] - d[..., 1] + one)
    gt_area = (g[..., 2] - g[..., 0] + one) * (g[..., 3] - g[..., 1] + one)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(overlaps, intersection / (det_area + gt_area - intersection), 0.0)


def _coco_match(iou: np.ndarray, gt_ignored: np.ndarray, gt_crowd: np.ndarray) -> np.ndarray:
    """Greedy COCOeval matching of score-sorted detections, for all area ranges and thresholds at once.

    ``iou`` is [D, G], ``gt_ignored`` [A, G]. Returns [A, T, D] indices of the matched GT (-1: unmatched).
    pycocotools walks GT sorted non-ignored first and stops at the first ignored GT once it holds a
    non-ignored candidate; that is the same as choosing within the non-ignored available GT above the threshold
    if there is one, else within the ignored ones, taking the last GT with the maximal IoU (a later equal IoU
    replaces the candidate). Crowd GT stay available after a match.
    """
    n_dets, n_gts = iou.shape
    matched = np.full((_N_AREAS, len(IOU_THRESHOLDS), n_dets), -1, dtype=np.intp)
    if n_dets == 0 or n_gts == 0:
        return matched
    taken = np.zeros((_N_AREAS, len(IOU_THRESHOLDS), n_gts), dtype=bool)
    above = iou[:, None, :] >= _MATCH_THRESHOLDS[None, :, None]  # [D, T, G]
    preferable = ~gt_ignored[:, None, :]
    reusable = gt_crowd[None, None, :]
    # A detection below the lowest threshold against every GT can neither match nor block a later one.
    for det in np.flatnonzero(above[:, 0, :].any(axis=1)):
        available = above[det][None] & (reusable | ~taken)  # [A, T, G]
        preferred = available & preferable
        chosen_set = np.where(preferred.any(axis=-1, keepdims=True), preferred, available)
        found = chosen_set.any(axis=-1)
        if not found.any():
            continue
        masked_iou = np.where(chosen_set, iou[det], -1.0)
        last_best = n_gts - 1 - np.argmax(masked_iou[..., ::-1], axis=-1)
        area_idx, thr_idx = np.nonzero(found)
        gt_idx = last_best[area_idx, thr_idx]
        matched[area_idx, thr_idx, det] = gt_idx
        taken[area_idx, thr_idx, gt_idx] = True
    return matched


def _precision_at_recall_thresholds(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """COCO's 101 samples: precision made non-increasing from the right, read at searchsorted('left') positions."""
    if len(precision) == 0:
        return np.zeros(len(RECALL_THRESHOLDS))
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    positions = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
    sampled = np.zeros(len(RECALL_THRESHOLDS))
    inside = positions < len(envelope)
    sampled[inside] = envelope[positions[inside]]
    return sampled


def coco_ap_101(recall: Any, precision: Any) -> float:
    """COCO 101-point AP from cumulative recall/precision arrays of score-sorted detections (missing points = 0)."""
    recall = np.asarray(recall, dtype=np.float64).reshape(-1)
    precision = np.asarray(precision, dtype=np.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise ValueError(f"coco_ap_101: recall {recall.shape} and precision {precision.shape} differ in length")
    return float(np.mean(_precision_at_recall_thresholds(recall, precision)))


def voc_ap(recall: Any, precision: Any, voc07: bool = False) -> float:
    """VOC AP from cumulative recall/precision arrays of score-sorted detections.

    All-point (default): sentinels (0, ..., 1) on recall and (0, ..., 0) on precision, precision made
    non-increasing from the right, AP = Σ (r_i − r_{i−1}) p_i where recall changes. ``voc07``: mean over
    t = 0, 0.1, ..., 1 of max{precision : recall ≥ t}, 0 where no point reaches t.
    """
    recall = np.asarray(recall, dtype=np.float64).reshape(-1)
    precision = np.asarray(precision, dtype=np.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise ValueError(f"voc_ap: recall {recall.shape} and precision {precision.shape} differ in length")
    if voc07:
        total = 0.0
        for threshold in np.arange(0.0, 1.1, 0.1):  # the devkit's points: i·0.1 for i = 0..10
            reached = precision[recall >= threshold]
            total += (reached.max() if reached.size else 0.0) / 11.0
        return float(total)
    padded_recall = np.concatenate([[0.0], recall, [1.0]])
    envelope = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    changes = np.flatnonzero(padded_recall[1:] != padded_recall[:-1])
    return float(np.sum((padded_recall[changes + 1] - padded_recall[changes]) * envelope[changes + 1]))


def _mean_valid(values: np.ndarray) -> float:
    """pycocotools' summary: mean of the entries > -1, or -1 if there are none."""
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def _precision_recall_f1(is_tp: np.ndarray, is_fp: np.ndarray, n_gt: int) -> dict[str, float]:
    """Micro precision, recall and F1 from TP/FP indicators of the selected detections."""
    tp, fp = int(is_tp.sum()), int(is_fp.sum())
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / n_gt if n_gt else math.nan
    if math.isnan(precision) or math.isnan(recall):
        f1 = math.nan
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


class DetectionEvaluator:
    """Streaming COCO/VOC detection evaluator (spec/metrics.md §5); labels are class indices 0..num_classes-1.

    ``voc_iou`` is the VOC matching threshold (the result keys keep the name ``voc_map50``);
    ``voc_pixel_inclusive`` adds the devkit's +1 pixel to VOC widths and heights; ``voc07`` adds the 11-point
    VOC2007 AP next to the all-point AP. COCO uses ``gt_iscrowd`` and areas as pycocotools does and has no
    notion of "difficult"; VOC treats crowd GT like difficult GT (matched detections are ignored, never counted).
    """

    def __init__(
        self,
        num_classes: int,
        class_names: list[str] | None = None,
        coco: bool = True,
        voc: bool = True,
        voc_iou: float = 0.5,
        voc_pixel_inclusive: bool = True,
        voc07: bool = False,
    ):
        if int(num_classes) < 1:
            raise DetectionEvaluatorError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise DetectionEvaluatorError(
                f"class_names has {len(class_names)} names, expected num_classes={num_classes}"
            )
        if not (coco or voc):
            raise DetectionEvaluatorError("enable at least one of coco=True or voc=True")
        if not 0.0 < voc_iou <= 1.0:
            raise DetectionEvaluatorError(f"voc_iou must be in (0, 1], got {voc_iou}")
        self.num_classes = int(num_classes)
        names = class_names if class_names is not None else range(self.num_classes)
        self.class_names = [str(name) for name in names]
        self.coco = bool(coco)
        self.voc = bool(voc)
        self.voc_iou = float(voc_iou)
        self.voc_pixel_inclusive = bool(voc_pixel_inclusive)
        self.voc07 = bool(voc07)
        self._image_ids = _RecordBuffer(np.dtype(np.int64))
        self._coco_records = _RecordBuffer(_COCO_RECORD)
        self._voc_records = _RecordBuffer(_VOC_RECORD)
        self._coco_gt_counts = np.zeros((self.num_classes, _N_AREAS), dtype=np.int64)  # non-ignored GT
        self._voc_gt_counts = np.zeros(self.num_classes, dtype=np.int64)  # non-difficult, non-crowd GT

    def update(
        self,
        image_id: int,
        pred_boxes: Any,
        pred_scores: Any,
        pred_labels: Any,
        gt_boxes: Any,
        gt_labels: Any,
        gt_iscrowd: Any = None,
        gt_difficult: Any = None,
        gt_area: Any = None,
    ) -> None:
        """Match one image's detections ([N, 4] xyxy in original pixels, scores, labels) against its GT.

        Inputs may be numpy arrays, sequences or torch tensors; nothing refers to them afterwards. ``gt_area``
        replaces w·h as the COCO area of each GT (for the area ranges only, as pycocotools does).
        """
        image_id = operator.index(image_id)
        pred_boxes = _boxes(pred_boxes, "pred_boxes")
        n_preds = len(pred_boxes)
        pred_scores = _vector(pred_scores, np.float64, "pred_scores", n_preds)
        pred_labels = _vector(pred_labels, np.int64, "pred_labels", n_preds)
        gt_boxes = _boxes(gt_boxes, "gt_boxes")
        n_gts = len(gt_boxes)
        gt_labels = _vector(gt_labels, np.int64, "gt_labels", n_gts)
        gt_crowd = _vector(gt_iscrowd, bool, "gt_iscrowd", n_gts, default=False)
        gt_difficult = _vector(gt_difficult, bool, "gt_difficult", n_gts, default=False)
        gt_area = (
            (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
            if gt_area is None
            else _vector(gt_area, np.float64, "gt_area", n_gts)
        )
        if not np.all(np.isfinite(pred_scores)):
            raise DetectionEvaluatorError(f"update(): pred_scores of image {image_id} contain NaN or inf")
        for name, labels in (("pred_labels", pred_labels), ("gt_labels", gt_labels)):
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise DetectionEvaluatorError(
                    f"update(): {name} of image {image_id} must lie in [0, {self.num_classes - 1}], "
                    f"got {labels.min()}..{labels.max()}"
                )

        coco_parts, voc_parts = [], []
        for label in np.union1d(pred_labels, gt_labels):
            det_idx = np.flatnonzero(pred_labels == label)
            det_idx = det_idx[np.argsort(-pred_scores[det_idx], kind="stable")]
            gt_idx = np.flatnonzero(gt_labels == label)
            if self.coco:
                coco_parts.append(
                    self._match_coco(image_id, label, pred_boxes[det_idx[: MAX_DETS[-1]]],
                                     pred_scores[det_idx[: MAX_DETS[-1]]], gt_boxes[gt_idx], gt_crowd[gt_idx],
                                     gt_area[gt_idx])
                )  # fmt: skip
            if self.voc:
                voc_parts.append(
                    self._match_voc(image_id, label, pred_boxes[det_idx], pred_scores[det_idx], gt_boxes[gt_idx],
                                    gt_difficult[gt_idx] | gt_crowd[gt_idx])
                )  # fmt: skip
        if coco_parts:
            self._coco_records.append(np.concatenate(coco_parts))
        if voc_parts:
            self._voc_records.append(np.concatenate(voc_parts))
        self._image_ids.append(np.array([image_id], dtype=np.int64))

    def _match_coco(self, image_id, label, det_boxes, det_scores, gt_boxes, gt_crowd, gt_area) -> np.ndarray:
        """COCO records of one image and class (detections already score-sorted and cut to the top 100)."""
        gt_ignored = gt_crowd[None, :] | _outside_area_ranges(gt_area)
        self._coco_gt_counts[label] += (~gt_ignored).sum(axis=1)
        n_dets = len(det_boxes)
        records = np.zeros(n_dets, dtype=_COCO_RECORD)
        if n_dets == 0:
            return records
        iou = _coco_iou(det_boxes, gt_boxes, gt_crowd)
        matched_gt = _coco_match(iou, gt_ignored, gt_crowd)  # [A, T, D]
        is_matched = matched_gt >= 0
        det_area = (det_boxes[:, 2] - det_boxes[:, 0]) * (det_boxes[:, 3] - det_boxes[:, 1])
        is_ignored = ~is_matched & _outside_area_ranges(det_area)[:, None, :]
        if len(gt_boxes):
            area_idx = np.arange(_N_AREAS)[:, None, None]
            is_ignored |= is_matched & gt_ignored[area_idx, np.maximum(matched_gt, 0)]
        records["image_id"] = image_id
        records["score"] = det_scores
        records["label"] = label
        records["rank"] = np.arange(n_dets)
        shifts = _THRESHOLD_BITS[None, :, None]
        records["match"] = (is_matched.astype(np.uint16) << shifts).sum(axis=1, dtype=np.uint16).T
        records["ignore"] = (is_ignored.astype(np.uint16) << shifts).sum(axis=1, dtype=np.uint16).T
        return records

    def _match_voc(self, image_id, label, det_boxes, det_scores, gt_boxes, gt_difficult) -> np.ndarray:
        """VOC records of one image and class: each detection, in score order, takes its best-IoU GT."""
        self._voc_gt_counts[label] += int((~gt_difficult).sum())
        n_dets = len(det_boxes)
        records = np.zeros(n_dets, dtype=_VOC_RECORD)
        records["image_id"] = image_id
        records["score"] = det_scores
        records["label"] = label
        records["rank"] = np.arange(n_dets)
        records["flag"] = _VOC_FP
        if n_dets == 0 or len(gt_boxes) == 0:
            return records
        iou = _voc_iou(det_boxes, gt_boxes, self.voc_pixel_inclusive)
        best_gt = np.argmax(iou, axis=1)  # first maximum, as the devkit's strict '>' scan
        hit = iou[np.arange(n_dets), best_gt] >= self.voc_iou
        difficult_hit = hit & gt_difficult[best_gt]
        records["flag"][difficult_hit] = _VOC_IGNORED
        # The first (highest-scoring) detection to hit an unused GT is the TP; later hits are duplicates (FP).
        regular_hits = np.flatnonzero(hit & ~difficult_hit)
        _, first = np.unique(best_gt[regular_hits], return_index=True)
        records["flag"][regular_hits[first]] = _VOC_TP
        return records

    def state(self) -> dict[str, Any]:
        """A picklable snapshot (plain types and numpy arrays) for ``accelerate.utils.gather_object``."""
        return {
            "format": _STATE_FORMAT,
            **{key: getattr(self, key) for key in _CONFIG_KEYS},
            "image_ids": self._image_ids.view().copy(),
            "coco_records": self._coco_records.view().copy(),
            "coco_gt_counts": self._coco_gt_counts.copy(),
            "voc_records": self._voc_records.view().copy(),
            "voc_gt_counts": self._voc_gt_counts.copy(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DetectionEvaluator:
        """An evaluator holding exactly the records of ``state``."""
        cls._check_state(state)
        evaluator = cls(**{key: state[key] for key in _CONFIG_KEYS})
        evaluator.merge(state)
        return evaluator

    @staticmethod
    def _check_state(state: Any) -> None:
        """Raise unless ``state`` came from ``DetectionEvaluator.state()``."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise DetectionEvaluatorError(
                f"merge(): expected a DetectionEvaluator or the dict from its state() ({_STATE_FORMAT}), "
                f"got {type(state).__name__}"
            )

    def merge(self, other: DetectionEvaluator | dict[str, Any]) -> None:
        """Add another evaluator's records (or a ``state()`` dict, e.g. from another process) to this one."""
        state = other.state() if isinstance(other, DetectionEvaluator) else other
        self._check_state(state)
        mismatched = [key for key in _CONFIG_KEYS if state[key] != getattr(self, key)]
        if mismatched:
            raise DetectionEvaluatorError(
                "merge(): evaluators differ in "
                + ", ".join(f"{key} ({state[key]!r} vs {getattr(self, key)!r})" for key in mismatched)
            )
        self._image_ids.append(state["image_ids"])
        self._coco_records.append(state["coco_records"])
        self._voc_records.append(state["voc_records"])
        self._coco_gt_counts += state["coco_gt_counts"]
        self._voc_gt_counts += state["voc_gt_counts"]

    def nbytes(self) -> int:
        """Bytes held by the evaluator's state (allocated buffers, including spare capacity)."""
        return (
            self._image_ids.nbytes
            + self._coco_records.nbytes
            + self._voc_records.nbytes
            + self._coco_gt_counts.nbytes
            + self._voc_gt_counts.nbytes
        )

    def compute(self) -> dict[str, Any]:
        """All metrics (spec/metrics.md §5.1); NaN marks an undefined metric, ``stats`` uses COCOeval's -1.

        Keys with ``coco``: ``map map_50 map_75 map_small map_medium map_large mar_1 mar_10 mar_100 mar_small
        mar_medium mar_large``, ``stats`` (12 floats, COCOeval order), ``map_per_class`` and ``map_50_per_class``
        (class name → AP50:95 / AP50, NaN without GT). With ``voc``: ``voc_map50``, ``voc_ap50_per_class``
        (and ``voc07_map50``, ``voc07_ap50_per_class``). Always: ``precision``, ``recall``, ``f1`` of the
        detections with score >= 0.5 (micro over classes), matched as COCO at IoU 0.5 (area all, top 100) when
        ``coco`` is on, else as VOC; ``prf_matching`` names which; ``n_images``.
        """
        image_ids = self._image_ids.view()
        unique_ids, counts = np.unique(image_ids, return_counts=True)
        if np.any(counts > 1):
            repeated = unique_ids[counts > 1]
            raise DetectionEvaluatorError(
                f"compute(): {len(repeated)} image id(s) were updated more than once (e.g. {repeated[:5].tolist()}); "
                "each image must be evaluated once: give images unique ids and drop the samples a distributed "
                "sampler repeats to even out the last batch"
            )
        results: dict[str, Any] = {"n_images": int(len(unique_ids))}
        if self.coco:
            results.update(self._compute_coco())
        if self.voc:
            results.update(self._compute_voc())
        results.update(self._compute_prf())
        checked = (*COCO_METRIC_KEYS, "voc_map50", "precision", "recall")
        undefined = [key for key in checked if key in results and math.isnan(results[key])]
        if undefined:
            warnings.warn(
                "detection metrics undefined (no ground truth in range, or no detections with score >= 0.5): "
                + ", ".join(undefined),
                stacklevel=2,
            )
        return results

    @staticmethod
    def _sorted_by_class(records: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """Records ordered by class, then score descending, image id and rank (pycocotools' stable order)."""
        order = np.lexsort((records["rank"], records["image_id"], -records["score"], records["label"]))
        records = records[order]
        return records, np.searchsorted(records["label"], np.arange(num_classes + 1))

    def _compute_coco(self) -> dict[str, Any]:
        """COCOeval accumulate + summarize on the stored records."""
        records, bounds = self._sorted_by_class(self._coco_records.view(), self.num_classes)
        n_thr, n_rec = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)
        precision = -np.ones((n_thr, n_rec, self.num_classes, _N_AREAS, len(MAX_DETS)))
        recall = -np.ones((n_thr, self.num_classes, _N_AREAS, len(MAX_DETS)))
        bit_shifts = _THRESHOLD_BITS[:, None]
        for label in range(self.num_classes):
            class_records = records[bounds[label] : bounds[label + 1]]
            for area in range(_N_AREAS):
                n_gt = self._coco_gt_counts[label, area]
                if n_gt == 0:
                    continue
                for m, max_dets in enumerate(MAX_DETS):
                    kept = class_records[class_records["rank"] < max_dets]
                    matched = ((kept["match"][:, area][None, :] >> bit_shifts) & 1).astype(bool)  # [T, N]
                    ignored = ((kept["ignore"][:, area][None, :] >> bit_shifts) & 1).astype(bool)
                    tp_sum = np.cumsum(matched & ~ignored, axis=1).astype(np.float64)
                    fp_sum = np.cumsum(~matched & ~ignored, axis=1).astype(np.float64)
                    rc = tp_sum / n_gt
                    pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
                    recall[:, label, area, m] = rc[:, -1] if len(kept) else 0.0
                    for t in range(n_thr):
                        precision[t, :, label, area, m] = _precision_at_recall_thresholds(rc[t], pr[t])
        all_area, last_max = 0, len(MAX_DETS) - 1
        stats = [
            _mean_valid(precision[:, :, :, all_area, last_max]),
            _mean_valid(precision[0, :, :, all_area, last_max]),
            _mean_valid(precision[5, :, :, all_area, last_max]),  # IoU 0.75
            *(_mean_valid(precision[:, :, :, area, last_max]) for area in (1, 2, 3)),
            *(_mean_valid(recall[:, :, all_area, m]) for m in range(len(MAX_DETS))),
            *(_mean_valid(recall[:, :, area, last_max]) for area in (1, 2, 3)),
        ]
        results: dict[str, Any] = {key: math.nan if v == -1 else v for key, v in zip(COCO_METRIC_KEYS, stats)}
        results["stats"] = stats
        has_gt = self._coco_gt_counts[:, all_area] > 0
        results["map_per_class"] = {
            name: float(precision[:, :, k, all_area, last_max].mean()) if has_gt[k] else math.nan
            for k, name in enumerate(self.class_names)
        }
        results["map_50_per_class"] = {
            name: float(precision[0, :, k, all_area, last_max].mean()) if has_gt[k] else math.nan
            for k, name in enumerate(self.class_names)
        }
        return results

    def _compute_voc(self) -> dict[str, Any]:
        """VOC AP per class from the globally score-sorted TP/FP flags; mAP over classes with GT."""
        records, bounds = self._sorted_by_class(self._voc_records.view(), self.num_classes)
        variants = {"voc": False, "voc07": True} if self.voc07 else {"voc": False}
        per_class = {variant: {} for variant in variants}
        for label, name in enumerate(self.class_names):
            n_pos = self._voc_gt_counts[label]
            flags = records["flag"][bounds[label] : bounds[label + 1]]
            flags = flags[flags != _VOC_IGNORED]  # ignored detections change neither TP nor FP counts
            tp_sum = np.cumsum(flags == _VOC_TP)
            fp_sum = np.cumsum(flags == _VOC_FP)
            for variant, use_voc07 in variants.items():
                per_class[variant][name] = (
                    voc_ap(tp_sum / n_pos, tp_sum / (tp_sum + fp_sum), voc07=use_voc07) if n_pos else math.nan
                )
        results: dict[str, Any] = {}
        for variant in variants:
            values = [v for v in per_class[variant].values() if not math.isnan(v)]
            results[f"{variant}_map50"] = float(np.mean(values)) if values else math.nan
            results[f"{variant}_ap50_per_class"] = per_class[variant]
        return results

    def _compute_prf(self) -> dict[str, Any]:
        """Micro precision/recall/F1 of detections with score >= 0.5."""
        if self.coco:
            records = self._coco_records.view()
            confident = records[records["score"] >= 0.5]
            matched = (confident["match"][:, 0] & 1).astype(bool)  # area all, IoU 0.5
            ignored = (confident["ignore"][:, 0] & 1).astype(bool)
            prf = _precision_recall_f1(matched & ~ignored, ~matched & ~ignored, int(self._coco_gt_counts[:, 0].sum()))
            return {**prf, "prf_matching": "coco_iou50"}
        records = self._voc_records.view()
        flags = records["flag"][records["score"] >= 0.5]
        prf = _precision_recall_f1(flags == _VOC_TP, flags == _VOC_FP, int(self._voc_gt_counts.sum()))
        return {**prf, "prf_matching": "voc"}


def format_log_line(results: dict[str, Any]) -> str:
    """The one-line summary ``mAP50-95 x.xxxx | mAP50 x.xxxx | mAP75 x.xxxx | APs/m/l a/b/c | VOC-mAP50 x.xxxx``."""
    parts = []
    if "map" in results:
        parts += [
            f"mAP50-95 {results['map']:.4f}",
            f"mAP50 {results['map_50']:.4f}",
            f"mAP75 {results['map_75']:.4f}",
            "APs/m/l " + "/".join(f"{results[k]:.4f}" for k in ("map_small", "map_medium", "map_large")),
        ]
    if "voc_map50" in results:
        parts.append(f"VOC-mAP50 {results['voc_map50']:.4f}")
    if "voc07_map50" in results:
        parts.append(f"VOC07-mAP50 {results['voc07_map50']:.4f}")
    return " | ".join(parts)
