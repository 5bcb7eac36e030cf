"""MaeFuse training data: pairing by stem, folder names, PIL preprocessing, bad input (spec §5, §9 check 10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import ConfigError, DataError
from maefuse.data import PairDataset, build_training_dataset, discover_extra_images, discover_pairs
from maefuse.model import IMAGENET_MEAN, IMAGENET_STD
from tests.maefuse_helpers import random_image, write_image

SIZE = 32


def denormalised(tensor: torch.Tensor) -> np.ndarray:
    """(3, S, S) normalised -> 0..255 float64 per channel."""
    mean = np.array(IMAGENET_MEAN).reshape(3, 1, 1)
    std = np.array(IMAGENET_STD).reshape(3, 1, 1)
    return (tensor.double().numpy() * std + mean) * 255


def test_pairs_by_stem_not_listing_order(tmp_path):
    """Check 10: vi/{a,b,c}.png and ir/{c,a,b}.jpg written in shuffled order pair as (a,a), (b,b), (c,c); an extra
    vi/d.png is excluded with one warning naming it; `max_pairs` keeps the first pairs by stem."""
    rng = np.random.default_rng(0)
    for stem in ("b", "a", "c"):
        write_image(tmp_path / "data" / "vi" / f"{stem}.png", random_image(rng, 20, 24))
    for stem in ("c", "a", "b"):
        write_image(tmp_path / "data" / "ir" / f"{stem}.jpg", random_image(rng, 20, 24))
    write_image(tmp_path / "data" / "vi" / "d.png", random_image(rng, 20, 24))
    with pytest.warns(UserWarning, match=r"1 file \(vi/d.png\)"):
        pairs = discover_pairs(tmp_path / "data")
    assert [(pair.key, pair.vi.name, pair.ir.name) for pair in pairs] == [
        ("a", "a.png", "a.jpg"), ("b", "b.png", "b.jpg"), ("c", "c.png", "c.jpg")]
    with pytest.warns(UserWarning):
        assert [pair.key for pair in discover_pairs(tmp_path / "data", max_pairs=2)] == ["a", "b"]


def test_visible_infrared_and_split_folders(tmp_path):
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for folder in ("Visible", "infrared"):
            write_image(tmp_path / folder / split / f"{split}1.png", random_image(rng, 16, 16))
    assert [pair.key for pair in discover_pairs(tmp_path, split="test")] == ["test1"]


def test_colour_vis_gives_three_channels_of_its_y(tmp_path):
    """Check 10: a colour VIS becomes 3 channels that are the same Y (PIL YCbCr, bilinear to S) once denormalised,
    i.e. channel c = (Y/255 - mu_c)/sigma_c; a white pixel in channel 0 normalises to 2.2489."""
    rng = np.random.default_rng(2)
    colour = random_image(rng, 40, 50, colour=True)
    colour[0, 0] = 255
    write_image(tmp_path / "vi" / "x.png", colour)
    write_image(tmp_path / "ir" / "x.png", random_image(rng, 40, 50, colour=True))
    item = PairDataset(discover_pairs(tmp_path), SIZE)[0]
    assert item["vi"].shape == (3, SIZE, SIZE) and item["vi"].dtype == torch.float32
    expected_y = np.asarray(Image.fromarray(colour).convert("YCbCr").getchannel("Y").resize(
        (SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float64)
    for channel in denormalised(item["vi"]):
        np.testing.assert_allclose(channel, expected_y, atol=1e-3)
    expected_ir = np.asarray(Image.open(tmp_path / "ir" / "x.png").convert("L").resize(
        (SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float64)
    np.testing.assert_allclose(denormalised(item["ir"])[0], expected_ir, atol=1e-3)

    white = np.full((8, 8), 255, dtype=np.uint8)
    write_image(tmp_path / "white" / "vi" / "w.png", white)
    write_image(tmp_path / "white" / "ir" / "w.png", white)
    item = PairDataset(discover_pairs(tmp_path / "white"), SIZE)[0]
    assert item["vi"][0, 0, 0].item() == pytest.approx(2.2489, abs=1e-4)


def test_sixteen_bit_images_are_scaled_with_a_warning(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    write_image(tmp_path / "vi" / "r.png", ramp)
    write_image(tmp_path / "ir" / "r.png", ramp)
    with pytest.warns(UserWarning, match="min-max"):
        item = PairDataset(discover_pairs(tmp_path), 8)[0]
    values = denormalised(item["ir"])[0]
    assert values.min() == pytest.approx(0, abs=1e-3) and values.max() == pytest.approx(255, abs=1e-3)


def test_bad_input_names_the_file(tmp_path):
    rng = np.random.default_rng(3)
    write_image(tmp_path / "ok" / "vi" / "a.png", random_image(rng, 16, 16))
    (tmp_path / "ok" / "ir").mkdir(parents=True)
    (tmp_path / "ok" / "ir" / "a.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"ir/a\.png"):
        discover_pairs(tmp_path / "ok")
    png = (tmp_path / "ok" / "vi" / "a.png").read_bytes()
    (tmp_path / "ok" / "ir" / "a.png").write_bytes(png[:len(png) // 2])  # header fine, body truncated
    dataset = PairDataset(discover_pairs(tmp_path / "ok"), SIZE)
    with pytest.raises(DataError, match=r"ir/a\.png"):
        dataset[0]
    write_image(tmp_path / "dup" / "vi" / "a.png", random_image(rng, 16, 16))
    write_image(tmp_path / "dup" / "vi" / "a.jpg", random_image(rng, 16, 16))
    write_image(tmp_path / "dup" / "ir" / "a.png", random_image(rng, 16, 16))
    with pytest.raises(DataError, match="duplicate stem"):
        discover_pairs(tmp_path / "dup")
    write_image(tmp_path / "none" / "vi" / "a.png", random_image(rng, 16, 16))
    write_image(tmp_path / "none" / "ir" / "b.png", random_image(rng, 16, 16))
    with pytest.raises(DataError, match="zero IR/VIS pairs"):
        discover_pairs(tmp_path / "none")


def test_extra_images_for_decoder_pretraining(tmp_path):
    """`--extra_images` adds unpaired images two per item, processed like VIS; other modes refuse them."""
    rng = np.random.default_rng(4)
    write_image(tmp_path / "data" / "vi" / "p.png", random_image(rng, 16, 16))
    write_image(tmp_path / "data" / "ir" / "p.png", random_image(rng, 16, 16))
    extras = [write_image(tmp_path / "extra" / f"n{index}.png", random_image(rng, 20, 20, colour=True))
              for index in range(3)]
    paths = discover_extra_images(tmp_path / "extra")
    assert paths == extras
    dataset = build_training_dataset(discover_pairs(tmp_path / "data"), SIZE, "train_decoder_only", paths)
    assert len(dataset) == 1 + 2
    last = dataset[2]
    assert last["key"] == "extra/n2+n0"
    expected = np.asarray(Image.open(extras[0]).convert("YCbCr").getchannel("Y").resize(
        (SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float64)
    np.testing.assert_allclose(denormalised(last["ir"])[1], expected, atol=1e-3)
    with pytest.raises(ConfigError, match="train_decoder_only"):
        build_training_dataset(discover_pairs(tmp_path / "data"), SIZE, "train_decoder_CFM_MFM", paths)
