"""Loading weights into FRED models (spec/fred.md §2.4): pretrained by name where shapes match, or strictly.

Accepted files (always ``torch.load(..., weights_only=True)``):

- bubbliiiing ``yolov5_{phi}.pth`` (COCO, nc=80): ``backbone.*`` goes to ``backbone.*`` of a single-stream model,
  or to ``backbone_rgb.*`` and (unless ``event_backbone_init='random'``) ``backbone_event.*`` of a dual model;
  neck and heads by name (heads are shape-skipped when nc ≠ 80);
- ``cspdarknet_{phi}_backbone.pth``: unprefixed backbone keys (``stem.*``, ``dark2.*`` …), prefix added;
- this project's files: a flat state dict, ``{'state_dict': …}``, or a full training state (its ``ema``).
A leading ``module.`` is stripped from every key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from common.checkpoint import CheckpointError, load_checkpoint, strip_wrapper_prefixes

BACKBONE_BLOCKS = ("stem", "dark2", "dark3", "dark4", "dark5")
DISCRIMINATOR_PREFIX = "pair_disc."
EVENT_BACKBONE_INITS = ("copy", "random")


class WeightsError(CheckpointError):
    """A weights file cannot be used for this model (unreadable, wrong content or another architecture)."""


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file and return its model state dict (flat, ``state_dict``, or a full state's ``ema``)."""
    obj = load_checkpoint(path, what="weights file")
    if _is_tensor_dict(obj):
        state = obj
    elif isinstance(obj, Mapping) and _is_tensor_dict(obj.get("ema")):
        state = obj["ema"]
    elif isinstance(obj, Mapping) and _is_tensor_dict(obj.get("state_dict")):
        state = obj["state_dict"]
    else:
        found = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsError(f"{path}: not a state dict, {{'state_dict': ...}} or a full training state with 'ema' "
                           f"(found {found}); pass a model weights file")
    return strip_wrapper_prefixes(state)


def strip_discriminator(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without ``pair_disc.*`` (exported weights never contain the discriminator)."""
    return {k: v for k, v in state.items() if not k.startswith(DISCRIMINATOR_PREFIX)}


def _backbone_targets(model_keys: set[str], key: str, prefixes: list[str]) -> list[str]:
    """Model keys a file key maps to: itself, or a backbone key re-prefixed for each backbone."""
    if key in model_keys:
        return [key]
    if key.startswith("backbone."):
        rest = key[len("backbone."):]
    elif key.split(".", 1)[0] in BACKBONE_BLOCKS:
        rest = key
    else:
        return []
    return [f"{prefix}.{rest}" for prefix in prefixes if f"{prefix}.{rest}" in model_keys]


def load_pretrained(model: nn.Module, path: str | Path, event_backbone_init: str = "copy",
                    report_path: str | Path | None = None) -> dict:
    """Load every tensor of ``path`` whose (mapped) name exists in ``model`` with the same shape.

    Returns the report ``{'file', 'loaded': [model keys], 'shape_skipped': [{'key', 'file_key', 'file_shape',
    'model_shape'}], 'missing': [model keys left at their initialisation], 'unused': [file keys matching
    nothing]}`` and writes it as JSON to ``report_path`` when given. Raises :class:`WeightsError` when the file
    is empty or none of its parameters/statistics (``num_batches_tracked`` aside) loads.
    """
    if event_backbone_init not in EVENT_BACKBONE_INITS:
        raise ValueError(f"event_backbone_init must be one of {EVENT_BACKBONE_INITS}, got {event_backbone_init!r}")
    file_state = read_state_dict(path)
    if not file_state:
        raise WeightsError(f"{path}: the file holds no tensors; pass a weights file with model parameters")
    model_state = model.state_dict()
    model_keys = set(model_state)
    prefixes = [p for p in getattr(model, "backbone_prefixes", ("backbone",))
                if not (p == "backbone_event" and event_backbone_init == "random")]

    updates: dict[str, torch.Tensor] = {}
    shape_skipped, unused = [], []
    for file_key, tensor in file_state.items():
        targets = _backbone_targets(model_keys, file_key, prefixes)
        if not targets:
            unused.append(file_key)
        for key in targets:
            if tuple(tensor.shape) == tuple(model_state[key].shape):
                updates[key] = tensor
            else:
                shape_skipped.append({"key": key, "file_key": file_key, "file_shape": list(tensor.shape),
                                      "model_shape": list(model_state[key].shape)})
    if not any(not k.endswith("num_batches_tracked") for k in updates):
        raise WeightsError(f"{path}: none of its {len(file_state)} tensors matches this model by name and shape "
                           f"({len(shape_skipped)} names matched with other shapes); check --phi, the number of "
                           "classes and the modality, or pass a yolov5_{phi}.pth / cspdarknet_{phi}_backbone.pth file")
    model.load_state_dict({**model_state, **updates}, strict=True)
    skipped_keys = {item["key"] for item in shape_skipped}
    report = {
        "file": str(path),
        "event_backbone_init": event_backbone_init,
        "loaded": sorted(updates),
        "shape_skipped": shape_skipped,
        "missing": sorted(k for k in model_keys if k not in updates and k not in skipped_keys),
        "unused": sorted(unused),
    }
    if report_path is not None:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(json.dumps(report, indent=1))
    return report


def summarize_report(report: dict) -> str:
    """One line for the console: counts of loaded, shape-skipped, missing and unused keys."""
    return (f"{report['file']}: loaded {len(report['loaded'])}, shape-skipped {len(report['shape_skipped'])}, "
            f"missing {len(report['missing'])} (left at random init), unused {len(report['unused'])}")


def load_strict(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor], name: str | None = None) -> None:
    """Load a state dict (a file path or a mapping) that must match ``model`` exactly in keys and shapes.

    Used by evaluation, prediction and resume. ``pair_disc.*`` entries are ignored when the model has no
    discriminator (predicting with a model trained with one). Raises :class:`WeightsError` naming the file and
    the first differing keys when the architecture differs.
    """
    if isinstance(source, Mapping):
        label, state = name or "state dict", strip_wrapper_prefixes(source)
    else:
        label, state = name or str(source), read_state_dict(source)
    model_state = model.state_dict()
    if not any(k.startswith(DISCRIMINATOR_PREFIX) for k in model_state):
        state = strip_discriminator(state)
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    mismatched = sorted(k for k in set(state) & set(model_state)
                        if tuple(state[k].shape) != tuple(model_state[k].shape))
    if missing or unexpected or mismatched:
        details = "; ".join(f"{what} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                            for what, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("shape mismatch", mismatched)) if keys)
        raise WeightsError(f"{label}: weights are for another architecture ({details}); build the model with the "
                           "checkpoint's modality, phi, num_classes, fusion_mode and compression_ratio")
    model.load_state_dict(state, strict=True)
