"""compare_training_approaches.py on constructed runs (spec §7.3, §9 check 18)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import compare_training_approaches as compare
from common.lossdump import save_mat
from common.run import exit_on_user_error

ITERS = 7
EPOCHS = 12  # e0..e11: lexicographic order would pick e9, numeric order e11


def make_run(folder, stem, seed, size, losses, metrics=None, conventions="MI in bits", epochs=EPOCHS):
    """A run folder with cumulative dumps e0..e<epochs-1> of `losses`, a run_info.json and optionally eval metrics."""
    for epoch in range(epochs):
        count = (epoch + 1) * ITERS
        save_mat(folder / "loss" / f"{stem}_e{epoch}.mat",
                 {"loss_data": losses[:count], "iters_per_epoch": ITERS, "global_batch": 4})
    info = {"data": {"pairs_sha256": f"hash-{seed}"}, "seed": seed, "size": size, "total_updates": len(losses),
            "global_batch": 4, "loss": {"w_pix": 1.0, "w_gra": 10.0, "w_ssim": 0.0},
            "schedule": {"kind": "cosine", "unit": "epoch", "min_lr": 1e-6}}
    (folder / "run_info.json").write_text(json.dumps(info))
    if metrics is not None:
        (folder / "eval" / "tno").mkdir(parents=True)
        (folder / "eval" / "tno" / "metrics.json").write_text(
            json.dumps({"metrics": list(metrics), "means": metrics, "conventions": conventions}))


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    steps = np.arange(EPOCHS * ITERS)
    two_stage = 5000.0 * np.exp(-steps / 40) + 800 + rng.normal(0, 20, steps.size)
    end_to_end = 6000.0 * np.exp(-steps / 30) + 700 + rng.normal(0, 20, steps.size)
    make_run(tmp_path / "transfuse", "loss_data_trans", 0, [256, 256], two_stage,
             {"Qabf": 0.50, "MSE": 900.0, "VIF": 0.60})
    make_run(tmp_path / "end_to_end", "loss_data_end_to_end", 1, [48, 48], end_to_end,
             {"Qabf": 0.55, "MSE": 950.0, "VIF": 0.70}, conventions="MI in nats")
    return tmp_path, two_stage, end_to_end


def config(tmp_path, **changes):
    base = compare.CompareConfig(two_stage=tmp_path / "transfuse", end_to_end=tmp_path / "end_to_end",
                                 out=tmp_path / "comparison.png", dpi=50)
    return dataclasses.replace(base, **changes)


def test_reads_the_numerically_newest_dump_and_warns_on_every_difference(runs, capsys):
    tmp_path, two_stage, end_to_end = runs
    assert compare.numbered_dumps(tmp_path / "transfuse", "loss_data_trans")[-1][0] == 11
    warnings: list[str] = []
    loaded = compare.load_run("two-stage", tmp_path / "transfuse", warnings)
    assert loaded.source.name == "loss_data_trans_e11.mat" and not warnings
    np.testing.assert_array_equal(loaded.loss, two_stage)
    assert compare.main(config(tmp_path)) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for field in ("seed", "image size", "data (pairs.txt SHA-256)"):
        assert out.count(f"runs differ in {field}:") == 1
    assert "runs differ in fusion updates" not in out and "runs differ in global batch" not in out
    assert out.count("metric conventions differ") == 1
    assert "metrics on tno" in out and "Qabf" in out and "end-to-end" in out
    assert str(len(two_stage)) in out and "stage-1 auto-encoders" in out


def test_update_count_difference_and_non_prefix_dumps_are_reported(runs, capsys):
    tmp_path, _, end_to_end = runs
    info = json.loads((tmp_path / "end_to_end" / "run_info.json").read_text())
    info["total_updates"] = 42
    (tmp_path / "end_to_end" / "run_info.json").write_text(json.dumps(info))
    save_mat(tmp_path / "end_to_end" / "loss" / "loss_data_end_to_end_e3.mat",
             {"loss_data": end_to_end[:4 * ITERS] + 1.0, "iters_per_epoch": ITERS, "global_batch": 4})
    assert compare.main(config(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.count("runs differ in fusion updates") == 1
    assert out.count("is not a prefix of loss_data_end_to_end_e11.mat") == 1


def test_figure_has_four_panels_built_from_the_newest_dump(runs):
    tmp_path, two_stage, end_to_end = runs
    a = compare.load_run("two-stage", tmp_path / "transfuse", [])
    b = compare.load_run("end-to-end", tmp_path / "end_to_end", [])
    figure = compare.plot_comparison(a, b, window=100, last=1000)
    assert len(figure.axes) == 4
    raw, smooth, _, tail = figure.axes
    np.testing.assert_array_equal(raw.lines[0].get_ydata(), two_stage)
    width = len(two_stage) // 10  # window capped at a tenth of the shorter run
    assert len(smooth.lines[0].get_ydata()) == len(two_stage) - width + 1
    np.testing.assert_allclose(smooth.lines[1].get_ydata()[0], end_to_end[:width].mean())
    assert len(tail.lines[0].get_ydata()) == len(two_stage)


def test_metric_table_prefers_lower_mse_and_nabf(runs, capsys):
    tmp_path, _, _ = runs
    a = compare.load_run("two-stage", tmp_path / "transfuse", [])
    b = compare.load_run("end-to-end", tmp_path / "end_to_end", [])
    from rich.console import Console

    console = Console(width=200)
    assert compare.metric_report(console, a, b, lambda message: None)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.count("│") >= 5]
    rows = {line.split("│")[1].strip(): line for line in lines}
    assert rows["MSE"].rstrip("│ ").endswith("two-stage") and rows["Qabf"].rstrip("│ ").endswith("end-to-end")


def test_short_runs_compare_and_the_figure_goes_beside_the_runs(tmp_path, capsys, monkeypatch):
    """Runs of unequal length, one under 100 updates (7 and 140), compare on the same recent window (the last 7),
    and without --out the figure lands beside the run folders, not in the current folder."""
    make_run(tmp_path / "transfuse", "loss_data_trans", 0, [48, 48], np.linspace(900, 600, ITERS), epochs=1)
    make_run(tmp_path / "end_to_end", "loss_data_end_to_end", 0, [48, 48], np.linspace(950, 500, 20 * ITERS),
             epochs=20)
    monkeypatch.chdir(tmp_path / "transfuse")
    code = exit_on_user_error(lambda: compare.main(config(tmp_path, out=None)))
    assert code == 0, capsys.readouterr().err
    assert "mean last 7" in capsys.readouterr().out
    assert len(list(tmp_path.glob("training_comparison_*.png"))) == 1
    assert not list((tmp_path / "transfuse").glob("*.png"))


def test_missing_run_exits_2_with_the_command_that_creates_it(runs, capsys):
    tmp_path, _, _ = runs
    code = exit_on_user_error(lambda: compare.main(config(tmp_path, two_stage=tmp_path / "absent")))
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no two-stage loss dumps") and "--approach two-stage" in err
    assert not (tmp_path / "comparison.png").exists()
