"""FusionLoss (spec/colorize.md §3) and the optional RaLSGAN discriminator.

total = (1/T) sum_t [ l1 L1_t + perceptual P_t + [t = 0] (contextual CX + gan G) + [t >= 1] temporal (align_t +
smooth S_t) ], every term a mean over all elements with masks multiplied in; â is the unclamped fused ab.

- L1_t = mean |â_t - a_t|.
- CX: contextual loss (Mechrez et al., forward, h = 0.1) between the Swin stages of the predicted frame 0
  (RGB of L_0 and clamp(â_0), keeping its graph through the frozen Swin) and of the reference (no gradient),
  stage weights 1, 2, 4, 8 from shallow to deep.
- align_t = mean(conf_t |â_t - ab_flow_t|) (ab_flow is detached by construction).
- S_t = mean(noc_t |â_t - W(â_{t-1}; F_t)|): the previous output warped by the flow, gradient into both frames.
- P_t: MSE of the deepest Swin stage, prediction vs ground-truth RGB (optional).
- G: RaLSGAN generator term on frame 0 (optional; needs the discriminator).
Everything is computed in float32 with autocast disabled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from colorize.config import LossConfig
from colorize.flow import warp
from colorize.lab import normalized_lab_to_rgb

CX_STAGE_WEIGHTS = (1.0, 2.0, 4.0, 8.0)
CX_EPS = 1e-5
CX_CHUNK_THRESHOLD = 4096
LOSS_PARTS = ("total", "l1", "contextual", "align", "smooth", "temporal", "perceptual", "gan_g")


def _contextual_rows(x_rows: torch.Tensor, y: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """max_j A_ij for a block of normalised rows ``x_rows`` ``[n, C]`` against all of ``y`` ``[C, M]``."""
    distance = (1.0 - x_rows @ y).clamp(min=0.0)
    relative = distance / (distance.min(dim=1, keepdim=True).values + CX_EPS)
    return torch.softmax((1.0 - relative) / bandwidth, dim=1).max(dim=1).values


class _ChunkedContextualRows(torch.autograd.Function):
    """max_j A_ij computed block by block; the backward recomputes each block, so memory stays O(chunk x N)
    (activation checkpointing without torch.utils.checkpoint, whose first use imports torch._dynamo)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, y: torch.Tensor, bandwidth: float, chunk_rows: int) -> torch.Tensor:
        ctx.save_for_backward(rows, y)
        ctx.bandwidth, ctx.chunk_rows = bandwidth, chunk_rows
        return torch.cat([_contextual_rows(block, y, bandwidth) for block in rows.split(chunk_rows)])

    @staticmethod
    def backward(ctx, grad_best: torch.Tensor):
        rows, y = ctx.saved_tensors
        grad_rows, grad_y = torch.zeros_like(rows), torch.zeros_like(y)
        for start in range(0, rows.shape[0], ctx.chunk_rows):
            stop = min(start + ctx.chunk_rows, rows.shape[0])
            with torch.enable_grad():
                block = rows[start:stop].detach().requires_grad_(True)
                columns = y.detach().requires_grad_(True)
                best = _contextual_rows(block, columns, ctx.bandwidth)
                grad_block, grad_columns = torch.autograd.grad(best, (block, columns), grad_best[start:stop])
            grad_rows[start:stop] = grad_block
            grad_y += grad_columns
        return grad_rows, grad_y, None, None


def contextual_loss(prediction: torch.Tensor, reference: torch.Tensor, bandwidth: float = 0.1,
                    chunk_rows: int = 1024, chunk_threshold: int = CX_CHUNK_THRESHOLD) -> torch.Tensor:
    """Contextual loss CX (forward) of two feature maps ``[B, C, H, W]``, averaged over the batch, in float32.

    mu = spatial mean of the reference features; x_i, y_j = L2-normalised (feature - mu); d_ij = max(0, 1 - x_i.y_j);
    d~_ij = d_ij / (min_k d_ik + 1e-5); A_ij = softmax_j((1 - d~_ij) / h); CX = -log(mean_i max_j A_ij). With more
    than 4096 positions, rows are processed in chunks under activation checkpointing (same value, memory
    O(chunk x N)); ``chunk_threshold`` moves that limit.
    """
    with torch.autocast(device_type=prediction.device.type, enabled=False):
        prediction, reference = prediction.float().flatten(2), reference.float().flatten(2)
        centre = reference.mean(dim=2, keepdim=True)
        x = F.normalize(prediction - centre, dim=1)
        y = F.normalize(reference - centre, dim=1)
        losses = []
        for x_sample, y_sample in zip(x, y):
            rows = x_sample.t()
            if rows.shape[0] > chunk_threshold:
                best = _ChunkedContextualRows.apply(rows, y_sample, bandwidth, chunk_rows)
            else:
                best = _contextual_rows(rows, y_sample, bandwidth)
            losses.append(-torch.log(best.mean()))
        return torch.stack(losses).mean()


class SelfAttention(nn.Module):
    """SAGAN self-attention with spectral-norm 1x1 projections and a zero-initialised gate."""

    def __init__(self, channels: int):
        super().__init__()
        self.query = spectral_norm(nn.Conv2d(channels, channels, 1))
        self.key = spectral_norm(nn.Conv2d(channels, channels, 1))
        self.value = spectral_norm(nn.Conv2d(channels, channels, 1))
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + gamma * attention(x)."""
        batch, channels, height, width = x.shape
        query = self.query(x).flatten(2).transpose(1, 2)
        attention = torch.softmax(torch.bmm(query, self.key(x).flatten(2)), dim=-1)
        out = torch.bmm(self.value(x).flatten(2), attention.transpose(1, 2)).view(batch, channels, height, width)
        return self.gamma * out + x


class MapInstanceNorm(nn.InstanceNorm2d):
    """InstanceNorm that passes a 1x1 map through: one position has no instance statistics (it would be zeroed,
    or refused in training), and a 64-px input reaches layer 6 at 1x1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Instance-normalised ``x``, or ``x`` itself when it has a single position."""
        return x if x.shape[-1] * x.shape[-2] == 1 else super().forward(x)


class Discriminator(nn.Module):
    """FlowChroma's spectral-norm discriminator on LAB frames: 4x4 stride-2 convs 3->64->64->128->256->512->1024,
    LeakyReLU 0.2, InstanceNorm from layer 2, self-attention after layer 2, then a padded 3x3 head and a global
    average, so it works from 64 px."""

    def __init__(self, in_channels: int = 3, width: int = 64):
        super().__init__()
        widths = (width, width, 2 * width, 4 * width, 8 * width, 16 * width)
        layers, previous = [], in_channels
        for index, channels in enumerate(widths):
            block = [spectral_norm(nn.Conv2d(previous, channels, 4, 2, 1))]
            if index > 0:
                block.append(MapInstanceNorm(channels))
            block.append(nn.LeakyReLU(0.2))
            layers.append(nn.Sequential(*block))
            previous = channels
        self.layer1, self.layer2, self.layer3, self.layer4, self.layer5, self.layer6 = layers
        self.attention = SelfAttention(width)
        self.last = spectral_norm(nn.Conv2d(previous, 1, 3, 1, 1))

    def forward(self, lab: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, 1]`` for normalised LAB images ``[B, 3, H, W]`` (H, W >= 64)."""
        x = self.attention(self.layer2(self.layer1(lab)))
        x = self.layer6(self.layer5(self.layer4(self.layer3(x))))
        return self.last(x).mean(dim=(2, 3))


def ralsgan_discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """RaLSGAN D loss: ½[E(D(x) - E D(x̂) - 1)² + E(D(x̂) - E D(x) + 1)²]."""
    return 0.5 * (((real_scores - fake_scores.mean() - 1.0) ** 2).mean()
                  + ((fake_scores - real_scores.mean() + 1.0) ** 2).mean())


def ralsgan_generator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """RaLSGAN G loss: the D loss with the signs of the ±1 swapped."""
    return 0.5 * (((real_scores - fake_scores.mean() + 1.0) ** 2).mean()
                  + ((fake_scores - real_scores.mean() - 1.0) ** 2).mean())


class FusionLoss:
    """The training criterion of the fusion system (holds a reference to the frozen embed_net, not a copy).

    ``criterion(outputs, frames_lab, memflow_outputs, memflow_confs=, aux=, reference_lab=, discriminator=)``
    returns ``(total, parts)``: ``total`` a 0-d float32 tensor with graph, ``parts`` a dict of detached 0-d
    tensors named as in :data:`LOSS_PARTS` (unweighted term values; no host synchronisation). The align term needs
    ``memflow_confs``, the smoothness ``aux`` (flows and noc of ``forward_sequence(..., return_aux=True)``), the
    contextual term ``aux`` (reference features) or ``reference_lab``, the GAN term a ``discriminator`` (passed
    from ``gan_start_epoch`` on).
    """

    def __init__(self, cfg: LossConfig = LossConfig(), embed_net: nn.Module | None = None):
        self.cfg = cfg
        self.embed_net = embed_net
        if embed_net is None and (cfg.contextual or cfg.perceptual):
            raise ValueError("the contextual and perceptual terms need embed_net")

    def __call__(self, outputs, frames_lab, memflow_outputs, memflow_confs=None, aux=None, reference_lab=None,
                 discriminator: nn.Module | None = None):
        cfg = self.cfg
        device = frames_lab.device
        with torch.autocast(device_type=device.type, enabled=False):
            length = len(outputs)
            predicted = [output[:, 1:3].float() for output in outputs]
            truth = frames_lab[:, :, 1:3].float()
            zero = torch.zeros((), device=device)
            l1 = torch.stack([(predicted[t] - truth[:, t]).abs().mean() for t in range(length)])
            align, smooth = [], []
            for t in range(1, length):
                if memflow_confs is not None:
                    flow_ab = memflow_outputs[t][:, 1:3].float()
                    align.append((memflow_confs[t] * (predicted[t] - flow_ab).abs()).mean())
                if aux is not None and cfg.smooth:
                    warped_previous, _ = warp(predicted[t - 1], aux["flows"][t])
                    smooth.append((aux["noc"][t] * (predicted[t] - warped_previous).abs()).mean())
            align_mean = torch.stack(align).mean() if align else zero
            smooth_mean = torch.stack(smooth).mean() if smooth else zero
            contextual = self._contextual(outputs[0], reference_lab, aux) if cfg.contextual else zero
            perceptual = self._perceptual(outputs, frames_lab) if cfg.perceptual else zero
            gan = self._generator_term(outputs[0], frames_lab[:, 0], discriminator) \
                if cfg.gan and discriminator is not None else zero
            temporal = align_mean + cfg.smooth * smooth_mean
            # Every frame contributes L1 and perceptual; frame 0 the exemplar terms; frames t >= 1 the temporal
            # terms; the sum is divided by T.
            total = (cfg.l1 * l1.sum() + cfg.perceptual * perceptual * length + cfg.contextual * contextual
                     + cfg.gan * gan + cfg.temporal * temporal * (length - 1)) / length
        parts = {"total": total, "l1": l1.mean(), "contextual": contextual, "align": align_mean,
                 "smooth": smooth_mean, "temporal": temporal, "perceptual": perceptual, "gan_g": gan}
        return total, {name: value.detach() for name, value in parts.items()}

    def _contextual(self, first_output: torch.Tensor, reference_lab: torch.Tensor | None, aux) -> torch.Tensor:
        if aux is not None and "reference_features" in aux:
            reference_features = aux["reference_features"]
        elif reference_lab is not None:
            with torch.no_grad():
                reference_features = self.embed_net(normalized_lab_to_rgb(reference_lab))
        else:
            raise ValueError("the contextual term needs reference_lab or aux['reference_features']")
        predicted = self.embed_net(_prediction_rgb(first_output))
        terms = [weight * contextual_loss(pred, ref.detach(), self.cfg.cx_bandwidth, self.cfg.cx_chunk_rows)
                 for weight, pred, ref in zip(CX_STAGE_WEIGHTS, predicted, reference_features)]
        return torch.stack(terms).sum()

    def _perceptual(self, outputs, frames_lab: torch.Tensor) -> torch.Tensor:
        predicted = torch.cat([_prediction_rgb(output) for output in outputs])
        with torch.no_grad():
            target = self.embed_net(normalized_lab_to_rgb(frames_lab.transpose(0, 1).flatten(0, 1)))[-1]
        return F.mse_loss(self.embed_net(predicted)[-1].float(), target.float())

    @staticmethod
    def _generator_term(first_output: torch.Tensor, first_frame: torch.Tensor, discriminator: nn.Module):
        with torch.no_grad():
            real_scores = discriminator(first_frame.float())
        return ralsgan_generator_loss(real_scores.float(), discriminator(first_output.float()).float())

    @staticmethod
    def discriminator_loss(discriminator: nn.Module, outputs, frames_lab: torch.Tensor) -> torch.Tensor:
        """RaLSGAN D loss on frame 0: ground truth vs the detached fused frame (for the discriminator's step)."""
        with torch.autocast(device_type=frames_lab.device.type, enabled=False):
            real_scores = discriminator(frames_lab[:, 0].float())
            fake_scores = discriminator(outputs[0].detach().float())
            return ralsgan_discriminator_loss(real_scores, fake_scores)


def _prediction_rgb(output: torch.Tensor) -> torch.Tensor:
    """RGB of (L, clamp(â)) keeping the graph (what Swin sees of a prediction)."""
    return normalized_lab_to_rgb(torch.cat((output[:, 0:1], output[:, 1:3].clamp(-1.0, 1.0)), dim=1))
