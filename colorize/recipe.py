"""The colorization training recipe (spec/colorize.md §3, §4): optimizer and schedule, the forward pass and loss of
one micro-batch, per-step loss means over an accumulation window, the training-time budget, what a resumed run
must share with its checkpoint, and the start-up panel.

- AdamW (0.9, 0.999), weight decay 1e-4, fused (one kernel per step; a non-finite step is skipped on the device),
  over the ``nonlocal`` and ``fusion`` groups of :meth:`FusionSystem.get_parameter_groups`.
- CosineAnnealingLR(T_max = epochs, eta_min) stepped per epoch is a pure function of the epoch, hence of the
  optimizer step: the learning rate of a step is the one of the epoch its last micro-batch belongs to.
- The optional discriminator (RaLSGAN, §3) joins from ``--loss.gan-start-epoch``; its parameters are frozen while
  the generator term is computed, so the generator's backward never reaches them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from typing import Iterator

import torch
from torch import nn

from colorize.config import ColorizeConfig
from colorize.loss import LOSS_PARTS, Discriminator, FusionLoss
from colorize.system import FusionSystem
from common.run import broadcast_from_main, config_to_dict
from common.schedules import Schedule, set_base_lrs

STEP_SERIES = (*LOSS_PARTS, "gan_d", "lr_nonlocal", "lr_fusion")
"""Per optimizer step in losses.mat (means over the step's micro-batches) and per epoch (means over its steps)."""
VALIDATION_SERIES = ("val_psnr", "val_psnr_gray", "val_psnr_exemplar", "val_warp_error", "val_warp_error_gray",
                     "val_warp_error_exemplar")
HISTORY = ("epoch", *STEP_SERIES[:-2], *VALIDATION_SERIES)
LOG_FIELDS = {"total": "total", "l1": "l1", "ctx": "contextual", "align": "align", "smooth": "smooth"}
"""Console name -> series of the log line (then lr_nonlocal and lr_fusion)."""
ADAM_BETAS = (0.9, 0.999)
MAX_NONFINITE_STEPS = 20


def resolve_precision(requested: str) -> str:
    """``auto`` = fp16 on CUDA, else fp32 (``no``); other values are passed to the kit."""
    if requested == "auto":
        return "fp16" if torch.cuda.is_available() else "no"
    return requested


def build_optimizer(system: FusionSystem, cfg: ColorizeConfig) -> torch.optim.AdamW:
    """Fused AdamW over the named groups ``nonlocal`` and ``fusion`` (frozen modules never included), with each
    group's base and minimum rate stored for :func:`common.schedules.apply_schedule`."""
    groups = system.get_parameter_groups(cfg.optim.lr_nonlocal, cfg.optim.lr_fusion)
    optimizer = torch.optim.AdamW(groups, betas=ADAM_BETAS, weight_decay=cfg.optim.weight_decay, fused=True)
    set_base_lrs(optimizer, [group["lr"] for group in groups], cfg.optim.min_lr)
    return optimizer


def lr_schedule(cfg: ColorizeConfig) -> Schedule:
    """CosineAnnealingLR(T_max = epochs, eta_min = --optim.min-lr), evaluated at the epoch."""
    return Schedule("cosine", total=cfg.train.epochs)


def scheduler_state(optimizer: torch.optim.Optimizer, cfg: ColorizeConfig, epoch: int) -> dict:
    """The schedule after ``epoch`` epochs in the keys of CosineAnnealingLR's state dict (FlowChroma files)."""
    return {"T_max": cfg.train.epochs, "eta_min": cfg.optim.min_lr, "last_epoch": epoch, "_step_count": epoch + 1,
            "base_lrs": [group["base_lr"] for group in optimizer.param_groups],
            "_last_lr": [group["lr"] for group in optimizer.param_groups]}


def build_discriminator(cfg: ColorizeConfig) -> tuple[Discriminator, torch.optim.AdamW] | tuple[None, None]:
    """FlowChroma's discriminator and its AdamW (lr --loss.discriminator-lr) when --loss.gan > 0."""
    if not cfg.loss.gan:
        return None, None
    discriminator = Discriminator()
    optimizer = torch.optim.AdamW(discriminator.parameters(), lr=cfg.loss.discriminator_lr, betas=ADAM_BETAS,
                                  weight_decay=cfg.optim.weight_decay, fused=True)
    return discriminator, optimizer


def gan_active(cfg: ColorizeConfig, epoch: int) -> bool:
    """Whether the GAN terms apply in 0-based ``epoch`` (from the 1-based --loss.gan-start-epoch on)."""
    return bool(cfg.loss.gan) and epoch + 1 >= cfg.loss.gan_start_epoch


@contextlib.contextmanager
def frozen_parameters(module: nn.Module | None) -> Iterator[None]:
    """Parameters of ``module`` do not require gradients inside the block (graphs built there never reach them)."""
    if module is None:
        yield
        return
    flags = [parameter.requires_grad for parameter in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(module.parameters(), flags):
            parameter.requires_grad_(flag)


def training_losses(model: nn.Module, criterion: FusionLoss, batch: dict, accelerator,
                    discriminator: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
    """Forward one clip batch under autocast and compute FusionLoss (fp32).

    The model receives only the lightness of the clip (channel 0): ground-truth colour reaches the system through
    the exemplar alone (§9.3). ``discriminator`` (the unwrapped module, when the GAN term is active) is frozen
    while the generator term is built. Returns the total (with graph), the detached loss parts, and the outputs.
    """
    frames, reference = batch["frames_lab"], batch["reference_lab"]
    with accelerator.autocast():
        outputs, flow_outputs, confs, aux = model(frames[:, :, :1], reference, return_aux=True)
    with frozen_parameters(discriminator):
        total, parts = criterion(outputs, frames, flow_outputs, confs, aux=aux, reference_lab=reference,
                                 discriminator=discriminator)
    return total, parts, outputs


class WindowMeans:
    """Means of the loss parts over the micro-batches of one accumulation window, kept on the device.

    Stateful so that a checkpoint written inside a window resumes with the partial sums (the per-step series stay
    exact); with one micro-batch per step the mean is the value itself.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """Add one micro-batch's detached 0-d values."""
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = value if name not in self.sums else self.sums[name] + value
        self.count += 1

    def take(self) -> dict[str, torch.Tensor]:
        """The window's means; the window starts empty again."""
        means = {name: total / self.count for name, total in self.sums.items()}
        self.sums, self.count = {}, 0
        return means

    def state_dict(self) -> dict:
        """Partial sums (CPU tensors) and count."""
        return {"count": self.count, "sums": {name: value.cpu() for name, value in self.sums.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (on the CPU; :meth:`to` moves it)."""
        self.count = int(state["count"])
        self.sums = {name: value for name, value in state["sums"].items()}

    def to(self, device: torch.device) -> "WindowMeans":
        """Move the partial sums to ``device`` (after a restore)."""
        self.sums = {name: value.to(device) for name, value in self.sums.items()}
        return self


class TrainingBudget:
    """Training seconds spent over all invocations of a run, against ``--train.time-budget-s`` (0: no budget).

    Only the loop's time counts (set-up, validation and exports do not). The decision is made on the main process
    and shared, every ``every`` optimizer steps with several processes, so all processes stop at the same step.
    """

    def __init__(self, seconds: float, every: int = 1):
        self.limit = float(seconds)
        self.every = max(1, every)
        self.spent_before = 0.0
        self._started: float | None = None

    def start(self) -> None:
        """Start counting (the loop begins)."""
        self._started = time.perf_counter()

    @property
    def spent(self) -> float:
        """Seconds spent so far, this invocation included."""
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self.spent_before + running

    def exhausted(self, accelerator, step: int) -> bool:
        """True on every process once the budget is used up (checked at each step, or every ``every`` steps with
        several processes)."""
        if not self.limit:
            return False
        if accelerator.num_processes == 1:
            return self.spent >= self.limit
        if step % self.every:
            return False
        return bool(broadcast_from_main(accelerator, self.spent >= self.limit))

    def state_dict(self) -> dict:
        """Seconds spent (the limit is the current command's)."""
        return {"seconds": self.spent}

    def load_state_dict(self, state: dict) -> None:
        """Continue counting from the recorded seconds."""
        self.spent_before = float(state["seconds"])


def parameter_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state (names and bytes): the identity of randomly initialised frozen weights."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def weight_identities(system: FusionSystem) -> dict[str, str]:
    """Per module, the SHA-256 of its weight file, or of its parameters for random initialisation (frozen modules)
    or ``random init`` (trainable ones, which the checkpoint restores)."""
    identities = {}
    for role, source in sorted(system.weight_sources.items()):
        if source.sha256:
            identities[role] = f"file sha256 {source.sha256}"
        elif role in ("embed_net", "colornet"):
            digest = parameter_digest(getattr(system, role))
            identities[role] = f"{source.path or 'random init'}, parameters sha256 {digest}"
        else:
            identities[role] = source.path or "random init"
    return identities


def _flat(prefix: str, values: dict) -> dict:
    return {f"{prefix}.{name}": value for name, value in values.items()}


def signature(cfg: ColorizeConfig, weights: dict[str, str]) -> dict:
    """What a resumed run must share with its checkpoint (``strict``: model, weights, data order) and what may
    change with a report (``soft``: epochs, rates, loss weights, budget, output periods)."""
    plain = config_to_dict(cfg)
    exemplar = {k: v for k, v in plain["exemplar"].items() if k != "eval_temperature"}
    data = {k: v for k, v in plain["data"].items() if k not in ("workers", "demo_root", "demo_seed", "val_dataset")}
    strict = {**_flat("flow", plain["flow"]), **_flat("exemplar", exemplar), **_flat("fusion", plain["fusion"]),
              **_flat("data", data), **_flat("weights", weights), "train.batch_size": cfg.train.batch_size,
              "train.seed": cfg.train.seed, "optim.accumulation_steps": cfg.optim.accumulation_steps,
              "loss.gan_enabled": bool(cfg.loss.gan)}
    soft = {**_flat("loss", plain["loss"]), **_flat("optim", {k: v for k, v in plain["optim"].items()
                                                              if k != "accumulation_steps"}),
            "train.epochs": cfg.train.epochs, "train.time_budget_s": cfg.train.time_budget_s}
    return {"strict": strict, "soft": soft}


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f} M" if count >= 1e5 else f"{count:,}"


def startup_panel(system: FusionSystem, optimizer: torch.optim.Optimizer, cfg: ColorizeConfig) -> list[str]:
    """Lines of the start-up panel: strategy and rates, flow backend, and per module its parameters, whether it
    trains, and where its weights came from (SHA-256 or RANDOM INIT)."""
    lrs = {group["name"]: group["base_lr"] for group in optimizer.param_groups}
    strategy = ("1 (SwinTExCo checkpoint folder: nonlocal_net fine-tuned)" if system.strategy == 1 else
                "2 (no SwinTExCo checkpoint: nonlocal_net trained from scratch)")
    roles = {"embed_net": "frozen", "nonlocal_net": "trained", "fusion_net": "trained",
             "colornet": "frozen" + (", unused" if cfg.exemplar.output == "warp" else ""), "flow": "frozen"}
    counts = system.parameter_counts()
    lines = [f"strategy {strategy}; lr nonlocal {lrs['nonlocal']:.1e}, fusion {lrs['fusion']:.1e}",
             f"flow backend: {system.flow.describe()}",
             f"exemplar colour: {cfg.exemplar.output}; fusion net: {cfg.fusion.arch} (residual base "
             f"{cfg.fusion.residual_base}, first frame {cfg.fusion.first_frame_base})",
             "module        parameters  role            weights"]
    for role, kind in roles.items():
        source = system.weight_sources.get(role)
        origin = source.describe() if source is not None else "no weights"
        lines.append(f"{role:<13} {_millions(counts[role]):>10}  {kind:<15} {origin}")
    width = max(len(line) for line in lines)
    return ["+" + "-" * (width + 2) + "+", *[f"| {line:<{width}} |" for line in lines], "+" + "-" * (width + 2) + "+"]


def finite_mean(values) -> float:
    """Mean of the finite values (a skipped non-finite step is not averaged in); NaN when none is finite."""
    finite = [float(value) for value in values if math.isfinite(float(value))]
    return math.fsum(finite) / len(finite) if finite else math.nan
