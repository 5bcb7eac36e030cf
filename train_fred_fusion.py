"""Train an RGB + Event YOLOv5 (v5.0) drone detector on FRED (spec/fred.md).

FRED (Magrini et al., "FRED: The Florence RGB-Event Drone Dataset", arXiv:2506.05163) pairs RGB video with event
camera frames of flying drones. ``--modality dual`` (default) trains two CSPDarknet backbones, one per stream, fused
at three feature levels (concat, add or channel attention) in front of bubbliiiing's YOLOv5 v5.0 neck and heads;
``--modality rgb`` / ``event`` train a plain single-stream YOLOv5. Training runs bubbliiiing's two stages in one
loop over epochs: backbones frozen for ``freeze_epoch`` epochs, then everything trains at the unfreeze batch.
Without a data root, the generated demo dataset and the demo preset are used (about 3 minutes on 2 CPU cores).

    python train_fred_fusion.py                                   # demo: generate, train, evaluate
    accelerate launch train_fred_fusion.py --fred-root /data/FRED # paper settings (YOLOv5-m, 640², 300 epochs)
    python train_fred_fusion.py --fred-root /data/FRED --modality rgb --phi s --quick-test
    python train_fred_fusion.py --save-dir logs/fred_fusion --resume
    python train_fred_fusion.py --fred-root /data/FRED --eval-only   # best weights on the test split

Settings and their help: fred/config.py (``--help``). Outputs: spec/fred.md §6.1.
"""

from __future__ import annotations

import shutil
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from common import checkpoint as ckpt
from common.console import RunConsole
from common.data import to_device
from common.ema import ModelEMA
from common.freeze import apply_policy, set_train_mode, switch_stage
from common.lossdump import LossSeries
from common.run import AcceleratorSettings, make_accelerator, seed_everything, write_run_record
from common.schedules import apply_schedule, set_base_lrs
from common.step import OptimStep
from fred import training as fred_training
from fred.config import FredConfig, changed_settings, resolve_config, resume_config
from fred.dataset import set_loader_epoch
from fred.evaluate import evaluate_detections, model_outputs, summary_line, validation_loss, write_results
from fred.index import CLASS_NAMES, SPLITS
from fred.loss import YOLOLoss
from fred.model import build_model, build_model_from_meta
from fred.training import (FINAL_WEIGHTS, MAX_NONFINITE_STEPS, RESULTS_DIR, SCRIPT,
                           STEP_SERIES, Best, History, RunLog, best_metric, build_optimizer, check_amp_invariant,
                           check_architecture, config_meta, end_epoch, eval_loader, eval_settings, export_weights,
                           fitted_lrs, freeze_policies, freeze_runs, full_state, load_data, lr_schedule,
                           stage_banner, stage_batch, stage_of, steps_per_epoch, train_loader, training_losses)
from fred.weights import load_pretrained, load_strict, summarize_report


def cli(argv: list[str] | None = None) -> tuple[FredConfig, str | None]:
    """The configuration (preset defaults, flags on top; a resumed run's own settings as defaults) and a notice."""
    argv = sys.argv[1:] if argv is None else argv
    cfg, notice = resolve_config(argv)
    if cfg.resume or cfg.resume_from is not None:
        path = fred_training.locate_resume(cfg)
        if path is not None:
            return resume_config(argv, fred_training.peek_state(path)["config"], path.parent), None
    return cfg, notice


def main(cfg: FredConfig, notice: str | None = None) -> int:
    """Set up, train freeze -> unfreeze over global epochs, evaluate, export. Returns the exit code."""
    if cfg.quick_test:
        cfg = fred_training.quick_test_config(cfg)
    run_dir = cfg.run_dir
    console = RunConsole()
    accelerator = make_accelerator(
        AcceleratorSettings(mixed_precision=cfg.mixed_precision, log_with_tensorboard=not cfg.eval_only),
        project_dir=run_dir, warn=console.warn)
    console = RunConsole(is_main=accelerator.is_main_process)
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if notice:
        console.print(notice)
    if cfg.eval_only:
        fred_training.evaluate_only(cfg, console, accelerator)
        return 0

    # Everything that can refuse the run is checked before anything is written.
    meta = config_meta(cfg)
    resume_path = fred_training.locate_resume(cfg)
    state = ckpt.load_checkpoint(resume_path) if resume_path is not None else None
    if state is not None:
        check_architecture(resume_path, state["model_meta"], meta)
    elif cfg.resume:
        console.print(f"--resume: no full state in {run_dir}; starting a new run")
    if cfg.quick_test and is_main:
        shutil.rmtree(run_dir, ignore_errors=True)
    if state is None and not cfg.quick_test:
        fred_training.guard_run_directory(run_dir, cfg.overwrite, console.print, remove=is_main)
    accelerator.wait_for_everyone()
    check_amp_invariant(accelerator)
    seed_everything(cfg.seed)

    with accelerator.main_process_first():
        data = load_data(cfg, console.print)
    for split in SPLITS:
        console.print(f"Fusion info [{split}]: {data.index.stats(split).line()}")
    model = build_model(cfg.modality, cfg.phi, len(CLASS_NAMES),
                        fusion_mode=cfg.fusion_mode if cfg.modality == "dual" else None,
                        compression_ratio=cfg.compression_ratio if cfg.modality == "dual" else None,
                        discriminator=cfg.discriminator and cfg.modality == "dual")
    report = None
    if state is None and cfg.pretrained is not None:
        report = load_pretrained(model, cfg.pretrained, cfg.event_backbone_init)

    log = RunLog(run_dir, state["log_subdir"] if state is not None else RunLog.new_subdir(), is_main)
    console.set_log_file(log.path / "console.log")
    if is_main:
        write_run_record(log.path, SCRIPT, cfg, sys.argv[1:], ["--resume-from", "{checkpoint}"])
        if state is None:
            ckpt.atomic_write_json(log.path / "load_report.json", report or {"file": None, "init": "random"})
    console.print(f"config ({cfg.preset} preset): {changed_settings(cfg)}")
    console.print(f"model {fred_training.describe_meta(meta)}, {cfg.optimizer}, epochs {cfg.epochs} (freeze "
                  f"{cfg.freeze_epoch if freeze_runs(cfg) else 0}), batch {cfg.freeze_batch_size}/"
                  f"{cfg.unfreeze_batch_size} x {world} process(es), precision {accelerator.mixed_precision}, "
                  f"run folder {log.path} (full config in config.json)")
    if report is not None:
        console.print(f"weights: {summarize_report(report)}")
    elif state is None:
        console.warn("no --pretrained weights: random init")
    accelerator.init_trackers(log.subdir)

    if cfg.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    policies = freeze_policies(model, cfg)
    optimizer = build_optimizer(model, cfg)
    start = int(state["epoch"]) if state is not None else 0
    end = end_epoch(cfg)
    stage = stage_of(start, cfg)
    trainable = apply_policy(model, policies[stage])
    # The EMA copies the plain model: after prepare, its forward would carry the autocast wrapper.
    ema = ModelEMA(model).to(accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    stepper = OptimStep(accelerator, optimizer, model, max_grad_norm=cfg.grad_clip,
                        max_nonfinite=MAX_NONFINITE_STEPS, warn=console.warn)
    series = LossSeries(STEP_SERIES)
    history, best = History(), Best(best_metric(cfg))
    if state is not None:
        history, best = fred_training.restore_full_state(state, resume_path, cfg, policies, accelerator, model, ema,
                                                         optimizer, stepper, series, console.warn)
        log.truncate_fusion_stats(start)
        console.print(f"resumed from {resume_path} at epoch {start} ({stage} stage)")
        del state

    loader = train_loader(data, cfg, stage, rank, world)
    fitted = fitted_lrs(cfg, stage_batch(cfg, stage) * world)
    set_base_lrs(optimizer, *fitted)
    if stage == "unfreeze" and freeze_runs(cfg) and start == cfg.freeze_epoch:
        ema.updates = steps_per_epoch(data, cfg, stage, world) * start  # resumed exactly at the switch
    schedule = lr_schedule(cfg.epochs)
    criterion = YOLOLoss(len(CLASS_NAMES), cfg.input_shape)
    max_batches = cfg.quick_test_batches if cfg.quick_test else None
    settings = eval_settings(cfg, max_batches)
    val_loader = eval_loader(data.val, cfg) if is_main and len(data.val) else None
    results_dir = run_dir / RESULTS_DIR
    stage_files = {name: ckpt.CheckpointManager(run_dir, name, unit="epoch", keep_last=cfg.keep_stage_checkpoints,
                                                suffix="_weights") for name in policies}
    step = len(series)
    total_steps = step + sum(steps_per_epoch(data, cfg, stage_of(e, cfg), world) for e in range(start, end))
    console.print(stage_banner(stage, cfg))
    console.start(total_steps, "train", completed=step)
    try:
        for epoch in range(start, end):
            if stage_of(epoch, cfg) != stage:  # the switch: re-wrap, new loader and batch, refit lrs, EMA count
                stage = stage_of(epoch, cfg)
                model, trainable = switch_stage(accelerator, model, policies[stage])
                stepper.set_model(model)
                loader = train_loader(data, cfg, stage, rank, world)
                fitted = fitted_lrs(cfg, stage_batch(cfg, stage) * world)
                set_base_lrs(optimizer, *fitted)
                ema.updates = steps_per_epoch(data, cfg, stage, world) * epoch
                check_amp_invariant(accelerator)
                console.print(stage_banner(stage, cfg))
            lr = apply_schedule(optimizer, schedule, epoch)[0]
            set_loader_epoch(loader, epoch)
            set_train_mode(accelerator.unwrap_model(model), policies[stage])
            started = time.perf_counter()
            for batch_index, batch in enumerate(islice(loader, max_batches)):
                drops = fred_training.drop_flags(batch, cfg, epoch, batch_index, rank)
                batch = to_device(batch, accelerator.device)
                with accelerator.accumulate(model):
                    terms = training_losses(model, batch, cfg, criterion, accelerator, drops)
                    result = stepper(terms["loss"])
                if result.applied:
                    ema.update(accelerator.unwrap_model(model))
                series.append({**{name: terms[name].detach() for name in STEP_SERIES if name != "lr"}, "lr": lr})
                step += 1
                console.advance(step)
                if step % cfg.log_interval == 0:
                    console.log(step, {"epoch": f"{epoch + 1}/{cfg.epochs}", "loss": float(terms["loss"].detach()),
                                             "lr": lr})

            # Epoch end: losses, validation with the EMA model, mAP on evaluation epochs, files, checkpoints.
            completed = epoch + 1
            means = fred_training.epoch_means(series.flush(accelerator))
            train_loss = means["loss"]
            val_loss, summary = float("nan"), None
            if is_main and val_loader is not None:
                val_loss = validation_loss(ema.module, val_loader, criterion, cfg.modality, accelerator.device,
                                           accelerator.autocast, max_batches)
                if not cfg.no_eval_map and (completed % cfg.eval_period == 0 or completed == end):
                    summary = evaluate_detections(ema.module, val_loader, cfg.modality, cfg.input_shape, results_dir,
                                                  "val", accelerator.device, accelerator.autocast, settings,
                                                  data.dark)
                    write_results(results_dir / "results.txt", summary, f"EMA model after epoch {completed}")
            ap50 = summary["ap50"] if summary else float("nan")
            ap50_95 = summary["ap50_95"] if summary else float("nan")
            history.append(epoch=completed, stage=float(stage == "unfreeze"), loss=train_loss, val_loss=val_loss,
                           lr=lr, ap50=ap50, ap50_95=ap50_95)
            metric_value = {"ap50": ap50, "ap50_95": ap50_95, "val_loss": val_loss}[best.metric]
            improved = best.improves(metric_value)
            if improved:
                best.value, best.epoch = metric_value, completed
            metrics = {"loss": train_loss, "val_loss": val_loss, "ap50": ap50, "ap50_95": ap50_95}
            rng = ckpt.gather_rng(accelerator)
            if is_main:
                fred_training.report_epoch(console, accelerator, log, cfg, data, history, series, means, summary,
                                           best, stage, time.perf_counter() - started, final=completed == end)
                state = full_state(epoch=completed, stage=stage, cfg=cfg, meta=meta, accelerator=accelerator,
                                   model=model, ema=ema, optimizer=optimizer, stepper=stepper, series=series,
                                   history=history, best=best, fitted=fitted, loss=train_loss, rng=rng,
                                   log_subdir=log.subdir, trainable=trainable)
                fred_training.save_epoch(run_dir, stage_files[stage], state, cfg, end, ema.state_dict(), meta,
                                         metrics, improved)
                del state
            accelerator.wait_for_everyone()
        console.stop()

        # Final: the EMA model on the test split, exported as fred_fusion_final.pth.
        final_metrics = {}
        if is_main:
            if len(data.test):
                summary = evaluate_detections(ema.module, eval_loader(data.test, cfg), cfg.modality, cfg.input_shape,
                                              results_dir, "test", accelerator.device, accelerator.autocast,
                                              settings, data.dark)
                write_results(results_dir / "results.txt", summary, f"final EMA model (epoch {end}) on test")
                console.print(f"final {summary_line(summary)}")
                final_metrics = {key: summary[key] for key in ("ap50", "ap50_95", "ap50_dark", "ap50_bright")
                                 if key in summary}
            export_weights(run_dir / FINAL_WEIGHTS, ema.state_dict(), meta, max(end, start), final_metrics)
            console.print(f"wrote {run_dir / FINAL_WEIGHTS}; logs in {log.path}")
            if cfg.freeze_training and end < cfg.epochs:
                console.print(f"freeze stage done; continue into the unfreeze stage with: python {SCRIPT}.py "
                              f"--save-dir {run_dir} --resume")
            if cfg.quick_test:
                check_quick_test(run_dir / FINAL_WEIGHTS, ema.module, val_loader, cfg, history)
                console.print("quick test passed")
        accelerator.wait_for_everyone()
    except BaseException:
        hint = fred_training.resume_hint(run_dir) if is_main else None
        if hint:
            console.print(hint)
        raise
    finally:
        console.stop()
    accelerator.end_training()
    return 0


def check_quick_test(weights: Path, ema_model: torch.nn.Module, val_loader, cfg: FredConfig, history: History) -> None:
    """The quick test's own checks: every stage that should run ran with finite losses, and the exported final
    weights reload strictly into a fresh model that reproduces the EMA model's outputs."""
    expected = ["freeze"] * int(freeze_runs(cfg)) + ["unfreeze"] * int(not cfg.freeze_training)
    ran = ["unfreeze" if s else "freeze" for s in history.stage]
    if ran != expected or not np.all(np.isfinite(history.loss)):
        raise RuntimeError(f"quick test failed: stages {ran} (expected {expected}), losses {history.loss}")
    sidecar = fred_training.read_sidecar(weights)
    reloaded = build_model_from_meta(sidecar["model_meta"], discriminator=False, init=False)
    load_strict(reloaded, weights)
    device = next(ema_model.parameters()).device
    reloaded.to(device).eval()
    if val_loader is None:
        return
    batch = next(iter(val_loader))
    batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    with torch.no_grad():
        same = all(torch.equal(a, b) for a, b in zip(model_outputs(reloaded, batch, cfg.modality),
                                                      model_outputs(ema_model, batch, cfg.modality)))
    if not same:
        raise RuntimeError(f"quick test failed: {weights} reloaded strictly gives other outputs than the EMA model")


if __name__ == "__main__":
    sys.exit(fred_training.exit_on_fred_error(lambda: main(*cli())))
