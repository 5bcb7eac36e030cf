"""Find a run's latest checkpoint and print (or launch) the command that continues it.

Importable without torch: ``find_latest_checkpoint(run_dir, stage)`` returns ``(N, path)`` of the
highest-numbered checkpoint of ``stage`` (any stage if None) directly in ``run_dir``, or None.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from common.ckpt_names import list_checkpoints

USAGE = """\
usage: python resume_training.py RUN_DIR [--stage STAGE] [--launch] [-- EXTRA FLAGS]
       python resume_training.py rgb|event|dual|fusion [auto|freeze|unfreeze] [-- EXTRA FLAGS]

Continue an interrupted training run. RUN_DIR is the folder a trainer wrote (for example models/end_to_end,
logs/fred_fusion, runs/colorize/demo); the command that started it is read from its run.json, and the
command that continues it is printed (and run with --launch). Every trainer continues an interrupted run
when the same command is run again (--resume auto), so this prints that command with --resume auto.

FRED's form (from its notes): the run folder is logs/fred_fusion for dual (alias fusion), else
logs/fred_<modality>; it trains right away.
  auto      continue from the newest checkpoint
  freeze    continue from the newest freeze checkpoint and stop at the end of the freeze stage
  unfreeze  continue from the newest unfreeze checkpoint, or else from the newest freeze checkpoint
            straight into the unfreeze stage

--stage STAGE   show the newest checkpoint of that stage (e.g. fusion, autoencoder-ir, freeze)
--launch        run the printed command
"""

FRED_MODALITIES = {"rgb": "rgb", "event": "event", "dual": "dual", "fusion": "dual"}
FRED_STAGES = ("auto", "freeze", "unfreeze")
# Flags of one invocation, never part of the command that continues a run (with their value, if any).
INVOCATION_FLAGS = {"--resume": True, "--resume-from": True, "--resume-state": True, "--stop-after": True,
                    "--overwrite": False, "--checkpoint": True, "--freeze-training": False, "--quick-test": False,
                    "--eval-only": False}
RECORD = "run.json"


def find_latest_checkpoint(run_dir: str | Path, stage: str | None = None,
                           recursive: bool = False) -> tuple[int, Path] | None:
    """``(N, path)`` of the newest checkpoint of ``stage`` in ``run_dir`` by parsed number (never by time).

    Only files directly in ``run_dir`` unless ``recursive`` (FRED's ``quick_test/`` sub-run is not a candidate).
    """
    found = list_checkpoints(run_dir, stage, recursive)
    return found[-1] if found else None


def fred_log_dir(modality: str) -> Path:
    """FRED's default run directory for a modality."""
    name = FRED_MODALITIES[modality]
    return Path("logs") / ("fred_fusion" if name == "dual" else f"fred_{name}")


def _flag_name(arg: str) -> str:
    return arg.split("=", 1)[0].replace("_", "-")


def without_invocation_flags(argv: list[str]) -> list[str]:
    """A run's original arguments minus the flags of that one invocation (resume, stop, overwrite)."""
    result: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        name = _flag_name(arg)
        if name not in INVOCATION_FLAGS:
            result.append(arg)
            continue
        takes_value = INVOCATION_FLAGS[name] and "=" not in arg
        if takes_value and index < len(argv) and not argv[index].startswith("--"):
            index += 1
    return result


def find_record(run_dir: Path) -> Path | None:
    """The ``run.json`` of a run folder: in it or in one of its two parents (a stage folder of a run)."""
    for folder in (run_dir, run_dir.parent, run_dir.parent.parent):
        if (folder / RECORD).is_file():
            return folder / RECORD
    return None


def continue_command(record_path: Path, resume: list[str], extra: list[str]) -> list[str]:
    """The command continuing the run of ``record_path``: its launcher, script and arguments, then ``resume``."""
    record = json.loads(record_path.read_text())
    script = record["script"] if record["script"].endswith(".py") else f"{record['script']}.py"
    launcher = record.get("launcher", ["python"])
    flag = record.get("resume_args", ["--resume", "auto"])[0]
    resume = [flag if arg == "--resume" else arg for arg in resume]
    return [*launcher, script, *without_invocation_flags(record.get("argv", [])), *resume, *extra]


def fred_choice(log_dir: Path, stage: str) -> tuple[list[str], str] | None:
    """FRED: the resume flags for ``auto``/``freeze``/``unfreeze`` and a description of the choice."""
    freeze = find_latest_checkpoint(log_dir, "freeze")
    unfreeze = find_latest_checkpoint(log_dir, "unfreeze")
    if stage == "freeze":
        return (["--resume", str(freeze[1]), "--freeze-training"], f"{freeze[1]}") if freeze else None
    if stage == "unfreeze":
        if unfreeze:
            return ["--resume", str(unfreeze[1])], str(unfreeze[1])
        if freeze:
            return ["--resume", str(freeze[1])], f"{freeze[1]} (no unfreeze checkpoint: into the unfreeze stage)"
        return None
    if not (freeze or unfreeze or (log_dir / "last_epoch_weights.pth").is_file()):
        return None
    return ["--resume", "auto"], "the newest full state (--resume auto)"


def print_found(directory: Path) -> None:
    """List every checkpoint of a directory by stage."""
    found = list_checkpoints(directory)
    if not found:
        print(f"  no checkpoints in {directory}")
    for number, path in found:
        print(f"  {path}  (#{number})")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    """Command-line entry point."""
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        for modality in ("dual", "rgb", "event"):
            if fred_log_dir(modality).is_dir():
                print(f"{fred_log_dir(modality)}:")
                print_found(fred_log_dir(modality))
        return 0 if argv else 1
    launch = "--launch" in argv
    argv = [arg for arg in argv if arg != "--launch"]
    if argv[0] in FRED_MODALITIES and not Path(argv[0]).is_dir():
        stage = argv[1] if len(argv) > 1 else "auto"
        if stage not in FRED_STAGES:
            return _fail(f"stage must be one of {', '.join(FRED_STAGES)}, not {stage!r}")
        log_dir = fred_log_dir(argv[0])
        choice = fred_choice(log_dir, stage)
        if choice is None:
            print_found(log_dir)
            return _fail(f"no {'' if stage == 'auto' else stage + ' '}checkpoint in {log_dir}")
        resume, described = choice
        record = find_record(log_dir)
        if record is not None:
            command = continue_command(record, resume, extra)
        else:
            command = ["python", "train_fred_fusion.py", "--modality", FRED_MODALITIES[argv[0]], "--save-dir",
                       str(log_dir), *resume, *extra]
        print(f"continuing from {described}")
        launch = True  # the notes' form trains right away
    else:
        run_dir = Path(argv[0])
        stage = None
        if "--stage" in argv:
            index = argv.index("--stage")
            if index + 1 >= len(argv):
                return _fail("--stage needs a value")
            stage = argv[index + 1]
        if not run_dir.is_dir():
            return _fail(f"run directory {run_dir} does not exist")
        record = find_record(run_dir)
        if record is None:
            return _fail(f"{run_dir} has no {RECORD} (nor its parents): is it a run folder written by these trainers?")
        found = find_latest_checkpoint(run_dir, stage, recursive=True)
        if found is not None:
            print(f"latest checkpoint: {found[1]}")
        elif stage is not None:
            print_found(run_dir)
            return _fail(f"no {stage} checkpoint under {run_dir}")
        command = continue_command(record, ["--resume", "auto"], extra)
    print("continue with:")
    print("  " + shlex.join(command))
    if not launch:
        return 0
    sys.stdout.flush()
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
