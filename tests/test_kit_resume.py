"""Exact resume, preemption, two-process training and the DDP-correct stage switch (toy trainer, fresh processes)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.kit_helpers import ROOT, TOY, assert_state_equal, env, final, losses, mat_bytes, run_toy

COMMON = ("--epochs", "3", "--unfreeze-step", "3")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted runs, without and with gradient accumulation."""
    runs = {}
    for accumulation in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"straight{accumulation}")
        run_toy(run_dir, *COMMON, "--accumulation", str(accumulation))
        runs[accumulation] = run_dir
    return runs


@pytest.mark.parametrize(
    "accumulation, stop_after",
    [(1, 5), (1, 8), (2, 5)],
    ids=["mid-epoch", "epoch-boundary", "inside-accumulation-window"],
)
def test_resume_is_exact(tmp_path, straight, accumulation, stop_after):
    run_dir = tmp_path / "interrupted"
    run_toy(run_dir, *COMMON, "--accumulation", str(accumulation), "--stop-after", str(stop_after))
    assert not (run_dir / "losses.json").exists()
    resumed = run_toy(run_dir, *COMMON, "--accumulation", str(accumulation), "--resume", "auto")
    assert f"at micro-step {stop_after}" in resumed.stdout
    reference = straight[accumulation]
    assert losses(run_dir) == losses(reference)  # equal Python floats, step by step
    assert len(losses(run_dir)) == 24 // accumulation
    assert_state_equal(final(run_dir), final(reference))
    assert mat_bytes(run_dir) == mat_bytes(reference)
    assert len(mat_bytes(run_dir)) == 3


def test_sigterm_checkpoints_and_resume_matches(tmp_path, straight):
    run_dir = tmp_path / "preempted"
    command = [sys.executable, str(TOY), "--run-dir", str(run_dir), *COMMON, "--step-sleep", "0.2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    deadline = time.time() + 120
    while not (run_dir / "run.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stdout + stderr
    assert "preempted (SIGTERM)" in stdout
    assert not (run_dir / "losses.json").exists()
    run_toy(run_dir, *COMMON, "--resume", "auto")
    assert losses(run_dir) == losses(straight[1])
    assert_state_equal(final(run_dir), final(straight[1]))


def _parameters_equal_across_ranks(run_dir) -> dict[str, bool]:
    rank0, rank1 = final(run_dir, 0)["model"], final(run_dir, 1)["model"]
    # BatchNorm running statistics are per process (no SyncBatchNorm); parameters must agree.
    return {k: torch.equal(rank0[k], rank1[k]) for k in rank0 if "running" not in k and "num_batches" not in k}


@pytest.fixture(scope="module")
def two_process_straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp_straight")
    run_toy(run_dir, "--epochs", "2", "--unfreeze-step", "3", nproc=2)
    return run_dir


def test_two_processes_identical_weights_after_unfreeze(two_process_straight):
    equal = _parameters_equal_across_ranks(two_process_straight)
    assert all(equal.values()), equal
    assert len(losses(two_process_straight)) == 16
    # The backbone trained after the switch: it differs from its (seeded) initial weights.
    from accelerate.utils import set_seed

    from tests.toy_trainer import ToyNet

    set_seed(0)
    initial = ToyNet().state_dict()
    trained = final(two_process_straight, 0)["model"]
    assert not torch.equal(initial["backbone.0.weight"], trained["backbone.0.weight"])


def test_negative_control_without_rewrap_diverges(tmp_path):
    run_dir = tmp_path / "no_rewrap"
    run_toy(run_dir, "--epochs", "2", "--unfreeze-step", "3", "--no-rewrap", nproc=2)
    equal = _parameters_equal_across_ranks(run_dir)
    assert not equal["backbone.0.weight"], "the backbone should diverge when the DDP wrapper is not rebuilt"


def test_two_process_resume_is_exact(tmp_path, two_process_straight):
    run_dir = tmp_path / "ddp_resume"
    run_toy(run_dir, "--epochs", "2", "--unfreeze-step", "3", "--stop-after", "5", nproc=2)
    run_toy(run_dir, "--epochs", "2", "--unfreeze-step", "3", "--resume", "auto", nproc=2)
    assert losses(run_dir) == losses(two_process_straight)
    assert_state_equal(final(run_dir, 0), final(two_process_straight, 0))
    # Other ranks: the same weights, buffers and optimizer state. Their EMA of BatchNorm statistics is a
    # rank-local by-product (only rank 0's EMA is saved and used), so its buffers are not compared.
    resumed, straight = final(run_dir, 1), final(two_process_straight, 1)
    assert_state_equal(resumed["model"], straight["model"], "rank1.model")
    assert_state_equal(resumed["optimizer"], straight["optimizer"], "rank1.optimizer")
    for key, value in resumed["ema"].items():
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(value, straight["ema"][key]), f"rank1.ema.{key}"
    assert mat_bytes(run_dir) == mat_bytes(two_process_straight)


def test_world_size_change_refused_unless_allowed(tmp_path, two_process_straight):
    run_dir = tmp_path / "ddp_then_single"
    run_toy(run_dir, "--epochs", "2", "--unfreeze-step", "3", "--stop-after", "5", nproc=2)
    before = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").glob("*.pth")}
    refused = run_toy(run_dir, "--epochs", "2", "--unfreeze-step", "3", "--resume", "auto", check=False)
    assert refused.returncode == 2
    assert "world_size: checkpoint 2, this run 1" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints").glob("*.pth")} == before
    allowed = run_toy(run_dir, "--epochs", "2", "--unfreeze-step", "3", "--resume", "auto", "--allow", "world_size")
    assert "resumed from" in allowed.stdout
