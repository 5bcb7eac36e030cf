"""Streamed evaluation (spec/colorize.md §7) through the real common.video_metrics: files, baselines, and the fused
PSNR against an independent per-frame computation."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from colorize.config import EvalConfig
from colorize.data import ReferencePool, find_validation_sequences, load_validation_sequence
from colorize.evaluate import colorize_sequence, evaluate, sample_indices
from tests.colorize_helpers import demo_data_config, demo_root, demo_system, no_network  # noqa: F401

pytestmark = pytest.mark.usefixtures("no_network")


def _psnr(pred_frames, gt_frames) -> float:
    errors = [np.mean((p.astype(np.float64) - g.astype(np.float64)) ** 2) for p, g in zip(pred_frames, gt_frames)]
    return float(np.mean([10 * np.log10(255.0 ** 2 / e) if e else np.inf for e in errors]))


def test_evaluation_files_and_baselines(demo_root, tmp_path):
    cfg = demo_data_config(demo_root)
    sequences = find_validation_sequences(cfg)[:2]
    system = demo_system()
    system.train()
    metrics = evaluate(system, sequences, cfg, EvalConfig(max_frames=6, save_frames=True), tmp_path / "eval",
                       extra={"epoch": 3})
    assert system.training  # the caller's mode is restored

    assert set(metrics) >= {"fused", "gray", "exemplar", "n_sequences", "n_frames", "warp_flow", "eval_temperature"}
    assert metrics["n_sequences"] == 2 and metrics["n_frames"] == 12 and metrics["warp_flow"] == "dis"
    assert metrics["epoch"] == 3 and set(metrics["omitted"]) == {"LPIPS", "FID"}
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["fused"] == pytest.approx(metrics["fused"])
    pool = ReferencePool(cfg.imagenet)
    for method in ("fused", "gray", "exemplar"):
        with open(tmp_path / "eval" / f"metrics_{method}.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0]) == ["video", "n_frames", "PSNR", "SSIM", "colorfulness", "CDC", "warp_error"]
        assert [row["video"] for row in rows] == [s.name for s in sequences] + ["mean"]
        assert float(rows[-1]["PSNR"]) == pytest.approx(np.mean([float(r["PSNR"]) for r in rows[:-1]]), rel=1e-6)
        assert float(rows[-1]["PSNR"]) == pytest.approx(metrics[method]["PSNR"], rel=1e-6)
        assert (tmp_path / "eval" / f"metrics_{method}.json").is_file()
        assert len(list((tmp_path / "eval" / "frames" / method / sequences[0].name).glob("*.png"))) == 6
    system.eval()
    frames = colorize_sequence(system, load_validation_sequence(sequences[0], cfg, pool, 6))
    with open(tmp_path / "eval" / "metrics_fused.csv") as handle:
        first = next(csv.DictReader(handle))
    assert float(first["PSNR"]) == pytest.approx(_psnr(frames["fused"], frames["gt"]), rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "eval" / "samples").iterdir()) == [f"{s.name}.png" for s in sequences]


def test_colorized_frames_follow_the_definitions(demo_root):
    cfg = demo_data_config(demo_root)
    sequence = load_validation_sequence(find_validation_sequences(cfg)[0], cfg, ReferencePool(cfg.imagenet), 4)
    system = demo_system()
    system.eval()
    frames = colorize_sequence(system, sequence)
    assert set(frames) == {"fused", "gray", "exemplar", "gt"} and all(len(v) == 4 for v in frames.values())
    gray = np.stack(frames["gray"]).astype(np.int64)
    assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 1 and np.abs(gray[..., 1] - gray[..., 2]).max() <= 1
    with torch.no_grad():
        outputs, _, _, aux = system(sequence.frames_lab[None], sequence.reference_lab[None], return_aux=True)
    from colorize.lab import normalized_lab_to_rgb

    first = torch.cat((sequence.frames_lab[0, 0:1], aux["exemplar"][0][0, 1:].clamp(-1, 1)))
    expected = np.clip(np.rint(255 * normalized_lab_to_rgb(first).permute(1, 2, 0).double().numpy()), 0, 255)
    assert np.array_equal(frames["exemplar"][0], expected.astype(np.uint8))
    assert _psnr(frames["gt"], frames["gt"]) == np.inf


def test_sample_indices():
    assert sample_indices(12, 4) == [0, 4, 7, 11]
    assert sample_indices(3, 4) == [0, 1, 2]
