"""SwinTExCo modules and fusion nets (spec/colorize.md §2.3-2.4, §9 check 5): key tables, parameter counts, strict
loading of state dicts built from the tables, Swin stage shapes at S = 224, similarity range."""

from __future__ import annotations

import pytest
import timm
import torch

from colorize.fusion_nets import ColorVidFusionNet, SimpleFusionNet
from colorize.swintexco import ColorVidNet, SwinEmbed, WarpNet
from colorize.weights import load_strict
from tests.colorize_helpers import no_network  # noqa: F401

pytestmark = pytest.mark.usefixtures("no_network")


def warpnet_table() -> dict[str, tuple[int, ...]]:
    """The §2.3 key table of WarpNet (w = 1, Swin-T channels), written from the spec."""
    table: dict[str, tuple[int, ...]] = {}
    adapters = {"layer2_1": ((1, 5), (3, 7), 96, 128), "layer3_1": ((1, 5), (3, 7), 192, 128),
                "layer4_1": ((1, 5), (3, 7), 384, 256), "layer5_1": ((1, 6), (3, 8), 768, 256)}
    for name, ((first, second), (prelu_a, prelu_b), channels, hidden) in adapters.items():
        table[f"{name}.{first}.weight"] = (hidden, channels, 3, 3)
        table[f"{name}.{first}.bias"] = (hidden,)
        table[f"{name}.{second}.weight"] = (128, hidden, 3, 3)
        table[f"{name}.{second}.bias"] = (128,)
        table[f"{name}.{prelu_a}.weight"] = (1,)
        table[f"{name}.{prelu_b}.weight"] = (1,)
    for block in range(3):
        for conv in ("conv1", "conv2"):
            table[f"layer.{block}.{conv}.weight"] = (512, 512, 3, 3)
            table[f"layer.{block}.{conv}.bias"] = (512,)
        table[f"layer.{block}.prelu.weight"] = (1,)
    for name in ("theta", "phi"):
        table[f"{name}.weight"] = (256, 512, 1, 1)
        table[f"{name}.bias"] = (256,)
    return table


def colorvid_table(ic: int) -> dict[str, tuple[int, ...]]:
    """The §2.3 ColorVidNet(ic) key table, written from the spec's prose."""
    convs = {"conv1_1.0": (32, ic), "conv1_1.2": (64, 32), "conv1_2": (64, 64), "conv2_1": (128, 64),
             "conv2_2": (128, 128), "conv3_1": (256, 128), "conv3_2": (256, 256), "conv3_3": (256, 256),
             "conv4_1": (512, 256), "conv8_1.1": (256, 512), "conv3_3_short": (256, 256), "conv8_2": (256, 256),
             "conv8_3": (256, 256), "conv9_1.1": (128, 256), "conv2_2_short": (128, 128), "conv9_2": (128, 128),
             "conv10_1.1": (128, 128), "conv10_2": (128, 128), "conv1_2_short": (128, 64)}
    for layer in ("4_2", "4_3", "5_1", "5_2", "5_3", "6_1", "6_2", "6_3", "7_1", "7_2", "7_3"):
        convs[f"conv{layer}"] = (512, 512)
    table: dict[str, tuple[int, ...]] = {}
    for name, (out, cin) in convs.items():
        table[f"{name}.weight"] = (out, cin, 3, 3)
        table[f"{name}.bias"] = (out,)
    table["conv10_ab.weight"] = (2, 128, 1, 1)
    table["conv10_ab.bias"] = (2,)
    for name, channels in (("conv1_2norm_ss", 64), ("conv2_2norm_ss", 128), ("conv3_3norm_ss", 256)):
        table[f"{name}.weight"] = (channels, 1, 1, 1)
    prelus = [f"relu{i}_{j}" for i, j in ((1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3), (4, 1), (4, 2),
                                         (4, 3), (5, 1), (5, 2), (5, 3), (6, 1), (6, 2), (6, 3), (7, 1), (7, 2),
                                         (7, 3))]
    prelus += ["relu8_1_comb", "relu8_2", "relu8_3", "relu9_1_comb", "relu9_2", "relu10_1_comb"]
    assert len(prelus) == 25
    table.update({f"{name}.weight": (1,) for name in prelus})
    return table


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def _count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _from_table(table: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {key: torch.randn(shape, generator=generator) for key, shape in table.items()}


def test_warpnet_layout_and_strict_load():
    net = WarpNet(1.0, (96, 192, 384, 768))
    table = warpnet_table()
    assert len(table) == 43
    assert _shapes(net) == table
    assert _count(net) == 18_293_515
    state = _from_table(table)
    load_strict(net, state, "table", "WarpNet")
    assert torch.equal(net.theta.weight, state["theta.weight"])


def test_colorvid_layouts_and_counts():
    colornet = ColorVidNet(7)
    assert _shapes(colornet) == colorvid_table(7) and len(colorvid_table(7)) == 90
    assert _count(colornet) == 32_802_395
    load_strict(colornet, _from_table(colorvid_table(7)), "table", "ColorVidNet")
    fusion = ColorVidFusionNet()
    assert _shapes(fusion) == colorvid_table(8)
    assert _count(fusion) == 32_802_683
    assert _shapes(ColorVidNet(4)) == colorvid_table(4)
    assert ColorVidNet(4)(torch.zeros(1, 4, 16, 16)).shape == (1, 2, 16, 16)


def test_simple_fusion_net_counts():
    assert _count(SimpleFusionNet(32)) == 474_306
    assert _count(SimpleFusionNet(16)) == 119_650
    assert SimpleFusionNet(16)(torch.zeros(2, 8, 64, 64)).shape == (2, 2, 64, 64)


def test_swin_embed_keys_shapes_and_similarity():
    torch.manual_seed(0)
    embed = SwinEmbed("swinv2_cr_tiny_ns_224", 224).eval()
    with torch.device("meta"):  # the independent key list, without initialising 27.6 M parameters
        timm_keys = timm.create_model("swinv2_cr_tiny_ns_224", features_only=True,
                                      out_indices=(0, 1, 2, 3)).state_dict()
    assert len(timm_keys) == 225
    assert list(embed.state_dict()) == ["pretrained." + key for key in timm_keys]
    assert embed.channels == (96, 192, 384, 768)
    with torch.no_grad():
        target = embed(torch.rand(1, 3, 224, 224))
        reference = embed(torch.rand(1, 3, 224, 224))
    assert [tuple(f.shape) for f in target] == [(1, 96, 112, 112), (1, 192, 56, 56), (1, 384, 28, 28),
                                                (1, 768, 14, 14)]
    warpnet = WarpNet(1.0, embed.channels).eval()
    with torch.no_grad():
        queries = warpnet.encode_target(target, 56)
        keys = warpnet.encode_reference(reference, 56)
        reference_lab = torch.rand(1, 3, 224, 224) * 2 - 1
        warped, similarity = warpnet.correlate(queries, keys, torch.nn.functional.avg_pool2d(reference_lab, 4), 0.01)
    assert warped.shape == (1, 3, 224, 224) and similarity.shape == (1, 1, 224, 224)
    assert similarity.min() >= -1.0 - 1e-5 and similarity.max() <= 1.0 + 1e-5
    assert warped.min() >= reference_lab.min() - 1e-5 and warped.max() <= reference_lab.max() + 1e-5


def test_image_size_must_be_a_multiple_of_32():
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of 32"):
        SwinEmbed("swinv2_cr_tiny_ns_224", 80)
