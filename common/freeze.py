"""Declarative freeze policies and stage switches that stay correct under data-parallel training.

A :class:`FreezePolicy` says which modules train (by module-name prefix), which never train, and what frozen
BatchNorm layers do. :func:`apply_policy` sets ``requires_grad`` and returns the sorted trainable names (recorded
in checkpoints). DistributedDataParallel registers the parameters that require grad when its wrapper is built,
so a parameter that becomes trainable later would never have its gradient all-reduced: :func:`switch_stage`
unwraps, applies the new policy and prepares the model again, dropping the old wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

from torch import nn

FrozenMode = Literal["train", "eval"]


def _matches(name: str, prefixes: Iterable[str]) -> bool:
    """True if ``name`` is one of ``prefixes`` or lies inside one of them (``''`` matches everything)."""
    for prefix in prefixes:
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            return True
    return False


@dataclass(frozen=True)
class FreezePolicy:
    """Which parameters train.

    Attributes:
        trainable: module or parameter name prefixes that train (``""`` = the whole model).
        frozen: prefixes frozen even inside a trainable prefix.
        never: prefixes that never train under any policy (fixed tables, constant filters).
        frozen_mode: ``"train"`` keeps frozen modules in train mode, so frozen BatchNorm layers keep updating
            their running statistics (YOLOv5's freeze stage); ``"eval"`` puts fully frozen modules in eval mode
            (frozen encoders in CrossFuse's fusion stage).
    """

    trainable: tuple[str, ...] = ("",)
    frozen: tuple[str, ...] = ()
    never: tuple[str, ...] = ()
    frozen_mode: FrozenMode = "train"

    def is_trainable(self, name: str) -> bool:
        """Whether parameter ``name`` trains under this policy."""
        if _matches(name, self.never) or _matches(name, self.frozen):
            return False
        return _matches(name, self.trainable)


def apply_policy(model: nn.Module, policy: FreezePolicy) -> list[str]:
    """Set ``requires_grad`` of every parameter of ``model`` (unwrapped) and return the sorted trainable names."""
    names = []
    for name, parameter in model.named_parameters():
        train = policy.is_trainable(name)
        parameter.requires_grad_(train)
        if train:
            names.append(name)
    if not names:
        raise ValueError(f"freeze policy {policy} leaves no trainable parameter")
    return sorted(names)


def set_train_mode(model: nn.Module, policy: FreezePolicy, training: bool = True) -> None:
    """``model.train(training)``, then, with ``frozen_mode='eval'``, put modules with no trainable parameter in
    eval mode (their BatchNorm statistics and dropout stay fixed)."""
    model.train(training)
    if not training or policy.frozen_mode == "train":
        return
    for name, module in model.named_modules():
        parameters = list(module.parameters())
        if name and parameters and not any(p.requires_grad for p in parameters):
            module.eval()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that currently require grad (the set clipped and reported by the optimisation step)."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def switch_stage(accelerator, model: nn.Module, policy: FreezePolicy) -> tuple[nn.Module, list[str]]:
    """Apply ``policy`` to a prepared ``model`` and re-wrap it so every trainable parameter is synchronised.

    Returns the new prepared model (use it instead of the old one, which must not be kept alive) and the sorted
    trainable names. The optimizer and any EMA keep working: they hold the same Parameter objects.
    """
    inner = accelerator.unwrap_model(model)
    if inner is model:
        # No data-parallel wrapper (one process): changing requires_grad is enough.
        return model, apply_policy(inner, policy)
    names = apply_policy(inner, policy)
    accelerator._models[:] = [m for m in accelerator._models if m is not model]
    if hasattr(inner, "_original_forward"):
        # prepare_model wraps forward in autocast once more; start from the original forward.
        inner.forward = inner._original_forward
        del inner._original_forward
    return accelerator.prepare_model(inner), names
