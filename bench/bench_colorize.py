"""Colorization benchmark: the trainer's step time against a raw PyTorch loop of the same system and data (CPU, demo
size), the parts of a raw step, and which frozen modules build an autograd graph.

Overhead: `train_colorize.py` runs in this process for one epoch of the demo preset (18 steps of 4 clips at 64², T =
4), and a raw loop runs the same clips in the same order through the same FusionSystem, FusionLoss, fused AdamW,
learning rates and gradient clipping, without Accelerate, the kit's step, loss series, window means, train state,
budget, preemption or logging. Both are timed per iteration (interval between step starts; bench/timing.py) in
interleaved repeats, and the final trainable weights of the two must be bitwise equal (CPU, fp32).

Graphs: during one raw step, every call of a frozen module (embed_net, colornet, the flow backend) is recorded with
whether its output carries an autograd graph; after the backward, no frozen parameter may hold a gradient.

    OMP_NUM_THREADS=1 python bench/bench_colorize.py [--repeats 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train_colorize  # noqa: E402
from bench.timing import interleaved, intervals, machine, overhead, states_equal, trainer_run  # noqa: E402
from colorize import recipe  # noqa: E402
from colorize.config import resolve_config  # noqa: E402
from colorize.data import ClipDataset, find_sequences  # noqa: E402
from colorize.demo_data import ensure_demo_dataset  # noqa: E402
from colorize.loss import FusionLoss  # noqa: E402
from colorize.system import FusionSystem  # noqa: E402
from common.data import GlobalBatchSampler, set_loader_epoch  # noqa: E402
from common.run import seed_everything  # noqa: E402
from common.schedules import apply_schedule  # noqa: E402


def trainer_argv(cache: Path, out: Path) -> list[str]:
    """One epoch of the demo preset, without time budget, TensorBoard or log lines inside the epoch."""
    return ["--data.demo-root", str(cache / "colorize_demo_bench"), "--train.output-dir", str(out),
            "--train.epochs", "1", "--train.time-budget-s", "0", "--train.log-every", "1000", "--train.no-tensorboard",
            "--resume", "never"]


def build(argv: list[str]):
    """The trainer's pieces for ``argv``, built as the trainer builds them (same seed, same order)."""
    cfg, _ = resolve_config(argv)
    torch.set_flush_denormal(True)  # as the trainer does on the CPU
    sequences, _ = find_sequences(cfg.data.dataset, cfg.data.split, cfg.data.sequence_length)
    dataset = ClipDataset(sequences, cfg.data, train=True, seed=cfg.train.seed)
    seed_everything(cfg.train.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        system = FusionSystem(cfg.flow, cfg.exemplar, fusion=cfg.fusion, image_size=cfg.data.image_size)
    optimizer = recipe.build_optimizer(system, cfg)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=GlobalBatchSampler(len(dataset), cfg.train.batch_size,
                                                                                   cfg.train.seed),
                                         generator=torch.Generator().manual_seed(cfg.train.seed))
    return cfg, system, optimizer, FusionLoss(cfg.loss, system.embed_net), loader


def raw_run(argv: list[str], final: dict, parts: dict | None = None) -> list[float]:
    """The same epoch as a plain loop; its final trainable weights go to ``final``, the per-part times of each step
    to ``parts`` (forward, loss, backward + step)."""
    cfg, system, optimizer, criterion, loader = build(argv)
    apply_schedule(optimizer, recipe.lr_schedule(cfg), 0)
    set_loader_epoch(loader, 0)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    system.train()
    starts = []
    for batch in loader:
        starts.append(time.perf_counter())
        frames, reference = batch["frames_lab"], batch["reference_lab"]
        outputs, flow_outputs, confs, aux = system(frames[:, :, :1], reference, return_aux=True)
        forward = time.perf_counter()
        total, _ = criterion(outputs, frames, flow_outputs, confs, aux=aux, reference_lab=reference)
        loss = time.perf_counter()
        total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if parts is not None:
            for name, value in (("forward", forward - starts[-1]), ("loss", loss - forward),
                                ("backward+step", time.perf_counter() - loss)):
                parts.setdefault(name, []).append(value)
    starts.append(time.perf_counter())
    final.update({f"{name}.{key}": value.detach().clone() for name in ("nonlocal_net", "fusion_net")
                  for key, value in getattr(system, name).state_dict().items()})
    return intervals(starts)


def frozen_graphs(argv: list[str]) -> dict:
    """Calls of the frozen modules during one raw step, with and without an output graph, and frozen gradients."""
    cfg, system, optimizer, criterion, loader = build(argv)
    set_loader_epoch(loader, 0)
    calls: dict[str, list[bool]] = {"embed_net": [], "colornet": [], "flow": []}
    for name in ("embed_net", "colornet"):
        getattr(system, name).register_forward_hook(
            lambda module, inputs, output, name=name: calls[name].append(
                any(t.requires_grad for t in (output if isinstance(output, (list, tuple)) else [output]))))
    original_step = system.flow.step

    def recorded_step(gray):
        step = original_step(gray)
        calls["flow"].append(any(t.requires_grad for t in (step.flow, step.conf, step.noc, step.valid)))
        return step

    system.flow.step = recorded_step
    system.train()
    batch = next(iter(loader))
    outputs, flow_outputs, confs, aux = system(batch["frames_lab"][:, :, :1], batch["reference_lab"], return_aux=True)
    total, _ = criterion(outputs, batch["frames_lab"], flow_outputs, confs, aux=aux,
                         reference_lab=batch["reference_lab"])
    total.backward()
    frozen_grads = sum(p.grad is not None for name in ("embed_net", "colornet")
                       for p in getattr(system, name).parameters())
    return {"calls": calls, "frozen_parameters_with_grad": frozen_grads,
            "frozen_requires_grad": sum(p.requires_grad for name in ("embed_net", "colornet")
                                        for p in getattr(system, name).parameters())}


def main() -> int:
    """Measure, check and print the markdown rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4, help="interleaved repeats of each loop")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()), help="demo data cache folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ensure_demo_dataset(args.cache / "colorize_demo_bench", 0)

    with tempfile.TemporaryDirectory(prefix="bench_colorize_") as temporary:
        argvs = [trainer_argv(args.cache, Path(temporary) / f"run{r}") for r in range(args.repeats)]
        raw_final: dict = {}
        parts: dict[str, list[float]] = {}
        trainer_times, raw_times = interleaved(lambda r: trainer_run(train_colorize.cli, argvs[r]),
                                               lambda r: raw_run(argvs[r], raw_final, parts), args.repeats)
        trained = torch.load(Path(argvs[-1][argvs[-1].index("--train.output-dir") + 1]) / "fusion_best.pth",
                             weights_only=True)
        trained = {**{f"nonlocal_net.{k}": v for k, v in trained["swintexco_nonlocal"].items()},
                   **{f"fusion_net.{k}": v for k, v in trained["fusion_unet"].items()}}
        equal = states_equal(trained, raw_final)
        graphs = frozen_graphs(argvs[0])
    trainer, raw, extra = overhead(trainer_times, raw_times)
    print(f"\nColorization demo size (64², T = 4, batch 4), CPU: {machine()}\n")
    print("| run | trainer s/step | raw loop s/step | overhead (median) | final weights bitwise equal | steps timed "
          "per loop |\n|---|---:|---:|---:|---|---:|")
    print(f"| demo epoch | {trainer:.3f} | {raw:.3f} | {extra:+.1%} | {'yes' if equal else 'NO'} | "
          f"{len(trainer_times)} |")
    print("\nraw step parts (median s): " + ", ".join(f"{name} {statistics.median(values):.3f}"
                                                    for name, values in parts.items()))
    calls = graphs["calls"]
    print("frozen modules in one step: " + "; ".join(
        f"{name} {len(flags)} call(s), {sum(flags)} with an output graph" for name, flags in calls.items())
        + f"; frozen parameters requiring grad {graphs['frozen_requires_grad']}, holding a gradient after the "
        f"backward {graphs['frozen_parameters_with_grad']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
