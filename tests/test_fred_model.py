"""FRED model fidelity (spec/fred.md §2, §9 checks 1-2): key layout, parameter counts, fusion, init, weights."""

from __future__ import annotations

import json

import pytest
import torch

from common.checkpoint import CheckpointError
from torch import nn

from fred.fusion import ChannelAttentionFusion, negative_pair_valid, pair_disc_loss, positive_pair_valid
from fred.model import (ANCHORS_MASK, Focus, backbone_parameters, backbone_prefixes, build_model,
                        build_model_from_meta, model_meta)
from fred.weights import WeightsError, load_pretrained, load_strict, read_state_dict

# (C, d) straight from the spec table (§2.1), not from the implementation.
SPEC_C_D = {"n": (16, 1), "s": (32, 1), "m": (48, 2), "l": (64, 3), "x": (80, 4)}
SPEC_ENTRIES = {"n": 360, "s": 360, "m": 504, "l": 648, "x": 792}
SPEC_PARAMS = {"n": 1_775_638, "s": 7_063_542, "m": 21_056_406, "l": 46_631_350, "x": 87_244_374}
SPEC_BACKBONE_ENTRIES = {"n": 210, "s": 210, "m": 306, "l": 402, "x": 498}
INPUT_SIDE_NECK = {"conv_for_feat3", "conv3_for_upsample1", "conv3_for_upsample2"}


def expected_layout(phi: str, nc: int) -> dict[str, tuple[int, ...]]:
    """bubbliiiing YoloBody's state-dict keys and shapes, enumerated from the spec's prose (§2.1-2.2)."""
    c, d = SPEC_C_D[phi]
    layout: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        layout[f"{name}.conv.weight"] = (cout, cin, k, k)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{name}.bn.{stat}"] = (cout,)
        layout[f"{name}.bn.num_batches_tracked"] = ()

    def c3(name, cin, cout, n):
        half = cout // 2
        conv(f"{name}.cv1", cin, half, 1)
        conv(f"{name}.cv2", cin, half, 1)
        conv(f"{name}.cv3", 2 * half, cout, 1)
        for i in range(n):
            conv(f"{name}.m.{i}.cv1", half, half, 1)
            conv(f"{name}.m.{i}.cv2", half, half, 3)

    conv("backbone.stem.conv", 12, c, 3)
    conv("backbone.dark2.0", c, 2 * c, 3)
    c3("backbone.dark2.1", 2 * c, 2 * c, d)
    conv("backbone.dark3.0", 2 * c, 4 * c, 3)
    c3("backbone.dark3.1", 4 * c, 4 * c, 3 * d)
    conv("backbone.dark4.0", 4 * c, 8 * c, 3)
    c3("backbone.dark4.1", 8 * c, 8 * c, 3 * d)
    conv("backbone.dark5.0", 8 * c, 16 * c, 3)
    conv("backbone.dark5.1.cv1", 16 * c, 8 * c, 1)
    conv("backbone.dark5.1.cv2", 32 * c, 16 * c, 1)
    c3("backbone.dark5.2", 16 * c, 16 * c, d)
    conv("conv_for_feat3", 16 * c, 8 * c, 1)
    c3("conv3_for_upsample1", 16 * c, 8 * c, d)
    conv("conv_for_feat2", 8 * c, 4 * c, 1)
    c3("conv3_for_upsample2", 8 * c, 4 * c, d)
    conv("down_sample1", 4 * c, 4 * c, 3)
    c3("conv3_for_downsample1", 8 * c, 8 * c, d)
    conv("down_sample2", 8 * c, 8 * c, 3)
    c3("conv3_for_downsample2", 16 * c, 16 * c, d)
    for head, width in (("yolo_head_P3", 4 * c), ("yolo_head_P4", 8 * c), ("yolo_head_P5", 16 * c)):
        layout[f"{head}.weight"] = (3 * (5 + nc), width, 1, 1)
        layout[f"{head}.bias"] = (3 * (5 + nc),)
    return layout


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("phi", ["n", "s", "m", "l", "x"])
def test_single_stream_layout_counts_and_strict_round_trip(phi):
    with torch.device("meta"):
        model = build_model("rgb", phi, 1)
        twin = build_model("event", phi, 1)
    assert shapes(model) == expected_layout(phi, 1)
    assert len(model.state_dict()) == SPEC_ENTRIES[phi]
    assert sum(k.startswith("backbone.") for k in model.state_dict()) == SPEC_BACKBONE_ENTRIES[phi]
    assert n_params(model) == SPEC_PARAMS[phi]
    twin.load_state_dict(model.state_dict(), strict=True, assign=True)
    assert shapes(twin) == shapes(model)


def test_single_stream_round_trip_values_and_output_shapes():
    torch.manual_seed(0)
    model, twin = build_model("rgb", "n", 1).eval(), build_model("rgb", "n", 1).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(2, 3, 128, 96)
    outs, twin_outs = model(x), twin(x)
    assert [tuple(o.shape) for o in outs] == [(2, 18, 4, 3), (2, 18, 8, 6), (2, 18, 16, 12)]
    for a, b in zip(outs, twin_outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode,count", [("concat", 11_966_134), ("add", 11_276_214), ("channel_attn", 12_140_070)])
def test_dual_phi_s_parameter_counts_and_keys(mode, count):
    with torch.device("meta"):
        model = build_model("dual", "s", 1, mode, 0.5)
    assert n_params(model) == count
    keys = model.state_dict().keys()
    single = expected_layout("s", 1)
    backbone = {k[len("backbone."):]: v for k, v in single.items() if k.startswith("backbone.")}
    for prefix in ("backbone_rgb", "backbone_event"):
        assert {k[len(prefix) + 1:]: v for k, v in shapes(model).items() if k.startswith(prefix + ".")} == backbone
    neck_heads = {k: v for k, v in single.items() if not k.startswith("backbone.")}
    neck_modules = {n.split(".")[0] for n in neck_heads}
    assert {k: v for k, v in shapes(model).items() if k.split(".")[0] in neck_modules} == neck_heads
    top_level = {k.split(".")[0] for k in keys}
    assert top_level - neck_modules == ({"backbone_rgb", "backbone_event"} |
                                                                   ({"fusion"} if mode != "add" else set()))
    assert not any(k.startswith("pair_disc") for k in keys)


@pytest.mark.parametrize("mode", ["concat", "add", "channel_attn"])
def test_fusion_widths_at_half_ratio_phi_s(mode):
    torch.manual_seed(0)
    model = build_model("dual", "s", 1, mode, 0.5).eval()
    assert [f.out_channels for f in model.fusion] == [128, 256, 512]
    rgb, event = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        fused = [f(r, e) for f, r, e in zip(model.fusion, model.backbone_rgb(rgb), model.backbone_event(event))]
    assert [tuple(t.shape) for t in fused] == [(1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]


@pytest.mark.parametrize("mode", ["concat", "add", "channel_attn"])
def test_ratio_075_changes_only_input_side_neck(mode):
    with torch.device("meta"):
        half = shapes(build_model("dual", "s", 1, mode, 0.5))
        more = shapes(build_model("dual", "s", 1, mode, 0.75))
    non_fusion = lambda d: {k: v for k, v in d.items() if not k.startswith("fusion.")}  # noqa: E731
    a, b = non_fusion(half), non_fusion(more)
    assert a.keys() == b.keys()
    changed = {k.split(".")[0] for k in a if a[k] != b[k]}
    assert changed == INPUT_SIDE_NECK
    # The widened inputs are 4C+w1, 8C+w2, w3 with w = round(2c·.75) = 192/384/768 at phi s.
    assert b["conv_for_feat3.conv.weight"][1] == 768
    assert b["conv3_for_upsample1.cv1.conv.weight"][1] == 256 + 384
    assert b["conv3_for_upsample2.cv2.conv.weight"][1] == 128 + 192
    assert b["conv3_for_upsample2.cv3.conv.weight"] == a["conv3_for_upsample2.cv3.conv.weight"]


def test_channel_attention_gates_in_open_unit_interval():
    torch.manual_seed(0)
    fusion = ChannelAttentionFusion(32, 0.5)
    assert fusion.se.fc1.out_channels == 8 and fusion.se.fc1.in_channels == 64  # h = max(64 // 16, 8)
    gates = fusion.gates(torch.randn(4, 32, 5, 5) * 3, torch.randn(4, 32, 5, 5) * 3)
    assert gates.shape == (4, 64, 1, 1)
    assert bool((gates > 0).all()) and bool((gates < 1).all())
    assert float(gates.detach().std()) > 0


def test_add_fusion_is_parameter_free_at_half_ratio():
    model = build_model("dual", "n", 1, "add", 0.5)
    assert sum(p.numel() for p in model.fusion.parameters()) == 0
    assert not any(k.startswith("fusion.") for k in model.state_dict())
    assert sum(p.numel() for p in build_model("dual", "n", 1, "add", 0.75).fusion.parameters()) > 0


def test_batchnorm_eps_momentum_and_focus_slice_order():
    model = build_model("rgb", "n", 1)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.03 for m in bns)
    focus = Focus(3, 8, k=3)
    focus.conv = nn.Identity()
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    out = focus(x)
    for slot, (row0, col0) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
        for ch in range(3):
            for r in range(2):
                for c in range(3):
                    assert out[1, slot * 3 + ch, r, c] == x[1, ch, row0 + 2 * r, col0 + 2 * c]


def test_weights_init_statistics():
    torch.manual_seed(0)
    model = build_model("rgb", "s", 1)
    conv_w = torch.cat([m.weight.detach().flatten() for m in model.modules() if isinstance(m, nn.Conv2d)])
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    gamma = torch.cat([m.weight.detach() for m in bns])
    assert abs(float(conv_w.mean())) < 1e-3 and abs(float(conv_w.std()) - 0.02) < 5e-4
    assert abs(float(gamma.mean()) - 1.0) < 2e-3 and abs(float(gamma.std()) - 0.02) < 1e-3
    assert all(bool((m.bias == 0).all()) for m in bns)


def test_missing_stream_zeroing_is_per_sample():
    torch.manual_seed(0)
    model = build_model("dual", "n", 1, "concat", 0.5).eval()
    seen = []
    for fusion in model.fusion:
        fusion.register_forward_pre_hook(lambda module, args: seen.append(args))
    rgb, event = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        rgb_feats, event_feats = model.backbone_rgb(rgb), model.backbone_event(event)
        model(rgb, event, drop_rgb=torch.tensor([True, False]))
        model(rgb, event, drop_event=torch.tensor([False, True]))
    assert len(seen) == 6
    for level in range(3):
        fused_rgb, fused_event = seen[level]
        assert bool((fused_rgb[0] == 0).all()) and torch.equal(fused_rgb[1], rgb_feats[level][1])
        assert torch.equal(fused_event, event_feats[level])
        fused_rgb, fused_event = seen[3 + level]
        assert torch.equal(fused_rgb, rgb_feats[level])
        assert torch.equal(fused_event[0], event_feats[level][0]) and bool((fused_event[1] == 0).all())
        assert bool((rgb_feats[level][0] != 0).any())


def test_pair_discriminator_keys_negatives_and_gradients():
    torch.manual_seed(0)
    model = build_model("dual", "n", 1, "concat", 0.5, discriminator=True)
    sd = model.state_dict()
    assert tuple(sd["pair_disc.fc1.weight"].shape) == (128, 256)  # c'3 = 256 at phi n, r .5
    assert tuple(sd["pair_disc.fc2.weight"].shape) == (1, 128)
    rgb, event = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    # Train-mode BN keeps the activations informative; its batch statistics are invariant to the roll.
    with torch.no_grad():
        _, (pos, neg) = model(rgb, event, with_pair_logits=True)
        _, (rolled_pos, _) = model(rgb, torch.roll(event, 1, 0), with_pair_logits=True)
    assert pos.shape == (3,) and (pos - neg).abs().max() > 1e-2
    assert torch.allclose(neg, rolled_pos, atol=1e-5)
    outputs, (pos, neg) = model(rgb, event, with_pair_logits=True)
    loss, accuracy = pair_disc_loss(pos, neg)
    loss.backward()
    assert 0.0 <= float(accuracy) <= 1.0 and float(loss.detach()) > 0
    assert model.backbone_event.stem.conv.conv.weight.grad.abs().sum() > 0
    assert model.fusion[2].compress.conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="discriminator"):
        build_model("dual", "n", 1)(rgb, event, with_pair_logits=True)


def test_pair_masks_and_small_batch_loss():
    valid = negative_pair_valid(["a", "a", "b", "b"], [0.0, 0.5, 3.0, 9.0])
    # partners: 0<-3 (a vs b), 1<-0 (same seq, .5 s), 2<-1 (a vs b), 3<-2 (same seq, 6 s apart)
    assert valid.tolist() == [True, False, True, True]
    drop_event = torch.tensor([False, False, True, False])
    masked = negative_pair_valid(["a", "b", "c", "d"], [0, 0, 0, 0], drop_event=drop_event)
    assert masked.tolist() == [True, True, True, False]  # sample 3's partner is event 2, which was dropped
    assert positive_pair_valid(2, drop_rgb=torch.tensor([True, False])).tolist() == [False, True]
    logits = torch.tensor([2.0], requires_grad=True)
    loss, accuracy = pair_disc_loss(logits, logits * -1)
    assert float(loss.detach()) == 0.0 and torch.isnan(accuracy)
    loss.backward()
    assert logits.grad is not None


def test_build_model_warnings_prefixes_and_meta():
    with pytest.warns(UserWarning, match="ignoring fusion_mode"):
        single = build_model("event", "n", 1, fusion_mode="add")
    assert backbone_prefixes(single) == ["backbone"]
    dual = build_model("dual", "n", 1)
    assert backbone_prefixes(dual) == ["backbone_rgb", "backbone_event"]
    frozen = {id(p) for p in backbone_parameters(dual)}
    expected = {id(p) for n, p in dual.named_parameters() if n.startswith(("backbone_rgb.", "backbone_event."))}
    assert frozen == expected
    meta = model_meta("dual", "n", 1, ["drone"], (128, 128), "channel_attn", 0.75)
    meta = json.loads(json.dumps(meta))
    rebuilt = build_model_from_meta(meta)
    assert rebuilt.fusion_mode == "channel_attn" and rebuilt.compression_ratio == 0.75
    assert meta["mask"] == [list(m) for m in ANCHORS_MASK] and meta["input_shape"] == [128, 128]
    assert meta["nc"] == 1 and meta["anchors"][3] == [30, 61] and meta["class_names"] == ["drone"]
    with pytest.raises(ValueError):
        build_model("dual", "n", 1, "concat", 1.5)
    with pytest.raises(ValueError):
        build_model("dual", "q", 1)


# ---- pretrained and strict loading (§2.4, §9 check 1) ----

def _coco_yolov5_s(tmp_path):
    torch.manual_seed(1)
    coco = build_model("rgb", "s", 80)
    path = tmp_path / "yolov5_s.pth"
    torch.save(coco.state_dict(), path)
    return coco.state_dict(), path


def test_coco_yolov5_s_into_dual_model(tmp_path):
    coco_state, path = _coco_yolov5_s(tmp_path)
    model = build_model("dual", "s", 1, "concat", 0.5)
    report = load_pretrained(model, path, report_path=tmp_path / "run" / "load_report.json")
    loaded = set(report["loaded"])
    assert sum(k.startswith("backbone_rgb.") for k in loaded) == 210
    assert sum(k.startswith("backbone_event.") for k in loaded) == 210
    neck = [k for k in coco_state if not k.startswith(("backbone.", "yolo_head"))]
    assert len(neck) == 144 and set(neck) <= loaded
    assert len(loaded) == 210 * 2 + 144
    assert sorted(s["key"] for s in report["shape_skipped"]) == sorted(
        f"yolo_head_P{i}.{t}" for i in (3, 4, 5) for t in ("weight", "bias"))
    assert report["shape_skipped"][0]["file_shape"][0] == 255
    fusion_keys = sorted(k for k in model.state_dict() if k.startswith("fusion."))
    assert fusion_keys and report["missing"] == fusion_keys
    state = model.state_dict()
    assert torch.equal(state["backbone_event.dark3.1.m.0.cv2.conv.weight"],
                       coco_state["backbone.dark3.1.m.0.cv2.conv.weight"])
    assert torch.equal(state["conv3_for_downsample2.cv3.bn.running_var"],
                       coco_state["conv3_for_downsample2.cv3.bn.running_var"])
    assert json.loads((tmp_path / "run" / "load_report.json").read_text())["loaded"] == report["loaded"]

    random_event = build_model("dual", "s", 1, "add", 0.5)
    report = load_pretrained(random_event, path, event_backbone_init="random")
    assert not any(k.startswith("backbone_event.") for k in report["loaded"])
    assert sum(k.startswith("backbone_event.") for k in report["missing"]) == 210


def test_cspdarknet_backbone_file_and_module_prefix(tmp_path):
    torch.manual_seed(2)
    source = build_model("rgb", "s", 1)
    backbone_state = {k: v for k, v in source.backbone.state_dict().items()}
    assert next(iter(backbone_state)).startswith("stem.")
    path = tmp_path / "cspdarknet_s_backbone.pth"
    torch.save(backbone_state, path)
    report = load_pretrained(build_model("rgb", "s", 1), path)
    assert len(report["loaded"]) == 210 and all(k.startswith("backbone.") for k in report["loaded"])
    dual_report = load_pretrained(build_model("dual", "s", 1), path)
    assert len(dual_report["loaded"]) == 420
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, wrapped)
    assert len(load_pretrained(build_model("rgb", "s", 1), wrapped)["loaded"]) == 360


def test_non_matching_and_bad_files_raise(tmp_path):
    other_phi = tmp_path / "yolov5_n.pth"
    torch.save(build_model("rgb", "n", 80).state_dict(), other_phi)
    with pytest.raises(WeightsError, match="yolov5_n.pth"):
        load_pretrained(build_model("rgb", "s", 1), other_phi)
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(WeightsError, match="none of its 1 tensors"):
        load_pretrained(build_model("rgb", "n", 1), unrelated)
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with pytest.raises(WeightsError, match="no tensors"):
        load_pretrained(build_model("rgb", "n", 1), empty)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pth is truncated or corrupt"):  # the kit's one reader
        read_state_dict(corrupt)
    with pytest.raises(CheckpointError, match="absent.pth does not exist"):
        read_state_dict(tmp_path / "absent.pth")


def test_load_strict_formats_and_architecture_refusal(tmp_path):
    torch.manual_seed(3)
    trained = build_model("dual", "n", 1, "concat", 0.5, discriminator=True)
    flat, full = tmp_path / "flat.pth", tmp_path / "last_epoch_weights.pth"
    torch.save(trained.state_dict(), flat)
    torch.save({"format_version": 1, "epoch": 3, "model": trained.state_dict(),
                "ema": {"module." + k: v for k, v in trained.state_dict().items()}}, full)
    for source in (flat, full):
        target = build_model("dual", "n", 1, "concat", 0.5, discriminator=True)
        load_strict(target, source)
        assert torch.equal(target.state_dict()["fusion.1.compress.conv.weight"],
                           trained.state_dict()["fusion.1.compress.conv.weight"])
    exported = build_model("dual", "n", 1, "concat", 0.5)  # predict: no discriminator, pair_disc.* ignored
    load_strict(exported, flat)
    with pytest.raises(WeightsError, match="another architecture"):
        load_strict(build_model("dual", "n", 1, "channel_attn", 0.5), flat)
    with pytest.raises(WeightsError, match="flat.pth"):
        load_strict(build_model("rgb", "n", 1), flat)
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_strict(build_model("dual", "n", 2, "concat", 0.5), trained.state_dict(), name="ema")
