"""Per-step loss series kept on the device, reduced across processes at log time, dumped to ``.mat``.

During training, each optimizer step appends 0-d tensors (no host synchronisation). At a log step
:meth:`LossSeries.flush` stacks the pending values, averages them across processes (one collective) and moves
them to the host as float64. The host series is part of the checkpoint, so a resumed run continues the same
arrays and no step is counted twice.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import scipy.io
import torch

from common.checkpoint import atomic_write_bytes

MAT_HEADER = b"MATLAB 5.0 MAT-file, written by the fusion trainers (common.lossdump)"


class LossSeries:
    """Named per-step series (total loss and its components, lr, temperature...)."""

    def __init__(self, names: Iterable[str]):
        self.names = tuple(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate series names in {self.names}")
        self._pending: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        self._host: dict[str, list[float]] = {name: [] for name in self.names}

    def append(self, values: Mapping[str, torch.Tensor | float]) -> None:
        """Record one step: every series gets a value (a detached 0-d tensor or a float)."""
        missing = set(self.names) - set(values)
        if missing:
            raise KeyError(f"step values lack {sorted(missing)}")
        for name in self.names:
            value = values[name]
            if isinstance(value, torch.Tensor):
                value = value.detach().reshape(())
            else:
                value = torch.tensor(float(value), dtype=torch.float64)
            self._pending[name].append(value)

    @property
    def pending(self) -> int:
        """Steps appended since the last flush."""
        return len(self._pending[self.names[0]]) if self.names else 0

    def __len__(self) -> int:
        return len(self._host[self.names[0]]) + self.pending if self.names else 0

    def flush(self, accelerator=None) -> dict[str, np.ndarray]:
        """Move pending values to the host, averaged across processes; returns the flushed window per series.

        Collective when ``accelerator`` has several processes: every rank must call it at the same step.
        """
        count = self.pending
        if count == 0:
            return {name: np.zeros(0) for name in self.names}
        device = self._pending[self.names[0]][0].device
        stacked = torch.stack(
            [torch.stack([v.to(device=device, dtype=torch.float64) for v in self._pending[name]]) for name in self.names]
        )
        if accelerator is not None and accelerator.num_processes > 1:
            stacked = accelerator.reduce(stacked, reduction="mean")
        window = stacked.cpu().numpy()
        flushed = {}
        for row, name in enumerate(self.names):
            values = window[row].tolist()
            self._host[name].extend(values)
            self._pending[name].clear()
            flushed[name] = window[row].copy()
        return flushed

    def tail(self, start: int) -> dict[str, list[float]]:
        """The host values from step ``start`` on (a log window; cheap, unlike :meth:`arrays` of a long run)."""
        return {name: self._host[name][start:] for name in self.names}

    def arrays(self) -> dict[str, np.ndarray]:
        """The host series as float64 arrays (pending values are not included: flush first)."""
        return {name: np.asarray(self._host[name], dtype=np.float64) for name in self.names}

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` host values of every series and drop pending ones."""
        for name in self.names:
            del self._host[name][length:]
            self._pending[name].clear()

    def state_dict(self) -> dict:
        """Host series as float64 tensors (for checkpoints)."""
        if self.pending:
            raise RuntimeError("flush the loss series before saving it")
        return {name: torch.tensor(self._host[name], dtype=torch.float64) for name in self.names}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], length: int | None = None) -> None:
        """Restore host series, truncated to ``length`` steps (the resumed step) so none is counted twice."""
        for name in self.names:
            if name not in state:
                raise KeyError(f"checkpoint loss series lack {name!r}")
            self._host[name] = state[name].to(torch.float64).tolist()
            self._pending[name].clear()
        if length is not None:
            self.truncate(length)


def save_mat(path: str | Path, arrays: Mapping[str, np.ndarray | float | int]) -> Path:
    """Atomically write a MATLAB v5 ``.mat`` file; 1-D arrays become (1, N) rows, scalars (1, 1).

    The text header is fixed (scipy writes the current time there), so equal data gives byte-identical files.
    """
    buffer = io.BytesIO()
    payload = {}
    for name, value in arrays.items():
        array = np.asarray(value)
        if array.dtype.kind in "fc" or array.dtype.kind in "iub":
            array = array.astype(np.float64) if array.dtype.kind == "f" else array
        payload[name] = array.reshape(1, -1) if array.ndim == 1 else array
    scipy.io.savemat(buffer, payload, format="5", do_compression=False, oned_as="row")
    data = bytearray(buffer.getvalue())
    header = MAT_HEADER.ljust(116, b" ")
    data[:116] = header
    return atomic_write_bytes(path, bytes(data))


def load_mat(path: str | Path) -> dict[str, np.ndarray]:
    """Read a ``.mat`` file written by :func:`save_mat` (MATLAB metadata keys dropped)."""
    loaded = scipy.io.loadmat(str(path))
    return {key: value for key, value in loaded.items() if not key.startswith("__")}
