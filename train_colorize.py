"""Train exemplar-based video colorization: a frozen flow module, SwinTExCo's exemplar branch and a fusion net.

FlowChroma (Josh0318coder/FlowChroma) colorizes a gray video from one colour reference. For every frame a frozen
optical-flow module carries the previous output colour forward, SwinTExCo's exemplar branch (Chronopt-Research/
SwinTExCo, ESWA 2025: frozen Swin embed_net, trainable nonlocal_net, frozen colornet) matches the frame against the
reference and transfers its colour, and a trainable fusion net merges the two. Colour reaches the system only
through the reference and its own previous outputs. Strategy 1 fine-tunes a SwinTExCo checkpoint folder's
nonlocal_net (lr 1e-5); Strategy 2 trains it from scratch (1e-4).

    python train_colorize.py                                        # no data root: generated demo, about 3 minutes
    accelerate launch train_colorize.py --data.dataset /data/DAVIS --data.imagenet /data/refs   # paper settings
    python train_colorize.py --data.dataset /data/DAVIS --exemplar.swintexco-ckpt ckpt/swintexco  # Strategy 1
    python train_colorize.py eval --checkpoint runs/colorize/demo/fusion_best.pth                 # spec §7

Rerunning a command continues its run (--resume auto), also inside an epoch or an accumulation window; SIGTERM or
Ctrl-C saves a state and exits (75 / 130). Outputs: --train.output-dir (spec §6, colorize/outputs.py).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (first: it makes OpenMP wait passively, which must be set before torch loads)
import torch  # noqa: E402

# The configuration (paper defaults, demo preset, every flag with its help): colorize/config.py.
from colorize.config import ColorizeConfig, resolve_config, resolve_eval_command  # noqa: E402

from colorize import outputs, recipe  # noqa: E402
from colorize.data import ClipDataset, find_sequences, find_validation_sequences  # noqa: E402
from colorize.demo_data import ensure_demo_dataset  # noqa: E402
from colorize.evaluate import evaluate, load_evaluation_system, read_recorded_config  # noqa: E402
from colorize.loss import FusionLoss  # noqa: E402
from colorize.system import FusionSystem  # noqa: E402
from common.data import GlobalBatchSampler, WorkerSeeder, epoch_batches, to_device  # noqa: E402
from common.errors import DataError  # noqa: E402
from common.lossdump import LossSeries  # noqa: E402
from common.preempt import Preemption  # noqa: E402
from common.resume import mark_complete, plan_resume, read_complete  # noqa: E402
from common.run import (AcceleratorSettings, broadcast_from_main, check_amp_invariant, end_processes,  # noqa: E402
                        exit_on_user_error, parameter_fingerprints, seed_everything, start_accelerator)
from common.runfolder import RunFolder  # noqa: E402
from common.schedules import apply_schedule  # noqa: E402
from common.state import TrainState, compare_signature  # noqa: E402
from common.step import OptimStep  # noqa: E402
from common.tracking import Best, History  # noqa: E402

SCRIPT = "train_colorize.py"


def main(cfg: ColorizeConfig, notices: list[str], argv: list[str]) -> int:
    """Set up, train, validate, export. Returns the exit code."""
    run_dir, length = cfg.train.output_dir, cfg.data.sequence_length
    accelerator, console = start_accelerator(AcceleratorSettings(
        mixed_precision=recipe.resolve_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.optim.accumulation_steps, log_with_tensorboard=cfg.train.tensorboard),
        project_dir=run_dir)
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if accelerator.device.type == "cpu":
        torch.set_flush_denormal(True)  # the contextual loss's softmax tails are denormal: ~10 % of a CPU step
    for notice in notices:
        console.print(notice)

    # Everything that can refuse the run is checked before anything is written: data, plan, weights, the state.
    if cfg.uses_demo_data:
        with accelerator.main_process_first():
            ensure_demo_dataset(cfg.data.demo_root, cfg.data.demo_seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sequences, skipped = find_sequences(cfg.data.dataset, cfg.data.split, length)
        val_sequences = find_validation_sequences(cfg.data, length)
        dataset = ClipDataset(sequences, cfg.data, train=True, seed=cfg.train.seed)
        if cfg.train.batch_size % world or len(dataset) < cfg.train.batch_size:
            raise DataError(f"{len(dataset)} training clips of {length} frames for --train.batch-size "
                            f"{cfg.train.batch_size} over {world} process(es): the batch must divide evenly between "
                            "the processes and fit the clips")
        record = read_complete(run_dir)
        budget_spent = record is not None and record.get("stopped_by") == "time budget" and (
            0 < cfg.train.time_budget_s <= record["training_seconds"])
        plan = plan_resume(cfg.resume, outputs.checkpoint_manager(run_dir, 0).paths(), run_dir,
                           overwrite=cfg.run.overwrite, outputs=outputs.exported_files(run_dir),
                           epochs=None if budget_spent else cfg.train.epochs, folder_flag="--train.output-dir")
        if plan.record is not None:  # finished before: continued or reported only with the same model and data
            compare_signature(run_dir / "DONE.json", plan.record["signature"],
                              {"strict": recipe.signature(cfg, {})["strict"], "soft": {}}, cfg.run.resume_force,
                              console.warn)
        if plan.action == "complete":
            console.print(f"complete: {run_dir} finished ({plan.record['steps']} steps, "
                          f"{plan.record['stopped_by']}; {run_dir / 'DONE.json'}); nothing to do. Its weights: "
                          f"{run_dir / outputs.BEST}")
            return 0
        seed_everything(cfg.train.seed)
        system = FusionSystem(cfg.flow, cfg.exemplar, fusion=cfg.fusion, image_size=cfg.data.image_size)
    setup_warnings = list(dict.fromkeys(str(w.message) for w in caught))
    weights = recipe.weight_identities(system)
    optimizer = recipe.build_optimizer(system, cfg)
    criterion = FusionLoss(cfg.loss, system.embed_net)
    discriminator, optimizer_d = recipe.build_discriminator(cfg)
    gan_parts = [discriminator, optimizer_d] if discriminator is not None else []
    model, optimizer, *gan_parts = accelerator.prepare(system, optimizer, *gan_parts)
    check_amp_invariant(accelerator)
    inner = accelerator.unwrap_model(model)
    stepper = OptimStep(accelerator, optimizer, model, max_grad_norm=cfg.optim.grad_clip,
                        max_nonfinite=recipe.MAX_NONFINITE_STEPS, warn=console.warn)
    series, history, window = LossSeries(recipe.STEP_SERIES), History(recipe.HISTORY), recipe.WindowMeans()
    best = Best("val_psnr", "max") if val_sequences else Best("total", "min")
    budget = recipe.TrainingBudget(cfg.train.time_budget_s, every=cfg.train.log_every)
    checkpoints = outputs.checkpoint_manager(run_dir, cfg.run.keep_checkpoints)
    objects = dict(nonlocal_net=inner.nonlocal_net, fusion_net=inner.fusion_net, optimizer=optimizer, series=series,
                   history=history, best=best, window=window, budget=budget, step_counters=stepper)
    gan_models = []
    if gan_parts:
        d_model, optimizer_d = gan_parts
        d_inner = accelerator.unwrap_model(d_model)
        d_stepper = OptimStep(accelerator, optimizer_d, d_model, warn=console.warn)
        gan_models = [d_model]
        objects.update(discriminator=d_model, optimizer_d=optimizer_d, discriminator_counters=d_stepper)
    state = TrainState(accelerator, SCRIPT, checkpoints, warn=console.warn, **objects)
    state.signature = recipe.signature(cfg, weights)
    position = state.position
    if plan.action == "resume":
        state.restore(plan.path, force=cfg.run.resume_force,
                      allow=("mixed_precision", "world_size") if cfg.run.resume_force else ())
        window.to(accelerator.device)
        console.print(f"resumed from {plan.path} at step {position.step} (epoch {position.epoch + 1}, micro-batch "
                      f"{position.batch}; {budget.spent_before:.0f} s trained before)")
    run = RunFolder(run_dir, accelerator, console)
    run.open(SCRIPT, outputs.config_record(cfg, inner, setup_warnings), argv)
    run.remove(plan.remove, "--overwrite")
    for message in setup_warnings:
        console.warn(message)
    for line in recipe.startup_panel(inner, optimizer, cfg):
        console.print(line)

    sampler = GlobalBatchSampler(len(dataset), cfg.train.batch_size, cfg.train.seed, rank, world)
    # The loader draws its workers' base seed from its own generator, not from the global RNG that dropout uses:
    # a resumed run creates an epoch's iterator where the uninterrupted run did not, and must draw the same dropout.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.workers,
                                         worker_init_fn=WorkerSeeder(cfg.train.seed, rank),
                                         generator=torch.Generator().manual_seed(cfg.train.seed),
                                         pin_memory=accelerator.device.type == "cuda")
    micro_per_epoch, accumulation = len(sampler), cfg.optim.accumulation_steps
    total_steps = micro_per_epoch * cfg.train.epochs // accumulation
    total_micro = total_steps * accumulation  # a last, incomplete accumulation window is not trained
    console.print(f"{len(sequences)} training sequences ({skipped} shorter than {length} frames skipped), "
                  f"{len(dataset)} clips, {len(val_sequences)} validation sequences; {cfg.data.image_size}px, batch "
                  f"{cfg.train.batch_size} x {accumulation} accumulation over {world} process(es) on "
                  f"{accelerator.device}, precision {accelerator.mixed_precision}; {micro_per_epoch} micro-batches x "
                  f"{cfg.train.epochs} epochs = {total_steps} steps; run folder {run_dir}")
    if cfg.train.tensorboard:
        accelerator.init_trackers("tensorboard")
    schedule = recipe.lr_schedule(cfg)
    preemption = Preemption(accelerator, every=cfg.train.log_every)

    def close_epoch(epoch: int, final: bool) -> Path:
        """Epoch ``epoch`` (1-based) ends: its means, validation and exports when due (always when ``final``), the
        history, losses.mat, plots, and a resumable state (its path returned)."""
        stepper.check()
        series.flush(accelerator)
        first_step = (epoch - 1) * micro_per_epoch // accumulation
        means = {name: recipe.finite_mean(values) for name, values in series.tail(first_step).items()}
        validate = final or (cfg.train.validate_every and epoch % cfg.train.validate_every == 0)
        partial = f" (stopped at step {position.step})" if final and position.batch else ""
        scores, metrics = dict(outputs.NOT_VALIDATED), None
        if validate and is_main and val_sequences:
            started = time.perf_counter()
            metrics = evaluate(inner, val_sequences, cfg.data, cfg.eval, run_dir / outputs.EVAL_DIR,
                               accelerator.device, extra={"epoch": epoch, "step": position.step},
                               between=preemption.raise_if_requested)
            scores = outputs.validation_scores(metrics)
            console.print(f"validation after epoch {epoch}{partial} ({time.perf_counter() - started:.1f} s): "
                          f"PSNR fused {scores['val_psnr']:.2f} dB, exemplar {scores['val_psnr_exemplar']:.2f}, gray "
                          f"{scores['val_psnr_gray']:.2f}; warp error fused {scores['val_warp_error']:.5f}")
        scores = broadcast_from_main(accelerator, scores)  # every process keeps the same history
        if len(history) and history["epoch"][-1] == epoch:  # the record of a time-budget stop within this epoch
            history.truncate(len(history) - 1)
        history.append(epoch=epoch, **{name: means[name] for name in recipe.HISTORY[1:] if name in means}, **scores)
        improved = bool(validate) and best.update(scores["val_psnr"] if val_sequences else means["total"], epoch)
        if is_main:
            # Exports first, then the state: a state never records a best model that was not written.
            names = [f"epoch_{epoch}"] if final or (cfg.train.save_every and epoch % cfg.train.save_every == 0) else []
            if names or improved:
                outputs.export(run_dir, names + (["best"] if improved else []), inner, cfg, epoch, optimizer,
                               recipe.scheduler_state(optimizer, cfg, epoch), history,
                               *([d_inner, optimizer_d] if gan_models else []))
            outputs.write_losses(run_dir, series, history, micro_per_epoch / accumulation, cfg.train.batch_size)
            if validate:
                outputs.write_plots(run_dir, series, history)
            console.print(f"epoch {epoch}/{cfg.train.epochs}{partial}: " + " ".join(
                f"{name} {means[name]:.5f}" for name in ("total", "l1", "contextual", "align", "smooth"))
                + (" (best so far)" if improved else ""))
            if cfg.train.tensorboard:
                accelerator.log({f"epoch/{name}": value for name, value in {**means, **scores}.items()
                                 if value == value}, step=position.step)
            if metrics is not None and final:
                for line in outputs.metrics_table(metrics):
                    console.print(line)
        # At a run's end the state was saved before the validation; save again with this epoch's record.
        path = state.save(checkpoints.path_for(position.step) if final else None)
        if is_main and final:
            checkpoints.prune()
        return path

    # The loop, keyed by the optimizer step; epoch ends validate and export when due; stops save a state.
    batches = epoch_batches(loader, position)
    console.start(total_steps, "train", completed=position.step)
    budget.start()
    done = position.micro_step >= total_micro or budget.exhausted(accelerator, position.step)
    while not done:
        epoch = position.epoch
        lrs = apply_schedule(optimizer, schedule, epoch)
        use_gan = bool(gan_models) and recipe.gan_active(cfg, epoch)
        batch = to_device(next(batches), accelerator.device)
        with accelerator.accumulate(model, *gan_models):
            total, parts, fused = recipe.training_losses(model, criterion, batch, accelerator,
                                                         d_inner if use_gan else None)  # forward + loss
            result = stepper(total)  # backward, clip, step (a non-finite step is skipped), zero_grad
            parts["gan_d"] = torch.zeros((), device=accelerator.device)
            if use_gan:  # the discriminator's own step on the detached first frames
                parts["gan_d"] = FusionLoss.discriminator_loss(gan_models[0], fused, batch["frames_lab"])
                d_stepper(parts["gan_d"])
        window.add(parts)
        end_of_epoch = position.next_batch(micro_per_epoch)
        if result.synced:
            series.append({**window.take(), "lr_nonlocal": lrs[0], "lr_fusion": lrs[1]})
            position.step += 1
            console.advance(position.step)
            if position.step % cfg.train.log_every == 0:
                stepper.check()
                means = {label: recipe.finite_mean(values) for label, values in series.flush(accelerator).items()}
                console.log(position.step, {"epoch": f"{epoch + 1}/{cfg.train.epochs}",
                                            **{label: means[name] for label, name in recipe.LOG_FIELDS.items()},
                                            "lr_nonlocal": lrs[0], "lr_fusion": lrs[1]})
                if cfg.train.tensorboard:
                    accelerator.log({f"train/{name}": value for name, value in means.items()}, step=position.step)
        done = position.micro_step == total_micro or (result.synced and budget.exhausted(accelerator, position.step))
        stop = position.micro_step == cfg.run.stop_after and not done
        preempted = preemption.should_stop(position.step)
        every = cfg.run.checkpoint_every and position.micro_step % cfg.run.checkpoint_every == 0
        if end_of_epoch and not done:
            path = close_epoch(position.epoch, final=False)
        elif done or stop or preempted or every:
            path = state.save()
        if stop or preempted:
            return preemption.halt(console, "colorize", path, stopped=stop,
                                   at=f"micro-batch {position.micro_step} (step {position.step})")
    console.stop()

    # The end (all epochs, or the time budget): validate and export once, then the run is complete.
    final_epoch = position.epoch + (1 if position.batch else 0)
    if not len(history) or history["epoch"][-1] < final_epoch:
        close_epoch(final_epoch, final=True)
    fingerprints = parameter_fingerprints(accelerator, inner) if world > 1 else []
    if len(set(fingerprints)) > 1:
        console.warn(f"the processes ended with DIFFERENT weights: {fingerprints}")
    if is_main:
        finished = position.micro_step == total_micro
        if cfg.preset == "demo" and val_sequences:
            gates = outputs.demo_gates(history.last(), series.arrays()["l1"])
            outputs.write_demo_report(run_dir, gates)
            for line in outputs.gate_lines(gates):
                console.print(line)
        mark_complete(run_dir, {
            "epochs": cfg.train.epochs if finished else position.micro_step / micro_per_epoch, "steps": position.step,
            "stopped_by": "last epoch" if finished else "time budget", "training_seconds": budget.spent,
            "signature": {"strict": recipe.signature(cfg, {})["strict"]}, "parameter_sha256_per_rank": fingerprints,
            "best": best.state_dict(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        if not finished:
            console.print(f"time budget of {cfg.train.time_budget_s:g} s used after step {position.step} of "
                          f"{total_steps}; --train.time-budget-s 0 continues to the last epoch")
        run.finish(outputs.result_files(run_dir, cfg.preset == "demo"), outputs.next_steps(cfg, run_dir))
    if cfg.run.prune_finished:
        run.remove(checkpoints.paths(), "finished (--prune-finished)")
    end_processes(accelerator)
    return 0


def evaluate_checkpoint(argv: list[str]) -> int:
    """``train_colorize.py eval --checkpoint FILE``: evaluate a fusion checkpoint (spec §7)."""
    first = resolve_eval_command(argv, None)
    recorded = read_recorded_config(first.checkpoint)
    command = resolve_eval_command(argv, recorded)
    device = torch.device("cuda" if command.device == "cuda" or (command.device == "auto"
                                                                   and torch.cuda.is_available()) else "cpu")
    roots = command.data.val_dataset or command.data.dataset
    sequences = find_sequences(roots, command.split, recorded.data.sequence_length, short="error")[0]
    system = load_evaluation_system(command.checkpoint, recorded, command.data.image_size,
                                    command.eval_temperature).to(device)
    out = command.out or command.checkpoint.parent / f"eval_{command.checkpoint.stem}"
    print(f"evaluating {command.checkpoint} on {len(sequences)} sequence(s) of {', '.join(map(str, roots))} "
          f"({command.split}) at {command.data.image_size}px on {device}")
    metrics = evaluate(system, sequences, command.data, command.eval, out, device,
                       extra={"checkpoint": str(command.checkpoint)})
    for line in outputs.metrics_table(metrics):
        print(line)
    print(f"done: {out / 'metrics.json'}, per-sequence tables {out}/metrics_{{fused,gray,exemplar}}.csv, strips "
          f"{out / 'samples'}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """Parse the command line and run (``eval`` as the first word evaluates); bad input becomes one `error:` line
    and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:
        return exit_on_user_error(lambda: evaluate_checkpoint(argv[1:]))
    return exit_on_user_error(lambda: main(*resolve_config(argv), argv))


if __name__ == "__main__":
    sys.exit(cli())
