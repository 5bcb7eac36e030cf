"""Unit tests of the kit: checkpoints, discovery, refusals, loss dumps, schedules, EMA, freeze, data order, console."""

from __future__ import annotations

import io
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common import checkpoint as ckpt
from common.console import RunConsole
from common.data import GlobalBatchSampler
from common.ema import ModelEMA
from common.freeze import FreezePolicy, apply_policy, set_train_mode
from common.lossdump import LossSeries, load_mat, save_mat
from common.schedules import Schedule, apply_schedule, set_base_lrs
from tests.kit_helpers import ROOT, env, run_toy


# ---------------------------------------------------------------- discovery and retention

def _touch_checkpoint(path: Path, value: float = 0.0) -> Path:
    return ckpt.save_checkpoint(path, {"x": torch.tensor([value])})


def test_find_latest_by_number_not_time_and_stage_exact(tmp_path):
    for epoch in (9, 10, 2):
        _touch_checkpoint(tmp_path / f"freeze_epoch_{epoch}_weights.pth")
    _touch_checkpoint(tmp_path / "unfreeze_epoch_50_weights.pth")
    old = tmp_path / "freeze_epoch_10_weights.pth"
    os.utime(tmp_path / "freeze_epoch_2_weights.pth", (time.time() + 100, time.time() + 100))
    assert ckpt.find_latest(tmp_path, "freeze") == old  # 10 > 9 > 2, whatever the mtimes or string order
    assert ckpt.find_latest(tmp_path, "unfreeze").name == "unfreeze_epoch_50_weights.pth"
    assert ckpt.find_latest(tmp_path).name == "unfreeze_epoch_50_weights.pth"
    assert ckpt.find_latest(tmp_path / "missing") is None
    (tmp_path / "unfreeze_epoch_50_weights.pth").unlink()
    assert ckpt.find_latest(tmp_path, "unfreeze") is None  # never falls back to a freeze file


def test_retention_keeps_last_and_best(tmp_path):
    manager = ckpt.CheckpointManager(tmp_path, "fusion", keep_last=2)
    for n in range(1, 6):
        manager.save({"n": n}, n, best=(n == 2))
    names = sorted(p.name for p in tmp_path.glob("*.pth"))
    assert names == ["fusion_step_2.pth", "fusion_step_4.pth", "fusion_step_5.pth"]
    assert manager.latest().name == "fusion_step_5.pth"


WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from common.checkpoint import save_checkpoint
big = torch.randn(16_000_000)
for n in range(1, 100):
    print(f"writing {{n}}", flush=True)
    save_checkpoint({directory!r} + f"/fusion_step_{{n}}.pth", {{"n": n, "big": big}})
"""


def test_sigkill_while_writing_leaves_previous_checkpoint(tmp_path):
    script = WRITER.format(root=str(ROOT), directory=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env())
    for line in process.stdout:
        if line.strip() == "writing 2":
            time.sleep(0.15)  # inside the second 64 MB write
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    latest = ckpt.find_latest(tmp_path, "fusion")
    assert latest is not None
    state = ckpt.load_checkpoint(latest)
    assert latest.name == f"fusion_step_{state['n']}.pth"
    for path in tmp_path.glob("fusion_step_*.pth"):
        ckpt.load_checkpoint(path)  # every file under a final name is complete


def test_os_replace_failure_keeps_old_file(tmp_path, monkeypatch):
    path = _touch_checkpoint(tmp_path / "end-to-end_step_1.pth", 1.0)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(path, {"x": torch.tensor([2.0])})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["x"].item() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


# ---------------------------------------------------------------- refusals

def test_truncated_and_corrupt_checkpoints_are_refused(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "a_step_1.pth", {"w": torch.randn(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        ckpt.load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ckpt.CheckpointError, match=str(path.name)):
        ckpt.load_checkpoint(path)


class Pickled:
    """An arbitrary Python object (refused by weights_only loading)."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil_step_1.pth"
    torch.save({"model": {}, "payload": Pickled()}, path)
    with pytest.raises(ckpt.CheckpointError, match="pickled"):
        ckpt.load_checkpoint(path)
    with pytest.raises(TypeError, match="Pickled"):
        ckpt.save_checkpoint(tmp_path / "x_step_1.pth", {"payload": Pickled()})


@pytest.mark.parametrize("field, value", [
    ("script", "train_fred_fusion"), ("stage", "freeze"), ("trainable", "0" * 64),
    ("mixed_precision", "bf16"), ("world_size", 2),
])
def test_check_resume_names_each_difference(field, value):
    current = ckpt.RunIdentity("train_end_to_end", "fusion", "f" * 64, "no", 1)
    meta = {**current.as_meta(), field: value}
    with pytest.raises(ckpt.ResumeRefused, match=field):
        ckpt.check_resume("c.pth", meta, current)
    ckpt.check_resume("c.pth", meta, current, allow=[field])
    ckpt.check_resume("c.pth", current.as_meta(), current)


def test_toy_refuses_other_script_precision_and_corrupt_file(tmp_path):
    run_dir = tmp_path / "run"
    run_toy(run_dir, "--epochs", "1", "--stop-after", "3")
    path = ckpt.find_latest(run_dir / "checkpoints")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    refused = run_toy(run_dir, "--epochs", "1", "--resume", "auto", "--mixed-precision", "bf16", check=False)
    assert refused.returncode == 2 and "mixed_precision" in refused.stderr and "Traceback" not in refused.stderr

    state = ckpt.load_checkpoint(path)
    state["meta"]["script"] = "train_fred_fusion"
    other = ckpt.save_checkpoint(tmp_path / "other_step_3.pth", state)
    refused = run_toy(run_dir, "--epochs", "1", "--resume", str(other), check=False)
    assert refused.returncode == 2 and "script" in refused.stderr

    corrupt = tmp_path / "corrupt_step_3.pth"
    corrupt.write_bytes(path.read_bytes()[:1000])
    refused = run_toy(run_dir, "--epochs", "1", "--resume", str(corrupt), check=False)
    assert refused.returncode == 2 and "truncated or corrupt" in refused.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # nothing overwritten


# ---------------------------------------------------------------- precision and non-finite losses

@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_precisions_train(tmp_path, precision):
    result = run_toy(tmp_path / precision, "--epochs", "1", "--mixed-precision", precision)
    assert "WARNING" not in result.stdout


def test_fp16_on_cpu_is_reported_and_runs_in_fp32(tmp_path):
    result = run_toy(tmp_path / "fp16", "--epochs", "1", "--mixed-precision", "fp16")
    assert "fp16 mixed precision needs a GPU" in result.stdout
    config = (tmp_path / "fp16" / "checkpoints").glob("*.pth")
    assert ckpt.load_checkpoint(next(iter(config)))["meta"]["mixed_precision"] == "no"


def test_nonfinite_loss_is_skipped_and_counted(tmp_path):
    result = run_toy(tmp_path / "nan", "--epochs", "1", "--nan-at-step", "2")
    assert "skipped 1 optimizer step(s) with a non-finite loss or gradient since the last report (1 in total" \
        in result.stdout
    final = torch.load(tmp_path / "nan" / "final_rank0.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())


def test_persistent_nonfinite_loss_stops_with_a_clear_message(tmp_path):
    result = run_toy(tmp_path / "nan", "--epochs", "1", "--nan-always", "--max-nonfinite", "3", check=False)
    assert result.returncode == 2
    # Counted on the device and read at log steps (every 2 steps): stops at the first log step with >= 3.
    assert "non-finite for 4 optimizer steps in a row" in result.stderr
    assert not (tmp_path / "nan" / "losses.json").exists()
    assert "Traceback" not in result.stderr


def test_no_project_code_creates_a_grad_scaler():
    """Accelerate owns the scaler (spec: no project code creates, stores or passes one), FRED included."""
    needle = "GradScaler" + "("
    project = [*ROOT.glob("*.py"), *[p for d in ("common", "crossfuse", "fred", "bench", "tests")
                                      for p in (ROOT / d).rglob("*.py")]]
    assert len(project) > 40
    offenders = [str(p) for p in project if needle in p.read_text(encoding="utf-8", errors="ignore")]
    assert offenders == []


# ---------------------------------------------------------------- loss dumps, schedules, EMA, freeze, data

def test_mat_dumps_are_byte_identical_and_row_shaped(tmp_path):
    series = LossSeries(["loss", "pix"])
    for step in range(5):
        series.append({"loss": torch.tensor(step * 1.5), "pix": torch.tensor(0.25 * step)})
    series.flush()
    first = save_mat(tmp_path / "a.mat", {**series.arrays(), "iters_per_epoch": 5}).read_bytes()
    time.sleep(1.1)  # scipy's own header carries the time of day
    second = save_mat(tmp_path / "b.mat", {**series.arrays(), "iters_per_epoch": 5}).read_bytes()
    assert first == second
    loaded = load_mat(tmp_path / "a.mat")
    assert loaded["loss"].shape == (1, 5) and loaded["loss"].dtype == np.float64
    assert loaded["loss"][0, 4] == 6.0
    state = series.state_dict()
    restored = LossSeries(["loss", "pix"])
    restored.load_state_dict(state, length=3)
    assert restored.arrays()["loss"].tolist() == [0.0, 1.5, 3.0]


def test_schedules_are_pure_functions():
    cosine = Schedule("cosine", total=12)
    assert cosine(0, 1e-3, 1e-6) == pytest.approx(1e-3)
    assert cosine(6, 1e-3, 1e-6) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    step = Schedule("step", milestones=(2, 5), gamma=0.1, compounding=False)
    assert [step(e, 1.0) for e in (0, 1, 2, 6)] == [1.0, 1.0, 0.1, 0.1]
    warm = Schedule("warmup_cosine_tail", total=300, warmup=3, tail=15)
    assert warm(0, 1e-2, 1e-4) == pytest.approx(1e-3)
    assert warm(3, 1e-2, 1e-4) == pytest.approx(1e-2)
    assert warm(290, 1e-2, 1e-4) == pytest.approx(1e-4)
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD([{"params": [model.weight], "name": "a"}, {"params": [model.bias], "name": "b"}], lr=1)
    set_base_lrs(optimizer, [1.0, 10.0])
    assert apply_schedule(optimizer, Schedule("step", milestones=(1,)), 1) == pytest.approx([0.1, 1.0])


def test_ema_ramps_and_keeps_integer_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9999, tau=2000)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked += 5
    before = ema.module[0].weight.clone()
    ema.update(model)
    d = 0.9999 * (1 - math.exp(-1 / 2000))
    assert torch.allclose(ema.module[0].weight, d * before + (1 - d) * model[0].weight)
    assert ema.module[1].num_batches_tracked.item() == 0


def test_freeze_policy_and_frozen_modes():
    model = nn.Sequential()
    model.add_module("backbone", nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))
    model.add_module("head", nn.Linear(2, 1))
    model.add_module("fixed", nn.Linear(1, 1))
    names = apply_policy(model, FreezePolicy(trainable=("",), frozen=("backbone",), never=("fixed",)))
    assert names == ["head.bias", "head.weight"]
    set_train_mode(model, FreezePolicy(trainable=("head",), frozen_mode="eval"))
    assert not model.backbone.training and model.head.training
    set_train_mode(model, FreezePolicy(trainable=("head",), frozen_mode="train"))
    assert model.backbone[1].training
    with pytest.raises(ValueError):
        apply_policy(model, FreezePolicy(trainable=("nothing",)))


def test_global_batches_do_not_depend_on_world_size():
    single = GlobalBatchSampler(20, 4, seed=3)
    ranks = [GlobalBatchSampler(20, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for epoch in (0, 1):
        for sampler in [single, *ranks]:
            sampler.set_epoch(epoch)
        merged = [a + b for a, b in zip(*[list(r) for r in ranks])]
        assert merged == list(single)
    assert list(GlobalBatchSampler(20, 4, seed=3)) != list(GlobalBatchSampler(20, 4, seed=4))
    resumed = GlobalBatchSampler(20, 4, seed=3)
    resumed.set_epoch(1, start_batch=2)
    full = GlobalBatchSampler(20, 4, seed=3)
    full.set_epoch(1)
    assert list(resumed) == list(full)[2:]


# ---------------------------------------------------------------- console

PLAIN = re.compile(r"^step \d+/\d+ \| loss \d+\.\d{6} \| lr \d\.\d{3}e[+-]\d{2} \| it/s (\d+\.\d{2}|nan) \| eta \S+$")


def test_plain_console_lines_are_parseable(tmp_path, capsys):
    console = RunConsole(is_main=True, log_file=tmp_path / "console.log", interactive=False)
    console.start(10)
    console.log(5, {"loss": 0.5, "lr": 1e-3})
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert PLAIN.match(out.strip()), out
    assert (tmp_path / "console.log").read_text().strip() == out.strip()
    quiet = RunConsole(is_main=False, interactive=False)
    quiet.print("hello")
    quiet.log(1, {"loss": 1.0})
    assert capsys.readouterr().out == ""


def test_terminal_console_shows_a_progress_bar():
    console = RunConsole(is_main=True, interactive=True)
    buffer = io.StringIO()
    console.console.file = buffer
    console.start(10, "train")
    console.log(5, {"loss": 0.5, "lr": 1e-3})
    console.stop()
    text = buffer.getvalue()
    assert "5/10" in text and "loss 0.500000" in text and "it/s" in text


def test_toy_output_redirected_has_no_control_codes(tmp_path):
    result = run_toy(tmp_path / "plain", "--epochs", "1")
    assert "\x1b" not in result.stdout


# ---------------------------------------------------------------- resume_training.py

def test_resume_training_prints_and_launches(tmp_path):
    run_dir = tmp_path / "run"
    run_toy(run_dir, "--epochs", "2", "--stop-after", "5")
    script = [sys.executable, str(ROOT / "resume_training.py")]
    shown = subprocess.run([*script, str(run_dir)], capture_output=True, text=True, env=env(), cwd=ROOT)
    assert shown.returncode == 0
    assert "toy_step_000005.pth" in shown.stdout
    assert "python tests/toy_trainer.py --run-dir" in shown.stdout and "--resume auto" in shown.stdout
    assert "--stop-after" not in shown.stdout
    missing = subprocess.run([*script, str(tmp_path / "nope")], capture_output=True, text=True, env=env(), cwd=ROOT)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    import resume_training

    command = resume_training.continue_command(run_dir / "run.json", ["--resume", "auto"], [])
    launched = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, env=env(), cwd=ROOT)
    assert launched.returncode == 0 and "resumed from" in launched.stdout


def test_resume_training_fred_form_and_no_torch_import(tmp_path):
    log_dir = tmp_path / "logs" / "fred_rgb"
    for name in ("freeze_epoch_10_weights.pth", "freeze_epoch_50_weights.pth", "unfreeze_epoch_60_weights.pth"):
        _touch_checkpoint(log_dir / name)
    probe = (
        "import sys; sys.path.insert(0, %r); import resume_training as r; "
        "print('torch' in sys.modules); print(r.find_latest_checkpoint(%r, 'freeze')); "
        "print(r.fred_choice(r.Path(%r), 'freeze')); print(r.fred_choice(r.Path(%r), 'unfreeze'))"
    ) % (str(ROOT), str(log_dir), str(log_dir), str(log_dir))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env()).stdout.splitlines()
    assert out[0] == "False"
    assert "50" in out[1] and "freeze_epoch_50_weights.pth" in out[1]
    assert "freeze_epoch_50_weights.pth" in out[2] and "--freeze-training" in out[2]
    assert "unfreeze_epoch_60_weights.pth" in out[3]
    usage = subprocess.run([sys.executable, str(ROOT / "resume_training.py")], capture_output=True, text=True,
                           env=env(), cwd=tmp_path)
    assert usage.returncode == 1 and "python resume_training.py RUN_DIR" in usage.stdout


def test_fused_momentum_sgd_survives_an_unfreeze_and_equals_plain_sgd():
    """Fused SGD crashes on a group mixing parameters with and without momentum buffers (a backbone unfrozen under a
    trained head); OptimStep.set_model primes zero buffers, which gives exactly plain SGD's steps."""
    from accelerate import Accelerator

    from common.step import OptimStep

    def run(fused: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))  # "0": backbone, "1": head
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, fused=fused)
        accelerator = Accelerator(cpu=True)
        stepper = OptimStep(accelerator, optimizer, model)
        data = torch.randn(3, 8, 4)
        apply_policy(model, FreezePolicy(trainable=("1",)))
        stepper.set_model(model)
        stepper(model(data[0]).square().mean())
        optimizer.zero_grad(set_to_none=True)
        apply_policy(model, FreezePolicy(trainable=("",)))
        stepper.set_model(model)
        for batch in data[1:]:
            stepper(model(batch).square().mean())
            optimizer.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in model.parameters()]

    fused, plain = run(True), run(False)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(fused, plain))


def test_halt_waits_for_every_process_and_closes_the_group():
    """A loop ended by --stop-after or a signal closes the processes the way a finished run does: every rank waits
    for the others, then the trackers and the process group close (a rank returning without it once left its peer
    to abort at exit, "terminate called without an active exception", in a 2-process --stop-after run)."""
    from common.preempt import Preemption

    class Console:
        def stop(self):
            calls.append("console.stop")

        def print(self, line):
            calls.append(line)

    class Accelerator:
        def wait_for_everyone(self):
            calls.append("wait")

        def end_training(self):
            calls.append("end")

    calls = []
    code = Preemption(Accelerator()).halt(Console(), "toy", "s.pth", stopped=True, at="step 3")
    assert code == 0
    assert calls == ["console.stop", "toy: stopped after step 3 (--stop-after): saved s.pth; run the same command "
                     "again to continue", "wait", "end"]
