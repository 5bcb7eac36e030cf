"""Console output: a rich progress bar in a terminal, one parseable line per log interval everywhere else.

Only the main process prints. Every printed line is also appended to the run's console log file, without
control codes. Plain log lines look like::

    step 20/384 | epoch 1/12 | loss 1234.567890 | lr 1.000e-03 | it/s 3.91 | eta 0:01:33
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path
from typing import Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def is_interactive() -> bool:
    """True when stdout is a terminal and not a CI job (then a live progress bar is shown)."""
    if os.environ.get("CI") or os.environ.get("TERM") == "dumb":
        return False
    return sys.stdout.isatty()


def format_value(name: str, value) -> str:
    """Fixed formatting of one log field: lr in scientific notation, floats with 6 decimals."""
    if isinstance(value, float):
        if name.startswith("lr"):
            return f"{value:.3e}"
        return f"{value:.6f}"
    return str(value)


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` for a number of seconds (``?`` if unknown)."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


class RunConsole:
    """Prints on the main process; drives the progress bar and the plain log lines."""

    def __init__(self, is_main: bool = True, log_file: str | Path | None = None, interactive: bool | None = None):
        self.is_main = is_main
        self.interactive = is_interactive() if interactive is None else interactive
        self.console = Console(highlight=False, soft_wrap=True, force_terminal=self.interactive or None,
                               no_color=not self.interactive, emoji=False)
        self.log_path = Path(log_file) if log_file else None
        self._unlogged: list[str] = []  # lines printed before the run folder (and its log) existed
        self._progress: Progress | None = None
        self._task = None
        self._total = 0
        self._start_time = None
        self._start_step = 0

    def set_log_file(self, path: str | Path) -> None:
        """Append printed lines to ``path`` from now on, starting with those printed before."""
        self.log_path = Path(path)
        pending, self._unlogged = self._unlogged, []
        for text in pending:
            self._tee(text)

    def _tee(self, text: str) -> None:
        if not self.is_main:
            return
        if self.log_path is None:
            self._unlogged.append(text)
            return
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(text + "\n")

    def print(self, text: str) -> None:
        """Print one line (main process only), above the progress bar if one is live."""
        if not self.is_main:
            return
        target = self._progress.console if self._progress is not None else self.console
        target.print(text, markup=False)
        self._tee(text)

    def warn(self, text: str) -> None:
        """Print a warning line."""
        self.print(f"WARNING: {text}")

    def start(self, total: int, description: str = "train", completed: int = 0) -> None:
        """Begin a run of ``total`` steps (``completed`` already done when resuming)."""
        self._total = total
        self._start_time = time.perf_counter()
        self._start_step = completed
        if not (self.is_main and self.interactive):
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, completed=completed, status="")

    def rate(self, step: int) -> tuple[float, float]:
        """Steps per second since :meth:`start` and the estimated seconds left."""
        if self._start_time is None:
            return float("nan"), float("nan")
        elapsed = time.perf_counter() - self._start_time
        done = step - self._start_step
        speed = done / elapsed if elapsed > 0 and done > 0 else float("nan")
        left = (self._total - step) / speed if speed == speed and speed > 0 else float("nan")
        return speed, left

    def advance(self, step: int) -> None:
        """Move the progress bar to ``step`` (cheap; no output when not interactive)."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def log(self, step: int, fields: Mapping[str, object], line: str | None = None) -> None:
        """Report a log interval: update the bar fields, and print ``line`` (or the standard plain line)."""
        speed, left = self.rate(step)
        if self._progress is not None:
            status = " ".join(f"{k} {format_value(k, v)}" for k, v in fields.items()) + f" it/s {speed:.2f}"
            self._progress.update(self._task, completed=step, status=status)
            if line is not None:
                self.print(line)
            return
        if line is None:
            parts = [f"step {step}/{self._total}"]
            parts += [f"{k} {format_value(k, v)}" for k, v in fields.items()]
            parts += [f"it/s {speed:.2f}", f"eta {format_eta(left)}"]
            line = " | ".join(parts)
        self.print(line)

    def stop(self) -> None:
        """Close the progress bar."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
