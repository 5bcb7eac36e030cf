"""CrossFuse training throughput at 256x256 on the CPU, and the trainer's overhead over a raw PyTorch loop.

For the fusion stage (frozen encoders) and end-to-end training, the trainer (`train_end_to_end.py`, in this process)
runs one epoch on generated 256x256 pairs. Its iteration time is the median interval between the starts of
consecutive training steps (data loading, step and bookkeeping included; medians resist a shared machine's
spikes); the epoch-end cost (loss dump, `.model` export, full checkpoint) is timed on its own. The floor is a plain
loop over the same dataset, batch order, network, Adam groups and loss, without Accelerate, logging or saving,
timed the same way. Prints a markdown table with the machine.

    OMP_NUM_THREADS=2 python bench/bench_crossfuse.py [--batch 2] [--iterations 6]
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.cli import parse  # noqa: E402
from common.data import GlobalBatchSampler  # noqa: E402
from common.ivif.data import IVIFPairDataset, discover_file_pairs  # noqa: E402
from common.run import environment_info, seed_everything  # noqa: E402
from crossfuse.losses import fusion_loss  # noqa: E402
from crossfuse.model import AutoEncoder, CrossFuseModel, FusionNet, parameter_groups  # noqa: E402
from crossfuse.weights import load_model_file, save_model_file  # noqa: E402

SIZE = 256


@dataclass(frozen=True)
class BenchConfig:
    """CrossFuse CPU training benchmark."""

    batch: int = 2
    """Global batch (one process)."""
    iterations: int = 6
    """Iterations per measurement (the first interval is dropped as warm-up)."""


def write_pairs(folder: Path, count: int) -> None:
    """`count` smooth random 256x256 IR/VIS pairs as 8-bit PNG in `folder/{ir,vi}`."""
    rng = np.random.default_rng(0)
    for name in ("ir", "vi"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        for name, sigma in (("ir", 6.0), ("vi", 1.5)):
            image = ndimage.gaussian_filter(rng.normal(128, 60, (SIZE, SIZE)), sigma) * 4 - 384
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / name / f"{index:04d}.png")


def median_interval(starts: list[float]) -> float:
    """Median time between consecutive step starts, without the first (warm-up) interval."""
    return float(np.median(np.diff(starts)[1:]))


def trainer_timing(kind: str, data: Path, work: Path, cfg: BenchConfig, encoders: Path) -> tuple[float, float]:
    """(seconds per iteration, seconds of the epoch-end save) of the trainer for one epoch of `cfg.iterations`."""
    import train_end_to_end
    from crossfuse.training import StageRun

    starts: list[float] = []
    saves: list[float] = []
    train_step, end_epoch = StageRun.train_step, StageRun.end_epoch

    def timed_step(run, batch):
        starts.append(time.perf_counter())
        return train_step(run, batch)

    def timed_end_epoch(run):
        started = time.perf_counter()
        end_epoch(run)
        saves.append(time.perf_counter() - started)

    argv = ["--data.root", str(data), "--height", str(SIZE), "--width", str(SIZE), "--batch", str(cfg.batch),
            "--train-num", str(cfg.iterations * cfg.batch), "--epochs", "1", "--step", str(cfg.iterations),
            "--checkpoint-every", "0", "--no-tensorboard", "--data.workers", "0", "--save-dir", str(work / kind)]
    if kind == "fusion":
        argv += ["--approach", "two-stage", "--stage", "fusion", "--init.ae-ir", str(encoders), "--init.ae-vi",
                 str(encoders)]
    StageRun.train_step, StageRun.end_epoch = timed_step, timed_end_epoch
    try:
        code = train_end_to_end.cli(argv)
    finally:
        StageRun.train_step, StageRun.end_epoch = train_step, end_epoch
    if code != 0:
        raise RuntimeError(f"trainer failed for {kind}")
    return median_interval(starts), saves[0]


def raw_seconds_per_step(kind: str, data: Path, cfg: BenchConfig, encoders: Path) -> float:
    """Seconds per iteration of a plain PyTorch loop over the same data, network, optimizer groups and loss."""
    pairs = discover_file_pairs(data)[: cfg.iterations * cfg.batch]
    dataset = IVIFPairDataset(pairs, size=(SIZE, SIZE))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=GlobalBatchSampler(len(pairs), cfg.batch, 0))
    seed_everything(0)
    ir_encoder, vi_encoder = AutoEncoder(), AutoEncoder()
    frozen = kind == "fusion"
    if frozen:
        load_model_file(ir_encoder, encoders)
        load_model_file(vi_encoder, encoders)
    model = CrossFuseModel(ir_encoder, vi_encoder, FusionNet(learnable_temperature=not frozen), freeze_encoders=frozen)
    model.train()
    optimizer = torch.optim.Adam(parameter_groups(model), lr=1e-3, weight_decay=0.9)
    starts = []
    for batch in loader:
        starts.append(time.perf_counter())
        output = model(batch["ir"], batch["vi"])
        loss = fusion_loss(output.fused, batch["ir"], batch["vi"]).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    starts.append(time.perf_counter())
    return median_interval(starts)


def main(cfg: BenchConfig) -> None:
    """Run both measurements for both kinds and print the table."""
    info = environment_info()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_crossfuse_") as temporary:
        work = Path(temporary)
        data = work / "pairs"
        write_pairs(data, cfg.iterations * cfg.batch)
        torch.manual_seed(0)
        encoders = save_model_file(AutoEncoder(), work / "auto_encoder_epoch_1_ir.model")
        for kind in ("fusion", "end-to-end"):
            per_step, save = trainer_timing(kind, data, work, cfg, encoders)
            raw = raw_seconds_per_step(kind, data, cfg, encoders)
            rows.append((kind, cfg.batch / per_step, cfg.batch / raw, per_step / raw - 1.0, save))
    print(f"\nCrossFuse training at {SIZE}x{SIZE}, batch {cfg.batch}, CPU: {info['cpu']} ({info['cpu_count']} cores, "
          f"{torch.get_num_threads()} torch threads), torch {info['torch']}, {time.strftime('%Y-%m-%d')}\n")
    print("| run | trainer samples/s | raw loop samples/s | trainer overhead per iteration | epoch-end save (s) |")
    print("|---|---:|---:|---:|---:|")
    for kind, trainer, raw, overhead, fixed in rows:
        print(f"| {kind} | {trainer:.3f} | {raw:.3f} | {overhead:+.1%} | {fixed:.2f} |")


if __name__ == "__main__":
    main(parse(BenchConfig))
