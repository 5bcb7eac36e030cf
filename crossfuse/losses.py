"""CrossFuse losses (spec §3), computed in float32 outside autocast.

- `ms_ssim`: the official training MS-SSIM with its two defects corrected (the bracket that raised the last
  SSIM to the power 4*w5, and the data range switching to 1 for dark images): 5 scales, Gaussian window
  n = min(11, h, w), sigma 1.5, 'valid' filtering, 2x2 average pooling, range always 255, batch-mean statistics.
- `reconstruction_loss` (stage 1): MSE + 10000 * (1 - MS-SSIM).
- `fusion_loss` (stage 2 and end-to-end): L_pix against the box-mean intensity target, L_gra on the positive
  Laplacian, optional fork MS-SSIM term.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
DATA_RANGE = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
TARGET_BOX = 11
LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    """A context that disables autocast on `x`'s device type."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def gaussian_taps(size: int, sigma: float = SSIM_SIGMA, device: torch.device | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian with taps proportional to exp(-(i - size//2)^2 / (2 sigma^2)), float32."""
    offsets = torch.arange(size, dtype=torch.float64, device=device) - size // 2
    taps = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    return (taps / taps.sum()).float()


def _valid_gaussian_filter(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Separable 'valid' Gaussian filtering of every channel of (B,C,H,W)."""
    channels = maps.shape[1]
    taps = gaussian_taps(size, device=maps.device)
    maps = F.conv2d(maps, taps.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    return F.conv2d(maps, taps.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


def ssim_and_contrast(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One MS-SSIM scale: (mean SSIM map, mean contrast-structure term cs), both over the whole batch.

    cs = (2 sigma_xy + C2) / (sigma_x^2 + sigma_y^2 + C2); C1 = (0.01*255)^2, C2 = (0.03*255)^2.
    """
    c = x.shape[1]
    size = min(SSIM_WINDOW, x.shape[-2], x.shape[-1])
    stats = _valid_gaussian_filter(torch.cat((x, y, x * x, y * y, x * y), dim=1), size)
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(c, dim=1)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov = e_xy - mu_x * mu_y
    c1 = (0.01 * DATA_RANGE) ** 2
    c2 = (0.03 * DATA_RANGE) ** 2
    contrast = (2.0 * cov + c2) / (var_x + var_y + c2)
    luminance = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    return (luminance * contrast).mean(), contrast.mean()


def ms_ssim_scales(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-scale (ssim, cs) values, each a (5,) float32 tensor, for (B,C,H,W) images in 0..255."""
    with _no_autocast(x):
        x, y = x.float(), y.float()
        ssim_values, cs_values = [], []
        for scale in range(len(MS_SSIM_WEIGHTS)):
            if scale:
                x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
            ssim, cs = ssim_and_contrast(x, y)
            ssim_values.append(ssim)
            cs_values.append(cs)
        return torch.stack(ssim_values), torch.stack(cs_values)


def combine_ms_ssim(ssim_values: torch.Tensor, cs_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """MS-SSIM = prod_{j<=4} cs_j^{w_j} * ssim_5^{w_5}; `normalize` first maps every value v to (v+1)/2."""
    if normalize:
        ssim_values = (ssim_values + 1.0) / 2.0
        cs_values = (cs_values + 1.0) / 2.0
    weights = torch.tensor(MS_SSIM_WEIGHTS, dtype=cs_values.dtype, device=cs_values.device)
    return torch.prod(cs_values[:-1] ** weights[:-1]) * ssim_values[-1] ** weights[-1]


def ms_ssim(x: torch.Tensor, y: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Corrected official MS-SSIM of two (B,C,H,W) batches in 0..255 (range always 255), a 0-dim float32 tensor.

    `normalize=True` is the official training call. Images should be at least 16x16.
    """
    ssim_values, cs_values = ms_ssim_scales(x, y)
    with _no_autocast(x):
        return combine_ms_ssim(ssim_values, cs_values, normalize)


class ReconstructionLoss(NamedTuple):
    """Stage-1 loss terms (0-dim tensors); `recon` and `ssim` are already weighted and sum to `total`."""

    total: torch.Tensor
    recon: torch.Tensor
    ssim: torch.Tensor


def reconstruction_loss(
    reconstruction: torch.Tensor, image: torch.Tensor, w_recon: float = 1.0, w_ssim: float = 10000.0
) -> ReconstructionLoss:
    """Stage-1 loss w_recon * MSE(x_hat, x) + w_ssim * (1 - MS-SSIM(x_hat, x)) on 0..255 images."""
    with _no_autocast(image):
        reconstruction, image = reconstruction.float(), image.float()
        recon = w_recon * F.mse_loss(reconstruction, image)
        ssim = w_ssim * (1.0 - ms_ssim(reconstruction, image, normalize=True))
        return ReconstructionLoss(recon + ssim, recon, ssim)


def box_mean(x: torch.Tensor, size: int = TARGET_BOX) -> torch.Tensor:
    """size x size mean with zero padding (sum / size^2 everywhere, borders included), same spatial size."""
    return F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=True)


def intensity_target(ir: torch.Tensor, vi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_pix target T = mask*ir + (1-mask)*vi and its mask, both float32 and without gradient.

    The official mask is [m_ir/(m_ir+m_vi+eps) > m_vi/(m_ir+m_vi+eps)] on 11x11 box means; the shared
    denominator is positive for non-negative images, so it is compared as m_ir > m_vi (no rounding ties).
    """
    with torch.no_grad(), _no_autocast(ir):
        ir, vi = ir.float(), vi.float()
        mask = (box_mean(ir) > box_mean(vi)).float()
        return mask * ir + (1.0 - mask) * vi, mask


def positive_laplacian(x: torch.Tensor) -> torch.Tensor:
    """G(x) = max(Laplacian(x), 0) with the 4-neighbour kernel and zero padding 1, per channel."""
    channels = x.shape[1]
    kernel = torch.tensor(LAPLACIAN, dtype=x.dtype, device=x.device).expand(channels, 1, 3, 3)
    return F.conv2d(x, kernel, padding=1, groups=channels).clamp(min=0.0)


class FusionLoss(NamedTuple):
    """Fusion loss terms (0-dim tensors); `pix`, `gra` and `ssim` are already weighted and sum to `total`."""

    total: torch.Tensor
    pix: torch.Tensor
    gra: torch.Tensor
    ssim: torch.Tensor


def fusion_loss(
    fused: torch.Tensor,
    ir: torch.Tensor,
    vi: torch.Tensor,
    w_pix: float = 1.0,
    w_gra: float = 10.0,
    w_ssim: float = 0.0,
) -> FusionLoss:
    """w_pix*L_pix + w_gra*L_gra + w_ssim*L_ssim for F and sources in 0..255 (spec §3).

    L_pix = mean((F - T)^2); L_gra = mean((G(F) - max(G(ir), G(vi)))^2);
    L_ssim = ((1 - MS-SSIM(F, ir)) + (1 - MS-SSIM(F, vi))) / 2, only computed when w_ssim != 0.
    """
    with _no_autocast(fused):
        fused, ir, vi = fused.float(), ir.float(), vi.float()
        target, _ = intensity_target(ir, vi)
        pix = w_pix * F.mse_loss(fused, target)
        with torch.no_grad():
            gradient_target = torch.maximum(positive_laplacian(ir), positive_laplacian(vi))
        gra = w_gra * F.mse_loss(positive_laplacian(fused), gradient_target)
        if w_ssim:
            ssim = w_ssim * 0.5 * ((1.0 - ms_ssim(fused, ir)) + (1.0 - ms_ssim(fused, vi)))
        else:
            ssim = torch.zeros((), device=fused.device)
        return FusionLoss(pix + gra + ssim, pix, gra, ssim)
