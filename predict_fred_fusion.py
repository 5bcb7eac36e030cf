"""Detect drones with a trained FRED model: side-by-side RGB | Event PNGs and a COCO-results predictions.json.

The architecture comes from the weights' ``.json`` sidecar (written next to every exported ``.pth``). A sequence
folder is paired like the training data (spec/fred.md §5.2: mutual nearest neighbours in time); a frame without
its partner shows a grey panel and feeds zeros for that stream. Defaults follow bubbliiiing's predict (conf .5,
NMS .3). ``--export-onnx`` writes the model (without discriminator) with inputs ``rgb``/``event`` (or ``images``)
and raw outputs ``out0..out2``; it needs the optional ``onnx`` package (and ``onnxruntime`` to check it).

    python predict_fred_fusion.py --sequence data/fred_demo/4 --max-frames 20
    python predict_fred_fusion.py --weights logs/fred_fusion/fred_fusion_best.pth --rgb a.jpg --event b.png
    python predict_fred_fusion.py --weights logs/fred_rgb/fred_fusion_final.pth --export-onnx fred_rgb.onnx
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.checkpoint import atomic_write_json
from common.cli import parse
from common.run import exit_on_user_error
from fred.augment import letterbox
from fred.dataset import load_frame
from fred.decode import detect
from fred.draw import draw_boxes
from fred.index import event_frames, mutual_pairs, rgb_frames, rgb_times
from fred.model import build_model_from_meta
from fred.outputs import read_sidecar
from fred.weights import WeightsError, load_strict

GREY = (128, 128, 128)


@dataclass(frozen=True)
class PredictConfig:
    """Predict with (or export) a trained FRED detector."""

    weights: Path = Path("logs/fred_fusion/fred_fusion_best.pth")
    """Exported weights (.pth with its .json sidecar)."""
    sequence: Path | None = None
    """A FRED sequence folder (PADDED_RGB/ and Event/Frames/); frames are paired by time."""
    rgb: Path | None = None
    """One RGB frame (instead of --sequence)."""
    event: Path | None = None
    """One event frame (instead of --sequence)."""
    out: Path = Path("output/fred_predict")
    """Output folder for the PNGs and predictions.json."""
    conf: float = 0.5
    """Score threshold."""
    nms: float = 0.3
    """NMS IoU threshold."""
    max_frames: int = 50
    """Frames of a sequence to process."""
    pair_max_dt: float = 0.5
    """Largest |Δt| (s) for an RGB and an event frame of a sequence to be shown as a pair."""
    export_onnx: Path | None = None
    """Write the model as ONNX to this file (needs the onnx package) instead of predicting."""
    device: str = "cpu"
    """torch device (cpu, cuda, cuda:1 ...)."""


def load_predictor(weights: Path, device: str) -> tuple[torch.nn.Module, dict]:
    """The model described by the weights' sidecar, loaded strictly, in eval mode."""
    sidecar = read_sidecar(weights)
    if sidecar is None:
        raise WeightsError(f"{weights}: no {weights.with_suffix('.json').name} sidecar next to it; pass weights "
                           "exported by train_fred_fusion.py (ep*.pth, fred_fusion_best.pth, fred_fusion_final.pth)")
    meta = sidecar["model_meta"]
    model = build_model_from_meta(meta, discriminator=False, init=False)
    load_strict(model, weights)
    return model.to(device).eval(), meta


def sequence_frames(sequence: Path, modality: str, pair_max_dt: float, limit: int) -> list[tuple[Path | None,
                                                                                                  Path | None]]:
    """(rgb, event) paths in time order: pairs and unpaired frames of the streams the model uses (§5.2)."""
    rgb = rgb_frames(sequence) if modality in ("rgb", "dual") else []
    events = [path for _, path in event_frames(sequence)] if modality in ("event", "dual") else []
    if modality == "rgb":
        return [(path, None) for path in rgb[:limit]]
    if modality == "event":
        return [(None, path) for path in events[:limit]]
    rgb_t = rgb_times(rgb)
    event_t = np.array([int(t_us) * 1e-6 for t_us, _ in event_frames(sequence)])
    pairs = dict(mutual_pairs(rgb_t, event_t, pair_max_dt))
    paired_events = set(pairs.values())
    rows = [(rgb_t[i], rgb[i], events[pairs[i]] if i in pairs else None) for i in range(len(rgb))]
    rows += [(event_t[j], None, events[j]) for j in range(len(events)) if j not in paired_events]
    rows.sort(key=lambda row: (row[0], row[1] is None))
    return [(r, e) for _, r, e in rows[:limit]]


def input_tensor(image: Image.Image | None, size: tuple[int, int], input_shape, device: str) -> torch.Tensor:
    """Letterboxed [1, 3, H, W] tensor in 0..1 (zeros for a missing stream)."""
    if image is None:
        return torch.zeros(1, 3, *input_shape, device=device)
    array = letterbox(image, input_shape).astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None].to(device)


@torch.no_grad()
def predict(cfg: PredictConfig) -> list[dict]:
    """Run the model on the requested frames; write PNGs and predictions.json; return the prediction records."""
    model, meta = load_predictor(cfg.weights, cfg.device)
    modality, input_shape, names = meta["modality"], tuple(meta["input_shape"]), meta["class_names"]
    if cfg.sequence is not None:
        frames = sequence_frames(cfg.sequence, modality, cfg.pair_max_dt, cfg.max_frames)
    elif cfg.rgb is not None or cfg.event is not None:
        frames = [(cfg.rgb if modality != "event" else None, cfg.event if modality != "rgb" else None)]
    else:
        raise WeightsError("nothing to predict: pass --sequence DIR, or --rgb FILE and/or --event FILE")
    cfg.out.mkdir(parents=True, exist_ok=True)
    records = []
    best_score = 0.0
    for image_id, (rgb_path, event_path) in enumerate(frames):
        reference = rgb_path or event_path
        with Image.open(reference) as probe:
            size = probe.size
        rgb = load_frame(rgb_path, size) if rgb_path is not None else None
        event = load_frame(event_path, size) if event_path is not None else None
        rgb_input = input_tensor(rgb, size, input_shape, cfg.device)
        event_input = input_tensor(event, size, input_shape, cfg.device)
        if modality == "dual":
            outputs = model(rgb_input, event_input, torch.tensor([rgb is None], device=cfg.device),
                            torch.tensor([event is None], device=cfg.device))
        else:
            outputs = model(rgb_input if modality == "rgb" else event_input)
        found = detect(outputs, input_shape, [(size[1], size[0])], conf_thres=cfg.conf, nms_iou=cfg.nms)[0]
        found = found.cpu().numpy()
        top = detect(outputs, input_shape, [(size[1], size[0])], conf_thres=0.0, nms_iou=cfg.nms, max_det=1)[0]
        best_score = max(best_score, float(top[0, 4]) if len(top) else 0.0)
        panels = [draw_boxes(image if image is not None else Image.new("RGB", size, GREY), found, names)
                  for image in (rgb, event)]
        sheet = Image.new("RGB", (2 * size[0], size[1]))
        sheet.paste(panels[0], (0, 0))
        sheet.paste(panels[1], (size[0], 0))
        sheet.save(cfg.out / f"{image_id:05d}_{Path(reference).stem}.png")
        for x1, y1, x2, y2, score, label in found.tolist():
            records.append({"image_id": image_id, "category_id": int(label) + 1, "category": names[int(label)],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score,
                            "rgb_file": str(rgb_path) if rgb_path else None,
                            "event_file": str(event_path) if event_path else None})
    atomic_write_json(cfg.out / "predictions.json", records)
    print(f"{len(frames)} frames, {len(records)} detections -> {cfg.out}")
    if not records and frames:
        print(f"no detection scored --conf {cfg.conf} or more (best score {best_score:.2f}); a model trained briefly "
              f"(the demo) scores lower: try --conf {max(round(best_score * 0.8, 2), 0.01)}")
    return records


def export_onnx(cfg: PredictConfig) -> Path:
    """Export the model as ONNX (opset 17, dynamic batch) and, where onnxruntime exists, check it to 1e-4."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError as error:
        raise WeightsError("--export-onnx needs the optional onnx package: pip install onnx onnxruntime") from error
    model, meta = load_predictor(cfg.weights, "cpu")
    height, width = meta["input_shape"]
    dual = meta["modality"] == "dual"
    names = ["rgb", "event"] if dual else ["images"]
    example = tuple(torch.rand(2, 3, height, width) for _ in names)
    torch.onnx.export(model, example, str(cfg.export_onnx), input_names=names, output_names=["out0", "out1", "out2"],
                      dynamic_axes={name: {0: "batch"} for name in names + ["out0", "out1", "out2"]},
                      opset_version=17, external_data=False)
    try:
        import onnxruntime
    except ImportError:
        print(f"wrote {cfg.export_onnx} (onnxruntime not installed: outputs not checked)")
        return cfg.export_onnx
    session = onnxruntime.InferenceSession(str(cfg.export_onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: x.numpy() for name, x in zip(names, example)})
    with torch.no_grad():
        want = model(*example)
    error = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))
    if error > 1e-4:
        raise WeightsError(f"ONNX export {cfg.export_onnx} differs from PyTorch by {error:.2e} (> 1e-4)")
    print(f"wrote {cfg.export_onnx}; onnxruntime matches PyTorch (max abs diff {error:.1e})")
    return cfg.export_onnx


def main(cfg: PredictConfig) -> int:
    """Export or predict."""
    if cfg.export_onnx is not None:
        export_onnx(cfg)
    else:
        predict(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(lambda: main(parse(PredictConfig))))
