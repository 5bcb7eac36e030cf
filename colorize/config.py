"""Configuration groups of the colorization package (spec/colorize.md §2-§7): frozen dataclasses whose defaults are
the publication's settings (`paper`), with a help string on every field (tyro turns them into ``--help``).

The trainer composes these groups (``--flow.*``, ``--exemplar.*``, ``--fusion.*``, ``--loss.*``, ``--data.*``,
``--eval.*``) with its own training, optimiser and run settings. :data:`DEMO_OVERRIDES` holds the `demo` preset's
values for the groups defined here (§4), as ``{group: {field: value}}``, for the kit's preset resolver.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
    fid_weights: Path | None = None
    """Local pt_inception-2015-12-05 weights for FID (omitted without them)."""


DEMO_OVERRIDES: dict[str, dict[str, object]] = {
    "exemplar": {"backbone_embed_dim": 32, "backbone_depths": (1, 1, 1, 1), "backbone_heads": (1, 2, 4, 8),
                 "warpnet_width": 0.125},
    "fusion": {"width": 16},
    "data": {"image_size": 64, "sequence_length": 4, "workers": 0},
}
"""The `demo` preset's values for the groups of this module (§4); training settings live in the trainer."""
