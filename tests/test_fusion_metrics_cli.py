"""The fusion metrics command line (spec/metrics.md §4.8, §9 checks 13-14) and its bad-input errors."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.fusion_metrics import METRIC_COLUMNS, main

REPO = Path(__file__).resolve().parents[1]
HEADER = "name,EN,SD,SF,AG,MI,FMI_pixel,FMI_dct,SCD,VIF,Qabf,Nabf,SSIM,MS_SSIM,PSNR,MSE,CC"


def write_triplets(root: Path, stems=("a", "b", "c"), size=256) -> tuple[Path, Path, Path]:
    """Gray IR/VIS PNGs and fused PNGs (the first one RGB) in fused/, ir/, vis/ under ``root``."""
    rng = np.random.default_rng(11)
    folders = tuple(root / name for name in ("fused", "ir", "vis"))
    for folder in folders:
        folder.mkdir(parents=True)
    for index, stem in enumerate(stems):
        ir = rng.integers(0, 256, (size, size), dtype=np.uint8)
        vis = rng.integers(0, 256, (size, size), dtype=np.uint8)
        fused = ((ir.astype(np.uint16) + vis) // 2).astype(np.uint8)
        Image.fromarray(ir).save(folders[1] / f"{stem}.png")
        Image.fromarray(vis).save(folders[2] / f"{stem}.png")
        Image.fromarray(np.stack([fused] * 3, axis=-1) if index == 0 else fused).save(folders[0] / f"{stem}.png")
    return folders


def arguments(folders, *extra) -> list[str]:
    fused, ir, vis = folders
    return ["--fused", str(fused), "--ir", str(ir), "--vis", str(vis), *extra]


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """One default run (workers 1) on 3 triplets of 256x256 images."""
    root = tmp_path_factory.mktemp("cli")
    folders = write_triplets(root)
    start = time.perf_counter()
    code = main(arguments(folders))
    return folders, code, time.perf_counter() - start


def test_default_run_writes_csv_json_and_mean_row(scored, capsys):
    (fused, _, _), code, seconds = scored
    assert code == 0 and seconds < 60
    text = (fused / "metrics.csv").read_text()
    assert text.splitlines()[0] == HEADER
    header, rows = read_rows(fused / "metrics.csv")
    assert [row[0] for row in rows] == ["a", "b", "c", "mean"]
    values = np.array([[float(value) for value in row[1:]] for row in rows[:3]])
    means = np.array([float(value) for value in rows[3][1:]])
    np.testing.assert_allclose(means, values.mean(axis=0), rtol=1e-9)
    summary = json.loads((fused / "metrics.json").read_text())
    assert summary["n_images"] == 3 and summary["mi_unit"] == "bits"
    assert summary["metrics"] == list(METRIC_COLUMNS)
    assert summary["means"]["MI"] == pytest.approx(means[header.index("MI") - 1], rel=1e-9)
    assert set(summary["versions"]) == {"numpy", "scipy"}


def test_workers_give_byte_identical_files(scored, tmp_path):
    folders, _, _ = scored
    out = tmp_path / "two_workers.csv"
    assert main(arguments(folders, "--workers", "2", "--out", str(out))) == 0
    assert out.read_bytes() == (folders[0] / "metrics.csv").read_bytes()
    assert out.with_suffix(".json").read_bytes() == (folders[0] / "metrics.json").read_bytes()


def test_nats_scale_only_mi(scored, tmp_path):
    folders, _, _ = scored
    subset = ["--metrics", "EN", "MI", "SSIM,CC"]
    bits_csv, nats_csv = tmp_path / "bits.csv", tmp_path / "nats.csv"
    assert main(arguments(folders, *subset, "--out", str(bits_csv))) == 0
    assert main(arguments(folders, *subset, "--mi-unit", "nats", "--out", str(nats_csv))) == 0
    header, bits = read_rows(bits_csv)
    _, nats = read_rows(nats_csv)
    assert header == ["name", "EN", "MI", "SSIM", "CC"]
    for bits_row, nats_row in zip(bits, nats):
        assert float(nats_row[2]) == pytest.approx(float(bits_row[2]) * math.log(2.0), rel=1e-9)
        assert [bits_row[i] for i in (0, 1, 3, 4)] == [nats_row[i] for i in (0, 1, 3, 4)]
    assert json.loads(nats_csv.with_suffix(".json").read_text())["mi_unit"] == "nats"


def test_missing_ir_file_exits_2_naming_the_stem(tmp_path, capsys):
    folders = write_triplets(tmp_path, stems=("first", "second"), size=32)
    (folders[1] / "second.png").unlink()
    assert main(arguments(folders, "--metrics", "EN")) == 2
    error = capsys.readouterr().err
    assert "second" in error and "IR" in error and str(folders[1]) in error
    assert not (folders[0] / "metrics.csv").exists()


def test_unpaired_source_files_are_counted_in_a_warning(tmp_path, capsys):
    folders = write_triplets(tmp_path, stems=("x", "y"), size=32)
    (folders[0] / "y.png").unlink()
    assert main(arguments(folders, "--metrics", "EN,SD")) == 0
    error = capsys.readouterr().err
    assert "1 IR image(s)" in error and "1 VIS image(s)" in error and "y" in error
    _, rows = read_rows(folders[0] / "metrics.csv")
    assert [row[0] for row in rows] == ["x", "mean"]


@pytest.mark.parametrize("problem", ["missing folder", "empty folder", "truncated", "not an image", "size",
                                     "16-bit"])
def test_bad_input_exits_2_with_one_message_naming_the_file(tmp_path, capsys, problem):
    folders = write_triplets(tmp_path, stems=("p", "q"), size=48)
    fused, ir, vis = folders
    if problem == "missing folder":
        folders = (fused, tmp_path / "nowhere", vis)
        expected = "nowhere"
    elif problem == "empty folder":
        for path in vis.iterdir():
            path.unlink()
        expected = str(vis)
    elif problem == "truncated":
        data = (ir / "q.png").read_bytes()
        (ir / "q.png").write_bytes(data[: len(data) // 2])
        expected = "q.png"
    elif problem == "not an image":
        (vis / "p.png").write_text("this is not a PNG")
        expected = "p.png"
    elif problem == "size":
        Image.fromarray(np.zeros((48, 50), dtype=np.uint8)).save(fused / "q.png")
        expected = "q.png"
    else:
        Image.fromarray(np.zeros((48, 48), dtype=np.uint16)).save(ir / "p.png")
        expected = "p.png"
    assert main(arguments(folders, "--metrics", "EN")) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and expected in error and len(error.splitlines()) == 1


def test_module_entry_point_runs_and_reports_bad_input(tmp_path):
    folders = write_triplets(tmp_path, stems=("only",), size=24)
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "common.fusion_metrics", *arguments(folders, "--metrics", "EN", "CC")]
    finished = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert (folders[0] / "metrics.csv").read_text().startswith("name,EN,CC\nonly,")
    bad = subprocess.run(command[:4] + [str(tmp_path / "absent")] + command[5:], cwd=REPO, env=environment,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "absent" in bad.stderr
