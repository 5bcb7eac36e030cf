"""Time every fusion metric (common/fusion_metrics.py) on one 640x512 IR/VIS/fused triple.

Prints a markdown table: per-metric seconds (best of --repeats), the whole set in one ``evaluate_triplet``
call, and the machine (CPU model, usable cores, numpy/scipy/torch versions). Single-core time:

    taskset -c 0 python bench/bench_fusion_metrics.py --threads 1
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy
import tyro
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.fusion_metrics import METRIC_COLUMNS, evaluate_triplet  # noqa: E402


@dataclass(frozen=True)
class BenchArgs:
    """Fusion metric timings on one triple."""

    height: int = 512
    """Image height."""
    width: int = 640
    """Image width."""
    repeats: int = 3
    """Runs per measurement; the best is reported."""
    threads: int = 0
    """Threads for FMI (0: every usable core)."""


def synthetic_triple(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded 8-bit IR (smooth blobs), VIS (texture and edges) and their rounded average as the fused image."""
    rng = np.random.default_rng(0)
    infrared = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (height, width)), 12.0)
    infrared = 255.0 * (infrared - infrared.min()) / (infrared.max() - infrared.min())
    rows, columns = np.mgrid[0:height, 0:width]
    visible = 128.0 + 60.0 * np.sin(columns / 3.0) * (rows % 64 < 32) + 20.0 * rng.normal(0.0, 1.0, (height, width))
    infrared = np.clip(np.rint(infrared + 2.0 * rng.normal(0.0, 1.0, (height, width))), 0, 255)
    visible = np.clip(np.rint(visible), 0, 255)
    return np.rint((infrared + visible) / 2.0), infrared, visible


def best_time(function, repeats: int) -> tuple[float, float]:
    """Best wall-clock seconds and best CPU seconds (this process, all threads) of ``repeats`` calls.

    On a machine shared with other jobs the CPU time is the better estimate of the unloaded single-thread time.
    """
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        function()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu)


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(args: BenchArgs) -> None:
    """Measure and print the table."""
    usable_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or usable_cores
    fused, infrared, visible = synthetic_triple(args.height, args.width)
    evaluate_triplet(fused, infrared, visible, metrics=["SSIM"])  # warm-up (imports, caches)
    per_metric = {name: best_time(lambda name=name: evaluate_triplet(fused, infrared, visible, metrics=[name],
                                                                      threads=threads), args.repeats)[0]
                  for name in METRIC_COLUMNS}
    total, total_cpu = best_time(lambda: evaluate_triplet(fused, infrared, visible, threads=threads), args.repeats)
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    machine = (f"{cpu_model()}, {usable_cores} of {os.cpu_count()} cores, {threads} FMI thread(s), "
               f"numpy {np.__version__}, scipy {scipy.__version__}, torch {torch_version}, "
               f"load average {os.getloadavg()[0]:.1f}")
    print(f"Fusion metrics on one {args.width}x{args.height} triple, wall-clock seconds (best of {args.repeats})\n")
    print("| machine | " + " | ".join(METRIC_COLUMNS) + " | all (one call) | all, CPU seconds |")
    print("|---|" + "---:|" * (len(METRIC_COLUMNS) + 2))
    print(f"| {machine} | " + " | ".join(f"{per_metric[name]:.3f}" for name in METRIC_COLUMNS)
          + f" | {total:.3f} | {total_cpu:.3f} |")


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
