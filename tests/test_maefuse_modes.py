"""The nine training modes: trainable sets, optimizer groups, encoder calls, mean loss, guards (spec §9 checks 4-6)."""

from __future__ import annotations

import warnings

import pytest
import torch

from common.errors import ConfigError
from common.freeze import apply_policy
from maefuse.modes import (MODES, build_optimizer, check_initial_weights, check_official_groups, get_mode,
                           mode_loss, single_image_groups)
from tests.maefuse_helpers import tiny_model

BATCH = 2
# Trainable module prefixes of each mode, written out from the §4.1 table.
DEC = ("model1.decoder_embed", "model1.decoder_blocks", "model1.decoder_norm", "model1.decoder_pred")
CFM = ("model2.cross_model",)
MFM = ("model2.merge_model", "model2.fc1", "model2.fc2", "model2.ln")
EXPECTED_TRAINABLE = {
    "train_CFM_mean": CFM, "train_CFM_fusion": CFM,
    "train_MFM_mean_CFM_lock": MFM, "train_MFM_fusion_CFM_lock": MFM,
    "train_MFM_mean_CFM_open": CFM + MFM, "train_MFM_fusion_CFM_open": CFM + MFM,
    "train_decoder_only": DEC, "train_decoder_MFM": DEC + MFM, "train_decoder_CFM_MFM": DEC + CFM + MFM,
}
FROZEN_ALWAYS = ("model1.patch_embed", "model1.blocks", "model1.norm", "model1.pos_embed",
                 "model1.decoder_pos_embed", "model2.pos_embed")


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 3, 128, 128, generator=generator), torch.randn(BATCH, 3, 128, 128, generator=generator)


@pytest.fixture(scope="module")
def initial_state() -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in tiny_model(0).state_dict().items()}


@pytest.mark.parametrize("name", list(MODES))
def test_one_step_changes_exactly_the_trainable_set(name, inputs, initial_state):
    """Check 4 (and 5): one AdamW step at lr 1e-2 changes exactly the §4.1 modules; the optimizer holds exactly
    them; the no-decay group is their 1-D and `.bias` tensors; the encoder sees 2B images once."""
    spec = get_mode(name)
    model = tiny_model(0)
    model.load_state_dict(initial_state)
    trainable = apply_policy(model, spec.policy())
    expected = sorted(key for key, _ in model.named_parameters() if under(key, EXPECTED_TRAINABLE[name]))
    assert trainable == expected
    optimizer = build_optimizer(model, lr=1e-2)
    names = {id(parameter): key for key, parameter in model.named_parameters()}
    held = sorted(names[id(p)] for group in optimizer.param_groups for p in group["params"])
    assert held == expected
    no_decay = next(group for group in optimizer.param_groups if group["weight_decay"] == 0.0)
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(
        key for key in expected if model.get_parameter(key).ndim == 1 or key.endswith(".bias"))
    assert any(key.endswith("in_proj_bias") for key in map(names.get, map(id, no_decay["params"]))) == (
        "cfm" in spec.trainable or "mfm" in spec.trainable)

    encoded = []
    hook = model.model1.patch_embed.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    x_vi, x_ir = inputs
    terms = mode_loss(model, spec, x_vi, x_ir)
    hook.remove()
    assert encoded == [2 * BATCH]
    assert set(terms) == set(spec.loss_names) and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    if name == "train_CFM_fusion":  # the gradient reaches CFM through the frozen decoder
        assert model.model2.cross_model.in_proj_weight.grad.abs().max() > 0
        assert all(p.grad is None for key, p in model.named_parameters() if under(key, DEC))
    optimizer.step()

    changed = sorted(key for key, value in model.state_dict().items() if not torch.equal(value, initial_state[key]))
    assert changed == expected
    for key, value in model.state_dict().items():
        if under(key, FROZEN_ALWAYS):
            assert torch.equal(value, initial_state[key]), key


@pytest.mark.parametrize("name", ["train_CFM_mean", "train_MFM_mean_CFM_open"])
def test_mean_loss_uses_this_steps_encoder_outputs(name, inputs):
    """Check 6: the reported loss equals MSE(y, (z_v + z_i)/2) with z from the same step (1e-6); the fusion layer
    leaves z unchanged (the position table is added out of place)."""
    spec = get_mode(name)
    model = tiny_model(1)
    captured = {}
    model.model1.norm.register_forward_hook(lambda module, args, out: captured.update(z=out.clone()))
    model.model2.register_forward_hook(
        lambda module, args, out: captured.update(y=out.cfm if out.fused is None else out.fused))
    x_vi, x_ir = inputs
    terms = mode_loss(model, spec, x_vi, x_ir)
    z_vi, z_ir = captured["z"].double().chunk(2)
    expected = ((captured["y"].double() - (z_vi + z_ir) / 2) ** 2).mean()
    assert abs(terms["loss"].item() - expected.item()) < 1e-6
    output = model(x_vi, x_ir, route=spec.route)
    assert torch.equal(torch.cat([output.z_vi, output.z_ir]), captured["z"])


def test_decoder_guard():
    """Decoder-path modes need a loaded decoder (the error names train_decoder_only) unless explicitly allowed;
    mean modes only warn; decoder pretraining needs none."""
    with pytest.raises(ConfigError, match="train_decoder_only"):
        check_initial_weights(get_mode("train_decoder_CFM_MFM"), encoder_loaded=True, decoder_loaded=False)
    with pytest.raises(ConfigError, match="allow_random_decoder"):
        check_initial_weights(get_mode("train_CFM_fusion"), encoder_loaded=True, decoder_loaded=False)
    with pytest.warns(UserWarning, match="random decoder"):
        check_initial_weights(get_mode("train_CFM_fusion"), encoder_loaded=True, decoder_loaded=False,
                              allow_random_decoder=True)
    with pytest.warns(UserWarning, match="without a loaded decoder"):
        check_initial_weights(get_mode("train_MFM_mean_CFM_open"), encoder_loaded=True, decoder_loaded=False)
    with pytest.warns(UserWarning, match="randomly initialised"):
        check_initial_weights(get_mode("train_decoder_only"), encoder_loaded=False, decoder_loaded=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_initial_weights(get_mode("train_decoder_only"), encoder_loaded=True, decoder_loaded=False)
        check_initial_weights(get_mode("train_decoder_MFM"), encoder_loaded=True, decoder_loaded=True)
    with pytest.raises(ConfigError, match="unknown training mode"):
        get_mode("train_everything")


def test_official_single_image_groups_warn():
    assert single_image_groups([8], 1) and single_image_groups([5], 4) and single_image_groups([1], 4)
    assert not single_image_groups([8, 6], 4) and not single_image_groups([3], 0)
    with pytest.warns(UserWarning, match="groups of one image"):
        check_official_groups(tiny_model(fusion_attention="official", official_group_size=4), [4, 1])
