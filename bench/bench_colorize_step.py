"""Demo-size colorization step time on CPU (spec/colorize.md §4: S = 64, T = 4, batch 4, demo widths).

Times forward + FusionLoss + backward + AdamW step on real demo batches (data loading excluded), and the main
parts separately. ``python bench/bench_colorize_step.py [--steps 20] [--threads 1]``. The demo preset needs about
180 steps in 150 s; on a shared 2-core machine set OMP_WAIT_POLICY=PASSIVE when using 2 threads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from colorize.config import DataConfig, ExemplarConfig, FlowConfig, FusionConfig, LossConfig  # noqa: E402
from colorize.data import ClipDataset, find_sequences  # noqa: E402
from colorize.demo_data import ensure_demo_dataset  # noqa: E402
from colorize.loss import FusionLoss  # noqa: E402
from colorize.system import FusionSystem  # noqa: E402

DEMO_EXEMPLAR = ExemplarConfig(backbone_embed_dim=32, backbone_depths=(1, 1, 1, 1), backbone_heads=(1, 2, 4, 8),
                               warpnet_width=0.125)


def main() -> None:
    """Build the demo system, time ``--steps`` training steps and report the median and the parts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "colorize_demo_bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = ensure_demo_dataset(args.data, seed=0)
    data = DataConfig(dataset=(root,), imagenet=root / "references", image_size=64, workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        system = FusionSystem(FlowConfig(), DEMO_EXEMPLAR, fusion=FusionConfig(width=16), image_size=64)
    criterion = FusionLoss(LossConfig(), system.embed_net)
    groups = system.get_parameter_groups(1e-3, 1e-3)
    optimizer = torch.optim.AdamW([{"params": g["params"], "lr": g["lr"]} for g in groups], weight_decay=1e-4)
    loader = DataLoader(ClipDataset(find_sequences(data.dataset, "train", 4)[0], data), batch_size=4, shuffle=True)
    system.train()
    parts = {"forward": [], "loss": [], "backward+step": []}
    batches = iter(loader)
    for _ in range(args.steps + 1):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        start = time.perf_counter()
        outputs, flow_outputs, confs, aux = system(batch["frames_lab"], batch["reference_lab"], return_aux=True)
        forward = time.perf_counter()
        total, _ = criterion(outputs, batch["frames_lab"], flow_outputs, confs, aux=aux,
                             reference_lab=batch["reference_lab"])
        loss = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        end = time.perf_counter()
        for name, value in zip(parts, (forward - start, loss - forward, end - loss)):
            parts[name].append(value)
    steps = np.sum([values[1:] for values in parts.values()], axis=0)  # the first step warms up
    print(f"threads {args.threads}: step median {np.median(steps):.3f} s (mean {np.mean(steps):.3f}), "
          + ", ".join(f"{name} {np.median(values[1:]):.3f} s" for name, values in parts.items())
          + f"; 180 steps ~ {180 * np.median(steps):.0f} s")


if __name__ == "__main__":
    main()
