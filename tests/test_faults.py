"""Faults of both trainers (issue 9 items 2-4 and 7; issue 8 must-show 3): kill -9 at random moments and during
writes, SIGTERM mid-epoch, Ctrl-C, SIGTERM during evaluation, and the temporary files a killed write leaves.

Per trainer, one uninterrupted reference run and one faulted run of the same command are compared (bitwise
weights, per-step losses and state tensors; readable files; every export; no orphan). The faulted run first
gets a stop signal mid-epoch (FRED: SIGTERM; CrossFuse: Ctrl-C), then a kill -9 during a write and one during
the start-up (``bench/fuzz_kill.py``'s fuzz with two kills; the bench spreads 15 over the whole run), and is
rerun after each until it finishes. Orphans of killed writes are planted in its folder before it starts.

To keep the suite fast, the reference and the signalled first attempt run in this process (with one torch
thread, like the fuzzed processes, so the results are bitwise comparable): the trainer sends itself the signal
during a chosen training step, as a scheduler or Ctrl-C would; the toy trainer's test and the bench deliver them
from outside. The kills need fresh processes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

import crossfuse.evaluate
import crossfuse.stages
import fred.recipe
import train_end_to_end
import train_fred_fusion
from bench import fuzz_kill
from fred.demo_data import ensure_fred_demo
from tests.crossfuse_helpers import demo_root
from tests.fault_helpers import Ran, Stop, plant_orphans, run_in_process

FRED_SMALL_DEMO = {"frames": 20}  # the session demo of tests/test_fred_train.py (same path: generated once)
# A kill -9 during the first write from 0.3 s after the rerun's first write (its records, a checkpoint or an
# export), then one 1 s after the start (imports): both certain to come before the short run ends, and cheap.
EARLY_KILLS = [fuzz_kill.Moment(0.3, anchored=True), fuzz_kill.Moment(1.0)]


@pytest.fixture(scope="module")
def ivif_demo(tmp_path_factory) -> Path:
    return demo_root(tmp_path_factory)


@pytest.fixture(scope="module")
def fred_demo(tmp_path_factory) -> Path:
    return ensure_fred_demo(tmp_path_factory.getbasetemp() / "fred_demo_small", seed=0, **FRED_SMALL_DEMO)


def one_line_stop(output: str, reason: str) -> str:
    """The single line announcing the stop (and its checkpoint); the output holds no traceback."""
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if reason in line]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


@dataclasses.dataclass(frozen=True)
class Faulted:
    """A signalled first attempt, the kill fuzz that followed it, and the planted file that must be kept."""

    stopped: Ran
    fuzz: fuzz_kill.FuzzResult
    kept: Path
    planted: int


def faulted_run(cli, trainer: fuzz_kill.Trainer, work: Path, stop: Stop, orphans: list[str]) -> Faulted:
    """The reference run, then the faulted one: the signal in-process, then the kills and reruns."""
    reference = work / "reference"
    assert run_in_process(cli, trainer.arguments(reference)).code == 0
    kept = plant_orphans(work / "fuzzed", orphans)
    stopped = run_in_process(cli, trainer.arguments(work / "fuzzed"), stop)
    result = fuzz_kill.fuzz(trainer, work, len(EARLY_KILLS), moments=EARLY_KILLS, reference=reference)
    return Faulted(stopped, result, kept, len(orphans))


def assert_equal_to_the_uninterrupted_run(faulted: Faulted) -> None:
    """Two kills (the first as soon as a write was seen in progress), then results equal to the reference's; the
    planted orphans went at the first start and no orphan of a kill survived a later start."""
    result = faulted.fuzz
    assert [a.mode for a in result.kills] == ["write", "random"] and result.ok, result.report()
    assert f"removed {faulted.planted} temporary file(s)" in faulted.stopped.output, faulted.stopped.output[-3000:]
    assert faulted.kept.is_file()


# ------------------------------------------------------------------------------------------------ FRED

@pytest.fixture(scope="module")
def fred_faulted(fred_demo, tmp_path_factory) -> Faulted:
    """One epoch of 7 steps: SIGTERM during step 3, then two kill -9, rerun to the end."""
    work = tmp_path_factory.mktemp("fred_faults")
    trainer = fuzz_kill.fred(fred_demo, work / "annotations", epochs=1)
    return faulted_run(train_fred_fusion.cli, trainer, work, Stop(fred.recipe, "training_losses", 3, signal.SIGTERM),
                       [".last_epoch_weights.pth.a1b2c3d4.tmp", ".temp_map_out/results/.results.txt.zz_9x8w7.tmp"])


def test_fred_sigterm_mid_epoch_saves_and_exits_75(fred_faulted):
    stopped = fred_faulted.stopped
    assert stopped.code == 75 and stopped.stop_seconds < 30, stopped.output[-3000:]
    line = one_line_stop(stopped.output, "preempted (SIGTERM)")
    assert re.search(r"preempted \(SIGTERM\) after step 3: saved \S+last_epoch_weights\.pth;", line), line
    rerun = fred_faulted.fuzz.attempts[0].output
    assert re.search(r"resumed from \S+last_epoch_weights\.pth at epoch 0, batch 3 ", rerun), rerun[-3000:]


def test_fred_kill9_and_sigterm_resume_to_the_uninterrupted_result(fred_faulted):
    assert_equal_to_the_uninterrupted_run(fred_faulted)


def test_starting_an_epoch_leaves_the_saved_rng_alone():
    """A resumed run starts one more loader iterator than an uninterrupted one (mid-epoch); torch draws each
    iterator's base seed from its global RNG, which checkpoints save: it must not move."""
    from common.data import GlobalBatchSampler, epoch_batches
    from common.state import LoopPosition

    loader = torch.utils.data.DataLoader(list(range(8)), batch_sampler=GlobalBatchSampler(8, 2, seed=0))
    before = torch.get_rng_state()
    batches = epoch_batches(loader, LoopPosition(epoch=1, batch=2))
    assert len(next(batches)) == 2
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------------------------------------ CrossFuse

@pytest.fixture(scope="module")
def crossfuse_faulted(ivif_demo, tmp_path_factory) -> Faulted:
    """Two epochs of 6 iterations without evaluation, a checkpoint every 3: Ctrl-C during iteration 4, then two
    kill -9, rerun to the end."""
    work = tmp_path_factory.mktemp("crossfuse_faults")
    trainer = fuzz_kill.crossfuse(ivif_demo, epochs=2, evaluate=False, checkpoint_every=3)
    return faulted_run(train_end_to_end.cli, trainer, work, Stop(crossfuse.stages, "losses", 4, signal.SIGINT),
                       [".config.json.q1w2e3r4.tmp",
                        "end_to_end/checkpoints/end-to-end/.end-to-end_step_000002.pth.abcdefgh.tmp"])


def test_ctrl_c_saves_a_checkpoint_and_exits_130_with_one_line(crossfuse_faulted):
    stopped = crossfuse_faulted.stopped
    assert stopped.code == 130, stopped.output[-3000:]
    line = one_line_stop(stopped.output, "preempted (SIGINT)")
    assert re.search(r"saved \S+end-to-end_step_000004\.pth", line), line  # at the end of the step
    rerun = crossfuse_faulted.fuzz.attempts[0].output
    assert re.search(r"resumed from \S+end-to-end_step_000004\.pth at iteration 4", rerun), rerun[-3000:]


def test_crossfuse_kill9_and_ctrl_c_resume_to_the_uninterrupted_result(crossfuse_faulted):
    assert_equal_to_the_uninterrupted_run(crossfuse_faulted)


# ------------------------------------------------------------------------------------------------ evaluation

class Killed(BaseException):
    """Stands for kill -9 in-process: nothing catches it, nothing after it runs."""


def evaluated_args(demo: Path, save: Path) -> list[str]:
    """One short epoch (2 iterations), then the demo's test pairs fused and scored (one cheap metric; the demo
    report has its own)."""
    return ["--data.demo-root", str(demo), "--save-dir", str(save), "--eval.out", str(save / "output"),
            "--epochs", "1", "--train-num", "8", "--height", "32", "--width", "32", "--no-tensorboard",
            "--eval.metrics", "EN"]


@pytest.fixture(scope="module")
def evaluated_run(ivif_demo, tmp_path_factory) -> Path:
    """A finished and evaluated CrossFuse run."""
    save = tmp_path_factory.mktemp("evaluated") / "models"
    assert run_in_process(train_end_to_end.cli, evaluated_args(ivif_demo, save)).code == 0
    return save


@pytest.fixture
def evaluated_copy(evaluated_run, tmp_path) -> Path:
    """A private copy of the evaluated run whose evaluation is to run again (its metrics.json, which marks it
    done, is removed)."""
    copy = Path(shutil.copytree(evaluated_run, tmp_path / "models"))
    (eval_dir(copy) / "metrics.json").unlink()
    return copy


def eval_dir(save: Path) -> Path:
    return save / "end_to_end" / "eval" / "ivif_demo_test"


def test_evaluation_killed_before_its_last_file_is_redone(ivif_demo, evaluated_copy, monkeypatch):
    report = evaluated_copy / "end_to_end" / "demo_report.json"
    report.unlink()
    real = crossfuse.evaluate.atomic_write_json

    def killed_at_the_report(path, obj):
        if Path(path) == report:
            raise Killed
        return real(path, obj)
    monkeypatch.setattr(crossfuse.evaluate, "atomic_write_json", killed_at_the_report)
    with pytest.raises(Killed):
        run_in_process(train_end_to_end.cli, evaluated_args(ivif_demo, evaluated_copy))
    monkeypatch.undo()
    rerun = run_in_process(train_end_to_end.cli, evaluated_args(ivif_demo, evaluated_copy))
    assert rerun.code == 0 and "up to date" not in rerun.output and report.is_file(), rerun.output[-3000:]


def test_cut_off_metrics_file_is_evaluated_again(ivif_demo, evaluated_copy):
    metrics = eval_dir(evaluated_copy) / "metrics.json"
    metrics.write_text('{"n_images": 8, "weights": {"ae_ir": {"pa')
    rerun = run_in_process(train_end_to_end.cli, evaluated_args(ivif_demo, evaluated_copy))
    assert rerun.code == 0, rerun.output[-3000:]
    assert json.loads(metrics.read_text())["n_images"] == 8


def test_orphans_of_a_killed_evaluation_are_removed_by_the_next_run(ivif_demo, evaluated_copy):
    orphans = [eval_dir(evaluated_copy) / ".samples.png.k2j4h5g6.tmp",
               evaluated_copy / "end_to_end" / ".demo_report.json.abcd_123.tmp"]
    kept = plant_orphans(evaluated_copy / "end_to_end", [str(path.relative_to(evaluated_copy / "end_to_end"))
                                                         for path in orphans])
    rerun = run_in_process(train_end_to_end.cli, evaluated_args(ivif_demo, evaluated_copy))
    assert rerun.code == 0 and f"removed {len(orphans)} temporary file(s)" in rerun.output, rerun.output[-3000:]
    assert not any(path.exists() for path in orphans) and kept.is_file()


def test_sigterm_during_evaluation_exits_75(ivif_demo, evaluated_copy):
    stopped = run_in_process(train_end_to_end.cli, evaluated_args(ivif_demo, evaluated_copy),
                             Stop(crossfuse.evaluate, "score", 1, signal.SIGTERM))
    assert stopped.code == 75 and stopped.stop_seconds < 30, stopped.output[-3000:]
    assert one_line_stop(stopped.output, "stopped by SIGTERM").startswith("stopped: ")
    assert not (eval_dir(evaluated_copy) / "metrics.json").exists()
