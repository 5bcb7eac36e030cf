"""MaeFuse inference, `train_mae_fusion.py fuse` (spec §7 steps 1-5).

1. Read the pair (IR gray; VIS converted to 8-bit BT.601 YCrCb with OpenCV at its own size, Y taken).
2. Resize Y and IR to S x S with OpenCV `INTER_LINEAR` (`stretch`), or keep the aspect ratio and reflect-pad
   (`pad`); replicate to 3 channels, /255, normalise.
3. Encoder -> fusion layer (or CFM only, or the latent mean) -> decoder, always with `official` group size 1 so
   every image is independent of its batch; denormalise, clip to 0..255, round; gray = BT.601 luma.
4. Colour VIS: its S x S YCrCb with Y replaced by the fused gray, to RGB, back to the source size with bicubic
   (`pad`: cropped first); gray VIS: the fused gray back to the source size. Written as `{stem}{VIS extension}`.

The averaging baseline (and optionally the decoded latent mean) goes through the identical output path.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import cv2
import numpy as np
import torch

from common.checkpoint import atomic_write_json
from common.errors import ConfigError, UserError
from common.images import rgb_to_gray, to_gray
from common.ivif.data import FilePair, discover_file_pairs
from common.ivif.evaluation import FusedPair, read_test_pair, save_fusion_grid
from maefuse.model import (FusionAttention, MaeFuse, denormalize_255, evaluation, gray_to_input, resolve_size,
                           size_from_meta)
from maefuse.weights import LoadReport, apply_weights, read_weights

ResizeMode = Literal["stretch", "pad"]
FusePath = Literal["full", "cfm", "mean"]
Baseline = Literal["average", "latent_mean"]
ROUTES = {"full": "fused_image", "cfm": "cfm_image", "mean": "mean_image"}
FUSION_RECORD = "fusion.json"
"""Written by `fuse` beside the images: the settings `evaluate` needs for its baselines."""


@dataclass(frozen=True)
class Placement:
    """Where a source image of `height` x `width` sits in the S x S model input: the resized content occupies
    rows `top`.. and columns `left`.. with size `content_height` x `content_width` (the rest is reflect padding)."""

    height: int
    width: int
    img_size: int
    top: int
    left: int
    content_height: int
    content_width: int

    @classmethod
    def of(cls, height: int, width: int, img_size: int, resize_mode: ResizeMode) -> "Placement":
        """`stretch` fills S x S; `pad` scales the longer side to S and centres the content."""
        if resize_mode == "stretch":
            return cls(height, width, img_size, 0, 0, img_size, img_size)
        if resize_mode != "pad":
            raise ConfigError(f"resize_mode must be 'stretch' or 'pad', got {resize_mode!r}")
        scale = img_size / max(height, width)
        content_height = min(img_size, max(1, round(height * scale)))
        content_width = min(img_size, max(1, round(width * scale)))
        return cls(height, width, img_size, (img_size - content_height) // 2, (img_size - content_width) // 2,
                   content_height, content_width)

    def to_model(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W[, C]) at the source size -> (S, S[, C]): OpenCV bilinear resize, reflect padding."""
        resized = cv2.resize(image, (self.content_width, self.content_height), interpolation=cv2.INTER_LINEAR)
        pads = ((self.top, self.img_size - self.content_height - self.top),
                (self.left, self.img_size - self.content_width - self.left)) + ((0, 0),) * (image.ndim - 2)
        if not any(before or after for before, after in pads):
            return resized
        # numpy 'reflect' (no edge repeat) also handles pads wider than the content, and 1-pixel content
        return np.pad(resized, pads, mode="reflect" if min(resized.shape[:2]) > 1 else "edge")

    def to_source(self, image: np.ndarray) -> np.ndarray:
        """uint8 (S, S[, C]) -> the source size: the content cropped, then OpenCV bicubic resize."""
        content = image[self.top:self.top + self.content_height, self.left:self.left + self.content_width]
        return cv2.resize(np.ascontiguousarray(content), (self.width, self.height), interpolation=cv2.INTER_CUBIC)


@dataclass
class PreparedPair:
    """A test pair read and placed on the model grid.

    Attributes:
        name: the pair key (the stem, with its folder for nested data); extension: the VIS file extension.
        ir, vi: uint8 gray IR and VIS luma at the source size (the metrics' sources); vi_rgb: colour VIS or None.
        placement: the source-to-model geometry.
        model_vi, model_ir: the uint8 S x S gray model inputs (VIS Y, IR).
        vi_ycrcb: the VIS YCrCb on the model grid (colour VIS only), whose Y the fused gray replaces.
    """

    name: str
    extension: str
    ir: np.ndarray
    vi: np.ndarray
    vi_rgb: np.ndarray | None
    placement: Placement
    model_vi: np.ndarray
    model_ir: np.ndarray
    vi_ycrcb: np.ndarray | None


def prepare_pair(pair: FilePair, img_size: int, resize_mode: ResizeMode = "stretch") -> PreparedPair:
    """Steps 1-2 for one file pair (sizes must agree; unreadable files raise `DataError` naming them)."""
    ir, vi, vi_rgb = read_test_pair(pair)
    placement = Placement.of(*ir.shape, img_size, resize_mode)
    vi_ycrcb = cv2.cvtColor(vi_rgb, cv2.COLOR_RGB2YCrCb) if vi_rgb is not None else None
    luma = vi_ycrcb[..., 0] if vi_ycrcb is not None else vi
    return PreparedPair(pair.key, pair.vi.suffix, ir, vi, vi_rgb, placement, placement.to_model(luma),
                        placement.to_model(ir), placement.to_model(vi_ycrcb) if vi_ycrcb is not None else None)


def output_image(prepared: PreparedPair, gray: np.ndarray) -> np.ndarray:
    """Step 4: a uint8 S x S gray result -> the written image at the source size (RGB for colour VIS, else gray)."""
    if prepared.vi_ycrcb is None:
        return prepared.placement.to_source(gray)
    ycrcb = prepared.vi_ycrcb.copy()
    ycrcb[..., 0] = gray
    return prepared.placement.to_source(cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB))


def decoded_gray(images: torch.Tensor) -> np.ndarray:
    """Step 3's output side: normalised (B,3,S,S) -> uint8 gray (B,S,S): denormalise, clip, round (half to even),
    then BT.601 luma of the uint8 RGB, rounded."""
    rgb = denormalize_255(images.float()).clamp(0, 255).round().to(torch.uint8)
    return np.stack([rgb_to_gray(image) for image in rgb.permute(0, 2, 3, 1).cpu().numpy()])


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


def fuse_grays(model: MaeFuse, model_vi: np.ndarray, model_ir: np.ndarray, fuse_path: FusePath = "full"
               ) -> np.ndarray:
    """Fuse a batch of uint8 (B,S,S) VIS Y and IR model inputs; returns uint8 gray (B,S,S). Eval mode, `no_grad`,
    `official` group size 1, so each result equals that image fused alone."""
    device = model_device(model)
    with evaluation(model):
        x_vi = gray_to_input(torch.from_numpy(np.ascontiguousarray(model_vi)).to(device))
        x_ir = gray_to_input(torch.from_numpy(np.ascontiguousarray(model_ir)).to(device))
        return decoded_gray(model(x_vi, x_ir, route=ROUTES[fuse_path], group_size=1).image)


@dataclass
class FusionResult:
    """One fused pair: the written `output` (RGB or gray, source size), its gray `fused`, the metric sources `ir`
    and `vi`, and the baselines through the identical output path (gray, source size) by name."""

    name: str
    extension: str
    ir: np.ndarray
    vi: np.ndarray
    output: np.ndarray
    fused: np.ndarray
    baselines: dict[str, np.ndarray] = field(default_factory=dict)

    def fused_pair(self) -> FusedPair:
        """The shared evaluation's view (demo quality gate, sample grid), with the `average` baseline if computed."""
        return FusedPair(self.name, self.ir, self.vi, self.fused, self.output if self.output.ndim == 3 else None,
                         self.baselines.get("average"))


def _finish(prepared: PreparedPair, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = output_image(prepared, gray)
    return image, to_gray(image)


def average_gray(prepared: PreparedPair) -> np.ndarray:
    """The averaging baseline on the model grid: rint((Y_vi + IR)/2) of the two S x S model inputs, uint8."""
    total = prepared.model_vi.astype(np.float64) + prepared.model_ir.astype(np.float64)
    return np.clip(np.rint(total / 2.0), 0, 255).astype(np.uint8)


def fuse_pairs(model: MaeFuse | None, pairs: Sequence[FilePair], *, img_size: int | None = None,
               batch_size: int = 8, resize_mode: ResizeMode = "stretch", fuse_path: FusePath = "full",
               baselines: Sequence[Baseline] = ()) -> list[FusionResult]:
    """Fuse file pairs in batches of up to `batch_size` (any mix of sizes) and build their baselines.

    With `model=None`, nothing is fused (`fused` and `output` are the averaging baseline): the baseline-only path
    `evaluate` uses; `img_size` must then be given.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if model is None and (img_size is None or "latent_mean" in baselines):
        raise ConfigError("fusing without a model needs img_size and cannot decode the latent mean")
    img_size = model.size.img_size if model is not None else img_size
    results = []
    for start in range(0, len(pairs), batch_size):
        prepared = [prepare_pair(pair, img_size, resize_mode) for pair in pairs[start:start + batch_size]]
        averages = [average_gray(item) for item in prepared]
        stacked = (np.stack([item.model_vi for item in prepared]), np.stack([item.model_ir for item in prepared]))
        fused = fuse_grays(model, *stacked, fuse_path) if model is not None else averages
        latent_means = None
        if "latent_mean" in baselines:
            latent_means = fused if fuse_path == "mean" else fuse_grays(model, *stacked, "mean")
        for index, item in enumerate(prepared):
            output, gray = _finish(item, fused[index])
            result = FusionResult(item.name, item.extension, item.ir, item.vi, output, gray)
            if "average" in baselines:
                result.baselines["average"] = _finish(item, averages[index])[1]
            if latent_means is not None:
                result.baselines["latent_mean"] = _finish(item, latent_means[index])[1]
            results.append(result)
    return results


def write_image(path: Path, image: np.ndarray) -> Path:
    """Write uint8 gray or RGB with OpenCV (its JPEG quality 95, as the public script), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    if not cv2.imwrite(str(path), pixels):
        raise UserError(f"cannot write {path}: check the output folder and the file extension")
    return path


def write_fusions(results: Sequence[FusionResult], out_dir: str | Path, save_gray: bool = False) -> list[Path]:
    """Write `{key}{VIS extension}` per result (and `gray/{key}.png` with `save_gray`); returns the main files."""
    out_dir = Path(out_dir)
    written = []
    for result in results:
        written.append(write_image(out_dir / f"{result.name}{result.extension}", result.output))
        if save_gray:
            write_image(out_dir / "gray" / f"{result.name}.png", result.fused)
    return written


def write_samples(model: MaeFuse, pairs: Sequence[FilePair], out_dir: str | Path, fuse_path: FusePath = "full",
                  batch_size: int = 8) -> Path:
    """Validation samples: fuse up to 8 fixed pairs into `out_dir` (e.g. `samples/epoch{e}/`) with the averaging
    baseline and an IR | VIS | average | fused grid `grid.png`; returns the grid path."""
    results = fuse_pairs(model, list(pairs)[:8], batch_size=batch_size, fuse_path=fuse_path, baselines=("average",))
    write_fusions(results, out_dir)
    return save_fusion_grid(Path(out_dir) / "grid.png", [result.fused_pair() for result in results])


def model_from_weights(path: str | Path, *, model_size: str | None = None,
                       fusion_attention: FusionAttention | None = None, unsafe_load: bool = False,
                       device: str | torch.device = "cpu") -> tuple[MaeFuse, LoadReport]:
    """Build a network for a full (`all_weight`) file and load it strictly.

    The size comes from the file's `meta` (files written here), else `model_size` (default `large`, the released
    weights); an explicit `model_size` wins. `fusion_attention` defaults to the file's, else `tokens`; an explicit
    value that differs from the file's gives a warning.
    """
    state, meta = read_weights(path, unsafe_load)
    if model_size is not None or "size" not in meta:
        size = resolve_size(model_size or "large")
    else:
        size = size_from_meta(meta["size"])
    recorded = meta.get("fusion_attention")
    if fusion_attention is not None and recorded is not None and fusion_attention != recorded:
        warnings.warn(f"{path} was trained with fusion_attention={recorded}; fusing with {fusion_attention}",
                      stacklevel=2)
    model = MaeFuse(size, fusion_attention or recorded or "tokens", int(meta.get("official_group_size", 4)))
    report = apply_weights(model, state, meta, path, "all_weight")
    return model.to(device), report


@dataclass(frozen=True)
class FuseArgs:
    """Fuse IR/VIS pairs with a full MaeFuse weight file (`train_mae_fusion.py fuse`)."""

    ckpt: Path
    """Full weights: a `checkpoint{e}.pth` of this trainer, or the released `final_new_60.pth`."""
    data_path: Path
    """Folder with the IR (`ir`/`infrared`) and VIS (`vi`/`vis`/`visible`) images, paired by file stem."""
    out_dir: Path
    """Output folder: `{stem}{VIS extension}` per pair, and `fusion.json` (the settings, for `evaluate`)."""
    split: str | None = None
    """LLVIP-style split folder under the IR and VIS folders (e.g. `test`)."""
    batch_size: int = 8
    """Pairs per forward pass (any mix of image sizes; results equal per-image fusion)."""
    resize_mode: ResizeMode = "stretch"
    """Non-square images: `stretch` to S x S (faithful), or `pad` (keep the aspect ratio, reflect-pad, crop back)."""
    fuse_path: Literal["full", "cfm"] = "full"
    """Decode the fusion output h (`full`), or the CFM output c (`cfm`)."""
    save_gray: bool = False
    """Also write the fused gray image as `gray/{stem}.png`."""
    model_size: str | None = None
    """Model size preset for files without `meta` (default `large`); given explicitly, it wins over `meta`."""
    fusion_attention: FusionAttention | None = None
    """Fusion attention (default: the file's `meta`, else `tokens`; the released weights need `official`)."""
    unsafe_load: bool = False
    """Load a file holding pickled objects (only for files you trust)."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Device to fuse on."""


def fuse(args: FuseArgs, log: Callable[[str], None] = print) -> list[FusionResult]:
    """The `fuse` subcommand: load, fuse every pair of `data_path`, write the images and `fusion.json`."""
    model, report = model_from_weights(args.ckpt, model_size=args.model_size, fusion_attention=args.fusion_attention,
                                       unsafe_load=args.unsafe_load, device=args.device)
    log(report.describe())
    pairs = discover_file_pairs(args.data_path, "paired", args.split, modality_tokens=False)
    results = fuse_pairs(model, pairs, batch_size=args.batch_size, resize_mode=args.resize_mode,
                         fuse_path=args.fuse_path)
    write_fusions(results, args.out_dir, args.save_gray)
    atomic_write_json(Path(args.out_dir) / FUSION_RECORD, {
        "ckpt": str(args.ckpt), "data_path": str(args.data_path), "split": args.split, "n_images": len(results),
        "img_size": model.size.img_size, "model_size": model.size.name, "size": model.size.as_meta(),
        "resize_mode": args.resize_mode, "fuse_path": args.fuse_path, "fusion_attention": model.fusion_attention})
    log(f"fused {len(results)} pairs of {args.data_path} -> {args.out_dir}")
    return results


def read_fusion_record(fused_dir: str | Path) -> dict:
    """`fusion.json` of a `fuse` output folder, or {} when absent."""
    path = Path(fused_dir) / FUSION_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}
