"""MaeFuse weight files (spec §6): the strict loaders of `--resume`, `--fusion_weight`, `--all_weight`, and the
writers of `checkpoint{e}.pth`, `fusion{e}.pth` and `checkpoint-{e}.pth`.

Kinds (keys as the released code; `large` counts):

- `resume`: `model1` = MAE encoder + 4-block decoder (348 keys);
- `fusion_weight`: `model2` = the fusion layer (15 keys);
- `all_weight`: `model1.*` + `model2.*` (363 keys; the released `final_new_60.pth`);
- `mae_official`: the official MAE encoder file (`cls_token`, a (1,1+N',D) `pos_embed`, `patch_embed`, `blocks`,
  `norm`); accepted by `--resume` with `cls_token`, `pos_embed`, `mask_token` and any `decoder_*` keys dropped.

Loader rules: `torch.load(weights_only=True)` with `argparse.Namespace` allowed (MAE files carry `args`), or an
explicit unsafe load; `.safetensors` through safetensors; `model`/`state_dict` unwrapped; any number of leading
`module.`/`_orig_mod.` prefixes stripped; the kind detected and checked against the flag; then every missing,
unexpected and mis-shaped key collected into one `CheckpointMismatchError`.
"""

from __future__ import annotations

import argparse
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn as nn

from common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, strip_wrapper_prefixes
from maefuse.model import MaeFuse

WeightKind = Literal["resume", "fusion_weight", "all_weight", "mae_official", "unknown"]
WeightFlag = Literal["resume", "fusion_weight", "all_weight"]
LISTED_KEYS = 20
FULL_PREFIXES = {"resume": "model1.", "fusion_weight": "model2."}
OFFICIAL_DROPPED = ("cls_token", "pos_embed", "mask_token")
FFN_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "ln.weight", "ln.bias")
ACCEPTED_KINDS: dict[str, tuple[str, ...]] = {"resume": ("resume", "mae_official", "all_weight"),
                                              "fusion_weight": ("fusion_weight", "all_weight"),
                                              "all_weight": ("all_weight",)}
FILE_NAMES = {"all_weight": "checkpoint{epoch}.pth", "fusion_weight": "fusion{epoch}.pth",
              "resume": "checkpoint-{epoch}.pth"}
"""Exported file names by kind (spec §6)."""


class WeightsFileError(CheckpointError):
    """A weight file cannot be used: missing, unreadable, pickled objects without `--unsafe_load`, or another kind
    than the flag accepts. One `error:` line and exit code 2 in the trainer."""


class CheckpointMismatchError(WeightsFileError):
    """A weight file's keys or shapes do not match the network: all missing, unexpected and mis-shaped keys (up to
    20 of each are named), with hints."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple, tuple]]):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


@dataclass
class LoadReport:
    """What one load did.

    Attributes:
        path: the file; kind: the detected kind; flag: the option it was given to.
        tensors: tensors loaded; dropped: file keys deliberately not loaded (`cls_token`, `model2.* (15 keys)`, ...).
        encoder, decoder, fusion: which parts of the network were loaded.
        regenerated: fixed tables that differed from the sin-cos values and were regenerated.
        meta: the file's `meta` dict (empty for files not written by this project).
    """

    path: Path
    kind: WeightKind
    flag: WeightFlag
    tensors: int
    dropped: list[str]
    encoder: bool
    decoder: bool
    fusion: bool
    regenerated: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def describe(self) -> str:
        """The console line `loaded <kind> <file>: <n> tensors, missing 0, unexpected 0, dropped [...]`."""
        line = (f"loaded {self.kind} {self.path}: {self.tensors} tensors, missing 0, unexpected 0, "
                f"dropped [{', '.join(self.dropped)}]")
        if self.kind == "mae_official":
            line += "; decoder not loaded"
        if self.regenerated:
            line += f"; regenerated {', '.join(self.regenerated)}"
        return line


@dataclass
class InitialWeights:
    """The loads of `--resume`, `--fusion_weight` and `--all_weight`, in that order."""

    reports: list[LoadReport] = field(default_factory=list)

    @property
    def encoder_loaded(self) -> bool:
        """Whether any file set the encoder."""
        return any(report.encoder for report in self.reports)

    @property
    def decoder_loaded(self) -> bool:
        """Whether any file set the decoder (the guard of decoder-path modes)."""
        return any(report.decoder for report in self.reports)

    @property
    def fusion_loaded(self) -> bool:
        """Whether any file set the fusion layer."""
        return any(report.fusion for report in self.reports)


def _torch_load(path: Path, unsafe_load: bool) -> object:
    if unsafe_load:
        warnings.warn(f"{path}: loaded with pickle (--unsafe_load); this runs code from the file, so use it only "
                      "for files you trust", stacklevel=3)
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return load_checkpoint(path, safe_globals=[argparse.Namespace], what="weight file")
    except CheckpointError as error:
        # The kit's loader refuses pickled objects for every trainer; MaeFuse also offers the explicit opt-in.
        hint = "; if you trust the file, pass --unsafe_load" if "pickled" in str(error) else ""
        raise WeightsFileError(f"{error}{hint}") from None


def read_weights(path: str | Path, unsafe_load: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a weight file (rules 1-3): the state dict with wrapper prefixes stripped, and the file's `meta` ({}).

    Raises:
        WeightsFileError: missing, unreadable, pickled without `unsafe_load`, or holding no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"weight file not found: {path}; check the path")
    if path.suffix == ".safetensors":
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError as error:
            raise WeightsFileError(f"{path}: reading .safetensors needs the safetensors package "
                                   "(pip install safetensors)") from error
        try:
            return strip_wrapper_prefixes(load_file(str(path), device="cpu")), {}
        except (SafetensorError, OSError) as error:
            raise WeightsFileError(f"{path}: not a readable safetensors file ({error})") from error
    content = _torch_load(path, unsafe_load)
    if not isinstance(content, dict):
        raise WeightsFileError(f"{path}: holds a {type(content).__name__}, not a state dict")
    meta = content.get("meta") if isinstance(content.get("meta"), dict) else {}
    for wrapper in ("model", "state_dict"):
        if isinstance(content.get(wrapper), dict):
            content = content[wrapper]
            break
    state = {key: value for key, value in content.items() if isinstance(value, torch.Tensor)}
    if not state:
        raise WeightsFileError(f"{path}: holds no tensors (keys: {', '.join(map(str, list(content)[:10]))})")
    return strip_wrapper_prefixes(state), meta


def detect_kind(state: dict[str, torch.Tensor]) -> WeightKind:
    """The kind of an unwrapped state dict, from its keys."""
    keys = list(state)
    if any(key.startswith(("model1.", "model2.")) for key in keys):
        return "all_weight"
    if any(key.startswith(("cross_model.", "merge_model.")) for key in keys):
        return "fusion_weight"
    if "cls_token" in state or "mask_token" in state:
        return "mae_official"
    if any(key.startswith(("patch_embed.", "blocks.", "decoder_")) for key in keys):
        return "resume"
    return "unknown"


def _mismatch_hints(kind: str, missing: list[str], unexpected: list[str],
                    mismatched: list[tuple[str, tuple, tuple]]) -> list[str]:
    hints = []
    if kind == "fusion_weight" and any(key in missing for key in FFN_KEYS):
        hints.append("pre-Feb-2025 fusion layer without FFN/LN (fc1, fc2, ln): unsupported; use a file of the "
                     "current layout (e.g. the released final_new_60.pth)")
    if mismatched:
        if all(key.endswith("pos_embed") for key, _, _ in mismatched):
            hints.append("only the fixed position tables differ in shape: the file was made for another image or "
                         "patch size; set --model_size (or img_size/patch_size) to match the file")
        else:
            hints.append("tensor shapes differ: the file was made for another model size; pass the matching "
                         "--model_size")
    if missing and all(key.startswith("decoder_") for key in missing) and not unexpected:
        hints.append("the file has no decoder: pretrain one with train_decoder_only")
    if unexpected and any(re.match(r"(model1\.)?decoder_blocks\.\d+\.", key) for key in unexpected):
        hints.append("the file has more decoder blocks than this model (the official MAE decoder has 8; MaeFuse "
                     "uses 4): load only its encoder with --resume on the official MAE file")
    return hints


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:LISTED_KEYS])
    return shown + (f", ... ({len(keys) - LISTED_KEYS} more)" if len(keys) > LISTED_KEYS else "")


def check_keys(path: Path, kind: str, target: nn.Module, state: dict[str, torch.Tensor],
               expected_keys: list[str] | None = None) -> None:
    """Rule 5: raise one `CheckpointMismatchError` listing every missing, unexpected and mis-shaped key.

    `expected_keys` restricts the target's keys (the encoder part, for the official MAE file).
    """
    model_state = target.state_dict()
    expected = list(model_state) if expected_keys is None else expected_keys
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in set(expected)]
    mismatched = [(key, tuple(state[key].shape), tuple(model_state[key].shape)) for key in expected
                  if key in state and state[key].shape != model_state[key].shape]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{path}: {kind} weights do not match the network: missing {len(missing)}, unexpected "
             f"{len(unexpected)}, wrong shape {len(mismatched)}"]
    if missing:
        lines.append(f"  missing: {_listed(missing)}")
    if unexpected:
        lines.append(f"  unexpected: {_listed(unexpected)}")
    if mismatched:
        shapes = [f"{key} file {list(theirs)} vs model {list(ours)}" for key, theirs, ours in mismatched]
        lines.append(f"  wrong shape: {_listed(shapes)}")
    lines.extend(f"  hint: {hint}" for hint in _mismatch_hints(kind, missing, unexpected, mismatched))
    raise CheckpointMismatchError("\n".join(lines), missing, unexpected, mismatched)


def load_weights(model: MaeFuse, path: str | Path, flag: WeightFlag, unsafe_load: bool = False) -> LoadReport:
    """Load one file given to `--resume`, `--fusion_weight` or `--all_weight` into the unwrapped `model`, strictly
    (rules 1-5), then check the fixed tables (regenerated with a warning if off by more than 1e-4).

    Raises:
        WeightsFileError: unreadable, or a kind the flag does not accept (the message names the detected kind).
        CheckpointMismatchError: keys or shapes that do not match.
    """
    state, meta = read_weights(path, unsafe_load)
    return apply_weights(model, state, meta, Path(path), flag)


def apply_weights(model: MaeFuse, state: dict[str, torch.Tensor], meta: dict, path: str | Path,
                  flag: WeightFlag) -> LoadReport:
    """`load_weights` for a state dict already read by `read_weights` (`path` names it in messages)."""
    path = Path(path)
    kind = detect_kind(state)
    if kind not in ACCEPTED_KINDS[flag]:
        accepted = " or ".join(ACCEPTED_KINDS[flag])
        raise WeightsFileError(f"{path}: --{flag} needs {accepted} weights, but the file holds {kind} weights "
                               f"(keys such as {', '.join(list(state)[:3])}); pass it to the matching flag")
    dropped: list[str] = []
    if kind == "all_weight" and flag != "all_weight":
        prefix = FULL_PREFIXES[flag]
        others = [key for key in state if not key.startswith(prefix)]
        if others:
            dropped.append(f"{others[0].split('.', 1)[0]}.* ({len(others)} keys)")
        state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        kind = detect_kind(state) if state else "unknown"
        if kind != flag:
            raise WeightsFileError(f"{path}: the full file has no {prefix}* weights for --{flag}")
    if kind == "mae_official":
        decoder_keys = [key for key in state if key.startswith("decoder_")]
        dropped += [key for key in OFFICIAL_DROPPED if key in state]
        if decoder_keys:
            dropped.append(f"decoder_* ({len(decoder_keys)} keys)")
        state = {key: value for key, value in state.items()
                 if key not in OFFICIAL_DROPPED and not key.startswith("decoder_")}
        encoder_keys = [key for key in model.model1.state_dict()
                        if key != "pos_embed" and not key.startswith("decoder_")]
        check_keys(path, kind, model.model1, state, encoder_keys)
        model.model1.load_state_dict(state, strict=False)
        parts = (True, False, False)
    else:
        target = {"resume": model.model1, "fusion_weight": model.model2, "all_weight": model}[kind]
        check_keys(path, kind, target, state)
        target.load_state_dict(state, strict=True)
        parts = (kind != "fusion_weight", kind != "fusion_weight", kind != "resume")
    regenerated = model.check_position_tables()
    return LoadReport(path, kind, flag, len(state), dropped, *parts, regenerated=regenerated, meta=meta)


def load_initial_weights(model: MaeFuse, resume: str | Path | None = None, fusion_weight: str | Path | None = None,
                         all_weight: str | Path | None = None, unsafe_load: bool = False,
                         log: Callable[[str], None] | None = None) -> InitialWeights:
    """Rule 6: load `resume`, then `fusion_weight`, then `all_weight` (each optional), logging each report line."""
    loaded = InitialWeights()
    for flag, path in (("resume", resume), ("fusion_weight", fusion_weight), ("all_weight", all_weight)):
        if path is None:
            continue
        report = load_weights(model, path, flag, unsafe_load)
        loaded.reports.append(report)
        if log is not None:
            log(report.describe())
    return loaded


def export_state_dict(model: MaeFuse, kind: Literal["resume", "fusion_weight", "all_weight"]) -> dict[str, torch.Tensor]:
    """The unwrapped float32 CPU state dict of one kind (`resume` = `model1`, `fusion_weight` = `model2`,
    `all_weight` = the whole network), without wrapper prefixes."""
    module = {"resume": model.model1, "fusion_weight": model.model2, "all_weight": model}[kind]
    return {key: value.detach().to("cpu", torch.float32).contiguous()
            for key, value in strip_wrapper_prefixes(module.state_dict()).items()}


def weights_meta(model: MaeFuse, *, training_mode: str, epoch: int, kind: str, preset: str) -> dict:
    """The plain-typed `meta` of an exported file (spec §6)."""
    size = model.size
    return {"preset": preset, "model_size": size.name, "img_size": size.img_size, "patch_size": size.patch_size,
            "fusion_attention": model.fusion_attention, "official_group_size": model.official_group_size,
            "training_mode": training_mode, "epoch": epoch, "kind": kind, "size": size.as_meta()}


def epoch_files(training_mode: str, epoch: int) -> list[tuple[str, str]]:
    """(file name, kind) written at an epoch: `checkpoint-{e}.pth` (resume) after `train_decoder_only`, else
    `checkpoint{e}.pth` (all_weight) and `fusion{e}.pth` (fusion_weight)."""
    kinds = ("resume",) if training_mode == "train_decoder_only" else ("all_weight", "fusion_weight")
    return [(FILE_NAMES[kind].format(epoch=epoch), kind) for kind in kinds]


def is_save_epoch(epoch: int, epochs: int, save_every: int) -> bool:
    """Whether weights are exported after 0-based `epoch`: e % save_every == 0, and the last epoch."""
    return epoch == epochs - 1 or (save_every > 0 and epoch % save_every == 0)


def save_epoch_weights(directory: str | Path, model: MaeFuse, *, training_mode: str, epoch: int,
                       preset: str) -> list[Path]:
    """Write the epoch's files (`{'model': state dict, 'meta': {...}}`, float32, atomic) into `directory`; call on
    the main process with the unwrapped model."""
    directory = Path(directory)
    written = []
    for name, kind in epoch_files(training_mode, epoch):
        state = {"model": export_state_dict(model, kind),
                 "meta": weights_meta(model, training_mode=training_mode, epoch=epoch, kind=kind, preset=preset)}
        written.append(save_checkpoint(directory / name, state))
    return written


def exported_epochs(directory: str | Path, kind: str) -> list[int]:
    """Epochs of the exported files of one kind in `directory`, ascending (parsed from the names, never by time)."""
    pattern = re.compile("^" + re.escape(FILE_NAMES[kind]).replace(re.escape("{epoch}"), r"(\d+)") + "$")
    directory = Path(directory)
    if not directory.is_dir():
        return []
    matches = (pattern.match(path.name) for path in directory.iterdir())
    return sorted(int(match.group(1)) for match in matches if match)


def prune_exported(directory: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` epochs of each exported kind (0 keeps everything); returns the
    deleted files."""
    if keep_last <= 0:
        return []
    deleted = []
    for kind, name in FILE_NAMES.items():
        for epoch in exported_epochs(directory, kind)[:-keep_last]:
            path = Path(directory) / name.format(epoch=epoch)
            path.unlink()
            deleted.append(path)
    return deleted
