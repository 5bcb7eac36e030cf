"""The generated IR/VIS demo dataset (common/ivif/demo.py): spec/crossfuse.md §5 recipe and §9 check 15, and
which fusion metrics plain averaging loses to a single source on it."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from common.ivif import demo as ivif_demo
from common.errors import DataError
from common.fusion_metrics import evaluate_triplet
from common.ivif.data import discover_file_pairs
from common.ivif.demo import DemoArgs, demo_file_names, ensure_ivif_demo, reference_target

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return ensure_ivif_demo(tmp_path_factory.mktemp("demo") / "ivif_demo", seed=0)


def load(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.asarray(image)


def test_layout_sizes_and_masks(demo):
    for name in demo_file_names():
        assert (demo / name).is_file()
    train = discover_file_pairs(demo / "train")
    assert [pair.key for pair in train] == [f"{index:05d}" for index in range(128)]
    assert all(load(pair.ir).shape == load(pair.vi).shape == (48, 48) for pair in train[:5])
    test = discover_file_pairs(demo / "test")
    assert [pair.key for pair in test] == [f"{index:03d}" for index in range(8)]
    for pair in test:
        shape = load(pair.ir).shape
        assert load(pair.vi).shape == shape
        assert all(96 <= side <= 120 and side % 8 for side in shape)
        for kind in ("targets", "texture"):
            mask = load(demo / "test" / "masks" / f"{pair.key}_{kind}.png")
            assert mask.shape == shape and set(np.unique(mask)) == {0, 255}


def test_equal_seeds_give_byte_identical_files(demo, tmp_path):
    again = ensure_ivif_demo(tmp_path / "again", seed=0)
    other = ensure_ivif_demo(tmp_path / "other", seed=1)
    names = demo_file_names() + [ivif_demo.MANIFEST_NAME]
    assert all((demo / name).read_bytes() == (again / name).read_bytes() for name in names)
    assert sum((demo / name).read_bytes() != (other / name).read_bytes() for name in demo_file_names()) > 200


def high_pass(image: np.ndarray) -> np.ndarray:
    return image - ndimage.gaussian_filter(image, 2.0)


def test_complementary_content(demo):
    """Check 15: warm targets only in IR (bright over their ring, dark in VIS); texture only in VIS."""
    for index in range(8):
        stem = f"{index:03d}"
        ir = load(demo / "test" / "ir" / f"{stem}.png").astype(np.float64)
        vi = load(demo / "test" / "vi" / f"{stem}.png").astype(np.float64)
        targets = load(demo / "test" / "masks" / f"{stem}_targets.png") > 0
        texture = load(demo / "test" / "masks" / f"{stem}_texture.png") > 0
        distance = ndimage.distance_transform_edt(~targets)
        ring = (distance >= 1) & (distance <= 4)
        assert ir[targets].mean() - ir[ring].mean() >= 80
        assert vi[targets].mean() < vi[ring].mean()
        assert np.std(high_pass(vi)[texture]) >= 2.5 * np.std(high_pass(ir)[texture])


def scores(demo: Path, metrics: list[str]) -> dict[str, list[dict[str, float]]]:
    """Metric values per test pair for the candidates average, IR alone, VIS alone and the loss target T."""
    results = {"average": [], "ir": [], "vis": [], "target": []}
    for index in range(8):
        ir = load(demo / "test" / "ir" / f"{index:03d}.png").astype(np.float64)
        vi = load(demo / "test" / "vi" / f"{index:03d}.png").astype(np.float64)
        candidates = {"average": np.rint((ir + vi) / 2.0), "ir": ir, "vis": vi, "target": reference_target(ir, vi)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SCD of a single source is NaN (F - A is constant)
            for name, fused in candidates.items():
                results[name].append(evaluate_triplet(fused, ir, vi, metrics=metrics))
    return results


@pytest.fixture(scope="module")
def demo_scores(demo):
    return scores(demo, ["MI", "FMI_pixel", "FMI_dct", "VIF", "Qabf", "SSIM", "PSNR", "CC", "SCD"])


def mean(results, candidate, metric) -> float:
    return float(np.mean([row[metric] for row in results[candidate]]))


def test_target_beats_average_on_qabf_and_vif(demo_scores):
    for metric in ("Qabf", "VIF"):
        assert mean(demo_scores, "target", metric) > mean(demo_scores, "average", metric) + 0.1
        assert all(t[metric] > a[metric] for t, a in zip(demo_scores["target"], demo_scores["average"]))


def test_average_loses_to_best_single_source_on_information_metrics(demo_scores):
    """MI, FMI (pixel, DCT), VIF and Qabf reward keeping a source's content: copying one source beats averaging,
    in the mean and on every pair. SSIM, PSNR and CC reward being halfway: averaging wins those."""
    for metric in ("MI", "FMI_pixel", "FMI_dct", "VIF", "Qabf"):
        best_source = max(mean(demo_scores, "ir", metric), mean(demo_scores, "vis", metric))
        assert mean(demo_scores, "average", metric) < best_source - 0.05
        for average, ir, vis in zip(demo_scores["average"], demo_scores["ir"], demo_scores["vis"]):
            assert average[metric] < max(ir[metric], vis[metric])
    for metric in ("SSIM", "PSNR", "CC"):
        best_source = max(mean(demo_scores, "ir", metric), mean(demo_scores, "vis", metric))
        assert mean(demo_scores, "average", metric) > best_source
    assert all(math.isnan(row["SCD"]) for row in demo_scores["ir"])


def test_reference_target_follows_the_box_mean_rule():
    ir = np.full((30, 30), 40.0)
    ir[10:20, 10:20] = 230.0
    vi = np.full((30, 30), 120.0)
    target = reference_target(ir, vi)
    box_ir = ndimage.uniform_filter(ir, 11, mode="constant")
    box_vi = ndimage.uniform_filter(vi, 11, mode="constant")
    np.testing.assert_array_equal(target, np.where(box_ir > box_vi, ir, vi))
    assert target[15, 15] == 230.0 and target[0, 0] == 120.0


def test_ensure_generates_once_and_repairs_only_its_own_folder(tmp_path, monkeypatch):
    root = ensure_ivif_demo(tmp_path / "cache", seed=2)
    first_file = root / demo_file_names()[0]
    modified = first_file.stat().st_mtime_ns
    assert ensure_ivif_demo(root, seed=2) == root and first_file.stat().st_mtime_ns == modified
    (root / demo_file_names()[-1]).unlink()  # incomplete: regenerated
    ensure_ivif_demo(root, seed=2)
    assert (root / demo_file_names()[-1]).is_file()
    with pytest.raises(DataError, match="seed 2"):
        ensure_ivif_demo(root, seed=3)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "mine.txt").write_text("user data")
    with pytest.raises(DataError, match="not a demo dataset"):
        ensure_ivif_demo(tmp_path / "foreign")
    assert (tmp_path / "foreign" / "mine.txt").read_text() == "user data"


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    calls = []

    def interrupted(seed, split, index):
        calls.append(index)
        if len(calls) > 20:
            raise KeyboardInterrupt
        return original(seed, split, index)

    original = ivif_demo.render_scene
    monkeypatch.setattr(ivif_demo, "render_scene", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_ivif_demo(tmp_path / "cache")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(ivif_demo, "render_scene", original)
    assert ivif_demo.is_complete(ensure_ivif_demo(tmp_path / "cache"), 0)


def test_command_line(demo, tmp_path, capsys):
    ivif_demo.main(DemoArgs(out=demo, seed=0))
    assert "already complete" in capsys.readouterr().out
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run([sys.executable, "-m", "common.ivif.demo", "--out", str(demo), "--seed", "5"],
                              cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2 and "seed 0" in finished.stderr
