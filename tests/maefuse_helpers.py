"""Helpers for the MaeFuse package tests: offline mode, seeded tiny networks, small image files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"  # the spec's acceptance checks run without network

from maefuse.model import MaeFuse, build_model  # noqa: E402  (after the offline switch)


def tiny_model(seed: int = 0, **options) -> MaeFuse:
    """A `tiny` MaeFuse with seeded random weights (fusion layer included)."""
    torch.manual_seed(seed)
    return build_model("tiny", **options)


def write_image(path: Path, pixels: np.ndarray) -> Path:
    """Save a uint8 gray (H, W) or RGB (H, W, 3) array (or a uint16 gray one) with PIL, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def random_image(rng: np.random.Generator, height: int, width: int, colour: bool = False) -> np.ndarray:
    """Smooth random uint8 content (a blurred noise field), gray or RGB."""
    shape = (height, width, 3) if colour else (height, width)
    noise = rng.uniform(0, 255, size=shape)
    kernel = np.ones(5) / 5
    for axis in (0, 1):
        noise = np.apply_along_axis(lambda line: np.convolve(line, kernel, mode="same"), axis, noise)
    return np.clip(np.rint(noise + rng.uniform(-20, 20, size=shape)), 0, 255).astype(np.uint8)


TRAINER = Path(__file__).resolve().parent.parent / "train_mae_fusion.py"
# A tiny chained run: 8 pairs at batch 4 (2 iterations per epoch), no workers; stage epochs come with --modes.
SMALL_RUN = ("--max_pairs", "8", "--batch_size", "4", "--num_workers", "0", "--log_every", "1")


def demo_data(tmp_path_factory) -> Path:
    """The infrared/visible demo dataset of seed 0, generated once per test session (shared with other tests)."""
    from common.ivif.demo import ensure_ivif_demo

    return ensure_ivif_demo(tmp_path_factory.getbasetemp() / "ivif_demo", 0)


def train_here(*args: str) -> tuple[int, str, str]:
    """Run the trainer's command line in this process with one torch thread (the numerics of the fresh processes
    of `run_trainer`); returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    import train_mae_fusion

    threads = torch.get_num_threads()
    stdout, stderr = io.StringIO(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = train_mae_fusion.cli(list(args))
    finally:
        torch.set_num_threads(threads)
    return code, stdout.getvalue(), stderr.getvalue()


def run_trainer(*args: str, nproc: int = 1, check: bool = True, timeout: int = 300):
    """Run `train_mae_fusion.py` in a fresh process (under torchrun for `nproc` > 1, gloo on the CPU)."""
    import subprocess
    import sys

    from tests.kit_helpers import ROOT, env

    if nproc == 1:
        command = [sys.executable, str(TRAINER)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(29300 + os.getpid() % 200), str(TRAINER)]
    result = subprocess.run([*command, *args], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"trainer failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result
