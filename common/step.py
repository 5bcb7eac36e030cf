"""One optimisation step for every precision (``no``, ``bf16``, ``fp16``), with gradient accumulation.

The step never touches a GradScaler: under fp16 on an accelerator, Accelerate creates the scaler once, scales the
loss in ``accelerator.backward`` and unscales/steps/updates inside the prepared optimizer, so no stage switch can
lose it. Gradients are clipped (trainable parameters only) at synchronisation steps.

Non-finite guard, without a host synchronisation per step: a step whose loss (or, when clipping, gradient norm)
is not finite is skipped and counted on the device. Optimizers that take a ``found_inf`` flag (PyTorch's fused
Adam, AdamW and SGD: ``fused=True``, on the CPU too) skip the update inside their kernel, so the decision never
leaves the device; the counters are read at log, evaluation and save steps (:meth:`OptimStep.check`), which stop
training after ``max_nonfinite`` skipped steps in a row. With other optimizers the decision needs the loss on
the host: one scalar per optimizer step (free on the CPU, a synchronisation on a GPU). In multi-process runs the
flag is all-reduced so every process skips the same steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.errors import UserError
from common.freeze import trainable_parameters


class NonFiniteLossError(UserError):
    """Losses or gradients stayed non-finite for too many optimizer steps in a row."""


@dataclass
class StepResult:
    """What :meth:`OptimStep.__call__` did.

    Attributes:
        synced: this micro-batch completed an accumulation window (an optimizer step was attempted).
        applied: whether the step changed the weights: a 0-d bool tensor (device-side skip), a bool, or None
            when not synced. Pass it to :meth:`common.ema.ModelEMA.update`, which needs no host value.
        grad_norm: total gradient norm of the trainable parameters before clipping (a tensor), when clipping
            or under fp16; else None.
    """

    synced: bool
    applied: torch.Tensor | bool | None
    grad_norm: torch.Tensor | None


def supports_found_inf(optimizer) -> bool:
    """Whether ``optimizer`` (or the optimizer a prepared one wraps) can skip an update from a device flag."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return bool(getattr(inner, "_step_supports_amp_scaling", False))


class OptimStep:
    """Backward, accumulate, clip, step, zero, with the non-finite guard (module docstring).

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
        device = accelerator.device
        self.nonfinite_in_a_row = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_total = torch.zeros((), dtype=torch.int64, device=device)
        self._reported_total = 0
        self.set_model(model)

    def set_model(self, model) -> None:
        """Track ``model``'s currently trainable parameters (call again after a stage switch)."""
        self.model = model
        self.parameters = trainable_parameters(self.accelerator.unwrap_model(model))
        prime_fused_sgd_momentum(self.optimizer, self.parameters)

    def __call__(self, loss: torch.Tensor) -> StepResult:
        """Backpropagate ``loss`` and, at a synchronisation step, clip and apply the optimizer step."""
        accelerator = self.accelerator
        accelerator.backward(loss)
        if not accelerator.sync_gradients:
            return StepResult(synced=False, applied=None, grad_norm=None)
        scaler = accelerator.scaler
        grad_norm = None
        if self.max_grad_norm is not None or scaler is not None:
            max_norm = self.max_grad_norm if self.max_grad_norm is not None else math.inf
            grad_norm = accelerator.clip_grad_norm_(self.parameters, max_norm)
        if scaler is not None:
            # fp16: the scaler finds overflow steps itself and lowers the scale; it must see every step.
            self.optimizer.step()
            applied: torch.Tensor | bool = not accelerator.optimizer_step_was_skipped
        else:
            finite = torch.isfinite(loss.detach())
            if grad_norm is not None:
                finite = finite & torch.isfinite(grad_norm)
            if accelerator.num_processes > 1:
                bad = accelerator.reduce((~finite).to(torch.float32).reshape(1), reduction="sum")
                finite = (bad == 0).reshape(())
            if supports_found_inf(self.optimizer):
                inner = getattr(self.optimizer, "optimizer", self.optimizer)
                inner.found_inf = (~finite).to(torch.float32)
                inner.grad_scale = None
                try:
                    self.optimizer.step()
                finally:
                    del inner.found_inf, inner.grad_scale
                applied = finite
            else:
                applied = bool(finite)
                if applied:
                    self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        skipped = ~torch.as_tensor(applied, device=self.skipped_total.device)
        self.nonfinite_in_a_row = (self.nonfinite_in_a_row + 1) * skipped
        self.skipped_total = self.skipped_total + skipped
        if isinstance(applied, bool) and not applied:
            self.check()
        return StepResult(synced=True, applied=applied, grad_norm=None if grad_norm is None else grad_norm.detach())

    def check(self) -> None:
        """Report skipped steps since the last check and stop after ``max_nonfinite`` in a row (reads the
        device counters: call at log, evaluation and save steps)."""
        in_a_row, total = int(self.nonfinite_in_a_row), int(self.skipped_total)
        if total > self._reported_total:
            self.warn(f"skipped {total - self._reported_total} optimizer step(s) with a non-finite loss or gradient "
                      f"since the last report ({total} in total, {in_a_row} in a row now)")
            self._reported_total = total
        if in_a_row >= self.max_nonfinite:
            raise NonFiniteLossError(
                f"the loss or gradients were non-finite for {in_a_row} optimizer steps in a row: "
                "lower the learning rate, check the data for NaN/inf values, or use mixed precision 'no'"
            )

    def state_dict(self) -> dict:
        """Counters to checkpoint."""
        return {"nonfinite_in_a_row": int(self.nonfinite_in_a_row), "skipped_total": int(self.skipped_total)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counters."""
        device = self.skipped_total.device
        self.nonfinite_in_a_row = torch.tensor(int(state["nonfinite_in_a_row"]), device=device)
        self.skipped_total = torch.tensor(int(state["skipped_total"]), device=device)
        self._reported_total = int(state["skipped_total"])


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


def prime_fused_sgd_momentum(optimizer, parameters) -> None:
    """Give every trainable parameter of a fused momentum SGD a zero momentum buffer if it has none yet.

    Why: fused SGD (torch 2.x ``_fused_sgd``) handles a group whose parameters all lack buffers (its first step) or all
    have them, but crashes ("expected Tensor as element 0 in argument 2") on a mix, which is what unfreezing a
    backbone under a trained head produces. With dampening 0 a zero buffer gives the same step as a missing one
    (``buf = momentum * 0 + grad = grad``, the first-step rule), so this changes no result.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    if not isinstance(inner, torch.optim.SGD):
        return
    trainable = {id(p) for p in parameters}
    for group in inner.param_groups:
        if not group.get("fused") or group["momentum"] == 0:
            continue
        if group["dampening"] != 0:
            raise UserError("fused SGD with dampening cannot add parameters after its first step; use fused=False")
        for parameter in group["params"]:
            state = inner.state[parameter]
            if id(parameter) in trainable and state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)

