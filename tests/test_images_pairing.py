"""Image reading, colour conversion, resizing (common/images.py) and stem pairing (common/pairing.py)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from common.errors import DataError
from common.images import (image_size, read_gray, read_image, resize_bilinear_half_pixel, resize_uint8,
                           rgb_to_gray, rgb_to_ycrcb, ycrcb_to_rgb)
from common.pairing import list_images, pair_by_stem, warn_unpaired


def save(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ---------------------------------------------------------------------------------------------- reading


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found") as missing:
        read_image(tmp_path / "nope.png")
    assert "nope.png" in str(missing.value)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="text.png"):
        read_image(tmp_path / "text.png")
    with pytest.raises(DataError, match="text.png"):
        image_size(tmp_path / "text.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(DataError, match="folder.png"):
        read_image(tmp_path / "folder.png")


@pytest.mark.parametrize("extension", ["png", "jpg"])
def test_truncated_image_is_reported(tmp_path, extension):
    rng = np.random.default_rng(0)
    path = tmp_path / f"cut.{extension}"
    save(path, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert image_size(path) == (64, 64)  # the header alone still reads
    with pytest.raises(DataError, match="truncated or corrupt") as error:
        read_image(path)
    assert str(path) in str(error.value)


def test_modes_become_gray_or_rgb(tmp_path):
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 10
    save(tmp_path / "rgba.png", rgba)
    assert read_image(tmp_path / "rgba.png").shape == (4, 5, 3)
    assert (read_gray(tmp_path / "rgba.png") == 76).all()
    Image.fromarray(np.full((3, 3, 2), (90, 0), dtype=np.uint8)).save(tmp_path / "la.png")
    assert (read_image(tmp_path / "la.png") == 90).all() and read_image(tmp_path / "la.png").ndim == 2
    Image.fromarray(np.full((3, 3, 3), (0, 255, 0), dtype=np.uint8)).convert("P").save(tmp_path / "p.png")
    assert (read_gray(tmp_path / "p.png") == 150).all()  # rint(0.587 * 255) = 150
    Image.fromarray(np.eye(4, dtype=bool)).save(tmp_path / "bits.png")
    assert set(np.unique(read_image(tmp_path / "bits.png"))) == {0, 255}


def test_sixteen_bit_is_min_max_scaled_or_rejected(tmp_path):
    values = np.array([[1000, 2000], [3000, 5000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with pytest.warns(UserWarning, match="min-max"):
        scaled = read_image(tmp_path / "deep.png")
    np.testing.assert_array_equal(scaled, [[0, 64], [128, 255]])
    with pytest.raises(DataError, match="deep.png"):
        read_image(tmp_path / "deep.png", high_bit_depth="reject")


# ---------------------------------------------------------------------------------------------- colour


def test_gray_is_rounded_bt601_luma_and_matches_opencv():
    assert rgb_to_gray(np.array([[[255, 0, 0]]], dtype=np.uint8))[0, 0] == 76
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (120, 130, 3), dtype=np.uint8)
    exact = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_array_equal(rgb_to_gray(rgb), np.rint(exact))
    opencv = np.rint(cv2.cvtColor(rgb[..., ::-1].astype(np.float32), cv2.COLOR_BGR2GRAY))
    ties = np.abs(exact - np.floor(exact) - 0.5) < 1e-4
    assert (rgb_to_gray(rgb) == opencv)[~ties].all()


def test_ycrcb_matches_opencv_and_inverts_exactly():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    ycrcb = rgb_to_ycrcb(rgb)
    opencv = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb).astype(np.float64)
    assert np.abs(np.rint(ycrcb) - opencv).max() <= 1
    np.testing.assert_allclose(ycrcb_to_rgb(ycrcb), rgb, atol=1e-9)


# ---------------------------------------------------------------------------------------------- resize


@pytest.mark.parametrize("source, target", [((512, 640), (256, 256)), ((37, 53), (100, 20)), ((9, 7), (9, 7)),
                                            ((64, 64), (32, 32)), ((5, 6), (17, 3))])
def test_resize_equals_opencv_inter_linear(source, target):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, source).astype(np.float64)
    ours = resize_bilinear_half_pixel(image, *target)
    opencv = cv2.resize(image, target[::-1], interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(ours, opencv, atol=1e-6)
    opencv_uint8 = cv2.resize(image.astype(np.uint8), target[::-1], interpolation=cv2.INTER_LINEAR)
    assert np.abs(resize_uint8(image.astype(np.uint8), *target).astype(int) - opencv_uint8).max() <= 1


def test_resize_colour_and_identity():
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (30, 40, 3)).astype(np.float64)
    np.testing.assert_allclose(resize_bilinear_half_pixel(rgb, 15, 20),
                               cv2.resize(rgb, (20, 15), interpolation=cv2.INTER_LINEAR), atol=1e-6)
    np.testing.assert_array_equal(resize_bilinear_half_pixel(rgb, 30, 40), rgb)


# ---------------------------------------------------------------------------------------------- pairing


def test_pairs_by_stem_regardless_of_creation_order(tmp_path):
    gray = np.zeros((4, 4), dtype=np.uint8)
    for stem in ("c", "a", "b", "only_vis"):
        save(tmp_path / "vi" / f"{stem}.png", gray)
    for stem, extension in (("b", "jpg"), ("c", "PNG"), ("a", "bmp"), ("only_ir", "tif")):
        save(tmp_path / "ir" / f"{stem}.{extension}", gray)
    (tmp_path / "ir" / "notes.txt").write_text("ignored")
    (tmp_path / "ir" / ".hidden.png").write_bytes(b"ignored")
    pairing = pair_by_stem(tmp_path / "ir", tmp_path / "vi")
    assert [(key, ir.name, vi.name) for key, ir, vi in pairing.pairs] == [
        ("a", "a.bmp", "a.png"), ("b", "b.jpg", "b.png"), ("c", "c.PNG", "c.png")]
    assert [path.name for path in pairing.only_a] == ["only_ir.tif"]
    assert [path.name for path in pairing.only_b] == ["only_vis.png"]
    with pytest.warns(UserWarning, match="only_ir.tif") as caught:
        warn_unpaired(pairing, tmp_path / "ir", tmp_path / "vi")
    assert len(caught) == 1 and "only_vis.png" in str(caught[0].message)


def test_modality_token_rule_pairs_leftovers_only(tmp_path):
    gray = np.zeros((4, 4), dtype=np.uint8)
    for name in ("IR7.png", "ir_12.png", "5.png", "IR5.png", "IR9.png"):
        save(tmp_path / "ir" / name, gray)
    for name in ("VIS7.png", "VI-12.png", "5.png", "VIS5.png", "x9.png"):
        save(tmp_path / "vi" / name, gray)
    plain = pair_by_stem(tmp_path / "ir", tmp_path / "vi")
    assert [key for key, _, _ in plain.pairs] == ["5"]
    tokens = pair_by_stem(tmp_path / "ir", tmp_path / "vi", modality_tokens=True)
    assert [(ir.name, vi.name) for _, ir, vi in tokens.pairs] == [
        ("5.png", "5.png"), ("IR5.png", "VIS5.png"), ("IR7.png", "VIS7.png"), ("ir_12.png", "VI-12.png")]
    assert [path.name for path in tokens.only_a] == ["IR9.png"]
    assert [path.name for path in tokens.only_b] == ["x9.png"]
    save(tmp_path / "ir" / "ir-7.png", gray)
    with pytest.raises(DataError, match="ambiguous"):
        pair_by_stem(tmp_path / "ir", tmp_path / "vi", modality_tokens=True)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        list_images(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="no images"):
        list_images(tmp_path / "empty")
    save(tmp_path / "dup" / "7.png", np.zeros((2, 2), dtype=np.uint8))
    save(tmp_path / "dup" / "7.jpg", np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(DataError, match="duplicate stem") as error:
        list_images(tmp_path / "dup")
    assert "7.jpg" in str(error.value) and "7.png" in str(error.value)
