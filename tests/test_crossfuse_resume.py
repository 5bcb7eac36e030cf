"""CrossFuse trainer: exact resume in fresh processes, two-process training, bad input (spec §4.3; §9 checks 9, 11).

Every test runs the trainer as a user would, in fresh processes, on the shortened demo (6 iterations x 2 epochs).
"""

from __future__ import annotations

import json

import pytest
import torch

from common.checkpoint import find_latest, load_checkpoint
from common.run import seed_everything
from crossfuse.model import AutoEncoder
from crossfuse.weights import read_state_dict, save_model_file
from tests.crossfuse_helpers import FUSION_LINE, TINY, demo_root, log_lines, run_trainer, without_time

# Unclipped, as the paper: check 9 is about Adam's first step. The demo clips the total norm at 100, which scales the
# temperature gradient down to ~2e-6, where Adam's eps (1e-8) shifts the first step by 5e-6 (measured).
NO_EVAL = (*TINY, "--eval.root", "None", "--grad-clip", "None")


def outputs(run) -> dict[str, bytes]:
    """Every `.model` and `.mat` file of an end-to-end run folder, by name."""
    files = sorted(run.glob("*.model")) + sorted((run / "loss").glob("*.mat"))
    return {path.name: path.read_bytes() for path in files}


def fusion_lines(stdout: str) -> list[str]:
    return without_time([line for line in stdout.splitlines() if FUSION_LINE.match(line)])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_root(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """An uninterrupted run."""
    save_dir = tmp_path_factory.mktemp("reference") / "models"
    result = run_trainer(save_dir, data, *NO_EVAL)
    return {"save": save_dir, "run": save_dir / "end_to_end", "stdout": result.stdout}


def test_resume_mid_epoch_and_at_epoch_end_is_bitwise_exact(tmp_path, data, reference):
    save_dir = tmp_path / "models"
    first = run_trainer(save_dir, data, *NO_EVAL, "--stop-after", "1")
    assert "stopped after iteration 1" in first.stdout
    assert not (save_dir / "end_to_end" / "end_to_end_fusion_epoch_1.model").exists()
    after_one_step = load_checkpoint(find_latest(save_dir / "end_to_end", "end-to-end"))
    assert after_one_step["meta"]["position"]["step"] == 1
    temperatures = [v for k, v in after_one_step["model"].items() if k.endswith(".attn.temperature")]
    cam_lr = after_one_step["optimizer"]["param_groups"][2]["lr"]
    assert len(temperatures) == 2 and cam_lr == pytest.approx(1e-3)
    for tau in temperatures:  # Adam's first step moves every parameter by its lr (check 9)
        assert abs(abs(tau.item() - 1.0) - cam_lr) < 1e-6
    # Mid-epoch: resumes at iteration 1 inside a log window, checkpoints at 3, runs to the end of epoch 1, stops.
    second = run_trainer(save_dir, data, *NO_EVAL, "--checkpoint-every", "3", "--stop-after", "6")
    assert "resumed from" in second.stdout and "at iteration 1 (epoch 1, batch 1)" in second.stdout
    assert "stopped after iteration 6" in second.stdout
    # At an epoch end: resumes at iteration 6 and finishes.
    third = run_trainer(save_dir, data, *NO_EVAL)
    assert "at iteration 6 (epoch 2, batch 0)" in third.stdout
    resumed_lines = fusion_lines(first.stdout) + fusion_lines(second.stdout) + fusion_lines(third.stdout)
    assert resumed_lines == fusion_lines(reference["stdout"])  # the same window means, printed identically
    assert outputs(save_dir / "end_to_end") == outputs(reference["run"])  # byte-identical .model and .mat files
    assert len(outputs(reference["run"])) == 8


def test_rerun_of_a_finished_run_changes_nothing_and_never_is_refused(data, reference):
    before = outputs(reference["run"])
    again = run_trainer(reference["save"], data, *NO_EVAL)
    assert "end-to-end: complete (2 epochs" in again.stdout and not fusion_lines(again.stdout)
    assert outputs(reference["run"]) == before
    refused = run_trainer(reference["save"], data, *NO_EVAL, "--resume", "never", check=False)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: ") and "--overwrite" in refused.stderr
    assert "Traceback" not in refused.stderr
    changed_model = run_trainer(reference["save"], data, *NO_EVAL, "--no-learnable-temperature", check=False)
    assert changed_model.returncode == 2 and "learnable_temperature" in changed_model.stderr


def test_two_processes_end_with_identical_weights(tmp_path, data):
    save_dir = tmp_path / "models"
    result = run_trainer(save_dir, data, *NO_EVAL, nproc=2)
    run = save_dir / "end_to_end"
    done = json.loads((run / "checkpoints" / "end-to-end" / "DONE.json").read_text())
    fingerprints = done["parameter_sha256_per_rank"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    assert "2 process(es)" in result.stdout and len(log_lines(result.stdout, FUSION_LINE)) == 4  # rank 0 prints
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["global_batch"] == 4
    # DDP with find_unused_parameters must not give the never-used reconstruction decoders a gradient.
    seed_everything(0)
    initial = AutoEncoder().state_dict()
    trained = read_state_dict(run / "end_to_end_ir_encoder_epoch_2.model")
    for key, value in initial.items():
        assert torch.equal(trained[key], value) == key.startswith("recon_decoder1."), key


def test_fusion_stage_without_stage_one_weights_stops_clearly(tmp_path, data):
    result = run_trainer(tmp_path / "models", data, *NO_EVAL, "--approach", "two-stage", "--stage", "fusion",
                         check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("error: the fusion stage needs stage-1 auto-encoder weights")
    assert str(tmp_path / "models" / "autoencoder") in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "models" / "transfuse" / "checkpoints").exists()


def test_weights_of_the_wrong_network_are_refused(tmp_path, data):
    wrong = save_model_file(AutoEncoder(), tmp_path / "auto_encoder_epoch_1_ir.model")
    result = run_trainer(tmp_path / "models", data, *NO_EVAL, "--init.fusion", str(wrong), check=False)
    assert result.returncode == 2
    assert str(wrong) in result.stderr and "holds an auto-encoder network, but a fusion network" in result.stderr
    assert "Traceback" not in result.stderr


def test_unpaired_data_is_refused(tmp_path, data):
    root = tmp_path / "unpaired"
    for folder, name in (("ir", "a.png"), ("vi", "b.png")):
        (root / folder).mkdir(parents=True)
        (root / folder / name).write_bytes((data / "train" / "ir" / "00000.png").read_bytes())
    result = run_trainer(tmp_path / "models", data, *NO_EVAL, "--data.root", str(root), check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("error: zero IR/VIS pairs under") and str(root) in result.stderr
