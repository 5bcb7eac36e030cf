"""The frozen, pluggable flow module (spec/colorize.md §2.2).

A flow module keeps the previous gray frame of the sequence it is streaming. ``step(g)`` takes the current gray
frame ``g`` ``[B, 1, H, W]`` in [0, 1] (one luminance channel, so ground-truth colour cannot reach it) and returns a
:class:`FlowStep`: the **backward flow** current -> previous in pixels (channel 0 = x; pixel p of frame t lies at
p + F(p) in frame t-1), a confidence, a non-occlusion mask and the in-image mask. The first step after ``reset()``
returns zeros. Everything runs under ``torch.no_grad()`` (not ``inference_mode``: the warp's backward saves the flow)
in float32; backend networks stay in eval mode and are held outside any ``nn.Module`` of the system, so they never
reach its ``state_dict``, DDP or the optimizer.

Backends: ``classical`` (OpenCV DIS, default), ``raft`` (torchvision, local weights only) and ``memflow`` (an
adapter for a user checkout of DQiaole/MemFlow, imported in isolation).
"""

from __future__ import annotations

import contextlib
import math
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from colorize.config import FlowConfig
from colorize.weights import WeightSource, file_source, load_strict, read_state_dict, strip_prefix
from common.errors import ConfigError

MEMFLOW_TOP_LEVEL = ("core", "configs", "inference", "utils")
MEMFLOW_NETWORK = "MemFlowNet_skflow"
RAFT_MINIMUM_SIDE = 128  # torchvision RAFT's correlation pyramid needs feature maps of at least 16 px


@dataclass(frozen=True)
class FlowStep:
    """One step of a flow module; every tensor is float32 ``[B, C, H, W]`` at the frame size."""

    flow: torch.Tensor
    """Backward flow current -> previous in pixels, C = 2 (x, y)."""
    conf: torch.Tensor
    """Forward-backward confidence in [0, 1], C = 1 (0 outside the image and on the first step)."""
    noc: torch.Tensor
    """Non-occluded mask (0/1), C = 1."""
    valid: torch.Tensor
    """1 where p + F(p) lies inside the previous frame, C = 1."""


def flow_sample_grid(flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``grid_sample`` grid (align_corners=True) of the positions p + F(p), and the mask of those inside the image."""
    _, _, height, width = flow.shape
    rows = torch.arange(height, device=flow.device, dtype=flow.dtype).view(1, height, 1)
    columns = torch.arange(width, device=flow.device, dtype=flow.dtype).view(1, 1, width)
    x = columns + flow[:, 0]
    y = rows + flow[:, 1]
    grid = torch.stack((2.0 * x / max(width - 1, 1) - 1.0, 2.0 * y / max(height - 1, 1) - 1.0), dim=-1)
    inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
    return grid, inside.unsqueeze(1)


def warp(x: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W(X; F)(p)``: bilinear sample of ``x`` at p + F(p) (border padding), in float32, with the in-image mask.

    Gradients flow into ``x`` (the flow is treated as data). Returns ``(warped, valid)`` with ``valid`` float 0/1.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        grid, inside = flow_sample_grid(flow.float())
        warped = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return warped, inside.float()


def flow_confidence(backward: torch.Tensor, forward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward-backward consistency of a backward flow F (t -> t-1) with the forward flow F_f (t-1 -> t).

    F~_f = W(F_f; F), r = |F + F~_f|^2, tau = 0.01 (|F|^2 + |F~_f|^2) + 0.5; returns
    ``(conf, noc, valid)`` = ``(valid * exp(-r / tau), valid * [r <= tau], valid)``.
    """
    forward_at_source, valid = warp(forward, backward)
    residual = (backward + forward_at_source).square().sum(dim=1, keepdim=True)
    tolerance = 0.01 * (backward.square().sum(dim=1, keepdim=True)
                        + forward_at_source.square().sum(dim=1, keepdim=True)) + 0.5
    conf = valid * torch.exp(-residual / tolerance)
    noc = valid * (residual <= tolerance).float()
    return conf, noc, valid


def resize_flow(flow: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of a pixel flow to ``height x width`` with x scaled by W/w and y by H/h (once)."""
    source_height, source_width = flow.shape[-2:]
    if (source_height, source_width) == (height, width):
        return flow
    resized = F.interpolate(flow, size=(height, width), mode="bilinear", align_corners=False)
    scale = flow.new_tensor((width / source_width, height / source_height)).view(1, 2, 1, 1)
    return resized * scale


class FlowModule:
    """Base of the flow backends: state, resizing to the compute size, confidence, device placement.

    Subclasses implement :meth:`_estimate` (backward and forward flow between two gray frames at the compute
    size, in pixels of that size) and may override :meth:`reset` and :attr:`networks`.
    """

    name = "flow"
    minimum_side = 1

    def __init__(self, compute_scale: float = 1.0):
        if compute_scale <= 0:
            raise ConfigError(f"--flow.compute-scale must be positive, got {compute_scale}")
        self.compute_scale = compute_scale
        self.sources: list[WeightSource] = []
        self._previous: torch.Tensor | None = None
        self._device = torch.device("cpu")

    @property
    def networks(self) -> list[nn.Module]:
        """The backend's networks (frozen, eval); empty for weight-free backends."""
        return []

    def reset(self) -> None:
        """Forget the previous frame (call at the start of every sequence)."""
        self._previous = None

    def to(self, device: torch.device | str) -> "FlowModule":
        """Move the backend's networks to ``device``; they stay float32."""
        self._device = torch.device(device)
        for network in self.networks:
            network.to(self._device)
        return self

    def compute_size(self, height: int, width: int) -> tuple[int, int]:
        """Size at which the backend computes for an ``height x width`` frame."""
        compute_height = max(1, round(height * self.compute_scale))
        compute_width = max(1, round(width * self.compute_scale))
        shortest = min(compute_height, compute_width)
        if shortest < self.minimum_side:
            factor = self.minimum_side / shortest
            compute_height, compute_width = math.ceil(compute_height * factor), math.ceil(compute_width * factor)
        return compute_height, compute_width

    @torch.no_grad()
    def step(self, gray: torch.Tensor) -> FlowStep:
        """Consume the next gray frame ``[B, 1, H, W]`` in [0, 1] and return its flow step."""
        if gray.dim() != 4 or gray.shape[1] != 1:
            raise ValueError(f"the flow module takes one luminance channel [B, 1, H, W], got {tuple(gray.shape)}")
        if gray.device != self._device:
            self.to(gray.device)
        gray = gray.detach().float()
        batch, _, height, width = gray.shape
        previous, self._previous = self._previous, gray
        if previous is None or previous.shape != gray.shape:
            zeros = gray.new_zeros(batch, 1, height, width)
            return FlowStep(gray.new_zeros(batch, 2, height, width), zeros, zeros, zeros)
        with torch.autocast(device_type=gray.device.type, enabled=False):
            compute_height, compute_width = self.compute_size(height, width)
            current_small, previous_small = (_resize_gray(image, compute_height, compute_width)
                                             for image in (gray, previous))
            backward, forward = self._estimate(current_small, previous_small)
            backward, forward = (resize_flow(flow.float(), height, width) for flow in (backward, forward))
            conf, noc, valid = flow_confidence(backward, forward)
        return FlowStep(backward, conf, noc, valid)

    def _estimate(self, current: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the start-up panel."""
        return self.name


def _resize_gray(gray: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if gray.shape[-2:] == (height, width):
        return gray
    antialias = height < gray.shape[-2] or width < gray.shape[-1]
    return F.interpolate(gray, size=(height, width), mode="bilinear", align_corners=False, antialias=antialias)


class ClassicalFlow(FlowModule):
    """OpenCV DIS optical flow (Kroeger et al., ECCV 2016) on uint8 round(255 g), one sample at a time."""

    name = "classical"
    PRESETS = {"ultrafast": "DISOPTICAL_FLOW_PRESET_ULTRAFAST", "fast": "DISOPTICAL_FLOW_PRESET_FAST",
               "medium": "DISOPTICAL_FLOW_PRESET_MEDIUM"}

    def __init__(self, preset: str = "medium", compute_scale: float = 1.0):
        super().__init__(compute_scale)
        import cv2

        cv2.setNumThreads(1)  # deterministic and friendly to data-loader workers and other ranks
        self.preset = preset
        self._dis = cv2.DISOpticalFlow_create(getattr(cv2, self.PRESETS[preset]))

    def _estimate(self, current, previous):
        current_u8 = _to_uint8(current)
        previous_u8 = _to_uint8(previous)
        backward = np.stack([self._dis.calc(c, p, None) for c, p in zip(current_u8, previous_u8)])
        forward = np.stack([self._dis.calc(p, c, None) for c, p in zip(current_u8, previous_u8)])
        return _flow_tensor(backward, current.device), _flow_tensor(forward, current.device)

    def describe(self) -> str:
        """Backend and preset."""
        return f"classical (OpenCV DIS, preset {self.preset})"


def _flow_tensor(flows: np.ndarray, device: torch.device) -> torch.Tensor:
    """OpenCV flows ``[B, H, W, 2]`` -> ``[B, 2, H, W]`` on ``device``."""
    return torch.from_numpy(flows).permute(0, 3, 1, 2).to(device)


def _to_uint8(gray: torch.Tensor) -> np.ndarray:
    return torch.round(gray[:, 0].clamp(0, 1) * 255.0).to(torch.uint8).cpu().numpy()


def _network_input(gray: torch.Tensor) -> torch.Tensor:
    """2g - 1 replicated to 3 channels (the input range of RAFT and MemFlow)."""
    return (2.0 * gray - 1.0).expand(-1, 3, -1, -1)


def _freeze(network: nn.Module) -> nn.Module:
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network


def _random_init_warning(what: str, flag: str) -> str:
    message = f"{what} runs with RANDOM INIT weights (no {flag}): its flow is meaningless (tests only)"
    warnings.warn(message, stacklevel=3)
    return message


class RaftFlow(FlowModule):
    """torchvision RAFT: both directions in one batched call, 12 updates, last prediction.

    Frames whose shorter side is below 128 px are computed at an enlarged size (RAFT's correlation pyramid needs
    feature maps of 16 px) and the flow is resized back like any other compute size.
    """

    name = "raft"
    minimum_side = RAFT_MINIMUM_SIDE

    def __init__(self, model: str = "small", weights: Path | None = None, allow_random_init: bool = False,
                 updates: int = 12, compute_scale: float = 1.0):
        super().__init__(compute_scale)
        try:
            from torchvision.models.optical_flow import raft_large, raft_small
        except ImportError as error:
            raise ConfigError(f"--flow.backend raft needs a working torchvision ({error}); "
                              "install the torchvision matching torch from requirements.txt") from error
        builder = {"small": raft_small, "large": raft_large}[model]
        network = builder(weights=None, progress=False)
        if weights is not None:
            load_strict(network, read_state_dict(weights), weights, f"RAFT {model}")
            self.sources = [file_source("flow", weights)]
        elif allow_random_init:
            self.sources = [WeightSource("flow", None, None, _random_init_warning(f"RAFT {model}",
                                                                                   "--flow.raft-weights"))]
        else:
            raise ConfigError(f"--flow.backend raft needs --flow.raft-weights FILE (torchvision's release file "
                              f"raft_{model}_*.pth); nothing is downloaded. --flow.allow-random-init runs it "
                              "untrained, for tests only")
        self.model = model
        self.updates = updates
        self.network = _freeze(network)

    @property
    def networks(self):
        """The RAFT network."""
        return [self.network]

    def _estimate(self, current, previous):
        batch, _, height, width = current.shape
        pad_height, pad_width = (-height) % 8, (-width) % 8
        padding = (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2)
        first = F.pad(_network_input(torch.cat((current, previous))), padding, mode="replicate")
        second = F.pad(_network_input(torch.cat((previous, current))), padding, mode="replicate")
        flows = self.network(first, second, num_flow_updates=self.updates)[-1]
        flows = flows[..., padding[2]:padding[2] + height, padding[0]:padding[0] + width]
        return flows[:batch], flows[batch:]

    def describe(self) -> str:
        """Backend, variant and iterations."""
        return f"raft (torchvision raft_{self.model}, {self.updates} updates)"


def standin_flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                            softmax_scale: float | None = None, causal: bool = False) -> torch.Tensor:
    """Stand-in for ``flash_attn.flash_attn_func`` on ``[B, L, H, D]`` tensors, via scaled_dot_product_attention."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2)


def _is_checkout_module(name: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in MEMFLOW_TOP_LEVEL)


@contextlib.contextmanager
def isolated_checkout_import(checkout: Path) -> Iterator[dict[str, types.ModuleType]]:
    """Import from a MemFlow checkout without leaving a trace.

    Inside the context the checkout (and its core/, as MemFlow's scripts add it) leads ``sys.path``, modules of
    the same top-level names imported before are set aside, and ``flash_attn`` is a stand-in module. On exit the
    path entries are removed, every module loaded under the checkout's top-level names is evicted, and the set-aside
    modules return. The yielded dict is filled with the loaded checkout modules on exit (before eviction).
    """
    entries = [str(checkout), str(checkout / "core")]
    set_aside = {name: module for name, module in sys.modules.items()
                 if _is_checkout_module(name) or name == "flash_attn"}
    for name in set_aside:
        del sys.modules[name]
    standin = types.ModuleType("flash_attn")
    standin.flash_attn_func = standin_flash_attn_func
    sys.modules["flash_attn"] = standin
    sys.path[:0] = entries
    loaded: dict[str, types.ModuleType] = {}
    try:
        yield loaded
    finally:
        for entry in entries:
            if entry in sys.path:
                sys.path.remove(entry)
        for name in [name for name in sys.modules if _is_checkout_module(name) or name == "flash_attn"]:
            loaded[name] = sys.modules.pop(name)
        sys.modules.update(set_aside)


class MemFlowAdapter(FlowModule):
    """DQiaole/MemFlow (CVPR 2024) from a user checkout: two official ``InferenceCore`` streams.

    Stream one sees the pairs [t, t-1] (backward flow F), stream two [t-1, t] (forward flow F_f); ``reset()``
    clears both. Input 2g - 1 replicated to 3 channels, padded to /8 with the checkout's ``InputPadder``,
    ``end=False``, warm start as in the official evaluation when the config enables it.
    """

    name = "memflow"

    def __init__(self, checkout: Path | None, checkpoint: Path | None, config_name: str = "sintel_memflownet",
                 allow_random_init: bool = False, compute_scale: float = 1.0):
        super().__init__(compute_scale)
        if checkout is None or not (Path(checkout) / "core").is_dir():
            raise ConfigError(f"--flow.backend memflow needs --flow.memflow-path pointing at a DQiaole/MemFlow "
                              f"checkout (a folder with core/ and configs/); got {checkout}")
        checkout = Path(checkout).resolve()
        if checkpoint is None and not allow_random_init:
            raise ConfigError("--flow.backend memflow needs --flow.memflow-ckpt FILE; --flow.allow-random-init "
                              "runs it untrained, for tests only")
        with isolated_checkout_import(checkout) as loaded:
            network, streams, cfg, utilities = self._build(checkout, config_name)
        for module in loaded.values():
            if hasattr(module, "FLASH_AVAIABLE"):  # MemFlow's spelling; False selects the fp32 einsum readout
                module.FLASH_AVAIABLE = False
        if checkpoint is not None:
            state = read_state_dict(checkpoint, container_key="model")
            load_strict(network, strip_prefix(state, "module."), checkpoint, "MemFlow")
            self.sources = [file_source("flow", checkpoint)]
            if "colorization" in Path(checkpoint).name:
                warnings.warn(f"{checkpoint} looks like FlowChroma's memflow_colorization.pth, a colour propagator "
                              "trained on ground-truth LAB rather than a flow model; it loaded strictly and is "
                              "used as a flow model", stacklevel=2)
        else:
            self.sources = [WeightSource("flow", None, None, _random_init_warning("MemFlow",
                                                                                 "--flow.memflow-ckpt"))]
        self.network = _freeze(network)
        self.checkout = checkout
        self._streams = streams
        self._padder_class, self._forward_interpolate = utilities
        self._warm_start = bool(cfg.get("warm_start", False))
        self._add_pe = bool(cfg.get("rope", False))
        self._warm_flows: list[torch.Tensor | None] = [None, None]

    @staticmethod
    def _build(checkout: Path, config_name: str):
        import importlib

        try:
            cfg = importlib.import_module(f"configs.{config_name}").get_cfg()
            build_network = importlib.import_module("core.Networks").build_network
            inference_core = importlib.import_module("inference.inference_core_skflow")
            utils = importlib.import_module("core.utils.utils")
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"cannot import MemFlow from {checkout} ({type(error).__name__}: {error}); "
                              "check --flow.memflow-path and --flow.memflow-config") from error
        if cfg.network != MEMFLOW_NETWORK:
            raise ConfigError(f"MemFlow config {config_name} selects {cfg.network}; only {MEMFLOW_NETWORK} is "
                              "supported (the _T variants download Twins weights when built)")
        network = build_network(cfg)
        streams = (inference_core.InferenceCore(network, config=cfg), inference_core.InferenceCore(network, config=cfg))
        return network, streams, cfg, (utils.InputPadder, utils.forward_interpolate)

    @property
    def networks(self):
        """The MemFlow network."""
        return [self.network]

    def reset(self) -> None:
        """Forget the previous frame and clear both memory streams."""
        super().reset()
        for stream in self._streams:
            stream.clear_memory()
        self._warm_flows = [None, None]

    def _estimate(self, current, previous):
        current_input, previous_input = _network_input(current), _network_input(previous)
        pairs = (torch.stack((current_input, previous_input), dim=1),
                 torch.stack((previous_input, current_input), dim=1))
        flows = []
        for index, (stream, images) in enumerate(zip(self._streams, pairs)):
            padder = self._padder_class(images.shape)
            flow_low, flow_up = stream.step(padder.pad(images), end=False, add_pe=self._add_pe,
                                            flow_init=self._warm_flows[index])
            if self._warm_start:
                self._warm_flows[index] = torch.stack(
                    [self._forward_interpolate(sample) for sample in flow_low]).to(current.device)
            flows.append(padder.unpad(flow_up))
        return flows[0], flows[1]

    def describe(self) -> str:
        """Backend and checkout."""
        return f"memflow ({MEMFLOW_NETWORK} from {self.checkout})"


def build_flow(cfg: FlowConfig) -> FlowModule:
    """The flow module selected by ``--flow.backend``."""
    if cfg.backend == "classical":
        return ClassicalFlow(cfg.dis_preset, cfg.compute_scale)
    if cfg.backend == "raft":
        return RaftFlow(cfg.raft_model, cfg.raft_weights, cfg.allow_random_init, cfg.raft_updates, cfg.compute_scale)
    if cfg.backend == "memflow":
        return MemFlowAdapter(cfg.memflow_path, cfg.memflow_ckpt, cfg.memflow_config, cfg.allow_random_init,
                              cfg.compute_scale)
    raise ConfigError(f"unknown --flow.backend {cfg.backend!r}; choose classical, raft or memflow")
