"""Shared fixtures of the colorization tests: offline guard, the demo dataset, small systems."""

from __future__ import annotations

import socket
import warnings

import pytest
import torch

from colorize.config import DataConfig, ExemplarConfig, FlowConfig, FusionConfig

DEMO_EXEMPLAR = ExemplarConfig(backbone_embed_dim=32, backbone_depths=(1, 1, 1, 1), backbone_heads=(1, 2, 4, 8),
                               warpnet_width=0.125)
DEMO_FUSION = FusionConfig(width=16)
DEMO_SIZE = 64


class NetworkBlocked(AssertionError):
    """Raised by the socket guard: a test tried to reach the network."""


@pytest.fixture
def no_network(monkeypatch):
    """Offline like CI (spec check 12): HF_HUB_OFFLINE=1 and every socket connection refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise NetworkBlocked(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The generated demo dataset (seed 0), written once per session."""
    from colorize.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("colorize_demo") / "demo", seed=0)


def demo_data_config(root, **overrides) -> DataConfig:
    """The demo preset's data settings on ``root``."""
    settings = dict(dataset=(root,), imagenet=root / "references", image_size=DEMO_SIZE, sequence_length=4, workers=0)
    settings.update(overrides)
    return DataConfig(**settings)


def demo_system(seed: int = 0, **fusion_overrides):
    """A demo-size FusionSystem (Strategy 2, random Swin, classical flow) with a fixed initialisation."""
    from dataclasses import replace

    from colorize.system import FusionSystem

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FusionSystem(FlowConfig(), DEMO_EXEMPLAR, fusion=replace(DEMO_FUSION, **fusion_overrides),
                            image_size=DEMO_SIZE)


def random_lab(*shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Normalised LAB of random sRGB colours, shape ``[..., 3, H, W]``."""
    from colorize.lab import rgb_to_normalized_lab

    return rgb_to_normalized_lab(torch.rand(*shape, generator=generator))


def write_tiny_davis(root, train: int = 4, val: int = 1, frames: int = 8, seed: int = 0):
    """A small dataset in the demo's DAVIS layout: the demo's scenes, fewer and shorter sequences, one reference
    (the scene at t = -4) per sequence under ``references/``."""
    from PIL import Image

    from colorize.demo_data import REFERENCE_TIMES, make_scene, render_rgb

    for split, count in (("train", train), ("val", val)):
        names = [f"tiny_{split}_{index}" for index in range(count)]
        (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "2017" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for index, name in enumerate(names):
            scene = make_scene(seed, split, index)
            folder = root / "JPEGImages" / "480p" / name
            folder.mkdir(parents=True)
            for t in range(frames):
                Image.fromarray(render_rgb(scene, t)).save(folder / f"{t:05d}.jpg", quality=95)
            (root / "references" / name).mkdir(parents=True)
            Image.fromarray(render_rgb(scene, REFERENCE_TIMES[0])).save(root / "references" / name / "ref_000.jpg",
                                                                        quality=95)
    return root
