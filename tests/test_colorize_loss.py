"""FusionLoss (spec/colorize.md §3, §9 check 7): contextual loss values and chunking, low-precision autocast,
flow-warped smoothness, masked alignment, the weighting of the total, the RaLSGAN terms."""

from __future__ import annotations

import pytest
import torch

from colorize.config import LossConfig
from colorize.loss import (CX_CHUNK_THRESHOLD, Discriminator, FusionLoss, contextual_loss, ralsgan_discriminator_loss,
                           ralsgan_generator_loss)
from tests.colorize_helpers import demo_system, no_network, random_lab  # noqa: F401

pytestmark = pytest.mark.usefixtures("no_network")


def test_contextual_loss_identity_and_independence():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 8, 8, generator=generator)
    y = torch.randn(2, 64, 8, 8, generator=generator)
    assert contextual_loss(x, x) < 1e-3
    assert contextual_loss(x, y) > 0.5


def test_contextual_loss_chunks_match_one_block():
    assert CX_CHUNK_THRESHOLD == 4096
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 9, 9, generator=generator)
    y = torch.randn(2, 4, 9, 9, generator=generator)
    gradients = []
    values = []
    for threshold in (10, CX_CHUNK_THRESHOLD):  # 81 positions: chunked in blocks of 20 rows, then in one block
        leaf = x.clone().requires_grad_(True)
        value = contextual_loss(leaf, y, chunk_rows=20, chunk_threshold=threshold)
        value.backward()
        values.append(value.detach())
        gradients.append(leaf.grad)
    assert torch.allclose(values[0], values[1], rtol=1e-6)
    assert torch.allclose(gradients[0], gradients[1], rtol=1e-5, atol=1e-8)
    assert gradients[0].abs().max() > 0


def test_no_nan_under_autocast():
    """The system under bf16 autocast; the loss under bf16 and fp16 autocast on low-precision outputs (CPU fp16
    convolutions are too slow for the whole system)."""
    system = demo_system()
    criterion = FusionLoss(LossConfig(perceptual=0.02, gan=0.1), system.embed_net)
    discriminator = Discriminator(width=8)
    generator = torch.Generator().manual_seed(0)
    frames = random_lab(2, 3, 3, 64, 64, generator=generator)
    reference = random_lab(2, 3, 64, 64, generator=generator)
    system.train()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        outputs, flow_outputs, confs, aux = system(frames, reference, return_aux=True)
    for dtype in (torch.bfloat16, torch.float16):
        low = [[tensor.to(dtype) for tensor in group] for group in (outputs, flow_outputs, confs)]
        with torch.autocast(device_type="cpu", dtype=dtype):
            total, parts = criterion(low[0], frames.to(dtype), low[1], low[2], aux=aux, reference_lab=reference,
                                     discriminator=discriminator)
        assert total.dtype == torch.float32 and torch.isfinite(total), dtype
        assert all(torch.isfinite(value) for value in parts.values()), dtype
    total.backward()
    assert torch.isfinite(system.nonlocal_net.theta.weight.grad).all()


def _translating_outputs(shift: int = 2):
    """Two frames whose ab pattern moves ``shift`` px right, the matching backward flow and noc."""
    columns = torch.arange(32.0).view(1, 1, 1, 32).expand(1, 2, 16, 32)
    lightness = torch.zeros(1, 1, 16, 32)
    previous = torch.cat((lightness, 0.5 * torch.sin(0.3 * columns)), dim=1).requires_grad_(True)
    current = torch.cat((lightness, 0.5 * torch.sin(0.3 * (columns - shift))), dim=1).requires_grad_(True)
    flow = torch.zeros(1, 2, 16, 32)
    flow[:, 0] = -shift
    noc = torch.ones(1, 1, 16, 32)
    noc[..., :shift] = 0  # these pixels came from outside the previous frame
    return [previous, current], flow, noc


def test_smoothness_is_flow_warped_and_reaches_the_previous_frame():
    outputs, flow, noc = _translating_outputs()
    frames = torch.stack([o.detach() for o in outputs], dim=1)
    aux = {"flows": [torch.zeros_like(flow), flow], "noc": [torch.zeros_like(noc), noc]}
    criterion = FusionLoss(LossConfig(l1=0.0, contextual=0.0, temporal=1.0, smooth=1.0))
    zero_conf = [torch.zeros_like(noc), torch.zeros_like(noc)]
    total, parts = criterion(outputs, frames, outputs, zero_conf, aux=aux)
    assert parts["smooth"] < 1e-6 and parts["align"] == 0
    assert (outputs[1][:, 1:] - outputs[0][:, 1:]).abs().mean() > 0.05

    shifted, _, _ = _translating_outputs(shift=3)
    total, parts = criterion(shifted, frames, shifted, zero_conf, aux=aux)
    assert parts["smooth"] > 1e-3
    total.backward()
    assert shifted[0].grad[:, 1:].abs().max() > 0 and shifted[1].grad[:, 1:].abs().max() > 0


def test_total_weights_the_terms_per_frame():
    generator = torch.Generator().manual_seed(0)
    frames = random_lab(2, 3, 3, 16, 16, generator=generator)
    outputs = [random_lab(2, 3, 16, 16, generator=generator) for _ in range(3)]
    flow_outputs = [random_lab(2, 3, 16, 16, generator=generator) for _ in range(3)]
    confs = [torch.rand(2, 1, 16, 16, generator=generator) for _ in range(3)]
    aux = {"flows": [torch.zeros(2, 2, 16, 16)] * 3, "noc": [torch.ones(2, 1, 16, 16)] * 3}
    cfg = LossConfig(l1=1.0, contextual=0.0, temporal=0.5, smooth=0.3)
    total, parts = FusionLoss(cfg)(outputs, frames, flow_outputs, confs, aux=aux)
    l1 = [(outputs[t][:, 1:] - frames[:, t, 1:]).abs().mean() for t in range(3)]
    align = [(confs[t] * (outputs[t][:, 1:] - flow_outputs[t][:, 1:]).abs()).mean() for t in (1, 2)]
    smooth = [(outputs[t][:, 1:] - outputs[t - 1][:, 1:]).abs().mean() for t in (1, 2)]
    expected = (sum(l1) + sum(0.5 * (a + 0.3 * s) for a, s in zip(align, smooth))) / 3
    assert torch.allclose(total, expected, rtol=1e-5)
    assert torch.allclose(parts["l1"], sum(l1) / 3, rtol=1e-5)


def test_ralsgan_terms_and_discriminator_from_64px():
    real, fake = torch.ones(4, 1), -torch.ones(4, 1)
    assert ralsgan_discriminator_loss(real, fake) == pytest.approx(1.0)
    assert ralsgan_generator_loss(real, fake) == pytest.approx(9.0)
    discriminator = Discriminator(width=16)
    assert discriminator(torch.rand(2, 3, 64, 64)).shape == (2, 1)
    outputs = [random_lab(2, 3, 64, 64).requires_grad_(True)]
    frames = random_lab(2, 1, 3, 64, 64)
    criterion = FusionLoss(LossConfig(l1=0.0, contextual=0.0, gan=1.0))
    total, parts = criterion(outputs, frames, outputs, discriminator=discriminator)
    total.backward()
    assert parts["gan_g"] > 0 and outputs[0].grad.abs().max() > 0
    assert torch.isfinite(FusionLoss.discriminator_loss(discriminator, outputs, frames))
