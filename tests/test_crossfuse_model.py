"""CrossFuse networks: official keys, shapes, counts, strict loading, `.model` files, CAM behaviour (spec §9.1-3)."""

from __future__ import annotations

import math

import pytest
import torch

from common.checkpoint import CheckpointError
from crossfuse.model import (
    Attention,
    AutoEncoder,
    CrossAttentionModule,
    CrossEncoder,
    CrossFuseModel,
    FusionNet,
    InputSizeError,
    Weight,
    parameter_groups,
    patches_to_tokens,
    tokens_to_patches,
)
from crossfuse.weights import (
    ModelFileError,
    detect_network,
    fusion_net_from_file,
    load_model_file,
    read_state_dict,
    save_model_file,
)

# ---------------------------------------------------------------------------------------------------------------
# Expected layouts, written out from the spec's tables (§2.1, §2.3), in registration order.


def conv_keys(prefix: str, out_ch: int, in_ch: int, k: int, batch_norm: bool) -> list[tuple[str, tuple]]:
    keys = [(f"{prefix}.conv2d.0.weight", (out_ch, in_ch, k, k)), (f"{prefix}.conv2d.0.bias", (out_ch,))]
    if batch_norm:
        keys += [(f"{prefix}.conv2d.1.{name}", (out_ch,)) for name in ("weight", "bias", "running_mean", "running_var")]
        keys.append((f"{prefix}.conv2d.1.num_batches_tracked", ()))
    return keys


def expected_autoencoder_layout() -> list[tuple[str, tuple]]:
    layout = conv_keys("fea_encoder1.conv1", 32, 1, 3, False)
    for block, inputs in ((0, (32, 96, 160, 224)), (2, (128, 192, 256, 320))):
        for i in range(3):
            layout += conv_keys(f"fea_encoder1.dense_blocks.{block}.dense_conv{i}", 64, inputs[i], 3, False)
        layout += conv_keys(f"fea_encoder1.dense_blocks.{block}.adjust_conv", 128, inputs[3], 3, False)
    layout += conv_keys("recon_decoder1.conv1", 64, 128, 3, False)
    layout += conv_keys("recon_decoder1.conv_block.0", 64, 64, 3, False)
    layout += conv_keys("recon_decoder1.conv_block.2", 32, 64, 3, False)
    layout += conv_keys("recon_decoder1.conv_last", 1, 32, 1, False)
    return layout


def linear(prefix: str, out_f: int, in_f: int) -> list[tuple[str, tuple]]:
    return [(f"{prefix}.weight", (out_f, in_f)), (f"{prefix}.bias", (out_f,))]


def norm(prefix: str) -> list[tuple[str, tuple]]:
    return [(f"{prefix}.weight", (512,)), (f"{prefix}.bias", (512,))]


def expected_fusion_layout(temperature: bool) -> list[tuple[str, tuple]]:
    p = "cross_atten_block."
    layout = []
    for stage in (1, 2):
        for branch in (1, 2):
            b = f"{p}self_atten_block{stage}.self_atten{branch}"
            layout += norm(f"{b}.blocks.0.norm1") + linear(f"{b}.blocks.0.attn.qkv", 1536, 512)
            layout += linear(f"{b}.blocks.0.attn.proj", 512, 512) + norm(f"{b}.blocks.0.norm2")
            layout += linear(f"{b}.blocks.0.mlp.fc1", 2048, 512) + linear(f"{b}.blocks.0.mlp.fc2", 512, 2048)
            layout += norm(f"{b}.norm")
    for branch in (1, 2):
        b = f"{p}cross_atten_block.cross_atten{branch}"
        layout += norm(f"{b}.blocks.0.norm1")
        if temperature:
            layout.append((f"{b}.blocks.0.attn.temperature", (1,)))
        layout += linear(f"{b}.blocks.0.attn.qkv", 1536, 512)
        for name in ("q_linear", "k_linear", "v_linear", "proj"):
            layout += linear(f"{b}.blocks.0.attn.{name}", 512, 512)
        layout += norm(f"{b}.blocks.0.norm2")
        layout += linear(f"{b}.blocks.0.mlp.fc1", 2048, 512) + linear(f"{b}.blocks.0.mlp.fc2", 512, 2048)
        layout += norm(f"{b}.norm")
    layout.append(("conv_gra.weight", (32, 32, 3, 3)))
    d = "decoder_fusion"
    layout += conv_keys(f"{d}.conv1", 64, 128, 3, True)
    layout += conv_keys(f"{d}.conv_block.0", 64, 64, 3, True)
    layout += conv_keys(f"{d}.conv_block.2", 32, 64, 3, True)
    layout += conv_keys(f"{d}.conv_block.4", 32, 32, 3, True)
    layout += conv_keys(f"{d}.conv_last", 1, 32, 1, True)
    layout += [(f"{d}.weight.conv_sh.weight", (32, 32, 3, 3)), (f"{d}.weight.conv_de.weight", (128, 128, 3, 3))]
    return layout


def random_state_dict(layout: list[tuple[str, tuple]], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator)
    return state


def layout_of(module: torch.nn.Module) -> list[tuple[str, tuple]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


@pytest.fixture(scope="module")
def fusion_tau() -> FusionNet:
    torch.manual_seed(0)
    return FusionNet(learnable_temperature=True)


# ---------------------------------------------------------------------------------------------------------------
# §9.1 keys, shapes, counts, strict loading, files


def test_autoencoder_layout_and_counts():
    ae = AutoEncoder()
    assert layout_of(ae) == expected_autoencoder_layout()
    assert len(ae.state_dict()) == 26
    assert sum(p.numel() for p in ae.parameters()) == 1_254_529
    assert sum(p.numel() for p in ae.fea_encoder1.parameters()) == 1_125_312


def test_fusion_layout_and_counts(fusion_tau):
    fusion = FusionNet(learnable_temperature=False)
    assert layout_of(fusion) == expected_fusion_layout(temperature=False)
    assert len(fusion.state_dict()) == 134
    assert sum(p.numel() for p in fusion.parameters()) == 20_801_123
    assert sum(p.numel() for p in fusion.parameters() if p.requires_grad) == 20_644_451
    assert sum(p.numel() for p in fusion.cross_atten_block.parameters()) == 20_496_384
    assert sum(p.numel() for p in fusion.decoder_fusion.parameters() if p.requires_grad) == 138_851
    assert sum(p.numel() for p in fusion.decoder_fusion.weight.parameters()) == 156_672

    assert layout_of(fusion_tau) == expected_fusion_layout(temperature=True)
    assert len(fusion_tau.state_dict()) == 136
    temperatures = [v for k, v in fusion_tau.state_dict().items() if k.endswith("temperature")]
    assert [t.tolist() for t in temperatures] == [[1.0], [1.0]]


def test_frozen_filters_hold_official_values():
    fusion = FusionNet()
    weight = fusion.decoder_fusion.weight
    assert torch.all(weight.conv_sh.weight == 1 / 9) and torch.all(weight.conv_de.weight == 1 / 9)
    assert not any(p.requires_grad for p in weight.parameters())
    laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    assert torch.equal(fusion.conv_gra.weight, laplacian.expand(32, 32, 3, 3))
    assert fusion.conv_gra.weight.requires_grad


@pytest.mark.parametrize("prefix", ["", "module.", "module._orig_mod."])
def test_table_dicts_load_strictly(tmp_path, prefix):
    ae_state = random_state_dict(expected_autoencoder_layout(), seed=1)
    fusion_state = random_state_dict(expected_fusion_layout(temperature=False), seed=2)
    for module, state, name in ((AutoEncoder(), ae_state, "ae.model"), (FusionNet(), fusion_state, "fusion.model")):
        path = tmp_path / name
        torch.save({prefix + k: v for k, v in state.items()}, path)
        report = load_model_file(module, path)
        assert not report.temperature_defaulted
        loaded = module.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    if not prefix:
        AutoEncoder().load_state_dict(ae_state, strict=True)


def test_model_file_round_trip_is_bitwise(tmp_path):
    ae = AutoEncoder()
    first = save_model_file(ae, tmp_path / "a" / "auto_encoder_epoch_1_ir.model")
    copy = AutoEncoder()
    load_model_file(copy, first)
    second = save_model_file(copy, tmp_path / "b.model")
    assert first.read_bytes() == second.read_bytes()
    assert list(torch.load(first, weights_only=True)) == list(ae.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ae.state_dict().values(), copy.state_dict().values()))
    assert sorted(p.name for p in first.parent.iterdir()) == ["auto_encoder_epoch_1_ir.model"]


def test_atomic_save_keeps_old_file_when_replace_fails(tmp_path, monkeypatch):
    path = save_model_file(AutoEncoder(), tmp_path / "ae.model")
    old = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", failing_replace)
    with pytest.raises(OSError):
        save_model_file(AutoEncoder(), path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["ae.model"]


def test_temperature_file_rules(tmp_path, fusion_tau):
    plain = FusionNet()
    plain_path = save_model_file(plain, tmp_path / "plain.model")
    with torch.no_grad():
        for t in fusion_tau.cross_atten_block.temperatures():
            t.fill_(0.5)
    report = load_model_file(fusion_tau, plain_path)
    assert report.temperature_defaulted and "tau = 1" in report.describe()
    assert [t.item() for t in fusion_tau.cross_atten_block.temperatures()] == [1.0, 1.0]
    tau_path = save_model_file(fusion_tau, tmp_path / "tau.model")
    with pytest.raises(ModelFileError, match="tau.model.*temperature"):
        load_model_file(plain, tau_path)


def test_fusion_net_from_file_follows_the_file_keys(tmp_path, fusion_tau):
    path = save_model_file(fusion_tau, tmp_path / "end_to_end_fusion_epoch_1.model")
    rebuilt = fusion_net_from_file(path, deep_weight="abs")
    assert rebuilt.learnable_temperature and rebuilt.decoder_fusion.weight.deep_weight == "abs"
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), fusion_tau.state_dict().values()))


def test_wrong_network_and_bad_files_raise_clear_errors(tmp_path):
    ae_path = save_model_file(AutoEncoder(), tmp_path / "auto.model")
    with pytest.raises(ModelFileError, match=r"auto\.model: holds an auto-encoder network, but a fusion"):
        load_model_file(FusionNet(), ae_path)
    foreign = tmp_path / "foreign.model"
    torch.save({"backbone.conv.weight": torch.zeros(3)}, foreign)
    with pytest.raises(ModelFileError, match=r"foreign\.model: holds an unknown network"):
        load_model_file(AutoEncoder(), foreign)
    partial = tmp_path / "partial.model"
    state = AutoEncoder().state_dict()
    state.pop("recon_decoder1.conv_last.conv2d.0.bias")
    torch.save(state, partial)
    with pytest.raises(ModelFileError, match=r"partial\.model: keys do not match.*missing 1: recon_decoder1"):
        load_model_file(AutoEncoder(), partial)
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(ae_path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"corrupt\.model is truncated or corrupt"):  # the kit's one reader
        load_model_file(AutoEncoder(), corrupt)
    with pytest.raises(CheckpointError, match="missing.model does not exist"):
        read_state_dict(tmp_path / "missing.model")
    assert issubclass(ModelFileError, CheckpointError)  # the kit's CLI wrapper reports it as one line, exit 2
    assert detect_network({"fea_encoder1.conv1.conv2d.0.weight": torch.zeros(1)}) == "autoencoder"


# ---------------------------------------------------------------------------------------------------------------
# §9.2 256x256 shapes and output range


def test_256_batch_shapes_and_output_range(fusion_tau):
    torch.manual_seed(3)
    ae_ir, ae_vi = AutoEncoder(), AutoEncoder()
    ir = torch.rand(2, 1, 256, 256) * 255
    vi = torch.rand(2, 1, 256, 256) * 255
    with torch.no_grad():
        ir_sh, ir_de = ae_ir(ir)
        vi_sh, vi_de = ae_vi(vi)
        assert ir_sh.shape == (2, 32, 256, 256) and ir_de.shape == (2, 128, 32, 32)
        assert patches_to_tokens(ir_de).shape == (2, 256, 512)
        assert fusion_tau.cam(ir_de, vi_de).shape == (2, 128, 32, 32)
        out = fusion_tau.train()(ir_sh, ir_de, vi_sh, vi_de)
    assert out.fused.shape == (2, 1, 256, 256) and out.fused.dtype == torch.float32
    assert torch.all(out.fused.amin(dim=(1, 2, 3)) == 0)
    assert torch.all((out.fused.amax(dim=(1, 2, 3)) - 255).abs() <= 1e-3)
    assert out.temperature.item() == 1.0 and out.deep_weight_absmax.dim() == 0
    assert ae_ir.reconstruct(ir[:1, :, :40, :56]).shape == (1, 1, 40, 56)


def test_bfloat16_autocast_forward_gives_float32_output(fusion_tau):
    torch.manual_seed(11)
    model = CrossFuseModel(AutoEncoder(), AutoEncoder(), fusion_tau).train()
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 1, 32, 48) * 255, torch.rand(2, 1, 32, 48) * 255)
    assert out.fused.dtype == torch.float32 and torch.isfinite(out.fused).all()
    assert torch.all(out.fused.amin(dim=(1, 2, 3)) == 0)


def test_tokens_follow_official_patch_order():
    x = torch.randn(2, 3, 4, 6)
    tokens = patches_to_tokens(x)
    assert tokens.shape == (2, 6, 12)
    for i in range(2):
        for j in range(3):
            for c in range(3):
                for r in range(2):
                    for s in range(2):
                        assert tokens[1, i * 3 + j, 4 * c + 2 * r + s] == x[1, c, 2 * i + r, 2 * j + s]
    assert torch.equal(tokens_to_patches(tokens, 4, 6), x)


# ---------------------------------------------------------------------------------------------------------------
# §9.3 CAM behaviour


def test_temperature_one_equals_no_temperature(fusion_tau):
    torch.manual_seed(4)
    plain = CrossEncoder(learnable_temperature=False)
    state = {k: v for k, v in fusion_tau.cross_atten_block.state_dict().items() if not k.endswith("temperature")}
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        for t in fusion_tau.cross_atten_block.temperatures():
            t.fill_(1.0)
        ir, vi = torch.randn(2, 128, 8, 10), torch.randn(2, 128, 8, 10)
        assert (fusion_tau.cross_atten_block(ir, vi) - plain(ir, vi)).abs().max() <= 1e-6


def test_cross_attention_matches_hand_computed_resoftmax():
    torch.manual_seed(5)
    attn = Attention(512, 16, cross=True, learnable_temperature=True)
    with torch.no_grad():
        attn.temperature.fill_(0.7)
    a, b = torch.randn(2, 9, 512), torch.randn(2, 9, 512)
    with torch.no_grad():
        q_all, k_all, v_all = attn.project(a, b)
        weights = attn.attention_weights(q_all, k_all)
        out = attn(a, b)
    a64, b64 = a.double(), b.double()
    q = a64 @ attn.q_linear.weight.double().T + attn.q_linear.bias.double()
    k = b64 @ attn.k_linear.weight.double().T + attn.k_linear.bias.double()
    v = b64 @ attn.v_linear.weight.double().T + attn.v_linear.bias.double()
    head = 5
    qh, kh = q[..., 32 * head : 32 * head + 32], k[..., 32 * head : 32 * head + 32]
    expected = torch.softmax(-(qh @ kh.transpose(-1, -2)) * 32**-0.5 / 0.7, dim=-1)
    assert (weights[:, head].double() - expected).abs().max() <= 1e-5
    heads = []
    for h in range(16):
        sl = slice(32 * h, 32 * h + 32)
        heads.append(torch.softmax(-(q[..., sl] @ k[..., sl].transpose(-1, -2)) * 32**-0.5 / 0.7, dim=-1) @ v[..., sl])
    expected_out = torch.cat(heads, dim=-1) @ attn.proj.weight.double().T + attn.proj.bias.double()
    assert (out.double() - expected_out).abs().max() <= 1e-4


def test_cross_block_with_zero_proj_and_mlp_outputs_norm_of_key_value_source():
    torch.manual_seed(6)
    module = CrossAttentionModule(learnable_temperature=False)
    block = module.blocks[0]
    with torch.no_grad():
        for layer in (block.attn.proj, block.mlp.fc2):
            layer.weight.zero_()
            layer.bias.zero_()
        module.norm.weight.normal_()
        module.norm.bias.normal_()
        query, key_value = torch.randn(2, 16, 512), torch.randn(2, 16, 512) * 3 + 1
        assert (module(query, key_value) - module.norm(key_value)).abs().max() <= 1e-5


@pytest.mark.parametrize("side", [32, 12])
def test_shift_is_a_no_op_up_to_rounding(fusion_tau, side):
    torch.manual_seed(7)
    cam = fusion_tau.cross_atten_block
    ir, vi = torch.randn(1, 128, side, side), torch.randn(1, 128, side, side)
    with torch.no_grad():
        cam.shift = False
        plain = cam(ir, vi)
        cam.shift = True
        shifted = cam(ir, vi)
        cam.shift = False
    assert (plain - shifted).abs().max() <= 1e-4 * plain.std()


def test_deep_weight_ratios_signed_and_abs():
    torch.manual_seed(8)
    ir, vi = torch.randn(1, 128, 5, 6), torch.randn(1, 128, 5, 6)

    def box(x):  # (1/9) * sum over channels and the 3x3 neighbourhood, zero padding
        total = torch.nn.functional.pad(x.sum(1, keepdim=True), (1, 1, 1, 1))
        return sum(total[..., i : i + 5, j : j + 6] for i in range(3) for j in range(3)).expand_as(x) / 9

    signed_ir, _ = Weight("signed").for_de(ir, vi)
    expected = box(ir) / (box(ir) + box(vi) + 1e-6)
    assert torch.allclose(signed_ir, expected, rtol=1e-4, atol=1e-4)
    abs_ir, abs_vi = Weight("abs").for_de(ir, vi)
    assert torch.allclose(abs_ir, box(ir).abs() / (box(ir).abs() + box(vi).abs() + 1e-6), rtol=1e-4, atol=1e-5)
    assert abs_ir.min() >= 0 and (abs_ir + abs_vi).max() <= 1
    with pytest.raises(ValueError):
        Weight("square")


def test_output_norm_only_sets_the_sign_of_the_min_max_output_and_can_be_frozen():
    torch.manual_seed(11)
    fusion = FusionNet().train()
    features = (torch.randn(2, 32, 24, 24), torch.randn(2, 128, 3, 3), torch.randn(2, 32, 24, 24),
                torch.randn(2, 128, 3, 3))
    norm = fusion.decoder_fusion.conv_last.conv2d[1]
    with torch.no_grad():
        reference = fusion(*features).fused
        norm.weight.mul_(3.0)
        norm.bias.add_(5.0)
        assert torch.allclose(fusion(*features).fused, reference, atol=1e-3)
        norm.weight.neg_()  # a scale through zero gives the negative image
        assert torch.allclose(fusion(*features).fused, 255.0 - reference, atol=1e-3)

    frozen = FusionNet(freeze_output_norm=True)
    assert layout_of(frozen) == layout_of(FusionNet())
    frozen_names = [name for name, p in frozen.named_parameters()
                    if not p.requires_grad and not name.startswith("decoder_fusion.weight.")]
    assert frozen_names == ["decoder_fusion.conv_last.conv2d.1.weight", "decoder_fusion.conv_last.conv2d.1.bias"]
    groups = parameter_groups(CrossFuseModel(AutoEncoder(), AutoEncoder(), frozen))
    assert sum(p.numel() for p in groups[-1]["params"]) == 138_851 - 2


# ---------------------------------------------------------------------------------------------------------------
# Training API: gradients, groups, frozen encoders


def test_end_to_end_backward_leaves_unused_parameters_without_grad(fusion_tau):
    torch.manual_seed(9)
    model = CrossFuseModel(AutoEncoder(), AutoEncoder(), fusion_tau).train()
    out = model(torch.rand(2, 1, 32, 40) * 255, torch.rand(2, 1, 32, 40) * 255)
    out.fused.mean().backward()
    unused_prefixes = (
        "ir_encoder.recon_decoder1.",
        "vi_encoder.recon_decoder1.",
        "fusion.conv_gra.",
        "fusion.decoder_fusion.weight.",
    )
    unused_parts = tuple(f".cross_atten_block.cross_atten{i}.blocks.0.attn.qkv." for i in (1, 2))
    for name, param in model.named_parameters():
        is_unused = name.startswith(unused_prefixes) or any(p in name for p in unused_parts)
        is_unused |= ".self_atten_block" in name and name.split(".")[-2] == "norm"
        assert (param.grad is None) == is_unused, name
    assert all(t.grad is not None for t in fusion_tau.cross_atten_block.temperatures())
    model.zero_grad(set_to_none=True)

    groups = parameter_groups(model)
    assert [g["name"] for g in groups] == ["ir_encoder", "vi_encoder", "cam", "decoder"]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}
    assert any(p is fusion_tau.conv_gra.weight for p in groups[2]["params"])
    assert all(any(t is p for p in groups[2]["params"]) for t in fusion_tau.cross_atten_block.temperatures())


def test_stage_two_encoders_stay_frozen(fusion_tau):
    torch.manual_seed(10)
    model = CrossFuseModel(AutoEncoder(), AutoEncoder(), fusion_tau, freeze_encoders=True)
    model.train()
    assert not model.ir_encoder.training and not model.vi_encoder.training and model.fusion.training
    out = model(torch.rand(1, 1, 24, 24) * 255, torch.rand(1, 1, 24, 24) * 255)
    out.fused.mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.ir_encoder.parameters())
    assert all(p.grad is None for p in model.vi_encoder.parameters())
    groups = parameter_groups(model)
    assert [g["name"] for g in groups] == ["cam", "decoder"]
    assert sum(p.numel() for g in groups for p in g["params"]) == 20_644_453  # + the two temperatures
    model.zero_grad(set_to_none=True)


def test_mean_temperature_and_small_image_error(fusion_tau):
    with torch.no_grad():
        temps = fusion_tau.cross_atten_block.temperatures()
        temps[0].fill_(0.9)
        temps[1].fill_(1.3)
    assert math.isclose(fusion_tau.mean_temperature().item(), 1.1, rel_tol=1e-6)
    assert FusionNet().mean_temperature().item() == 1.0
    with torch.no_grad():
        for t in temps:
            t.fill_(1.0)
    with pytest.raises(InputSizeError, match="at least 16x16"):
        AutoEncoder()(torch.zeros(1, 1, 15, 40))
    with pytest.raises(InputSizeError, match="differ in shape"):
        CrossFuseModel(AutoEncoder(), AutoEncoder(), fusion_tau)(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 24))
