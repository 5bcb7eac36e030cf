"""train_colorize.py end to end on a tiny dataset in the demo's layout (spec/colorize.md §4, §6, §7; §9 checks 10
and 11): the outputs of a finished run, log lines, a rerun, exact resume inside an epoch and an accumulation window
in a fresh process, the time budget, a Strategy-1 run from an exported folder, the eval subcommand.

Runs are in-process (``cli([...])``) on one thread, except the resumed run, which is a fresh process as a user's
rerun is. One finished run is shared: 3 train sequences x 8 frames (6 clips), batch 2 x 2 accumulation, 2 epochs =
6 micro-batches = 3 steps, the second accumulation window spanning the epoch boundary.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from colorize.swintexco import ColorVidNet, SwinEmbed, WarpNet
from colorize.weights import FUSION_FORMAT
from common.checkpoint import load_checkpoint
from common.lossdump import load_mat
from tests.colorize_helpers import DEMO_SIZE, no_network, write_tiny_davis  # noqa: F401
from tests.kit_helpers import ROOT, env

pytestmark = pytest.mark.usefixtures("no_network")

FLOWCHROMA_KEYS = {"epoch", "fusion_unet", "swintexco_embed", "swintexco_nonlocal", "swintexco_colornet",
                   "optimizer", "scheduler", "best_loss", "train_losses", "config", "format"}
SERIES = ("total", "l1", "contextual", "align", "smooth", "temporal", "perceptual", "gan_g", "gan_d", "lr_nonlocal",
          "lr_fusion")
LOG_LINE = re.compile(r"^step (?P<step>\d+)/3 \| epoch (?P<epoch>\d)/2 \| total (?P<total>\S+) \| l1 (?P<l1>\S+) "
                      r"\| ctx (?P<ctx>\S+) \| align (?P<align>\S+) \| smooth (?P<smooth>\S+) \| lr_nonlocal "
                      r"(?P<lr_nonlocal>\S+) \| lr_fusion (?P<lr_fusion>\S+) \| it/s")


def tiny_args(data, out, *extra: str) -> list[str]:
    """The demo preset on the tiny dataset: batch 2 x 2 accumulation, 2 epochs (3 steps), no time budget."""
    return ["--preset", "demo", "--data.dataset", str(data), "--data.imagenet", str(data / "references"),
            "--train.output-dir", str(out), "--train.batch-size", "2", "--optim.accumulation-steps", "2",
            "--train.epochs", "2", "--train.time-budget-s", "0", "--train.log-every", "1", *extra]


@pytest.fixture(scope="module")
def in_process():
    """Run the trainer in this process on one thread (as the fresh processes, whose results it is compared with),
    restoring the signal handlers its preemption guard installs."""
    import train_colorize

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}

    def run(args: list[str]) -> int:
        try:
            return train_colorize.cli(args)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    yield run
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)  # the trainer flushes denormals on the CPU


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_davis(tmp_path_factory.mktemp("colorize_tiny") / "tiny", train=3)


SYSTEM_INPUT_CHANNELS: list[int] = []
"""Channels of every clip the shared run handed to the system (filled by ``finished``)."""


@pytest.fixture(scope="module")
def finished(in_process, data, tmp_path_factory):
    """One uninterrupted run (with TensorBoard), recording the channels of every clip handed to the system."""
    from colorize.system import FusionSystem

    out = tmp_path_factory.mktemp("colorize_finished") / "run"
    forward = FusionSystem.forward

    def recording(self, frames_lab, *args, **kwargs):
        SYSTEM_INPUT_CHANNELS.append(frames_lab.shape[2])
        return forward(self, frames_lab, *args, **kwargs)

    FusionSystem.forward = recording
    try:
        assert in_process(tiny_args(data, out)) == 0
    finally:
        FusionSystem.forward = forward
    return out


def snapshot(folder) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def trainable(path) -> dict[str, torch.Tensor]:
    """The trained modules of a fusion checkpoint, by prefixed key."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {f"{part}.{key}": value for part in ("fusion_unet", "swintexco_nonlocal")
            for key, value in state[part].items()}


def test_only_lightness_reaches_the_system(finished):
    assert SYSTEM_INPUT_CHANNELS == [1] * 7  # 6 training micro-batches and the validation sequence (§9.3)


def test_finished_run_writes_every_output(finished):
    log = (finished / "console.log").read_text()
    assert "RANDOM INIT" in log and "WARNING: embed_net" in log and "strategy 2" in log
    config = json.loads((finished / "config.json").read_text())
    assert config["embed_random_init"] is True and config["weight_sources"]["embed_net"]["path"] is None
    assert config["train"]["batch_size"] == 2 and config["preset"] == "demo"

    losses = load_mat(finished / "losses.mat")
    assert all(losses[f"step_{name}"].size == 3 for name in SERIES)
    assert losses["epoch_epoch"].ravel().tolist() == [1, 2] and np.isfinite(losses["epoch_val_psnr"][0, -1])
    assert np.isnan(losses["epoch_val_psnr"][0, 0])  # the demo validates after the last epoch only
    assert losses["step_lr_fusion"].ravel()[0] == pytest.approx(1e-3)  # cosine at epoch 0

    best = torch.load(finished / "fusion_best.pth", map_location="cpu", weights_only=True)
    assert set(best) == FLOWCHROMA_KEYS and best["format"] == FUSION_FORMAT and best["epoch"] == 2
    assert all(key.startswith("pretrained.") for key in best["swintexco_embed"])
    assert json.loads(best["config"])["data"]["image_size"] == DEMO_SIZE
    assert best["scheduler"]["T_max"] == 2 and len(best["train_losses"]) == 2
    assert (finished / "fusion_epoch_2.pth").samefile(finished / "fusion_best.pth")  # one write, two names

    tiny_swin = {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8)}
    for name, module in (("embed_net", SwinEmbed("swinv2_cr_tiny_ns_224", DEMO_SIZE, tiny_swin)),
                         ("nonlocal_net", WarpNet(0.125, (32, 64, 128, 256))), ("colornet", ColorVidNet(7))):
        module.load_state_dict(torch.load(finished / "swintexco" / "best" / f"{name}.pth", weights_only=True),
                               strict=True)  # check 11: strict-loadable by fresh modules

    metrics = json.loads((finished / "eval" / "metrics.json").read_text())
    assert {"fused", "gray", "exemplar", "n_sequences", "n_frames", "warp_flow", "eval_temperature"} <= set(metrics)
    assert metrics["n_sequences"] == 1 and metrics["n_frames"] == 8 and metrics["omitted"]["LPIPS"]
    header = (finished / "eval" / "metrics_fused.csv").read_text().splitlines()
    assert header[0] == "video,n_frames,PSNR,SSIM,colorfulness,CDC,warp_error" and header[-1].startswith("mean,8,")
    with Image.open(finished / "eval" / "samples" / "tiny_val_0.png") as strip:
        assert strip.width > 4 * 128 and strip.height > 4 * 128  # 4 columns x 4 sampled frames, enlarged
    assert {p.name for p in (finished / "plots").iterdir()} == {"losses.png", "lr.png", "validation.png"}
    assert list((finished / "tensorboard").rglob("events.out.tfevents.*"))
    report = json.loads((finished / "demo_report.json").read_text())
    assert set(report) >= {"passed", "psnr", "warp_error", "l1_drop"} and report["steps"] == 3
    done = json.loads((finished / "DONE.json").read_text())
    assert done["stopped_by"] == "last epoch" and done["steps"] == 3


def test_log_lines_are_the_per_step_series(finished):
    lines = [m.groupdict() for line in (finished / "console.log").read_text().splitlines()
             if (m := LOG_LINE.match(line))]
    losses = load_mat(finished / "losses.mat")
    assert [int(line["step"]) for line in lines] == [1, 2, 3]
    for name, field in (("total", "total"), ("l1", "l1"), ("contextual", "ctx"), ("smooth", "smooth")):
        assert [float(line[field]) for line in lines] == pytest.approx(losses[f"step_{name}"].ravel(), abs=1e-6)


def test_rerun_is_complete_and_never_is_refused(in_process, data, finished, capsys):
    before = snapshot(finished)
    assert in_process(tiny_args(data, finished)) == 0
    assert "complete:" in capsys.readouterr().out
    assert in_process(tiny_args(data, finished, "--resume", "never")) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and "--overwrite" in error[0]
    assert snapshot(finished) == before


def test_resume_mid_epoch_and_inside_an_accumulation_window_is_exact(in_process, data, finished, tmp_path, capsys):
    """Stopped after micro-batch 2 (mid-epoch 1, between steps), continued in a fresh process and stopped after 5
    (mid-epoch 2, inside a window, the second window having spanned the epoch boundary), then finished: the same
    per-step series and trained weights as the uninterrupted run."""
    out = tmp_path / "run"
    args = tiny_args(data, out, "--train.no-tensorboard")
    assert in_process([*args, "--stop-after", "2"]) == 0
    resumed = subprocess.run([sys.executable, str(ROOT / "train_colorize.py"), *args, "--stop-after", "5"],
                             capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 1 (epoch 1, micro-batch 2" in resumed.stdout
    state = load_checkpoint(max((out / "checkpoints").glob("colorize_step_*.pth")))
    assert state["meta"]["position"] == {"step": 2, "micro_step": 5, "epoch": 1, "batch": 2}
    assert state["accumulation"][0]["fusion_net"]["grads"] and state["window"]["count"] == 1
    capsys.readouterr()
    assert in_process(args) == 0
    assert "at step 2 (epoch 2, micro-batch 2" in capsys.readouterr().out
    reference, continued = load_mat(finished / "losses.mat"), load_mat(out / "losses.mat")
    for name in SERIES:
        assert np.array_equal(reference[f"step_{name}"], continued[f"step_{name}"]), name
    ours, theirs = trainable(finished / "fusion_best.pth"), trainable(out / "fusion_best.pth")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_time_budget_stops_validates_exports_and_a_rerun_does_not_train(in_process, data, tmp_path, capsys):
    """With the discriminator from the first epoch (the optional GAN terms)."""
    out = tmp_path / "budget"
    args = tiny_args(data, out, "--train.time-budget-s", "0.01", "--train.no-tensorboard", "--loss.gan", "0.1",
                     "--loss.gan-start-epoch", "1", "--optim.accumulation-steps", "1")
    assert in_process(args) == 0
    printed = capsys.readouterr().out
    assert "time budget of 0.01 s used after step 1 of 6" in printed and "(stopped at step 1)" in printed
    done = json.loads((out / "DONE.json").read_text())
    assert done["stopped_by"] == "time budget" and done["steps"] == 1 and done["epochs"] == pytest.approx(1 / 3)
    assert (out / "eval" / "metrics.json").is_file()
    exported = torch.load(out / "fusion_epoch_1.pth", map_location="cpu", weights_only=True)
    assert {"discriminator", "optimizer_d"} <= set(exported) and exported["epoch"] == 1
    losses = load_mat(out / "losses.mat")
    assert losses["step_gan_g"].ravel()[0] > 0 and losses["step_gan_d"].ravel()[0] > 0
    before = snapshot(out)
    assert in_process(args) == 0
    assert "complete:" in capsys.readouterr().out and snapshot(out) == before


def test_strategy_one_run_from_the_exported_folder(in_process, data, finished, tmp_path, capsys):
    folder = shutil.copytree(finished / "swintexco" / "best", tmp_path / "swintexco")
    out = tmp_path / "strategy1"
    args = ["--data.dataset", str(data), "--data.imagenet", str(data / "references"), "--data.image-size", "64",
            "--data.workers", "0", "--exemplar.swintexco-ckpt", str(folder), "--exemplar.backbone-embed-dim", "32",
            "--exemplar.backbone-depths", "1", "1", "1", "1", "--exemplar.backbone-heads", "1", "2", "4", "8",
            "--exemplar.warpnet-width", "0.125", "--fusion.width", "16", "--train.batch-size", "2",
            "--optim.accumulation-steps", "1", "--train.output-dir", str(out), "--train.no-tensorboard"]
    assert in_process([*args, "--stop-after", "1"]) == 0  # the paper preset (a data root is given): rates by strategy
    printed = capsys.readouterr().out
    assert "strategy 1 (SwinTExCo checkpoint folder" in printed and "lr nonlocal 1.0e-05" in printed
    state = load_checkpoint(next((out / "checkpoints").glob("colorize_step_*.pth")))
    assert [group["lr"] for group in state["optimizer"]["param_groups"]] == [1e-5, 1e-4]
    config = json.loads((out / "config.json").read_text())
    assert config["strategy"] == 1 and config["weight_sources"]["nonlocal_net"]["sha256"]
    # A frozen weight file that changed since the run started refuses the resume (its SHA-256 is recorded).
    torch.save(ColorVidNet(7).state_dict(), folder / "colornet.pth")
    assert in_process(args) == 2
    error = capsys.readouterr().err
    assert "refusing to resume" in error and "weights.colornet" in error and "--resume-force" in error


def test_eval_subcommand_reproduces_the_validation(in_process, finished, tmp_path):
    out = tmp_path / "eval"
    assert in_process(["eval", "--checkpoint", str(finished / "fusion_best.pth"), "--out", str(out)]) == 0
    again, during = (json.loads((folder / "metrics.json").read_text()) for folder in (out, finished / "eval"))
    for method in ("fused", "gray", "exemplar"):
        assert again[method] == pytest.approx(during[method]), method
    assert (out / "samples" / "tiny_val_0.png").is_file() and again["checkpoint"].endswith("fusion_best.pth")


def test_generator_term_never_reaches_the_discriminator():
    from colorize.config import LossConfig
    from colorize.loss import Discriminator, FusionLoss
    from colorize.recipe import training_losses
    from tests.colorize_helpers import demo_system, random_lab

    class NoAccelerator:
        @staticmethod
        def autocast():
            return torch.autocast("cpu", enabled=False)

    system, discriminator = demo_system(), Discriminator()
    generator = torch.Generator().manual_seed(0)
    batch = {"frames_lab": random_lab(2, 4, 3, DEMO_SIZE, DEMO_SIZE, generator=generator),
             "reference_lab": random_lab(2, 3, DEMO_SIZE, DEMO_SIZE, generator=generator)}
    criterion = FusionLoss(LossConfig(gan=0.1), system.embed_net)
    total, parts, outputs = training_losses(system, criterion, batch, NoAccelerator(), discriminator)
    total.backward()
    assert parts["gan_g"] > 0 and system.fusion_net.head.weight.grad is not None
    assert all(p.grad is None and p.requires_grad for p in discriminator.parameters())
    FusionLoss.discriminator_loss(discriminator, outputs, batch["frames_lab"]).backward()
    assert all(p.grad is not None for p in discriminator.parameters())
