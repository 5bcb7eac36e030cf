"""Graceful stops: SIGTERM/SIGUSR1 (a scheduler's preemption) and Ctrl-C set a flag; at the next step boundary
every process agrees to stop, the trainer saves its state atomically and exits with a documented code.

- SIGTERM/SIGUSR1 -> :data:`PREEMPTED_EXIT_CODE` (75, "try again"): requeue the same command, it continues.
- Ctrl-C (SIGINT) -> the same save, then exit code 130; a second Ctrl-C stops at once (nothing is half-written:
  every file is written atomically).

Outside the training loop (evaluation, exports), :meth:`Preemption.raise_if_requested` stops with
:class:`Preempted`, which :func:`common.run.exit_on_user_error` turns into the same exit codes; the next run
redoes that phase.
"""

from __future__ import annotations

import signal

import torch

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "temporary failure, try again" - the run can be resumed.
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for Ctrl-C


class Preempted(Exception):
    """A stop signal arrived outside a point where the state can be saved; the run is to be repeated."""

    def __init__(self, signal_name: str):
        super().__init__(f"stopped by {signal_name}; run the same command again to continue")
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        """75 for a scheduler's signal, 130 for Ctrl-C."""
        return INTERRUPTED_EXIT_CODE if self.signal_name == "SIGINT" else PREEMPTED_EXIT_CODE


_INSTALLED: list["Preemption"] = []


def restore_all() -> None:
    """Put back the signal handlers of every :class:`Preemption` still installed (a trainer run in-process, by a
    test or a notebook, must not leave Ctrl-C only setting a flag)."""
    while _INSTALLED:
        _INSTALLED.pop().restore()


class Preemption:
    """Installs the signal handlers and answers "should we stop now?" consistently on every process.

    Args:
        accelerator: the run's Accelerator.
        every: with several processes, they agree through one tiny all-reduce (and a host read) at steps
            divisible by ``every`` only, so the hot loop is not synchronised at every step; use the log interval.
    """

    def __init__(self, accelerator, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT), every: int = 1):
        self.accelerator = accelerator
        self.every = max(1, every)
        self.requested = False
        self.signal_name: str | None = None
        self._previous = {}
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        _INSTALLED.append(self)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    @property
    def exit_code(self) -> int:
        """The exit code for the signal received."""
        return INTERRUPTED_EXIT_CODE if self.signal_name == "SIGINT" else PREEMPTED_EXIT_CODE

    def should_stop(self, step: int = 0) -> bool:
        """True on every process if any process received a stop signal (multi-process: at multiples of
        ``every`` only, the same steps everywhere)."""
        if self.accelerator.num_processes == 1:
            return self.requested
        if step % self.every:
            return False
        flag = torch.tensor([1.0 if self.requested else 0.0], device=self.accelerator.device)
        flag = self.accelerator.reduce(flag, reduction="sum")
        stop = bool(flag.item() > 0)
        if stop and self.signal_name is None:
            self.signal_name = "SIGTERM"  # another process received it
        return stop

    def halt(self, console, label: str, saved, *, stopped: bool, at: str, flag: str = "--stop-after") -> int:
        """End a training loop early, after its state was saved: the one line a user sees and the exit code.

        Then every process waits for the others and the trackers and process group close
        (``common.run.end_processes``), as at the end of a finished run: a rank returning without it once left its
        peer to abort at exit ("terminate called without an active exception", a 2-process --stop-after run).

        Args:
            console: the run's console (its progress display is closed first).
            label: what stopped (the run kind or stage), the line's prefix.
            saved: the state file just written.
            stopped: True for ``--stop-after`` (exit 0), False for a stop signal (75, or 130 for Ctrl-C).
            at: the loop position, e.g. ``"iteration 12"``.
            flag: the trainer's spelling of the stop flag.
        """
        console.stop()
        reason = f"stopped after {at} ({flag})" if stopped else f"preempted ({self.signal_name}) after {at}"
        console.print(f"{label}: {reason}: saved {saved}; run the same command again to continue")
        if self.accelerator is not None:
            from common.run import end_processes
            end_processes(self.accelerator)
        return 0 if stopped else self.exit_code

    def raise_if_requested(self) -> None:
        """Outside the training loop: stop with :class:`Preempted` if a signal arrived (this process only)."""
        if self.requested:
            raise Preempted(self.signal_name or "SIGTERM")

    def restore(self) -> None:
        """Put back the previous signal handlers."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self in _INSTALLED:
            _INSTALLED.remove(self)
