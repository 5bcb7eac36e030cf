"""YOLOv5 (v5.0) detector for FRED: bubbliiiing's CSPDarknet, neck and heads, single-stream and RGB+Event dual.

Module names and the concat order reproduce bubbliiiing ``nets/CSPdarknet.py`` / ``nets/yolo.py`` exactly, so
a single-stream state dict is key- and shape-compatible with bubbliiiing's ``YoloBody`` (spec/fred.md §2.1-2.2).
The dual model has two independent backbones (``backbone_rgb``, ``backbone_event``) fused at the three
feature levels by ``fusion.{0,1,2}`` (§2.3, modules in :mod:`fred.fusion`); only the input widths of the
three input-side neck modules follow the fused widths.

Every model returns the raw head maps ``(out0, out1, out2)`` at strides 32, 16 and 8, each
``[B, 3*(5+nc), H/stride, W/stride]`` with per-anchor blocks ``[tx, ty, tw, th, obj, cls...]``.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

ANCHORS: tuple[tuple[int, int], ...] = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119),
                                        (116, 90), (156, 198), (373, 326))
ANCHORS_MASK: tuple[tuple[int, int, int], ...] = ((6, 7, 8), (3, 4, 5), (0, 1, 2))
STRIDES: tuple[int, int, int] = (32, 16, 8)

# phi -> (depth multiple, width multiple), bubbliiiing's depth_dict / width_dict plus the demo's 'n'.
PHI_MULTIPLES: dict[str, tuple[float, float]] = {
    "n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.00, 1.00), "x": (1.33, 1.25),
}
FUSION_MODES: tuple[str, ...] = ("concat", "add", "channel_attn")
MODALITIES: tuple[str, ...] = ("rgb", "event", "dual")


def phi_channels_depth(phi: str) -> tuple[int, int]:
    """Base channels C = int(64·w) and depth d = max(round(3·dm), 1) for a phi (§2.1)."""
    if phi not in PHI_MULTIPLES:
        raise ValueError(f"unknown phi {phi!r}; choose one of {sorted(PHI_MULTIPLES)}")
    depth_multiple, width_multiple = PHI_MULTIPLES[phi]
    return int(width_multiple * 64), max(round(depth_multiple * 3), 1)


class Conv(nn.Module):
    """Conv2d (padding k//2, no bias) -> BatchNorm2d(eps 1e-3, momentum .03) -> SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=0.001, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply conv, BN and SiLU."""
        return self.act(self.bn(self.conv(x)))


class Focus(nn.Module):
    """Space-to-depth: concatenate the four (row, col) phase slices, then Conv(4·c1, c2, k)."""

    def __init__(self, c1: int, c2: int, k: int = 1):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Slices in the order (0::2,0::2), (1::2,0::2), (0::2,1::2), (1::2,1::2) as (row, col)."""
        return self.conv(torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1))


class Bottleneck(nn.Module):
    """1×1 then 3×3 Conv, with a residual connection when ``shortcut`` and the widths agree."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = Conv(c1, c2, 1)
        self.cv2 = Conv(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual bottleneck."""
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block: cv3(cat[m(cv1 x), cv2 x]) with n Bottlenecks on c2/2 channels."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        hidden = c2 // 2
        self.cv1 = Conv(c1, hidden, 1)
        self.cv2 = Conv(c1, hidden, 1)
        self.cv3 = Conv(2 * hidden, c2, 1)
        self.m = nn.Sequential(*[Bottleneck(hidden, hidden, shortcut) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Split, transform one branch, merge."""
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], 1))


class SPP(nn.Module):
    """Spatial pyramid pooling: cv2(cat[x, max5(x), max9(x), max13(x)]) with x = cv1(input) on c1/2 channels."""

    def __init__(self, c1: int, c2: int, kernels: Sequence[int] = (5, 9, 13)):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1)
        self.cv2 = Conv(hidden * (len(kernels) + 1), c2, 1)
        self.m = nn.ModuleList([nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2) for k in kernels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool at several scales with stride 1 and merge."""
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [pool(x) for pool in self.m], 1))


class CSPDarknet(nn.Module):
    """YOLOv5 v5.0 backbone; returns (feat1, feat2, feat3) at strides 8/16/32 with 4C/8C/16C channels."""

    def __init__(self, base_channels: int, base_depth: int):
        super().__init__()
        c, d = base_channels, base_depth
        self.stem = Focus(3, c, k=3)
        self.dark2 = nn.Sequential(Conv(c, 2 * c, 3, 2), C3(2 * c, 2 * c, d))
        self.dark3 = nn.Sequential(Conv(2 * c, 4 * c, 3, 2), C3(4 * c, 4 * c, 3 * d))
        self.dark4 = nn.Sequential(Conv(4 * c, 8 * c, 3, 2), C3(8 * c, 8 * c, 3 * d))
        self.dark5 = nn.Sequential(Conv(8 * c, 16 * c, 3, 2), SPP(16 * c, 16 * c),
                                   C3(16 * c, 16 * c, d, shortcut=False))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Three feature maps for the neck."""
        x = self.dark2(self.stem(x))
        feat1 = self.dark3(x)
        feat2 = self.dark4(feat1)
        feat3 = self.dark5(feat2)
        return feat1, feat2, feat3


class _NeckHeads(nn.Module):
    """bubbliiiing's PANet neck and the three 1×1 heads, registered directly on the model (flat key names)."""

    def _build_neck_heads(self, anchors_mask: Sequence[Sequence[int]], num_classes: int, phi: str,
                          feature_widths: Sequence[int]) -> None:
        c, d = phi_channels_depth(phi)
        w1, w2, w3 = feature_widths
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv_for_feat3 = Conv(w3, 8 * c, 1, 1)
        self.conv3_for_upsample1 = C3(8 * c + w2, 8 * c, d, shortcut=False)
        self.conv_for_feat2 = Conv(8 * c, 4 * c, 1, 1)
        self.conv3_for_upsample2 = C3(4 * c + w1, 4 * c, d, shortcut=False)
        self.down_sample1 = Conv(4 * c, 4 * c, 3, 2)
        self.conv3_for_downsample1 = C3(8 * c, 8 * c, d, shortcut=False)
        self.down_sample2 = Conv(8 * c, 8 * c, 3, 2)
        self.conv3_for_downsample2 = C3(16 * c, 16 * c, d, shortcut=False)
        self.yolo_head_P3 = nn.Conv2d(4 * c, len(anchors_mask[2]) * (5 + num_classes), 1)
        self.yolo_head_P4 = nn.Conv2d(8 * c, len(anchors_mask[1]) * (5 + num_classes), 1)
        self.yolo_head_P5 = nn.Conv2d(16 * c, len(anchors_mask[0]) * (5 + num_classes), 1)

    def _neck_heads(self, feat1: torch.Tensor, feat2: torch.Tensor, feat3: torch.Tensor):
        p5 = self.conv_for_feat3(feat3)
        p4 = self.conv3_for_upsample1(torch.cat([self.upsample(p5), feat2], 1))
        p4 = self.conv_for_feat2(p4)
        p3 = self.conv3_for_upsample2(torch.cat([self.upsample(p4), feat1], 1))
        p4 = self.conv3_for_downsample1(torch.cat([self.down_sample1(p3), p4], 1))
        p5 = self.conv3_for_downsample2(torch.cat([self.down_sample2(p4), p5], 1))
        return self.yolo_head_P5(p5), self.yolo_head_P4(p4), self.yolo_head_P3(p3)


class YoloBody(_NeckHeads):
    """Single-stream YOLOv5 v5.0 (bubbliiiing ``YoloBody``, identical keys): ``forward(x) -> (out0, out1, out2)``."""

    backbone_prefixes: tuple[str, ...] = ("backbone",)

    def __init__(self, anchors_mask: Sequence[Sequence[int]], num_classes: int, phi: str):
        super().__init__()
        c, d = phi_channels_depth(phi)
        self.backbone = CSPDarknet(c, d)
        self._build_neck_heads(anchors_mask, num_classes, phi, (4 * c, 8 * c, 16 * c))

    def forward(self, x: torch.Tensor):
        """Raw head outputs for a [B,3,H,W] image batch (H, W multiples of 32)."""
        return self._neck_heads(*self.backbone(x))


def _zero_dropped(features: tuple[torch.Tensor, ...], dropped: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Zero the feature maps of samples whose stream is missing (a multiply, so it traces and exports)."""
    if dropped is None:
        return features
    keep = (~dropped.to(device=features[0].device, dtype=torch.bool)).view(-1, 1, 1, 1)
    return tuple(f * keep.to(f.dtype) for f in features)


class DualYoloBody(_NeckHeads):
    """RGB + Event YOLOv5: two independent CSPDarknets, per-level fusion, then bubbliiiing's neck and heads.

    ``forward(rgb, event, drop_rgb=None, drop_event=None, with_pair_logits=False)``: ``drop_*`` are per-sample
    bool tensors [B]; True zeroes that stream's three feature maps for that sample (missing stream or modality
    dropout). With ``with_pair_logits=True`` (needs ``discriminator=True``) it returns
    ``((out0, out1, out2), (positive_logits [B], negative_logits [B]))``, where the negative of sample i fuses
    its RGB C5 with the event C5 of sample i-1 (``torch.roll`` by one); see :func:`fred.fusion.pair_disc_loss`.
    Under DDP a model built with the discriminator must be called with ``with_pair_logits=True`` in training,
    otherwise ``pair_disc`` parameters would be unused.
    """

    backbone_prefixes: tuple[str, ...] = ("backbone_rgb", "backbone_event")

    def __init__(self, anchors_mask: Sequence[Sequence[int]], num_classes: int, phi: str,
                 fusion_mode: str = "concat", compression_ratio: float = 0.5, discriminator: bool = False):
        super().__init__()
        # fred.fusion builds on this module's Conv, so it is imported here rather than at module import.
        from fred.fusion import PairDiscriminator, build_fusion

        c, d = phi_channels_depth(phi)
        self.fusion_mode = fusion_mode
        self.compression_ratio = compression_ratio
        self.backbone_rgb = CSPDarknet(c, d)
        self.backbone_event = CSPDarknet(c, d)
        self.fusion = nn.ModuleList([build_fusion(fusion_mode, width, compression_ratio)
                                     for width in (4 * c, 8 * c, 16 * c)])
        fused_widths = tuple(module.out_channels for module in self.fusion)
        self._build_neck_heads(anchors_mask, num_classes, phi, fused_widths)
        self.pair_disc = PairDiscriminator(fused_widths[2]) if discriminator else None

    def forward(self, rgb: torch.Tensor, event: torch.Tensor, drop_rgb: torch.Tensor | None = None,
                drop_event: torch.Tensor | None = None, with_pair_logits: bool = False):
        """Raw head outputs (and, on request, the pair discriminator's logits)."""
        rgb_feats = _zero_dropped(self.backbone_rgb(rgb), drop_rgb)
        event_feats = _zero_dropped(self.backbone_event(event), drop_event)
        fused = [fuse(r, e) for fuse, r, e in zip(self.fusion, rgb_feats, event_feats)]
        outputs = self._neck_heads(*fused)
        if not with_pair_logits:
            return outputs
        if self.pair_disc is None:
            raise ValueError("with_pair_logits=True needs a model built with discriminator=True")
        negative = self.fusion[2](rgb_feats[2], torch.roll(event_feats[2], shifts=1, dims=0))
        return outputs, (self.pair_disc(fused[2]), self.pair_disc(negative))


def weights_init(model: nn.Module, gain: float = 0.02) -> nn.Module:
    """bubbliiiing ``weights_init``: conv weights N(0, gain), BN γ N(1, .02) and β 0; biases keep torch's init."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, gain)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.constant_(module.bias, 0.0)
    return model


def build_model(modality: str, phi: str, num_classes: int, fusion_mode: str | None = None,
                compression_ratio: float | None = None, discriminator: bool = False,
                anchors_mask: Sequence[Sequence[int]] = ANCHORS_MASK, init: bool = True) -> nn.Module:
    """Build the model for a modality ('rgb', 'event' -> :class:`YoloBody`; 'dual' -> :class:`DualYoloBody`).

    Dual defaults: ``fusion_mode='concat'``, ``compression_ratio=0.5``. Single-stream models ignore the fusion
    options and the discriminator, with a warning when any was given. ``init`` applies :func:`weights_init`.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; choose one of {MODALITIES}")
    if modality == "dual":
        model = DualYoloBody(anchors_mask, num_classes, phi,
                             fusion_mode="concat" if fusion_mode is None else fusion_mode,
                             compression_ratio=0.5 if compression_ratio is None else compression_ratio,
                             discriminator=discriminator)
    else:
        ignored = [name for name, value in (("fusion_mode", fusion_mode), ("compression_ratio", compression_ratio))
                   if value is not None] + (["discriminator"] if discriminator else [])
        if ignored:
            warnings.warn(f"modality {modality!r} is single-stream: ignoring {', '.join(ignored)}", stacklevel=2)
        model = YoloBody(anchors_mask, num_classes, phi)
    return weights_init(model) if init else model


def backbone_prefixes(model: nn.Module) -> list[str]:
    """Module-name prefixes the freeze stage freezes: ['backbone'] or ['backbone_rgb', 'backbone_event']."""
    if not isinstance(model, (YoloBody, DualYoloBody)):
        raise TypeError(f"expected an unwrapped YoloBody or DualYoloBody, got {type(model).__name__}")
    return list(model.backbone_prefixes)


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the backbone(s), i.e. those frozen in the freeze stage."""
    return [p for prefix in backbone_prefixes(model) for p in getattr(model, prefix).parameters()]


def model_meta(modality: str, phi: str, num_classes: int, class_names: Sequence[str],
               input_shape: Sequence[int], fusion_mode: str | None = None,
               compression_ratio: float | None = None, discriminator: bool = False,
               anchors: Sequence[Sequence[int]] = ANCHORS,
               anchors_mask: Sequence[Sequence[int]] = ANCHORS_MASK) -> dict:
    """The JSON-safe architecture description stored in checkpoints and sidecars (§6.2).

    Keys: modality, phi, nc, class_names, input_shape (height, width), fusion_mode, compression_ratio,
    discriminator, anchors, mask. Single-stream models store ``fusion_mode``/``compression_ratio`` as None.
    """
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
    dual = modality == "dual"
    return {
        "modality": modality,
        "phi": phi,
        "nc": int(num_classes),
        "class_names": [str(n) for n in class_names],
        "input_shape": [int(v) for v in input_shape],
        "fusion_mode": (fusion_mode or "concat") if dual else None,
        "compression_ratio": float(0.5 if compression_ratio is None else compression_ratio) if dual else None,
        "discriminator": bool(discriminator) if dual else False,
        "anchors": [[int(a) for a in pair] for pair in anchors],
        "mask": [[int(i) for i in level] for level in anchors_mask],
    }


def build_model_from_meta(meta: dict, discriminator: bool | None = None, init: bool = True) -> nn.Module:
    """Rebuild the architecture a :func:`model_meta` dict describes (``discriminator`` overrides the stored flag;
    predict/export pass False because exported weights never contain ``pair_disc``)."""
    return build_model(meta["modality"], meta["phi"], meta["nc"], fusion_mode=meta.get("fusion_mode"),
                       compression_ratio=meta.get("compression_ratio"),
                       discriminator=meta.get("discriminator", False) if discriminator is None else discriminator,
                       anchors_mask=meta.get("mask", ANCHORS_MASK), init=init)
