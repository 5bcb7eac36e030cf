"""Batched full-resolution CrossFuse inference (spec §7.1).

Images are never resized. Pairs of equal size are stacked into batches, deep-feature windows are folded
into the batch inside `FusionNet`, and the networks run in eval mode (BatchNorm running statistics) under
`torch.inference_mode`, so every output is independent of the batch it was computed in.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn as nn

from crossfuse.model import AutoEncoder, FusionNet, check_image_size

QuantizeMode = Literal["rint", "truncate"]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put `modules` in eval mode for the duration of the block and restore each submodule's mode after."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


def fuse_batch(
    ae_ir: AutoEncoder, ae_vi: AutoEncoder, fusion_net: FusionNet, ir: torch.Tensor, vi: torch.Tensor
) -> torch.Tensor:
    """Fuse a (B,1,H,W) batch of IR and VIS images in 0..255; returns F (B,1,H,W) float32 in 0..255.

    Inputs are moved to the fusion net's device; the result stays there.
    """
    if ir.shape != vi.shape:
        raise ValueError(f"IR and VIS batches differ in shape: {tuple(ir.shape)} vs {tuple(vi.shape)}")
    check_image_size(ir)
    device = next(fusion_net.parameters()).device
    with eval_mode(ae_ir, ae_vi, fusion_net), torch.inference_mode():
        ir, vi = ir.to(device, torch.float32), vi.to(device, torch.float32)
        ir_sh, ir_de = ae_ir(ir)
        vi_sh, vi_de = ae_vi(vi)
        return fusion_net(ir_sh, ir_de, vi_sh, vi_de).fused


def fuse_images(
    ae_ir: AutoEncoder,
    ae_vi: AutoEncoder,
    fusion_net: FusionNet,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    batch_size: int = 8,
) -> list[np.ndarray]:
    """Fuse 2-D (H,W) gray IR/VIS arrays in 0..255 at full resolution, batching pairs of equal size.

    Returns one float32 (H,W) array in 0..255 per pair, in input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, (ir, vi) in enumerate(pairs):
        if ir.ndim != 2 or ir.shape != vi.shape:
            raise ValueError(f"pair {index}: IR {ir.shape} and VIS {vi.shape} must be 2-D gray images of one size")
        by_size[ir.shape].append(index)
    fused: list[np.ndarray | None] = [None] * len(pairs)
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            ir = torch.from_numpy(np.stack([np.asarray(pairs[i][0], np.float32) for i in chunk]))[:, None]
            vi = torch.from_numpy(np.stack([np.asarray(pairs[i][1], np.float32) for i in chunk]))[:, None]
            result = fuse_batch(ae_ir, ae_vi, fusion_net, ir, vi).cpu().numpy()
            for i, image in zip(chunk, result):
                fused[i] = image[0]
    return fused


def quantize(fused: np.ndarray, mode: QuantizeMode = "rint") -> np.ndarray:
    """Fused image in 0..255 to uint8: `rint` rounds half to even then clips; `truncate` is the original
    `astype(uint8)` (floor for non-negative values, so the min-max output never reaches 255)."""
    values = np.asarray(fused, dtype=np.float64)
    if mode == "rint":
        values = np.rint(values)
    elif mode != "truncate":
        raise ValueError(f"quantize mode must be 'rint' or 'truncate', got {mode!r}")
    return np.clip(values, 0, 255).astype(np.uint8)
