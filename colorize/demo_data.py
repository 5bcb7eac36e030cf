"""Generated colorization demo dataset in the DAVIS layout (spec/colorize.md §5).

``python -m colorize.demo_data --out DIR --seed 0`` writes, in about a second::

    DIR/JPEGImages/480p/demo_{train,val}_NNN/00000.jpg ... 00011.jpg   96 x 96, JPEG q95, 4:4:4
    DIR/ImageSets/2017/{train,val}.txt                                 24 train and 6 val sequences
    DIR/references/<seq>/ref_000.jpg, ref_001.jpg                     the scene at t = -4 and t = 15
    DIR/colorize_demo.json                                             seed and SHA-256 of every file (last)

so the real DAVIS loader reads it (the demo sets ``--data.imagenet DIR/references``: sequence-matched exemplars).

Each scene is built in LAB at the 64-px training scale and rendered x1.5: a textured background (oriented sine
stripes of 0.25-0.6 rad/px, a checker of period 4-7 px, or blurred noise; L = 35 + 40 texture) in one hue per
sequence (chroma 30-55), seen by a camera panning up to 2.5 px/frame per axis; two discs of radius 7-12 px with
their own luminance texture (L 30-85, of another kind than the background's, so matching can tell them apart) and
constant hues about +90 and -90 degrees (+-23) from the background's (chroma 40-65), moving up to 2.5 px/frame,
occluding each other and the border; both are at least half visible in the references. The hues are random, so
colour can only come from the reference and from propagation; the textures make flow and matching well posed.
Each sequence's generator is seeded by (seed, split, index), so equal seeds give identical files.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from colorize.lab import lab_to_rgb
from common.data import GeneratedDataset
from common.errors import DataError

GENERATOR_VERSION = 1
MANIFEST_NAME = "colorize_demo.json"
SPLITS = {"train": 24, "val": 6}
SPLIT_IDS = {"train": 0, "val": 1}
FRAMES = 12
SCENE_SIZE = 64
RENDER_SCALE = 1.5
RENDER_SIZE = round(SCENE_SIZE * RENDER_SCALE)
REFERENCE_TIMES = (-4, 15)
JPEG_QUALITY = 95
MAX_SPEED = 2.5
NOISE_FIELD = 256  # side of the world noise fields, enough for the pan over t = -4 ... 15


@dataclass(frozen=True)
class Texture:
    """A luminance texture in [0, 1] over world coordinates (64-px scale)."""

    kind: str
    frequency: float
    angle: float
    phase: float
    period: float
    field: np.ndarray | None

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Texture values at world positions ``x``, ``y``."""
        if self.kind == "stripes":
            return 0.5 + 0.5 * np.sin(self.frequency * (x * np.cos(self.angle) + y * np.sin(self.angle)) + self.phase)
        if self.kind == "checker":
            u = x * np.cos(self.angle) + y * np.sin(self.angle)
            v = -x * np.sin(self.angle) + y * np.cos(self.angle)
            return ((np.floor(u / self.period) + np.floor(v / self.period)) % 2).astype(np.float64)
        centre = NOISE_FIELD / 2
        return ndimage.map_coordinates(self.field, [y + centre, x + centre], order=1, mode="reflect")


def _texture(rng: np.random.Generator, exclude: str | None = None) -> Texture:
    """A random texture, of any kind but ``exclude``."""
    kinds = [k for k in ("stripes", "checker", "noise") if k != exclude]
    kind = kinds[int(rng.integers(len(kinds)))]
    field = None
    if kind == "noise":
        raw = ndimage.gaussian_filter(rng.standard_normal((NOISE_FIELD, NOISE_FIELD)), rng.uniform(1.2, 2.0))
        field = (raw - raw.min()) / (raw.max() - raw.min())
    return Texture(kind, rng.uniform(0.25, 0.6), rng.uniform(0.0, np.pi), rng.uniform(0.0, 2 * np.pi),
                   rng.uniform(4.0, 7.0), field)


@dataclass(frozen=True)
class Disc:
    """A textured disc moving linearly in screen coordinates."""

    centre: tuple[float, float]
    """(x, y) at t = 0."""
    velocity: tuple[float, float]
    radius: float
    texture: Texture
    lightness: tuple[float, float]
    """L = offset + scale * texture."""
    ab: tuple[float, float]


def _disc(rng: np.random.Generator, hue: float, background_kind: str) -> Disc:
    radius = rng.uniform(7.0, 12.0)
    start, end = REFERENCE_TIMES
    while True:  # half visible or more at both reference times, hence during the whole clip
        first = rng.uniform(4.0, SCENE_SIZE - 4.0, size=2)
        velocity = rng.uniform(-MAX_SPEED, MAX_SPEED, size=2)
        last = first + velocity * (end - start)
        if np.all((last >= 2.0) & (last <= SCENE_SIZE - 2.0)):
            break
    centre = first - velocity * start
    low = rng.uniform(30.0, 50.0)
    chroma = rng.uniform(40.0, 65.0)
    return Disc((float(centre[0]), float(centre[1])), (float(velocity[0]), float(velocity[1])), radius,
                _texture(rng, background_kind), (low, rng.uniform(25.0, 85.0 - low)),
                (chroma * np.cos(hue), chroma * np.sin(hue)))


@dataclass(frozen=True)
class DemoScene:
    """One sequence: background texture and colour, camera motion and two discs."""

    background: Texture
    background_ab: tuple[float, float]
    camera_origin: tuple[float, float]
    camera_velocity: tuple[float, float]
    discs: tuple[Disc, Disc]


def make_scene(seed: int, split: str, index: int) -> DemoScene:
    """The scene of sequence ``index`` of ``split``, from a generator seeded by (seed, split, index)."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    background = _texture(rng)
    hue = rng.uniform(0.0, 2 * np.pi)
    chroma = rng.uniform(30.0, 55.0)
    camera_origin = tuple(float(v) for v in rng.uniform(-20.0, 20.0, size=2))
    camera_velocity = tuple(float(v) for v in rng.uniform(-MAX_SPEED, MAX_SPEED, size=2))
    offsets = np.deg2rad(rng.uniform(-23.0, 23.0, size=2))
    discs = (_disc(rng, hue + np.pi / 2 + offsets[0], background.kind),
             _disc(rng, hue - np.pi / 2 + offsets[1], background.kind))
    return DemoScene(background, (chroma * np.cos(hue), chroma * np.sin(hue)), camera_origin, camera_velocity, discs)


def render_lab(scene: DemoScene, t: float) -> np.ndarray:
    """Raw LAB ``[3, 96, 96]`` (float64) of ``scene`` at time ``t``."""
    pixels = (np.arange(RENDER_SIZE) + 0.5) / RENDER_SCALE - 0.5  # pixel centres in scene coordinates
    y, x = np.meshgrid(pixels, pixels, indexing="ij")
    world_x = x + scene.camera_origin[0] + scene.camera_velocity[0] * t
    world_y = y + scene.camera_origin[1] + scene.camera_velocity[1] * t
    lightness = 35.0 + 40.0 * scene.background(world_x, world_y)
    a = np.full_like(lightness, scene.background_ab[0])
    b = np.full_like(lightness, scene.background_ab[1])
    for disc in scene.discs:
        centre_x = disc.centre[0] + disc.velocity[0] * t
        centre_y = disc.centre[1] + disc.velocity[1] * t
        local_x, local_y = x - centre_x, y - centre_y
        coverage = np.clip(disc.radius - np.hypot(local_x, local_y) + 0.5, 0.0, 1.0)
        disc_lightness = disc.lightness[0] + disc.lightness[1] * disc.texture(local_x, local_y)
        lightness = (1 - coverage) * lightness + coverage * disc_lightness
        a = (1 - coverage) * a + coverage * disc.ab[0]
        b = (1 - coverage) * b + coverage * disc.ab[1]
    return np.stack((lightness, a, b))


def render_rgb(scene: DemoScene, t: float) -> np.ndarray:
    """uint8 sRGB ``[96, 96, 3]`` of ``scene`` at time ``t`` (out-of-gamut colours clipped)."""
    rgb = lab_to_rgb(torch.from_numpy(render_lab(scene, t))).permute(1, 2, 0).numpy()
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def sequence_names(split: str) -> list[str]:
    """Sequence folder names of a split."""
    return [f"demo_{split}_{index:03d}" for index in range(SPLITS[split])]


def demo_files() -> list[str]:
    """Relative POSIX paths of every file of the demo dataset except the manifest."""
    names = [f"ImageSets/2017/{split}.txt" for split in SPLITS]
    for split in SPLITS:
        for sequence in sequence_names(split):
            names += [f"JPEGImages/480p/{sequence}/{frame:05d}.jpg" for frame in range(FRAMES)]
            names += [f"references/{sequence}/ref_{index:03d}.jpg" for index in range(len(REFERENCE_TIMES))]
    return names


def _jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def write_demo_dataset(out: str | Path, seed: int = 0) -> Path:
    """Write the whole demo dataset into ``out`` (created) and, last, its manifest."""
    out = Path(out)
    contents: dict[str, bytes] = {}
    for split in SPLITS:
        contents[f"ImageSets/2017/{split}.txt"] = ("\n".join(sequence_names(split)) + "\n").encode()
        for index, sequence in enumerate(sequence_names(split)):
            scene = make_scene(seed, split, index)
            for frame in range(FRAMES):
                contents[f"JPEGImages/480p/{sequence}/{frame:05d}.jpg"] = _jpeg(render_rgb(scene, frame))
            for reference, t in enumerate(REFERENCE_TIMES):
                contents[f"references/{sequence}/ref_{reference:03d}.jpg"] = _jpeg(render_rgb(scene, t))
    for name in demo_files():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(contents[name])
    DATASET.write_manifest(out, seed, {name: hashlib.sha256(contents[name]).hexdigest() for name in demo_files()})
    return out


DATASET = GeneratedDataset("colorize.demo_data", MANIFEST_NAME, GENERATOR_VERSION, demo_files, write_demo_dataset,
                           "colorization demo dataset")


def is_complete(root: str | Path, seed: int) -> bool:
    """Whether ``root`` holds the complete colorization demo dataset of ``seed``."""
    return DATASET.is_complete(root, seed)


def ensure_demo_dataset(root: str | Path, seed: int = 0) -> Path:
    """``root`` holding the colorization demo dataset of ``seed``, generated once (`GeneratedDataset.ensure`)."""
    return DATASET.ensure(root, seed)


@dataclass(frozen=True)
class DemoArgs:
    """Generate the colorization demo dataset (skipped if already complete)."""

    out: Path = Path("data/colorize_demo")
    """Output folder (created)."""
    seed: int = 0
    """Generator seed; equal seeds give identical files."""


def main(args: DemoArgs) -> None:
    """Command line entry: generate (or find) the dataset and say where it is."""
    existed = is_complete(args.out, args.seed)
    root = ensure_demo_dataset(args.out, args.seed)
    print(f"colorization demo dataset (seed {args.seed}) {'already complete' if existed else 'written'}: {root} "
          f"({SPLITS['train']} train + {SPLITS['val']} val sequences x {FRAMES} frames, "
          f"{RENDER_SIZE}x{RENDER_SIZE}; references under {root / 'references'})")


if __name__ == "__main__":
    import sys

    import tyro

    try:
        main(tyro.cli(DemoArgs))
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
