"""Generated FRED demo dataset: real FRED layout, determinism, dark frames, visible events, caching and CLI
(spec/fred.md §5.9)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fred.demo_data import (DRONE_MODELS, DemoDataError, DemoParams, dark_flags, ensure_fred_demo, generate, main,
                            read_demo_meta, rgb_time)

SMALL_DEMO = {"frames": 20}
RGB_NAME = re.compile(r"Video_(\d+)_\d\d_\d\d_\d\d\.\d{6}\.jpg")
EVENT_NAME = re.compile(r"Video_(\d+)_frame_(\d+)\.png")
COORDINATE_LINE = re.compile(r"(\d+\.\d+): (-?\d+\.\d), (-?\d+\.\d), (-?\d+\.\d), (-?\d+\.\d), ([12]), (.+)")


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """A 6-sequence, 20-frame demo shared by the FRED test files (same path, so generated once)."""
    return ensure_fred_demo(tmp_path_factory.getbasetemp() / "fred_demo_small", seed=0, **SMALL_DEMO)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_names_and_coordinates(small_demo):
    meta = read_demo_meta(small_demo)
    assert sorted(p.name for p in small_demo.iterdir() if p.is_dir()) == ["0", "1", "2", "3", "4", "5",
                                                                          "dataset_splits"]
    splits = small_demo / "dataset_splits" / "canonical"
    assert (splits / "train_split.txt").read_text().split() == ["0", "1", "2", "3"]
    assert (splits / "test_split.txt").read_text().split() == ["4", "5"]
    missing = 0
    for sequence_id, record in meta["sequences"].items():
        folder = small_demo / sequence_id
        rgb = sorted((folder / "PADDED_RGB").iterdir())
        events = sorted((folder / "Event" / "Frames").iterdir())
        assert len(rgb) == 20 and all(RGB_NAME.fullmatch(p.name).group(1) == sequence_id for p in rgb)
        assert all(EVENT_NAME.fullmatch(p.name).group(1) == sequence_id for p in events)
        assert len(events) == 20 + record["extra_event_frames"] - len(record["missing_event_frames"])
        assert 1 <= record["extra_event_frames"] <= 3
        missing += len(record["missing_event_frames"])
        with Image.open(rgb[0]) as image:
            assert image.size == (192, 108) and image.format == "JPEG"
        with Image.open(events[0]) as image:
            assert image.size == (192, 108) and image.mode == "RGB"
        times = set()
        for line in (folder / "coordinates.txt").read_text().splitlines():
            match = COORDINATE_LINE.fullmatch(line)
            assert match, line
            times.add(match.group(1))
            assert match.group(7) in DRONE_MODELS
            x1, y1, x2, y2 = (float(match.group(k)) for k in range(2, 6))
            assert 20 <= x2 - x1 <= 30.1  # drone span 20-30 px
        assert times <= {repr(rgb_time(i)) for i in range(20)}  # shortest decimal form of the index rule
    assert missing == 2


def test_event_times_follow_the_window_rule(small_demo):
    meta = read_demo_meta(small_demo)
    for sequence_id, record in meta["sequences"].items():
        times = sorted(int(EVENT_NAME.fullmatch(p.name).group(2)) for p in
                       (small_demo / sequence_id / "Event" / "Frames").iterdir())
        present = [j for j in range(20 + record["extra_event_frames"]) if j not in record["missing_event_frames"]]
        nominal = np.array([(j + 1) / 30 * 1e6 for j in present])
        deviation = np.array(times) - nominal - record["event_offset_ms"] * 1000
        assert np.all(np.abs(deviation) <= 5001)  # jitter U(-5, 5) ms
        assert -6.0 <= record["event_offset_ms"] <= 12.0


def test_generation_is_deterministic_per_seed(tmp_path):
    params = DemoParams(seed=3, num_sequences=2, test_sequences=1, frames=8)
    generate(tmp_path / "a", params)
    generate(tmp_path / "b", params)
    generate(tmp_path / "c", DemoParams(seed=4, num_sequences=2, test_sequences=1, frames=8))
    first = _tree_bytes(tmp_path / "a")
    assert first == _tree_bytes(tmp_path / "b")
    assert first != _tree_bytes(tmp_path / "c")


def _boxes_at(folder: Path, t: float) -> list[tuple[float, ...]]:
    boxes = []
    for line in (folder / "coordinates.txt").read_text().splitlines():
        match = COORDINATE_LINE.fullmatch(line)
        if float(match.group(1)) == t:
            boxes.append(tuple(float(match.group(k)) for k in range(2, 6)))
    return boxes


def test_dark_frames_defeat_rgb_but_events_show_the_drones(small_demo):
    meta = read_demo_meta(small_demo)
    assert meta["dark_fraction"]["test"] >= 0.25
    for record in meta["sequences"].values():  # 20 frames are too short to reach full dark in a slow fade
        if record["profile"] == "fade_to_dark":
            luminance = record["frames"]["luminance"]
            assert luminance[-1] < 0.5 * luminance[0]
    flags = dark_flags(meta)
    inside_density, outside_density, dark_luma, bright_luma = [], [], [], []
    for sequence_id, record in meta["sequences"].items():
        folder = small_demo / sequence_id
        events = sorted(((int(EVENT_NAME.fullmatch(p.name).group(2)), p)
                         for p in (folder / "Event" / "Frames").iterdir()))
        for i, luminance in enumerate(record["frames"]["luminance"]):
            if flags[(sequence_id, i)]:
                dark_luma.append(luminance)
            elif record["profile"] == "day":
                bright_luma.append(luminance)
            if not flags[(sequence_id, i)]:
                continue
            t = rgb_time(i)
            _, event_path = min(events, key=lambda item: abs(item[0] * 1e-6 - t))
            fired = np.asarray(Image.open(event_path)).any(axis=2)
            mask = np.zeros_like(fired)
            for x1, y1, x2, y2 in _boxes_at(folder, t):
                mask[max(int(y1), 0):max(int(np.ceil(y2)), 0), max(int(x1), 0):max(int(np.ceil(x2)), 0)] = True
            if mask.any():
                inside_density.append(fired[mask].mean())
                outside_density.append(fired[~mask].mean())
    assert max(dark_luma) < 12 and min(bright_luma) > 60  # RGB nearly black in the dark, not in daylight
    assert len(inside_density) >= 15
    assert np.mean(inside_density) > 0.15 and np.mean(outside_density) < 0.02  # drones stand out in events


def test_ensure_reuses_regenerates_and_refuses(tmp_path):
    root = tmp_path / "demo"
    small = {"num_sequences": 2, "test_sequences": 1, "frames": 8}
    ensure_fred_demo(root, seed=1, **small)
    stamp = (root / "demo_meta.json").stat().st_mtime_ns
    ensure_fred_demo(root, seed=1, **small)
    assert (root / "demo_meta.json").stat().st_mtime_ns == stamp
    ensure_fred_demo(root, seed=2, **small)
    assert json.loads((root / "demo_meta.json").read_text())["params"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no staging folders left behind
    foreign = tmp_path / "mine"
    (foreign / "keep").mkdir(parents=True)
    with pytest.raises(DemoDataError, match="not a generated FRED demo"):
        ensure_fred_demo(foreign, seed=0)
    assert (foreign / "keep").is_dir()


def test_cli(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "demo"), "--seed", "0", "--frames", "8", "--sequences", "2"]) == 2
    assert "at least 2 sequences" in capsys.readouterr().err  # 2 sequences minus 2 test sequences
    assert main(["--out", str(tmp_path / "demo"), "--seed", "0", "--frames", "8", "--sequences", "3"]) == 0
    output = capsys.readouterr().out
    assert "3 sequences" in output and "dual" in output
    assert read_demo_meta(tmp_path / "demo")["params"]["frames"] == 8


@pytest.mark.slow
def test_full_demo_generates_within_20_seconds(tmp_path):
    started = time.process_time()
    meta = generate(tmp_path / "demo", DemoParams(seed=0))
    assert time.process_time() - started <= 20.0
    assert meta["expected"]["all"]["rgb_frames"] == 6 * 96
    # train keeps dark segments (one fading sequence in four: 8 % of its frames), most of it in daylight for RGB
    assert meta["dark_fraction"]["test"] >= 0.25 and meta["dark_fraction"]["train"] > 0.05


def test_bright_test_scenes_are_scenes_trained_in_daylight():
    """Every test day sequence shows a background that a train day sequence shows (gate 3 of the demo: with the
    test day sequence on a background seen only fading to dark in train, the RGB detector learned nothing there)."""
    from fred.demo_data import DemoParams, sequence_plan

    for params in (DemoParams(), DemoParams(num_sequences=8, test_sequences=3)):
        plan = sequence_plan(params)
        n_train = params.num_sequences - params.test_sequences
        train_day = {background for profile, background in plan[:n_train] if profile == "day"}
        test = plan[n_train:]
        assert {profile for profile, _ in test} == {"day", "dark_flicker"}
        assert "fade_to_dark" in {profile for profile, _ in plan[:n_train]}  # train has dark segments too
        assert all(background in train_day for profile, background in test if profile == "day"), plan
