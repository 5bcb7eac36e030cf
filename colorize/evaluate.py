"""Streaming evaluation of a colorization system and its baselines (spec/colorize.md §7).

Each sequence is read at S (centre crop, validation reference), colorized in one streamed pass, converted to RGB
as lab2rgb(L_gt, clamp(ab)) and quantised with the metrics module's ``quantize``. The same pass gives the two
baselines: ``gray`` (ab = 0) and ``exemplar`` (the per-frame exemplar ab: no propagation, no fusion). Every metric
comes from ``common.video_metrics`` (spec/metrics.md §6): one :class:`VideoEvaluator` per method, fed in memory
(:func:`score_video`), which also writes the CSV and JSON files; one sequence is held at a time.

Outputs under ``out_dir``: ``metrics_{fused,gray,exemplar}.csv`` (``video,n_frames,PSNR,SSIM,[LPIPS,]colorfulness,
CDC,warp_error``, then ``mean``) with their JSON sidecars, ``metrics.json`` (the means of the three methods),
``samples/<seq>.png`` (gray | exemplar | fused | ground truth for a few frames) and, with ``save_frames``,
``frames/<method>/<seq>/NNNNN.png``.

:func:`load_evaluation_system` rebuilds a trained system from a ``fusion_*.pth`` file alone (its recorded config
and weights) for ``train_colorize.py eval``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from colorize.config import ColorizeConfig, DataConfig, EvalConfig, config_from_dict
from colorize.data import ReferencePool, VideoSequence, ValidationSequence, load_validation_sequence
from colorize.lab import normalized_lab_to_rgb
from colorize.system import FusionSystem
from colorize.weights import FUSION_FORMAT
from common.checkpoint import CheckpointError, atomic_write_json, load_checkpoint
from common.plots import save_image_grid
from common.video_metrics import VideoEvaluator, VideoMetricConfig, quantize

METHODS = ("fused", "gray", "exemplar")
SAMPLE_COLUMNS = ("gray", "exemplar", "fused", "ground truth")
WARP_FLOW = "dis"
BASE_METRICS = ("psnr", "ssim", "colorfulness", "cdc", "warp")


def video_evaluators(eval_cfg: EvalConfig, device: torch.device | str = "cpu") -> dict[str, VideoEvaluator]:
    """One evaluator per method, sharing the LPIPS/FID networks (loaded once, only when their files are given;
    otherwise those columns are omitted with the reason)."""
    from common.perceptual import PerceptualModels

    config = VideoMetricConfig(flow=WARP_FLOW, lpips_backbone=eval_cfg.lpips_backbone,
                               lpips_heads=eval_cfg.lpips_heads, fid_weights=eval_cfg.fid_weights, device=str(device))
    given = metrics_with_files(eval_cfg)
    metrics = [*BASE_METRICS, *(["lpips"] if "LPIPS" in given else []), *(["fid"] if "FID" in given else [])]
    perceptual = PerceptualModels.load([m for m in metrics if m in ("lpips", "fid")], eval_cfg.lpips_backbone,
                                       eval_cfg.lpips_heads, eval_cfg.fid_weights, device)
    return {method: VideoEvaluator(config, metrics, perceptual) for method in METHODS}


def metrics_with_files(eval_cfg: EvalConfig) -> set[str]:
    """The columns whose weight files were given (LPIPS, FID)."""
    return {column for column, path in (("LPIPS", eval_cfg.lpips_backbone), ("FID", eval_cfg.fid_weights)) if path}


def score_video(evaluator: VideoEvaluator, name: str, pred_frames: list[np.ndarray],
                gt_frames: list[np.ndarray]) -> dict[str, float]:
    """Score one sequence (lists of HxWx3 uint8 frames) with ``common.video_metrics``; returns its row."""
    return evaluator.add_video(name, pred_frames, gt_frames)


def quantize_rgb(rgb: torch.Tensor) -> list[np.ndarray]:
    """RGB in [0, 1] ``[N, 3, H, W]`` -> HxWx3 uint8 frames with the metrics module's ``quantize``."""
    return [quantize(frame) for frame in rgb.permute(0, 2, 3, 1).double().cpu().numpy()]


def frames_from_ab(lightness: torch.Tensor, ab: torch.Tensor) -> list[np.ndarray]:
    """uint8 RGB frames of lab2rgb(L, clamp(ab)) for normalised ``lightness`` [N,1,S,S] and ``ab`` [N,2,S,S]."""
    lab = torch.cat((lightness.float(), ab.float().clamp(-1.0, 1.0)), dim=1)
    return quantize_rgb(normalized_lab_to_rgb(lab))


@torch.no_grad()
def colorize_sequence(system: FusionSystem, sequence: ValidationSequence,
                      device: torch.device | str = "cpu") -> dict[str, list[np.ndarray]]:
    """Colorize one sequence in eval mode; uint8 RGB frames of ``fused``, ``gray``, ``exemplar`` and ``gt``."""
    was_training = system.training
    system.eval()
    frames_lab = sequence.frames_lab.to(device)
    # Only the lightness enters the system; the ground-truth colour is kept for scoring.
    outputs, _, _, aux = system(frames_lab[None, :, :1], sequence.reference_lab.to(device)[None], return_aux=True)
    system.train(was_training)
    lightness = frames_lab[:, 0:1]
    fused_ab = torch.cat([output[:, 1:3] for output in outputs])
    exemplar_ab = torch.cat([exemplar[:, 1:3] for exemplar in aux["exemplar"]])
    return {
        "fused": frames_from_ab(lightness, fused_ab),
        "gray": frames_from_ab(lightness, torch.zeros_like(fused_ab)),
        "exemplar": frames_from_ab(lightness, exemplar_ab),
        "gt": frames_from_ab(lightness, frames_lab[:, 1:3]),
    }


def sample_indices(count: int, samples: int) -> list[int]:
    """``samples`` frame indices spread evenly over ``count`` frames (first and last included)."""
    if count <= samples:
        return list(range(count))
    return sorted({round(i * (count - 1) / (samples - 1)) for i in range(samples)}) if samples > 1 else [0]


def write_samples(path: Path, frames: dict[str, list[np.ndarray]], samples: int) -> Path:
    """The strip ``samples/<seq>.png``: one row per sampled frame, columns gray | exemplar | fused | ground truth."""
    indices = sample_indices(len(frames["gt"]), samples)
    rows = [[frames[key][i] for key in ("gray", "exemplar", "fused", "gt")] for i in indices]
    return save_image_grid(path, rows, SAMPLE_COLUMNS, [f"frame {i}" for i in indices])


def _write_frames(folder: Path, frames: list[np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{index:05d}.png")


def evaluate(system: FusionSystem, sequences: Sequence[VideoSequence], data_cfg: DataConfig,
             eval_cfg: EvalConfig, out_dir: str | Path, device: torch.device | str = "cpu", extra: dict | None = None,
             between: Callable[[], None] | None = None) -> dict:
    """Evaluate ``system`` (unwrapped) and the gray/exemplar baselines on whole sequences; write the §7 files;
    return the content of ``metrics.json`` (``extra`` merged in). ``between`` runs before each sequence (a stop
    check)."""
    out_dir = Path(out_dir)
    pool = ReferencePool(data_cfg.imagenet) if data_cfg.imagenet is not None and data_cfg.reference == "mixed" else None
    evaluators = video_evaluators(eval_cfg, device)
    for sequence in sequences:
        if between is not None:
            between()
        loaded = load_validation_sequence(sequence, data_cfg, pool, eval_cfg.max_frames)
        frames = colorize_sequence(system, loaded, device)
        for method in METHODS:
            score_video(evaluators[method], sequence.name, frames[method], frames["gt"])
            if eval_cfg.save_frames:
                _write_frames(out_dir / "frames" / method / sequence.name, frames[method])
        write_samples(out_dir / "samples" / f"{sequence.name}.png", frames, eval_cfg.sample_frames)
    summaries = {method: evaluators[method].write(out_dir / f"metrics_{method}.csv") for method in METHODS}
    fused = summaries["fused"]
    not_asked = {"LPIPS": "no --eval.lpips-backbone", "FID": "no --eval.fid-weights"}
    omitted = {column: reason for column, reason in not_asked.items() if column not in metrics_with_files(eval_cfg)}
    metrics = {method: {**summary["means"], **({"FID": summary["FID"]} if "FID" in summary else {})}
               for method, summary in summaries.items()}
    metrics.update({"n_sequences": len(sequences), "n_frames": fused["n_frames"], "warp_flow": WARP_FLOW,
                    "eval_temperature": system.exemplar_config.eval_temperature,
                    "omitted": {**omitted, **fused["omitted"]}, "conventions": fused["conventions_line"],
                    "sequences": [sequence.name for sequence in sequences], **(extra or {})})
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def read_recorded_config(path: str | Path) -> ColorizeConfig:
    """The training config recorded in a ``fusion_*.pth`` file (read without loading its tensors)."""
    checkpoint = load_checkpoint(path, mmap=True, what="fusion checkpoint")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FUSION_FORMAT or "config" not in checkpoint:
        raise CheckpointError(f"{path} is not a fusion checkpoint written by train_colorize.py (format "
                              f"{FUSION_FORMAT}); pass a fusion_epoch_N.pth or fusion_best.pth file")
    return config_from_dict(ColorizeConfig, json.loads(checkpoint["config"]))


def load_evaluation_system(path: str | Path, recorded: ColorizeConfig, image_size: int,
                           eval_temperature: float | None = None) -> FusionSystem:
    """The system of a ``fusion_*.pth`` file: built from its recorded config, every SwinTExCo and fusion weight
    loaded strictly from the file (the flow backend from its recorded source)."""
    exemplar = dataclasses.replace(recorded.exemplar, swintexco_ckpt=None, backbone_weights=None,
                                   allow_download=False)
    if eval_temperature is not None:
        exemplar = dataclasses.replace(exemplar, eval_temperature=eval_temperature)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embed_net starts at random and is then loaded from the file
        return FusionSystem(recorded.flow, exemplar, fusion=dataclasses.replace(recorded.fusion, init_from=Path(path)),
                            image_size=image_size)
