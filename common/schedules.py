"""Learning rates as pure functions of the step (or epoch), applied per parameter group.

Each optimizer parameter group carries its own ``base_lr`` (and optionally ``min_lr``); a schedule maps
(position, base, min) to a rate. Because the rate is a pure function of the position, resuming needs only the
position, never a scheduler object's state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

ScheduleKind = Literal["constant", "cosine", "step", "warmup_cosine_tail"]


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule over positions ``t`` in ``[0, total)`` (steps or epochs, 0-based).

    - ``constant``: base.
    - ``cosine``: min + (base - min)·½(1 + cos(π t / total)).
    - ``step``: base·gamma^k, where k = number of ``milestones`` ≤ t; with ``compounding=False`` the factor is
      gamma once any milestone is passed (CrossFuse's official non-compounding step).
    - ``warmup_cosine_tail``: bubbliiiing's ``yolox_warm_cos_lr``: quadratic warm-up over ``warmup`` positions
      from ``warmup_start_ratio``·base (at least 1e-6), cosine to ``min`` and a flat ``tail`` at min.
    """

    kind: ScheduleKind = "constant"
    total: int = 1
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    compounding: bool = True
    warmup: float = 0.0
    warmup_start_ratio: float = 0.1
    tail: float = 0.0

    def __call__(self, t: float, base: float, minimum: float = 0.0) -> float:
        """The rate at position ``t`` for a group with ``base`` and ``minimum`` rates."""
        if self.kind == "constant":
            return base
        if self.kind == "cosine":
            return minimum + (base - minimum) * 0.5 * (1.0 + math.cos(math.pi * t / max(self.total, 1)))
        if self.kind == "step":
            passed = sum(1 for milestone in self.milestones if t >= milestone)
            if not self.compounding:
                passed = min(passed, 1)
            return base * self.gamma ** passed
        if self.kind == "warmup_cosine_tail":
            start = max(self.warmup_start_ratio * base, 1e-6)
            if t <= self.warmup and self.warmup > 0:
                return (base - start) * (t / self.warmup) ** 2 + start
            if t >= self.total - self.tail:
                return minimum
            span = self.total - self.warmup - self.tail
            return minimum + 0.5 * (base - minimum) * (1.0 + math.cos(math.pi * (t - self.warmup) / span))
        raise ValueError(f"unknown schedule kind {self.kind!r}")


def set_base_lrs(optimizer: torch.optim.Optimizer, base_lrs: Sequence[float] | float,
                 min_lrs: Sequence[float] | float | None = None) -> None:
    """Store each group's ``base_lr`` (and ``min_lr``) used by :func:`apply_schedule`."""
    groups = optimizer.param_groups
    bases = [base_lrs] * len(groups) if isinstance(base_lrs, (int, float)) else list(base_lrs)
    if min_lrs is None:
        mins = [0.0] * len(groups)
    elif isinstance(min_lrs, (int, float)):
        mins = [min_lrs] * len(groups)
    else:
        mins = list(min_lrs)
    if len(bases) != len(groups) or len(mins) != len(groups):
        raise ValueError(f"{len(groups)} parameter groups but {len(bases)} base and {len(mins)} minimum rates")
    for group, base, minimum in zip(groups, bases, mins):
        group["base_lr"] = float(base)
        group["min_lr"] = float(minimum)


def apply_schedule(optimizer: torch.optim.Optimizer, schedule: Schedule, t: float) -> list[float]:
    """Set every group's ``lr`` to ``schedule(t, base_lr, min_lr)``; returns the rates."""
    rates = []
    for group in optimizer.param_groups:
        if "base_lr" not in group:
            group["base_lr"] = group["lr"]
            group["min_lr"] = 0.0
        rate = schedule(t, group["base_lr"], group.get("min_lr", 0.0))
        group["lr"] = rate
        rates.append(rate)
    return rates


def group_lr(optimizer: torch.optim.Optimizer, name: str) -> float:
    """Current ``lr`` of the group named ``name`` (groups are named with a ``name`` key)."""
    for group in optimizer.param_groups:
        if group.get("name") == name:
            return group["lr"]
    raise KeyError(f"no parameter group named {name!r}")
