"""The kit's training loop against a raw PyTorch loop: same model, data, optimizer and steps.

Checks that the final weights are bitwise equal (CPU, fp32) and measures the median step time of each loop;
the ratio is the kit's overhead (target: at most 2 %). Writes a row to BENCHMARKS.md with ``--write``.

    python bench/parity.py [--steps 80] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.data import GlobalBatchSampler, epoch_permutation, to_device  # noqa: E402
from common.lossdump import LossSeries  # noqa: E402
from common.preempt import Preemption  # noqa: E402
from common.run import AcceleratorSettings, environment_info, make_accelerator  # noqa: E402
from common.schedules import Schedule, apply_schedule, set_base_lrs  # noqa: E402
from common.step import OptimStep  # noqa: E402

SAMPLES, BATCH, SEED = 512, 16, 0


def build_model() -> nn.Module:
    """A small conv net (a few ms per step on a CPU core)."""
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def build_data() -> torch.utils.data.TensorDataset:
    """Fixed random images and labels."""
    generator = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(SAMPLES, 3, 48, 48, generator=generator),
                                          torch.randint(0, 10, (SAMPLES,), generator=generator))


def raw_loop(steps: int) -> tuple[nn.Module, list[float]]:
    """Plain PyTorch: forward, backward, step, zero_grad."""
    data = build_data()
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches_per_epoch = SAMPLES // BATCH
    times = []
    for step in range(steps):
        epoch, index = divmod(step, batches_per_epoch)
        order = epoch_permutation(SAMPLES, SEED, epoch)[index * BATCH:(index + 1) * BATCH]
        x, y = data[torch.from_numpy(order)]
        started = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return model, times


def kit_loop(steps: int) -> tuple[nn.Module, list[float]]:
    """The same training through the kit: Accelerator, sampler, OptimStep, schedule, loss series, preemption."""
    accelerator = make_accelerator(AcceleratorSettings(log_with_tensorboard=False))
    data = build_data()
    sampler = GlobalBatchSampler(SAMPLES, BATCH, SEED, accelerator.process_index, accelerator.num_processes)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=0)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    set_base_lrs(optimizer, 1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    stepper = OptimStep(accelerator, optimizer, model)
    series = LossSeries(["loss"])
    schedule = Schedule("constant")
    preemption = Preemption(accelerator)
    times, step, epoch = [], 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            if step == steps:
                break
            x, y = to_device((x, y), accelerator.device)
            started = time.perf_counter()
            apply_schedule(optimizer, schedule, step)
            with accelerator.accumulate(model):
                loss = nn.functional.cross_entropy(model(x), y)
                stepper(loss)
            series.append({"loss": loss.detach()})
            preemption.should_stop(step)
            times.append(time.perf_counter() - started)
            step += 1
        epoch += 1
    preemption.restore()
    return accelerator.unwrap_model(model), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="append the result to BENCHMARKS.md")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    raw_loop(10)  # warm-up: first-touch allocations and kernel selection, not counted
    kit_loop(10)
    raw_times, kit_times = [], []
    for repeat in range(args.repeats):  # interleaved in alternating order, so load and drift affect both alike
        order = (raw_loop, kit_loop) if repeat % 2 == 0 else (kit_loop, raw_loop)
        for loop in order:
            model, times = loop(args.steps)
            if loop is raw_loop:
                raw_model, raw_times = model, raw_times + times[5:]
            else:
                kit_model, kit_times = model, kit_times + times[5:]
    equal = all(torch.equal(a, b) for a, b in zip(raw_model.state_dict().values(), kit_model.state_dict().values()))
    raw_median, kit_median = statistics.median(raw_times), statistics.median(kit_times)
    ratio = kit_median / raw_median
    info = environment_info()
    machine = f"{info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}, threads {torch.get_num_threads()}"
    row = (f"| parity (kit vs raw loop, CPU fp32, {args.steps} steps x {args.repeats}) | {raw_median * 1e3:.2f} ms "
           f"| {kit_median * 1e3:.2f} ms | {(ratio - 1) * 100:+.1f} % | {'yes' if equal else 'NO'} | {machine} |")
    print(f"bitwise-equal final weights: {equal}")
    print(f"median step: raw {raw_median * 1e3:.3f} ms, kit {kit_median * 1e3:.3f} ms, overhead {(ratio - 1) * 100:+.2f} %")
    print(row)
    if args.write:
        with open(ROOT / "BENCHMARKS.md", "a", encoding="utf-8") as handle:
            handle.write(row + "\n")
    if not equal:
        sys.exit(1)


if __name__ == "__main__":
    main()
