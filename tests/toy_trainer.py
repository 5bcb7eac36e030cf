"""The shortest correct trainer on the kit: the template a new trainer copies, and the kit's test vehicle.

It has what the real trainers combine: a freeze -> unfreeze stage switch (re-wrapped for DDP), two parameter
groups with a per-step cosine schedule, gradient accumulation, an EMA, per-step loss series dumped to cumulative
``.mat`` files, one train state saved and restored whole, ``--resume auto|never|PATH`` and preemption.

    python tests/toy_trainer.py --run-dir /tmp/toy --epochs 3
    torchrun --nproc_per_node 2 tests/toy_trainer.py --run-dir /tmp/toy2
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.checkpoint import CheckpointManager  # noqa: E402
from common.cli import parse  # noqa: E402
from common.data import GlobalBatchSampler, WorkerSeeder, epoch_batches, to_device  # noqa: E402
from common.ema import ModelEMA  # noqa: E402
from common.freeze import FreezePolicy, apply_policy, switch_stage  # noqa: E402
from common.lossdump import LossSeries, save_mat  # noqa: E402
from common.preempt import Preemption  # noqa: E402
from common.resume import RunOptions, plan_resume  # noqa: E402
from common.run import (AcceleratorSettings, end_processes, exit_on_user_error, seed_everything,  # noqa: E402
                        start_accelerator)
from common.runfolder import RunFolder  # noqa: E402
from common.schedules import Schedule, apply_schedule, set_base_lrs  # noqa: E402
from common.state import TrainState  # noqa: E402
from common.step import OptimStep  # noqa: E402

SCRIPT = "tests/toy_trainer.py"


@dataclass(frozen=True)
class ToyConfig:
    """Toy trainer: a conv + linear regressor on synthetic data, frozen backbone first."""

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
    log_every: int = 2
    """Log (and read the non-finite counters) every N optimizer steps."""
    resume: str = "never"
    """auto (continue the newest checkpoint), never, or a checkpoint path."""
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
    no_rewrap: bool = False
    """Negative control: change requires_grad at the switch without re-wrapping the DDP model."""
    run: Annotated[RunOptions, tyro.conf.OmitArgPrefixes] = field(default_factory=RunOptions)
    """Checkpoints, resuming, stopping (iterations are micro-batches)."""


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


POLICIES = {"freeze": FreezePolicy(trainable=("head",)), "unfreeze": FreezePolicy(trainable=("",))}


def stage_of(step: int, cfg: ToyConfig) -> str:
    """``freeze`` before the unfreeze step, else ``unfreeze``."""
    return "freeze" if step < cfg.unfreeze_step else "unfreeze"


def main(cfg: ToyConfig, argv: list[str]) -> int:
    accelerator, console = start_accelerator(AcceleratorSettings(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.accumulation,
        log_with_tensorboard=False))
    seed_everything(cfg.seed)
    run = RunFolder(cfg.run_dir, accelerator, console)

    data = ToyData(cfg.samples)
    sampler = GlobalBatchSampler(len(data), cfg.batch, cfg.seed, accelerator.process_index, accelerator.num_processes)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=0,
                                         worker_init_fn=WorkerSeeder(cfg.seed, accelerator.process_index))
    micro_per_epoch = len(sampler)
    total_micro = micro_per_epoch * cfg.epochs
    total_steps = total_micro // cfg.accumulation

    model = ToyNet()
    apply_policy(model, POLICIES[stage_of(0, cfg)])
    # Fused optimizers skip a non-finite step on the device, so the guard needs no host synchronisation.
    optimizer = torch.optim.Adam([{"params": model.backbone.parameters(), "name": "backbone"},
                                  {"params": model.head.parameters(), "name": "head"}], lr=cfg.lr, fused=True)
    set_base_lrs(optimizer, [cfg.lr / 2, cfg.lr], [cfg.lr / 100, cfg.lr / 100])
    schedule = Schedule("cosine", total=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = ModelEMA(accelerator.unwrap_model(model), decay=0.99, tau=10)
    stepper = OptimStep(accelerator, optimizer, model, max_grad_norm=10.0, max_nonfinite=cfg.max_nonfinite,
                        warn=console.warn)
    series = LossSeries(["loss", "mse", "l1", "lr"])
    checkpoints = CheckpointManager(cfg.run_dir / "checkpoints", "toy", keep_last=cfg.run.keep_checkpoints, width=6)
    state = TrainState(accelerator, SCRIPT, checkpoints, stage=stage_of(0, cfg), warn=console.warn, model=model,
                       optimizer=optimizer, ema=ema, series=series, step_counters=stepper)

    # Resume: read the checkpoint, set up the stage its position implies, then restore everything.
    plan = plan_resume(cfg.resume, checkpoints.paths(), checkpoints.directory, overwrite=cfg.run.overwrite)
    run.remove(plan.remove, "--overwrite")
    if plan.action == "resume":
        checkpoint = state.read(plan.path, cfg.allow)
        state.stage = stage_of(state.position_of(checkpoint).step, cfg)
        if state.stage == "unfreeze":
            model, _ = switch_stage(accelerator, model, POLICIES["unfreeze"])
            stepper.set_model(model)
        state.load(checkpoint, plan.path, cfg.allow)
        console.print(f"resumed from {plan.path} at micro-step {state.position.micro_step}, "
                      f"optimizer step {state.position.step}")
    run.open(SCRIPT, cfg, argv)

    preemption = Preemption(accelerator, every=cfg.log_every)
    position = state.position
    batches = epoch_batches(loader, position)
    console.start(total_steps, "toy", completed=position.step)
    while position.micro_step < total_micro:
        batch = to_device(next(batches), accelerator.device)
        apply_schedule(optimizer, schedule, position.step)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                prediction = model(batch["x"]).float()
            mse = ((prediction - batch["y"]) ** 2).mean()
            l1 = (prediction - batch["y"]).abs().mean()
            loss = mse + 0.1 * l1
            if position.micro_step == cfg.nan_at_step or cfg.nan_always:
                loss = loss * float("nan")
            result = stepper(loss)  # backward, clip, step (or skip a non-finite step), zero_grad
        if cfg.step_sleep:
            time.sleep(cfg.step_sleep)
        end_of_epoch = position.next_batch(micro_per_epoch)
        if result.synced:
            ema.update(accelerator.unwrap_model(model), result.applied)
            series.append({"loss": loss.detach(), "mse": mse.detach(), "l1": l1.detach(),
                           "lr": optimizer.param_groups[1]["lr"]})
            position.step += 1
            console.advance(position.step)
            if stage_of(position.step, cfg) != state.stage:
                # DDP registers trainable parameters when it wraps: re-wrap so the backbone is synchronised.
                state.stage = stage_of(position.step, cfg)
                if cfg.no_rewrap:
                    apply_policy(accelerator.unwrap_model(model), POLICIES[state.stage])
                else:
                    model, _ = switch_stage(accelerator, model, POLICIES[state.stage])
                stepper.set_model(model)
            if position.step % cfg.log_every == 0:
                stepper.check()
                window = series.flush(accelerator)
                console.log(position.step, {"loss": float(window["loss"].mean()), "lr": float(window["lr"][-1])})
        if end_of_epoch:
            series.flush(accelerator)
            if accelerator.is_main_process:
                save_mat(cfg.run_dir / "loss" / f"loss_e{position.epoch - 1}.mat",
                         {**series.arrays(), "global_batch": cfg.batch})
        stop = position.micro_step == cfg.run.stop_after
        preempted = preemption.should_stop(position.step)  # every process answers alike (see Preemption)
        every = cfg.run.checkpoint_every and position.micro_step % cfg.run.checkpoint_every == 0
        if end_of_epoch or every or stop or preempted:
            path = state.save()
            if stop or preempted:  # the one line a user sees; exit 0 after --stop-after, 75/130 after a signal
                return preemption.halt(console, "toy", path, stopped=stop, at=f"micro-step {position.micro_step}")
    console.stop()
    stepper.check()
    series.flush(accelerator)
    final = {"model": accelerator.unwrap_model(model).state_dict(), "ema": ema.state_dict(),
             "optimizer": optimizer.state_dict()}
    torch.save(final, cfg.run_dir / f"final_rank{accelerator.process_index}.pth")
    if accelerator.is_main_process:
        (cfg.run_dir / "losses.json").write_text(json.dumps(series.arrays()["loss"].tolist()))
    end_processes(accelerator)
    return 0


if __name__ == "__main__":
    arguments = sys.argv[1:]
    sys.exit(exit_on_user_error(lambda: main(parse(ToyConfig, arguments), arguments)))
