"""Timing helpers for the trainer benchmarks: step intervals of a trainer run in-process, interleaved repeats.

A trainer's iteration time is the interval between the starts of consecutive optimizer steps (data loading,
forward, backward, step and every bookkeeping line of the loop included), recorded by wrapping
:meth:`common.step.OptimStep.__call__`; the raw loop records the same intervals around its own step. Medians of
interleaved repeats (trainer, raw, raw, trainer, ...) resist a shared machine's spikes and drift.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Iterator

import numpy as np
import torch

from common.run import environment_info
from common.step import OptimStep


@contextlib.contextmanager
def trainer_step_starts() -> Iterator[list[float]]:
    """Record the start time of every :class:`OptimStep` call made inside the block."""
    starts: list[float] = []
    original = OptimStep.__call__

    def timed(self, loss):
        starts.append(time.perf_counter())
        return original(self, loss)

    OptimStep.__call__ = timed
    try:
        yield starts
    finally:
        OptimStep.__call__ = original


def trainer_run(cli: Callable[[list[str]], int], argv: list[str]) -> list[float]:
    """Iteration intervals of one in-process run of a trainer's ``cli(argv)``."""
    with trainer_step_starts() as starts:
        code = cli(argv)
    if code != 0:
        raise RuntimeError(f"the trainer failed ({code}) with {argv}")
    return intervals(starts)


def intervals(starts: list[float], warmup: int = 1) -> list[float]:
    """Seconds between consecutive step starts, without the first ``warmup`` (allocator and kernel warm-up)."""
    return np.diff(starts)[warmup:].tolist()


def interleaved(trainer: Callable[[int], list[float]], raw: Callable[[int], list[float]],
                repeats: int) -> tuple[list[float], list[float]]:
    """Run ``trainer(repeat)`` and ``raw(repeat)`` ``repeats`` times in alternating order; pooled intervals."""
    pooled_trainer, pooled_raw = [], []
    for repeat in range(repeats):
        order = ((trainer, pooled_trainer), (raw, pooled_raw))
        for run, pool in (order if repeat % 2 == 0 else order[::-1]):
            pool.extend(run(repeat))
    return pooled_trainer, pooled_raw


def overhead(trainer: list[float], raw: list[float]) -> tuple[float, float, float]:
    """(trainer median, raw median, relative overhead of the trainer)."""
    trainer_median, raw_median = statistics.median(trainer), statistics.median(raw)
    return trainer_median, raw_median, trainer_median / raw_median - 1.0


def machine() -> str:
    """The machine, for a benchmark table's header."""
    info = environment_info()
    return (f"{info['cpu']} ({info['cpu_count']} logical CPUs, {torch.get_num_threads()} torch threads), torch "
            f"{info['torch']}, {time.strftime('%Y-%m-%d')}")


def states_equal(a: dict, b: dict) -> bool:
    """Whether two state dicts hold bitwise equal tensors under the same keys."""
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
