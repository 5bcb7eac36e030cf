"""Training machinery of ``train_fred_fusion.py`` (spec/fred.md §4, §6): stages, optimizer and learning rates, data,
the training forward pass, full states and exported weights, the run folder's files, and ``--eval-only``.

Stages: epoch e is a freeze epoch iff e < ``freeze_epoch`` and not ``skip_freeze``. The switch to the unfreeze stage
re-wraps the model (:func:`common.freeze.switch_stage`), rebuilds the training loader with the unfreeze batch,
refits the learning rates to the new global batch and sets the EMA's update count to steps_per_epoch·epoch
(bubbliiiing). The optimizer is built once over all parameters, so its momentum survives the switch.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from common import checkpoint as ckpt
from common.freeze import FreezePolicy
from common.lossdump import save_mat
from common.plots import plot_curves
from common.run import config_to_dict, exit_on_user_error
from common.schedules import Schedule
from fred.config import ConfigError, FredConfig
from fred.dataset import FredDataset, build_loader
from fred.demo_data import DemoDataError, dark_flags, ensure_fred_demo, read_demo_meta
from fred.evaluate import EvalSettings, evaluate_detections, summary_line, write_results
from fred.fusion import negative_pair_valid, pair_disc_loss, positive_pair_valid
from fred.index import CLASS_NAMES, FredDataError, FredIndex, IndexParams, append_fusion_stats_csv, load_fred_index
from fred.model import backbone_prefixes, build_model_from_meta, model_meta
from fred.targets import get_target
from fred.weights import WeightsError, load_strict, strip_discriminator

SCRIPT = "train_fred_fusion"
STATE_FORMAT = "fred_fusion_full_state"
STATE_FORMAT_VERSION = 1
WEIGHTS_FORMAT = "fred_fusion_weights"
LAST_STATE = "last_epoch_weights.pth"
BEST_WEIGHTS = "fred_fusion_best.pth"
FINAL_WEIGHTS = "fred_fusion_final.pth"
RESULTS_DIR = Path(".temp_map_out") / "results"
STAGES = ("freeze", "unfreeze")
MAX_NONFINITE_STEPS = 10
STEP_SERIES = ("loss", "loc", "cls", "conf", "disc", "disc_acc", "lr")
# SGD and Adam learning-rate clamps of the batch-size fit (bubbliiiing train.py).
LR_LIMITS = {"sgd": (5e-4, 5e-2), "adam": (3e-4, 1e-3)}


class RunDirectoryInUse(RuntimeError):
    """A plain training run was pointed at a folder that already holds full training states."""


USER_ERRORS = (FredDataError, WeightsError, DemoDataError, RunDirectoryInUse, ConfigError)


def exit_on_fred_error(main: Callable[[], int | None]) -> int:
    """:func:`common.run.exit_on_user_error` plus FRED's own input errors: one ``error:`` line, exit code 2."""

    return exit_on_user_error(main, extra=USER_ERRORS)


# ---------------------------------------------------------------------------------------------------- stages

def freeze_runs(cfg: FredConfig) -> bool:
    """Whether this configuration has a freeze stage at all."""
    return cfg.freeze_epoch > 0 and not cfg.skip_freeze


def stage_of(epoch: int, cfg: FredConfig) -> str:
    """``freeze`` for epochs before ``freeze_epoch`` (unless ``skip_freeze``), else ``unfreeze``."""
    return "freeze" if freeze_runs(cfg) and epoch < cfg.freeze_epoch else "unfreeze"


def end_epoch(cfg: FredConfig) -> int:
    """First epoch this invocation does not train: ``freeze_epoch`` with ``--freeze-training``, else T."""
    return min(cfg.freeze_epoch, cfg.epochs) if cfg.freeze_training else cfg.epochs


def stage_batch(cfg: FredConfig, stage: str) -> int:
    """Batch per process of a stage."""
    return cfg.freeze_batch_size if stage == "freeze" else cfg.unfreeze_batch_size


def stage_banner(stage: str, cfg: FredConfig) -> str:
    """``Stage 1: freeze training (epochs 0-50)`` / ``Stage 2: unfreeze training (epochs 50-300)``."""
    if stage == "freeze":
        return f"Stage 1: freeze training (epochs 0-{cfg.freeze_epoch})"
    first = cfg.freeze_epoch if freeze_runs(cfg) else 0
    return f"Stage 2: unfreeze training (epochs {first}-{cfg.epochs})"


def freeze_policies(model: nn.Module, cfg: FredConfig) -> dict[str, FreezePolicy]:
    """Freeze stage: the backbone(s) frozen, fusion, neck, heads and discriminator train; unfreeze: everything."""
    frozen_mode = "eval" if cfg.freeze_bn else "train"
    return {"freeze": FreezePolicy(trainable=("",), frozen=tuple(backbone_prefixes(model)), frozen_mode=frozen_mode),
            "unfreeze": FreezePolicy(trainable=("",))}


def trainable_names(model: nn.Module, policy: FreezePolicy) -> list[str]:
    """Sorted names of the parameters ``policy`` trains (without changing the model)."""
    return sorted(name for name, _ in model.named_parameters() if policy.is_trainable(name))


# ------------------------------------------------------------------------------------- optimizer, learning rate

def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """bubbliiiing's three groups: BatchNorm weights (no decay), other weights (decay), biases (no decay)."""
    bn_weights, weights, biases = [], [], []
    for module in model.modules():
        if isinstance(getattr(module, "bias", None), nn.Parameter):
            biases.append(module.bias)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            bn_weights.append(module.weight)
        elif isinstance(getattr(module, "weight", None), nn.Parameter):
            weights.append(module.weight)
    grouped = {id(p) for p in bn_weights + weights + biases}
    if len(grouped) != len(list(model.parameters())):
        raise RuntimeError("parameter groups do not cover every model parameter exactly once")
    return [{"params": bn_weights, "name": "bn_weights", "weight_decay": 0.0},
            {"params": weights, "name": "weights", "weight_decay": weight_decay},
            {"params": biases, "name": "biases", "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: FredConfig) -> torch.optim.Optimizer:
    """SGD (nesterov) or Adam (betas (momentum, .999)) over all parameters in three groups, built once."""
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.init_lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.Adam(groups, lr=cfg.init_lr, betas=(cfg.momentum, 0.999))


def fitted_lrs(cfg: FredConfig, global_batch: int) -> tuple[float, float]:
    """(Init_lr_fit, Min_lr_fit) = clip(B/nbs·lr, lo, hi) and clip(B/nbs·min, lo/100, hi/100) for global batch B."""
    low, high = LR_LIMITS[cfg.optimizer]
    init = min(max(global_batch / cfg.nbs * cfg.init_lr, low), high)
    minimum = min(max(global_batch / cfg.nbs * cfg.min_lr, low / 100), high / 100)
    return init, minimum


def lr_schedule(total_epochs: int) -> Schedule:
    """bubbliiiing's per-epoch warm-up/cosine/tail: warm-up min(max(.05T,1),3), flat min_lr tail min(max(.05T,1),15)."""
    warmup = min(max(0.05 * total_epochs, 1), 3)
    tail = min(max(0.05 * total_epochs, 1), 15)
    return Schedule("warmup_cosine_tail", total=total_epochs, warmup=warmup, warmup_start_ratio=0.1, tail=tail)


# ---------------------------------------------------------------------------------------------------------- data

@dataclass
class FredData:
    """The loaded index and the datasets of one run (evaluation sets use the effective pairs, §5.5)."""

    index: FredIndex
    train: FredDataset
    val: FredDataset
    test: FredDataset
    dark: dict[tuple[str, int], bool] | None

    def eval_set(self, split: str) -> FredDataset:
        """The evaluation dataset of ``split``."""
        return {"train": self.train_eval, "val": self.val, "test": self.test}[split]

    @functools.cached_property
    def train_eval(self) -> FredDataset:
        """The training split as an evaluation set (letterbox only, effective pairs)."""
        return FredDataset(self.index.splits["train"], self.val.modality, self.val.input_shape, train=False)


def load_data(cfg: FredConfig, notify: Callable[[str], None]) -> FredData:
    """Generate the demo dataset if no root is configured, build or reuse the fusion annotations, make datasets."""
    root = cfg.fred_root
    if cfg.uses_demo_data:
        started = time.perf_counter()
        root = ensure_fred_demo(cfg.demo_root, seed=cfg.demo_seed, frames=cfg.demo_frames)
        notify(f"FRED demo dataset in {root} (ready in {time.perf_counter() - started:.1f} s)")
    params = IndexParams(pair_max_dt=cfg.pair_max_dt, event_time_offset=cfg.event_time_offset,
                         rgb_time=cfg.rgb_time, split=cfg.split, val_fraction=cfg.val_fraction)
    index = load_fred_index(root, cfg.fusion_threshold, cfg.annotation_dir, cfg.fusion_annotations, params, notify)
    targets = functools.partial(get_target, input_shape=cfg.input_shape, num_classes=len(CLASS_NAMES))
    train = FredDataset(index.splits["train"], cfg.modality, cfg.input_shape, train=True, epoch_length=cfg.epochs,
                        mosaic=cfg.mosaic, mixup=cfg.mixup, special_aug_ratio=cfg.special_aug_ratio, seed=cfg.seed,
                        target_fn=targets, include_unpaired=cfg.include_unpaired and cfg.modality == "dual")
    val = FredDataset(index.splits["val"], cfg.modality, cfg.input_shape, train=False, target_fn=targets)
    test = FredDataset(index.splits["test"], cfg.modality, cfg.input_shape, train=False)
    if len(train) == 0:
        wanted = (f"annotated RGB/event pairs within --fusion-threshold {cfg.fusion_threshold} s"
                  if cfg.modality == "dual" else f"annotated {cfg.modality} frames")
        raise FredDataError(f"the train split of {index.fred_root} has no {wanted}; check the data, the split files "
                            "and --fusion-threshold")
    meta = read_demo_meta(index.fred_root)
    return FredData(index=index, train=train, val=val, test=test, dark=dark_flags(meta) if meta else None)


def train_loader(data: FredData, cfg: FredConfig, stage: str, rank: int, world_size: int):
    """The training loader of a stage (its batch per process), seeded by (seed, epoch)."""
    batch = stage_batch(cfg, stage)
    try:
        return build_loader(data.train, batch, train=True, num_workers=cfg.num_workers, seed=cfg.seed, rank=rank,
                            world_size=world_size)
    except ValueError as error:
        raise FredDataError(f"{error}: the train split has {len(data.train)} {cfg.modality} samples but the "
                            f"{stage} stage needs a global batch of {batch * world_size}; lower "
                            f"--{stage}-batch-size or add data") from error


def eval_loader(dataset: FredDataset, cfg: FredConfig):
    """A sequential loader for validation or mAP (main process only)."""
    return build_loader(dataset, cfg.eval_batch_size, train=False, num_workers=cfg.num_workers, seed=cfg.seed)


# ------------------------------------------------------------------------------------------------ forward pass

def drop_flags(batch: dict, cfg: FredConfig, epoch: int, batch_index: int, rank: int):
    """Per-sample missing-stream flags: unpaired samples plus modality dropout (dual training only).

    Dropout draws come from ``default_rng([seed, rank, epoch, batch_index])``, so a resumed run repeats them.
    Returns (drop_rgb, drop_event) CPU bool tensors, or (None, None) when nothing is dropped.
    """
    drop_rgb, drop_event = batch["drop_rgb"].clone(), batch["drop_event"].clone()
    if cfg.modality_dropout > 0:
        rng = np.random.default_rng([cfg.seed, rank, epoch, batch_index])
        dropped = rng.random(len(drop_rgb)) < cfg.modality_dropout
        which_rgb = rng.random(len(drop_rgb)) < 0.5
        drop_rgb |= torch.from_numpy(dropped & which_rgb)
        drop_event |= torch.from_numpy(dropped & ~which_rgb)
    if not (bool(drop_rgb.any()) or bool(drop_event.any())):
        return None, None
    return drop_rgb, drop_event


def training_losses(model: nn.Module, batch: dict, cfg: FredConfig, criterion: nn.Module, accelerator,
                    drops: tuple) -> dict[str, torch.Tensor]:
    """Forward under autocast, YOLO loss in fp32, plus the weighted pair-discriminator loss (dual, opt-in).

    Returns 0-d tensors ``loss, loc, cls, conf, disc, disc_acc`` (disc 0 and disc_acc NaN without discriminator).
    """
    drop_rgb, drop_event = drops
    device = accelerator.device
    with accelerator.autocast():
        if cfg.modality == "dual":
            result = model(batch["rgb"], batch["event"],
                           None if drop_rgb is None else drop_rgb.to(device),
                           None if drop_event is None else drop_event.to(device),
                           with_pair_logits=cfg.discriminator)
        else:
            result = model(batch[cfg.modality])
    outputs = result[0] if cfg.discriminator and cfg.modality == "dual" else result
    terms = criterion(outputs, batch["y_true"])
    disc = torch.zeros((), device=device)
    accuracy = torch.full((), float("nan"), device=device)
    if cfg.discriminator and cfg.modality == "dual":
        positive, negative = result[1]
        times = [r if r == r else e for r, e in zip(batch["rgb_timestamp"].tolist(), batch["event_timestamp"].tolist())]
        disc, accuracy = pair_disc_loss(positive, negative,
                                        positive_pair_valid(len(times), drop_rgb, drop_event),
                                        negative_pair_valid(batch["sequence_id"], times, drop_rgb, drop_event))
        terms["loss"] = terms["loss"] + cfg.disc_weight * disc
    return {**terms, "disc": disc.detach(), "disc_acc": accuracy.detach()}


# -------------------------------------------------------------------------------------- histories and best model

@dataclass
class History:
    """Per-epoch records (NaN where not evaluated), stored in full states and written to the run folder."""

    epoch: list[float] = field(default_factory=list)
    stage: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    ap50: list[float] = field(default_factory=list)
    ap50_95: list[float] = field(default_factory=list)

    def append(self, **values: float) -> None:
        """Add one epoch's record (every field)."""
        for name in self.names():
            getattr(self, name).append(float(values[name]))

    @staticmethod
    def names() -> tuple[str, ...]:
        """Field names, in ``.mat`` order."""
        return tuple(f.name for f in dataclasses.fields(History))

    def state_dict(self) -> dict:
        """Plain lists for the full state."""
        return {name: list(getattr(self, name)) for name in self.names()}

    @classmethod
    def from_state(cls, state: dict) -> "History":
        """Rebuild from :meth:`state_dict`."""
        return cls(**{name: [float(v) for v in state[name]] for name in cls.names()})


@dataclass
class Best:
    """The best value of ``best_metric`` so far (higher AP or lower val_loss) and its epoch."""

    metric: str
    value: float = float("nan")
    epoch: int = 0

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far (NaN never does)."""
        if value != value:
            return False
        if self.value != self.value:
            return True
        return value < self.value if self.metric == "val_loss" else value > self.value

    def state_dict(self) -> dict:
        """Plain values for the full state."""
        return {"metric": self.metric, "value": self.value, "epoch": self.epoch}


def best_metric(cfg: FredConfig) -> str:
    """The metric that picks the best model: val_loss when mAP is off."""
    return "val_loss" if cfg.no_eval_map else cfg.best_metric


# ----------------------------------------------------------------------------------------- files of a run folder

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
            self.path.mkdir(parents=True, exist_ok=True)

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
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(kept)

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
        epochs = np.asarray(history.epoch)
        evaluated = np.isfinite(np.asarray(history.ap50))
        for name, values in (("epoch_loss.txt", history.loss), ("epoch_val_loss.txt", history.val_loss),
                             ("epoch_map.txt", np.asarray(history.ap50)[evaluated])):
            ckpt.atomic_write_text(self.path / name, "".join(f"{v:.6f}\n" for v in values))
        arrays = {name: np.asarray(getattr(history, name), dtype=np.float64) for name in History.names()}
        arrays.update({f"step_{name}": values for name, values in step_series.items()})
        save_mat(self.path / "loss_history.mat", arrays)
        if not final and time.monotonic() - self._plotted_at < self.PLOT_INTERVAL_S:
            return
        self._plotted_at = time.monotonic()
        marks = [freeze_epoch] if freeze_epoch else []
        plot_curves(self.path / "epoch_loss.png", {"train loss": (epochs, history.loss),
                                                   "val loss": (epochs, history.val_loss)},
                    title="Loss", xlabel="epoch", ylabel="loss", vlines=marks)
        plot_curves(self.path / "val_loss.png", {"val loss": (epochs, history.val_loss)}, title="Validation loss",
                    xlabel="epoch", ylabel="loss", vlines=marks)
        plot_curves(self.path / "lr.png", {"lr": (epochs, history.lr)}, title="Learning rate", xlabel="epoch",
                    ylabel="lr", vlines=marks)
        plot_curves(self.path / "epoch_map.png", {"AP50": (epochs[evaluated], np.asarray(history.ap50)[evaluated]),
                                                  "AP50:95": (epochs[evaluated],
                                                              np.asarray(history.ap50_95)[evaluated])},
                    title="mAP (val)", xlabel="epoch", ylabel="AP", vlines=marks)


# ------------------------------------------------------------------------------------------ run-level set-up

def quick_test_config(cfg: FredConfig) -> FredConfig:
    """``--quick-test``: one epoch per stage that would run, saving and evaluating every epoch, in
    ``<save_dir>/quick_test/`` (overwritten)."""
    freeze_epoch = 1 if freeze_runs(cfg) else 0
    epochs = max(freeze_epoch + (0 if cfg.freeze_training else 1), 1)
    return dataclasses.replace(cfg, save_dir=cfg.run_dir / "quick_test", freeze_epoch=freeze_epoch, epochs=epochs,
                               save_period=1, eval_period=1, resume=False, resume_from=None, overwrite=True)


def check_amp_invariant(accelerator) -> None:
    """fp16 on an accelerator must run with Accelerate's GradScaler (held by the prepared optimizer, §4.3)."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type != "cpu" and accelerator.scaler is None:
        raise RuntimeError("fp16 mixed precision without Accelerate's GradScaler: the loss would be unscaled; "
                           "this is a bug, please report it")


def steps_per_epoch(data: FredData, cfg: FredConfig, stage: str, world_size: int) -> int:
    """Optimizer steps of one epoch of ``stage`` (capped by ``--quick-test-batches`` in a quick test)."""
    steps = len(data.train) // (stage_batch(cfg, stage) * world_size)
    return min(steps, cfg.quick_test_batches) if cfg.quick_test else steps


def peak_memory_line() -> str | None:
    """Peak GPU memory of this process, when on a GPU."""
    if not torch.cuda.is_available():
        return None
    return f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"


def epoch_means(window: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean of each per-step series over the epoch, skipping non-finite (skipped) steps; NaN if none is finite."""
    return {name: float(np.mean(values[np.isfinite(values)])) if np.isfinite(values).any() else float("nan")
            for name, values in window.items()}


def report_epoch(console, accelerator, log: RunLog, cfg: FredConfig, data: FredData, history: History, series,
                 means: dict[str, float], summary: dict | None, best: Best, stage: str, seconds: float,
                 final: bool) -> None:
    """The epoch's console lines, TensorBoard scalars, fusion statistics rows and rewritten run files (curves
    always redrawn when ``final``)."""
    record = {name: values[-1] for name, values in history.state_dict().items()}
    completed = int(record["epoch"])
    console.print(f"Epoch {completed}/{cfg.epochs} [{stage}] loss {record['loss']:.4f} val_loss "
                  f"{record['val_loss']:.4f} lr {record['lr']:.3e} time {seconds:.1f}s")
    train_stats = data.index.stats("train", len(data.train))
    console.print(f"Fusion info: {train_stats.line()}")
    if peak_memory_line():
        console.print(peak_memory_line())
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


def save_epoch(run_dir: Path, stage_files: ckpt.CheckpointManager, state: dict, cfg: FredConfig, end: int,
               ema_state: dict, meta: dict, metrics: dict, improved: bool) -> None:
    """Write the epoch's full states (stage file every ``save_period`` epochs and at stage ends,
    ``last_epoch_weights.pth`` always) and EMA exports (``ep…`` files, best)."""
    completed, stage = state["epoch"], state["stage"]
    stage_end = completed == end or (stage == "freeze" and completed == cfg.freeze_epoch)
    if completed % cfg.save_period == 0 or stage_end:
        stage_files.save(state, completed)
    ckpt.save_checkpoint(run_dir / LAST_STATE, state)
    if completed % cfg.save_period == 0 or completed == end:
        name = f"ep{completed:03d}-loss{metrics['loss']:.3f}-val_loss{metrics['val_loss']:.3f}.pth"
        export_weights(run_dir / name, ema_state, meta, completed, metrics)
    if improved:
        export_weights(run_dir / BEST_WEIGHTS, ema_state, meta, completed, metrics)


# ----------------------------------------------------------------------------------- full states and weight files

def full_state_name(stage: str, epoch: int) -> str:
    """``freeze_epoch_{N}_weights.pth`` / ``unfreeze_epoch_{N}_weights.pth``."""
    return ckpt.checkpoint_name(stage, epoch, unit="epoch", suffix="_weights")


def peek_state(path: Path) -> dict:
    """A full state's plain fields without reading its tensors (memory-mapped ``weights_only`` load)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # any unreadable file: one message naming it
        raise ckpt.CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); "
                                   "resume from an earlier checkpoint or delete this file") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ckpt.CheckpointError(f"{path} is not a full training state of {SCRIPT}.py (no format "
                                   f"{STATE_FORMAT!r}); pass a freeze_/unfreeze_epoch_N_weights.pth or "
                                   f"{LAST_STATE} file")
    if state.get("format_version") != STATE_FORMAT_VERSION:
        raise ckpt.CheckpointError(f"{path} has state format version {state.get('format_version')}, this code "
                                   f"reads version {STATE_FORMAT_VERSION}; resume it with the code that wrote it")
    return state


def full_states(run_dir: Path) -> list[tuple[int, Path]]:
    """The run folder's full states (stage files and ``last_epoch_weights.pth``) as (epoch, path), oldest first."""
    found = [(n, p) for stage in STAGES for n, p in ckpt.list_checkpoints(run_dir, stage) if p.parent == run_dir]
    last = run_dir / LAST_STATE
    if last.is_file():
        found.append((int(peek_state(last)["epoch"]), last))
    # At equal epochs a stage file sorts after last_epoch_weights.pth: it is the one kept for good.
    return sorted(found, key=lambda item: (item[0], item[1].name != LAST_STATE))


def newest_full_state(run_dir: Path) -> tuple[int, Path] | None:
    """(epoch, path) of the highest-epoch full state in ``run_dir``, or None."""
    found = full_states(run_dir)
    return found[-1] if found else None


def exported_files(run_dir: Path) -> list[Path]:
    """EMA weight exports of a run folder (``ep*.pth``, best, final) and their ``.json`` sidecars."""
    files = [p for p in run_dir.glob("ep[0-9][0-9][0-9]-loss*-val_loss*") if p.suffix in (".pth", ".json")]
    for name in (BEST_WEIGHTS, FINAL_WEIGHTS):
        files += [run_dir / name, (run_dir / name).with_suffix(".json")]
    return [p for p in files if p.is_file()]


def guard_run_directory(run_dir: Path, overwrite: bool, notify: Callable[[str], None], remove: bool = True) -> None:
    """A plain run never continues or overwrites silently: full states in ``run_dir`` stop it (exit 2) unless
    ``--overwrite``, which deletes them and the exported weights (only where ``remove``: the main process)."""
    states = full_states(run_dir)
    if not states:
        return
    epoch, newest = states[-1]
    if not overwrite:
        raise RunDirectoryInUse(
            f"{run_dir} already holds full training states (newest: {newest}, epoch {epoch}); continue that run "
            f"with --resume (or --resume-from {newest}), start over with --overwrite (deletes the states and "
            "exported weights), or choose another --save-dir")
    if not remove:
        return
    removed = [p for _, p in states] + exported_files(run_dir)
    for path in removed:
        path.unlink(missing_ok=True)
    notify(f"--overwrite: deleted {len(removed)} full states and exported weight files in {run_dir}")


def locate_resume(cfg: FredConfig) -> Path | None:
    """The full state a ``--resume``/``--resume-from`` run continues from (None: nothing to resume)."""
    if cfg.resume_from is not None:
        if not cfg.resume_from.is_file():
            raise ckpt.CheckpointError(f"--resume-from {cfg.resume_from} does not exist; pass a full state file "
                                       "(freeze_/unfreeze_epoch_N_weights.pth or last_epoch_weights.pth)")
        return cfg.resume_from
    if cfg.resume:
        newest = newest_full_state(cfg.run_dir)
        return None if newest is None else newest[1]
    return None


def describe_meta(meta: dict) -> str:
    """``dual phi n concat r=0.5 nc=1 128x128`` style description of a model_meta dict."""
    fusion = f" {meta.get('fusion_mode')} r={meta.get('compression_ratio')}" if meta.get("modality") == "dual" else ""
    disc = " +discriminator" if meta.get("discriminator") else ""
    shape = "x".join(str(v) for v in meta.get("input_shape", []))
    return f"{meta.get('modality')} phi {meta.get('phi')}{fusion}{disc} nc={meta.get('nc')} {shape}"


def check_architecture(path: Path, stored: dict, current: dict) -> None:
    """Refuse to resume a full state of another architecture (modality, phi, fusion, classes, input, anchors)."""
    if stored != current:
        raise ckpt.ResumeRefused(
            f"refusing to resume from {path}: it holds a {describe_meta(stored)} model, this run builds "
            f"{describe_meta(current)}; resume without changing --modality/--phi/--fusion-mode/"
            "--compression-ratio/--discriminator/--input-shape, or start a new run in another --save-dir")


def full_state(*, epoch: int, stage: str, cfg: FredConfig, meta: dict, accelerator, model, ema, optimizer, stepper,
               series, history: History, best: Best, fitted: tuple[float, float], loss: float, rng: list,
               log_subdir: str, trainable: Sequence[str]) -> dict:
    """The §6.2 full state after ``epoch`` completed epochs (tensors and plain values only)."""
    identity = ckpt.RunIdentity(SCRIPT, stage, ckpt.trainable_fingerprint(trainable), accelerator.mixed_precision,
                                accelerator.num_processes)
    scaler = accelerator.scaler
    return {
        "format": STATE_FORMAT,
        "format_version": STATE_FORMAT_VERSION,
        "epoch": epoch,
        "stage": stage,
        "model": accelerator.unwrap_model(model).state_dict(),
        "ema": ema.state_dict(),
        "ema_updates": ema.updates,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "lr": {"init_lr_fit": fitted[0], "min_lr_fit": fitted[1], "total_epochs": cfg.epochs,
               "current": [group["lr"] for group in optimizer.param_groups]},
        "loss": loss,
        "history": history.state_dict(),
        "series": series.state_dict(),
        "step_counters": stepper.state_dict(),
        "best": best.state_dict(),
        "rng": rng,
        "config": config_to_dict(cfg),
        "model_meta": meta,
        "log_subdir": log_subdir,
        "meta": identity.as_meta(),
    }


def restore_full_state(state: dict, path: Path, cfg: FredConfig, policies: dict[str, FreezePolicy], accelerator,
                       model, ema, optimizer, stepper, series, warn: Callable[[str], None]) -> tuple[History, Best]:
    """Load a full state into the prepared run after checking it belongs to it (script, the stage it was saved
    in, trainable set, precision, world size); a changed T or period only warns."""
    epoch = int(state["epoch"])
    saved_stage = stage_of(epoch - 1, cfg)
    inner = accelerator.unwrap_model(model)
    identity = ckpt.RunIdentity(SCRIPT, saved_stage, ckpt.trainable_fingerprint(trainable_names(inner,
                                                                                              policies[saved_stage])),
                                accelerator.mixed_precision, accelerator.num_processes)
    ckpt.check_resume(path, state["meta"], identity)
    stored = state["config"]
    for name in ("epochs", "freeze_epoch", "save_period", "eval_period"):
        if stored.get(name) != getattr(cfg, name):
            warn(f"resuming with --{name.replace('_', '-')} {getattr(cfg, name)} (the checkpoint's run used "
                 f"{stored.get(name)})")
    inner.load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    ema.load_state_dict(state["ema"], state["ema_updates"])
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    stepper.load_state_dict(state["step_counters"])
    series.load_state_dict(state["series"])
    ckpt.restore_rng(state["rng"][accelerator.process_index % len(state["rng"])])
    best_state = state["best"]
    best = Best(best_state["metric"], float(best_state["value"]), int(best_state["epoch"]))
    if best.metric != best_metric(cfg):
        warn(f"the best model is now chosen by {best_metric(cfg)} (was {best.metric}); the next evaluation sets it")
        best = Best(best_metric(cfg))
    return History.from_state(state["history"]), best


def export_weights(path: Path, ema_state: dict, meta: dict, epoch: int, metrics: dict) -> Path:
    """EMA weights as a flat bubbliiiing-format state dict (no discriminator) plus the ``.json`` sidecar."""
    weights = {k: v.detach().cpu().clone() for k, v in strip_discriminator(ema_state).items()}
    ckpt.save_checkpoint(path, weights)
    sidecar = {"format": WEIGHTS_FORMAT, "model_meta": meta, "epoch": epoch,
               "metrics": {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                           for k, v in metrics.items()}}
    ckpt.atomic_write_json(path.with_suffix(".json"), sidecar)
    return path


def read_sidecar(weights: Path) -> dict | None:
    """The ``.json`` sidecar of an exported weights file, or None."""
    path = weights.with_suffix(".json")
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def resume_hint(run_dir: Path) -> str | None:
    """The newest resumable checkpoint and the command that continues from it (None if there is none)."""
    try:
        newest = newest_full_state(run_dir)
    except ckpt.CheckpointError:
        return None
    if newest is None:
        return None
    epoch, path = newest
    return (f"newest resumable checkpoint: {path} (epoch {epoch}); continue with: "
            f"python {SCRIPT}.py --save-dir {run_dir} --resume")


# --------------------------------------------------------------------------------------------------- eval only

def default_checkpoint(run_dir: Path) -> Path:
    """``--eval-only`` default: best, else final, else the newest full state (its EMA)."""
    for name in (BEST_WEIGHTS, FINAL_WEIGHTS):
        if (run_dir / name).is_file():
            return run_dir / name
    newest = newest_full_state(run_dir)
    if newest is None:
        raise FileNotFoundError(f"no weights to evaluate in {run_dir} ({BEST_WEIGHTS}, {FINAL_WEIGHTS} or a full "
                                "state); train first or pass --checkpoint")
    return newest[1]


def weights_meta(path: Path, cfg: FredConfig) -> dict:
    """Architecture of a weights file: its sidecar, a full state's ``model_meta``, else the configuration's."""
    sidecar = read_sidecar(path)
    if sidecar is not None:
        return sidecar["model_meta"]
    try:
        return peek_state(path)["model_meta"]
    except ckpt.CheckpointError:
        return config_meta(cfg)


def config_meta(cfg: FredConfig) -> dict:
    """The model_meta dict of the model this configuration builds."""
    dual = cfg.modality == "dual"
    return model_meta(cfg.modality, cfg.phi, len(CLASS_NAMES), CLASS_NAMES, cfg.input_shape,
                      fusion_mode=cfg.fusion_mode if dual else None,
                      compression_ratio=cfg.compression_ratio if dual else None,
                      discriminator=cfg.discriminator and dual)


def eval_settings(cfg: FredConfig, max_batches: int | None = None) -> EvalSettings:
    """Evaluation options of a configuration."""
    return EvalSettings(conf_thres=cfg.eval_conf, voc=cfg.voc_ap50, max_batches=max_batches)


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

