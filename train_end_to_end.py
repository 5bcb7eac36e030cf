"""CrossFuse: infrared/visible image fusion with a cross-attention mechanism, trained end-to-end or in two stages.

H. Li, X.-J. Wu, "CrossFuse: A novel cross attention mechanism based infrared and visible image fusion approach",
Information Fusion 103 (2024) 102147 (official code hli1221/CrossFuse); the end-to-end approach follows the
furqan-qadri/CrossFuse fork.

- end-to-end (default): IR encoder, VIS encoder, cross-attention module (CAM) and decoder trained together from
  random initialisation with one optimizer.
- two-stage (paper): per-modality auto-encoders trained for reconstruction, then CAM + decoder on frozen encoders.

    python train_end_to_end.py                                   # no data root: demo data, train, fuse, evaluate
    python train_end_to_end.py --data.root /data/KAIST           # paper settings, end-to-end
    accelerate launch train_end_to_end.py --data.root /data/KAIST --approach two-stage
    python train_end_to_end.py --mode evaluate --eval.root /data/TNO --eval.run models/end_to_end

Rerunning a command continues it (--resume auto): completed stages are skipped, interrupted ones continue
mid-epoch from their newest checkpoint. SIGTERM or Ctrl-C saves a checkpoint and exits (75 / 130).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (first: it makes OpenMP wait passively, which must be set before torch loads)
import torch  # noqa: E402

# The configuration (paper defaults, demo preset, every flag with its help): crossfuse/config.py.
from crossfuse.config import CrossFuseConfig, load_config  # noqa: E402

from common.checkpoint import CheckpointManager, atomic_write_json  # noqa: E402
from common.data import GlobalBatchSampler, WorkerSeeder, epoch_batches, to_device  # noqa: E402
from common.ivif.data import IVIFPairDataset, write_pairs_file  # noqa: E402
from common.ivif.demo import ensure_ivif_demo  # noqa: E402
from common.lossdump import LossSeries, save_mat  # noqa: E402
from common.preempt import Preemption  # noqa: E402
from common.resume import mark_complete, plan_resume  # noqa: E402
from common.run import (AcceleratorSettings, check_amp_invariant, end_processes, end_stage,  # noqa: E402
                        exit_on_user_error, parameter_fingerprints, seed_everything, start_accelerator)
from common.runfolder import RunFolder  # noqa: E402
from common.schedules import apply_schedule, group_lr, set_base_lrs  # noqa: E402
from common.state import TrainState, compare_signature  # noqa: E402
from common.step import OptimStep  # noqa: E402
from crossfuse import stages  # noqa: E402
from crossfuse.evaluate import evaluate, evaluation_current, find_weights  # noqa: E402
from crossfuse.stages import LAYOUTS, SCRIPT, RunKind  # noqa: E402


def train_kind(kind: RunKind, cfg: CrossFuseConfig, accelerator, console, run: RunFolder, preemption: Preemption,
               argv: list[str]) -> int | None:
    """Train one kind (an auto-encoder, the fusion stage or end-to-end) to its last epoch; a completed one is
    skipped. Returns an exit code when the command must stop now (--stop-after, a stop signal), else None."""
    layout, settings, folder = LAYOUTS[kind], stages.stage_settings(cfg, kind), stages.run_folder(cfg, kind)
    pairs, data_sha256, iters_per_epoch = stages.training_pairs(cfg, settings, accelerator.num_processes)
    encoders = stages.encoder_files(cfg, kind)
    signature = stages.signature(cfg, kind, settings, data_sha256, encoders)
    checkpoints = CheckpointManager(stages.checkpoint_dir(cfg, kind), kind, keep_last=cfg.run.keep_checkpoints,
                                    width=6)
    plan = plan_resume(stages.resume_value(cfg, kind), checkpoints.paths(), checkpoints.directory,
                       overwrite=cfg.run.overwrite, outputs=stages.earlier_outputs(folder, kind),
                       epochs=settings.epochs)
    if plan.record is not None:  # finished before: with the same model and data order only
        compare_signature(checkpoints.directory / "DONE.json", plan.record["signature"],
                          {**signature, "soft": {}}, cfg.run.resume_force, console.warn)
    if plan.action == "complete":
        console.print(f"{kind}: complete ({plan.record['epochs']} epochs, {checkpoints.directory}); skipping")
        return None
    if plan.record is not None:
        console.warn(f"{kind}: finished {plan.record['epochs']} epochs before; " + (
            f"continuing to {settings.epochs}" if plan.action == "resume" else
            f"its resumable states were deleted (--prune-finished), so it trains again from the start to "
            f"{settings.epochs}"))

    # Data: epoch e's order depends only on (seed, e), so stage 2 and end-to-end see identical batches.
    dataset = IVIFPairDataset(pairs, size=(cfg.height, cfg.width), hflip=cfg.data.hflip, seed=cfg.seed)
    sampler = GlobalBatchSampler(len(pairs), settings.batch, cfg.seed, accelerator.process_index,
                                 accelerator.num_processes)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.workers,
                                         worker_init_fn=WorkerSeeder(cfg.seed, accelerator.process_index),
                                         pin_memory=accelerator.device.type == "cuda")
    total_steps = iters_per_epoch * settings.epochs

    # Model and optimizer: each kind's initialisation depends on the seed only, not on earlier stages.
    seed_everything(cfg.seed)
    model = stages.build_model(cfg, kind, encoders, console.print)
    if cfg.sync_bn and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    groups = stages.optimizer_groups(model, kind)
    # Fused Adam (also on the CPU) skips a non-finite step on the device: no host synchronisation per step.
    optimizer = torch.optim.Adam(groups, lr=settings.lr, betas=stages.ADAM_BETAS, eps=stages.ADAM_EPS,
                                 weight_decay=settings.weight_decay, fused=True)
    mults = [settings.lr_mults[group["name"]] for group in groups]
    min_lr = cfg.min_lr if settings.schedule == "cosine" else 0.0
    set_base_lrs(optimizer, [settings.lr * m for m in mults], [min_lr * m for m in mults])
    schedule = stages.make_schedule(settings.schedule, cfg.lr_schedule_unit, settings.epochs, iters_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    check_amp_invariant(accelerator)
    stepper = OptimStep(accelerator, optimizer, model, max_grad_norm=settings.grad_clip,
                        max_nonfinite=stages.MAX_NONFINITE_STEPS, warn=console.warn)
    series = LossSeries(layout.series)
    state = TrainState(accelerator, SCRIPT, checkpoints, stage=kind, warn=console.warn, model=model,
                       optimizer=optimizer, series=series, step_counters=stepper)
    state.signature = signature
    position = state.position
    if plan.action == "resume":
        state.restore(plan.path, force=cfg.run.resume_force,
                      allow=("trainable", "mixed_precision", "world_size") if cfg.run.resume_force else ())
        epoch, batch = divmod(position.step, iters_per_epoch)
        console.print(f"{kind}: resumed from {plan.path} at iteration {position.step} (epoch {epoch + 1}, "
                      f"batch {batch})")
    # The run folder is written only now: weights and checkpoints that cannot be used leave it untouched.
    run.open(SCRIPT, cfg, argv)
    run.remove(plan.remove, f"{kind}: --overwrite")
    inner = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        write_pairs_file(folder / "pairs.txt", pairs)
        atomic_write_json(folder / "run_info.json", stages.run_info(cfg, kind, settings, pairs, data_sha256,
                                                                     iters_per_epoch, optimizer, encoders, accelerator))
    if cfg.tensorboard:
        accelerator.init_trackers(f"{layout.folder}/tensorboard/{kind}")
    console.print(f"{kind}: {len(pairs)} pairs at {cfg.height}x{cfg.width}, batch {settings.batch}, "
                  f"{iters_per_epoch} iterations x {settings.epochs} epochs = {total_steps} updates, "
                  f"{accelerator.num_processes} process(es) on {accelerator.device}; outputs in {folder}")

    # The loop, keyed by the optimizer step (one iteration = one step: no accumulation in CrossFuse).
    batches = epoch_batches(loader, position)
    started, steps_at_start = time.perf_counter(), position.step
    console.start(total_steps, kind, completed=position.step)
    while position.step < total_steps:
        if position.batch == 0:
            console.print(f"BATCH SIZE {settings.batch}.")
            console.print(f"Train images number {len(pairs)}.")
        batch = to_device(next(batches), accelerator.device)
        apply_schedule(optimizer, schedule, stages.schedule_position(cfg.lr_schedule_unit, position.step,
                                                                     iters_per_epoch))
        with accelerator.accumulate(model):
            loss, values = stages.losses(layout, model, batch, cfg.loss.w_ssim)  # forward + loss (fp32)
            stepper(loss)  # backward, step (a non-finite step is skipped), zero_grad
        if layout.is_fusion:
            values["temperature"] = inner.fusion.mean_temperature()
        values["lr"] = group_lr(optimizer, layout.lr_group)
        values["epoch"] = float(position.epoch + 1)
        series.append({name: value.detach() if isinstance(value, torch.Tensor) else value
                       for name, value in values.items()})
        position.step += 1
        end_of_epoch = position.next_batch(iters_per_epoch)
        console.advance(position.step)

        if stages.is_log_point(position.step, cfg.step, iters_per_epoch):
            stepper.check()
            series.flush(accelerator)
            start = stages.last_log_point(position.step, cfg.step, iters_per_epoch)
            means = {name: math.fsum(values) / len(values) for name, values in series.tail(start).items()}
            temperature = float(inner.fusion.mean_temperature()) if layout.is_fusion else None
            lr = group_lr(optimizer, layout.lr_group)
            console.log(position.step, {"loss": means["loss_data"], "lr": lr},
                        line=stages.log_line(layout, position.step, settings.epochs, iters_per_epoch, lr,
                                             temperature, means))
            if cfg.tensorboard:
                accelerator.log({f"{kind}/{n}": v for n, v in means.items() if n != "epoch"}, step=position.step)
        last_epoch = position.step == total_steps
        saving_epoch = end_of_epoch and (position.epoch % cfg.save_every == 0 or last_epoch)
        if saving_epoch and accelerator.is_main_process:
            save_mat(stages.mat_path(folder, kind, position.epoch - 1),
                     {**series.arrays(), "iters_per_epoch": iters_per_epoch, "global_batch": settings.batch})
            for path in stages.export_models(inner, folder, kind, position.epoch):
                console.print(f"Checkpoint, trained model saved at: {path}")
        stop = position.step == cfg.run.stop_after and not last_epoch
        preempted = preemption.should_stop(position.step)
        every = cfg.run.checkpoint_every and position.step % cfg.run.checkpoint_every == 0
        if saving_epoch or every or stop or preempted:
            path = state.save()
            if stop or preempted:
                return preemption.halt(console, kind, path, stopped=stop, at=f"iteration {position.step}")
    console.stop()
    stepper.check()

    # The stage's end: every process must hold the same weights; plots and the completion marker.
    fingerprints = parameter_fingerprints(accelerator, inner)
    if len(set(fingerprints)) > 1:
        console.warn(f"{kind}: the processes ended with DIFFERENT weights: {fingerprints}")
    loop_seconds = time.perf_counter() - started
    done_steps = position.step - steps_at_start
    if accelerator.is_main_process:
        stages.plot_losses(folder, kind, series.arrays(), iters_per_epoch, settings.epochs)
        mark_complete(checkpoints.directory, {
            "kind": kind, "epochs": settings.epochs, "iterations": position.step, "global_batch": settings.batch,
            "signature": signature, "parameter_sha256_per_rank": fingerprints,
            "models": [str(p) for p in stages.model_paths(folder, kind, settings.epochs).values()],
            "timing": {"loop_seconds": loop_seconds, "iterations_this_run": done_steps,
                       "samples_per_second": done_steps * settings.batch / loop_seconds if loop_seconds else None},
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        console.print(f"{kind}: finished {position.step} iterations; {checkpoints.directory / 'DONE.json'} written")
    if cfg.run.prune_finished:
        run.remove(checkpoints.paths(), f"{kind}: finished (--prune-finished)")
    end_stage(accelerator)  # the next stage prepares its own model, optimizer and trackers
    return None


def main(cfg: CrossFuseConfig, notices: list[str], argv: list[str]) -> int:
    """Train the stages the config asks for, then fuse and score the test pairs when a test folder is set."""
    started = time.perf_counter()
    accelerator, console = start_accelerator(AcceleratorSettings(
        mixed_precision=cfg.mixed_precision, find_unused_parameters=True, log_with_tensorboard=cfg.tensorboard),
        project_dir=stages.experiment_dir(cfg))
    for notice in notices:
        console.print(notice)
    if cfg.preset == "demo":
        with accelerator.main_process_first():
            ensure_ivif_demo(cfg.data.demo_root, cfg.data.demo_seed)
    run = RunFolder(stages.experiment_dir(cfg), accelerator, console)
    preemption = Preemption(accelerator, every=cfg.step)

    trained_run = None
    if cfg.mode == "train":
        plan = stages.stage_plan(cfg)
        for kind in plan:  # fail early, before anything is written
            stages.resume_value(cfg, kind)
            stages.training_pairs(cfg, stages.stage_settings(cfg, kind), accelerator.num_processes)
            if kind == "fusion" and len(plan) == 1:
                stages.encoder_files(cfg, kind)
        largest = max((stages.stage_settings(cfg, kind) for kind in plan), key=lambda settings: settings.train_num)
        stages.check_training_images(cfg, largest)
        for kind in plan:
            code = train_kind(kind, cfg, accelerator, console, run, preemption, argv)
            if code is not None:
                return code
        if LAYOUTS[plan[-1]].is_fusion:
            trained_run = stages.run_folder(cfg, plan[-1])

    results = {}
    if cfg.mode != "train" or (cfg.eval.root is not None and trained_run is not None):
        weights = find_weights(cfg, trained_run)  # on every process, so a bad path stops them all
        if cfg.mode == "train" and evaluation_current(cfg, weights):
            console.print(f"evaluation of {weights.fusion.name} on {cfg.eval.root} is up to date "
                          f"({weights.run_dir / 'eval'}); nothing to do")
        else:
            if cfg.mode == "train":
                run.open(SCRIPT, cfg, argv)  # completed stages skipped it: records, and orphans of a killed evaluation
            if accelerator.is_main_process:
                results = evaluate(cfg, weights, accelerator.device, console, with_metrics=cfg.mode != "fuse",
                                   started=started, stop=preemption)
        accelerator.wait_for_everyone()
    console.print(f"done in {time.perf_counter() - started:.1f}s")
    if accelerator.is_main_process and results.get("files"):
        run.finish(results["files"], results.get("next", []))
    end_processes(accelerator)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """Parse the command line and run; bad input becomes one `error:` line and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return exit_on_user_error(lambda: main(*load_config(argv), argv))


if __name__ == "__main__":
    sys.exit(cli())
