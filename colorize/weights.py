"""Weight files of the colorization system (spec/colorize.md §2.3, §4, §6).

- Reading: every file is read with ``torch.load(weights_only=True)`` and loaded strictly; a missing file, foreign
  keys or mismatched shapes stop with one :class:`WeightFileError` naming the file.
- Sources: :class:`WeightSource` records where each module's weights came from, with the file's SHA-256 (or
  "RANDOM INIT"), for the start-up panel and ``config.json``.
- The exemplar branch: :func:`build_exemplar_branch` applies Strategy 1 (a SwinTExCo checkpoint folder) or
  Strategy 2 (backbone from a local timm file, the hub only when allowed, else random init).
- FlowChroma files: :func:`save_fusion_checkpoint` writes ``fusion_epoch_N.pth`` / ``fusion_best.pth`` with
  FlowChroma's keys plus ``config`` (JSON string) and ``format``; :func:`export_swintexco` writes a Strategy-1
  folder; :func:`load_fusion_init` reads a FlowChroma checkpoint for ``--fusion.init-from``.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from colorize.config import ExemplarConfig
from colorize.swintexco import ColorVidNet, SwinEmbed, WarpNet
from common.checkpoint import CheckpointError, file_sha256, load_checkpoint, save_checkpoint
from common.errors import ConfigError

FUSION_FORMAT = "flowchroma-fusion-v1"
SWINTEXCO_FILES = ("embed_net", "nonlocal_net", "colornet")
HUB_BACKBONES = {"swinv2_cr_tiny_ns_224": "swinv2_cr_tiny_ns_224.sw_in1k"}
COLORNET_INPUT_KEY = "conv1_1.0.weight"


class WeightFileError(CheckpointError):
    """A weight file is missing, unreadable, or does not match the module it is loaded into."""


@dataclass(frozen=True)
class WeightSource:
    """Where one module's weights came from: a file with its SHA-256, the hub, or random initialisation."""

    role: str
    """Module: embed_net, nonlocal_net, colornet, fusion_net or flow."""
    path: str | None
    """Local file, hub id, or None for random initialisation."""
    sha256: str | None
    """SHA-256 of the file (None for the hub and random initialisation)."""
    note: str = ""
    """Human-readable origin ("SwinTExCo folder", "RANDOM INIT", ...)."""

    @property
    def random_init(self) -> bool:
        """True when the module starts from random weights."""
        return self.path is None

    def as_dict(self) -> dict[str, Any]:
        """Plain form for ``config.json``."""
        return asdict(self)

    def describe(self) -> str:
        """Where the weights came from, in one line (start-up panel)."""
        note = f" ({self.note})" if self.note else ""
        if self.path is None:
            return f"RANDOM INIT{note}"
        return f"{self.path}{' sha256 ' + self.sha256 if self.sha256 else ''}{note}"


def file_source(role: str, path: str | Path, note: str = "") -> WeightSource:
    """A :class:`WeightSource` for a local file, hashed."""
    return WeightSource(role, str(path), file_sha256(path), note)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove a leading ``prefix`` (e.g. ``module.``) from every key that has it."""
    return {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state.items()}


def read_state_dict(path: str | Path, container_key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a plain state dict from ``path`` (``weights_only=True``; ``state[container_key]`` when present)."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"weight file {path} does not exist; check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, EOFError, RuntimeError, OSError) as error:
        raise WeightFileError(f"weight file {path} is truncated or corrupt ({type(error).__name__}); "
                              "replace it") from error
    except Exception as error:  # the weights_only unpickler refuses pickled objects with several error types
        raise WeightFileError(f"weight file {path} cannot be read safely ({type(error).__name__}: {error}); "
                              "it must hold a plain state dict of tensors") from error
    if container_key is not None and isinstance(state, dict) and isinstance(state.get(container_key), dict):
        state = state[container_key]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise WeightFileError(f"weight file {path} does not hold a plain state dict of tensors")
    return state


def _first(keys: list[str], count: int = 3) -> str:
    if not keys:
        return "none"
    return f"{len(keys)}: " + ", ".join(keys[:count]) + (", ..." if len(keys) > count else "")


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, what: str) -> None:
    """Load ``state`` into ``module`` strictly; on any key or shape mismatch raise one error naming ``path``."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mis_shaped = [f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
                  for key in expected if key in state and state[key].shape != expected[key].shape]
    if missing or unexpected or mis_shaped:
        raise WeightFileError(f"{path} does not match {what} (missing {_first(missing)}; unexpected "
                              f"{_first(unexpected)}; wrong shape {_first(mis_shaped)}); pass the file written "
                              "for this module and configuration")
    module.load_state_dict(dict(state), strict=True)


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of ``module``'s state dict (what exported files hold)."""
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in module.state_dict().items()}


@dataclass
class ExemplarBranch:
    """The three SwinTExCo modules with their weight sources and the strategy they imply."""

    embed_net: SwinEmbed
    nonlocal_net: WarpNet
    colornet: ColorVidNet
    sources: list[WeightSource]
    strategy: int
    """1 = SwinTExCo checkpoint folder, 2 = backbone only."""
    warnings: list[str]

    @property
    def embed_random_init(self) -> bool:
        """True when embed_net has random weights (recorded as ``embed_random_init`` in config.json)."""
        return self.sources[0].random_init

    @property
    def colornet_pretrained(self) -> bool:
        """True when colornet's weights come from a file."""
        return not self.sources[2].random_init


def backbone_kwargs(cfg: ExemplarConfig) -> dict[str, Any]:
    """timm architecture overrides of ``--exemplar.backbone-*`` (only the fields that are set)."""
    overrides = {"embed_dim": cfg.backbone_embed_dim, "depths": cfg.backbone_depths, "num_heads": cfg.backbone_heads}
    return {key: value for key, value in overrides.items() if value is not None}


def _build_embed_net(cfg: ExemplarConfig, image_size: int, notes: list[str]) -> tuple[SwinEmbed, WeightSource]:
    """embed_net from Strategy-2 sources 2-4 (a local timm file, the hub when allowed, random init)."""
    common = dict(backbone=cfg.backbone, image_size=image_size, backbone_kwargs=backbone_kwargs(cfg),
                  imagenet_normalize=cfg.imagenet_normalize)
    if cfg.backbone_weights is not None:
        path = Path(cfg.backbone_weights)
        if not path.is_file():
            raise WeightFileError(f"--exemplar.backbone-weights {path} does not exist")
        try:
            embed = SwinEmbed(**common, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        except (RuntimeError, ValueError, KeyError, OSError) as error:
            raise WeightFileError(f"--exemplar.backbone-weights {path} does not fit {cfg.backbone} "
                                  f"({type(error).__name__}: {str(error).splitlines()[0]})") from error
        return embed, file_source("embed_net", path, "timm backbone file")
    if cfg.allow_download:
        hub_id = HUB_BACKBONES.get(cfg.backbone, cfg.backbone)
        embed = SwinEmbed(**{**common, "backbone": hub_id}, pretrained=True)
        return embed, WeightSource("embed_net", f"hf-hub:{hub_id}", None, "downloaded (--exemplar.allow-download)")
    message = (f"embed_net ({cfg.backbone}) starts from RANDOM INIT: no --exemplar.swintexco-ckpt, "
               "--exemplar.backbone-weights or --exemplar.allow-download; colour matching has to be learned "
               "from scratch")
    warnings.warn(message, stacklevel=3)
    notes.append(message)
    return SwinEmbed(**common), WeightSource("embed_net", None, None, "no weight source given")


def build_exemplar_branch(cfg: ExemplarConfig, image_size: int) -> ExemplarBranch:
    """Build embed_net, nonlocal_net and colornet with their weights (Strategy 1 or 2, spec §2.3, §4)."""
    notes: list[str] = []
    if cfg.swintexco_ckpt is None:
        embed, embed_source = _build_embed_net(cfg, image_size, notes)
        nonlocal_net = WarpNet(cfg.warpnet_width, embed.channels)
        colornet = ColorVidNet(7)
        sources = [embed_source, WeightSource("nonlocal_net", None, None, "Strategy 2: trained from scratch"),
                   WeightSource("colornet", None, None, "Strategy 2: not used")]
        return ExemplarBranch(embed, nonlocal_net, colornet, sources, 2, notes)
    folder = Path(cfg.swintexco_ckpt)
    paths = {name: folder / f"{name}.pth" for name in SWINTEXCO_FILES}
    for name, path in paths.items():
        if not path.is_file():
            raise WeightFileError(f"SwinTExCo checkpoint folder {folder} lacks {path.name} ({path}); a Strategy-1 "
                                  f"folder holds {', '.join(f + '.pth' for f in SWINTEXCO_FILES)}")
    states = {name: read_state_dict(path) for name, path in paths.items()}
    embed = SwinEmbed(cfg.backbone, image_size, backbone_kwargs(cfg), cfg.imagenet_normalize)
    load_strict(embed, states["embed_net"], paths["embed_net"], f"embed_net ({cfg.backbone})")
    nonlocal_net = WarpNet(cfg.warpnet_width, embed.channels)
    load_strict(nonlocal_net, states["nonlocal_net"], paths["nonlocal_net"],
                f"nonlocal_net (WarpNet width {cfg.warpnet_width})")
    colornet = _colornet_for(states["colornet"], paths["colornet"])
    sources = [file_source(name, paths[name], "SwinTExCo folder") for name in SWINTEXCO_FILES]
    return ExemplarBranch(embed, nonlocal_net, colornet, sources, 1, notes)


def _colornet_for(state: Mapping[str, torch.Tensor], path: Path) -> ColorVidNet:
    """A ColorVidNet whose input width is read from ``conv1_1.0.weight``, with ``state`` loaded strictly."""
    if COLORNET_INPUT_KEY not in state:
        raise WeightFileError(f"{path} is not a ColorVidNet state dict (no {COLORNET_INPUT_KEY})")
    colornet = ColorVidNet(int(state[COLORNET_INPUT_KEY].shape[1]))
    load_strict(colornet, state, path, f"colornet (ColorVidNet ic={colornet.in_channels})")
    return colornet


def export_swintexco(directory: str | Path, system: nn.Module) -> Path:
    """Write ``embed_net.pth``, ``nonlocal_net.pth``, ``colornet.pth`` (plain state dicts, atomic) into
    ``directory``: a Strategy-1 folder, strict-loadable by SwinTExCo's modules."""
    directory = Path(directory)
    for name in SWINTEXCO_FILES:
        save_checkpoint(directory / f"{name}.pth", cpu_state_dict(getattr(system, name)))
    return directory


def save_fusion_checkpoint(path: str | Path, system: nn.Module, *, epoch: int, optimizer: dict, scheduler: dict,
                           best_loss: float, train_losses: list[float], config: Mapping[str, Any],
                           discriminator: nn.Module | None = None, optimizer_d: dict | None = None) -> Path:
    """Write a FlowChroma-style ``fusion_epoch_N.pth`` / ``fusion_best.pth`` atomically.

    Keys: ``epoch``, ``fusion_unet``, ``swintexco_embed`` (``pretrained.*``), ``swintexco_nonlocal``,
    ``swintexco_colornet``, ``optimizer``, ``scheduler``, ``best_loss``, ``train_losses`` (+ ``discriminator``,
    ``optimizer_d``), ``config`` (a JSON string) and ``format``. ``optimizer``/``scheduler`` are state dicts.
    """
    state = {
        "epoch": int(epoch),
        "fusion_unet": cpu_state_dict(system.fusion_net),
        "swintexco_embed": cpu_state_dict(system.embed_net),
        "swintexco_nonlocal": cpu_state_dict(system.nonlocal_net),
        "swintexco_colornet": cpu_state_dict(system.colornet),
        "optimizer": optimizer,
        "scheduler": scheduler,
        "best_loss": float(best_loss),
        "train_losses": [float(value) for value in train_losses],
        "config": json.dumps(config, sort_keys=True, default=str),
        "format": FUSION_FORMAT,
    }
    if discriminator is not None:
        state["discriminator"] = cpu_state_dict(discriminator)
        state["optimizer_d"] = optimizer_d if optimizer_d is not None else {}
    return save_checkpoint(path, state)


def _is_flowchroma_batchnorm_fusion(state: Mapping[str, torch.Tensor]) -> bool:
    first = state.get("net.0.weight")
    return first is not None and first.dim() == 4 and first.shape[1] == 7


def load_fusion_init(path: str | Path, system: nn.Module) -> list[WeightSource]:
    """Load a FlowChroma checkpoint for ``--fusion.init-from``: ``fusion_unet`` strictly into the system's fusion
    net, the SwinTExCo keys strictly into embed_net, nonlocal_net and colornet (colornet rebuilt, frozen, for the
    file's input width). Call before building the optimizer. Returns the new weight sources."""
    path = Path(path)
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as error:
        raise WeightFileError(str(error)) from error
    if "fusion_unet" not in checkpoint:
        raise WeightFileError(f"{path} is not a FlowChroma fusion checkpoint (no 'fusion_unet' key; keys "
                              f"{_first(sorted(checkpoint))})")
    fusion_state = strip_prefix(checkpoint["fusion_unet"], "module.")
    if _is_flowchroma_batchnorm_fusion(fusion_state):
        raise WeightFileError(f"{path} holds FlowChroma's 7-input BatchNorm SimpleFusionNet, whose interface differs "
                              "from this project's 8-input fusion nets; train the fusion net from scratch or use "
                              "a FusionNetV1 checkpoint with --fusion.arch colorvid")
    load_strict(system.fusion_net, fusion_state, path, f"the fusion net ({type(system.fusion_net).__name__})")
    digest = file_sha256(path)
    sources = [WeightSource("fusion_net", str(path), digest, "--fusion.init-from")]
    if "swintexco_embed" in checkpoint:
        load_strict(system.embed_net, checkpoint["swintexco_embed"], path, "embed_net (swintexco_embed)")
        sources.append(WeightSource("embed_net", str(path), digest, "--fusion.init-from"))
    if "swintexco_nonlocal" in checkpoint:
        load_strict(system.nonlocal_net, checkpoint["swintexco_nonlocal"], path, "nonlocal_net (swintexco_nonlocal)")
        sources.append(WeightSource("nonlocal_net", str(path), digest, "--fusion.init-from"))
    if "swintexco_colornet" in checkpoint:
        colornet = _colornet_for(checkpoint["swintexco_colornet"], path).requires_grad_(False).eval()
        system.colornet = colornet.to(next(system.nonlocal_net.parameters()).device)
        sources.append(WeightSource("colornet", str(path), digest, "--fusion.init-from"))
    return sources


def check_exemplar_output(output: str, colornet_pretrained: bool) -> None:
    """``--exemplar.output colornet`` needs pretrained colornet weights."""
    if output == "colornet" and not colornet_pretrained:
        raise ConfigError("--exemplar.output colornet needs pretrained colornet weights (--exemplar.swintexco-ckpt "
                          "or --fusion.init-from); with a random colornet use --exemplar.output warp")
