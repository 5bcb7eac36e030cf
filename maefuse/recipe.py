"""MaeFuse's training recipe around the loop of `train_mae_fusion.py` (spec §4, §6): stage folders and files, the
initial weights of a stage, the resumable trainable weights, the signature a resumed stage must share, the
schedule, the log line, exports, plots and the records that close a stage or a run.

A stage of `--modes` starts from the previous stage's final file, read back from disk (`checkpoint-{E-1}.pth` after
`train_decoder_only`, else `checkpoint{E-1}.pth`), so its load report names that file; stage 0 starts from
`--resume`, `--fusion_weight` and `--all_weight`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from common.checkpoint import atomic_write_json, file_sha256
from common.ivif.data import FilePair, Pair, pairs_listing
from common.plots import plot_curves
from common.resume import read_complete
from common.schedules import Schedule
from maefuse.config import Stage, TrainConfig, stage_plan
from maefuse.data import PairDataset
from maefuse.evaluate import check_lines, demo_quality
from maefuse.inference import model_from_weights
from maefuse.model import MaeFuse, build_model, module_summary
from maefuse.modes import check_initial_weights, check_official_groups, get_mode
from maefuse.weights import (FILE_NAMES, InitialWeights, epoch_files, exported_epochs, load_initial_weights,
                             prune_exported, save_epoch_weights)

SCRIPT = "train_mae_fusion.py"
STATE_PREFIX = "maefuse"  # resumable states: <stage folder>/checkpoints/maefuse_step_<N>.pth
MAX_NONFINITE_STEPS = 20
RECONSTRUCTION_RATIO = 0.5  # demo gate: the decoder pretraining at least halves the reconstruction MSE
SAMPLE_PAIRS = 8


@contextlib.contextmanager
def warnings_to(say: Callable[[str], None]) -> Iterator[None]:
    """Report the Python warnings raised inside the block as console warnings (so they reach the run's log)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        say(str(warning.message))


class TrainableWeights(nn.Module):
    """The trainable parameters of a model, as the resumable state's `trainable` entry.

    Spec §4.5: a state holds what trains (and the optimizer); the frozen encoder and any frozen decoder come back
    from the stage's initial weight files, whose SHA-256 the stage's signature pins. The wrapped model's
    parameters are this module's, so the kit fingerprints the trainable set as usual.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def trainable(self) -> dict[str, nn.Parameter]:
        """The parameters that require grad, by the model's names."""
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return {name: parameter.detach() for name, parameter in self.trainable().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        parameters = self.trainable()
        missing, unexpected = sorted(set(parameters) - set(state)), sorted(set(state) - set(parameters))
        wrong = [name for name in set(parameters) & set(state) if parameters[name].shape != state[name].shape]
        if missing or unexpected or wrong:
            raise RuntimeError(f"trainable weights differ: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                               f"wrong shape {wrong[:3]}")
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(state[name])


# ------------------------------------------------------------------------------------------------ files

def checkpoint_dir(stage: Stage) -> Path:
    """Where a stage's resumable states and completion marker live."""
    return stage.folder / "checkpoints"


def final_weights(stage: Stage) -> tuple[str, Path]:
    """(kind, path) of a stage's last export: what the next stage starts from."""
    name, kind = epoch_files(stage.mode, stage.epochs - 1)[0]
    return kind, stage.folder / name


def earlier_outputs(folder: Path) -> list[Path]:
    """A stage folder's exported weights and loss dumps (what `--overwrite` deletes)."""
    exported = [folder / name.format(epoch=epoch) for kind, name in FILE_NAMES.items()
                for epoch in exported_epochs(folder, kind)]
    return exported + sorted((folder / "loss").glob("loss_e*.mat"))


def mat_path(folder: Path, epoch: int) -> Path:
    """The cumulative loss dump after 0-based `epoch` (§6)."""
    return folder / "loss" / f"loss_e{epoch}.mat"


def initial_files(cfg: TrainConfig, stage: Stage, previous: Stage | None) -> dict[str, Path]:
    """The weight files a stage starts from, by flag: the user's for the first stage, else the previous stage's
    final export."""
    if previous is None:
        return {flag: path for flag, path in (("resume", cfg.resume), ("fusion_weight", cfg.fusion_weight),
                                              ("all_weight", cfg.all_weight)) if path is not None}
    kind, path = final_weights(previous)
    return {kind: path}


def build_stage_model(cfg: TrainConfig, stage: Stage, files: Mapping[str, Path], per_device_batches: list[int],
                      say: Callable[[str], None], warn: Callable[[str], None]) -> tuple[MaeFuse, InitialWeights]:
    """The stage's network (seeded by the caller) with its initial weights loaded strictly (one report line each
    to `say`), the mode's guards run and the official-attention groups of the per-device batch sizes checked
    (warnings to `warn`)."""
    spec = get_mode(stage.mode)
    model = build_model(cfg.model.size(), cfg.model.fusion_attention, cfg.model.official_group_size)
    with warnings_to(warn):
        loaded = load_initial_weights(model, unsafe_load=cfg.unsafe_load, log=say, **files)
        check_initial_weights(spec, encoder_loaded=loaded.encoder_loaded, decoder_loaded=loaded.decoder_loaded,
                              allow_random_decoder=cfg.allow_random_decoder)
        if spec.route != "reconstruct":
            check_official_groups(model, per_device_batches)
    return model, loaded


def reconstruction_batches(pairs: list[Pair], img_size: int) -> DataLoader | None:
    """Batches of the pairs whose reconstruction MSE `train_decoder_only` reports before and after (None: none)."""
    return DataLoader(PairDataset(pairs, img_size), batch_size=8) if pairs else None


def signature(cfg: TrainConfig, stage: Stage, pairs: list[Pair], files: Mapping[str, Path]) -> dict:
    """What a resumed or finished stage must share with this one (model, initial weights, data order: `strict`),
    and the settings whose change is only reported (`soft`)."""
    listing = hashlib.sha256(pairs_listing(pairs).encode("utf-8")).hexdigest()
    strict = {"mode": stage.mode, "size": cfg.model.size().as_meta(), "fusion_attention": cfg.model.fusion_attention,
              "official_group_size": cfg.model.official_group_size, "seed": cfg.seed, "global_batch": cfg.batch_size,
              "pairs_sha256": listing, "extra_images": str(cfg.extra_images) if stage.mode == "train_decoder_only"
              and cfg.extra_images else None,
              "initial_weights": {flag: file_sha256(path) for flag, path in files.items()}}
    soft = {"epochs": stage.epochs, "lr": stage.lr, "weight_decay": cfg.weight_decay, "lr_schedule": cfg.lr_schedule,
            "warmup_epochs": cfg.warmup_epochs}
    return {"strict": strict, "soft": soft}


def make_schedule(cfg: TrainConfig, total_steps: int, iters_per_epoch: int) -> Schedule:
    """Constant (paper), or the opt-in cosine to 0 with `warmup_epochs` of warm-up, per iteration."""
    if cfg.lr_schedule == "constant":
        return Schedule("constant")
    return Schedule("warmup_cosine_tail", total=total_steps, warmup=cfg.warmup_epochs * iters_per_epoch,
                    warmup_start_ratio=0.0)


def banner(cfg: TrainConfig, stage: Stage, model: MaeFuse, pairs: int, iters_per_epoch: int, accelerator) -> list[str]:
    """The stage banner (§1): preset, size, mode, attention, batches, precision and the module table."""
    size = model.size
    per_device = cfg.batch_size // accelerator.num_processes
    group = f" (group size {model.official_group_size})" if model.fusion_attention == "official" else ""
    lines = [f"{stage.label}: preset {cfg.preset}, model {size.name} ({size.img_size}px, patch {size.patch_size}, "
             f"D {size.embed_dim}x{size.depth}, d {size.decoder_embed_dim}x{size.decoder_depth}), "
             f"fusion_attention {model.fusion_attention}{group}, batch {cfg.batch_size} "
             f"global / {per_device} per device x {accelerator.num_processes}, "
             f"precision {accelerator.mixed_precision}, "
             f"{pairs} pairs, {iters_per_epoch} iterations x {stage.epochs} epochs, lr {stage.lr:g}; outputs in "
             f"{stage.folder}",
             f"  {'module':<13}{'trainable':>13}{'params':>13}"]
    lines += [f"  {name:<13}{trainable:>13,}{total:>13,}" for name, trainable, total in module_summary(model)]
    return lines


def log_line(stage: Stage, done: int, iters_per_epoch: int, means: Mapping[str, float], lr: float,
             images_per_second: float) -> str:
    """The §1 log line after 1-based iteration `done` of a stage: stage k/K, mode, epoch e/E, iteration i/n, the
    loss terms (4 decimals), lr and img/s (training pairs per second)."""
    epoch, batch = divmod(done - 1, iters_per_epoch)
    terms = " ".join(f"{name} {value:.4f}" for name, value in means.items() if name != "lr")
    return (f"{stage.label} | epoch {epoch + 1}/{stage.epochs} | iter {batch + 1}/{iters_per_epoch} | {terms} | "
            f"lr {lr:.3e} | {images_per_second:.1f} img/s")


def log_window_start(done: int, log_every: int, iters_per_epoch: int) -> int:
    """Where the log window ending at iteration `done` begins: the previous log line (every `log_every` iterations
    and at each epoch's end), so a window never spans two epochs and a resumed run prints the same means."""
    before = done - 1
    return max(before // log_every * log_every, before // iters_per_epoch * iters_per_epoch)


def window_means(values: Mapping[str, list[float]]) -> dict[str, float]:
    """Exact means of each series over a log window or an epoch."""
    return {name: math.fsum(series) / len(series) for name, series in values.items() if series}


def sample_pairs(pairs: list[Pair]) -> list[FilePair]:
    """The fixed pairs of the validation samples: the first 8 file pairs by stem (dataset rows are not written)."""
    return [pair for pair in pairs if isinstance(pair, FilePair)][:SAMPLE_PAIRS]


def export_epoch(model: MaeFuse, stage: Stage, epoch: int, cfg: TrainConfig) -> list[Path]:
    """Write the epoch's §6 files from the unwrapped model and prune old epochs (main process)."""
    written = save_epoch_weights(stage.folder, model, training_mode=stage.mode, epoch=epoch, preset=cfg.preset)
    prune_exported(stage.folder, cfg.keep_last)
    return written


def plot_losses(stage: Stage, arrays: Mapping[str, np.ndarray], iters_per_epoch: int) -> list[Path]:
    """Per-iteration loss terms (log scale, epoch lines) and the learning rate as PNG, in the stage's loss/."""
    x = np.arange(1, len(arrays["lr"]) + 1)
    marks = [e * iters_per_epoch for e in range(1, stage.epochs)]
    curves = {name: (x, values) for name, values in arrays.items() if name != "lr"}
    loss_png = plot_curves(stage.folder / "loss" / "loss.png", curves, title=f"{stage.label} losses",
                           xlabel="iteration", ylabel="loss", logy=True, vlines=marks)
    lr_png = plot_curves(stage.folder / "loss" / "lr.png", {"lr": (x, arrays["lr"])}, title=f"{stage.label} lr",
                         xlabel="iteration", ylabel="lr", vlines=marks)
    return [loss_png, lr_png]


def completion_record(stage: Stage, cfg: TrainConfig, position_step: int, signature_: dict,
                      fingerprints: list[str], loaded: InitialWeights, recon: dict | None,
                      timing: dict) -> dict:
    """The stage's `DONE.json`: what was trained, from which files, where its final weights are."""
    kind, path = final_weights(stage)
    return {"mode": stage.mode, "epochs": stage.epochs, "iterations": position_step, "global_batch": cfg.batch_size,
            "lr": stage.lr, "signature": signature_, "parameter_sha256_per_rank": fingerprints,
            "initial_weights": [report.describe() for report in loaded.reports],
            "final_weights": {"kind": kind, "path": str(path)}, "reconstruction_mse": recon, "timing": timing,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


def next_steps(cfg: TrainConfig, final: Path, data_path: Path | None) -> list[str]:
    """The commands worth running after training: fuse and evaluate with the final full weights."""
    data = data_path if data_path is not None else Path("DATA_DIR")
    out = cfg.output_dir / "fused"
    return [f"python {SCRIPT} fuse --ckpt {final} --data_path {data} --out_dir {out}",
            f"python {SCRIPT} evaluate --fused_dir {out} --data_path {data}",
            f"tensorboard --logdir {cfg.output_dir}"]


def write_demo_report(cfg: TrainConfig, final: Path, say: Callable[[str], None], started: float) -> Path:
    """Fuse and score the demo's held-out pairs with the final weights (`eval/`), add the reconstruction check of
    the decoder pretraining, and write `demo_report.json` (spec §9 check 14); one console line per check."""
    model, report_line = model_from_weights(final)
    say(report_line.describe())
    report = demo_quality(model, cfg.demo_root / "test", cfg.output_dir / "eval")
    lines = check_lines(report)
    pretraining = [stage for stage in stage_plan(cfg) if stage.mode == "train_decoder_only"]
    recon = read_complete(checkpoint_dir(pretraining[0]))["reconstruction_mse"] if pretraining else None
    if recon:
        passed = recon["after"] <= RECONSTRUCTION_RATIO * recon["before"]
        report["checks"]["reconstruction"] = {"before": recon["before"], "after": recon["after"],
                                              "required": RECONSTRUCTION_RATIO * recon["before"], "passed": passed}
        report["passed"] = report["passed"] and passed
        lines.append(f"demo check reconstruction: MSE {recon['before']:.4f} -> {recon['after']:.4f}, required <= "
                     f"{RECONSTRUCTION_RATIO * recon['before']:.4f}: {'pass' if passed else 'FAIL'}")
    report["seconds"] = {"total": time.perf_counter() - started, "torch_threads": torch.get_num_threads()}
    path = atomic_write_json(cfg.output_dir / "demo_report.json", report)
    for line in lines:
        say(line)
    say(f"demo {'PASSED' if report['passed'] else 'FAILED'}: {path}")
    return path
