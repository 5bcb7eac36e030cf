"""Synchronised RGB+Event augmentation, letterbox, HSV and per-worker seeding (spec/fred.md §5.6, §5.8,
acceptance check 4)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fred.augment import (MIXUP_SOURCE, AugmentDraw, PlacementDraw, TileDraw, compose, draw_augmentation,
                          hsv_jitter, letterbox, letterbox_boxes, letterbox_geometry)
from common.data import SampleKey, set_loader_epoch
from fred.dataset import FredDataset, build_loader, collate
from fred.index import load_fred_index, rgb_time_index

INPUT = (96, 128)  # (h, w)


def _pattern(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(coarse, np.ones((4, 4, 1), np.uint8)))


SOURCES = {
    i: ({"rgb": _pattern(size, i), "event": _pattern(size, i)},
        np.array([[5, 5, 25, 20, 0], [size[0] - 30, size[1] - 20, size[0] + 4, size[1] - 2, 0],
                  [size[0] / 2 - 8, size[1] / 2 - 6, size[0] / 2 + 9, size[1] / 2 + 7, 0]], np.float32))
    for i, size in enumerate([(192, 108), (160, 120), (100, 140), (192, 108), (64, 64)])
}


def _load(index: int):
    return SOURCES[index]


def _draws(kind: str, count: int = 40):
    rng = np.random.default_rng({"plain": 0, "mosaic": 1, "mixup": 2}[kind])
    mosaic, mixup = {"plain": (0.0, 0.0), "mosaic": (1.0, 0.0), "mixup": (1.0, 1.0)}[kind]
    return [draw_augmentation(rng, k % 5, list(range(5)), True, mosaic, mixup) for k in range(count)]


@pytest.mark.parametrize("kind", ["plain", "mosaic", "mixup"])
def test_identical_pattern_stays_identical_in_both_streams(kind):
    for draw in _draws(kind):
        assert draw.kind == ("plain" if kind == "plain" else "mosaic")
        assert (draw.mixup_source is not None) == (kind == "mixup")
        out = compose(draw, _load, INPUT)
        assert out.images["rgb"].shape == (*INPUT, 3)
        np.testing.assert_array_equal(out.images["rgb"], out.images["event"])


def test_streams_get_the_same_geometry_when_content_differs():
    """Different content in the two streams: each output equals the single-stream output of the same draw."""
    def load_pair(index):
        images, boxes = SOURCES[index]
        return {"rgb": images["rgb"], "event": images["rgb"].transpose(Image.Transpose.ROTATE_180)}, boxes

    for draw in _draws("mixup", 10) + _draws("plain", 10):
        both = compose(draw, load_pair, INPUT)
        only_event = compose(draw, lambda i: ({"event": load_pair(i)[0]["event"]}, SOURCES[i][1]), INPUT)
        np.testing.assert_array_equal(both.images["event"], only_event.images["event"])
        np.testing.assert_array_equal(both.boxes, only_event.boxes)


def _restated_tile_boxes(draw: AugmentDraw, corner: int, tile: TileDraw) -> np.ndarray:
    """Literal restatement of the mosaic tile mapping (bubbliiiing) with clipping to the tile's own quadrant."""
    h, w = INPUT
    images, boxes = SOURCES[tile.source]
    iw, ih = images["rgb"].size
    new_ar = iw / ih * tile.aspect
    if new_ar < 1:
        nh = int(tile.scale * h)
        nw = int(nh * new_ar)
    else:
        nw = int(tile.scale * w)
        nh = int(nw / new_ar)
    cutx, cuty = int(w * draw.cut[0]), int(h * draw.cut[1])
    dx = cutx - nw if corner in (0, 1) else cutx
    dy = cuty - nh if corner in (0, 3) else cuty
    b = boxes.astype(np.float64).copy()
    if tile.flip:
        b[:, [0, 2]] = iw - b[:, [2, 0]]
    b[:, [0, 2]] = b[:, [0, 2]] * nw / iw + dx
    b[:, [1, 3]] = b[:, [1, 3]] * nh / ih + dy
    x0, x1 = (0, cutx) if corner in (0, 1) else (cutx, w)
    y0, y1 = (0, cuty) if corner in (0, 3) else (cuty, h)
    b[:, [0, 2]] = b[:, [0, 2]].clip(x0, x1)
    b[:, [1, 3]] = b[:, [1, 3]].clip(y0, y1)
    return b[(b[:, 2] - b[:, 0] > 1) & (b[:, 3] - b[:, 1] > 1)]


def test_mosaic_boxes_stay_in_their_quadrant_and_visible_boxes_survive():
    h, w = INPUT
    seen_clipped = 0
    for draw in _draws("mixup", 60):
        out = compose(draw, _load, INPUT)
        cutx, cuty = int(w * draw.cut[0]), int(h * draw.cut[1])
        for corner, tile in enumerate(draw.tiles):
            got = out.boxes[out.box_sources == corner]
            x0, x1 = (0, cutx) if corner in (0, 1) else (cutx, w)
            y0, y1 = (0, cuty) if corner in (0, 3) else (cuty, h)
            assert np.all(got[:, 0] >= x0) and np.all(got[:, 2] <= x1)
            assert np.all(got[:, 1] >= y0) and np.all(got[:, 3] <= y1)
            expected = _restated_tile_boxes(draw, corner, tile)
            assert len(got) == len(expected)
            np.testing.assert_allclose(got[:, :4], expected[:, :4], atol=1e-3)
            seen_clipped += int(np.any(np.isclose(got[:, [0, 2]], cutx)) or np.any(np.isclose(got[:, [1, 3]], cuty)))
        partner = out.boxes[out.box_sources == MIXUP_SOURCE]
        assert np.all(partner[:, :2] >= 0) and np.all(partner[:, 2] <= w) and np.all(partner[:, 3] <= h)
    assert seen_clipped > 0  # some boxes really were cut at a quadrant border


def test_plain_path_flip_and_box_mapping():
    images, boxes = SOURCES[4]  # 64x64
    placement = PlacementDraw(aspect=1.0, scale=1.0, dx_fraction=0.0, dy_fraction=0.5, flip=True)
    out = compose(AugmentDraw("plain", 4, placement=placement), _load, INPUT)
    # new_ar = 1 → nw = int(1.0 * 128) = 128, nh = 128; dy = int(.5 * (96 - 128)) = -16; flipped
    source = np.asarray(images["rgb"].resize((128, 128), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out.images["rgb"], source[16:112, ::-1].astype(np.float32))
    x1, y1, x2, y2 = boxes[0, :4] * 2
    np.testing.assert_allclose(out.boxes[0, :4], [128 - x2, max(y1 - 16, 0), 128 - x1, y2 - 16])  # clipped at 0


def test_letterbox_geometry_and_boxes():
    assert letterbox_geometry((192, 108), (128, 128)) == (128, 72, 0, 28)
    image = Image.fromarray(np.full((108, 192, 3), 200, np.uint8))
    canvas = letterbox(image, (128, 128))
    assert np.all(canvas[:28] == 128) and np.all(canvas[28:100] == 200) and np.all(canvas[100:] == 128)
    boxes = letterbox_boxes(np.array([[0, 0, 192, 108, 0], [10, 10, 11, 11, 0]], np.float32), (192, 108), (128, 128))
    np.testing.assert_allclose(boxes, [[0, 28, 128, 100, 0]])  # the 2/3-px box is dropped


def test_hsv_jitter_is_a_lut_on_hue_saturation_value():
    import cv2

    rgb = np.asarray(_pattern((64, 48), 3))
    gains = (1.05, 1.5, 0.6)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.float64)
    expected_hsv = np.stack([(np.floor(hsv[..., 0] * gains[0]) % 180), np.minimum(hsv[..., 1] * gains[1], 255),
                             np.minimum(hsv[..., 2] * gains[2], 255)], axis=-1)
    expected = cv2.cvtColor(np.floor(expected_hsv).astype(np.uint8), cv2.COLOR_HSV2RGB)
    np.testing.assert_array_equal(hsv_jitter(rgb, gains), expected.astype(np.float32))
    assert not np.array_equal(hsv_jitter(rgb, gains), rgb.astype(np.float32))


# ------------------------------------------------------------------------------------- dataset level

@pytest.fixture(scope="module")
def twin_dataset(tmp_path_factory) -> tuple[Path, list]:
    """A synthetic FRED sequence whose RGB (PNG) and event frames hold the same pattern."""
    root = tmp_path_factory.mktemp("twin") / "fred"
    folder = root / "0"
    (folder / "PADDED_RGB").mkdir(parents=True)
    (folder / "Event" / "Frames").mkdir(parents=True)
    lines = []
    for i in range(12):
        image = _pattern((96, 64), 100 + i)
        image.save(folder / "PADDED_RGB" / f"Video_0_12_00_{i:02d}.000000.png")
        t_us = int(round(rgb_time_index(i) * 1e6)) + 1000
        image.save(folder / "Event" / "Frames" / f"Video_0_frame_{t_us}.png")
        lines.append(f"{rgb_time_index(i)!r}: {10 + 3 * i}.0, 12.0, {40 + 3 * i}.0, 40.0, 1, DJI Mini 2")
    (folder / "coordinates.txt").write_text("\n".join(lines) + "\n")
    index = load_fred_index(root, 0.1, annotation_dir=root.parent / "ann", notify=lambda m: None)
    return root, index.splits["train"]


def _dataset(entries, hsv=(0.1, 0.7, 0.4), **kwargs) -> FredDataset:
    options = dict(train=True, epoch_length=10, mosaic=0.5, mixup=0.5, special_aug_ratio=0.7, seed=5)
    options.update(kwargs)
    return FredDataset(entries, "dual", (64, 64), hsv_gains=hsv, **options)


def test_dataset_streams_identical_before_hsv_and_events_untouched_by_hsv(twin_dataset):
    _, entries = twin_dataset
    plain = _dataset(entries, hsv=None)
    jittered = _dataset(entries)
    kinds = set()
    for epoch in (0, 1, 2):
        plain.set_epoch(epoch)
        jittered.set_epoch(epoch)
        for i in range(len(plain)):
            kinds.add(plain.draw(i).kind)
        plain.set_epoch(epoch)
        for i in range(len(plain)):
            a, b = plain[i], jittered[i]
            np.testing.assert_array_equal(a["rgb"], a["event"])
            np.testing.assert_array_equal(b["event"], a["event"])  # HSV never touches events
            np.testing.assert_array_equal(b["boxes"], a["boxes"])
            assert not np.array_equal(b["rgb"], a["rgb"])
    assert kinds == {"plain", "mosaic"}


def test_no_mosaic_or_mixup_from_special_aug_ratio(twin_dataset):
    _, entries = twin_dataset
    dataset = _dataset(entries, mosaic=1.0, mixup=1.0)
    dataset.set_epoch(6)  # 6 < .7 * 10
    assert all(dataset.draw(i).kind == "mosaic" for i in range(len(dataset)))
    for epoch in (7, 8, 9):
        dataset.set_epoch(epoch)
        draws = [dataset.draw(i) for i in range(len(dataset))]
        assert all(d.kind == "plain" and d.mixup_source is None for d in draws)


def test_draws_are_keyed_by_epoch_and_position_and_reproduce(twin_dataset):
    _, entries = twin_dataset
    dataset = _dataset(entries)

    def draws(epoch, offset=0):
        return [dataset.draw(SampleKey(i, epoch, i + offset)) for i in range(6)]

    reference = draws(1)
    assert draws(1) == reference  # a pure function of the key: nothing to advance, so a resume repeats it
    assert draws(2) != reference
    assert draws(1, offset=6) != reference  # the same samples at other places of the epoch


def test_loader_with_workers_reproduces_per_epoch(twin_dataset):
    _, entries = twin_dataset
    def target_fn(boxes):
        return [np.full((3, 2, 2, 6), len(boxes), np.float32)] * 3

    def epoch_batches(epoch, workers=2, start_batch=0):
        dataset = _dataset(entries, target_fn=target_fn)
        loader = build_loader(dataset, batch_size=4, train=True, num_workers=workers, seed=5)
        set_loader_epoch(loader, epoch, start_batch)
        return list(loader)

    first, again, other = epoch_batches(0), epoch_batches(0), epoch_batches(1)
    assert len(first) == 3
    # The same batches without workers, and from the middle of the epoch (a resumed run).
    for a, b in zip(first, epoch_batches(0, workers=0)):
        assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["event"], b["event"])
    for a, b in zip(first[1:], epoch_batches(0, workers=0, start_batch=1)):
        assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["image_id"], b["image_id"])
    for a, b in zip(first, again):
        assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["image_id"], b["image_id"])
    assert not all(torch.equal(a["rgb"], b["rgb"]) for a, b in zip(first, other))
    batch = first[0]
    assert batch["rgb"].dtype == torch.float32 and batch["rgb"].shape == (4, 3, 64, 64)
    assert 0.0 <= float(batch["rgb"].min()) and float(batch["rgb"].max()) <= 1.0
    assert [y.shape for y in batch["y_true"]] == [(4, 3, 2, 2, 6)] * 3
    assert batch["drop_rgb"].dtype == torch.bool and not batch["drop_event"].any()
    assert len(batch["boxes"]) == 4 and batch["boxes"][0].shape[1] == 5


def test_collate_eval_metadata(twin_dataset):
    _, entries = twin_dataset
    dataset = FredDataset(entries, "event", (64, 64), train=False)
    batch = collate([dataset[0], dataset[1]])
    assert "rgb" not in batch and batch["event"].shape == (2, 3, 64, 64)
    assert batch["orig_size"].tolist() == [[64, 96], [64, 96]]
    np.testing.assert_allclose(batch["letterbox"][0].numpy(), [64 / 96, 42 / 64, 0, 11])
    assert batch["status"] == ["dual", "dual"] and batch["sequence_id"] == ["0", "0"]
    assert torch.all(batch["time_diff"] > 0) and "y_true" not in batch
    # letterboxed boxes of frame 0: x 10..40 → 6.67..26.67, y 12..40 → 11 + 12·42/64 ..
    np.testing.assert_allclose(batch["boxes"][0][0, :4].numpy(),
                               [10 * 64 / 96, 11 + 12 * 42 / 64, 40 * 64 / 96, 11 + 40 * 42 / 64], rtol=1e-5)


def test_small_dataset_raises_for_a_full_batch(twin_dataset):
    _, entries = twin_dataset
    with pytest.raises(ValueError, match="dataset too small"):
        build_loader(_dataset(entries), batch_size=64, train=True)


def test_targets_bound_with_partial(twin_dataset):
    """The trainer binds fred.targets.get_target with functools.partial; the dataset calls it with the boxes."""
    targets = pytest.importorskip("fred.targets")
    _, entries = twin_dataset
    dataset = FredDataset(entries, "rgb", (64, 64), train=False,
                          target_fn=functools.partial(targets.get_target, input_shape=(64, 64), num_classes=1))
    y_true = dataset[0]["y_true"]
    assert [y.shape for y in y_true] == [(3, 2, 2, 6), (3, 4, 4, 6), (3, 8, 8, 6)]
    assert sum(float(y[..., 4].sum()) for y in y_true) >= 1  # the box was assigned somewhere
