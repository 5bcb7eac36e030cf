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
        """Decay used by the next update (after ``updates`` is incremented)."""
        if self.tau is None:
            return self.decay
        return self.decay * (1.0 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend ``model``'s floating-point state into the EMA (increments ``updates`` first)."""
        self.updates += 1
        d = self.current_decay()
        source = model.state_dict()
        ema_tensors = [v for v in self.module.state_dict().values() if v.is_floating_point()]
        model_tensors = [source[k].detach().float() for k, v in self.module.state_dict().items() if v.is_floating_point()]
        torch._foreach_mul_(ema_tensors, d)
        torch._foreach_add_(ema_tensors, model_tensors, alpha=1.0 - d)

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
