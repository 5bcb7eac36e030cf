"""CrossFuse: infrared/visible image fusion with a cross-attention mechanism, trained end-to-end or in two stages.

H. Li, X.-J. Wu, "CrossFuse: A novel cross attention mechanism based infrared and visible image fusion approach",
Information Fusion 103 (2024) 102147 (official code hli1221/CrossFuse); the end-to-end approach follows the
furqan-qadri/CrossFuse fork. Specification: shared/spec/crossfuse.md.

- end-to-end (default): IR encoder, VIS encoder, cross-attention module (CAM) and decoder trained together from
  random initialisation with one optimizer.
- two-stage (paper): per-modality auto-encoders trained for reconstruction, then CAM + decoder on frozen encoders.

    python train_end_to_end.py                                   # no data root: demo data, train, fuse, evaluate
    python train_end_to_end.py --data.root /data/KAIST           # paper settings, end-to-end
    accelerate launch train_end_to_end.py --data.root /data/KAIST --approach two-stage
    python train_end_to_end.py --mode evaluate --eval.root /data/TNO --eval.run models/end_to_end

Rerunning a command continues it (`--resume auto`): completed stages are skipped, interrupted ones resume
mid-epoch from their latest checkpoint.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.console import RunConsole  # noqa: E402
from common.ivif.demo import ensure_ivif_demo  # noqa: E402
from common.preempt import PREEMPTED_EXIT_CODE, Preemption  # noqa: E402
from common.run import AcceleratorSettings, exit_on_user_error, make_accelerator  # noqa: E402
from crossfuse.config import ConfigError, CrossFuseConfig, load_config  # noqa: E402
from crossfuse.evaluate import EvaluationError, evaluate, evaluation_current, find_weights  # noqa: E402
from crossfuse.model import InputSizeError  # noqa: E402
from crossfuse.training import (  # noqa: E402
    LAYOUTS, RunKind, StageRun, TrainingSetupError, experiment_dir, run_folder, stage_plan)
from crossfuse.weights import ModelFileError  # noqa: E402

USER_ERRORS = (ConfigError, TrainingSetupError, ModelFileError, EvaluationError, InputSizeError)


def train_stage(accelerator, cfg: CrossFuseConfig, kind: RunKind, console: RunConsole, preemption: Preemption,
                argv: list[str]) -> int | None:
    """Train one kind (auto-encoder, fusion stage or end-to-end) to its last epoch; a completed one is skipped.

    Returns an exit code when the command must stop early (`--stop-after`, preemption), else None.
    """
    run = StageRun(accelerator, cfg, kind, console, argv)
    if run.completed():
        return None
    run.setup()
    run.start()
    for epoch in run.remaining_epochs():
        for batch in run.batches(epoch):
            run.train_step(batch)
            if run.at_log_point():
                run.log()
            if run.at_epoch_end():
                run.end_epoch()
            elif run.at_checkpoint_point():
                run.save_checkpoint()
            if cfg.stop_after and run.step == cfg.stop_after and not run.finished():
                path = run.save_checkpoint()
                console.stop()
                console.print(f"{kind}: stopped after iteration {run.step} (--stop-after), checkpoint {path}; "
                              "run the same command again to continue")
                return 0
            if preemption.should_stop(run.step):
                started = time.perf_counter()
                path = run.save_checkpoint()
                console.stop()
                console.print(f"preempted ({preemption.signal_name}): saved {path} in "
                              f"{time.perf_counter() - started:.2f}s; run the same command again to resume")
                return PREEMPTED_EXIT_CODE
    run.finish()
    return None


def main(cfg: CrossFuseConfig, notices: Sequence[str] = (), argv: list[str] | None = None) -> int:
    """Train the stages the config asks for, then fuse and score the test pairs when a test folder is set."""
    started = time.perf_counter()
    argv = sys.argv[1:] if argv is None else argv
    console = RunConsole()
    accelerator = make_accelerator(
        AcceleratorSettings(mixed_precision=cfg.mixed_precision, find_unused_parameters=True,
                            log_with_tensorboard=cfg.tensorboard),
        project_dir=experiment_dir(cfg), warn=console.warn)
    console = RunConsole(is_main=accelerator.is_main_process)
    for notice in notices:
        console.print(notice)
    if cfg.preset == "demo":
        with accelerator.main_process_first():
            ensure_ivif_demo(cfg.data.demo_root, cfg.data.demo_seed)

    trained_run = None
    if cfg.mode == "train":
        preemption = Preemption(accelerator, every=cfg.step)
        plan = stage_plan(cfg)
        for kind in plan:
            code = train_stage(accelerator, cfg, kind, console, preemption, argv)
            if code is not None:
                accelerator.end_training()
                return code
        if LAYOUTS[plan[-1]].is_fusion:
            trained_run = run_folder(cfg, plan[-1])

    if cfg.mode != "train" or (cfg.eval.root is not None and trained_run is not None):
        weights = find_weights(cfg, trained_run)  # on every process, so a bad path stops them all
        if cfg.mode == "train" and evaluation_current(cfg, weights):
            console.print(f"evaluation of {weights.fusion.name} on {cfg.eval.root} is up to date "
                          f"({weights.run_dir / 'eval'}); nothing to do")
        elif accelerator.is_main_process:
            evaluate(cfg, weights, accelerator.device, console, with_metrics=cfg.mode != "fuse", started=started)
        accelerator.wait_for_everyone()
    console.print(f"done in {time.perf_counter() - started:.1f}s")
    accelerator.end_training()
    return 0


def cli(argv: list[str] | None = None) -> int:
    """Parse the command line and run; bad input becomes one `error:` line and exit code 2."""
    return exit_on_user_error(lambda: main(*load_config(argv), argv), extra=USER_ERRORS)


if __name__ == "__main__":
    sys.exit(cli())
