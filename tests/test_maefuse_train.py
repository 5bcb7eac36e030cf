"""train_mae_fusion.py in this process: a tiny chained run and its files (spec §4.3, §6; §9 checks 12, 13), the
guards, and bad input (one `error:` line, exit 2, nothing written).

The runs call `cli([...])` directly, so each costs seconds; the resume and two-process runs, which need fresh
processes, are in test_maefuse_train_resume.py.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from common.checkpoint import load_checkpoint
from common.lossdump import load_mat
from maefuse.model import build_model
from maefuse.weights import detect_kind, save_epoch_weights
from tests.maefuse_helpers import SMALL_RUN, demo_data, random_image, train_here, write_image

CHAIN = ("--modes", "train_decoder_only:1", "train_MFM_mean_CFM_open:1", "train_decoder_CFM_MFM:1")
STAGES = ("stage0_train_decoder_only", "stage1_train_MFM_mean_CFM_open", "stage2_train_decoder_CFM_MFM")


def snapshot(folder) -> dict[str, int]:
    """Every file under `folder` with its modification time."""
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in sorted(folder.rglob("*"))
            if path.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_data(tmp_path_factory)


@pytest.fixture(scope="module")
def chained(data, tmp_path_factory):
    """Check 12's chained run on `tiny` (one epoch per stage, 8 demo pairs, no initial weights)."""
    out = tmp_path_factory.mktemp("chained") / "run"
    code, stdout, stderr = train_here("--data_path", str(data / "train"), "--model_size", "tiny", *SMALL_RUN, *CHAIN,
                                      "--output_dir", str(out))
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    return {"out": out, "stdout": stdout, "data": data}


def test_chained_stages_write_their_files_and_reload_the_previous_one(chained):
    """Check 12: each stage's §6 files, stage k's load report names stage k-1's final file, and every file loads
    with weights_only=True as the kind it claims."""
    out = chained["out"]
    expected = {STAGES[0]: {"checkpoint-0.pth": "resume"},
                STAGES[1]: {"checkpoint0.pth": "all_weight", "fusion0.pth": "fusion_weight"},
                STAGES[2]: {"checkpoint0.pth": "all_weight", "fusion0.pth": "fusion_weight"}}
    for stage, files in expected.items():
        exported = {path.name for path in (out / stage).glob("*.pth")}
        assert exported == set(files), stage
        for name, kind in files.items():
            content = torch.load(out / stage / name, weights_only=True)
            assert detect_kind(content["model"]) == kind and content["meta"]["kind"] == kind
            assert content["meta"]["epoch"] == 0 and content["meta"]["model_size"] == "tiny"
            assert all(value.dtype == torch.float32 for value in content["model"].values())
    lines = chained["stdout"].splitlines()
    assert f"loaded resume {out / STAGES[0] / 'checkpoint-0.pth'}: 84 tensors, missing 0, unexpected 0, dropped []" \
        in lines
    assert f"loaded all_weight {out / STAGES[1] / 'checkpoint0.pth'}: 99 tensors, missing 0, unexpected 0, " \
           "dropped []" in lines
    for stage in STAGES:
        done = json.loads((out / stage / "checkpoints" / "DONE.json").read_text())
        assert done["epochs"] == 1 and done["iterations"] == 2


def test_stages_train_exactly_their_modules(chained):
    """Stage 1 (mean alignment) leaves the decoder of stage 0 untouched; stage 2 moves decoder, CFM and MFM."""
    out = chained["out"]
    decoder_only = torch.load(out / STAGES[0] / "checkpoint-0.pth", weights_only=True)["model"]
    mean = torch.load(out / STAGES[1] / "checkpoint0.pth", weights_only=True)["model"]
    fusion = torch.load(out / STAGES[2] / "checkpoint0.pth", weights_only=True)["model"]
    for key, value in decoder_only.items():
        assert torch.equal(mean[f"model1.{key}"], value), key
    moved = {key.split(".")[1] for key in fusion if not torch.equal(fusion[key], mean[key])}
    assert moved == {"decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred", "cross_model",
                     "merge_model", "fc1", "fc2", "ln"}


def test_console_records_and_loss_dumps(chained):
    """The §1 console lines, the random-initialisation warning (check 13), loss dumps, plots, samples, TensorBoard,
    the reconstruction MSE and the closing summary."""
    stdout, out = chained["stdout"], chained["out"]
    assert "WARNING: the MAE encoder is randomly initialised" in stdout
    pattern = re.compile(r"^stage 3/3 train_decoder_CFM_MFM \| epoch 1/1 \| iter (\d)/2 \| loss (\S+) loss_grad (\S+) "
                         r"loss_lap (\S+) \| lr 1\.000e-04 \| \S+ img/s$")
    values = [pattern.match(line) for line in stdout.splitlines() if pattern.match(line)]
    assert [match.group(1) for match in values] == ["1", "2"]
    series = load_mat(out / STAGES[2] / "loss" / "loss_e0.mat")
    assert set(series) == {"loss", "loss_grad", "loss_lap", "lr"} and series["loss"].shape == (1, 2)
    for match, loss, grad, lap in zip(values, series["loss"][0], series["loss_grad"][0], series["loss_lap"][0]):
        assert float(match.group(2)) == pytest.approx(loss, abs=1e-4)
        assert loss == pytest.approx(grad + 2 * lap, rel=1e-5)
    assert set(load_mat(out / STAGES[1] / "loss" / "loss_e0.mat")) == {"loss", "loss_mean", "lr"}
    assert set(load_mat(out / STAGES[0] / "loss" / "loss_e0.mat")) == {"loss", "loss_rec", "lr"}
    for stage in STAGES:
        for name in ("loss/loss.png", "loss/lr.png", "samples/epoch0/grid.png"):
            assert (out / stage / name).is_file(), (stage, name)
        assert list((out / stage / "tensorboard").rglob("events.out.tfevents.*")), stage
    record = json.loads((out / STAGES[0] / "checkpoints" / "DONE.json").read_text())["reconstruction_mse"]
    assert record["after"] < record["before"]
    for name in ("config.json", "run.json", "console.log"):
        assert (out / name).is_file()
    assert f"python train_mae_fusion.py fuse --ckpt {out / STAGES[2] / 'checkpoint0.pth'}" in stdout


def test_rerun_of_a_finished_chain_changes_nothing(chained):
    before = snapshot(chained["out"])
    code, stdout, _ = train_here("--data_path", str(chained["data"] / "train"), "--model_size", "tiny", *SMALL_RUN,
                            *CHAIN, "--output_dir", str(chained["out"]))
    assert code == 0
    assert [line for line in stdout.splitlines() if "complete (1 epochs" in line and line.endswith("skipping")] \
        and stdout.count("skipping") == 3
    assert snapshot(chained["out"]) == before


def test_fuse_and_evaluate_commands(chained, tmp_path):
    """`fuse` with the chain's final file writes images at the source sizes; `evaluate` scores them."""
    final = chained["out"] / STAGES[2] / "checkpoint0.pth"
    test = chained["data"] / "test"
    assert train_here("fuse", "--ckpt", str(final), "--data_path", str(test), "--out_dir", str(tmp_path / "f"),
                 "--device", "cpu")[0] == 0
    assert len(list((tmp_path / "f").glob("*.png"))) == 8
    code, stdout, _ = train_here("evaluate", "--fused_dir", str(tmp_path / "f"), "--data_path", str(test),
                            "--metrics", "Qabf", "SSIM")
    assert code == 0 and '"n_images": 8' in stdout
    assert json.loads((tmp_path / "f" / "summary.json").read_text())["baselines"]["average"]["Qabf"] > 0


# ------------------------------------------------------------------------------------------------ bad input

@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """One file of each kind, a truncated one, and the official MAE layout (encoder only), for `tiny`."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = build_model("tiny")
    files = {"resume": save_epoch_weights(folder, model, training_mode="train_decoder_only", epoch=0, preset="demo")[0]}
    files["all_weight"], files["fusion_weight"] = save_epoch_weights(folder, model, training_mode="train_CFM_mean",
                                                                     epoch=0, preset="demo")
    truncated = folder / "truncated.pth"
    truncated.write_bytes(files["all_weight"].read_bytes()[:4000])
    files["truncated"] = truncated
    return files


def bad_data_folders(root):
    """Data folders that must be refused, by name."""
    rng = np.random.default_rng(0)
    folders = {"missing": root / "missing"}
    empty = root / "empty"
    (empty / "ir").mkdir(parents=True)
    (empty / "vi").mkdir(parents=True)
    folders["empty"] = empty
    for name, ir_stem in (("unpaired", "b"), ("unreadable", "a")):
        write_image(root / name / "vi" / "a.png", random_image(rng, 40, 40))
        write_image(root / name / "ir" / f"{ir_stem}.png", random_image(rng, 40, 40))
        folders[name] = root / name
    (root / "unreadable" / "ir" / "a.png").write_bytes(b"not a png at all")
    return folders


def expect_refusal(out, *args: str) -> str:
    """Run with `args`; assert exit code 2, one `error:` line and an untouched output folder; return the line."""
    before = snapshot(out) if out.exists() else None
    code, _, stderr = train_here(*args, "--output_dir", str(out))
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert (snapshot(out) if out.exists() else None) == before
    return lines[0]


def test_bad_data_is_refused_with_one_line(chained, tmp_path):
    folders = bad_data_folders(tmp_path)
    base = ("--model_size", "tiny", "--training_mode", "train_decoder_only", *SMALL_RUN)
    expected = {"missing": "missing", "empty": "empty", "unpaired": "zero IR/VIS pairs", "unreadable": "a.png"}
    for name, folder in folders.items():
        line = expect_refusal(chained["out"], "--data_path", str(folder), *base)
        assert expected[name] in line, line
    # a wrong path is named before any question about weights (the default mode needs a decoder)
    line = expect_refusal(chained["out"], "--data_path", str(folders["missing"]), "--model_size", "tiny", *SMALL_RUN)
    assert "data folder not found" in line and "--data_path" in line, line


def test_wrong_truncated_and_missing_weights_are_refused(chained, weight_files):
    data = str(chained["data"] / "train")
    base = ("--data_path", data, "--model_size", "tiny", "--training_mode", "train_MFM_mean_CFM_open", *SMALL_RUN)
    cases = [("--resume", weight_files["fusion_weight"], "--resume needs resume or mae_official or all_weight "
              "weights, but the file holds fusion_weight"),
             ("--fusion_weight", weight_files["resume"], "--fusion_weight needs fusion_weight or all_weight weights, "
              "but the file holds resume"),
             ("--all_weight", weight_files["fusion_weight"], "--all_weight needs all_weight weights, but the file "
              "holds fusion_weight"),
             ("--all_weight", weight_files["truncated"], "truncated or corrupt")]
    for flag, path, message in cases:
        line = expect_refusal(chained["out"], *base, flag, str(path))
        assert str(path) in line and message in line, line


def test_guards_refuse_before_anything_is_written(chained):
    """Check 13: a fusion mode without a loaded decoder (the train_decoder_only hint), and fp16."""
    data = str(chained["data"] / "train")
    line = expect_refusal(chained["out"], "--data_path", data, "--model_size", "tiny", *SMALL_RUN)
    assert "train_decoder_CFM_MFM trains through the decoder" in line and "train_decoder_only" in line
    line = expect_refusal(chained["out"], "--data_path", data, "--model_size", "tiny", "--training_mode",
                          "train_decoder_only", "--mixed_precision", "fp16")
    assert "fp16 is refused" in line
    line = expect_refusal(chained["out"], "--data_path", data, "--modes", "train_decoder_only:x")
    assert "EPOCHS must be an integer" in line


def test_resume_state_auto_continues_at_epoch_two(data, tmp_path):
    """Check 13: a 2-epoch run stopped after its first epoch continues at epoch 2 with the saved optimizer state,
    and ends with the weights of an uninterrupted run."""
    base = ("--data_path", str(data / "train"), "--model_size", "tiny", "--img_size", "32", *SMALL_RUN,
            "--training_mode", "train_decoder_only", "--epochs", "2", "--no_tensorboard", "--val_every", "0")
    assert train_here(*base, "--output_dir", str(tmp_path / "straight"))[0] == 0
    code, stdout, _ = train_here(*base, "--output_dir", str(tmp_path / "run"), "--stop_after", "2")
    assert code == 0 and "stopped after iteration 2" in stdout
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "maefuse_step_000002.pth")
    code, stdout, _ = train_here(*base, "--output_dir", str(tmp_path / "run"))
    assert code == 0 and "resumed from" in stdout and "at iteration 2 (epoch 2, batch 0)" in stdout
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "maefuse_step_000004.pth")
    assert {int(entry["step"]) for entry in saved["optimizer"]["state"].values()} == {2}
    assert {int(entry["step"]) for entry in final["optimizer"]["state"].values()} == {4}
    resumed = torch.load(tmp_path / "run" / "checkpoint-1.pth", weights_only=True)["model"]
    straight = torch.load(tmp_path / "straight" / "checkpoint-1.pth", weights_only=True)["model"]
    assert all(torch.equal(resumed[key], straight[key]) for key in straight)


def test_bare_run_announces_and_runs_the_demo(data, tmp_path):
    """No --data_path: the demo preset (shortened here) on the demo data, then fuse + evaluate of its held-out pairs
    into demo_report.json with every check, including the reconstruction ratio of the decoder pretraining."""
    out = tmp_path / "demo"
    code, stdout, stderr = train_here("--demo_root", str(data), "--output_dir", str(out), "--max_pairs", "4",
                                      "--img_size", "32", "--no_tensorboard", "--modes", "train_decoder_only:1",
                                      "train_MFM_mean_CFM_open:1", "train_decoder_CFM_MFM:1")
    assert code == 0, stderr
    assert stdout.startswith("No --data_path given: running the demo preset") and "first 4 pairs, batch 4" in stdout
    report = json.loads((out / "demo_report.json").read_text())
    assert set(report["checks"]) == {"qabf", "texture_std_ratio", "texture_corr", "target_contrast", "fused_images",
                                     "reconstruction"}
    assert report["passed"] == all(check["passed"] for check in report["checks"].values())
    assert report["checks"]["fused_images"]["count"] == 8 and report["checks"]["fused_images"]["source_sizes"]
    for name in ("eval/fusion_grid.png", "eval/metrics.csv", "eval/summary.json", "eval/fused/000.png"):
        assert (out / name).is_file(), name
    assert f"demo {'PASSED' if report['passed'] else 'FAILED'}: {out / 'demo_report.json'}" in stdout
