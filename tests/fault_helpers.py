"""Helpers for the fault and bad-input tests: a trainer run in this process (optionally sending itself a stop
signal during a chosen call), and snapshots of folders to show that nothing was lost or changed."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import os
import signal
import time
from pathlib import Path

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@dataclasses.dataclass(frozen=True)
class Stop:
    """Send ``signum`` to this process during the ``call``-th call of ``module.function`` (a training step, the
    evaluation's scoring), as a scheduler or Ctrl-C would."""

    module: object
    function: str
    call: int
    signum: signal.Signals


@dataclasses.dataclass(frozen=True)
class Ran:
    """An in-process run: its exit code, what it printed (``output``: stdout then stderr) and the seconds from the
    signal to its return."""

    code: int
    stdout: str
    stderr: str
    stop_seconds: float | None = None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_in_process(cli, argv: list[str], stop: Stop | None = None) -> Ran:
    """Run a trainer's ``cli(argv)`` in this process with one torch thread (like the test's trainer processes, so
    results compare bitwise), capturing what it prints; the thread count and the signal handlers the trainer
    installs are put back afterwards."""
    threads = torch.get_num_threads()
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    sent: list[float] = []
    if stop is not None:
        real, calls = getattr(stop.module, stop.function), itertools.count(1)

        def signalling(*args, **kwargs):
            if next(calls) == stop.call:
                sent.append(time.perf_counter())
                os.kill(os.getpid(), stop.signum)
            return real(*args, **kwargs)
        setattr(stop.module, stop.function, signalling)
    stdout, stderr = io.StringIO(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli(argv)
    finally:
        torch.set_num_threads(threads)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if stop is not None:
            setattr(stop.module, stop.function, real)
    return Ran(code, stdout.getvalue(), stderr.getvalue(), time.perf_counter() - sent[0] if sent else None)


def snapshot(*paths: Path) -> dict[str, tuple[int, int, str]]:
    """Size, modification time and BLAKE2 digest of every file under (or at) ``paths``."""
    files = []
    for path in paths:
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    result = {}
    for file in files:
        digest = hashlib.blake2b(digest_size=16)
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        stat = file.stat()
        result[str(file)] = (stat.st_size, stat.st_mtime_ns, digest.hexdigest())
    return result


def assert_nothing_lost(before: dict, after: dict, may_add: bool) -> None:
    """Every file of ``before`` is still there, unchanged; new files only where ``may_add``."""
    changed = [name for name, value in before.items() if after.get(name) != value]
    assert not changed, f"lost or changed: {changed}"
    added = sorted(set(after) - set(before))
    assert may_add or not added, f"created: {added}"


def plant_orphans(folder: Path, names: list[str]) -> Path:
    """Temporary files of killed writes (``.<name>.<8 random>.tmp``) under ``folder``, and one file of another
    name that must be kept; returns that one."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"partial")
    (folder / ".notes.tmp").write_bytes(b"mine")
    return folder / ".notes.tmp"
