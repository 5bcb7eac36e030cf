"""LPIPS and FID (common/perceptual.py) and their use by the video evaluator: spec/metrics.md §9 checks 25-26.

The comparisons with the lpips and pytorch-fid packages run only where those packages import; everything else
(self-consistency, strict loading of synthetic weight files, omission without weights) always runs.
"""

from __future__ import annotations

import math
import socket
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common import perceptual
from common.errors import DataError
from common.perceptual import (ALEXNET_TAP_CHANNELS, PerceptualModels, PerceptualWarning, RunningGaussian,
                               WeightsUnavailable, frechet_distance, load_lpips)
from common.video_metrics import VideoEvaluator, VideoMetricConfig

ALEXNET_SHAPES = {"features.0": (64, 3, 11, 11), "features.3": (192, 64, 5, 5), "features.6": (384, 192, 3, 3),
                  "features.8": (256, 384, 3, 3), "features.10": (256, 256, 3, 3)}


def alexnet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random torchvision-AlexNet-shaped state dict (features, plus a classifier entry to be dropped)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in ALEXNET_SHAPES.items():
        fan_in = shape[1] * shape[2] * shape[3]
        state[f"{name}.weight"] = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
        state[f"{name}.bias"] = torch.randn(shape[0], generator=generator) * 0.01
    state["classifier.6.bias"] = torch.zeros(1000)
    return state


def heads_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """Non-negative heads shaped like the lpips package's v0.1 alex.pth."""
    generator = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand((1, channels, 1, 1), generator=generator)
            for k, channels in enumerate(ALEXNET_TAP_CHANNELS)}


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("lpips")
    torch.save(alexnet_state(), folder / "alexnet.pth")
    torch.save(heads_state(), folder / "alex_heads.pth")
    return folder / "alexnet.pth", folder / "alex_heads.pth"


def frames(seed: int, count: int, size: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


# ---------------------------------------------------------------------------------------------- check 25


def test_lpips_is_zero_on_identical_images_symmetric_and_non_negative(weight_files):
    model = load_lpips(*weight_files)
    generator = torch.Generator().manual_seed(3)
    x, y = torch.rand((3, 3, 48, 56), generator=generator), torch.rand((3, 3, 48, 56), generator=generator)
    with torch.no_grad():
        assert torch.equal(model(x, x), torch.zeros(3))
        forward, backward = model(x, y), model(y, x)
    torch.testing.assert_close(forward, backward, rtol=1e-6, atol=0)
    assert (forward > 0).all()
    nearby = (x + 0.02 * torch.rand(x.shape, generator=generator)).clamp(0, 1)
    with torch.no_grad():
        assert (model(x, nearby) < forward).all()


def test_lpips_loads_the_files_strictly(weight_files, tmp_path):
    backbone, heads = weight_files
    model = load_lpips(backbone, heads)
    torch.testing.assert_close(model.features[10].bias, alexnet_state()["features.10.bias"], rtol=0, atol=0)
    torch.testing.assert_close(model.heads[4].weight, heads_state()["lin4.model.1.weight"], rtol=0, atol=0)

    missing = heads_state()
    del missing["lin2.model.1.weight"]
    wrong_shape = {**heads_state(), "lin0.model.1.weight": torch.rand(1, 32, 1, 1)}
    extra = {**heads_state(), "lin5.model.1.weight": torch.rand(1, 8, 1, 1)}
    for name, state, message in (("missing", missing, "missing lin2"), ("shape", wrong_shape, "wrong shape lin0"),
                                 ("extra", extra, "unexpected lin5")):
        path = tmp_path / f"{name}.pth"
        torch.save(state, path)
        with pytest.raises(DataError, match=message) as caught:
            load_lpips(backbone, path)
        assert str(path) in str(caught.value)
    incomplete = alexnet_state()
    del incomplete["features.10.bias"]
    torch.save(incomplete, tmp_path / "incomplete.pth")
    with pytest.raises(DataError, match="missing features.10.bias"):
        load_lpips(tmp_path / "incomplete.pth", heads)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="garbage.pth"):
        load_lpips(tmp_path / "garbage.pth", heads)


def test_packaged_heads_are_found_by_path_without_importing_the_package(weight_files, tmp_path, monkeypatch):
    package = tmp_path / "site" / "lpips"
    (package / "weights" / "v0.1").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('the lpips package must not be imported')\n")
    torch.save(heads_state(seed=7), package / "weights" / "v0.1" / "alex.pth")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "lpips", raising=False)
    assert perceptual.find_packaged_heads() == package / "weights" / "v0.1" / "alex.pth"
    model = load_lpips(weight_files[0])
    torch.testing.assert_close(model.heads[1].weight, heads_state(seed=7)["lin1.model.1.weight"], rtol=0, atol=0)
    assert "lpips" not in sys.modules


def test_installed_package_heads_load_strictly():
    heads = perceptual.find_packaged_heads()
    if heads is None:
        pytest.skip("neither lpips nor torchmetrics is installed")
    perceptual.LPIPS().load_heads(heads)


def test_without_weights_lpips_and_fid_are_omitted_and_nothing_is_downloaded(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is blocked in this test")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    with pytest.warns(PerceptualWarning) as caught:
        evaluator = VideoEvaluator(VideoMetricConfig(flow="zero"), ["psnr", "lpips", "fid"])
    messages = " ".join(str(warning.message) for warning in caught)
    assert "LPIPS omitted" in messages and "FID omitted" in messages
    assert evaluator.columns == ("PSNR",)
    assert set(evaluator.omitted) == {"LPIPS", "FID"}
    evaluator.add_video("v", frames(1, 2), frames(2, 2))
    assert "LPIPS" not in evaluator.csv_text().splitlines()[0]
    assert evaluator.summary()["omitted"]["LPIPS"].startswith("LPIPS omitted: no AlexNet backbone")
    assert attempts == []


def test_lpips_column_is_the_frame_mean(weight_files):
    model = load_lpips(*weight_files)
    pred, gt = frames(3, 3), frames(4, 3)
    evaluator = VideoEvaluator(VideoMetricConfig(), ["lpips"], PerceptualModels(lpips=model))
    row = evaluator.add_video("v", pred, gt)
    with torch.no_grad():
        expected = np.mean([float(model(torch.from_numpy(p).permute(2, 0, 1)[None] / 255.0,
                                        torch.from_numpy(g).permute(2, 0, 1)[None] / 255.0)) for p, g in zip(pred, gt)])
    assert row["LPIPS"] == pytest.approx(expected, rel=1e-6)
    with pytest.warns(UserWarning, match="at least 31 px"):
        small = evaluator.add_video("small", frames(5, 2, size=24), frames(6, 2, size=24))
    assert math.isnan(small["LPIPS"])


def test_lpips_reproduces_values_recorded_with_the_lpips_package(weight_files):
    # lpips 0.1.4, LPIPS(net="alex", pnet_rand=True) with these synthetic weights copied in, normalize=True.
    recorded = torch.tensor([1.0256322622299194, 0.964850902557373])
    generator = torch.Generator().manual_seed(11)
    x, y = torch.rand((2, 3, 48, 64), generator=generator), torch.rand((2, 3, 48, 64), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(load_lpips(*weight_files)(x, y), recorded, rtol=1e-5, atol=0)


def test_lpips_equals_the_lpips_package_with_its_random_backbone():
    lpips = pytest.importorskip("lpips")
    pytest.importorskip("torchvision")
    reference = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    model = perceptual.LPIPS()
    # lpips splits torchvision's features into slices; "slice2.3.weight" is features.3.weight.
    model.features.load_state_dict({key.split(".", 1)[1]: value for key, value in reference.net.state_dict().items()})
    for k, head in enumerate(model.heads):
        head.weight.data.copy_(reference.lins[k].model[1].weight)
    generator = torch.Generator().manual_seed(9)
    x, y = torch.rand((2, 3, 64, 72), generator=generator), torch.rand((2, 3, 64, 72), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(model(x, y), reference(x, y, normalize=True).flatten(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- check 26


def test_frechet_distance_closed_form():
    assert frechet_distance(np.zeros(8), np.eye(8), np.full(8, 0.5), 4.0 * np.eye(8)) == pytest.approx(10.0, abs=1e-6)
    rng = np.random.default_rng(0)
    factor = rng.normal(size=(6, 6))
    sigma = factor @ factor.T + np.eye(6)
    assert frechet_distance(np.ones(6), sigma, np.ones(6), sigma) == pytest.approx(0.0, abs=1e-8)


def test_running_gaussian_equals_numpy_over_batches():
    rng = np.random.default_rng(1)
    batches = [rng.normal(loc=3.0, scale=2.0, size=(size, 7)) for size in (1, 5, 12, 3, 9)]
    statistics = RunningGaussian()
    for batch in batches:
        statistics.update(torch.from_numpy(batch) if len(batch) == 5 else batch)
    everything = np.concatenate(batches)
    assert statistics.count == 30
    np.testing.assert_allclose(statistics.mean, everything.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(statistics.covariance, np.cov(everything, rowvar=False), rtol=1e-10)
    first, second = RunningGaussian(), RunningGaussian()
    first.update(np.concatenate(batches[:2]))
    second.update(np.concatenate(batches[2:]))
    first.merge(second)
    np.testing.assert_allclose(first.covariance, np.cov(everything, rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="6-d features to 7-d"):
        first.update(np.zeros((2, 6)))


class ColourStatistics(nn.Module):
    """A stand-in feature extractor for the FID plumbing: per-channel moments of [N, 3, H, W], in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.double()
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3)), (images ** 3).mean(dim=(2, 3))], dim=1)


def test_fid_is_set_level_over_all_frames():
    extractor = ColourStatistics()
    evaluator = VideoEvaluator(VideoMetricConfig(flow="zero"), ["psnr", "fid"], PerceptualModels(fid=extractor))
    def darker(frame_list):
        return [(0.7 * frame).astype(np.uint8) for frame in frame_list]

    videos = {"a": (frames(10, 6), darker(frames(11, 6))), "b": (frames(12, 5), darker(frames(13, 5)))}
    for name, (pred, gt) in videos.items():
        evaluator.add_video(name, pred, gt)

    def features(frame_list):
        batch = torch.from_numpy(np.stack(frame_list)).permute(0, 3, 1, 2).float() / 255.0
        return extractor(batch).numpy()

    pred_features = features([f for pred, _ in videos.values() for f in pred])
    gt_features = features([f for _, gt in videos.values() for f in gt])
    expected = frechet_distance(pred_features.mean(axis=0), np.cov(pred_features, rowvar=False),
                                gt_features.mean(axis=0), np.cov(gt_features, rowvar=False))
    with pytest.warns(PerceptualWarning, match="11 frames"):
        assert evaluator.fid() == pytest.approx(expected, rel=1e-8)
    lines = evaluator.csv_text().splitlines()
    assert lines[0] == "video,n_frames,PSNR,FID"
    assert lines[1].endswith(",") and lines[2].endswith(",")
    assert float(lines[3].split(",")[-1]) == pytest.approx(expected, rel=1e-8)
    assert evaluator.summary()["FID"] == pytest.approx(expected, rel=1e-8)


def test_fid_without_weights_or_pytorch_fid_is_unavailable(tmp_path):
    with pytest.raises(WeightsUnavailable, match="--fid-weights"):
        perceptual.load_fid_inception(None)
    try:
        import pytorch_fid  # noqa: F401
    except ImportError:
        torch.save({}, tmp_path / "pt_inception.pth")
        with pytest.raises(WeightsUnavailable, match="pytorch-fid"):
            perceptual.load_fid_inception(tmp_path / "pt_inception.pth")


def test_fid_inception_equals_pytorch_fid(tmp_path, monkeypatch):
    inception = pytest.importorskip("pytorch_fid.inception")
    model = perceptual.FidInception()
    generator = torch.Generator().manual_seed(4)
    state = {key: (torch.rand(value.shape, generator=generator) + 0.5 if key.endswith("running_var")
                   else torch.randn(value.shape, generator=generator) * 0.05 if value.is_floating_point() else value)
             for key, value in model.network.state_dict().items()}
    torch.save(state, tmp_path / "pt_inception.pth")
    ours = perceptual.load_fid_inception(tmp_path / "pt_inception.pth")
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
    reference = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    images = torch.rand((2, 3, 64, 80), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(images)[0].flatten(1), rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state.pop("fc.bias")
        torch.save(state, tmp_path / "incomplete.pth")
    with pytest.raises(DataError, match="missing fc.bias"):
        perceptual.load_fid_inception(tmp_path / "incomplete.pth")
