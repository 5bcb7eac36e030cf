"""Colorization data (spec/colorize.md §5, §9 checks 8-9): layouts, the batch of §2.1, reference sampling, bad
input, and the generated demo dataset."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from colorize.config import DataConfig
from colorize.data import (ClipDataset, ReferencePool, find_sequences, find_validation_sequences,
                           load_validation_sequence)
from colorize.demo_data import FRAMES, SPLITS, ensure_demo_dataset, make_scene, render_rgb
from common.errors import DataError
from tests.colorize_helpers import demo_data_config, demo_root, no_network  # noqa: F401

pytestmark = pytest.mark.usefixtures("no_network")


def _write_frames(folder, count, size=(40, 30), colour=(200, 40, 40)):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", size, colour).save(folder / f"frame_{index}.png")


def test_demo_dataset_layout(demo_root):
    for split, count in SPLITS.items():
        names = (demo_root / "ImageSets" / "2017" / f"{split}.txt").read_text().split()
        assert len(names) == count
        for name in names:
            frames = sorted((demo_root / "JPEGImages" / "480p" / name).glob("*.jpg"))
            assert [f.name for f in frames] == [f"{i:05d}.jpg" for i in range(FRAMES)]
            references = sorted((demo_root / "references" / name).iterdir())
            assert [r.name for r in references] == ["ref_000.jpg", "ref_001.jpg"]
    with Image.open(frames[0]) as image:
        assert image.size == (96, 96) and image.mode == "RGB"
    assert len(list((demo_root / "JPEGImages" / "480p").iterdir())) == 30
    assert len(list((demo_root / "references").iterdir())) == 30


def test_demo_dataset_is_deterministic(demo_root, tmp_path):
    again = ensure_demo_dataset(tmp_path / "again", seed=0)
    assert ensure_demo_dataset(again, seed=0) == again
    files = sorted(p.relative_to(demo_root) for p in demo_root.rglob("*.jpg"))
    assert len(files) == 30 * (FRAMES + 2)
    for relative in files:
        assert np.array_equal(np.asarray(Image.open(demo_root / relative)), np.asarray(Image.open(again / relative)))
    assert not np.array_equal(render_rgb(make_scene(1, "train", 3), 7), render_rgb(make_scene(0, "train", 3), 7))
    with pytest.raises(DataError, match="seed 0"):
        ensure_demo_dataset(again, seed=1)


def test_both_layouts_natural_sort_and_short_sequences(demo_root, tmp_path):
    sequences, skipped = find_sequences([demo_root], "train", 4)
    assert len(sequences) == 24 and skipped == 0 and sequences[0].name == "demo_train_000"
    assert [s.name for s in find_validation_sequences(demo_data_config(demo_root))] == [f"demo_val_{i:03d}"
                                                                                        for i in range(6)]
    assert len(find_sequences([demo_root], "all")[0]) == 30

    generic = tmp_path / "generic"
    _write_frames(generic / "walk", 12)
    _write_frames(generic / "short", 3)
    (generic / "notes").mkdir()
    sequences, skipped = find_sequences([generic], "train", 4)
    assert [s.name for s in sequences] == ["walk"] and skipped == 1
    assert [p.name for p in sequences[0].frames[:3]] == ["frame_0.png", "frame_1.png", "frame_2.png"]
    assert sequences[0].frames[10].name == "frame_10.png"
    with pytest.raises(DataError, match="short"):
        find_sequences([generic], "all", 4, short="error")


def test_batch_keys_shapes_and_shared_flip(demo_root):
    cfg = demo_data_config(demo_root)
    sequences, _ = find_sequences([demo_root], "train", 4)
    dataset = ClipDataset(sequences, cfg, train=True, seed=0)
    assert len(dataset) == 24 * 3
    batch = next(iter(DataLoader(dataset, batch_size=4, num_workers=0)))
    assert batch["frames_lab"].shape == (4, 4, 3, 64, 64) and batch["frames_lab"].dtype == torch.float32
    assert batch["reference_lab"].shape == (4, 3, 64, 64) and batch["reference_lab"].dtype == torch.float32
    assert batch["reference_is_frame"].dtype == torch.bool and batch["reference_is_frame"].shape == (4,)
    assert isinstance(batch["sequence"], list) and len(batch["sequence"]) == 4
    assert batch["frame_ids"].dtype == torch.int64 and batch["frame_ids"].shape == (4, 4)
    assert batch["frames_lab"][:, :, 0].min() >= -1 and batch["frames_lab"][:, :, 0].max() <= 1

    flipped = next(i for i in range(len(dataset)) if dataset.plan(i).flip and dataset.plan(i).reference_folder is None)
    item = dataset[flipped]
    plain = ClipDataset(sequences, cfg, train=False)[flipped]
    assert torch.equal(item["reference_lab"], item["frames_lab"][0]) and item["reference_is_frame"]
    # the demo frames are square, so every crop is the whole resized frame: each frame is the plain one flipped
    assert torch.allclose(item["frames_lab"], plain["frames_lab"].flip(-1), atol=1e-5)


def test_reference_rate_sequence_folders_and_redraw(demo_root):
    cfg = demo_data_config(demo_root)
    sequences, _ = find_sequences([demo_root], "train", 4)
    dataset = ClipDataset(sequences, cfg, train=True, seed=3)
    plans = []
    for epoch in range(28):
        dataset.set_epoch(epoch)
        plans += [dataset.plan(i) for i in range(len(dataset))]
    plans = plans[:2000]
    rate = np.mean([plan.reference_folder is not None for plan in plans])
    assert abs(rate - 0.7) <= 0.03, rate
    for plan in plans:
        if plan.reference_folder is not None:
            assert plan.reference_folder.name == sequences[plan.sequence].name
    dataset.set_epoch(0)
    folder_item = next(i for i in range(len(dataset)) if dataset.plan(i).reference_folder is not None)
    item = dataset[folder_item]
    assert not item["reference_is_frame"] and not torch.equal(item["reference_lab"], item["frames_lab"][0])
    assert torch.equal(dataset[folder_item]["reference_lab"], item["reference_lab"])

    first_frame = ClipDataset(sequences, demo_data_config(demo_root, reference="first_frame"))
    assert all(first_frame.plan(i).reference_folder is None for i in range(len(first_frame)))
    with pytest.warns(UserWarning, match="first_frame"):
        ClipDataset(sequences, demo_data_config(demo_root, imagenet=None))


def test_gray_folder_images_are_redrawn(demo_root, tmp_path):
    pool_root = tmp_path / "imagenet"
    (pool_root / "n01").mkdir(parents=True)
    for index in range(6):
        colour = (90, 90, 90) if index > 1 else (30, 160, 60)
        Image.new("RGB", (80, 70), colour).save(pool_root / "n01" / f"img_{index}.JPEG")
    cfg = demo_data_config(demo_root, imagenet=pool_root, real_reference_probability=1.0)
    sequences, _ = find_sequences([demo_root], "train", 4)
    dataset = ClipDataset(sequences, cfg, train=True, seed=0)
    chromas = [float((dataset[i]["reference_lab"][1:] * 127).square().sum(0).sqrt().mean()) for i in range(12)]
    # 2 of 6 images have colour: one draw finds colour with p = 1/3, five draws with p = 0.87
    assert np.mean([c >= 2 for c in chromas]) > 0.6


def test_validation_reference_rule(demo_root):
    cfg = demo_data_config(demo_root)
    sequence = find_validation_sequences(cfg)[0]
    loaded = load_validation_sequence(sequence, cfg, ReferencePool(cfg.imagenet))
    assert loaded.frames_lab.shape == (12, 3, 64, 64) and not loaded.reference_is_frame
    assert loaded.reference_path.name == "ref_000.jpg"
    fallback = load_validation_sequence(sequence, cfg, None, max_frames=5)
    assert fallback.reference_is_frame and torch.equal(fallback.reference_lab, fallback.frames_lab[0])
    assert fallback.frames_lab.shape[0] == 5


def test_bad_input_names_the_file_or_folder(tmp_path):
    with pytest.raises(DataError, match="missing_root"):
        find_sequences([tmp_path / "missing_root"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        find_sequences([tmp_path / "empty"])
    mixed = tmp_path / "mixed" / "clip"
    _write_frames(mixed, 5)
    Image.new("RGB", (41, 30)).save(mixed / "frame_9.png")
    with pytest.raises(DataError, match="frame_9.png"):
        find_sequences([tmp_path / "mixed"])
    broken = tmp_path / "broken" / "clip"
    _write_frames(broken, 5)
    (broken / "frame_3.png").write_bytes((broken / "frame_3.png").read_bytes()[:60])
    sequences, _ = find_sequences([tmp_path / "broken"], "all", 4)
    dataset = ClipDataset(sequences, DataConfig(image_size=32, reference="first_frame"))
    with pytest.raises(DataError, match="frame_3.png"):
        dataset[0]
    (tmp_path / "refs" / "n02").mkdir(parents=True)
    with pytest.raises(DataError, match="refs"):
        ReferencePool(tmp_path / "refs" / "n02")
    pool = ReferencePool(tmp_path / "refs")
    with pytest.raises(DataError, match="n02"):
        pool.images(pool.choose_folder("walk", np.random.default_rng(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="no_such_refs"):
            ClipDataset(sequences, DataConfig(image_size=32, imagenet=tmp_path / "no_such_refs"))
