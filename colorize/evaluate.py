"""Streaming evaluation of a colorization system and its baselines (spec/colorize.md §7).

Each sequence is read at S (centre crop, validation reference), colorized in one streamed pass, converted to RGB
as lab2rgb(L_gt, clamp(ab)) and quantised with the metrics module's ``quantize``. The same pass gives the two
baselines: ``gray`` (ab = 0) and ``exemplar`` (the per-frame exemplar ab: no propagation, no fusion). Metrics come
from ``common.video_metrics`` (spec/metrics.md §6), called in memory by :func:`score_video` only; one sequence is
held at a time.

Outputs under ``out_dir``: ``metrics_{fused,gray,exemplar}.csv`` (``video,n_frames,PSNR,SSIM,LPIPS,colorfulness,
CDC,warp_error``, then ``mean``), ``metrics.json``, ``samples/<seq>.png`` (gray | exemplar | fused | ground truth
for a few frames) and, with ``save_frames``, ``frames/<method>/<seq>/NNNNN.png``.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from colorize.config import DataConfig, EvalConfig
from colorize.data import ReferencePool, VideoSequence, ValidationSequence, load_validation_sequence
from colorize.lab import normalized_lab_to_rgb
from colorize.system import FusionSystem
from common.checkpoint import atomic_write_json, atomic_write_text
from common.plots import save_image_grid

METHODS = ("fused", "gray", "exemplar")
CSV_COLUMNS = ("video", "n_frames", "PSNR", "SSIM", "LPIPS", "colorfulness", "CDC", "warp_error")
METRIC_COLUMNS = CSV_COLUMNS[2:]
SAMPLE_COLUMNS = ("gray", "exemplar", "fused", "ground truth")
WARP_FLOW = "dis"


def score_video(pred_frames: list[np.ndarray], gt_frames: list[np.ndarray]) -> dict[str, float]:
    """Video metrics of one sequence (lists of HxWx3 uint8 frames) through ``common.video_metrics``.

    The only call site of the metrics module; LPIPS and FID are added by the trainer's evaluation when their local
    weight files are given.
    """
    from common import video_metrics

    return {
        "PSNR": float(video_metrics.psnr_video(pred_frames, gt_frames)),
        "SSIM": float(video_metrics.ssim_video(pred_frames, gt_frames)),
        "colorfulness": float(video_metrics.colorfulness(pred_frames)),
        "CDC": float(video_metrics.cdc(pred_frames)),
        "warp_error": float(video_metrics.warp_error(pred_frames, gt_frames, flow=WARP_FLOW)),
    }


def quantize_rgb(rgb: torch.Tensor) -> list[np.ndarray]:
    """RGB in [0, 1] ``[N, 3, H, W]`` -> HxWx3 uint8 frames with the metrics module's ``quantize``."""
    from common.video_metrics import quantize

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
    outputs, _, _, aux = system(frames_lab[None], sequence.reference_lab.to(device)[None], return_aux=True)
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


def summarize(rows: list[dict]) -> dict[str, float]:
    """Mean over videos of each metric column present in ``rows`` (NaN skipped; NaN when nothing is finite)."""
    summary = {}
    for column in METRIC_COLUMNS:
        values = [row[column] for row in rows if column in row and not math.isnan(row[column])]
        if any(column in row for row in rows):
            summary[column] = float(np.mean(values)) if values else float("nan")
    return summary


def write_metrics_csv(path: Path, rows: list[dict]) -> Path:
    """One row per video, then ``mean`` (:func:`summarize`); columns :data:`CSV_COLUMNS`, absent metrics empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    writer.writerow({"video": "mean", "n_frames": sum(row["n_frames"] for row in rows), **summarize(rows)})
    return atomic_write_text(path, buffer.getvalue())


def evaluate(system: FusionSystem, sequences: Sequence[VideoSequence], data_cfg: DataConfig,
             eval_cfg: EvalConfig, out_dir: str | Path, device: torch.device | str = "cpu") -> dict:
    """Evaluate ``system`` (unwrapped) and the gray/exemplar baselines on whole sequences; write the §7 files;
    return the content of ``metrics.json``."""
    out_dir = Path(out_dir)
    pool = ReferencePool(data_cfg.imagenet) if data_cfg.imagenet is not None and data_cfg.reference == "mixed" else None
    rows: dict[str, list[dict]] = {method: [] for method in METHODS}
    total_frames = 0
    for sequence in sequences:
        loaded = load_validation_sequence(sequence, data_cfg, pool, eval_cfg.max_frames)
        frames = colorize_sequence(system, loaded, device)
        count = len(frames["gt"])
        total_frames += count
        for method in METHODS:
            scores = score_video(frames[method], frames["gt"])
            rows[method].append({"video": sequence.name, "n_frames": count, **scores})
            if eval_cfg.save_frames:
                _write_frames(out_dir / "frames" / method / sequence.name, frames[method])
        write_samples(out_dir / "samples" / f"{sequence.name}.png", frames, eval_cfg.sample_frames)
    for method in METHODS:
        write_metrics_csv(out_dir / f"metrics_{method}.csv", rows[method])
    pending = "not computed in this pass yet (hookup to common.video_metrics pending)"
    omitted = {"LPIPS": "no --eval.lpips-backbone" if eval_cfg.lpips_backbone is None else pending,
               "FID": "no --eval.fid-weights" if eval_cfg.fid_weights is None else pending}
    metrics = {method: summarize(rows[method]) for method in METHODS}
    metrics.update({"n_sequences": len(sequences), "n_frames": total_frames, "warp_flow": WARP_FLOW,
                    "eval_temperature": system.exemplar_config.eval_temperature, "omitted": omitted})
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics
