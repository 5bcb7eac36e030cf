"""Torch versions of fusion metrics for training and validation (spec/metrics.md §4.7).

Inputs are ``[B, 1, H, W]`` tensors (``ssim`` and ``psnr`` also ``[B, C, H, W]``, averaged over channels) with
values in ``[0, input_range]`` (default 255); they are rescaled to 0..255 internally, so the results equal
:mod:`common.fusion_metrics` on the same images. Every function returns a ``[B]`` tensor, computes in float32
(float64 for float64 input) with autocast disabled, and never synchronises with the host. All are
differentiable except ``vif`` and ``qabf``, which run under ``no_grad`` and are meant for validation.
Per-image values are gathered across processes by the caller (``accelerator.gather_for_metrics``).

In float32, variances near zero (flat regions) are only as exact as float32 allows, so VIF on images with
exactly flat patches can differ from the float64 numpy value; pass float64 tensors for reference values.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Literal

import torch
import torch.nn.functional as functional

from common.fusion_metrics import (MIN_SIDE_GRADIENT, MIN_SIDE_MS_SSIM, MIN_SIDE_SSIM, MIN_SIDE_VIF,
                                   MS_SSIM_WEIGHTS, SSIM_C1, SSIM_C2, VIF_NOISE_VARIANCE, FusionMetricWarning)

__all__ = ["ssim", "ms_ssim", "psnr", "mse", "cc", "scd", "sd", "sf", "ag", "vif", "vifp", "qabf"]


def _without_autocast(function: Callable) -> Callable:
    @functools.wraps(function)
    def wrapper(*tensors: torch.Tensor, **options):
        with torch.autocast(device_type=tensors[0].device.type, enabled=False):
            return function(*tensors, **options)
    return wrapper


def _prepare(*tensors: torch.Tensor, input_range: float, multichannel: bool = False) -> list[torch.Tensor]:
    """Equal-shape [B, 1, H, W] (or [B, C, H, W]) tensors in the compute dtype, rescaled to 0..255."""
    shape = tensors[0].shape
    for tensor in tensors:
        if tensor.dim() != 4 or (tensor.shape[1] != 1 and not multichannel):
            raise ValueError(f"expected [B, 1, H, W]{' or [B, C, H, W]' if multichannel else ''} tensors, "
                             f"got {tuple(tensor.shape)}")
        if tensor.shape != shape:
            raise ValueError(f"tensor shapes differ: {[tuple(t.shape) for t in tensors]}")
    dtype = torch.float64 if any(tensor.dtype == torch.float64 for tensor in tensors) else torch.float32
    scale = 255.0 / input_range
    return [tensor.to(dtype) * scale if scale != 1.0 else tensor.to(dtype) for tensor in tensors]


def _nan_batch(reference: torch.Tensor, message: str) -> torch.Tensor:
    warnings.warn(message, FusionMetricWarning, stacklevel=3)
    return torch.full((reference.shape[0],), math.nan, dtype=reference.dtype, device=reference.device)


def _safe_sqrt(values: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not NaN) gradient at 0."""
    positive = values > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, values, torch.ones_like(values))),
                       torch.zeros_like(values))


def _gaussian_taps(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    offsets = torch.arange(size, dtype=like.dtype, device=like.device) - size // 2
    taps = torch.exp(-(offsets ** 2) / (2.0 * sigma * sigma))
    return taps / taps.sum()


def _filter_valid(images: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' correlation of every channel with ``taps`` along both axes."""
    channels = images.shape[1]
    size = taps.numel()
    vertical = taps.view(1, 1, size, 1).expand(channels, 1, size, 1)
    horizontal = taps.view(1, 1, 1, size).expand(channels, 1, 1, size)
    return functional.conv2d(functional.conv2d(images, vertical, groups=channels), horizontal, groups=channels)


def _ssim_terms(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image-and-channel means of the SSIM and contrast-structure maps (wang convention): [B, C] each."""
    taps = _gaussian_taps(11, 1.5, x)
    mean_x, mean_y = _filter_valid(x, taps), _filter_valid(y, taps)
    variance_x = _filter_valid(x * x, taps) - mean_x * mean_x
    variance_y = _filter_valid(y * y, taps) - mean_y * mean_y
    covariance = _filter_valid(x * y, taps) - mean_x * mean_y
    contrast_structure = (2.0 * covariance + SSIM_C2) / (variance_x + variance_y + SSIM_C2)
    luminance = (2.0 * mean_x * mean_y + SSIM_C1) / (mean_x * mean_x + mean_y * mean_y + SSIM_C1)
    return (luminance * contrast_structure).mean(dim=(2, 3)), contrast_structure.mean(dim=(2, 3))


@_without_autocast
def ssim(x: torch.Tensor, y: torch.Tensor, input_range: float = 255.0) -> torch.Tensor:
    """SSIM (wang: 11-tap Gaussian sigma 1.5, valid, population moments, C from L = 255), channel mean: [B]."""
    x, y = _prepare(x, y, input_range=input_range, multichannel=True)
    if min(x.shape[-2:]) < MIN_SIDE_SSIM:
        return _nan_batch(x, f"SSIM needs a side of at least {MIN_SIDE_SSIM} px: NaN")
    return _ssim_terms(x, y)[0].mean(dim=1)


@_without_autocast
def ms_ssim(x: torch.Tensor, y: torch.Tensor, input_range: float = 255.0) -> torch.Tensor:
    """MS-SSIM: 5 scales, cs at 1-4 and SSIM at 5 clamped at 0, 2x2 mean pooling with zero padding of odd
    extents (as pytorch-msssim); short side above 160 px: [B]."""
    x, y = _prepare(x, y, input_range=input_range)
    if min(x.shape[-2:]) < MIN_SIDE_MS_SSIM:
        return _nan_batch(x, "MS-SSIM needs a short side above 160 px: NaN")
    terms = []
    for level in range(len(MS_SSIM_WEIGHTS)):
        ssim_value, contrast_structure = _ssim_terms(x, y)
        if level < len(MS_SSIM_WEIGHTS) - 1:
            terms.append(torch.relu(contrast_structure[:, 0]))
            padding = (x.shape[2] % 2, x.shape[3] % 2)
            x = functional.avg_pool2d(x, kernel_size=2, padding=padding)
            y = functional.avg_pool2d(y, kernel_size=2, padding=padding)
        else:
            terms.append(torch.relu(ssim_value[:, 0]))
    weights = torch.tensor(MS_SSIM_WEIGHTS, dtype=x.dtype, device=x.device)
    return torch.prod(torch.stack(terms, dim=0) ** weights[:, None], dim=0)


@_without_autocast
def mse(x: torch.Tensor, y: torch.Tensor, input_range: float = 255.0) -> torch.Tensor:
    """Mean squared error on the 0..255 scale: [B]."""
    x, y = _prepare(x, y, input_range=input_range, multichannel=True)
    return ((x - y) ** 2).mean(dim=(1, 2, 3))


@_without_autocast
def psnr(x: torch.Tensor, y: torch.Tensor, input_range: float = 255.0) -> torch.Tensor:
    """10 log10(255^2 / MSE), the MSE taken over all channels and pixels; +inf for identical images: [B]."""
    x, y = _prepare(x, y, input_range=input_range, multichannel=True)
    error = ((x - y) ** 2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(255.0 ** 2 / error)


def _pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.flatten(1) - x.flatten(1).mean(dim=1, keepdim=True)
    y = y.flatten(1) - y.flatten(1).mean(dim=1, keepdim=True)
    return (x * y).sum(dim=1) / torch.sqrt((x * x).sum(dim=1) * (y * y).sum(dim=1))


@_without_autocast
def cc(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, input_range: float = 255.0) -> torch.Tensor:
    """(r(A, F) + r(B, F)) / 2 per image: [B]. NaN when an image is constant, without a warning (warning would
    need a host synchronisation)."""
    fused, a, b = _prepare(fused, a, b, input_range=input_range)
    return 0.5 * (_pearson(a, fused) + _pearson(b, fused))


@_without_autocast
def scd(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, input_range: float = 255.0) -> torch.Tensor:
    """r(F - B, A) + r(F - A, B) per image: [B]."""
    fused, a, b = _prepare(fused, a, b, input_range=input_range)
    return _pearson(fused - b, a) + _pearson(fused - a, b)


@_without_autocast
def sd(x: torch.Tensor, input_range: float = 255.0) -> torch.Tensor:
    """Population standard deviation per image: [B]."""
    (x,) = _prepare(x, input_range=input_range)
    centred = x.flatten(1) - x.flatten(1).mean(dim=1, keepdim=True)
    return _safe_sqrt((centred * centred).mean(dim=1))


@_without_autocast
def sf(x: torch.Tensor, input_range: float = 255.0) -> torch.Tensor:
    """Spatial frequency sqrt(RF^2 + CF^2): [B]."""
    (x,) = _prepare(x, input_range=input_range)
    if min(x.shape[-2:]) < MIN_SIDE_GRADIENT:
        return _nan_batch(x, "SF needs a side of at least 2 px: NaN")
    row_frequency = ((x[..., :, 1:] - x[..., :, :-1]) ** 2).mean(dim=(1, 2, 3))
    column_frequency = ((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean(dim=(1, 2, 3))
    return _safe_sqrt(row_frequency + column_frequency)


def _numpy_gradient(x: torch.Tensor, dim: int) -> torch.Tensor:
    """numpy.gradient along ``dim``: central differences inside, one-sided differences at both ends."""
    length = x.shape[dim]
    first = x.narrow(dim, 1, 1) - x.narrow(dim, 0, 1)
    last = x.narrow(dim, length - 1, 1) - x.narrow(dim, length - 2, 1)
    inner = (x.narrow(dim, 2, length - 2) - x.narrow(dim, 0, length - 2)) / 2.0
    return torch.cat([first, inner, last], dim=dim)


@_without_autocast
def ag(x: torch.Tensor, input_range: float = 255.0, norm: Literal["hw", "matlab"] = "hw") -> torch.Tensor:
    """Average gradient (numpy ``gradient``), divided by H W or (H-1)(W-1): [B]."""
    (x,) = _prepare(x, input_range=input_range)
    height, width = x.shape[-2:]
    if min(height, width) < MIN_SIDE_GRADIENT:
        return _nan_batch(x, "AG needs a side of at least 2 px: NaN")
    gradient_y, gradient_x = _numpy_gradient(x, 2), _numpy_gradient(x, 3)
    total = _safe_sqrt((gradient_x ** 2 + gradient_y ** 2) / 2.0).sum(dim=(1, 2, 3))
    return total / (height * width if norm == "hw" else (height - 1) * (width - 1))


def _vifp_batch(reference: torch.Tensor, distorted: torch.Tensor, nan_as_one: bool) -> torch.Tensor:
    # Variances and covariances are shift-invariant and every window sums to 1: centring first keeps
    # float32 cancellation small.
    reference = reference - reference.mean(dim=(1, 2, 3), keepdim=True)
    distorted = distorted - distorted.mean(dim=(1, 2, 3), keepdim=True)
    numerator = torch.zeros(reference.shape[0], dtype=reference.dtype, device=reference.device)
    denominator = torch.zeros_like(numerator)
    for scale in range(1, 5):
        size = 2 ** (5 - scale) + 1
        taps = _gaussian_taps(size, size / 5.0, reference)
        if scale > 1:
            reference = _filter_valid(reference, taps)[..., ::2, ::2]
            distorted = _filter_valid(distorted, taps)[..., ::2, ::2]
        mean_reference = _filter_valid(reference, taps)
        mean_distorted = _filter_valid(distorted, taps)
        variance_reference = (_filter_valid(reference * reference, taps) - mean_reference ** 2).clamp_min(0.0)
        variance_distorted = (_filter_valid(distorted * distorted, taps) - mean_distorted ** 2).clamp_min(0.0)
        covariance = _filter_valid(reference * distorted, taps) - mean_reference * mean_distorted
        gain = covariance / (variance_reference + 1e-10)
        noise = variance_distorted - gain * covariance
        flat_reference = variance_reference < 1e-10
        gain = torch.where(flat_reference, 0.0, gain)
        noise = torch.where(flat_reference, variance_distorted, noise)
        variance_reference = torch.where(flat_reference, 0.0, variance_reference)
        flat_distorted = variance_distorted < 1e-10
        gain = torch.where(flat_distorted, 0.0, gain)
        noise = torch.where(flat_distorted, 0.0, noise)
        negative = gain < 0
        noise = torch.where(negative, variance_distorted, noise)
        gain = torch.where(negative, 0.0, gain)
        noise = torch.where(noise <= 1e-10, 1e-10, noise)
        numerator = numerator + torch.log10(
            1.0 + gain ** 2 * variance_reference / (noise + VIF_NOISE_VARIANCE)).sum(dim=(1, 2, 3))
        denominator = denominator + torch.log10(1.0 + variance_reference / VIF_NOISE_VARIANCE).sum(dim=(1, 2, 3))
    value = numerator / denominator
    if nan_as_one:
        value = torch.where(denominator == 0, 1.0, value)
    return value


@torch.no_grad()
@_without_autocast
def vifp(reference: torch.Tensor, distorted: torch.Tensor, input_range: float = 255.0,
         nan_as_one: bool = False) -> torch.Tensor:
    """Pixel-domain VIF (LIVE ``vifp_mscale``) of ``distorted`` against ``reference``; NaN for a constant
    reference unless ``nan_as_one``: [B]."""
    reference, distorted = _prepare(reference, distorted, input_range=input_range)
    if min(reference.shape[-2:]) < MIN_SIDE_VIF:
        return _nan_batch(reference, f"VIF needs a side of at least {MIN_SIDE_VIF} px: NaN")
    return _vifp_batch(reference, distorted, nan_as_one)


@torch.no_grad()
@_without_autocast
def vif(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, input_range: float = 255.0,
        nan_as_one: bool = False) -> torch.Tensor:
    """vifp(A, F) + vifp(B, F): [B]."""
    fused, a, b = _prepare(fused, a, b, input_range=input_range)
    if min(fused.shape[-2:]) < MIN_SIDE_VIF:
        return _nan_batch(fused, f"VIF needs a side of at least {MIN_SIDE_VIF} px: NaN")
    return _vifp_batch(a, fused, nan_as_one) + _vifp_batch(b, fused, nan_as_one)


def _qabf_edges(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=images.dtype,
                           device=images.device)
    kernels = torch.stack([sobel_x, sobel_x.t().flip(0)])[:, None]  # S_x; S_y rows (1,2,1),(0,0,0),(-1,-2,-1)
    responses = functional.conv2d(images, kernels, padding=1)
    response_x, response_y = responses[:, :1], responses[:, 1:]
    magnitude = torch.sqrt(response_x ** 2 + response_y ** 2)
    safe_x = torch.where(response_x == 0, torch.ones_like(response_x), response_x)
    angle = torch.where(response_x == 0, math.pi / 2, torch.atan(response_y / safe_x))
    return magnitude, angle


def _qabf_preservation(magnitude_x, angle_x, magnitude_f, angle_f, strict_ratio: bool) -> torch.Tensor:
    smaller = torch.minimum(magnitude_x, magnitude_f)
    larger = torch.maximum(magnitude_x, magnitude_f)
    ratio = smaller / torch.where(larger > 0, larger, torch.ones_like(larger))
    equal_value = torch.ones_like(magnitude_f) if strict_ratio else magnitude_f
    strength = torch.where(magnitude_x == magnitude_f, equal_value, ratio)
    orientation = 1.0 - torch.abs(angle_x - angle_f) / (math.pi / 2)
    return (0.9994 / (1.0 + torch.exp(-15.0 * (strength - 0.5)))
            * 0.9879 / (1.0 + torch.exp(-22.0 * (orientation - 0.8))))


@torch.no_grad()
@_without_autocast
def qabf(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, input_range: float = 255.0,
         strict_ratio: bool = False) -> torch.Tensor:
    """Xydeas-Petrovic edge preservation (``analysis_Qabf.m`` rules, incl. G = g_F where g_X = g_F); NaN where
    both sources have no edges: [B]."""
    fused, a, b = _prepare(fused, a, b, input_range=input_range)
    if min(fused.shape[-2:]) < MIN_SIDE_GRADIENT:
        return _nan_batch(fused, "Qabf needs a side of at least 2 px: NaN")
    magnitude_a, angle_a = _qabf_edges(a)
    magnitude_b, angle_b = _qabf_edges(b)
    magnitude_f, angle_f = _qabf_edges(fused)
    preserved_a = _qabf_preservation(magnitude_a, angle_a, magnitude_f, angle_f, strict_ratio)
    preserved_b = _qabf_preservation(magnitude_b, angle_b, magnitude_f, angle_f, strict_ratio)
    numerator = (preserved_a * magnitude_a + preserved_b * magnitude_b).sum(dim=(1, 2, 3))
    return numerator / (magnitude_a + magnitude_b).sum(dim=(1, 2, 3))
