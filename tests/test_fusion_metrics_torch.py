"""Torch fusion metrics (common/fusion_metrics_torch.py) against numpy (spec/metrics.md §9 check 12) and
pytorch-msssim."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common import fusion_metrics as fm
from common import fusion_metrics_torch as ft


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random 2x1x192x192 8-bit batches: F correlated with both sources (float64)."""
    generator = torch.Generator().manual_seed(7)
    a = torch.randint(0, 256, (2, 1, 192, 192), generator=generator).double()
    b = torch.randint(0, 256, (2, 1, 192, 192), generator=generator).double()
    noise = torch.randint(0, 256, (2, 1, 192, 192), generator=generator).double()
    return torch.round((a + b + noise) / 3.0), a, b


def gray(tensor: torch.Tensor, index: int) -> np.ndarray:
    return tensor[index, 0].numpy()


CASES = {
    "ssim": (lambda f, a, b: ft.ssim(f, a), lambda f, a, b: fm.ssim(f, a)),
    "ms_ssim": (lambda f, a, b: ft.ms_ssim(f, a), lambda f, a, b: fm.ms_ssim(f, a)),
    "psnr": (lambda f, a, b: ft.psnr(f, a), lambda f, a, b: fm.psnr(f, a)),
    "mse": (lambda f, a, b: ft.mse(f, a), lambda f, a, b: fm.mse_fusion(f, a, a)),
    "cc": (ft.cc, fm.cc),
    "scd": (ft.scd, fm.scd),
    "sd": (lambda f, a, b: ft.sd(f), lambda f, a, b: fm.sd(f)),
    "sf": (lambda f, a, b: ft.sf(f), lambda f, a, b: fm.sf(f)),
    "ag": (lambda f, a, b: ft.ag(f), lambda f, a, b: fm.ag(f)),
    "vif": (ft.vif, fm.vif),
    "qabf": (ft.qabf, fm.qabf),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_equals_numpy(batch, name):
    torch_function, numpy_function = CASES[name]
    fused, a, b = batch
    expected = np.array([numpy_function(gray(fused, i), gray(a, i), gray(b, i)) for i in range(2)])
    value64 = torch_function(fused, a, b)
    assert value64.shape == (2,) and value64.dtype == torch.float64
    np.testing.assert_allclose(value64.numpy(), expected, rtol=1e-8)
    value32 = torch_function(fused.float(), a.float(), b.float())
    assert value32.dtype == torch.float32
    np.testing.assert_allclose(value32.double().numpy(), expected, rtol=1e-4)


def test_input_range_rescales_and_autocast_is_disabled(batch):
    fused, a, b = batch
    reference = ft.ssim(fused, a)
    assert torch.allclose(ft.ssim(fused / 255.0, a / 255.0, input_range=1.0), reference, rtol=1e-12)
    assert torch.allclose(ft.vif(fused / 255.0, a / 255.0, b / 255.0, input_range=1.0), ft.vif(fused, a, b),
                          rtol=1e-10)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        inside = ft.ms_ssim(fused.float(), a.float())
    assert inside.dtype == torch.float32
    assert torch.allclose(inside.double(), ft.ms_ssim(fused, a), rtol=1e-4)


@pytest.mark.parametrize("shape", [(192, 192), (193, 201)])
def test_ssim_and_ms_ssim_match_pytorch_msssim(shape):
    from pytorch_msssim import ms_ssim as reference_ms_ssim
    from pytorch_msssim import ssim as reference_ssim

    generator = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (2, 1, *shape), generator=generator).double()
    y = (x + 30.0 * torch.randn(x.shape, generator=generator, dtype=torch.float64)).clamp(0, 255)
    assert torch.allclose(ft.ssim(x, y), reference_ssim(x, y, data_range=255, size_average=False).flatten(),
                          atol=1e-6)
    assert torch.allclose(ft.ms_ssim(x, y), reference_ms_ssim(x, y, data_range=255, size_average=False).flatten(),
                          atol=1e-6)


def test_multichannel_ssim_and_psnr_average_channels():
    generator = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (1, 3, 40, 44), generator=generator).double()
    y = (x + 20.0 * torch.randn(x.shape, generator=generator, dtype=torch.float64)).clamp(0, 255)
    x_hwc, y_hwc = x[0].permute(1, 2, 0).numpy(), y[0].permute(1, 2, 0).numpy()
    assert ft.ssim(x, y).item() == pytest.approx(fm.ssim(x_hwc, y_hwc), rel=1e-10)
    assert ft.psnr(x, y).item() == pytest.approx(fm.psnr(x_hwc, y_hwc), rel=1e-10)
    assert ft.psnr(x, x).item() == math.inf
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        ft.vif(x, x, x)


def test_ssim_backpropagates_finite_gradients_and_validation_metrics_do_not(batch):
    fused, a, b = batch
    fused = fused.clone().requires_grad_(True)
    loss = (1.0 - ft.ssim(fused, a)).sum() + (1.0 - ft.ms_ssim(fused, b)).sum() + ft.ag(fused).sum()
    loss.backward()
    assert fused.grad is not None and torch.isfinite(fused.grad).all() and fused.grad.abs().sum() > 0
    flat = torch.full((1, 1, 32, 32), 100.0, requires_grad=True)
    (ft.sd(flat) + ft.sf(flat) + ft.ag(flat)).sum().backward()
    assert torch.isfinite(flat.grad).all()
    assert not ft.vif(fused, a, b).requires_grad
    assert not ft.qabf(fused, a, b).requires_grad


def test_small_inputs_give_nan_with_warning():
    small = torch.zeros(2, 1, 40, 40)
    with pytest.warns(fm.FusionMetricWarning, match="VIF"):
        assert torch.isnan(ft.vif(small, small, small)).all()
    with pytest.warns(fm.FusionMetricWarning, match="MS-SSIM"):
        assert torch.isnan(ft.ms_ssim(torch.zeros(1, 1, 160, 200), torch.zeros(1, 1, 160, 200))).all()
