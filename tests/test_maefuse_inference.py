"""MaeFuse inference and evaluation: sizes, channels, batching, resizing, outputs, the demo report (spec §7,
§9 check 11)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from common.ivif.data import FilePair, discover_file_pairs
from maefuse.evaluate import EvaluateArgs, check_lines, demo_quality, evaluate
from maefuse.inference import FuseArgs, Placement, fuse, fuse_grays, fuse_pairs, prepare_pair
from maefuse.weights import save_epoch_weights
from tests.maefuse_helpers import random_image, tiny_model, write_image

S = 128


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three pairs of mixed sizes: a 100x60 (W x H) colour VIS `.jpg`, a gray 70x90 and a colour 140x48 VIS."""
    root = tmp_path_factory.mktemp("inference_data")
    rng = np.random.default_rng(0)
    for stem, (height, width), colour, extension in (("a", (60, 100), True, ".jpg"), ("b", (90, 70), False, ".png"),
                                                     ("c", (48, 140), True, ".png")):
        write_image(root / "vi" / f"{stem}{extension}", random_image(rng, height, width, colour))
        write_image(root / "ir" / f"{stem}.png", random_image(rng, height, width))
    return root


@pytest.fixture(scope="module")
def models():
    return {attention: tiny_model(5, fusion_attention=attention) for attention in ("tokens", "official")}


def test_outputs_keep_source_size_extension_and_channels(data, models, tmp_path):
    """Check 11: the 100x60 colour pair gives a 100x60 colour `.jpg`; the gray VIS gives one channel; `--save_gray`
    adds `gray/{stem}.png`; `fusion.json` records the settings."""
    ckpt = save_epoch_weights(tmp_path / "w", models["tokens"], training_mode="train_decoder_CFM_MFM", epoch=3,
                              preset="demo")[0]
    fuse(FuseArgs(ckpt=ckpt, data_path=data, out_dir=tmp_path / "out", batch_size=2, save_gray=True,
                  device="cpu"), log=lambda line: None)
    colour = cv2.imread(str(tmp_path / "out" / "a.jpg"), cv2.IMREAD_UNCHANGED)
    assert colour.shape == (60, 100, 3)
    gray = cv2.imread(str(tmp_path / "out" / "b.png"), cv2.IMREAD_UNCHANGED)
    assert gray.shape == (90, 70)
    assert cv2.imread(str(tmp_path / "out" / "gray" / "c.png"), cv2.IMREAD_UNCHANGED).shape == (48, 140)
    record = json.loads((tmp_path / "out" / "fusion.json").read_text())
    assert record["img_size"] == S and record["resize_mode"] == "stretch" and record["n_images"] == 3


@pytest.mark.parametrize("attention", ["tokens", "official"])
def test_mixed_size_batch_equals_batch_one(data, models, attention):
    """Check 11: a batch of 3 mixed-size pairs gives the batch-1 results, in both attention modes (inference always
    uses official group size 1, so images never interact)."""
    model = models[attention]
    pairs = discover_file_pairs(data, "paired", modality_tokens=False)
    batched = fuse_pairs(model, pairs, batch_size=3)
    for pair, result in zip(pairs, batched):
        single = fuse_pairs(model, [pair], batch_size=1)[0]
        assert np.array_equal(single.output, result.output) and np.array_equal(single.fused, result.fused)
    assert not np.array_equal(fuse_pairs(model, pairs[:1], fuse_path="cfm")[0].fused, batched[0].fused)


def test_model_input_is_opencv_bilinear(data, models):
    """Check 11: the model input is OpenCV INTER_LINEAR of the VIS Y (8-bit YCrCb) and of the IR, and what reaches the
    encoder is that image, normalised."""
    pair = FilePair("a", data / "ir" / "a.png", data / "vi" / "a.jpg", data)
    prepared = prepare_pair(pair, S)
    vi_bgr = cv2.imread(str(pair.vi))
    y = cv2.cvtColor(vi_bgr, cv2.COLOR_BGR2YCrCb)[..., 0]
    assert np.array_equal(prepared.model_vi, cv2.resize(y, (S, S), interpolation=cv2.INTER_LINEAR))
    ir = cv2.imread(str(pair.ir), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(prepared.model_ir, cv2.resize(ir, (S, S), interpolation=cv2.INTER_LINEAR))
    model = models["tokens"]
    seen = []
    hook = model.model1.patch_embed.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    fuse_grays(model, prepared.model_vi[None], prepared.model_ir[None])
    hook.remove()
    std = np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)
    mean = np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1)
    pixels = (seen[0][0].double().numpy() * std + mean) * 255
    np.testing.assert_allclose(pixels, np.broadcast_to(prepared.model_vi, (3, S, S)), atol=1e-3)


def test_pad_mode_keeps_the_size_and_the_aspect(data, models):
    """`pad`: the 140x48 image is scaled to 128x44 (aspect kept), reflect-padded to 128x128, restored to 140x48."""
    placement = Placement.of(48, 140, S, "pad")
    assert (placement.content_height, placement.content_width, placement.top, placement.left) == (44, 128, 42, 0)
    pair = FilePair("c", data / "ir" / "c.png", data / "vi" / "c.png", data)
    prepared = prepare_pair(pair, S, "pad")
    assert prepared.model_ir.shape == (S, S)
    assert np.array_equal(prepared.model_ir[42:86], cv2.resize(prepared.ir, (128, 44), interpolation=cv2.INTER_LINEAR))
    assert np.array_equal(prepared.model_ir[41], prepared.model_ir[43])  # reflection about the content's first row
    result = fuse_pairs(models["tokens"], [pair], resize_mode="pad")[0]
    assert result.output.shape == (48, 140, 3) and result.fused.shape == (48, 140)


def test_evaluate_writes_metrics_and_the_average_baseline(data, models, tmp_path):
    """`evaluate`: metrics.csv (3 images + mean), summary.json with the average and latent-mean baselines (identical
    output path: e.g. the model-grid average resized back) and `beats_average`."""
    ckpt = save_epoch_weights(tmp_path / "w", models["tokens"], training_mode="train_MFM_fusion_CFM_open", epoch=0,
                              preset="demo")[0]
    fuse(FuseArgs(ckpt=ckpt, data_path=data, out_dir=tmp_path / "out", device="cpu"), log=lambda line: None)
    summary = evaluate(EvaluateArgs(fused_dir=tmp_path / "out", data_path=data, metrics=("Qabf", "SSIM", "VIF"),
                                    baseline="both"), log=lambda line: None)
    lines = (tmp_path / "out" / "metrics.csv").read_text().splitlines()
    assert lines[0] == "name,VIF,Qabf,SSIM" and [line.split(",")[0] for line in lines[1:]] == ["a", "b", "c", "mean"]
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["means"] == summary["means"] and set(saved["baselines"]) == {"average", "latent_mean"}
    assert (tmp_path / "out" / "metrics_latent_mean.csv").is_file()
    assert set(saved["beats_average"]) == {"Qabf", "SSIM", "VIF", "at_least_2_of_3"}
    pairs = discover_file_pairs(data, "paired", modality_tokens=False)
    baseline = fuse_pairs(None, pairs, img_size=S, baselines=("average",))
    assert all(np.array_equal(result.fused, result.baselines["average"]) for result in baseline)
    expected = cv2.resize(np.clip(np.rint((prepare_pair(pairs[1], S).model_vi.astype(float)
                                           + prepare_pair(pairs[1], S).model_ir) / 2), 0, 255).astype(np.uint8),
                          (70, 90), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(baseline[1].baselines["average"], expected)  # gray VIS: no colour round trip


def test_demo_quality_report_on_the_demo_test_split(models, tmp_path_factory):
    """The demo gate runs on the generated test split: every check is reported, fused images at source sizes."""
    from common.ivif.demo import ensure_ivif_demo

    root = ensure_ivif_demo(tmp_path_factory.getbasetemp() / "ivif_demo", 0)
    out = tmp_path_factory.mktemp("demo_quality")
    report = demo_quality(models["tokens"], root / "test", out)
    assert set(report["checks"]) == {"qabf", "texture_std_ratio", "texture_corr", "target_contrast", "fused_images"}
    assert report["checks"]["fused_images"]["count"] == 8 and report["checks"]["fused_images"]["source_sizes"]
    assert isinstance(report["passed"], bool) and len(check_lines(report)) == 5
    assert (out / "metrics.csv").is_file() and (out / "summary.json").is_file() and (out / "fusion_grid.png").is_file()
    assert len(list((out / "fused").glob("*.png"))) == 8
