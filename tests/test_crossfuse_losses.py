"""CrossFuse losses: corrected official MS-SSIM, stage-1 and fusion losses (spec §3, §9.5-6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage, signal

from crossfuse.losses import (
    MS_SSIM_WEIGHTS,
    combine_ms_ssim,
    fusion_loss,
    intensity_target,
    ms_ssim,
    ms_ssim_scales,
    positive_laplacian,
    reconstruction_loss,
)


def correlated_pair(size: int, seed: int, peak: float = 255.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.avg_pool2d(torch.rand(1, 1, size + 6, size + 6, generator=generator), 7, stride=1)
    base = (base - base.min()) / (base.max() - base.min())
    noise = torch.rand(1, 1, size, size, generator=generator)
    x = peak * (0.8 * base + 0.2 * noise)
    y = peak * (0.7 * base + 0.3 * torch.rand(1, 1, size, size, generator=generator))
    return x, y


def reference_scales(x: np.ndarray, y: np.ndarray, data_range: float) -> tuple[list[float], list[float]]:
    """Independent float64 per-scale (ssim, cs) with a 2-D Gaussian window and 'valid' correlation."""
    ssim_values, cs_values = [], []
    for scale in range(5):
        if scale:
            h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
            x = x[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
            y = y[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        n = min(11, *x.shape)
        g = np.exp(-((np.arange(n) - n // 2) ** 2) / 4.5)
        window = np.outer(g, g) / g.sum() ** 2
        f = lambda a: signal.correlate2d(a, window, mode="valid")  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
        c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
        cs = (2 * cxy + c2) / (vx + vy + c2)
        ssim_values.append(float(np.mean((2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs)))
        cs_values.append(float(np.mean(cs)))
    return ssim_values, cs_values


def reference_combination(ssim_values, cs_values, normalize):
    if normalize:
        ssim_values = [(v + 1) / 2 for v in ssim_values]
        cs_values = [(v + 1) / 2 for v in cs_values]
    value = ssim_values[4] ** MS_SSIM_WEIGHTS[4]
    for j in range(4):
        value *= cs_values[j] ** MS_SSIM_WEIGHTS[j]
    return value


# ---------------------------------------------------------------------------------------------------------------
# §9.5 MS-SSIM


@pytest.mark.parametrize("normalize", [True, False])
def test_ms_ssim_of_identical_images_is_one(normalize):
    x, _ = correlated_pair(64, seed=0)
    assert abs(ms_ssim(x, x, normalize=normalize).item() - 1.0) <= 1e-6


def test_ms_ssim_matches_pytorch_msssim_on_256():
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    x, y = correlated_pair(256, seed=1)
    ours = ms_ssim(x, y, normalize=False).item()
    reference = pytorch_msssim.ms_ssim(x.double(), y.double(), data_range=255).item()
    assert 0.3 < ours < 0.99
    assert abs(ours - reference) <= 1e-4


def test_ms_ssim_matches_shared_torch_metric_on_256():
    metrics = pytest.importorskip("common.fusion_metrics_torch")
    x, y = correlated_pair(256, seed=2)
    ours = ms_ssim(x, y, normalize=False).item()
    assert abs(ours - float(metrics.ms_ssim(x, y).reshape(-1)[0])) <= 1e-4


def test_dark_pair_uses_range_255_and_scales_match_reference():
    x, y = correlated_pair(64, seed=3, peak=100.0)
    assert x.max() <= 100 and y.max() <= 100
    ssim_values, cs_values = ms_ssim_scales(x, y)
    ref255 = reference_scales(x[0, 0].double().numpy(), y[0, 0].double().numpy(), 255.0)
    ref1 = reference_scales(x[0, 0].double().numpy(), y[0, 0].double().numpy(), 1.0)
    assert np.allclose(ssim_values.numpy(), ref255[0], atol=1e-5)
    assert np.allclose(cs_values.numpy(), ref255[1], atol=1e-5)
    value = ms_ssim(x, y).item()
    assert abs(value - reference_combination(*ref255, normalize=True)) <= 1e-5
    assert abs(value - reference_combination(*ref1, normalize=True)) > 1e-3


def test_combination_is_product_of_cs_and_last_ssim_powers():
    ssim_values = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5], dtype=torch.float64)
    cs_values = torch.tensor([0.95, 0.85, 0.75, 0.65, 0.55], dtype=torch.float64)
    w = MS_SSIM_WEIGHTS
    expected = 0.95 ** w[0] * 0.85 ** w[1] * 0.75 ** w[2] * 0.65 ** w[3] * 0.5 ** w[4]
    assert abs(combine_ms_ssim(ssim_values, cs_values, normalize=False).item() - expected) <= 1e-12
    bracket_bug = expected * 0.5 ** (3 * w[4])  # the official prod(cs^w * ssim5^w5) over 4 terms
    assert abs(combine_ms_ssim(ssim_values, cs_values, normalize=False).item() - bracket_bug) > 1e-3
    normalized = reference_combination(ssim_values.tolist(), cs_values.tolist(), normalize=True)
    assert abs(combine_ms_ssim(ssim_values, cs_values, normalize=True).item() - normalized) <= 1e-12


def test_reconstruction_loss_terms_are_weighted():
    x, y = correlated_pair(64, seed=4)
    loss = reconstruction_loss(y, x)
    mse = torch.mean((y - x) ** 2)
    assert torch.isclose(loss.recon, mse, rtol=1e-6)
    assert torch.isclose(loss.ssim, 10000 * (1 - ms_ssim(y, x)), rtol=1e-6)
    assert torch.isclose(loss.total, loss.recon + loss.ssim, rtol=1e-7)


def test_losses_stay_float32_under_autocast():
    x, y = correlated_pair(48, seed=5)
    plain = fusion_loss(y, x, y * 0.5, w_ssim=1.0)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under = fusion_loss(y.bfloat16(), x, y * 0.5, w_ssim=1.0)
    assert under.total.dtype == torch.float32
    assert torch.allclose(torch.stack(under), torch.stack(plain), rtol=1e-2)


# ---------------------------------------------------------------------------------------------------------------
# §9.6 fusion loss


def test_pixel_loss_target_and_mask():
    generator = torch.Generator().manual_seed(6)
    ir = torch.randint(0, 256, (2, 1, 40, 52), generator=generator).float()
    vi = torch.randint(0, 256, (2, 1, 40, 52), generator=generator).float()
    vi[0, :, :20] = 0  # a region where IR clearly wins
    target, mask = intensity_target(ir, vi)
    box = np.ones((11, 11)) / 121
    m_ir = np.stack([ndimage.correlate(a, box, mode="constant") for a in ir[:, 0].double().numpy()])
    m_vi = np.stack([ndimage.correlate(a, box, mode="constant") for a in vi[:, 0].double().numpy()])
    assert np.array_equal(mask[:, 0].numpy() == 1, m_ir > m_vi)
    assert set(np.unique(mask.numpy())) == {0.0, 1.0}
    assert torch.equal(target, torch.where(mask.bool(), ir, vi))
    loss = fusion_loss(target, ir, vi)
    assert loss.pix.item() == 0.0
    assert fusion_loss(target + 2.0, ir, vi).pix.item() == pytest.approx(4.0)


def test_gradient_loss_zero_on_constant_images():
    constant = torch.full((2, 1, 32, 32), 90.0)
    loss = fusion_loss(constant, torch.full_like(constant, 30.0), torch.full_like(constant, 200.0))
    assert loss.gra.item() == 0.0
    assert loss.ssim.item() == 0.0 and loss.total.item() == pytest.approx(loss.pix.item())


def test_positive_laplacian_is_clamped_zero_padded_laplacian():
    generator = torch.Generator().manual_seed(7)
    x = torch.rand(1, 1, 20, 24, generator=generator) * 255
    kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)
    laplacian = ndimage.correlate(x[0, 0].double().numpy(), kernel, mode="constant")
    g = positive_laplacian(x)[0, 0].double().numpy()
    assert np.all(g[laplacian <= 0] == 0)
    assert np.allclose(g, np.maximum(laplacian, 0), atol=1e-3)
    assert (laplacian > 0).any() and (laplacian <= 0).any()


def test_fusion_loss_total_and_weighted_terms():
    x, y = correlated_pair(48, seed=8)
    fused = 0.5 * (x + y)
    loss = fusion_loss(fused, x, y, w_ssim=2.0)
    g_target = torch.maximum(positive_laplacian(x), positive_laplacian(y))
    assert torch.isclose(loss.gra, 10 * torch.mean((positive_laplacian(fused) - g_target) ** 2), rtol=1e-6)
    expected_ssim = 2.0 * 0.5 * ((1 - ms_ssim(fused, x)) + (1 - ms_ssim(fused, y)))
    assert torch.isclose(loss.ssim, expected_ssim, rtol=1e-6)
    assert torch.isclose(loss.total, loss.pix + loss.gra + loss.ssim, rtol=1e-6)
    fused.requires_grad_(True)
    fusion_loss(fused, x, y).total.backward()
    assert fused.grad is not None and torch.isfinite(fused.grad).all()
