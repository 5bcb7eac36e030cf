"""train_mae_fusion.py in fresh processes: exact resume of a chained run interrupted inside its last stage (spec
§4.5; §9 check 13), and two processes that end every stage with identical weights, also after a mode switch that
opens more parameters (spec §4.5).

The runs use `tiny` at 32 px (16 tokens: the same code paths, a fraction of the time) on 8 demo pairs at batch 4:
two iterations per epoch; stage 2 has two epochs. The uninterrupted reference runs in this process with one torch
thread, as the fresh processes do.
"""

from __future__ import annotations

import json

import pytest
import torch

from common.checkpoint import load_checkpoint
from maefuse.model import build_model, resolve_size
from tests.maefuse_helpers import SMALL_RUN, demo_data, run_trainer, train_here

CHAIN = ("--modes", "train_decoder_only:1", "train_MFM_mean_CFM_open:1", "train_decoder_CFM_MFM:2")
STAGES = ("stage0_train_decoder_only", "stage1_train_MFM_mean_CFM_open", "stage2_train_decoder_CFM_MFM")
FINAL = {STAGES[0]: "checkpoint-0.pth", STAGES[1]: "checkpoint0.pth", STAGES[2]: "checkpoint1.pth"}


def arguments(data, out) -> list[str]:
    return ["--data_path", str(data / "train"), "--model_size", "tiny", "--img_size", "32", *SMALL_RUN, *CHAIN,
            "--output_dir", str(out), "--no_tensorboard", "--val_every", "0"]


def loss_dumps(out) -> dict[str, bytes]:
    """Every stage's cumulative per-iteration loss dumps (byte-deterministic files), by path."""
    return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.glob("stage*/loss/*.mat"))}


def final_weights(out) -> dict[str, dict[str, torch.Tensor]]:
    return {stage: torch.load(out / stage / name, weights_only=True)["model"] for stage, name in FINAL.items()}


def equal_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_data(tmp_path_factory)


def test_interrupted_chain_resumes_exactly(data, tmp_path):
    """Stopped inside stage 2's second epoch and rerun with the same command in a fresh process: the per-step losses
    and the final weights of every stage equal an uninterrupted run's (CPU, fp32, one thread each)."""
    reference = tmp_path / "reference"
    assert train_here(*arguments(data, reference))[0] == 0
    out = tmp_path / "interrupted"
    first = run_trainer(*arguments(data, out), "--stop_after", "3")
    assert "stage 3/3 train_decoder_CFM_MFM: stopped after iteration 3" in first.stdout
    assert not (out / STAGES[2] / "checkpoints" / "DONE.json").exists()
    second = run_trainer(*arguments(data, out))
    assert "stage 1/3 train_decoder_only: complete (1 epochs" in second.stdout
    assert "at iteration 3 (epoch 2, batch 1)" in second.stdout and "finished 4 iterations" in second.stdout
    assert loss_dumps(out) == loss_dumps(reference) and len(loss_dumps(reference)) == 4
    resumed, straight = final_weights(out), final_weights(reference)
    assert all(equal_weights(resumed[stage], straight[stage]) for stage in STAGES)
    final_state = load_checkpoint(out / STAGES[2] / "checkpoints" / "maefuse_step_000004.pth")
    assert {int(entry["step"]) for entry in final_state["optimizer"]["state"].values()} == {4}
    assert set(final_state["trainable"]) == {key for key in straight[STAGES[2]]
                                             if key.startswith(("model1.decoder_", "model2."))
                                             and not key.endswith("pos_embed")}


def test_two_processes_end_every_stage_with_identical_weights(data, tmp_path):
    """Two gloo processes, each with half of every batch: both stages end with equal parameter fingerprints, also
    stage 2, which opens CFM and MFM (frozen in stage 1): a fresh DDP wrapper per stage registers them."""
    out = tmp_path / "ddp"
    args = arguments(data, out)
    args[args.index("--modes") + 1:args.index("--modes") + 4] = ["train_decoder_only:1", "train_decoder_CFM_MFM:1"]
    result = run_trainer(*args, nproc=2, timeout=400)
    assert "batch 4 global / 2 per device x 2" in result.stdout
    stages = ("stage0_train_decoder_only", "stage1_train_decoder_CFM_MFM")
    for stage in stages:
        done = json.loads((out / stage / "checkpoints" / "DONE.json").read_text())
        fingerprints = done["parameter_sha256_per_rank"]
        assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1], stage
    opened = torch.load(out / stages[1] / "fusion0.pth", weights_only=True)["model"]
    torch.manual_seed(0)  # the stage's fusion layer starts from the seed-0 initialisation
    initial = build_model(resolve_size("tiny", img_size=32)).model2.state_dict()
    moved = [key for key in initial if key != "pos_embed" and not torch.equal(initial[key], opened[key])]
    assert len(moved) == len(initial) - 1
