"""The freeze -> unfreeze switch under data parallelism (spec/fred.md §4.4, §9 checks 6 and 8).

Two gloo CPU processes (torchrun) train the dual demo model on different data with the trainer's own pieces
(freeze policies, optimizer groups, training forward, OptimStep): one freeze step, the switch, one unfreeze step.
With the re-wrap, the backbones end bitwise equal on both ranks and changed by the step; without it (negative
control) DDP never all-reduces the backbone gradients and the ranks diverge. The optimizer object and its momentum
survive the switch.

This file is also the worker (both variants in one process group):
``python -m torch.distributed.run --nproc_per_node 2 tests/test_fred_ddp.py OUT``.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

INPUT = (64, 64)


def _batch(rank: int, step: int, size: int = 4) -> dict:
    """Random images and boxes, different for every rank and step."""
    from fred.targets import get_target

    rng = np.random.default_rng([rank, step])
    images = torch.from_numpy(rng.random((2, size, 3, *INPUT), dtype=np.float32))
    targets = []
    for _ in range(size):
        centres = rng.uniform(12, 52, (2, 2))
        sizes = rng.uniform(8, 20, (2, 2))
        boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2, np.zeros((2, 1))], axis=1)
        targets.append(get_target(boxes, INPUT, 1))
    y_true = [torch.from_numpy(np.stack([t[level] for t in targets])) for level in range(3)]
    return {"rgb": images[0], "event": images[1], "y_true": y_true}


def run_switch(accelerator, rewrap: bool) -> dict:
    """Freeze step, switch (re-wrapped or not), unfreeze step; returns what the tests check."""
    from common.data import to_device
    from common.freeze import apply_policy, switch_stage
    from common.run import seed_everything
    from common.schedules import set_base_lrs
    from common.step import OptimStep
    from fred.config import DEMO
    from fred.loss import YOLOLoss
    from fred.model import backbone_parameters, build_model
    from fred.recipe import build_optimizer, freeze_policies, training_losses

    cfg = dataclasses.replace(DEMO, input_shape=INPUT, optimizer="sgd", init_lr=0.05, weight_decay=5e-4)
    rank = accelerator.process_index
    seed_everything(0)
    model = build_model("dual", "n", 1, fusion_mode="concat", compression_ratio=0.5)
    policies = freeze_policies(model, cfg)
    optimizer = build_optimizer(model, cfg)
    set_base_lrs(optimizer, cfg.init_lr)
    for group in optimizer.param_groups:
        group["lr"] = cfg.init_lr
    apply_policy(model, policies["freeze"])
    model, optimizer = accelerator.prepare(model, optimizer)
    stepper = OptimStep(accelerator, optimizer, model)
    criterion = YOLOLoss(1, INPUT)
    inner = accelerator.unwrap_model(model)

    def train_step(step: int) -> None:
        batch = to_device(_batch(rank, step), accelerator.device)
        with accelerator.accumulate(model):
            stepper(training_losses(model, batch, cfg, criterion, accelerator, (None, None))["loss"])

    def backbone() -> torch.Tensor:
        return torch.cat([p.detach().flatten().clone() for p in backbone_parameters(inner)])

    initial = backbone()
    train_step(0)
    after_freeze = backbone()
    head = inner.yolo_head_P3.weight
    momentum = optimizer.state[head]["momentum_buffer"].clone()
    optimizer_id = id(optimizer)
    if rewrap:
        model, _ = switch_stage(accelerator, model, policies["unfreeze"])
    else:
        apply_policy(inner, policies["unfreeze"])
    stepper.set_model(model)
    momentum_kept = torch.equal(optimizer.state[head]["momentum_buffer"], momentum)
    train_step(1)
    final = backbone()
    gathered = accelerator.gather(final[None])
    return {"ranks_equal": torch.equal(gathered[0], gathered[1]),
            "frozen_during_freeze": torch.equal(initial, after_freeze),
            "changed_after_switch": not torch.equal(after_freeze, final),
            "optimizer_kept": id(optimizer) == optimizer_id and stepper.optimizer is optimizer,
            "momentum_kept": momentum_kept,
            "backbone_momentum": all("momentum_buffer" in optimizer.state[p] for p in backbone_parameters(inner))}


def worker(out: Path) -> None:
    """Both variants in one process group; the main process saves the results."""
    from common.run import AcceleratorSettings, make_accelerator

    accelerator = make_accelerator(AcceleratorSettings(log_with_tensorboard=False))
    assert accelerator.num_processes == 2
    results = {"rewrap": run_switch(accelerator, rewrap=True), "no_rewrap": run_switch(accelerator, rewrap=False)}
    if accelerator.is_main_process:
        torch.save(results, out)
    accelerator.wait_for_everyone()


@pytest.fixture(scope="module")
def switch_results(tmp_path_factory) -> dict:
    from tests.kit_helpers import ROOT, env

    out = tmp_path_factory.mktemp("fred_ddp") / "results.pt"
    port = str(29700 + os.getpid() % 200)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               str(Path(__file__).resolve()), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=240)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return torch.load(out, weights_only=True)


def test_switch_rewrap_keeps_ranks_in_sync(switch_results):
    result = switch_results["rewrap"]
    assert result["frozen_during_freeze"]
    assert result["changed_after_switch"]
    assert result["ranks_equal"]
    assert result["optimizer_kept"] and result["momentum_kept"] and result["backbone_momentum"]


def test_switch_without_rewrap_diverges(switch_results):
    result = switch_results["no_rewrap"]
    assert result["frozen_during_freeze"] and result["changed_after_switch"]
    assert not result["ranks_equal"]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
