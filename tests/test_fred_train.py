"""train_fred_fusion.py end to end on a tiny demo (spec/fred.md §4, §6, §9 checks 6, 7, 9, 10, 11).

Every run is a fresh process (as a user runs it) on the 20-frame session demo at 64², phi n, batch 8.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.lossdump import load_mat
from common.run import seed_everything
from fred.demo_data import ensure_fred_demo
from fred.model import build_model
from tests.kit_helpers import ROOT, env

SMALL_DEMO = {"frames": 20}  # the same session demo as tests/test_fred_demo_data.py (generated once)
SCRIPT = ROOT / "train_fred_fusion.py"
FULL_STATE_KEYS = {"format", "format_version", "epoch", "stage", "model", "ema", "ema_updates", "optimizer", "scaler",
                   "lr", "loss", "history", "best", "rng", "config", "model_meta", "log_subdir"}
RUN_FILES = {"epoch_loss.png", "val_loss.png", "lr.png", "epoch_map.png", "epoch_loss.txt", "epoch_val_loss.txt",
             "epoch_map.txt", "fusion_stats.csv", "loss_history.mat", "config.json", "load_report.json"}


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """A 6-sequence, 20-frame demo shared by the FRED test files (same path, so generated once)."""
    return ensure_fred_demo(tmp_path_factory.getbasetemp() / "fred_demo_small", seed=0, **SMALL_DEMO)


@pytest.fixture(scope="module")
def base_args(small_demo, tmp_path_factory) -> list[str]:
    """Demo preset on the session demo, shrunk: 64² input, batch 8 (7 steps per epoch), with the paper's mosaic and
    mixup (.5/.5, off in the demo preset) so exact resume covers the augmentation draws too."""
    annotations = tmp_path_factory.mktemp("fred_train_annotations")
    return ["--demo-root", str(small_demo), "--demo-frames", "20", "--annotation-dir", str(annotations),
            "--input-shape", "64", "64", "--freeze-batch-size", "8", "--unfreeze-batch-size", "8",
            "--eval-batch-size", "32", "--mosaic", "0.5", "--mixup", "0.5"]


def train(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the trainer in a fresh process."""
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env(),
                            cwd=ROOT, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"trainer failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def parameters_of(model_state: dict, prefix: str) -> dict[str, torch.Tensor]:
    """Parameters (not BN statistics) under ``prefix``."""
    skip = ("running_mean", "running_var", "num_batches_tracked")
    return {k: v for k, v in model_state.items() if k.startswith(prefix) and not k.endswith(skip)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file with its size and modification time."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def straight_run(base_args, tmp_path_factory) -> Path:
    """Four epochs straight: switch at 2, save period 2."""
    run = tmp_path_factory.mktemp("fred_straight")
    train(*base_args, "--epochs", "4", "--freeze-epoch", "2", "--save-period", "2", "--eval-period", "2",
          "--save-dir", str(run))
    return run


@pytest.fixture(scope="module")
def resumed_run(base_args, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, dict]:
    """The same four epochs as ``straight_run``: ``--freeze-training`` (epochs 0-1), then ``--resume`` (2-3)."""
    run = tmp_path_factory.mktemp("fred_resumed")
    first = train(*base_args, "--epochs", "4", "--freeze-epoch", "2", "--save-period", "1", "--eval-period", "2",
                  "--freeze-training", "--save-dir", str(run))
    after_freeze = {p.name for p in run.glob("*.pth")}
    freeze_last = state(run / "last_epoch_weights.pth")["epoch"]
    # The same command without --freeze-training continues the run (a bare --resume is the notes' spelling of auto).
    second = train(*base_args, "--epochs", "4", "--freeze-epoch", "2", "--save-period", "1", "--eval-period", "2",
                   "--save-dir", str(run), "--resume")
    return run, second, {"first": first, "after_freeze": after_freeze, "freeze_last": freeze_last}


def test_quick_test_crosses_the_switch(base_args, tmp_path):
    result = train(*base_args, "--quick-test", "--quick-test-batches", "2", "--save-dir", str(tmp_path))
    assert "quick test passed" in result.stdout
    assert "Stage 1: freeze training" in result.stdout and "Stage 2: unfreeze training" in result.stdout
    quick = tmp_path / "quick_test"
    assert {p.name for p in tmp_path.iterdir()} == {"quick_test"}
    assert (quick / "freeze_epoch_1_weights.pth").is_file() and (quick / "unfreeze_epoch_2_weights.pth").is_file()
    assert len(state(quick / "last_epoch_weights.pth")["series"]["loss"]) == 4  # 2 batches per stage
    # --overwrite starts over and leaves no folder of the earlier run behind (its loss_<timestamp> folder included)
    first_logs = {p.name for p in quick.glob("loss_*")}
    again = train(*base_args, "--quick-test", "--quick-test-batches", "2", "--save-dir", str(tmp_path), "--overwrite")
    assert "quick test passed" in again.stdout
    logs = {p.name for p in quick.glob("loss_*")}
    assert len(first_logs) == 1 and len(logs) == 1 and logs != first_logs


def test_four_epoch_run_writes_every_file(straight_run):
    names = {p.name for p in straight_run.iterdir()}
    for name in ("freeze_epoch_2_weights.pth", "unfreeze_epoch_4_weights.pth", "last_epoch_weights.pth",
                 "fred_fusion_best.pth", "fred_fusion_final.pth", "fred_fusion_best.json", "fred_fusion_final.json"):
        assert name in names
    assert not {"freeze_epoch_1_weights.pth", "unfreeze_epoch_3_weights.pth"} & names
    exports = sorted(n for n in names if re.fullmatch(r"ep\d{3}-loss\d+\.\d{3}-val_loss\d+\.\d{3}\.pth", n))
    assert [n[:5] for n in exports] == ["ep002", "ep004"]
    full = state(straight_run / "unfreeze_epoch_4_weights.pth")
    assert FULL_STATE_KEYS <= set(full) and full["epoch"] == 4 and full["stage"] == "unfreeze"
    assert full["format_version"] == 2 and full["model_meta"]["phi"] == "n"
    assert not any(k.startswith("module.") for k in full["model"])
    best = state(straight_run / "fred_fusion_best.pth")
    assert set(best) == set(full["ema"]) and all(isinstance(v, torch.Tensor) for v in best.values())
    sidecar = json.loads((straight_run / "fred_fusion_final.json").read_text())
    assert sidecar["model_meta"] == full["model_meta"] and sidecar["epoch"] == 4

    [log] = straight_run.glob("loss_*")
    assert RUN_FILES <= {p.name for p in log.iterdir()} and list(log.glob("events.out.tfevents.*"))
    for png in log.glob("*.png"):
        with Image.open(png) as image:
            image.verify()
    history = load_mat(log / "loss_history.mat")
    assert history["epoch"].ravel().tolist() == [1, 2, 3, 4]
    assert history["stage"].ravel().tolist() == [0, 0, 1, 1]
    ap50 = history["ap50"].ravel()
    assert np.isnan(ap50[[0, 2]]).all() and np.isfinite(ap50[[1, 3]]).all()
    assert history["step_loss"].size == 4 * 7 and np.isfinite(history["step_loss"]).all()
    lr = history["lr"].ravel()
    assert lr[3] == pytest.approx(5e-6)  # the tail epoch runs at Min_lr_fit = clip(8/16·1e-5, 3e-6, 1e-5)
    with open(log / "fusion_stats.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["epoch", "split", "total", "dual", "rgb_only", "event_only", "dual_rate",
                             "avg_time_diff_ms", "max_time_diff_ms", "threshold_s", "used"]
    assert [(r["epoch"], r["split"]) for r in rows[:3]] == [("1", "train"), ("1", "val"), ("1", "test")]
    results = (straight_run / ".temp_map_out" / "results")
    assert {"results.txt", "detections_test.json", "gt_test.json", "detections_val.json", "gt_val.json"} <= {
        p.name for p in results.iterdir()}
    assert "AP50 dark frames" in (results / "results.txt").read_text()


def test_resume_equals_straight_run(straight_run, resumed_run):
    run, second, info = resumed_run
    # --freeze-training ended at freeze_epoch: only freeze states, and final weights were written.
    assert info["freeze_last"] == 2
    assert info["after_freeze"] >= {"freeze_epoch_1_weights.pth", "freeze_epoch_2_weights.pth",
                                    "fred_fusion_final.pth"}
    assert not any(n.startswith("unfreeze") for n in info["after_freeze"])
    assert "resumed from" in second.stdout and "Stage 2: unfreeze training (epochs 2-4)" in second.stdout

    straight = state(straight_run / "unfreeze_epoch_4_weights.pth")
    resumed = state(run / "unfreeze_epoch_4_weights.pth")
    assert straight["ema_updates"] == resumed["ema_updates"] == 4 * 7
    for key, value in straight["ema"].items():
        assert torch.allclose(value.double(), resumed["ema"][key].double(), rtol=0, atol=1e-5), key
    [straight_log], [resumed_log] = straight_run.glob("loss_*"), run.glob("loss_*")
    straight_losses = load_mat(straight_log / "loss_history.mat")["step_loss"].ravel()
    resumed_losses = load_mat(resumed_log / "loss_history.mat")["step_loss"].ravel()
    assert len(resumed_losses) == 28 and np.array_equal(straight_losses, resumed_losses)


def test_backbones_frozen_then_trained(resumed_run):
    run = resumed_run[0]
    epoch1, epoch2 = state(run / "freeze_epoch_1_weights.pth"), state(run / "freeze_epoch_2_weights.pth")
    epoch3 = state(run / "unfreeze_epoch_3_weights.pth")
    seed_everything(0)
    initial = build_model("dual", "n", 1, fusion_mode="concat", compression_ratio=0.5).state_dict()
    for prefix in ("backbone_rgb.", "backbone_event."):
        assert same(parameters_of(initial, prefix), parameters_of(epoch1["model"], prefix))
        assert same(parameters_of(epoch1["model"], prefix), parameters_of(epoch2["model"], prefix))
        assert not same(parameters_of(epoch2["model"], prefix), parameters_of(epoch3["model"], prefix))
    for prefix in ("fusion.", "yolo_head_P3."):
        assert not same(parameters_of(initial, prefix), parameters_of(epoch1["model"], prefix))


def test_rerun_of_a_finished_run_is_complete_and_never_is_refused(base_args, straight_run):
    before = snapshot(straight_run)
    args = (*base_args, "--epochs", "4", "--freeze-epoch", "2", "--save-period", "2", "--eval-period", "2",
            "--save-dir", str(straight_run))
    again = train(*args)
    assert "complete:" in again.stdout and "nothing to do" in again.stdout
    refused = train(*args, "--resume", "never", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    message = refused.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "last_epoch_weights.pth" in message
    assert all(flag in message for flag in ("--resume auto", "--overwrite", "--save-dir"))
    assert snapshot(straight_run) == before


def test_other_architecture_is_refused_and_nothing_lost(base_args, straight_run):
    before = snapshot(straight_run)
    result = train(*base_args, "--save-dir", str(straight_run), "--resume-from",
                   str(straight_run / "unfreeze_epoch_4_weights.pth"), "--phi", "s", check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "refusing to resume" in result.stderr and "phi n" in result.stderr and "phi s" in result.stderr
    assert snapshot(straight_run) == before


def test_eval_only_trains_nothing(base_args, straight_run):
    results = straight_run / ".temp_map_out" / "results" / "results.txt"
    results.unlink()
    weights = {p.name: p.stat().st_mtime_ns for p in straight_run.glob("*.pth")}
    result = train(*base_args, "--eval-only", "--save-dir", str(straight_run))
    assert results.is_file() and "fred_fusion_best.pth on test" in results.read_text()
    assert "[test] AP50" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in straight_run.glob("*.pth")} == weights
    assert len(list(straight_run.glob("loss_*"))) == 1


def test_missing_fred_root_is_one_clear_error(tmp_path):
    result = train("--fred-root", str(tmp_path / "no_such_FRED"), "--save-dir", str(tmp_path / "run"), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: FRED root")
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_bf16_sgd_quick_test_crosses_the_switch(base_args, tmp_path):
    """bf16 with the paper's optimizer: fused momentum SGD used to crash at the switch (new backbone parameters
    without momentum buffers beside the head's)."""
    result = train(*base_args, "--quick-test", "--quick-test-batches", "2", "--mixed-precision", "bf16",
                   "--optimizer", "sgd", "--init-lr", "1e-2", "--save-dir", str(tmp_path))
    assert "quick test passed" in result.stdout and "precision bf16" in result.stdout
    losses = state(tmp_path / "quick_test" / "last_epoch_weights.pth")["series"]["loss"]
    assert len(losses) == 4 and torch.isfinite(losses).all()


def test_fp16_on_cpu_downgraded_and_skip_freeze_never_freezes(base_args, tmp_path):
    result = train(*base_args, "--quick-test", "--quick-test-batches", "2", "--mixed-precision", "fp16",
                   "--skip-freeze", "--save-dir", str(tmp_path))
    assert "fp16 mixed precision needs a GPU" in result.stdout and "precision no" in result.stdout
    assert "Stage 1" not in result.stdout and "Stage 2: unfreeze training (epochs 0-" in result.stdout
    quick = tmp_path / "quick_test"
    assert not list(quick.glob("freeze_*")) and (quick / "unfreeze_epoch_1_weights.pth").is_file()
    trained = state(quick / "unfreeze_epoch_1_weights.pth")
    assert trained["stage"] == "unfreeze" and trained["history"]["stage"] == [1.0]
    seed_everything(0)
    initial = build_model("dual", "n", 1, fusion_mode="concat", compression_ratio=0.5).state_dict()
    assert not same(parameters_of(initial, "backbone_rgb."), parameters_of(trained["model"], "backbone_rgb."))


def test_demo_preset_per_modality_and_flags_win():
    """The demo preset: 15 epochs for the dual model, 25 for a single stream (half the cost per step, same ~3
    minutes), mosaic and mixup off; the paper preset keeps .5/.5 and 300 epochs; an explicit flag always wins."""
    from fred.config import resolve_config

    dual, notices = resolve_config([])
    rgb, _ = resolve_config(["--modality", "rgb"])
    event, _ = resolve_config(["--modality", "event"])
    assert (dual.preset, dual.epochs, dual.mosaic, dual.mixup) == ("demo", 15, 0.0, 0.0)
    assert (rgb.epochs, event.epochs, rgb.mosaic) == (25, 25, 0.0)
    assert any("15 epochs" in n for n in notices)
    assert any("25 epochs" in n for n in resolve_config(["--modality", "rgb"])[1])
    flagged, _ = resolve_config(["--modality", "rgb", "--epochs", "3", "--mosaic", "0.5"])
    assert (flagged.epochs, flagged.mosaic) == (3, 0.5)
    paper, _ = resolve_config(["--fred-root", "somewhere"])
    assert (paper.preset, paper.epochs, paper.mosaic, paper.mixup) == ("paper", 300, 0.5, 0.5)


def test_sample_grid_shows_each_frames_best_guess_below_the_threshold():
    """The detection grid draws boxes scoring >= .25; a frame without one shows its single best detection (the
    demo's dark frames score .14-.22 where the dual model finds the drones), and an empty frame stays empty."""
    from fred.outputs import shown_detections

    rows = np.array([[0, 0, 4, 4, 0.12, 0], [1, 1, 5, 5, 0.2, 0], [2, 2, 6, 6, 0.07, 0]], dtype=np.float32)
    assert shown_detections(rows, 0.25).tolist() == [rows[1].tolist()]
    confident = np.vstack([rows, [[3, 3, 7, 7, 0.6, 0], [4, 4, 8, 8, 0.3, 0]]]).astype(np.float32)
    assert shown_detections(confident, 0.25)[:, 4].tolist() == pytest.approx([0.6, 0.3])
    assert shown_detections(np.zeros((0, 6), np.float32), 0.25).shape == (0, 6)
