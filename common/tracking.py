"""Per-epoch history and the best value of a metric so far: both part of a run's resumable state."""

from __future__ import annotations

import math
from typing import Literal, Sequence


class History:
    """Named per-epoch series (NaN where a value was not measured), kept in checkpoints and written to files."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self.values: dict[str, list[float]] = {name: [] for name in self.names}

    def append(self, **values: float) -> None:
        """Add one epoch's record (every name)."""
        missing = set(self.names) - set(values)
        if missing:
            raise KeyError(f"history record lacks {sorted(missing)}")
        for name in self.names:
            self.values[name].append(float(values[name]))

    def __getitem__(self, name: str) -> list[float]:
        return self.values[name]

    def __len__(self) -> int:
        return len(self.values[self.names[0]]) if self.names else 0

    def last(self) -> dict[str, float]:
        """The newest record."""
        return {name: values[-1] for name, values in self.values.items()}

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` records (a resumed run repeats the later ones)."""
        for values in self.values.values():
            del values[length:]

    def state_dict(self) -> dict:
        """Plain lists for a checkpoint."""
        return {name: list(values) for name, values in self.values.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.values = {name: [float(v) for v in state[name]] for name in self.names}


class Best:
    """The best value of one metric so far and when it was reached (higher or lower is better)."""

    def __init__(self, metric: str, mode: Literal["max", "min"] = "max"):
        self.metric = metric
        self.mode = mode
        self.value = math.nan
        self.epoch = 0

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far (NaN never does; the first finite value always does)."""
        if value != value:
            return False
        if self.value != self.value:
            return True
        return value < self.value if self.mode == "min" else value > self.value

    def update(self, value: float, epoch: int) -> bool:
        """Record ``value`` at ``epoch`` if it improves; returns whether it did."""
        if not self.improves(value):
            return False
        self.value, self.epoch = float(value), int(epoch)
        return True

    def state_dict(self) -> dict:
        """Plain values for a checkpoint."""
        return {"metric": self.metric, "mode": self.mode, "value": self.value, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; a checkpoint tracking another metric leaves this tracker empty."""
        if state.get("metric") != self.metric:
            return
        self.value, self.epoch = float(state["value"]), int(state["epoch"])
