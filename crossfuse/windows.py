"""Windowed application of the cross-attention module to deep feature maps of any size (spec §2.4).

The CAM was trained on 32x32 deep maps (256x256 images). Larger maps are reflect-padded bottom/right to a
multiple of the window, cut into windows that are folded into the batch, processed in chunks, stitched back
in row-major order and cropped.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

WINDOW = 32
MIN_DEEP_EXTENT = 2  # a 16-pixel image side gives a deep side of 2


def window_extent(n: int, window: int = WINDOW) -> int:
    """Window length along a deep-feature axis of length `n` (spec §2.4).

    The official window is used whenever reflect-padding to it is possible (pad < n); shorter axes use
    their own length rounded up to even, so that 2x2 patches tile the window.
    """
    if n < MIN_DEEP_EXTENT:
        raise ValueError(f"deep feature axis of length {n} is too short; CrossFuse needs images of at least 16x16")
    if n >= window or window * -(-n // window) - n < n:
        return window
    return n + n % 2


def to_windows(x: torch.Tensor, win_h: int, win_w: int) -> torch.Tensor:
    """Cut (B,C,H,W), H and W multiples of the window, into (B*nh*nw,C,win_h,win_w), row-major per image."""
    b, c, h, w = x.shape
    nh, nw = h // win_h, w // win_w
    x = x.reshape(b, c, nh, win_h, nw, win_w).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * nh * nw, c, win_h, win_w)


def from_windows(windows: torch.Tensor, batch: int, nh: int, nw: int) -> torch.Tensor:
    """Inverse of `to_windows`: stitch (B*nh*nw,C,h,w) windows back into (B,C,nh*h,nw*w)."""
    _, c, win_h, win_w = windows.shape
    x = windows.reshape(batch, nh, nw, c, win_h, win_w).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(batch, c, nh * win_h, nw * win_w)


def apply_windowed(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ir_de: torch.Tensor,
    vi_de: torch.Tensor,
    window_batch: int = 64,
    window: int = WINDOW,
) -> torch.Tensor:
    """Run `fn(ir_windows, vi_windows)` window by window over two (B,C,h,w) maps and return the (B,C',h,w) result.

    Windows of all images are folded into the batch dimension and processed `window_batch` at a time; the
    result does not depend on the batch size or the chunking because every window is processed independently.
    """
    if ir_de.shape != vi_de.shape:
        raise ValueError(f"IR and VIS deep features differ in shape: {tuple(ir_de.shape)} vs {tuple(vi_de.shape)}")
    if window_batch < 1:
        raise ValueError(f"window_batch must be positive, got {window_batch}")
    batch, _, h, w = ir_de.shape
    win_h, win_w = window_extent(h, window), window_extent(w, window)
    pad_h, pad_w = -h % win_h, -w % win_w
    if pad_h or pad_w:
        ir_de = F.pad(ir_de, (0, pad_w, 0, pad_h), mode="reflect")
        vi_de = F.pad(vi_de, (0, pad_w, 0, pad_h), mode="reflect")
    nh, nw = ir_de.shape[-2] // win_h, ir_de.shape[-1] // win_w
    ir_windows = to_windows(ir_de, win_h, win_w)
    vi_windows = to_windows(vi_de, win_h, win_w)
    outputs = [
        fn(ir_chunk, vi_chunk)
        for ir_chunk, vi_chunk in zip(ir_windows.split(window_batch), vi_windows.split(window_batch))
    ]
    stitched = from_windows(torch.cat(outputs) if len(outputs) > 1 else outputs[0], batch, nh, nw)
    return stitched[:, :, :h, :w]
