"""MaeFuse weight files: loader rules 1-6, kinds, strict errors with hints, writers (spec §6, §9 check 9)."""

from __future__ import annotations

import argparse

import pytest
import torch

from common.checkpoint import CheckpointError
from common.errors import UserError
from maefuse.weights import (CheckpointMismatchError, WeightsFileError, detect_kind, epoch_files, export_state_dict,
                             exported_epochs, is_save_epoch, load_initial_weights, load_weights, prune_exported,
                             save_epoch_weights)
from tests.maefuse_helpers import tiny_model


class TrainingArgs:
    """A class the weights_only unpickler does not know (stands for any pickled object in a foreign file)."""


@pytest.fixture(scope="module")
def source():
    """A tiny network whose every tensor differs from a fresh `tiny_model(0)`."""
    return tiny_model(7)


def equal_part(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[key], sb[key]) for key in sa)


def test_each_kind_round_trips_exactly(source, tmp_path):
    """Writers: `checkpoint-{e}` (resume), `checkpoint{e}` (all) and `fusion{e}` (fusion) load back exactly, with
    `weights_only=True`, float32, plain `meta`."""
    written = save_epoch_weights(tmp_path, source, training_mode="train_decoder_only", epoch=4, preset="demo")
    written += save_epoch_weights(tmp_path, source, training_mode="train_decoder_CFM_MFM", epoch=4, preset="demo")
    assert [path.name for path in written] == ["checkpoint-4.pth", "checkpoint4.pth", "fusion4.pth"]
    for path, kind, part in zip(written, ("resume", "all_weight", "fusion_weight"), ("model1", None, "model2")):
        content = torch.load(path, weights_only=True)
        assert content["meta"]["kind"] == kind and content["meta"]["epoch"] == 4
        assert all(value.dtype == torch.float32 for value in content["model"].values())
        target = tiny_model(0)
        report = load_weights(target, path, kind)
        assert report.kind == kind and "missing 0, unexpected 0" in report.describe()
        if part is None:
            assert equal_part(target, source)
        else:
            assert equal_part(getattr(target, part), getattr(source, part))
            other = "model2" if part == "model1" else "model1"
            assert equal_part(getattr(target, other), getattr(tiny_model(0), other))
    assert len(torch.load(written[1], weights_only=True)["model"]) == 99  # 2 + 24 + 2 + 55 tiny resume + 15 fusion


def test_prefixes_and_bare_state_dicts_load(source, tmp_path):
    state = export_state_dict(source, "all_weight")
    torch.save({f"module.module.{key}": value for key, value in state.items()}, tmp_path / "ddp.pth")
    torch.save({"state_dict": {f"_orig_mod.module.{key}": v for key, v in state.items()}}, tmp_path / "compiled.pth")
    for name in ("ddp.pth", "compiled.pth"):
        target = tiny_model(0)
        load_weights(target, tmp_path / name, "all_weight")
        assert equal_part(target, source)


def test_official_mae_file_loads_the_encoder(source, tmp_path):
    """A synthetic tiny official MAE file (cls_token, a (1,257,128) pos_embed, mask_token, an 8-block decoder and
    `args`): the encoder loads strictly, the extra keys are listed as dropped, the decoder is reported not loaded."""
    encoder = {key: value for key, value in source.model1.state_dict().items()
               if key != "pos_embed" and not key.startswith("decoder_")}
    assert len(encoder) == 2 + 2 * 12 + 2
    official = {"cls_token": torch.randn(1, 1, 128), "pos_embed": torch.randn(1, 257, 128),
                "mask_token": torch.randn(1, 1, 128), **encoder,
                **{f"decoder_blocks.{index}.norm1.weight": torch.ones(128) for index in range(8)}}
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": official, "args": argparse.Namespace(model="mae_vit_tiny"), "epoch": 799}, path)
    target = tiny_model(0)
    loaded = load_initial_weights(target, resume=path)
    report = loaded.reports[0]
    assert report.kind == "mae_official" and report.tensors == len(encoder)
    assert "cls_token" in report.dropped and "pos_embed" in report.dropped and "mask_token" in report.dropped
    assert "decoder not loaded" in report.describe()
    assert loaded.encoder_loaded and not loaded.decoder_loaded and not loaded.fusion_loaded
    assert all(torch.equal(target.model1.state_dict()[key], value) for key, value in encoder.items())
    assert torch.equal(target.model1.decoder_embed.weight, tiny_model(0).model1.decoder_embed.weight)
    assert torch.equal(target.model1.pos_embed, tiny_model(0).model1.pos_embed)


def test_missing_unexpected_and_shape_errors_are_collected(source, tmp_path):
    state = export_state_dict(source, "resume")
    broken = dict(state)
    del broken["blocks.1.attn.proj.bias"]
    broken["blocks.1.attn.extra"] = torch.zeros(3)
    broken["decoder_pred.weight"] = torch.zeros(10, 128)
    torch.save({"model": broken}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointMismatchError) as caught:
        load_weights(tiny_model(0), tmp_path / "broken.pth", "resume")
    error = caught.value
    assert error.missing == ["blocks.1.attn.proj.bias"] and error.unexpected == ["blocks.1.attn.extra"]
    assert [key for key, _, _ in error.mismatched] == ["decoder_pred.weight"]
    message = str(error)
    assert "missing: blocks.1.attn.proj.bias" in message and "unexpected: blocks.1.attn.extra" in message
    assert "decoder_pred.weight file [10, 128] vs model [192, 128]" in message
    assert isinstance(error, CheckpointError) and isinstance(error, UserError)


def test_old_fusion_layer_gets_the_pre_2025_hint(source, tmp_path):
    state = {key: value for key, value in export_state_dict(source, "fusion_weight").items()
             if not key.startswith(("fc1.", "fc2.", "ln."))}
    torch.save(state, tmp_path / "old_fusion.pth")
    with pytest.raises(CheckpointMismatchError, match="pre-Feb-2025 fusion layer without FFN/LN"):
        load_weights(tiny_model(0), tmp_path / "old_fusion.pth", "fusion_weight")


def test_full_file_subsets_and_refused_kinds(source, tmp_path):
    """`--resume` takes `model1.*` of a full file, `--fusion_weight` its `model2.*`; a fusion file given to
    `--resume` or `--all_weight` is refused naming the detected kind."""
    full, fusion = save_epoch_weights(tmp_path, source, training_mode="train_decoder_MFM", epoch=0, preset="demo")
    target = tiny_model(0)
    report = load_weights(target, full, "resume")
    assert report.kind == "resume" and report.dropped == ["model2.* (15 keys)"]
    assert equal_part(target.model1, source.model1) and equal_part(target.model2, tiny_model(0).model2)
    report = load_weights(target, full, "fusion_weight")
    assert report.kind == "fusion_weight" and equal_part(target, source)
    for flag in ("resume", "all_weight"):
        with pytest.raises(WeightsFileError, match="holds fusion_weight weights"):
            load_weights(tiny_model(0), fusion, flag)
    assert detect_kind({"head.weight": torch.zeros(1)}) == "unknown"


def test_pickled_objects_need_unsafe_load_and_safetensors_load(source, tmp_path):
    from safetensors.torch import save_file

    state = export_state_dict(source, "all_weight")
    torch.save({"model": state, "extra": TrainingArgs()}, tmp_path / "pickled.pth")
    with pytest.raises(WeightsFileError, match="--unsafe_load"):
        load_weights(tiny_model(0), tmp_path / "pickled.pth", "all_weight")
    with pytest.warns(UserWarning, match="unsafe_load"):
        load_weights(tiny_model(0), tmp_path / "pickled.pth", "all_weight", unsafe_load=True)
    save_file(state, tmp_path / "weights.safetensors")
    target = tiny_model(0)
    load_weights(target, tmp_path / "weights.safetensors", "all_weight")
    assert equal_part(target, source)
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "pickled.pth").read_bytes()[:300])
    with pytest.raises(WeightsFileError, match="truncated or corrupt"):
        load_weights(tiny_model(0), tmp_path / "truncated.pth", "all_weight")
    with pytest.raises(WeightsFileError, match="not found"):
        load_weights(tiny_model(0), tmp_path / "absent.pth", "resume")


def test_wrong_table_in_a_file_is_regenerated(source, tmp_path):
    state = export_state_dict(source, "all_weight")
    state["model2.pos_embed"] = torch.zeros_like(state["model2.pos_embed"])
    torch.save({"model": state}, tmp_path / "zero_table.pth")
    target = tiny_model(0)
    with pytest.warns(UserWarning, match="model2.pos_embed"):
        report = load_weights(target, tmp_path / "zero_table.pth", "all_weight")
    assert report.regenerated == ["model2.pos_embed"]
    assert torch.equal(target.model2.pos_embed, target.model1.pos_embed)


def test_save_schedule_names_and_pruning(source, tmp_path):
    assert [e for e in range(12) if is_save_epoch(e, 12, 5)] == [0, 5, 10, 11]
    assert epoch_files("train_CFM_mean", 3) == [("checkpoint3.pth", "all_weight"), ("fusion3.pth", "fusion_weight")]
    for epoch in (0, 5, 10):
        save_epoch_weights(tmp_path, source, training_mode="train_CFM_mean", epoch=epoch, preset="demo")
    save_epoch_weights(tmp_path, source, training_mode="train_decoder_only", epoch=10, preset="demo")
    deleted = prune_exported(tmp_path, keep_last=2)
    assert sorted(path.name for path in deleted) == ["checkpoint0.pth", "fusion0.pth"]
    assert exported_epochs(tmp_path, "all_weight") == [5, 10] and exported_epochs(tmp_path, "resume") == [10]
