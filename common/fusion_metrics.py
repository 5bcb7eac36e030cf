"""Infrared/visible image-fusion metrics (spec/metrics.md §3-4), in numpy, and their command line.

Notation: A = IR, B = VIS, F = fused; images are float64 ``(H, W)`` arrays in [0, 255] (never rescaled here;
inputs whose maximum is <= 1 raise a warning). Two-source metrics take ``(F, A, B)`` and return a float.
Undefined results are NaN with a :class:`FusionMetricWarning`, never a silent 0 or 1.

Columns: EN, SD, SF, AG, MI, FMI_pixel, FMI_dct (FMI_w with PyWavelets), SCD, VIF, Qabf, Nabf, SSIM, MS_SSIM,
PSNR, MSE, CC; conventions are options of :class:`FusionMetricConfig`.

    python -m common.fusion_metrics --fused DIR --ir DIR --vis DIR [--out CSV] [--metrics NAMES] [--workers N]
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import scipy
from scipy import fft as scipy_fft
from scipy import ndimage

METRIC_COLUMNS = ("EN", "SD", "SF", "AG", "MI", "FMI_pixel", "FMI_dct", "SCD", "VIF", "Qabf", "Nabf", "SSIM",
                  "MS_SSIM", "PSNR", "MSE", "CC")
"""The default columns, in CSV order."""
OPTIONAL_COLUMNS = ("FMI_w",)
"""Columns computed only on request (appended after the default ones)."""
ALL_COLUMNS = METRIC_COLUMNS + OPTIONAL_COLUMNS

MIN_SIDE_SSIM = 11
MIN_SIDE_SSIM_CDDFUSE = 7
MIN_SIDE_VIF = 41
MIN_SIDE_MS_SSIM = 161
MIN_SIDE_GRADIENT = 2
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2
CDDFUSE_C1 = 0.02 ** 2
CDDFUSE_C2 = 0.06 ** 2
VIF_NOISE_VARIANCE = 2.0
NABF_THRESHOLD = 2.0
FMI_CHUNK_BYTES = 64 * 2 ** 20
_FMI_CHUNK_WINDOWS = 2048  # small chunks stay in cache, far below the 64 MB bound
_LN2 = math.log(2.0)


class FusionMetricWarning(UserWarning):
    """A fusion metric is undefined (NaN) or its inputs look mis-scaled."""


@dataclass(frozen=True)
class FusionMetricConfig:
    """Conventions of the fusion metrics (defaults: spec/metrics.md §4.1, in bold there)."""

    mi_unit: Literal["bits", "nats"] = "bits"
    """MI logarithm: bits (log2) or nats (ln; CDDFuse tables)."""
    ssim_convention: Literal["wang", "cddfuse"] = "wang"
    """SSIM: wang (11-tap Gaussian, C from L=255) or cddfuse (7x7 uniform, sample moments, C from L=2)."""
    ssim_reduce: Literal["sum", "mean"] = "sum"
    """How SSIM(F,A) and SSIM(F,B) (and MS-SSIM) combine: sum (about 1) or mean (about 0.5)."""
    psnr_convention: Literal["standard", "tang", "cddfuse"] = "standard"
    """PSNR: standard 10 log10(255^2/MSE); tang adds 20 log10(255); cddfuse uses the peak max(F)."""
    mse_scale: Literal["255", "unit"] = "255"
    """MSE on the 0..255 scale, or divided by 255^2 (unit)."""
    ag_norm: Literal["hw", "matlab"] = "hw"
    """AG divisor: H*W, or (H-1)(W-1) as in the MATLAB toolbox."""
    fmi_window: int = 3
    """FMI window side w."""
    vif_nan_as_one: bool = False
    """VIF of a constant reference: 1.0 (CDDFuse) instead of NaN."""
    qabf_strict_ratio: bool = False
    """Qabf gradient ratio 1 where g_X = g_F, instead of the reference implementation's g_F."""


def _warn(message: str) -> None:
    warnings.warn(message, FusionMetricWarning, stacklevel=3)


def _as_images(*images: np.ndarray) -> list[np.ndarray]:
    """float64 copies-if-needed of equal-shape 2-D images; warns once if they look like [0, 1] data."""
    arrays = [np.asarray(image, dtype=np.float64) for image in images]
    for array in arrays:
        if array.ndim != 2:
            raise ValueError(f"fusion metrics take 2-D gray images, got shape {array.shape}")
        if array.shape != arrays[0].shape:
            raise ValueError(f"image shapes differ: {[a.shape for a in arrays]}")
    _warn_if_unit_range(*arrays)
    return arrays


def _warn_if_unit_range(*arrays: np.ndarray) -> None:
    if arrays[0].size and max(float(array.max()) for array in arrays) <= 1.0:
        warnings.warn("inputs have max <= 1: the fusion metrics expect values in [0, 255] and never rescale",
                      FusionMetricWarning, stacklevel=4)


def _too_small(image: np.ndarray, minimum: int, metric: str) -> bool:
    if min(image.shape) < minimum:
        _warn(f"{metric} needs a side of at least {minimum} px, got {image.shape[1]}x{image.shape[0]}: NaN")
        return True
    return False


def quantize(x01: np.ndarray) -> np.ndarray:
    """``clip(rint(255 * x01), 0, 255)`` as uint8 (ties to even)."""
    return np.clip(np.rint(255.0 * np.asarray(x01, dtype=np.float64)), 0, 255).astype(np.uint8)


def _quantize_255(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.intp)


# ---------------------------------------------------------------------------------------------- one image


def _en(image: np.ndarray) -> float:
    counts = np.bincount(_quantize_255(image).ravel(), minlength=256)
    probabilities = counts[counts > 0] / image.size
    return float(-np.sum(probabilities * np.log2(probabilities))) + 0.0


def en(F: np.ndarray) -> float:
    """Entropy in bits of the 256-bin histogram of the quantised image."""
    return _en(*_as_images(F))


def _sd(image: np.ndarray) -> float:
    return float(np.std(image))


def sd(F: np.ndarray) -> float:
    """Population standard deviation."""
    return _sd(*_as_images(F))


def _sf(image: np.ndarray) -> float:
    if _too_small(image, MIN_SIDE_GRADIENT, "SF"):
        return math.nan
    row_frequency = np.mean(np.diff(image, axis=1) ** 2)
    column_frequency = np.mean(np.diff(image, axis=0) ** 2)
    return float(np.sqrt(row_frequency + column_frequency))


def sf(F: np.ndarray) -> float:
    """Spatial frequency sqrt(RF^2 + CF^2) from horizontal and vertical neighbour differences."""
    return _sf(*_as_images(F))


def _ag(image: np.ndarray, norm: str) -> float:
    if _too_small(image, MIN_SIDE_GRADIENT, "AG"):
        return math.nan
    gradient_y, gradient_x = np.gradient(image)
    total = float(np.sum(np.sqrt((gradient_x ** 2 + gradient_y ** 2) / 2.0)))
    height, width = image.shape
    return total / (height * width if norm == "hw" else (height - 1) * (width - 1))


def ag(F: np.ndarray, norm: Literal["hw", "matlab"] = "hw") -> float:
    """Average gradient: sum sqrt((Gx^2 + Gy^2)/2) over pixels (numpy ``gradient``) / (H W) or (H-1)(W-1)."""
    return _ag(*_as_images(F), norm)


# ---------------------------------------------------------------------------------------------- statistics


def _pearson(x: np.ndarray, y: np.ndarray, metric: str) -> float:
    x_centred = x - x.mean()
    y_centred = y - y.mean()
    denominator = math.sqrt(float(np.sum(x_centred * x_centred)) * float(np.sum(y_centred * y_centred)))
    if denominator == 0.0:
        _warn(f"{metric}: correlation with a constant image is undefined: NaN")
        return math.nan
    return float(np.sum(x_centred * y_centred)) / denominator


def _scd(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return _pearson(fused - b, a, "SCD") + _pearson(fused - a, b, "SCD")


def scd(F: np.ndarray, A: np.ndarray, B: np.ndarray) -> float:
    """Sum of the correlations of differences: r(F - B, A) + r(F - A, B)."""
    return _scd(*_as_images(F, A, B))


def _cc(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * (_pearson(a, fused, "CC") + _pearson(b, fused, "CC"))


def cc(F: np.ndarray, A: np.ndarray, B: np.ndarray) -> float:
    """Mean correlation coefficient (r(A, F) + r(B, F)) / 2."""
    return _cc(*_as_images(F, A, B))


def _mutual_information_nats(x: np.ndarray, y: np.ndarray) -> float:
    joint = np.bincount((_quantize_255(x) * 256 + _quantize_255(y)).ravel(), minlength=256 * 256)
    joint = joint.reshape(256, 256) / x.size
    marginal_x = joint.sum(axis=1)
    marginal_y = joint.sum(axis=0)
    rows, columns = np.nonzero(joint)
    probabilities = joint[rows, columns]
    return float(np.sum(probabilities * (np.log(probabilities) - np.log(marginal_x[rows])
                                         - np.log(marginal_y[columns]))))


def _mi(fused: np.ndarray, a: np.ndarray, b: np.ndarray, unit: str) -> float:
    total = _mutual_information_nats(a, fused) + _mutual_information_nats(b, fused)
    return total if unit == "nats" else total / _LN2


def mi(F: np.ndarray, A: np.ndarray, B: np.ndarray, unit: Literal["bits", "nats"] = "bits") -> float:
    """I(A;F) + I(B;F) from 256x256 joint histograms of the quantised images, in bits or nats."""
    return _mi(*_as_images(F, A, B), unit)


# ---------------------------------------------------------------------------------------------- filters


def _gaussian_taps(size: int, sigma: float) -> np.ndarray:
    offsets = np.arange(size, dtype=np.float64) - size // 2
    taps = np.exp(-(offsets ** 2) / (2.0 * sigma * sigma))
    return taps / taps.sum()


def _filter_valid(image: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable correlation with ``taps`` along both axes, 'valid' part only (kernel smaller than image)."""
    radius = taps.size // 2
    filtered = ndimage.correlate1d(image, taps, axis=0, mode="constant")
    filtered = ndimage.correlate1d(filtered, taps, axis=1, mode="constant")
    return filtered[radius:image.shape[0] - radius, radius:image.shape[1] - radius]


_SSIM_TAPS = _gaussian_taps(11, 1.5)
_UNIFORM_TAPS = np.full(7, 1.0 / 7.0)


# ---------------------------------------------------------------------------------------------- SSIM family


def _ssim_maps(x: np.ndarray, y: np.ndarray, taps: np.ndarray, c1: float, c2: float,
               covariance_factor: float) -> tuple[np.ndarray, np.ndarray]:
    """SSIM and contrast-structure maps over the valid region."""
    mean_x = _filter_valid(x, taps)
    mean_y = _filter_valid(y, taps)
    variance_x = covariance_factor * (_filter_valid(x * x, taps) - mean_x * mean_x)
    variance_y = covariance_factor * (_filter_valid(y * y, taps) - mean_y * mean_y)
    covariance = covariance_factor * (_filter_valid(x * y, taps) - mean_x * mean_y)
    contrast_structure = (2.0 * covariance + c2) / (variance_x + variance_y + c2)
    luminance = (2.0 * mean_x * mean_y + c1) / (mean_x * mean_x + mean_y * mean_y + c1)
    return luminance * contrast_structure, contrast_structure


def _ssim_gray(x: np.ndarray, y: np.ndarray, convention: str) -> float:
    if convention == "wang":
        if _too_small(x, MIN_SIDE_SSIM, "SSIM"):
            return math.nan
        return float(np.mean(_ssim_maps(x, y, _SSIM_TAPS, SSIM_C1, SSIM_C2, 1.0)[0]))
    if _too_small(x, MIN_SIDE_SSIM_CDDFUSE, "SSIM (cddfuse)"):
        return math.nan
    return float(np.mean(_ssim_maps(x, y, _UNIFORM_TAPS, CDDFUSE_C1, CDDFUSE_C2, 49.0 / 48.0)[0]))


def ssim(x: np.ndarray, y: np.ndarray, convention: Literal["wang", "cddfuse"] = "wang") -> float:
    """SSIM of two images (gray ``(H, W)``, or ``(H, W, C)`` averaged over channels).

    wang: 11-tap Gaussian (sigma 1.5), population moments, C1 = (0.01*255)^2, C2 = (0.03*255)^2, mean of the
    valid map. cddfuse: 7x7 uniform window, sample moments, C1 = 0.02^2, C2 = 0.06^2, map without a 3-px border.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {x.shape} vs {y.shape}")
    if x.ndim == 3:
        _warn_if_unit_range(x, y)
        return float(np.mean([_ssim_gray(x[..., c], y[..., c], convention) for c in range(x.shape[2])]))
    x, y = _as_images(x, y)
    return _ssim_gray(x, y, convention)


def _combine(first: float, second: float, reduce: str) -> float:
    return first + second if reduce == "sum" else 0.5 * (first + second)


def _ssim_fusion(fused: np.ndarray, a: np.ndarray, b: np.ndarray, convention: str, reduce: str) -> float:
    return _combine(_ssim_gray(fused, a, convention), _ssim_gray(fused, b, convention), reduce)


def ssim_fusion(F: np.ndarray, A: np.ndarray, B: np.ndarray, convention: Literal["wang", "cddfuse"] = "wang",
                reduce: Literal["sum", "mean"] = "sum") -> float:
    """SSIM(F, A) and SSIM(F, B) combined by sum (default) or mean."""
    return _ssim_fusion(*_as_images(F, A, B), convention, reduce)


def _average_pool_2x2(image: np.ndarray) -> np.ndarray:
    """2x2 mean, stride 2; an odd extent gets one zero row/column on each side, counted in the mean."""
    padding = [(extent % 2, extent % 2) for extent in image.shape]
    padded = np.pad(image, padding)
    height, width = (extent // 2 * 2 for extent in padded.shape)
    padded = padded[:height, :width]
    return 0.25 * (padded[0::2, 0::2] + padded[1::2, 0::2] + padded[0::2, 1::2] + padded[1::2, 1::2])


def _ms_ssim_gray(x: np.ndarray, y: np.ndarray) -> float:
    if min(x.shape) < MIN_SIDE_MS_SSIM:
        _warn(f"MS-SSIM needs a short side above 160 px, got {x.shape[1]}x{x.shape[0]}: NaN")
        return math.nan
    terms = []
    for level in range(len(MS_SSIM_WEIGHTS)):
        ssim_map, contrast_structure = _ssim_maps(x, y, _SSIM_TAPS, SSIM_C1, SSIM_C2, 1.0)
        if level < len(MS_SSIM_WEIGHTS) - 1:
            terms.append(max(float(np.mean(contrast_structure)), 0.0))
            x, y = _average_pool_2x2(x), _average_pool_2x2(y)
        else:
            terms.append(max(float(np.mean(ssim_map)), 0.0))
    return float(np.prod([term ** weight for term, weight in zip(terms, MS_SSIM_WEIGHTS)]))


def ms_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """MS-SSIM (Wang 2003): 5 scales, cs at scales 1-4 and SSIM at 5, each clamped at 0 (pytorch-msssim rules)."""
    return _ms_ssim_gray(*_as_images(x, y))


def _ms_ssim_fusion(fused: np.ndarray, a: np.ndarray, b: np.ndarray, reduce: str) -> float:
    return _combine(_ms_ssim_gray(fused, a), _ms_ssim_gray(fused, b), reduce)


def ms_ssim_fusion(F: np.ndarray, A: np.ndarray, B: np.ndarray, reduce: Literal["sum", "mean"] = "sum") -> float:
    """MS-SSIM(F, A) and MS-SSIM(F, B) combined by sum (default) or mean."""
    return _ms_ssim_fusion(*_as_images(F, A, B), reduce)


# ---------------------------------------------------------------------------------------------- MSE / PSNR


def _mse_255(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * (float(np.mean((fused - a) ** 2)) + float(np.mean((fused - b) ** 2)))


def mse_fusion(F: np.ndarray, A: np.ndarray, B: np.ndarray, scale: Literal["255", "unit"] = "255") -> float:
    """(mean (F-A)^2 + mean (F-B)^2) / 2 on the 0..255 scale, or divided by 255^2 (``unit``)."""
    value = _mse_255(*_as_images(F, A, B))
    return value if scale == "255" else value / 255.0 ** 2


def _psnr_from_mse(mse_255: float, peak: float, convention: str) -> float:
    if mse_255 == 0.0:
        return math.inf
    value = 10.0 * math.log10(peak * peak / mse_255)
    return value + 20.0 * math.log10(255.0) if convention == "tang" else value


def _psnr_fusion(fused: np.ndarray, a: np.ndarray, b: np.ndarray, convention: str) -> float:
    peak = float(fused.max()) if convention == "cddfuse" else 255.0
    return _psnr_from_mse(_mse_255(fused, a, b), peak, convention)


def psnr_fusion(F: np.ndarray, A: np.ndarray, B: np.ndarray,
                convention: Literal["standard", "tang", "cddfuse"] = "standard") -> float:
    """10 log10(255^2 / MSE) with the fusion MSE; +inf if MSE = 0; tang adds 48.1308 dB, cddfuse peaks at max F."""
    return _psnr_fusion(*_as_images(F, A, B), convention)


def psnr(x: np.ndarray, y: np.ndarray, data_range: float = 255.0) -> float:
    """PSNR of two images: 10 log10(data_range^2 / mean (x-y)^2); +inf for identical images."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {x.shape} vs {y.shape}")
    return _psnr_from_mse(float(np.mean((x - y) ** 2)), data_range, "standard")


# ---------------------------------------------------------------------------------------------- VIF


def _vif_window_taps(size: int) -> np.ndarray:
    """1-D factor of the N x N ``fspecial('gaussian', N, N/5)`` window.

    ``fspecial`` zeroes entries below eps * max; for N <= 17 and sigma = N/5 the smallest entry is
    exp(-5.6) of the largest, so nothing is zeroed and the normalised window is the outer product of these taps.
    """
    return _gaussian_taps(size, size / 5.0)


_VIF_TAPS = [_vif_window_taps(2 ** (5 - scale) + 1) for scale in range(1, 5)]


def _vifp_parts(reference: np.ndarray, distorted: np.ndarray) -> tuple[float, float]:
    numerator = denominator = 0.0
    for scale, taps in enumerate(_VIF_TAPS, start=1):
        if scale > 1:
            reference = _filter_valid(reference, taps)[::2, ::2]
            distorted = _filter_valid(distorted, taps)[::2, ::2]
        mean_reference = _filter_valid(reference, taps)
        mean_distorted = _filter_valid(distorted, taps)
        variance_reference = _filter_valid(reference * reference, taps) - mean_reference ** 2
        variance_distorted = _filter_valid(distorted * distorted, taps) - mean_distorted ** 2
        covariance = _filter_valid(reference * distorted, taps) - mean_reference * mean_distorted
        variance_reference[variance_reference < 0] = 0.0
        variance_distorted[variance_distorted < 0] = 0.0
        gain = covariance / (variance_reference + 1e-10)
        noise = variance_distorted - gain * covariance
        flat_reference = variance_reference < 1e-10
        gain[flat_reference] = 0.0
        noise[flat_reference] = variance_distorted[flat_reference]
        variance_reference[flat_reference] = 0.0
        flat_distorted = variance_distorted < 1e-10
        gain[flat_distorted] = 0.0
        noise[flat_distorted] = 0.0
        negative = gain < 0
        noise[negative] = variance_distorted[negative]
        gain[negative] = 0.0
        noise[noise <= 1e-10] = 1e-10
        numerator += float(np.sum(np.log10(1.0 + gain ** 2 * variance_reference / (noise + VIF_NOISE_VARIANCE))))
        denominator += float(np.sum(np.log10(1.0 + variance_reference / VIF_NOISE_VARIANCE)))
    return numerator, denominator


def _vifp(reference: np.ndarray, distorted: np.ndarray, nan_as_one: bool) -> float:
    if _too_small(reference, MIN_SIDE_VIF, "VIF"):
        return math.nan
    numerator, denominator = _vifp_parts(reference, distorted)
    if denominator == 0.0:
        if nan_as_one:
            return 1.0
        _warn("VIF: constant reference image (0/0): NaN")
        return math.nan
    return numerator / denominator


def vifp(reference: np.ndarray, distorted: np.ndarray, nan_as_one: bool = False) -> float:
    """Pixel-domain VIF (LIVE ``vifp_mscale``, 4 scales, sigma_n^2 = 2) of ``distorted`` against ``reference``."""
    return _vifp(*_as_images(reference, distorted), nan_as_one)


def _vif(fused: np.ndarray, a: np.ndarray, b: np.ndarray, nan_as_one: bool) -> float:
    return _vifp(a, fused, nan_as_one) + _vifp(b, fused, nan_as_one)


def vif(F: np.ndarray, A: np.ndarray, B: np.ndarray, nan_as_one: bool = False) -> float:
    """vifp(A, F) + vifp(B, F)."""
    return _vif(*_as_images(F, A, B), nan_as_one)


# ---------------------------------------------------------------------------------------------- Qabf / Nabf


def _sobel(image: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Responses to S_x = [1,2,1]^T [-1,0,1] and S_y = [1,0,-1]^T [1,2,1] (correlation, given border mode)."""
    smooth_rows = ndimage.correlate1d(image, [1.0, 2.0, 1.0], axis=0, mode=mode)
    response_x = ndimage.correlate1d(smooth_rows, [-1.0, 0.0, 1.0], axis=1, mode=mode)
    smooth_columns = ndimage.correlate1d(image, [1.0, 2.0, 1.0], axis=1, mode=mode)
    response_y = ndimage.correlate1d(smooth_columns, [1.0, 0.0, -1.0], axis=0, mode=mode)
    return response_x, response_y


def _qabf_edges(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Convolution flips both kernels, negating both responses: magnitude and angle are unchanged.
    response_x, response_y = _sobel(image, "constant")
    magnitude = np.sqrt(response_x ** 2 + response_y ** 2)
    ratio = np.divide(response_y, response_x, out=np.zeros_like(response_y), where=response_x != 0)
    angle = np.where(response_x == 0, np.pi / 2, np.arctan(ratio))
    return magnitude, angle


def _qabf_preservation(magnitude_x, angle_x, magnitude_f, angle_f, strict_ratio: bool) -> np.ndarray:
    smaller = np.minimum(magnitude_x, magnitude_f)
    larger = np.maximum(magnitude_x, magnitude_f)
    ratio = np.divide(smaller, larger, out=np.zeros_like(smaller), where=larger > 0)
    strength = np.where(magnitude_x == magnitude_f, 1.0 if strict_ratio else magnitude_f, ratio)
    orientation = 1.0 - np.abs(angle_x - angle_f) / (np.pi / 2)
    strength_term = 0.9994 / (1.0 + np.exp(-15.0 * (strength - 0.5)))
    orientation_term = 0.9879 / (1.0 + np.exp(-22.0 * (orientation - 0.8)))
    return strength_term * orientation_term


def _qabf(fused: np.ndarray, a: np.ndarray, b: np.ndarray, strict_ratio: bool) -> float:
    if _too_small(fused, MIN_SIDE_GRADIENT, "Qabf"):
        return math.nan
    magnitude_a, angle_a = _qabf_edges(a)
    magnitude_b, angle_b = _qabf_edges(b)
    magnitude_f, angle_f = _qabf_edges(fused)
    preserved_a = _qabf_preservation(magnitude_a, angle_a, magnitude_f, angle_f, strict_ratio)
    preserved_b = _qabf_preservation(magnitude_b, angle_b, magnitude_f, angle_f, strict_ratio)
    denominator = float(np.sum(magnitude_a + magnitude_b))
    if denominator == 0.0:
        _warn("Qabf: both sources have no edges (zero gradient): NaN")
        return math.nan
    return float(np.sum(preserved_a * magnitude_a + preserved_b * magnitude_b)) / denominator


def qabf(F: np.ndarray, A: np.ndarray, B: np.ndarray, strict_ratio: bool = False) -> float:
    """Xydeas-Petrovic edge preservation (``analysis_Qabf.m``), gradient-magnitude weighted."""
    return _qabf(*_as_images(F, A, B), strict_ratio)


def _nabf_edges(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # 1-px numpy 'reflect' padding then 'valid' equals scipy's 'mirror' border mode.
    response_v, response_h = _sobel(image, "mirror")
    response_v = response_v / 8.0
    response_h = -response_h / 8.0  # g_h has rows (-1,-2,-1), (0,0,0), (1,2,1): the negated S_y
    magnitude = np.sqrt(response_v ** 2 + response_h ** 2)
    ratio = np.divide(response_v, response_h, out=np.zeros_like(response_v), where=response_h != 0)
    angle = np.where(response_h == 0, np.sign(response_v) * (np.pi / 2), np.arctan(ratio))
    return magnitude, angle


def _nabf_preservation(magnitude_x, angle_x, magnitude_f, angle_f) -> np.ndarray:
    smaller = np.minimum(magnitude_x, magnitude_f)
    larger = np.maximum(magnitude_x, magnitude_f)
    strength = np.divide(smaller, larger, out=np.zeros_like(smaller), where=smaller > 0)
    orientation = np.abs(np.abs(angle_x - angle_f) - np.pi / 2) * 2.0 / np.pi
    strength_term = 0.9999 / (1.0 + np.exp(-19.0 * (strength - 0.5)))
    orientation_term = 0.9995 / (1.0 + np.exp(-22.0 * (orientation - 0.5)))
    return np.sqrt(strength_term * orientation_term)


def _nabf(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    if _too_small(fused, MIN_SIDE_GRADIENT, "Nabf"):
        return math.nan
    magnitude_a, angle_a = _nabf_edges(a)
    magnitude_b, angle_b = _nabf_edges(b)
    magnitude_f, angle_f = _nabf_edges(fused)
    preserved_a = _nabf_preservation(magnitude_a, angle_a, magnitude_f, angle_f)
    preserved_b = _nabf_preservation(magnitude_b, angle_b, magnitude_f, angle_f)
    weight_a = np.where(magnitude_a >= NABF_THRESHOLD, magnitude_a ** 1.5, 0.001)
    weight_b = np.where(magnitude_b >= NABF_THRESHOLD, magnitude_b ** 1.5, 0.001)
    artefacts = (magnitude_f > magnitude_a) & (magnitude_f > magnitude_b)
    numerator = np.sum(artefacts * ((1.0 - preserved_a) * weight_a + (1.0 - preserved_b) * weight_b))
    return float(numerator / np.sum(weight_a + weight_b))


def nabf(F: np.ndarray, A: np.ndarray, B: np.ndarray) -> float:
    """Fusion artefacts (Shreyamsha Kumar 2013, ``analysis_nabf.m``): edge gain where F is stronger than both."""
    return _nabf(*_as_images(F, A, B))


# ---------------------------------------------------------------------------------------------- FMI


def _column_major_windows(feature: np.ndarray, first_row: int, last_row: int, window: int) -> np.ndarray:
    """Windows whose top row lies in [first_row, last_row) as an (n, count) array: column j of a window
    flattened column-major (MATLAB ``(:)``) is row j, so per-window reductions run over contiguous rows."""
    columns = feature.shape[1] - window + 1
    return np.stack([feature[first_row + row:last_row + row, column:column + columns].reshape(-1)
                     for column in range(window) for row in range(window)])


class _WindowStats:
    """Per-window quantities of one image's windows, each window a column of an (n, count) array."""

    def __init__(self, windows: np.ndarray):
        size, count = windows.shape
        self.raw = windows
        # p = x'/sum x' with x' the min-max normalised window equals (x - min)/sum(x - min); constant -> 1/n
        shifted = windows - np.minimum.reduce(windows, axis=0)
        total = np.add.reduce(shifted, axis=0)
        self.p = np.divide(shifted, total, out=np.full_like(shifted, 1.0 / size), where=total > 0)
        # the correlation of p and q equals that of the raw windows; a constant window centres to exact zeros
        self.centred = shifted - total / size
        self.centred_square = np.einsum("jk,jk->k", self.centred, self.centred)
        self.log_p = np.zeros_like(self.p)
        np.log2(self.p, out=self.log_p, where=self.p > 0)
        self.entropy = -np.einsum("jk,jk->k", self.p, self.log_p)
        indices = np.arange(1, size + 1, dtype=np.float64)
        first_moment = indices @ self.p
        self.index_std = np.sqrt(np.maximum((indices * indices) @ self.p - first_moment ** 2, 0.0))


def _padded_cumsum(p: np.ndarray) -> np.ndarray:
    """Cumulative sums along the window axis with a leading row of zeros: (n + 1, count)."""
    cumulative = np.zeros((p.shape[0] + 1, p.shape[1]))
    for row in range(p.shape[0]):
        np.add(cumulative[row], p[row], out=cumulative[row + 1])
    return cumulative


def _cell_correction(mass, q_cell, p_cell, log_q_cell, log_p_cell, weight, independent, log_independent):
    """sum over coupling cells of L(phi s + b q p) - L(b q p), with L(x) = x log2|x| (0 at 0)."""
    product = q_cell * p_cell
    product *= independent
    joint = mass * weight
    joint += product
    log_joint = np.zeros_like(joint)
    np.log2(np.abs(joint), out=log_joint, where=joint != 0)
    log_product = log_q_cell + log_p_cell
    log_product += log_independent
    return np.einsum("jk,jk->k", joint, log_joint) - np.einsum("jk,jk->k", product, log_product)


def _fmi_windows(fused: _WindowStats, cumulative_q: np.ndarray, source: _WindowStats) -> np.ndarray:
    """Per-window fmi of one source against the fused windows (spec/metrics.md §4.5), vectorised.

    J = phi C + (1 - phi) q p^T with C the comonotone coupling (mixed second difference of min(Q_i, P_j)).
    For c < 0 the countermonotone coupling (from max(Q_i + P_j - 1, 0)) is the comonotone coupling of q with
    p reversed, whose phi denominator is the negated comonotone one, so one code path serves both signs.
    C is supported on the 2n - 1 segments between consecutive values of the merged sorted cumulative sums:
    the segment ending at Q_i lies in cell (i, #{P_j < Q_i}), the one ending at P_j in (#{Q_i <= P_j}, j).
    Hence the joint entropy needs logs on those cells only:
    sum L(J) = sum_all L(b t) + sum_cells [L(phi s + b t) - L(b t)], with t = q p^T, b = 1 - phi and
    sum_all L(b t) in closed form from the marginal entropies.
    """
    size, count = source.p.shape
    cross = np.einsum("jk,jk->k", source.centred, fused.centred)
    norms = np.sqrt(source.centred_square * fused.centred_square)
    correlation = np.divide(cross, norms, out=np.zeros(count), where=cross != 0)
    negative = correlation < 0
    p = np.where(negative, source.p[::-1], source.p)
    log_p = np.where(negative, source.log_p[::-1], source.log_p)
    cumulative_p = _padded_cumsum(p)

    below = (cumulative_p[None, 1:, :] < cumulative_q[1:, None, :]).view(np.uint8)  # [i, j, k]: P_j < Q_i
    p_below_q = np.add.reduce(below, axis=1, dtype=np.uint8).astype(np.intp)
    q_upto_p = size - np.add.reduce(below, axis=0, dtype=np.uint8).astype(np.intp)
    window_index = np.arange(count)
    flat_c = p_below_q * count
    flat_c += window_index
    flat_d = q_upto_p * count
    flat_d += window_index
    mass_q = cumulative_q[1:] - np.maximum(cumulative_q[:-1], cumulative_p.ravel().take(flat_c))
    mass_p = cumulative_p[1:] - np.maximum(cumulative_p[:-1], cumulative_q.ravel().take(flat_d))
    # sum_{i,j} min(Q_i, P_j) = sum over segments of mass * #{Q above} * #{P above}
    above = np.arange(size, 0, -1, dtype=np.float64)[:, None]
    sum_min = (np.einsum("jk,j,jk->k", mass_q, above[:, 0], size - p_below_q.astype(np.float64))
               + np.einsum("jk,jk,j->k", mass_p, size - q_upto_p.astype(np.float64), above[:, 0]))
    denominator = sum_min - cumulative_q[1:].sum(axis=0) * cumulative_p[1:].sum(axis=0)
    std_product = source.index_std * fused.index_std
    weight = np.divide(np.abs(correlation) * std_product, denominator, out=np.zeros(count),
                       where=(correlation != 0) & (std_product != 0))
    independent = 1.0 - weight
    log_independent = np.zeros(count)
    np.log2(np.abs(independent), out=log_independent, where=independent != 0)

    # the segment beyond the last cumulative sum (Q_n or P_n, both 1) has rounding-level mass: drop it
    beyond_q = p_below_q == size
    mass_q[beyond_q] = 0.0
    flat_c[beyond_q] -= count
    beyond_p = q_upto_p == size
    mass_p[beyond_p] = 0.0
    flat_d[beyond_p] -= count
    correction = _cell_correction(mass_q, fused.p, p.ravel().take(flat_c), fused.log_p, log_p.ravel().take(flat_c),
                                  weight, independent, log_independent)
    correction += _cell_correction(mass_p, fused.p.ravel().take(flat_d), p, fused.log_p.ravel().take(flat_d),
                                   log_p, weight, independent, log_independent)
    sum_q, sum_p = fused.p.sum(axis=0), p.sum(axis=0)
    product_terms = independent * (log_independent * sum_q * sum_p - sum_p * fused.entropy - sum_q * source.entropy)
    entropy_sum = source.entropy + fused.entropy
    information = entropy_sum + product_terms + correction  # H_p + H_q - H_J
    fmi = np.divide(2.0 * information, entropy_sum, out=np.zeros(count), where=(weight != 0) & (information != 0))
    fmi[np.logical_and.reduce(source.raw == fused.raw, axis=0)] = 1.0
    return fmi


def fmi_feature(image: np.ndarray, feature: Literal["pixel", "dct", "wavelet"]) -> np.ndarray:
    """The FMI feature image: the image itself, its orthonormal 2-D DCT-II, or the tiled ``dmey`` DWT (min-max)."""
    if feature == "pixel":
        return image
    if feature == "dct":
        return scipy_fft.dctn(image, type=2, norm="ortho")
    try:
        import pywt
    except ImportError as error:
        raise ImportError("FMI_w needs PyWavelets: pip install PyWavelets") from error
    approximation, (horizontal, vertical, diagonal) = pywt.dwt2(image, "dmey", mode="symmetric")
    tiled = np.block([[approximation, horizontal], [vertical, diagonal]])
    spread = tiled.max() - tiled.min()
    return (tiled - tiled.min()) / spread if spread > 0 else np.zeros_like(tiled)


def _fmi_rows(features: tuple[np.ndarray, np.ndarray, np.ndarray], first: int, last: int, window: int) -> float:
    """Sum of fmi_AF + fmi_BF over the windows whose top row lies in [first, last)."""
    feature_f, feature_a, feature_b = features
    fused = _WindowStats(_column_major_windows(feature_f, first, last, window))
    cumulative_q = _padded_cumsum(fused.p)
    total = 0.0
    for feature_x in (feature_a, feature_b):
        source = _WindowStats(_column_major_windows(feature_x, first, last, window))
        total += float(np.sum(_fmi_windows(fused, cumulative_q, source)))
    return total


def _fmi(fused: np.ndarray, a: np.ndarray, b: np.ndarray, feature: str, window: int, threads: int = 1) -> float:
    if _too_small(fused, window, f"FMI ({feature})"):
        return math.nan
    features = tuple(fmi_feature(image, feature) for image in (fused, a, b))
    height, width = features[0].shape
    window_rows, window_columns = height - window + 1, width - window + 1
    size = window * window
    # the largest temporaries per window: the n x n comparison cube (bytes) and ~30 float rows of n
    windows_per_chunk = min(_FMI_CHUNK_WINDOWS, FMI_CHUNK_BYTES // (size * size + 30 * 8 * size))
    rows_per_chunk = max(1, windows_per_chunk // window_columns)
    starts = range(0, window_rows, rows_per_chunk)

    def chunk_sum(first: int) -> float:
        return _fmi_rows(features, first, min(first + rows_per_chunk, window_rows), window)

    if threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            sums = list(pool.map(chunk_sum, starts))
    else:
        sums = [chunk_sum(first) for first in starts]
    return sum(sums) / (2.0 * window_rows * window_columns)  # fixed chunking and order: same for any threads


def fmi(F: np.ndarray, A: np.ndarray, B: np.ndarray, feature: Literal["pixel", "dct", "wavelet"] = "pixel",
        window: int = 3, threads: int = 1) -> float:
    """Fast feature mutual information (Haghighat 2014, ``analysis_fmi.m``): mean over w x w windows of
    (fmi_AF + fmi_BF) / 2, on raw pixels, the global DCT, or (approximate, needs PyWavelets) the dmey DWT.

    ``threads`` splits the windows over threads; the result is identical for any count.
    """
    return _fmi(*_as_images(F, A, B), feature, window, threads)


# ---------------------------------------------------------------------------------------------- all metrics


def _compute(name: str, fused: np.ndarray, a: np.ndarray, b: np.ndarray, config: FusionMetricConfig,
             threads: int) -> float:
    if name == "EN":
        return _en(fused)
    if name == "SD":
        return _sd(fused)
    if name == "SF":
        return _sf(fused)
    if name == "AG":
        return _ag(fused, config.ag_norm)
    if name == "MI":
        return _mi(fused, a, b, config.mi_unit)
    if name in ("FMI_pixel", "FMI_dct", "FMI_w"):
        feature = {"FMI_pixel": "pixel", "FMI_dct": "dct", "FMI_w": "wavelet"}[name]
        return _fmi(fused, a, b, feature, config.fmi_window, threads)
    if name == "SCD":
        return _scd(fused, a, b)
    if name == "VIF":
        return _vif(fused, a, b, config.vif_nan_as_one)
    if name == "Qabf":
        return _qabf(fused, a, b, config.qabf_strict_ratio)
    if name == "Nabf":
        return _nabf(fused, a, b)
    if name == "SSIM":
        return _ssim_fusion(fused, a, b, config.ssim_convention, config.ssim_reduce)
    if name == "MS_SSIM":
        return _ms_ssim_fusion(fused, a, b, config.ssim_reduce)
    if name == "PSNR":
        return _psnr_fusion(fused, a, b, config.psnr_convention)
    if name == "MSE":
        value = _mse_255(fused, a, b)
        return value if config.mse_scale == "255" else value / 255.0 ** 2
    if name == "CC":
        return _cc(fused, a, b)
    raise ValueError(f"unknown fusion metric {name!r}; choose from {', '.join(ALL_COLUMNS)}")


def resolve_metrics(metrics: Sequence[str] | None) -> tuple[str, ...]:
    """Requested metric names (comma-separated entries allowed) in CSV column order; ``None`` = the defaults.

    Raises:
        ValueError: an unknown name.
    """
    if metrics is None:
        return METRIC_COLUMNS
    requested = {name.strip() for entry in metrics for name in entry.split(",") if name.strip()}
    unknown = sorted(requested - set(ALL_COLUMNS))
    if unknown:
        raise ValueError(f"unknown fusion metric(s) {', '.join(unknown)}; choose from {', '.join(ALL_COLUMNS)}")
    return tuple(name for name in ALL_COLUMNS if name in requested)


def evaluate_triplet(F: np.ndarray, A: np.ndarray, B: np.ndarray, config: FusionMetricConfig | None = None,
                     metrics: Sequence[str] | None = None, threads: int = 1) -> dict[str, float]:
    """The requested metrics (default: all of :data:`METRIC_COLUMNS`) of fused F against IR A and VIS B.

    Returns a dict in CSV column order; undefined values are NaN (with a warning). ``threads`` > 1 spreads
    the FMI windows over threads (values are identical for any count).
    """
    config = config or FusionMetricConfig()
    fused, a, b = _as_images(F, A, B)
    return {name: _compute(name, fused, a, b, config, threads) for name in resolve_metrics(metrics)}


def conventions_line(config: FusionMetricConfig) -> str:
    """One line naming the conventions in force, e.g. ``MI in bits · SSIM wang, sum · PSNR standard``."""
    parts = [f"MI in {config.mi_unit}", f"SSIM {config.ssim_convention}, {config.ssim_reduce}",
             f"PSNR {config.psnr_convention}", f"MSE scale {config.mse_scale}", f"AG {config.ag_norm}",
             f"FMI window {config.fmi_window}"]
    if config.vif_nan_as_one:
        parts.append("VIF NaN as 1")
    if config.qabf_strict_ratio:
        parts.append("Qabf strict ratio")
    return " · ".join(parts)


# ---------------------------------------------------------------------------------------------- result files


def summarize(rows: dict[str, dict[str, float]], metrics: Sequence[str]) -> tuple[dict[str, float], dict[str, int]]:
    """Per-column means skipping NaN (NaN if every value is NaN) and NaN counts, over ``rows`` (name -> values)."""
    means, nan_counts = {}, {}
    for metric in metrics:
        values = np.array([row[metric] for row in rows.values()], dtype=np.float64)
        finite_or_inf = values[~np.isnan(values)]
        nan_counts[metric] = int(values.size - finite_or_inf.size)
        means[metric] = float(np.mean(finite_or_inf)) if finite_or_inf.size else math.nan
    return means, nan_counts


def format_value(value: float) -> str:
    """``%.10g``, with ``nan`` and ``inf`` written out."""
    return "%.10g" % value


def json_number(value: float) -> float | str | None:
    """A float for JSON: NaN as null, infinities as "inf" / "-inf" (JSON has no literal for either)."""
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def write_results(csv_path: str | Path, rows: dict[str, dict[str, float]], config: FusionMetricConfig,
                  metrics: Sequence[str], json_path: str | Path | None = None,
                  extra: dict | None = None) -> dict:
    """Write the per-image CSV (rows sorted by name, then ``mean``) and the JSON summary; return the summary.

    The JSON (default: the CSV path with suffix ``.json``) holds n_images, means (NaN as null, inf as "inf"),
    nan_counts, the options, the conventions line, numpy/scipy versions and ``extra``.
    """
    csv_path = Path(csv_path)
    json_path = Path(json_path) if json_path is not None else csv_path.with_suffix(".json")
    means, nan_counts = summarize(rows, metrics)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["name", *metrics])
    for name in sorted(rows):
        writer.writerow([name, *(format_value(rows[name][metric]) for metric in metrics)])
    writer.writerow(["mean", *(format_value(means[metric]) for metric in metrics)])
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path.write_text(text.getvalue())
    summary = {
        "n_images": len(rows),
        "metrics": list(metrics),
        "means": {metric: json_number(means[metric]) for metric in metrics},
        "nan_counts": nan_counts,
        **asdict(config),
        "conventions": conventions_line(config),
        "versions": {"numpy": np.__version__, "scipy": scipy.__version__},
        **(extra or {}),
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class FusionMetricsArgs:
    """Score fused images against their IR and VIS sources; files pair by stem."""

    fused: Path
    """Folder of fused images (gray or colour; colour is converted to BT.601 luma)."""
    ir: Path
    """Folder of infrared source images."""
    vis: Path
    """Folder of visible source images (colour is converted to BT.601 luma)."""
    out: Path | None = None
    """CSV path (default: FUSED/metrics.csv); the JSON summary goes next to it with suffix .json."""
    metrics: tuple[str, ...] = METRIC_COLUMNS
    """Columns to compute (names or comma-separated lists); FMI_w only on request (needs PyWavelets)."""
    config: FusionMetricConfig = FusionMetricConfig()
    """Metric conventions."""
    workers: int = 1
    """Worker processes (results are identical for any count)."""


def _score_files(job: tuple[str, str, str, str, FusionMetricConfig, tuple[str, ...]]
                 ) -> tuple[dict[str, float], list[str]]:
    """Read one file triplet and score it; returns the values and the warning messages raised on the way."""
    from common.images import read_gray

    _, fused_path, ir_path, vis_path, config, metrics = job
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused, ir, vis = (read_gray(path, high_bit_depth="reject") for path in (fused_path, ir_path, vis_path))
        values = evaluate_triplet(fused, ir, vis, config, metrics)
    return values, [str(warning.message) for warning in caught]


def _match_files(args: FusionMetricsArgs) -> list[tuple[str, Path, Path, Path]]:
    from common.errors import DataError
    from common.images import image_size
    from common.pairing import list_images

    fused, ir, vis = list_images(args.fused), list_images(args.ir), list_images(args.vis)
    missing = [(label, folder, sorted(set(fused) - set(images)))
               for label, folder, images in (("IR", args.ir, ir), ("VIS", args.vis, vis))]
    problems = [f"{len(stems)} fused image(s) without a {label} source in {folder}: {', '.join(stems[:20])}"
                + (", ..." if len(stems) > 20 else "") for label, folder, stems in missing if stems]
    if problems:
        raise DataError("; ".join(problems) + " (sources pair with fused images by file stem)")
    for label, folder, images in (("IR", args.ir, ir), ("VIS", args.vis, vis)):
        extra = sorted(set(images) - set(fused))
        if extra:
            print(f"warning: {len(extra)} {label} image(s) in {folder} have no fused image and are skipped "
                  f"({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''})", file=sys.stderr)
    triplets = [(stem, fused[stem], ir[stem], vis[stem]) for stem in fused]
    for stem, *paths in triplets:
        sizes = [image_size(path) for path in paths]
        if len(set(sizes)) > 1:
            listed = ", ".join(f"{path} {size[0]}x{size[1]}" for path, size in zip(paths, sizes))
            raise DataError(f"image sizes differ for '{stem}': {listed}; nothing is resized, so the fused "
                            "image must have its sources' size")
    return triplets


def run(args: FusionMetricsArgs) -> dict:
    """Score every triplet, write the CSV and JSON, print the table; returns the JSON summary.

    Raises:
        DataError: a missing or empty folder, missing sources, unreadable images, mismatched sizes.
        ValueError: an unknown metric name or a bad option.
    """
    from rich.console import Console
    from rich.table import Table

    metrics = resolve_metrics(args.metrics)
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    triplets = _match_files(args)
    jobs = [(stem, str(f), str(a), str(b), args.config, metrics) for stem, f, a, b in triplets]
    if args.workers == 1 or len(jobs) == 1:
        results = [_score_files(job) for job in jobs]
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(args.workers, len(jobs)), mp_context=context) as pool:
            results = list(pool.map(_score_files, jobs))
    rows = {}
    for (stem, *_), (values, messages) in zip(triplets, results):
        rows[stem] = values
        for message in dict.fromkeys(messages):
            print(f"warning: {stem}: {message}", file=sys.stderr)
    csv_path = args.out if args.out is not None else args.fused / "metrics.csv"
    summary = write_results(csv_path, rows, args.config, metrics,
                            extra={"inputs": {"fused": str(args.fused), "ir": str(args.ir), "vis": str(args.vis)}})

    console = Console()
    console.print(summary["conventions"])
    table = Table(title=f"fusion metrics, mean of {len(rows)} images")
    table.add_column("metric")
    table.add_column("mean", justify="right")
    table.add_column("NaN", justify="right")
    means, _ = summarize(rows, metrics)
    for metric in metrics:
        table.add_row(metric, f"{means[metric]:.4f}", str(summary["nan_counts"][metric]))
    console.print(table)
    console.print(f"wrote {csv_path} and {csv_path.with_suffix('.json')}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry; returns the exit code (2 for bad input, with one message on stderr)."""
    import tyro

    from common.errors import DataError

    args = tyro.cli(FusionMetricsArgs, args=argv, config=(tyro.conf.OmitArgPrefixes,))
    try:
        run(args)
    except (DataError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from common import fusion_metrics  # the importable module, so spawned workers find its functions

    sys.exit(fusion_metrics.main())
