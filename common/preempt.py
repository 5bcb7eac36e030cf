"""Graceful preemption: SIGTERM/SIGUSR1 set a flag; at the next step boundary every process agrees to stop,
the trainer saves a checkpoint atomically and exits with :data:`PREEMPTED_EXIT_CODE`.

Schedulers such as SLURM send SIGTERM (or a configured SIGUSR1) some time before killing a job; requeue the job
with the same command plus ``--resume auto``.
"""

from __future__ import annotations

import signal

import torch

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "temporary failure, try again" - the run can be resumed.


class Preemption:
    """Installs the signal handlers and answers "should we stop now?" consistently on every rank."""

    def __init__(self, accelerator, signals=(signal.SIGTERM, signal.SIGUSR1), every: int = 1):
        self.accelerator = accelerator
        self.every = max(1, every)
        self.requested = False
        self.signal_name = None
        self._previous = {}
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def should_stop(self, step: int = 0) -> bool:
        """True on every rank if any rank received a stop signal.

        Multi-process runs agree through one tiny all-reduce, made only at steps divisible by ``every`` (the
        same steps on every rank), so the hot loop is not synchronised at every step.
        """
        if self.accelerator.num_processes == 1:
            return self.requested
        if step % self.every:
            return False
        flag = torch.tensor([1.0 if self.requested else 0.0], device=self.accelerator.device)
        flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def restore(self) -> None:
        """Put back the previous signal handlers."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
