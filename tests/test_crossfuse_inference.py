"""CrossFuse windowing and batched full-resolution inference (spec §2.4, §7.1, §9.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crossfuse.inference import eval_mode, fuse_batch, fuse_images, quantize
from crossfuse.model import AutoEncoder, FusionNet, InputSizeError
from crossfuse.windows import apply_windowed, from_windows, to_windows, window_extent


@pytest.fixture(scope="module")
def networks():
    torch.manual_seed(0)
    ae_ir, ae_vi, fusion = AutoEncoder(), AutoEncoder(), FusionNet(learnable_temperature=True, window_batch=3)
    # Non-trivial BatchNorm running statistics, so eval mode differs from train mode.
    with torch.no_grad():
        for module in fusion.decoder_fusion.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return ae_ir, ae_vi, fusion


def random_pair(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w)).astype(np.uint8), rng.integers(0, 256, (h, w)).astype(np.uint8)


def as_batch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image)[None, None].float()


@pytest.mark.parametrize(
    ("n", "expected"),
    [(2, 2), (3, 4), (6, 6), (12, 12), (14, 14), (15, 16), (16, 16), (17, 32), (25, 32), (31, 32), (32, 32)]
    + [(33, 32), (64, 32)],
)
def test_window_extent_rule(n, expected):
    assert window_extent(n) == expected


def test_window_extent_rejects_too_small_maps():
    with pytest.raises(ValueError, match="16x16"):
        window_extent(1)


def test_windows_fold_stitch_and_crop():
    x = torch.randn(2, 3, 64, 96)
    windows = to_windows(x, 32, 32)
    assert windows.shape == (12, 3, 32, 32)
    assert torch.equal(windows[4], x[0, :, 32:64, 32:64])  # image 0, window row 1, column 1
    assert torch.equal(from_windows(windows, 2, 2, 3), x)

    calls = []

    def record(ir, vi):
        calls.append(ir.shape[0])
        return ir - vi

    ir, vi = torch.randn(2, 128, 33, 45), torch.randn(2, 128, 33, 45)
    out = apply_windowed(record, ir, vi, window_batch=3)
    assert out.shape == (2, 128, 33, 45) and torch.equal(out, ir - vi)
    assert calls == [3, 3, 2]  # 270x360 images: 4 windows each, 8 in chunks of 3


def test_sizes_are_preserved(networks):
    ae_ir, ae_vi, fusion = networks
    for h, w in [(270, 360), (101, 113), (48, 48), (16, 16), (200, 264), (333, 517)]:
        ir, vi = random_pair(h, w, seed=h)
        fused = fuse_batch(ae_ir, ae_vi, fusion, as_batch(ir), as_batch(vi))
        assert fused.shape == (1, 1, h, w), (h, w)
        assert fused.min().item() == 0.0 and fused.max().item() <= 255.0


def test_batch_equals_single_runs_and_modes_are_restored(networks):
    ae_ir, ae_vi, fusion = networks
    fusion.train()
    pairs = [random_pair(101, 113, 1), random_pair(48, 64, 2), random_pair(101, 113, 3), random_pair(101, 113, 4)]
    batched = fuse_images(ae_ir, ae_vi, fusion, pairs, batch_size=3)
    assert fusion.training and fusion.decoder_fusion.conv1.training  # eval only inside the call
    singles = fuse_images(ae_ir, ae_vi, fusion, pairs, batch_size=1)
    assert [b.shape for b in batched] == [(101, 113), (48, 64), (101, 113), (101, 113)]
    for b, s in zip(batched, singles):
        assert b.dtype == np.float32 and np.abs(b - s).max() <= 1e-2
    with torch.no_grad():
        in_train_mode = fusion(*ae_ir(as_batch(pairs[1][0])), *ae_vi(as_batch(pairs[1][1]))).fused
    assert np.abs(in_train_mode[0, 0].numpy() - batched[1]).max() > 1e-2  # BatchNorm running stats were used


def test_inference_input_errors(networks):
    ae_ir, ae_vi, fusion = networks
    with pytest.raises(InputSizeError, match="15x40"):
        fuse_batch(ae_ir, ae_vi, fusion, torch.zeros(1, 1, 15, 40), torch.zeros(1, 1, 15, 40))
    with pytest.raises(ValueError, match="pair 0"):
        fuse_images(ae_ir, ae_vi, fusion, [(np.zeros((20, 20)), np.zeros((20, 21)))])


def test_quantize_rint_and_truncate():
    values = np.array([0.4, 0.5, 1.5, 2.5, 254.6, 254.99997, 255.0, 300.0, -3.0])
    assert quantize(values).tolist() == [0, 0, 2, 2, 255, 255, 255, 255, 0]
    assert quantize(values, "truncate").tolist() == [0, 0, 1, 2, 254, 254, 255, 255, 0]
    assert quantize(values).dtype == np.uint8
    with pytest.raises(ValueError):
        quantize(values, "round")


def test_eval_mode_restores_nested_flags():
    module = torch.nn.Sequential(torch.nn.BatchNorm2d(2), torch.nn.Dropout())
    module.train()
    module[1].eval()
    with eval_mode(module):
        assert not any(m.training for m in module.modules())
    assert module.training and module[0].training and not module[1].training
