"""FRED's training recipe (spec/fred.md §4): stages, freeze policies, optimizer and learning rates, the forward pass.

Epoch e is a freeze epoch iff e < ``freeze_epoch`` and not ``skip_freeze``. The switch to the unfreeze stage
re-wraps the model (:func:`common.freeze.switch_stage`), rebuilds the training loader with the unfreeze batch,
refits the learning rates to the new global batch and sets the EMA's update count to steps_per_epoch·epoch
(bubbliiiing). The optimizer is built once over all parameters, so its momentum survives the switch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from common.freeze import FreezePolicy
from common.schedules import Schedule
from fred.config import FredConfig
from fred.fusion import negative_pair_valid, pair_disc_loss, positive_pair_valid
from fred.index import CLASS_NAMES
from fred.model import backbone_prefixes, model_meta

MAX_NONFINITE_STEPS = 10
STAGES = ("freeze", "unfreeze")
STEP_SERIES = ("loss", "loc", "cls", "conf", "disc", "disc_acc", "lr")
HISTORY = ("epoch", "stage", "loss", "val_loss", "lr", "ap50", "ap50_95")
# SGD and Adam learning-rate clamps of the batch-size fit (bubbliiiing train.py).
LR_LIMITS = {"sgd": (5e-4, 5e-2), "adam": (3e-4, 1e-3)}


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


def saved_stage(epoch: int, batch: int, cfg: FredConfig) -> str:
    """The stage a state saved at (``epoch`` of the next batch, ``batch``) was trained in: an epoch-end state
    belongs to the epoch just finished."""
    return stage_of(epoch - 1 if batch == 0 and epoch > 0 else epoch, cfg)


def best_metric(cfg: FredConfig) -> tuple[str, str]:
    """The metric that picks the best model and whether higher or lower is better (val_loss when mAP is off)."""
    metric = cfg.best_metric if cfg.eval_map else "val_loss"
    return metric, "min" if metric == "val_loss" else "max"


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
    """SGD (nesterov) or Adam (betas (momentum, .999)) over all parameters in three groups, built once. Fused
    implementations (CPU and GPU): one kernel per step, and a non-finite step is skipped on the device."""
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.init_lr, momentum=cfg.momentum, nesterov=True, fused=True)
    return torch.optim.Adam(groups, lr=cfg.init_lr, betas=(cfg.momentum, 0.999), fused=True)


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


def config_meta(cfg: FredConfig) -> dict:
    """The model_meta dict of the model this configuration builds."""
    dual = cfg.modality == "dual"
    return model_meta(cfg.modality, cfg.phi, len(CLASS_NAMES), CLASS_NAMES, cfg.input_shape,
                      fusion_mode=cfg.fusion_mode if dual else None,
                      compression_ratio=cfg.compression_ratio if dual else None,
                      discriminator=cfg.discriminator and dual)


def signature(cfg: FredConfig, meta: dict) -> dict:
    """What a resumed run must share (the architecture) and what may change with a report (epochs, periods)."""
    return {"strict": {"architecture": describe_meta(meta)},
            "soft": {name: getattr(cfg, name) for name in ("epochs", "freeze_epoch", "save_period", "eval_period")}}


def describe_meta(meta: dict) -> str:
    """``dual phi n concat r=0.5 nc=1 128x128`` style description of a model_meta dict."""
    fusion = f" {meta.get('fusion_mode')} r={meta.get('compression_ratio')}" if meta.get("modality") == "dual" else ""
    disc = " +discriminator" if meta.get("discriminator") else ""
    shape = "x".join(str(v) for v in meta.get("input_shape", []))
    return f"{meta.get('modality')} phi {meta.get('phi')}{fusion}{disc} nc={meta.get('nc')} {shape}"


def quick_test_config(cfg: FredConfig) -> FredConfig:
    """``--quick-test``: one epoch per stage that would run, saving and evaluating every epoch, in
    ``<save_dir>/quick_test/`` (overwritten)."""
    freeze_epoch = 1 if freeze_runs(cfg) else 0
    epochs = max(freeze_epoch + (0 if cfg.freeze_training else 1), 1)
    return dataclasses.replace(cfg, save_dir=cfg.run_dir / "quick_test", freeze_epoch=freeze_epoch, epochs=epochs,
                               save_period=1, eval_period=1, resume="never",
                               run=dataclasses.replace(cfg.run, overwrite=True))


def steps_per_epoch(train_samples: int, cfg: FredConfig, stage: str, world_size: int) -> int:
    """Optimizer steps of one epoch of ``stage`` (capped by ``--quick-test-batches`` in a quick test)."""
    steps = train_samples // (stage_batch(cfg, stage) * world_size)
    return min(steps, cfg.quick_test_batches) if cfg.quick_test else steps


def epoch_means(values: dict[str, list[float]]) -> dict[str, float]:
    """Mean of each per-step series over an epoch, skipping non-finite (skipped) steps; NaN if none is finite."""
    means = {}
    for name, series in values.items():
        array = np.asarray(series, dtype=np.float64)
        finite = array[np.isfinite(array)]
        means[name] = float(finite.mean()) if finite.size else float("nan")
    return means
