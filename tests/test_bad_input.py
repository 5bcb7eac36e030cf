"""Bad input catalogue of both trainers (DESIGN.md "Bad input"; issue 9 items 5 and 8-10).

Each case breaks one thing (data, a checkpoint or weight file, the output folder, the flags), runs the trainer and
asserts the kit's rule: a non-zero exit (2), exactly one ``error:`` line on stderr naming the file or flag and
what to do, no traceback, and no file lost or changed (the bytes and modification times of the data, the given
files and the run folder are compared before and after). A case that the trainer can check before training
(headers, paths, flags, checkpoints) must also leave no new file behind; a broken image body is only found when
it is decoded, so those cases may leave the new run's records.

The cases run in-process (``cli([...])``, output captured), so the whole catalogue costs seconds; the errors
raised inside DataLoader workers (``--data.workers 2`` / ``--num-workers 2``) run in a fresh process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import train_end_to_end
import train_fred_fusion
from fred.demo_data import ensure_fred_demo
from fred.index import FredDataWarning
from tests.crossfuse_helpers import TINY, demo_root
from tests.fault_helpers import assert_nothing_lost, run_in_process, snapshot
from tests.kit_helpers import ROOT, env

FRED_SMALL_DEMO = {"frames": 20}  # the session demo of tests/test_fred_train.py (same path: generated once)
CROSSFUSE_PAIRS = 24  # TINY trains on the first 24 pairs


# ------------------------------------------------------------------------------------------------ helpers

def assert_one_error(code: int, stderr: str, mentions: tuple[str, ...], expected_code: int = 2) -> str:
    """The kit's rule for bad input: the exit code, one ``error:`` line holding every ``mentions`` string, no
    traceback. Returns the error line."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == expected_code, f"exit {code}, stderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(errors) == 1, stderr[-3000:]
    for text in mentions:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    return errors[0]


def failing_mkstemp(error_number: int, only: Callable[[str, str], bool] = lambda prefix, folder: True):
    """``tempfile.mkstemp`` failing with ``error_number`` for the files ``only(prefix, folder)`` selects (every
    atomic write starts with it): a read-only folder, a foreign one, a full disk."""
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        prefix, folder = str(kwargs.get("prefix", "")), str(kwargs.get("dir", ""))
        if only(prefix, folder):
            raise OSError(error_number, os.strerror(error_number), folder)
        return real(*args, **kwargs)
    return mkstemp


def write_pickled(path: Path) -> Path:
    """A weights-like file that holds a pickled Python object (an argparse.Namespace, as MAE files do)."""
    torch.save({"model": {"weight": torch.zeros(2)}, "args": argparse.Namespace(lr=1e-3)}, path)
    return path


def truncate_copy(source: Path, target: Path, keep: float = 0.5) -> Path:
    """The first ``keep`` fraction of ``source``'s bytes under ``target`` (a write cut off by a full disk)."""
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def cut_image_body(path: Path) -> None:
    """Keep an image's header but cut its pixel data (readable size, fails when decoded)."""
    data = path.read_bytes()
    path.write_bytes(data[: max(64, len(data) // 3)])


def no_flags(world: "World") -> list[str]:
    return []


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: what to break, the flags to add, what the error line must say.

    ``breaks(world)`` damages the world's files (its return value is ignored); ``flags(world)`` are the extra
    command-line flags; ``mentions(world)`` the strings the error line must contain (the file or flag, and the
    advice); ``inject`` monkeypatches a failure in; ``may_add``: the case can only be found once the run has
    started (new run files allowed; nothing earlier may change); ``warns``: a warning the trainer must also give.
    """

    name: str
    mentions: Callable[["World"], tuple[str, ...]]
    flags: Callable[["World"], list[str]] = no_flags
    breaks: Callable[["World"], object] | None = None
    inject: Callable[[pytest.MonkeyPatch], None] | None = None
    may_add: bool = False
    warns: type[Warning] | None = None


@dataclasses.dataclass
class World:
    """The files a case may break: a private copy of the data, a fresh output folder, a scratch folder, and the
    shared finished run of the trainer (``run``) and of the other trainer (``foreign``)."""

    data: Path
    save: Path
    scratch: Path
    run: Path
    foreign: dict[str, Path]
    base: list[str]
    notes: dict[str, Path] = dataclasses.field(default_factory=dict)  # what a case broke, for its message

    def watched(self, flags: list[str]) -> list[Path]:
        """What must not change: the data, the output and scratch folders, and every file or folder the flags
        name (a shared run given as --save-dir, a checkpoint given to --resume)."""
        named = [Path(flag) for flag in flags if flag.startswith("/") and Path(flag).exists()]
        return [path for path in (self.data, self.save, self.scratch, *named) if path.exists()]


def run_case(cli, world: World, case: Case, monkeypatch) -> None:
    """Break the world, snapshot, run the trainer in-process, check the error line and the files."""
    if case.breaks is not None:
        case.breaks(world)
    flags = case.flags(world)
    before = snapshot(*world.watched(flags))
    if case.inject is not None:
        case.inject(monkeypatch)
    with pytest.warns(case.warns) if case.warns else contextlib.nullcontext():
        ran = run_in_process(cli, [*world.base, *flags])
    monkeypatch.undo()
    assert_one_error(ran.code, ran.stderr, case.mentions(world))
    assert_nothing_lost(before, snapshot(*world.watched(flags)), case.may_add)


# ------------------------------------------------------------------------------------------------ CrossFuse

@pytest.fixture(scope="module")
def ivif_demo(tmp_path_factory) -> Path:
    return demo_root(tmp_path_factory)


@pytest.fixture(scope="module")
def fred_demo(tmp_path_factory) -> Path:
    return ensure_fred_demo(tmp_path_factory.getbasetemp() / "fred_demo_small", seed=0, **FRED_SMALL_DEMO)


def crossfuse_base(demo: Path, data: Path, save: Path) -> list[str]:
    """The TINY demo config of the CrossFuse tests on ``data`` (a paired ir/ + vi/ folder), no evaluation."""
    return ["--preset", "demo", "--data.demo-root", str(demo), "--data.root", str(data), "--save-dir", str(save),
            "--eval.out", str(save / "output"), *TINY, "--eval.root", "None"]


def fred_base(demo: Path, data: Path, annotations: Path, save: Path) -> list[str]:
    """The FRED tests' shrunk demo config (64x64, batch 8) on ``data`` (a FRED-layout copy of the demo)."""
    return ["--preset", "demo", "--fred-root", str(data), "--demo-root", str(demo), "--annotation-dir",
            str(annotations), "--input-shape", "64", "64", "--freeze-batch-size", "8", "--unfreeze-batch-size", "8",
            "--eval-batch-size", "32", "--epochs", "1", "--freeze-epoch", "1", "--save-dir", str(save)]


@pytest.fixture(scope="module")
def crossfuse_run(ivif_demo, tmp_path_factory) -> Path:
    """A finished CrossFuse run (one epoch of 2 iterations) that keeps its checkpoint (--no-prune-finished)."""
    save = tmp_path_factory.mktemp("crossfuse_finished") / "models"
    ran = run_in_process(train_end_to_end.cli, [*crossfuse_base(ivif_demo, ivif_demo / "train", save),
                                                "--epochs", "1", "--train-num", "8", "--no-prune-finished"])
    assert ran.code == 0, ran.output[-3000:]
    return save


@pytest.fixture(scope="module")
def fred_run(fred_demo, tmp_path_factory) -> Path:
    """A finished one-epoch FRED run (its states and EMA exports)."""
    folder = tmp_path_factory.mktemp("fred_finished")
    save = folder / "run"
    ran = run_in_process(train_fred_fusion.cli, [*fred_base(fred_demo, fred_demo, folder / "annotations", save),
                                                 "--no-eval-map"])
    assert ran.code == 0, ran.output[-3000:]
    return save


def copy_pairs(source: Path, target: Path, count: int) -> Path:
    """The first ``count`` pairs of a paired folder."""
    for folder in ("ir", "vi"):
        (target / folder).mkdir(parents=True)
        for path in sorted((source / folder).iterdir())[:count]:
            shutil.copy2(path, target / folder / path.name)
    return target


def ir(world: World, index: int = 3) -> Path:
    return world.data / "ir" / f"{index:05d}.png"


def nan_tiff(world: World) -> None:
    """An IR image replaced by a float TIFF of the same size holding NaN pixels."""
    with Image.open(ir(world)) as image:
        width, height = image.size
    pixels = np.full((height, width), 0.5, np.float32)
    pixels[2:5, 2:5] = np.nan
    ir(world).unlink()
    Image.fromarray(pixels, mode="F").save(world.data / "ir" / "00003.tif")


def unpair(world: World) -> None:
    """Rename every VIS image so that no stem occurs in both folders."""
    for path in (world.data / "vi").iterdir():
        path.rename(path.with_name("v" + path.name))


def empty_pair_folders(world: World) -> list[str]:
    for name in ("ir", "vi"):
        (world.scratch / name).mkdir()
    return ["--data.root", str(world.scratch)]


def crossfuse_checkpoint(run: Path) -> Path:
    """The resumable checkpoint a finished CrossFuse run kept."""
    return next((run / "end_to_end" / "checkpoints" / "end-to-end").glob("end-to-end_step_*.pth"))


def resume_as_crossfuse(world: World, source: Path | None, writer: Callable[[Path], object] | None = None) -> list[str]:
    """``--resume`` a file under a CrossFuse checkpoint name (the name passes; the content must be checked): a
    copy of ``source``, or what ``writer`` writes."""
    target = world.scratch / "end-to-end_step_000001.pth"
    if writer is not None:
        writer(target)
    else:
        shutil.copy2(source, target)
    return ["--resume", str(target)]


def unwritable(name: str, error_number: int) -> Callable[[pytest.MonkeyPatch], None]:
    """The folder ``name`` (not there yet) cannot be created or written: a read-only file system (EROFS) or a
    folder of someone else (EACCES); running as root, chmod would not stop the writes."""
    def inject(monkeypatch: pytest.MonkeyPatch) -> None:
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if f"/{name}" in str(self):
                raise OSError(error_number, os.strerror(error_number), str(self))
            return real_mkdir(self, *args, **kwargs)
        monkeypatch.setattr(Path, "mkdir", mkdir)
        monkeypatch.setattr(tempfile, "mkstemp",
                            failing_mkstemp(error_number, lambda prefix, folder: f"/{name}" in folder))
    return inject


def disk_full_at_checkpoint(monkeypatch):
    """The disk fills up when the first resumable state is written (everything before it fitted)."""
    states = (".end-to-end_step_", ".last_epoch_weights", ".freeze_epoch_")
    monkeypatch.setattr(tempfile, "mkstemp", failing_mkstemp(errno.ENOSPC,
                                                             lambda prefix, folder: prefix.startswith(states)))


FUSION_MODEL = Path("end_to_end") / "end_to_end_fusion_epoch_1.model"
CROSSFUSE_CASES = [
    Case("missing data root", lambda w: (str(w.scratch / "absent"), "--data.root"),
         flags=lambda w: ["--data.root", str(w.scratch / "absent")]),
    Case("empty data root", lambda w: ("no IR/VIS folder pair", str(w.scratch)),
         flags=lambda w: ["--data.root", str(w.scratch)]),
    Case("empty ir and vi folders", lambda w: ("no images", str(w.scratch / "ir")), flags=empty_pair_folders),
    Case("unpaired files", lambda w: ("zero IR/VIS pairs", str(w.data)), breaks=unpair),
    Case("zero-byte image", lambda w: (str(ir(w)), "replace or remove"), breaks=lambda w: ir(w).write_bytes(b"")),
    Case("not an image", lambda w: (str(ir(w)), "replace or remove"),
         breaks=lambda w: ir(w).write_text("hello, I am no PNG")),
    Case("size-mismatched pair", lambda w: ("IR and VIS sizes differ", "00003", "registered"),
         breaks=lambda w: Image.new("L", (40, 30)).save(ir(w))),
    Case("truncated image body", lambda w: (str(ir(w)), "replace or remove"), breaks=lambda w: cut_image_body(ir(w)),
         may_add=True),
    Case("float TIFF with NaN pixels", lambda w: ("00003.tif", "NaN", "repair or remove"), breaks=nan_tiff,
         may_add=True),
    Case("--resume truncated checkpoint", lambda w: ("end-to-end_step_000001.pth", "truncated or corrupt"),
         flags=lambda w: resume_as_crossfuse(w, None, lambda t: truncate_copy(crossfuse_checkpoint(w.run), t))),
    Case("--resume zero-byte checkpoint", lambda w: ("end-to-end_step_000001.pth", "truncated or corrupt"),
         flags=lambda w: resume_as_crossfuse(w, None, lambda t: t.write_bytes(b""))),
    Case("--resume pickled checkpoint", lambda w: ("end-to-end_step_000001.pth", "pickled", "re-save"),
         flags=lambda w: resume_as_crossfuse(w, None, write_pickled)),
    Case("--resume FRED state", lambda w: ("refusing to resume", "train_fred_fusion.py"),
         flags=lambda w: resume_as_crossfuse(w, w.foreign["run"] / "last_epoch_weights.pth")),
    Case("--resume a stage this command does not train", lambda w: ("autoencoder-ir_step_000002.pth", "--resume auto"),
         flags=lambda w: ["--resume", str(w.scratch / "autoencoder-ir_step_000002.pth")],
         breaks=lambda w: shutil.copy2(crossfuse_checkpoint(w.run), w.scratch / "autoencoder-ir_step_000002.pth")),
    Case("--resume missing checkpoint", lambda w: ("end-to-end_step_000009.pth", "no such checkpoint file"),
         flags=lambda w: ["--resume", str(w.scratch / "end-to-end_step_000009.pth")]),
    Case("--resume missing checkpoint on a finished run",
         lambda w: ("end-to-end_step_000009.pth", "no such checkpoint file"),
         flags=lambda w: ["--save-dir", str(w.run), "--resume", str(w.scratch / "end-to-end_step_000009.pth")]),
    Case("--resume never on an earlier run", lambda w: (str(w.run / "end_to_end" / "checkpoints"), "--overwrite"),
         flags=lambda w: ["--save-dir", str(w.run), "--resume", "never"]),
    Case("--init.fusion missing", lambda w: (str(w.scratch / "fusion.model"), "does not exist"),
         flags=lambda w: ["--init.fusion", str(w.scratch / "fusion.model")]),
    Case("--init.fusion truncated", lambda w: (str(w.scratch / "fusion.model"), "truncated or corrupt"),
         flags=lambda w: ["--init.fusion", str(w.scratch / "fusion.model")],
         breaks=lambda w: truncate_copy(w.run / FUSION_MODEL, w.scratch / "fusion.model")),
    Case("--init.fusion pickled", lambda w: (str(w.scratch / "fusion.model"), "pickled"),
         flags=lambda w: ["--init.fusion", str(write_pickled(w.scratch / "fusion.model"))]),
    Case("--init.fusion FRED weights", lambda w: ("fred_fusion_final.pth", "a fusion network was expected"),
         flags=lambda w: ["--init.fusion", str(w.foreign["run"] / "fred_fusion_final.pth")]),
    Case("--init.ae-ir fusion weights", lambda w: (FUSION_MODEL.name, "an auto-encoder network was expected"),
         flags=lambda w: ["--init.ae-ir", str(w.run / FUSION_MODEL)]),
    Case("read-only output folder", lambda w: (str(w.save), "read-only", "writable output folder"),
         inject=unwritable("models", errno.EROFS)),
    Case("output folder not writable", lambda w: (str(w.save), "permission denied"),
         inject=unwritable("models", errno.EACCES)),
    Case("disk full at the first checkpoint", lambda w: ("end-to-end_step_000001.pth", "disk is full"),
         flags=lambda w: ["--checkpoint-every", "1"], inject=disk_full_at_checkpoint, may_add=True),
    Case("--height 8", lambda w: ("--height", "at least 16"), flags=lambda w: ["--height", "8"]),
    Case("batch larger than the data", lambda w: ("--batch", "add data"), flags=lambda w: ["--train-num", "3"]),
]


@pytest.mark.parametrize("case", CROSSFUSE_CASES, ids=[c.name for c in CROSSFUSE_CASES])
def test_crossfuse_bad_input(case, ivif_demo, crossfuse_run, fred_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = copy_pairs(ivif_demo / "train", tmp_path / "data", CROSSFUSE_PAIRS)
    (tmp_path / "scratch").mkdir()
    world = World(data, tmp_path / "models", tmp_path / "scratch", crossfuse_run, {"run": fred_run},
                  crossfuse_base(ivif_demo, data, tmp_path / "models"))
    run_case(train_end_to_end.cli, world, case, monkeypatch)


# ------------------------------------------------------------------------------------------------ FRED

def first_sequence(world: World) -> Path:
    """A training sequence of the demo copy (the demo's test sequences are 4 and 5)."""
    return world.data / "0"


def rgb_frame(world: World, index: int = 5) -> Path:
    return sorted((first_sequence(world) / "PADDED_RGB").iterdir())[index]


def event_frame(world: World, index: int = 5) -> Path:
    return sorted((first_sequence(world) / "Event" / "Frames").iterdir())[index]


def garbage_coordinates(world: World) -> None:
    """Every training sequence's coordinates.txt holds only malformed lines (no annotated frame is left)."""
    for sequence in ("0", "1", "2", "3"):
        (world.data / sequence / "coordinates.txt").write_text("0.033: 52.8 52.2 71.7\nnot a line at all\n")


def given_annotations(world: World, drop: str | None = None) -> list[str]:
    """Ready fusion annotation files (--fusion-annotations) built from the data, their image records without
    the field ``drop``."""
    import json

    from fred.index import IndexParams, build_fusion_annotations

    built = build_fusion_annotations(world.data, world.scratch / "built", IndexParams(), notify=lambda _: None)
    given = world.scratch / "given"
    given.mkdir()
    for path in built.values():
        document = json.loads(path.read_text())
        for image in document["images"]:
            image.pop(drop, None)
        (given / path.name).write_text(json.dumps(document))
    return ["--fusion-annotations", str(given)]


def missing_frame_annotations(world: World) -> list[str]:
    """Ready fusion annotations naming a frame that was deleted after they were built."""
    flags = given_annotations(world)
    world.notes["deleted"] = rgb_frame(world)
    world.notes["deleted"].unlink()
    return flags


FRED_CASES = [
    Case("missing FRED root", lambda w: (str(w.scratch / "absent"), "--fred-root"),
         flags=lambda w: ["--fred-root", str(w.scratch / "absent")]),
    Case("empty FRED root", lambda w: ("no sequence folders", str(w.scratch)),
         flags=lambda w: ["--fred-root", str(w.scratch)]),
    Case("no RGB/event pairs", lambda w: ("no annotated RGB/event pairs", "--fusion-threshold"),
         flags=lambda w: ["--fusion-threshold", "0.000001"]),
    Case("sequence without PADDED_RGB", lambda w: (str(first_sequence(w) / "PADDED_RGB"),),
         breaks=lambda w: shutil.rmtree(first_sequence(w) / "PADDED_RGB")),
    Case("sequence without event frames", lambda w: (str(first_sequence(w) / "Event" / "Frames"),),
         breaks=lambda w: shutil.rmtree(first_sequence(w) / "Event")),
    Case("event frame without a time", lambda w: ("Video_x.png", "Video_<seq>_[frame_]<t_us>.png"),
         breaks=lambda w: event_frame(w).rename(event_frame(w).with_name("Video_x.png"))),
    Case("sequence without RGB frames", lambda w: (str(first_sequence(w) / "PADDED_RGB"), "holds no frames"),
         breaks=lambda w: [path.unlink() for path in (first_sequence(w) / "PADDED_RGB").iterdir()]),
    Case("zero-byte RGB frame", lambda w: (rgb_frame(w).name, "replace"),
         breaks=lambda w: rgb_frame(w).write_bytes(b"")),
    Case("not an image", lambda w: (event_frame(w).name, "replace"),
         breaks=lambda w: event_frame(w).write_text("no PNG here")),
    Case("truncated RGB frame body", lambda w: (rgb_frame(w).name, "replace"),
         breaks=lambda w: cut_image_body(rgb_frame(w)), may_add=True),
    Case("malformed coordinates.txt", lambda w: ("no annotated", "check the data"), breaks=garbage_coordinates,
         warns=FredDataWarning),  # each malformed line is counted and warned about (spec), then none is left
    Case("annotation file without frame sizes", lambda w: ("instances_", "width"),
         flags=lambda w: given_annotations(w, drop="width")),
    Case("annotation names a missing frame", lambda w: (w.notes["deleted"].name,), flags=missing_frame_annotations),
    Case("--resume truncated state", lambda w: ("state.pth", "truncated or corrupt"),
         flags=lambda w: ["--resume", str(truncate_copy(w.run / "last_epoch_weights.pth", w.scratch / "state.pth"))]),
    Case("--resume pickled state", lambda w: ("state.pth", "pickled"),
         flags=lambda w: ["--resume", str(write_pickled(w.scratch / "state.pth"))]),
    Case("--resume CrossFuse checkpoint", lambda w: ("refusing to resume", "train_end_to_end.py"),
         flags=lambda w: ["--resume", str(crossfuse_checkpoint(w.foreign["run"]))]),
    Case("--resume other architecture", lambda w: ("refusing to resume", "phi s"),
         flags=lambda w: ["--resume", str(w.run / "last_epoch_weights.pth"), "--phi", "s"]),
    Case("--resume missing state", lambda w: ("state.pth", "no such checkpoint file"),
         flags=lambda w: ["--resume", str(w.scratch / "state.pth")]),
    Case("--resume missing state on a finished run", lambda w: ("state.pth", "no such checkpoint file"),
         flags=lambda w: ["--save-dir", str(w.run), "--resume", str(w.scratch / "state.pth")]),
    Case("--resume never on an earlier run", lambda w: ("last_epoch_weights.pth", "--overwrite", "--resume auto"),
         flags=lambda w: ["--save-dir", str(w.run), "--resume", "never"]),
    Case("--pretrained truncated", lambda w: ("yolov5_n.pth", "truncated or corrupt"),
         flags=lambda w: ["--pretrained", str(w.scratch / "yolov5_n.pth")],
         breaks=lambda w: truncate_copy(w.run / "fred_fusion_final.pth", w.scratch / "yolov5_n.pth")),
    Case("--pretrained pickled", lambda w: ("yolov5_n.pth", "pickled"),
         flags=lambda w: ["--pretrained", str(write_pickled(w.scratch / "yolov5_n.pth"))]),
    Case("--pretrained CrossFuse weights", lambda w: (FUSION_MODEL.name, "matches this model"),
         flags=lambda w: ["--pretrained", str(w.foreign["run"] / FUSION_MODEL)]),
    Case("--pretrained missing", lambda w: ("yolov5_n.pth", "does not exist"),
         flags=lambda w: ["--pretrained", str(w.scratch / "yolov5_n.pth")]),
    Case("read-only output folder", lambda w: (str(w.save), "read-only"), inject=unwritable("run", errno.EROFS)),
    Case("read-only annotation folder", lambda w: (str(w.save.parent / "annotations"), "read-only"),
         inject=unwritable("annotations", errno.EROFS)),
    Case("output folder not writable", lambda w: (str(w.save), "permission denied"),
         inject=unwritable("run", errno.EACCES)),
    Case("disk full at the first state", lambda w: ("last_epoch_weights.pth", "disk is full"),
         flags=lambda w: ["--checkpoint-every", "1"], inject=disk_full_at_checkpoint, may_add=True),
    Case("--input-shape 100 100", lambda w: ("--input-shape 100 100", "multiples of 32"),
         flags=lambda w: ["--input-shape", "100", "100"]),
    Case("batch larger than the data", lambda w: ("--freeze-batch-size", "add data"),
         flags=lambda w: ["--freeze-batch-size", "64"]),
]


@pytest.mark.parametrize("case", FRED_CASES, ids=[c.name for c in FRED_CASES])
def test_fred_bad_input(case, fred_demo, fred_run, crossfuse_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "fred"
    shutil.copytree(fred_demo, data)
    (tmp_path / "scratch").mkdir()
    world = World(data, tmp_path / "run", tmp_path / "scratch", fred_run, {"run": crossfuse_run},
                  fred_base(fred_demo, data, tmp_path / "annotations", tmp_path / "run"))
    run_case(train_fred_fusion.cli, world, case, monkeypatch)


# ------------------------------------------------------------------------------------------------ workers
# Fresh processes: in-process, the failed loader's worker processes would be shut down by a later garbage
# collection (torch waits 5 s for each), which would slow down whichever test comes next.

def run_script(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=env(),
                          cwd=cwd, timeout=300)


def test_crossfuse_truncated_image_in_a_loader_worker_is_one_line(ivif_demo, tmp_path):
    data = copy_pairs(ivif_demo / "train", tmp_path / "data", CROSSFUSE_PAIRS)
    broken = data / "vi" / "00007.png"
    cut_image_body(broken)
    before = snapshot(data)
    result = run_script("train_end_to_end.py", [*crossfuse_base(ivif_demo, data, tmp_path / "models"),
                                                "--data.workers", "2"], tmp_path)
    line = assert_one_error(result.returncode, result.stderr, (str(broken), "replace or remove"))
    assert "DataLoader worker" not in line
    assert_nothing_lost(before, snapshot(data), may_add=False)


def test_fred_truncated_frame_in_a_loader_worker_is_one_line(fred_demo, tmp_path):
    data = tmp_path / "fred"
    shutil.copytree(fred_demo, data)
    broken = sorted((data / "1" / "PADDED_RGB").iterdir())[7]
    cut_image_body(broken)
    before = snapshot(data)
    result = run_script("train_fred_fusion.py", [*fred_base(fred_demo, data, tmp_path / "annotations",
                                                            tmp_path / "run"), "--num-workers", "2"], tmp_path)
    line = assert_one_error(result.returncode, result.stderr, (broken.name, "replace"))
    assert "DataLoader worker" not in line
    assert_nothing_lost(before, snapshot(data), may_add=False)
