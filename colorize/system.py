"""FusionSystem: frozen flow + SwinTExCo exemplar branch + trainable fusion net (spec/colorize.md §2.5).

For each frame t of a clip the system computes the exemplar colour (Swin features of the gray frame matched
against the reference by ``nonlocal_net``), the propagated colour (the previous fused output, detached and
clamped, warped by the backward flow of the frozen flow module), and fuses them: fused ab = base + tanh(r).
Only channel 0 (L) of ``frames_lab`` is read, so ground-truth colour cannot leak into the prediction.

The feedback is detached (truncated back-propagation through time: one graph, one backward per clip), so
inference streams sequences of any length. ``forward`` is the entry point (so a DistributedDataParallel wrapper
synchronises gradients); ``forward_sequence`` is the notes' name for the same call.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from colorize.config import ExemplarConfig, FlowConfig, FusionConfig
from colorize.flow import FlowModule, build_flow, warp
from colorize.fusion_nets import build_fusion_net
from colorize.lab import L_SCALE, AB_SCALE, gray_from_lightness, normalized_lab_to_rgb
from colorize.swintexco import check_image_size
from colorize.weights import WeightSource, build_exemplar_branch, check_exemplar_output, load_fusion_init

FROZEN_MODULES = ("embed_net", "colornet")
TRAINABLE_MODULES = ("nonlocal_net", "fusion_net")
STRATEGY_LR_NONLOCAL = {1: 1e-5, 2: 1e-4}
DEFAULT_LR_FUSION = 1e-4
COLORNET_RAW_SCALE = 128.0  # SwinTExCo's colornet output is tanh * 128 in raw ab units


class FusionSystem(nn.Module):
    """The exemplar-based video colorization system of FlowChroma, with SwinTExCo's exemplar branch.

    Args:
        flow: the flow backend (never registered as a submodule; ``to()`` moves it).
        swintexco: the exemplar branch (``swintexco_ckpt`` set = Strategy 1, else Strategy 2).
        fusion_net: a fusion net module; None builds the one of ``fusion``.
        fusion: fusion options (residual base, first-frame base, ``init_from``).
        image_size: the side S of the square frames (a multiple of 32).
        frames_per_chunk: frames whose Swin features are computed in one batch when streaming long sequences.
    """

    def __init__(self, flow: FlowConfig = FlowConfig(), swintexco: ExemplarConfig = ExemplarConfig(),
                 fusion_net: nn.Module | None = None, *, fusion: FusionConfig = FusionConfig(),
                 image_size: int = 224, frames_per_chunk: int = 8):
        super().__init__()
        check_image_size(image_size)
        branch = build_exemplar_branch(swintexco, image_size)
        self.embed_net = branch.embed_net
        self.nonlocal_net = branch.nonlocal_net
        self.colornet = branch.colornet
        self.fusion_net = fusion_net if fusion_net is not None else build_fusion_net(fusion)
        self.flow: FlowModule = build_flow(flow)
        self.flow_config, self.exemplar_config, self.fusion_config = flow, swintexco, fusion
        self.image_size = image_size
        self.frames_per_chunk = frames_per_chunk
        self.strategy = branch.strategy
        self.warnings = list(branch.warnings)
        self.weight_sources: dict[str, WeightSource] = {source.role: source for source in branch.sources}
        self.weight_sources["fusion_net"] = WeightSource("fusion_net", None, None, "trained from scratch")
        self.weight_sources.update({source.role: source for source in self.flow.sources})
        if fusion.init_from is not None:
            self.weight_sources.update({source.role: source for source in load_fusion_init(fusion.init_from, self)})
            if fusion.arch == "colorvid" and fusion.first_frame_base != "zeros":
                message = (f"{fusion.init_from}: FlowChroma's FusionNetV1 was trained with a zero base on frame 0; "
                           "run it with --fusion.first-frame-base zeros to use it as trained")
                warnings.warn(message, stacklevel=2)
                self.warnings.append(message)
        check_exemplar_output(swintexco.output, not self.weight_sources["colornet"].random_init)
        for name in FROZEN_MODULES:
            getattr(self, name).requires_grad_(False)
        self.train(self.training)

    @property
    def embed_random_init(self) -> bool:
        """True when embed_net runs with random weights."""
        return self.weight_sources["embed_net"].random_init

    def train(self, mode: bool = True) -> "FusionSystem":
        """Set the mode of the trainable modules; embed_net and colornet always stay in eval mode."""
        super().train(mode)
        for name in FROZEN_MODULES:
            getattr(self, name).eval()
        return self

    def to(self, *args, **kwargs) -> "FusionSystem":
        """``nn.Module.to``, and the flow backend follows to the same device (it stays float32)."""
        super().to(*args, **kwargs)
        self.flow.to(next(self.parameters()).device)
        return self

    def reset_memory(self) -> None:
        """Forget the previous frame of the flow module (the start of a new sequence)."""
        self.flow.reset()

    def get_parameter_groups(self, lr_nonlocal: float | None = None,
                             lr_fusion: float = DEFAULT_LR_FUSION) -> list[dict]:
        """Optimizer groups ``nonlocal`` (default lr by strategy: 1e-5 fine-tuning, 1e-4 from scratch) and
        ``fusion``; frozen modules are never included."""
        if lr_nonlocal is None:
            lr_nonlocal = STRATEGY_LR_NONLOCAL[self.strategy]
        return [
            {"name": "nonlocal", "params": [p for p in self.nonlocal_net.parameters() if p.requires_grad],
             "lr": lr_nonlocal},
            {"name": "fusion", "params": [p for p in self.fusion_net.parameters() if p.requires_grad],
             "lr": lr_fusion},
        ]

    def forward_sequence(self, frames_lab: torch.Tensor, reference_lab: torch.Tensor, return_memflow: bool = True,
                         return_aux: bool = False):
        """The notes' API: same as calling the module (see :meth:`forward`)."""
        return self(frames_lab, reference_lab, return_memflow=return_memflow, return_aux=return_aux)

    def forward(self, frames_lab: torch.Tensor, reference_lab: torch.Tensor, return_memflow: bool = True,
                return_aux: bool = False):
        """Colorize a clip.

        Args:
            frames_lab: ``[B, T, 3, S, S]`` normalised LAB; only channel 0 (L') is read.
            reference_lab: ``[B, 3, S, S]`` normalised LAB of the exemplar.

        Returns:
            ``outputs`` (list of T ``[B, 3, S, S]``: L_t and the unclamped fused ab); with ``return_memflow`` also
            ``memflow_outputs`` (L_t, ab_flow) and ``memflow_confs`` ``[B, 1, S, S]``; with ``return_aux`` a last
            item: dict of lists ``flows``, ``noc``, ``valid``, ``exemplar`` (L_t, ab_ex), ``similarity``, and
            ``reference_features`` (the reference's Swin stages, without gradient).
        """
        batch, length = frames_lab.shape[:2]
        lightness = frames_lab[:, :, 0:1]
        gray = gray_from_lightness(lightness)
        grid = self.image_size // 4
        temperature = self.exemplar_config.temperature if self.training else self.exemplar_config.eval_temperature
        self.reset_memory()
        with torch.no_grad():
            reference_features = self.embed_net(normalized_lab_to_rgb(reference_lab))
        keys = self.nonlocal_net.encode_reference(reference_features, grid)
        reference_small = F.avg_pool2d(reference_lab.float(), 4)

        outputs, flow_outputs, confs = [], [], []
        aux = {"flows": [], "noc": [], "valid": [], "exemplar": [], "similarity": [],
               "reference_features": reference_features}
        previous: torch.Tensor | None = None
        for start in range(0, length, self.frames_per_chunk):
            stop = min(start + self.frames_per_chunk, length)
            queries = self._target_queries(gray[:, start:stop], grid)
            for t in range(start, stop):
                warped, similarity = self.nonlocal_net.correlate(queries[:, t - start], keys, reference_small,
                                                                 temperature)
                light = lightness[:, t]
                ab_exemplar = self._exemplar_ab(light, warped, similarity, previous)
                step = self.flow.step(gray[:, t])
                if previous is None:
                    ab_flow, conf = ab_exemplar, step.conf
                else:
                    ab_flow, _ = warp(previous.clamp(-1.0, 1.0).detach(), step.flow)
                    conf = step.conf
                residual = self.fusion_net(torch.cat((light, ab_flow, conf, light, ab_exemplar, similarity), dim=1))
                fused = self._base(previous is None, ab_flow, ab_exemplar) + torch.tanh(residual.float())
                outputs.append(torch.cat((light, fused), dim=1))
                flow_outputs.append(torch.cat((light, ab_flow), dim=1))
                confs.append(conf)
                for key, value in (("flows", step.flow), ("noc", step.noc), ("valid", step.valid),
                                   ("exemplar", torch.cat((light, ab_exemplar), dim=1)), ("similarity", similarity)):
                    aux[key].append(value)
                previous = fused
        result = (outputs, flow_outputs, confs) if return_memflow else (outputs,)
        if return_aux:
            result = result + (aux,)
        return result if len(result) > 1 else result[0]

    def _target_queries(self, gray: torch.Tensor, grid: int) -> torch.Tensor:
        """theta features ``[B, n, C, N]`` of n gray frames ``[B, n, 1, S, S]`` (Swin without gradient)."""
        batch, count = gray.shape[:2]
        with torch.no_grad():
            features = self.embed_net(gray.flatten(0, 1).expand(-1, 3, -1, -1))
        return self.nonlocal_net.encode_target(features, grid).unflatten(0, (batch, count))

    def _exemplar_ab(self, light: torch.Tensor, warped: torch.Tensor, similarity: torch.Tensor,
                     previous: torch.Tensor | None) -> torch.Tensor:
        """Normalised exemplar ab: the warped reference ab, or colornet's refinement of it."""
        warped_ab = warped[:, 1:3]
        if self.exemplar_config.output == "warp":
            return warped_ab
        if self.colornet.in_channels == 4:
            return torch.tanh(self.colornet(torch.cat((light, warped_ab, similarity), dim=1)).float())
        if previous is None:
            previous_raw = torch.zeros_like(warped)
        else:
            previous_raw = torch.cat((light * L_SCALE, previous.clamp(-1.0, 1.0).detach() * AB_SCALE), dim=1)
        inputs = torch.cat((light * L_SCALE, warped_ab * AB_SCALE, similarity, previous_raw), dim=1)
        return torch.tanh(self.colornet(inputs).float()) * (COLORNET_RAW_SCALE / AB_SCALE)

    def _base(self, first_frame: bool, ab_flow: torch.Tensor, ab_exemplar: torch.Tensor) -> torch.Tensor:
        """The residual base of §2.4."""
        if self.fusion_config.residual_base == "exemplar":
            return ab_exemplar
        if not first_frame:
            return ab_flow
        first = self.fusion_config.first_frame_base
        if first == "zeros":
            return torch.zeros_like(ab_exemplar)
        return ab_exemplar.detach() if first == "exemplar_detached" else ab_exemplar

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per module, for the start-up panel (the flow backend's networks under ``flow``)."""
        counts = {name: sum(p.numel() for p in getattr(self, name).parameters())
                  for name in ("embed_net", "nonlocal_net", "colornet", "fusion_net")}
        counts["flow"] = sum(p.numel() for network in self.flow.networks for p in network.parameters())
        return counts
