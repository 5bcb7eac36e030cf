"""Configuration groups of the colorization package (spec/colorize.md §2-§7): frozen dataclasses whose defaults are
the publication's settings (`paper`), with a help string on every field (tyro turns them into ``--help``).

The trainer's configuration :class:`ColorizeConfig` composes the groups ``--flow.*``, ``--exemplar.*``,
``--fusion.*``, ``--loss.*``, ``--data.*``, ``--eval.*``, ``--train.*`` and ``--optim.*`` with the kit's run flags.
Its defaults are the ``paper`` preset; with no data root a bare run announces it and uses the ``demo`` preset on
the generated demo dataset (§4); flags given on the command line always win (:func:`resolve_config`).
:class:`EvalCommand` is the ``eval`` subcommand (§7), whose defaults come from the checkpoint's recorded config.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import tyro

from common.cli import normalise_flags, parse
from common.errors import ConfigError
from common.presets import resolve_preset
from common.resume import RunOptions, normalise_resume_flags

FlowBackend = Literal["classical", "raft", "memflow"]
DisPreset = Literal["ultrafast", "fast", "medium"]
ExemplarOutput = Literal["warp", "colornet"]
FusionArch = Literal["simple", "colorvid"]
ResidualBase = Literal["flow", "exemplar"]
FirstFrameBase = Literal["exemplar", "zeros", "exemplar_detached"]
ReferenceMode = Literal["mixed", "first_frame"]
ResizeMode = Literal["shorter", "stretch"]
Split = Literal["train", "val", "all"]


@dataclass(frozen=True)
class FlowConfig:
    """The frozen flow module (§2.2): it sees only the luminance of the current and previous frame."""

    backend: FlowBackend = "classical"
    """classical: OpenCV DIS (weight-free, default); raft: torchvision RAFT with local weights; memflow: a user
    checkout of DQiaole/MemFlow."""
    dis_preset: DisPreset = "medium"
    """OpenCV DIS preset of the classical backend."""
    compute_scale: float = 1.0
    """Compute the flow at this fraction of the frame size; the flow is resized back and its vectors rescaled."""
    raft_model: Literal["small", "large"] = "small"
    """torchvision RAFT variant (raft_small 990,162 / raft_large 5,257,536 parameters)."""
    raft_weights: Path | None = None
    """RAFT state dict file (raft_small_C_T_V2-01064c6d.pth or raft_large_C_T_SKHT_V2-ff5fadd5.pth), loaded strictly."""
    raft_updates: int = 12
    """RAFT recurrent refinement iterations."""
    allow_random_init: bool = False
    """Let a learned flow backend run with random weights when no weight file is given (tests only)."""
    memflow_path: Path | None = None
    """Root of a DQiaole/MemFlow checkout (backend memflow)."""
    memflow_ckpt: Path | None = None
    """MemFlow checkpoint (``["model"]`` or a plain state dict), loaded strictly."""
    memflow_config: str = "sintel_memflownet"
    """Module name under the checkout's configs/ that provides get_cfg()."""


@dataclass(frozen=True)
class ExemplarConfig:
    """The SwinTExCo exemplar branch (§2.3): frozen Swin embed_net, trainable nonlocal_net, frozen colornet."""

    swintexco_ckpt: Path | None = None
    """SwinTExCo checkpoint folder with embed_net.pth, nonlocal_net.pth, colornet.pth (Strategy 1); absent =
    Strategy 2 (pretrained backbone only, nonlocal_net from scratch)."""
    backbone: str = "swinv2_cr_tiny_ns_224"
    """timm backbone of embed_net (features_only, out_indices 0-3)."""
    backbone_embed_dim: int | None = None
    """Override the backbone's embed_dim (the demo uses 32); None keeps the architecture's value."""
    backbone_depths: tuple[int, ...] | None = None
    """Override the backbone's stage depths (the demo uses 1 1 1 1)."""
    backbone_heads: tuple[int, ...] | None = None
    """Override the backbone's attention heads per stage (the demo uses 1 2 4 8)."""
    backbone_weights: Path | None = None
    """Strategy 2: timm classifier state dict (.pth or .safetensors) for the backbone; its head is dropped."""
    allow_download: bool = False
    """Strategy 2 without a weight file: download the backbone from the Hugging Face hub (otherwise random init)."""
    imagenet_normalize: bool = False
    """Apply ImageNet mean/std before Swin (Strategy 2 opt-in; SwinTExCo's weights expect plain [0, 1] RGB)."""
    warpnet_width: float = 1.0
    """Width multiplier w of nonlocal_net (1 = SwinTExCo: fc 128w, adapters 128w/256w, correlation 256w)."""
    temperature: float = 0.01
    """Softmax temperature of the correlation in training."""
    eval_temperature: float = 0.01
    """Softmax temperature in evaluation (SwinTExCo's inference used 1e-10: opt-in)."""
    output: ExemplarOutput = "warp"
    """Exemplar colour fed to the fusion: warp (the correlation-warped reference ab, as the public fusion system)
    or colornet (ColorVidNet's ab; needs pretrained colornet weights)."""


@dataclass(frozen=True)
class FusionConfig:
    """The trainable fusion net (§2.4): fused ab = base + tanh(r)."""

    arch: FusionArch = "simple"
    """simple: 3-level UNet (GroupNorm, SiLU); colorvid: the ColorVidNet layout with 8 inputs (FlowChroma
    FusionNetV1)."""
    width: int = 32
    """Base width c of the simple UNet (widths c, 2c, 4c)."""
    residual_base: ResidualBase = "flow"
    """flow: base = propagated ab (t >= 1), the exemplar on frame 0; exemplar: base = exemplar ab on every frame."""
    first_frame_base: FirstFrameBase = "exemplar"
    """Base on frame 0 with residual_base=flow: exemplar (with gradient, supervises nonlocal_net), zeros
    (FlowChroma; use with FusionNetV1 weights) or exemplar_detached."""
    init_from: Path | None = None
    """Start from a FlowChroma checkpoint (fusion_unet strict into the chosen arch; SwinTExCo keys strict)."""


@dataclass(frozen=True)
class LossConfig:
    """FusionLoss weights (§3)."""

    l1: float = 1.0
    """Weight of the per-frame L1 on ab."""
    contextual: float = 0.015
    """Weight of the contextual loss on frame 0 against the reference (Swin features)."""
    temporal: float = 0.5
    """Weight of the temporal terms (align + smooth) on frames t >= 1."""
    smooth: float = 0.3
    """Weight of the flow-warped smoothness inside the temporal term."""
    perceptual: float = 0.0
    """Weight of the optional Swin perceptual term (SwinTExCo used 0.02)."""
    gan: float = 0.0
    """Weight of the optional RaLSGAN generator term on frame 0."""
    gan_start_epoch: int = 3
    """First epoch (1-based) in which the generator term is applied."""
    discriminator_lr: float = 1e-4
    """AdamW learning rate of the discriminator."""
    cx_bandwidth: float = 0.1
    """Contextual-loss bandwidth h."""
    cx_chunk_rows: int = 1024
    """Rows per chunk of the contextual similarity when a stage has more than 4096 positions."""


@dataclass(frozen=True)
class DataConfig:
    """Video clips and references (§5)."""

    dataset: tuple[Path, ...] = ()
    """Training roots: DAVIS (JPEGImages/480p/<seq>/) or generic (<seq>/*.jpg|png); empty = the demo dataset."""
    val_dataset: tuple[Path, ...] = ()
    """Validation roots; empty = the val split of the DAVIS training roots."""
    split: Split = "train"
    """DAVIS split file (ImageSets/2017/<split>.txt) of the training roots; no file = all sequences."""
    imagenet: Path | None = None
    """Reference images: ImageNet layout DIR/<class>/*.JPEG or flat; DIR/<sequence>/ is preferred when present."""
    reference: ReferenceMode = "mixed"
    """mixed: a folder image with probability real_reference_probability, else the clip's first frame;
    first_frame: always the first frame."""
    real_reference_probability: float = 0.7
    """Probability of a folder reference in mixed mode."""
    sequence_length: int = 4
    """Frames per training clip (T)."""
    image_size: int = 224
    """Side S of the square crops (a multiple of 32)."""
    resize: ResizeMode = "shorter"
    """shorter: shorter side to S, then an S x S crop; stretch: resize to S x S (FlowChroma)."""
    workers: int = 4
    """Data-loader worker processes per training process."""
    demo_root: Path = Path("data/colorize_demo")
    """Folder of the generated demo dataset (written once; used when no --data.dataset is given)."""
    demo_seed: int = 0
    """Seed of the generated demo dataset."""


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation of whole sequences (§7)."""

    max_frames: int | None = None
    """Frames per sequence (None: all)."""
    save_frames: bool = False
    """Also write every colorized frame as PNG under eval/frames/<method>/<sequence>/."""
    sample_frames: int = 4
    """Frames per sequence shown in eval/samples/<sequence>.png."""
    lpips_backbone: Path | None = None
    """Local AlexNet state dict for LPIPS (omitted without it)."""
    lpips_heads: Path | None = None
    """LPIPS v0.1 heads (alex.pth; default: the file of an installed lpips or torchmetrics)."""
    fid_weights: Path | None = None
    """Local pt_inception-2015-12-05 weights for FID (omitted without them)."""


@dataclass(frozen=True)
class TrainConfig:
    """The training loop and its outputs (§4, §6)."""

    batch_size: int = 2
    """Clips per micro-batch over all processes (split evenly between them)."""
    epochs: int = 50
    """Epochs; an epoch visits the clip starts 0, T, 2T, ... of every training sequence once, shuffled."""
    output_dir: Path = Path("runs/colorize/paper")
    """Run folder: config, resumable states, fusion_*.pth and swintexco/ exports, losses.mat, plots, eval/."""
    save_every: int = 5
    """Export fusion_epoch_N.pth and swintexco/epoch_N/ every N epochs (and after the last; 0: the last only)."""
    validate_every: int = 1
    """Validate (and pick fusion_best.pth) every N epochs and after the last (0: after the last only)."""
    time_budget_s: float = 0.0
    """Stop training after this many seconds of training (over all reruns), then validate and export; the run
    then counts as finished (0: no budget)."""
    log_every: int = 50
    """Log line, TensorBoard scalars and non-finite check every N optimizer steps."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16", "launch"] = "auto"
    """Autocast precision: auto = fp16 on CUDA, else fp32; bf16 opt-in; launch: as accelerate launch says. LAB,
    correlation, flow and losses stay fp32."""
    seed: int = 0
    """Seed of initialisation, data order, crops, flips, references and dropout."""
    tensorboard: bool = True
    """Write TensorBoard events into the run folder."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW over the nonlocal and fusion groups, cosine per epoch, clipping, accumulation (§4)."""

    lr_nonlocal: float | None = None
    """Learning rate of nonlocal_net (None: 1e-5 fine-tuning with --exemplar.swintexco-ckpt, else 1e-4)."""
    lr_fusion: float = 1e-4
    """Learning rate of the fusion net."""
    accumulation_steps: int = 4
    """Micro-batches per optimizer step (gradient accumulation)."""
    grad_clip: float = 1.0
    """Clip the gradient norm of the trainable parameters (after unscaling)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    min_lr: float = 1e-6
    """Cosine floor (CosineAnnealingLR eta_min; T_max = epochs, stepped per epoch)."""


@dataclass(frozen=True)
class ColorizeConfig:
    """Train the exemplar-based video colorization system (frozen flow + SwinTExCo + fusion net)."""

    preset: Literal["auto", "paper", "demo"] = "auto"
    """paper (the defaults) or demo; auto: demo when no --data.dataset is given, announced."""
    resume: str = "auto"
    """auto: continue the run in --train.output-dir (a finished run is reported complete); never: start fresh
    (refused where an earlier run exists, unless --overwrite); or a resumable state file."""
    flow: FlowConfig = field(default_factory=FlowConfig)
    """Frozen flow module."""
    exemplar: ExemplarConfig = field(default_factory=ExemplarConfig)
    """SwinTExCo exemplar branch (Strategy 1 with --exemplar.swintexco-ckpt DIR, else Strategy 2)."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """Fusion net."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss weights."""
    data: DataConfig = field(default_factory=DataConfig)
    """Clips and references."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation and evaluation outputs."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, outputs, precision."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    run: Annotated[RunOptions, tyro.conf.OmitArgPrefixes] = field(default_factory=RunOptions)
    """Checkpoints, resuming and stopping (--stop-after and --checkpoint-every count micro-batches)."""

    @property
    def uses_demo_data(self) -> bool:
        """True when training reads the generated demo dataset (which is then written first if missing)."""
        return self.data.dataset == (self.data.demo_root,)


def demo_defaults(first: ColorizeConfig) -> ColorizeConfig:
    """The demo preset (§4): the generated dataset at 64 px, T = 4, batch 4, 10 epochs (about 180 steps) at lr
    1e-3, a tiny random-init Swin (Strategy 2), WarpNet width 0.125, fusion width 16, fp32, a 150 s training
    budget, validation and export after the last epoch; outputs in runs/colorize/demo."""
    root = first.data.demo_root
    base = ColorizeConfig()
    # The generated dataset and its references, unless the command names other videos (demo sizes on them).
    sources = {} if first.data.dataset else {"dataset": (root,), "imagenet": root / "references"}
    return dataclasses.replace(
        base,
        exemplar=dataclasses.replace(base.exemplar, backbone_embed_dim=32, backbone_depths=(1, 1, 1, 1),
                                     backbone_heads=(1, 2, 4, 8), warpnet_width=0.125),
        fusion=dataclasses.replace(base.fusion, width=16),
        data=dataclasses.replace(base.data, **sources, image_size=64, sequence_length=4, workers=0, demo_root=root,
                                 demo_seed=first.data.demo_seed),
        train=dataclasses.replace(base.train, batch_size=4, epochs=10, output_dir=Path("runs/colorize/demo"),
                                  save_every=0, validate_every=0, time_budget_s=150.0, log_every=10,
                                  mixed_precision="no"),
        optim=dataclasses.replace(base.optim, lr_nonlocal=1e-3, lr_fusion=1e-3, accumulation_steps=1),
    )


DESCRIPTION = ("Train the exemplar-based video colorization system: a frozen flow module carries the previous "
               "output colour forward, SwinTExCo's exemplar branch transfers colour from a reference image, a "
               "fusion net merges both. The defaults below are the paper's; without --data.dataset a bare run uses "
               "the demo preset on a generated dataset instead (--preset demo|paper chooses; flags always win). "
               "'train_colorize.py eval --checkpoint FILE' evaluates a fusion_*.pth file.")


def announce_demo(cfg: ColorizeConfig) -> str:
    """The notice of a bare run: the demo data and the settings actually used, and how to train on real data."""
    return (f"no data root configured (--data.dataset): running the demo preset on the generated dataset in "
            f"{cfg.data.demo_root} ({cfg.data.image_size}x{cfg.data.image_size} clips of {cfg.data.sequence_length} "
            f"frames, batch {cfg.train.batch_size}, {cfg.train.epochs} epochs, lr {cfg.optim.lr_fusion:g}, a tiny "
            f"random-init Swin, training budget {cfg.train.time_budget_s:g} s; outputs in {cfg.train.output_dir}). "
            "Pass --data.dataset ROOT to train on your videos with the paper's settings.")


def check_config(cfg: ColorizeConfig) -> ColorizeConfig:
    """Refuse values and combinations that cannot work; one :class:`ConfigError` naming the flags."""
    problems = []
    size = cfg.data.image_size
    if size <= 0 or size % 32:
        problems.append(f"--data.image-size must be a positive multiple of 32, got {size}")
    for flag, value in (("--train.batch-size", cfg.train.batch_size), ("--train.epochs", cfg.train.epochs),
                        ("--train.log-every", cfg.train.log_every),
                        ("--data.sequence-length", cfg.data.sequence_length),
                        ("--optim.accumulation-steps", cfg.optim.accumulation_steps)):
        if value < 1:
            problems.append(f"{flag} must be at least 1, got {value}")
    for flag, value in (("--train.save-every", cfg.train.save_every), ("--train.validate-every",
                        cfg.train.validate_every), ("--train.time-budget-s", cfg.train.time_budget_s)):
        if value < 0:
            problems.append(f"{flag} must be 0 or more, got {value}")
    if not 0.0 <= cfg.data.real_reference_probability <= 1.0:
        problems.append(f"--data.real-reference-probability must lie in [0, 1], got "
                        f"{cfg.data.real_reference_probability}")
    if cfg.fusion.arch == "colorvid" and size % 8:
        problems.append("--fusion.arch colorvid needs --data.image-size divisible by 8")
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def resolve_config(argv: Sequence[str]) -> tuple[ColorizeConfig, list[str]]:
    """Parse the training command line with the preset's defaults (flags win); returns the config and notices."""
    argv = normalise_resume_flags(normalise_flags(argv))
    presets = {"paper": lambda first: ColorizeConfig(preset="paper"), "demo": demo_defaults}
    cfg, notices = resolve_preset(ColorizeConfig, argv, presets, lambda first: bool(first.data.dataset),
                                  announce_demo, description=DESCRIPTION)
    return check_config(cfg), notices


# ------------------------------------------------------------------------------------------------ eval subcommand

@dataclass(frozen=True)
class EvalCommand:
    """Evaluate a fusion checkpoint (fusion_epoch_N.pth / fusion_best.pth) on whole sequences: the fused output
    and the gray and exemplar baselines. Data, reference and evaluation settings default to the ones recorded in
    the checkpoint; flags win."""

    checkpoint: Path
    """A fusion_*.pth file written by this trainer (its config rebuilds the system; every weight comes from it)."""
    out: Path | None = None
    """Output folder (default: eval_<checkpoint name>/ beside the checkpoint)."""
    split: Split = "val"
    """DAVIS split of the --data.dataset roots (generic roots: every sequence); --data.val-dataset wins."""
    eval_temperature: float | None = None
    """Correlation temperature (default: the checkpoint's --exemplar.eval-temperature; SwinTExCo used 1e-10)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device (auto: CUDA when available)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Sequences and references."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Frames, samples, LPIPS/FID weight files."""


def config_from_dict(config_type: type, values: dict[str, Any]):
    """Rebuild a (nested) config dataclass from its JSON form (paths and tuples restored; unknown keys ignored)."""
    hints = typing.get_type_hints(config_type, include_extras=True)
    kwargs = {}
    for item in dataclasses.fields(config_type):
        if item.name in values:
            kwargs[item.name] = _from_plain(hints[item.name], values[item.name])
    return config_type(**kwargs)


def _from_plain(hint, value):
    """A JSON value converted to the field type ``hint`` (Path, tuples, dataclasses, optionals)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _from_plain(args[0], value)
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        return config_from_dict(hint, value)
    if hint is Path:
        return Path(value)
    if origin is tuple:
        return tuple(_from_plain(args[0], item) for item in value)
    if args and origin is not Literal:  # X | None
        inner = [arg for arg in args if arg is not type(None)]
        return _from_plain(inner[0], value) if len(inner) == 1 else value
    return value


def resolve_eval_command(argv: Sequence[str], recorded: ColorizeConfig | None) -> EvalCommand:
    """Parse the eval subcommand with the checkpoint's recorded data and evaluation settings as defaults."""
    argv = normalise_flags(argv)
    description = "train_colorize.py eval: " + inspect.cleandoc(EvalCommand.__doc__)
    if recorded is None:
        return parse(EvalCommand, argv, description=description)
    first = parse(EvalCommand, argv, description=description)
    defaults = dataclasses.replace(first, data=recorded.data, eval=recorded.eval)
    return parse(EvalCommand, argv, description=description, default=defaults)
