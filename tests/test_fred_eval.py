"""FRED streamed evaluation and prediction (spec/fred.md §7, §9 checks 10 and 13)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fred.augment import letterbox
from fred.dataset import FredDataset, build_loader, load_frame
from fred.demo_data import dark_flags, ensure_fred_demo, read_demo_meta
from fred.evaluate import EvalSettings, evaluate_detections, stream_detections
from fred.index import load_fred_index
from fred.model import ANCHORS, ANCHORS_MASK, STRIDES, build_model, model_meta
from fred.outputs import export_weights

SMALL_DEMO = {"frames": 20}  # the same session demo as tests/test_fred_demo_data.py (generated once)
INPUT = (128, 128)


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """A 6-sequence, 20-frame demo shared by the FRED test files (same path, so generated once)."""
    return ensure_fred_demo(tmp_path_factory.getbasetemp() / "fred_demo_small", seed=0, **SMALL_DEMO)


@pytest.fixture(scope="module")
def demo_index(small_demo, tmp_path_factory):
    return load_fred_index(small_demo, 0.1, tmp_path_factory.mktemp("fred_eval_annotations"),
                           notify=lambda message: None)


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def encoded_outputs(boxes_per_image: list[np.ndarray], rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """Raw head outputs that decode to jittered copies of the given input-pixel boxes (plus false positives).

    Each box goes into the stride-8 head, anchor 0 (10x13), at its centre cell: the inverse of the decoding of
    spec §2.4 (x = (2σ(tx) − .5 + gx)·stride, w = (2σ(tw))²·anchor_w). Scores are random, so AP is non-trivial.
    """
    batch = len(boxes_per_image)
    outputs = []
    for mask, stride in zip(ANCHORS_MASK, STRIDES):
        grid = INPUT[0] // stride
        outputs.append(np.full((batch, len(mask), 6, grid, grid), -12.0, dtype=np.float32))
    level = 2
    head = outputs[level]
    anchor_w, anchor_h = ANCHORS[ANCHORS_MASK[level][0]]
    for b, boxes in enumerate(boxes_per_image):
        for x1, y1, x2, y2 in boxes[:, :4]:
            jitter = rng.normal(0, 1.2, 4)
            cx, cy = (x1 + x2) / 2 + jitter[0], (y1 + y2) / 2 + jitter[1]
            w, h = max(x2 - x1 + jitter[2], 1.0), max(y2 - y1 + jitter[3], 1.0)
            gx, gy = int(cx // 8), int(cy // 8)
            head[b, 0, 0, gy, gx] = _logit((cx / 8 - gx + 0.5) / 2)
            head[b, 0, 1, gy, gx] = _logit((cy / 8 - gy + 0.5) / 2)
            head[b, 0, 2, gy, gx] = _logit(math.sqrt(w / anchor_w) / 2)
            head[b, 0, 3, gy, gx] = _logit(math.sqrt(h / anchor_h) / 2)
            head[b, 0, 4, gy, gx] = rng.uniform(-3, 4)
            head[b, 0, 5, gy, gx] = 8.0
        for _ in range(3):  # false positives
            gx, gy = rng.integers(0, INPUT[0] // 8, 2)
            anchor = int(rng.integers(1, 3))
            head[b, anchor, 0:4, gy, gx] = rng.normal(0, 0.5, 4)
            head[b, anchor, 4, gy, gx] = rng.uniform(-4, 1)
            head[b, anchor, 5, gy, gx] = 8.0
    return tuple(torch.from_numpy(o.reshape(batch, -1, o.shape[-2], o.shape[-1])) for o in outputs)


class ReplayModel(nn.Module):
    """A stand-in detector returning precomputed raw outputs batch by batch (the loader is sequential)."""

    def __init__(self, outputs: list[tuple[torch.Tensor, ...]]):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, *inputs):
        return self.outputs.pop(0)


class SpyModel(nn.Module):
    """Records its inputs and detects nothing (objectness logits -20 everywhere)."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, rgb, event=None):
        self.inputs.append((rgb.clone(), None if event is None else event.clone()))
        batch = rgb.shape[0]
        return tuple(torch.full((batch, 18, INPUT[0] // s, INPUT[1] // s), -20.0) for s in STRIDES)


def test_streamed_ap_equals_pycocotools(demo_index, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset = FredDataset(demo_index.splits["test"], "dual", INPUT, train=False)
    loader = build_loader(dataset, 8, train=False)
    rng = np.random.default_rng(0)
    outputs = [encoded_outputs([b.numpy() for b in batch["boxes"]], rng) for batch in loader]
    flags = dark_flags(read_demo_meta(demo_index.fred_root))
    summary = evaluate_detections(ReplayModel(outputs), loader, "dual", INPUT, tmp_path, "test", torch.device("cpu"),
                                  dark=flags)
    assert 0.2 < summary["ap50"] < 1.0 and 0.0 < summary["ap50_95"] < summary["ap50"]

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "detections_test.json").replace("detections", "gt"))
        detections = gt.loadRes(str(tmp_path / "detections_test.json"))
        coco_eval = COCOeval(gt, detections, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    assert summary["ap50_95"] == pytest.approx(coco_eval.stats[0], abs=1e-6)
    assert summary["ap50"] == pytest.approx(coco_eval.stats[1], abs=1e-6)
    assert len(gt.getImgIds()) == len(dataset) == summary["n_images"]

    # Dark/bright AP50 are the same COCO AP50 restricted to those images.
    for name in ("dark", "bright"):
        ids = [s.entry.image_id for s in dataset.samples
               if flags[(s.entry.sequence_id, s.entry.frame_index)] == (name == "dark")]
        with contextlib.redirect_stdout(io.StringIO()):
            subset = COCOeval(gt, detections, "bbox")
            subset.params.imgIds = ids
            subset.evaluate()
            subset.accumulate()
            subset.summarize()
        assert summary[f"ap50_{name}"] == pytest.approx(max(subset.stats[1], 0.0), abs=1e-6)


def test_event_input_is_the_event_png_and_no_detections_score_zero(demo_index, tmp_path):
    dataset = FredDataset(demo_index.splits["val"], "dual", INPUT, train=False)
    spy = SpyModel()
    summary = evaluate_detections(spy, build_loader(dataset, 4, train=False), "dual", INPUT, tmp_path, "val",
                                  torch.device("cpu"), settings=EvalSettings(max_batches=2))
    assert summary["ap50"] == 0.0 and summary["ap50_95"] == 0.0 and summary["n_detections"] == 0
    assert json.loads((tmp_path / "detections_val.json").read_text()) == []
    rgb, event = spy.inputs[0]
    entry = dataset.samples[1].entry
    size = (entry.width, entry.height)
    expected_event = letterbox(load_frame(entry.event_path, size), INPUT).astype(np.float32) / 255.0
    expected_rgb = letterbox(load_frame(entry.rgb_path, size), INPUT).astype(np.float32) / 255.0
    assert torch.equal(event[1], torch.from_numpy(expected_event.transpose(2, 0, 1)))
    assert torch.equal(rgb[1], torch.from_numpy(expected_rgb.transpose(2, 0, 1)))
    assert not torch.equal(rgb[1], event[1])


def _streaming_peak(entries, tmp_path: Path, name: str) -> int:
    """Peak traced memory of the streaming pass over ``entries`` (decode, NMS, matching, JSON files)."""
    model = build_model("rgb", "n", 1).eval()
    dataset = FredDataset(entries, "rgb", (64, 64), train=False)
    loader = build_loader(dataset, 32, train=False)
    tracemalloc.start()
    tracemalloc.reset_peak()
    evaluators, count = stream_detections(model, loader, "rgb", (64, 64), tmp_path / name, name, torch.device("cpu"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(json.loads((tmp_path / name / f"gt_{name}.json").read_text())["images"]) == len(entries)
    assert count > 40 * len(entries)  # a busy random detector: the worst case for memory
    return peak


def test_evaluation_memory_does_not_grow_with_images(demo_index, tmp_path):
    pool = [e for split in ("train", "val", "test") for e in demo_index.splits[split] if e.paired]
    many = [dataclasses.replace(pool[k % len(pool)], image_id=100_000 + k) for k in range(256)]
    torch.manual_seed(0)
    small = _streaming_peak(many[:64], tmp_path, "small")
    torch.manual_seed(0)
    large = _streaming_peak(many, tmp_path, "large")
    assert large - small < 2 * 2**20, f"peak traced memory grew by {(large - small) / 2**20:.2f} MB"


def test_predict_writes_frames_and_predictions(small_demo, tmp_path):
    import predict_fred_fusion

    model = build_model("dual", "n", 1)
    meta = model_meta("dual", "n", 1, ["drone"], INPUT, fusion_mode="concat", compression_ratio=0.5)
    weights = export_weights(tmp_path / "weights.pth", model.state_dict(), meta, 1, {})
    out = tmp_path / "predictions"
    config = predict_fred_fusion.PredictConfig(weights=weights, sequence=small_demo / "4", out=out, max_frames=3,
                                               conf=0.01)
    assert predict_fred_fusion.main(config) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3
    with Image.open(pngs[0]) as image:
        assert image.size == (2 * 192, 108)
    records = json.loads((out / "predictions.json").read_text())
    assert isinstance(records, list) and records, "a 0.01 threshold on a random model keeps detections"
    for record in records:
        assert set(record) >= {"image_id", "category_id", "bbox", "score"}
        assert record["category_id"] == 1 and 0.01 <= record["score"] <= 1 and record["image_id"] in (0, 1, 2)
        x, y, w, h = record["bbox"]
        assert w >= 0 and h >= 0 and 0 <= x <= 192 and 0 <= y <= 108


def test_onnx_export_matches_pytorch(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import onnxruntime

    import predict_fred_fusion

    model = build_model("dual", "n", 1)
    meta = model_meta("dual", "n", 1, ["drone"], (64, 64), fusion_mode="concat", compression_ratio=0.5)
    weights = export_weights(tmp_path / "weights.pth", model.state_dict(), meta, 1, {})
    path = tmp_path / "fred.onnx"
    predict_fred_fusion.main(predict_fred_fusion.PredictConfig(weights=weights, export_onnx=path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["rgb", "event"]
