"""Streamed detection evaluation of FRED models (spec/fred.md §7; metric definitions in spec/metrics.md §5).

The model (the EMA model in training) runs in eval mode on letterboxed inputs, the event stream on the real
``Event/Frames`` PNGs, always on the split's effective pairs so every modality is scored on identical frames.
Per batch the raw outputs are decoded (:func:`fred.decode.detect`: score ≥ .001, top 3000, per-class NMS .5,
top 100, letterbox undone, clipped float boxes), matched image by image by a
:class:`common.det_metrics.DetectionEvaluator` and appended to ``detections_<split>.json`` (COCO results);
``gt_<split>.json`` (COCO ground truth, empty frames included) is written alongside. Nothing else is kept per
image, so the streaming pass grows only by the evaluator's small per-detection records (about 38 bytes per kept
detection), not with images or outputs. Computing AP at the end (:meth:`DetectionEvaluator.compute`) needs
temporary arrays proportional to the number of kept detections.
When the data has ``demo_meta.json``, AP50 is also reported on dark and on bright frames.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from common.checkpoint import FILE_MODE, atomic_write_text
from common.det_metrics import DetectionEvaluator
from fred.config import FredConfig
from fred.decode import detect
from fred.index import CLASS_NAMES


@dataclass(frozen=True)
class EvalSettings:
    """Detection post-processing (spec §7) and how much of the split to score."""

    conf_thres: float = 0.001
    nms_iou: float = 0.5
    pre_nms_topk: int = 3000
    max_det: int = 100
    voc: bool = False
    max_batches: int | None = None


def model_outputs(model: nn.Module, batch: dict, modality: str) -> tuple[torch.Tensor, ...]:
    """Raw head outputs for a batch: ``model(rgb, event)`` for dual, ``model(batch[modality])`` otherwise."""
    if modality == "dual":
        return model(batch["rgb"], batch["event"])
    return model(batch[modality])


def _batches(loader, max_batches: int | None):
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            return
        yield batch


def _to_device(batch: dict, device: torch.device, keys: Sequence[str]) -> dict:
    moved = dict(batch)
    for key in keys:
        if key in moved:
            moved[key] = moved[key].to(device, non_blocking=True)
    return moved


@torch.no_grad()
def validation_loss(model: nn.Module, loader, criterion: nn.Module, modality: str, device: torch.device,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                    max_batches: int | None = None) -> float:
    """Batch-size-weighted mean loss of ``model`` (in eval mode) over ``loader`` (letterbox only); NaN if empty."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in _batches(loader, max_batches):
        batch = _to_device(batch, device, ("rgb", "event"))
        with autocast():
            outputs = model_outputs(model, batch, modality)
        y_true = [y.to(device) for y in batch["y_true"]]
        size = len(batch["image_id"])
        total += criterion(outputs, y_true)["loss"].double() * size
        count += size
    model.train(was_training)
    return float(total / count) if count else float("nan")


class JsonArrayWriter:
    """Writes a JSON array item by item into a temporary file, renamed into place on :meth:`close`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.fchmod(fd, FILE_MODE)  # readable by others, like every output file
        self._handle = os.fdopen(fd, "w", encoding="utf-8")
        self._handle.write("[")
        self.count = 0

    def extend(self, items: Sequence[dict]) -> None:
        """Append items (written immediately)."""
        for item in items:
            self._handle.write(("\n" if self.count == 0 else ",\n") + json.dumps(item))
            self.count += 1

    def close(self) -> Path:
        """Finish the array and move the file into place."""
        self._handle.write("\n]\n")
        self._handle.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial file."""
        self._handle.close()
        Path(self._tmp).unlink(missing_ok=True)


class CocoGroundTruthWriter:
    """Streams a COCO ground-truth file: ``images`` into it, ``annotations`` into a side file merged at the end."""

    def __init__(self, path: Path, class_names: Sequence[str]):
        self.path = Path(path)
        self.class_names = list(class_names)
        self.images = JsonArrayWriter(self.path.with_name(self.path.name + ".images"))
        self.annotations = JsonArrayWriter(self.path.with_name(self.path.name + ".annotations"))

    def add(self, entry) -> None:
        """One image record and its boxes (xyxy → xywh, area w·h, iscrowd 0)."""
        self.images.extend([{"id": int(entry.image_id), "width": int(entry.width), "height": int(entry.height),
                             "file_name": str(entry.rgb_path or entry.event_path),
                             "sequence_id": entry.sequence_id, "frame_index": int(entry.frame_index)}])
        records = []
        for x1, y1, x2, y2 in np.asarray(entry.boxes, dtype=np.float64).reshape(-1, 4):
            width, height = x2 - x1, y2 - y1
            records.append({"id": self.annotations.count + len(records) + 1, "image_id": int(entry.image_id),
                            "bbox": [float(x1), float(y1), float(width), float(height)],
                            "area": float(width * height), "category_id": 1, "iscrowd": 0})
        self.annotations.extend(records)

    def close(self) -> Path:
        """Assemble ``{"images", "annotations", "categories"}`` chunk by chunk and move it into place."""
        images, annotations = self.images.close(), self.annotations.close()
        categories = json.dumps([{"id": k + 1, "name": name} for k, name in enumerate(self.class_names)])
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for key, part in (("images", images), ("annotations", annotations)):
                out.write(("{" if key == "images" else ",") + f'"{key}": ')
                with open(part, encoding="utf-8") as source:
                    while chunk := source.read(1 << 20):
                        out.write(chunk)
                part.unlink()
            out.write(f',"categories": {categories}}}\n')
        os.replace(tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial files."""
        self.images.abort()
        self.annotations.abort()


def detection_records(image_id: int, rows: np.ndarray) -> list[dict]:
    """COCO results (``bbox`` = x, y, w, h; ``category_id`` = class + 1) of one image's [K, 6] detections."""
    return [{"image_id": int(image_id), "category_id": int(c) + 1,
             "bbox": [float(x1), float(y1), float(x2) - float(x1), float(y2) - float(y1)], "score": float(s)}
            for x1, y1, x2, y2, s, c in rows.tolist()]


@torch.no_grad()
def stream_detections(model: nn.Module, loader, modality: str, input_shape: Sequence[int], results_dir: Path,
                      split: str, device: torch.device,
                      autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                      settings: EvalSettings = EvalSettings(),
                      dark: dict[tuple[str, int], bool] | None = None,
                      class_names: Sequence[str] = CLASS_NAMES) -> tuple[dict[str, DetectionEvaluator], int]:
    """The streaming pass: run ``model`` on the loader's dataset (an evaluation
    :class:`fred.dataset.FredDataset`), match each image into the evaluators and append its detections to
    ``detections_<split>.json`` (ground truth to ``gt_<split>.json``) in ``results_dir``.

    Returns the evaluators (``all``, plus ``dark`` and ``bright`` when ``dark`` flags keyed by (sequence id,
    frame index) are given) and the number of detections written.
    """
    entries = {sample.entry.image_id: sample.entry for sample in loader.dataset.samples}
    results_dir = Path(results_dir)
    evaluators = {"all": DetectionEvaluator(len(class_names), list(class_names), coco=True, voc=settings.voc)}
    if dark is not None:
        for name in ("dark", "bright"):
            evaluators[name] = DetectionEvaluator(len(class_names), list(class_names), coco=True, voc=False)
    detections = JsonArrayWriter(results_dir / f"detections_{split}.json")
    ground_truth = CocoGroundTruthWriter(results_dir / f"gt_{split}.json", class_names)
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(loader, settings.max_batches):
            inputs = _to_device(batch, device, ("rgb", "event"))
            with autocast():
                outputs = model_outputs(model, inputs, modality)
            image_shapes = [tuple(size) for size in batch["orig_size"].tolist()]
            found = detect(outputs, input_shape, image_shapes, conf_thres=settings.conf_thres,
                           nms_iou=settings.nms_iou, pre_nms_topk=settings.pre_nms_topk, max_det=settings.max_det)
            for image_id, rows in zip(batch["image_id"].tolist(), found):
                entry = entries[image_id]
                rows = rows.cpu().numpy()
                gt_boxes = np.asarray(entry.boxes, dtype=np.float64).reshape(-1, 4)
                targets = ["all"]
                if dark is not None:
                    targets.append("dark" if dark.get((entry.sequence_id, entry.frame_index), False) else "bright")
                for name in targets:
                    evaluators[name].update(image_id, rows[:, :4], rows[:, 4], rows[:, 5].astype(np.int64),
                                            gt_boxes, np.zeros(len(gt_boxes), dtype=np.int64))
                detections.extend(detection_records(image_id, rows))
                ground_truth.add(entry)
    except BaseException:
        detections.abort()
        ground_truth.abort()
        raise
    finally:
        model.train(was_training)
    count = detections.count
    detections.close()
    ground_truth.close()
    return evaluators, count


def evaluate_detections(model: nn.Module, loader, modality: str, input_shape: Sequence[int], results_dir: Path,
                        split: str, device: torch.device,
                        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                        settings: EvalSettings = EvalSettings(),
                        dark: dict[tuple[str, int], bool] | None = None,
                        class_names: Sequence[str] = CLASS_NAMES) -> dict:
    """:func:`stream_detections`, then the metrics. Returns a summary: ``ap50_95``, ``ap50``, ``ap75``, ``aps``,
    ``apm``, ``apl``, ``ar100`` (COCOeval semantics; 0 without detections), ``voc_ap50`` (with ``settings.voc``),
    ``ap50_dark`` / ``ap50_bright`` (with ``dark`` flags), ``stats`` (COCOeval's 12 values), ``n_images``,
    ``n_detections``, ``split``.
    """
    evaluators, count = stream_detections(model, loader, modality, input_shape, results_dir, split, device, autocast,
                                          settings, dark, class_names)
    return summarize(evaluators, split, count)


def _zero_if_undefined(value: float) -> float:
    """COCOeval's undefined (-1 / NaN, e.g. no ground truth in an area range) reported as 0 (spec §7)."""
    return 0.0 if value is None or not math.isfinite(value) or value < 0 else float(value)


def summarize(evaluators: dict[str, DetectionEvaluator], split: str, n_detections: int) -> dict:
    """The summary dict of :func:`evaluate_detections` from its evaluators."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined area ranges are reported as 0 below
        results = {name: evaluator.compute() for name, evaluator in evaluators.items()}
    main = results["all"]
    stats = main["stats"]
    summary = {"split": split, "n_images": main["n_images"], "n_detections": n_detections,
               "stats": [float(v) for v in stats]}
    for key, index in (("ap50_95", 0), ("ap50", 1), ("ap75", 2), ("aps", 3), ("apm", 4), ("apl", 5), ("ar100", 8)):
        summary[key] = _zero_if_undefined(stats[index])
    if "voc_map50" in main:
        summary["voc_ap50"] = _zero_if_undefined(main["voc_map50"])
    for name in ("dark", "bright"):
        if name in results:
            summary[f"ap50_{name}"] = _zero_if_undefined(results[name]["map_50"])
            summary[f"n_images_{name}"] = results[name]["n_images"]
    return summary


def summary_line(summary: dict) -> str:
    """``AP50 0.4123 AP50:95 0.1234 ...`` for the console."""
    parts = [f"[{summary['split']}] AP50 {summary['ap50']:.4f}", f"AP50:95 {summary['ap50_95']:.4f}",
             f"AP75 {summary['ap75']:.4f}", f"AR100 {summary['ar100']:.4f}"]
    if "voc_ap50" in summary:
        parts.append(f"VOC-AP50 {summary['voc_ap50']:.4f}")
    if "ap50_dark" in summary:
        shown = [f"{summary[f'ap50_{name}']:.4f}" if summary.get(f"n_images_{name}") else "n/a (no such frames)"
                 for name in ("dark", "bright")]
        parts.append(f"AP50 dark {shown[0]} / bright {shown[1]}")
    return " | ".join(parts)


COCO_SUMMARY_LABELS = (
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
)


def write_results(path: Path, summary: dict, title: str) -> Path:
    """``results.txt``: the COCO summary (pycocotools layout), VOC AP50 if computed, dark/bright AP50 if known."""
    lines = [f"# {title}", f"# split {summary['split']}: {summary['n_images']} images, "
             f"{summary['n_detections']} detections"]
    lines += [f" {label} = {value:.3f}" for label, value in zip(COCO_SUMMARY_LABELS, summary["stats"])]
    lines.append(f"AP50 {summary['ap50']:.6f}")
    lines.append(f"AP50:95 {summary['ap50_95']:.6f}")
    if "voc_ap50" in summary:
        lines.append(f"VOC AP50 (all-point) {summary['voc_ap50']:.6f}")
    for name in ("dark", "bright"):
        if f"ap50_{name}" in summary:
            value = f"{summary[f'ap50_{name}']:.6f}" if summary[f"n_images_{name}"] else "n/a"
            lines.append(f"AP50 {name} frames ({summary[f'n_images_{name}']} images) {value}")
    return atomic_write_text(path, "\n".join(lines) + "\n")


def eval_settings(cfg: FredConfig, max_batches: int | None = None) -> EvalSettings:
    """Evaluation options of a configuration."""
    return EvalSettings(conf_thres=cfg.eval_conf, voc=cfg.voc_ap50, max_batches=max_batches)
