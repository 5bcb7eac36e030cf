"""MaeFuse evaluation, `train_mae_fusion.py evaluate` (spec §7), and the demo's quality report (spec §9 check 14).

Metrics (`common.fusion_metrics`, spec/metrics.md conventions) are computed on uint8 gray images at the source
size: the fused image (colour -> BT.601 luma), IR, and VIS luma. Baselines go through the identical output path
as the fusion (model grid, round, bicubic back): `average` = rint((Y_vi + IR)/2) of the two model inputs, and
`latent_mean` = the decoded (z_v + z_i)/2 (needs the weights). Results: `metrics.csv` (per image + mean),
`summary.json` (means, baselines' means, whether F beats averaging), `metrics_<baseline>.csv`/`.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from common.errors import ConfigError, DataError
from common.fusion_metrics import FusionMetricConfig, resolve_metrics, summarize, write_results
from common.images import read_image, to_gray
from common.ivif.data import discover_file_pairs
from common.ivif.evaluation import beats_average, quality_report, read_test_pair, save_fusion_grid, score
from common.pairing import list_images
from maefuse.inference import (FusionResult, ResizeMode, fuse_pairs, model_from_weights, read_fusion_record,
                               write_fusions)
from maefuse.model import SIZE_PRESETS, MaeFuse

METRICS = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM", "PSNR", "CC")
"""The spec §7 metric set (MI in bits, VIF and SSIM summed over the two sources)."""
FUSED_GRAY_STD_MIN = 5.0


def score_results(results: Sequence[FusionResult], metrics: Sequence[str] = METRICS
                  ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
    """Per-image metric rows of the fused images, and of each baseline present (by baseline name)."""
    fused_rows = score([(r.name, r.fused, r.ir, r.vi) for r in results], metrics)
    names = sorted({name for result in results for name in result.baselines})
    baseline_rows = {name: score([(r.name, r.baselines[name], r.ir, r.vi) for r in results], metrics)
                     for name in names}
    return fused_rows, baseline_rows


def write_evaluation(out_dir: str | Path, fused_rows: dict, baseline_rows: dict, metrics: Sequence[str],
                     extra: dict | None = None) -> dict:
    """Write `metrics.csv` and `summary.json` (with the baselines' means and `beats_average`), and
    `metrics_<baseline>.csv`/`.json` per baseline; returns the summary."""
    out_dir = Path(out_dir)
    config = FusionMetricConfig()
    baseline_summaries = {name: write_results(out_dir / f"metrics_{name}.csv", rows, config, metrics)
                          for name, rows in baseline_rows.items()}
    extra = dict(extra or {})
    extra["baselines"] = {name: summary["means"] for name, summary in baseline_summaries.items()}
    if "average" in baseline_rows:
        extra["beats_average"] = beats_average(summarize(fused_rows, metrics)[0],
                                               summarize(baseline_rows["average"], metrics)[0])
    return write_results(out_dir / "metrics.csv", fused_rows, config, metrics, json_path=out_dir / "summary.json",
                         extra=extra)


def print_summary(summary: dict, console: Console | None = None) -> None:
    """A rich table of the means: fused and each baseline."""
    console = console or Console()
    baselines = summary.get("baselines", {})
    table = Table(title=f"MaeFuse metrics ({summary['n_images']} images)")
    table.add_column("metric")
    table.add_column("fused", justify="right")
    for name in baselines:
        table.add_column(name, justify="right")

    def shown(value) -> str:
        return "nan" if value is None else value if isinstance(value, str) else f"{value:.4f}"

    for metric in summary["metrics"]:
        table.add_row(metric, shown(summary["means"][metric]), *(shown(means[metric]) for means in baselines.values()))
    console.print(table)


def _fused_file(fused_dir: Path, key: str) -> Path:
    """The fused image of a pair key in `fused_dir` (any image extension; nested keys keep their folders)."""
    folder = fused_dir / Path(key).parent
    stem = Path(key).name
    found = list_images(folder).get(stem) if folder.is_dir() else None
    if found is None:
        raise DataError(f"no fused image for pair '{key}' in {folder}; fuse the same data first")
    return found


@dataclass(frozen=True)
class EvaluateArgs:
    """Score fused images against their IR and VIS sources (`train_mae_fusion.py evaluate`)."""

    fused_dir: Path
    """Folder of fused images (`fuse --out_dir`), named by the pairs' stems."""
    data_path: Path
    """The IR/VIS data the images were fused from."""
    split: str | None = None
    """LLVIP-style split folder under the IR and VIS folders."""
    baseline: Literal["none", "average", "latent_mean", "both"] = "average"
    """Baselines through the same output path: the input average, the decoded latent mean (needs weights), both."""
    out_dir: Path | None = None
    """Where `metrics.csv` and `summary.json` go (default: `fused_dir`)."""
    metrics: tuple[str, ...] = METRICS
    """Metric columns (names as in `python -m common.fusion_metrics --help`)."""
    ckpt: Path | None = None
    """Weights for `latent_mean` (default: the `ckpt` recorded in `fusion.json`)."""
    img_size: int | None = None
    """Model input side S for the baselines (default: from `fusion.json`)."""
    resize_mode: ResizeMode | None = None
    """`stretch` or `pad`, as fused (default: from `fusion.json`, else `stretch`)."""
    batch_size: int = 8
    """Pairs per forward pass for `latent_mean`."""
    device: str = "cpu"
    """Device for `latent_mean`."""


def evaluate(args: EvaluateArgs, log: Callable[[str], None] = print, console: Console | None = None) -> dict:
    """The `evaluate` subcommand: metrics of every pair's fused image and of the baselines; returns the summary."""
    record = read_fusion_record(args.fused_dir)
    pairs = discover_file_pairs(args.data_path, "paired", args.split, modality_tokens=False)
    baselines = {"none": (), "average": ("average",), "latent_mean": ("latent_mean",),
                 "both": ("average", "latent_mean")}[args.baseline]
    img_size = args.img_size or record.get("img_size")
    resize_mode = args.resize_mode or record.get("resize_mode", "stretch")
    model = None
    if "latent_mean" in baselines:
        ckpt = args.ckpt or record.get("ckpt")
        if ckpt is None:
            raise ConfigError("--baseline latent_mean needs the weights: pass --ckpt FULL.pth")
        recorded_size = record.get("model_size")  # for weight files without meta (the released ones)
        model, report = model_from_weights(ckpt, model_size=recorded_size if recorded_size in SIZE_PRESETS else None,
                                           device=args.device)
        log(report.describe())
        img_size = model.size.img_size
    if baselines and img_size is None:
        raise ConfigError(f"no {args.fused_dir}/fusion.json (written by fuse): pass --img_size for the baseline")
    computed = (fuse_pairs(model, pairs, img_size=img_size, batch_size=args.batch_size, resize_mode=resize_mode,
                           fuse_path="mean", baselines=baselines) if baselines else None)
    results = []
    for index, pair in enumerate(pairs):
        ir, vi, _ = read_test_pair(pair)
        path = _fused_file(Path(args.fused_dir), pair.key)
        output = read_image(path)
        if output.shape[:2] != ir.shape:
            raise DataError(f"{path} is {output.shape[1]}x{output.shape[0]}, but its sources are "
                            f"{ir.shape[1]}x{ir.shape[0]} (W x H); fused images must keep the source size")
        results.append(FusionResult(pair.key, path.suffix, ir, vi, output, to_gray(output),
                                    computed[index].baselines if computed else {}))
    metrics = resolve_metrics(args.metrics)
    fused_rows, baseline_rows = score_results(results, metrics)
    summary = write_evaluation(args.out_dir or args.fused_dir, fused_rows, baseline_rows, metrics,
                               extra={"fused_dir": str(args.fused_dir), "data_path": str(args.data_path),
                                      "img_size": img_size, "resize_mode": resize_mode})
    print_summary(summary, console)
    return summary


def demo_quality(model: MaeFuse, test_root: str | Path, out_dir: str | Path, *, batch_size: int = 8,
                 metrics: Sequence[str] = METRICS) -> dict:
    """Fuse the demo's held-out pairs and run its quality gate (spec §9 check 14).

    Writes the fused images (`out_dir/fused/`), `metrics.csv`, `summary.json`, `metrics_average.*` and
    `fusion_grid.png` into `out_dir`, and returns the report for `demo_report.json`: the shared gate of
    `common.ivif.evaluation.quality_report` (Qabf margin over averaging, texture kept, targets visible), the fused
    image check (every pair, source sizes, gray std > 5), the metric means and `beats_average` (recorded, not gated).

    Raises:
        DataError: the test folder has no demo masks (`masks/{stem}_targets.png`, `_texture.png`).
    """
    test_root, out_dir = Path(test_root), Path(out_dir)
    pairs = discover_file_pairs(test_root, "paired", modality_tokens=False)
    results = fuse_pairs(model, pairs, batch_size=batch_size, baselines=("average",))
    write_fusions(results, out_dir / "fused")
    fused_rows, baseline_rows = score_results(results, metrics)
    summary = write_evaluation(out_dir, fused_rows, baseline_rows, metrics, extra={"data_path": str(test_root)})
    fused_pairs = [result.fused_pair() for result in results]
    report = quality_report(fused_pairs, test_root / "masks")
    if report is None:
        raise DataError(f"{test_root / 'masks'} lacks the demo masks: demo_quality needs the generated demo test split")
    save_fusion_grid(out_dir / "fusion_grid.png", fused_pairs)
    std_min = min(float(np.std(result.fused)) for result in results)
    sizes_kept = all(result.fused.shape == result.ir.shape for result in results)
    report["checks"]["fused_images"] = {
        "count": len(results), "expected": len(pairs), "source_sizes": sizes_kept, "gray_std_min": std_min,
        "required": FUSED_GRAY_STD_MIN,
        "passed": bool(len(results) == len(pairs) and sizes_kept and std_min > FUSED_GRAY_STD_MIN)}
    report["passed"] = all(check["passed"] for check in report["checks"].values())
    report["metrics"] = {"fused": summary["means"], "average": summary["baselines"]["average"]}
    report["beats_average"] = summary["beats_average"]
    return report


def check_lines(report: dict) -> list[str]:
    """One console line per demo check: value, averaging's value, requirement, pass/FAIL."""
    lines = []
    for name, check in report["checks"].items():
        if name == "fused_images":
            value, base = f"std min {check['gray_std_min']:.2f}", f"{check['count']}/{check['expected']} images"
        else:
            value, base = f"{check['fused']:.4f}", f"average {check['average']:.4f}"
        lines.append(f"demo check {name}: {value} ({base}), required {check['required']:.4g}: "
                     f"{'pass' if check['passed'] else 'FAIL'}")
    return lines
