"""MaeFuse losses against independent scipy references (spec §3, §9 check 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from maefuse.losses import (GRAY_WEIGHTS, fusion_loss, gray_255, mean_loss, reconstruction_loss,
                            sobel_laplacian)
from maefuse.model import normalize
from tests import maefuse_helpers  # noqa: F401  (offline switch)

SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
SOBEL_Y = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float64)
LAPLACIAN = np.array([[1, 1, 1], [1, -8, 1], [1, 1, 1]], dtype=np.float64)


def correlate(gray: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return ndimage.correlate(gray, kernel, mode="constant", cval=0.0)


def reference_terms(fused: np.ndarray, vi: np.ndarray, ir: np.ndarray) -> tuple[float, float]:
    """L_grad and L_lap of 0..255 RGB (3, H, W) float64 arrays, written from §3 with scipy."""
    def gray(image):
        return sum(weight * image[channel] for channel, weight in enumerate((0.2989, 0.5870, 0.1140)))

    def sobel(g):
        return np.abs(correlate(g, SOBEL_X)) + np.abs(correlate(g, SOBEL_Y))

    g_f, g_v, g_i = gray(fused), gray(vi), gray(ir)
    grad = np.abs(np.maximum(sobel(g_v), sobel(g_i)) - sobel(g_f)).mean()
    lap = np.abs(np.maximum(correlate(g_v, LAPLACIAN), correlate(g_i, LAPLACIAN)) - correlate(g_f, LAPLACIAN)).mean()
    return grad, lap


def to_input(pixels_255: np.ndarray) -> torch.Tensor:
    """(3, H, W) 0..255 float64 -> normalised (1, 3, H, W) float32."""
    return normalize(torch.from_numpy(pixels_255 / 255.0).float()[None])


def test_fusion_loss_matches_a_scipy_reference():
    rng = np.random.default_rng(0)
    fused, vi, ir = (rng.uniform(0, 255, (3, 20, 24)) for _ in range(3))
    terms = fusion_loss(to_input(fused), to_input(vi), to_input(ir))
    grad, lap = reference_terms(fused, vi, ir)
    assert terms.grad.item() == pytest.approx(grad, rel=1e-4)
    assert terms.lap.item() == pytest.approx(lap, rel=1e-4)
    assert terms.total.item() == pytest.approx(grad + 2 * lap, rel=1e-4)


def test_fusion_loss_of_vis_equal_to_f_and_black_ir():
    """Check 7: VIS = F = A, IR = 0 gives L_grad = 0 and L_lap = mean(relu(-Lap(A))) (the Laplacian is signed)."""
    rng = np.random.default_rng(1)
    gray_a = rng.uniform(0, 255, (2, 1, 16, 16))
    vis = normalize(torch.from_numpy(np.repeat(gray_a, 3, axis=1) / 255.0).float())
    black = normalize(torch.zeros_like(vis))
    terms = fusion_loss(vis, vis, black)
    g_a = gray_255(vis).double().numpy()[:, 0]  # 0.9999 A: the gray of a replicated image
    expected = np.mean([np.maximum(-correlate(image, LAPLACIAN), 0) for image in g_a])
    assert terms.grad.item() == 0.0
    assert terms.lap.item() == pytest.approx(expected, rel=1e-5)
    assert terms.lap.item() > 0


def test_constant_image_has_zero_interior_responses_and_exact_gray_weights():
    """Check 7: constant gray -> interior Sobel and Laplacian are 0 (the zero-padded border is not); pure red, green
    and blue give the weights (0.2989, 0.5870, 0.1140) times 255."""
    sobel, laplacian = sobel_laplacian(torch.full((1, 1, 10, 12), 77.0))
    assert sobel[..., 1:-1, 1:-1].abs().max() == 0 and laplacian[..., 1:-1, 1:-1].abs().max() == 0
    assert sobel[..., 0, :].abs().min() > 0
    assert GRAY_WEIGHTS == (0.2989, 0.5870, 0.1140)
    primaries = normalize(torch.eye(3).view(3, 3, 1, 1).expand(3, 3, 2, 2))
    torch.testing.assert_close(gray_255(primaries)[:, 0, 0, 0], torch.tensor(GRAY_WEIGHTS) * 255, atol=2e-4, rtol=0)


def test_mean_and_reconstruction_losses():
    torch.manual_seed(0)
    tokens, z_vi, z_ir = torch.randn(3, 2, 5, 8).unbind(0)
    assert mean_loss(tokens, z_vi, z_ir).item() == pytest.approx(((tokens - (z_vi + z_ir) / 2) ** 2).mean().item())
    decoded, x_vi, x_ir = torch.randn(4, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    expected = ((decoded - torch.cat([x_vi, x_ir])) ** 2).mean()
    assert reconstruction_loss(decoded, x_vi, x_ir).item() == pytest.approx(expected.item())


def test_losses_run_in_float32_outside_autocast():
    """bf16 inputs under CPU autocast give float32 losses equal to the float32 computation on the same values."""
    torch.manual_seed(0)
    fused, vi, ir = (torch.randn(2, 3, 16, 16).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = fusion_loss(fused, vi, ir)
        mean = mean_loss(fused, vi, ir)
    reference = fusion_loss(fused.float(), vi.float(), ir.float())
    assert terms.total.dtype == torch.float32 and mean.dtype == torch.float32
    assert terms.total.item() == reference.total.item()
