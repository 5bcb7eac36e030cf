"""Letterbox preprocessing and synchronised RGB+Event augmentation (bubbliiiing ``utils/dataloader.py``;
spec/fred.md §5.6).

Each training sample takes **one** draw (:func:`draw_augmentation`) and :func:`compose` applies its geometry
identically to every modality: the plain path (aspect/scale jitter, random paste, flip), mosaic (four tiles
cut at a random point, each tile's boxes clipped to its own quadrant) and mixup (after mosaic only, with one
plain-path partner, alpha .5). HSV jitter (:func:`hsv_jitter`, LUTs) is applied to RGB only, once per sample,
by the caller after :func:`compose`. Images are HWC uint8/float32 arrays in 0..255; boxes are ``[N, 5]``
``x1, y1, x2, y2, class`` in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image

GREY = (128, 128, 128)
MIXUP_SOURCE = 4  # box_sources value of boxes that come from the mixup partner

Images = Mapping[str, Image.Image]
Loader = Callable[[int], tuple[Images, np.ndarray]]


@dataclass(frozen=True)
class PlacementDraw:
    """Random numbers of the plain path: aspect factor U(1-j,1+j)/U(1-j,1+j), scale U(.25,2), paste position as
    fractions of the free range, horizontal flip."""

    aspect: float
    scale: float
    dx_fraction: float
    dy_fraction: float
    flip: bool


@dataclass(frozen=True)
class TileDraw:
    """One mosaic tile: the sample index it shows, flip, aspect factor and scale U(.4,1)."""

    source: int
    flip: bool
    aspect: float
    scale: float


@dataclass(frozen=True)
class AugmentDraw:
    """The single draw of a training sample, shared by all modalities.

    ``kind`` is ``plain`` (uses ``placement``) or ``mosaic`` (``cut`` fractions and four ``tiles`` in
    top-left, bottom-left, bottom-right, top-right order; optional ``mixup_source`` with ``mixup_placement``).
    ``hsv_gains`` multiply hue, saturation and value (RGB only).
    """

    kind: Literal["plain", "mosaic"]
    source: int
    placement: PlacementDraw | None = None
    cut: tuple[float, float] | None = None
    tiles: tuple[TileDraw, ...] = ()
    mixup_source: int | None = None
    mixup_placement: PlacementDraw | None = None
    hsv_gains: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass
class Composite:
    """Output of :func:`compose`: per-modality float32 HWC images (0..255, before HSV), boxes ``[N, 5]`` and
    for each box its origin (0-3 mosaic tile, :data:`MIXUP_SOURCE` mixup partner, -1 plain path)."""

    images: dict[str, np.ndarray]
    boxes: np.ndarray
    box_sources: np.ndarray


def _aspect_factor(rng: np.random.Generator, jitter: float) -> float:
    return float(rng.uniform(1 - jitter, 1 + jitter) / rng.uniform(1 - jitter, 1 + jitter))


def _draw_placement(rng: np.random.Generator, jitter: float) -> PlacementDraw:
    aspect = _aspect_factor(rng, jitter)
    scale = float(rng.uniform(0.25, 2.0))
    return PlacementDraw(aspect, scale, float(rng.random()), float(rng.random()), bool(rng.random() < 0.5))


def draw_augmentation(rng: np.random.Generator, index: int, partners: Sequence[int], special_allowed: bool,
                      mosaic_prob: float = 0.5, mixup_prob: float = 0.5, jitter: float = 0.3,
                      hsv: tuple[float, float, float] = (0.1, 0.7, 0.4)) -> AugmentDraw:
    """Draw one sample's augmentation.

    ``partners``: sample indices eligible as mosaic tiles and mixup partner. ``special_allowed``: whether
    mosaic/mixup may run (epoch < special_aug_ratio·T). Mosaic takes the sample plus 3 random partners, shuffled.
    """
    gains = tuple(float(g) for g in rng.uniform(-1.0, 1.0, 3) * np.asarray(hsv) + 1.0)
    if special_allowed and len(partners) > 0 and rng.random() < mosaic_prob:
        chosen = rng.choice(np.asarray(partners), size=3, replace=len(partners) < 3).tolist()
        sources = [int(s) for s in rng.permutation(np.asarray(chosen + [index]))]
        cut = (float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7)))
        tiles = []
        for source in sources:
            flip = bool(rng.random() < 0.5)
            tiles.append(TileDraw(source, flip, _aspect_factor(rng, jitter), float(rng.uniform(0.4, 1.0))))
        mixup_source = mixup_placement = None
        if rng.random() < mixup_prob:
            mixup_source = int(rng.choice(np.asarray(partners)))
            mixup_placement = _draw_placement(rng, jitter)
        return AugmentDraw("mosaic", index, cut=cut, tiles=tuple(tiles), mixup_source=mixup_source,
                           mixup_placement=mixup_placement, hsv_gains=gains)
    return AugmentDraw("plain", index, placement=_draw_placement(rng, jitter), hsv_gains=gains)


# ---------------------------------------------------------------------------------------------- geometry

def letterbox_geometry(image_size: tuple[int, int], input_shape: Sequence[int]) -> tuple[int, int, int, int]:
    """(nw, nh, dx, dy) of bubbliiiing's letterbox: the image scaled to fit ``input_shape`` = (h, w), centred."""
    iw, ih = image_size
    h, w = input_shape
    scale = min(w / iw, h / ih)
    nw, nh = int(iw * scale), int(ih * scale)
    return nw, nh, (w - nw) // 2, (h - nh) // 2


def map_boxes(boxes: np.ndarray, image_size: tuple[int, int], placed: tuple[int, int, int, int],
              flip_before: bool = False) -> np.ndarray:
    """Map ``[N, 5]`` boxes from an ``image_size`` = (iw, ih) image resized to (nw, nh) and pasted at (dx, dy);
    ``flip_before`` mirrors them in the source image first."""
    iw, ih = image_size
    nw, nh, dx, dy = placed
    out = np.array(boxes, dtype=np.float32).reshape(-1, 5)
    if flip_before:
        out[:, [0, 2]] = iw - out[:, [2, 0]]
    out[:, [0, 2]] = out[:, [0, 2]] * nw / iw + dx
    out[:, [1, 3]] = out[:, [1, 3]] * nh / ih + dy
    return out


def clip_boxes(boxes: np.ndarray, x_range: tuple[float, float], y_range: tuple[float, float]) -> np.ndarray:
    """Clip boxes to a rectangle and drop those whose clipped width or height is ≤ 1 px."""
    out = np.array(boxes, dtype=np.float32).reshape(-1, 5)
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], x_range[0], x_range[1])
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], y_range[0], y_range[1])
    keep = (out[:, 2] - out[:, 0] > 1) & (out[:, 3] - out[:, 1] > 1)
    return out[keep]


def _paste(image: Image.Image, size: tuple[int, int], offset: tuple[int, int], canvas_size: tuple[int, int],
           flip_source: bool = False) -> np.ndarray:
    if flip_source:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    resized = image.resize(size, Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", canvas_size, GREY)
    canvas.paste(resized, offset)
    return np.asarray(canvas)


def letterbox(image: Image.Image, input_shape: Sequence[int]) -> np.ndarray:
    """bubbliiiing letterbox: BICUBIC resize to fit, centred on grey 128; HWC uint8."""
    nw, nh, dx, dy = letterbox_geometry(image.size, input_shape)
    return _paste(image, (nw, nh), (dx, dy), (int(input_shape[1]), int(input_shape[0])))


def letterbox_boxes(boxes: np.ndarray, image_size: tuple[int, int], input_shape: Sequence[int]) -> np.ndarray:
    """Boxes mapped by :func:`letterbox`, clipped to the input and ≤ 1 px dropped."""
    placed = letterbox_geometry(image_size, input_shape)
    return clip_boxes(map_boxes(boxes, image_size, placed), (0, input_shape[1]), (0, input_shape[0]))


def _jittered_size(image_size: tuple[int, int], input_shape: Sequence[int], aspect: float,
                   scale: float) -> tuple[int, int]:
    iw, ih = image_size
    h, w = input_shape
    new_ar = iw / ih * aspect
    if new_ar < 1:
        nh = int(scale * h)
        nw = int(nh * new_ar)
    else:
        nw = int(scale * w)
        nh = int(nw / new_ar)
    return max(nw, 1), max(nh, 1)


def plain_geometry(image_size: tuple[int, int], input_shape: Sequence[int],
                   draw: PlacementDraw) -> tuple[int, int, int, int]:
    """(nw, nh, dx, dy) of the plain path for an image of ``image_size``."""
    h, w = input_shape
    nw, nh = _jittered_size(image_size, input_shape, draw.aspect, draw.scale)
    return nw, nh, int(draw.dx_fraction * (w - nw)), int(draw.dy_fraction * (h - nh))


def apply_plain(images: Images, boxes: np.ndarray, input_shape: Sequence[int],
                draw: PlacementDraw) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Plain path on every modality with the same geometry; flip mirrors the whole canvas."""
    h, w = int(input_shape[0]), int(input_shape[1])
    size = _common_size(images)
    placed = plain_geometry(size, input_shape, draw)
    out = {}
    for name, image in images.items():
        canvas = _paste(image, placed[:2], placed[2:], (w, h))
        out[name] = canvas[:, ::-1] if draw.flip else canvas
    mapped = map_boxes(boxes, size, placed)
    if draw.flip:
        mapped[:, [0, 2]] = w - mapped[:, [2, 0]]
    return out, clip_boxes(mapped, (0, w), (0, h))


def tile_geometry(image_size: tuple[int, int], input_shape: Sequence[int], cut_xy: tuple[int, int], corner: int,
                  tile: TileDraw) -> tuple[int, int, int, int]:
    """(nw, nh, dx, dy) of mosaic tile ``corner`` (0 top-left, 1 bottom-left, 2 bottom-right, 3 top-right)."""
    nw, nh = _jittered_size(image_size, input_shape, tile.aspect, tile.scale)
    cutx, cuty = cut_xy
    dx = cutx - nw if corner in (0, 1) else cutx
    dy = cuty - nh if corner in (0, 3) else cuty
    return nw, nh, dx, dy


def quadrant(corner: int, cut_xy: tuple[int, int], input_shape: Sequence[int]) -> tuple[tuple[int, int],
                                                                                          tuple[int, int]]:
    """((x0, x1), (y0, y1)) of a mosaic tile's quadrant."""
    cutx, cuty = cut_xy
    h, w = int(input_shape[0]), int(input_shape[1])
    x_range = (0, cutx) if corner in (0, 1) else (cutx, w)
    y_range = (0, cuty) if corner in (0, 3) else (cuty, h)
    return x_range, y_range


def apply_mosaic(tiles: Sequence[tuple[Images, np.ndarray]], input_shape: Sequence[int], draw: AugmentDraw
                 ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Mosaic of four (images, boxes) tiles; returns images, boxes and each box's tile (0-3)."""
    h, w = int(input_shape[0]), int(input_shape[1])
    cut_xy = (int(w * draw.cut[0]), int(h * draw.cut[1]))
    merged: dict[str, np.ndarray] = {}
    all_boxes, sources = [], []
    for corner, ((images, boxes), tile) in enumerate(zip(tiles, draw.tiles)):
        size = _common_size(images)
        placed = tile_geometry(size, input_shape, cut_xy, corner, tile)
        (x0, x1), (y0, y1) = quadrant(corner, cut_xy, input_shape)
        for name, image in images.items():
            canvas = _paste(image, placed[:2], placed[2:], (w, h), flip_source=tile.flip)
            target = merged.setdefault(name, np.zeros((h, w, 3), dtype=np.uint8))
            target[y0:y1, x0:x1] = canvas[y0:y1, x0:x1]
        kept = clip_boxes(map_boxes(boxes, size, placed, flip_before=tile.flip), (x0, x1), (y0, y1))
        all_boxes.append(kept)
        sources.append(np.full(len(kept), corner, dtype=np.int64))
    return merged, np.concatenate(all_boxes), np.concatenate(sources)


def mixup(first: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """bubbliiiing mixup: the two images averaged with alpha .5 (float32)."""
    return {name: first[name].astype(np.float32) * 0.5 + second[name].astype(np.float32) * 0.5 for name in first}


def _common_size(images: Images) -> tuple[int, int]:
    sizes = {image.size for image in images.values()}
    if len(sizes) != 1:
        raise ValueError(f"modalities of one sample must have the same size, got {sorted(sizes)}")
    return sizes.pop()


def compose(draw: AugmentDraw, load: Loader, input_shape: Sequence[int]) -> Composite:
    """Apply one draw to all modalities. ``load(index)`` returns ({modality: PIL image}, boxes [N, 5])."""
    if draw.kind == "plain":
        images, boxes = load(draw.source)
        out, kept = apply_plain(images, boxes, input_shape, draw.placement)
        return Composite({k: v.astype(np.float32) for k, v in out.items()}, kept, np.full(len(kept), -1))
    merged, boxes, sources = apply_mosaic([load(t.source) for t in draw.tiles], input_shape, draw)
    if draw.mixup_source is None:
        return Composite({k: v.astype(np.float32) for k, v in merged.items()}, boxes, sources)
    partner_images, partner_boxes = load(draw.mixup_source)
    partner, partner_kept = apply_plain(partner_images, partner_boxes, input_shape, draw.mixup_placement)
    mixed = mixup(merged, partner)
    return Composite(mixed, np.concatenate([boxes, partner_kept]),
                     np.concatenate([sources, np.full(len(partner_kept), MIXUP_SOURCE)]))


def hsv_jitter(rgb: np.ndarray, gains: Sequence[float]) -> np.ndarray:
    """bubbliiiing HSV jitter with LUTs on an RGB image (float values are rounded to uint8 first): hue × g0 mod
    180, saturation × g1 and value × g2 clipped at 255. Returns float32 HWC 0..255."""
    image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8) if rgb.dtype != np.uint8 else rgb
    hue, sat, val = cv2.split(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV))
    x = np.arange(256, dtype=np.float64)
    lut_hue = ((x * gains[0]) % 180).astype(np.uint8)
    lut_sat = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_val = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    merged = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    return cv2.cvtColor(merged, cv2.COLOR_HSV2RGB).astype(np.float32)
