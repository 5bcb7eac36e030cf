"""kill -9 fuzz of both trainers: interrupt a short run at random moments, many of them in the middle of a file
write, rerun the SAME command each time until it finishes, then compare it with an uninterrupted run.

For each trainer: one uninterrupted reference run, then the fuzzed run of the same command in another folder.
Every other kill waits for the trainer to start an atomic write (a ``.<name>.<random>.tmp`` file appears in the
run folder) and kills it while the file is being written; the others kill at a random moment. After the run
finishes the script checks:

- every run finishes (exit 0) and every kill was followed by a rerun of the same command;
- 0 unreadable files: every ``.pth``/``.model`` loads with ``weights_only=True``, every ``.mat``, ``.json`` and
  ``.png`` is complete;
- 0 orphan temporary files once the next run has started (``remove_orphan_temps``);
- the results equal the uninterrupted run's: CrossFuse's ``.model`` and ``.mat`` files (and the evaluation's
  fused images and metric tables) bitwise; FRED's per-step losses and every tensor of the final states, the
  ``ep%03d-*.pth`` exports and ``fred_fusion_best.pth`` bitwise;
- every per-epoch export is present (CrossFuse: the ``.model`` files of each epoch; FRED: ``ep%03d`` per save
  period, ``fred_fusion_best.pth`` holding the epoch the state's ``best`` names).

    python bench/fuzz_kill.py [--trainer crossfuse|fred|both] [--kills 15] [--seed 0] [--work DIR]

Before the kills, each fuzzed run first gets a stop signal from outside mid-epoch (CrossFuse: Ctrl-C, exit 130;
FRED: SIGTERM, exit 75) and is rerun from the checkpoint it saved.

The small version in the test suite (tests/test_faults.py) calls :func:`fuzz` with a few kills.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.checkpoint import TEMP_NAME, load_checkpoint  # noqa: E402

POLL_S = 0.003  # how often the run folder is scanned for a write in progress


def child_env() -> dict:
    """One thread per process (the same float summation order in every run), no terminal, unbuffered output."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "CI": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    return env


def temp_files(folder: Path) -> set[Path]:
    """The temporary files of atomic writes under ``folder`` (in progress, or orphaned by a kill)."""
    if not folder.is_dir():
        return set()
    return {path for path in folder.rglob(".*.tmp") if TEMP_NAME.match(path.name)}


# ------------------------------------------------------------------------------------------------ the trainers

@dataclasses.dataclass(frozen=True)
class Trainer:
    """How to run one trainer small, and how to judge its run folder.

    Attributes:
        name: ``crossfuse`` or ``fred``.
        script: the training script.
        arguments: the command's flags for an output folder.
        compare: differences between a fuzzed and a reference folder (empty when equal).
        missing_exports: the per-epoch exports a finished folder lacks.
    """

    name: str
    script: str
    arguments: Callable[[Path], list[str]]
    compare: Callable[[Path, Path], list[str]]
    missing_exports: Callable[[Path], list[str]]

    def command(self, out: Path) -> list[str]:
        """The full command line writing into ``out``."""
        return [sys.executable, str(ROOT / self.script), *self.arguments(out)]


def crossfuse_arguments(data: Path, epochs: int, evaluate: bool, checkpoint_every: int) -> Callable[[Path], list[str]]:
    """The TINY demo config of the CrossFuse tests (24 pairs at 32x32, 6 iterations per epoch), an export per
    epoch and a checkpoint every ``checkpoint_every`` iterations (mid-epoch); with ``evaluate``, the demo's 8 test
    pairs are then fused and scored."""
    def arguments(out: Path) -> list[str]:
        return ["--data.demo-root", str(data), "--save-dir", str(out), "--eval.out", str(out / "output"),
                "--epochs", str(epochs), "--train-num", "24", "--height", "32", "--width", "32", "--step", "4",
                "--no-tensorboard", "--save-every", "1", "--checkpoint-every", str(checkpoint_every),
                *([] if evaluate else ["--eval.root", "None"])]
    return arguments


def crossfuse_files(out: Path) -> dict[str, bytes]:
    """What must be bitwise equal: the `.model` and `.mat` files, the fused images and the metric tables."""
    run = out / "end_to_end"
    paths = [*run.glob("*.model"), *(run / "loss").glob("*.mat"), *(out / "output").rglob("*.png"),
             *(run / "eval").rglob("*.csv")]
    return {str(path.relative_to(out)): path.read_bytes() for path in sorted(paths)}


def compare_crossfuse(fuzzed: Path, reference: Path) -> list[str]:
    """Bitwise differences of :func:`crossfuse_files`, and of the demo gate's numbers."""
    ours, theirs = crossfuse_files(fuzzed), crossfuse_files(reference)
    problems = [f"{name}: only in the {'fuzzed' if name in ours else 'reference'} run" for name in ours.keys() ^ theirs]
    problems += [f"{name} differs" for name in ours.keys() & theirs if ours[name] != theirs[name]]
    reports = [folder / "end_to_end" / "demo_report.json" for folder in (fuzzed, reference)]
    if reports[1].is_file():
        checks = [json.loads(path.read_text())["checks"] if path.is_file() else None for path in reports]
        if checks[0] != checks[1]:
            problems.append("demo_report.json checks differ")
    return problems


def crossfuse_missing(epochs: int, evaluate: bool) -> Callable[[Path], list[str]]:
    """The exports a finished CrossFuse folder must hold: three `.model` files and a `.mat` per epoch, and the
    evaluation's tables and report."""
    def missing(out: Path) -> list[str]:
        run = out / "end_to_end"
        wanted = [run / f"end_to_end_{part}_epoch_{e}.model" for e in range(1, epochs + 1)
                  for part in ("fusion", "ir_encoder", "vi_encoder")]
        wanted += [run / "loss" / f"loss_data_end_to_end_e{e - 1}.mat" for e in range(1, epochs + 1)]
        if evaluate:
            wanted += [run / "eval" / "ivif_demo_test" / name for name in ("metrics.csv", "metrics.json",
                                                                          "metrics_average.csv", "samples.png")]
            wanted.append(run / "demo_report.json")
        return [str(path.relative_to(out)) for path in wanted if not path.is_file()]
    return missing


FRED_VOLATILE = {"config", "log_subdir"}  # the output folder and the log folder's start time differ by design


def fred_arguments(data: Path, annotations: Path, epochs: int) -> Callable[[Path], list[str]]:
    """The 20-frame demo at 64x64 of the FRED tests (7 steps per epoch), the switch after epoch 1, a full state
    and an `ep%03d` export every epoch, mAP every 2 epochs, a mid-epoch checkpoint every 3 steps; mosaic and mixup
    on (the paper's .5/.5; the demo preset turns them off) so a resume must also restore the augmentation draws."""
    def arguments(out: Path) -> list[str]:
        return ["--demo-root", str(data), "--demo-frames", "20", "--annotation-dir", str(annotations),
                "--input-shape", "64", "64", "--freeze-batch-size", "8", "--unfreeze-batch-size", "8",
                "--eval-batch-size", "32", "--epochs", str(epochs), "--freeze-epoch", "1", "--save-period", "1",
                "--eval-period", "2", "--checkpoint-every", "3", "--mosaic", "0.5", "--mixup", "0.5",
                "--save-dir", str(out)]
    return arguments


def tensor_differences(a, b, where: str) -> list[str]:
    """Where two nested checkpoint values differ (tensors by ``torch.equal``, NaN equal to NaN)."""
    import torch

    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and bool(
            torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                  and torch.equal(a.nan_to_num(), b.nan_to_num())))
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [p for key in a for p in tensor_differences(a[key], b[key], f"{where}.{key}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} != {len(b)}"]
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in tensor_differences(x, y, f"{where}[{i}]")]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)
    return [] if same else [f"{where}: {a!r} != {b!r}"]


def fred_log(out: Path) -> Path | None:
    """The log folder the run's newest state names (``loss_<timestamp>``)."""
    state = out / "last_epoch_weights.pth"
    return out / load_checkpoint(state, mmap=True)["log_subdir"] if state.is_file() else None


def compare_fred(fuzzed: Path, reference: Path) -> list[str]:
    """Every tensor and value of the final states (but the output paths), the per-step and per-epoch series of
    ``loss_history.mat``, and the EMA exports bitwise."""
    from common.lossdump import load_mat

    problems = []
    states = sorted(path.name for path in reference.glob("*_weights.pth"))
    for name in states:
        ours, theirs = (load_checkpoint(folder / name) for folder in (fuzzed, reference))
        problems += tensor_differences({k: v for k, v in ours.items() if k not in FRED_VOLATILE},
                                       {k: v for k, v in theirs.items() if k not in FRED_VOLATILE}, name)
    histories = [load_mat(fred_log(folder) / "loss_history.mat") for folder in (fuzzed, reference)]
    if histories[0].keys() != histories[1].keys():
        problems.append("loss_history.mat: other series")
    for key in histories[0].keys() & histories[1].keys():
        if not np.array_equal(histories[0][key], histories[1][key], equal_nan=True):
            problems.append(f"loss_history.mat: {key} differs")
    exports = {path.name for path in reference.glob("*.pth") if not path.name.endswith("_weights.pth")}
    found = {path.name for path in fuzzed.glob("*.pth") if not path.name.endswith("_weights.pth")}
    problems += [f"{name}: only in the {'fuzzed' if name in found else 'reference'} run" for name in found ^ exports]
    problems += [f"{name} differs" for name in found & exports
                 if (fuzzed / name).read_bytes() != (reference / name).read_bytes()]
    return problems


def fred_missing(epochs: int) -> Callable[[Path], list[str]]:
    """An ``ep%03d-*.pth`` (and sidecar) per epoch (save period 1), final weights, and ``fred_fusion_best.pth``
    whose sidecar names the epoch the final state's ``best`` holds."""
    def missing(out: Path) -> list[str]:
        lacking = [f"ep{e:03d}-*.pth" for e in range(1, epochs + 1)
                   if len(list(out.glob(f"ep{e:03d}-loss*.pth"))) != 1 or len(list(out.glob(f"ep{e:03d}-*.json"))) != 1]
        lacking += [name for name in ("fred_fusion_final.pth", "fred_fusion_best.pth", "fred_fusion_best.json")
                    if not (out / name).is_file()]
        if (out / "fred_fusion_best.json").is_file() and (out / "last_epoch_weights.pth").is_file():
            best = load_checkpoint(out / "last_epoch_weights.pth", mmap=True)["best"]
            sidecar = json.loads((out / "fred_fusion_best.json").read_text())
            if sidecar["epoch"] != best["epoch"]:
                lacking.append(f"fred_fusion_best.pth of epoch {best['epoch']} (it holds epoch {sidecar['epoch']})")
        return lacking
    return missing


def crossfuse(data: Path, epochs: int = 4, evaluate: bool = True, checkpoint_every: int = 2) -> Trainer:
    """CrossFuse end-to-end on the TINY demo config (``data``: the generated IVIF demo dataset)."""
    return Trainer("crossfuse", "train_end_to_end.py", crossfuse_arguments(data, epochs, evaluate, checkpoint_every),
                   compare_crossfuse, crossfuse_missing(epochs, evaluate))


def fred(data: Path, annotations: Path, epochs: int = 4) -> Trainer:
    """FRED dual phi n at 64x64 on the 20-frame demo (``data``), annotations cached in ``annotations``."""
    return Trainer("fred", "train_fred_fusion.py", fred_arguments(data, annotations, epochs), compare_fred,
                   fred_missing(epochs))


# ------------------------------------------------------------------------------------------------ the checks

def unreadable_files(folder: Path) -> list[str]:
    """Files under ``folder`` that do not load completely: weights, loss dumps, JSON, PNG."""
    import scipy.io
    from PIL import Image

    bad = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not TEMP_NAME.match(p.name)):
        try:
            if path.suffix in (".pth", ".model"):
                load_checkpoint(path)
            elif path.suffix == ".mat":
                scipy.io.loadmat(str(path))
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".png":
                with Image.open(path) as image:
                    image.load()
        except Exception as error:  # any failure to read counts; the report names it
            bad.append(f"{path.relative_to(folder)}: {type(error).__name__}: {str(error)[:120]}")
    return bad


# ------------------------------------------------------------------------------------------------ running

@dataclasses.dataclass
class Attempt:
    """One start of the command: how it was stopped and what it left."""

    mode: str  # "write", "random" (kill -9 during a write / at a random moment), "SIGTERM", "SIGINT" or "none"
    seconds: float
    returncode: int
    mid_write: bool = False  # killed while a write was in progress (its temporary file was left behind)
    orphans: list[str] = dataclasses.field(default_factory=list)  # temporary files it left
    resumed: bool = False  # it continued from a checkpoint
    first_write: float | None = None  # seconds from the start to its first write (its start-up is over)
    stop_seconds: float | None = None  # from the signal to the exit (SIGTERM, SIGINT)
    output: str = ""


@dataclasses.dataclass
class FuzzResult:
    """A fuzzed run and its comparison with the reference."""

    trainer: str
    requested: int
    attempts: list[Attempt]
    reference: Attempt | None  # the uninterrupted run, when this fuzz ran it
    fuzz_seconds: float
    unreadable: list[str]
    survivors: list[str]  # orphans still there after a later start had opened the run folder
    orphans_left: list[str]  # temporary files still there after the final run
    differences: list[str]
    missing: list[str]

    @property
    def kills(self) -> list[Attempt]:
        """The attempts stopped by kill -9."""
        return [a for a in self.attempts if a.mode in KILLS and a.returncode == -signal.SIGKILL]

    @property
    def finished(self) -> bool:
        """The last attempt ran to the end (exit 0)."""
        return bool(self.attempts) and self.attempts[-1].returncode == 0

    @property
    def ok(self) -> bool:
        """Every check passed, with the kills asked for."""
        signalled = all(a.returncode == EXIT_CODES[a.mode] for a in self.attempts if a.mode in SIGNALS)
        return (self.finished and signalled and len(self.kills) >= self.requested and not (
            self.unreadable or self.survivors or self.orphans_left or self.differences or self.missing))

    def report(self) -> str:
        """Each attempt, then what failed (for a log or an assertion message)."""
        lines = [f"{a.mode:>7}: exit {a.returncode}, {a.seconds:5.1f} s, first write "
                 f"{'-' if a.first_write is None else f'{a.first_write:.1f} s'}, left {a.orphans}"
                 for a in self.attempts]
        lines += [f"unreadable: {self.unreadable}", f"orphans surviving a start: {self.survivors}",
                  f"orphans after the final run: {self.orphans_left}", f"differences: {self.differences[:10]}",
                  f"missing: {self.missing}"]
        return "\n".join(lines) + "\n--- output of the last run ---\n" + self.attempts[-1].output[-3000:]


KILLS = ("write", "random")
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
EXIT_CODES = {"SIGTERM": 75, "SIGINT": 130}  # what the trainers promise after a stop signal (common/preempt.py)


@dataclasses.dataclass(frozen=True)
class Moment:
    """When an attempt is stopped: ``delay`` seconds after its start, or after its first write (``anchored``)."""

    delay: float
    anchored: bool = False


def attempt(command: Sequence[str], cwd: Path, folder: Path, mode: str, moment: Moment = Moment(0.0),
            timeout: float = 600.0, until: Callable[[str], bool] | None = None) -> Attempt:
    """Start ``command`` once and stop it as ``mode`` says.

    - ``random``: kill -9 at ``moment``;
    - ``write``: kill -9 at the first time from ``moment`` on when a write is in progress (a temporary file the
      trainer created exists);
    - ``SIGTERM``/``SIGINT``: send that signal once ``until(output so far)`` is true, then let it exit;
    - ``none``: let it run to its end.

    The output goes to a file (no pipe to fill up); the orphans are the temporary files left once it stopped.
    """
    before = temp_files(folder)  # orphans of the previous attempts: this one should remove them
    killed, signalled_at, first_write = False, None, None
    with tempfile.TemporaryFile("w+", encoding="utf-8") as log:
        started = time.perf_counter()
        deadline = started + timeout
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=cwd,
                                   start_new_session=True)
        while process.poll() is None and time.perf_counter() < deadline and not killed:
            elapsed = time.perf_counter() - started
            writing = temp_files(folder) - before
            if writing and first_write is None:
                first_write = elapsed
            due = (first_write is not None and elapsed - first_write >= moment.delay if moment.anchored
                   else elapsed >= moment.delay)
            if mode == "random":
                killed = due
            elif mode == "write":
                killed = due and bool(writing)
            elif mode in SIGNALS and signalled_at is None:
                log.seek(0)
                if until(log.read()):
                    process.send_signal(SIGNALS[mode])
                    signalled_at = time.perf_counter()
            if killed:
                os.killpg(process.pid, signal.SIGKILL)  # the whole session: data-loader workers too
            else:
                time.sleep(POLL_S)
        try:
            returncode = process.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            returncode = process.wait()
        ended = time.perf_counter()
        log.seek(0)
        output = log.read()
    left = temp_files(folder) - before
    return Attempt(mode, ended - started, returncode, mid_write=killed and bool(left),
                   orphans=sorted(str(p.relative_to(folder)) for p in left), resumed="resumed from" in output,
                   first_write=first_write, stop_seconds=ended - signalled_at if signalled_at is not None else None,
                   output=output)


def kill_moments(rng: np.random.Generator, reference: Attempt, kills: int) -> list[Moment]:
    """Random kill moments spread over the whole run: a quarter during the start-up (before the first write), the
    others a random time after the attempt's first write, averaging 1/(kills+1) of the reference's work, so each
    rerun gets a little further than the last and the last kills fall near the run's end."""
    startup = reference.first_write or 0.0
    step = 2.0 * (reference.seconds - startup) / (kills + 1)
    return [Moment(float(rng.uniform(0.0, startup))) if rng.random() < 0.25
            else Moment(float(rng.uniform(0.0, step)), anchored=True) for _ in range(kills)]


def fuzz(trainer: Trainer, work: Path, kills: int, seed: int = 0,
         faults: Sequence[tuple[str, Callable[[str], bool]]] = (), moments: Sequence[Moment] | None = None,
         reference: Path | None = None, timeout: float = 600.0) -> FuzzResult:
    """Run ``trainer`` uninterrupted into ``work/reference`` (unless a ``reference`` folder of the same command's
    run is given), then the same command into ``work/fuzzed``: first the signal ``faults`` (name, when to send
    it), then ``kills`` kill -9 (every other one during a write) at ``moments`` (default: :func:`kill_moments`
    drawn with ``seed`` from the reference run's timing), rerunning the command after each; then once more to its
    end; then check the folder."""
    uninterrupted = None
    if reference is None:
        reference = work / "reference"
        uninterrupted = attempt(trainer.command(reference), work, reference, "none", timeout=timeout)
        if uninterrupted.returncode != 0:
            raise RuntimeError(f"the reference run failed ({uninterrupted.returncode}):\n"
                               f"{uninterrupted.output[-3000:]}")
    if moments is None:
        moments = kill_moments(np.random.default_rng(seed), uninterrupted, kills)
    fuzzed = work / "fuzzed"
    command = trainer.command(fuzzed)
    plan = [*((name, Moment(0.0), until) for name, until in faults),
            *(("write" if k % 2 == 0 else "random", moments[k], None) for k in range(kills)),
            ("none", Moment(0.0), None)]
    attempts: list[Attempt] = []
    orphaned: set[str] = set()
    survivors: list[str] = []
    started = time.perf_counter()
    for mode, moment, until in plan:
        attempts.append(attempt(command, work, fuzzed, mode, moment, timeout, until))
        present = {str(p.relative_to(fuzzed)) for p in temp_files(fuzzed)}
        if attempts[-1].first_write is not None:  # it opened the run folder: no earlier orphan may be left
            survivors += sorted(orphaned & present)
        orphaned |= set(attempts[-1].orphans)
        stopped_by_us = attempts[-1].returncode == -signal.SIGKILL or mode in SIGNALS
        if attempts[-1].returncode == 0 or not stopped_by_us:
            break  # finished, or failed by itself
    fuzz_seconds = time.perf_counter() - started
    finished = attempts[-1].returncode == 0
    return FuzzResult(trainer.name, kills, attempts, uninterrupted, fuzz_seconds, unreadable_files(fuzzed), survivors,
                      sorted(str(p.relative_to(fuzzed)) for p in temp_files(fuzzed)),
                      trainer.compare(fuzzed, reference) if finished else ["the fuzzed run did not finish"],
                      trainer.missing_exports(fuzzed) if finished else [])


# ------------------------------------------------------------------------------------------------ the report

def machine() -> str:
    """CPU model, cores, load average and library versions of this machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    cpu = names[0] if names else cpu
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, load average {load}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, 1 thread per process")


def table(results: Sequence[FuzzResult]) -> str:
    """The summary table (Markdown)."""
    rows = ["| trainer | stop signal first | kills | of which mid-write | reruns | resumed from a checkpoint | "
            "unreadable files | orphans left by kills | orphans after the next start | orphans after the final run | "
            "equal to uninterrupted | exports present | wall (fuzzed) | wall (uninterrupted) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|:---:|---:|---:|"]
    for r in results:
        uninterrupted = f"{r.reference.seconds:.0f} s" if r.reference else "-"
        stops = ", ".join(f"{a.mode}: exit {a.returncode} after {a.stop_seconds:.1f} s"
                          for a in r.attempts if a.mode in SIGNALS and a.stop_seconds is not None) or "-"
        rows.append(
            f"| {r.trainer} | {stops} | {len(r.kills)} | {sum(a.mid_write for a in r.kills)} | {len(r.attempts) - 1} | "
            f"{sum(a.resumed for a in r.attempts)} | {len(r.unreadable)} | {sum(len(a.orphans) for a in r.kills)} | "
            f"{len(r.survivors)} | {len(r.orphans_left)} | {'yes' if r.finished and not r.differences else 'NO'} | "
            f"{'yes' if r.finished and not r.missing else 'NO'} | {r.fuzz_seconds:.0f} s | {uninterrupted} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainer", choices=("crossfuse", "fred", "both"), default="both")
    parser.add_argument("--kills", type=int, default=15, help="kill -9 per trainer (every other one mid-write)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one, deleted)")
    args = parser.parse_args(argv)

    from common.ivif.demo import ensure_ivif_demo
    from fred.demo_data import ensure_fred_demo

    work = args.work or Path(tempfile.mkdtemp(prefix="fuzz_kill_"))
    # Before the kills, a stop signal mid-epoch from outside, as a scheduler (SIGTERM) or a user (Ctrl-C) sends it.
    stops = {"crossfuse": ("SIGINT", lambda output: "Epoch 1/4 - Batch 4/6" in output),
             "fred": ("SIGTERM", lambda output: "Epoch 1/4 [freeze]" in output)}
    trainers = []
    if args.trainer in ("crossfuse", "both"):
        trainers.append(crossfuse(ensure_ivif_demo(work / "ivif_demo", 0)))
    if args.trainer in ("fred", "both"):
        trainers.append(fred(ensure_fred_demo(work / "fred_demo_small", seed=0, frames=20), work / "fred_annotations"))
    results, notes = [], []
    try:
        for trainer in trainers:
            folder = work / trainer.name
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            print(f"{trainer.name}: reference run, then {stops[trainer.name][0]} and {args.kills} kills ...",
                  flush=True)
            result = fuzz(trainer, folder, args.kills, args.seed, faults=[stops[trainer.name]])
            results.append(result)
            if trainer.name == "fred":  # an attempt killed before its first state starts a new log folder
                logs = [len(list((folder / run).glob("loss_*"))) for run in ("fuzzed", "reference")]
                notes.append(f"FRED log folders (loss_<time>): fuzzed {logs[0]}, uninterrupted {logs[1]}")
            report = result.report().splitlines()
            print("\n".join(f"  {line}" for line in (report if not result.ok else report[:len(result.attempts)])),
                  flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results))
    for note in notes:
        print(f"\n{note}")
    print(f"\nmachine: {machine()}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
