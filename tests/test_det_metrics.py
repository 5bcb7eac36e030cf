"""Tests of the streaming detection evaluator against closed forms and pycocotools (spec/metrics.md §9, 15-19)."""

from __future__ import annotations

import contextlib
import gc
import io
import math
import os
import pickle
import tracemalloc
import weakref

import numpy as np
import pytest

from common.det_metrics import (
    COCO_METRIC_KEYS,
    DetectionEvaluator,
    DetectionEvaluatorError,
    _coco_iou,
    _voc_iou,
    coco_ap_101,
    format_log_line,
    voc_ap,
)

pytestmark = pytest.mark.filterwarnings("ignore:detection metrics undefined:UserWarning")


def _toy_evaluator(**kwargs) -> DetectionEvaluator:
    """§9.15: GT g1-g3 (50×50); detections g1 (0.9), g1 again (0.8), g2 (0.7), a disjoint box (0.6)."""
    gt = np.array([[0, 0, 50, 50], [100, 0, 150, 50], [200, 0, 250, 50]], dtype=float)
    preds = np.array([gt[0], gt[0], gt[1], [300, 300, 350, 350]])
    evaluator = DetectionEvaluator(1, **kwargs)
    evaluator.update(1, preds, [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 0], gt, [0, 0, 0])
    return evaluator


def test_toy_case_exact_values():
    results = _toy_evaluator(voc07=True).compute()
    assert results["voc_map50"] == pytest.approx(5 / 9, abs=1e-12)
    assert results["voc07_map50"] == pytest.approx(6 / 11, abs=1e-12)
    for key in ("map", "map_50", "map_75", "map_medium"):
        assert results[key] == pytest.approx(56 / 101, abs=1e-12), key
    assert results["mar_1"] == pytest.approx(1 / 3, abs=1e-12)
    assert results["mar_100"] == pytest.approx(2 / 3, abs=1e-12)
    assert math.isnan(results["map_small"]) and results["stats"][3] == -1
    assert math.isnan(results["map_large"]) and results["stats"][5] == -1
    assert results["map_per_class"] == {"0": pytest.approx(56 / 101, abs=1e-12)}
    # Score >= 0.5 keeps all four detections: TP g1, duplicate FP, TP g2, disjoint FP.
    assert (results["precision"], results["recall"]) == (pytest.approx(0.5), pytest.approx(2 / 3))
    line = format_log_line(results)
    assert line == (
        "mAP50-95 0.5545 | mAP50 0.5545 | mAP75 0.5545 | APs/m/l nan/0.5545/nan | VOC-mAP50 0.5556 | VOC07-mAP50 0.5455"
    )


def test_toy_case_voc_only():
    results = _toy_evaluator(coco=False).compute()
    assert "map" not in results and results["voc_map50"] == pytest.approx(5 / 9, abs=1e-12)
    assert results["prf_matching"] == "voc" and results["precision"] == 0.5
    assert format_log_line(results) == "VOC-mAP50 0.5556"


def test_toy_case_warns_about_undefined_metrics():
    with pytest.warns(UserWarning, match="map_small, map_large"):
        _toy_evaluator().compute()


def test_ap_functions_on_known_curves():
    recall = np.array([1, 1, 2, 2]) / 3
    precision = np.array([1, 1 / 2, 2 / 3, 1 / 2])
    assert voc_ap(recall, precision) == pytest.approx(5 / 9, abs=1e-15)
    assert voc_ap(recall, precision, voc07=True) == pytest.approx(6 / 11, abs=1e-15)
    assert coco_ap_101(recall, precision) == pytest.approx(56 / 101, abs=1e-15)
    assert voc_ap([], []) == 0.0 and coco_ap_101([], []) == 0.0


def _fixture(seed: int = 0) -> list[dict]:
    """Seeded images covering every COCO branch: area ranges with areas exactly 32² and 96², crowd GT, a given
    ``gt_area``, images without GT, a class (2) without GT, tied scores and one image/class with 150 detections."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(60):
        gt_boxes, gt_labels, gt_crowd, gt_area = [], [], [], []
        if index % 7 != 3:  # every 7th image has no GT at all
            for _ in range(rng.integers(1, 6)):
                side_w, side_h = np.exp(rng.uniform(np.log(8), np.log(200), size=2))
                x, y = rng.uniform(0, 400, size=2)
                gt_boxes.append([x, y, x + side_w, y + side_h])
                gt_labels.append(int(rng.integers(0, 2)))
                gt_crowd.append(bool(rng.random() < 0.1))
                gt_area.append(side_w * side_h * (0.8 if rng.random() < 0.2 else 1.0))
        if index in (5, 6):  # boundary areas: inclusive at both ends of small/medium and medium/large
            side = 32.0 if index == 5 else 96.0
            gt_boxes.append([10.0, 20.0, 10.0 + side, 20.0 + side])
            gt_labels.append(0)
            gt_crowd.append(False)
            gt_area.append(side * side)
        gt_boxes = np.array(gt_boxes, dtype=float).reshape(-1, 4)
        pred_boxes, pred_labels = [], []
        for box, label in zip(gt_boxes, gt_labels):
            for _ in range(rng.integers(0, 4)):  # near-duplicates with IoUs spread over the thresholds
                jitter = rng.normal(0, 0.08, size=4) * np.tile(box[2:] - box[:2], 2)
                pred_boxes.append(box + jitter)
                pred_labels.append(label if rng.random() < 0.9 else int(rng.integers(0, 3)))
        n_random = 150 if index == 11 else int(rng.integers(0, 8))
        for _ in range(n_random):
            w, h = np.exp(rng.uniform(np.log(5), np.log(250), size=2))
            x, y = rng.uniform(0, 450, size=2)
            pred_boxes.append([x, y, x + w, y + h])
            pred_labels.append(0 if index == 11 else int(rng.integers(0, 3)))
        if index == 5:  # a detection exactly on the 32×32 GT, so the boundary GT is matched as well
            pred_boxes.append(gt_boxes[-1].copy())
            pred_labels.append(0)
        pred_boxes = np.array(pred_boxes, dtype=float).reshape(-1, 4)
        pred_boxes[:, 2:] = np.maximum(pred_boxes[:, 2:], pred_boxes[:, :2] + 0.5)
        scores = np.round(rng.uniform(0.001, 1.0, size=len(pred_boxes)), 2)  # rounding creates ties
        images.append(
            {
                "image_id": index + 1,
                "pred_boxes": pred_boxes,
                "pred_scores": scores,
                "pred_labels": np.array(pred_labels, dtype=np.int64),
                "gt_boxes": gt_boxes,
                "gt_labels": np.array(gt_labels, dtype=np.int64),
                "gt_iscrowd": np.array(gt_crowd, dtype=bool),
                "gt_area": np.array(gt_area, dtype=float),
            }
        )
    # Hand-made images for pycocotools' tie and preference rules, each changing the stats if broken.
    crafted = [
        # d1 has the same IoU (0.818) with both GT; pycocotools takes the later one, so d2 (= g_b) must fall
        # back to g_a (IoU 0.667) and is a FP from t = 0.70 on.
        ([[0, 0, 100, 100], [20, 0, 120, 100]], [False, False], [[10, 0, 110, 100], [20, 0, 120, 100]]),
        # The detection overlaps a crowd region more (∩/detection area = 1) than the normal GT (0.72); a
        # non-ignored candidate wins, so it is a TP.
        ([[0, 0, 300, 300], [50, 50, 150, 150]], [True, False], [[60, 50, 150, 150]]),
        # In the small range the 33×32 GT (area 1056) is ignored; the detection prefers the 31×32 GT (IoU 0.969)
        # although its IoU with the ignored one is higher (0.970).
        ([[200, 200, 231, 232], [200, 200, 233, 232]], [False, False], [[200, 200, 232, 232]]),
    ]
    for gt_boxes, gt_crowd, pred_boxes in crafted:
        gt_boxes, pred_boxes = np.array(gt_boxes, dtype=float), np.array(pred_boxes, dtype=float)
        images.append(
            {
                "image_id": len(images) + 1,
                "pred_boxes": pred_boxes,
                "pred_scores": np.linspace(0.9, 0.8, len(pred_boxes)),
                "pred_labels": np.ones(len(pred_boxes), dtype=np.int64),
                "gt_boxes": gt_boxes,
                "gt_labels": np.ones(len(gt_boxes), dtype=np.int64),
                "gt_iscrowd": np.array(gt_crowd),
                "gt_area": (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1]),
            }
        )
    return images


def _coco_dicts(images: list[dict]) -> tuple[dict, list[dict]]:
    """The fixture as a COCO GT dataset and a result list (ids from 1, xywh boxes, categories 1..3)."""
    annotations, results = [], []
    for image in images:
        gt_columns = (image["gt_boxes"], image["gt_labels"], image["gt_iscrowd"], image["gt_area"])
        for box, label, crowd, area in zip(*gt_columns):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image["image_id"],
                    "category_id": int(label) + 1,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "area": float(area),
                    "iscrowd": int(crowd),
                }
            )
        for box, score, label in zip(image["pred_boxes"], image["pred_scores"], image["pred_labels"]):
            results.append(
                {
                    "image_id": image["image_id"],
                    "category_id": int(label) + 1,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "score": float(score),
                }
            )
    dataset = {
        "images": [{"id": image["image_id"], "width": 640, "height": 480} for image in images],
        "categories": [{"id": k + 1, "name": str(k)} for k in range(3)],
        "annotations": annotations,
    }
    return dataset, results


def _evaluate(images: list[dict], order=None, **kwargs) -> dict:
    evaluator = DetectionEvaluator(3, **kwargs)
    for index in order if order is not None else range(len(images)):
        evaluator.update(**images[index])
    return evaluator.compute()


@pytest.fixture(scope="module")
def fixture_images() -> list[dict]:
    return _fixture()


def test_fixture_covers_the_required_cases(fixture_images):
    areas = np.concatenate([image["gt_area"] for image in fixture_images])
    labels = np.concatenate([image["gt_labels"] for image in fixture_images])
    assert len(fixture_images) >= 50
    assert np.any(areas == 32.0**2) and np.any(areas == 96.0**2)
    assert np.any(areas < 32.0**2) and np.any((areas > 32.0**2) & (areas < 96.0**2)) and np.any(areas > 96.0**2)
    assert not np.any(labels == 2) and any(np.any(image["pred_labels"] == 2) for image in fixture_images)
    assert any(image["gt_iscrowd"].any() for image in fixture_images)
    assert any(len(image["gt_boxes"]) == 0 for image in fixture_images)
    assert max(np.bincount(image["pred_labels"]).max(initial=0) for image in fixture_images) >= 150


def test_coco_stats_equal_pycocotools(fixture_images):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset, results = _coco_dicts(fixture_images)
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = dataset
        ground_truth.createIndex()
        coco_eval = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    ours = _evaluate(fixture_images)
    np.testing.assert_allclose(ours["stats"], coco_eval.stats, rtol=0, atol=1e-6)
    assert 0.05 < ours["stats"][0] < 0.95  # a fixture with neither trivial nor perfect results
    assert all(v != -1 for v in ours["stats"])
    # Per-class AP50:95 is the mean of pycocotools' precision over thresholds and recall points.
    precision = coco_eval.eval["precision"][:, :, :, 0, 2]
    for k in range(2):
        assert ours["map_per_class"][str(k)] == pytest.approx(precision[:, :, k].mean(), abs=1e-12)
        assert ours["map_50_per_class"][str(k)] == pytest.approx(precision[0, :, k].mean(), abs=1e-12)
    assert math.isnan(ours["map_per_class"]["2"])


def test_coco_stats_equal_faster_coco_eval(fixture_images):
    faster_coco_eval = pytest.importorskip("faster_coco_eval")
    dataset, results = _coco_dicts(fixture_images)
    ground_truth = faster_coco_eval.COCO(dataset, print_function=lambda *a, **k: None)
    coco_eval = faster_coco_eval.COCOeval_faster(
        ground_truth, ground_truth.loadRes(results), iouType="bbox", print_function=lambda *a, **k: None
    )
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    np.testing.assert_allclose(_evaluate(fixture_images)["stats"], coco_eval.stats[:12], rtol=0, atol=1e-6)


def _assert_same_results(a: dict, b: dict) -> None:
    """Identical dicts, with NaN equal to NaN."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float) and math.isnan(a[key]):
            assert math.isnan(b[key]), key
        elif isinstance(a[key], dict):
            _assert_same_results(a[key], b[key])
        else:
            assert a[key] == b[key], key


def test_update_order_and_merging_do_not_change_results(fixture_images):
    reference = _evaluate(fixture_images, voc07=True)
    shuffled = _evaluate(fixture_images, np.random.default_rng(1).permutation(len(fixture_images)), voc07=True)
    _assert_same_results(reference, shuffled)

    halves = [DetectionEvaluator(3, voc07=True), DetectionEvaluator(3, voc07=True)]
    for index in np.random.default_rng(2).permutation(len(fixture_images)):
        halves[index % 2].update(**fixture_images[index])
    states = [pickle.loads(pickle.dumps(evaluator.state())) for evaluator in halves]  # as gather_object ships them
    merged = DetectionEvaluator.from_state(states[1])
    merged.merge(states[0])
    _assert_same_results(reference, merged.compute())
    halves[0].merge(halves[1])
    _assert_same_results(reference, halves[0].compute())


def test_merge_rejects_other_configurations_and_duplicate_images(fixture_images):
    evaluator = DetectionEvaluator(3)
    with pytest.raises(DetectionEvaluatorError, match="voc_iou"):
        evaluator.merge(DetectionEvaluator(3, voc_iou=0.7).state())
    with pytest.raises(DetectionEvaluatorError, match="state"):
        evaluator.merge({"records": []})
    other = DetectionEvaluator(3)
    evaluator.update(**fixture_images[0])
    other.update(**fixture_images[0])
    evaluator.merge(other)
    with pytest.raises(DetectionEvaluatorError, match="more than once"):
        evaluator.compute()


def test_bad_inputs_raise_clear_errors():
    evaluator = DetectionEvaluator(2)
    box = [[0.0, 0.0, 10.0, 10.0]]
    with pytest.raises(DetectionEvaluatorError, match=r"pred_boxes must have shape \[N, 4\]"):
        evaluator.update(1, [[0, 0, 1]], [0.5], [0], box, [0])
    with pytest.raises(DetectionEvaluatorError, match="pred_labels .* must lie in"):
        evaluator.update(1, box, [0.5], [2], box, [0])
    with pytest.raises(DetectionEvaluatorError, match="pred_scores has 2 entries"):
        evaluator.update(1, box, [0.5, 0.4], [0], box, [0])
    with pytest.raises(DetectionEvaluatorError, match="x2 >= x1"):
        evaluator.update(1, [[10.0, 0.0, 0.0, 10.0]], [0.5], [0], box, [0])
    with pytest.raises(DetectionEvaluatorError, match="NaN"):
        evaluator.update(1, box, [float("nan")], [0], box, [0])


def test_inputs_are_not_retained_and_memory_is_bounded(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)

    class TrackedArray(np.ndarray):
        """numpy arrays cannot be weak-referenced; a subclass can."""

    evaluator = DetectionEvaluator(3)
    inputs = {
        "pred_boxes": np.array([[0, 0, 10, 10], [1, 1, 12, 12]], dtype=np.float64).view(TrackedArray),
        "pred_scores": torch.tensor([0.9, 0.3], dtype=torch.float32),
        "pred_labels": torch.tensor([0, 1]),
        "gt_boxes": np.array([[0, 0, 10, 10]], dtype=np.float64).view(TrackedArray),
        "gt_labels": np.array([0]).view(TrackedArray),
    }
    references = [weakref.ref(value) for value in inputs.values()]
    evaluator.update(7, **inputs)
    del inputs
    gc.collect()
    assert all(reference() is None for reference in references)

    rng = np.random.default_rng(0)
    n_images, per_image = 5000, 20
    corners = rng.uniform(0, 500, size=(n_images, per_image, 2))
    sizes = rng.uniform(4, 120, size=(n_images, per_image, 2))
    boxes = np.concatenate([corners, corners + sizes], axis=2)
    scores = rng.random((n_images, per_image))
    labels = rng.integers(0, 3, size=(n_images, per_image))
    gt_labels = rng.integers(0, 3, size=(n_images, 3))
    n_traced = 500  # tracemalloc slows numpy down several times, so only the first images are traced
    evaluator = DetectionEvaluator(3)
    tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]
    for i in range(n_images):
        evaluator.update(i, boxes[i], scores[i], labels[i], boxes[i, :3] + 1.0, gt_labels[i])
        if i == n_traced - 1:
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - baseline
            tracemalloc.stop()
    # What the process really holds, not only what nbytes() reports.
    assert 0 < held <= 64 * 4 * n_traced * per_image + 2**20
    assert evaluator.nbytes() <= 64 * 4 * n_images * per_image + 2**20
    assert os.listdir(tmp_path) == []
    assert format_log_line(evaluator.compute()).startswith("mAP50-95 ")
    assert os.listdir(tmp_path) == []


def test_duplicate_detection_is_a_false_positive():
    gt = np.array([[10.0, 10.0, 60.0, 60.0]])
    single = DetectionEvaluator(1)
    single.update(1, gt, [0.9], [0], gt, [0])
    duplicated = DetectionEvaluator(1)
    duplicated.update(1, np.concatenate([gt, gt]), [0.9, 0.8], [0, 0], gt, [0])
    single_results, duplicated_results = single.compute(), duplicated.compute()
    assert single_results["voc_map50"] == 1.0 and single_results["map"] == pytest.approx(1.0)
    # The duplicate comes after full recall, so AP is unchanged while precision at score >= 0.5 halves.
    assert duplicated_results["voc_map50"] == 1.0 and duplicated_results["map"] == pytest.approx(1.0)
    assert duplicated_results["precision"] == 0.5
    reversed_order = DetectionEvaluator(1)
    preds = np.concatenate([[[100.0, 100.0, 120.0, 120.0]], gt, gt])
    reversed_order.update(1, preds, [0.95, 0.9, 0.8], [0] * 3, gt, [0])
    # Order FP, TP, FP: the duplicate adds no recall, so VOC AP = 1/2 from the first TP.
    assert reversed_order.compute()["voc_map50"] == pytest.approx(0.5)


def test_detection_on_difficult_gt_is_ignored_by_voc():
    gt = np.array([[0.0, 0.0, 40.0, 40.0], [100.0, 100.0, 150.0, 150.0], [200.0, 0.0, 260.0, 60.0]])
    difficult = np.array([False, True, False])
    preds = np.array([gt[0], gt[1] + 1.0, [300.0, 300.0, 340.0, 340.0], gt[2]])
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    with_difficult_hit = DetectionEvaluator(1)
    with_difficult_hit.update(1, preds, scores, [0] * 4, gt, [0] * 3, gt_difficult=difficult)
    keep = [0, 2, 3]
    without = DetectionEvaluator(1)
    without.update(1, preds[keep], scores[keep], [0] * 3, gt, [0] * 3, gt_difficult=difficult)
    ap_with, ap_without = with_difficult_hit.compute()["voc_map50"], without.compute()["voc_map50"]
    assert ap_with == ap_without == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_iou_conventions():
    a, b = np.array([[0.0, 0.0, 10.0, 10.0]]), np.array([[5.0, 0.0, 15.0, 10.0]])
    assert _voc_iou(a, b, pixel_inclusive=True)[0, 0] == pytest.approx(0.375, abs=1e-15)
    assert _voc_iou(a, b, pixel_inclusive=False)[0, 0] == pytest.approx(1 / 3, abs=1e-15)
    assert _coco_iou(a, b, np.array([False]))[0, 0] == pytest.approx(1 / 3, abs=1e-15)
    assert _coco_iou(a, b, np.array([True]))[0, 0] == pytest.approx(0.5, abs=1e-15)  # crowd: ∩ / detection area


def test_no_detections_gives_zero_not_undefined():
    evaluator = DetectionEvaluator(2, class_names=["drone", "bird"])
    evaluator.update(1, np.zeros((0, 4)), [], [], [[0.0, 0.0, 50.0, 50.0]], [0])
    evaluator.update(2, np.zeros((0, 4)), [], [], np.zeros((0, 4)), [])
    results = evaluator.compute()
    assert results["map"] == 0.0 and results["map_50"] == 0.0 and results["mar_100"] == 0.0
    assert results["voc_map50"] == 0.0 and results["stats"][0] == 0.0
    assert results["map_per_class"]["drone"] == 0.0 and math.isnan(results["map_per_class"]["bird"])
    assert math.isnan(results["map_small"]) and results["stats"][3] == -1
    assert results["n_images"] == 2
    assert all(math.isnan(DetectionEvaluator(1).compute()[key]) for key in COCO_METRIC_KEYS)
