"""FRED benchmarks: the trainer's overhead over a raw PyTorch loop, and evaluation memory vs number of images.

Overhead: `train_fred_fusion.py` runs in this process for one unfrozen epoch of the demo dataset, and a raw loop
runs the same samples in the same order (the same augmentation draws) through the same model, fused optimizer,
learning rate, YOLO loss and EMA update, without Accelerate, the kit's step, loss series, train state, logging or
saving. Both are timed per iteration (interval between step starts; bench/timing.py) in interleaved repeats, and
the final weights of the two must be bitwise equal (CPU, fp32).

Evaluation memory is the peak traced by ``tracemalloc`` (Python and NumPy allocations; torch tensors are not
traced) over the demo dataset's paired frames repeated to N images, with a random phi-n model at 64² (about 100
kept detections per image, the worst case): once for the streaming pass alone and once including the metric
computation. Prints markdown tables and the machine.

    OMP_NUM_THREADS=1 python bench/bench_fred.py [--modality dual] [--phi n] [--size 128] [--repeats 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train_fred_fusion  # noqa: E402
from bench.timing import interleaved, intervals, machine, overhead, states_equal, trainer_run  # noqa: E402
from common.data import set_loader_epoch, to_device  # noqa: E402
from common.ema import ModelEMA  # noqa: E402
from common.run import seed_everything  # noqa: E402
from common.schedules import apply_schedule, set_base_lrs  # noqa: E402
from fred import recipe  # noqa: E402
from fred.config import resolve_config  # noqa: E402
from fred.dataset import FredDataset, build_loader, load_data, train_loader  # noqa: E402
from fred.demo_data import ensure_fred_demo  # noqa: E402
from fred.evaluate import stream_detections, summarize  # noqa: E402
from fred.index import CLASS_NAMES, load_fred_index  # noqa: E402
from fred.loss import YOLOLoss  # noqa: E402
from fred.model import build_model  # noqa: E402
from fred.outputs import LAST_STATE  # noqa: E402


def trainer_argv(args, cache: Path, save_dir: Path) -> list[str]:
    """One unfrozen epoch of the demo preset at the benchmark's size, without mAP evaluation."""
    return ["--demo-root", str(cache / "fred_demo_bench_train"), "--annotation-dir", str(cache / "fred_bench_ann"),
            "--modality", args.modality, "--phi", args.phi, "--input-shape", str(args.size), str(args.size),
            "--skip-freeze", "--epochs", "1", "--unfreeze-batch-size", str(args.batch), "--no-eval-map",
            "--save-dir", str(save_dir), "--resume", "never", "--log-interval", "1000"]


def raw_run(argv: list[str], final: dict) -> list[float]:
    """The same epoch as a raw PyTorch loop over the task's own pieces; its final weights go to ``final``."""
    cfg, _ = resolve_config(argv)
    data = load_data(cfg, lambda message: None)
    seed_everything(cfg.seed)
    model = build_model(cfg.modality, cfg.phi, len(CLASS_NAMES),
                        fusion_mode=cfg.fusion_mode if cfg.modality == "dual" else None,
                        compression_ratio=cfg.compression_ratio if cfg.modality == "dual" else None)
    optimizer = recipe.build_optimizer(model, cfg)
    ema = ModelEMA(model)
    loader = train_loader(data, cfg, "unfreeze", 0, 1)
    set_base_lrs(optimizer, *recipe.fitted_lrs(cfg, cfg.unfreeze_batch_size))
    apply_schedule(optimizer, recipe.lr_schedule(cfg.epochs), 0)
    set_loader_epoch(loader, 0)
    criterion = YOLOLoss(len(CLASS_NAMES), cfg.input_shape)
    model.train()
    accelerator = _NoAccelerator()
    starts = []
    for batch in loader:
        starts.append(time.perf_counter())
        drops = recipe.drop_flags(batch, cfg, 0, 0, 0)
        terms = recipe.training_losses(model, to_device(batch, torch.device("cpu")), cfg, criterion, accelerator,
                                       drops)
        terms["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)
    starts.append(time.perf_counter())
    final.update({k: v.detach().clone() for k, v in model.state_dict().items()})
    return intervals(starts)


class _NoAccelerator:
    """What ``recipe.training_losses`` asks of an accelerator, for a plain loop: the device and a no-op autocast."""

    device = torch.device("cpu")

    @staticmethod
    def autocast():
        return torch.autocast("cpu", enabled=False)


def evaluation_memory(counts: list[int], cache: Path) -> list[tuple[int, float, float]]:
    """(images, streaming peak MiB, peak MiB including compute) per image count."""
    root = ensure_fred_demo(cache / "fred_demo_bench", seed=0, frames=20)
    index = load_fred_index(root, 0.1, cache / "fred_demo_bench_annotations", notify=lambda message: None)
    pool = [e for split in ("train", "val", "test") for e in index.splits[split] if e.paired]
    rows = []
    for count in counts:
        entries = [dataclasses.replace(pool[k % len(pool)], image_id=100_000 + k) for k in range(count)]
        torch.manual_seed(0)
        model = build_model("rgb", "n", 1).eval()
        loader = build_loader(FredDataset(entries, "rgb", (64, 64), train=False), 32, train=False)
        with tempfile.TemporaryDirectory() as out:
            tracemalloc.start()
            evaluators, detections = stream_detections(model, loader, "rgb", (64, 64), Path(out), "bench",
                                                       torch.device("cpu"))
            streaming = tracemalloc.get_traced_memory()[1]
            summarize(evaluators, "bench", detections)
            total = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        rows.append((count, streaming / 2**20, total / 2**20))
    return rows


def main() -> int:
    """Run both measurements and print the markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", default="dual", choices=("rgb", "event", "dual"))
    parser.add_argument("--phi", default="n", help="model size of the overhead runs")
    parser.add_argument("--size", type=int, default=128, help="input side of the overhead runs")
    parser.add_argument("--batch", type=int, default=16, help="batch of the overhead runs")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved repeats of each loop")
    parser.add_argument("--images", type=int, nargs="+", default=[64, 128, 256], help="image counts for memory")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()), help="demo data cache folder")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_fred_") as temporary:
        argvs = [trainer_argv(args, args.cache, Path(temporary) / f"run{r}") for r in range(args.repeats)]
        raw_final: dict = {}
        trainer_times, raw_times = interleaved(lambda r: trainer_run(train_fred_fusion.cli, argvs[r]),
                                               lambda r: raw_run(argvs[r], raw_final), args.repeats)
        trained = torch.load(Path(argvs[-1][argvs[-1].index("--save-dir") + 1]) / LAST_STATE, weights_only=True)
        equal = states_equal(trained["model"], raw_final)
    trainer, raw, extra = overhead(trainer_times, raw_times)
    print(f"\nFRED training ({args.modality}, phi {args.phi}, {args.size}², batch {args.batch}), CPU: {machine()}\n")
    print("| run | trainer s/iteration | raw loop s/iteration | overhead (median) | final weights bitwise equal | "
          "iterations timed per loop |\n|---|---:|---:|---:|---|---:|")
    print(f"| {args.modality} unfreeze epoch | {trainer:.3f} | {raw:.3f} | {extra:+.1%} | {'yes' if equal else 'NO'} "
          f"| {len(trainer_times)} |")
    print("\n| images | streaming pass peak (MiB) | with metric computation (MiB) |\n|---|---|---|")
    for count, streaming, total in evaluation_memory(args.images, args.cache):
        print(f"| {count} | {streaming:.2f} | {total:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
