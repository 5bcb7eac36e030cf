"""Fusion of held-out pairs, their metrics and the demo's quality checks (spec §7.1-7.2, §9 checks 16-17).

- Weights come from a run folder (`end_to_end/` or `transfuse/`, epoch `last` or a number) or from three explicit
  `.model` files; the fusion network is built from its file's keys (temperature or not).
- Images are fused at full resolution, never resized. A colour VIS image is fused on its BT.601 luma and
  recombined with its own Cr/Cb; colour and gray results are written.
- Metrics (`common.fusion_metrics.evaluate_triplet`) score the saved uint8 gray F against A = IR and B = VIS luma,
  into `<run>/eval/<dataset>/metrics.{csv,json}`; the averaging baseline rint((A+B)/2) into `metrics_average.*`.
- When the test folder has the demo's `masks/` (targets, texture), `demo_report.json` records the demo quality gate:
  Qabf above averaging, VIS texture kept (high-pass amplitude and correlation), IR targets standing out from
  their ring; `eval/<dataset>/samples.png` shows IR | VIS | average | fused for the first pairs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from common.checkpoint import atomic_write_json, file_sha256
from common.console import RunConsole
from common.errors import UserError
from common.fusion_metrics import FusionMetricConfig, resolve_metrics, summarize, write_results
from common.ivif.data import discover_file_pairs
from common.ivif.evaluation import (FusedPair, average_fusion, beats_average, print_comparison, quality_report,
                                    read_test_pair, recolour, save_fusion_grid, score, write_means)
from common.preempt import Preemption
from crossfuse.config import CrossFuseConfig
from crossfuse.inference import fuse_images, quantize
from crossfuse.stages import LAYOUTS, experiment_dir, model_epochs, model_paths
from crossfuse.weights import autoencoder_from_file, fusion_net_from_file


class EvaluationError(UserError):
    """Weights for evaluation cannot be found; the message says which flag to set."""


@dataclass(frozen=True)
class FusionWeights:
    """The three `.model` files of a fusion, the output tag, the folder receiving `eval/`, and the model options."""

    ae_ir: Path
    ae_vi: Path
    fusion: Path
    tag: str
    run_dir: Path
    epoch: int | None
    shift: bool
    deep_weight: str

    def describe(self) -> dict:
        """Paths and SHA-256 of the weight files (for metrics.json)."""
        return {name: {"path": str(path), "sha256": file_sha256(path)}
                for name, path in (("ae_ir", self.ae_ir), ("ae_vi", self.ae_vi), ("fusion", self.fusion))}


def find_weights(cfg: CrossFuseConfig, run_dir: Path | None = None) -> FusionWeights:
    """The weights to evaluate: `--eval.ae-ir/ae-vi/fusion`, else `--eval.run` (or `run_dir`, or the approach's run
    folder) at `--eval.epoch`."""
    if cfg.eval.fusion is not None:
        for path in (cfg.eval.ae_ir, cfg.eval.ae_vi, cfg.eval.fusion):
            if not Path(path).is_file():
                raise EvaluationError(f"weight file {path} not found")
        tag = "end_to_end" if cfg.eval.fusion.name.startswith("end_to_end") else "transfuse"
        return FusionWeights(cfg.eval.ae_ir, cfg.eval.ae_vi, cfg.eval.fusion, tag, cfg.eval.fusion.parent, None,
                             cfg.model.shift, cfg.model.deep_weight)
    default_kind = "end-to-end" if cfg.approach == "end-to-end" else "fusion"
    run = cfg.eval.run or run_dir or experiment_dir(cfg) / LAYOUTS[default_kind].folder
    info_path = run / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    model = info.get("model", {})
    shift, deep_weight = model.get("shift", cfg.model.shift), model.get("deep_weight", cfg.model.deep_weight)
    for kind, tag in (("end-to-end", "end_to_end"), ("fusion", "transfuse")):
        epochs = model_epochs(run, kind)
        if not epochs:
            continue
        epoch = epochs[-1] if cfg.eval.epoch == "last" else int(cfg.eval.epoch)
        if epoch not in epochs:
            raise EvaluationError(f"{run} has no epoch-{epoch} weights (epochs {epochs[0]}..{epochs[-1]} exist)")
        paths = model_paths(run, kind, epoch)
        if kind == "end-to-end":
            return FusionWeights(paths["ir_encoder"], paths["vi_encoder"], paths["fusion"], tag, run, epoch,
                                 shift, deep_weight)
        encoders = info.get("encoders") or {}
        if not all(encoders.get(m) for m in ("ir", "vi")):
            raise EvaluationError(f"{info_path} does not name the stage-1 encoders of this fusion run; pass "
                                  "--eval.ae-ir, --eval.ae-vi and --eval.fusion")
        return FusionWeights(Path(encoders["ir"]["path"]), Path(encoders["vi"]["path"]), paths["fusion"], tag, run,
                             epoch, shift, deep_weight)
    raise EvaluationError(f"no end_to_end_*_epoch_<e>.model or fusetrans_epoch_<e>.model files in {run}: train first, "
                          "or point --eval.run at a run folder (or give --eval.ae-ir/--eval.ae-vi/--eval.fusion)")


def fuse_folder(cfg: CrossFuseConfig, weights: FusionWeights, device, console: RunConsole) -> list[FusedPair]:
    """Fuse every pair of `--eval.root` with `weights` and write `results_<tag>_<stem>.png` (and `gray/` copies for
    colour VIS) under `--eval.out/<dataset>/`."""
    pairs = discover_file_pairs(cfg.eval.root, "auto")
    ae_ir, ae_vi = autoencoder_from_file(weights.ae_ir), autoencoder_from_file(weights.ae_vi)
    fusion = fusion_net_from_file(weights.fusion, shift=weights.shift, deep_weight=weights.deep_weight,
                                  window_batch=cfg.model.window_batch)
    for module in (ae_ir, ae_vi, fusion):
        module.to(device)
    images = [read_test_pair(pair) for pair in pairs]
    fused = fuse_images(ae_ir, ae_vi, fusion, [(ir, vi) for ir, vi, _ in images], cfg.eval.batch)
    out = output_folder(cfg, weights)
    results = []
    for pair, (ir, vi, vi_rgb), image in zip(pairs, images, fused):
        gray = quantize(image, cfg.eval.quantize)
        name = Path(pair.key).name
        colour = recolour(gray, vi_rgb) if vi_rgb is not None else None
        file_name = f"results_{weights.tag}_{name}.png"
        if colour is not None:
            (out / "gray").mkdir(parents=True, exist_ok=True)
            Image.fromarray(colour).save(out / file_name)
            Image.fromarray(gray).save(out / "gray" / file_name)
        else:
            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(gray).save(out / file_name)
        results.append(FusedPair(name, ir, vi, gray, colour))
    console.print(f"fused {len(results)} pairs of {cfg.eval.root} with {weights.fusion.name} -> {out}")
    return results


SPLIT_NAMES = ("train", "val", "valid", "test")


def dataset_name(cfg: CrossFuseConfig) -> str:
    """`--eval.name`, else the test folder's name, prefixed by its parent's for split folders (`ivif_demo_test`)."""
    if cfg.eval.name:
        return cfg.eval.name
    root = Path(cfg.eval.root).resolve()
    return f"{root.parent.name}_{root.name}" if root.name.lower() in SPLIT_NAMES else root.name


def output_folder(cfg: CrossFuseConfig, weights: FusionWeights) -> Path:
    """`<out>/<dataset>` with `<out>` = `--eval.out` or `output/[<run-name>/]<tag>`."""
    root = cfg.eval.out or Path("output") / cfg.run_name / weights.tag
    return root / dataset_name(cfg)


def evaluation_current(cfg: CrossFuseConfig, weights: FusionWeights) -> bool:
    """Whether `eval/<dataset>/metrics.json` already scores exactly these weight files (by SHA-256)."""
    path = weights.run_dir / "eval" / dataset_name(cfg) / "metrics.json"
    try:
        return path.is_file() and json.loads(path.read_text()).get("weights") == weights.describe()
    except (json.JSONDecodeError, UnicodeDecodeError):  # cut off by a kill or a full disk: evaluate again
        return False


def evaluate(cfg: CrossFuseConfig, weights: FusionWeights, device, console: RunConsole, with_metrics: bool = True,
             started: float | None = None, stop: Preemption | None = None) -> dict:
    """Fuse `--eval.root`, draw the sample grid and, with `with_metrics`, score it (and the baseline).

    Returns the summaries written, the result files (`files`) and commands worth running next (`next`). A stop
    signal (`stop`) ends it between images with `Preempted` (exit 75 or 130); the next run repeats it.
    """
    check = stop.raise_if_requested if stop is not None else None
    pairs = fuse_folder(cfg, weights, device, console)
    eval_dir = weights.run_dir / "eval" / dataset_name(cfg)
    grid = save_fusion_grid(eval_dir / "samples.png", pairs)
    files = {"fused images": output_folder(cfg, weights), "sample grid": grid}
    next_steps = [f"python train_end_to_end.py --mode evaluate --eval.root YOUR_TEST_PAIRS --eval.run {weights.run_dir}",
                  f"tensorboard --logdir {weights.run_dir / 'tensorboard'}"]
    if not with_metrics:
        return {"fused": len(pairs), "files": files, "next": next_steps}
    metrics = resolve_metrics(cfg.eval.metrics or None)
    fused_rows = score([(p.name, p.fused, p.ir, p.vi) for p in pairs], metrics, check)
    masks_dir = Path(cfg.eval.root) / "masks"
    want_average = cfg.eval.baseline == "average" or masks_dir.is_dir()
    average_rows = {}
    if want_average:
        average_rows = score([(p.name, average_fusion(p.ir, p.vi), p.ir, p.vi) for p in pairs], metrics, check)
    extra = {"tag": weights.tag, "epoch": weights.epoch, "weights": weights.describe(), "quantize": cfg.eval.quantize,
             "dataset": str(cfg.eval.root)}
    if average_rows:
        extra["beats_average"] = beats_average(summarize(fused_rows, metrics)[0], summarize(average_rows, metrics)[0])
    files["metrics"] = eval_dir / "metrics.csv"
    result = {"files": files, "next": next_steps}
    if cfg.eval.baseline == "average":
        result["average"] = write_results(eval_dir / "metrics_average.csv", average_rows, FusionMetricConfig(), metrics,
                                          extra={"baseline": "rint((A+B)/2)", "dataset": str(cfg.eval.root)})
    report = quality_report(pairs, masks_dir) if masks_dir.is_dir() else None
    if report is not None:
        report = {"seed": cfg.seed, "preset": cfg.preset, "approach": cfg.approach, "weights": extra["weights"],
                  "wall_seconds": (time.perf_counter() - started) if started is not None else None,
                  **report, "metrics": {"fused": write_means(fused_rows, metrics),
                                        "average": write_means(average_rows, metrics)}}
        atomic_write_json(weights.run_dir / "demo_report.json", report)
        files["demo report"] = weights.run_dir / "demo_report.json"
        result["report"] = report
    # metrics.json last: it marks the evaluation of these weights done (evaluation_current), so a run stopped
    # before it evaluates again instead of leaving the baseline or the demo report missing.
    result["fused"] = write_results(eval_dir / "metrics.csv", fused_rows, FusionMetricConfig(), metrics, extra=extra)
    console.print(f"metrics of {len(pairs)} pairs: {eval_dir / 'metrics.csv'}")
    print_comparison(console, result["fused"]["means"], result.get("average", {}).get("means"), metrics)
    if report is not None:
        for name, gate in report["checks"].items():
            console.print(f"demo gate {name}: fused {gate['fused']:.4f} (average {gate['average']:.4f}), "
                          f"required {gate['required']:.4f}: {'pass' if gate['passed'] else 'FAIL'}")
        verdict = "passed" if report["passed"] else "FAILED"
        console.print(f"demo quality {verdict}: {weights.run_dir / 'demo_report.json'}")
    return result
