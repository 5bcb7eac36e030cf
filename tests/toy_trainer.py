"""A small trainer built only from the kit, used by the kit's tests and by ``bench/parity.py``.

It has what the real trainers combine: a freeze -> unfreeze stage switch (re-wrapped for DDP), two parameter
groups with a per-step cosine schedule, gradient accumulation, an EMA, per-step loss series dumped to
cumulative ``.mat`` files, atomic checkpoints with retention, ``--resume auto``, and preemption.

    python tests/toy_trainer.py --run-dir /tmp/toy --epochs 3
    torchrun --nproc_per_node 2 tests/toy_trainer.py --run-dir /tmp/toy2
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import checkpoint as ckpt  # noqa: E402
from common.cli import parse  # noqa: E402
from common.console import RunConsole  # noqa: E402
from common.data import GlobalBatchSampler, WorkerSeeder, to_device  # noqa: E402
from common.ema import ModelEMA  # noqa: E402
from common.freeze import FreezePolicy, apply_policy, switch_stage  # noqa: E402
from common.lossdump import LossSeries, save_mat  # noqa: E402
from common.preempt import PREEMPTED_EXIT_CODE, Preemption  # noqa: E402
from common.run import (  # noqa: E402
    AcceleratorSettings, exit_on_user_error, make_accelerator, seed_everything, write_run_record)
from common.schedules import Schedule, apply_schedule, set_base_lrs  # noqa: E402
from common.step import OptimStep, accumulation_state, load_accumulation_state  # noqa: E402

SCRIPT = "toy_trainer"


@dataclass(frozen=True)
class ToyConfig:
    """Toy trainer settings."""

    run_dir: Path = Path("runs/toy")
    """Output folder (checkpoints, .mat dumps, losses.json)."""
    samples: int = 64
    """Synthetic dataset size."""
    batch: int = 8
    """Global batch per micro-step (split over processes)."""
    accumulation: int = 1
    """Micro-batches per optimizer step."""
    epochs: int = 3
    """Epochs to train."""
    unfreeze_step: int = 3
    """Optimizer step at which the backbone starts training (0: never frozen)."""
    lr: float = 1e-2
    """Base learning rate (head group; the backbone group gets half)."""
    checkpoint_every: int = 0
    """Also checkpoint every N micro-steps (0: only at epoch ends)."""
    stop_after: int = 0
    """Stop (with a checkpoint) after this many micro-steps, as an interrupted run would (0: run to the end)."""
    resume: str = "never"
    """``auto`` (latest checkpoint of the run dir), ``never``, or a checkpoint path."""
    allow: tuple[str, ...] = ()
    """Resume checks to waive (script, stage, trainable, mixed_precision, world_size)."""
    mixed_precision: Literal["no", "bf16", "fp16", "launch"] = "no"
    """Precision."""
    nan_at_step: int = -1
    """Make the loss NaN at this micro-step (tests the non-finite guard; -1: never)."""
    nan_always: bool = False
    """Make every loss NaN (tests the stop after too many non-finite steps)."""
    max_nonfinite: int = 5
    """Non-finite optimizer steps in a row before stopping."""
    step_sleep: float = 0.0
    """Seconds to sleep per micro-step (lets tests deliver signals mid-run)."""
    seed: int = 0
    """Seed."""
    keep_last: int = 2
    """Checkpoints kept."""
    no_rewrap: bool = False
    """Negative control: change requires_grad at the switch without re-wrapping the DDP model."""


class ToyData(torch.utils.data.Dataset):
    """Deterministic regression data: 4x8x8 inputs, 3 targets."""

    def __init__(self, samples: int):
        generator = torch.Generator().manual_seed(1234)
        self.x = torch.randn(samples, 4, 8, 8, generator=generator)
        weight = torch.randn(3, 4 * 8 * 8, generator=generator) / 16
        self.y = self.x.flatten(1) @ weight.T

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return {"x": self.x[index], "y": self.y[index]}


class ToyNet(nn.Module):
    """Conv + BN backbone and a linear head."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8 * 8 * 8, 3)

    def forward(self, x):
        return self.head(self.backbone(x).flatten(1))


def stage_of(step: int, cfg: ToyConfig) -> str:
    """``freeze`` before the unfreeze step, else ``unfreeze``."""
    return "freeze" if step < cfg.unfreeze_step else "unfreeze"


POLICIES = {
    "freeze": FreezePolicy(trainable=("head",)),
    "unfreeze": FreezePolicy(trainable=("",)),
}


def main(cfg: ToyConfig) -> int:
    console = RunConsole()
    accelerator = make_accelerator(
        AcceleratorSettings(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.accumulation,
                            log_with_tensorboard=False),
        warn=console.warn,
    )
    console = RunConsole(is_main=accelerator.is_main_process)
    seed_everything(cfg.seed)
    run_dir = cfg.run_dir

    data = ToyData(cfg.samples)
    sampler = GlobalBatchSampler(len(data), cfg.batch, cfg.seed, accelerator.process_index, accelerator.num_processes)
    seeder = WorkerSeeder(cfg.seed, accelerator.process_index)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=0, worker_init_fn=seeder)
    micro_per_epoch = len(sampler)
    total_micro = micro_per_epoch * cfg.epochs
    total_steps = total_micro // cfg.accumulation

    model = ToyNet()
    stage = stage_of(0, cfg)
    trainable = apply_policy(model, POLICIES[stage])
    optimizer = torch.optim.Adam(
        [{"params": model.backbone.parameters(), "name": "backbone"}, {"params": model.head.parameters(), "name": "head"}],
        lr=cfg.lr,
    )
    set_base_lrs(optimizer, [cfg.lr / 2, cfg.lr], [cfg.lr / 100, cfg.lr / 100])
    schedule = Schedule("cosine", total=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = ModelEMA(accelerator.unwrap_model(model), decay=0.99, tau=10)
    stepper = OptimStep(accelerator, optimizer, model, max_grad_norm=10.0, max_nonfinite=cfg.max_nonfinite,
                        warn=console.warn)
    series = LossSeries(["loss", "mse", "l1", "lr"])
    checkpoints = ckpt.CheckpointManager(run_dir / "checkpoints", "toy", unit="step", keep_last=cfg.keep_last, width=6)

    micro = 0  # micro-steps done
    step = 0  # optimizer steps attempted
    if cfg.resume != "never":
        path = checkpoints.latest() if cfg.resume == "auto" else Path(cfg.resume)
        if path is None:
            console.print("no checkpoint to resume; starting fresh")
        else:
            state = ckpt.load_checkpoint(path)
            meta = state["meta"]
            micro, step = meta["micro"], meta["step"]
            stage = stage_of(step, cfg)
            if stage == "unfreeze":
                model, trainable = switch_stage(accelerator, model, POLICIES[stage])
                stepper.set_model(model)
            identity = ckpt.RunIdentity(SCRIPT, stage, ckpt.trainable_fingerprint(trainable),
                                        accelerator.mixed_precision, accelerator.num_processes)
            ckpt.check_resume(path, meta, identity, cfg.allow)
            accelerator.unwrap_model(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            ema.load_state_dict(state["ema"], state["ema_updates"])
            stepper.load_state_dict(state["step_counters"])
            series.load_state_dict(state["series"], length=step)
            rank = accelerator.process_index % len(state["rng"])
            load_accumulation_state(accelerator, model, state["accumulation"][rank])
            ckpt.restore_rng(state["rng"][rank])
            console.print(f"resumed from {path} at micro-step {micro}, optimizer step {step}")

    if accelerator.is_main_process:
        write_run_record(run_dir, "tests/toy_trainer.py", cfg, sys.argv[1:], ["--resume", "{checkpoint}"])

    def save(path_number: int) -> Path | None:
        series.flush(accelerator)
        rng = ckpt.gather_rng(accelerator)
        accumulation = [accumulation_state(accelerator, model)]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            accumulation = list(gather_object(accumulation))
        path = None
        if accelerator.is_main_process:
            state = {
                "meta": {**ckpt.RunIdentity(SCRIPT, stage, ckpt.trainable_fingerprint(trainable),
                                            accelerator.mixed_precision, accelerator.num_processes).as_meta(),
                         "micro": micro, "step": step},
                "model": accelerator.unwrap_model(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict(),
                "ema_updates": ema.updates,
                "step_counters": stepper.state_dict(),
                "series": series.state_dict(),
                "accumulation": accumulation,
                "rng": rng,
            }
            path = checkpoints.save(state, path_number)
        accelerator.wait_for_everyone()
        return path

    def dump_mat(epoch: int) -> None:
        series.flush(accelerator)
        if accelerator.is_main_process:
            arrays = series.arrays()
            save_mat(run_dir / "loss" / f"loss_e{epoch}.mat", {**arrays, "global_batch": cfg.batch})

    preemption = Preemption(accelerator)
    console.start(total_steps, "toy", completed=step)
    start_epoch = micro // micro_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch, start_batch=micro - epoch * micro_per_epoch)
        seeder.epoch = epoch
        for batch in loader:
            batch = to_device(batch, accelerator.device)
            apply_schedule(optimizer, schedule, step)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    prediction = model(batch["x"])
                prediction = prediction.float()
                mse = ((prediction - batch["y"]) ** 2).mean()
                l1 = (prediction - batch["y"]).abs().mean()
                loss = mse + 0.1 * l1
                if micro == cfg.nan_at_step or cfg.nan_always:
                    loss = loss * float("nan")
                result = stepper(loss)
            micro += 1
            if cfg.step_sleep:
                time.sleep(cfg.step_sleep)
            if result.synced:
                if result.applied:
                    ema.update(accelerator.unwrap_model(model))
                series.append({"loss": loss.detach(), "mse": mse.detach(), "l1": l1.detach(),
                               "lr": optimizer.param_groups[1]["lr"]})
                step += 1
                console.advance(step)
                if stage_of(step, cfg) != stage:
                    stage = stage_of(step, cfg)
                    if cfg.no_rewrap:
                        trainable = apply_policy(accelerator.unwrap_model(model), POLICIES[stage])
                    else:
                        model, trainable = switch_stage(accelerator, model, POLICIES[stage])
                    stepper.set_model(model)
            end_of_epoch = micro % micro_per_epoch == 0
            if end_of_epoch:
                dump_mat(epoch)
            stop = cfg.stop_after and micro == cfg.stop_after
            if end_of_epoch or stop or (cfg.checkpoint_every and micro % cfg.checkpoint_every == 0):
                save(micro)
            if stop:
                console.print(f"stopped after micro-step {micro}")
                return 0
            if preemption.should_stop(micro):
                started = time.perf_counter()
                path = save(micro)
                console.print(f"preempted ({preemption.signal_name}): saved {path} in "
                              f"{time.perf_counter() - started:.2f}s; resume with --resume auto")
                return PREEMPTED_EXIT_CODE
    console.stop()
    series.flush(accelerator)
    final = {
        "model": accelerator.unwrap_model(model).state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    rank_file = run_dir / f"final_rank{accelerator.process_index}.pth"
    torch.save(final, rank_file)
    if accelerator.is_main_process:
        (run_dir / "losses.json").write_text(json.dumps(series.arrays()["loss"].tolist()))
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    config = parse(ToyConfig)
    sys.exit(exit_on_user_error(lambda: main(config)))
