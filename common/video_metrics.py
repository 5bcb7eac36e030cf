"""Video colorization metrics (spec/metrics.md §6), usable in memory by a trainer, and their command line.

Frames are RGB uint8 ``(H, W, 3)`` arrays (Lab models convert and :func:`quantize` first); the optional
grayscale inputs may be ``(H, W)`` or ``(H, W, 3)``. Columns, in CSV order:

- ``PSNR``, ``SSIM`` per frame as TCVC's ``eval_results.py`` (PSNR over H x W x 3; SSIM wang per RGB channel,
  then the channel mean), then frame -> video -> dataset means;
- ``LPIPS`` (v0.1 AlexNet, :mod:`common.perceptual`), only with local weights;
- ``colorfulness``: Hasler & Süsstrunk M3, per frame;
- ``CDC``: TCVC's colour distribution consistency (Jensen-Shannon in nats over gaps 1, 2, 4);
- ``warp_error``: Lai et al. 2018, with the occlusion mask of their ``detect_occlusion``; flows come from a
  plug-in (``zero``, ``farneback``, ``dis`` or ``MODULE:FUNC``) run on the GT (default) or the inputs.

FID is set-level (mean row and JSON only). A video is streamed: only the current and previous frame pair, the
last four CDC histograms and the running FID statistics are held.

In memory::

    evaluator = VideoEvaluator(VideoMetricConfig(flow="dis"))
    evaluator.add_video("seq0", pred_frames, gt_frames)   # iterables of uint8 (H, W, 3) frames
    evaluator.write("eval/metrics.csv")

Command line::

    python -m common.video_metrics --pred DIR --gt DIR [--input DIR] [--metrics psnr,ssim,...] [--flow dis]
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import math
import sys
import warnings
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import scipy
import torch
import torch.nn.functional as functional
from scipy.special import rel_entr

from common.checkpoint import atomic_write_json, atomic_write_text
from common.errors import ConfigError, DataError, UserError
from common.frames import list_frames, natural_key
from common.fusion_metrics import FusionMetricWarning, format_value, json_number, psnr, quantize, ssim, summarize
from common.images import IMAGE_EXTENSIONS, image_size, read_image, rgb_to_luma
from common.perceptual import LPIPS_MIN_SIDE, PerceptualModels, RunningGaussian, fid

METRICS = ("psnr", "ssim", "lpips", "colorfulness", "cdc", "warp", "fid")
"""Metric names accepted by ``metrics=`` / ``--metrics`` (all of them by default)."""
COLUMNS = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS", "colorfulness": "colorfulness", "cdc": "CDC",
           "warp": "warp_error", "fid": "FID"}
"""Metric name -> CSV column."""
VIDEO_COLUMNS = ("PSNR", "SSIM", "LPIPS", "colorfulness", "CDC", "warp_error")
"""Per-video columns in CSV order (after ``video,n_frames``); FID follows, in the mean row only."""
FRAME_MEAN_COLUMNS = ("PSNR", "SSIM", "LPIPS", "colorfulness")
"""Columns that are means of per-frame values (CDC and warp error are computed over frame pairs)."""
FLOOR_COLUMNS = ("colorfulness", "CDC", "warp_error")
"""Columns of the optional ``gt`` row: the GT's own values, a floor for the prediction's."""
CDC_GAPS = (1, 2, 4)
COLORFULNESS_MEAN_WEIGHT = 0.3
OCCLUSION_RELATIVE = 0.01
OCCLUSION_ABSOLUTE = 0.5
BOUNDARY_RELATIVE = 0.01
BOUNDARY_ABSOLUTE = 0.002
FARNEBACK_PARAMETERS = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5,
                        "poly_sigma": 1.2, "flags": 0}
DIS_PRESET = "MEDIUM"

FlowFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""A flow plug-in: ``(img1, img2)`` RGB float32 ``(H, W, 3)`` in [0, 1] -> float32 ``(H, W, 2)`` (dx, dy) in
pixels, such that ``img2(p + flow(p))`` matches ``img1(p)``."""


class VideoMetricWarning(UserWarning):
    """A video metric is undefined (NaN) or computed under a fallback rule."""


def _warn(message: str) -> None:
    warnings.warn(message, VideoMetricWarning, stacklevel=3)


def _rgb_frame(frame: np.ndarray, what: str) -> np.ndarray:
    """The frame itself, checked to be RGB uint8 ``(H, W, 3)``."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"{what} must be an RGB uint8 (H, W, 3) frame (quantize [0, 1] values first), got "
                         f"{frame.dtype} {frame.shape}")
    return frame


def _same_shape(first: np.ndarray, second: np.ndarray, what: str) -> None:
    if first.shape != second.shape:
        raise ValueError(f"{what}: frame shapes differ, {first.shape} vs {second.shape}")


# ---------------------------------------------------------------------------------------------- per frame


def frame_psnr(pred: np.ndarray, gt: np.ndarray) -> float:
    """PSNR of two uint8 RGB frames: 10 log10(255^2 / MSE) over H x W x 3 in float64; +inf if identical."""
    pred, gt = _rgb_frame(pred, "pred"), _rgb_frame(gt, "gt")
    _same_shape(pred, gt, "PSNR")
    return psnr(pred, gt, data_range=255.0)


def frame_ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    """SSIM (wang: 11-tap Gaussian, sigma 1.5, C from L = 255) per RGB channel, then the channel mean."""
    pred, gt = _rgb_frame(pred, "pred"), _rgb_frame(gt, "gt")
    _same_shape(pred, gt, "SSIM")
    with warnings.catch_warnings():
        # uint8 frames cannot be [0, 1] data by mistake, and a black frame is legitimate video content.
        warnings.filterwarnings("ignore", message="inputs have max <= 1", category=FusionMetricWarning)
        return ssim(pred, gt)


def colorfulness(frame: np.ndarray, abs_opponent: bool = False) -> float:
    """Hasler & Süsstrunk M3: sqrt(sd_rg^2 + sd_yb^2) + 0.3 sqrt(mean_rg^2 + mean_yb^2), population sd.

    rg = R - G, yb = (R + G)/2 - B on 0..255; ``abs_opponent`` uses abs(rg), abs(yb) (pyimagesearch/ColorMNet).
    """
    rgb = _rgb_frame(frame, "frame").astype(np.float64)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    red_green = red - green
    yellow_blue = 0.5 * (red + green) - blue
    if abs_opponent:
        red_green, yellow_blue = np.abs(red_green), np.abs(yellow_blue)
    spread = math.hypot(float(np.std(red_green)), float(np.std(yellow_blue)))
    offset = math.hypot(float(np.mean(red_green)), float(np.mean(yellow_blue)))
    return spread + COLORFULNESS_MEAN_WEIGHT * offset


# ---------------------------------------------------------------------------------------------- CDC


def channel_histograms(frame: np.ndarray) -> np.ndarray:
    """Per-channel 256-bin histograms of a uint8 RGB frame divided by H*W: float64 ``(3, 256)``."""
    rgb = _rgb_frame(frame, "frame")
    pixels = rgb.shape[0] * rgb.shape[1]
    return np.stack([np.bincount(rgb[..., channel].ravel(), minlength=256) for channel in range(3)]) / pixels


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in nats along the last axis: KL(p||m)/2 + KL(q||m)/2, m = (p + q)/2."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    mixture = 0.5 * (p + q)
    # rel_entr is p log(p/m) with 0 log 0 = 0; m > 0 wherever p > 0 or q > 0.
    return 0.5 * np.sum(rel_entr(p, mixture), axis=-1) + 0.5 * np.sum(rel_entr(q, mixture), axis=-1)


class CdcAccumulator:
    """Streaming CDC of one video: feed frames in order with :meth:`update`, read :meth:`value`.

    Holds only the last ``max(CDC_GAPS)`` histograms and per-gap running sums.
    """

    def __init__(self) -> None:
        self._recent: deque[np.ndarray] = deque(maxlen=max(CDC_GAPS))
        self._sums = {gap: np.zeros(3) for gap in CDC_GAPS}
        self.n_frames = 0

    def update(self, frame: np.ndarray) -> None:
        """Add the next frame (uint8 RGB)."""
        histograms = channel_histograms(frame)
        for gap in CDC_GAPS:
            if len(self._recent) >= gap:
                self._sums[gap] += js_divergence(self._recent[-gap], histograms)
        self._recent.append(histograms)
        self.n_frames += 1

    def value(self) -> float:
        """Mean over channels of sum_d w_d mean_i JS(h_i, h_{i+d}); w_d = 1/3, renormalised over the gaps d < T.

        T < 5 drops the gaps d >= T with a warning (TCVC gives NaN); T < 2 gives NaN with a warning.
        """
        frames = self.n_frames
        if frames < 2:
            _warn(f"CDC needs at least 2 frames, got {frames}: NaN")
            return math.nan
        gaps = [gap for gap in CDC_GAPS if gap < frames]
        if len(gaps) < len(CDC_GAPS):
            _warn(f"CDC of a {frames}-frame video uses gaps {gaps} only (weights renormalised; TCVC gives NaN)")
        per_channel = sum(self._sums[gap] / (frames - gap) for gap in gaps) / len(gaps)
        return float(np.mean(per_channel))


def cdc(frames: Iterable[np.ndarray]) -> float:
    """CDC (TCVC) of a video given as uint8 RGB frames; lower is better, no reference needed."""
    accumulator = CdcAccumulator()
    for frame in frames:
        accumulator.update(frame)
    return accumulator.value()


# ---------------------------------------------------------------------------------------------- flow


def zero_flow(img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
    """No motion: the warp error becomes the mean squared frame difference (outside occlusions)."""
    return np.zeros((*img1.shape[:2], 2), dtype=np.float32)


def _gray8(rgb01: np.ndarray) -> np.ndarray:
    return quantize(rgb_to_luma(rgb01))


def farneback_flow(img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
    """OpenCV Farnebäck flow on BT.601 gray (parameters :data:`FARNEBACK_PARAMETERS`)."""
    import cv2

    return cv2.calcOpticalFlowFarneback(_gray8(img1), _gray8(img2), None, **FARNEBACK_PARAMETERS)


def dis_flow(img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
    """OpenCV DIS flow (preset :data:`DIS_PRESET`) on BT.601 gray."""
    import cv2

    estimator = cv2.DISOpticalFlow_create(getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{DIS_PRESET}"))
    return estimator.calc(_gray8(img1), _gray8(img2), None)


BUILTIN_FLOWS: dict[str, FlowFunction] = {"zero": zero_flow, "farneback": farneback_flow, "dis": dis_flow}


@dataclass(frozen=True)
class FlowModel:
    """A resolved flow plug-in and the description recorded in the JSON sidecar."""

    name: str
    function: FlowFunction
    description: dict

    def __call__(self, img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
        """The flow img1 -> img2 as float64 ``(H, W, 2)``, checked for shape and finiteness."""
        flow = np.asarray(self.function(img1, img2), dtype=np.float64)
        if flow.shape != (*img1.shape[:2], 2) or not np.isfinite(flow).all():
            raise ValueError(f"flow plug-in {self.name} returned {flow.shape} (finite: {np.isfinite(flow).all()}); "
                             f"it must return finite float32 (H, W, 2) flows for {img1.shape[:2]} frames")
        return flow


def resolve_flow(flow: str | FlowFunction) -> FlowModel:
    """A :class:`FlowModel` from a built-in name (``zero``, ``farneback``, ``dis``), ``MODULE:FUNC`` or a callable.

    Raises:
        ConfigError: an unknown name, or a ``MODULE:FUNC`` that cannot be imported.
    """
    if callable(flow):
        name = f"{flow.__module__}:{getattr(flow, '__qualname__', type(flow).__name__)}"
        return FlowModel(name, flow, {"name": name, "kind": "callable"})
    if flow in BUILTIN_FLOWS:
        description: dict = {"name": flow}
        if flow != "zero":
            import cv2

            description.update({"implementation": f"OpenCV {cv2.__version__}, BT.601 gray (uint8), CPU"})
            description["parameters"] = (dict(FARNEBACK_PARAMETERS) if flow == "farneback"
                                         else {"preset": DIS_PRESET})
        return FlowModel(flow, BUILTIN_FLOWS[flow], description)
    module_name, _, function_name = flow.partition(":")
    if not module_name or not function_name:
        raise ConfigError(f"unknown flow {flow!r}: use zero, farneback, dis or MODULE:FUNC")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"cannot load the flow plug-in {flow!r} ({error}); it must be an importable "
                          "MODULE:FUNC taking (img1, img2) RGB [0, 1] and returning (H, W, 2) float32") from error
    if not callable(function):
        raise ConfigError(f"flow plug-in {flow!r} is not callable")
    return FlowModel(flow, function, {"name": flow, "kind": "plug-in"})


# ---------------------------------------------------------------------------------------------- warp error


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """W(X, f)(p) = X(p + f(p)): bilinear, coordinates clamped to the frame, in float64.

    ``image`` is ``(H, W)`` or ``(H, W, C)``, ``flow`` ``(H, W, 2)`` (dx, dy) in pixels; computed with
    ``grid_sample`` (bilinear, ``border``, ``align_corners=True``).
    """
    image = np.asarray(image, dtype=np.float64)
    flow = np.asarray(flow, dtype=np.float64)
    height, width = flow.shape[:2]
    if image.shape[:2] != (height, width) or min(height, width) < 2:
        raise ValueError(f"warp needs an image and a flow of one size of at least 2x2, got {image.shape}, "
                         f"{flow.shape}")
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float64)
    grid = np.stack([2.0 * (columns + flow[..., 0]) / (width - 1) - 1.0,
                     2.0 * (rows + flow[..., 1]) / (height - 1) - 1.0], axis=-1)
    channels = torch.from_numpy(np.ascontiguousarray(image.reshape(height, width, -1).transpose(2, 0, 1)))
    warped = functional.grid_sample(channels[None], torch.from_numpy(grid)[None], mode="bilinear",
                                    padding_mode="border", align_corners=True)
    return warped[0].numpy().transpose(1, 2, 0).reshape(image.shape)


def _squared_norm(flow: np.ndarray) -> np.ndarray:
    return flow[..., 0] ** 2 + flow[..., 1] ** 2


def forward_backward_occlusion(fw: np.ndarray, bw: np.ndarray) -> np.ndarray:
    """O1: ||W(bw, fw) + fw||^2 > 0.01 (||W(bw, fw)||^2 + ||fw||^2) + 0.5 (Lai's ``detect_occlusion``)."""
    fw = np.asarray(fw, dtype=np.float64)
    warped_bw = warp(bw, fw)
    return (_squared_norm(warped_bw + fw)
            > OCCLUSION_RELATIVE * (_squared_norm(warped_bw) + _squared_norm(fw)) + OCCLUSION_ABSOLUTE)


def motion_boundary(fw: np.ndarray) -> np.ndarray:
    """O2: ||d_x fw||^2 + ||d_y fw||^2 > 0.01 ||fw||^2 + 0.002, forward differences f[k] - f[k+1] (0 at the end)."""
    fw = np.asarray(fw, dtype=np.float64)
    along_x = np.zeros_like(fw)
    along_y = np.zeros_like(fw)
    along_x[:, :-1] = fw[:, :-1] - fw[:, 1:]
    along_y[:-1] = fw[:-1] - fw[1:]
    return (_squared_norm(along_x) + _squared_norm(along_y)
            > BOUNDARY_RELATIVE * _squared_norm(fw) + BOUNDARY_ABSOLUTE)


def leaves_frame(fw: np.ndarray) -> np.ndarray:
    """Pixels p whose target p + fw(p) lies outside the frame."""
    height, width = fw.shape[:2]
    rows, columns = np.mgrid[0:height, 0:width]
    x, y = columns + fw[..., 0], rows + fw[..., 1]
    return (x < 0) | (x > width - 1) | (y < 0) | (y > height - 1)


def consistency_mask(fw: np.ndarray, bw: np.ndarray, mask_out_of_frame: bool = False) -> np.ndarray:
    """M = not (O1 or O2): the pixels whose warp error counts (optionally also not leaving the frame)."""
    occluded = forward_backward_occlusion(fw, bw) | motion_boundary(fw)
    if mask_out_of_frame:
        occluded |= leaves_frame(np.asarray(fw, dtype=np.float64))
    return ~occluded


def _masked_warp_error(frame: np.ndarray, next_frame: np.ndarray, fw: np.ndarray, mask: np.ndarray) -> float:
    """sum M (W(next, fw) - frame)^2 / (3 sum M) on RGB in [0, 1]; 0 if nothing is valid."""
    valid = int(mask.sum())
    if valid == 0:
        return 0.0
    difference = warp(next_frame.astype(np.float64) / 255.0, fw) - frame.astype(np.float64) / 255.0
    return float(np.sum(difference[mask] ** 2) / (3 * valid))


def pair_warp_error(frame: np.ndarray, next_frame: np.ndarray, fw: np.ndarray, bw: np.ndarray,
                    mask_out_of_frame: bool = False) -> float:
    """Lai's E_t of two consecutive uint8 RGB frames, given the flows fw (t -> t+1) and bw (t+1 -> t)."""
    frame, next_frame = _rgb_frame(frame, "frame"), _rgb_frame(next_frame, "next frame")
    _same_shape(frame, next_frame, "warp error")
    return _masked_warp_error(frame, next_frame, fw, consistency_mask(fw, bw, mask_out_of_frame))


def _flow_image(frame: np.ndarray) -> np.ndarray:
    """A frame as a flow plug-in's input: RGB float32 in [0, 1] (gray frames repeated over three channels)."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] != 3):
        raise ValueError(f"flow frames must be uint8 (H, W) or (H, W, 3), got {frame.dtype} {frame.shape}")
    rgb = frame if frame.ndim == 3 else np.repeat(frame[..., None], 3, axis=2)
    return rgb.astype(np.float32) / 255.0


class WarpErrorAccumulator:
    """Streaming warp error of ``sequences`` frame sequences whose flows come from one shared source sequence.

    Each :meth:`update` takes the next flow-source frame and the next frame of every sequence; the flows
    (fw t -> t+1, bw t+1 -> t) and the consistency mask are computed once per pair and used for all sequences
    (e.g. the prediction and, as a floor, the GT). Holds only the previous frames.
    """

    def __init__(self, flow: str | FlowFunction | FlowModel = "dis", mask_out_of_frame: bool = False,
                 sequences: int = 1) -> None:
        self.flow = flow if isinstance(flow, FlowModel) else resolve_flow(flow)
        self.mask_out_of_frame = mask_out_of_frame
        self.sequences = sequences
        self._previous: tuple[np.ndarray, tuple[np.ndarray, ...]] | None = None
        self._sums = [0.0] * sequences
        self.n_pairs = 0

    def update(self, source: np.ndarray, *frames: np.ndarray) -> None:
        """Add the next flow-source frame (uint8 gray or RGB) and the next uint8 RGB frame of each sequence."""
        if len(frames) != self.sequences:
            raise ValueError(f"warp error: expected {self.sequences} frame(s) per update, got {len(frames)}")
        image = _flow_image(source)
        frames = tuple(_rgb_frame(frame, "frame") for frame in frames)
        for frame in frames:
            if frame.shape[:2] != image.shape[:2]:
                raise ValueError(f"warp error: frame {frame.shape} and flow frame {image.shape} sizes differ")
        if self._previous is not None:
            previous_image, previous_frames = self._previous
            if previous_image.shape != image.shape:
                raise ValueError(f"warp error: the frame size changed within a video, {previous_image.shape[:2]} "
                                 f"-> {image.shape[:2]}")
            fw, bw = self.flow(previous_image, image), self.flow(image, previous_image)
            mask = consistency_mask(fw, bw, self.mask_out_of_frame)
            for index, (before, after) in enumerate(zip(previous_frames, frames)):
                self._sums[index] += _masked_warp_error(before, after, fw, mask)
            self.n_pairs += 1
        self._previous = (image, frames)

    def values(self) -> list[float]:
        """Mean E_t per sequence; NaN (with a warning) for a video of fewer than two frames."""
        if self.n_pairs == 0:
            _warn("warp error needs at least 2 frames: NaN")
            return [math.nan] * self.sequences
        return [total / self.n_pairs for total in self._sums]


def warp_error(frames: Iterable[np.ndarray], flow_frames: Iterable[np.ndarray] | None = None,
               flow: str | FlowFunction = "dis", mask_out_of_frame: bool = False) -> float:
    """Mean over t of Lai's E_t for uint8 RGB ``frames``, flows on ``flow_frames`` (default: the frames).

    Fewer than two frames give NaN with a warning.
    """
    accumulator = WarpErrorAccumulator(flow, mask_out_of_frame)
    if flow_frames is None:
        for frame in frames:
            accumulator.update(frame, frame)
    else:
        for frame, source in zip(frames, flow_frames, strict=True):
            accumulator.update(source, frame)
    return accumulator.values()[0]


# ---------------------------------------------------------------------------------------------- one video


@dataclass(frozen=True)
class VideoMetricConfig:
    """Conventions and weight files of the video metrics (spec/metrics.md §6)."""

    flow: str = "dis"
    """Flow for the warp error: zero, farneback, dis (OpenCV, weight-free) or MODULE:FUNC (a learned flow)."""
    flow_source: Literal["gt", "input"] = "gt"
    """Frames the flows are computed on: the GT, or the grayscale inputs (as Lai et al. do)."""
    mask_out_of_frame: bool = False
    """Also exclude pixels whose flow target leaves the frame from the warp error (not Lai-comparable)."""
    abs_opponent: bool = False
    """Colorfulness with abs(rg), abs(yb) (pyimagesearch/ColorMNet variant) instead of Hasler & Süsstrunk's."""
    lpips_backbone: Path | None = None
    """torchvision AlexNet state dict for LPIPS; without it the LPIPS column is omitted (nothing is downloaded)."""
    lpips_heads: Path | None = None
    """LPIPS v0.1 AlexNet heads (lpips' weights/v0.1/alex.pth); default: the file of an installed lpips/torchmetrics."""
    fid_weights: Path | None = None
    """pytorch-fid's pt_inception-2015-12-05 weights; without them FID is omitted (needs pytorch-fid installed)."""
    device: str = "cpu"
    """Device for the LPIPS and FID networks."""


def resolve_metrics(metrics: Sequence[str] | None) -> tuple[str, ...]:
    """Requested metric names (comma-separated entries allowed) in :data:`METRICS` order; ``None`` = all.

    Raises:
        ValueError: an unknown name.
    """
    if metrics is None:
        return METRICS
    requested = {name.strip().lower() for entry in metrics for name in entry.split(",") if name.strip()}
    unknown = sorted(requested - set(METRICS))
    if unknown:
        raise ValueError(f"unknown video metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    return tuple(name for name in METRICS if name in requested)


def _frame_tensor(frame: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(frame).to(device).permute(2, 0, 1)[None].float() / 255.0


class _VideoScorer:
    """Streams one video's frames into per-frame sums, CDC histograms, warp-error pairs and FID statistics."""

    def __init__(self, evaluator: VideoEvaluator) -> None:
        self.evaluator = evaluator
        metrics = evaluator.metrics
        self.columns = evaluator.columns
        self.sums = dict.fromkeys((*(c for c in FRAME_MEAN_COLUMNS if c in self.columns), "gt_colorfulness"), 0.0)
        self.n_frames = 0
        sequences = 2 if evaluator.gt_floor else 1  # the prediction, then the GT scored as its own floor
        self.cdc = [CdcAccumulator() for _ in range(sequences)] if "cdc" in metrics else []
        self.warp = (WarpErrorAccumulator(evaluator.flow, evaluator.config.mask_out_of_frame, sequences)
                     if "warp" in metrics else None)
        self.shape: tuple[int, ...] | None = None

    def update(self, pred: np.ndarray, gt: np.ndarray, flow_frame: np.ndarray | None) -> None:
        evaluator, columns, sums = self.evaluator, self.columns, self.sums
        pred, gt = _rgb_frame(pred, "pred"), _rgb_frame(gt, "gt")
        _same_shape(pred, gt, f"frame {self.n_frames}")
        if self.shape is None:
            self.shape = pred.shape
        elif pred.shape != self.shape:
            raise ValueError(f"frame {self.n_frames} is {pred.shape}, the video's first frame {self.shape}")
        if "PSNR" in columns:
            sums["PSNR"] += frame_psnr(pred, gt)
        if "SSIM" in columns:
            sums["SSIM"] += frame_ssim(pred, gt)
        if "colorfulness" in columns:
            sums["colorfulness"] += colorfulness(pred, evaluator.config.abs_opponent)
            if evaluator.gt_floor:
                sums["gt_colorfulness"] += colorfulness(gt, evaluator.config.abs_opponent)
        for accumulator, frame in zip(self.cdc, (pred, gt)):
            accumulator.update(frame)
        if self.warp is not None:
            scored = (pred, gt) if evaluator.gt_floor else (pred,)
            self.warp.update(gt if flow_frame is None else flow_frame, *scored)
        self._perceptual(pred, gt)
        self.n_frames += 1

    @torch.no_grad()
    def _perceptual(self, pred: np.ndarray, gt: np.ndarray) -> None:
        models = self.evaluator.perceptual
        if "LPIPS" not in self.columns and self.evaluator.fid_statistics is None:
            return
        network = models.lpips if "LPIPS" in self.columns else models.fid
        device = next(network.parameters()).device
        pred_tensor, gt_tensor = _frame_tensor(pred, device), _frame_tensor(gt, device)
        if "LPIPS" in self.columns:
            if min(pred.shape[:2]) < LPIPS_MIN_SIDE:
                if self.n_frames == 0:
                    _warn(f"LPIPS needs frames of at least {LPIPS_MIN_SIDE} px, got {pred.shape[1]}x{pred.shape[0]}: "
                          "NaN")
                self.sums["LPIPS"] = math.nan
            else:
                self.sums["LPIPS"] += float(models.lpips(pred_tensor, gt_tensor)[0])
        if self.evaluator.fid_statistics is not None:
            features = models.fid(torch.cat([pred_tensor, gt_tensor])).double().cpu().numpy()
            for statistics, row in zip(self.evaluator.fid_statistics, features):
                statistics.update(row[None])

    def result(self) -> tuple[dict[str, float], dict[str, float] | None]:
        """The video's row (``n_frames`` and its columns) and, with ``gt_floor``, the GT's floor values."""
        frames = self.n_frames
        if frames == 0:
            raise ValueError("a video without frames cannot be scored")
        values = {column: total / frames for column, total in self.sums.items()}
        per_sequence = (("CDC", [accumulator.value() for accumulator in self.cdc]),
                        ("warp_error", self.warp.values() if self.warp is not None else []))
        for column, sequence_values in per_sequence:
            for prefix, value in zip(("", "gt_"), sequence_values):
                values[prefix + column] = value
        row = {"n_frames": frames, **{column: values[column] for column in self.columns}}
        if not self.evaluator.gt_floor:
            return row, None
        return row, {"n_frames": frames, **{column: values[f"gt_{column}"] for column in FLOOR_COLUMNS
                                            if column in self.columns}}


class VideoEvaluator:
    """Scores videos one at a time (streamed) and reduces them: frame -> video -> dataset.

    Args:
        config: conventions, flow and weight files (default :class:`VideoMetricConfig`).
        metrics: names from :data:`METRICS` (default: all); LPIPS and FID without weights are omitted with a
            :class:`~common.perceptual.PerceptualWarning` and listed in ``omitted``.
        perceptual: networks already loaded (e.g. shared by several evaluations); default: loaded from the
            config's files when LPIPS or FID is requested.
        gt_floor: also score the GT's own colorfulness, CDC and warp error (the ``gt`` row).
    """

    def __init__(self, config: VideoMetricConfig | None = None, metrics: Sequence[str] | None = None,
                 perceptual: PerceptualModels | None = None, gt_floor: bool = False) -> None:
        self.config = config or VideoMetricConfig()
        self.metrics = resolve_metrics(metrics)
        self.gt_floor = gt_floor
        needed = [name for name in ("lpips", "fid") if name in self.metrics]
        if perceptual is None:
            files = self.config
            perceptual = (PerceptualModels.load(needed, files.lpips_backbone, files.lpips_heads, files.fid_weights,
                                                files.device) if needed else PerceptualModels())
        self.perceptual = perceptual
        self.omitted = {COLUMNS[name]: perceptual.omitted.get(COLUMNS[name], f"no {COLUMNS[name]} model given")
                        for name in needed if getattr(perceptual, name) is None}
        # The requested metrics that run: LPIPS or FID without their network are omitted.
        self.computed = tuple(name for name in self.metrics if COLUMNS[name] not in self.omitted)
        self.columns = tuple(column for column in VIDEO_COLUMNS if column in {COLUMNS[n] for n in self.computed})
        self.flow = resolve_flow(self.config.flow) if "warp" in self.metrics else None
        self.fid_statistics = ((RunningGaussian(), RunningGaussian())
                               if "fid" in self.metrics and perceptual.fid is not None else None)
        self.rows: dict[str, dict[str, float]] = {}
        self.floors: dict[str, dict[str, float]] = {}
        self._fid: float | None = None

    def add_video(self, name: str, pred_frames: Iterable[np.ndarray], gt_frames: Iterable[np.ndarray],
                  input_frames: Iterable[np.ndarray] | None = None) -> dict[str, float]:
        """Score one video from iterables (e.g. generators) of uint8 frames; returns its row.

        ``input_frames`` (gray or RGB) are needed only for ``flow_source="input"``. The row holds
        ``n_frames`` and the per-video columns; NaN marks undefined values (with a warning).

        Raises:
            ValueError: a repeated name, frame counts or shapes that differ, non-uint8 frames, missing inputs.
        """
        if name in self.rows:
            raise ValueError(f"video {name!r} was already scored")
        use_input = self.flow is not None and self.config.flow_source == "input"
        if use_input and input_frames is None:
            raise ValueError("flow_source='input' needs the grayscale input frames")
        scorer = _VideoScorer(self)
        sources = input_frames if use_input else None
        try:
            frames = zip(pred_frames, gt_frames, *(() if sources is None else (sources,)), strict=True)
            for pred, gt, *source in frames:
                scorer.update(pred, gt, source[0] if source else None)
        except ValueError as error:
            raise ValueError(f"video {name!r}: {error}") from error
        row, floor = scorer.result()
        self.rows[name] = row
        if floor is not None:
            self.floors[name] = floor
        self._fid = None
        return dict(row)

    @property
    def n_frames(self) -> int:
        """Frames scored so far, over all videos."""
        return int(sum(row["n_frames"] for row in self.rows.values()))

    def fid(self) -> float | None:
        """FID between all predicted and all GT frames so far (None when FID is not computed)."""
        if self.fid_statistics is None:
            return None
        if self._fid is None:
            self._fid = fid(*self.fid_statistics)
        return self._fid

    def means(self) -> tuple[dict[str, float], dict[str, int]]:
        """Per-column means over videos (NaN skipped) and NaN counts."""
        return summarize(self.rows, self.columns)

    def floor_means(self) -> dict[str, float]:
        """Means over videos of the GT's own colorfulness, CDC and warp error (``gt_floor`` only)."""
        columns = [column for column in FLOOR_COLUMNS if column in self.columns]
        return summarize(self.floors, columns)[0] if self.floors else {}

    def summary(self) -> dict:
        """JSON-ready results and conventions: counts, means, NaN counts, FID, GT floor, omissions, flow."""
        means, nan_counts = self.means()
        summary = {
            "n_videos": len(self.rows),
            "n_frames": self.n_frames,
            "columns": list(self.columns),
            "means": {column: json_number(value) for column, value in means.items()},
            "nan_counts": nan_counts,
        }
        fid_value = self.fid()
        if fid_value is not None:
            summary["FID"] = json_number(fid_value)
        if self.gt_floor:
            summary["gt_floor"] = {column: json_number(value) for column, value in self.floor_means().items()}
        summary["omitted"] = dict(self.omitted)
        summary["conventions"] = conventions(self.config, self.computed)
        summary["conventions_line"] = conventions_line(self.config, self.computed)
        if self.flow is not None:
            summary["flow"] = {**self.flow.description, "source": self.config.flow_source,
                               "mask_out_of_frame": self.config.mask_out_of_frame}
        summary["config"] = {key: str(value) if isinstance(value, Path) else value
                             for key, value in asdict(self.config).items()}
        summary["versions"] = {"numpy": np.__version__, "scipy": scipy.__version__, "torch": torch.__version__}
        return summary

    def csv_text(self) -> str:
        """The CSV: ``video,n_frames,<columns>[,FID]``, one row per video (natural order), ``mean``, then ``gt``.

        The ``mean`` row's n_frames is the total; FID appears in the mean row only; the ``gt`` row (with
        ``gt_floor``) fills colorfulness, CDC and warp_error and leaves the other cells empty.
        """
        fid_value = self.fid()
        header = ["video", "n_frames", *self.columns, *(["FID"] if fid_value is not None else [])]
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(header)
        for name in sorted(self.rows, key=natural_key):
            row = self.rows[name]
            writer.writerow([name, row["n_frames"], *(format_value(row[c]) for c in self.columns),
                             *([""] if fid_value is not None else [])])
        means, _ = self.means()
        writer.writerow(["mean", self.n_frames, *(format_value(means[c]) for c in self.columns),
                         *([format_value(fid_value)] if fid_value is not None else [])])
        if self.gt_floor:
            floor = self.floor_means()
            writer.writerow(["gt", self.n_frames, *(format_value(floor[c]) if c in floor else "" for c in self.columns),
                             *([""] if fid_value is not None else [])])
        return text.getvalue()

    def write(self, csv_path: str | Path, json_path: str | Path | None = None, extra: dict | None = None) -> dict:
        """Write the CSV and the JSON sidecar (default: the CSV path with suffix ``.json``) atomically.

        Returns the summary (with ``extra`` merged in).
        """
        csv_path = Path(csv_path)
        summary = {**self.summary(), **(extra or {})}
        atomic_write_text(csv_path, self.csv_text())
        atomic_write_json(csv_path.with_suffix(".json") if json_path is None else json_path, summary)
        return summary


def evaluate_video(pred_frames: Iterable[np.ndarray], gt_frames: Iterable[np.ndarray],
                   input_frames: Iterable[np.ndarray] | None = None, config: VideoMetricConfig | None = None,
                   metrics: Sequence[str] | None = None, perceptual: PerceptualModels | None = None
                   ) -> dict[str, float]:
    """The metrics of one video (frame means, CDC, warp error, LPIPS): ``n_frames`` and the computed columns.

    A shortcut for a one-video :class:`VideoEvaluator`; FID, being set-level, is not part of a video's row.
    """
    metrics = [name for name in resolve_metrics(metrics) if name != "fid"]
    return VideoEvaluator(config, metrics, perceptual).add_video("video", pred_frames, gt_frames, input_frames)


def conventions(config: VideoMetricConfig, metrics: Sequence[str] = METRICS) -> dict[str, str]:
    """Column -> the definition and units in force (recorded in the JSON sidecar)."""
    table = {
        "psnr": ("PSNR", "dB per frame, 10 log10(255^2/MSE) over HxWx3 of the uint8 values; identical frames inf; "
                         "frame -> video -> dataset mean"),
        "ssim": ("SSIM", "wang (11-tap Gaussian, sigma 1.5, C1=(0.01*255)^2, C2=(0.03*255)^2) per RGB channel, "
                         "channel mean; frame -> video -> dataset mean"),
        "lpips": ("LPIPS", "v0.1 AlexNet, RGB [0, 1] -> [-1, 1]; frame -> video -> dataset mean"),
        "colorfulness": ("colorfulness", "Hasler & Suesstrunk M3 on RGB 0..255"
                         + (", abs opponents (pyimagesearch)" if config.abs_opponent else "")),
        "cdc": ("CDC", "TCVC: Jensen-Shannon (nats) of per-channel 256-bin histograms, gaps 1, 2, 4 (1/3 each; "
                       "renormalised when T < 5), channel mean, video mean"),
        "warp": ("warp_error", f"Lai et al. 2018, raw (not x1000), RGB [0, 1], flow {config.flow} on "
                               f"{config.flow_source}, occlusion O1/O2 of detect_occlusion"
                               + (", out-of-frame pixels masked" if config.mask_out_of_frame else "")),
        "fid": ("FID", "pytorch-fid Inception pool3 over all frames of the set, float64 statistics (N-1)"),
    }
    return dict(table[name] for name in metrics)


def conventions_line(config: VideoMetricConfig, metrics: Sequence[str] = METRICS) -> str:
    """One line naming the conventions in force, for the console header."""
    parts = {"psnr": "PSNR over RGB, peak 255", "ssim": "SSIM wang per RGB channel, channel mean",
             "lpips": "LPIPS v0.1 alex", "colorfulness": "colorfulness M3" + (" abs" if config.abs_opponent else ""),
             "cdc": "CDC JS in nats, gaps 1,2,4",
             "warp": f"warp error raw, flow {config.flow} on {config.flow_source}"
                     + (", out-of-frame masked" if config.mask_out_of_frame else ""),
             "fid": "FID pool3"}
    return " · ".join(parts[name] for name in metrics)


# ---------------------------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class VideoMetricsArgs:
    """Score colorized videos against GT videos: DIR/<video>/<frames>, natural frame order."""

    pred: Path
    """Folder of predicted videos (one subfolder of RGB frames per video)."""
    gt: Path
    """Folder of ground-truth videos with the same video names, frame names, counts and sizes."""
    input: Path | None = None
    """Folder of the grayscale input videos (needed for --flow-source input)."""
    metrics: tuple[str, ...] = METRICS
    """Metrics (names or comma-separated lists): psnr, ssim, lpips, colorfulness, cdc, warp, fid."""
    config: VideoMetricConfig = VideoMetricConfig()
    """Conventions, flow and weight files."""
    out: Path | None = None
    """CSV path (default: PRED/metrics.csv); the JSON sidecar goes next to it with suffix .json."""
    gt_row: bool = False
    """Add a 'gt' row with the GT's own colorfulness, CDC and warp error (a floor for the prediction's)."""


def _video_folders(root: Path, what: str) -> dict[str, Path]:
    if not root.is_dir():
        raise DataError(f"{what} folder {root} does not exist")
    folders = {path.name: path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")}
    if not folders:
        raise DataError(f"{what} folder {root} holds no video folders (expected {root}/<video>/<frames>)")
    return folders


def _match_videos(args: VideoMetricsArgs) -> list[tuple[str, list[Path], list[Path], list[Path] | None]]:
    """Per video, the paired frame files; every mismatch is one :class:`DataError` naming the files."""
    roots = {"pred": args.pred, "GT": args.gt, **({"input": args.input} if args.input is not None else {})}
    folders = {what: _video_folders(root, what) for what, root in roots.items()}
    names = set(folders["pred"])
    problems = []
    for what in folders:
        missing, extra = sorted(names - set(folders[what])), sorted(set(folders[what]) - names)
        if missing:
            problems.append(f"{len(missing)} video(s) missing from {roots[what]}: {', '.join(missing[:20])}")
        if extra:
            problems.append(f"{len(extra)} video(s) in {roots[what]} without a prediction: {', '.join(extra[:20])}")
    if problems:
        raise DataError("; ".join(problems) + " (video folder names must match)")
    videos = []
    for name in sorted(names, key=natural_key):
        frames = {what: list_frames(folders[what][name], IMAGE_EXTENSIONS) for what in folders}
        counts = {what: len(paths) for what, paths in frames.items()}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{folders[what][name]} {count}" for what, count in counts.items())
            raise DataError(f"video '{name}': frame counts differ ({listed})")
        for index, paths in enumerate(zip(*frames.values())):
            if len({path.stem for path in paths}) > 1:
                raise DataError(f"video '{name}': frame {index} names differ ({', '.join(map(str, paths))}); "
                                "frames pair by name in natural order")
            sizes = [image_size(path) for path in paths]
            first = image_size(frames["pred"][0]) if index else sizes[0]
            if len(set(sizes)) > 1 or sizes[0] != first:
                listed = ", ".join(f"{path} {width}x{height}" for path, (width, height) in zip(paths, sizes))
                raise DataError(f"video '{name}': frame sizes differ ({listed}; first frame {first[0]}x{first[1]}); "
                                "nothing is resized")
        videos.append((name, frames["pred"], frames["GT"], frames.get("input")))
    return videos


def _read_rgb(paths: Sequence[Path]) -> Iterable[np.ndarray]:
    for path in paths:
        frame = read_image(path, high_bit_depth="reject")
        yield frame if frame.ndim == 3 else np.repeat(frame[..., None], 3, axis=2)


def _read_any(paths: Sequence[Path]) -> Iterable[np.ndarray]:
    for path in paths:
        yield read_image(path, high_bit_depth="reject")


@contextlib.contextmanager
def _printed_warnings(prefix: str = "") -> Iterator[None]:
    """Collect the warnings of a block and print each distinct one as a ``warning:`` line on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for message in dict.fromkeys(str(warning.message) for warning in caught):
        print(f"warning: {prefix}{message}", file=sys.stderr)


def run(args: VideoMetricsArgs) -> dict:
    """Score every video, write the CSV and JSON, print the table; returns the JSON summary.

    Raises:
        DataError: missing or mismatched folders, frames or sizes, unreadable images or weight files.
        ConfigError: an unusable flow plug-in, or ``--flow-source input`` without ``--input``.
        ValueError: an unknown metric name.
    """
    from rich.console import Console
    from rich.table import Table

    metrics = resolve_metrics(args.metrics)
    if "warp" in metrics and args.config.flow_source == "input" and args.input is None:
        raise ConfigError("--flow-source input needs --input DIR with the grayscale input videos")
    videos = _match_videos(args)
    with _printed_warnings():
        evaluator = VideoEvaluator(args.config, metrics, gt_floor=args.gt_row)
    for name, pred, gt, inputs in videos:
        with _printed_warnings(f"{name}: "):
            evaluator.add_video(name, _read_rgb(pred), _read_rgb(gt), None if inputs is None else _read_any(inputs))
    csv_path = args.out if args.out is not None else args.pred / "metrics.csv"
    inputs = {"pred": str(args.pred), "gt": str(args.gt), "input": None if args.input is None else str(args.input)}
    with _printed_warnings():
        summary = evaluator.write(csv_path, extra={"inputs": inputs})

    console = Console()
    console.print(summary["conventions_line"])
    table = Table(title=f"video metrics: {summary['n_videos']} videos, {summary['n_frames']} frames")
    for column in ("video", "frames", *evaluator.columns):
        table.add_column(column, justify="left" if column == "video" else "right")
    means, _ = evaluator.means()
    ordered = sorted(evaluator.rows.items(), key=lambda item: natural_key(item[0]))
    for name, row in [*ordered, ("mean", {**means, "n_frames": evaluator.n_frames})]:
        table.add_row(name, str(row["n_frames"]), *(f"{row[column]:.5g}" for column in evaluator.columns))
    console.print(table)
    if "FID" in summary:
        console.print(f"FID {summary['FID']}")
    console.print(f"wrote {csv_path} and {csv_path.with_suffix('.json')}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry; returns the exit code (2 for bad input, with one message on stderr)."""
    import tyro

    args = tyro.cli(VideoMetricsArgs, args=argv, config=(tyro.conf.OmitArgPrefixes,))
    try:
        run(args)
    except (UserError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
