"""A run's folder from start to finish: created readable by others, cleaned of the temporary files that killed
writes leave, holding the records that ``resume_training.py`` and colleagues read, the console log, and a closing
summary that says where the results are and what to run next.

    run = RunFolder(cfg.save_dir, accelerator, console)
    run.open(SCRIPT, cfg, argv)            # config.json, run.json, console.log; orphan temp files removed
    ...
    run.finish({"report": path, "samples": grid}, ["python predict.py ..."])
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from common.checkpoint import atomic_write_json, make_dirs, remove_orphan_temps
from common.run import config_to_dict, environment_info

def launcher(num_processes: int) -> list[str]:
    """How this process was started, as the head of a command line: ``accelerate launch`` (which sets
    ``ACCELERATE_MIXED_PRECISION`` for its children), ``torchrun``, or plain ``python``."""
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        return ["accelerate", "launch"] + (["--num_processes", str(num_processes)] if num_processes > 1 else [])
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return ["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", str(num_processes))]
    return ["python"]


class RunFolder:
    """The folder of one run (see the module docstring). Only the main process writes."""

    def __init__(self, path: str | Path, accelerator, console):
        self.path = Path(path)
        self.accelerator = accelerator
        self.console = console
        self.is_main = accelerator.is_main_process
        self.opened = False

    def open(self, script: str, config: Any, argv: Sequence[str], resume_args: Sequence[str] = ("--resume", "auto"),
             extra: Mapping[str, Any] | None = None) -> None:
        """Create the folder, remove orphan temporary files, start the console log, write ``config.json`` (the
        resolved config) and ``run.json`` (script, command line, how to continue it, environment).

        Call it when the run is about to write (a rerun of a finished run changes nothing); only the first call
        of a process does anything."""
        if self.opened:
            return
        self.opened = True
        if self.is_main:
            make_dirs(self.path)
            removed = remove_orphan_temps(self.path)
            self.console.set_log_file(self.path / "console.log")
            if removed:
                self.console.print(f"removed {len(removed)} temporary file(s) left by an interrupted write in "
                                   f"{self.path}")
            atomic_write_json(self.path / "config.json", config_to_dict(config))
            record = {"script": script, "argv": list(argv), "resume_args": list(resume_args),
                      "launcher": launcher(self.accelerator.num_processes),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"), "environment": environment_info(),
                      **(extra or {})}
            atomic_write_json(self.path / "run.json", record)
        self.accelerator.wait_for_everyone()

    def remove(self, paths: Sequence[Path], reason: str) -> None:
        """Delete earlier files and folders (``--overwrite``) on the main process, then let every process continue."""
        if self.is_main and paths:
            for path in map(Path, paths):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            self.console.print(f"{reason}: deleted {len(paths)} earlier file(s) in {self.path}")
        self.accelerator.wait_for_everyone()

    def finish(self, results: Mapping[str, Path | str], next_steps: Sequence[str] = (), title: str = "done") -> None:
        """The closing summary: where each result is, and the commands worth running next."""
        lines = [f"{title}: results in {self.path}"]
        lines += [f"  {name:<12} {value}" for name, value in results.items()]
        if next_steps:
            lines.append("next:")
            lines += [f"  {step}" for step in next_steps]
        for line in lines:
            self.console.print(line)

