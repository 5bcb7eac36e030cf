"""CrossFuse training pieces shared by stage 1 (auto-encoders), stage 2 (fusion) and end-to-end (spec §1, §4, §6).

A run *kind* is one of `autoencoder-ir`, `autoencoder-vi`, `fusion` and `end-to-end`. `StageRun` builds one
kind's data, network, optimizer groups and schedule, resumes it, and provides the steps of the training loop that
`train_end_to_end.py` drives: one optimizer step, the §1 log line over a window of true per-iteration means, the
epoch-end `.mat` dump and `.model` export, full checkpoints, and the stage's end (plots, `DONE.json`).

Files of a kind live in its run folder `<save-dir>/[<run-name>/]{autoencoder,transfuse,end_to_end}/`:
`.model` exports (1-based epochs), `loss/*.mat` (0-based epochs, cumulative), `checkpoints/<kind>/` (full state,
last 2 kept, `DONE.json` when finished), `pairs.txt`, `run_info.json`, `config.json`, `run.json`, `console.log`,
loss plots and TensorBoard events.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from common import checkpoint as ckpt
from common.console import RunConsole
from common.data import GlobalBatchSampler, WorkerSeeder, to_device
from common.ivif.data import IVIFPairDataset, load_pairs, pairs_listing, select_pairs, write_pairs_file
from common.lossdump import LossSeries, save_mat
from common.plots import plot_curves
from common.run import check_amp_invariant, config_to_dict, environment_info, seed_everything, write_run_record
from common.schedules import Schedule, apply_schedule, group_lr, set_base_lrs
from common.step import OptimStep
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


class TrainingSetupError(Exception):
    """A stage cannot start (missing stage-1 weights, too few pairs...); the message says what to do."""


@dataclass(frozen=True)
class KindLayout:
    """Names of one run kind: folder, log prefix, `.mat` stem, checkpoint stage and log fields."""

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
    """`--save-dir`, or its `--run-name` subfolder."""
    return cfg.save_dir / cfg.run_name if cfg.run_name else cfg.save_dir


def run_folder(cfg: CrossFuseConfig, kind: RunKind) -> Path:
    """The run folder of `kind`: autoencoder/, transfuse/ or end_to_end/."""
    return experiment_dir(cfg) / LAYOUTS[kind].folder


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


def stage_settings(cfg: CrossFuseConfig, kind: RunKind) -> StageSettings:
    """The settings `kind` trains with."""
    if LAYOUTS[kind].is_fusion:
        mults = dataclasses.asdict(cfg.lr_mult)
        return StageSettings(cfg.epochs, cfg.lr, cfg.batch, cfg.train_num, cfg.lr_schedule, cfg.weight_decay, mults)
    return StageSettings(cfg.ae.epochs, cfg.ae.lr, cfg.ae.batch, cfg.ae.train_num, cfg.ae.lr_schedule,
                         cfg.ae.weight_decay, {"autoencoder": 1.0})


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
    """The latest log point at or before iteration `done` (0 at the start): where the open log window begins."""
    return max(done // step * step, done // iters_per_epoch * iters_per_epoch)


def log_line(layout: KindLayout, epoch: int, epochs: int, batch: int, iters_per_epoch: int, lr: float,
             temperature: float | None, means: dict[str, float]) -> str:
    """The §1 log line (time.ctime(), 1-based epoch and batch, lr with 6 decimals, losses with 6 decimals)."""
    head = f"{layout.log_prefix}{time.ctime()} - Epoch {epoch}/{epochs} - Batch {batch}/{iters_per_epoch} - lr:{lr:.6f}"
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


def parameter_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name and bytes (ranks of a data-parallel run must agree)."""
    digest = hashlib.sha256()
    for name, parameter in module.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class StageRun:
    """One training run of one kind: data, network, optimizer, resume, and the steps of the loop.

    Use: `StageRun(...)`, `completed()` (skip a finished stage), `setup()`, then for each epoch of
    `remaining_epochs()` and each batch of `batches(epoch)`: `train_step`, `log` at `at_log_point()`,
    `end_epoch` at `at_epoch_end()`, `save_checkpoint` where wanted; finally `finish()`.
    """

    def __init__(self, accelerator, cfg: CrossFuseConfig, kind: RunKind, console: RunConsole, argv: list[str]):
        self.accelerator = accelerator
        self.cfg = cfg
        self.kind = kind
        self.layout = LAYOUTS[kind]
        self.console = console
        self.argv = argv
        self.settings = stage_settings(cfg, kind)
        self.folder = run_folder(cfg, kind)
        self.checkpoints = ckpt.CheckpointManager(self.folder / "checkpoints" / kind, kind, unit="step",
                                                  keep_last=cfg.keep_checkpoints, width=6)
        self.done_path = self.checkpoints.directory / "DONE.json"
        self.step = 0
        self.saved_at: int | None = None
        self.saved_path: Path | None = None
        self.window: dict[str, list[float]] = {name: [] for name in self.layout.series}
        self.loop_started = 0.0
        self.steps_at_start = 0
        self._discover_data()
        self.encoder_files = self._encoder_files()
        self.signature = self._signature()

    # ------------------------------------------------------------------------------------------------ set-up

    def _discover_data(self) -> None:
        """Pair discovery and selection (cheap: no image is decoded); the data-list hash."""
        cfg = self.cfg
        pairs = load_pairs(cfg.data.root, cfg.data.layout)
        self.pairs = select_pairs(pairs, self.settings.train_num, cfg.data.selection)
        self.data_sha256 = hashlib.sha256(pairs_listing(self.pairs).encode("utf-8")).hexdigest()
        if self.settings.batch % self.accelerator.num_processes:
            raise TrainingSetupError(f"global batch {self.settings.batch} is not divisible by "
                                     f"{self.accelerator.num_processes} processes; change --batch")
        self.iters_per_epoch = len(self.pairs) // self.settings.batch
        if self.iters_per_epoch == 0:
            raise TrainingSetupError(f"{len(self.pairs)} training pairs cannot fill one batch of "
                                     f"{self.settings.batch}; lower --batch or add data")
        self.total_steps = self.iters_per_epoch * self.settings.epochs

    def _encoder_files(self) -> dict[str, Path | None]:
        """Stage-1 weights for the fusion stage (error when missing unless random encoders are allowed)."""
        if self.kind != "fusion":
            return {}
        found = stage_one_weights(self.cfg)
        missing = [modality for modality, path in found.items() if path is None]
        if missing and not self.cfg.allow_random_encoders:
            folder = experiment_dir(self.cfg) / "autoencoder"
            raise TrainingSetupError(
                f"the fusion stage needs stage-1 auto-encoder weights, and none were found for "
                f"{' and '.join(missing)} in {folder} (auto_encoder_epoch_<e>_{missing[0]}.model). Train them first "
                "with --approach two-stage --stage autoencoder (or run all stages), pass --init.ae-ir/--init.ae-vi, "
                "or --allow-random-encoders to train on random encoders"
            )
        for modality, path in found.items():
            if path is not None and not Path(path).is_file():
                raise TrainingSetupError(f"stage-1 weights {path} for {modality} not found; check --init.ae-{modality}")
        return found

    def _signature(self) -> dict:
        """What a resumed or completed run must share with this one (`model`, `order`), or is warned about
        (`settings`)."""
        cfg = self.cfg
        model: dict = {}
        if self.layout.is_fusion:
            model = {"learnable_temperature": cfg.learnable_temperature, "shift": cfg.model.shift,
                     "deep_weight": cfg.model.deep_weight}
        if self.kind == "fusion":
            model["encoders"] = {modality: (ckpt.file_sha256(path) if path is not None else "random")
                                 for modality, path in self.encoder_files.items()}
        order = {"seed": cfg.seed, "data_sha256": self.data_sha256, "global_batch": self.settings.batch,
                 "height": cfg.height, "width": cfg.width, "hflip": cfg.data.hflip}
        settings = {"epochs": self.settings.epochs, "lr": self.settings.lr, "schedule": self.settings.schedule,
                    "schedule_unit": cfg.lr_schedule_unit, "min_lr": cfg.min_lr,
                    "weight_decay": self.settings.weight_decay, "lr_mults": self.settings.lr_mults,
                    "w_ssim": cfg.loss.w_ssim}
        return {"model": model, "order": order, "settings": settings}

    def _compare_signature(self, theirs: dict, source: Path, ignore_epochs: bool = False) -> None:
        """Refuse a different model or data order (unless `--resume-force`); warn about other setting changes."""
        problems = [f"{part}.{key}: {theirs.get(part, {}).get(key)!r} there, {value!r} here"
                    for part in ("model", "order") for key, value in self.signature[part].items()
                    if theirs.get(part, {}).get(key) != value]
        if problems and not self.cfg.resume_force:
            raise ckpt.ResumeRefused(
                f"{source} belongs to a run with another model or data order ({'; '.join(problems)}). Use another "
                "--save-dir/--run-name, restore the settings, or pass --resume-force"
            )
        for problem in problems:
            self.console.warn(f"{self.kind}: accepted a difference (--resume-force): {problem}")
        changed = [f"{key} {theirs.get('settings', {}).get(key)!r} -> {value!r}"
                   for key, value in self.signature["settings"].items()
                   if theirs.get("settings", {}).get(key) != value and not (ignore_epochs and key == "epochs")]
        if changed:
            self.console.warn(f"{self.kind}: continuing with changed settings: {', '.join(changed)}")

    def completed(self) -> bool:
        """True when `DONE.json` says this stage already trained at least the requested epochs with this model and
        data order (then nothing is written); `--resume never` refuses or clears earlier results instead."""
        done = json.loads(self.done_path.read_text()) if self.done_path.is_file() else None
        if self.cfg.resume == "never":
            self._refuse_or_clear(done)
            return False
        if done is None:
            return False
        self._compare_signature(done["signature"], self.done_path, ignore_epochs=True)
        if done["epochs"] >= self.settings.epochs:
            self.console.print(f"{self.kind}: complete ({done['epochs']} epochs, {self.done_path}); skipping")
            return True
        self.console.warn(f"{self.kind}: finished {done['epochs']} epochs before; continuing to {self.settings.epochs} "
                          "(the learning-rate schedule now spans the new total)")
        return False

    def _refuse_or_clear(self, done: dict | None) -> None:
        """`--resume never` where earlier results exist: refuse, or with `--resume-force` delete them."""
        earlier = ckpt.list_checkpoints(self.checkpoints.directory, self.kind)
        if not earlier and done is None:
            return
        if not self.cfg.resume_force:
            raise ckpt.ResumeRefused(
                f"{self.checkpoints.directory} holds {len(earlier)} checkpoint(s){' and DONE.json' if done else ''} "
                f"of an earlier {self.kind} run: continue it with --resume auto, or pass --resume-force to delete "
                "them and start over"
            )
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            stale = [path for _, path in earlier] + [p for p in (self.done_path,) if p.is_file()]
            epochs = model_epochs(self.folder, self.kind)
            stale += [p for e in epochs for p in model_paths(self.folder, self.kind, e).values()]
            stale += sorted((self.folder / "loss").glob(f"{self.layout.mat_stem}_e*.mat"))
            for path in stale:
                path.unlink(missing_ok=True)
            self.console.print(f"{self.kind}: --resume never --resume-force: deleted {len(stale)} earlier files")
        self.accelerator.wait_for_everyone()

    def setup(self) -> None:
        """Data loader, seeded network, optimizer groups, one `prepare`, and the resume when asked."""
        accelerator, cfg, settings = self.accelerator, self.cfg, self.settings
        self.dataset = IVIFPairDataset(self.pairs, size=(cfg.height, cfg.width), hflip=cfg.data.hflip, seed=cfg.seed)
        self.sampler = GlobalBatchSampler(len(self.pairs), settings.batch, cfg.seed, accelerator.process_index,
                                          accelerator.num_processes)
        self.seeder = WorkerSeeder(cfg.seed, accelerator.process_index)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=cfg.data.workers, worker_init_fn=self.seeder,
            pin_memory=accelerator.device.type == "cuda")
        seed_everything(cfg.seed)  # each stage's initialisation depends on the seed only, not on earlier stages
        model = self._build_model()
        self.trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
        if cfg.sync_bn and accelerator.num_processes > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        groups = self._parameter_groups(model)
        optimizer = torch.optim.Adam(groups, lr=settings.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                                     weight_decay=settings.weight_decay)
        mults = [settings.lr_mults[group["name"]] for group in groups]
        min_lr = cfg.min_lr if settings.schedule == "cosine" else 0.0
        set_base_lrs(optimizer, [settings.lr * m for m in mults], [min_lr * m for m in mults])
        self.schedule = make_schedule(settings.schedule, cfg.lr_schedule_unit, settings.epochs, self.iters_per_epoch)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        check_amp_invariant(accelerator)
        self.stepper = OptimStep(accelerator, self.optimizer, self.model, max_grad_norm=None,
                                 max_nonfinite=MAX_NONFINITE_STEPS, warn=self.console.warn)
        self.series = LossSeries(self.layout.series)
        self._resume()

    def _build_model(self) -> torch.nn.Module:
        """The kind's network: a reconstruction model, or both auto-encoders and the fusion net."""
        cfg = self.cfg
        if not self.layout.is_fusion:
            return ReconstructionModel(AutoEncoder())
        ir_encoder, vi_encoder = AutoEncoder(), AutoEncoder()
        fusion = FusionNet(learnable_temperature=cfg.learnable_temperature, shift=cfg.model.shift,
                           deep_weight=cfg.model.deep_weight, window_batch=cfg.model.window_batch)
        encoders = self.encoder_files if self.kind == "fusion" else {"ir": cfg.init.ae_ir, "vi": cfg.init.ae_vi}
        for modality, module in (("ir", ir_encoder), ("vi", vi_encoder)):
            if encoders.get(modality) is not None:
                self.console.print(f"{self.kind}: {load_model_file(module, encoders[modality]).describe()}")
            elif self.kind == "fusion":
                self.console.warn(f"fusion stage on a RANDOMLY INITIALISED {modality} encoder "
                                  "(--allow-random-encoders): the fused images will not be meaningful")
        if cfg.init.fusion is not None:
            self.console.print(f"{self.kind}: warm start, {load_model_file(fusion, cfg.init.fusion).describe()}")
        if self.kind == "end-to-end" and not any((cfg.init.ae_ir, cfg.init.ae_vi, cfg.init.fusion)):
            self.console.print(f"end-to-end: both encoders, the CAM and the decoder start from random initialisation "
                               f"(seed {cfg.seed}); no pretrained weights are loaded")
        return CrossFuseModel(ir_encoder, vi_encoder, fusion, freeze_encoders=self.kind == "fusion")

    def _parameter_groups(self, model: torch.nn.Module) -> list[dict]:
        """Named optimizer groups (§4.1): `autoencoder`, or `[ir_encoder, vi_encoder,] cam, decoder`."""
        if self.layout.is_fusion:
            return parameter_groups(model)
        return [{"name": "autoencoder", "params": list(model.parameters())}]

    def identity(self) -> ckpt.RunIdentity:
        """What the kit's resume check compares."""
        return ckpt.RunIdentity(SCRIPT, self.kind, ckpt.trainable_fingerprint(self.trainable),
                                self.accelerator.mixed_precision, self.accelerator.num_processes)

    def _resume_path(self) -> Path | None:
        """The checkpoint to resume: latest (`auto`), none (`never`), or the given path for its own stage (the other
        stages of the command resume automatically)."""
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume != "auto":
            path = Path(self.cfg.resume)
            parsed = ckpt.parse_checkpoint_name(path.name)
            plan = stage_plan(self.cfg)
            if parsed is None or parsed[0] not in plan:
                raise ckpt.CheckpointError(f"{path} is not a checkpoint of a stage this command trains "
                                           f"({', '.join(plan)}; names look like <stage>_step_<N>.pth); "
                                           "use --resume auto")
            if parsed[0] == self.kind:
                return path
        return self.checkpoints.latest()

    def _resume(self) -> None:
        """Restore the full state of the checkpoint to resume, if any."""
        path = self._resume_path()
        if path is None:
            return
        state = ckpt.load_checkpoint(path)
        meta = state["meta"]
        allow = [f for f in ckpt.RESUME_FIELDS if f not in ("script", "stage")] if self.cfg.resume_force else []
        ckpt.check_resume(path, meta, self.identity(), allow)
        self._compare_signature(meta["signature"], path)
        self.accelerator.unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stepper.load_state_dict(state["step_counters"])
        self.step = int(meta["step"])
        self.series.load_state_dict(state["series"], length=self.step)
        arrays = self.series.arrays()
        start = last_log_point(self.step, self.cfg.step, self.iters_per_epoch)
        self.window = {name: arrays[name][start:self.step].tolist() for name in self.layout.series}
        ckpt.restore_rng(state["rng"][self.accelerator.process_index % len(state["rng"])])
        epoch, batch = divmod(self.step, self.iters_per_epoch)
        self.console.print(f"{self.kind}: resumed from {path} at iteration {self.step} (epoch {epoch + 1}, "
                           f"batch {batch})")

    # ------------------------------------------------------------------------------------------------ records

    def run_info(self) -> dict:
        """`run_info.json` (§6): what was trained, on which data, with which optimisation."""
        cfg, settings = self.cfg, self.settings
        info = {
            "approach": cfg.approach,
            "stage": "autoencoder" if not self.layout.is_fusion else self.kind,
            "kind": self.kind,
            "preset": cfg.preset,
            "data": {"roots": [str(root) for root in cfg.data.root], "layout": cfg.data.layout,
                     "selection": cfg.data.selection, "pairs": len(self.pairs), "pairs_sha256": self.data_sha256,
                     "hflip": cfg.data.hflip},
            "seed": cfg.seed,
            "size": [cfg.height, cfg.width],
            "global_batch": settings.batch,
            "iters_per_epoch": self.iters_per_epoch,
            "epochs": settings.epochs,
            "total_updates": self.total_steps,
            "optimizer": {"name": "Adam", "betas": list(ADAM_BETAS), "eps": ADAM_EPS,
                          "weight_decay": settings.weight_decay, "weight_decay_kind": "coupled L2",
                          "groups": {g["name"]: {"base_lr": g["base_lr"], "min_lr": g["min_lr"],
                                                 "lr_mult": settings.lr_mults[g["name"]]}
                                     for g in self.optimizer.param_groups}},
            "schedule": {"kind": settings.schedule, "unit": cfg.lr_schedule_unit,
                         "min_lr": cfg.min_lr if settings.schedule == "cosine" else None},
            "loss": ({"w_pix": W_PIX, "w_gra": W_GRA, "w_ssim": cfg.loss.w_ssim} if self.layout.is_fusion
                     else {"w_recon": W_RECON, "w_ssim": W_RECON_SSIM}),
            "world_size": self.accelerator.num_processes,
            "mixed_precision": self.accelerator.mixed_precision,
            "environment": environment_info(),
        }
        if self.layout.is_fusion:
            info["model"] = {"learnable_temperature": cfg.learnable_temperature, "shift": cfg.model.shift,
                             "deep_weight": cfg.model.deep_weight}
            info["init"] = {key: (str(value) if value is not None else None)
                            for key, value in dataclasses.asdict(cfg.init).items()}
        if self.kind == "fusion":
            ae_folder = experiment_dir(cfg) / "autoencoder"
            info["encoders"] = {m: ({"path": str(p), "sha256": ckpt.file_sha256(p)} if p is not None else None)
                                for m, p in self.encoder_files.items()}
            stage_one = {}
            for modality in ("ir", "vi"):
                done = ae_folder / "checkpoints" / f"autoencoder-{modality}" / "DONE.json"
                if done.is_file():
                    record = json.loads(done.read_text())
                    stage_one[modality] = {"updates": record["iterations"], "epochs": record["epochs"],
                                           "global_batch": record["global_batch"]}
            info["stage1"] = stage_one
        return info

    def start(self) -> None:
        """Write the run records and announce the stage (main process)."""
        if self.accelerator.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.console.set_log_file(self.folder / "console.log")
            write_pairs_file(self.folder / "pairs.txt", self.pairs)
            ckpt.atomic_write_json(self.folder / "run_info.json", self.run_info())
            write_run_record(self.folder, SCRIPT, self.cfg, self.argv, ["--resume", "{checkpoint}"],
                             extra={"kind": self.kind})
        if self.cfg.tensorboard:
            self.accelerator.init_trackers(f"{self.layout.folder}/tensorboard/{self.kind}")
        self.console.print(f"{self.kind}: {len(self.pairs)} pairs at {self.cfg.height}x{self.cfg.width}, batch "
                           f"{self.settings.batch}, {self.iters_per_epoch} iterations x {self.settings.epochs} epochs "
                           f"= {self.total_steps} updates, {self.accelerator.num_processes} process(es) on "
                           f"{self.accelerator.device}; outputs in {self.folder}")
        self.console.start(self.total_steps, self.kind, completed=self.step)
        self.loop_started = time.perf_counter()
        self.steps_at_start = self.step

    # ------------------------------------------------------------------------------------------------ the loop

    def remaining_epochs(self) -> range:
        """0-based epochs still (partly) to train."""
        return range(self.step // self.iters_per_epoch, self.settings.epochs)

    def batches(self, epoch: int):
        """This process's batches of `epoch`, from the resume point on; prints the original's epoch header."""
        start = self.step - epoch * self.iters_per_epoch
        self.sampler.set_epoch(epoch, start_batch=start)
        self.dataset.set_epoch(epoch)
        self.seeder.epoch = epoch
        self.console.print(f"BATCH SIZE {self.settings.batch}.")
        self.console.print(f"Train images number {len(self.pairs)}.")
        return self.loader

    def train_step(self, batch: dict) -> None:
        """One optimizer step on `batch`; the per-iteration values go to the loss series (no host sync)."""
        accelerator = self.accelerator
        batch = to_device(batch, accelerator.device)
        epoch = self.step // self.iters_per_epoch
        apply_schedule(self.optimizer, self.schedule,
                       schedule_position(self.cfg.lr_schedule_unit, self.step, self.iters_per_epoch))
        with accelerator.accumulate(self.model):
            if self.layout.is_fusion:
                ir, vi = batch["ir"], batch["vi"]
                output = self.model(ir, vi)
                terms = fusion_loss(output.fused, ir, vi, W_PIX, W_GRA, self.cfg.loss.w_ssim)
                values = {"loss_data": terms.total, "pix_loss": terms.pix, "gra_loss": terms.gra,
                          "ssim_loss": terms.ssim, "deep_weight_absmax": output.deep_weight_absmax}
            else:
                image = batch[self.layout.modality]
                terms = reconstruction_loss(self.model(image), image, W_RECON, W_RECON_SSIM)
                values = {"loss_data": terms.total, "recon_loss": terms.recon, "ssim_loss": terms.ssim}
            self.stepper(terms.total)
        if self.layout.is_fusion:
            values["temperature"] = accelerator.unwrap_model(self.model).fusion.mean_temperature()
        values["lr"] = group_lr(self.optimizer, self.layout.lr_group)
        values["epoch"] = float(epoch + 1)
        self.series.append({name: (v.detach() if isinstance(v, torch.Tensor) else v) for name, v in values.items()})
        self.step += 1
        self.console.advance(self.step)

    def _flush(self) -> None:
        """Move pending values to the host (collective) and keep them for the current log window."""
        for name, values in self.series.flush(self.accelerator).items():
            self.window[name].extend(values.tolist())

    def at_log_point(self) -> bool:
        """Whether the iteration just done ends a log window."""
        return is_log_point(self.step, self.cfg.step, self.iters_per_epoch)

    def at_epoch_end(self) -> bool:
        """Whether the iteration just done is the last of its epoch."""
        return self.step % self.iters_per_epoch == 0

    def log(self) -> None:
        """Print the §1 line: means of the window's per-iteration values, lr of the logged group, current tau."""
        self._flush()
        means = {name: math.fsum(values) / len(values) for name, values in self.window.items()}
        self.window = {name: [] for name in self.layout.series}
        epoch, batch = divmod(self.step - 1, self.iters_per_epoch)
        lr = group_lr(self.optimizer, self.layout.lr_group)
        temperature = None
        if self.layout.is_fusion:
            temperature = float(self.accelerator.unwrap_model(self.model).fusion.mean_temperature())
        line = log_line(self.layout, epoch + 1, self.settings.epochs, batch + 1, self.iters_per_epoch, lr,
                        temperature, means)
        self.console.log(self.step, {"loss": means["loss_data"], "lr": lr}, line=line)
        if self.cfg.tensorboard:
            scalars = {f"{self.kind}/{name}": value for name, value in means.items() if name != "epoch"}
            if temperature is not None:
                scalars[f"{self.kind}/temperature"] = temperature
            self.accelerator.log(scalars, step=self.step)

    def end_epoch(self) -> None:
        """Epoch end: cumulative `.mat` dump, `.model` exports (main process), then a full checkpoint."""
        self._flush()
        epoch = self.step // self.iters_per_epoch
        if self.accelerator.is_main_process:
            arrays = self.series.arrays()
            save_mat(mat_path(self.folder, self.kind, epoch - 1),
                     {**arrays, "iters_per_epoch": self.iters_per_epoch, "global_batch": self.settings.batch})
            inner = self.accelerator.unwrap_model(self.model)
            parts = ({"autoencoder": inner.autoencoder} if not self.layout.is_fusion else
                     {"fusion": inner.fusion, "ir_encoder": inner.ir_encoder, "vi_encoder": inner.vi_encoder})
            for part, path in model_paths(self.folder, self.kind, epoch).items():
                save_model_file(parts[part], path)
                self.console.print(f"Checkpoint, trained model saved at: {path}")
        self.save_checkpoint()

    def save_checkpoint(self) -> Path | None:
        """Write the full resumable state (collective; the main process writes; once per iteration). Returns the path
        on the main process."""
        if self.saved_at == self.step:
            return self.saved_path
        self._flush()
        rng = ckpt.gather_rng(self.accelerator)
        path = None
        if self.accelerator.is_main_process:
            epoch, batch = divmod(self.step, self.iters_per_epoch)
            state = {
                "meta": {**self.identity().as_meta(), "step": self.step, "epoch": epoch, "batch": batch,
                         "iters_per_epoch": self.iters_per_epoch, "signature": self.signature},
                "model": self.accelerator.unwrap_model(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step_counters": self.stepper.state_dict(),
                "series": self.series.state_dict(),
                "rng": rng,
                "config": config_to_dict(self.cfg),
            }
            path = self.checkpoints.save(state, self.step)
        self.accelerator.wait_for_everyone()
        self.saved_at, self.saved_path = self.step, path
        return path

    def at_checkpoint_point(self) -> bool:
        """Whether `--checkpoint-every` asks for a checkpoint after this iteration."""
        every = self.cfg.checkpoint_every
        return bool(every) and self.step % every == 0

    def finished(self) -> bool:
        """Whether every iteration of the stage is done."""
        return self.step >= self.total_steps

    # ------------------------------------------------------------------------------------------------ the end

    def finish(self) -> dict:
        """Stage end: plots, the ranks' weight check and `DONE.json`; frees the stage's memory. Returns DONE's dict."""
        self._flush()
        self.console.stop()
        loop_seconds = time.perf_counter() - self.loop_started
        inner = self.accelerator.unwrap_model(self.model)
        fingerprints = [parameter_fingerprint(inner)]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            fingerprints = list(gather_object(fingerprints))
        if len(set(fingerprints)) > 1:
            self.console.warn(f"{self.kind}: the processes ended with DIFFERENT weights: {fingerprints}")
        done_steps = self.step - self.steps_at_start
        record = {
            "kind": self.kind,
            "epochs": self.settings.epochs,
            "iterations": self.step,
            "global_batch": self.settings.batch,
            "signature": self.signature,
            "models": [str(p) for p in model_paths(self.folder, self.kind, self.settings.epochs).values()],
            "parameter_sha256_per_rank": fingerprints,
            "timing": {"loop_seconds": loop_seconds, "iterations_this_run": done_steps,
                       "samples_per_second": done_steps * self.settings.batch / loop_seconds if loop_seconds else None},
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if self.accelerator.is_main_process:
            self._plot()
            ckpt.atomic_write_json(self.done_path, record)
            self.console.print(f"{self.kind}: finished {self.step} iterations; {self.done_path} written")
        if self.cfg.tensorboard:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []
        self.accelerator.wait_for_everyone()
        self.accelerator.free_memory()
        return record

    def _plot(self) -> None:
        """Loss curves (per iteration, log scale, epoch lines) and the learning rate, as PNG."""
        arrays = self.series.arrays()
        x = np.arange(1, len(arrays["loss_data"]) + 1)
        epochs = [e * self.iters_per_epoch for e in range(1, self.settings.epochs)]
        terms = ("loss_data", "pix_loss", "gra_loss", "ssim_loss") if self.layout.is_fusion else (
            "loss_data", "recon_loss", "ssim_loss")
        curves = {name: (x, arrays[name]) for name in terms if np.any(arrays[name])}
        plot_curves(self.folder / "loss" / f"loss_{self.kind}.png", curves, title=f"{self.kind} losses (weighted)",
                    xlabel="iteration", ylabel="loss", logy=True, vlines=epochs)
        plot_curves(self.folder / "loss" / f"lr_{self.kind}.png", {f"lr ({self.layout.lr_group})": (x, arrays["lr"])},
                    title=f"{self.kind} learning rate", xlabel="iteration", ylabel="lr", vlines=epochs)
