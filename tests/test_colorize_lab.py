"""LAB conversion (spec/colorize.md §2.1, §9 check 1): all 2^24 sRGB colours against scikit-image, the float32
round trip, the normalisation constants and finite gradients at the gamut corners."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import rgb2lab

from colorize.lab import (denormalize_lab, gray_from_lightness, lab_to_rgb, normalize_lab, normalized_lab_to_rgb,
                          rgb_to_lab, rgb_to_normalized_lab)
from tests.colorize_helpers import no_network  # noqa: F401

pytestmark = pytest.mark.usefixtures("no_network")

CHUNK = 1 << 21


def _colour_chunks():
    """All 8-bit sRGB colours in chunks: (uint8 [N, 3], torch [3, N, 1] float64 in [0, 1])."""
    for start in range(0, 1 << 24, CHUNK):
        codes = np.arange(start, start + CHUNK, dtype=np.int64)
        rgb8 = np.stack(((codes >> 16) & 255, (codes >> 8) & 255, codes & 255), axis=-1)
        yield rgb8, torch.from_numpy(np.ascontiguousarray(rgb8.T / 255.0)).view(3, CHUNK, 1)


def test_all_colours_match_skimage_and_round_trip():
    """Our float32 conversion (the system's) against scikit-image's float64 one on every 8-bit colour, and the float32
    round trip; the float64 path is compared on every 7th colour."""
    worst_lab = np.zeros(3)
    worst_lab64 = np.zeros(3)
    worst_round_trip = 0.0
    mismatched_codes = 0
    for rgb8, rgb in _colour_chunks():
        reference = rgb2lab(rgb8[:, None, :] / 255.0)[:, 0, :]
        lab32 = rgb_to_lab(rgb.float())
        assert lab32.dtype == torch.float32
        worst_lab = np.maximum(worst_lab, np.abs(lab32.view(3, -1).T.double().numpy() - reference).max(axis=0))
        lab64 = rgb_to_lab(rgb[:, ::7]).view(3, -1).T.numpy()
        worst_lab64 = np.maximum(worst_lab64, np.abs(lab64 - reference[::7]).max(axis=0))
        back = lab_to_rgb(lab32)
        worst_round_trip = max(worst_round_trip, float((back - rgb.float()).abs().max()))
        codes_back = torch.round(back * 255.0).to(torch.int64).view(3, -1).T.numpy()
        mismatched_codes += int((codes_back != rgb8).any(axis=1).sum())
    assert np.all(worst_lab <= 1e-3), f"float32: max |dL|, |da|, |db| vs skimage = {worst_lab}"
    assert np.all(worst_lab64 <= 1e-3), f"float64: max |dL|, |da|, |db| vs skimage = {worst_lab64}"
    assert worst_round_trip <= 2e-5
    assert mismatched_codes == 0


def test_normalisation_constants():
    raw = torch.tensor([[0.0, 50.0, 100.0], [127.0, 0.0, -127.0], [0.0, 127.0, 63.5]]).view(3, 1, 3)
    normalized = normalize_lab(raw)
    assert torch.allclose(normalized[0, 0], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(normalized[1, 0], torch.tensor([1.0, 0.0, -1.0]))
    assert torch.allclose(normalized[2, 0], torch.tensor([0.0, 1.0, 0.5]))
    assert torch.allclose(denormalize_lab(normalized), raw)
    white_black = rgb_to_normalized_lab(torch.tensor([1.0, 0.0]).view(1, 2, 1).expand(3, 2, 1))
    assert torch.allclose(white_black[0, :, 0], torch.tensor([1.0, -1.0]), atol=1e-5)
    assert torch.allclose(gray_from_lightness(white_black[0, :, 0]), torch.tensor([1.0, 0.0]), atol=1e-5)


def test_gradients_finite_at_gamut_corners():
    corners = torch.tensor([[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1],
                            [-0.1, 0.5, 1.2]], dtype=torch.float32).T.reshape(3, 9, 1)
    rgb = corners.clone().requires_grad_(True)
    lab = rgb_to_lab(rgb)
    lab.sum().backward()
    assert torch.isfinite(rgb.grad).all()
    normalized = rgb_to_normalized_lab(corners.clamp(0, 1)).detach().requires_grad_(True)
    normalized_lab_to_rgb(normalized).square().sum().backward()
    assert torch.isfinite(normalized.grad).all()
    extreme = torch.tensor([[0.0, 100.0, 50.0], [-128.0, 128.0, 0.0], [128.0, -128.0, 0.0]]).view(3, 3, 1)
    extreme = normalize_lab(extreme).requires_grad_(True)
    normalized_lab_to_rgb(extreme).sum().backward()
    assert torch.isfinite(extreme.grad).all()


def test_autocast_does_not_lower_precision():
    rgb = torch.rand(2, 3, 8, 8)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        lab = rgb_to_lab(rgb)
    assert lab.dtype == torch.float32
    assert torch.allclose(lab, rgb_to_lab(rgb))
