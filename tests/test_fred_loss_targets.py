"""FRED targets (§5.7) and loss (§3): hand-derived assignments and a loop-based restatement of the loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fred.loss import YOLOLoss
from fred.targets import get_target

ANCHORS = [(10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326)]


def positives(y_true):
    """Set of (level, anchor slot k, row j, col i) with objectness 1."""
    return {(level, k, j, i) for level, y in enumerate(y_true) for k, j, i in zip(*np.nonzero(y[..., 4] == 1))}


def test_30x61_box_at_640_gets_the_rule_anchors_and_cells():
    # Box 30×61 px centred at (100, 200.5). r_k = max(w/a, a/w, h/b, b/h):
    #   a0 (10,13): 61/13 = 4.69 -> no     a1 (16,30): 61/30 = 2.03 -> yes   a2 (33,23): 61/23 = 2.65 -> yes
    #   a3 (30,61): 1 -> yes (argmin)      a4 (62,45): 62/30 = 2.07 -> yes   a5 (59,119): 59/30 = 1.97 -> yes
    #   a6 (116,90): 116/30 = 3.87 -> yes  a7 (156,198): 5.2 -> no           a8 (373,326): 12.4 -> no
    # out0 (stride 32, mask 6,7,8): k=0 only. Centre (3.125, 6.265625): fx,fy < .5 -> (0,0),(-1,0),(0,-1).
    # out1 (stride 16, mask 3,4,5): k=0,1,2. Centre (6.25, 12.53125): fx < .5, fy > .5 -> (0,0),(-1,0),(0,1).
    # out2 (stride 8, mask 0,1,2): k=1,2. Centre (12.5, 25.0625): fx = .5 exactly -> "else": (0,0),(1,0),(0,-1).
    boxes = np.array([[85.0, 170.0, 115.0, 231.0, 0]])
    y_true = get_target(boxes, (640, 640), num_classes=1)
    assert [y.shape for y in y_true] == [(3, 20, 20, 6), (3, 40, 40, 6), (3, 80, 80, 6)]
    assert all(y.dtype == np.float32 for y in y_true)
    cells = {0: [(6, 3), (6, 2), (5, 3)], 1: [(12, 6), (12, 5), (13, 6)], 2: [(25, 12), (25, 13), (24, 12)]}
    slots = {0: [0], 1: [0, 1, 2], 2: [1, 2]}
    expected = {(level, k, j, i) for level in range(3) for k in slots[level] for j, i in cells[level]}
    assert positives(y_true) == expected
    for level, stride in enumerate((32, 16, 8)):
        for _, k, j, i in (p for p in expected if p[0] == level):
            np.testing.assert_allclose(y_true[level][k, j, i], [100 / stride, 200.5 / stride, 30 / stride,
                                                               61 / stride, 1, 1], rtol=1e-6)


def test_argmin_anchor_is_forced_and_off_grid_neighbours_are_skipped():
    # 2×2 px box: every r_k ≥ 6.5, so only the argmin a0 (out2, k=0); centre (1,1) px = (.125,.125) cells,
    # whose neighbours (-1,0) and (0,-1) fall off the grid.
    y_true = get_target(np.array([[0.0, 0.0, 2.0, 2.0, 0]]), (128, 128), num_classes=1)
    assert positives(y_true) == {(2, 0, 0, 0)}


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_conflicting_boxes_smaller_ratio_wins(order):
    # Same centre; A 30×61 (class 0), B 40×61 (class 1). For a3 (30,61): r_A = 1 < r_B = 1.33 -> A.
    # For a4 (62,45): r_A = 62/30 = 2.07 > r_B = 62/40 = 1.55 -> B. Independent of the box order.
    a = [85.0, 170.0, 115.0, 231.0, 0]
    b = [80.0, 170.0, 120.0, 231.0, 1]
    boxes = np.array([[a, b][order[0]], [a, b][order[1]]])
    out1 = get_target(boxes, (640, 640), num_classes=2)[1]
    assert out1[0, 12, 6, 2] == pytest.approx(30 / 16) and out1[0, 12, 6, 5:].tolist() == [1, 0]
    assert out1[1, 12, 6, 2] == pytest.approx(40 / 16) and out1[1, 12, 6, 5:].tolist() == [0, 1]


def test_empty_and_invalid_boxes():
    y_true = get_target(np.zeros((0, 5)), (160, 128), num_classes=3)
    assert [y.shape for y in y_true] == [(3, 5, 4, 8), (3, 10, 8, 8), (3, 20, 16, 8)]
    assert all(not y.any() for y in y_true)
    with pytest.raises(ValueError, match="positive width"):
        get_target(np.array([[10.0, 10.0, 10.0, 20.0, 0]]), (128, 128), num_classes=1)
    with pytest.raises(ValueError, match="class ids"):
        get_target(np.array([[10.0, 10.0, 20.0, 20.0, 1]]), (128, 128), num_classes=1)


# ---- loss ----

def reference_loss(outputs, y_trues, input_shape, nc):
    """§3 restated cell by cell in float64 Python: returns (total, loc, cls, conf), the terms weighted."""
    in_h, in_w = input_shape
    masks = [(6, 7, 8), (3, 4, 5), (0, 1, 2)]
    balance = [0.4, 1.0, 4.0]

    def sigmoid(v):
        return 1.0 / (1.0 + math.exp(-v))

    def bce(p, t):
        p = min(max(p, 1e-7), 1.0 - 1e-7)
        return -t * math.log(p) - (1.0 - t) * math.log(1.0 - p)

    def giou(a, b):
        ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
        bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
        inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
        union = a[2] * a[3] + b[2] * b[3] - inter
        hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
        return inter / union - (hull - union) / hull

    loc_total = cls_total = conf_total = 0.0
    for level, (out, y) in enumerate(zip(outputs, y_trues)):
        out, y = out.double().tolist(), y.double().tolist()
        grid_h, grid_w = len(out[0][0]), len(out[0][0][0])
        loc_terms, cls_terms, conf_terms = [], [], []
        for b in range(len(out)):
            for k, anchor in enumerate(masks[level]):
                aw, ah = ANCHORS[anchor][0] / (in_w / grid_w), ANCHORS[anchor][1] / (in_h / grid_h)
                for j in range(grid_h):
                    for i in range(grid_w):
                        s = [sigmoid(out[b][k * (5 + nc) + c][j][i]) for c in range(5 + nc)]
                        pred = (2 * s[0] - 0.5 + i, 2 * s[1] - 0.5 + j, (2 * s[2]) ** 2 * aw, (2 * s[3]) ** 2 * ah)
                        t = y[b][k][j][i]
                        target_obj = 0.0
                        if t[4] == 1:
                            g = giou(pred, t[:4])
                            loc_terms.append(1 - g)
                            cls_terms.extend(bce(s[5 + c], t[5 + c]) for c in range(nc))
                            target_obj = max(g, 0.0)
                        conf_terms.append(bce(s[4], target_obj))
        if loc_terms:
            loc_total += 0.05 * sum(loc_terms) / len(loc_terms)
            cls_total += 0.5 * nc / 80 * sum(cls_terms) / len(cls_terms)
        conf_total += balance[level] * (in_h * in_w / 640 ** 2) * sum(conf_terms) / len(conf_terms)
    return loc_total + cls_total + conf_total, loc_total, cls_total, conf_total


def batch_targets(box_lists, input_shape, nc):
    per_sample = [get_target(np.array(boxes, dtype=np.float64).reshape(-1, 5), input_shape, nc) for boxes in box_lists]
    return [torch.from_numpy(np.stack([s[level] for s in per_sample])) for level in range(3)]


def random_outputs(batch, input_shape, nc, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3 * (5 + nc), input_shape[0] // s, input_shape[1] // s, generator=generator) * 1.5
            for s in (32, 16, 8)]


def test_loss_equals_literal_restatement():
    input_shape, nc = (128, 160), 2
    boxes = [[[10, 20, 40, 81, 0], [90, 30, 130, 60, 1], [140, 100, 158, 126, 1]], [[60, 60, 76, 70, 0]]]
    y_trues = batch_targets(boxes, input_shape, nc)
    assert len(positives([y.numpy()[0] for y in y_trues])) > 0
    outputs = random_outputs(2, input_shape, nc, seed=0)
    terms = YOLOLoss(nc, input_shape)(outputs, y_trues)
    total, loc, cls, conf = reference_loss(outputs, y_trues, input_shape, nc)
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.dim() == 0 for v in terms.values())
    assert float(terms["loss"]) == pytest.approx(total, abs=1e-6)
    assert float(terms["loc"]) == pytest.approx(loc, abs=1e-6)
    assert float(terms["cls"]) == pytest.approx(cls, abs=1e-6)
    assert float(terms["conf"]) == pytest.approx(conf, abs=1e-6)
    assert loc > 0 and cls > 0


def test_box_free_batch_gives_only_the_conf_term():
    input_shape, nc = (128, 128), 1
    y_trues = batch_targets([[], []], input_shape, nc)
    outputs = random_outputs(2, input_shape, nc, seed=1)
    terms = YOLOLoss(nc, input_shape)(outputs, y_trues)
    assert float(terms["loc"]) == 0.0 and float(terms["cls"]) == 0.0
    assert float(terms["loss"]) == float(terms["conf"]) > 0
    assert float(terms["conf"]) == pytest.approx(reference_loss(outputs, y_trues, input_shape, nc)[3], abs=1e-6)


def test_loss_is_fp32_under_autocast_and_gradients_stay_finite():
    input_shape, nc = (128, 128), 1
    y_trues = batch_targets([[[30, 30, 60, 91, 0]]], input_shape, nc)
    outputs = [o.requires_grad_() for o in random_outputs(1, input_shape, nc, seed=2)]
    with torch.no_grad():  # degenerate predictions: σ(tw), σ(th) underflow to 0 on every cell
        for o in outputs:
            o.view(1, 3, 6, *o.shape[2:])[:, :, 2:4] = -200.0
    loss_fn = YOLOLoss(nc, input_shape)
    loss_fn(outputs, y_trues)["loss"].backward()
    assert all(bool(torch.isfinite(o.grad).all()) for o in outputs)
    half = [o.detach().bfloat16() for o in random_outputs(1, input_shape, nc, seed=3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss_fn(half, y_trues)
    assert under_autocast["loss"].dtype == torch.float32
    assert torch.equal(under_autocast["loss"], loss_fn([h.float() for h in half], y_trues)["loss"])
