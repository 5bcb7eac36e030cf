"""Exponential moving average of a model's floating-point state (parameters and buffers).

The decay ramps up with the number of updates u as d(u) = decay·(1 − exp(−u/tau)) (YOLOv5/bubbliiiing), or is
constant when ``tau`` is None. Integer buffers (BatchNorm's ``num_batches_tracked``) keep the values they had
when the EMA was created, as in the reference implementation.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    """An fp32 EMA copy of ``model`` (unwrapped), updated only after applied optimizer steps."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float | None = 2000.0, updates: int = 0):
        self.module = copy.deepcopy(model).eval().float()
        if "forward" in vars(self.module):
            # A model passed after accelerator.prepare carries an autocast-wrapped forward on the instance;
            # the EMA copy runs the class's own forward (callers choose autocast explicitly).
            del self.module.forward
            vars(self.module).pop("_original_forward", None)
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.tau = tau
        self.updates = updates

    def current_decay(self) -> float:
        """Decay d(updates) of the update just counted."""
        if self.tau is None:
            return self.decay
        return self.decay * (1.0 - math.exp(-int(self.updates) / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module, applied: torch.Tensor | bool | None = True) -> None:
        """Blend ``model``'s floating-point state into the EMA after an applied optimizer step.

        ``applied`` is the optimizer step's outcome (:class:`common.step.StepResult`): False or None does
        nothing; a device tensor (the step was skipped or not on the device) masks the blend and the update
        count on the device, so no host synchronisation is needed.
        """
        if applied is None or applied is False:
            return
        source = model.state_dict()
        ema_tensors = [v for v in self.module.state_dict().values() if v.is_floating_point()]
        model_tensors = [source[k].detach().float() for k, v in self.module.state_dict().items() if v.is_floating_point()]
        if isinstance(applied, torch.Tensor):
            applied = applied.to(ema_tensors[0].device)
            self.updates = self.updates + applied.to(torch.int64)
            decay = self._decay_of(self.updates.to(torch.float64)).to(torch.float32)
            weight = (1.0 - decay) * applied
            torch._foreach_lerp_(ema_tensors, model_tensors, weight)
            return
        self.updates += 1
        torch._foreach_lerp_(ema_tensors, model_tensors, 1.0 - self.current_decay())

    def _decay_of(self, updates: torch.Tensor) -> torch.Tensor:
        """d(u) for a device tensor of update counts."""
        if self.tau is None:
            return torch.full_like(updates, self.decay)
        return self.decay * (1.0 - torch.exp(-updates / self.tau))

    def state_dict(self) -> dict:
        """The EMA model's state dict (its tensors, not copies)."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict, updates: int | None = None) -> None:
        """Load EMA weights (strict) and optionally the update count."""
        self.module.load_state_dict(state, strict=True)
        if updates is not None:
            self.updates = int(updates)

    def to(self, device) -> "ModelEMA":
        """Move the EMA copy to ``device``."""
        self.module.to(device)
        return self
