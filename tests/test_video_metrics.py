"""Video metrics (common/video_metrics.py): spec/metrics.md §9 checks 20-24, flows, and the in-memory API."""

from __future__ import annotations

import math
import warnings
import weakref

import numpy as np
import pytest
from scipy import ndimage

from common import video_metrics as vm
from common.video_metrics import VideoEvaluator, VideoMetricConfig, VideoMetricWarning, evaluate_video

BACKGROUND = 128
SHIFT = (3, -2)  # (dx, dy) per frame
WEIGHT_FREE = ("psnr", "ssim", "colorfulness", "cdc", "warp")
FLOW_SEEN: list[np.ndarray] = []


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240607)


def random_frames(rng: np.random.Generator, count: int, height: int = 40, width: int = 48) -> list[np.ndarray]:
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def moving_patch_video(count: int, size: int = 96) -> list[np.ndarray]:
    """A textured 32x32 patch moving SHIFT px per frame on a constant background (check 23)."""
    patch = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    frames = []
    for t in range(count):
        frame = np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
        x, y = 20 + SHIFT[0] * t, 50 + SHIFT[1] * t
        frame[y:y + 32, x:x + 32] = patch
        frames.append(frame)
    return frames


def centroid_flow(img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
    """Oracle flow of the moving-patch scene: the shift of the patch's centroid from img1 to img2."""
    def centroid(image):
        rows, columns = np.nonzero(np.any(np.abs(image - BACKGROUND / 255.0) > 1e-6, axis=2))
        return np.array([columns.mean(), rows.mean()])
    shift = np.rint(centroid(img2) - centroid(img1))
    return np.broadcast_to(shift.astype(np.float32), (*img1.shape[:2], 2)).copy()


def recording_flow(img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
    """Zero flow that records the images it was given."""
    FLOW_SEEN.append(img1)
    return np.zeros((*img1.shape[:2], 2), dtype=np.float32)


# ---------------------------------------------------------------------------------------------- check 20


def test_psnr_and_ssim_equal_skimage(rng):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    gt, pred = random_frames(rng, 2, 37, 45)
    assert vm.frame_psnr(pred, gt) == pytest.approx(peak_signal_noise_ratio(gt, pred, data_range=255), abs=1e-10)
    reference = structural_similarity(gt, pred, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=255, channel_axis=-1)
    assert vm.frame_ssim(pred, gt) == pytest.approx(reference, abs=1e-7)
    assert vm.frame_psnr(gt, gt) == math.inf
    assert vm.frame_ssim(gt, gt) == pytest.approx(1.0, abs=1e-12)


def test_black_frames_score_without_a_range_warning():
    black = np.zeros((16, 16, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vm.frame_ssim(black, black) == pytest.approx(1.0)


def test_frames_must_be_uint8_rgb():
    with pytest.raises(ValueError, match="quantize"):
        vm.frame_psnr(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        vm.colorfulness(np.zeros((8, 8), dtype=np.uint8))


def test_quantize_rounds_half_to_even_and_clips():
    values = np.array([-0.1, 0.5 / 255, 1.5 / 255, 2.5 / 255, 1.2])
    np.testing.assert_array_equal(vm.quantize(values), np.array([0, 0, 2, 2, 255], dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- check 21


def test_colorfulness_closed_forms():
    gray = np.full((10, 12, 3), 90, dtype=np.uint8)
    assert vm.colorfulness(gray) == 0.0
    red = np.zeros((10, 12, 3), dtype=np.uint8)
    red[..., 0] = 255
    assert vm.colorfulness(red) == pytest.approx(85.529600, abs=1e-6)
    half = red.copy()
    half[5:] = (0, 255, 0)
    assert vm.colorfulness(half) == pytest.approx(293.25, abs=1e-9)
    assert vm.colorfulness(half, abs_opponent=True) == pytest.approx(85.529600, abs=1e-6)


# ---------------------------------------------------------------------------------------------- check 22


def test_js_divergence_equals_scipy(rng):
    from scipy.spatial.distance import jensenshannon

    for _ in range(5):
        p, q = rng.random(256), rng.random(256)
        p[rng.random(256) < 0.3] = 0.0
        q[:40] = 0.0
        p, q = p / p.sum(), q / q.sum()
        assert vm.js_divergence(p, q) == pytest.approx(jensenshannon(p, q) ** 2, abs=1e-12)


def test_cdc_closed_forms():
    constant = [np.full((12, 12, 3), 40, dtype=np.uint8)] * 6
    assert vm.cdc(constant) == 0.0
    alternating = [np.full((12, 12, 3), 255 * (t % 2), dtype=np.uint8) for t in range(8)]
    assert vm.cdc(alternating) == pytest.approx(math.log(2) / 3, abs=1e-12)
    assert vm.cdc(alternating) == pytest.approx(0.23104906, abs=1e-8)


def test_cdc_equals_the_direct_formula_with_scipy_js(rng):
    from scipy.spatial.distance import jensenshannon

    frames = random_frames(rng, 7, 6, 5)  # small frames: sparse, clearly different histograms
    histograms = [[np.bincount(frame[..., c].ravel(), minlength=256) / 30.0 for c in range(3)] for frame in frames]
    per_channel = [sum(np.mean([jensenshannon(histograms[i][c], histograms[i + gap][c]) ** 2
                                for i in range(7 - gap)]) for gap in (1, 2, 4)) / 3 for c in range(3)]
    assert vm.cdc(frames) == pytest.approx(np.mean(per_channel), abs=1e-12)


def test_cdc_short_video_renormalises_the_gaps_with_a_warning(rng):
    frames = random_frames(rng, 3, 16, 16)
    histograms = [vm.channel_histograms(frame) for frame in frames]
    gap_1 = np.mean([vm.js_divergence(histograms[i], histograms[i + 1]) for i in range(2)], axis=0)
    gap_2 = vm.js_divergence(histograms[0], histograms[2])
    with pytest.warns(VideoMetricWarning, match=r"gaps \[1, 2\]"):
        value = vm.cdc(frames)
    assert value == pytest.approx(float(np.mean((gap_1 + gap_2) / 2)), abs=1e-14)
    with pytest.warns(VideoMetricWarning, match="at least 2 frames"):
        assert math.isnan(vm.cdc(frames[:1]))


# ---------------------------------------------------------------------------------------------- warp


def test_warp_equals_map_coordinates_with_clamping(rng):
    image = rng.random((20, 30, 3))
    flow = rng.uniform(-6, 6, (20, 30, 2))
    rows, columns = np.mgrid[0:20, 0:30]
    coordinates = [rows + flow[..., 1], columns + flow[..., 0]]
    for channel in range(3):
        reference = ndimage.map_coordinates(image[..., channel], coordinates, order=1, mode="nearest")
        np.testing.assert_allclose(vm.warp(image, flow)[..., channel], reference, atol=1e-12)


# ---------------------------------------------------------------------------------------------- check 23


def test_moving_patch_oracle_flow_gives_zero_and_zero_flow_the_frame_difference():
    first, second = moving_patch_video(2)
    fw = np.broadcast_to(np.array(SHIFT, dtype=np.float64), (96, 96, 2))
    assert vm.pair_warp_error(first, second, fw, -fw) <= 1e-12
    zero = np.zeros((96, 96, 2))
    expected = np.mean((second / 255.0 - first / 255.0) ** 2)
    assert expected > 1e-3
    assert vm.pair_warp_error(first, second, zero, zero) == pytest.approx(expected, rel=1e-12)


def test_warp_error_video_calls_the_flow_forward_in_time():
    frames = moving_patch_video(4)
    assert vm.warp_error(frames, flow=centroid_flow) <= 1e-12
    assert vm.warp_error(frames, flow="tests.test_video_metrics:centroid_flow") <= 1e-12
    differences = [np.mean((b / 255.0 - a / 255.0) ** 2) for a, b in zip(frames, frames[1:])]
    assert vm.warp_error(frames, flow="zero") == pytest.approx(np.mean(differences), rel=1e-12)


def test_warp_error_video_skips_occluded_pixels():
    frames = moving_patch_video(3)

    def subpixel_flow(img1, img2):  # 0.72 px both ways: every pixel fails the forward-backward check
        return np.full((*img1.shape[:2], 2), (0.72, 0.0), dtype=np.float32)

    assert vm.warp_error(frames, flow=subpixel_flow) == 0.0


def test_mask_out_of_frame_drops_targets_outside():
    fw = np.broadcast_to(np.array(SHIFT, dtype=np.float64), (16, 16, 2))
    assert vm.consistency_mask(fw, -fw).all()
    mask = vm.consistency_mask(fw, -fw, mask_out_of_frame=True)
    expected = np.ones((16, 16), dtype=bool)
    expected[:, 16 - SHIFT[0]:] = False
    expected[:-SHIFT[1], :] = False
    np.testing.assert_array_equal(mask, expected)


# ---------------------------------------------------------------------------------------------- check 24


def test_occlusion_thresholds_and_motion_boundary():
    frame = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    other = np.roll(frame, 5, axis=1)
    zero = np.zeros((64, 64, 2))
    fw = zero.copy()
    fw[..., 0] = 0.70
    assert vm.consistency_mask(fw, zero).all()
    fw[..., 0] = 0.72
    assert not vm.consistency_mask(fw, zero).any()
    assert vm.pair_warp_error(frame, other, fw, zero) == 0.0
    step = zero.copy()
    step[:, 48:, 0] = 1.0
    boundary = vm.motion_boundary(step)
    expected = np.zeros((64, 64), dtype=bool)
    expected[:, 47] = True
    np.testing.assert_array_equal(boundary, expected)


# ---------------------------------------------------------------------------------------------- flows


@pytest.mark.parametrize("name", ["farneback", "dis"])
def test_opencv_flows_follow_the_forward_convention(name):
    texture = ndimage.gaussian_filter(np.random.default_rng(2).random((96, 96)), 2.0)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    first = np.repeat(texture[..., None], 3, axis=2).astype(np.float32)
    second = np.roll(first, (SHIFT[1], SHIFT[0]), axis=(0, 1))  # img2(p + SHIFT) = img1(p)
    flow = vm.resolve_flow(name)(first, second)
    assert flow.shape == (96, 96, 2)
    np.testing.assert_allclose(np.median(flow[24:72, 24:72].reshape(-1, 2), axis=0), SHIFT, atol=0.5)


def test_resolve_flow_rejects_unknown_names_and_describes_builtins():
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown flow"):
        vm.resolve_flow("raft")
    with pytest.raises(ConfigError, match="cannot load"):
        vm.resolve_flow("tests.test_video_metrics:no_such_function")
    assert vm.resolve_flow("dis").description["parameters"] == {"preset": "MEDIUM"}
    bad = vm.resolve_flow(lambda a, b: np.zeros((3, 3, 2)))
    with pytest.raises(ValueError, match="must return"):
        bad(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 3), np.float32))


# ---------------------------------------------------------------------------------------------- in memory


def test_evaluate_video_equals_the_per_frame_functions(rng):
    pred, gt = random_frames(rng, 5), random_frames(rng, 5)
    row = evaluate_video(iter(pred), iter(gt), config=VideoMetricConfig(flow="zero"), metrics=WEIGHT_FREE)
    assert list(row) == ["n_frames", "PSNR", "SSIM", "colorfulness", "CDC", "warp_error"]
    assert row["n_frames"] == 5
    assert row["PSNR"] == pytest.approx(np.mean([vm.frame_psnr(p, g) for p, g in zip(pred, gt)]), rel=1e-12)
    assert row["SSIM"] == pytest.approx(np.mean([vm.frame_ssim(p, g) for p, g in zip(pred, gt)]), rel=1e-12)
    assert row["colorfulness"] == pytest.approx(np.mean([vm.colorfulness(p) for p in pred]), rel=1e-12)
    assert row["CDC"] == pytest.approx(vm.cdc(pred), rel=1e-12)
    assert row["warp_error"] == pytest.approx(vm.warp_error(pred, flow="zero"), rel=1e-12)


def test_flows_come_from_the_gt_or_from_the_inputs(rng):
    pred, gt = random_frames(rng, 3), random_frames(rng, 3)
    gray = [rng.integers(0, 256, (40, 48), dtype=np.uint8) for _ in range(3)]
    config = VideoMetricConfig(flow="tests.test_video_metrics:recording_flow")
    FLOW_SEEN.clear()
    evaluate_video(pred, gt, config=config, metrics=["warp"])
    np.testing.assert_array_equal(FLOW_SEEN[0], gt[0] / np.float32(255))
    FLOW_SEEN.clear()
    evaluate_video(pred, gt, gray, config=VideoMetricConfig(flow=config.flow, flow_source="input"), metrics=["warp"])
    np.testing.assert_array_equal(FLOW_SEEN[0], np.repeat(gray[0][..., None], 3, axis=2) / np.float32(255))
    with pytest.raises(ValueError, match="input frames"):
        evaluate_video(pred, gt, config=VideoMetricConfig(flow_source="input"), metrics=["warp"])


def test_dataset_reduction_gt_floor_and_csv(rng):
    evaluator = VideoEvaluator(VideoMetricConfig(flow="zero"), WEIGHT_FREE, gt_floor=True)
    videos = {name: (random_frames(rng, count), random_frames(rng, count)) for name, count in
              (("clip10", 5), ("clip9", 6))}
    for name, (pred, gt) in videos.items():
        evaluator.add_video(name, pred, gt)
    means, nan_counts = evaluator.means()
    for column in evaluator.columns:
        assert means[column] == pytest.approx(np.mean([evaluator.rows[n][column] for n in videos]), rel=1e-12)
    assert nan_counts == dict.fromkeys(evaluator.columns, 0)
    floor = evaluator.floor_means()
    assert floor["colorfulness"] == pytest.approx(
        np.mean([np.mean([vm.colorfulness(g) for g in gt]) for _, gt in videos.values()]), rel=1e-12)
    assert floor["warp_error"] == pytest.approx(
        np.mean([vm.warp_error(gt, flow="zero") for _, gt in videos.values()]), rel=1e-12)
    assert floor["CDC"] == pytest.approx(np.mean([vm.cdc(gt) for _, gt in videos.values()]), rel=1e-12)
    lines = evaluator.csv_text().splitlines()
    assert lines[0] == "video,n_frames,PSNR,SSIM,colorfulness,CDC,warp_error"
    assert [line.split(",")[0] for line in lines[1:]] == ["clip9", "clip10", "mean", "gt"]
    assert lines[3].split(",")[1] == "11"
    assert lines[4].split(",")[1:4] == ["11", "", ""]
    summary = evaluator.summary()
    assert summary["n_videos"] == 2 and summary["n_frames"] == 11
    assert summary["flow"]["name"] == "zero" and summary["flow"]["source"] == "gt"
    assert set(summary["conventions"]) == set(evaluator.columns)


def test_streaming_holds_only_the_current_and_previous_frames(rng):
    alive: list[weakref.ref] = []
    most_alive = 0

    def frames(count):
        nonlocal most_alive
        for _ in range(count):
            frame = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            alive.append(weakref.ref(frame))
            most_alive = max(most_alive, sum(ref() is not None for ref in alive))
            yield frame
            del frame

    evaluate_video(frames(12), frames(12), config=VideoMetricConfig(flow="zero"), metrics=WEIGHT_FREE)
    assert len(alive) == 24
    assert most_alive <= 4  # current and previous pred/gt frames (the warp error needs the previous pair)


def test_bad_in_memory_input_is_refused(rng):
    evaluator = VideoEvaluator(VideoMetricConfig(flow="zero"), WEIGHT_FREE)
    pred, gt = random_frames(rng, 5), random_frames(rng, 5)
    with pytest.raises(ValueError, match="'short'"):
        evaluator.add_video("short", pred, gt[:4])
    with pytest.raises(ValueError, match="frame 1"):
        evaluator.add_video("sizes", pred, [gt[0], gt[1][:20], *gt[2:]])
    with pytest.raises(ValueError, match="quantize"):
        evaluator.add_video("float", [p / 255.0 for p in pred], gt)
    evaluator.add_video("ok", pred, gt)
    with pytest.raises(ValueError, match="already scored"):
        evaluator.add_video("ok", pred, gt)
    with pytest.raises(ValueError, match="unknown video metric"):
        VideoEvaluator(metrics=["psnr", "niqe"])
