"""Reading and writing CrossFuse `.model` files (spec §6).

A `.model` file is a plain state_dict saved with `torch.save`: CPU tensors, exactly the official keys, no
`module.`/`_orig_mod.` prefix. Files are read with `weights_only=True`, prefixes stripped, and loaded with
`strict=True`. A fusion file without temperatures loads into a temperature model with tau = 1 (reported);
the other way round is an error, because training would silently drop a learned parameter.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, strip_wrapper_prefixes
from crossfuse.model import AutoEncoder, DeepWeightMode, FusionNet

logger = logging.getLogger(__name__)

NetworkKind = Literal["autoencoder", "fusion", "unknown"]
TEMPERATURE_SUFFIX = ".attn.temperature"


class ModelFileError(CheckpointError):
    """A `.model` file is missing, unreadable, or does not match the network it is loaded into.

    A `CheckpointError`, so `common.run.exit_on_user_error` turns it into one message and exit code 2.
    """


@dataclass(frozen=True)
class LoadReport:
    """What `load_model_file` did: the file, the detected network, and whether tau was set to 1 by default."""

    path: Path
    network: NetworkKind
    temperature_defaulted: bool

    def describe(self) -> str:
        """One human-readable line for the log."""
        line = f"loaded {self.network} weights from {self.path}"
        if self.temperature_defaulted:
            line += " (the file has no learnable temperature; tau = 1)"
        return line


def detect_network(state_dict: dict[str, torch.Tensor]) -> NetworkKind:
    """Tell an auto-encoder dict (`fea_encoder1.*`) from a fusion dict (`cross_atten_block.*`, `decoder_fusion.*`)."""
    keys = list(state_dict)
    if keys and all(k.startswith(("fea_encoder1.", "recon_decoder1.")) for k in keys):
        return "autoencoder"
    if keys and all(k.startswith(("cross_atten_block.", "decoder_fusion.", "conv_gra.")) for k in keys):
        return "fusion"
    return "unknown"


def network_kind(module: nn.Module) -> NetworkKind:
    """The kind of network a module is."""
    if isinstance(module, AutoEncoder):
        return "autoencoder"
    if isinstance(module, FusionNet):
        return "fusion"
    return "unknown"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a `.model` file on the CPU with `weights_only=True` and strip wrapper prefixes."""
    state = load_checkpoint(path, what="weight file")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{path}: does not hold a plain state_dict of tensors; save `model.state_dict()` instead")
    return strip_wrapper_prefixes(state)


def has_temperature(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a fusion state_dict carries learnable cross-attention temperatures."""
    return any(k.endswith(TEMPERATURE_SUFFIX) for k in state_dict)


def load_model_file(module: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load a `.model` file into `module` (an `AutoEncoder` or `FusionNet`, unwrapped) with strict key checking.

    Raises `ModelFileError` naming the file when it holds another network, has missing, unexpected or
    mis-shaped keys, or has temperatures that `module` lacks.
    """
    return load_state_dict_into(module, read_state_dict(path), Path(path))


def load_state_dict_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> LoadReport:
    """`load_model_file` for a state_dict already read from `path` (the path is only used in messages)."""
    expected_kind, found_kind = network_kind(module), detect_network(state)
    if found_kind != expected_kind:
        raise ModelFileError(
            f"{path}: holds {_article(found_kind)} network, but {_article(expected_kind)} network was expected; "
            "pass the right file (auto-encoder files are *_encoder_* / auto_encoder_*, "
            "fusion files *_fusion_* / fusetrans_*)"
        )
    model_keys = module.state_dict()
    temperature_defaulted = False
    if isinstance(module, FusionNet):
        if has_temperature(state) and not module.learnable_temperature:
            raise ModelFileError(
                f"{path}: has learnable temperatures but the model was built without them; "
                "enable the learnable temperature to load this file"
            )
        if module.learnable_temperature and not has_temperature(state):
            state = dict(state)
            for key in model_keys:
                if key.endswith(TEMPERATURE_SUFFIX):
                    state[key] = torch.ones_like(model_keys[key], device="cpu")
            temperature_defaulted = True
    missing = [k for k in model_keys if k not in state]
    unexpected = [k for k in state if k not in model_keys]
    mis_shaped = [k for k in model_keys if k in state and state[k].shape != model_keys[k].shape]
    if missing or unexpected or mis_shaped:
        raise ModelFileError(
            f"{path}: keys do not match the {expected_kind} network "
            f"(missing {_first(missing)}, unexpected {_first(unexpected)}, wrong shape {_first(mis_shaped)}); "
            "the file comes from another version or method"
        )
    module.load_state_dict(state, strict=True)
    report = LoadReport(path, found_kind, temperature_defaulted)
    logger.info(report.describe())
    return report


def autoencoder_from_file(path: str | os.PathLike) -> AutoEncoder:
    """Build an `AutoEncoder` and load `path` into it."""
    autoencoder = AutoEncoder()
    load_model_file(autoencoder, path)
    return autoencoder


def fusion_net_from_file(
    path: str | os.PathLike, shift: bool = False, deep_weight: DeepWeightMode = "signed", window_batch: int = 64
) -> FusionNet:
    """Build a `FusionNet` whose temperature option follows the file's keys (fuse/evaluate), then load it."""
    state = read_state_dict(path)
    fusion = FusionNet(
        learnable_temperature=has_temperature(state), shift=shift, deep_weight=deep_weight, window_batch=window_batch
    )
    load_state_dict_into(fusion, state, Path(path))
    return fusion


def save_model_file(module: nn.Module, path: str | os.PathLike) -> Path:
    """Write `module`'s state_dict as a `.model` file atomically (the kit's temporary file + os.replace).

    Tensors are saved as contiguous CPU copies under keys without wrapper prefixes; an interrupted write
    leaves any previous file intact and no partial file under the final name.
    """
    state = {
        k: v.detach().to("cpu", copy=True).contiguous() for k, v in strip_wrapper_prefixes(module.state_dict()).items()
    }
    return save_checkpoint(path, state)


def _article(kind: NetworkKind) -> str:
    return {"autoencoder": "an auto-encoder", "fusion": "a fusion", "unknown": "an unknown"}[kind]


def _first(keys: list[str], count: int = 3) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:count])
    return f"{len(keys)}: {shown}{', ...' if len(keys) > count else ''}"
