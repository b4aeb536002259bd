"""ConvViT, the hybrid convolution-transformer encoder of ConvMAE (Gao et al., NeurIPS'22).

Two convolutional stages (non-overlapping patch-embed convs; blocks with a 5x5 depthwise conv in place of
attention) at strides 4 and 8, then a transformer stage of timm blocks at stride 16 with a fixed 2-D sin-cos
position embedding and no class token. Parameter names follow Alpha-VL/ConvMAE (`patch_embed1..4`,
`blocks1..3`, `pos_embed`, `norm`), so released encoder checkpoints load as they are.

Masked use (pretraining): `visible_multipliers` turns a stage-3 mask into the stage-1/2 multipliers of the
depthwise-conv inputs, the only spatial mixing of stages 1-2, and `forward_stages(x, keep=...)` runs the
transformer stage on the visible tokens only, so nothing leaks from masked regions.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.layers import DropPath
from timm.models.vision_transformer import Block
from torch import nn

PRESETS = {  # arch name -> constructor defaults (arch_kwargs override them)
    "convvit_base": dict(embed_dims=(256, 384, 768), depths=(2, 2, 11), num_heads=12, img_size=224),
    "convvit_tiny": dict(embed_dims=(32, 48, 96), depths=(1, 1, 2), num_heads=3, img_size=64),
}
PATCH_SIZES = (4, 2, 2)  # stage strides 4, 8, 16


class ConvMlp(nn.Module):
    """MLP made of 1x1 convolutions (ConvMAE's CMlp)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _channels_last_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CBlock(nn.Module):
    """Transformer block with a 5x5 depthwise conv as token mixer; `visible` multiplies the conv's input."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))

    def forward(self, x, visible: torch.Tensor | None = None):
        y = self.conv1(_channels_last_norm(self.norm1, x))
        if visible is not None:
            y = y * visible
        x = x + self.drop_path(self.conv2(self.attn(y)))
        return x + self.drop_path(self.mlp(_channels_last_norm(self.norm2, x)))


class ConvPatchEmbed(nn.Module):
    """Non-overlapping conv (kernel = stride = patch), then LayerNorm and GELU; keeps the map layout."""

    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(_channels_last_norm(self.norm, self.proj(x)))


def sincos_1d(values: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin(v * w), cos(v * w)] with w_k = 10000^(-k/(dim/2)), k < dim/2, in float64: (..., dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=values.device) / (dim / 2))
    angles = values.double().unsqueeze(-1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table, (1, grid*grid, dim), raster order: the first dim/2 channels encode the
    column (x), the last dim/2 the row (y), each as [sin(p*w), cos(p*w)] with w_k = 10000^(-k/(dim/4))."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = torch.cat([sincos_1d(cols.reshape(-1), dim // 2), sincos_1d(rows.reshape(-1), dim // 2)], dim=1)
    return table.float().unsqueeze(0)


class ConvViT(nn.Module):
    """ConvMAE's encoder; `forward` returns the mean of the normalised stage-3 tokens (pooled features)."""

    def __init__(self, img_size: int = 224, embed_dims=(256, 384, 768), depths=(2, 2, 11), num_heads: int = 12,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0):
        super().__init__()
        if img_size % 16:
            raise ValueError(f"ConvViT needs an image side divisible by 16 (patch sizes 4x2x2), got {img_size}")
        d1, d2, d3 = embed_dims
        self.img_size, self.embed_dims, self.grid = img_size, tuple(embed_dims), img_size // 16
        self.num_features = d3
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.patch_embed1 = ConvPatchEmbed(PATCH_SIZES[0], 3, d1)
        self.patch_embed2 = ConvPatchEmbed(PATCH_SIZES[1], d1, d2)
        self.patch_embed3 = ConvPatchEmbed(PATCH_SIZES[2], d2, d3)
        self.patch_embed4 = nn.Linear(d3, d3)
        self.pos_embed = nn.Parameter(sincos_pos_embed(d3, self.grid), requires_grad=False)
        self.blocks1 = nn.ModuleList(CBlock(d1, mlp_ratio, rates[i]) for i in range(depths[0]))
        self.blocks2 = nn.ModuleList(CBlock(d2, mlp_ratio, rates[depths[0] + i]) for i in range(depths[1]))
        self.blocks3 = nn.ModuleList(
            Block(d3, num_heads, mlp_ratio, qkv_bias=True, drop_path=rates[depths[0] + depths[1] + i],
                  norm_layer=partial(nn.LayerNorm, eps=1e-6)) for i in range(depths[2]))
        self.norm = nn.LayerNorm(d3, eps=1e-6)
        self.apply(xavier_init)

    def forward_stages(self, x: torch.Tensor, keep: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """Stage-1 map, stage-2 map and stage-3 tokens (before the final norm).

        `mask` (B, grid, grid), 1 = masked, multiplies the depthwise-conv inputs of stages 1-2 (upsampled);
        `keep` (B, n) indexes the stage-3 tokens that enter the transformer (all when None).
        """
        vis1, vis2 = visible_multipliers(mask) if mask is not None else (None, None)
        x = self.patch_embed1(x)
        for blk in self.blocks1:
            x = blk(x, vis1)
        s1 = x
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x, vis2)
        s2 = x
        tokens = self.patch_embed4(self.patch_embed3(x).flatten(2).transpose(1, 2)) + self.pos_embed
        if keep is not None:
            tokens = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        for blk in self.blocks3:
            tokens = blk(tokens)
        return s1, s2, tokens

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at strides 4, 8, 16 (the last normalised), for dense heads such as UperNet."""
        s1, s2, tokens = self.forward_stages(x)
        b, n, d = tokens.shape
        h, w = x.shape[-2] // 16, x.shape[-1] // 16
        return [s1, s2, self.norm(tokens).transpose(1, 2).reshape(b, d, h, w)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.forward_stages(x)[2]).mean(1)


def visible_multipliers(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-3 mask (B, g, g), 1 = masked -> visible multipliers (B, 1, 4g, 4g) and (B, 1, 2g, 2g)."""
    visible = (1 - mask.float()).unsqueeze(1)
    up = PATCH_SIZES[2]
    vis2 = visible.repeat_interleave(up, 2).repeat_interleave(up, 3)
    vis1 = vis2.repeat_interleave(PATCH_SIZES[1], 2).repeat_interleave(PATCH_SIZES[1], 3)
    return vis1, vis2


def xavier_init(m: nn.Module) -> None:
    """MAE's `_init_weights` (used by ConvMAE and SiameseIM): Xavier-uniform Linear with zero bias, LayerNorm 1/0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_convvit(arch: str, **arch_kwargs) -> ConvViT:
    """ConvViT from a preset name (`convvit_base`, `convvit_tiny`) with optional overrides."""
    if arch not in PRESETS:
        raise ValueError(f"unknown ConvViT {arch!r}; known: {', '.join(PRESETS)}")
    return ConvViT(**{**PRESETS[arch], **arch_kwargs})


def resample_pos_embed(pos: torch.Tensor, grid: int) -> tuple[torch.Tensor, str]:
    """pos_embed for another grid: a fixed sin-cos table is recomputed exactly, a learned one (fine-tuned
    checkpoints) is resampled bicubically. Returns the table and how it was made."""
    old = int(round(pos.shape[1] ** 0.5))
    if torch.allclose(pos.float(), sincos_pos_embed(pos.shape[-1], old), atol=1e-4):
        return sincos_pos_embed(pos.shape[-1], grid).to(pos.dtype), f"sin-cos table recomputed {old}x{old} -> {grid}x{grid}"
    from timm.layers import resample_abs_pos_embed

    return (resample_abs_pos_embed(pos, (grid, grid), num_prefix_tokens=0),
            f"learned pos_embed interpolated bicubically {old}x{old} -> {grid}x{grid}")
