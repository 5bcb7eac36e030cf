"""CrossFuse two-stage training in one command, skipping completed stages, and the fusion stage alone
(spec §1, §4.1, §9 checks 10 and 12)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from common.checkpoint import find_latest, load_checkpoint
from common.lossdump import load_mat
from crossfuse.weights import read_state_dict
from tests.crossfuse_helpers import AE_LINE, FUSION_LINE, TINY, demo_root, log_lines, mtimes, run_trainer

# Stage 1 on 16 pairs (4 iterations per epoch, 2 demo epochs per auto-encoder), then the shortened fusion stage
# and the evaluation of the demo test split.
TWO_STAGE = (*TINY, "--approach", "two-stage", "--ae.train-num", "16", "--no-prune-finished")  # keep final states


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    data = demo_root(tmp_path_factory)
    save_dir = tmp_path_factory.mktemp("two_stage") / "models"
    result = run_trainer(save_dir, data, *TWO_STAGE)
    return {"data": data, "save": save_dir, "stdout": result.stdout}


def test_one_command_trains_both_auto_encoders_then_the_fusion_stage(two_stage):
    save = two_stage["save"]
    for modality in ("ir", "vi"):
        for epoch in (1, 2):
            assert (save / "autoencoder" / f"auto_encoder_epoch_{epoch}_{modality}.model").is_file()
            dump = load_mat(save / "autoencoder" / "loss" / f"loss_data_auto_{modality}_e{epoch - 1}.mat")
            assert set(dump) == {"loss_data", "recon_loss", "ssim_loss", "lr", "epoch", "iters_per_epoch",
                                 "global_batch"}
            assert dump["loss_data"].shape == (1, 4 * epoch)
    for epoch in (1, 2):
        assert (save / "transfuse" / f"fusetrans_epoch_{epoch}.model").is_file()
        dump = load_mat(save / "transfuse" / "loss" / f"loss_data_trans_e{epoch - 1}.mat")
        assert dump["loss_data"].shape == (1, 6 * epoch)
    for kind, folder in (("autoencoder-ir", "autoencoder"), ("autoencoder-vi", "autoencoder"), ("fusion", "transfuse")):
        assert (save / folder / "checkpoints" / kind / "DONE.json").is_file()
    ae_lines = log_lines(two_stage["stdout"], AE_LINE)
    assert [line["modality"] for line in ae_lines] == ["ir"] * 2 + ["vi"] * 2  # one window of 4 per epoch
    fusion_lines = log_lines(two_stage["stdout"], FUSION_LINE)
    assert len(fusion_lines) == 4 and {line["prefix"] for line in fusion_lines} == {"FUSION"}
    info = json.loads((save / "transfuse" / "run_info.json").read_text())
    assert info["encoders"]["ir"]["path"].endswith("auto_encoder_epoch_2_ir.model")
    assert info["stage1"]["ir"]["updates"] == 8 and info["stage1"]["vi"]["epochs"] == 2
    assert (save / "transfuse" / "eval" / "ivif_demo_test" / "metrics.json").is_file()
    assert len(list((save / "output" / "ivif_demo_test").glob("results_transfuse_*.png"))) == 8


def test_fusion_stage_leaves_the_encoders_untouched(two_stage):
    checkpoint = load_checkpoint(find_latest(two_stage["save"] / "transfuse", "fusion"))
    assert checkpoint["meta"]["position"]["step"] == 12
    for modality in ("ir", "vi"):
        stage_one = read_state_dict(two_stage["save"] / "autoencoder" / f"auto_encoder_epoch_2_{modality}.model")
        for key, value in stage_one.items():
            assert torch.equal(checkpoint["model"][f"{modality}_encoder.{key}"], value), key


def test_rerun_reports_every_stage_complete_and_writes_nothing(two_stage):
    before = mtimes(two_stage["save"])
    result = run_trainer(two_stage["save"], two_stage["data"], *TWO_STAGE)
    for kind in ("autoencoder-ir", "autoencoder-vi", "fusion"):
        assert f"{kind}: complete" in result.stdout
    assert "evaluation of fusetrans_epoch_2.model" in result.stdout and "up to date" in result.stdout
    assert mtimes(two_stage["save"]) == before


def test_fusion_stage_alone_reuses_the_stage_one_files(two_stage, tmp_path):
    save = tmp_path / "models"
    shutil.copytree(two_stage["save"] / "autoencoder", save / "autoencoder")
    result = run_trainer(save, two_stage["data"], *TWO_STAGE, "--stage", "fusion", "--eval.root", "None")
    assert f"loaded autoencoder weights from {save / 'autoencoder' / 'auto_encoder_epoch_2_ir.model'}" in result.stdout
    assert "autoencoder-ir" not in result.stdout  # stage 1 neither ran nor was checked
    # Each stage is seeded on its own, so the fusion stage alone reproduces the one of the full command bitwise.
    for epoch in (1, 2):
        name = f"fusetrans_epoch_{epoch}.model"
        assert (save / "transfuse" / name).read_bytes() == (two_stage["save"] / "transfuse" / name).read_bytes()
