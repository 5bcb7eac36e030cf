"""The nine MaeFuse training modes (spec §4.1): trainable modules, forward route, loss; optimizer groups; guards.

A mode is a `ModeSpec`. Its `policy()` is a `common.freeze.FreezePolicy` (the encoder and the fixed tables never
train), its `route` is the `MaeFuse.forward` route, and `mode_loss` runs the forward pass and the mode's loss:

    spec = get_mode("train_decoder_CFM_MFM")
    apply_policy(model, spec.policy())
    optimizer = build_optimizer(model, lr=1e-4)
    terms = mode_loss(model, spec, batch["vi"], batch["ir"])   # {"loss", "loss_grad", "loss_lap"}
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Literal, get_args

import torch
import torch.nn as nn

from common.errors import ConfigError
from common.freeze import FreezePolicy
from maefuse.losses import fusion_loss, mean_loss, reconstruction_loss
from maefuse.model import (CFM_MODULES, DECODER_MODULES, ENCODER_MODULES, MFM_MODULES, POSITION_TABLES, MaeFuse,
                           Route, evaluation)

TrainingMode = Literal["train_CFM_mean", "train_CFM_fusion", "train_MFM_mean_CFM_lock", "train_MFM_fusion_CFM_lock",
                       "train_MFM_mean_CFM_open", "train_MFM_fusion_CFM_open", "train_decoder_only",
                       "train_decoder_MFM", "train_decoder_CFM_MFM"]
DEFAULT_MODE: TrainingMode = "train_decoder_CFM_MFM"
LossKind = Literal["mean", "fusion", "reconstruction"]
SamplePath = Literal["full", "cfm", "mean"]
ModuleGroup = Literal["decoder", "cfm", "mfm"]

MODULE_GROUPS: dict[str, tuple[str, ...]] = {"decoder": DECODER_MODULES, "cfm": CFM_MODULES, "mfm": MFM_MODULES}
LOSS_NAMES: dict[str, tuple[str, ...]] = {"mean": ("loss", "loss_mean"), "fusion": ("loss", "loss_grad", "loss_lap"),
                                          "reconstruction": ("loss", "loss_rec")}
"""Per-step loss series of each loss kind, named as in the `loss_e{e}.mat` dumps (spec §6)."""


@dataclass(frozen=True)
class ModeSpec:
    """One training mode.

    Attributes:
        name: the public `--training_mode` name.
        trainable: module groups that train (`decoder`, `cfm`, `mfm`); everything else is frozen.
        route: the `MaeFuse.forward` route (how far the forward pass goes).
        loss: `mean`, `fusion` or `reconstruction`.
        sample_path: the fusion path of validation samples: `cfm` for the CFM-only modes, `mean` (decoded latent
            mean) for decoder pretraining, whose fusion layer is untrained, `full` otherwise.
    """

    name: str
    trainable: tuple[ModuleGroup, ...]
    route: Route
    loss: LossKind
    sample_path: SamplePath

    @property
    def trainable_modules(self) -> tuple[str, ...]:
        """Module names (state-dict prefixes) that train."""
        return tuple(module for group in self.trainable for module in MODULE_GROUPS[group])

    @property
    def runs_decoder(self) -> bool:
        """Whether the forward path goes through the decoder."""
        return self.route in ("reconstruct", "cfm_image", "fused_image")

    @property
    def loss_names(self) -> tuple[str, ...]:
        """Names of the loss series `mode_loss` returns (the total `loss` first)."""
        return LOSS_NAMES[self.loss]

    def policy(self) -> FreezePolicy:
        """Exactly the listed modules train; the encoder and the fixed tables never do; frozen modules are put in
        eval mode by `common.freeze.set_train_mode`."""
        return FreezePolicy(trainable=self.trainable_modules, never=ENCODER_MODULES + POSITION_TABLES,
                            frozen_mode="eval")


MODES: dict[str, ModeSpec] = {spec.name: spec for spec in (
    ModeSpec("train_CFM_mean", ("cfm",), "cfm", "mean", "cfm"),
    ModeSpec("train_CFM_fusion", ("cfm",), "cfm_image", "fusion", "cfm"),
    ModeSpec("train_MFM_mean_CFM_lock", ("mfm",), "fused", "mean", "full"),
    ModeSpec("train_MFM_fusion_CFM_lock", ("mfm",), "fused_image", "fusion", "full"),
    ModeSpec("train_MFM_mean_CFM_open", ("cfm", "mfm"), "fused", "mean", "full"),
    ModeSpec("train_MFM_fusion_CFM_open", ("cfm", "mfm"), "fused_image", "fusion", "full"),
    ModeSpec("train_decoder_only", ("decoder",), "reconstruct", "reconstruction", "mean"),
    ModeSpec("train_decoder_MFM", ("decoder", "mfm"), "fused_image", "fusion", "full"),
    ModeSpec("train_decoder_CFM_MFM", ("decoder", "cfm", "mfm"), "fused_image", "fusion", "full"),
)}
assert tuple(MODES) == get_args(TrainingMode)


def get_mode(name: str) -> ModeSpec:
    """The `ModeSpec` of a mode name.

    Raises:
        ConfigError: an unknown name (the message lists the nine modes).
    """
    if name not in MODES:
        raise ConfigError(f"unknown training mode '{name}'; choose from {', '.join(MODES)}")
    return MODES[name]


def mode_loss(model: nn.Module, spec: ModeSpec, x_vi: torch.Tensor, x_ir: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward `model` (a `MaeFuse`, possibly wrapped for data parallelism) on the mode's route and return its loss
    terms as scalar tensors keyed by `spec.loss_names` (`loss` is the one to back-propagate). No host sync."""
    output = model(x_vi, x_ir, route=spec.route)
    if spec.loss == "reconstruction":
        loss = reconstruction_loss(output.image, x_vi, x_ir)
        return {"loss": loss, "loss_rec": loss.detach()}
    if spec.loss == "mean":
        loss = mean_loss(output.tokens, output.z_vi, output.z_ir)
        return {"loss": loss, "loss_mean": loss.detach()}
    terms = fusion_loss(output.image, x_vi, x_ir)
    return {"loss": terms.total, "loss_grad": terms.grad.detach(), "loss_lap": terms.lap.detach()}


def no_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    """Whether a parameter is exempt from weight decay: every 1-D tensor (biases incl. `in_proj_bias`, LayerNorm)
    and every name ending in `.bias` (spec §4.2)."""
    return parameter.ndim < 2 or name.endswith(".bias")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters of the unwrapped `model`: `decay` (ndim >= 2, not `.bias`) with
    `weight_decay`, and `no_decay` with 0. Each group also carries its parameter `names`."""
    decay, exempt = ([], []), ([], [])
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        names, params = exempt if no_weight_decay(name, parameter) else decay
        names.append(name)
        params.append(parameter)
    groups = [{"params": decay[1], "names": decay[0], "weight_decay": weight_decay, "group": "decay"},
              {"params": exempt[1], "names": exempt[0], "weight_decay": 0.0, "group": "no_decay"}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over exactly the trainable parameters, with the §4.2 decay rule (`fused` is passed to AdamW)."""
    groups = parameter_groups(model, weight_decay)
    if not groups:
        raise ConfigError("no trainable parameter: apply the mode's freeze policy before building the optimizer")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def check_initial_weights(spec: ModeSpec, *, encoder_loaded: bool, decoder_loaded: bool,
                          allow_random_decoder: bool = False) -> None:
    """The mode guards (spec §4.1): a mode that trains through the decoder needs a loaded one.

    Warns about a random encoder; warns in `*_mean` modes without a decoder (later stages need one).

    Raises:
        ConfigError: a decoder-path mode other than `train_decoder_only` without a loaded decoder, unless
            `allow_random_decoder`.
    """
    if not encoder_loaded:
        warnings.warn("the MAE encoder is randomly initialised (no --resume/--all_weight file): fused images will "
                      "not mean much; pass the official MAE encoder or a pretrained file", stacklevel=2)
    if decoder_loaded or spec.name == "train_decoder_only":
        return
    if spec.runs_decoder:
        if not allow_random_decoder:
            raise ConfigError(f"{spec.name} trains through the decoder, but no decoder was loaded (--resume or "
                              "--all_weight); the fusion loss cannot teach reconstruction (public issue #12). "
                              "Pretrain one with train_decoder_only first, or pass --allow_random_decoder")
        warnings.warn(f"{spec.name} runs with a random decoder (--allow_random_decoder)", stacklevel=2)
    else:
        warnings.warn(f"{spec.name} trains without a loaded decoder; the fusion stages after it need one "
                      "(train_decoder_only, or --resume)", stacklevel=2)


def single_image_groups(batch_sizes: Iterable[int], group_size: int) -> bool:
    """Whether `official` attention would form a group of one image for any of these per-device batch sizes."""
    for batch in batch_sizes:
        group = batch if group_size == 0 else min(group_size, batch)
        if group == 1 or batch % group == 1:
            return True
    return False


def check_official_groups(model: MaeFuse, batch_sizes: Iterable[int]) -> None:
    """Warn when training with `official` attention would form groups of one image (spec §2.6)."""
    if model.fusion_attention == "official" and single_image_groups(batch_sizes, model.official_group_size):
        warnings.warn("official fusion attention with groups of one image: there Q and K get no gradient, and in "
                      "the full path neither does CFM; use a per-device batch and official_group_size that leave "
                      "groups of at least 2", stacklevel=2)


def reconstruction_mse(model: MaeFuse, batches: Iterable[dict], device: torch.device | str) -> float:
    """Mean reconstruction MSE (normalised pixels) of `train_decoder_only` over `batches` of {'vi', 'ir'}, in eval
    mode (restored afterwards); the demo's before/after measure."""
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    with evaluation(model):
        for batch in batches:
            x_vi, x_ir = batch["vi"].to(device), batch["ir"].to(device)
            output = model(x_vi, x_ir, route="reconstruct")
            total += reconstruction_loss(output.image, x_vi, x_ir).double() * (2 * x_vi.shape[0])
            count += 2 * x_vi.shape[0]
    return float(total) / max(count, 1)
