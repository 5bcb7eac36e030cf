"""Run set-up: the Accelerator from a config, seeding, and the run directory's record of what ran.

``mixed_precision`` is ``"no"``, ``"bf16"``, ``"fp16"`` or ``"launch"`` (defer to ``accelerate launch
--mixed_precision``). fp16 without an accelerator is downgraded to ``"no"`` with a warning: Accelerate creates
no GradScaler on the CPU, and fp16 autocast there would silently run unscaled.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch



@dataclasses.dataclass(frozen=True)
class AcceleratorSettings:
    """What :func:`make_accelerator` needs from a trainer's config."""

    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    find_unused_parameters: bool = False
    cpu: bool = False
    log_with_tensorboard: bool = True


def resolve_precision(requested: str, warn: Callable[[str], None]) -> str:
    """The precision to use: ``launch`` defers to the launcher; fp16 without CUDA becomes ``no`` with a warning."""
    if requested == "launch":
        requested = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if requested not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed precision must be no, bf16, fp16 or launch, not {requested!r}")
    if requested == "fp16" and not torch.cuda.is_available():
        warn("fp16 mixed precision needs a GPU (Accelerate has no loss scaler on the CPU); training in fp32 ('no')")
        return "no"
    return requested


def make_accelerator(settings: AcceleratorSettings, project_dir: str | Path | None = None,
                     warn: Callable[[str], None] = print):
    """Build the Accelerator (DDP options, precision, accumulation, TensorBoard logging under ``project_dir``)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    precision = resolve_precision(settings.mixed_precision, warn)
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=settings.find_unused_parameters)]
    log_with = None
    project_config = None
    if settings.log_with_tensorboard and project_dir is not None:
        log_with = "tensorboard"
        project_config = ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir))
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        kwargs_handlers=handlers,
        cpu=settings.cpu or not torch.cuda.is_available(),
        log_with=log_with,
        project_config=project_config,
    )


def start_accelerator(settings: AcceleratorSettings, project_dir: str | Path | None = None):
    """The Accelerator and the run's console (quiet on other processes); set-up warnings go to the console, so
    they also reach the run's log once it is opened."""
    from common.console import RunConsole

    warnings: list[str] = []
    accelerator = make_accelerator(settings, project_dir, warn=warnings.append)
    console = RunConsole(is_main=accelerator.is_main_process)
    for warning in warnings:
        console.warn(warning)
    return accelerator, console


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) identically on every process."""
    from accelerate.utils import set_seed

    set_seed(seed)


def git_revision(path: str | Path = ".") -> str:
    """The project's git commit (with ``+dirty`` when the tree has changes), or ``unknown``."""
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_info() -> dict:
    """Versions and hardware of this process (for the run directory)."""
    import accelerate
    import numpy

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "git": git_revision(),
    }
    return info


def config_to_dict(config: Any) -> Any:
    """A (nested) dataclass config as JSON-ready plain values."""
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(item) for item in config]
    if isinstance(config, dict):
        return {str(k): config_to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config


def parameter_fingerprints(accelerator, module) -> list[str]:
    """SHA-256 of every parameter's name and bytes, one per process in rank order (collective): data-parallel
    processes must end a stage with identical weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, parameter in module.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    fingerprints = [digest.hexdigest()]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        fingerprints = list(gather_object(fingerprints))
    return fingerprints


def broadcast_from_main(accelerator, value: Any) -> Any:
    """The main process's ``value`` on every process (collective; for the few per-epoch numbers only the main
    process computes, such as validation metrics)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def user_message(error: BaseException) -> str:
    """The one-line message of a user-facing error; an error re-raised from a data-loader worker carries the
    worker's traceback in its text, of which only the original message is kept."""
    text = str(error)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def exit_on_user_error(main: Callable[[], int | None]) -> int:
    """Run ``main`` and turn what a user can act on into one ``error:`` line and an exit code, never a traceback:

    - a :class:`common.errors.UserError` (bad data or settings, refused or unreadable checkpoints, a full or
      read-only output folder, non-finite training...), also when raised inside a data-loader worker: exit 2;
    - a stop signal outside the training loop (:class:`common.preempt.Preempted`): exit 75 (SIGTERM) or 130;
    - Ctrl-C pressed twice: exit 130.
    """
    from common.checkpoint import OUTPUT_ERRNOS
    from common.errors import UserError
    from common.preempt import INTERRUPTED_EXIT_CODE, Preempted, restore_all

    try:
        return int(main() or 0)
    except UserError as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return 2
    except Preempted as error:
        print(f"stopped: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): every file written so far is complete; run the same command again to "
              "continue from the last checkpoint", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except OSError as error:
        advice = OUTPUT_ERRNOS.get(error.errno)
        if advice is None:
            raise
        print(f"error: cannot write {error.filename or 'an output file'}: {advice}", file=sys.stderr)
        return 2
    finally:
        restore_all()


def check_amp_invariant(accelerator) -> None:
    """fp16 on an accelerator must have Accelerate's GradScaler (checked at start and after each stage switch)."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type != "cpu" and accelerator.scaler is None:
        raise RuntimeError("fp16 training without a loss scaler: the Accelerator lost its GradScaler")


def end_processes(accelerator) -> None:
    """Close the trackers and the process group once every process has arrived here.

    Why the barrier: a process that destroys a gloo group while its peer is still writing its last files can make the
    peer abort at exit ("terminate called without an active exception"; seen in a 2-process test on a loaded machine).
    """
    accelerator.wait_for_everyone()
    accelerator.end_training()


def end_stage(accelerator) -> None:
    """Between the stages of one process's run: close this stage's trackers (the next stage opens its own), wait for
    every process and release the prepared models and optimizers."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
    accelerator.wait_for_everyone()
    accelerator.free_memory()
