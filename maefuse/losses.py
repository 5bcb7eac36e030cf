"""MaeFuse losses (spec §3): mean alignment, fusion (Sobel + signed Laplacian), reconstruction.

Every loss is computed in float32 with autocast disabled, whatever precision the forward pass ran in. Images are
(B,3,S,S) in ImageNet-normalised space; tokens are (B,N,D).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from maefuse.model import denormalize_255

GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
SOBEL_Y = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))
LAPLACIAN_8 = ((1.0, 1.0, 1.0), (1.0, -8.0, 1.0), (1.0, 1.0, 1.0))
LAPLACIAN_WEIGHT = 2.0


class FusionLossTerms(NamedTuple):
    """L_fusion = L_grad + 2 L_lap, and its two terms (scalar tensors)."""

    total: torch.Tensor
    grad: torch.Tensor
    lap: torch.Tensor


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32)


def gray_255(images: torch.Tensor) -> torch.Tensor:
    """Normalised (B,3,H,W) -> gray (B,1,H,W) on the 0..255 scale, unclamped: 0.2989 R + 0.5870 G + 0.1140 B of
    u = (x*sigma + mu)*255."""
    pixels = denormalize_255(_float32(images))
    weights = pixels.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (pixels * weights).sum(dim=1, keepdim=True)


def sobel_laplacian(gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sob(g) = |K_x * g| + |K_y * g| and the signed Lap(g) = K_8 * g of (B,1,H,W) gray images, each (B,1,H,W)
    (2-D cross-correlation with zero padding 1; one convolution computes all three responses)."""
    kernels = gray.new_tensor((SOBEL_X, SOBEL_Y, LAPLACIAN_8)).unsqueeze(1)
    responses = F.conv2d(gray, kernels, padding=1)
    sobel = responses[:, 0:1].abs() + responses[:, 1:2].abs()
    return sobel, responses[:, 2:3]


def fusion_loss(fused: torch.Tensor, x_vi: torch.Tensor, x_ir: torch.Tensor) -> FusionLossTerms:
    """L_grad = mean|max(Sob(G_vi), Sob(G_ir)) - Sob(G_F)|, L_lap = mean|max(Lap(G_vi), Lap(G_ir)) - Lap(G_F)|,
    L_fusion = L_grad + 2 L_lap, on gray images of the decoded F and the normalised inputs."""
    with torch.autocast(fused.device.type, enabled=False):
        batch = fused.shape[0]
        gray = gray_255(torch.cat([_float32(x_vi), _float32(x_ir), _float32(fused)]))
        sobel, laplacian = sobel_laplacian(gray)
        sobel_vi, sobel_ir, sobel_fused = sobel.split(batch)
        lap_vi, lap_ir, lap_fused = laplacian.split(batch)
        grad = (torch.maximum(sobel_vi, sobel_ir) - sobel_fused).abs().mean()
        lap = (torch.maximum(lap_vi, lap_ir) - lap_fused).abs().mean()
        return FusionLossTerms(grad + LAPLACIAN_WEIGHT * lap, grad, lap)


def mean_loss(tokens: torch.Tensor, z_vi: torch.Tensor, z_ir: torch.Tensor) -> torch.Tensor:
    """MSE over (B,N,D) between the fusion tokens and the target m = (z_v + z_i)/2 of this step's encoder outputs."""
    with torch.autocast(tokens.device.type, enabled=False):
        target = (_float32(z_vi) + _float32(z_ir)) / 2
        return F.mse_loss(_float32(tokens), target)


def reconstruction_loss(decoded: torch.Tensor, x_vi: torch.Tensor, x_ir: torch.Tensor) -> torch.Tensor:
    """MSE on normalised pixels between the 2B decoded images and [x_vi; x_ir] (no `norm_pix_loss`)."""
    with torch.autocast(decoded.device.type, enabled=False):
        return F.mse_loss(_float32(decoded), torch.cat([_float32(x_vi), _float32(x_ir)]))
