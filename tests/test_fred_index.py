"""FRED index: parsing, mutual-nearest-neighbour pairing, fusion annotation files, splits, statistics and bad
input (spec/fred.md §5.1-5.5, acceptance check 5)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fred.dataset import FredDataset
from fred.demo_data import ensure_fred_demo
from fred.index import (FUSION_STATS_COLUMNS, FredDataError, FredDataWarning, IndexParams, append_fusion_stats_csv,
                        fusion_stats, load_fred_index, load_fusion_split, mutual_pairs, nearest_indices,
                        parse_coordinates, rgb_time_index, select_samples, sequence_entries)

SMALL_DEMO = {"frames": 20}
LINE = re.compile(r"Dual Rate: \d+/\d+ \(\d+\.\d%\), Avg Time Diff: \d+\.\d\dms")


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """A 6-sequence, 20-frame demo shared by the FRED test files (same path, so generated once)."""
    return ensure_fred_demo(tmp_path_factory.getbasetemp() / "fred_demo_small", seed=0, **SMALL_DEMO)


def _quiet(_message: str) -> None:
    pass


def _meta(root: Path) -> dict:
    return json.loads((root / "demo_meta.json").read_text())


def write_sequence(root: Path, sequence_id: str, n_rgb: int = 6, event_us: list[int] | None = None,
                   rgb_size: tuple[int, int] = (64, 48), event_size: tuple[int, int] | None = None,
                   lines: list[str] | None = None) -> Path:
    """A tiny synthetic FRED sequence: RGB frames at the index rule, events at the given µs, one box per frame."""
    folder = root / sequence_id
    (folder / "PADDED_RGB").mkdir(parents=True)
    (folder / "Event" / "Frames").mkdir(parents=True)
    event_us = event_us if event_us is not None else [int(round((i + 1) / 30 * 1e6)) + 2000 for i in range(n_rgb)]
    grey = np.full(rgb_size[::-1] + (3,), 90, np.uint8)
    for i in range(n_rgb):
        Image.fromarray(grey).save(folder / "PADDED_RGB" / f"Video_{sequence_id}_12_00_{i:02d}.000000.jpg")
    for t_us in event_us:
        Image.fromarray(np.zeros((event_size or rgb_size)[::-1] + (3,), np.uint8)).save(
            folder / "Event" / "Frames" / f"Video_{sequence_id}_frame_{t_us}.png")
    if lines is None:
        lines = [f"{rgb_time_index(i)!r}: 10.0, 12.0, 30.0, 28.0, 1, DJI Mini 2" for i in range(n_rgb)]
    (folder / "coordinates.txt").write_text("\n".join(lines) + "\n")
    return folder


# ------------------------------------------------------------------------------------------ pure functions

def test_nearest_indices_match_brute_force_including_ties():
    rng = np.random.default_rng(0)
    for _ in range(200):
        source = np.sort(rng.integers(0, 30, rng.integers(1, 12))).astype(float)
        target = np.sort(rng.integers(0, 30, rng.integers(1, 12))).astype(float)
        brute = np.abs(target[None, :] - source[:, None]).argmin(axis=1)  # ties → first (earlier) index
        np.testing.assert_array_equal(nearest_indices(source, target), brute)


def test_mutual_pairs_use_each_frame_once_and_respect_max_dt():
    rgb = np.array([0.0, 1.0, 2.0, 3.0])
    event = np.array([0.01, 0.95, 1.08, 2.9, 10.0])
    pairs = mutual_pairs(rgb, event, pair_max_dt=0.5)
    assert pairs == [(0, 0), (1, 1), (3, 3)]  # event 1.08 loses rgb 1.0 to 0.95; rgb 2.0's nearest (2.9) prefers 3.0
    assert mutual_pairs(np.array([0.0]), np.array([0.7]), pair_max_dt=0.5) == []


def test_parse_coordinates_splits_at_first_colon_and_five_commas(tmp_path):
    path = tmp_path / "coordinates.txt"
    path.write_text("1.33332: 490.0, 413.0, 539.0, 448.0, 1, DJI Mini 2\n"
                    "\n"
                    "1.366653: 1, 2, 3, 4, 2, Model, with comma: and colon\n"
                    "garbage line\n"
                    "2.0: 1, 2, three, 4, 1, DJI\n")
    boxes, bad = parse_coordinates(path)
    assert bad == [4, 5]
    assert [b.time for b in boxes] == [1.33332, 1.366653]
    assert boxes[0].box == (490.0, 413.0, 539.0, 448.0) and boxes[0].drone_model == "DJI Mini 2"
    assert boxes[1].track_id == 2 and boxes[1].drone_model == "Model, with comma: and colon"


def test_fusion_line_and_csv_columns(tmp_path, small_demo):
    index = load_fred_index(small_demo, 0.1, annotation_dir=tmp_path / "ann", notify=_quiet)
    stats = index.stats("test", used=7)
    assert LINE.fullmatch(stats.line()), stats.line()
    csv_path = tmp_path / "fusion_stats.csv"
    append_fusion_stats_csv(csv_path, 0, "train", index.stats("train"))
    append_fusion_stats_csv(csv_path, 0, "test", stats)
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0].keys()) == FUSION_STATS_COLUMNS
    assert rows[1]["split"] == "test" and int(rows[1]["used"]) == 7 and int(rows[1]["dual"]) == stats.dual
    assert float(rows[1]["dual_rate"]) == pytest.approx(stats.dual / stats.total, abs=1e-6)
    empty = fusion_stats([], 0.1)
    assert empty.line() == "Dual Rate: 0/0 (0.0%), Avg Time Diff: n/a"


# ----------------------------------------------------------------------------------- demo: check 5

def _expected(meta: dict, sequence_ids, threshold: str) -> tuple[int, int, float | None]:
    records = [meta["sequences"][s]["expected"] for s in sequence_ids]
    total = sum(r["annotated"] for r in records)
    pairs = sum(r["thresholds"][threshold]["pairs"] for r in records)
    summed = sum(r["thresholds"][threshold]["sum_abs_dt_ms"] for r in records)
    return total, pairs, summed / pairs if pairs else None


@pytest.mark.parametrize("threshold", ["0.1", "0.005"])
def test_demo_pairing_counts_equal_demo_meta(tmp_path, small_demo, threshold):
    meta = _meta(small_demo)
    index = load_fred_index(small_demo, float(threshold), annotation_dir=tmp_path / "ann", notify=_quiet)
    for split, entries in index.splits.items():
        sequences = sorted({e.sequence_id for e in entries})
        total, pairs, mean_ms = _expected(meta, sequences, threshold)
        stats = index.stats(split)
        assert (stats.total, stats.dual) == (total, pairs), split
        assert stats.avg_time_diff_ms == pytest.approx(mean_ms, abs=1e-6)
        for sequence in sequences:
            record = meta["sequences"][sequence]["expected"]
            statuses = [e.status for e in entries if e.sequence_id == sequence]
            assert {k: statuses.count(k) for k in ("dual", "rgb_only", "event_only")} == {
                k: record[k] for k in ("dual", "rgb_only", "event_only")}
    # the demo exercises every status and the threshold really removes pairs
    all_counts = meta["expected"]["all"]
    assert all_counts["rgb_only"] >= 2 and all_counts["event_only"] >= 6
    assert all_counts["thresholds"]["0.005"]["pairs"] < all_counts["thresholds"]["0.1"]["pairs"]


def test_demo_no_frame_used_twice_and_every_frame_indexed(tmp_path, small_demo):
    index = load_fred_index(small_demo, 0.1, annotation_dir=tmp_path / "ann", notify=_quiet)
    entries = [e for split in index.splits.values() for e in split]
    rgb = [e.rgb_path for e in entries if e.rgb_path is not None]
    events = [e.event_path for e in entries if e.event_path is not None]
    assert len(rgb) == len(set(rgb)) and len(events) == len(set(events))
    assert set(rgb) == set(small_demo.glob("*/PADDED_RGB/*.jpg"))
    assert set(events) == set(small_demo.glob("*/Event/Frames/*.png"))
    for entry in entries:
        if entry.status == "dual":
            assert entry.time_diff == pytest.approx(abs(entry.event_timestamp - entry.rgb_timestamp), abs=1e-9)


def test_threshold_changes_effective_pairs_not_the_file(tmp_path, small_demo):
    annotations = tmp_path / "ann"
    load_fred_index(small_demo, 0.1, annotation_dir=annotations, notify=_quiet)
    before = (annotations / "instances_train.json").read_bytes()
    strict = load_fred_index(small_demo, 0.005, annotation_dir=annotations, notify=_quiet)
    assert (annotations / "instances_train.json").read_bytes() == before
    entries = strict.splits["train"]
    over = [e for e in entries if e.status == "dual" and not e.paired]
    assert over and all(e.time_diff > 0.005 for e in over)
    stats = strict.stats("train")
    annotated_pairs_over = sum(1 for e in over if e.annotated)
    # an over-threshold pair counts once as rgb_only and once as event_only
    assert stats.rgb_only >= annotated_pairs_over and stats.event_only >= annotated_pairs_over
    rgb_samples = select_samples(entries, "rgb")
    dual_samples = select_samples(entries, "dual")
    assert len(dual_samples) == stats.dual
    assert len(rgb_samples) == sum(1 for e in entries if e.annotated and e.has_rgb)
    unpaired = select_samples(entries, "dual", include_unpaired=True)
    assert len(unpaired) == stats.dual + stats.rgb_only + stats.event_only
    assert all(not (s.use_rgb and s.use_event) for s in unpaired if not s.entry.paired)


def test_evaluation_subset_is_identical_across_modalities(tmp_path, small_demo):
    index = load_fred_index(small_demo, 0.1, annotation_dir=tmp_path / "ann", notify=_quiet)
    ids = {m: [s.entry.image_id for s in select_samples(index.splits["test"], m, subset="paired")]
           for m in ("rgb", "event", "dual")}
    assert ids["rgb"] == ids["event"] == ids["dual"] and ids["rgb"]
    entries = index.splits["test"]
    assert len(select_samples(entries, "event")) == sum(1 for e in entries if e.annotated and e.has_event)
    assert len(select_samples(entries, "rgb")) == sum(1 for e in entries if e.annotated and e.has_rgb)


def test_annotation_cache_reused_then_rebuilt_after_coordinates_change(tmp_path, small_demo):
    root = tmp_path / "demo"
    shutil.copytree(small_demo, root)
    annotations = tmp_path / "ann"
    messages: list[str] = []
    load_fred_index(root, 0.1, annotation_dir=annotations, notify=messages.append)
    assert any("built fusion annotations" in m for m in messages)
    stamp = (annotations / "instances_test.json").stat().st_mtime_ns
    messages.clear()
    first = load_fred_index(root, 0.1, annotation_dir=annotations, notify=messages.append)
    assert any("reusing" in m for m in messages)
    assert (annotations / "instances_test.json").stat().st_mtime_ns == stamp

    sequence = first.splits["test"][0].sequence_id
    entry = next(e for e in first.splits["test"] if e.sequence_id == sequence and e.has_rgb)
    with open(root / sequence / "coordinates.txt", "a") as handle:
        handle.write(f"{entry.rgb_timestamp!r}: 150.0, 60.0, 170.0, 75.0, 9, DJI Tello EDU\n")
    messages.clear()
    second = load_fred_index(root, 0.1, annotation_dir=annotations, notify=messages.append)
    assert any("stale" in m for m in messages)
    rebuilt = next(e for e in second.splits["test"] if e.image_id == entry.image_id)
    assert len(rebuilt.boxes) == len(entry.boxes) + 1 and 9 in rebuilt.track_ids


def test_given_annotation_dir_is_used_as_is(tmp_path, small_demo):
    annotations = tmp_path / "ann"
    load_fred_index(small_demo, 0.1, annotation_dir=annotations, notify=_quiet)
    document = json.loads((annotations / "instances_val.json").read_text())
    for image in document["images"]:  # a fork-style file: no 'annotated' field
        image.pop("annotated")
    given = tmp_path / "given"
    given.mkdir()
    for split in ("train", "test"):
        shutil.copy(annotations / f"instances_{split}.json", given)
    (given / "instances_val.json").write_text(json.dumps(document))
    messages: list[str] = []
    index = load_fred_index(small_demo, 0.1, fusion_annotations=given, notify=messages.append)
    assert any("as is" in m for m in messages)
    assert all(e.annotated for e in index.splits["val"])
    assert len(index.splits["val"]) == len(document["images"])
    with pytest.raises(FredDataError, match="instances_val.json"):
        load_fusion_split(tmp_path / "nowhere" / "instances_val.json", small_demo, 0.1)


def test_seeded_split_is_sequence_disjoint_without_split_files(tmp_path, small_demo):
    root = tmp_path / "demo"
    shutil.copytree(small_demo, root)
    shutil.rmtree(root / "dataset_splits")
    index = load_fred_index(root, 0.1, annotation_dir=tmp_path / "ann", notify=_quiet,
                            params=IndexParams(split_seed=3))
    groups = {split: {e.sequence_id for e in entries} for split, entries in index.splits.items()}
    assert all(groups[s] for s in groups)  # 6 sequences: at least one each
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"] or groups["val"] & groups["test"])
    assert groups["train"] | groups["val"] | groups["test"] == {str(i) for i in range(6)}
    again = load_fred_index(root, 0.1, annotation_dir=tmp_path / "ann2", notify=_quiet,
                            params=IndexParams(split_seed=3))
    assert {s: {e.sequence_id for e in v} for s, v in again.splits.items()} == groups


def test_train_test_folders_split(tmp_path):
    root = tmp_path / "fred"
    for group, ids in (("train", ("0", "1", "2")), ("test", ("3",))):
        for sequence_id in ids:
            write_sequence(root / group, sequence_id)
    index = load_fred_index(root, 0.1, annotation_dir=tmp_path / "ann", notify=_quiet)
    groups = {split: {e.sequence_id for e in entries} for split, entries in index.splits.items()}
    assert groups["test"] == {"3"} and len(groups["val"]) == 1 and groups["train"] | groups["val"] == {"0", "1", "2"}


# ------------------------------------------------------------------------------------------- bad input

def test_missing_root_raises(tmp_path):
    with pytest.raises(FredDataError, match="does not exist"):
        load_fred_index(tmp_path / "missing", 0.1, annotation_dir=tmp_path / "ann", notify=_quiet)


def test_sequence_without_coordinates_raises(tmp_path):
    root = tmp_path / "fred"
    write_sequence(root, "0")
    (root / "1" / "PADDED_RGB").mkdir(parents=True)
    with pytest.raises(FredDataError, match=r"1 has no coordinates\.txt.*time: x1, y1, x2, y2, id, class"):
        load_fred_index(root, 0.1, annotation_dir=tmp_path / "ann", notify=_quiet)


def test_missing_frame_folder_names_the_path(tmp_path):
    root = tmp_path / "fred"
    write_sequence(root, "0")
    shutil.rmtree(root / "0" / "Event")
    with pytest.raises(FredDataError, match=re.escape(str(root / "0" / "Event" / "Frames"))):
        load_fred_index(root, 0.1, annotation_dir=tmp_path / "ann", notify=_quiet)


def test_malformed_lines_are_counted_and_reported(tmp_path):
    root = tmp_path / "fred"
    lines = [f"{rgb_time_index(i)!r}: 10.0, 12.0, 30.0, 28.0, 1, DJI Mini 2" for i in range(6)]
    lines[2] = "0.1: ten, 12.0, 30.0, 28.0, 1, DJI"
    lines.insert(4, "not a line")
    write_sequence(root, "0", lines=lines)
    messages: list[str] = []
    with pytest.warns(FredDataWarning, match=r"2 malformed line\(s\) skipped \(line 3, 5\)"):
        index = load_fred_index(root, 0.1, annotation_dir=tmp_path / "ann", notify=messages.append)
    assert any("2 malformed coordinate lines" in m for m in messages)
    entries = [e for split in index.splits.values() for e in split]
    assert sum(len(e.boxes) for e in entries) == 5  # the frame of the bad line is a negative


def test_boxes_clipped_and_tiny_dropped(tmp_path):
    root = tmp_path / "fred"
    lines = [f"{rgb_time_index(0)!r}: -5.0, 40.0, 10.0, 60.0, 1, A",   # clipped to x 0..10, y 40..48
             f"{rgb_time_index(0)!r}: 63.5, 10.0, 70.0, 20.0, 2, B"]   # 0.5 px visible: dropped
    write_sequence(root, "0", n_rgb=3, lines=lines)
    index = load_fred_index(root, 0.1, annotation_dir=tmp_path / "ann", notify=_quiet)
    entries = [e for split in index.splits.values() for e in split]
    first = next(e for e in entries if e.frame_index == 0 and e.has_rgb)
    np.testing.assert_allclose(first.boxes, [[0.0, 40.0, 10.0, 48.0]])
    assert sum(e.annotated for e in entries) == 1  # later frames are outside the annotated time range


def test_missing_frame_at_load_names_the_path(tmp_path):
    root = tmp_path / "fred"
    write_sequence(root, "0")
    index = load_fred_index(root, 0.1, annotation_dir=tmp_path / "ann", notify=_quiet)
    entries = [e for split in index.splits.values() for e in split]
    dataset = FredDataset(entries, "rgb", (64, 64), train=False)
    missing = dataset.samples[0].entry.rgb_path
    missing.unlink()
    with pytest.raises(FredDataError, match=re.escape(str(missing))):
        dataset[0]


def test_event_frames_of_another_size_are_resized(tmp_path):
    root = tmp_path / "fred"
    write_sequence(root, "0", rgb_size=(64, 48), event_size=(32, 24))
    with pytest.warns(FredDataWarning, match="event frames are 32x24 but RGB frames are 64x48"):
        index = load_fred_index(root, 0.1, annotation_dir=tmp_path / "ann", notify=_quiet)
    entries = [e for split in index.splits.values() for e in split]
    dataset = FredDataset(entries, "dual", (64, 64), train=False)
    with pytest.warns(FredDataWarning, match="resized to 64x48"):
        item = dataset[0]
    assert item["rgb"].shape == item["event"].shape == (3, 64, 64)
    # the letterboxed content spans the same rows in both streams (48 px tall at scale 1, centred)
    assert np.all(item["event"][:, 8:56] == 0) and np.all(item["event"][:, :8] == 128 / 255)


def test_sequence_entries_pair_a_single_folder_like_the_index(tmp_path, small_demo):
    index = load_fred_index(small_demo, 0.1, annotation_dir=tmp_path / "ann", notify=_quiet)
    indexed = [e for split in index.splits.values() for e in split if e.sequence_id == "5"]
    direct = sequence_entries(small_demo / "5", fusion_threshold=0.1)
    assert [(e.status, e.rgb_path, e.event_path, e.paired) for e in direct] == [
        (e.status, e.rgb_path, e.event_path, e.paired) for e in indexed]
    unlabelled = tmp_path / "seq"
    shutil.copytree(small_demo / "5", unlabelled)
    (unlabelled / "coordinates.txt").unlink()
    entries = sequence_entries(unlabelled)
    assert len(entries) == len(direct) and not any(e.annotated or len(e.boxes) for e in entries)
