"""CrossFuse training: the trainer's overhead over a raw PyTorch loop, on the CPU.

For the fusion stage (frozen encoders) and end-to-end training, `train_end_to_end.py` runs in this process for one
epoch on generated pairs, and a raw loop runs the same pairs in the same order through the same network, Adam
groups, learning rates and loss, without Accelerate, the kit's step, loss series, schedules, logging or saving.
Both are timed per iteration (interval between step starts; bench/timing.py) in interleaved repeats; the final
fusion weights of the two must be bitwise equal (CPU, fp32). Prints a markdown table with the machine.

    OMP_NUM_THREADS=1 python bench/bench_crossfuse.py [--size 256] [--batch 2] [--iterations 8] [--repeats 4]
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

import train_end_to_end  # noqa: E402
from bench.timing import interleaved, intervals, machine, overhead, states_equal, trainer_run  # noqa: E402
from common.cli import parse  # noqa: E402
from common.data import GlobalBatchSampler  # noqa: E402
from common.ivif.data import IVIFPairDataset, load_pairs, select_pairs  # noqa: E402
from common.run import seed_everything  # noqa: E402
from common.schedules import set_base_lrs  # noqa: E402
from crossfuse import stages  # noqa: E402
from crossfuse.config import load_config  # noqa: E402
from crossfuse.model import AutoEncoder  # noqa: E402
from crossfuse.weights import read_state_dict, save_model_file  # noqa: E402


@dataclass(frozen=True)
class BenchConfig:
    """CrossFuse CPU training benchmark: trainer against a raw loop."""

    size: int = 256
    """Training image side (the paper's 256)."""
    batch: int = 2
    """Global batch (one process)."""
    iterations: int = 8
    """Iterations per run (the first interval is dropped as warm-up)."""
    repeats: int = 4
    """Interleaved repeats of each loop."""


def write_pairs(folder: Path, count: int, size: int) -> None:
    """`count` smooth random IR/VIS pairs as 8-bit PNG in `folder/{ir,vi}`."""
    rng = np.random.default_rng(0)
    for name in ("ir", "vi"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        for name, sigma in (("ir", 6.0), ("vi", 1.5)):
            image = ndimage.gaussian_filter(rng.normal(128, 60, (size, size)), sigma) * 4 - 384
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / name / f"{index:04d}.png")


def trainer_argv(kind: str, data: Path, save_dir: Path, cfg: BenchConfig, encoders: Path) -> list[str]:
    """The command line of one epoch of `cfg.iterations` iterations."""
    argv = ["--data.root", str(data), "--height", str(cfg.size), "--width", str(cfg.size), "--batch", str(cfg.batch),
            "--train-num", str(cfg.iterations * cfg.batch), "--epochs", "1", "--step", str(cfg.iterations),
            "--no-tensorboard", "--data.workers", "0", "--save-dir", str(save_dir), "--resume", "never"]
    if kind == "fusion":
        argv += ["--approach", "two-stage", "--stage", "fusion", "--init.ae-ir", str(encoders), "--init.ae-vi",
                 str(encoders)]
    return argv


def raw_run(argv: list[str], final: dict) -> list[float]:
    """The same epoch as a raw PyTorch loop over the task's own pieces; its fusion weights go to ``final``."""
    cfg, _ = load_config(argv)
    kind = stages.stage_plan(cfg)[-1]
    layout, settings = stages.LAYOUTS[kind], stages.stage_settings(cfg, kind)
    pairs = select_pairs(load_pairs(cfg.data.root, cfg.data.layout), settings.train_num, cfg.data.selection)
    dataset = IVIFPairDataset(pairs, size=(cfg.height, cfg.width), seed=cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=GlobalBatchSampler(len(pairs), settings.batch, cfg.seed))
    seed_everything(cfg.seed)
    model = stages.build_model(cfg, kind, stages.encoder_files(cfg, kind), lambda message: None)
    model.train()
    groups = stages.optimizer_groups(model, kind)
    optimizer = torch.optim.Adam(groups, lr=settings.lr, betas=stages.ADAM_BETAS, eps=stages.ADAM_EPS,
                                 weight_decay=settings.weight_decay, fused=True)
    mults = [settings.lr_mults[group["name"]] for group in groups]
    set_base_lrs(optimizer, [settings.lr * m for m in mults], [cfg.min_lr * m for m in mults])
    schedule = stages.make_schedule(settings.schedule, cfg.lr_schedule_unit, settings.epochs, len(loader))
    for group in optimizer.param_groups:
        group["lr"] = schedule(0, group["base_lr"], group["min_lr"])
    starts = []
    for batch in loader:
        starts.append(time.perf_counter())
        loss, _ = stages.losses(layout, model, batch, cfg.loss.w_ssim)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    starts.append(time.perf_counter())
    final.update({k: v.detach().clone() for k, v in model.fusion.state_dict().items()})
    return intervals(starts)


def main(cfg: BenchConfig) -> None:
    """Both kinds: interleaved trainer and raw runs, the bitwise check and the table."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_crossfuse_") as temporary:
        work = Path(temporary)
        data = work / "pairs"
        write_pairs(data, cfg.iterations * cfg.batch, cfg.size)
        torch.manual_seed(0)
        encoders = save_model_file(AutoEncoder(), work / "auto_encoder_epoch_1_ir.model")
        for kind in ("fusion", "end-to-end"):
            raw_final: dict = {}
            argvs = [trainer_argv(kind, data, work / f"{kind}-{repeat}", cfg, encoders) for repeat in range(cfg.repeats)]
            trainer_times, raw_times = interleaved(lambda r: trainer_run(train_end_to_end.cli, argvs[r]),
                                                   lambda r: raw_run(argvs[r], raw_final), cfg.repeats)
            folder = stages.run_folder(load_config(argvs[-1])[0], kind)
            name = "end_to_end_fusion_epoch_1.model" if kind == "end-to-end" else "fusetrans_epoch_1.model"
            equal = states_equal(read_state_dict(folder / name), raw_final)
            rows.append((kind, *overhead(trainer_times, raw_times), equal, len(trainer_times)))
    print(f"\nCrossFuse training at {cfg.size}x{cfg.size}, batch {cfg.batch}, CPU: {machine()}\n")
    print("| run | trainer s/iteration | raw loop s/iteration | overhead (median) | final weights bitwise equal | "
          "iterations timed per loop |")
    print("|---|---:|---:|---:|---|---:|")
    for kind, trainer, raw, extra, equal, count in rows:
        print(f"| {kind} | {trainer:.3f} | {raw:.3f} | {extra:+.1%} | {'yes' if equal else 'NO'} | {count} |")


if __name__ == "__main__":
    main(parse(BenchConfig))
