"""The SwinTExCo exemplar branch (Chronopt-Research/SwinTExCo, ESWA 2025; spec/colorize.md §2.3).

- :class:`SwinEmbed` (``embed_net``): a timm Swin backbone with ``features_only``; four NCHW stages, each
  nearest-upsampled x2. Frozen and always in eval mode inside the system.
- :class:`WarpNet` (``nonlocal_net``): adapters bring the four stages to the S/4 grid, three residual blocks mix
  them, and 1x1 ``theta``/``phi`` give the features whose correlation warps the reference colour. Trainable.
- :class:`ColorVidNet` (``colornet``): the ColorVidNet refinement U-Net. Frozen.

State-dict keys equal SwinTExCo's (``src/models/CNN/NonlocalNet.py``, ``src/models/CNN/ColorVidNet.py``,
``src/models/vit/embed.py``), so its checkpoint folders load strictly and exported folders load back into it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_NORM_EPS = float(torch.finfo(torch.float32).eps)
CORRELATION_EPS = 1e-8
SIZE_MULTIPLE = 32


def check_image_size(image_size: int) -> None:
    """Refuse sizes the Swin stages and the S/4 correlation grid cannot tile."""
    if image_size <= 0 or image_size % SIZE_MULTIPLE:
        raise ConfigError(f"--data.image-size must be a positive multiple of {SIZE_MULTIPLE}, got {image_size}")


class SwinEmbed(nn.Module):
    """Frozen Swin feature extractor: RGB in [0, 1] ``[B, 3, S, S]`` -> four NCHW stages, each upsampled x2.

    For ``swinv2_cr_tiny_ns_224`` at S = 224: [B,96,112,112], [B,192,56,56], [B,384,28,28], [B,768,14,14]. The
    input is used without ImageNet mean/std unless ``imagenet_normalize`` (SwinTExCo's weights expect plain RGB).
    ``backbone_kwargs`` override the architecture (the demo's tiny Swin); ``pretrained`` and
    ``pretrained_cfg_overlay`` are passed to timm (weights come from a local file or, when allowed, the hub).
    """

    def __init__(self, backbone: str = "swinv2_cr_tiny_ns_224", image_size: int = 224,
                 backbone_kwargs: dict | None = None, imagenet_normalize: bool = False, pretrained: bool = False,
                 pretrained_cfg_overlay: dict | None = None):
        super().__init__()
        import timm

        check_image_size(image_size)
        extra = dict(backbone_kwargs or {})
        if pretrained_cfg_overlay is not None:
            extra["pretrained_cfg_overlay"] = pretrained_cfg_overlay
        self.pretrained = timm.create_model(backbone, pretrained=pretrained, features_only=True,
                                            out_indices=(0, 1, 2, 3), img_size=(image_size, image_size), **extra)
        self.channels_last = str(getattr(self.pretrained, "output_fmt", "NCHW")).endswith("NHWC")
        self.channels = tuple(self.pretrained.feature_info.channels())
        self.image_size = image_size
        self.imagenet_normalize = imagenet_normalize
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        """The four stages, NCHW, each nearest-upsampled x2."""
        if self.imagenet_normalize:
            rgb = (rgb - self.mean) / self.std
        features = self.pretrained(rgb)
        if self.channels_last:
            features = [feature.permute(0, 3, 1, 2) for feature in features]
        return [F.interpolate(feature, scale_factor=2.0, mode="nearest") for feature in features]


def _conv_unit(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    """ReflectionPad(1), 3x3 conv (no padding), InstanceNorm (no affine), PReLU: SwinTExCo's adapter unit."""
    return [nn.ReflectionPad2d(1), nn.Conv2d(in_channels, out_channels, 3, stride, 0),
            nn.InstanceNorm2d(out_channels), nn.PReLU()]


class ResidualBlock(nn.Module):
    """pad, conv1, IN, PReLU, pad, conv2, IN, + input, the same PReLU (keys conv1, conv2, prelu)."""

    def __init__(self, channels: int):
        super().__init__()
        self.padding1 = nn.ReflectionPad2d(1)
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 0)
        self.norm1 = nn.InstanceNorm2d(channels)
        self.prelu = nn.PReLU()
        self.padding2 = nn.ReflectionPad2d(1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 0)
        self.norm2 = nn.InstanceNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual refinement at constant size."""
        out = self.prelu(self.norm1(self.conv1(self.padding1(x))))
        out = self.norm2(self.conv2(self.padding2(out)))
        return self.prelu(out + x)


def _centre_and_normalize(features: torch.Tensor) -> torch.Tensor:
    """``[B, C, N]`` centred by the spatial mean and L2-normalised over channels (float32)."""
    features = features - features.mean(dim=-1, keepdim=True)
    return features / (features.norm(dim=1, keepdim=True) + CORRELATION_EPS)


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class WarpNet(nn.Module):
    """SwinTExCo's non-local colour warping network with width multiplier ``width`` (1 = SwinTExCo).

    fc = 128w features per stage after the adapters (hidden widths 128w, 128w, 256w, 256w), 4fc after the concat,
    256w correlation channels. Each input stage is L2-normalised per pixel over channels first, as SwinTExCo's
    ``warp_color`` does.
    """

    def __init__(self, width: float = 1.0, in_channels: tuple[int, int, int, int] = (96, 192, 384, 768),
                 dropout: float = 0.2):
        super().__init__()
        features, correlation = _scaled(128, width), _scaled(256, width)
        hidden = (_scaled(128, width), _scaled(128, width), _scaled(256, width), _scaled(256, width))
        c1, c2, c3, c4 = in_channels
        self.width = width
        self.feature_channels = features
        self.inter_channels = correlation
        self.layer2_1 = nn.Sequential(*_conv_unit(c1, hidden[0]), *_conv_unit(hidden[0], features, stride=2),
                                      nn.Dropout(dropout))
        self.layer3_1 = nn.Sequential(*_conv_unit(c2, hidden[1]), *_conv_unit(hidden[1], features),
                                      nn.Dropout(dropout))
        self.layer4_1 = nn.Sequential(*_conv_unit(c3, hidden[2]), *_conv_unit(hidden[2], features),
                                      nn.Upsample(scale_factor=2.0), nn.Dropout(dropout))
        self.layer5_1 = nn.Sequential(*_conv_unit(c4, hidden[3]), nn.Upsample(scale_factor=2.0),
                                      *_conv_unit(hidden[3], features), nn.Upsample(scale_factor=2.0),
                                      nn.Dropout(dropout))
        self.layer = nn.Sequential(*(ResidualBlock(4 * features) for _ in range(3)))
        self.theta = nn.Conv2d(4 * features, correlation, 1)
        self.phi = nn.Conv2d(4 * features, correlation, 1)

    def _mixed_features(self, stages: list[torch.Tensor], grid: int) -> torch.Tensor:
        adapted = []
        for adapter, stage in zip((self.layer2_1, self.layer3_1, self.layer4_1, self.layer5_1), stages):
            stage = stage / (stage.norm(dim=1, keepdim=True) + FEATURE_NORM_EPS)
            out = adapter(stage)
            if out.shape[-2:] != (grid, grid):
                if max(abs(out.shape[-2] - grid), abs(out.shape[-1] - grid)) > 1:
                    raise ValueError(f"adapter output {tuple(out.shape[-2:])} is not on the {grid}x{grid} grid")
                out = F.interpolate(out, size=(grid, grid), mode="nearest")
            adapted.append(out)
        return self.layer(torch.cat(adapted, dim=1))

    def encode_target(self, stages: list[torch.Tensor], grid: int) -> torch.Tensor:
        """theta features of target frames: ``[B, inter, N]`` centred and normalised, N = grid^2."""
        theta = self.theta(self._mixed_features(stages, grid)).flatten(2)
        with torch.autocast(device_type=theta.device.type, enabled=False):
            return _centre_and_normalize(theta.float())

    def encode_reference(self, stages: list[torch.Tensor], grid: int) -> torch.Tensor:
        """phi features of the reference: ``[B, inter, N]`` centred and normalised (computed once per clip)."""
        phi = self.phi(self._mixed_features(stages, grid)).flatten(2)
        with torch.autocast(device_type=phi.device.type, enabled=False):
            return _centre_and_normalize(phi.float())

    @staticmethod
    def correlate(queries: torch.Tensor, keys: torch.Tensor, reference_small: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Warp the pooled reference colour by the correlation, in float32.

        ``queries`` ``[B, C, N]`` (target), ``keys`` ``[B, C, M]`` (reference), ``reference_small`` ``[B, 3, g, g]``
        (the reference LAB average-pooled by 4). Returns ``(warped [B, 3, 4g, 4g], similarity [B, 1, 4g, 4g])``:
        f = theta^T phi, similarity = max_j f in [-1, 1], warped = softmax_j(f / tau) . reference, both
        nearest-upsampled x4.
        """
        with torch.autocast(device_type=queries.device.type, enabled=False):
            batch, channels, grid, _ = reference_small.shape
            correlation = torch.bmm(queries.float().transpose(1, 2), keys.float())
            similarity = correlation.max(dim=-1).values.view(batch, 1, grid, grid)
            weights = torch.softmax(correlation / temperature, dim=-1)
            colours = torch.bmm(weights, reference_small.float().flatten(2).transpose(1, 2))
            warped = colours.transpose(1, 2).reshape(batch, channels, grid, grid)
            return (F.interpolate(warped, scale_factor=4.0, mode="nearest"),
                    F.interpolate(similarity, scale_factor=4.0, mode="nearest"))


_COLORVID_CONVS = (
    ("conv1_2", 64, 64, 1), ("conv2_1", 64, 128, 1), ("conv2_2", 128, 128, 1), ("conv3_1", 128, 256, 1),
    ("conv3_2", 256, 256, 1), ("conv3_3", 256, 256, 1), ("conv4_1", 256, 512, 1), ("conv4_2", 512, 512, 1),
    ("conv4_3", 512, 512, 1), ("conv5_1", 512, 512, 2), ("conv5_2", 512, 512, 2), ("conv5_3", 512, 512, 2),
    ("conv6_1", 512, 512, 2), ("conv6_2", 512, 512, 2), ("conv6_3", 512, 512, 2), ("conv7_1", 512, 512, 1),
    ("conv7_2", 512, 512, 1), ("conv7_3", 512, 512, 1), ("conv3_3_short", 256, 256, 1), ("conv8_2", 256, 256, 1),
    ("conv8_3", 256, 256, 1), ("conv2_2_short", 128, 128, 1), ("conv9_2", 128, 128, 1),
    ("conv1_2_short", 64, 128, 1), ("conv10_2", 128, 128, 1),
)
"""(name, in, out, dilation) of ColorVidNet's plain 3x3 convolutions (padding = dilation)."""
_COLORVID_NORMS = {"conv1_2norm": 64, "conv2_2norm": 128, "conv3_3norm": 256, "conv4_3norm": 512,
                   "conv5_3norm": 512, "conv6_3norm": 512, "conv7_3norm": 512, "conv8_3norm": 256, "conv9_2norm": 128}
_COLORVID_PRELUS = ("relu1_1", "relu1_2", "relu2_1", "relu2_2", "relu3_1", "relu3_2", "relu3_3", "relu4_1",
                    "relu4_2", "relu4_3", "relu5_1", "relu5_2", "relu5_3", "relu6_1", "relu6_2", "relu6_3",
                    "relu7_1", "relu7_2", "relu7_3", "relu8_1_comb", "relu8_2", "relu8_3", "relu9_1_comb",
                    "relu9_2", "relu10_1_comb")


class ColorVidNet(nn.Module):
    """SwinTExCo's ColorVidNet(ic): a dilated U-Net returning the raw 2-channel ``conv10_ab`` (before tanh).

    ``in_channels`` 7 = SwinTExCo (L - 50, warped ab, similarity, previous LAB; output tanh * 128), 4 = FlowChroma
    SwinSingle (L', ab', similarity; output tanh), 8 = FlowChroma FusionNetV1 (the fusion net). The caller
    applies the output scaling.
    """

    def __init__(self, in_channels: int = 7):
        super().__init__()
        self.in_channels = in_channels
        self.conv1_1 = nn.Sequential(nn.Conv2d(in_channels, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 1, 1))
        for name, cin, cout, dilation in _COLORVID_CONVS:
            setattr(self, name, nn.Conv2d(cin, cout, 3, 1, dilation, dilation))
        for name, channels in _COLORVID_NORMS.items():
            setattr(self, name, nn.InstanceNorm2d(channels))
        for name, channels in (("conv1_2norm_ss", 64), ("conv2_2norm_ss", 128), ("conv3_3norm_ss", 256)):
            setattr(self, name, nn.Conv2d(channels, channels, 1, 2, bias=False, groups=channels))
        self.conv8_1 = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(512, 256, 3, 1, 1))
        self.conv9_1 = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(256, 128, 3, 1, 1))
        self.conv10_1 = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(128, 128, 3, 1, 1))
        self.conv10_ab = nn.Conv2d(128, 2, 1, 1)
        for name in _COLORVID_PRELUS:
            setattr(self, name, nn.PReLU())
        self.relu10_2 = nn.LeakyReLU(0.2)

    def _block(self, x: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        for name in names:
            x = getattr(self, "relu" + name[4:])(getattr(self, name)(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw ``conv10_ab`` ``[B, 2, H, W]`` for an input ``[B, in_channels, H, W]`` (H, W divisible by 8)."""
        conv1_2norm = self.conv1_2norm(self._block(x, ("conv1_1", "conv1_2")))
        conv2_2norm = self.conv2_2norm(self._block(self.conv1_2norm_ss(conv1_2norm), ("conv2_1", "conv2_2")))
        conv3_3norm = self.conv3_3norm(self._block(self.conv2_2norm_ss(conv2_2norm),
                                                   ("conv3_1", "conv3_2", "conv3_3")))
        deep = self.conv4_3norm(self._block(self.conv3_3norm_ss(conv3_3norm), ("conv4_1", "conv4_2", "conv4_3")))
        deep = self.conv5_3norm(self._block(deep, ("conv5_1", "conv5_2", "conv5_3")))
        deep = self.conv6_3norm(self._block(deep, ("conv6_1", "conv6_2", "conv6_3")))
        deep = self.conv7_3norm(self._block(deep, ("conv7_1", "conv7_2", "conv7_3")))
        up = self.relu8_1_comb(self.conv8_1(deep) + self.conv3_3_short(conv3_3norm))
        up = self.conv8_3norm(self._block(up, ("conv8_2", "conv8_3")))
        up = self.relu9_1_comb(self.conv9_1(up) + self.conv2_2_short(conv2_2norm))
        up = self.conv9_2norm(self._block(up, ("conv9_2",)))
        up = self.relu10_1_comb(self.conv10_1(up) + self.conv1_2_short(conv1_2norm))
        return self.conv10_ab(self.relu10_2(self.conv10_2(up)))
