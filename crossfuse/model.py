"""CrossFuse networks with the official module names and state-dict keys (spec §2).

- `AutoEncoder` = official `Auto_Encoder_single`: dense-block encoder (`fea_encoder1`) giving a full-resolution
  shallow feature sh (B,32,H,W) and a 1/8 deep feature de (B,128,H/8,W/8), plus the stage-1 reconstruction
  decoder (`recon_decoder1`).
- `CrossEncoder` = official `cross_encoder`: two self-attention stages per modality and a cross-attention
  stage with re-softmax, on 2x2-patch tokens of one deep-feature window.
- `FusionNet` = official `Trans_FuseNet`: windowed CAM (`cross_atten_block`), the unused Laplacian
  `conv_gra` and the fusion decoder (`decoder_fusion`) with detached skip weights.
- `CrossFuseModel` joins two auto-encoders and a fusion net for stage-2 and end-to-end training.

Images are (B,1,H,W) float tensors in 0..255. Initialisation is PyTorch's layer defaults, as in the original.
"""

from __future__ import annotations

import contextlib
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import DataError
from crossfuse.windows import WINDOW, apply_windowed

SHALLOW_CHANNELS = 32
DENSE_GROWTH = 64
DENSE_LAYERS = 3
DEEP_CHANNELS = 128
PATCH = 2
EMBED_DIM = DEEP_CHANNELS * PATCH * PATCH  # 512
HEADS = 16
MLP_RATIO = 4
LAYER_NORM_EPS = 1e-6
RATIO_EPS = 1e-6  # the official EPSILON of the skip-weight ratios and of the output min-max
TEMPERATURE_FLOOR = 1e-4
MIN_IMAGE_SIDE = 16
LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))

DeepWeightMode = Literal["signed", "abs"]


class InputSizeError(DataError, ValueError):
    """An image batch CrossFuse cannot process: not (B,1,H,W), smaller than 16x16, or IR/VIS shapes differ."""


def check_image_size(x: torch.Tensor) -> None:
    """Raise `InputSizeError` unless `x` is a (B,1,H,W) batch with H, W >= 16."""
    if x.dim() != 4 or x.shape[1] != 1:
        raise InputSizeError(f"expected a (B,1,H,W) grayscale batch, got shape {tuple(x.shape)}")
    if min(x.shape[-2:]) < MIN_IMAGE_SIDE:
        raise InputSizeError(
            f"image of {x.shape[-2]}x{x.shape[-1]} pixels is too small; CrossFuse needs at least "
            f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}"
        )


def pad_to_size(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Reflect-pad `x` to (height, width): left/top get floor(d/2), right/bottom the rest (official shape adjust)."""
    d_h, d_w = height - x.shape[-2], width - x.shape[-1]
    if d_h == 0 and d_w == 0:
        return x
    return F.pad(x, (d_w // 2, d_w - d_w // 2, d_h // 2, d_h - d_h // 2), mode="reflect")


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2 upsampling."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


# --------------------------------------------------------------------------------------------------------------
# Convolutional parts


class ConvLayer(nn.Module):
    """ReflectionPad2d(k//2) then `conv2d` = Sequential(Conv2d[, BatchNorm2d]); no activation (official)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, batch_norm: bool = False):
        super().__init__()
        self.reflection_pad = nn.ReflectionPad2d(kernel_size // 2)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, stride=1)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        self.conv2d = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad and convolve."""
        return self.conv2d(self.reflection_pad(x))


class DenseConvLayer(ConvLayer):
    """Dense layer: y = concat(x, conv3x3(x)), input first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the input with its convolution along channels."""
        return torch.cat((x, super().forward(x)), dim=1)


class DenseBlock(nn.Module):
    """Three dense layers (growth 64) followed by `adjust_conv` 3x3 to 128 channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        for i in range(DENSE_LAYERS):
            self.add_module(f"dense_conv{i}", DenseConvLayer(in_channels + i * DENSE_GROWTH, DENSE_GROWTH, 3))
        self.adjust_conv = ConvLayer(in_channels + DENSE_LAYERS * DENSE_GROWTH, DEEP_CHANNELS, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Grow the features densely, then project to 128 channels."""
        for i in range(DENSE_LAYERS):
            x = getattr(self, f"dense_conv{i}")(x)
        return self.adjust_conv(x)


class Encoder(nn.Module):
    """Official `Encoder` (`fea_encoder1`): conv1 -> sh; pool, dense block, pool, dense block, pool -> de."""

    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(2, 2)
        self.conv1 = ConvLayer(1, SHALLOW_CHANNELS, 3)
        self.dense_blocks = nn.Sequential(
            DenseBlock(SHALLOW_CHANNELS),
            nn.MaxPool2d(2, 2),
            DenseBlock(DEEP_CHANNELS),
            nn.MaxPool2d(2, 2),
        )

    def forward(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map an image in 0..1 to (sh (B,32,H,W), de (B,128,H//8,W//8))."""
        sh = self.conv1(x01)
        return sh, self.dense_blocks(self.pool(sh))


class ReconDecoder(nn.Module):
    """Official `Decoder_rec` (`recon_decoder1`, stage 1 only); no BatchNorm, no activation."""

    def __init__(self):
        super().__init__()
        half, quarter = DEEP_CHANNELS // 2, DEEP_CHANNELS // 4
        self.conv1 = ConvLayer(DEEP_CHANNELS, half, 3)
        self.conv_block = nn.Sequential(
            ConvLayer(half, half, 3),
            nn.Upsample(scale_factor=2),
            ConvLayer(half, quarter, 3),
            nn.Upsample(scale_factor=2),
        )
        self.conv_last = ConvLayer(quarter, 1, 1)

    def forward(self, sh: torch.Tensor, de: torch.Tensor) -> torch.Tensor:
        """Decode de, add the shallow skip and return the reconstruction in 0..1 units."""
        x = self.conv_block(upsample2(self.conv1(de)))
        x = pad_to_size(x, sh.shape[-2], sh.shape[-1]) + sh
        return self.conv_last(x)


class AutoEncoder(nn.Module):
    """Official `Auto_Encoder_single`: one per modality; 26 state-dict keys, 1,254,529 parameters."""

    def __init__(self):
        super().__init__()
        self.fea_encoder1 = Encoder()
        self.recon_decoder1 = ReconDecoder()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a (B,1,H,W) image in 0..255 into (sh, de)."""
        check_image_size(x)
        return self.fea_encoder1(x / 255.0)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-1 path: reconstruct a (B,1,H,W) image in 0..255 (output in 0..255 units, unclamped)."""
        sh, de = self(x)
        return self.recon_decoder1(sh, de) * 255.0


class ReconstructionModel(nn.Module):
    """Stage-1 training wrapper whose `forward` is the reconstruction, so DDP hooks see the whole graph."""

    def __init__(self, autoencoder: AutoEncoder):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the reconstruction of `x` (B,1,H,W) in 0..255 units."""
        return self.autoencoder.reconstruct(x)


# --------------------------------------------------------------------------------------------------------------
# Cross-attention module (CAM)


def patches_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B,C,h,w), h and w even -> (B, h/2*w/2, 4C): token n = patch (i,j) row-major, feature 4c+2r+s."""
    b, c, h, w = x.shape
    if h % PATCH or w % PATCH:
        raise ValueError(f"token maps need even sides, got {h}x{w}")
    x = x.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def tokens_to_patches(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `patches_to_tokens`: (B,N,4C) -> (B,C,height,width)."""
    b = tokens.shape[0]
    c = tokens.shape[-1] // (PATCH * PATCH)
    x = tokens.reshape(b, height // PATCH, width // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


class Mlp(nn.Module):
    """Two-layer MLP 512 -> 2048 -> 512 with erf GELU (dropout 0 in CrossFuse, so none is applied)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply fc1, GELU, fc2."""
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head attention; in cross mode it uses q/k/v_linear and the re-softmax softmax(-q.k^T*scale/tau).

    The cross blocks keep the official, unused `qkv` for strict loading. `temperature` (cross mode, optional)
    is one learnable scalar per block, initialised to 1; the divisor is max(tau, 1e-4).
    """

    def __init__(self, dim: int, heads: int, cross: bool, learnable_temperature: bool = False):
        super().__init__()
        if learnable_temperature and not cross:
            raise ValueError("a temperature exists only in cross-attention blocks")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.cross = cross
        self.register_parameter("temperature", nn.Parameter(torch.ones(1)) if learnable_temperature else None)
        self.qkv = nn.Linear(dim, dim * 3)
        if cross:
            self.q_linear = nn.Linear(dim, dim)
            self.k_linear = nn.Linear(dim, dim)
            self.v_linear = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B,N,D) -> (B,heads,N,head_dim); head h takes features [32h, 32h+32)."""
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def project(
        self, query: torch.Tensor, key_value: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return per-head (q, k, v), each (B,heads,N,head_dim); self mode uses `qkv` rows [q | k | v]."""
        if self.cross:
            return (
                self._split_heads(self.q_linear(query)),
                self._split_heads(self.k_linear(key_value)),
                self._split_heads(self.v_linear(key_value)),
            )
        b, n, dim = query.shape
        qkv = self.qkv(query).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Attention matrix (B,heads,N,N) in float32: softmax(q.k^T*scale), negated and divided by tau in cross mode."""
        logits = (q @ k.transpose(-2, -1)).float() * self.scale
        if self.cross:
            logits = -logits
            if self.temperature is not None:
                logits = logits / self.temperature.float().clamp(min=TEMPERATURE_FLOOR)
        return logits.softmax(dim=-1)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from `query` tokens (B,N,D) to themselves, or to `key_value` tokens in cross mode."""
        q, k, v = self.project(query, key_value)
        attn = self.attention_weights(q, k).to(v.dtype)
        out = (attn @ v).transpose(1, 2).flatten(2)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block (`norm1`, `attn`, `norm2`, `mlp`).

    Self mode: x += attn(LN1 x); x += MLP(LN2 x). Cross mode: q and kv sources share `norm1`, the residual
    is the raw key/value source: y = kv + attn(LN1 q, LN1 kv); y += MLP(LN2 y).
    """

    def __init__(self, dim: int, heads: int, cross: bool, learnable_temperature: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, heads, cross, learnable_temperature)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, dim * MLP_RATIO)

    def forward(self, x: torch.Tensor, key_value: torch.Tensor | None = None) -> torch.Tensor:
        """Self mode: `forward(x)`; cross mode: `forward(query_source, key_value_source)`."""
        if key_value is None:
            y = x + self.attn(self.norm1(x))
        else:
            y = key_value + self.attn(self.norm1(x), self.norm1(key_value))
        return y + self.mlp(self.norm2(y))


class SelfAttentionModule(nn.Module):
    """Official `self_atten_module` (depth 1). Its final `norm` is never applied (kept for strict loading)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(EMBED_DIM, HEADS, cross=False)])
        self.norm = nn.LayerNorm(EMBED_DIM, eps=LAYER_NORM_EPS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Self-attend over (B,N,512) tokens."""
        for block in self.blocks:
            tokens = block(tokens)
        return tokens


class CrossAttentionModule(nn.Module):
    """Official `cross_atten_module` (depth 1): one cross block, then the final `norm`."""

    def __init__(self, learnable_temperature: bool):
        super().__init__()
        self.blocks = nn.ModuleList([Block(EMBED_DIM, HEADS, cross=True, learnable_temperature=learnable_temperature)])
        self.norm = nn.LayerNorm(EMBED_DIM, eps=LAYER_NORM_EPS)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
        """Attend from `query` tokens to `key_value` tokens and normalise the result."""
        return self.norm(self.blocks[0](query, key_value))


class SelfAttentionPair(nn.Module):
    """Official `self_atten`: `self_atten1` for IR and `self_atten2` for VIS, on maps in and out."""

    def __init__(self):
        super().__init__()
        self.self_atten1 = SelfAttentionModule()
        self.self_atten2 = SelfAttentionModule()

    def forward(self, ir: torch.Tensor, vi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention on each (B,128,h,w) map, h and w even."""
        h, w = ir.shape[-2:]
        ir_out = self.self_atten1(patches_to_tokens(ir))
        vi_out = self.self_atten2(patches_to_tokens(vi))
        return tokens_to_patches(ir_out, h, w), tokens_to_patches(vi_out, h, w)


class CrossAttentionPair(nn.Module):
    """Official `cross_atten`: c1 = `cross_atten1`(q=IR, kv=VIS), c2 = `cross_atten2`(q=VIS, kv=IR); returns c1+c2."""

    def __init__(self, learnable_temperature: bool):
        super().__init__()
        self.cross_atten1 = CrossAttentionModule(learnable_temperature)
        self.cross_atten2 = CrossAttentionModule(learnable_temperature)

    def forward(self, ir: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
        """Fuse two (B,128,h,w) maps into one (B,128,h,w) map."""
        h, w = ir.shape[-2:]
        ir_tokens, vi_tokens = patches_to_tokens(ir), patches_to_tokens(vi)
        fused = self.cross_atten1(ir_tokens, vi_tokens) + self.cross_atten2(vi_tokens, ir_tokens)
        return tokens_to_patches(fused, h, w)


class CrossEncoder(nn.Module):
    """Official `cross_encoder`: self-attention twice per modality, then cross attention, on one window.

    No positional embedding. With `shift`, the second self-attention stage runs on maps rolled by
    (-s/2, -s/2) rounded down to whole patches (16 for the official 32 window) and rolled back after; for
    position-free attention that only permutes tokens, so it changes results by rounding only.
    """

    def __init__(self, learnable_temperature: bool = False, shift: bool = False):
        super().__init__()
        self.shift = shift
        self.self_atten_block1 = SelfAttentionPair()
        self.self_atten_block2 = SelfAttentionPair()
        self.cross_atten_block = CrossAttentionPair(learnable_temperature)

    def forward(self, ir_de: torch.Tensor, vi_de: torch.Tensor) -> torch.Tensor:
        """Fuse two (B,128,s_h,s_w) deep-feature windows (even sides) into the CAM output of the same shape."""
        ir, vi = self.self_atten_block1(ir_de, vi_de)
        if self.shift:
            h, w = ir.shape[-2:]
            offset = (PATCH * (h // (2 * PATCH)), PATCH * (w // (2 * PATCH)))
            rolled = [torch.roll(t, (-offset[0], -offset[1]), (2, 3)) for t in (ir, vi)]
            ir, vi = self.self_atten_block2(*rolled)
            ir, vi = torch.roll(ir, offset, (2, 3)), torch.roll(vi, offset, (2, 3))
        else:
            ir, vi = self.self_atten_block2(ir, vi)
        return self.cross_atten_block(ir, vi)

    def temperatures(self) -> list[nn.Parameter]:
        """The learnable temperatures of the two cross blocks (empty when disabled)."""
        blocks = (self.cross_atten_block.cross_atten1.blocks[0], self.cross_atten_block.cross_atten2.blocks[0])
        return [b.attn.temperature for b in blocks if b.attn.temperature is not None]


# --------------------------------------------------------------------------------------------------------------
# Fusion decoder


def _autocast_off(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context disabling autocast on `x`'s device type."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class Weight(nn.Module):
    """Official `Weight`: frozen box filters S(x) = (1/9) sum over channels and 3x3 (zero padding).

    Deep skip: g = S(de) (signed, official) or |S(de)| (`deep_weight='abs'`); shallow skip g = |sh - S(sh)|;
    w_ir = g_ir / (g_ir + g_vi + 1e-6), w_vi likewise; all detached. Computed in float32 outside autocast.
    """

    def __init__(self, deep_weight: DeepWeightMode = "signed"):
        super().__init__()
        if deep_weight not in ("signed", "abs"):
            raise ValueError(f"deep_weight must be 'signed' or 'abs', got {deep_weight!r}")
        self.deep_weight = deep_weight
        self.conv_sh = nn.Conv2d(SHALLOW_CHANNELS, SHALLOW_CHANNELS, 3, padding=1, bias=False)
        self.conv_de = nn.Conv2d(DEEP_CHANNELS, DEEP_CHANNELS, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv_sh.weight.fill_(1.0 / 9.0)
            self.conv_de.weight.fill_(1.0 / 9.0)
        self.requires_grad_(False)

    @staticmethod
    def _ratios(g_ir: torch.Tensor, g_vi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = g_ir + g_vi + RATIO_EPS
        return g_ir / total, g_vi / total

    def for_sh(self, ir_sh: torch.Tensor, vi_sh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shallow skip weights (w_ir, w_vi), (B,32,H,W), float32, detached."""
        with torch.no_grad(), _autocast_off(ir_sh):
            ir_sh, vi_sh = ir_sh.float(), vi_sh.float()
            return self._ratios((ir_sh - self.conv_sh(ir_sh)).abs(), (vi_sh - self.conv_sh(vi_sh)).abs())

    def for_de(self, ir_de: torch.Tensor, vi_de: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Deep skip weights (w_ir, w_vi), (B,128,h,w), float32, detached; signed unless `deep_weight='abs'`."""
        with torch.no_grad(), _autocast_off(ir_de):
            g_ir, g_vi = self.conv_de(ir_de.float()), self.conv_de(vi_de.float())
            if self.deep_weight == "abs":
                g_ir, g_vi = g_ir.abs(), g_vi.abs()
            return self._ratios(g_ir, g_vi)


class FusionDecoder(nn.Module):
    """Official `Decoder_fusion` (`decoder_fusion`): every ConvLayer has BatchNorm at index 1, no activation.

    With `freeze_output_norm` the affine scale and shift of the last BatchNorm (`conv_last.conv2d.1`) keep their
    initial 1 and 0 (requires_grad False; the keys stay). The per-image min-max output is exactly invariant to that
    shift and, up to the sign, to that scale: the loss reaches them only through the 1e-6 of the min-max and
    rounding. Adam scales that tiny but steady gradient up to full-size steps, which drive the scale through zero
    within a few dozen updates at the demo's decoder rate; the output then flips to its negative, and the gradient
    spike of the crossing freezes the scale wherever it overshot (Adam's second moment), often below zero.
    """

    def __init__(self, deep_weight: DeepWeightMode = "signed", freeze_output_norm: bool = False):
        super().__init__()
        half, quarter = DEEP_CHANNELS // 2, DEEP_CHANNELS // 4
        self.conv1 = ConvLayer(DEEP_CHANNELS, half, 3, batch_norm=True)
        self.conv_block = nn.Sequential(
            ConvLayer(half, half, 3, batch_norm=True),
            nn.Upsample(scale_factor=2),
            ConvLayer(half, quarter, 3, batch_norm=True),
            nn.Upsample(scale_factor=2),
            ConvLayer(quarter, quarter, 3, batch_norm=True),
        )
        self.conv_last = ConvLayer(quarter, 1, 1, batch_norm=True)
        if freeze_output_norm:
            self.conv_last.conv2d[1].requires_grad_(False)
        self.weight = Weight(deep_weight)

    def forward(
        self, ir_sh: torch.Tensor, vi_sh: torch.Tensor, ir_de: torch.Tensor, vi_de: torch.Tensor, cam: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the raw decoder output z (B,1,H,W) and the deep IR skip weight w_ir (B,128,h,w)."""
        w_ir, w_vi = self.weight.for_de(ir_de, vi_de)
        z = cam + w_ir * ir_de + w_vi * vi_de
        z = self.conv_block(upsample2(self.conv1(z)))
        z = pad_to_size(z, ir_sh.shape[-2], ir_sh.shape[-1])
        ws_ir, ws_vi = self.weight.for_sh(ir_sh, vi_sh)
        z = z + 0.5 * ws_ir * ir_sh + ws_vi * vi_sh
        return self.conv_last(z), w_ir


def minmax_to_255(z: torch.Tensor) -> torch.Tensor:
    """Per-image 255*(z - min)/(max - min + 1e-6) in float32 outside autocast."""
    with _autocast_off(z):
        z = z.float()
        flat = z.flatten(1)
        z_min = flat.min(dim=1).values.view(-1, 1, 1, 1)
        z_max = flat.max(dim=1).values.view(-1, 1, 1, 1)
        return 255.0 * (z - z_min) / (z_max - z_min + RATIO_EPS)


class FusionOutput(NamedTuple):
    """Fusion result: `fused` (B,1,H,W) float32 in 0..255; detached 0-dim logging tensors `temperature`
    (mean cross-attention temperature, 1 when disabled) and `deep_weight_absmax` (max |w_ir| of the deep skip)."""

    fused: torch.Tensor
    temperature: torch.Tensor
    deep_weight_absmax: torch.Tensor


class FusionNet(nn.Module):
    """Official `Trans_FuseNet`: 134 state-dict keys (136 with temperature), 20,801,123 parameters.

    Args:
        learnable_temperature: one learnable temperature per cross block (spec §2.2; off = official net).
        shift: roll the second self-attention stage by half a window (a no-op up to rounding).
        deep_weight: 'signed' (official) or 'abs' deep skip ratio.
        window_batch: how many deep-feature windows the CAM processes at once.
        freeze_output_norm: keep the decoder's last BatchNorm scale and shift at 1 and 0 (see `FusionDecoder`).
    """

    def __init__(
        self,
        learnable_temperature: bool = False,
        shift: bool = False,
        deep_weight: DeepWeightMode = "signed",
        window_batch: int = 64,
        freeze_output_norm: bool = False,
    ):
        super().__init__()
        if window_batch < 1:
            raise ValueError(f"window_batch must be positive, got {window_batch}")
        self.window_batch = window_batch
        self.cross_atten_block = CrossEncoder(learnable_temperature, shift)
        self.conv_gra = nn.Conv2d(SHALLOW_CHANNELS, SHALLOW_CHANNELS, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv_gra.weight.copy_(torch.tensor(LAPLACIAN).expand(SHALLOW_CHANNELS, SHALLOW_CHANNELS, 3, 3))
        self.decoder_fusion = FusionDecoder(deep_weight, freeze_output_norm)

    @property
    def learnable_temperature(self) -> bool:
        """Whether the cross blocks carry learnable temperatures."""
        return bool(self.cross_atten_block.temperatures())

    def mean_temperature(self) -> torch.Tensor:
        """Detached mean of the cross-attention temperatures (1.0 when disabled), a 0-dim float32 tensor."""
        temps = self.cross_atten_block.temperatures()
        if not temps:
            return torch.ones((), device=self.conv_gra.weight.device)
        return torch.cat([t.detach().float() for t in temps]).mean()

    def cam(self, ir_de: torch.Tensor, vi_de: torch.Tensor) -> torch.Tensor:
        """Windowed CAM over deep maps of any size >= 2x2 (spec §2.4)."""
        return apply_windowed(self.cross_atten_block, ir_de, vi_de, self.window_batch, WINDOW)

    def forward(
        self, ir_sh: torch.Tensor, ir_de: torch.Tensor, vi_sh: torch.Tensor, vi_de: torch.Tensor
    ) -> FusionOutput:
        """Fuse encoder features (sh (B,32,H,W), de (B,128,H//8,W//8) per modality) into F in 0..255."""
        z, w_ir = self.decoder_fusion(ir_sh, vi_sh, ir_de, vi_de, self.cam(ir_de, vi_de))
        return FusionOutput(minmax_to_255(z), self.mean_temperature(), w_ir.abs().amax())


class CrossFuseModel(nn.Module):
    """Both auto-encoders and the fusion net as one module (one DDP wrapper, one forward).

    With `freeze_encoders` (stage 2) the encoders get requires_grad False, stay in eval mode and run without
    a graph; otherwise (end-to-end) everything trains. The `.model` files are written from the three parts.
    """

    def __init__(
        self, ir_encoder: AutoEncoder, vi_encoder: AutoEncoder, fusion: FusionNet, freeze_encoders: bool = False
    ):
        super().__init__()
        self.ir_encoder = ir_encoder
        self.vi_encoder = vi_encoder
        self.fusion = fusion
        self.freeze_encoders = freeze_encoders
        if freeze_encoders:
            self.ir_encoder.requires_grad_(False)
            self.vi_encoder.requires_grad_(False)
            self.train(self.training)

    def train(self, mode: bool = True) -> "CrossFuseModel":
        """Set train/eval mode; frozen encoders always stay in eval mode."""
        super().train(mode)
        if self.freeze_encoders:
            self.ir_encoder.eval()
            self.vi_encoder.eval()
        return self

    def encode(self, ir: torch.Tensor, vi: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Return (ir_sh, ir_de, vi_sh, vi_de) for (B,1,H,W) images in 0..255."""
        if ir.shape != vi.shape:
            raise InputSizeError(f"IR and VIS batches differ in shape: {tuple(ir.shape)} vs {tuple(vi.shape)}")
        with torch.no_grad() if self.freeze_encoders else contextlib.nullcontext():
            ir_sh, ir_de = self.ir_encoder(ir)
            vi_sh, vi_de = self.vi_encoder(vi)
        return ir_sh, ir_de, vi_sh, vi_de

    def forward(self, ir: torch.Tensor, vi: torch.Tensor) -> FusionOutput:
        """Fuse (B,1,H,W) IR and VIS images in 0..255; see `FusionOutput`."""
        return self.fusion(*self.encode(ir, vi))


def parameter_groups(model: CrossFuseModel) -> list[dict]:
    """Optimizer parameter groups by name (spec §4.1), as dicts with `name` and `params` for torch optimizers.

    Stage 2 (frozen encoders): `cam` (cross_atten_block incl. temperatures, conv_gra) and `decoder`
    (decoder_fusion without the frozen `Weight`). End-to-end adds `ir_encoder` and `vi_encoder` (whole
    auto-encoders) in front. Parameters that never get a gradient stay in their groups: Adam skips them.
    """
    fusion = model.fusion
    groups = []
    if not model.freeze_encoders:
        groups.append({"name": "ir_encoder", "params": list(model.ir_encoder.parameters())})
        groups.append({"name": "vi_encoder", "params": list(model.vi_encoder.parameters())})
    cam = [*fusion.cross_atten_block.parameters(), *fusion.conv_gra.parameters()]
    groups.append({"name": "cam", "params": [p for p in cam if p.requires_grad]})
    groups.append({"name": "decoder", "params": [p for p in fusion.decoder_fusion.parameters() if p.requires_grad]})
    return groups
