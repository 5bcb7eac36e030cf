"""Curves as PNG files (matplotlib with the Agg backend, so no display is needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def plot_curves(path: str | Path, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str = "",
                xlabel: str = "step", ylabel: str = "", logy: bool = False, vlines: Sequence[float] = ()) -> Path:
    """Write a line plot of ``{label: (x, y)}`` to ``path`` (atomically); non-finite points are skipped."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from common.checkpoint import atomic_write_bytes

    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    for label, (x, y) in curves.items():
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        keep = np.isfinite(x) & np.isfinite(y)
        if logy:
            keep &= y > 0
        axis.plot(x[keep], y[keep], label=label, linewidth=1.2)
    for position in vlines:
        axis.axvline(position, color="grey", linestyle=":", linewidth=0.8)
    if logy:
        axis.set_yscale("log")
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(True, alpha=0.3)
    if len(curves) > 1:
        axis.legend()
    figure.tight_layout()
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())
