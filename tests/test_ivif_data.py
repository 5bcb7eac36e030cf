"""IR/VIS pair discovery, selection, pairs.txt and the pair dataset (common/ivif/data.py).

Covers spec/crossfuse.md §9 check 14 and spec/maefuse.md §9 check 10 (pairing and folders).
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import DataError
from common.ivif.data import (DatasetPair, FilePair, IVIFPairDataset, check_pair_headers, discover_file_pairs,
                              find_folder_pairs, load_dataset_pairs, load_pairs, pairs_listing, select_pairs,
                              write_pairs_file)

GRAY = np.zeros((8, 8), dtype=np.uint8)


def save(path: Path, array: np.ndarray = GRAY, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)


@pytest.fixture
def shuffled_listing(monkeypatch):
    """Directory listings in a random order, so nothing can rely on the file system's order."""
    original_iterdir, original_scandir = Path.iterdir, os.scandir
    shuffler = random.Random(5)

    def iterdir(self):
        entries = list(original_iterdir(self))
        shuffler.shuffle(entries)
        return iter(entries)

    def scandir(path="."):
        with original_scandir(path) as iterator:
            entries = list(iterator)
        shuffler.shuffle(entries)
        return _Listing(entries)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    monkeypatch.setattr(os, "scandir", scandir)


class _Listing(list):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def make_kaist(root: Path, order: list[tuple[str, str]]) -> None:
    for set_video, stem in order:
        save(root / set_video / "lwir" / f"{stem}.jpg")
        if (set_video, stem) != ("set01/V000", "I00002"):  # one VIS missing
            save(root / set_video / "visible" / f"{stem}.jpg")


KAIST_FILES = [(video, f"I{index:05d}") for video in ("set00/V000", "set00/V001", "set01/V000") for index in range(3)]


# ---------------------------------------------------------------------------------------------- crossfuse check 14


def test_kaist_nested_sorted_pairs_and_missing_file_reported(tmp_path, shuffled_listing):
    first, second = tmp_path / "first", tmp_path / "second"
    make_kaist(first, KAIST_FILES)
    make_kaist(second, list(reversed(KAIST_FILES)))
    with pytest.warns(UserWarning, match="set01/V000/lwir/I00002.jpg") as caught:
        pairs = discover_file_pairs(first)
    assert len(caught) == 1 and "1 file" in str(caught[0].message)
    keys = [pair.key for pair in pairs]
    assert keys == sorted(keys) and len(keys) == 8
    assert "set01/V000/I00002" not in keys
    assert keys[:4] == ["set00/V000/I00000", "set00/V000/I00001", "set00/V000/I00002", "set00/V001/I00000"]
    with pytest.warns(UserWarning):
        assert [pair.key for pair in discover_file_pairs(second, layout="kaist")] == keys
    for pair in pairs:
        assert pair.ir.parent.name == "lwir" and pair.vi.parent.name == "visible"
        assert pair.ir.stem == pair.vi.stem and pair.ir.parent.parent == pair.vi.parent.parent
    assert [pair.key for pair in select_pairs(pairs, 3)] == keys[:3]


def test_flat_kaist_and_generic_layouts(tmp_path):
    for stem in ("b", "a"):
        save(tmp_path / "flat" / "lwir" / f"{stem}.png")
        save(tmp_path / "flat" / "visible" / f"{stem}.png")
    assert [pair.key for pair in discover_file_pairs(tmp_path / "flat")] == ["a", "b"]
    for ir_name, vis_name in (("ir", "vi"), ("infrared", "visible"), ("ir", "vis"), ("IR", "VI")):
        root = tmp_path / f"{ir_name}_{vis_name}"
        save(root / ir_name / "IR7.png")
        save(root / vis_name / "VIS7.png")
        save(root / ir_name / "3.png")
        save(root / vis_name / "3.jpg")
        pairs = discover_file_pairs(root)
        assert [(pair.ir.name, pair.vi.name) for pair in pairs] == [("3.png", "3.jpg"), ("IR7.png", "VIS7.png")]


def test_one_sided_file_is_never_paired_and_zero_pairs_is_an_error(tmp_path):
    save(tmp_path / "ir" / "a.png")
    save(tmp_path / "vi" / "a.png")
    save(tmp_path / "ir" / "b.png")
    with pytest.warns(UserWarning, match="b.png"):
        pairs = discover_file_pairs(tmp_path)
    assert [pair.key for pair in pairs] == ["a"]
    (tmp_path / "vi" / "a.png").rename(tmp_path / "vi" / "z.png")
    with pytest.raises(DataError, match="zero IR/VIS pairs"):
        discover_file_pairs(tmp_path)


def test_rgb_jpeg_becomes_gray_integers_at_the_training_size(tmp_path):
    rng = np.random.default_rng(0)
    save(tmp_path / "ir" / "x.jpg", rng.integers(0, 256, (512, 640), dtype=np.uint8), quality=95)
    save(tmp_path / "vi" / "x.jpg", rng.integers(0, 256, (512, 640, 3), dtype=np.uint8), quality=95)
    red = np.zeros((512, 640, 3), dtype=np.uint8)
    red[..., 0] = 255
    save(tmp_path / "ir" / "red.png", red[..., 0])
    save(tmp_path / "vi" / "red.png", red)
    save(tmp_path / "ir" / "redjpeg.jpg", red[..., 0])
    save(tmp_path / "vi" / "redjpeg.jpg", red)
    dataset = IVIFPairDataset(discover_file_pairs(tmp_path), size=(256, 256))
    for index in range(len(dataset)):
        sample = dataset[index]
        for name in ("ir", "vi"):
            image = sample[name]
            assert image.shape == (1, 256, 256) and image.dtype == torch.float32
            assert torch.equal(image, image.round()) and image.min() >= 0 and image.max() <= 255
    samples = {dataset[index]["key"]: dataset[index] for index in range(len(dataset))}
    assert (samples["red"]["vi"] == 76).all() and (samples["redjpeg"]["vi"] == 76).all()


def test_selection_first_uniform_and_too_many(tmp_path):
    for index in range(10):
        save(tmp_path / "ir" / f"{index:02d}.png")
        save(tmp_path / "vi" / f"{index:02d}.png")
    pairs = discover_file_pairs(tmp_path)
    assert [pair.key for pair in select_pairs(pairs, 3)] == ["00", "01", "02"]
    assert [pair.key for pair in select_pairs(pairs, 4, "uniform")] == ["00", "02", "05", "07"]
    with pytest.warns(UserWarning, match="only 10 available"):
        assert len(select_pairs(pairs, 50)) == 10
    assert select_pairs(pairs, None) == pairs


def test_pairs_file_lists_relative_paths_with_its_sha256(tmp_path):
    for stem in ("b", "a"):
        save(tmp_path / "data" / "infrared" / f"{stem}.png")
        save(tmp_path / "data" / "visible" / f"{stem}.png")
    pairs = discover_file_pairs(tmp_path / "data")
    digest = write_pairs_file(tmp_path / "run" / "pairs.txt", pairs)
    text = (tmp_path / "run" / "pairs.txt").read_text()
    assert text == "a\tdata/infrared/a.png\tdata/visible/a.png\nb\tdata/infrared/b.png\tdata/visible/b.png\n"
    assert digest == hashlib.sha256(text.encode()).hexdigest() == hashlib.sha256(
        pairs_listing(pairs).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- maefuse check 10


def test_maefuse_stem_pairing_and_folder_names(tmp_path):
    rng = np.random.default_rng(1)
    for stem in ("c", "a", "b"):
        save(tmp_path / "set" / "vi" / f"{stem}.png", rng.integers(0, 256, (6, 6), dtype=np.uint8))
    for stem in ("b", "c", "a"):
        save(tmp_path / "set" / "ir" / f"{stem}.jpg", rng.integers(0, 256, (6, 6), dtype=np.uint8))
    save(tmp_path / "set" / "vi" / "d.png")
    with pytest.warns(UserWarning, match="d.png"):
        pairs = discover_file_pairs(tmp_path / "set", modality_tokens=False)
    assert [(pair.ir.stem, pair.vi.stem) for pair in pairs] == [("a", "a"), ("b", "b"), ("c", "c")]
    for stem in ("a", "b"):
        save(tmp_path / "other" / "Infrared" / f"{stem}.png")
        save(tmp_path / "other" / "Visible" / f"{stem}.png")
    assert [pair.key for pair in discover_file_pairs(tmp_path / "other")] == ["a", "b"]
    save(tmp_path / "set" / "vi" / "a.jpg")
    with pytest.raises(DataError, match="duplicate stem"):
        discover_file_pairs(tmp_path / "set")


def test_llvip_split_folders(tmp_path):
    for split in ("train", "test"):
        for stem in ("010001", "010002"):
            save(tmp_path / "LLVIP" / "infrared" / split / f"{stem}.jpg")
            save(tmp_path / "LLVIP" / "visible" / split / f"{stem}.jpg")
    pairs = discover_file_pairs(tmp_path / "LLVIP", split="test")
    assert [pair.ir.parent.name for pair in pairs] == ["test", "test"]


def test_layout_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        find_folder_pairs(tmp_path / "absent")
    save(tmp_path / "lonely" / "ir" / "a.png")
    with pytest.raises(DataError, match="no IR/VIS folder pair") as error:
        find_folder_pairs(tmp_path / "lonely")
    assert "ir" in str(error.value)
    save(tmp_path / "two" / "ir" / "a.png")
    save(tmp_path / "two" / "infrared" / "a.png")
    save(tmp_path / "two" / "vi" / "a.png")
    with pytest.raises(DataError, match="2 IR folders"):
        find_folder_pairs(tmp_path / "two")
    (tmp_path / "empty" / "ir").mkdir(parents=True)
    save(tmp_path / "empty" / "vi" / "a.png")
    with pytest.raises(DataError, match="no images"):
        discover_file_pairs(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- dataset


def test_dataset_size_mismatch_names_both_files(tmp_path):
    save(tmp_path / "ir" / "a.png", np.zeros((8, 8), dtype=np.uint8))
    save(tmp_path / "vi" / "a.png", np.zeros((8, 9), dtype=np.uint8))
    pairs = discover_file_pairs(tmp_path)
    dataset = IVIFPairDataset(pairs, size=(4, 4))
    with pytest.raises(DataError, match="sizes differ") as error:
        dataset[0]
    assert "ir/a.png" in str(error.value) and "vi/a.png" in str(error.value)
    with pytest.raises(DataError, match="sizes differ"):
        check_pair_headers(pairs)


def test_dataset_truncated_or_unreadable_image_names_the_file(tmp_path):
    rng = np.random.default_rng(4)
    for stem in ("a", "b"):
        save(tmp_path / "ir" / f"{stem}.png", rng.integers(0, 256, (32, 32), dtype=np.uint8))
        save(tmp_path / "vi" / f"{stem}.png", rng.integers(0, 256, (32, 32), dtype=np.uint8))
    data = (tmp_path / "vi" / "b.png").read_bytes()
    (tmp_path / "vi" / "b.png").write_bytes(data[: len(data) // 2])
    pairs = discover_file_pairs(tmp_path)
    check_pair_headers(pairs)  # headers are intact
    dataset = IVIFPairDataset(pairs)
    assert dataset[0]["key"] == "a"
    with pytest.raises(DataError, match="truncated") as error:
        dataset[1]
    assert "b.png" in str(error.value)
    (tmp_path / "ir" / "a.png").write_text("garbage")
    with pytest.raises(DataError, match="a.png"):
        check_pair_headers(pairs)


def test_dataset_full_size_and_seeded_flips(tmp_path):
    rng = np.random.default_rng(2)
    for index in range(12):
        save(tmp_path / "ir" / f"{index:02d}.png", rng.integers(0, 256, (5, 7), dtype=np.uint8))
        save(tmp_path / "vi" / f"{index:02d}.png", rng.integers(0, 256, (5, 7), dtype=np.uint8))
    pairs = discover_file_pairs(tmp_path)
    plain = IVIFPairDataset(pairs)
    assert plain[0]["ir"].shape == (1, 5, 7) and plain[0]["key"] == "00"

    def flipped(dataset: IVIFPairDataset) -> list[bool]:
        states = []
        for index in range(len(dataset)):
            sample, original = dataset[index], plain[index]
            same_ir = torch.equal(sample["ir"], original["ir"])
            assert torch.equal(sample["vi"], original["vi"]) == same_ir  # both images flip together
            if not same_ir:
                assert torch.equal(sample["ir"], original["ir"].flip(-1))
            states.append(not same_ir)
        return states

    flips = IVIFPairDataset(pairs, hflip=True, seed=3)
    epoch0 = flipped(flips)
    assert 0 < sum(epoch0) < len(epoch0)
    assert flipped(IVIFPairDataset(pairs, hflip=True, seed=3)) == epoch0
    flips.set_epoch(1)
    assert flipped(flips) != epoch0


# ---------------------------------------------------------------------------------------------- Hugging Face source


def test_saved_hugging_face_dataset(tmp_path):
    import datasets

    rng = np.random.default_rng(3)
    images = {name: [Image.fromarray(rng.integers(0, 256, (6, 9), dtype=np.uint8)) for _ in range(3)]
              for name in ("thermal", "rgb")}
    images["rgb"][1] = Image.fromarray(np.full((6, 9, 3), (255, 0, 0), dtype=np.uint8))
    features = datasets.Features({"thermal": datasets.Image(), "rgb": datasets.Image(),
                                  "name": datasets.Value("string")})
    table = datasets.Dataset.from_dict({**images, "name": ["z", "m", "a"]}, features=features)
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved"))
    pairs = load_pairs([tmp_path / "saved"], ir_column="thermal", vi_column="rgb")
    assert [pair.key for pair in pairs] == ["a", "m", "z"] and all(isinstance(p, DatasetPair) for p in pairs)
    sample = IVIFPairDataset(pairs, size=(12, 18))[1]
    assert sample["key"] == "m" and sample["vi"].shape == (1, 12, 18) and (sample["vi"] == 76).all()
    np.testing.assert_array_equal(IVIFPairDataset(pairs)[0]["ir"][0].numpy(), np.asarray(images["thermal"][2]))
    assert pairs_listing(pairs).splitlines()[0] == f"a\t{tmp_path / 'saved'}#2"
    with pytest.raises(DataError, match="column"):
        load_dataset_pairs(tmp_path / "saved", ir_column="ir", vi_column="rgb")
    with pytest.raises(DataError, match="split"):
        load_dataset_pairs(tmp_path / "saved", ir_column="thermal", vi_column="rgb", split="test")


def test_hub_id_is_never_fetched_without_opt_in(monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise AssertionError("load_dataset must not be called")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError, match="allow_download"):
        load_dataset_pairs("someone/ir-vis-pairs")
    with pytest.raises(DataError, match="not found"):
        load_pairs(["someone/ir-vis-pairs"])


def test_file_pair_describe_is_relative(tmp_path):
    pair = FilePair("k", tmp_path / "root" / "ir" / "k.png", tmp_path / "root" / "vi" / "k.png", tmp_path / "root")
    assert pair.describe() == "k\troot/ir/k.png\troot/vi/k.png"
