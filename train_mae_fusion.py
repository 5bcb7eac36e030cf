"""MaeFuse: infrared/visible image fusion on a frozen MAE ViT encoder, trained in stages.

J. Li et al., "MaeFuse: Transferring Omni Features with Pretrained Masked Autoencoders for Infrared and Visible
Image Fusion via Guided Training", IEEE TIP 34 (2025), arXiv 2404.11016 (code Henry-Lee-real/MaeFuse). A frozen MAE
encoder tokenises each image, a fusion layer (CFM cross fusion, then MFM merge fusion) combines the tokens and the
4-block MAE decoder turns them into the fused image. Nine `--training_mode`s choose what trains with which loss;
`--modes` runs several in sequence, each stage starting from the previous stage's final weights.

    python train_mae_fusion.py                                   # no data: demo data, three stages, fuse, evaluate
    accelerate launch train_mae_fusion.py --data_path MSRS/train --resume mae_dec4.pth \\
        --modes train_MFM_mean_CFM_open:20 train_decoder_CFM_MFM:80 --output_dir runs/mf
    python train_mae_fusion.py fuse --ckpt runs/mf/stage1_train_decoder_CFM_MFM/checkpoint79.pth \\
        --data_path MSRS/test --out_dir fused
    python train_mae_fusion.py evaluate --fused_dir fused --data_path MSRS/test

Rerunning a command continues it (--resume_state auto): finished stages are skipped, an interrupted one continues
mid-epoch from its newest state. SIGTERM or Ctrl-C saves a state and exits (75 / 130).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (first: it makes OpenMP wait passively, which must be set before torch loads)
import torch  # noqa: E402

# The configuration (paper defaults, demo preset, --modes stages, every flag with its help): maefuse/config.py.
from maefuse.config import Stage, TrainConfig, resolve_train_config, stage_plan  # noqa: E402

from common.checkpoint import CheckpointManager, ResumeRefused  # noqa: E402
from common.cli import parse  # noqa: E402
from common.console import RunConsole  # noqa: E402
from common.data import GlobalBatchSampler, WorkerSeeder, epoch_batches, to_device  # noqa: E402
from common.errors import ConfigError  # noqa: E402
from common.freeze import apply_policy, set_train_mode  # noqa: E402
from common.ivif.demo import ensure_ivif_demo  # noqa: E402
from common.lossdump import LossSeries, save_mat  # noqa: E402
from common.preempt import Preemption  # noqa: E402
from common.resume import mark_complete, plan_resume, read_complete  # noqa: E402
from common.run import (AcceleratorSettings, check_amp_invariant, end_processes, end_stage,  # noqa: E402
                        exit_on_user_error, parameter_fingerprints, seed_everything, start_accelerator)
from common.runfolder import RunFolder  # noqa: E402
from common.schedules import apply_schedule, set_base_lrs  # noqa: E402
from common.state import TrainState, compare_signature  # noqa: E402
from common.step import OptimStep  # noqa: E402
from maefuse import recipe  # noqa: E402
from maefuse.data import build_training_dataset, discover_extra_images, discover_pairs  # noqa: E402
from maefuse.evaluate import EvaluateArgs, evaluate  # noqa: E402
from maefuse.inference import FuseArgs, fuse, write_samples  # noqa: E402
from maefuse.modes import build_optimizer, get_mode, mode_loss, reconstruction_mse  # noqa: E402
from maefuse.weights import is_save_epoch  # noqa: E402

SCRIPT = recipe.SCRIPT


def train_stage(stage: Stage, previous: Stage | None, resume: str, cfg: TrainConfig, data: dict, accelerator,
                console, run: RunFolder, preemption: Preemption, argv: list[str]) -> int | None:
    """Train one stage to its last epoch (a finished one is skipped). Returns an exit code when the command must
    stop now (--stop_after, a stop signal), else None."""
    spec = get_mode(stage.mode)
    is_main = accelerator.is_main_process
    checkpoints = CheckpointManager(recipe.checkpoint_dir(stage), recipe.STATE_PREFIX,
                                    keep_last=cfg.run.keep_checkpoints, width=6)
    files = recipe.initial_files(cfg, stage, previous)
    signature = recipe.signature(cfg, stage, data["pairs"], files)
    plan = plan_resume(resume, checkpoints.paths(), checkpoints.directory, overwrite=cfg.run.overwrite,
                       outputs=recipe.earlier_outputs(stage.folder), flag="--resume_state", folder_flag="--output_dir")
    if plan.action == "complete":
        compare_signature(checkpoints.directory / "DONE.json", plan.record["signature"], {**signature, "soft": {}},
                          cfg.run.resume_force, console.warn)
        finished = plan.record["epochs"]
        if finished >= stage.epochs:
            console.print(f"{stage.label}: complete ({finished} epochs, {stage.folder}); skipping")
            return None
        plan = plan_resume("auto", checkpoints.paths(), stage.folder / "none")  # its newest state, marker ignored
        if plan.action != "resume":
            raise ResumeRefused(f"{stage.label} finished {finished} epochs and its resumable states are gone "
                                "(--prune_finished), so it cannot be extended; start it over with --overwrite")
        console.warn(f"{stage.label}: finished {finished} epochs before; continuing to {stage.epochs}")

    # Data: epoch e's order depends only on (seed, e), for any number of processes.
    extras = data["extra_images"] if stage.mode == "train_decoder_only" else ()
    dataset = build_training_dataset(data["pairs"], cfg.model.size().img_size, stage.mode, extras)
    sampler = GlobalBatchSampler(len(dataset), cfg.batch_size, cfg.seed, accelerator.process_index,
                                 accelerator.num_processes, drop_last=data["drop_last"])
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         worker_init_fn=WorkerSeeder(cfg.seed, accelerator.process_index),
                                         pin_memory=accelerator.device.type == "cuda")
    iters_per_epoch = len(sampler)
    total_steps = iters_per_epoch * stage.epochs

    # Model, freeze policy and optimizer: the random initialisation depends on the seed only.
    seed_everything(cfg.seed)
    per_device = sorted({len(indices) for indices in sampler})  # the last batch may be smaller
    model, loaded = recipe.build_stage_model(cfg, stage, files, per_device, console.print, console.warn)
    policy = spec.policy()
    apply_policy(model, policy)
    # Fused AdamW (also on the CPU) skips a non-finite step on the device: no host synchronisation per step.
    optimizer = build_optimizer(model, lr=stage.lr, weight_decay=cfg.weight_decay, fused=True)
    set_base_lrs(optimizer, stage.lr)
    schedule = recipe.make_schedule(cfg, total_steps, iters_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)  # a fresh DDP wrapper registers this stage's set
    check_amp_invariant(accelerator)
    inner = accelerator.unwrap_model(model)
    stepper = OptimStep(accelerator, optimizer, model, max_nonfinite=recipe.MAX_NONFINITE_STEPS, warn=console.warn)
    series = LossSeries((*spec.loss_names, "lr"))
    state = TrainState(accelerator, SCRIPT, checkpoints, stage=stage.mode, warn=console.warn,
                       trainable=recipe.TrainableWeights(inner), optimizer=optimizer, series=series,
                       step_counters=stepper)
    state.signature = signature
    position = state.position
    recon: dict = {}
    if plan.action == "resume":
        saved = state.restore(plan.path, force=cfg.run.resume_force,
                              allow=("mixed_precision", "world_size") if cfg.run.resume_force else ())
        recon = saved.get("reconstruction_mse") or {}
        epoch, batch = divmod(position.step, iters_per_epoch)
        console.print(f"{stage.label}: resumed from {plan.path} at iteration {position.step} (epoch {epoch + 1}, "
                      f"batch {batch})")
    run.open(SCRIPT, cfg, argv, resume_args=("--resume_state", "auto"))
    run.remove(plan.remove, f"{stage.label}: --overwrite")
    for line in recipe.banner(cfg, stage, inner, len(dataset), iters_per_epoch, accelerator):
        console.print(line)
    recon_batches = data["recon_batches"] if spec.name == "train_decoder_only" else None
    if recon_batches and is_main and "before" not in recon:
        recon["before"] = reconstruction_mse(inner, recon_batches, accelerator.device)
        console.print(f"{stage.label}: reconstruction MSE before training {recon['before']:.4f}")
    if cfg.tensorboard:
        accelerator.init_trackers(str((stage.folder / "tensorboard").relative_to(cfg.output_dir)))

    # The loop, keyed by the optimizer step (one iteration = one step: MaeFuse has no accumulation).
    set_train_mode(inner, policy)  # frozen modules in eval mode
    batches = epoch_batches(loader, position)
    started, steps_at_start = time.perf_counter(), position.step
    console.start(total_steps, stage.mode, completed=position.step)
    while position.step < total_steps:
        batch = to_device(next(batches), accelerator.device)
        lr = apply_schedule(optimizer, schedule, position.step)[0]
        terms = mode_loss(model, spec, batch["vi"], batch["ir"])  # forward on the mode's route, loss in fp32
        stepper(terms["loss"])  # backward, AdamW step (a non-finite step is skipped), zero_grad
        series.append({**{name: terms[name].detach() for name in spec.loss_names}, "lr": lr})
        position.step += 1
        end_of_epoch = position.next_batch(iters_per_epoch)
        console.advance(position.step)

        if position.step % cfg.log_every == 0 or end_of_epoch:
            stepper.check()
            series.flush(accelerator)
            means = recipe.window_means(series.tail(recipe.log_window_start(position.step, cfg.log_every,
                                                                            iters_per_epoch)))
            speed = console.rate(position.step)[0] * cfg.batch_size
            console.log(position.step, {"loss": means["loss"], "lr": lr},
                        line=recipe.log_line(stage, position.step, iters_per_epoch, means, lr, speed))
            if cfg.tensorboard:
                accelerator.log({f"{stage.mode}/{name}": value for name, value in means.items()}, step=position.step)
        saving = False
        if end_of_epoch:  # the epoch summary, loss dump, samples and exports (main process), then the state
            epoch = position.epoch - 1
            saving = is_save_epoch(epoch, stage.epochs, cfg.save_every)
            means = recipe.window_means(series.tail(position.step - iters_per_epoch))
            console.print(f"{stage.label} | epoch {epoch + 1}/{stage.epochs} done | "
                          + " ".join(f"{name} {value:.4f}" for name, value in means.items() if name != "lr")
                          + f" | {time.perf_counter() - started:.1f}s")
            if is_main:
                save_mat(recipe.mat_path(stage.folder, epoch), series.arrays())
                if data["samples"] and is_save_epoch(epoch, stage.epochs, cfg.val_every):
                    write_samples(inner, data["samples"], stage.folder / "samples" / f"epoch{epoch}", spec.sample_path)
                if saving:
                    for path in recipe.export_epoch(inner, stage, epoch, cfg):
                        console.print(f"saved {path}")
        stop = position.step == cfg.run.stop_after and position.step < total_steps
        preempted = preemption.should_stop(position.step)
        every = cfg.run.checkpoint_every and position.step % cfg.run.checkpoint_every == 0
        if saving or every or stop or preempted:
            path = state.save(extra={"reconstruction_mse": recon})
            if stop or preempted:
                return preemption.halt(console, stage.label, path, stopped=stop, at=f"iteration {position.step}",
                                       flag="--stop_after")
    console.stop()
    stepper.check()

    # The stage's end: every process must hold the same weights; plots and the completion marker.
    loop_seconds = time.perf_counter() - started
    fingerprints = parameter_fingerprints(accelerator, inner)
    if len(set(fingerprints)) > 1:
        console.warn(f"{stage.label}: the processes ended with DIFFERENT weights: {fingerprints}")
    if is_main:
        if recon_batches:
            recon["after"] = reconstruction_mse(inner, recon_batches, accelerator.device)
            console.print(f"{stage.label}: reconstruction MSE {recon['before']:.4f} -> {recon['after']:.4f}")
        recipe.plot_losses(stage, series.arrays(), iters_per_epoch)
        done = position.step - steps_at_start
        timing = {"loop_seconds": loop_seconds, "iterations_this_run": done,
                  "images_per_second": done * cfg.batch_size / loop_seconds if loop_seconds else None}
        mark_complete(checkpoints.directory, recipe.completion_record(stage, cfg, position.step, signature,
                                                                      fingerprints, loaded, recon or None, timing))
        console.print(f"{stage.label}: finished {position.step} iterations in {loop_seconds:.1f}s; "
                      f"{recipe.final_weights(stage)[1]}")
    if cfg.run.prune_finished:
        run.remove(checkpoints.paths(), f"{stage.label}: finished (--prune_finished)")
    end_stage(accelerator)  # the next stage prepares its own model, optimizer and trackers
    return None


def main(cfg: TrainConfig, notices: list[str], argv: list[str]) -> int:
    """Train the stages of the config in order; the demo then fuses and scores its held-out pairs."""
    started = time.perf_counter()
    stages = stage_plan(cfg)
    accelerator, console = start_accelerator(AcceleratorSettings(
        mixed_precision=cfg.mixed_precision, log_with_tensorboard=cfg.tensorboard), project_dir=cfg.output_dir)
    for notice in notices:
        console.print(notice)
    if cfg.uses_demo_data:
        with accelerator.main_process_first():
            ensure_ivif_demo(cfg.demo_root, cfg.demo_seed)
    # Everything that can refuse the run is checked before anything is written: data, settings, then each stage.
    with recipe.warnings_to(console.warn):
        pairs = discover_pairs(cfg.data_path, cfg.split, cfg.max_pairs)
        extra_images = discover_extra_images(cfg.extra_images) if cfg.extra_images is not None else []
    if cfg.batch_size % accelerator.num_processes:
        raise ConfigError(f"--batch_size {cfg.batch_size} (global) is not divisible by "
                          f"{accelerator.num_processes} processes")
    size = cfg.model.size()
    data = {"pairs": pairs, "extra_images": extra_images, "samples": recipe.sample_pairs(pairs),
            "drop_last": 0 < len(pairs) % cfg.batch_size < accelerator.num_processes,
            "recon_batches": recipe.reconstruction_batches(pairs[:cfg.recon_pairs], size.img_size)}
    if data["drop_last"]:
        console.warn(f"the last batch of {len(pairs) % cfg.batch_size} pair(s) cannot be shared by "
                     f"{accelerator.num_processes} processes; it is dropped every epoch")
    run = RunFolder(cfg.output_dir, accelerator, console)
    preemption = Preemption(accelerator, every=cfg.log_every)
    try:
        previous, resume = None, cfg.resume_state
        for stage in stages:
            # A state file given to --resume_state belongs to the first unfinished stage; later ones use auto.
            unfinished = resume in ("auto", "never") or read_complete(recipe.checkpoint_dir(stage)) is None
            code = train_stage(stage, previous, resume if unfinished else "auto", cfg, data, accelerator, console,
                               run, preemption, argv)
            if code is not None:
                return code
            if unfinished and resume not in ("auto", "never"):
                resume = "auto"
            previous = stage
    finally:
        preemption.restore()
    final = recipe.final_weights(stages[-1])[1]
    results = {"weights": final, "loss plots": stages[-1].folder / "loss" / "loss.png",
               "tensorboard": cfg.output_dir}
    if accelerator.is_main_process:
        if cfg.uses_demo_data:
            report = recipe.write_demo_report(cfg, final, console.print, started)
            results.update({"report": report, "fused grid": cfg.output_dir / "eval" / "fusion_grid.png",
                            "metrics": cfg.output_dir / "eval" / "summary.json"})
        elif data["samples"]:
            results["samples"] = stages[-1].folder / "samples" / f"epoch{stages[-1].epochs - 1}" / "grid.png"
        fuse_data = cfg.demo_root / "test" if cfg.uses_demo_data else cfg.data_path
        run.finish(results, recipe.next_steps(cfg, final, fuse_data),
                   title=f"done in {time.perf_counter() - started:.1f}s")
    accelerator.wait_for_everyone()
    end_processes(accelerator)
    return 0


def fuse_command(argv: list[str]) -> int:
    """`train_mae_fusion.py fuse`: fuse IR/VIS pairs with a full weight file (spec §7)."""
    args = parse(FuseArgs, argv, use_underscores=True)
    console = RunConsole()
    with recipe.warnings_to(console.warn):
        fuse(args, log=console.print)
    return 0


def evaluate_command(argv: list[str]) -> int:
    """`train_mae_fusion.py evaluate`: metrics of fused images and their baselines (spec §7)."""
    args = parse(EvaluateArgs, argv, use_underscores=True)
    console = RunConsole()
    with recipe.warnings_to(console.warn):
        summary = evaluate(args, log=console.print)
    console.print(json.dumps({"n_images": summary["n_images"], "beats_average": summary.get("beats_average")}))
    return 0


def cli(argv: list[str] | None = None) -> int:
    """Run `train` (the default when the first argument is a flag), `fuse` or `evaluate`; bad input becomes one
    `error:` line and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command, rest = (argv[0], argv[1:]) if argv and argv[0] in ("train", "fuse", "evaluate") else ("train", argv)
    if command == "fuse":
        return exit_on_user_error(lambda: fuse_command(rest))
    if command == "evaluate":
        return exit_on_user_error(lambda: evaluate_command(rest))
    return exit_on_user_error(lambda: main(*resolve_train_config(rest), argv))


if __name__ == "__main__":
    sys.exit(cli())
