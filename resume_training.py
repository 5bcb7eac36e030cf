"""Find a run's latest checkpoint and print (or launch) the command that resumes it.

Any trainer's run directory:

    python resume_training.py RUN_DIR [--stage STAGE] [--launch]

FRED's form from its notes (``logs/fred_fusion`` for dual, else ``logs/fred_<modality>``):

    python resume_training.py rgb|event|dual|fusion [auto|freeze|unfreeze] [-- extra train flags]

``auto`` takes the newest full state; ``freeze`` the newest freeze checkpoint and stops at the end of the freeze
stage; ``unfreeze`` the newest unfreeze checkpoint, or else the newest freeze checkpoint straight into the
unfreeze stage. Importable without torch: ``find_latest_checkpoint(run_dir, stage)`` returns ``(N, path)`` of
the highest-numbered checkpoint of ``stage`` (any stage if None), or None.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from common.ckpt_names import list_checkpoints

FRED_MODALITIES = {"rgb": "rgb", "event": "event", "dual": "dual", "fusion": "dual"}
FRED_STAGES = ("auto", "freeze", "unfreeze")
USAGE = __doc__


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


def without_resume_flags(argv: list[str]) -> list[str]:
    """A run's original arguments minus earlier resume flags: ``--resume [VALUE]``, ``--resume-from PATH``."""
    result: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        name = arg.split("=", 1)[0].replace("_", "-")
        index += 1
        if name not in ("--resume", "--resume-from"):
            result.append(arg)
            continue
        takes_next = "=" not in arg and index < len(argv) and not argv[index].startswith("-")
        if takes_next:
            index += 1
    return result


def generic_command(run_dir: Path, checkpoint: Path) -> list[str]:
    """The command resuming ``checkpoint`` of a run directory, from the run's ``run.json``."""
    record_path = run_dir / "run.json"
    if not record_path.is_file():
        raise SystemExit(f"error: {record_path} not found: is {run_dir} a run directory written by these trainers?")
    record = json.loads(record_path.read_text())
    resume = [arg.replace("{checkpoint}", str(checkpoint)) for arg in record.get("resume_args", ["--resume", "{checkpoint}"])]
    script = record["script"] if record["script"].endswith(".py") else f"{record['script']}.py"
    return ["accelerate", "launch", script, *without_resume_flags(record.get("argv", [])), *resume]


def fred_choice(log_dir: Path, stage: str) -> tuple[Path, list[str]] | None:
    """FRED: the checkpoint to resume and the extra flags, for ``auto``/``freeze``/``unfreeze``."""
    freeze = find_latest_checkpoint(log_dir, "freeze")
    unfreeze = find_latest_checkpoint(log_dir, "unfreeze")
    if stage == "freeze":
        return (freeze[1], ["--freeze-training"]) if freeze else None
    if stage == "unfreeze":
        if unfreeze:
            return unfreeze[1], []
        if freeze:
            print(f"no unfreeze checkpoint in {log_dir}; continuing from {freeze[1].name} into the unfreeze stage")
            return freeze[1], []
        return None
    candidates = [c for c in (freeze, unfreeze) if c]
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[0])[1], []


def print_found(directory: Path) -> None:
    """List every checkpoint of a directory by stage."""
    found = list_checkpoints(directory)
    if not found:
        print(f"  no checkpoints in {directory}")
    for number, path in found:
        print(f"  {path}  (#{number})")


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
                print(f"\n{fred_log_dir(modality)}:")
                print_found(fred_log_dir(modality))
        return 0 if argv else 1
    launch = "--launch" in argv
    argv = [arg for arg in argv if arg != "--launch"]
    if argv[0] in FRED_MODALITIES and not Path(argv[0]).is_dir():
        stage = argv[1] if len(argv) > 1 else "auto"
        if stage not in FRED_STAGES:
            print(f"error: stage must be one of {', '.join(FRED_STAGES)}, not {stage!r}", file=sys.stderr)
            return 2
        log_dir = fred_log_dir(argv[0])
        choice = fred_choice(log_dir, stage)
        if choice is None:
            print(f"error: no {'' if stage == 'auto' else stage + ' '}checkpoint in {log_dir}", file=sys.stderr)
            print_found(log_dir)
            return 2
        checkpoint, flags = choice
        command = ["accelerate", "launch", "train_fred_fusion.py", "--modality", FRED_MODALITIES[argv[0]],
                   "--save-dir", str(log_dir), "--resume", "--resume-from", str(checkpoint), *flags, *extra]
        launch = True  # the notes' form trains right away
    else:
        run_dir = Path(argv[0])
        stage = None
        if "--stage" in argv:
            index = argv.index("--stage")
            if index + 1 >= len(argv):
                print("error: --stage needs a value", file=sys.stderr)
                return 2
            stage = argv[index + 1]
        if not run_dir.is_dir():
            print(f"error: run directory {run_dir} does not exist", file=sys.stderr)
            return 2
        found = find_latest_checkpoint(run_dir, stage, recursive=True)
        if found is None:
            print(f"error: no {'' if stage is None else stage + ' '}checkpoint under {run_dir}", file=sys.stderr)
            print_found(run_dir)
            return 2
        checkpoint = found[1]
        command = generic_command(run_dir, checkpoint) + extra
    print(f"latest checkpoint: {checkpoint}")
    print("resume with:")
    print("  " + shlex.join(command))
    if not launch:
        return 0
    sys.stdout.flush()
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
