"""FRED decoding (§2.4) and evaluation post-processing (§7): formula, thresholds, NMS parity, letterbox undo."""

from __future__ import annotations

import math

import pytest
import torch

import fred.decode as decode
from fred.decode import batched_nms_torch, decode_outputs, detect, nms_torch, postprocess, undo_letterbox
from fred.model import build_model


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def test_decode_formula_at_one_cell():
    nc, input_shape = 1, (128, 128)
    outputs = [torch.zeros(1, 3 * (5 + nc), 128 // s, 128 // s) for s in (32, 16, 8)]
    logits = [0.3, -0.7, 0.2, -0.4, 1.5, -0.5]
    k, j, i = 2, 3, 5  # out1 (stride 16), anchor slot 2 = anchor (59, 119)
    outputs[1][0, k * 6:(k + 1) * 6, j, i] = torch.tensor(logits)
    decoded = decode_outputs(outputs, input_shape)
    assert decoded.shape == (1, 3 * (16 + 64 + 256), 6)
    row = decoded[0, 3 * 16 + k * 64 + j * 8 + i]
    cx = (2 * sigmoid(0.3) - 0.5 + i) * 16
    cy = (2 * sigmoid(-0.7) - 0.5 + j) * 16
    w = (2 * sigmoid(0.2)) ** 2 * 59
    h = (2 * sigmoid(-0.4)) ** 2 * 119
    expected = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, sigmoid(1.5), sigmoid(-0.5)]
    assert row.tolist() == pytest.approx(expected, abs=1e-4)
    detections = postprocess(decoded, input_shape, conf_thres=0.3)[0]
    assert detections.shape == (1, 6) and detections.dtype == torch.float32
    assert float(detections[0, 4]) == pytest.approx(sigmoid(1.5) * sigmoid(-0.5), abs=1e-6)
    # every other cell scores σ(0)² = .25 < .3; the kept box is clipped to the 128×128 input
    assert detections[0, :4].tolist() == pytest.approx([max(expected[0], 0), max(expected[1], 0),
                                                        min(expected[2], 128), min(expected[3], 128)], abs=1e-4)


def _grid_decoded(n_boxes, nc, seed):
    """Non-overlapping 8×8 boxes on a 10 px lattice with distinct random scores."""
    generator = torch.Generator().manual_seed(seed)
    side = math.ceil(math.sqrt(n_boxes))
    idx = torch.arange(n_boxes)
    x1, y1 = (idx % side).float() * 10, (idx // side).float() * 10
    boxes = torch.stack([x1, y1, x1 + 8, y1 + 8], 1)
    obj = torch.rand(n_boxes, 1, generator=generator)
    cls = torch.rand(n_boxes, nc, generator=generator)
    return torch.cat([boxes, obj, cls], 1)[None]


def test_score_threshold_class_argmax_topk_and_max_det():
    decoded = _grid_decoded(5000, 3, seed=0)
    input_shape = (1000, 1000)
    scores, classes = (decoded[0, :, 4:5] * decoded[0, :, 5:]).max(-1)
    full = postprocess(decoded, input_shape, conf_thres=0.001)[0]
    assert full.shape == (100, 6)
    assert torch.equal(full[:, 4], torch.sort(scores, descending=True).values[:100])
    best = torch.argsort(scores, descending=True)[:100]
    assert torch.equal(full[:, 5], classes[best].float())
    assert torch.equal(full[:, :4], decoded[0, best, :4])
    assert len(postprocess(decoded, input_shape, pre_nms_topk=10)[0]) == 10
    high = postprocess(decoded, input_shape, conf_thres=0.8, max_det=10_000)[0]
    assert len(high) == int((scores >= 0.8).sum()) and bool((high[:, 4] >= 0.8).all())


def _random_overlapping(n, seed):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(n, 2, generator=generator) * 60
    sizes = torch.rand(n, 2, generator=generator) * 30 + 2
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], 1)
    scores = torch.randperm(n, generator=generator).float() / n  # distinct scores
    classes = torch.randint(0, 3, (n,), generator=generator)
    return boxes, scores, classes


@pytest.mark.parametrize("n,seed", [(600, 0), (600, 1), (1500, 2)])  # torchvision: offset path, per-class path
def test_pure_torch_nms_equals_torchvision(n, seed):
    tv_ops = pytest.importorskip("torchvision.ops")
    boxes, scores, classes = _random_overlapping(n, seed)
    for iou in (0.3, 0.5, 0.7):
        ours = batched_nms_torch(boxes, scores, classes, iou)
        assert torch.equal(ours, tv_ops.batched_nms(boxes, scores, classes, iou))
        assert torch.equal(nms_torch(boxes, scores, iou), tv_ops.nms(boxes, scores, iou))
        assert 0 < len(ours) < len(boxes)


def test_nms_with_tied_scores_equals_torchvision():
    tv_ops = pytest.importorskip("torchvision.ops")
    boxes, _, _ = _random_overlapping(800, 3)
    scores = (torch.arange(800) % 4).float() / 4  # four score levels: many ties
    kept = nms_torch(boxes, scores, 0.5)
    assert torch.equal(kept, tv_ops.nms(boxes, scores, 0.5))
    assert torch.equal(batched_nms_torch(boxes, scores, torch.zeros(800, dtype=torch.int64), 0.5), kept)


def test_nms_suppresses_only_above_threshold_and_never_across_classes():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 9.9], [0, 0, 10, 10]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    classes = torch.tensor([0, 0, 0, 1])
    # IoU(0,1) = .5 exactly -> kept; IoU(0,2) = .99 -> dropped; box 3 is another class -> kept
    assert batched_nms_torch(boxes, scores, classes, 0.5).tolist() == [0, 1, 3]


def test_postprocess_without_torchvision_is_identical(monkeypatch):
    torch.manual_seed(0)
    model = build_model("rgb", "n", 1).eval()
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, 128, 128))
    shapes = [(108, 192), (128, 96)]
    with_tv = detect(outputs, (128, 128), shapes)
    monkeypatch.setattr(decode, "torchvision_batched_nms", lambda: None)
    without_tv = detect(outputs, (128, 128), shapes)
    for a, b, (h, w) in zip(with_tv, without_tv, shapes):
        assert torch.equal(a, b)
        assert a.dtype == torch.float32 and a.shape[1] == 6 and 0 < len(a) <= 100
        assert bool((a[:, [0, 2]] >= 0).all() and (a[:, [0, 2]] <= w).all())
        assert bool((a[:, [1, 3]] >= 0).all() and (a[:, [1, 3]] <= h).all())
        assert bool((a[1:, 4] <= a[:-1, 4]).all()) and bool((a[:, 5] == 0).all())


@pytest.mark.parametrize("image_shape,input_shape", [((108, 192), (128, 128)), ((480, 640), (640, 640)),
                                                     ((300, 200), (160, 128))])
def test_undo_letterbox_inverts_bubbliiiing_letterbox(image_shape, input_shape):
    ih, iw = image_shape
    h, w = input_shape
    scale = min(w / iw, h / ih)
    nw, nh = int(iw * scale), int(ih * scale)
    dx, dy = (w - nw) // 2, (h - nh) // 2
    original = torch.tensor([[0.0, 0.0, iw / 3, ih / 2], [iw / 4, ih / 5, iw, ih]], dtype=torch.float64)
    letterboxed = original.clone()
    letterboxed[:, [0, 2]] = original[:, [0, 2]] * nw / iw + dx
    letterboxed[:, [1, 3]] = original[:, [1, 3]] * nh / ih + dy
    assert torch.allclose(undo_letterbox(letterboxed, image_shape, input_shape), original, atol=1e-9)
    outside = torch.tensor([[-5.0, -5.0, w + 5.0, h + 5.0]], dtype=torch.float64)
    assert undo_letterbox(outside, image_shape, input_shape).tolist() == [[0.0, 0.0, float(iw), float(ih)]]
