"""One optimisation step for every precision (``no``, ``bf16``, ``fp16``), with gradient accumulation.

The step never touches a GradScaler: under fp16 on an accelerator, Accelerate creates the scaler once, scales the
loss in ``accelerator.backward`` and unscales/steps/updates inside the prepared optimizer, so no stage switch can
lose it. Gradients are clipped (trainable parameters only) at synchronisation steps, and a step whose gradient
norm is not finite is skipped and counted; after ``max_nonfinite`` skips in a row training stops with a clear
message. Deciding to skip needs the gradient norm on the host: that is one scalar transfer per optimizer step
(not per micro-batch); the norm is identical on all ranks after the all-reduce, so ranks agree without a
collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.freeze import trainable_parameters


class NonFiniteLossError(RuntimeError):
    """Losses or gradients stayed non-finite for too many optimizer steps in a row."""


@dataclass
class StepResult:
    """What :meth:`OptimStep.__call__` did.

    Attributes:
        synced: this micro-batch completed an accumulation window (an optimizer step was attempted).
        applied: the optimizer step changed the weights (False for accumulation, skipped or overflow steps).
        grad_norm: total gradient norm of the trainable parameters before clipping (a tensor; None if not synced).
    """

    synced: bool
    applied: bool
    grad_norm: torch.Tensor | None


def total_grad_norm(parameters, device) -> torch.Tensor:
    """L2 norm of all gradients (a device tensor; no clipping, no host synchronisation)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class OptimStep:
    """Backward, accumulate, clip, step, zero, with non-finite protection.

    Use inside ``with accelerator.accumulate(model):`` (which decides the synchronisation steps) or with
    ``gradient_accumulation_steps=1``.
    """

    def __init__(self, accelerator, optimizer, model, max_grad_norm: float | None = None,
                 max_nonfinite: int = 100, warn=None):
        self.accelerator = accelerator
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.max_nonfinite = max_nonfinite
        self.warn = warn or (lambda message: None)
        self.nonfinite_in_a_row = 0
        self.skipped_total = 0
        self.set_model(model)

    def set_model(self, model) -> None:
        """Track ``model``'s currently trainable parameters (call again after a stage switch)."""
        self.model = model
        self.parameters = trainable_parameters(self.accelerator.unwrap_model(model))

    def __call__(self, loss: torch.Tensor) -> StepResult:
        """Backpropagate ``loss`` and, at a synchronisation step, clip and apply the optimizer step."""
        self.accelerator.backward(loss)
        if not self.accelerator.sync_gradients:
            return StepResult(synced=False, applied=False, grad_norm=None)
        scaler = self.accelerator.scaler
        if self.max_grad_norm is None and scaler is None:
            grad_norm = total_grad_norm(self.parameters, self.accelerator.device)
        else:
            max_norm = self.max_grad_norm if self.max_grad_norm is not None else math.inf
            grad_norm = self.accelerator.clip_grad_norm_(self.parameters, max_norm)
        if scaler is not None:
            # fp16: the scaler skips overflow steps itself and lowers the scale; it must see every step.
            self.optimizer.step()
            applied = not self.accelerator.optimizer_step_was_skipped
        else:
            applied = bool(torch.isfinite(grad_norm))
            if applied:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._count(applied)
        return StepResult(synced=True, applied=applied, grad_norm=grad_norm.detach())

    def _count(self, applied: bool) -> None:
        if applied:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        self.skipped_total += 1
        self.warn(
            f"skipped an optimizer step with a non-finite loss or gradient "
            f"({self.nonfinite_in_a_row} in a row, {self.skipped_total} in total)"
        )
        if self.nonfinite_in_a_row >= self.max_nonfinite:
            raise NonFiniteLossError(
                f"the loss or gradients were non-finite for {self.nonfinite_in_a_row} optimizer steps in a row: "
                "lower the learning rate, check the data for NaN/inf values, or use mixed precision 'no'"
            )

    def state_dict(self) -> dict:
        """Counters to checkpoint."""
        return {"nonfinite_in_a_row": self.nonfinite_in_a_row, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counters."""
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self.skipped_total = int(state["skipped_total"])


def accumulation_state(accelerator, model) -> dict:
    """This process's position inside a gradient-accumulation window and its partially accumulated gradients.

    Saved with a checkpoint written between synchronisation steps, so a resumed run continues the window with
    exactly the same gradients (each process has its own: under ``no_sync`` they are not yet all-reduced).
    """
    inner = accelerator.unwrap_model(model)
    grads = {name: p.grad.detach().cpu().clone() for name, p in inner.named_parameters() if p.grad is not None}
    return {"micro_step": int(accelerator.step), "grads": grads}


def load_accumulation_state(accelerator, model, state: dict) -> None:
    """Restore :func:`accumulation_state` into this process."""
    inner = accelerator.unwrap_model(model)
    accelerator.step = int(state["micro_step"])
    for name, parameter in inner.named_parameters():
        saved = state["grads"].get(name)
        parameter.grad = None if saved is None else saved.to(parameter.device, parameter.dtype).clone()
