"""CrossFuse end-to-end trainer: a shortened demo run and its outputs (spec §1, §6, §7; §9 checks 7, 8, 10, 16, 17).

Check 9 (the first step moves each temperature by the cam learning rate) is in test_crossfuse_resume.py, which
stops a run after its first step anyway.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from common.console import RunConsole
from common.images import rgb_to_ycrcb
from common.ivif.data import discover_file_pairs
from common.lossdump import load_mat
from common.run import seed_everything
from crossfuse.config import load_config
from crossfuse.evaluate import evaluate, find_weights, read_test_pair
from crossfuse.model import AutoEncoder, FusionNet
from crossfuse.weights import read_state_dict
from tests.crossfuse_helpers import FUSION_LINE, ITERS_PER_EPOCH, TINY, demo_root, log_lines, run_trainer

FUSION_KEYS = {"loss_data", "pix_loss", "gra_loss", "ssim_loss", "temperature", "lr", "epoch", "deep_weight_absmax",
               "iters_per_epoch", "global_batch"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A shortened demo (no data root: the demo preset) with TensorBoard, fusion and evaluation of the test split."""
    data = demo_root(tmp_path_factory)
    save_dir = tmp_path_factory.mktemp("train") / "models"
    tiny = [arg for arg in TINY if arg != "--no-tensorboard"]
    result = run_trainer(save_dir, data, *tiny)
    return {"data": data, "save": save_dir, "run": save_dir / "end_to_end", "stdout": result.stdout}


def test_demo_announces_itself_and_writes_every_output(demo):
    run, stdout = demo["run"], demo["stdout"]
    assert "No data root configured" in stdout and "demo preset" in stdout
    assert "start from random initialisation" in stdout
    for epoch in (1, 2):
        for part in ("fusion", "ir_encoder", "vi_encoder"):
            assert (run / f"end_to_end_{part}_epoch_{epoch}.model").is_file()
        assert (run / "loss" / f"loss_data_end_to_end_e{epoch - 1}.mat").is_file()
    assert not (run / "loss" / "loss_data_end_to_end_e2.mat").exists()
    for name in ("config.json", "run.json", "console.log"):  # the run folder's records, beside the stage folders
        assert (demo["save"] / name).is_file(), name
    for name in ("run_info.json", "pairs.txt", "demo_report.json",
                 "loss/loss_end-to-end.png", "loss/lr_end-to-end.png", "checkpoints/end-to-end/DONE.json",
                 "eval/ivif_demo_test/metrics.csv", "eval/ivif_demo_test/metrics.json",
                 "eval/ivif_demo_test/metrics_average.csv"):
        assert (run / name).is_file(), name
    # The demo deletes a finished stage's resumable states (260 MB each at the paper size); DONE.json stays.
    assert not list((run / "checkpoints" / "end-to-end").glob("end-to-end_step_*.pth"))
    assert (run / "eval" / "ivif_demo_test" / "samples.png").is_file()
    assert list((run / "tensorboard" / "end-to-end").glob("events.out.tfevents.*"))
    assert len((run / "pairs.txt").read_text().splitlines()) == 24
    info = json.loads((run / "run_info.json").read_text())
    assert info["approach"] == "end-to-end" and info["iters_per_epoch"] == ITERS_PER_EPOCH
    assert info["total_updates"] == 12 and info["size"] == [32, 32] and info["global_batch"] == 4
    assert info["optimizer"]["groups"]["decoder"]["lr_mult"] == 30.0 and info["optimizer"]["weight_decay"] == 0.0
    fused = sorted((demo["save"] / "output" / "ivif_demo_test").glob("results_end_to_end_*.png"))
    assert [path.name for path in fused] == [f"results_end_to_end_{i:03d}.png" for i in range(8)]
    for path in fused:
        source = Image.open(demo["data"] / "test" / "ir" / path.name.replace("results_end_to_end_", ""))
        assert Image.open(path).size == source.size and Image.open(path).mode == "L"


def test_log_lines_are_true_window_means_of_the_mat_series(demo):
    lines = log_lines(demo["stdout"], FUSION_LINE)
    # Windows of 4 counted over the run, plus each epoch's partial last window: 4, 6 | 8, 12.
    ends = [(int(line["epoch"]) - 1) * ITERS_PER_EPOCH + int(line["batch"]) for line in lines]
    assert ends == [4, 6, 8, 12]
    assert all(line["prefix"] == "🔄 E2E" and line["epochs"] == "2" and line["iters"] == "6" for line in lines)
    series = load_mat(demo["run"] / "loss" / "loss_data_end_to_end_e1.mat")
    start = 0
    for line, end in zip(lines, ends):
        for name in ("pix_loss", "gra_loss", "ssim_loss", "loss_data"):
            expected = float(np.mean(series[name][0, start:end]))
            assert float(line[name]) == pytest.approx(expected, rel=1e-5, abs=1e-6), (name, end)
        assert float(line["temp"]) == pytest.approx(series["temperature"][0, end - 1], abs=6e-5)
        assert float(line["lr"]) == pytest.approx(series["lr"][0, end - 1], abs=6e-7)
        start = end
    assert float(lines[1]["lr"]) == pytest.approx(1e-3) and float(lines[2]["lr"]) < 1e-3  # cosine per epoch


def test_mat_dumps_are_cumulative_with_the_spec_keys(demo):
    first = load_mat(demo["run"] / "loss" / "loss_data_end_to_end_e0.mat")
    second = load_mat(demo["run"] / "loss" / "loss_data_end_to_end_e1.mat")
    assert set(first) == set(second) == FUSION_KEYS
    for name in FUSION_KEYS - {"iters_per_epoch", "global_batch"}:
        assert first[name].dtype == np.float64 and first[name].shape == (1, ITERS_PER_EPOCH)
        assert second[name].shape == (1, 2 * ITERS_PER_EPOCH)
        np.testing.assert_array_equal(second[name][0, :ITERS_PER_EPOCH], first[name][0])
    total = second["pix_loss"] + second["gra_loss"] + second["ssim_loss"]
    np.testing.assert_allclose(second["loss_data"], total, rtol=1e-6)
    np.testing.assert_array_equal(second["epoch"][0], np.repeat([1.0, 2.0], ITERS_PER_EPOCH))
    assert second["iters_per_epoch"].item() == ITERS_PER_EPOCH and second["global_batch"].item() == 4
    assert np.all(second["deep_weight_absmax"] > 0)


def never_trained(part: str, key: str) -> bool:
    """Parameters that get no gradient end-to-end (spec §2.2, §4.1): reconstruction decoders, conv_gra, the cross
    blocks' qkv, the self-attention modules' final norms, the frozen skip-weight filters, and the demo preset's
    frozen output BatchNorm scale and shift (`--model.freeze-output-norm`)."""
    if part != "fusion":
        return key.startswith("recon_decoder1.")
    return (key.startswith(("conv_gra.", "decoder_fusion.weight."))
            or key in ("decoder_fusion.conv_last.conv2d.1.weight", "decoder_fusion.conv_last.conv2d.1.bias")
            or (key.startswith("cross_atten_block.cross_atten_block.") and ".attn.qkv." in key)
            or (key.startswith("cross_atten_block.self_atten_block") and ".norm." in key and ".blocks." not in key))


def test_parameters_without_gradients_are_bitwise_unchanged(demo):
    seed_everything(0)  # the trainer builds IR encoder, VIS encoder, then the fusion net right after seeding
    initial = {"ir_encoder": AutoEncoder().state_dict(), "vi_encoder": AutoEncoder().state_dict(),
               "fusion": FusionNet(learnable_temperature=True).state_dict()}
    unchanged, changed = 0, 0
    for part, reference in initial.items():
        trained = read_state_dict(demo["run"] / f"end_to_end_{part}_epoch_2.model")
        assert set(trained) == set(reference)
        for key, value in reference.items():
            if never_trained(part, key):
                assert torch.equal(trained[key], value), f"{part}.{key} changed without a gradient"
                unchanged += 1
            elif key.endswith((".weight", ".bias")) and not torch.equal(trained[key], value):
                changed += 1
    # recon decoders, conv_gra, Weight filters, cross qkv, SA norms, output norm scale and shift
    assert unchanged == 2 * 8 + 1 + 2 + 4 + 8 + 2
    assert changed > 100  # the trained parameters did move


def test_demo_report_and_metrics_files_agree(demo):
    report = json.loads((demo["run"] / "demo_report.json").read_text())
    assert set(report["checks"]) == {"qabf", "texture_std_ratio", "texture_corr", "target_contrast"}
    assert report["passed"] == all(check["passed"] for check in report["checks"].values())
    assert report["checks"]["texture_std_ratio"]["average"] == pytest.approx(0.5, abs=0.1)  # spec: averaging ~0.5
    rows = (demo["run"] / "eval" / "ivif_demo_test" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 8 + 1 and rows[-1].startswith("mean,") and "MS_SSIM" not in rows[0]
    summary = json.loads((demo["run"] / "eval" / "ivif_demo_test" / "metrics.json").read_text())
    header = rows[0].split(",")
    for name, value in zip(header[1:], rows[-1].split(",")[1:]):
        assert float(value) == pytest.approx(summary["means"][name], rel=1e-9)
    assert set(summary["beats_average"]) == {"Qabf", "SSIM", "VIF", "at_least_2_of_3"}
    assert summary["weights"]["fusion"]["path"].endswith("end_to_end_fusion_epoch_2.model")


def test_colour_visible_images_keep_their_chroma(demo, tmp_path):
    rng = np.random.default_rng(3)
    for folder in ("ir", "vi"):
        (tmp_path / "colour" / folder).mkdir(parents=True)
    for index in range(2):
        ir = rng.integers(30, 220, (48, 56)).astype(np.uint8)
        vi = rng.integers(40, 200, (48, 56, 3)).astype(np.uint8)
        vi[:6, :6] = (255, 0, 0)
        Image.fromarray(ir).save(tmp_path / "colour" / "ir" / f"p{index}.png")
        Image.fromarray(vi).save(tmp_path / "colour" / "vi" / f"p{index}.png")
    _, luma, rgb = read_test_pair(discover_file_pairs(tmp_path / "colour")[0])
    assert luma[0, 0] == 76 and rgb is not None  # BT.601 on RGB order: pure red -> 76, not 29
    weights = {}
    for part in ("ir_encoder", "vi_encoder", "fusion"):
        weights[part] = tmp_path / f"end_to_end_{part}_epoch_2.model"
        shutil.copyfile(demo["run"] / weights[part].name, weights[part])
    cfg, _ = load_config(["--mode", "evaluate", "--eval.root", str(tmp_path / "colour"), "--eval.ae-ir",
                          str(weights["ir_encoder"]), "--eval.ae-vi", str(weights["vi_encoder"]), "--eval.fusion",
                          str(weights["fusion"]), "--eval.out", str(tmp_path / "out"), "--eval.baseline", "average",
                          "--eval.metrics", "Qabf", "SSIM", "VIF"])
    result = evaluate(cfg, find_weights(cfg), "cpu", RunConsole(interactive=False))
    assert result["fused"]["n_images"] == 2
    for index in range(2):
        colour = np.asarray(Image.open(tmp_path / "out" / "colour" / f"results_end_to_end_p{index}.png"))
        gray = np.asarray(Image.open(tmp_path / "out" / "colour" / "gray" / f"results_end_to_end_p{index}.png"))
        source = rgb_to_ycrcb(np.asarray(Image.open(tmp_path / "colour" / "vi" / f"p{index}.png")))
        ycrcb = rgb_to_ycrcb(colour)
        inside = (colour.max(axis=2) < 255) & (colour.min(axis=2) > 0)  # channels not clipped
        assert inside.mean() > 0.5
        assert np.abs(ycrcb[..., 0] - gray)[inside].max() <= 1.0
        assert np.abs(ycrcb[..., 1:] - source[..., 1:])[inside].max() <= 1.0
    assert math.isfinite(result["average"]["means"]["Qabf"])
    assert (tmp_path / "eval" / "colour" / "metrics_average.csv").is_file()
