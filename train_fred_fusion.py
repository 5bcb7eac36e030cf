"""Train an RGB + Event YOLOv5 (v5.0) drone detector on FRED.

FRED (Magrini et al., "FRED: The Florence RGB-Event Drone Dataset", arXiv:2506.05163) pairs RGB video with event
camera frames of flying drones. ``--modality dual`` (default) trains two CSPDarknet backbones, one per stream, fused
at three feature levels (concat, add or channel attention) in front of bubbliiiing's YOLOv5 v5.0 neck and heads;
``--modality rgb`` / ``event`` train a plain single-stream YOLOv5. Training runs bubbliiiing's two stages in one
loop: backbones frozen for ``freeze_epoch`` epochs, then everything trains at the unfreeze batch. Without a data
root, the generated demo dataset and the demo preset are used (about 3 minutes on 2 CPU cores).

    python train_fred_fusion.py                                   # demo: generate, train, evaluate
    accelerate launch train_fred_fusion.py --fred-root /data/FRED # paper settings (YOLOv5-m, 640², 300 epochs)
    python train_fred_fusion.py --fred-root /data/FRED --modality rgb --phi s --quick-test
    python train_fred_fusion.py --fred-root /data/FRED --eval-only   # best weights on the test split

Rerunning a command continues its run (--resume auto), also from the middle of an epoch; SIGTERM or Ctrl-C saves
a full state and exits (75 / 130). Outputs: logs/fred_fusion/ (spec §6.1).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (first: it makes OpenMP wait passively, which must be set before torch loads)
import torch  # noqa: E402

# The configuration (paper defaults, demo preset, every flag with its help): fred/config.py.
from fred.config import FredConfig, resolve_config  # noqa: E402

from common.data import epoch_batches, to_device  # noqa: E402
from common.ema import ModelEMA  # noqa: E402
from common.freeze import apply_policy, set_train_mode, switch_stage  # noqa: E402
from common.lossdump import LossSeries  # noqa: E402
from common.preempt import Preemption  # noqa: E402
from common.resume import mark_complete, plan_resume  # noqa: E402
from common.run import (AcceleratorSettings, broadcast_from_main, check_amp_invariant, end_processes,  # noqa: E402
                        exit_on_user_error, seed_everything, start_accelerator)
from common.runfolder import RunFolder  # noqa: E402
from common.schedules import apply_schedule, set_base_lrs  # noqa: E402
from common.state import TrainState  # noqa: E402
from common.step import OptimStep  # noqa: E402
from common.tracking import Best, History  # noqa: E402
from fred import outputs, recipe  # noqa: E402
from fred.dataset import eval_loader, load_data, train_loader  # noqa: E402
from fred.evaluate import eval_settings, evaluate_detections, validation_loss, write_results  # noqa: E402
from fred.index import CLASS_NAMES, SPLITS  # noqa: E402
from fred.loss import YOLOLoss  # noqa: E402
from fred.model import build_model  # noqa: E402
from fred.weights import load_pretrained, summarize_report  # noqa: E402

SCRIPT = "train_fred_fusion.py"


def main(cfg: FredConfig, notices: list[str], argv: list[str]) -> int:
    """Set up, train freeze -> unfreeze, evaluate, export. Returns the exit code."""
    if cfg.quick_test:
        cfg = recipe.quick_test_config(cfg)
    run_dir = cfg.run_dir
    accelerator, console = start_accelerator(AcceleratorSettings(
        mixed_precision=cfg.mixed_precision, log_with_tensorboard=not cfg.eval_only), project_dir=run_dir)
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    for notice in notices:
        console.print(notice)
    if cfg.eval_only:
        outputs.evaluate_only(cfg, console, accelerator)
        return 0

    # Everything that can refuse the run is checked before anything is written: data, then the run folder.
    with accelerator.main_process_first():
        data = load_data(cfg, console.print)
    for stage in {recipe.stage_of(epoch, cfg) for epoch in range(recipe.end_epoch(cfg))}:
        train_loader(data, cfg, stage, rank, world)  # raises for a batch the training split cannot fill
    meta = recipe.config_meta(cfg)
    plan = plan_resume(cfg.resume, outputs.state_files(run_dir), run_dir, overwrite=cfg.run.overwrite,
                       outputs=outputs.exported_files(run_dir), epochs=recipe.end_epoch(cfg))
    if plan.action == "complete":
        console.print(f"complete: {run_dir} finished {plan.record['epochs']} epochs ({run_dir / 'DONE.json'}); "
                      f"nothing to do. Its weights: {run_dir / outputs.FINAL_WEIGHTS}")
        return 0
    seed_everything(cfg.seed)
    model = build_model(cfg.modality, cfg.phi, len(CLASS_NAMES),
                        fusion_mode=cfg.fusion_mode if cfg.modality == "dual" else None,
                        compression_ratio=cfg.compression_ratio if cfg.modality == "dual" else None,
                        discriminator=cfg.discriminator and cfg.modality == "dual")
    if cfg.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    policies = recipe.freeze_policies(model, cfg)
    optimizer = recipe.build_optimizer(model, cfg)  # built once: its momentum survives the switch
    apply_policy(model, policies[recipe.stage_of(0, cfg)])
    ema = ModelEMA(model).to(accelerator.device)  # before prepare: the EMA copies the plain forward
    model, optimizer = accelerator.prepare(model, optimizer)
    stepper = OptimStep(accelerator, optimizer, model, max_grad_norm=cfg.grad_clip,
                        max_nonfinite=recipe.MAX_NONFINITE_STEPS, warn=console.warn)
    series = LossSeries(recipe.STEP_SERIES)
    history, best = History(recipe.HISTORY), Best(*recipe.best_metric(cfg))
    state = TrainState(accelerator, SCRIPT, stage=recipe.stage_of(0, cfg), warn=console.warn, model=model, ema=ema,
                       optimizer=optimizer, history=history, best=best, series=series, step_counters=stepper)
    state.signature = recipe.signature(cfg, meta)
    position = state.position
    log_subdir, report = outputs.RunLog.new_subdir(), None
    if plan.action == "resume":
        checkpoint = state.read(plan.path)
        saved = state.position_of(checkpoint)
        state.stage = recipe.saved_stage(saved.epoch, saved.batch, cfg)
        if state.stage != recipe.stage_of(0, cfg):
            model, _ = switch_stage(accelerator, model, policies[state.stage])
            stepper.set_model(model)
        state.load(checkpoint, plan.path, force=cfg.run.resume_force)
        log_subdir = checkpoint["log_subdir"]
        console.print(f"resumed from {plan.path} at epoch {position.epoch}, batch {position.batch} "
                      f"({state.stage} stage)")
    elif cfg.pretrained is not None:
        report = load_pretrained(accelerator.unwrap_model(model), cfg.pretrained, cfg.event_backbone_init)
    run = RunFolder(run_dir, accelerator, console)
    run.open(SCRIPT, cfg, argv)
    run.remove(plan.remove, "--overwrite")
    log = outputs.RunLog(run_dir, log_subdir, is_main)
    if is_main:
        outputs.write_run_files(log, cfg, report)
        log.truncate_fusion_stats(position.epoch)
    for split in SPLITS:
        console.print(f"Fusion info [{split}]: {data.index.stats(split).line()}")
    console.print(f"model {recipe.describe_meta(meta)}, {cfg.optimizer}, epochs {cfg.epochs} (freeze "
                  f"{cfg.freeze_epoch if recipe.freeze_runs(cfg) else 0}), batch {cfg.freeze_batch_size}/"
                  f"{cfg.unfreeze_batch_size} x {world} process(es), precision {accelerator.mixed_precision}, "
                  f"run folder {run_dir}")
    if report is not None:
        console.print(f"weights: {summarize_report(report)}")
    elif plan.action != "resume":
        console.warn("no --pretrained weights: random init")
    accelerator.init_trackers(log.subdir)

    criterion = YOLOLoss(len(CLASS_NAMES), cfg.input_shape)
    max_batches = cfg.quick_test_batches if cfg.quick_test else None
    val_loader = eval_loader(data.val, cfg) if is_main and len(data.val) else None
    stage_files = {name: outputs.stage_checkpoints(run_dir, name, cfg.keep_stage_checkpoints) for name in policies}
    end = recipe.end_epoch(cfg)
    preemption = Preemption(accelerator, every=cfg.log_interval)
    console.print(recipe.stage_banner(state.stage, cfg))
    console.start(sum(recipe.steps_per_epoch(len(data.train), cfg, recipe.stage_of(e, cfg), world)
                      for e in range(end)), "train", completed=position.step)

    # The loop, keyed by the optimizer step; an epoch's first step sets it up, its last one evaluates and saves.
    loader = None
    while position.epoch < end:
        epoch = position.epoch
        if position.batch == 0 or loader is None:
            if recipe.stage_of(epoch, cfg) != state.stage:  # the switch: re-wrap, then the new batch and lrs
                state.stage = recipe.stage_of(epoch, cfg)
                model, _ = switch_stage(accelerator, model, policies[state.stage])
                stepper.set_model(model)
                ema.updates = recipe.steps_per_epoch(len(data.train), cfg, state.stage, world) * epoch
                check_amp_invariant(accelerator)
                console.print(recipe.stage_banner(state.stage, cfg))
            loader = train_loader(data, cfg, state.stage, rank, world)
            steps_in_epoch = recipe.steps_per_epoch(len(data.train), cfg, state.stage, world)
            fitted = recipe.fitted_lrs(cfg, recipe.stage_batch(cfg, state.stage) * world)
            set_base_lrs(optimizer, *fitted)
            lr = apply_schedule(optimizer, recipe.lr_schedule(cfg.epochs), epoch)[0]
            set_train_mode(accelerator.unwrap_model(model), policies[state.stage])
            batches = epoch_batches(loader, position)
            epoch_started = time.perf_counter()
        batch = next(batches)
        drops = recipe.drop_flags(batch, cfg, epoch, position.batch, rank)
        batch = to_device(batch, accelerator.device)
        with accelerator.accumulate(model):
            terms = recipe.training_losses(model, batch, cfg, criterion, accelerator, drops)  # forward + loss
            result = stepper(terms["loss"])  # backward, step (a non-finite step is skipped), zero_grad
        ema.update(accelerator.unwrap_model(model), result.applied)
        series.append({**{name: terms[name].detach() for name in recipe.STEP_SERIES if name != "lr"}, "lr": lr})
        position.step += 1
        end_of_epoch = position.next_batch(steps_in_epoch)
        console.advance(position.step)
        if position.step % cfg.log_interval == 0:
            stepper.check()
            window = series.flush(accelerator)
            console.log(position.step, {"epoch": f"{epoch + 1}/{cfg.epochs}",
                                         "loss": recipe.epoch_means({"loss": window["loss"]})["loss"], "lr": lr})
        stop = position.step == cfg.run.stop_after
        preempted = preemption.should_stop(position.step)

        if end_of_epoch:  # validation with the EMA model, mAP on evaluation epochs, history, files, states
            stepper.check()
            series.flush(accelerator)
            completed = position.epoch
            means = recipe.epoch_means(series.tail(position.step - steps_in_epoch))
            val_loss, summary = float("nan"), None
            if is_main and val_loader is not None:
                val_loss = validation_loss(ema.module, val_loader, criterion, cfg.modality, accelerator.device,
                                           accelerator.autocast, max_batches)
                if cfg.eval_map and (completed % cfg.eval_period == 0 or completed == end):
                    summary = evaluate_detections(ema.module, val_loader, cfg.modality, cfg.input_shape,
                                                  run_dir / outputs.RESULTS_DIR, "val", accelerator.device,
                                                  accelerator.autocast, eval_settings(cfg, max_batches), data.dark)
                    write_results(run_dir / outputs.RESULTS_DIR / "results.txt", summary,
                                  f"EMA model after epoch {completed}")
            metrics = {"loss": means["loss"], "val_loss": val_loss,
                       "ap50": summary["ap50"] if summary else float("nan"),
                       "ap50_95": summary["ap50_95"] if summary else float("nan")}
            metrics = broadcast_from_main(accelerator, metrics)  # every process records the same history
            history.append(epoch=completed, stage=float(state.stage == "unfreeze"), lr=lr, **metrics)
            improved = best.update(metrics[best.metric], completed)
            if is_main:
                outputs.report_epoch(console, accelerator, log, cfg, data, history, series, means, summary, best,
                                     state.stage, time.perf_counter() - epoch_started, final=completed == end)
                # Exports first, then the states: a state never records a best model that was not written.
                outputs.export_epoch(run_dir, cfg, ema.state_dict(), meta, completed, end, metrics, improved)
            extra = outputs.state_extra(cfg, meta, state.stage, completed, log.subdir, means["loss"], fitted, optimizer)
            stage_end = completed == end or (state.stage == "freeze" and completed == cfg.freeze_epoch)
            if completed % cfg.save_period == 0 or stage_end:
                state.save(stage_files[state.stage].path_for(completed), extra=extra)
                if is_main:
                    stage_files[state.stage].prune()
            state.save(run_dir / outputs.LAST_STATE, extra=extra)
        elif stop or preempted or (cfg.run.checkpoint_every and position.step % cfg.run.checkpoint_every == 0):
            state.save(run_dir / outputs.LAST_STATE, extra=outputs.state_extra(
                cfg, meta, state.stage, position.epoch, log.subdir, float("nan"), fitted, optimizer))
        if stop or preempted:
            return preemption.halt(console, state.stage, run_dir / outputs.LAST_STATE, stopped=stop,
                                   at=f"step {position.step}")
    console.stop()

    # Final: the EMA model on the test split, exported as fred_fusion_final.pth; the run is then complete.
    if is_main:
        final_metrics = outputs.final_evaluation(cfg, ema.module, data, accelerator, run_dir, log, max_batches,
                                                 console)
        outputs.export_weights(run_dir / outputs.FINAL_WEIGHTS, ema.state_dict(), meta, end, final_metrics)
        if cfg.quick_test:
            outputs.check_quick_test(run_dir / outputs.FINAL_WEIGHTS, ema.module, val_loader, cfg, history)
            console.print("quick test passed")
        if end == cfg.epochs:
            mark_complete(run_dir, {"epochs": end, "model_meta": meta, "metrics": final_metrics,
                                    "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        run.finish(outputs.result_files(run_dir, log), outputs.next_steps(cfg, run_dir, end))
    accelerator.wait_for_everyone()
    end_processes(accelerator)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """Parse the command line and run; bad input becomes one `error:` line and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return exit_on_user_error(lambda: main(*resolve_config(argv), argv))


if __name__ == "__main__":
    sys.exit(cli())
