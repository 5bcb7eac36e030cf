"""The train state: everything a resume needs, declared once by a trainer, with one ``save`` and one ``restore``.

A trainer names its stateful objects when it builds the state::

    state = TrainState(accelerator, SCRIPT, checkpoints, model=model, optimizer=optimizer, ema=ema,
                       series=series, step_counters=stepper)
    ...
    state.position.step += 1            # the loop counter, and where in which epoch the loop is
    state.save()                        # collective: every process calls it at the same step
    ...
    state.restore(path)                 # checks the file belongs to this run, then restores everything

The file holds each object under its name (so a trainer's spec can fix the key layout), plus what the kit adds:

- ``meta``: the run identity (script, stage, trainable-parameter fingerprint, precision, world size), the loop
  ``position`` and the trainer's ``signature`` (settings that must match to continue, and settings whose change
  is only reported);
- ``rng``: the Python/NumPy/torch RNG states of every process;
- ``scaler``: Accelerate's fp16 loss-scaler state (None without one);
- ``accumulation``: each process's partial gradients when the file is written inside an accumulation window.

Models are stored unwrapped (no ``module.`` prefix) and the same unwrapped module is restored whatever the
data-parallel wrapper is now; a :class:`~common.ema.ModelEMA` adds ``<name>_updates``; a
:class:`~common.lossdump.LossSeries` is flushed before it is saved and truncated to the resumed step; any other
object with ``state_dict``/``load_state_dict`` (optimizers, :class:`~common.step.OptimStep`,
:class:`~common.tracking.History`, :class:`~common.tracking.Best`) is stored through them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from torch import nn

from common import checkpoint as ckpt
from common.ema import ModelEMA
from common.lossdump import LossSeries
from common.step import accumulation_state, load_accumulation_state

KIT_KEYS = ("meta", "rng", "scaler", "accumulation")


@dataclass
class LoopPosition:
    """Where the training loop is: what is done, and which batch comes next.

    Attributes:
        step: optimizer steps done (the loop counter; schedules and log/eval/save blocks key off it).
        micro_step: micro-batches done (``step`` times the accumulation, plus any inside the open window).
        epoch: epoch of the next micro-batch (0-based).
        batch: index of the next micro-batch within that epoch.
    """

    step: int = 0
    micro_step: int = 0
    epoch: int = 0
    batch: int = 0

    def next_batch(self, batches_per_epoch: int) -> bool:
        """Count one micro-batch done; returns True when it was the last of its epoch (the epoch advances)."""
        self.micro_step += 1
        self.batch += 1
        if self.batch < batches_per_epoch:
            return False
        self.epoch += 1
        self.batch = 0
        return True


def _trainable_names(modules: dict[str, nn.Module]) -> list[str]:
    return sorted(f"{name}.{parameter_name}" for name, module in modules.items()
                  for parameter_name, parameter in module.named_parameters() if parameter.requires_grad)


def compare_signature(source: Path | str, theirs: dict, ours: dict, force: bool, warn: Callable[[str], None]) -> None:
    """Compare two signatures ``{"strict": {...}, "soft": {...}}``.

    A difference in ``strict`` (the model, the data order) refuses to continue unless ``force``; a difference
    in ``soft`` (epochs, learning rates) is reported and accepted.
    """
    strict = [f"{key}: {theirs.get('strict', {}).get(key)!r} there, {value!r} here"
              for key, value in ours.get("strict", {}).items() if theirs.get("strict", {}).get(key) != value]
    if strict and not force:
        raise ckpt.ResumeRefused(
            f"refusing to resume from {source}: it belongs to a run with other settings ({'; '.join(strict)}). "
            "Restore the settings, choose another output folder, start over with --overwrite, or accept the "
            "difference with --resume-force")
    for problem in strict:
        warn(f"accepted a difference (--resume-force): {problem}")
    soft = [f"{key} {theirs.get('soft', {}).get(key)!r} -> {value!r}"
            for key, value in ours.get("soft", {}).items() if theirs.get("soft", {}).get(key) != value]
    if soft:
        warn(f"continuing with changed settings: {', '.join(soft)}")


class TrainState:
    """The resumable state of one training run (see the module docstring).

    Args:
        accelerator: the run's Accelerator (collectives, precision, world size, scaler).
        script: the training script's name (a checkpoint of another script is refused).
        checkpoints: names, writes and prunes the files of :meth:`save` (optional when paths are given).
        stage: the current stage name (recorded; a checkpoint of another stage is refused on restore).
        warn: where reports go (changed settings, accepted differences).
        objects: the trainer's stateful objects, by the key they get in the file.
    """

    def __init__(self, accelerator, script: str, checkpoints: ckpt.CheckpointManager | None = None, *,
                 stage: str = "train", warn: Callable[[str], None] = print, **objects: Any):
        overlap = set(objects) & set(KIT_KEYS)
        if overlap:
            raise ValueError(f"state object names {sorted(overlap)} are reserved by the kit")
        self.accelerator = accelerator
        self.script = script
        self.checkpoints = checkpoints
        self.stage = stage
        self.warn = warn
        self.position = LoopPosition()
        self.signature: dict = {"strict": {}, "soft": {}}
        self.objects = {name: accelerator.unwrap_model(obj) if isinstance(obj, nn.Module) else obj
                        for name, obj in objects.items()}

    # ------------------------------------------------------------------------------------------------ identity
    @property
    def modules(self) -> dict[str, nn.Module]:
        """The state's models (unwrapped), by name."""
        return {name: obj for name, obj in self.objects.items() if isinstance(obj, nn.Module)}

    def identity(self) -> ckpt.RunIdentity:
        """What a checkpoint must agree on: script, stage, trainable set, precision, world size."""
        return ckpt.RunIdentity(self.script, self.stage, ckpt.trainable_fingerprint(_trainable_names(self.modules)),
                                self.accelerator.mixed_precision, self.accelerator.num_processes)

    # ------------------------------------------------------------------------------------------------ save
    def save(self, path: str | Path | None = None, *, extra: dict | None = None, best: bool = False) -> Path | None:
        """Write the state atomically (collective: call on every process at the same step).

        ``path`` defaults to the checkpoint manager's file for the current step (or epoch, by the manager's
        unit), with retention; ``extra`` adds plain top-level keys a trainer's file layout needs. Returns the
        path on the main process (None elsewhere).
        """
        accelerator = self.accelerator
        for obj in self.objects.values():
            if isinstance(obj, LossSeries):
                obj.flush(accelerator)
        rng = ckpt.gather_rng(accelerator)
        accumulation = None
        if accelerator.gradient_accumulation_steps > 1:
            local = {name: accumulation_state(accelerator, module) for name, module in self.modules.items()}
            accumulation = [local]
            if accelerator.num_processes > 1:
                from accelerate.utils import gather_object

                accumulation = list(gather_object(accumulation))
        written = None
        if accelerator.is_main_process:
            state = self._pack(rng, accumulation, extra or {})
            if path is None:
                if self.checkpoints is None:
                    raise ValueError("TrainState.save needs a path or a CheckpointManager")
                unit = self.position.step if self.checkpoints.unit == "step" else self.position.epoch
                written = self.checkpoints.save(state, unit, best=best)
            else:
                written = ckpt.save_checkpoint(path, state)
        accelerator.wait_for_everyone()
        return written

    def _pack(self, rng: list, accumulation: list | None, extra: dict) -> dict:
        state: dict[str, Any] = {
            "meta": {**self.identity().as_meta(), "position": dataclasses.asdict(self.position),
                     "signature": self.signature},
            "rng": rng,
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
            "accumulation": accumulation,
        }
        for name, obj in self.objects.items():
            if isinstance(obj, ModelEMA):
                state[name] = obj.state_dict()
                state[f"{name}_updates"] = int(obj.updates)
            else:
                state[name] = obj.state_dict()
        clash = set(extra) & set(state)
        if clash:
            raise ValueError(f"extra checkpoint keys {sorted(clash)} clash with the state's own keys")
        state.update(extra)
        return state

    # ------------------------------------------------------------------------------------------------ restore
    def read(self, path: str | Path, allow: Iterable[str] = ()) -> dict:
        """Load a checkpoint and check it was written by this script at this precision and world size.

        The stage and trainable set are checked by :meth:`load`, once the trainer has set the stage the
        checkpoint's position implies (a stage switch may be needed first). ``allow`` waives checks by name.
        """
        state = ckpt.load_checkpoint(path)
        if not isinstance(state, dict) or not isinstance(state.get("meta"), dict) or "position" not in state["meta"]:
            raise ckpt.CheckpointError(f"{path} is not a resumable training state written by this project")
        current = self.identity()
        meta = {**state["meta"], "stage": current.stage, "trainable": current.trainable}
        ckpt.check_resume(path, meta, current, allow)
        return state

    def position_of(self, state: dict) -> LoopPosition:
        """The loop position recorded in a checkpoint read by :meth:`read`."""
        return LoopPosition(**state["meta"]["position"])

    def load(self, state: dict, path: str | Path, allow: Iterable[str] = (), force: bool = False) -> None:
        """Restore a checkpoint read by :meth:`read` into this process (stage, trainable set and signature are
        checked first; ``force`` accepts strict signature differences, ``allow`` waives identity checks)."""
        compare_signature(path, state["meta"].get("signature", {}), self.signature, force, self.warn)
        ckpt.check_resume(path, state["meta"], self.identity(), allow)
        for name, value in dataclasses.asdict(self.position_of(state)).items():
            setattr(self.position, name, value)  # in place: the loop may hold a reference to the position
        for name, obj in self.objects.items():
            if name not in state:
                raise ckpt.CheckpointError(f"{path} has no {name!r} entry; it was written by another version")
            if isinstance(obj, nn.Module):
                try:
                    obj.load_state_dict(state[name], strict=True)
                except RuntimeError as error:
                    first = str(error).strip().splitlines()[0][:200]
                    raise ckpt.ResumeRefused(f"refusing to resume from {path}: its {name!r} does not fit the model "
                                             f"this run builds ({first}); restore the settings or start a new "
                                             "run") from None
            elif isinstance(obj, ModelEMA):
                obj.load_state_dict(state[name], updates=state[f"{name}_updates"])
            elif isinstance(obj, LossSeries):
                obj.load_state_dict(state[name], length=self.position.step)
            else:
                obj.load_state_dict(state[name])
        if self.accelerator.scaler is not None and state.get("scaler") is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        rank = self.accelerator.process_index
        if state.get("accumulation") is not None:
            saved = state["accumulation"][rank % len(state["accumulation"])]
            for name, module in self.modules.items():
                load_accumulation_state(self.accelerator, module, saved[name])
        ckpt.restore_rng(state["rng"][rank % len(state["rng"])])

    def restore(self, path: str | Path, allow: Iterable[str] = (), force: bool = False) -> dict:
        """:meth:`read` then :meth:`load` (for trainers whose stage does not depend on the position); returns
        the checkpoint's dict (its trainer-specific keys)."""
        state = self.read(path, allow)
        self.load(state, path, allow, force)
        return state


def newest_checkpoint(paths: Iterable[Path]) -> Path | None:
    """The checkpoint with the furthest loop position (by ``meta.position``: step, then micro-step), read
    without loading tensors; later paths win ties. Unreadable files are skipped (a killed write never leaves
    one under a final name, but a user may)."""
    best, best_key = None, None
    for path in paths:
        try:
            state = ckpt.load_checkpoint(path, mmap=True)
            position = state["meta"]["position"]
            key = (int(position["step"]), int(position["micro_step"]))
        except (ckpt.CheckpointError, KeyError, TypeError):
            continue
        if best_key is None or key >= best_key:
            best, best_key = path, key
    return best

