"""CrossFuse's training kinds: their names, files, settings, networks, losses and records (spec §1, §4, §6).

A *kind* is one of `autoencoder-ir`, `autoencoder-vi` (stage 1), `fusion` (stage 2) and `end-to-end`. The loop that
trains a kind is in `train_end_to_end.py`; this module is the task knowledge it uses:

- run folders `<save-dir>/[<run-name>/]{autoencoder,transfuse,end_to_end}/` and their file names: `.model`
  exports (1-based epochs), `loss/*.mat` (0-based epochs, cumulative), `checkpoints/<kind>/` (resumable states and
  the completion marker), `pairs.txt`, `run_info.json`;
- each kind's hyper-parameters, network, optimizer groups, loss terms and the §1 log line;
- the signature a resumed or completed run must share (model, data order) or is told about (settings).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from common import checkpoint as ckpt
from common.errors import UserError
from common.ivif.data import check_pair_headers, load_pairs, pairs_listing, select_pairs
from common.plots import plot_curves
from common.run import environment_info
from common.schedules import Schedule
from crossfuse.config import CrossFuseConfig
from crossfuse.losses import fusion_loss, reconstruction_loss
from crossfuse.model import AutoEncoder, CrossFuseModel, FusionNet, ReconstructionModel, parameter_groups
from crossfuse.weights import load_model_file, save_model_file

RunKind = Literal["autoencoder-ir", "autoencoder-vi", "fusion", "end-to-end"]
SCRIPT = "train_end_to_end.py"
W_PIX, W_GRA = 1.0, 10.0
W_RECON, W_RECON_SSIM = 1.0, 10000.0
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
MAX_NONFINITE_STEPS = 100
STEP_MILESTONE_EPOCH = 2  # official step schedule: base for epochs 1-2, 0.1 base from epoch 3
FUSION_SERIES = ("loss_data", "pix_loss", "gra_loss", "ssim_loss", "temperature", "lr", "epoch", "deep_weight_absmax")
AUTOENCODER_SERIES = ("loss_data", "recon_loss", "ssim_loss", "lr", "epoch")


class TrainingSetupError(UserError):
    """A stage cannot start (missing stage-1 weights, too few pairs...); the message says what to do."""


@dataclass(frozen=True)
class KindLayout:
    """Names of one run kind: folder, log prefix, `.mat` stem, logged series and the group whose lr is logged."""

    kind: RunKind
    folder: str
    log_prefix: str
    mat_stem: str
    series: tuple[str, ...]
    lr_group: str

    @property
    def is_fusion(self) -> bool:
        """Whether this kind trains the fusion network (stage 2 or end-to-end)."""
        return self.kind in ("fusion", "end-to-end")

    @property
    def modality(self) -> str:
        """`ir` or `vi` for the auto-encoder kinds."""
        return self.kind.rsplit("-", 1)[1]


LAYOUTS: dict[str, KindLayout] = {
    "autoencoder-ir": KindLayout("autoencoder-ir", "autoencoder", "AE[ir] - ", "loss_data_auto_ir", AUTOENCODER_SERIES,
                                 "autoencoder"),
    "autoencoder-vi": KindLayout("autoencoder-vi", "autoencoder", "AE[vi] - ", "loss_data_auto_vi", AUTOENCODER_SERIES,
                                 "autoencoder"),
    "fusion": KindLayout("fusion", "transfuse", "FUSION - ", "loss_data_trans", FUSION_SERIES, "cam"),
    "end-to-end": KindLayout("end-to-end", "end_to_end", "🔄 E2E - ", "loss_data_end_to_end", FUSION_SERIES, "cam"),
}


def stage_plan(cfg: CrossFuseConfig) -> list[RunKind]:
    """The kinds this command trains, in order."""
    if cfg.approach == "end-to-end":
        return ["end-to-end"]
    autoencoders: list[RunKind] = {"ir": ["autoencoder-ir"], "vi": ["autoencoder-vi"],
                                   "both": ["autoencoder-ir", "autoencoder-vi"]}[cfg.ae_modality]
    if cfg.stage == "autoencoder":
        return autoencoders
    if cfg.stage == "fusion":
        return ["fusion"]
    return [*autoencoders, "fusion"]


def experiment_dir(cfg: CrossFuseConfig) -> Path:
    """`--save-dir`, or its `--run-name` subfolder: the run folder holding the kinds' folders."""
    return cfg.save_dir / cfg.run_name if cfg.run_name else cfg.save_dir


def run_folder(cfg: CrossFuseConfig, kind: RunKind) -> Path:
    """The folder of `kind`: autoencoder/, transfuse/ or end_to_end/."""
    return experiment_dir(cfg) / LAYOUTS[kind].folder


def checkpoint_dir(cfg: CrossFuseConfig, kind: RunKind) -> Path:
    """Where `kind`'s resumable states and completion marker live."""
    return run_folder(cfg, kind) / "checkpoints" / kind


def model_paths(folder: Path, kind: RunKind, epoch: int) -> dict[str, Path]:
    """The `.model` files of `kind` written at 1-based `epoch`, by network part."""
    if kind == "end-to-end":
        parts = ("fusion", "ir_encoder", "vi_encoder")
        return {part: folder / f"end_to_end_{part}_epoch_{epoch}.model" for part in parts}
    if kind == "fusion":
        return {"fusion": folder / f"fusetrans_epoch_{epoch}.model"}
    return {"autoencoder": folder / f"auto_encoder_epoch_{epoch}_{LAYOUTS[kind].modality}.model"}


def mat_path(folder: Path, kind: RunKind, epoch_index: int) -> Path:
    """The cumulative loss dump of `kind` after 0-based `epoch_index`."""
    return folder / "loss" / f"{LAYOUTS[kind].mat_stem}_e{epoch_index}.mat"


def model_epochs(folder: Path, kind: RunKind) -> list[int]:
    """1-based epochs for which every `.model` file of `kind` exists in `folder`, ascending."""
    probe = next(iter(model_paths(folder, kind, 0).values())).name.replace("_epoch_0", "_epoch_*")
    epochs = []
    for path in folder.glob(probe):
        number = path.name.split("_epoch_", 1)[1].split("_")[0].split(".")[0]
        if number.isdigit() and all(p.is_file() for p in model_paths(folder, kind, int(number)).values()):
            epochs.append(int(number))
    return sorted(epochs)


def earlier_outputs(folder: Path, kind: RunKind) -> list[Path]:
    """`kind`'s exported `.model` files and loss dumps in `folder` (what `--overwrite` deletes)."""
    stale = [p for e in model_epochs(folder, kind) for p in model_paths(folder, kind, e).values()]
    return stale + sorted((folder / "loss").glob(f"{LAYOUTS[kind].mat_stem}_e*.mat"))


@dataclass(frozen=True)
class StageSettings:
    """Hyper-parameters of one kind: stage 1 reads `--ae.*`, the fusion kinds the top-level flags."""

    epochs: int
    lr: float
    batch: int
    train_num: int
    schedule: str
    weight_decay: float
    lr_mults: dict
    grad_clip: float | None


def stage_settings(cfg: CrossFuseConfig, kind: RunKind) -> StageSettings:
    """The settings `kind` trains with."""
    if LAYOUTS[kind].is_fusion:
        mults = dataclasses.asdict(cfg.lr_mult)
        return StageSettings(cfg.epochs, cfg.lr, cfg.batch, cfg.train_num, cfg.lr_schedule, cfg.weight_decay, mults,
                             cfg.grad_clip)
    return StageSettings(cfg.ae.epochs, cfg.ae.lr, cfg.ae.batch, cfg.ae.train_num, cfg.ae.lr_schedule,
                         cfg.ae.weight_decay, {"autoencoder": 1.0}, None)


def training_pairs(cfg: CrossFuseConfig, settings: StageSettings, world_size: int) -> tuple[list, str, int]:
    """The selected pairs (discovery and selection only: no image is decoded), their list's SHA-256 and the
    iterations per epoch; raises for a batch the processes cannot share or too few pairs."""
    pairs = select_pairs(load_pairs(cfg.data.root, cfg.data.layout), settings.train_num, cfg.data.selection)
    sha256 = hashlib.sha256(pairs_listing(pairs).encode("utf-8")).hexdigest()
    if settings.batch % world_size:
        raise TrainingSetupError(f"global batch {settings.batch} is not divisible by {world_size} processes; "
                                 "change --batch")
    iters_per_epoch = len(pairs) // settings.batch
    if iters_per_epoch == 0:
        raise TrainingSetupError(f"{len(pairs)} training pairs cannot fill one batch of {settings.batch}; lower "
                                 "--batch or add data")
    return pairs, sha256, iters_per_epoch


def check_training_images(cfg: CrossFuseConfig, settings: StageSettings) -> None:
    """Read the headers of every selected pair before training (unreadable files, mismatched pair sizes), so bad
    data stops the run at once with its file named, not in a loader worker hours later."""
    check_pair_headers(select_pairs(load_pairs(cfg.data.root, cfg.data.layout), settings.train_num,
                                    cfg.data.selection))


def resume_value(cfg: CrossFuseConfig, kind: RunKind) -> str:
    """`--resume` as it applies to `kind`: a checkpoint path belongs to the stage its name says (the command's other
    stages continue automatically); a path of no stage this command trains is an error."""
    if cfg.resume in ("auto", "never"):
        return cfg.resume
    parsed = ckpt.parse_checkpoint_name(Path(cfg.resume).name)
    plan = stage_plan(cfg)
    if parsed is None or parsed[0] not in plan:
        raise ckpt.CheckpointError(f"--resume {cfg.resume} is not a checkpoint of a stage this command trains "
                                   f"({', '.join(plan)}; names look like <stage>_step_<N>.pth); use --resume auto")
    return cfg.resume if parsed[0] == kind else "auto"


def make_schedule(name: str, unit: str, epochs: int, iters_per_epoch: int) -> Schedule:
    """The learning-rate schedule over epochs or iterations (cosine to the group minimum, official step, constant)."""
    span = 1 if unit == "epoch" else iters_per_epoch
    if name == "step":
        return Schedule("step", total=epochs * span, milestones=(STEP_MILESTONE_EPOCH * span,), gamma=0.1,
                        compounding=False)
    return Schedule(name, total=epochs * span)


def schedule_position(unit: str, iteration: int, iters_per_epoch: int) -> int:
    """Schedule position of 0-based `iteration`: its epoch index (set at epoch start) or the iteration itself."""
    return iteration // iters_per_epoch if unit == "epoch" else iteration


def is_log_point(done: int, step: int, iters_per_epoch: int) -> bool:
    """Whether a log line follows iteration `done` (1-based, counted over the stage): every `step` iterations,
    and at each epoch's last batch (a partial window)."""
    return done % step == 0 or done % iters_per_epoch == 0


def last_log_point(done: int, step: int, iters_per_epoch: int) -> int:
    """The latest log point strictly before iteration `done` (0 at the start): where its log window begins."""
    before = done - 1
    return max(before // step * step, before // iters_per_epoch * iters_per_epoch)


def log_line(layout: KindLayout, done: int, epochs: int, iters_per_epoch: int, lr: float,
             temperature: float | None, means: dict[str, float]) -> str:
    """The §1 log line after iteration `done` (time.ctime(), 1-based epoch and batch, lr and losses, 6 decimals)."""
    epoch, batch = divmod(done - 1, iters_per_epoch)
    head = (f"{layout.log_prefix}{time.ctime()} - Epoch {epoch + 1}/{epochs} - Batch {batch + 1}/{iters_per_epoch} - "
            f"lr:{lr:.6f}")
    if layout.is_fusion:
        return (f"{head} - temp:{temperature:.4f} - pix loss: {means['pix_loss']:.6f} - gra loss: "
                f"{means['gra_loss']:.6f} - ssim loss: {means['ssim_loss']:.6f} - total loss: {means['loss_data']:.6f}")
    return (f"{head} - recon loss: {means['recon_loss']:.6f} - ssim loss: {means['ssim_loss']:.6f} - "
            f"total loss: {means['loss_data']:.6f}")


def stage_one_weights(cfg: CrossFuseConfig) -> dict[str, Path | None]:
    """Encoder files for the fusion stage: `--init.ae-*`, else the last completed stage-1 epoch of each modality."""
    folder = experiment_dir(cfg) / LAYOUTS["autoencoder-ir"].folder
    found: dict[str, Path | None] = {}
    for modality, explicit in (("ir", cfg.init.ae_ir), ("vi", cfg.init.ae_vi)):
        if explicit is not None:
            found[modality] = explicit
            continue
        kind: RunKind = f"autoencoder-{modality}"  # type: ignore[assignment]
        epochs = model_epochs(folder, kind)
        found[modality] = model_paths(folder, kind, epochs[-1])["autoencoder"] if epochs else None
    return found


def encoder_files(cfg: CrossFuseConfig, kind: RunKind) -> dict[str, Path | None]:
    """The initial encoder weights of `kind`: stage-1 files for the fusion stage (an error when missing, unless
    random encoders are allowed), the optional warm start for end-to-end."""
    if kind == "end-to-end":
        return {"ir": cfg.init.ae_ir, "vi": cfg.init.ae_vi}
    if kind != "fusion":
        return {}
    found = stage_one_weights(cfg)
    missing = [modality for modality, path in found.items() if path is None]
    if missing and not cfg.allow_random_encoders:
        folder = experiment_dir(cfg) / "autoencoder"
        raise TrainingSetupError(
            f"the fusion stage needs stage-1 auto-encoder weights, and none were found for {' and '.join(missing)} "
            f"in {folder} (auto_encoder_epoch_<e>_{missing[0]}.model). Train them first with --approach two-stage "
            "--stage autoencoder (or run all stages), pass --init.ae-ir/--init.ae-vi, or --allow-random-encoders to "
            "train on random encoders")
    for modality, path in found.items():
        if path is not None and not Path(path).is_file():
            raise TrainingSetupError(f"stage-1 weights {path} for {modality} not found; check --init.ae-{modality}")
    return found


def signature(cfg: CrossFuseConfig, kind: RunKind, settings: StageSettings, data_sha256: str,
              encoders: dict[str, Path | None]) -> dict:
    """What a resumed or completed run must share with this one (the model and the data order: `strict`), and
    the settings whose change is only reported (`soft`)."""
    strict: dict = {}
    if LAYOUTS[kind].is_fusion:
        strict = {"model.learnable_temperature": cfg.learnable_temperature, "model.shift": cfg.model.shift,
                  "model.deep_weight": cfg.model.deep_weight, "model.freeze_output_norm": cfg.model.freeze_output_norm}
    if kind == "fusion":
        strict["model.encoders"] = {modality: (ckpt.file_sha256(path) if path is not None else "random")
                                    for modality, path in encoders.items()}
    strict.update({"order.seed": cfg.seed, "order.data_sha256": data_sha256, "order.global_batch": settings.batch,
                   "order.height": cfg.height, "order.width": cfg.width, "order.hflip": cfg.data.hflip})
    soft = {"epochs": settings.epochs, "lr": settings.lr, "schedule": settings.schedule,
            "schedule_unit": cfg.lr_schedule_unit, "min_lr": cfg.min_lr, "weight_decay": settings.weight_decay,
            "lr_mults": settings.lr_mults, "w_ssim": cfg.loss.w_ssim, "grad_clip": settings.grad_clip}
    return {"strict": strict, "soft": soft}


def build_model(cfg: CrossFuseConfig, kind: RunKind, encoders: dict[str, Path | None], say) -> torch.nn.Module:
    """The kind's network (seeded by the caller): a reconstruction model, or both auto-encoders and the fusion
    net, with the initial weights of `encoders` and `--init.fusion`; `say` reports what was loaded."""
    if not LAYOUTS[kind].is_fusion:
        return ReconstructionModel(AutoEncoder())
    ir_encoder, vi_encoder = AutoEncoder(), AutoEncoder()
    fusion = FusionNet(learnable_temperature=cfg.learnable_temperature, shift=cfg.model.shift,
                       deep_weight=cfg.model.deep_weight, window_batch=cfg.model.window_batch,
                       freeze_output_norm=cfg.model.freeze_output_norm)
    for modality, module in (("ir", ir_encoder), ("vi", vi_encoder)):
        if encoders.get(modality) is not None:
            say(f"{kind}: {load_model_file(module, encoders[modality]).describe()}")
        elif kind == "fusion":
            say(f"WARNING: fusion stage on a RANDOMLY INITIALISED {modality} encoder (--allow-random-encoders): the "
                "fused images will not be meaningful")
    if cfg.init.fusion is not None:
        say(f"{kind}: warm start, {load_model_file(fusion, cfg.init.fusion).describe()}")
    if kind == "end-to-end" and not any((cfg.init.ae_ir, cfg.init.ae_vi, cfg.init.fusion)):
        say(f"end-to-end: both encoders, the CAM and the decoder start from random initialisation (seed {cfg.seed}); "
            "no pretrained weights are loaded")
    return CrossFuseModel(ir_encoder, vi_encoder, fusion, freeze_encoders=kind == "fusion")


def optimizer_groups(model: torch.nn.Module, kind: RunKind) -> list[dict]:
    """Named optimizer groups (§4.1): `autoencoder`, or `[ir_encoder, vi_encoder,] cam, decoder`."""
    if LAYOUTS[kind].is_fusion:
        return parameter_groups(model)
    return [{"name": "autoencoder", "params": list(model.parameters())}]


def losses(layout: KindLayout, model: torch.nn.Module, batch: dict, w_ssim: float) -> tuple[torch.Tensor, dict]:
    """Forward pass and loss of one batch: the total to backpropagate and the per-iteration values to log
    (weighted terms, and the fusion kinds' largest deep-skip weight), all device tensors."""
    if layout.is_fusion:
        output = model(batch["ir"], batch["vi"])
        terms = fusion_loss(output.fused, batch["ir"], batch["vi"], W_PIX, W_GRA, w_ssim)
        return terms.total, {"loss_data": terms.total, "pix_loss": terms.pix, "gra_loss": terms.gra,
                             "ssim_loss": terms.ssim, "deep_weight_absmax": output.deep_weight_absmax}
    image = batch[layout.modality]
    terms = reconstruction_loss(model(image), image, W_RECON, W_RECON_SSIM)
    return terms.total, {"loss_data": terms.total, "recon_loss": terms.recon, "ssim_loss": terms.ssim}


def export_models(model: torch.nn.Module, folder: Path, kind: RunKind, epoch: int) -> list[Path]:
    """Write the `.model` files of `kind` after 1-based `epoch` (unwrapped model; main process)."""
    parts = ({"autoencoder": model.autoencoder} if not LAYOUTS[kind].is_fusion else
             {"fusion": model.fusion, "ir_encoder": model.ir_encoder, "vi_encoder": model.vi_encoder})
    return [save_model_file(parts[part], path) for part, path in model_paths(folder, kind, epoch).items()]


def run_info(cfg: CrossFuseConfig, kind: RunKind, settings: StageSettings, pairs: list, data_sha256: str,
             iters_per_epoch: int, optimizer, encoders: dict[str, Path | None], accelerator) -> dict:
    """`run_info.json` (§6): what was trained, on which data, with which optimisation."""
    layout = LAYOUTS[kind]
    info = {
        "approach": cfg.approach,
        "stage": "autoencoder" if not layout.is_fusion else kind,
        "kind": kind,
        "preset": cfg.preset,
        "data": {"roots": [str(root) for root in cfg.data.root], "layout": cfg.data.layout,
                 "selection": cfg.data.selection, "pairs": len(pairs), "pairs_sha256": data_sha256,
                 "hflip": cfg.data.hflip},
        "seed": cfg.seed,
        "size": [cfg.height, cfg.width],
        "global_batch": settings.batch,
        "iters_per_epoch": iters_per_epoch,
        "epochs": settings.epochs,
        "total_updates": iters_per_epoch * settings.epochs,
        "optimizer": {"name": "Adam", "betas": list(ADAM_BETAS), "eps": ADAM_EPS,
                      "weight_decay": settings.weight_decay, "weight_decay_kind": "coupled L2",
                      "grad_clip": settings.grad_clip,
                      "groups": {g["name"]: {"base_lr": g["base_lr"], "min_lr": g["min_lr"],
                                             "lr_mult": settings.lr_mults[g["name"]]} for g in optimizer.param_groups}},
        "schedule": {"kind": settings.schedule, "unit": cfg.lr_schedule_unit,
                     "min_lr": cfg.min_lr if settings.schedule == "cosine" else None},
        "loss": ({"w_pix": W_PIX, "w_gra": W_GRA, "w_ssim": cfg.loss.w_ssim} if layout.is_fusion
                 else {"w_recon": W_RECON, "w_ssim": W_RECON_SSIM}),
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "environment": environment_info(),
    }
    if layout.is_fusion:
        info["model"] = {"learnable_temperature": cfg.learnable_temperature, "shift": cfg.model.shift,
                         "deep_weight": cfg.model.deep_weight, "freeze_output_norm": cfg.model.freeze_output_norm}
        info["init"] = {key: (str(value) if value is not None else None)
                        for key, value in dataclasses.asdict(cfg.init).items()}
    if kind == "fusion":
        info["encoders"] = {m: ({"path": str(p), "sha256": ckpt.file_sha256(p)} if p is not None else None)
                            for m, p in encoders.items()}
        stage_one = {}
        for modality in ("ir", "vi"):
            done = checkpoint_dir(cfg, f"autoencoder-{modality}") / "DONE.json"  # type: ignore[arg-type]
            if done.is_file():
                record = json.loads(done.read_text())
                stage_one[modality] = {"updates": record["iterations"], "epochs": record["epochs"],
                                       "global_batch": record["global_batch"]}
        info["stage1"] = stage_one
    return info


def plot_losses(folder: Path, kind: RunKind, arrays: dict[str, np.ndarray], iters_per_epoch: int, epochs: int) -> None:
    """Loss curves (per iteration, log scale, epoch lines) and the learning rate, as PNG."""
    layout = LAYOUTS[kind]
    x = np.arange(1, len(arrays["loss_data"]) + 1)
    marks = [e * iters_per_epoch for e in range(1, epochs)]
    terms = ("loss_data", "pix_loss", "gra_loss", "ssim_loss") if layout.is_fusion else (
        "loss_data", "recon_loss", "ssim_loss")
    curves = {name: (x, arrays[name]) for name in terms if np.any(arrays[name])}
    plot_curves(folder / "loss" / f"loss_{kind}.png", curves, title=f"{kind} losses (weighted)",
                xlabel="iteration", ylabel="loss", logy=True, vlines=marks)
    plot_curves(folder / "loss" / f"lr_{kind}.png", {f"lr ({layout.lr_group})": (x, arrays["lr"])},
                title=f"{kind} learning rate", xlabel="iteration", ylabel="lr", vlines=marks)
