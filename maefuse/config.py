"""Configuration of `train_mae_fusion.py` (spec §1, §4.2-§4.4): the `train` flags, the `paper` and `demo` presets,
and the stages of `--modes MODE[:EPOCHS[:LR]] ...`.

The dataclass defaults are the paper's settings (§4.2). Without `--data_path` a bare run announces it and uses the
`demo` preset on the generated infrared/visible demo dataset; `--preset paper|demo` chooses explicitly, and flags
given on the command line always win. Flags use the public script's underscore spelling (`--data_path`); the
hyphenated spelling is accepted too.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Sequence

import tyro

from common.errors import ConfigError, DataError
from common.presets import resolve_preset
from common.resume import RunOptions
from maefuse.model import FusionAttention, ModelSize, resolve_size
from maefuse.modes import DEFAULT_MODE, TrainingMode, check_initial_weights, get_mode

PAPER_EPOCHS = 80
DECODER_PRETRAINING_EPOCHS = 50  # inferred from the public `checkpoint-50.pth` (§4.2)
# The demo's stages (§4.4 allows retuning epochs, lr, the stage split and the tiny width). Measured on the demo data
# (tiny, seed 0): the §4.4 split leaves the fusion layer on the plateau where both attentions average over all tokens
# (mean loss 0.128 = the tokens' variance within an image, for ~125 iterations at lr 3e-3); training CFM alone first
# localises its attention, after which CFM + MFM follow (mean loss 0.0076 after 320 CFM iterations, 0.011 after 480
# CFM + MFM ones). The decoder pretraining needs ~800 iterations at lr 2e-3 (training MSE 1.09 -> 0.0012; the decoded
# mean tokens then match the averaged pair's texture). With the decoder frozen the fusion stage keeps the scene (the
# co-trained decoder learns patch-grid patterns that satisfy the gradient loss). The fusion gates are still not reached
# (Qabf 0.23 against averaging's 0.42): see README.md. About 130 s on 2 quiet cores.
DEMO_MODES = ("train_decoder_only:50:2e-3", "train_CFM_mean:20:3e-3", "train_MFM_mean_CFM_open:30:3e-3",
              "train_MFM_fusion_CFM_open:10:3e-4")
DEMO_DECODER_WIDTH = 64  # half the tiny decoder width: the same reconstruction per iteration at ~60 % of the time


@dataclass(frozen=True)
class ModelOptions:
    """Network size (a preset, any field overridden) and fusion attention."""

    model_size: Literal["large", "small", "tiny"] = "large"
    """Size preset: large (faithful ViT-L/16, 640 px), small (224 px, CPU experiments), tiny (128 px, demo)."""
    img_size: int | None = None
    """Override: model input side S (a multiple of patch_size)."""
    patch_size: int | None = None
    """Override: patch side p."""
    embed_dim: int | None = None
    """Override: encoder width D (also the fusion layer's width)."""
    depth: int | None = None
    """Override: encoder blocks."""
    num_heads: int | None = None
    """Override: encoder heads."""
    decoder_embed_dim: int | None = None
    """Override: decoder width d."""
    decoder_depth: int | None = None
    """Override: decoder blocks."""
    decoder_num_heads: int | None = None
    """Override: decoder heads."""
    fusion_num_heads: int | None = None
    """Override: heads of the fusion layer's two attentions (CFM, MFM)."""
    fusion_attention: FusionAttention = "tokens"
    """tokens: attention over the tokens of one image (the paper); official: over the images of a group, as the
    released code (and weights) behave."""
    official_group_size: int = 4
    """official attention: images per group in training (0 = the whole per-device batch, as the public code)."""

    def size(self) -> ModelSize:
        """The resolved `ModelSize` (raises `ConfigError` for sizes that do not agree)."""
        overrides = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelSize) if f.name != "name"}
        return resolve_size(self.model_size, **overrides)


@dataclass(frozen=True)
class TrainConfig:
    """Train MaeFuse (Li et al., IEEE TIP 2025) in stages. Subcommands: train (default), fuse, evaluate; see
    `python train_mae_fusion.py fuse --help`."""

    # ---------------------------------------------------------------------------------------------- data
    data_path: Path | None = None
    """Training data: a folder with IR (ir/infrared) and VIS (vi/vis/visible) images paired by file stem, or a
    local `datasets` save_to_disk folder with vi/ir columns. None: the generated demo dataset (--demo_root)."""
    split: str | None = None
    """LLVIP-style split folder under the IR and VIS folders (e.g. train)."""
    max_pairs: int | None = None
    """Use only the first N pairs by stem (None: all)."""
    extra_images: Path | None = None
    """Unpaired natural images added to train_decoder_only stages (processed like VIS)."""
    demo_root: Path = Path("data/ivif_demo")
    """Where the demo dataset is generated (once) and read from."""
    demo_seed: int = 0
    """Seed of the demo dataset generator."""
    # ---------------------------------------------------------------------------------------------- stages
    training_mode: TrainingMode = DEFAULT_MODE
    """The mode of a single-stage run (README table): which of decoder, CFM, MFM train, and with which loss."""
    modes: tuple[str, ...] = ()
    """Stages run in sequence, MODE[:EPOCHS[:LR]] each: stage k writes to {output_dir}/stage{k}_{mode}/
    and starts from the previous stage's final file. Empty: one stage of --training_mode in --output_dir."""
    resume: Path | None = None
    """Initial MAE encoder + 4-block decoder: a `checkpoint-{e}.pth` of train_decoder_only, the official MAE
    encoder file (decoder not loaded), or the model1.* part of a full file (not a training-state checkpoint: see
    --resume_state)."""
    fusion_weight: Path | None = None
    """Initial fusion layer (CFM + MFM): a `fusion{e}.pth`, or the model2.* part of a full file."""
    all_weight: Path | None = None
    """Initial full model: a `checkpoint{e}.pth`, or the released final_new_60.pth."""
    unsafe_load: bool = False
    """Load weight files holding pickled Python objects (only files you trust)."""
    allow_random_decoder: bool = False
    """Let a mode that trains through the decoder start without a loaded decoder (not meaningful)."""
    # ---------------------------------------------------------------------------------------------- optimisation
    batch_size: int = 32
    """Global batch size (split evenly over processes)."""
    epochs: int | None = None
    """Epochs of a stage without its own :EPOCHS (default 80; 50 for train_decoder_only)."""
    lr: float = 1e-4
    """AdamW learning rate of a stage without its own :LR."""
    weight_decay: float = 0.05
    """AdamW weight decay of trainable weights with ndim >= 2 (biases and 1-D parameters get none)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """constant (paper), or cosine to 0 after --warmup_epochs of warm-up (the kit's quadratic ramp), per iteration."""
    warmup_epochs: int = 0
    """Warm-up epochs of the cosine schedule."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """fp32 (no) or bf16 autocast; fp16 is refused (no loss scaling in MaeFuse's recipe)."""
    seed: int = 0
    """Seed of the random initialisation and the data order."""
    num_workers: int = 4
    """Data-loader worker processes per training process."""
    model: Annotated[ModelOptions, tyro.conf.OmitArgPrefixes] = field(default_factory=ModelOptions)
    """Network size and fusion attention."""
    # ---------------------------------------------------------------------------------------------- outputs
    output_dir: Path = Path("runs/mae_fusion")
    """Run folder (the demo preset uses runs/mae_fusion_demo, so a real run never meets the demo's files)."""
    log_every: int = 20
    """Log line every N iterations (and at each epoch end)."""
    val_every: int = 5
    """Fuse up to 8 fixed training pairs into samples/epoch{e}/ when e % N == 0 and at the last epoch (0: last
    only)."""
    save_every: int = 5
    """Export checkpoint{e}.pth + fusion{e}.pth (checkpoint-{e}.pth for train_decoder_only) when e % N == 0 and at
    the last epoch (0: last only); a resumable state is written with them."""
    keep_last: int = 0
    """Exported epochs kept per stage (0: all)."""
    recon_pairs: int = 64
    """train_decoder_only: training pairs whose reconstruction MSE is measured before and after the stage."""
    tensorboard: bool = True
    """Write TensorBoard events of the logged losses into each stage folder."""
    preset: Literal["auto", "paper", "demo"] = "auto"
    """Defaults to start from (flags still override): auto = paper with --data_path, else demo."""
    resume_state: str = "auto"
    """auto: skip finished stages and continue an interrupted one from its newest state; never: start fresh
    (refused where an earlier run exists, unless --overwrite); or a state file for the first unfinished stage."""
    run: Annotated[RunOptions, tyro.conf.OmitArgPrefixes] = field(default_factory=RunOptions)
    """Checkpoints, resuming and stopping (--checkpoint_every and --stop_after count iterations of a stage)."""

    @property
    def uses_demo_data(self) -> bool:
        """Whether the run trains on the generated demo dataset."""
        return self.preset == "demo" and self.data_path == self.demo_root / "train"


@dataclass(frozen=True)
class Stage:
    """One training stage: its place in the run, mode, epochs, learning rate and output folder."""

    index: int
    count: int
    mode: TrainingMode
    epochs: int
    lr: float
    folder: Path

    @property
    def label(self) -> str:
        """`stage 2/3 train_MFM_mean_CFM_open` (1-based, for the console)."""
        return f"stage {self.index + 1}/{self.count} {self.mode}"


def default_epochs(cfg: TrainConfig, mode: str) -> int:
    """--epochs, else the paper's 80 (50 for decoder pretraining)."""
    if cfg.epochs is not None:
        return cfg.epochs
    return DECODER_PRETRAINING_EPOCHS if mode == "train_decoder_only" else PAPER_EPOCHS


def parse_stage(text: str) -> tuple[str, int | None, float | None]:
    """`MODE[:EPOCHS[:LR]]` -> (mode, epochs or None, lr or None); raises `ConfigError` naming the bad part."""
    parts = text.split(":")
    if len(parts) > 3 or not parts[0]:
        raise ConfigError(f"--modes {text!r}: expected MODE[:EPOCHS[:LR]], e.g. train_decoder_only:6:1e-3")
    get_mode(parts[0])
    try:
        epochs = int(parts[1]) if len(parts) > 1 and parts[1] else None
        lr = float(parts[2]) if len(parts) > 2 and parts[2] else None
    except ValueError:
        raise ConfigError(f"--modes {text!r}: EPOCHS must be an integer and LR a number") from None
    return parts[0], epochs, lr


def stage_plan(cfg: TrainConfig) -> list[Stage]:
    """The stages this command trains, in order (one stage of --training_mode when --modes is empty)."""
    if not cfg.modes:
        mode = cfg.training_mode
        return [Stage(0, 1, mode, default_epochs(cfg, mode), cfg.lr, cfg.output_dir)]
    stages = []
    for index, text in enumerate(cfg.modes):
        mode, epochs, lr = parse_stage(text)
        epochs = default_epochs(cfg, mode) if epochs is None else epochs
        stages.append(Stage(index, len(cfg.modes), mode, epochs, cfg.lr if lr is None else lr,  # type: ignore[arg-type]
                            cfg.output_dir / f"stage{index}_{mode}"))
    return stages


def demo_defaults(base: TrainConfig) -> TrainConfig:
    """The demo preset (§4.4, retuned as `DEMO_MODES` says): tiny model with a 64-wide decoder, tokens attention,
    batch 4, no workers, seed 0, the first 64 demo pairs, exports and samples at each stage's last epoch only, then
    fuse + evaluate of the held-out pairs."""
    return dataclasses.replace(
        base, preset="demo", data_path=base.demo_root / "train", max_pairs=64, modes=DEMO_MODES, batch_size=4,
        num_workers=0, seed=0, model=ModelOptions(model_size="tiny", decoder_embed_dim=DEMO_DECODER_WIDTH),
        output_dir=Path("runs/mae_fusion_demo"), log_every=8, val_every=0, save_every=0, recon_pairs=64)


def announce_demo(cfg: TrainConfig) -> str:
    """The notice of a bare run: the demo data and the settings actually used."""
    stages = " -> ".join(f"{s.mode} {s.epochs} ep lr {s.lr:g}" for s in stage_plan(cfg))
    size = cfg.model.size()
    return (f"No --data_path given: running the demo preset on the generated infrared/visible dataset in "
            f"{cfg.demo_root} (model {cfg.model.model_size} {size.img_size}px, encoder width {size.embed_dim}, decoder "
            f"width {size.decoder_embed_dim}, {cfg.model.fusion_attention} "
            f"attention, first {cfg.max_pairs} pairs, batch {cfg.batch_size}, seed {cfg.seed}: {stages}; then "
            f"fuse + evaluate of its held-out pairs; outputs in {cfg.output_dir}). Pass --data_path DIR to train "
            "on your data with the paper's settings.")


DESCRIPTION = ("Train MaeFuse infrared/visible fusion (frozen MAE encoder, CFM/MFM fusion layer, MAE decoder). The "
               "defaults are the paper's; without --data_path a bare run uses the demo preset on generated data "
               "(--preset demo|paper chooses explicitly; flags always win). Other commands: "
               "`train_mae_fusion.py fuse --help`, `train_mae_fusion.py evaluate --help`.")


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Raise `ConfigError` for settings that cannot work together; returns `cfg`."""
    if cfg.mixed_precision == "fp16":
        raise ConfigError("--mixed_precision fp16 is refused: MaeFuse trains in fp32 or bf16 (fp16 needs loss scaling "
                          "the recipe does not have); use --mixed_precision bf16 or no")
    if cfg.data_path is None:
        raise ConfigError("no training data: pass --data_path DIR (or --preset demo for the generated dataset)")
    if not cfg.uses_demo_data and not cfg.data_path.exists():  # a wrong path first, before any weights question
        raise DataError(f"data folder not found: {cfg.data_path} (check --data_path)")
    for name, value in (("--batch_size", cfg.batch_size), ("--log_every", cfg.log_every), ("--lr", cfg.lr)):
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    for name, value in (("--val_every", cfg.val_every), ("--save_every", cfg.save_every),
                        ("--keep_last", cfg.keep_last), ("--warmup_epochs", cfg.warmup_epochs),
                        ("--recon_pairs", cfg.recon_pairs), ("--num_workers", cfg.num_workers)):
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    if cfg.max_pairs is not None and cfg.max_pairs < 1:
        raise ConfigError(f"--max_pairs must be at least 1, got {cfg.max_pairs}")
    cfg.model.size()
    if cfg.model.official_group_size < 0:
        raise ConfigError(f"--official_group_size must be >= 0, got {cfg.model.official_group_size}")
    stages = stage_plan(cfg)
    for stage in stages:
        if stage.epochs < 1 or stage.lr <= 0:
            raise ConfigError(f"{stage.label}: epochs must be at least 1 and lr positive (got {stage.epochs}, "
                              f"{stage.lr:g})")
    if cfg.extra_images is not None and not any(s.mode == "train_decoder_only" for s in stages):
        raise ConfigError("--extra_images only serves train_decoder_only stages, and this run has none")
    # The part of the §4.1 decoder guard known before any file is read (each stage checks its loaded files again).
    decoder_ready = cfg.resume is not None or cfg.all_weight is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stage itself warns, once its weights are loaded
        for stage in stages:
            spec = get_mode(stage.mode)
            check_initial_weights(spec, encoder_loaded=True, decoder_loaded=decoder_ready,
                                  allow_random_decoder=cfg.allow_random_decoder)
            decoder_ready = decoder_ready or "decoder" in spec.trainable
    return cfg


def resolve_train_config(argv: Sequence[str]) -> tuple[TrainConfig, list[str]]:
    """Parse the `train` command line with the preset's defaults (flags win); returns the checked config and the
    notices to print (the demo announcement)."""

    def demo(first: TrainConfig) -> TrainConfig:
        return demo_defaults(TrainConfig(demo_root=first.demo_root, demo_seed=first.demo_seed))

    presets = {"paper": lambda first: TrainConfig(), "demo": demo}
    cfg, notices = resolve_preset(TrainConfig, argv, presets, lambda first: first.data_path is not None,
                                  announce_demo, description=DESCRIPTION, use_underscores=True)
    return check_config(cfg), notices

