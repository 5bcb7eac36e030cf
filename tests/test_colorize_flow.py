"""Flow module (spec/colorize.md §2.2, §9 checks 2 and 4): DIS on a known translation, compute-size rescaling,
analytic confidence, RAFT weights policy, and the MemFlow adapter on a fake checkout written here."""

from __future__ import annotations

import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from scipy import ndimage

from colorize.config import FlowConfig
from colorize.flow import (ClassicalFlow, MemFlowAdapter, build_flow, flow_confidence, standin_flash_attn_func,
                           warp)
from colorize.weights import WeightFileError
from common.errors import ConfigError, UserError
from tests.colorize_helpers import no_network  # noqa: F401

pytestmark = pytest.mark.usefixtures("no_network")

SHIFT_X, SHIFT_Y = -2, 3  # the scene moves by d = (-2, +3) px from the previous to the current frame


def _translated_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """(previous, current) 64x64 gray frames of blurred noise; current(p) = previous(p - d)."""
    rng = np.random.default_rng(0)
    field = ndimage.gaussian_filter(rng.random((96, 96)), 1.5)
    field = (field - field.min()) / (field.max() - field.min())
    field = torch.from_numpy(np.round(field * 255) / 255).float()
    previous = field[16:80, 16:80]
    current = field[16 - SHIFT_Y:80 - SHIFT_Y, 16 - SHIFT_X:80 - SHIFT_X]
    return previous[None, None], current[None, None]


def _interior(x: torch.Tensor, margin: int = 8) -> torch.Tensor:
    return x[..., margin:-margin, margin:-margin]


def test_dis_recovers_translation_with_confidence():
    previous, current = _translated_pair()
    flow = ClassicalFlow("medium")
    first = flow.step(previous)
    for tensor in (first.flow, first.conf, first.noc, first.valid):
        assert tensor.abs().max() == 0
    step = flow.step(current)
    assert step.flow.shape == (1, 2, 64, 64) and step.conf.shape == (1, 1, 64, 64)
    median = _interior(step.flow).flatten(2).median(dim=2).values[0]
    assert torch.allclose(median, torch.tensor([-SHIFT_X, -SHIFT_Y], dtype=torch.float32), atol=0.1), median
    assert (_interior(step.conf) > 0.8).float().mean() >= 0.9

    half = ClassicalFlow("medium", compute_scale=0.5)
    assert half.compute_size(64, 64) == (32, 32)
    half.step(previous)
    half_step = half.step(current)
    assert half_step.flow.shape == (1, 2, 64, 64)
    half_median = _interior(half_step.flow).flatten(2).median(dim=2).values[0]
    assert torch.allclose(half_median, median, atol=0.3), (half_median, median)

    flow.reset()
    assert flow.step(current).flow.abs().max() == 0


def test_flow_module_refuses_colour_input():
    with pytest.raises(ValueError, match="one luminance channel"):
        ClassicalFlow().step(torch.rand(1, 3, 32, 32))


def test_confidence_on_analytic_square():
    """A 16x16 square moves 4 px right over a static background."""
    backward = torch.zeros(1, 2, 64, 64)
    forward = torch.zeros(1, 2, 64, 64)
    backward[:, 0, 24:40, 24:40] = -4.0  # square at t: columns 24..39; it came from 4 px to the left
    forward[:, 0, 24:40, 20:36] = 4.0  # square at t-1: columns 20..35
    conf, noc, valid = flow_confidence(backward, forward)
    assert valid.min() == 1
    disoccluded = conf[0, 0, 24:40, 20:24]
    assert disoccluded.max() < 1e-6 and noc[0, 0, 24:40, 20:24].max() == 0
    assert torch.all(conf[0, 0, 24:40, 24:40] == 1)
    background = torch.ones(64, 64, dtype=torch.bool)
    background[24:40, 20:40] = False
    assert torch.all(conf[0, 0][background] == 1)


def test_warp_follows_the_backward_flow():
    image = torch.arange(64.0).view(1, 1, 8, 8)
    flow = torch.zeros(1, 2, 8, 8)
    flow[:, 0] = 1.0  # sample one pixel to the right
    warped, valid = warp(image, flow)
    assert torch.allclose(warped[..., :-1], image[..., 1:], atol=1e-4)
    assert torch.allclose(warped[..., -1], image[..., -1], atol=1e-4)  # border padding
    assert valid[..., :-1].min() == 1 and valid[..., -1].max() == 0


raft = pytest.importorskip("torchvision.models.optical_flow")


def test_raft_weight_policy(tmp_path):
    with pytest.raises(ConfigError, match="--flow.raft-weights") as refused:
        build_flow(FlowConfig(backend="raft"))
    assert isinstance(refused.value, UserError)

    with pytest.warns(UserWarning, match="RANDOM INIT"):
        untrained = build_flow(FlowConfig(backend="raft", allow_random_init=True))
    assert untrained.sources[0].random_init
    untrained.step(torch.rand(2, 1, 64, 64))
    step = untrained.step(torch.rand(2, 1, 64, 64))
    assert step.flow.shape == (2, 2, 64, 64) and torch.isfinite(step.flow).all()
    assert untrained.compute_size(64, 64) == (128, 128)

    torch.manual_seed(1)
    reference = raft.raft_small(weights=None)
    weights = tmp_path / "raft_small_C_T_V2-01064c6d.pth"
    torch.save(reference.state_dict(), weights)
    loaded = build_flow(FlowConfig(backend="raft", raft_weights=weights))
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[key], value)
    assert loaded.sources[0].sha256 and not any(p.requires_grad for p in loaded.network.parameters())

    broken = dict(reference.state_dict())
    broken.pop(next(iter(broken)))
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightFileError, match="broken.pth"):
        build_flow(FlowConfig(backend="raft", raft_weights=tmp_path / "broken.pth"))


FAKE_CHECKOUT = {
    "configs/__init__.py": "",
    "configs/sintel_memflownet.py": """
        class Config(dict):
            __getattr__ = dict.__getitem__

        def get_cfg():
            return Config(network="MemFlowNet_skflow", mem_every=1, warm_start=True)
        """,
    "configs/other_net.py": """
        from configs.sintel_memflownet import Config

        def get_cfg():
            return Config(network="MemFlowNet_T", mem_every=1)
        """,
    "core/__init__.py": "",
    "core/Networks/__init__.py": """
        def build_network(cfg):
            from .MemFlowNet.MemFlow import MemFlowNet  # lazy, like the real build_network
            return MemFlowNet()
        """,
    "core/Networks/MemFlowNet/__init__.py": "",
    "core/Networks/MemFlowNet/MemFlow.py": """
        import torch
        from torch import nn

        class MemFlowNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.head = nn.Conv2d(6, 2, 3, padding=1)

            def forward(self, first, second):
                return self.head(torch.cat((first, second), dim=1))
        """,
    "core/utils/__init__.py": "",
    "core/utils/utils.py": """
        import torch.nn.functional as F

        class InputPadder:
            def __init__(self, dims):
                height, width = dims[-2:]
                self.pad_height, self.pad_width = (-height) % 8, (-width) % 8

            def pad(self, images):
                return F.pad(images, [0, self.pad_width, 0, self.pad_height, 0, 0], mode="replicate")

            def unpad(self, x):
                return x[..., :x.shape[-2] - self.pad_height, :x.shape[-1] - self.pad_width]

        def forward_interpolate(flow):
            return flow.detach().cpu()
        """,
    "inference/__init__.py": "",
    "inference/memory_manager_skflow.py": """
        try:
            from flash_attn import flash_attn_func
            FLASH_AVAIABLE = True
        except ImportError:
            FLASH_AVAIABLE = False
        """,
    "inference/inference_core_skflow.py": """
        import torch.nn.functional as F
        from inference import memory_manager_skflow

        class InferenceCore:
            def __init__(self, network, config):
                self.model = network
                self.memory_module = memory_manager_skflow
                self.cleared = 0
                self.inits = []
                self.clear_memory()

            def clear_memory(self):
                self.cleared += 1

            def step(self, images, end=False, add_pe=False, flow_init=None):
                self.inits.append(flow_init)
                flow_up = self.model(images[:, 0], images[:, 1])
                return F.avg_pool2d(flow_up, 8), flow_up
        """,
}


@pytest.fixture
def fake_checkout(tmp_path):
    root = tmp_path / "MemFlow"
    for name, text in FAKE_CHECKOUT.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def _checkout_modules() -> list[str]:
    return [name for name in sys.modules
            if name.split(".")[0] in ("core", "configs", "inference", "utils", "flash_attn")]


def test_memflow_adapter_isolated_import(fake_checkout, tmp_path, monkeypatch):
    sentinel = types.ModuleType("utils")
    monkeypatch.setitem(sys.modules, "utils", sentinel)
    torch.manual_seed(0)
    state = {"module.head.weight": torch.randn(2, 6, 3, 3), "module.head.bias": torch.randn(2)}
    checkpoint = tmp_path / "memflow_sintel.pth"
    torch.save({"model": state, "steps": 10}, checkpoint)
    adapter = build_flow(FlowConfig(backend="memflow", memflow_path=fake_checkout, memflow_ckpt=checkpoint))

    assert _checkout_modules() == ["utils"] and sys.modules["utils"] is sentinel
    assert str(fake_checkout.resolve()) not in sys.path
    assert adapter._streams[0].memory_module.FLASH_AVAIABLE is False
    assert torch.equal(adapter.network.head.weight, state["module.head.weight"])
    assert adapter.sources[0].sha256

    adapter.step(torch.rand(2, 1, 30, 44))
    step = adapter.step(torch.rand(2, 1, 30, 44))
    assert step.flow.shape == (2, 2, 30, 44) and step.conf.shape == (2, 1, 30, 44)
    backward_stream, forward_stream = adapter._streams
    assert backward_stream.inits == [None] and forward_stream.inits == [None]
    adapter.step(torch.rand(2, 1, 30, 44))
    assert backward_stream.inits[1].shape == (2, 2, 4, 6)  # warm start from the previous low-resolution flow
    cleared = backward_stream.cleared
    adapter.reset()
    assert backward_stream.cleared == cleared + 1 and forward_stream.cleared == cleared + 1


def test_memflow_refusals(fake_checkout, tmp_path):
    with pytest.raises(ConfigError, match="--flow.memflow-ckpt"):
        build_flow(FlowConfig(backend="memflow", memflow_path=fake_checkout))
    with pytest.raises(ConfigError, match="--flow.memflow-path"):
        build_flow(FlowConfig(backend="memflow", memflow_path=tmp_path / "missing"))
    with pytest.raises(ConfigError, match="MemFlowNet_T"):
        MemFlowAdapter(fake_checkout, None, "other_net", allow_random_init=True)
    torch.save({"model": {"head.weight": torch.zeros(2, 6, 3, 3)}}, tmp_path / "partial.pth")
    with pytest.raises(WeightFileError, match="partial.pth"):
        build_flow(FlowConfig(backend="memflow", memflow_path=fake_checkout, memflow_ckpt=tmp_path / "partial.pth"))
    assert _checkout_modules() == []


def test_standin_flash_attention_matches_naive_attention():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 8, generator=generator) for _ in range(3))
    scale = 0.37
    logits = torch.einsum("blhd,bmhd->bhlm", q, k) * scale
    naive = torch.einsum("bhlm,bmhd->blhd", torch.softmax(logits, dim=-1), v)
    assert torch.allclose(standin_flash_attn_func(q, k, v, softmax_scale=scale), naive, atol=1e-5)
    default = torch.einsum("bhlm,bmhd->blhd", torch.softmax(logits / scale / 8 ** 0.5, dim=-1), v)
    assert torch.allclose(standin_flash_attn_func(q, k, v), default, atol=1e-5)
