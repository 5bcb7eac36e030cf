"""Generated FRED demo dataset in the real FRED layout (spec/fred.md §5.9).

``python -m fred.demo_data --out data/fred_demo --seed 0`` writes 6 sequences of 96 frames at 30 FPS, 192×108:
``<seq>/PADDED_RGB/Video_<seq>_<HH>_<MM>_<SS.ffffff>.jpg`` (JPEG 90), ``<seq>/Event/Frames/Video_<seq>_frame_<t_us>
.png``, ``<seq>/coordinates.txt`` and ``dataset_splits/canonical/{train,test}_split.txt``, so the real loader,
pairing, threshold and split code run on it. A static camera watches 1-2 small dark quadcopters (20-30 px, spinning
rotors) fly smooth paths over a sky, tree/building silhouettes or a textured wall, under a lighting profile: day,
fade to dark, or dark with a slow flicker. Dark frames (scene × ≤ .04 plus σ=3/255 noise) defeat the RGB camera;
the simulated event camera (log intensity, contrast threshold .15) still sees the moving drones.

Event frame j covers the 1/30 s window ending at t_e(j) = (j+1)/30 + offset_seq + jitter: the log intensity of
8 noise-free sub-frames is compared with the reference taken at the window start, a pixel fires where the change
reaches .15 (the reference then moves by whole multiples of .15) and shows its last polarity. Background noise
events are added afterwards. 1-3 extra event frames follow each sequence's last RGB frame (event_only entries) and
one sequence lacks 2 event frames mid-sequence (rgb_only entries).

``demo_meta.json`` (ignored by the loader) records the parameters, per-frame ``dark`` flags and luminance, and
the pairing counts and mean |Δt| the loader must reproduce, computed here by brute force.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.data import generate_folder
from common.errors import DataError

GENERATOR_VERSION = 5
META_NAME = "demo_meta.json"
FPS = 30.0
RGB_FRAME_PERIOD = 0.033333
DEFAULT_THRESHOLD = 0.1
PAIR_MAX_DT = 0.5
BOX_TIME_TOLERANCE = 1.0 / 60.0
CONTRAST_THRESHOLD = 0.15
SUBFRAMES = 8
DARK_LIGHT = 0.04
DARK_LEVEL = 0.025
ON_COLOUR = (255, 64, 64)
OFF_COLOUR = (64, 64, 255)
# FRED's five drone models with the span (px) the demo draws them at. 20-30 px of the 192 px frame are 13-20 px in the
# demo's 128 px input, and 3-40 px after the plain augmentation's scale .25-2. Spec §5.9 says 10-20 px. Measured
# (RGB-only demo, test bright AP50 for seeds 0/1/2): 10-20 px, 15 epochs, 0.84/0.63/0.00 with mosaic and
# 0.07/0.31/0.82 without; 20-30 px with mosaic, 0.03/0.01/0.60 after 15 epochs and 0.87/0.01/0.98 after 25;
# 20-30 px, no mosaic, 25 epochs (the demo preset now, fred/config.py), 0.90/0.95/0.53 (BENCHMARKS.md).
DRONE_MODELS: dict[str, tuple[float, float]] = {
    "Betafpv air75": (20.0, 23.0), "DarwinFPV cineape20": (21.0, 24.0), "DJI Tello EDU": (23.0, 27.0),
    "DJI Mini 2": (24.0, 28.0), "DJI Mini 3": (26.0, 30.0),
}
BACKGROUNDS = ("sky", "silhouettes", "wall")
BOX_ASPECT = 0.9  # box height / span: the quadcopter is seen slightly from below


class DemoDataError(DataError):
    """Invalid generator parameters, or an output folder that exists but is not a generated demo."""


@dataclass(frozen=True)
class DemoParams:
    """Generator parameters (recorded in ``demo_meta.json``; a different set regenerates)."""

    seed: int = 0
    num_sequences: int = 6
    frames: int = 96
    width: int = 192
    height: int = 108
    test_sequences: int = 2


def rgb_time(i: int) -> float:
    """Time (s) of RGB frame i under FRED's index rule."""
    return round((i + 1) * RGB_FRAME_PERIOD, 6)


# ------------------------------------------------------------------------------------------------ scene

def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    coarse = rng.random((height // cell + 2, width // cell + 2))
    image = Image.fromarray((coarse * 255).astype(np.uint8)).resize((width + 2 * cell, height + 2 * cell),
                                                                    Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32)[cell:cell + height, cell:cell + width] / 255.0


def _sky(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    top = np.array([0.40, 0.55, 0.82]) + rng.uniform(-0.05, 0.05, 3)
    horizon = np.array([0.74, 0.80, 0.88]) + rng.uniform(-0.04, 0.04, 3)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    sky = (top * (1 - ramp) + horizon * ramp) * np.ones((1, width, 1))
    yy, xx = np.mgrid[0:height, 0:width]
    cover = np.zeros((height, width))
    for _ in range(rng.integers(4, 9)):
        cx, cy = rng.uniform(0, width), rng.uniform(0, 0.8 * height)
        sx, sy = rng.uniform(8, 30), rng.uniform(3, 9)
        cover += rng.uniform(0.3, 0.7) * np.exp(-(((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))
    cover = np.clip(cover * (0.7 + 0.6 * _smooth_noise(rng, height, width, 8)), 0, 0.75)[..., None]
    return sky * (1 - cover) + np.array([0.93, 0.94, 0.96]) * cover


def _silhouettes(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    image = _sky(rng, height, width)
    xs = np.arange(width)
    tree_top = height * (1 - rng.uniform(0.15, 0.28)) - sum(
        rng.uniform(2, 6) * np.abs(np.sin(xs / rng.uniform(3, 9) + rng.uniform(0, 6))) for _ in range(3))
    skyline = tree_top.copy()
    for _ in range(rng.integers(1, 4)):
        left = rng.integers(0, width - 20)
        right = left + rng.integers(12, 40)
        skyline[left:right] = np.minimum(skyline[left:right], height * (1 - rng.uniform(0.3, 0.42)))
    yy = np.arange(height)[:, None]
    mask = (yy >= skyline[None, :])[..., None]
    colour = np.array([0.09, 0.12, 0.10]) + rng.uniform(-0.02, 0.03, 3)
    shade = colour * (0.85 + 0.3 * _smooth_noise(rng, height, width, 4))[..., None]
    return np.where(mask, shade, image)


def _wall(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    base = np.array([0.52, 0.47, 0.42]) + rng.uniform(-0.06, 0.06, 3)
    brick_h, brick_w = int(rng.integers(5, 8)), int(rng.integers(12, 18))
    yy, xx = np.mgrid[0:height, 0:width]
    row = yy // brick_h
    shifted = xx + (row % 2) * (brick_w // 2)
    mortar = (yy % brick_h == 0) | (shifted % brick_w == 0)
    brick_id = row * 1000 + shifted // brick_w
    tone = np.random.default_rng(int(rng.integers(1 << 31))).uniform(-0.06, 0.06, brick_id.max() + 1)[brick_id]
    texture = 0.06 * (_smooth_noise(rng, height, width, 3) - 0.5)
    wall = base[None, None, :] * (1 + tone + texture)[..., None]
    return np.where(mortar[..., None], np.array([0.66, 0.64, 0.60]), wall)


def make_background(kind: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Reflectance image (H, W, 3) in 0..1 of a background kind: ``sky``, ``silhouettes`` or ``wall``."""
    maker = {"sky": _sky, "silhouettes": _silhouettes, "wall": _wall}[kind]
    return np.clip(maker(rng, height, width), 0.0, 1.0).astype(np.float32)


def lighting(profile: str, t: np.ndarray | float, duration: float, phase: float) -> np.ndarray:
    """Scene illumination factor at time(s) t: ``day`` 1; ``fade_to_dark`` log-linear from 1 to the dark level
    (changing at most .12 in log intensity per 1/30 s, so no event flood); ``dark_flicker`` a slow flicker
    around the dark level."""
    t = np.asarray(t, dtype=np.float64)
    if profile == "day":
        return np.ones_like(t)
    if profile == "dark_flicker":
        return DARK_LEVEL * (1 + 0.12 * np.sin(2 * np.pi * 1.3 * t + phase) + 0.05 * np.sin(2 * np.pi * 3.7 * t + 2 * phase))
    start = 0.4 * duration
    span = max(0.3 * duration, math.log(1 / DARK_LEVEL) / (0.12 * FPS))
    progress = np.clip((t - start) / span, 0.0, 1.0)
    return np.exp(progress * math.log(DARK_LEVEL))


@dataclass
class Drone:
    """A quadcopter: track id, model, span (px), path samples and rotor spin."""

    track_id: int
    model: str
    span: float
    path_t: np.ndarray
    path_x: np.ndarray
    path_y: np.ndarray
    spin: float
    rotor_phase: np.ndarray

    def centre(self, t: float) -> tuple[float, float]:
        """Centre (px) at time t."""
        return float(np.interp(t, self.path_t, self.path_x)), float(np.interp(t, self.path_t, self.path_y))

    def box(self, t: float) -> tuple[float, float, float, float]:
        """Unclipped xyxy box at time t."""
        cx, cy = self.centre(t)
        half_w, half_h = self.span / 2, self.span * BOX_ASPECT / 2
        return cx - half_w, cy - half_h, cx + half_w, cy + half_h


def make_drone(rng: np.random.Generator, track_id: int, width: int, height: int, y_limit: float | None,
               duration: float, leaves_frame: bool) -> Drone:
    """A drone on a smooth random path at 1-4 px/frame, bouncing inside bounds that let it leave the frame
    partly (or, with ``leaves_frame``, completely at the sides). ``y_limit``: lowest centre row (None: it may
    leave partly at the bottom)."""
    model = str(rng.choice(list(DRONE_MODELS)))
    span = float(rng.uniform(*DRONE_MODELS[model]))
    step = 1.0 / (FPS * SUBFRAMES)
    times = np.arange(0.0, duration + 4 * step, step)
    speed0 = rng.uniform(1.3, 3.0) * FPS  # px/s; the modulation below keeps it within 1-4 px/frame
    heading = (rng.uniform(0, 2 * np.pi) + 1.2 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * times + rng.uniform(0, 6))
               + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 1.0) * times + rng.uniform(0, 6)))
    speed = speed0 * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * times + rng.uniform(0, 6)))
    reach = 1.2 * span if leaves_frame else 0.3 * span
    lo = np.array([-reach, 0.1 * span])
    y_limit = height + 0.2 * span if y_limit is None else y_limit
    hi = np.array([width + reach, y_limit])
    position = np.array([rng.uniform(0.2, 0.8) * width, rng.uniform(0.15, 0.75) * min(y_limit, height)])
    xs, ys = np.empty(len(times)), np.empty(len(times))
    velocity_sign = np.ones(2)
    for k in range(len(times)):
        xs[k], ys[k] = position
        velocity = velocity_sign * speed[k] * np.array([np.cos(heading[k]), np.sin(heading[k])]) * step
        position = position + velocity
        for axis in range(2):  # reflect at the bounds
            if position[axis] < lo[axis] or position[axis] > hi[axis]:
                velocity_sign[axis] *= -1
                position[axis] = np.clip(position[axis], lo[axis], hi[axis])
    return Drone(track_id, model, span, times, xs, ys, spin=2 * np.pi * rng.uniform(30, 45),
                 rotor_phase=rng.uniform(0, np.pi, 4))


_SUPERSAMPLE = 4
_BODY = np.array([0.10, 0.10, 0.11])
_DISC = np.array([0.32, 0.32, 0.34])
_BLADE = np.array([0.06, 0.06, 0.07])


def draw_drone(image: np.ndarray, drone: Drone, t: float) -> None:
    """Composite the drone at time t into ``image`` (H, W, 3 reflectance), anti-aliased by supersampling."""
    height, width = image.shape[:2]
    cx, cy = drone.centre(t)
    s = drone.span
    x0, x1 = max(int(math.floor(cx - 0.6 * s)), 0), min(int(math.ceil(cx + 0.6 * s)), width)
    y0, y1 = max(int(math.floor(cy - 0.6 * s * BOX_ASPECT)), 0), min(int(math.ceil(cy + 0.6 * s * BOX_ASPECT)), height)
    if x1 <= x0 or y1 <= y0:
        return
    offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    sx = (np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(-1)
    sy = (np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1)
    u = sx[None, :] - cx
    v = (sy[:, None] - cy) / BOX_ASPECT
    arm = 0.33 * s
    disc = np.zeros((len(sy), len(sx)), dtype=bool)
    blade = np.zeros_like(disc)
    for k, (ax, ay) in enumerate(((arm, arm), (-arm, arm), (-arm, -arm), (arm, -arm))):
        du, dv = u - ax, v - ay
        inside = du * du + dv * dv <= (0.16 * s) ** 2
        angle = drone.spin * t + drone.rotor_phase[k]
        disc |= inside
        blade |= inside & (np.abs(du * math.sin(angle) - dv * math.cos(angle)) <= 0.045 * s)
    body = np.maximum(np.abs(u), np.abs(v)) <= 0.17 * s
    within = (np.abs(u) <= arm) & (np.abs(v) <= arm)
    arms = within & ((np.abs(u - v) <= 0.07 * s) | (np.abs(u + v) <= 0.07 * s))
    solid = body | arms | blade

    def coverage(mask: np.ndarray) -> np.ndarray:
        return mask.reshape(y1 - y0, _SUPERSAMPLE, x1 - x0, _SUPERSAMPLE).mean(axis=(1, 3))[..., None]

    patch = image[y0:y1, x0:x1]
    disc_alpha = 0.35 * coverage(disc & ~solid)
    patch[:] = patch * (1 - disc_alpha) + _DISC * disc_alpha
    blade_alpha = coverage(blade & ~(body | arms))
    patch[:] = patch * (1 - blade_alpha) + _BLADE * blade_alpha
    body_alpha = coverage(body | arms)
    patch[:] = patch * (1 - body_alpha) + _BODY * body_alpha


def render(background: np.ndarray, drones: list[Drone], t: float) -> np.ndarray:
    """Scene reflectance at time t (before lighting)."""
    image = background.copy()
    for drone in drones:
        draw_drone(image, drone, t)
    return image


_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def event_frame(background: np.ndarray, drones: list[Drone], t_end: float, light, rng: np.random.Generator,
                noise_fraction: float) -> np.ndarray:
    """Event frame of the 1/30 s window ending at ``t_end`` (H, W, 3 uint8, black background)."""
    times = t_end - 1.0 / FPS + np.arange(SUBFRAMES + 1) / (FPS * SUBFRAMES)
    reference = None
    polarity = np.zeros(background.shape[:2], dtype=np.int8)
    for t in times:
        log_intensity = np.log(render(background, drones, t) @ _GREY * light(t) + 1e-3)
        if reference is None:
            reference = log_intensity
            continue
        change = log_intensity - reference
        steps = np.floor(np.abs(change) / CONTRAST_THRESHOLD)
        fired = steps > 0
        polarity[fired] = np.sign(change[fired]).astype(np.int8)
        reference = reference + np.sign(change) * CONTRAST_THRESHOLD * steps
    noise = rng.random(polarity.shape) < noise_fraction
    polarity[noise] = np.where(rng.random(int(noise.sum())) < 0.5, 1, -1)
    frame = np.zeros(background.shape[:2] + (3,), dtype=np.uint8)
    frame[polarity > 0] = ON_COLOUR
    frame[polarity < 0] = OFF_COLOUR
    return frame


# -------------------------------------------------------------------------------------------- expectations

def expected_pairing(rgb_t: np.ndarray, event_t: np.ndarray, annotation_times: np.ndarray) -> dict:
    """Pairing counts by brute force (mutual nearest neighbours, ties to the earlier frame), the annotated
    entries and, per threshold, the annotated effective pairs and their mean |Δt| (ms)."""
    distance = np.abs(event_t[None, :] - rgb_t[:, None])
    nearest_event = distance.argmin(axis=1)
    nearest_rgb = distance.argmin(axis=0)
    dual = [(i, int(j)) for i, j in enumerate(nearest_event)
            if nearest_rgb[j] == i and abs(event_t[j] - rgb_t[i]) <= PAIR_MAX_DT]
    paired_rgb = {i for i, _ in dual}
    paired_event = {j for _, j in dual}
    def annotated(t: float) -> bool:
        return bool(len(annotation_times)) and bool(
            annotation_times.min() - BOX_TIME_TOLERANCE <= t <= annotation_times.max() + BOX_TIME_TOLERANCE)

    diffs = [round(abs(event_t[j] - rgb_t[i]), 9) for i, j in dual if annotated(rgb_t[i])]
    entries_annotated = (sum(annotated(t) for t in rgb_t)
                         + sum(annotated(t) for j, t in enumerate(event_t) if j not in paired_event))
    result = {"rgb_frames": len(rgb_t), "event_frames": len(event_t), "dual": len(dual),
              "rgb_only": len(rgb_t) - len(paired_rgb), "event_only": len(event_t) - len(paired_event),
              "annotated": entries_annotated, "thresholds": {}}
    for threshold in (DEFAULT_THRESHOLD, 0.005):
        kept = [d for d in diffs if d <= threshold]
        result["thresholds"][str(threshold)] = {
            "pairs": len(kept), "sum_abs_dt_ms": 1000.0 * float(sum(kept)),
            "mean_abs_dt_ms": 1000.0 * float(np.mean(kept)) if kept else None}
    return result


def _merge(parts: list[dict]) -> dict:
    total = {key: sum(p[key] for p in parts) for key in ("rgb_frames", "event_frames", "dual", "rgb_only",
                                                         "event_only", "annotated")}
    total["thresholds"] = {}
    for threshold in parts[0]["thresholds"]:
        pairs = sum(p["thresholds"][threshold]["pairs"] for p in parts)
        summed = sum(p["thresholds"][threshold]["sum_abs_dt_ms"] for p in parts)
        total["thresholds"][threshold] = {"pairs": pairs, "sum_abs_dt_ms": summed,
                                          "mean_abs_dt_ms": summed / pairs if pairs else None}
    return total


# ------------------------------------------------------------------------------------------------ writer

def _clock_name(sequence_id: str, start_us: int, i: int) -> str:
    stamp = start_us + int(round(i * 1e6 / FPS))
    hours, rest = divmod(stamp, 3600 * 10**6)
    minutes, rest = divmod(rest, 60 * 10**6)
    seconds, micros = divmod(rest, 10**6)
    return f"Video_{sequence_id}_{hours % 24:02d}_{minutes:02d}_{seconds:02d}.{micros:06d}.jpg"


def write_sequence(root: Path, index: int, params: DemoParams, profile: str, background_kind: str,
                   missing_events: tuple[int, ...]) -> dict:
    """Generate one sequence folder; returns its ``demo_meta.json`` record."""
    sequence_id = str(index)
    rng = np.random.default_rng([params.seed, index])
    width, height, n = params.width, params.height, params.frames
    duration = (n + 5) / FPS
    background = make_background(background_kind, rng, height, width)
    y_limit = 0.55 * height if background_kind == "silhouettes" else None  # keep drones above the tree line
    drones = [make_drone(rng, k + 1, width, height, y_limit, duration, leaves_frame=bool(rng.random() < 0.3))
              for k in range(int(rng.integers(1, 3)))]
    phase = float(rng.uniform(0, 2 * np.pi))

    def light(t: float) -> float:
        return float(lighting(profile, t, n / FPS, phase))

    folder = root / sequence_id
    rgb_dir, event_dir = folder / "PADDED_RGB", folder / "Event" / "Frames"
    rgb_dir.mkdir(parents=True)
    event_dir.mkdir(parents=True)
    start_us = int(rng.integers(8 * 3600, 20 * 3600)) * 10**6 + int(rng.integers(0, 10**6))
    rgb_t = np.array([rgb_time(i) for i in range(n)])
    lines, dark, luminance, rgb_names = [], [], [], []
    for i in range(n):
        t = rgb_time(i)
        level = light(t)
        frame = render(background, drones, t) * level * 255.0
        is_dark = level <= DARK_LIGHT
        if is_dark:
            frame = frame + rng.normal(0.0, 3.0, frame.shape)
        pixels = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
        name = _clock_name(sequence_id, start_us, i)
        Image.fromarray(pixels).save(rgb_dir / name, quality=90)
        rgb_names.append(f"{sequence_id}/PADDED_RGB/{name}")
        dark.append(bool(is_dark))
        luminance.append(round(float((pixels.astype(np.float32) @ _GREY).mean()), 3))
        for drone in drones:
            x1, y1, x2, y2 = drone.box(t)
            if min(x2, width) - max(x1, 0) >= 1 and min(y2, height) - max(y1, 0) >= 1:
                lines.append(f"{t!r}: {x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}, {drone.track_id}, {drone.model}")
    (folder / "coordinates.txt").write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")

    offset = float(rng.uniform(-0.006, 0.012))
    extra = int(rng.integers(1, 4))
    event_us = []
    for j in range(n + extra):
        t_end = (j + 1) / FPS + offset + float(rng.uniform(-0.005, 0.005))
        t_us = int(round(t_end * 1e6))
        noise_fraction = 0.01 if light(t_end) <= DARK_LIGHT else 0.002
        frame = event_frame(background, drones, t_us * 1e-6, light, rng, noise_fraction)
        if j in missing_events:
            continue
        Image.fromarray(frame).save(event_dir / f"Video_{sequence_id}_frame_{t_us}.png", compress_level=1)
        event_us.append(t_us)

    annotation_times = np.array(sorted({float(line.split(":", 1)[0]) for line in lines}))
    expected = expected_pairing(rgb_t, np.array(event_us) * 1e-6, annotation_times)
    return {"profile": profile, "background": background_kind, "event_offset_ms": round(1000 * offset, 3),
            "extra_event_frames": extra, "missing_event_frames": list(missing_events),
            "drones": [{"track_id": d.track_id, "model": d.model, "span_px": round(d.span, 2)} for d in drones],
            "frames": {"rgb_file": rgb_names, "dark": dark, "luminance": luminance},
            "expected": expected}


def sequence_plan(params: DemoParams) -> list[tuple[str, str]]:
    """(lighting profile, background) per sequence. Test sequences alternate day / dark-flicker (≥ 25 % dark
    frames). Train is in daylight except every fourth sequence from the second, which fades to dark (train keeps
    dark segments); backgrounds cycle. Test day sequence k takes the background of train sequence k, so the bright
    test frames show a scene RGB was trained on in daylight.

    Why (measured, RGB-only demo, seeds 0/1/2, test bright AP50): with train alternating day / fade and the test day
    sequence on the silhouettes (seen in train only while fading), 0.055/0.001/0.001; test day on a trained
    background, 0.50/0.00/0.00; with three of four train sequences in daylight, 0.84/0.63/0.00. An RGB detector from
    random initialisation needs enough daylight frames of the scene to learn where the drones are."""
    n_train = params.num_sequences - params.test_sequences
    test_profiles = ("day", "dark_flicker")
    plan = []
    for index in range(params.num_sequences):
        if index < n_train:
            profile = "fade_to_dark" if index % 4 == 1 else "day"
            plan.append((profile, BACKGROUNDS[index % len(BACKGROUNDS)]))
            continue
        k = index - n_train
        profile = test_profiles[k % 2]
        background = BACKGROUNDS[k % len(BACKGROUNDS)] if profile == "day" else BACKGROUNDS[index % len(BACKGROUNDS)]
        plan.append((profile, background))
    return plan


def generate(root: str | Path, params: DemoParams = DemoParams()) -> dict:
    """Write the demo dataset into ``root`` (which must not exist); returns the metadata."""
    root = Path(root)
    if params.num_sequences < 2 or params.test_sequences < 1 or params.test_sequences >= params.num_sequences:
        raise DemoDataError("the demo needs at least 2 sequences and 1 ≤ test_sequences < num_sequences")
    if params.frames < 8:
        raise DemoDataError("the demo needs at least 8 frames per sequence")
    root.mkdir(parents=True)
    rng = np.random.default_rng(params.seed)
    missing_in = int(rng.integers(params.num_sequences))
    first_missing = int(rng.integers(params.frames // 3, 2 * params.frames // 3))
    sequences = {}
    for index, (profile, background) in enumerate(sequence_plan(params)):
        missing = (first_missing, first_missing + 1) if index == missing_in else ()
        sequences[str(index)] = write_sequence(root, index, params, profile, background, missing)
    n_train = params.num_sequences - params.test_sequences
    splits = {"train": [str(i) for i in range(n_train)], "test": [str(i) for i in range(n_train, params.num_sequences)]}
    split_dir = root / "dataset_splits" / "canonical"
    split_dir.mkdir(parents=True)
    for name, ids in splits.items():
        (split_dir / f"{name}_split.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    expected = {name: _merge([sequences[i]["expected"] for i in ids]) for name, ids in splits.items()}
    expected["all"] = _merge([s["expected"] for s in sequences.values()])
    dark_fraction = {name: float(np.mean([d for i in ids for d in sequences[i]["frames"]["dark"]]))
                     for name, ids in splits.items()}
    meta = {"generator": "fred.demo_data", "version": GENERATOR_VERSION, "params": asdict(params),
            "default_threshold": DEFAULT_THRESHOLD, "pair_max_dt": PAIR_MAX_DT, "splits": splits,
            "dark_fraction": dark_fraction, "expected": expected, "sequences": sequences}
    (root / META_NAME).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return meta


def read_demo_meta(root: str | Path) -> dict | None:
    """The ``demo_meta.json`` of a FRED root, or None when absent (a real dataset)."""
    path = Path(root) / META_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def dark_flags(meta: dict) -> dict[tuple[str, int], bool]:
    """(sequence id, RGB frame index) → dark flag, from ``demo_meta.json`` (for AP50 on dark/bright frames)."""
    return {(sequence_id, i): bool(flag) for sequence_id, record in meta["sequences"].items()
            for i, flag in enumerate(record["frames"]["dark"])}


def _matches(meta: dict | None, params: DemoParams) -> bool:
    return bool(meta) and meta.get("version") == GENERATOR_VERSION and meta.get("params") == asdict(params)


def ensure_fred_demo(root: str | Path = "data/fred_demo", seed: int = 0, **overrides) -> Path:
    """Return ``root`` holding the demo dataset for ``seed`` (and generator ``overrides``), generating it when
    missing or generated with other parameters. Generation writes into a temporary sibling folder that is then
    renamed, so an interrupted run never leaves a partial dataset; a folder that is not a generated demo is
    never touched (:class:`DemoDataError`)."""
    root = Path(root)
    params = DemoParams(seed=seed, **overrides)
    if root.exists():
        meta = read_demo_meta(root)
        if _matches(meta, params):
            return root
        if meta is None or meta.get("generator") != "fred.demo_data":
            raise DemoDataError(f"{root} exists but is not a generated FRED demo (no {META_NAME}); pass another "
                                "folder or --fred-root for real data")
    return generate_folder(root, lambda target: generate(target, params),
                           lambda: _matches(read_demo_meta(root), params))


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m fred.demo_data --out data/fred_demo --seed 0``."""
    parser = argparse.ArgumentParser(description="Generate the FRED demo dataset (spec/fred.md §5.9).")
    parser.add_argument("--out", default="data/fred_demo", help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--frames", type=int, default=DemoParams.frames, help="RGB frames per sequence")
    parser.add_argument("--sequences", type=int, default=DemoParams.num_sequences, help="number of sequences")
    parser.add_argument("--test-sequences", type=int, default=DemoParams.test_sequences,
                        help="sequences in the test split (the last ones)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        root = ensure_fred_demo(args.out, args.seed, frames=args.frames, num_sequences=args.sequences,
                                test_sequences=args.test_sequences)
    except DemoDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    meta = read_demo_meta(root)
    totals = meta["expected"]["all"]
    print(f"FRED demo in {root} ({time.perf_counter() - started:.1f} s): {args.sequences} sequences, "
          f"{totals['rgb_frames']} RGB / {totals['event_frames']} event frames, {totals['dual']} dual, "
          f"{totals['rgb_only']} rgb_only, {totals['event_only']} event_only; dark test frames "
          f"{100 * meta['dark_fraction']['test']:.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
