"""Generated infrared/visible demo dataset (spec/crossfuse.md §5), shared by CrossFuse and MaeFuse.

Written once, in the real paired layout, so the trainers read it through the same loader as real data::

    <out>/train/{ir,vi}/00000.png ... 00127.png      48 x 48, 8-bit gray
    <out>/test/{ir,vi}/000.png ... 007.png           96..120 px per side, never a multiple of 8
    <out>/test/masks/{stem}_targets.png              warm targets (soft mask > 0.5), 0/255
    <out>/test/masks/{stem}_texture.png              VIS grating area away from targets (mask < 0.01), 0/255
    <out>/ivif_demo.json                             seed and SHA-256 of every file, written last

The content is complementary: warm targets exist only in IR (hidden, dark and textureless in VIS), fine
texture only in VIS (IR is a smooth, low-contrast blur of the scene layout). Each image's RNG is seeded by
(seed, split, index), so equal seeds give byte-identical files.

    python -m common.ivif.demo --out data/ivif_demo --seed 0
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from common.data import GeneratedDataset
from common.errors import DataError

TRAIN_COUNT = 128
TRAIN_SIZE = 48
TEST_COUNT = 8
TEST_SIDES = tuple(side for side in range(96, 121) if side % 8)
SPLIT_IDS = {"train": 0, "test": 1}
MANIFEST_NAME = "ivif_demo.json"
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class DemoScene:
    """One generated pair: uint8 IR and VIS images and boolean target and texture masks, all ``(H, W)``."""

    ir: np.ndarray
    vi: np.ndarray
    targets: np.ndarray
    texture: np.ndarray


def render_scene(seed: int, split: str, index: int) -> DemoScene:
    """Render pair ``index`` of ``split`` ('train' or 'test') with the RNG seeded by (seed, split, index)."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    if split == "train":
        height = width = TRAIN_SIZE
    else:
        height, width = (int(side) for side in rng.choice(TEST_SIDES, size=2))
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float64)

    # Layout R: background plus 3-5 rectangles, each with its own sine grating T (VIS texture).
    layout = np.full((height, width), rng.uniform(0.3, 0.5))
    grating = np.zeros((height, width))
    grating_area = np.zeros((height, width), dtype=bool)
    for _ in range(rng.integers(3, 6)):
        rect_height = int(rng.integers(int(np.ceil(height / 5)), height // 2 + 1))
        rect_width = int(rng.integers(int(np.ceil(width / 5)), width // 2 + 1))
        top = int(rng.integers(0, height - rect_height + 1))
        left = int(rng.integers(0, width - rect_width + 1))
        reflectance = rng.uniform(0.2, 0.9)
        period, angle = rng.uniform(5.0, 12.0), rng.uniform(0.0, np.pi)
        phase, amplitude = rng.uniform(0.0, 2 * np.pi), rng.uniform(0.6, 1.0)
        box = (slice(top, top + rect_height), slice(left, left + rect_width))
        wave = amplitude * np.sin(2 * np.pi * (columns * np.cos(angle) + rows * np.sin(angle)) / period + phase)
        layout[box] = reflectance
        grating[box] = wave[box]
        grating_area[box] = True

    # Illumination L: a linear ramp in a random direction, clipped to [0.5, 1.3].
    direction = rng.uniform(0.0, 2 * np.pi)
    ramp = ((columns - width / 2) * np.cos(direction) + (rows - height / 2) * np.sin(direction)) / (
        max(height, width) / 2)
    illumination = np.clip(rng.uniform(0.8, 1.0) + rng.uniform(0.3, 0.6) * ramp, 0.5, 1.3)
    texture_noise = ndimage.gaussian_filter(rng.standard_normal((height, width)), 1.0)
    visible = 50.0 + 120.0 * layout * illumination + 40.0 * grating + 6.0 * texture_noise
    infrared = 40.0 + 50.0 * ndimage.gaussian_filter(layout, 4.0)

    # Warm targets: bright in IR, dark and textureless (hidden) in VIS.
    target_weight = np.zeros((height, width))
    for _ in range(rng.integers(1, 4)):
        semi_vertical = rng.uniform(0.08, 0.18) * height
        semi_horizontal = rng.uniform(0.35, 0.7) * semi_vertical
        centre_row = rng.uniform(semi_vertical, height - semi_vertical)
        centre_column = rng.uniform(semi_horizontal, width - semi_horizontal)
        ellipse = ((columns - centre_column) / semi_horizontal) ** 2 + ((rows - centre_row) / semi_vertical) ** 2 <= 1
        weight = ndimage.gaussian_filter(ellipse.astype(np.float64), 1.0)
        temperature = rng.uniform(200.0, 240.0)
        infrared = (1 - weight) * infrared + weight * temperature
        visible = (1 - weight) * visible + weight * 0.5 * ndimage.gaussian_filter(visible, 3.0)
        target_weight = np.maximum(target_weight, weight)

    infrared = infrared + 2.0 * rng.standard_normal((height, width))
    visible = visible + 2.0 * rng.standard_normal((height, width))
    return DemoScene(ir=_to_uint8(infrared), vi=_to_uint8(visible), targets=target_weight > 0.5,
                     texture=grating_area & (target_weight < 0.01))


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def reference_target(ir: np.ndarray, vi: np.ndarray) -> np.ndarray:
    """The CrossFuse pixel-loss target T (spec/crossfuse.md §3 L_pix) in float64, for tests and baselines.

    m = 11x11 zero-padded box mean; T takes IR where m_ir/(m_ir+m_vi+1e-6) > m_vi/(m_ir+m_vi+1e-6), else VIS.
    """
    ir = np.asarray(ir, dtype=np.float64)
    vi = np.asarray(vi, dtype=np.float64)
    mean_ir = ndimage.uniform_filter(ir, size=11, mode="constant", cval=0.0)
    mean_vi = ndimage.uniform_filter(vi, size=11, mode="constant", cval=0.0)
    total = mean_ir + mean_vi + 1e-6
    return np.where(mean_ir / total > mean_vi / total, ir, vi)


def demo_file_names() -> list[str]:
    """Relative POSIX paths of every image file of the demo dataset, in generation order."""
    names = []
    for index in range(TRAIN_COUNT):
        names += [f"train/ir/{index:05d}.png", f"train/vi/{index:05d}.png"]
    for index in range(TEST_COUNT):
        stem = f"{index:03d}"
        names += [f"test/ir/{stem}.png", f"test/vi/{stem}.png",
                  f"test/masks/{stem}_targets.png", f"test/masks/{stem}_texture.png"]
    return names


def write_ivif_demo(out: str | Path, seed: int = 0) -> Path:
    """Write the whole demo dataset into ``out`` (created; must not hold a dataset already) and its manifest."""
    out = Path(out)
    images: dict[str, np.ndarray] = {}
    for split, count, digits in (("train", TRAIN_COUNT, 5), ("test", TEST_COUNT, 3)):
        for index in range(count):
            scene = render_scene(seed, split, index)
            stem = f"{index:0{digits}d}"
            images[f"{split}/ir/{stem}.png"] = scene.ir
            images[f"{split}/vi/{stem}.png"] = scene.vi
            if split == "test":
                images[f"test/masks/{stem}_targets.png"] = scene.targets.astype(np.uint8) * 255
                images[f"test/masks/{stem}_texture.png"] = scene.texture.astype(np.uint8) * 255
    digests = {}
    for name in demo_file_names():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[name]).save(path, format="PNG")
        digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    DATASET.write_manifest(out, seed, digests)
    return out


DATASET = GeneratedDataset("common.ivif.demo", MANIFEST_NAME, GENERATOR_VERSION, demo_file_names, write_ivif_demo,
                           "infrared/visible demo dataset")


def is_complete(root: str | Path, seed: int) -> bool:
    """Whether ``root`` holds the complete infrared/visible demo dataset of ``seed``."""
    return DATASET.is_complete(root, seed)


def ensure_ivif_demo(root: str | Path, seed: int = 0) -> Path:
    """``root`` holding the infrared/visible demo dataset of ``seed``, generated once (`GeneratedDataset.ensure`)."""
    return DATASET.ensure(root, seed)


@dataclass(frozen=True)
class DemoArgs:
    """Generate the infrared/visible demo dataset (skipped if already complete)."""

    out: Path = Path("data/ivif_demo")
    """Output folder (created)."""
    seed: int = 0
    """Generator seed; equal seeds give byte-identical files."""


def main(args: DemoArgs) -> None:
    """Command line entry: generate (or find) the dataset and say where it is."""
    existed = is_complete(args.out, args.seed)
    root = ensure_ivif_demo(args.out, args.seed)
    state = "already complete" if existed else "written"
    print(f"IR/VIS demo dataset (seed {args.seed}) {state}: {root} "
          f"(train {TRAIN_COUNT} pairs {TRAIN_SIZE}x{TRAIN_SIZE}, test {TEST_COUNT} pairs with masks)")


if __name__ == "__main__":
    import sys

    import tyro

    try:
        main(tyro.cli(DemoArgs))
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
