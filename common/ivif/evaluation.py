"""Infrared/visible fusion evaluation shared by CrossFuse and MaeFuse: test pairs, colour, baseline, gate.

- :func:`read_test_pair` reads a held-out pair at its own size (IR gray, VIS luma, VIS RGB for colour VIS).
- :func:`recolour` puts a fused luma back into the VIS chroma (BT.601 full-range YCrCb).
- :func:`average_fusion` is the averaging baseline rint((A + B) / 2); :func:`score` runs the metrics of
  ``common.fusion_metrics`` on (name, F, A, B) triplets.
- :func:`quality_report` is the demo's quality gate on the generated dataset's masks: mean Qabf at least
  ``QABF_MARGIN`` above averaging, the VIS texture kept (high-pass amplitude ratio and correlation inside the
  texture masks) and the IR targets standing out from their ring. Averaging itself passes the last two, so Qabf
  and the texture amplitude are what separate a fusion from averaging.
- :func:`save_fusion_grid` draws IR | VIS | average | fused rows a person can look at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from common.errors import DataError
from common.fusion_metrics import FusionMetricConfig, evaluate_triplet, qabf, summarize
from common.images import read_image, rgb_to_gray, rgb_to_ycrcb, to_gray, ycrcb_to_rgb
from common.ivif.data import FilePair
from common.plots import save_image_grid

QABF_MARGIN = 0.03
TEXTURE_STD_RATIO_MIN = 0.8
TEXTURE_CORR_MIN = 0.8
TARGET_CONTRAST_MIN = 1.5
HIGH_PASS_SIGMA = 2.0
RING_PIXELS = (1, 4)


@dataclass
class FusedPair:
    """One fused test pair: uint8 gray IR, VIS luma and fused image, and the colour result for colour VIS."""

    name: str
    ir: np.ndarray
    vi: np.ndarray
    fused: np.ndarray
    colour: np.ndarray | None = None
    average: np.ndarray | None = None
    """The trainer's averaging baseline at the source size (default: :func:`average_fusion` of IR and VIS)."""

    def baseline(self) -> np.ndarray:
        """The averaging baseline of this pair."""
        return self.average if self.average is not None else average_fusion(self.ir, self.vi)


def read_test_pair(pair: FilePair) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """IR gray, VIS luma (rint BT.601) and the VIS RGB image (None when gray) of a test pair, never resized."""
    ir = to_gray(read_image(pair.ir))
    vi_raw = read_image(pair.vi)
    vi = rgb_to_gray(vi_raw) if vi_raw.ndim == 3 else vi_raw
    if ir.shape != vi.shape:
        raise DataError(f"IR and VIS sizes differ for {pair.names()}: {ir.shape[1]}x{ir.shape[0]} vs "
                        f"{vi.shape[1]}x{vi.shape[0]} (W x H); test pairs must be registered images")
    return ir, vi, (vi_raw if vi_raw.ndim == 3 else None)


def recolour(fused: np.ndarray, vi_rgb: np.ndarray) -> np.ndarray:
    """Fused luma recombined with the VIS chroma (BT.601 full range YCrCb), as uint8 RGB."""
    ycrcb = rgb_to_ycrcb(vi_rgb)
    ycrcb[..., 0] = fused.astype(np.float64)
    return np.clip(np.rint(ycrcb_to_rgb(ycrcb)), 0, 255).astype(np.uint8)


def average_fusion(ir: np.ndarray, vi: np.ndarray) -> np.ndarray:
    """The averaging baseline rint((A + B) / 2) as uint8."""
    return np.clip(np.rint((ir.astype(np.float64) + vi.astype(np.float64)) / 2.0), 0, 255).astype(np.uint8)


def score(images: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], metrics,
          before_each: Callable[[], None] | None = None) -> dict[str, dict[str, float]]:
    """Metrics of each (name, F, A, B) triplet, by name; ``before_each`` runs before every image (a stop check:
    a whole set of metrics takes about 1.5 s for a 640x512 image)."""
    rows = {}
    for name, fused, ir, vi in images:
        if before_each is not None:
            before_each()
        rows[name] = evaluate_triplet(fused, ir, vi, FusionMetricConfig(), metrics)
    return rows


def high_pass(image: np.ndarray) -> np.ndarray:
    """x - blur_sigma2(x) in float64 (check 16's texture measure)."""
    image = np.asarray(image, dtype=np.float64)
    return image - ndimage.gaussian_filter(image, HIGH_PASS_SIGMA)


def ring_mask(targets: np.ndarray) -> np.ndarray:
    """Pixels 1 to 4 px (Euclidean) outside the target mask."""
    distance = ndimage.distance_transform_edt(~targets)
    return (distance >= RING_PIXELS[0]) & (distance <= RING_PIXELS[1])


def image_quality(fused: np.ndarray, vi: np.ndarray, targets: np.ndarray, texture: np.ndarray) -> dict[str, float]:
    """Check-16 measures of one image: VIS texture std ratio and correlation of the high-passes inside the texture
    mask, and the target contrast (mean F on targets - mean F on their ring) / std(F)."""
    fused = np.asarray(fused, dtype=np.float64)
    values = {"texture_std_ratio": math.nan, "texture_corr": math.nan, "target_contrast": math.nan}
    if texture.any():
        hp_fused, hp_vi = high_pass(fused)[texture], high_pass(vi)[texture]
        values["texture_std_ratio"] = float(hp_fused.std() / hp_vi.std())
        values["texture_corr"] = float(np.corrcoef(hp_fused, hp_vi)[0, 1])
    ring = ring_mask(targets)
    if targets.any() and ring.any():
        values["target_contrast"] = float((fused[targets].mean() - fused[ring].mean()) / fused.std())
    return values


def read_masks(masks_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The demo's target and texture masks of test image `name`, or None when absent."""
    targets, texture = masks_dir / f"{name}_targets.png", masks_dir / f"{name}_texture.png"
    if not (targets.is_file() and texture.is_file()):
        return None
    return read_image(targets) > 127, read_image(texture) > 127


def quality_report(pairs: list[FusedPair], masks_dir: Path) -> dict | None:
    """The demo quality gate over the test split (means over images), for F and for the averaging baseline; None
    when the test folder has no masks (not the generated demo data)."""
    per_image = {}
    for pair in pairs:
        masks = read_masks(masks_dir, pair.name)
        if masks is None:
            return None
        average = pair.baseline()
        per_image[pair.name] = {
            "fused": {"qabf": qabf(pair.fused, pair.ir, pair.vi), **image_quality(pair.fused, pair.vi, *masks)},
            "average": {"qabf": qabf(average, pair.ir, pair.vi), **image_quality(average, pair.vi, *masks)},
        }

    def mean(source: str, key: str) -> float:
        return float(np.nanmean([values[source][key] for values in per_image.values()]))

    qabf_fused, qabf_average = mean("fused", "qabf"), mean("average", "qabf")
    checks = {
        "qabf": {"fused": qabf_fused, "average": qabf_average, "required": qabf_average + QABF_MARGIN,
                 "passed": qabf_fused >= qabf_average + QABF_MARGIN},
        "texture_std_ratio": {"fused": mean("fused", "texture_std_ratio"),
                              "average": mean("average", "texture_std_ratio"), "required": TEXTURE_STD_RATIO_MIN},
        "texture_corr": {"fused": mean("fused", "texture_corr"), "average": mean("average", "texture_corr"),
                         "required": TEXTURE_CORR_MIN},
        "target_contrast": {"fused": mean("fused", "target_contrast"), "average": mean("average", "target_contrast"),
                            "required": TARGET_CONTRAST_MIN},
    }
    for key in ("texture_std_ratio", "texture_corr", "target_contrast"):
        checks[key]["passed"] = bool(checks[key]["fused"] >= checks[key]["required"])
    checks["qabf"]["passed"] = bool(checks["qabf"]["passed"])
    return {"checks": checks, "passed": all(check["passed"] for check in checks.values()), "per_image": per_image}


def beats_average(fused_means: dict, average_means: dict) -> dict:
    """Whether F beats averaging on Qabf, SSIM (sum) and VIF, and on at least 2 of them (recorded, not gated)."""
    wins = {metric: bool(fused_means.get(metric) is not None and average_means.get(metric) is not None
                         and fused_means[metric] > average_means[metric]) for metric in ("Qabf", "SSIM", "VIF")}
    return {**wins, "at_least_2_of_3": sum(wins.values()) >= 2}


def write_means(rows: dict, metrics) -> dict:
    """Per-metric means (NaN skipped) as JSON-ready numbers."""
    means, _ = summarize(rows, metrics)
    return {name: (None if math.isnan(value) else value) for name, value in means.items()}


def print_comparison(console, fused: dict, average: dict | None, metrics) -> None:
    """One line per metric: fused mean, and the averaging baseline's when scored."""
    for metric in metrics:
        value = fused.get(metric)
        line = f"  {metric:<10} {value if value is None else f'{value:.4f}'}"
        if average is not None:
            base = average.get(metric)
            line += f"   average {base if base is None else f'{base:.4f}'}"
        console.print(line)


def save_fusion_grid(path: str | Path, pairs: Sequence[FusedPair], limit: int = 8) -> Path:
    """A PNG with one row per pair (at most ``limit``): IR | VIS | average | fused, each at the pair's size."""
    rows = [[pair.ir, pair.vi, pair.baseline(), pair.fused] for pair in pairs[:limit]]
    return save_image_grid(path, rows, columns=("IR", "VIS", "average", "fused"),
                           row_labels=[pair.name for pair in pairs[:limit]])
