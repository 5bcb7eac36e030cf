"""train_colorize.py on two processes (torchrun, gloo on the CPU; one clip per process and micro-batch, two
micro-batches accumulated per step): both ranks end with identical weights, and the frozen modules stay
bit-identical to their seeded initialisation while the trained ones change (spec/colorize.md §4; DESIGN.md
two-process test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from colorize.config import FlowConfig
from colorize.system import FusionSystem
from common.lossdump import load_mat
from common.run import seed_everything
from tests.colorize_helpers import DEMO_EXEMPLAR, DEMO_FUSION, DEMO_SIZE, no_network, write_tiny_davis  # noqa: F401
from tests.kit_helpers import ROOT, env

pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("colorize_ddp")
    data = write_tiny_davis(base / "tiny")
    out = base / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29600 + os.getpid() % 100), str(ROOT / "train_colorize.py"), "--preset", "demo", "--data.dataset",
               str(data), "--data.imagenet", str(data / "references"), "--train.output-dir", str(out),
               "--train.batch-size", "2", "--optim.accumulation-steps", "2", "--train.epochs", "1",
               "--train.time-budget-s", "0", "--train.log-every", "1", "--train.no-tensorboard"]
    result = subprocess.run(command, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=400)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return out, result


def test_ranks_end_identical_and_frozen_modules_untouched(two_process_run):
    out, result = two_process_run
    done = json.loads((out / "DONE.json").read_text())
    fingerprints = done["parameter_sha256_per_rank"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    assert "over 2 process(es)" in result.stdout and result.stdout.count("step 2/2 |") == 1  # rank 0 prints

    seed_everything(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        initial = FusionSystem(FlowConfig(), DEMO_EXEMPLAR, fusion=DEMO_FUSION, image_size=DEMO_SIZE)
    best = torch.load(out / "fusion_best.pth", weights_only=True)
    for name, key in (("embed_net", "swintexco_embed"), ("colornet", "swintexco_colornet"),
                      ("nonlocal_net", "swintexco_nonlocal"), ("fusion_net", "fusion_unet")):
        same = all(torch.equal(best[key][k], v) for k, v in getattr(initial, name).state_dict().items())
        assert same == (name in ("embed_net", "colornet")), name  # frozen: bit-identical; trained: changed
    assert load_mat(out / "losses.mat")["step_total"].size == 2
