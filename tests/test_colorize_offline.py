"""Offline behaviour (spec/colorize.md §2.3 weight sources, §9 check 12): with sockets disabled and
HF_HUB_OFFLINE=1 every Strategy-2 source works from local files or random init, and the hub is asked only with
``--exemplar.allow-download``. (Every colorization test module runs under the same socket guard.)"""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest
import timm
import torch

from colorize.weights import WeightFileError, build_exemplar_branch
from tests.colorize_helpers import DEMO_EXEMPLAR, DEMO_SIZE, NetworkBlocked, no_network  # noqa: F401

pytestmark = pytest.mark.usefixtures("no_network")


class DownloadAttempted(Exception):
    """Raised by the download spies."""


@pytest.fixture
def download_spy(monkeypatch):
    """Replace timm's hub and URL loaders with spies that record the request and raise."""
    requests = []

    def spy(location, *args, **kwargs):
        requests.append(location)
        raise DownloadAttempted(location)

    import timm.models._builder as builder

    monkeypatch.setattr(builder, "load_state_dict_from_hf", spy)
    monkeypatch.setattr(builder, "load_state_dict_from_url", spy)
    monkeypatch.setattr(builder, "download_cached_file", spy)
    return requests


def test_sockets_are_blocked():
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("huggingface.co", 443), timeout=1)


def test_random_init_without_sources(download_spy):
    with pytest.warns(UserWarning, match="RANDOM INIT"):
        branch = build_exemplar_branch(DEMO_EXEMPLAR, DEMO_SIZE)
    assert branch.embed_random_init and branch.strategy == 2 and download_spy == []
    assert any("RANDOM INIT" in note for note in branch.warnings)


def test_local_backbone_file(download_spy, tmp_path):
    torch.manual_seed(0)
    classifier = timm.create_model("swinv2_cr_tiny_ns_224", img_size=(DEMO_SIZE, DEMO_SIZE), embed_dim=32,
                                   depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
    path = tmp_path / "swin_demo.pth"
    torch.save(classifier.state_dict(), path)
    branch = build_exemplar_branch(replace(DEMO_EXEMPLAR, backbone_weights=path), DEMO_SIZE)
    assert download_spy == [] and not branch.embed_random_init
    assert branch.sources[0].sha256 and branch.sources[0].path == str(path)
    embedded = branch.embed_net.state_dict()
    assert torch.equal(embedded["pretrained.patch_embed.proj.weight"],
                       classifier.state_dict()["patch_embed.proj.weight"])
    assert not any("head" in key for key in embedded)

    wrong = timm.create_model("swinv2_cr_tiny_ns_224", img_size=(DEMO_SIZE, DEMO_SIZE), embed_dim=48,
                              depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
    torch.save(wrong.state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(WeightFileError, match="wrong.pth"):
        build_exemplar_branch(replace(DEMO_EXEMPLAR, backbone_weights=tmp_path / "wrong.pth"), DEMO_SIZE)


def test_hub_only_with_allow_download(download_spy):
    with pytest.raises(DownloadAttempted):
        build_exemplar_branch(replace(DEMO_EXEMPLAR, allow_download=True), DEMO_SIZE)
    assert len(download_spy) == 1
