"""CrossFuse training configuration (spec/crossfuse.md §1, §4): frozen dataclasses whose defaults are the paper's.

The top-level names follow the original `args_end_to_end.py` (`--epochs --lr --batch --train-num --height --width
--step`); nested groups hold the data, loss, learning-rate multipliers, model options, initial weights, the
stage-1 (auto-encoder) settings and the evaluation.

Presets fill in defaults, and flags given on the command line always win:

- `paper` (§4.2): the dataclass defaults; `--approach two-stage` switches the fusion stage to the official step
  schedule without learnable temperature.
- `demo` (§4.4): the generated demo dataset at 48x48, 12 short epochs, then fusion and evaluation of its
  held-out pairs with the averaging baseline; about 3 minutes on 2 CPU cores.
- `auto` (default): `paper` when a data root is configured (here or with `--data.root`; for `--mode fuse|evaluate`
  also `--eval.root`), otherwise `demo`, announced (DESIGN.md).

`load_config(argv)` parses twice: once to learn the preset, approach and data root, then with the preset's values
as defaults, so that every explicitly given flag overrides the preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Sequence

import tyro

from common.errors import ConfigError
from common.presets import resolve_preset
from common.resume import RunOptions

Approach = Literal["end-to-end", "two-stage"]
ScheduleName = Literal["cosine", "step", "constant"]

DEMO_METRICS = ("EN", "SD", "SF", "AG", "MI", "FMI_pixel", "FMI_dct", "SCD", "VIF", "Qabf", "Nabf", "SSIM",
                "PSNR", "MSE", "CC")
"""Metrics of the demo evaluation: every default column except MS_SSIM, which needs images above 160 px."""


@dataclass(frozen=True)
class DataConfig:
    """Training data."""

    root: tuple[Path, ...] = ()
    """Data roots (KAIST-style lwir/+visible/, or paired ir/+vi/ folders, or a local save_to_disk dataset),
    concatenated in order. None: the demo dataset is generated and used."""
    layout: Literal["auto", "kaist", "paired"] = "auto"
    """Folder layout; auto picks kaist when any lwir/ folder pair exists."""
    selection: Literal["first", "uniform"] = "first"
    """Which train_num pairs to use: the first ones in key order, or evenly spaced ones."""
    hflip: bool = False
    """Flip both images of a pair horizontally at random (seeded by seed, epoch and index); off as in the paper."""
    workers: int = 4
    """Data-loader worker processes per training process."""
    demo_root: Path = Path("data/ivif_demo")
    """Where the demo dataset is generated (once) and read from."""
    demo_seed: int = 0
    """Seed of the demo dataset generator."""


@dataclass(frozen=True)
class LossConfig:
    """Fusion loss weights: total = pix + 10 gra + w_ssim ssim."""

    w_ssim: float = 0.0
    """Weight of the fork's optional MS-SSIM term (0 = official loss)."""


@dataclass(frozen=True)
class LrMultConfig:
    """Learning-rate multipliers of the optimizer parameter groups ; equal values give the fork's
    single rate."""

    ir_encoder: float = 1.0
    """IR auto-encoder group (end-to-end only)."""
    vi_encoder: float = 1.0
    """VIS auto-encoder group (end-to-end only)."""
    cam: float = 1.0
    """Cross-attention module, conv_gra and the temperatures."""
    decoder: float = 1.0
    """Fusion decoder."""


@dataclass(frozen=True)
class ModelConfig:
    """Network options."""

    shift: bool = False
    """Roll the second self-attention stage by half a window (the original's test-time shift; a no-op up to
    rounding)."""
    deep_weight: Literal["signed", "abs"] = "signed"
    """Deep skip ratio: signed S(x) as the released weights, or |S(x)|."""
    window_batch: int = 64
    """Deep-feature windows the cross-attention processes at once."""
    freeze_output_norm: bool = False
    """Keep the decoder's last BatchNorm scale and shift at 1 and 0 (the demo preset turns this on): the min-max
    output sees them only through its 1e-6, and Adam scales that tiny, steady gradient up to full steps that drive
    the scale through zero, inverting the output."""


@dataclass(frozen=True)
class InitConfig:
    """Initial weights from local `.model` files (never downloaded)."""

    ae_ir: Path | None = None
    """IR auto-encoder (`auto_encoder_epoch_4_ir.model` or an end-to-end `*_ir_encoder_*` file). Fusion stage:
    default is the last completed stage-1 epoch; end-to-end: a warm start."""
    ae_vi: Path | None = None
    """VIS auto-encoder, as --init.ae-ir."""
    fusion: Path | None = None
    """Fusion network (`fusetrans_*` or `end_to_end_fusion_*`): a warm start of the fusion stage or end-to-end."""


@dataclass(frozen=True)
class AutoencoderConfig:
    """Stage 1 of the two-stage approach: one auto-encoder per modality trained for reconstruction."""

    epochs: int = 4
    """Epochs per auto-encoder."""
    lr: float = 1e-4
    """Learning rate."""
    batch: int = 2
    """Global batch size."""
    train_num: int = 40000
    """Images used: the IR (resp. VIS) images of the first train_num pairs."""
    lr_schedule: ScheduleName = "step"
    """Schedule (step: base for epochs 1-2, 0.1 base from epoch 3); --lr-schedule-unit and --min-lr apply."""
    weight_decay: float = 0.9
    """Adam's coupled L2 weight decay (official 0.9)."""


@dataclass(frozen=True)
class EvalConfig:
    """Fusion of held-out pairs and their metrics."""

    root: Path | None = None
    """Test images (generic layout: ir/ + vi/ folders); set, the pairs are fused and scored after training too.
    None: no evaluation after training (the demo preset uses its test split)."""
    name: str | None = None
    """Dataset name used in output paths (default: the root folder's name, after its parent's for split folders
    such as test/: ivif_demo_test)."""
    run: Path | None = None
    """Run folder whose weights are used (default: the run this command trains or last trained)."""
    epoch: str = "last"
    """Epoch of the run's .model files: a number or `last`."""
    ae_ir: Path | None = None
    """Explicit IR auto-encoder file (instead of --eval.run)."""
    ae_vi: Path | None = None
    """Explicit VIS auto-encoder file."""
    fusion: Path | None = None
    """Explicit fusion network file."""
    batch: int = 8
    """Pairs of equal size fused at once."""
    quantize: Literal["rint", "truncate"] = "rint"
    """uint8 conversion of the fused image: rint and clip, or the original truncation (max 254)."""
    baseline: Literal["none", "average"] = "none"
    """Also score the averaging fusion rint((IR+VIS)/2) into metrics_average.*."""
    metrics: tuple[str, ...] = ()
    """Metric columns (default: all fusion metrics: EN, SD, SF, AG, MI, FMI, SCD, VIF, Qabf, Nabf, SSIM, MS_SSIM,
    PSNR, MSE, CC)."""
    out: Path | None = None
    """Folder of the fused images (default: output/[run-name/]<tag>)."""


@dataclass(frozen=True)
class CrossFuseConfig:
    """CrossFuse infrared/visible fusion training: end-to-end (default) or two-stage (paper)."""

    epochs: int = 32
    """Epochs of the fusion stage or of end-to-end training."""
    lr: float = 1e-3
    """Base learning rate of the fusion stage / end-to-end (times each group's --lr-mult)."""
    batch: int = 8
    """Global batch size (split evenly over processes)."""
    train_num: int = 20000
    """Training pairs: the first train_num keys in sorted order (or evenly spaced, --data.selection)."""
    height: int = 256
    """Training image height (images are resized)."""
    width: int = 256
    """Training image width."""
    step: int = 10
    """Log interval in iterations (a log line every `step` iterations and at each epoch end)."""
    approach: Approach = "end-to-end"
    """end-to-end: both encoders, CAM and decoder together from scratch; two-stage: auto-encoders, then fusion."""
    stage: Literal["all", "autoencoder", "fusion"] = "all"
    """Two-stage only: run one stage instead of all (completed stages are skipped anyway)."""
    ae_modality: Literal["ir", "vi", "both"] = "both"
    """Auto-encoder stage: which modality (both: IR then VIS)."""
    preset: Literal["auto", "demo", "paper"] = "auto"
    """Defaults to start from (flags still override): auto = paper with a data root, else demo."""
    mode: Literal["train", "fuse", "evaluate"] = "train"
    """train (and evaluate when --eval.root is set), fuse the --eval.root pairs, or fuse and score them."""
    seed: int = 0
    """Seed of initialisation and data order (epoch e's order depends only on seed and e)."""
    save_dir: Path = Path("models")
    """Output root: autoencoder/, transfuse/ and end_to_end/ run folders go here."""
    run_name: str = ""
    """Optional experiment subfolder of --save-dir holding the run folders (e.g. seed1)."""
    resume: str = "auto"
    """auto: continue each stage from its newest checkpoint and skip completed stages; never: start fresh
    (refused where an earlier run exists, unless --overwrite); or a checkpoint path."""
    save_every: int = 1
    """Export the .model files, dump the .mat losses and write a resumable checkpoint every N epochs (and at the
    last epoch)."""
    mixed_precision: Literal["no", "bf16", "fp16", "launch"] = "no"
    """Autocast precision (launch: as accelerate launch says); losses, softmax and min-max stay float32."""
    sync_bn: bool = False
    """Synchronise BatchNorm statistics across processes (default: per process, as the original)."""
    lr_schedule: ScheduleName = "cosine"
    """Fusion / end-to-end schedule: cosine to --min-lr, step (x0.1 from epoch 3, not compounding), constant.
    The paper preset uses step for --approach two-stage."""
    lr_schedule_unit: Literal["epoch", "iteration"] = "epoch"
    """Update the rate at each epoch start (official) or every iteration."""
    min_lr: float = 1e-6
    """Cosine floor (times each group's multiplier)."""
    weight_decay: float = 0.9
    """Adam's coupled L2 weight decay (official 0.9; not AdamW)."""
    grad_clip: float | None = None
    """Clip the total gradient norm of the trainable parameters before each step of the fusion stage or end-to-end
    training (None: no clipping, as the original)."""
    learnable_temperature: bool = True
    """One learnable temperature per cross-attention block (the fork's); the paper preset turns it off for
    --approach two-stage."""
    allow_random_encoders: bool = False
    """Fusion stage: train on randomly initialised encoders when no stage-1 weights exist (not meaningful)."""
    tensorboard: bool = True
    """Write TensorBoard events of the logged losses into each run folder."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss weights."""
    lr_mult: LrMultConfig = field(default_factory=LrMultConfig)
    """Per-group learning-rate multipliers."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Network options."""
    init: InitConfig = field(default_factory=InitConfig)
    """Initial weights."""
    ae: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    """Stage-1 auto-encoder settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    run: Annotated[RunOptions, tyro.conf.OmitArgPrefixes] = field(
        default_factory=lambda: RunOptions(checkpoint_every=500))
    """Checkpoints, resuming and stopping (iterations)."""


def paper_defaults(base: CrossFuseConfig, approach: Approach) -> CrossFuseConfig:
    """The paper preset (§4.2) for `approach`: two-stage fusion uses the official step schedule and no temperature."""
    if approach == "two-stage":
        return dataclasses.replace(base, approach=approach, lr_schedule="step", learnable_temperature=False)
    return dataclasses.replace(base, approach=approach)


def demo_defaults(base: CrossFuseConfig, approach: Approach) -> CrossFuseConfig:
    """The demo preset (§4.4, retuned): 48x48 demo pairs, batch 4, 128 pairs, 10 epochs, decoder lr x30, cosine,
    temperature on, no weight decay, the decoder's output BatchNorm frozen and the gradient norm clipped at 100;
    stage 1 2 epochs at lr 1e-3; evaluation of the demo test split with the averaging baseline.

    Why the output norm is frozen: the per-image min-max output is invariant to the last BatchNorm's shift and, up
    to the sign, to its scale, so the loss reaches them only through the min-max's 1e-6; Adam turns that tiny,
    steady gradient into full steps at the x30 decoder rate, the scale crosses zero within ~60 updates and the output
    inverts. Whether and when it crosses depends on float summation order, which is why the spec's 12-epoch recipe
    passed with one thread and collapsed with two. The clip damps the gradient spikes of the first updates.

    The fusion stage of the two-stage approach uses exactly the end-to-end settings, so the two runs compare fairly.
    Outputs go to models/demo (a later real run in models/ never meets the demo's files); to stay small on disk
    (the fusion net's .model file is 83 MB, a resumable state with Adam's moments 260 MB) the demo exports the
    last epoch only, checkpoints every 4 epochs and deletes its resumable states once a stage has finished.
    """
    demo_root = base.data.demo_root
    return dataclasses.replace(
        base,
        approach=approach,
        preset="demo",
        epochs=10,
        lr=1e-3,
        batch=4,
        train_num=128,
        height=48,
        width=48,
        step=8,
        lr_schedule="cosine",
        learnable_temperature=True,
        weight_decay=0.0,
        lr_mult=dataclasses.replace(base.lr_mult, decoder=30.0),
        grad_clip=100.0,
        model=dataclasses.replace(base.model, freeze_output_norm=True),
        data=dataclasses.replace(base.data, root=(demo_root / "train",), workers=0),
        ae=dataclasses.replace(base.ae, epochs=2, lr=1e-3, batch=4, train_num=128, weight_decay=0.0),
        eval=dataclasses.replace(base.eval, root=demo_root / "test", baseline="average", metrics=DEMO_METRICS),
        save_dir=Path("models/demo"),
        save_every=10,
        run=dataclasses.replace(base.run, checkpoint_every=128, prune_finished=True),
    )


DESCRIPTION = ("CrossFuse infrared/visible fusion training, end-to-end (default) or two-stage. The defaults below are "
               "the paper's; without --data.root a bare run uses the demo preset on generated data instead "
               "(--preset demo|paper chooses explicitly; flags always win).")


def announce_demo(cfg: CrossFuseConfig) -> str:
    """The notice of a bare run: which data, sizes and epochs the demo uses, and how to train on real data."""
    return (f"No data root configured (--data.root): running the demo preset on the generated dataset in "
            f"{cfg.data.demo_root} ({cfg.height}x{cfg.width} pairs, {cfg.epochs} epochs, then fusion and evaluation "
            f"of its test split; outputs in {cfg.save_dir}). Pass --data.root to train on your data with the paper's "
            "settings.")


def load_config(argv: Sequence[str] | None = None) -> tuple[CrossFuseConfig, list[str]]:
    """Parse the command line into a resolved config (preset applied, `preset` set to demo or paper).

    Returns the config and notices to print (the demo announcement). Raises `ConfigError` for inconsistent flags.
    """
    import sys

    argv = sys.argv[1:] if argv is None else argv

    def demo(first: CrossFuseConfig) -> CrossFuseConfig:
        base = CrossFuseConfig(data=dataclasses.replace(DataConfig(), demo_root=first.data.demo_root))
        return demo_defaults(base, first.approach)

    def paper(first: CrossFuseConfig) -> CrossFuseConfig:
        return paper_defaults(CrossFuseConfig(), first.approach)

    def configured(first: CrossFuseConfig) -> bool:
        return bool(first.data.root) or (first.mode != "train" and first.eval.root is not None)

    config, notices = resolve_preset(CrossFuseConfig, argv, {"demo": demo, "paper": paper}, configured,
                                     announce_demo, description=DESCRIPTION)
    check_config(config)
    return config, notices


def check_config(cfg: CrossFuseConfig) -> None:
    """Raise `ConfigError` for settings that cannot work together."""
    if cfg.approach == "end-to-end" and cfg.stage != "all":
        raise ConfigError("--stage selects a stage of --approach two-stage; end-to-end training has one stage")
    if cfg.mode == "train" and not cfg.data.root:
        raise ConfigError("no training data: pass --data.root DIR (or --preset demo for the generated dataset)")
    if cfg.mode != "train" and cfg.eval.root is None:
        raise ConfigError(f"--mode {cfg.mode} needs --eval.root DIR (a folder with ir/ and vi/ images)")
    for name, value in (("--batch", cfg.batch), ("--ae.batch", cfg.ae.batch), ("--step", cfg.step),
                        ("--epochs", cfg.epochs), ("--ae.epochs", cfg.ae.epochs), ("--train-num", cfg.train_num),
                        ("--ae.train-num", cfg.ae.train_num), ("--eval.batch", cfg.eval.batch)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if min(cfg.height, cfg.width) < 16:
        raise ConfigError(f"--height and --width must be at least 16 (CrossFuse's minimum), "
                          f"got {cfg.height}x{cfg.width}")
    if cfg.eval.epoch != "last" and not cfg.eval.epoch.isdigit():
        raise ConfigError(f"--eval.epoch must be a number or 'last', got {cfg.eval.epoch!r}")
    explicit = (cfg.eval.ae_ir, cfg.eval.ae_vi, cfg.eval.fusion)
    if any(explicit) and not all(explicit):
        raise ConfigError("--eval.ae-ir, --eval.ae-vi and --eval.fusion go together: give all three, or --eval.run")
