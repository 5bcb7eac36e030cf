"""The video metrics command line (spec/metrics.md §6, §9 check 27) and its bad-input errors (exit code 2)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import video_metrics as vm
from common.video_metrics import main

HEADER = ["video", "n_frames", "PSNR", "SSIM", "colorfulness", "CDC", "warp_error"]


def write_videos(root: Path, lengths: dict[str, int], size: int = 64) -> tuple[Path, Path, Path]:
    """pred/, gt/ and input/ folders of PNG videos: GT with a moving gradient, pred = GT plus noise, gray inputs."""
    rng = np.random.default_rng(27)
    folders = tuple(root / name for name in ("pred", "gt", "input"))
    rows, columns = np.mgrid[0:size, 0:size]
    for name, length in lengths.items():
        for folder in folders:
            (folder / name).mkdir(parents=True)
        for t in range(length):
            gt = np.stack([(columns * 4 + 7 * t) % 256, (rows * 3) % 256, np.full((size, size), 90 + 10 * t)], axis=-1)
            gt = gt.astype(np.uint8)
            pred = np.clip(gt.astype(int) + rng.integers(-20, 21, gt.shape), 0, 255).astype(np.uint8)
            gray = np.rint(gt @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
            # Different digit widths: the frames pair in natural order, not in listing order.
            Image.fromarray(pred).save(folders[0] / name / f"frame_{t + 8}.png")
            Image.fromarray(gt).save(folders[1] / name / f"frame_{t + 8}.png")
            Image.fromarray(gray).save(folders[2] / name / f"frame_{t + 8}.png")
    return folders


def arguments(folders, *extra) -> list[str]:
    return ["--pred", str(folders[0]), "--gt", str(folders[1]), *extra]


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """One run with --flow zero on two videos of 6 and 3 frames (64x64)."""
    folders = write_videos(tmp_path_factory.mktemp("videos"), {"walk": 6, "cut": 3})
    return folders, main(arguments(folders, "--flow", "zero", "--metrics", "psnr,ssim,colorfulness,cdc,warp"))


def test_run_writes_one_row_per_video_the_mean_and_the_flow_model(scored, capsys):
    folders, code = scored
    assert code == 0
    rows = read_rows(folders[0] / "metrics.csv")
    assert rows[0] == HEADER
    assert [row[0] for row in rows[1:]] == ["cut", "walk", "mean"]
    assert [row[1] for row in rows[1:]] == ["3", "6", "9"]
    values = np.array([[float(value) for value in row[2:]] for row in rows[1:3]])
    np.testing.assert_allclose([float(value) for value in rows[3][2:]], values.mean(axis=0), rtol=1e-9)
    summary = json.loads((folders[0] / "metrics.json").read_text())
    assert summary["flow"]["name"] == "zero" and summary["flow"]["source"] == "gt"
    assert summary["n_videos"] == 2 and summary["n_frames"] == 9
    assert summary["means"]["PSNR"] == pytest.approx(float(rows[3][2]), rel=1e-9)
    assert "warp_error" in summary["conventions"] and summary["inputs"]["gt"] == str(folders[1])


def test_csv_values_equal_the_in_memory_functions(scored):
    folders, _ = scored
    from common.images import read_image

    paths = sorted((folders[0] / "walk").iterdir(), key=lambda path: int(path.stem.split("_")[1]))
    pred = [read_image(path) for path in paths]
    gt = [read_image(folders[1] / "walk" / path.name) for path in paths]
    walk = next(row for row in read_rows(folders[0] / "metrics.csv") if row[0] == "walk")
    assert float(walk[2]) == pytest.approx(np.mean([vm.frame_psnr(p, g) for p, g in zip(pred, gt)]), rel=1e-9)
    assert float(walk[5]) == pytest.approx(vm.cdc(pred), rel=1e-9)
    assert float(walk[6]) == pytest.approx(vm.warp_error(pred, flow="zero"), rel=1e-9)


def test_gt_row_input_flows_and_omitted_columns(scored, tmp_path, capsys):
    folders, _ = scored
    out = tmp_path / "scores.csv"
    code = main(arguments(folders, "--input", str(folders[2]), "--flow-source", "input", "--flow", "zero",
                          "--gt-row", "--out", str(out)))
    assert code == 0
    rows = read_rows(out)
    assert rows[0] == HEADER  # LPIPS and FID requested by default, omitted without weights
    assert rows[-1][0] == "gt" and rows[-1][2:4] == ["", ""] and all(rows[-1][4:])
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["flow"]["source"] == "input"
    assert set(summary["omitted"]) == {"LPIPS", "FID"}
    assert set(summary["conventions"]) == set(HEADER[2:])
    assert "gt_floor" in summary
    error = capsys.readouterr().err
    assert "LPIPS omitted" in error and "FID omitted" in error
    assert "cut: CDC of a 3-frame video uses gaps [1, 2]" in error


@pytest.mark.parametrize("damage, message", [
    ("missing video", "video(s) missing from"),
    ("frame count", "frame counts differ"),
    ("frame name", "names differ"),
    ("frame size", "frame sizes differ"),
    ("unreadable", "frame_9.png"),
])
def test_mismatched_folders_exit_2_naming_the_problem(tmp_path, capsys, damage, message):
    folders = write_videos(tmp_path, {"walk": 3, "cut": 2}, size=32)
    gt_walk = folders[1] / "walk"
    if damage == "missing video":
        shutil.rmtree(folders[1] / "cut")
    elif damage == "frame count":
        (gt_walk / "frame_10.png").unlink()
    elif damage == "frame name":
        (gt_walk / "frame_10.png").rename(gt_walk / "frame_10b.png")
    elif damage == "frame size":
        Image.new("RGB", (30, 32)).save(gt_walk / "frame_9.png")
    else:
        (gt_walk / "frame_9.png").write_bytes(b"\x89PNG truncated")
    assert main(arguments(folders, "--flow", "zero", "--metrics", "psnr,warp")) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error
    assert not (folders[0] / "metrics.csv").exists()


def test_bad_options_exit_2(tmp_path, capsys):
    folders = write_videos(tmp_path, {"walk": 2}, size=32)
    assert main(arguments(folders, "--flow-source", "input")) == 2
    assert "--input" in capsys.readouterr().err
    assert main(arguments(folders, "--flow", "no_such_module:flow")) == 2
    assert "cannot load the flow plug-in" in capsys.readouterr().err
    assert main(arguments(folders, "--metrics", "psnr,niqe")) == 2
    assert "unknown video metric" in capsys.readouterr().err
    for flag in ("--lpips-backbone", "--fid-weights"):
        assert main(arguments(folders, flag, str(tmp_path / "none.pth"))) == 2
        assert "none.pth does not exist" in capsys.readouterr().err
