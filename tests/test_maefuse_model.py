"""MaeFuse network: presets and key layouts, position tables, patch layout, fusion attention (spec §9 checks 1-3, 8)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import ConfigError
from maefuse.model import (FusionLayer, MaeFuse, build_model, parameter_counts, patchify, resolve_size,
                           sincos_position_table, unpatchify)
from tests.maefuse_helpers import tiny_model

# ---------------------------------------------------------------------------------------------------------------
# Expected layouts, written out from the spec's §6 table for `large` (D 1024, d 512, 24 + 4 blocks, N 1600, p 16).


def block_layout(prefix: str, width: int) -> dict[str, tuple]:
    layout = {}
    for name, shape in (("norm1.weight", (width,)), ("norm1.bias", (width,)),
                        ("attn.qkv.weight", (3 * width, width)), ("attn.qkv.bias", (3 * width,)),
                        ("attn.proj.weight", (width, width)), ("attn.proj.bias", (width,)),
                        ("norm2.weight", (width,)), ("norm2.bias", (width,)),
                        ("mlp.fc1.weight", (4 * width, width)), ("mlp.fc1.bias", (4 * width,)),
                        ("mlp.fc2.weight", (width, 4 * width)), ("mlp.fc2.bias", (width,))):
        layout[f"{prefix}.{name}"] = shape
    return layout


def resume_layout() -> dict[str, tuple]:
    layout = {"pos_embed": (1, 1600, 1024), "patch_embed.proj.weight": (1024, 3, 16, 16),
              "patch_embed.proj.bias": (1024,)}
    for index in range(24):
        layout.update(block_layout(f"blocks.{index}", 1024))
    layout.update({"norm.weight": (1024,), "norm.bias": (1024,), "decoder_embed.weight": (512, 1024),
                   "decoder_embed.bias": (512,), "decoder_pos_embed": (1, 1600, 512)})
    for index in range(4):
        layout.update(block_layout(f"decoder_blocks.{index}", 512))
    layout.update({"decoder_norm.weight": (512,), "decoder_norm.bias": (512,), "decoder_pred.weight": (768, 512),
                   "decoder_pred.bias": (768,)})
    return layout


def fusion_layout() -> dict[str, tuple]:
    layout = {"pos_embed": (1, 1600, 1024)}
    for attention in ("cross_model", "merge_model"):
        layout.update({f"{attention}.in_proj_weight": (3072, 1024), f"{attention}.in_proj_bias": (3072,),
                       f"{attention}.out_proj.weight": (1024, 1024), f"{attention}.out_proj.bias": (1024,)})
    layout.update({"fc1.weight": (4096, 1024), "fc1.bias": (4096,), "fc2.weight": (1024, 4096), "fc2.bias": (1024,),
                   "ln.weight": (1024,), "ln.bias": (1024,)})
    return layout


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in state.items()}


SPEC_COUNTS = {
    "large": {"encoder": 303_098_880, "decoder": 13_529_344, "fusion": 16_792_576, "total": 333_420_800,
              "table_encoder": 1_638_400, "table_decoder": 819_200, "table_fusion": 1_638_400},
    "small": {"encoder": 21_589_632, "decoder": 3_455_488, "fusion": 2_365_056, "total": 27_410_176,
              "table_encoder": 75_264, "table_decoder": 50_176, "table_fusion": 75_264},
    "tiny": {"encoder": 421_504, "decoder": 834_624, "fusion": 264_064, "total": 1_520_192,
             "table_encoder": 32_768, "table_decoder": 32_768, "table_fusion": 32_768},
}


@pytest.fixture(scope="module")
def large_meta() -> MaeFuse:
    return build_model("large", device="meta")


def test_large_key_layouts_match_the_released_checkpoint(large_meta):
    """Check 1: `resume` 348, `fusion_weight` 15, `all_weight` 363 keys, key for key and shape for shape."""
    resume, fusion = resume_layout(), fusion_layout()
    assert (len(resume), len(fusion)) == (348, 15)
    assert shapes(large_meta.model1.state_dict()) == resume
    assert shapes(large_meta.model2.state_dict()) == fusion
    full = {f"model1.{key}": shape for key, shape in resume.items()}
    full.update({f"model2.{key}": shape for key, shape in fusion.items()})
    assert len(full) == 363
    assert shapes(large_meta.state_dict()) == full


@pytest.mark.parametrize("name", ["large", "small", "tiny"])
def test_preset_parameter_counts(name, large_meta):
    """Check 1: learnable counts per part and the fixed tables, as tabulated in §2.1 (12 D^2 + 13 D per block)."""
    model = large_meta if name == "large" else build_model(name, device="meta")
    assert parameter_counts(model) == SPEC_COUNTS[name]
    size = resolve_size(name)
    width = size.embed_dim
    assert SPEC_COUNTS[name]["fusion"] == 16 * width ** 2 + 15 * width


def test_sizes_can_be_changed_and_load_strictly():
    """Every dimension is a field; a consistent custom size builds and round-trips strictly, an inconsistent one is
    refused with the offending fields named."""
    size = resolve_size("tiny", img_size=64, embed_dim=96, num_heads=3, fusion_num_heads=6, decoder_embed_dim=64,
                        decoder_depth=2, decoder_num_heads=2)
    assert size.name == "custom" and size.num_patches == 64
    torch.manual_seed(1)
    model = MaeFuse(size)
    other = MaeFuse(size)
    other.load_state_dict(model.state_dict(), strict=True)
    image = torch.randn(2, 3, 64, 64)
    assert model(image, image).image.shape == (2, 3, 64, 64)
    assert resolve_size("tiny") is resolve_size("tiny", img_size=None)
    with pytest.raises(ConfigError, match="fusion_num_heads"):
        resolve_size("tiny", fusion_num_heads=3)
    with pytest.raises(ConfigError, match="patch_size"):
        resolve_size("tiny", img_size=100)
    with pytest.raises(ConfigError, match="unknown model size"):
        resolve_size("huge")


def test_position_tables_values_and_frozen():
    """Check 2: tiny (G 16, D 128) token 17 and token 2; no table requires grad; all three tables equal in value."""
    model = tiny_model()
    table = model.model1.pos_embed[0]
    torch.testing.assert_close(table[17, [0, 32, 64, 96]], torch.tensor([0.841471, 0.540302, 0.841471, 0.540302]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(table[2, [0, 32, 64, 96]], torch.tensor([0.909297, -0.416147, 0.0, 1.0]),
                               atol=1e-6, rtol=0)
    assert torch.equal(model.model2.pos_embed, model.model1.pos_embed)
    assert torch.equal(model.model1.decoder_pos_embed[0], sincos_position_table(128, 16))
    for name, parameter in model.position_tables().items():
        assert isinstance(parameter, nn.Parameter) and not parameter.requires_grad, name


def test_position_table_regenerated_after_a_bad_load():
    """A table more than 1e-4 off the sin-cos values is regenerated with a warning; a tiny difference is kept."""
    model = tiny_model()
    with torch.no_grad():
        model.model2.pos_embed[0, 5, 3] += 1e-5
        model.model1.decoder_pos_embed.mul_(2)
    with pytest.warns(UserWarning, match="model1.decoder_pos_embed"):
        assert model.check_position_tables() == ["model1.decoder_pos_embed"]
    assert torch.equal(model.model1.decoder_pos_embed[0], sincos_position_table(128, 16))
    assert model.model2.pos_embed[0, 5, 3] != model.model1.pos_embed[0, 5, 3]


def test_patch_layout():
    """Check 3: unpatchify(patchify(x)) = x; element (py*p+px)*3+ch of token r*G+c is pixel (ch, r*p+py, c*p+px)."""
    torch.manual_seed(0)
    patch, grid = 8, 16
    images = torch.randn(2, 3, patch * grid, patch * grid)
    tokens = patchify(images, patch)
    assert tokens.shape == (2, grid * grid, patch * patch * 3)
    assert torch.equal(unpatchify(tokens, patch), images)
    for b, r, c, py, px, ch in ((0, 1, 2, 3, 4, 0), (1, 15, 0, 7, 7, 2), (0, 0, 15, 0, 5, 1), (1, 9, 11, 6, 1, 2)):
        assert tokens[b, r * grid + c, (py * patch + px) * 3 + ch] == images[b, ch, r * patch + py, c * patch + px]


# ---------------------------------------------------------------------------------------------------------------
# Check 8: fusion attention


@pytest.fixture(scope="module")
def fusion_setup():
    torch.manual_seed(3)
    model = tiny_model(3)
    layer = model.model2
    with torch.no_grad():  # non-trivial biases, so the closed form's bias term is exercised
        for attention in (layer.cross_model, layer.merge_model):
            attention.in_proj_bias.normal_(0, 0.1)
            attention.out_proj.bias.normal_(0, 0.1)
    z_vi, z_ir = torch.randn(4, 256, 128), torch.randn(4, 256, 128)
    return layer, z_vi, z_ir


def reference_mha(source: nn.MultiheadAttention, batch_first: bool) -> nn.MultiheadAttention:
    reference = nn.MultiheadAttention(source.embed_dim, source.num_heads, batch_first=batch_first)
    reference.load_state_dict(source.state_dict())
    return reference


def ffn_ln(layer: FusionLayer, merged: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(F.linear(F.gelu(F.linear(merged, layer.fc1.weight, layer.fc1.bias)), layer.fc2.weight,
                                 layer.fc2.bias) + merged, (merged.shape[-1],), layer.ln.weight, layer.ln.bias)


def test_tokens_attention_is_per_image_and_matches_a_reference(fusion_setup):
    """`tokens`: a batch of 3 equals the images one by one (1e-5) and a batch-first MHA reference of §2.5."""
    layer, z_vi, z_ir = fusion_setup
    with torch.no_grad():
        batched = layer(z_vi[:3], z_ir[:3], attention="tokens")
        for index in range(3):
            single = layer(z_vi[index:index + 1], z_ir[index:index + 1], attention="tokens")
            torch.testing.assert_close(single.fused[0], batched.fused[index], atol=1e-5, rtol=0)
        cross, merge = reference_mha(layer.cross_model, True), reference_mha(layer.merge_model, True)
        v, i = z_vi[:3] + layer.pos_embed, z_ir[:3] + layer.pos_embed
        c = cross(i, v, v)[0] + cross(v, i, i)[0]
        h = ffn_ln(layer, merge(c, v, v)[0] + merge(c, i, i)[0])
    torch.testing.assert_close(batched.cfm, c, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.fused, h, atol=1e-5, rtol=0)


def test_official_group_of_one_ignores_cfm_and_has_a_closed_form(fusion_setup):
    """`official`, group 1: h does not depend on CFM (every cross_model parameter perturbed: < 1e-6) and equals
    ln(FFN(f) + f) with f = W_o W_v (v + i) + 2 (W_o b_v + b_o) of `merge_model`."""
    layer, z_vi, z_ir = fusion_setup
    perturbed = copy.deepcopy(layer)
    with torch.no_grad():
        for parameter in perturbed.cross_model.parameters():
            parameter.add_(torch.randn_like(parameter))
        h = layer(z_vi, z_ir, attention="official", group_size=1).fused
        h_perturbed = perturbed(z_vi, z_ir, attention="official", group_size=1).fused
        width = z_vi.shape[-1]
        w_v = layer.merge_model.in_proj_weight[2 * width:]
        b_v = layer.merge_model.in_proj_bias[2 * width:]
        w_o, b_o = layer.merge_model.out_proj.weight, layer.merge_model.out_proj.bias
        summed = z_vi + z_ir + 2 * layer.pos_embed
        f = summed @ (w_o @ w_v).T + 2 * (w_o @ b_v + b_o)
        closed_form = ffn_ln(layer, f)
    assert (h - h_perturbed).abs().max() < 1e-6
    torch.testing.assert_close(h, closed_form, atol=1e-4, rtol=1e-4)


def test_official_groups_of_two_match_sequence_first_mha(fusion_setup):
    """`official`, group 2, B=4: each pair of images equals a `batch_first=False` MHA over that pair (the public
    code's layout); swapping images across groups changes the outputs; group 0 is one group of the whole batch."""
    layer, z_vi, z_ir = fusion_setup
    cross, merge = reference_mha(layer.cross_model, False), reference_mha(layer.merge_model, False)
    with torch.no_grad():
        out = layer(z_vi, z_ir, attention="official", group_size=2)
        for start in (0, 2):
            v = z_vi[start:start + 2] + layer.pos_embed  # (2, N, D): sequence 2, batch N, as the public code
            i = z_ir[start:start + 2] + layer.pos_embed
            c = cross(i, v, v)[0] + cross(v, i, i)[0]
            h = ffn_ln(layer, merge(c, v, v)[0] + merge(c, i, i)[0])
            torch.testing.assert_close(out.fused[start:start + 2], h, atol=1e-5, rtol=0)
        order = torch.tensor([0, 2, 1, 3])
        swapped = layer(z_vi[order], z_ir[order], attention="official", group_size=2)
        assert (swapped.fused[0] - out.fused[0]).abs().max() > 1e-3
        whole = layer(z_vi, z_ir, attention="official", group_size=0).fused
        assert (whole - out.fused).abs().max() > 1e-3
        v, i = z_vi + layer.pos_embed, z_ir + layer.pos_embed
        c = cross(i, v, v)[0] + cross(v, i, i)[0]
        torch.testing.assert_close(whole, ffn_ln(layer, merge(c, v, v)[0] + merge(c, i, i)[0]), atol=1e-5, rtol=0)


def test_official_last_group_may_be_smaller(fusion_setup):
    """B=3 with group 2: images 0-1 form a group and image 2 is alone (its result equals group-1 fusion)."""
    layer, z_vi, z_ir = fusion_setup
    with torch.no_grad():
        out = layer(z_vi[:3], z_ir[:3], attention="official", group_size=2).fused
        pair = layer(z_vi[:2], z_ir[:2], attention="official", group_size=2).fused
        alone = layer(z_vi[2:3], z_ir[2:3], attention="official", group_size=1).fused
    torch.testing.assert_close(out[:2], pair, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[2:], alone, atol=1e-5, rtol=0)
