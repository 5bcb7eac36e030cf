"""Fusion nets (spec/colorize.md §2.4): 8 input channels -> residual r (2 channels); fused ab = base + tanh(r).

Input channel order: flow LAB (L_t, ab_flow), confidence, exemplar LAB (L_t, ab_ex), similarity.

- :class:`SimpleFusionNet` (default): a 3-level U-Net, widths (c, 2c, 4c), two 3x3 conv + GroupNorm(8) + SiLU per
  level, average-pool down, bilinear up with skip concatenation, 1x1 head; c = 32 has 474,306 parameters.
- :class:`ColorVidFusionNet`: the ColorVidNet layout with 8 inputs, key-compatible with FlowChroma's
  ``FusionNetV1`` (32,802,683 parameters); the image side must be divisible by 8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from colorize.config import FusionConfig
from colorize.swintexco import ColorVidNet

FUSION_INPUT_CHANNELS = 8
GROUPS = 8


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.GroupNorm(GROUPS, out_channels),
                         nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1),
                         nn.GroupNorm(GROUPS, out_channels), nn.SiLU())


class SimpleFusionNet(nn.Module):
    """3-level U-Net fusion net with base width ``width`` (default PyTorch initialisation)."""

    def __init__(self, width: int = 32, in_channels: int = FUSION_INPUT_CHANNELS):
        super().__init__()
        self.width = width
        self.encoder1 = _double_conv(in_channels, width)
        self.encoder2 = _double_conv(width, 2 * width)
        self.encoder3 = _double_conv(2 * width, 4 * width)
        self.decoder2 = _double_conv(4 * width + 2 * width, 2 * width)
        self.decoder1 = _double_conv(2 * width + width, width)
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual ``r`` ``[B, 2, H, W]`` for the 8-channel input ``[B, 8, H, W]`` (H, W divisible by 4)."""
        level1 = self.encoder1(x)
        level2 = self.encoder2(F.avg_pool2d(level1, 2))
        level3 = self.encoder3(F.avg_pool2d(level2, 2))
        up2 = F.interpolate(level3, size=level2.shape[-2:], mode="bilinear", align_corners=False)
        up2 = self.decoder2(torch.cat((up2, level2), dim=1))
        up1 = F.interpolate(up2, size=level1.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.decoder1(torch.cat((up1, level1), dim=1)))


class ColorVidFusionNet(ColorVidNet):
    """ColorVidNet with 8 inputs returning the raw residual (FlowChroma ``FusionNetV1`` keys)."""

    def __init__(self):
        super().__init__(FUSION_INPUT_CHANNELS)


def build_fusion_net(cfg: FusionConfig) -> nn.Module:
    """The fusion net chosen by ``--fusion.arch`` (and ``--fusion.width`` for ``simple``)."""
    if cfg.arch == "colorvid":
        return ColorVidFusionNet()
    return SimpleFusionNet(cfg.width)
