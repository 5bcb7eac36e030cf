"""Per-level RGB + Event feature fusion and the optional pair discriminator (spec/fred.md §2.3).

A level whose single-stream width is c fuses the two streams into c' = max(8, round(2c·r)) channels, where r is
``compression_ratio`` in (0, 1], a fraction of the **concatenated** width (r = .5 keeps bubbliiiing's widths):

- ``concat``: ``compress`` = Conv1×1(2c→c')+BN+SiLU on cat[rgb, event];
- ``add``: rgb + event, parameter-free at r = .5, else ``compress`` = Conv1×1(c→c')+BN+SiLU;
- ``channel_attn``: gate g = σ(fc2(ReLU(fc1(GAP(cat))))) with 1×1 convs 2c→h→2c, h = max(⌊2c/16⌋, 8),
  then ``compress``(cat ⊙ g).
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fred.model import FUSION_MODES, Conv


def fused_width(channels: int, compression_ratio: float) -> int:
    """Output width c' = max(8, round(2c·r)) (Python's round) for a stream width c."""
    return max(8, round(2 * channels * compression_ratio))


class ConcatFusion(nn.Module):
    """Concatenate both streams and compress with a 1×1 Conv block."""

    def __init__(self, channels: int, compression_ratio: float):
        super().__init__()
        self.out_channels = fused_width(channels, compression_ratio)
        self.compress = Conv(2 * channels, self.out_channels, 1)

    def forward(self, rgb: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
        """Fused map [B, c', H, W]."""
        return self.compress(torch.cat([rgb, event], 1))


class AddFusion(nn.Module):
    """Element-wise sum; a 1×1 Conv block maps c to c' only when r ≠ .5."""

    def __init__(self, channels: int, compression_ratio: float):
        super().__init__()
        self.out_channels = fused_width(channels, compression_ratio)
        self.compress = Conv(channels, self.out_channels, 1) if compression_ratio != 0.5 else None

    def forward(self, rgb: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
        """Fused map [B, c', H, W]."""
        summed = rgb + event
        return summed if self.compress is None else self.compress(summed)


class SqueezeExcite(nn.Module):
    """Channel gate σ(fc2(ReLU(fc1(GAP(x))))) with 1×1 convs (with bias)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gates [B, C, 1, 1] in (0, 1)."""
        return torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class ChannelAttentionFusion(nn.Module):
    """SE-gated concatenation followed by the 1×1 compression."""

    def __init__(self, channels: int, compression_ratio: float):
        super().__init__()
        self.out_channels = fused_width(channels, compression_ratio)
        self.se = SqueezeExcite(2 * channels, max(2 * channels // 16, 8))
        self.compress = Conv(2 * channels, self.out_channels, 1)

    def gates(self, rgb: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
        """The channel gates g [B, 2c, 1, 1] for a pair of feature maps."""
        return self.se(torch.cat([rgb, event], 1))

    def forward(self, rgb: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
        """Fused map [B, c', H, W]."""
        both = torch.cat([rgb, event], 1)
        return self.compress(both * self.se(both))


_FUSION_CLASSES = {"concat": ConcatFusion, "add": AddFusion, "channel_attn": ChannelAttentionFusion}


def build_fusion(mode: str, channels: int, compression_ratio: float) -> nn.Module:
    """The fusion module of one level; it exposes ``out_channels``."""
    if mode not in FUSION_MODES:
        raise ValueError(f"unknown fusion_mode {mode!r}; choose one of {FUSION_MODES}")
    if not 0.0 < compression_ratio <= 1.0:
        raise ValueError(f"compression_ratio must lie in (0, 1], got {compression_ratio}")
    return _FUSION_CLASSES[mode](channels, compression_ratio)


class PairDiscriminator(nn.Module):
    """GAP(fused C5) -> ``fc1`` Linear(c'₃→128) -> SiLU -> ``fc2`` Linear(128→1): one logit per sample."""

    def __init__(self, channels: int, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, fused_c5: torch.Tensor) -> torch.Tensor:
        """Logits [B] ("is a true pair")."""
        return self.fc2(self.act(self.fc1(fused_c5.mean(dim=(2, 3))))).squeeze(1)


def negative_pair_valid(sequence_ids: Sequence[Hashable], times_s: Sequence[float],
                        drop_rgb: torch.Tensor | None = None, drop_event: torch.Tensor | None = None,
                        same_sequence_window_s: float = 1.0) -> torch.Tensor:
    """Which rolled negatives count: the negative of sample i pairs RGB i with event i-1 (``torch.roll`` by one).

    A negative is masked when its partner comes from the same sequence within ``same_sequence_window_s``
    (a near-duplicate, not a wrong pair), when RGB i or event i-1 was dropped, or when the batch has < 2 samples.
    Returns a CPU bool tensor [B].
    """
    batch = len(sequence_ids)
    if len(times_s) != batch:
        raise ValueError(f"{len(times_s)} times for {batch} sequence ids")
    valid = torch.zeros(batch, dtype=torch.bool)
    if batch < 2:
        return valid
    for i in range(batch):
        j = (i - 1) % batch
        close_in_time = abs(float(times_s[i]) - float(times_s[j])) <= same_sequence_window_s
        near_duplicate = sequence_ids[i] == sequence_ids[j] and close_in_time
        valid[i] = not near_duplicate
    if drop_rgb is not None:
        valid &= ~drop_rgb.detach().cpu().bool()
    if drop_event is not None:
        valid &= ~torch.roll(drop_event.detach().cpu().bool(), shifts=1, dims=0)
    return valid


def positive_pair_valid(batch: int, drop_rgb: torch.Tensor | None = None,
                        drop_event: torch.Tensor | None = None) -> torch.Tensor:
    """True pairs that count: both streams present. Returns a CPU bool tensor [B]."""
    valid = torch.ones(batch, dtype=torch.bool)
    for dropped in (drop_rgb, drop_event):
        if dropped is not None:
            valid &= ~dropped.detach().cpu().bool()
    return valid


def pair_disc_loss(positive_logits: torch.Tensor, negative_logits: torch.Tensor,
                   positive_valid: torch.Tensor | None = None,
                   negative_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean BCE-with-logits over the valid entries (target 1 for true pairs, 0 for negatives) and pair accuracy.

    The loss is 0 for a batch with fewer than 2 samples or no valid entry, but always stays connected to the
    logits, so every discriminator parameter receives a (zero) gradient, as DDP requires. Accuracy is NaN when
    no entry is valid. Computed in fp32.
    """
    batch = positive_logits.shape[0]
    device = positive_logits.device
    logits = torch.cat([positive_logits, negative_logits]).float()
    targets = torch.cat([torch.ones(batch, device=device), torch.zeros(batch, device=device)])
    pos_w = torch.ones(batch, device=device) if positive_valid is None else positive_valid.to(device).float()
    neg_w = torch.ones(batch, device=device) if negative_valid is None else negative_valid.to(device).float()
    weights = torch.cat([pos_w, neg_w]) * float(batch >= 2)
    count = weights.sum()
    per_entry = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss = (per_entry * weights).sum() / count.clamp(min=1.0)
    correct = ((logits.detach() > 0).float() == targets).float()
    accuracy = torch.where(count > 0, (correct * weights).sum() / count.clamp(min=1.0),
                           torch.full_like(count, float("nan")))
    return loss, accuracy
