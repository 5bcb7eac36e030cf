"""The files of a colorization run folder (spec/colorize.md §6, §7)::

    runs/colorize/<run>/  config.json  run.json  console.log  DONE.json (when finished)
                          checkpoints/colorize_step_NNNNNN.pth                 resumable states (kit train state)
                          fusion_epoch_N.pth  fusion_best.pth                  FlowChroma keys (+ config, format)
                          swintexco/{epoch_N,best}/{embed_net,nonlocal_net,colornet}.pth   Strategy-1 folders
                          losses.mat  plots/{losses,lr,validation}.png  tensorboard/
                          eval/metrics_{fused,gray,exemplar}.csv (+ .json)  eval/metrics.json  eval/samples/<seq>.png
                          demo_report.json (demo preset: the three quality gates)

A resumable state holds the trainable modules only (nonlocal_net, fusion_net, the discriminator): the frozen ones
are rebuilt from their recorded sources, whose SHA-256 the state's signature compares.
"""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path

import numpy as np
import torch

from colorize.config import ColorizeConfig
from colorize.recipe import HISTORY, VALIDATION_SERIES
from colorize.system import FusionSystem
from colorize.weights import export_swintexco, save_fusion_checkpoint
from common.checkpoint import CheckpointManager, atomic_write_bytes, atomic_write_json, make_dirs
from common.lossdump import LossSeries, save_mat
from common.plots import plot_curves
from common.run import config_to_dict
from common.tracking import History

STAGE = "colorize"
BEST = "fusion_best.pth"
EVAL_DIR = "eval"
DEMO_REPORT = "demo_report.json"
PSNR_MARGIN_DB = 3.0
WARP_SHARE = 0.75
L1_RATIO = 0.6
L1_FIRST, L1_LAST = 5, 20


def checkpoint_manager(run_dir: Path, keep: int) -> CheckpointManager:
    """The resumable states ``checkpoints/colorize_step_NNNNNN.pth`` (the ``keep`` newest; 0: all)."""
    return CheckpointManager(run_dir / "checkpoints", STAGE, unit="step", keep_last=keep, width=6)


def exported_files(run_dir: Path) -> list[Path]:
    """Earlier outputs that ``--overwrite`` deletes: exports, SwinTExCo folders, losses, plots, evaluation."""
    files = [*run_dir.glob("fusion_epoch_*.pth"), run_dir / BEST, run_dir / "losses.mat", run_dir / DEMO_REPORT]
    for folder in ("swintexco", "plots", EVAL_DIR, "tensorboard"):
        files += [path for path in (run_dir / folder).rglob("*") if path.is_file()]
    return [path for path in files if path.is_file()]


def config_record(cfg: ColorizeConfig, system: FusionSystem, warnings: list[str]) -> dict:
    """``config.json``: the resolved config, weight sources with SHA-256, warnings and library versions."""
    import cv2
    import timm

    return {**config_to_dict(cfg), "strategy": system.strategy,
            "weight_sources": {role: source.as_dict() for role, source in sorted(system.weight_sources.items())},
            "embed_random_init": system.embed_random_init, "warnings": warnings,
            "versions": {"torch": torch.__version__, "timm": timm.__version__, "opencv": cv2.__version__}}


def export(run_dir: Path, names: list[str], system: FusionSystem, cfg: ColorizeConfig, epoch: int, optimizer,
           scheduler: dict, history: History, discriminator=None, optimizer_d=None) -> list[Path]:
    """Export the current weights under each name (``epoch_N``, ``best``): ``fusion_<name>.pth`` (FlowChroma keys;
    ``best_loss`` is the mean training loss of its epoch, ``train_losses`` the per-epoch means) and the Strategy-1
    folder ``swintexco/<name>/``. The files are written once; further names are hard links to the same bytes."""
    losses = history["total"]
    first = save_fusion_checkpoint(
        run_dir / f"fusion_{names[0]}.pth", system, epoch=epoch, optimizer=optimizer.state_dict(),
        scheduler=scheduler, best_loss=losses[-1] if losses else math.nan, train_losses=losses,
        config=config_to_dict(cfg), discriminator=discriminator,
        optimizer_d=None if optimizer_d is None else optimizer_d.state_dict())
    folder = export_swintexco(run_dir / "swintexco" / names[0], system)
    written = [first, folder]
    for name in names[1:]:
        written.append(publish(first, run_dir / f"fusion_{name}.pth"))
        for path in sorted(folder.iterdir()):
            publish(path, run_dir / "swintexco" / name / path.name)
        written.append(run_dir / "swintexco" / name)
    return written


def publish(source: Path, target: Path) -> Path:
    """Give ``source`` the name ``target`` atomically: a hard link (the same bytes, no second write), or a copy
    where the file system has no links. A file already at ``target`` is replaced, never modified."""
    make_dirs(target.parent)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.link(source, temporary)
    except OSError:
        return atomic_write_bytes(target, source.read_bytes())
    os.replace(temporary, target)
    return target


def write_losses(run_dir: Path, series: LossSeries, history: History, steps_per_epoch: float,
                 global_batch: int) -> Path:
    """``losses.mat``: ``step_<name>`` per optimizer step, ``epoch_<name>`` per epoch (NaN where not measured)."""
    arrays = {f"step_{name}": values for name, values in series.arrays().items()}
    arrays.update({f"epoch_{name}": np.asarray(history[name], dtype=np.float64) for name in HISTORY})
    arrays.update({"steps_per_epoch": float(steps_per_epoch), "global_batch": global_batch})
    return save_mat(run_dir / "losses.mat", arrays)


def write_plots(run_dir: Path, series: LossSeries, history: History) -> list[Path]:
    """Loss terms and learning rates per step, validation PSNR and warp error per epoch."""
    arrays = series.arrays()
    steps = np.arange(1, len(arrays["total"]) + 1)
    terms = {name: (steps, arrays[name]) for name in ("total", "l1", "contextual", "align", "smooth")
             if np.any(arrays[name])}
    written = [plot_curves(run_dir / "plots" / "losses.png", terms, "training loss terms (per step)", logy=True),
               plot_curves(run_dir / "plots" / "lr.png", {group: (steps, arrays[f"lr_{group}"])
                                                          for group in ("nonlocal", "fusion")},
                           "learning rate", ylabel="lr", logy=True)]
    epochs = np.asarray(history["epoch"], dtype=np.float64)
    if np.isfinite(np.asarray(history["val_psnr"], dtype=np.float64)).any():
        psnr = {label: (epochs, history[name]) for label, name in
                (("fused", "val_psnr"), ("gray", "val_psnr_gray"), ("exemplar", "val_psnr_exemplar"))}
        written.append(plot_curves(run_dir / "plots" / "validation.png", psnr, "validation PSNR", xlabel="epoch",
                                   ylabel="dB"))
    return written


def validation_scores(metrics: dict) -> dict[str, float]:
    """The :data:`~colorize.recipe.VALIDATION_SERIES` of an evaluation's ``metrics.json`` content."""
    def value(method: str, column: str) -> float:
        number = metrics[method].get(column)
        return math.nan if number is None else float(number)

    return {"val_psnr": value("fused", "PSNR"), "val_psnr_gray": value("gray", "PSNR"),
            "val_psnr_exemplar": value("exemplar", "PSNR"), "val_warp_error": value("fused", "warp_error"),
            "val_warp_error_gray": value("gray", "warp_error"),
            "val_warp_error_exemplar": value("exemplar", "warp_error")}


NOT_VALIDATED = dict.fromkeys(VALIDATION_SERIES, math.nan)


def demo_gates(scores: dict[str, float], l1: np.ndarray) -> dict:
    """The demo's three quality gates (spec §9 check 10) on the validation split and the per-step L1 term."""
    fused, gray, exemplar = scores["val_psnr"], scores["val_psnr_gray"], scores["val_psnr_exemplar"]
    warp_fused, warp_gray = scores["val_warp_error"], scores["val_warp_error_gray"]
    warp_exemplar = scores["val_warp_error_exemplar"]
    first, last = float(np.mean(l1[:L1_FIRST])), float(np.mean(l1[-L1_LAST:]))
    gates = {
        "psnr": {"passed": bool(fused >= gray + PSNR_MARGIN_DB), "fused": fused, "gray": gray, "exemplar": exemplar,
                 "rule": f"fused PSNR >= gray PSNR + {PSNR_MARGIN_DB} dB"},
        "warp_error": {"passed": bool(warp_fused < warp_exemplar
                                      and warp_fused - warp_gray <= WARP_SHARE * (warp_exemplar - warp_gray)),
                       "fused": warp_fused, "gray": warp_gray, "exemplar": warp_exemplar,
                       "rule": f"fused < exemplar and fused - gray <= {WARP_SHARE} (exemplar - gray)"},
        "l1_drop": {"passed": bool(last <= L1_RATIO * first), "first": first, "last": last, "ratio": last / first,
                    "rule": f"mean L1 of the last {L1_LAST} steps <= {L1_RATIO} x the first {L1_FIRST}"},
    }
    return {"passed": all(gate["passed"] for gate in gates.values()), "steps": int(len(l1)), **gates}


def write_demo_report(run_dir: Path, gates: dict) -> Path:
    """``demo_report.json``."""
    return atomic_write_json(run_dir / DEMO_REPORT, gates)


def gate_lines(gates: dict) -> list[str]:
    """The demo's gates, one line each."""
    psnr, warp, l1 = gates["psnr"], gates["warp_error"], gates["l1_drop"]
    mark = {True: "passed", False: "FAILED"}
    return [f"demo gate PSNR: fused {psnr['fused']:.2f} dB vs gray {psnr['gray']:.2f} dB + {PSNR_MARGIN_DB} "
            f"(exemplar {psnr['exemplar']:.2f}): {mark[psnr['passed']]}",
            f"demo gate warp error: fused {warp['fused']:.5f}, gray {warp['gray']:.5f}, exemplar "
            f"{warp['exemplar']:.5f}: {mark[warp['passed']]}",
            f"demo gate L1 drop: last {L1_LAST} steps {l1['last']:.4f} / first {L1_FIRST} {l1['first']:.4f} = "
            f"{l1['ratio']:.2f} (<= {L1_RATIO}): {mark[l1['passed']]}"]


def metrics_table(metrics: dict) -> list[str]:
    """The §7 table: mean metrics of the fused output and both baselines."""
    columns = [column for column in ("PSNR", "SSIM", "LPIPS", "colorfulness", "CDC", "warp_error", "FID")
               if column in metrics["fused"]]
    lines = [f"{'method':<9}" + "".join(f"{column:>13}" for column in columns)]
    for method in ("fused", "exemplar", "gray"):
        cells = []
        for column in columns:
            value = metrics[method].get(column)
            cells.append(f"{'-':>13}" if value is None else f"{float(value):>13.5g}")
        lines.append(f"{method:<9}" + "".join(cells))
    return lines


def result_files(run_dir: Path, demo: bool) -> dict[str, Path]:
    """Where the results are (closing summary)."""
    results = {"report": run_dir / EVAL_DIR / "metrics.json", "samples": run_dir / EVAL_DIR / "samples",
               "plots": run_dir / "plots", "weights": run_dir / BEST, "swintexco": run_dir / "swintexco" / "best",
               "losses": run_dir / "losses.mat", "tensorboard": run_dir / "tensorboard"}
    if demo:
        results["gates"] = run_dir / DEMO_REPORT
    return {name: path for name, path in results.items() if path.exists()}


def next_steps(cfg: ColorizeConfig, run_dir: Path) -> list[str]:
    """Commands worth running next."""
    steps = [f"python train_colorize.py eval --checkpoint {run_dir / BEST}   # evaluate again (--data.dataset ROOT "
             "for other videos)"]
    if cfg.train.tensorboard:
        steps.append(f"tensorboard --logdir {run_dir / 'tensorboard'}")
    if cfg.uses_demo_data:
        steps.append("accelerate launch train_colorize.py --data.dataset /data/DAVIS --data.imagenet /data/refs   "
                     "# your videos, paper settings")
    steps.append(f"python train_colorize.py --data.dataset ROOT --exemplar.swintexco-ckpt "
                 f"{run_dir / 'swintexco' / 'best'}   # Strategy 1 from these weights")
    return steps
