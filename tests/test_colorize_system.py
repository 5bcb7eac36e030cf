"""FusionSystem (spec/colorize.md §2.5, §9 checks 3 and 6) and its weight files (§2.3, §6): colour never reaches
the system, shapes, parameter groups, frozen modules, Strategy-1 folders, FlowChroma checkpoints."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from colorize.config import ExemplarConfig, FlowConfig, FusionConfig
from colorize.system import FusionSystem
from colorize.weights import (FUSION_FORMAT, WeightFileError, export_swintexco, load_fusion_init,
                              save_fusion_checkpoint)
from common.errors import ConfigError, UserError
from tests.colorize_helpers import (DEMO_EXEMPLAR, DEMO_FUSION, DEMO_SIZE, demo_system, no_network,  # noqa: F401
                                    random_lab)

pytestmark = pytest.mark.usefixtures("no_network")

FLOWCHROMA_KEYS = {"epoch", "fusion_unet", "swintexco_embed", "swintexco_nonlocal", "swintexco_colornet",
                   "optimizer", "scheduler", "best_loss", "train_losses", "config", "format"}


def _clip(batch: int = 2, length: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (random_lab(batch, length, 3, DEMO_SIZE, DEMO_SIZE, generator=generator),
            random_lab(batch, 3, DEMO_SIZE, DEMO_SIZE, generator=generator))


@pytest.fixture(scope="module")
def system():
    return demo_system()


def test_colour_never_reaches_the_system(system):
    frames, reference = _clip()
    seen_channels = []
    original_step = system.flow.step

    def spy(gray):
        seen_channels.append(gray.shape[1])
        return original_step(gray)

    system.flow.step = spy
    try:
        system.eval()
        with torch.no_grad():
            first = system.forward_sequence(frames, reference, return_memflow=True, return_aux=True)
            recoloured = frames.clone()
            recoloured[:, :, 1:3] = torch.rand_like(recoloured[:, :, 1:3]) * 2 - 1
            second = system.forward_sequence(recoloured, reference, return_memflow=True, return_aux=True)
    finally:
        del system.flow.step
    for a, b in zip(first[0] + first[1] + first[2], second[0] + second[1] + second[2]):
        assert torch.equal(a, b)
    assert seen_channels == [1] * 8


def test_shapes_groups_and_one_step():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        system = FusionSystem(FlowConfig(backend="raft", allow_random_init=True, raft_updates=2), DEMO_EXEMPLAR,
                              fusion=DEMO_FUSION, image_size=DEMO_SIZE)
    frames, reference = _clip()
    system.train()
    assert not system.embed_net.training and not system.colornet.training and system.nonlocal_net.training
    assert not system.flow.network.training
    own_parameters = {id(p) for p in system.parameters()}
    assert not any(id(p) in own_parameters for p in system.flow.network.parameters())
    assert not any(key.startswith("flow") for key in system.state_dict())

    outputs, flow_outputs, confs, aux = system(frames, reference, return_aux=True)
    assert len(outputs) == len(flow_outputs) == len(confs) == 4
    assert all(o.shape == (2, 3, DEMO_SIZE, DEMO_SIZE) for o in outputs + flow_outputs)
    assert all(c.shape == (2, 1, DEMO_SIZE, DEMO_SIZE) for c in confs)
    assert confs[0].abs().max() == 0 and confs[1].abs().max() > 0
    assert set(aux) >= {"flows", "noc", "valid", "exemplar", "similarity"}
    assert torch.equal(outputs[2][:, 0], frames[:, 2, 0])
    assert len(system(frames, reference, return_memflow=False)) == 4

    groups = system.get_parameter_groups()
    assert [g["name"] for g in groups] == ["nonlocal", "fusion"] and [g["lr"] for g in groups] == [1e-4, 1e-4]
    optimizer = torch.optim.AdamW([{k: g[k] for k in ("params", "lr")} for g in groups])
    frozen = {name: {k: v.clone() for k, v in getattr(system, name).state_dict().items()}
              for name in ("embed_net", "colornet")}
    frozen["flow"] = {k: v.clone() for k, v in system.flow.network.state_dict().items()}
    trained = {name: [p.detach().clone() for p in getattr(system, name).parameters()]
               for name in ("nonlocal_net", "fusion_net")}
    loss = sum((o[:, 1:] - frames[:, t, 1:]).abs().mean() for t, o in enumerate(outputs))
    loss.backward()
    assert system.nonlocal_net.theta.weight.grad.abs().max() > 0
    optimizer.step()
    for name, state in frozen.items():
        module = system.flow.network if name == "flow" else getattr(system, name)
        assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items()), name
    for name, before in trained.items():
        assert any(not torch.equal(p, b) for p, b in zip(getattr(system, name).parameters(), before)), name
    system.eval()
    system.train()
    assert not system.embed_net.training and not system.colornet.training


def test_residual_bases(system):
    frames, reference = _clip(batch=1, length=2)
    system.eval()
    with torch.no_grad():
        exemplar_first = system(frames, reference, return_aux=True)
        system.fusion_config = FusionConfig(width=16, first_frame_base="zeros")
        zeros_first = system(frames, reference, return_aux=True)
        system.fusion_config = DEMO_FUSION
    residual = exemplar_first[0][0][:, 1:] - exemplar_first[3]["exemplar"][0][:, 1:]
    assert torch.allclose(zeros_first[0][0][:, 1:], residual, atol=1e-6)
    assert not torch.equal(exemplar_first[0][1], zeros_first[0][1])


def test_strategy_one_folder_round_trip(system, tmp_path):
    folder = export_swintexco(tmp_path / "swintexco" / "best", system)
    assert sorted(p.name for p in folder.iterdir()) == ["colornet.pth", "embed_net.pth", "nonlocal_net.pth"]
    loaded = FusionSystem(FlowConfig(), ExemplarConfig(**{**DEMO_EXEMPLAR.__dict__, "swintexco_ckpt": folder}),
                          fusion=DEMO_FUSION, image_size=DEMO_SIZE)
    assert loaded.strategy == 1 and loaded.get_parameter_groups()[0]["lr"] == 1e-5
    for name in ("embed_net", "nonlocal_net", "colornet"):
        ours, theirs = getattr(system, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert loaded.weight_sources["nonlocal_net"].sha256 and not loaded.embed_random_init

    (folder / "colornet.pth").unlink()
    with pytest.raises(WeightFileError, match="colornet.pth") as missing:
        FusionSystem(FlowConfig(), ExemplarConfig(**{**DEMO_EXEMPLAR.__dict__, "swintexco_ckpt": folder}),
                     image_size=DEMO_SIZE)
    assert isinstance(missing.value, UserError)
    export_swintexco(folder, system)
    with pytest.raises(WeightFileError, match="nonlocal_net.pth"):
        FusionSystem(FlowConfig(), ExemplarConfig(**{**DEMO_EXEMPLAR.__dict__, "swintexco_ckpt": folder,
                                                     "warpnet_width": 0.25}), image_size=DEMO_SIZE)


def test_colornet_output_refused_with_random_colornet():
    with pytest.raises(ConfigError, match="--exemplar.output colornet"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            FusionSystem(FlowConfig(), ExemplarConfig(**{**DEMO_EXEMPLAR.__dict__, "output": "colornet"}),
                         image_size=DEMO_SIZE)


def test_flowchroma_checkpoint_and_init_from(system, tmp_path):
    optimizer = torch.optim.AdamW([{k: g[k] for k in ("params", "lr")} for g in system.get_parameter_groups()])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10, eta_min=1e-6)
    path = save_fusion_checkpoint(tmp_path / "fusion_epoch_3.pth", system, epoch=3,
                                  optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), best_loss=0.5,
                                  train_losses=[1.0, 0.7, 0.5], config={"preset": "demo"})
    state = torch.load(path, weights_only=True)
    assert set(state) == FLOWCHROMA_KEYS and state["format"] == FUSION_FORMAT
    assert json.loads(state["config"]) == {"preset": "demo"}
    assert all(key.startswith("pretrained.") for key in state["swintexco_embed"])

    fresh = demo_system(seed=1)
    sources = load_fusion_init(path, fresh)
    assert {s.role for s in sources} == {"fusion_net", "embed_net", "nonlocal_net", "colornet"}
    for name in ("fusion_net", "nonlocal_net"):
        ours, theirs = getattr(system, name).state_dict(), getattr(fresh, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name

    batchnorm = {"net.0.weight": torch.zeros(32, 7, 3, 3), "net.1.running_mean": torch.zeros(32)}
    torch.save({"fusion_unet": batchnorm, "epoch": 1}, tmp_path / "old_fusion.pth")
    with pytest.raises(WeightFileError, match="7-input BatchNorm SimpleFusionNet"):
        load_fusion_init(tmp_path / "old_fusion.pth", fresh)
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(WeightFileError, match="not a FlowChroma fusion checkpoint"):
        load_fusion_init(tmp_path / "other.pth", fresh)
