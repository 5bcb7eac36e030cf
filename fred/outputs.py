"""The files of a FRED run folder (spec/fred.md §6): full states, EMA weight exports with their sidecars, and the
``loss_<timestamp>/`` folder's curves, text series, ``loss_history.mat`` and ``fusion_stats.csv``.

    logs/fred_fusion/  freeze_epoch_{N}_weights.pth  unfreeze_epoch_{N}_weights.pth  last_epoch_weights.pth
                       ep%03d-loss%.3f-val_loss%.3f.pth  fred_fusion_best.pth  fred_fusion_final.pth (+ .json)
                       loss_<YYYY_MM_DD_HH_MM_SS>/  .temp_map_out/results/  run.json  config.json  console.log

A full state is the kit's train state (:class:`common.state.TrainState`) with the §6.2 keys; ``last_epoch_weights.pth``
always holds the newest one, also when it was written in the middle of an epoch (preemption, --checkpoint-every).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import checkpoint as ckpt
from common.lossdump import save_mat
from common.run import config_to_dict
from common.plots import plot_curves
from common.state import newest_checkpoint
from common.tracking import Best, History
from fred.config import FredConfig
from fred.index import FredIndex, append_fusion_stats_csv
from fred.dataset import eval_loader, load_data
from fred.evaluate import evaluate_detections, eval_settings, model_outputs, summary_line, write_results
from fred.model import build_model_from_meta
from fred.weights import load_strict
from fred.recipe import HISTORY, STAGES, config_meta, describe_meta, freeze_runs
from fred.weights import strip_discriminator

STATE_FORMAT = "fred_fusion_full_state"
STATE_FORMAT_VERSION = 2
WEIGHTS_FORMAT = "fred_fusion_weights"
LAST_STATE = "last_epoch_weights.pth"
BEST_WEIGHTS = "fred_fusion_best.pth"
FINAL_WEIGHTS = "fred_fusion_final.pth"
RESULTS_DIR = Path(".temp_map_out") / "results"


def stage_checkpoints(run_dir: Path, stage: str, keep: int) -> ckpt.CheckpointManager:
    """The ``{stage}_epoch_{N}_weights.pth`` files of a run folder (``keep`` newest, 0: all)."""
    return ckpt.CheckpointManager(run_dir, stage, unit="epoch", keep_last=keep, suffix="_weights")


def state_files(run_dir: Path) -> list[Path]:
    """Every full state of a run folder: the stage files, then ``last_epoch_weights.pth`` (the newest)."""
    found = [path for stage in STAGES for path in stage_checkpoints(run_dir, stage, 0).paths()]
    return found + [run_dir / LAST_STATE] if (run_dir / LAST_STATE).is_file() else found


def exported_files(run_dir: Path) -> list[Path]:
    """A run folder's earlier outputs that ``--overwrite`` deletes: EMA weight exports (``ep*.pth``, best, final)
    and their ``.json`` sidecars, the ``loss_<timestamp>/`` folders and the mAP work folder."""
    files = [p for p in run_dir.glob("ep[0-9][0-9][0-9]-loss*-val_loss*") if p.suffix in (".pth", ".json")]
    for name in (BEST_WEIGHTS, FINAL_WEIGHTS):
        files += [run_dir / name, (run_dir / name).with_suffix(".json")]
    folders = [p for p in run_dir.glob("loss_[0-9]*") if p.is_dir()] + [run_dir / RESULTS_DIR.parts[0]]
    return [p for p in files if p.is_file()] + [p for p in folders if p.is_dir()]


def export_weights(path: Path, ema_state: dict, meta: dict, epoch: int, metrics: dict) -> Path:
    """EMA weights as a flat bubbliiiing-format state dict (no discriminator) plus the ``.json`` sidecar."""
    weights = {k: v.detach().cpu().clone() for k, v in strip_discriminator(ema_state).items()}
    ckpt.save_checkpoint(path, weights)
    sidecar = {"format": WEIGHTS_FORMAT, "model_meta": meta, "epoch": epoch,
               "metrics": {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                           for k, v in metrics.items()}}
    ckpt.atomic_write_json(path.with_suffix(".json"), sidecar)
    return path


def export_epoch(run_dir: Path, cfg: FredConfig, ema_state: dict, meta: dict, completed: int, end: int,
                 metrics: dict, improved: bool) -> None:
    """The epoch's EMA exports: ``ep%03d-…`` every ``save_period`` epochs and at the last one, best on improvement."""
    if completed % cfg.save_period == 0 or completed == end:
        name = f"ep{completed:03d}-loss{metrics['loss']:.3f}-val_loss{metrics['val_loss']:.3f}.pth"
        export_weights(run_dir / name, ema_state, meta, completed, metrics)
    if improved:
        export_weights(run_dir / BEST_WEIGHTS, ema_state, meta, completed, metrics)


def state_extra(cfg: FredConfig, meta: dict, stage: str, completed: int, log_subdir: str, loss: float,
                fitted: tuple[float, float], optimizer) -> dict:
    """The §6.2 keys a full state carries besides the kit's train state (``completed`` = finished epochs)."""
    return {"format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION, "epoch": completed, "stage": stage,
            "lr": {"init_lr_fit": fitted[0], "min_lr_fit": fitted[1], "total_epochs": cfg.epochs,
                   "current": [group["lr"] for group in optimizer.param_groups]},
            "loss": loss, "config": config_to_dict(cfg), "model_meta": meta, "log_subdir": log_subdir}


def read_sidecar(weights: Path) -> dict | None:
    """The ``.json`` sidecar of an exported weights file, or None."""
    path = weights.with_suffix(".json")
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def default_checkpoint(run_dir: Path) -> Path:
    """``--eval-only`` default: best, else final, else the newest full state (its EMA)."""
    for name in (BEST_WEIGHTS, FINAL_WEIGHTS):
        if (run_dir / name).is_file():
            return run_dir / name
    newest = newest_checkpoint(state_files(run_dir))
    if newest is None:
        raise ckpt.CheckpointError(f"no weights to evaluate in {run_dir} ({BEST_WEIGHTS}, {FINAL_WEIGHTS} or a full "
                                "state); train first or pass --checkpoint")
    return newest


def weights_meta(path: Path, cfg: FredConfig) -> dict:
    """Architecture of a weights file: its sidecar, a full state's ``model_meta``, else the configuration's."""
    sidecar = read_sidecar(path)
    if sidecar is not None:
        return sidecar["model_meta"]
    state = ckpt.load_checkpoint(path, mmap=True, what="weights file")
    if isinstance(state, dict) and isinstance(state.get("model_meta"), dict):
        return state["model_meta"]
    return config_meta(cfg)


class RunLog:
    """The ``loss_<timestamp>/`` folder: curves, text series, ``loss_history.mat``, ``fusion_stats.csv``, configs.

    Only the main process writes. TensorBoard events go through the accelerator's tracker into the same folder.
    """

    PLOT_INTERVAL_S = 30.0  # curves are redrawn at most this often (and always at the end): ~1 s each time

    def __init__(self, run_dir: Path, subdir: str, is_main: bool):
        self.run_dir = run_dir
        self.subdir = subdir
        self.path = run_dir / subdir
        self.is_main = is_main
        self._plotted_at = -math.inf
        if is_main:
            ckpt.make_dirs(self.path)

    @staticmethod
    def new_subdir() -> str:
        """``loss_<YYYY_MM_DD_HH_MM_SS>``."""
        return time.strftime("loss_%Y_%m_%d_%H_%M_%S")

    def truncate_fusion_stats(self, epoch: int) -> None:
        """Drop ``fusion_stats.csv`` rows after ``epoch`` (a resumed run repeats those epochs)."""
        path = self.path / "fusion_stats.csv"
        if not self.is_main or not path.is_file():
            return
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        kept = [row for row in rows if int(row["epoch"]) <= epoch]
        if len(kept) == len(rows):
            return
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
        ckpt.atomic_write_text(path, text.getvalue())

    def fusion_stats(self, epoch: int, index: FredIndex, used: dict[str, int]) -> None:
        """Append this epoch's §5.4 rows, one per split."""
        if self.is_main:
            for split, count in used.items():
                append_fusion_stats_csv(self.path / "fusion_stats.csv", epoch, split, index.stats(split, count))

    def write_epoch_files(self, history: History, step_series: dict[str, np.ndarray], freeze_epoch: int | None,
                          final: bool = False) -> None:
        """Rewrite the text series and ``loss_history.mat`` from the full histories, and the curves when
        :attr:`PLOT_INTERVAL_S` has passed since they were last drawn or ``final``."""
        if not self.is_main:
            return
        epochs = np.asarray(history["epoch"])
        ap50, ap50_95 = np.asarray(history["ap50"]), np.asarray(history["ap50_95"])
        evaluated = np.isfinite(ap50)
        for name, values in (("epoch_loss.txt", history["loss"]), ("epoch_val_loss.txt", history["val_loss"]),
                             ("epoch_map.txt", ap50[evaluated])):
            ckpt.atomic_write_text(self.path / name, "".join(f"{v:.6f}\n" for v in values))
        arrays = {name: np.asarray(history[name], dtype=np.float64) for name in HISTORY}
        arrays.update({f"step_{name}": values for name, values in step_series.items()})
        save_mat(self.path / "loss_history.mat", arrays)
        if not final and time.monotonic() - self._plotted_at < self.PLOT_INTERVAL_S:
            return
        self._plotted_at = time.monotonic()
        marks = [freeze_epoch] if freeze_epoch else []
        plot_curves(self.path / "epoch_loss.png", {"train loss": (epochs, history["loss"]),
                                                   "val loss": (epochs, history["val_loss"])},
                    title="Loss", xlabel="epoch", ylabel="loss", vlines=marks)
        plot_curves(self.path / "val_loss.png", {"val loss": (epochs, history["val_loss"])}, title="Validation loss",
                    xlabel="epoch", ylabel="loss", vlines=marks)
        plot_curves(self.path / "lr.png", {"lr": (epochs, history["lr"])}, title="Learning rate", xlabel="epoch",
                    ylabel="lr", vlines=marks)
        plot_curves(self.path / "epoch_map.png", {"AP50": (epochs[evaluated], ap50[evaluated]),
                                                  "AP50:95": (epochs[evaluated], ap50_95[evaluated])},
                    title="mAP (val)", xlabel="epoch", ylabel="AP", vlines=marks)


def report_epoch(console, accelerator, log: RunLog, cfg: FredConfig, data, history: History, series,
                 means: dict[str, float], summary: dict | None, best: Best, stage: str, seconds: float,
                 final: bool) -> None:
    """The epoch's console lines, TensorBoard scalars, fusion statistics rows and rewritten run files (curves
    always redrawn when ``final``)."""
    record = history.last()
    completed = int(record["epoch"])
    console.print(f"Epoch {completed}/{cfg.epochs} [{stage}] loss {record['loss']:.4f} val_loss "
                  f"{record['val_loss']:.4f} lr {record['lr']:.3e} time {seconds:.1f}s")
    train_stats = data.index.stats("train", len(data.train))
    console.print(f"Fusion info: {train_stats.line()}")
    if torch.cuda.is_available():
        console.print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if summary:
        console.print(f"{summary_line(summary)} (best {best.metric} {best.value:.4f} @ epoch {best.epoch})")
    scalars = {"loss": record["loss"], "val_loss": record["val_loss"], "lr": record["lr"],
               "fusion/dual_rate": train_stats.dual_rate,
               "fusion/avg_time_diff_ms": train_stats.avg_time_diff_ms or 0.0,
               **{f"loss_terms/{name}": means[name] for name in ("loc", "cls", "conf", "disc", "disc_acc")}}
    if summary:
        scalars.update({"AP50": summary["ap50"], "AP50_95": summary["ap50_95"]})
    accelerator.log(scalars, step=completed)
    log.fusion_stats(completed, data.index, {"train": len(data.train), "val": len(data.val), "test": len(data.test)})
    log.write_epoch_files(history, series.arrays(), cfg.freeze_epoch if freeze_runs(cfg) else None, final)


# --------------------------------------------------------------------------------------- evaluating a run

def evaluate_only(cfg: FredConfig, console, accelerator) -> dict:
    """``--eval-only``: score ``--checkpoint`` (default best/final/newest full state) on ``--eval-split``."""
    run_dir = cfg.run_dir
    path = cfg.checkpoint or default_checkpoint(run_dir)
    meta = weights_meta(path, cfg)
    model = build_model_from_meta(meta, discriminator=False, init=False)
    load_strict(model, path)
    model.to(accelerator.device).eval()
    cfg = dataclasses.replace(cfg, modality=meta["modality"], input_shape=tuple(meta["input_shape"]))
    with accelerator.main_process_first():
        data = load_data(cfg, console.print)
    dataset = data.eval_set(cfg.eval_split)
    console.print(f"evaluating {path} ({describe_meta(meta)}) on {cfg.eval_split}: {len(dataset)} effective pairs; "
                  f"Fusion info: {data.index.stats(cfg.eval_split).line()}")
    results_dir = run_dir / RESULTS_DIR
    summary = evaluate_detections(model, eval_loader(dataset, cfg), cfg.modality, cfg.input_shape, results_dir,
                                  cfg.eval_split, accelerator.device, accelerator.autocast, eval_settings(cfg),
                                  data.dark)
    write_results(results_dir / "results.txt", summary, f"{path} on {cfg.eval_split}")
    console.print(summary_line(summary))
    console.print(f"results in {results_dir}")
    return summary


def check_quick_test(weights: Path, ema_model: torch.nn.Module, val_loader, cfg: FredConfig, history: History) -> None:
    """The quick test's own checks: every stage that should run ran with finite losses, and the exported final
    weights reload strictly into a fresh model that reproduces the EMA model's outputs."""
    expected = ["freeze"] * int(freeze_runs(cfg)) + ["unfreeze"] * int(not cfg.freeze_training)
    ran = ["unfreeze" if s else "freeze" for s in history["stage"]]
    if ran != expected or not np.all(np.isfinite(history["loss"])):
        raise RuntimeError(f"quick test failed: stages {ran} (expected {expected}), losses {history['loss']}")
    sidecar = read_sidecar(weights)
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


# ------------------------------------------------------------------------------------------- the run's end

SAMPLE_FRAMES = 6
SAMPLE_CONF = 0.25  # a briefly trained model (the demo) rarely scores 0.5, predict's default
SAMPLE_FLOOR = 0.05  # below SAMPLE_CONF a frame still shows its best detection down to this score


def write_run_files(log: RunLog, cfg: FredConfig, report: dict | None) -> None:
    """The log folder's ``config.json`` and, for a fresh run, ``load_report.json`` (main process)."""
    ckpt.atomic_write_json(log.path / "config.json", config_to_dict(cfg))
    if report is not None or not (log.path / "load_report.json").is_file():
        ckpt.atomic_write_json(log.path / "load_report.json", report or {"file": None, "init": "random"})


def shown_detections(found: np.ndarray, conf: float) -> np.ndarray:
    """The rows ``[x1, y1, x2, y2, score, label]`` of ``found`` scoring >= ``conf``; without any, the best one."""
    sure = found[found[:, 4] >= conf]
    return sure if len(sure) or not len(found) else found[found[:, 4].argmax()][None]


@torch.no_grad()
def detection_grid(path: Path, model: torch.nn.Module, dataset, modality: str, input_shape, device,
                   count: int = SAMPLE_FRAMES, conf: float = SAMPLE_CONF) -> Path:
    """A PNG of ``count`` frames spread over ``dataset`` (an evaluation set): RGB | Event, detections of ``model``
    (score >= ``conf``; a frame without one shows its best detection scoring >= ``SAMPLE_FLOOR``, so the demo's dark
    frames, where the dual model finds the drones at scores .14-.22, are not drawn empty) in yellow with their
    scores, ground truth in green."""
    from common.plots import save_image_grid
    from fred.dataset import collate, load_frame
    from fred.decode import detect
    from fred.draw import draw_boxes
    from fred.index import CLASS_NAMES

    model.eval()
    rows, labels = [], []
    for index in sorted({int(i) for i in np.linspace(0, len(dataset) - 1, count)}):
        entry = dataset.samples[index].entry
        size = (entry.width, entry.height)
        batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                 for key, value in collate([dataset[index]]).items()}
        found = detect(model_outputs(model, batch, modality), input_shape, [(entry.height, entry.width)],
                       conf_thres=min(conf, SAMPLE_FLOOR))[0].cpu().numpy()
        found = shown_detections(found, conf)
        panels = []
        for frame in (entry.rgb_path, entry.event_path):
            image = load_frame(frame, size) if frame is not None and frame.is_file() else Image.new("RGB", size)
            panels.append(np.asarray(draw_boxes(image, found, CLASS_NAMES, truth=entry.boxes)))
        rows.append(panels)
        labels.append(f"{entry.sequence_id}/{entry.frame_index}")
    return save_image_grid(path, rows, columns=("RGB", "Event"), row_labels=labels)


def final_evaluation(cfg: FredConfig, ema_model: torch.nn.Module, data, accelerator, run_dir: Path, log: RunLog,
                     max_batches: int | None, console) -> dict:
    """The EMA model on the test split (results.txt, console line) and the detection sample grid; returns the
    metrics recorded with the final weights."""
    if not len(data.test):
        return {}
    results_dir = run_dir / RESULTS_DIR
    summary = evaluate_detections(ema_model, eval_loader(data.test, cfg), cfg.modality, cfg.input_shape, results_dir,
                                  "test", accelerator.device, accelerator.autocast, eval_settings(cfg, max_batches),
                                  data.dark)
    write_results(results_dir / "results.txt", summary, f"final EMA model (epoch {cfg.epochs}) on test")
    ckpt.atomic_write_text(log.path / "results.txt", (results_dir / "results.txt").read_text())
    console.print(f"final {summary_line(summary)}")
    detection_grid(log.path / "detections.png", ema_model, data.test, cfg.modality, cfg.input_shape,
                   accelerator.device)
    return {key: summary[key] for key in ("ap50", "ap50_95", "ap50_dark", "ap50_bright") if key in summary}


def result_files(run_dir: Path, log: RunLog) -> dict[str, Path]:
    """Where a finished run's results are, for the closing summary."""
    found = {"weights": run_dir / FINAL_WEIGHTS, "best": run_dir / BEST_WEIGHTS,
             "test results": log.path / "results.txt", "detections": log.path / "detections.png",
             "curves": log.path / "epoch_map.png", "log folder": log.path}
    return {name: path for name, path in found.items() if path.exists()}


def next_steps(cfg: FredConfig, run_dir: Path, end: int) -> list[str]:
    """Commands worth running after a run."""
    steps = []
    if end < cfg.epochs:
        steps.append("rerun the same command without --freeze-training to train the unfreeze stage")
    sequence = f"{cfg.demo_root}/<sequence>" if cfg.uses_demo_data else "<FRED>/<sequence>"
    steps += [f"python predict_fred_fusion.py --weights {run_dir / BEST_WEIGHTS} --sequence {sequence} "
              f"--conf {SAMPLE_CONF}",
              f"tensorboard --logdir {run_dir}"]
    return steps
