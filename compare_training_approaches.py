"""Compare a two-stage and an end-to-end CrossFuse run: fusion loss curves, statistics, fairness and metrics.

Each run's newest cumulative loss dump (`loss/loss_data_{trans,end_to_end}_e<k>.mat`, largest k by number) is read;
dumps are never concatenated. Writes a 2x2 figure (raw loss with epoch lines, moving average, loss histograms,
last updates), prints per-run statistics, warns where the runs were not trained comparably (data, seed, size,
updates, batch, loss weights, schedule: from their `run_info.json`), and, when both runs were evaluated on the same
test set (`eval/<dataset>/metrics.json`), prints the metric means side by side.

    python compare_training_approaches.py --two-stage models/transfuse --end-to-end models/end_to_end
"""

from __future__ import annotations

import io
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.checkpoint import atomic_write_bytes  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.lossdump import load_mat  # noqa: E402

LOWER_IS_BETTER = ("MSE", "Nabf")
FAIRNESS_FIELDS = (
    ("data (pairs.txt SHA-256)", ("data", "pairs_sha256")),
    ("seed", ("seed",)),
    ("image size", ("size",)),
    ("fusion updates", ("total_updates",)),
    ("global batch", ("global_batch",)),
    ("loss weights", ("loss",)),
    ("learning-rate schedule", ("schedule",)),
)


@dataclass(frozen=True)
class CompareConfig:
    """Compare the loss curves and metrics of a two-stage and an end-to-end CrossFuse run."""

    two_stage: Path = Path("models/transfuse")
    """Run folder of the two-stage fusion stage (holds loss/loss_data_trans_e<k>.mat)."""
    end_to_end: Path = Path("models/end_to_end")
    """Run folder of the end-to-end run (holds loss/loss_data_end_to_end_e<k>.mat)."""
    out: Path | None = None
    """Figure path (default: training_comparison_<YYYYmmdd_HHMMSS>.png beside the end-to-end run folder)."""
    window: int = 100
    """Moving-average window (capped at a tenth of the shorter run)."""
    last: int = 1000
    """Updates shown in the last panel (capped at the shorter run)."""
    dpi: int = 300
    """Figure resolution."""
    show: bool = False
    """Also open the figure in a window."""


class CompareError(UserError):
    """A run cannot be compared (missing folder or loss dumps)."""


@dataclass
class RunLosses:
    """One run's newest cumulative fusion loss series and what lies beside it."""

    label: str
    folder: Path
    source: Path
    loss: np.ndarray
    iters_per_epoch: int
    model_count: int
    info: dict | None
    metrics: dict[str, dict] = field(default_factory=dict)


RUN_KINDS = {
    "two-stage": ("loss_data_trans", "fusetrans_epoch_*.model",
                  "python train_end_to_end.py --approach two-stage [--data.root DIR]"),
    "end-to-end": ("loss_data_end_to_end", "end_to_end_*_epoch_*.model",
                   "python train_end_to_end.py [--data.root DIR]"),
}


def numbered_dumps(folder: Path, stem: str) -> list[tuple[int, Path]]:
    """`(k, path)` of `loss/<stem>_e<k>.mat` in numeric order of k (never lexicographic)."""
    pattern = re.compile(rf"^{re.escape(stem)}_e(\d+)\.mat$")
    found = [(int(m.group(1)), path) for path in (folder / "loss").glob(f"{stem}_e*.mat")
             if (m := pattern.match(path.name))]
    return sorted(found)


def load_run(label: str, folder: Path, warnings: list[str]) -> RunLosses:
    """Read a run's newest dump; older dumps are only checked to be its prefixes (warned otherwise)."""
    stem, model_glob, command = RUN_KINDS[label]
    dumps = numbered_dumps(folder, stem) if folder.is_dir() else []
    if not dumps:
        raise CompareError(f"no {label} loss dumps ({folder}/loss/{stem}_e<k>.mat); create the run with: {command} "
                           f"(or point --{label} at its run folder)")
    newest = dumps[-1][1]
    data = load_mat(newest)
    loss = np.asarray(data["loss_data"], dtype=np.float64).ravel()
    for _, older in dumps[:-1]:
        previous = np.asarray(load_mat(older)["loss_data"], dtype=np.float64).ravel()
        if len(previous) > len(loss) or not np.array_equal(previous, loss[:len(previous)]):
            warnings.append(f"{older} is not a prefix of {newest.name}: the folder mixes runs; only "
                            f"{newest.name} is used")
    iters = int(np.asarray(data.get("iters_per_epoch", [[0]])).ravel()[0])
    info_path = folder / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else None
    metrics = {path.parent.name: json.loads(path.read_text()) for path in sorted(folder.glob("eval/*/metrics.json"))}
    return RunLosses(label, folder, newest, loss, iters, len(list(folder.glob(model_glob))), info, metrics)


def recent_window(*losses: np.ndarray) -> int:
    """Updates averaged for the "recent mean": 100, or 10 when a run has fewer than 100 (never more than the
    shorter run), the same for both runs so their means compare."""
    shortest = min(len(loss) for loss in losses)
    return min(100 if shortest >= 100 else 10, shortest)


def loss_stats(loss: np.ndarray, tail: int) -> dict[str, float]:
    """Steps, final, min, mean, std and the mean of the last ``tail`` updates."""
    return {"steps": len(loss), "final": float(loss[-1]), "min": float(loss.min()), "mean": float(loss.mean()),
            "std": float(loss.std()), f"mean last {tail}": float(loss[-tail:].mean())}


def nested(info: dict, keys: tuple[str, ...]):
    """`info[k1][k2]...` or None."""
    for key in keys:
        if not isinstance(info, dict) or key not in info:
            return None
        info = info[key]
    return info


def fairness_warnings(a: RunLosses, b: RunLosses) -> list[str]:
    """One warning per setting that differs between the runs' `run_info.json` ("fairness unknown" if one lacks it)."""
    if a.info is None or b.info is None:
        missing = [run.label for run in (a, b) if run.info is None]
        return [f"fairness unknown: no run_info.json for {', '.join(missing)}"]
    return [f"runs differ in {name}: {a.label} {nested(a.info, keys)!r}, {b.label} {nested(b.info, keys)!r}"
            for name, keys in FAIRNESS_FIELDS if nested(a.info, keys) != nested(b.info, keys)]


def stage_one_compute(run: RunLosses) -> str:
    """The stage-1 updates behind a two-stage run (reported separately from the fusion updates)."""
    stage_one = nested(run.info or {}, ("stage1",)) or {}
    if stage_one:
        parts = [f"{m}: {v['updates']} updates ({v['epochs']} epochs, batch {v['global_batch']})"
                 for m, v in sorted(stage_one.items())]
        return "stage-1 auto-encoders " + "; ".join(parts)
    counts = []
    for modality in ("ir", "vi"):
        dumps = numbered_dumps(run.folder.parent / "autoencoder", f"loss_data_auto_{modality}")
        if dumps:
            counts.append(f"{modality}: {np.asarray(load_mat(dumps[-1][1])['loss_data']).size} updates")
    return "stage-1 auto-encoders " + ("; ".join(counts) if counts else "unknown (no autoencoder/ run beside it)")


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """'valid' moving average."""
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_comparison(a: RunLosses, b: RunLosses, window: int, last: int):
    """The 2x2 figure: raw loss with epoch lines, moving average, density histograms, last updates."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(13, 9))
    raw, smooth, histogram, tail = axes.ravel()
    colours = {a.label: "tab:blue", b.label: "tab:orange"}
    for run in (a, b):
        steps = np.arange(1, len(run.loss) + 1)
        raw.plot(steps, run.loss, color=colours[run.label], linewidth=0.6, label=run.label)
        if run.iters_per_epoch:
            for boundary in range(run.iters_per_epoch, len(run.loss), run.iters_per_epoch):
                raw.axvline(boundary, color=colours[run.label], linestyle=":", linewidth=0.5, alpha=0.6)
    raw.set_title("fusion loss per update (dotted: epochs)")
    shorter = min(len(a.loss), len(b.loss))
    width = min(window, shorter // 10)
    if width >= 2:
        for run in (a, b):
            averaged = moving_average(run.loss, width)
            smooth.plot(np.arange(width, len(run.loss) + 1), averaged, color=colours[run.label], label=run.label)
        smooth.set_title(f"moving average ({width} updates)")
    else:
        smooth.set_title("moving average: runs too short")
    bins = np.linspace(min(a.loss.min(), b.loss.min()), max(a.loss.max(), b.loss.max()), 51)
    for run in (a, b):
        histogram.hist(run.loss, bins=bins, density=True, alpha=0.5, color=colours[run.label], label=run.label)
    histogram.set_title("loss density")
    count = min(len(a.loss), len(b.loss), last)
    for run in (a, b):
        tail.plot(np.arange(len(run.loss) - count + 1, len(run.loss) + 1), run.loss[-count:],
                  color=colours[run.label], linewidth=0.8, label=run.label)
    tail.set_title(f"last {count} updates")
    for axis in (raw, smooth, tail):
        axis.set_xlabel("fusion update")
        axis.set_ylabel("total loss")
        if min(a.loss.min(), b.loss.min()) > 0:
            axis.set_yscale("log")
    histogram.set_xlabel("total loss")
    for axis in axes.ravel():
        axis.grid(True, alpha=0.3)
        if axis.lines or axis.patches:
            axis.legend()
    figure.tight_layout()
    return figure


def print_report(console, a: RunLosses, b: RunLosses) -> None:
    """Per-run statistics, the relative difference, model counts and the stage-1 compute."""
    from rich.table import Table

    tail = recent_window(a.loss, b.loss)
    stats = {run.label: loss_stats(run.loss, tail) for run in (a, b)}
    table = Table(title="fusion loss")
    table.add_column("")
    for run in (a, b):
        table.add_column(f"{run.label} ({run.source.name})", justify="right")
    for key in stats[a.label]:
        table.add_row(key, *(f"{stats[run.label][key]:.6g}" for run in (a, b)))
    table.add_row(".model files", str(a.model_count), str(b.model_count))
    console.print(table)
    tail_a, tail_b = list(stats[a.label].values())[-1], list(stats[b.label].values())[-1]
    relative = (tail_b - tail_a) / abs(tail_a) if tail_a else float("nan")
    better = b.label if tail_b < tail_a else a.label
    console.print(f"recent mean loss: {b.label} vs {a.label} {relative:+.2%}; lower: {better}")
    if a.label == "two-stage":
        console.print(f"two-stage compute besides its {len(a.loss)} fusion updates: {stage_one_compute(a)}")


def metric_report(console, a: RunLosses, b: RunLosses, warn) -> bool:
    """Metric means side by side per common test set; returns whether a table was printed."""
    from rich.table import Table

    printed = False
    for dataset in sorted(set(a.metrics) & set(b.metrics)):
        ours, theirs = a.metrics[dataset], b.metrics[dataset]
        if ours.get("conventions") != theirs.get("conventions"):
            warn(f"{dataset}: metric conventions differ ({ours.get('conventions')} vs {theirs.get('conventions')})")
        table = Table(title=f"metrics on {dataset} (means)")
        for column in ("metric", a.label, b.label, f"{b.label} - {a.label}", "better"):
            table.add_column(column, justify="right")
        for metric in [m for m in ours.get("metrics", []) if m in theirs.get("metrics", [])]:
            x, y = ours["means"].get(metric), theirs["means"].get(metric)
            if not isinstance(x, (int, float)) or not isinstance(y, (int, float)):
                table.add_row(metric, str(x), str(y), "", "")
                continue
            lower = metric in LOWER_IS_BETTER
            better = "tie" if x == y else (a.label if (x < y) == lower else b.label)
            table.add_row(metric, f"{x:.4f}", f"{y:.4f}", f"{y - x:+.4f}", better)
        console.print(table)
        printed = True
    return printed


def main(cfg: CompareConfig) -> int:
    """Load both runs, warn, print the statistics, write the figure; exit code 2 when a run is missing."""
    import matplotlib

    if not cfg.show:
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    warnings: list[str] = []
    two_stage = load_run("two-stage", cfg.two_stage, warnings)
    end_to_end = load_run("end-to-end", cfg.end_to_end, warnings)

    def warn(message: str) -> None:
        console.print(f"WARNING: {message}", markup=False)

    for message in warnings + fairness_warnings(two_stage, end_to_end):
        warn(message)
    print_report(console, two_stage, end_to_end)
    if not metric_report(console, two_stage, end_to_end, warn):
        console.print("no metrics table: evaluate both runs on the same test set (--mode evaluate) to compare them")
    figure = plot_comparison(two_stage, end_to_end, cfg.window, cfg.last)
    out = cfg.out or cfg.end_to_end.parent / f"training_comparison_{time.strftime('%Y%m%d_%H%M%S')}.png"
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=cfg.dpi)
    atomic_write_bytes(out, buffer.getvalue())
    console.print(f"figure: {out}")
    if cfg.show:
        plt.show()
    plt.close(figure)
    return 0


if __name__ == "__main__":
    from common.cli import parse
    from common.run import exit_on_user_error

    sys.exit(exit_on_user_error(lambda: main(parse(CompareConfig))))
