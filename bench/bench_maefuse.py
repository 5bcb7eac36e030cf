"""MaeFuse training step time on the CPU: the trainer against a raw PyTorch loop of the same model, data and optimizer.

For each size (`tiny`, `small`) the trainer (`train_mae_fusion.py`, in this process, mode `train_decoder_CFM_MFM`,
fp32) and a plain loop over the same pairs, batch order (the kit's seeded global-batch sampler), network, AdamW
groups and loss run the same iterations; their iteration time is the median interval between the starts of
consecutive steps (data loading, forward, backward, step and bookkeeping included), in CPU time of this process
(`time.process_time`: on a shared machine, other jobs stretch wall-clock intervals by a factor of 1 to 10 from one
run to the next) and in wall-clock time. Runs alternate (trainer, raw, raw, trainer, ...). A forward
hook on the encoder's patch embedding checks that every training step encodes the 2B images of its batch exactly
once, with gradients disabled (spec §9 check 5). Prints a markdown row per size with the machine.

    OMP_NUM_THREADS=1 python bench/bench_maefuse.py [--repeats 5]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from timm.layers import PatchEmbed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train_mae_fusion  # noqa: E402
from common.cli import parse  # noqa: E402
from common.data import GlobalBatchSampler  # noqa: E402
from common.freeze import apply_policy, set_train_mode  # noqa: E402
from common.run import environment_info, seed_everything  # noqa: E402
from common.step import OptimStep  # noqa: E402
from maefuse.data import PairDataset, discover_pairs  # noqa: E402
from maefuse.model import build_model, resolve_size  # noqa: E402
from maefuse.modes import build_optimizer, get_mode, mode_loss  # noqa: E402

MODE = "train_decoder_CFM_MFM"


@dataclass(frozen=True)
class BenchConfig:
    """MaeFuse CPU step-time benchmark."""

    repeats: int = 3
    """Measurements per loop and size (alternating order)."""
    tiny_batch: int = 4
    """Global batch of the tiny runs (the demo's)."""
    small_batch: int = 2
    """Global batch of the small runs."""
    iterations: int = 10
    """Iterations per measurement (the first interval is dropped as warm-up)."""


def write_pairs(folder: Path, count: int, side: int = 64) -> None:
    """`count` smooth random IR/VIS pairs as 8-bit PNG in `folder/{ir,vi}`."""
    rng = np.random.default_rng(0)
    for name in ("ir", "vi"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        for name, sigma in (("ir", 4.0), ("vi", 1.0)):
            image = ndimage.gaussian_filter(rng.normal(128, 60, (side, side)), sigma) * 4 - 384
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / name / f"{index:04d}.png")


class EncoderCalls:
    """Records each encoder pass (images, whether gradients were enabled) and each optimizer step of one run, in
    order (a global forward hook on timm's `PatchEmbed`, the encoder's first module)."""

    def __init__(self):
        self.events: list[tuple[str, int, bool]] = []
        self.handle = torch.nn.modules.module.register_module_forward_hook(self.hook)

    def reset(self) -> None:
        self.events = []

    def hook(self, module, inputs, output) -> None:
        if isinstance(module, PatchEmbed):
            self.events.append(("encode", inputs[0].shape[0], torch.is_grad_enabled()))

    def step(self) -> None:
        self.events.append(("step", 0, False))

    def per_step(self) -> list[list[tuple[int, bool]]]:
        """The encoder passes that preceded each optimizer step (later ones, the epoch-end samples, are not
        training steps)."""
        passes, current = [], []
        for kind, images, grad in self.events:
            if kind == "step":
                passes.append(current)
                current = []
            else:
                current.append((images, grad))
        return passes

    def close(self) -> None:
        self.handle.remove()


def clocks() -> tuple[float, float]:
    """(CPU seconds of this process, wall-clock seconds)."""
    return time.process_time(), time.perf_counter()


def median_interval(starts: list[tuple[float, float]]) -> tuple[float, float]:
    """Median (CPU, wall) time between consecutive step starts, without the first (warm-up) interval."""
    intervals = np.diff(np.asarray(starts), axis=0)[1:]
    return float(np.median(intervals[:, 0])), float(np.median(intervals[:, 1]))


def trainer_seconds(size: str, batch: int, iterations: int, data: Path, work: Path,
                    calls: EncoderCalls) -> tuple[float, float]:
    """(CPU, wall) seconds per iteration of `train_mae_fusion.py` (one epoch of `iterations` steps)."""
    starts: list[tuple[float, float]] = []
    original = OptimStep.__call__

    def timed(stepper, loss):
        starts.append(clocks())
        calls.step()
        return original(stepper, loss)

    argv = ["--data_path", str(data), "--model_size", size, "--training_mode", MODE, "--allow_random_decoder",
            "--epochs", "1", "--batch_size", str(batch), "--max_pairs", str(batch * iterations), "--num_workers", "0",
            "--no_tensorboard", "--log_every", "20", "--output_dir", str(work / f"{size}_{time.monotonic_ns()}")]
    OptimStep.__call__ = timed
    try:
        code = train_mae_fusion.cli(argv)
    finally:
        OptimStep.__call__ = original
    if code != 0:
        raise RuntimeError(f"trainer failed for {size}")
    return median_interval(starts)


def raw_seconds(size: str, batch: int, iterations: int, data: Path) -> tuple[float, float]:
    """(CPU, wall) seconds per iteration of a plain loop: same pairs and order, network, AdamW groups and loss."""
    spec = get_mode(MODE)
    pairs = discover_pairs(data, max_pairs=batch * iterations)
    dataset = PairDataset(pairs, resolve_size(size).img_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=GlobalBatchSampler(len(pairs), batch, 0,
                                                                                 drop_last=False))
    seed_everything(0)
    model = build_model(size)
    apply_policy(model, spec.policy())
    set_train_mode(model, spec.policy())
    optimizer = build_optimizer(model, lr=1e-4, fused=True)
    starts = []
    for batch_data in loader:
        starts.append(clocks())
        loss = mode_loss(model, spec, batch_data["vi"], batch_data["ir"])["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return median_interval(starts)


def main(cfg: BenchConfig) -> None:
    """Measure both loops for both sizes and print the table rows."""
    info = environment_info()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_maefuse_") as temporary:
        work = Path(temporary)
        data = work / "pairs"
        write_pairs(data, max(cfg.tiny_batch, cfg.small_batch) * cfg.iterations)
        for size, batch in (("tiny", cfg.tiny_batch), ("small", cfg.small_batch)):
            calls = EncoderCalls()
            trainer_times, raw_times, passes = [], [], []
            for repeat in range(cfg.repeats):
                order = ("trainer", "raw") if repeat % 2 == 0 else ("raw", "trainer")
                for loop in order:
                    if loop == "trainer":
                        calls.reset()
                        trainer_times.append(trainer_seconds(size, batch, cfg.iterations, data, work, calls))
                        passes += calls.per_step()
                    else:
                        raw_times.append(raw_seconds(size, batch, cfg.iterations, data))
            calls.close()
            once = all(step == [(2 * batch, False)] for step in passes)
            trainer = [statistics.median(t[i] for t in trainer_times) for i in (0, 1)]
            raw = [statistics.median(t[i] for t in raw_times) for i in (0, 1)]
            rows.append((size, batch, trainer, raw, len(passes), once))
            print(f"{size}: CPU s/iteration trainer {[f'{t[0]:.3f}' for t in trainer_times]}, raw "
                  f"{[f'{t[0]:.3f}' for t in raw_times]}; wall trainer {[f'{t[1]:.3f}' for t in trainer_times]}, "
                  f"raw {[f'{t[1]:.3f}' for t in raw_times]}; {len(passes)} steps, encoder once per step on 2B "
                  f"images without grad: {once}", flush=True)
    machine = (f"{info['cpu']}, {info['cpu_count']} cores, {torch.get_num_threads()} torch threads, torch "
               f"{info['torch']}, {time.strftime('%Y-%m-%d')}")
    print(f"\nMaeFuse {MODE} step time, CPU fp32, {cfg.iterations} iterations x {cfg.repeats} alternating repeats: "
          f"{machine}\n")
    print("| size | batch | trainer CPU s/it | raw CPU s/it | overhead (CPU) | trainer wall s/it | raw wall s/it | "
          "overhead (wall) | encoder once per step, 2B, no grad |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for size, batch, trainer, raw, steps, once in rows:
        print(f"| {size} | {batch} | {trainer[0]:.3f} | {raw[0]:.3f} | {(trainer[0] / raw[0] - 1) * 100:+.1f} % | "
              f"{trainer[1]:.3f} | {raw[1]:.3f} | {(trainer[1] / raw[1] - 1) * 100:+.1f} % | "
              f"{'yes' if once else 'NO'} ({steps} steps) |")


if __name__ == "__main__":
    main(parse(BenchConfig))
