"""MaeFuse network with the released code's module names and state-dict keys (spec §2, §6).

- `MaeViT` (`model1`): the frozen MAE ViT encoder (timm `PatchEmbed` + `Block`, no cls token, no masking) and the
  4-block MAE decoder, each with a fixed 2-D sin-cos position table.
- `FusionLayer` (`model2`): CFM (`cross_model`), then MFM (`merge_model`, `fc1`, GELU, `fc2`, `ln`), with its own
  fixed position table; attention over tokens of one image (`tokens`) or over images of a group (`official`).
- `MaeFuse` joins them (the released `ConnectModel_MAE_Fuion` layout: `model1.*`, `model2.*`). The encoder runs
  once per call on the concatenated batch [x_vi; x_ir] under `no_grad`; the route says how far the forward goes.

Images are (B,3,S,S) tensors in ImageNet-normalised space; tokens are (B,N,D) with N = (S/p)^2.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from typing import Iterator, Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from common.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MLP_RATIO = 4
VIT_NORM_EPS = 1e-6
TABLE_TOLERANCE = 1e-4
SINCOS_TEMPERATURE = 10000.0

FusionAttention = Literal["tokens", "official"]
Route = Literal["reconstruct", "cfm", "cfm_image", "fused", "fused_image", "mean_image"]
"""How far a forward pass goes: `reconstruct` decodes each encoded image; `cfm`/`fused` stop at the CFM output c or
the fusion output h; `cfm_image`/`fused_image` decode them; `mean_image` decodes the latent mean (z_v + z_i)/2."""

ENCODER_MODULES = ("model1.patch_embed", "model1.blocks", "model1.norm")
DECODER_MODULES = ("model1.decoder_embed", "model1.decoder_blocks", "model1.decoder_norm", "model1.decoder_pred")
CFM_MODULES = ("model2.cross_model",)
MFM_MODULES = ("model2.merge_model", "model2.fc1", "model2.fc2", "model2.ln")
POSITION_TABLES = ("model1.pos_embed", "model1.decoder_pos_embed", "model2.pos_embed")
"""Fixed sin-cos tables: frozen parameters, in every state dict, never in an optimizer."""


@dataclass(frozen=True)
class ModelSize:
    """Every dimension of a MaeFuse network (spec §2.1); any field can be changed as long as the sizes agree.

    Attributes:
        name: the preset this size came from (`large`, `small`, `tiny`), or `custom` after a change.
        img_size: side S of the square model input.
        patch_size: patch side p (S must be a multiple).
        embed_dim, depth, num_heads: encoder width D, blocks, heads.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder width d, blocks, heads.
        fusion_num_heads: heads of the two fusion attentions (CFM, MFM) of width D.
    """

    name: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    fusion_num_heads: int

    @property
    def grid(self) -> int:
        """Patches per side G = S / p."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per image N = G^2."""
        return self.grid ** 2

    def check(self) -> "ModelSize":
        """Return self, or raise `ConfigError` naming the fields whose values cannot build a network."""
        problems = []
        if self.img_size <= 0 or self.patch_size <= 0 or self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a positive multiple of patch_size {self.patch_size}")
        for width, heads, label in ((self.embed_dim, self.num_heads, "embed_dim/num_heads"),
                                    (self.decoder_embed_dim, self.decoder_num_heads,
                                     "decoder_embed_dim/decoder_num_heads"),
                                    (self.embed_dim, self.fusion_num_heads, "embed_dim/fusion_num_heads")):
            if heads <= 0 or width % heads:
                problems.append(f"{label}: width {width} is not divisible by {heads} heads")
        for width, label in ((self.embed_dim, "embed_dim"), (self.decoder_embed_dim, "decoder_embed_dim")):
            if width <= 0 or width % 4:
                problems.append(f"{label} {width} must be a positive multiple of 4 (2-D sin-cos table)")
        if self.depth < 1 or self.decoder_depth < 1:
            problems.append(f"depth {self.depth} and decoder_depth {self.decoder_depth} must be at least 1")
        if problems:
            raise ConfigError(f"model size '{self.name}' is inconsistent: " + "; ".join(problems))
        return self

    def as_meta(self) -> dict:
        """Plain-dict form (stored in exported weight files' `meta`)."""
        return asdict(self)


SIZE_PRESETS: dict[str, ModelSize] = {
    "large": ModelSize("large", 640, 16, 1024, 24, 16, 512, 4, 16, 16),
    "small": ModelSize("small", 224, 16, 384, 12, 6, 256, 4, 8, 6),
    "tiny": ModelSize("tiny", 128, 8, 128, 2, 4, 128, 4, 4, 4),
}


def resolve_size(name: str, **changes: int | None) -> ModelSize:
    """The preset `name` with the given fields changed (None = keep); renamed `custom` when anything changed.

    Raises:
        ConfigError: an unknown preset or field, or sizes that do not agree.
    """
    if name not in SIZE_PRESETS:
        raise ConfigError(f"unknown model size '{name}'; choose from {', '.join(SIZE_PRESETS)}")
    preset = SIZE_PRESETS[name]
    known = {field.name for field in fields(ModelSize)} - {"name"}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ConfigError(f"unknown model size field(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    given = {key: value for key, value in changes.items() if value is not None and value != getattr(preset, key)}
    return (replace(preset, name="custom", **given) if given else preset).check()


def size_from_meta(meta: dict) -> ModelSize:
    """The `ModelSize` stored by `ModelSize.as_meta` (for example in a weight file's `meta['size']`)."""
    return ModelSize(**{field.name: meta[field.name] for field in fields(ModelSize)}).check()


def sincos_position_table(width: int, grid: int) -> torch.Tensor:
    """The fixed 2-D sin-cos table (G^2, width) in float32, computed in float64 (spec §2.4).

    With K = width/4 and w_k = 10000^(-k/K), token t = r*G + c gets [sin(c w), cos(c w), sin(r w), cos(r w)]
    (column first, as MAE's `get_2d_sincos_pos_embed` without a cls row). Built with numpy, so it is a CPU tensor
    even under a `torch.device('meta')` context.
    """
    quarter = width // 4
    omega = SINCOS_TEMPERATURE ** (-np.arange(quarter, dtype=np.float64) / quarter)
    rows, columns = np.divmod(np.arange(grid * grid, dtype=np.float64), grid)
    column_angles = np.outer(columns, omega)
    row_angles = np.outer(rows, omega)
    table = np.concatenate([np.sin(column_angles), np.cos(column_angles), np.sin(row_angles), np.cos(row_angles)], 1)
    return torch.from_numpy(table.astype(np.float32))


def _fixed_table(tokens: int, width: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(1, tokens, width), requires_grad=False)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B,3,S,S) -> (B,N,p^2*3): token r*G+c holds rows r*p.. and columns c*p..; element (py*p+px)*3+ch is
    channel ch of pixel (py, px) (MAE layout)."""
    batch, channels, height, width = images.shape
    grid = height // patch_size
    if height != width or height % patch_size:
        raise ValueError(f"patchify needs square images with a side divisible by {patch_size}, got {height}x{width}")
    patches = images.reshape(batch, channels, grid, patch_size, grid, patch_size)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, grid * grid, patch_size * patch_size * channels)


def unpatchify(tokens: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Inverse of `patchify`: (B,N,p^2*3) -> (B,3,S,S)."""
    batch, count, values = tokens.shape
    grid = round(count ** 0.5)
    channels = values // (patch_size * patch_size)
    if grid * grid != count or channels * patch_size * patch_size != values:
        raise ValueError(f"cannot unpatchify {tuple(tokens.shape)} with patch size {patch_size}")
    patches = tokens.reshape(batch, grid, grid, patch_size, patch_size, channels)
    return patches.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, grid * patch_size, grid * patch_size)


class MaeViT(nn.Module):
    """`model1`: the MAE ViT encoder E and the MAE decoder, with fixed position tables `pos_embed` (1,N,D) and
    `decoder_pos_embed` (1,N,d). MAE initialisation (xavier-uniform Linear and patch projection, zero biases,
    LayerNorm 1/0)."""

    def __init__(self, size: ModelSize):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=VIT_NORM_EPS)
        self.patch_size = size.patch_size
        self.patch_embed = PatchEmbed(size.img_size, size.patch_size, 3, size.embed_dim)
        self.pos_embed = _fixed_table(size.num_patches, size.embed_dim)
        self.blocks = nn.ModuleList(Block(size.embed_dim, size.num_heads, mlp_ratio=MLP_RATIO, qkv_bias=True,
                                          norm_layer=norm) for _ in range(size.depth))
        self.norm = norm(size.embed_dim)
        self.decoder_embed = nn.Linear(size.embed_dim, size.decoder_embed_dim)
        self.decoder_pos_embed = _fixed_table(size.num_patches, size.decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList(Block(size.decoder_embed_dim, size.decoder_num_heads, mlp_ratio=MLP_RATIO,
                                                  qkv_bias=True, norm_layer=norm) for _ in range(size.decoder_depth))
        self.decoder_norm = norm(size.decoder_embed_dim)
        self.decoder_pred = nn.Linear(size.decoder_embed_dim, size.patch_size ** 2 * 3)
        self._init_weights()

    def _init_weights(self) -> None:
        projection = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(projection.view(projection.shape[0], -1))  # like a Linear layer (MAE)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """E(x) = norm(blocks(patch_embed(x) + pos_embed)): (B,3,S,S) -> (B,N,D)."""
        tokens = self.patch_embed(images) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,N,D) -> patch predictions (B,N,p^2*3)."""
        hidden = self.decoder_embed(tokens) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            hidden = block(hidden)
        return self.decoder_pred(self.decoder_norm(hidden))

    def decode_image(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,N,D) -> decoded image (B,3,S,S) in normalised space."""
        return unpatchify(self.decode(tokens), self.patch_size)


def _group_chunks(batch: int, group_size: int) -> list[tuple[int, int, int]]:
    """(start, number of groups, group size) runs covering `batch` images in consecutive groups; the last group
    may be smaller. `group_size` 0 means one group of the whole batch."""
    group = batch if group_size == 0 else min(group_size, batch)
    full = batch // group
    chunks = [(0, full, group)]
    if batch - full * group:
        chunks.append((full * group, 1, batch - full * group))
    return chunks


def attend(attention: nn.MultiheadAttention, query: torch.Tensor, key_value: torch.Tensor,
           mode: FusionAttention, group_size: int) -> torch.Tensor:
    """Multi-head attention of (B,N,D) queries over (B,N,D) keys = values (spec §2.6).

    `tokens`: each query token attends over the N tokens of its own image. `official`: the released code's
    behaviour, where images of one group (consecutive, `group_size`, 0 = whole batch) form the sequence: at each
    token position, image b's query attends over the tokens at that position of the images in its group.
    """
    if mode == "tokens":
        return attention(query, key_value, key_value, need_weights=False)[0]
    tokens = query.shape[1]
    outputs = []
    for start, groups, group in _group_chunks(query.shape[0], group_size):
        folded_key_value = _fold_groups(key_value, start, groups, group)
        result = attention(_fold_groups(query, start, groups, group), folded_key_value, folded_key_value,
                           need_weights=False)[0]
        outputs.append(result.reshape(groups, tokens, group, -1).transpose(1, 2).reshape(groups * group, tokens, -1))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _fold_groups(x: torch.Tensor, start: int, groups: int, group: int) -> torch.Tensor:
    """Images start.. of (B,N,D), in `groups` groups of `group`, as (groups*N, group, D): per group and token
    position, one sequence over the group's images (what the released code's sequence-first MHA saw)."""
    tokens, width = x.shape[1:]
    chunk = x[start:start + groups * group].reshape(groups, group, tokens, width)
    return chunk.transpose(1, 2).reshape(groups * tokens, group, width)


class FusionTokens(NamedTuple):
    """Fusion-layer outputs: the CFM output c and the fusion output h (None when only CFM ran), each (B,N,D)."""

    cfm: torch.Tensor
    fused: torch.Tensor | None


class FusionLayer(nn.Module):
    """`model2`: CFM (`cross_model`) and MFM (`merge_model` + `fc1` + `fc2` + `ln`) with a fixed table `pos_embed`.

    With v = z_v + P and i = z_i + P: c = C(i, v) + C(v, i); f = M(c, v) + M(c, i); h = ln(fc2(GELU(fc1(f))) + f).
    PyTorch default initialisation, as the released code.
    """

    def __init__(self, size: ModelSize):
        super().__init__()
        width = size.embed_dim
        self.pos_embed = _fixed_table(size.num_patches, width)
        self.cross_model = nn.MultiheadAttention(width, size.fusion_num_heads, batch_first=True)
        self.merge_model = nn.MultiheadAttention(width, size.fusion_num_heads, batch_first=True)
        self.fc1 = nn.Linear(width, MLP_RATIO * width)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(MLP_RATIO * width, width)
        self.ln = nn.LayerNorm(width)

    def forward(self, z_vi: torch.Tensor, z_ir: torch.Tensor, *, cfm_only: bool = False,
                attention: FusionAttention = "tokens", group_size: int = 1) -> FusionTokens:
        """Fuse encoder tokens (B,N,D); `z_vi` and `z_ir` are never modified (the position table is added out of
        place)."""
        vi = z_vi + self.pos_embed
        ir = z_ir + self.pos_embed
        cfm = (attend(self.cross_model, ir, vi, attention, group_size)
               + attend(self.cross_model, vi, ir, attention, group_size))
        if cfm_only:
            return FusionTokens(cfm, None)
        merged = (attend(self.merge_model, cfm, vi, attention, group_size)
                  + attend(self.merge_model, cfm, ir, attention, group_size))
        return FusionTokens(cfm, self.ln(self.fc2(self.gelu(self.fc1(merged))) + merged))


class MaeFuseOutput(NamedTuple):
    """One forward pass: encoder tokens z_vi, z_ir (B,N,D); the route's tokens (c, h, the latent mean, or None for
    `reconstruct`); the decoded image (B,3,S,S), or (2B,3,S,S) for `reconstruct`, or None for token routes."""

    z_vi: torch.Tensor
    z_ir: torch.Tensor
    tokens: torch.Tensor | None
    image: torch.Tensor | None


class MaeFuse(nn.Module):
    """The MaeFuse network: `model1` (`MaeViT`) and `model2` (`FusionLayer`), keys as the released checkpoint.

    `fusion_attention` and `official_group_size` set the fusion attention used in training; callers pass
    `group_size=1` for inference and validation (spec §2.6), so batched results equal per-image results.
    """

    def __init__(self, size: ModelSize, fusion_attention: FusionAttention = "tokens", official_group_size: int = 4):
        super().__init__()
        if fusion_attention not in ("tokens", "official"):
            raise ConfigError(f"fusion_attention must be 'tokens' or 'official', got {fusion_attention!r}")
        if official_group_size < 0:
            raise ConfigError(f"official_group_size must be >= 0 (0 = whole per-device batch), "
                              f"got {official_group_size}")
        self.size = size.check()
        self.fusion_attention = fusion_attention
        self.official_group_size = official_group_size
        self.model1 = MaeViT(size)
        self.model2 = FusionLayer(size)
        self.reset_position_tables()

    def position_tables(self) -> dict[str, nn.Parameter]:
        """The three fixed tables by state-dict name."""
        return {"model1.pos_embed": self.model1.pos_embed, "model1.decoder_pos_embed": self.model1.decoder_pos_embed,
                "model2.pos_embed": self.model2.pos_embed}

    def expected_position_table(self, name: str) -> torch.Tensor:
        """The generated values (1,N,width) of table `name`, on the CPU."""
        table = self.position_tables()[name]
        return sincos_position_table(table.shape[-1], self.size.grid)[None]

    @torch.no_grad()
    def reset_position_tables(self) -> None:
        """Write the generated sin-cos values into the three tables."""
        for name, table in self.position_tables().items():
            table.copy_(self.expected_position_table(name))

    @torch.no_grad()
    def check_position_tables(self) -> list[str]:
        """Compare each table with its generated values; regenerate (with a warning) those off by more than 1e-4.

        Returns the names of the regenerated tables. Call after every load.
        """
        regenerated = []
        for name, table in self.position_tables().items():
            expected = self.expected_position_table(name)
            if table.is_meta:
                continue
            difference = (table.detach().cpu().float() - expected).abs().max()
            if difference > TABLE_TOLERANCE:
                warnings.warn(f"{name} differs from the fixed 2-D sin-cos table by {float(difference):.3g} "
                              f"(> {TABLE_TOLERANCE}); regenerated", stacklevel=2)
                table.copy_(expected)
                regenerated.append(name)
        return regenerated

    def encode_pair(self, x_vi: torch.Tensor, x_ir: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z_vi, z_ir from one encoder pass over [x_vi; x_ir] (2B images) under `no_grad` (the encoder is frozen)."""
        if x_vi.shape != x_ir.shape:
            raise ValueError(f"VIS and IR batches differ in shape: {tuple(x_vi.shape)} vs {tuple(x_ir.shape)}")
        with torch.no_grad():
            tokens = self.model1.encode(torch.cat([x_vi, x_ir]))
        z_vi, z_ir = tokens.chunk(2)
        return z_vi, z_ir

    def forward(self, x_vi: torch.Tensor, x_ir: torch.Tensor, route: Route = "fused_image",
                group_size: int | None = None) -> MaeFuseOutput:
        """Run the route on normalised (B,3,S,S) VIS and IR batches.

        `group_size` is the `official` attention group (None = `official_group_size`; inference passes 1).
        """
        z_vi, z_ir = self.encode_pair(x_vi, x_ir)
        if route == "reconstruct":
            return MaeFuseOutput(z_vi, z_ir, None, self.model1.decode_image(torch.cat([z_vi, z_ir])))
        if route == "mean_image":
            mean = (z_vi + z_ir) / 2
            return MaeFuseOutput(z_vi, z_ir, mean, self.model1.decode_image(mean))
        if route not in ("cfm", "cfm_image", "fused", "fused_image"):
            raise ValueError(f"unknown route {route!r}")
        fusion = self.model2(z_vi, z_ir, cfm_only=route in ("cfm", "cfm_image"), attention=self.fusion_attention,
                             group_size=self.official_group_size if group_size is None else group_size)
        tokens = fusion.cfm if fusion.fused is None else fusion.fused
        image = self.model1.decode_image(tokens) if route.endswith("_image") else None
        return MaeFuseOutput(z_vi, z_ir, tokens, image)


def build_model(size: ModelSize | str = "tiny", fusion_attention: FusionAttention = "tokens",
                official_group_size: int = 4, device: torch.device | str | None = None) -> MaeFuse:
    """A randomly initialised `MaeFuse` of a preset name or a `ModelSize`, optionally built on `device`
    (`meta` builds without memory, for key and count checks)."""
    size = resolve_size(size) if isinstance(size, str) else size.check()
    if device is None:
        return MaeFuse(size, fusion_attention, official_group_size)
    with torch.device(device):
        return MaeFuse(size, fusion_attention, official_group_size)


def _in_modules(name: str, modules: tuple[str, ...]) -> bool:
    return any(name == module or name.startswith(module + ".") for module in modules)


def parameter_counts(model: MaeFuse) -> dict[str, int]:
    """Element counts: learnable `encoder`, `decoder`, `fusion`, their `total`, and the fixed tables
    (`table_encoder`, `table_decoder`, `table_fusion`), as spec §2.1 tabulates them."""
    groups = {"encoder": ENCODER_MODULES, "decoder": DECODER_MODULES, "fusion": CFM_MODULES + MFM_MODULES}
    tables = dict(zip(("table_encoder", "table_decoder", "table_fusion"), POSITION_TABLES))
    counts = {key: 0 for key in (*groups, *tables)}
    for name, parameter in model.named_parameters():
        for key, modules in groups.items():
            if _in_modules(name, modules):
                counts[key] += parameter.numel()
        for key, table in tables.items():
            if name == table:
                counts[key] += parameter.numel()
    counts["total"] = counts["encoder"] + counts["decoder"] + counts["fusion"]
    return counts


def module_summary(model: MaeFuse) -> list[tuple[str, int, int]]:
    """(module, trainable elements, all elements) for encoder, decoder, CFM, MFM and the fixed tables (the banner's
    module table)."""
    groups = {"encoder": ENCODER_MODULES, "decoder": DECODER_MODULES, "CFM": CFM_MODULES, "MFM": MFM_MODULES,
              "fixed tables": POSITION_TABLES}
    rows = []
    for label, modules in groups.items():
        selected = [p for name, p in model.named_parameters() if _in_modules(name, modules)]
        rows.append((label, sum(p.numel() for p in selected if p.requires_grad), sum(p.numel() for p in selected)))
    return rows


def normalize(images01: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> ImageNet-normalised (the model's input space)."""
    mean = images01.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images01.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images01 - mean) / std


def denormalize_255(images: torch.Tensor) -> torch.Tensor:
    """Normalised (B,3,H,W) -> u = (x*sigma + mu)*255, unclamped."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean) * 255.0


def gray_to_input(gray: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) gray (B,S,S) -> the model input (B,3,S,S): replicated to 3 channels, /255, normalised."""
    images01 = gray.to(torch.float32).div(255.0)[:, None].expand(-1, 3, -1, -1)
    return normalize(images01)


@contextlib.contextmanager
def evaluation(model: nn.Module) -> Iterator[None]:
    """Eval mode and `no_grad` for the block; every submodule's own train/eval flag is restored afterwards (a freeze
    policy may keep frozen modules in eval mode during training)."""
    saved = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in saved:
            module.training = training
