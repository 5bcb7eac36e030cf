"""FRED benchmarks: training throughput (rgb vs dual) and evaluation memory vs number of images.

    python bench/bench_fred.py                      # phi s, 640², batch 2, CPU (slow: minutes)
    python bench/bench_fred.py --phi n --size 128   # quick look

Throughput times the trainer's own step (autocast forward, YOLO loss, OptimStep, EMA update) on synthetic
batches after one warm-up step. Evaluation memory is the peak traced by ``tracemalloc`` (Python and NumPy
allocations; torch tensors are not traced) over the demo dataset's paired frames repeated to N images, with a
random phi-n model at 64² (about 100 kept detections per image, the worst case): once for the streaming pass
alone and once including the metric computation. Prints a markdown table and the machine it ran on.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.ema import ModelEMA  # noqa: E402
from common.run import AcceleratorSettings, environment_info, make_accelerator  # noqa: E402
from common.schedules import set_base_lrs  # noqa: E402
from common.step import OptimStep  # noqa: E402
from fred.config import DEMO  # noqa: E402
from fred.dataset import FredDataset, build_loader  # noqa: E402
from fred.demo_data import ensure_fred_demo  # noqa: E402
from fred.evaluate import stream_detections, summarize  # noqa: E402
from fred.index import load_fred_index  # noqa: E402
from fred.loss import YOLOLoss  # noqa: E402
from fred.model import build_model  # noqa: E402
from fred.targets import get_target  # noqa: E402
from fred.training import build_optimizer, training_losses  # noqa: E402


def synthetic_batch(batch: int, size: int, seed: int) -> dict:
    """Random images (both streams) and targets from two random boxes per image."""
    rng = np.random.default_rng(seed)
    targets = []
    for _ in range(batch):
        centres = rng.uniform(0.2 * size, 0.8 * size, (2, 2))
        sides = rng.uniform(0.03 * size, 0.12 * size, (2, 2))
        targets.append(get_target(np.concatenate([centres - sides / 2, centres + sides / 2, np.zeros((2, 1))], 1),
                                  (size, size), 1))
    return {"rgb": torch.from_numpy(rng.random((batch, 3, size, size), dtype=np.float32)),
            "event": torch.from_numpy(rng.random((batch, 3, size, size), dtype=np.float32)),
            "y_true": [torch.from_numpy(np.stack([t[level] for t in targets])) for level in range(3)]}


def training_throughput(accelerator, modality: str, phi: str, size: int, batch: int, steps: int) -> float:
    """Samples per second of the trainer's step for one modality (all parameters trainable)."""
    cfg = dataclasses.replace(DEMO, modality=modality, phi=phi, input_shape=(size, size), optimizer="sgd",
                              init_lr=1e-3, weight_decay=5e-4)
    model = build_model(modality, phi, 1)
    optimizer = build_optimizer(model, cfg)
    set_base_lrs(optimizer, cfg.init_lr)
    ema = ModelEMA(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    stepper = OptimStep(accelerator, optimizer, model)
    criterion = YOLOLoss(1, (size, size))
    data = synthetic_batch(batch, size, 0)
    elapsed = 0.0
    for step in range(steps + 1):
        started = time.perf_counter()
        with accelerator.accumulate(model):
            stepper(training_losses(model, data, cfg, criterion, accelerator, (None, None))["loss"])
        ema.update(accelerator.unwrap_model(model))
        if step:  # the first step warms up the allocator and kernels
            elapsed += time.perf_counter() - started
    return steps * batch / elapsed


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
    parser.add_argument("--phi", default="s", help="model size for the throughput runs")
    parser.add_argument("--size", type=int, default=640, help="input side for the throughput runs")
    parser.add_argument("--batch", type=int, default=2, help="batch of the throughput runs")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per modality")
    parser.add_argument("--images", type=int, nargs="+", default=[64, 128, 256], help="image counts for memory")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()), help="demo data cache folder")
    args = parser.parse_args()

    accelerator = make_accelerator(AcceleratorSettings(log_with_tensorboard=False))
    info = environment_info()
    print(f"Machine: {info['cpu']} ({info['cpu_count']} logical CPUs, torch threads {torch.get_num_threads()}), "
          f"GPUs {info['gpus'] or 'none'}, torch {info['torch']}, device {accelerator.device}\n")
    print(f"| modality | phi | input | batch | samples/s (train step) |\n|---|---|---|---|---|")
    for modality in ("rgb", "dual"):
        rate = training_throughput(accelerator, modality, args.phi, args.size, args.batch, args.steps)
        print(f"| {modality} | {args.phi} | {args.size}² | {args.batch} | {rate:.3f} |", flush=True)
    print("\n| images | streaming pass peak (MiB) | with metric computation (MiB) |\n|---|---|---|")
    for count, streaming, total in evaluation_memory(args.images, args.cache):
        print(f"| {count} | {streaming:.2f} | {total:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
