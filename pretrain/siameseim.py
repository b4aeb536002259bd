"""SiameseIM (Tao et al., CVPR'23): a ViT predicts the dense features of another view from a masked view.

Online branch: the ViT encodes the visible tokens of block-wise masked view 1 (a fixed masked count per image)
plus CLS; a projector (Linear + transformer blocks with BatchNorm) and a predictor (transformer blocks with
BatchNorm over [CLS; visible view-1 tokens; one query per view-2 position]) output a feature per view-2
position. Each query is a mask token plus the relative-position embedding of view 2's crop seen from view 1
(offsets, scales, relative flip, log-scales). Target branch: an EMA copy of encoder + projector on the full
view 2. Loss (UniGrad form, fp32): (mean ||P - T||^2 + 0.02 * mean P C P^T) / D with LN-normalised targets T
and their correlation C, all-reduced only when a process group exists. The online encoder is exported.
"""
from __future__ import annotations

import copy
import math
import random
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from transfer.artifact import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, build_backbone
from transfer.convvit import sincos_1d, sincos_pos_embed, xavier_init

DEFAULT_CONFIG = "siameseim-cpu-tiny"
DEFAULTS: dict[str, Any] = {  # ViT-B/16, 1600 epochs (methods.md 3.1-3.4); configs override
    "arch": "vit_base_patch16", "img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12,
    "decoder_dim": 768, "projector_depth": 2, "predictor_depth": 4, "decoder_heads": 16, "head_norm": "bn",
    "mask_patches": 118, "min_mask_patches": 16, "neg_weight": 0.02, "base_momentum": 0.995,
    "optimizer": "adamw", "betas": [0.9, 0.95], "weight_decay": 0.05, "clip_grad": 1.0,
    "lr": 6.25e-5, "lr_batch": 256, "batch_size": 4096, "epochs": 1600, "warmup_epochs": 40,
    "crop_scale": [0.08, 1.0],
}

# crop parameters per view, in this order, as a (B, 11) tensor: view 1 (top, left, height, width, flipped),
# view 2 (the same) and the source image width
CROP_FIELDS = ("i1", "j1", "h1", "w1", "f1", "i2", "j2", "h2", "w2", "f2", "W")


# ----------------------------------------------------------------------------------------------- masking
def block_mask(grid: int, num_masked: int, rng: random.Random, min_patches: int = 16,
               min_aspect: float = 0.3) -> np.ndarray:
    """BEiT's MaskingGenerator as SiameseIM uses it (util/masking_generator.py, fixed_num_masking_patches=True):
    (grid, grid) bool with exactly `num_masked` ones. Blocks of area U(min_patches, patches still to mask) and
    aspect ratio in [min_aspect, 1/min_aspect] are placed while any block adds patches (so ever smaller blocks
    once few remain); only if 10 tries in a row add none is the rest filled with random patches. `rng` draws
    exactly what the reference's `random` module draws."""
    mask = np.zeros((grid, grid), dtype=bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < num_masked:
        added = _place_block(mask, num_masked - count, rng, min_patches, log_aspect)
        if added == 0:
            break
        count += added
    if count < num_masked:
        rows, cols = (~mask).nonzero()
        order = list(range(len(rows)))
        rng.shuffle(order)
        take = order[:num_masked - count]
        mask[rows[take], cols[take]] = True
    return mask


def _place_block(mask: np.ndarray, max_patches: int, rng: random.Random, min_patches: int, log_aspect) -> int:
    """Up to 10 tries to mask one block adding 1..max_patches new patches; the number added (0: none fitted)."""
    grid = mask.shape[0]
    for _ in range(10):
        area = rng.uniform(min_patches, max_patches)
        aspect = math.exp(rng.uniform(*log_aspect))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if w < grid and h < grid:
            top, left = rng.randint(0, grid - h), rng.randint(0, grid - w)
            added = h * w - int(mask[top:top + h, left:left + w].sum())
            if 0 < added <= max_patches:
                mask[top:top + h, left:left + w] = True
                return added
    return 0


# ----------------------------------------------------------------------------------------------- views
class SiameseViews:
    """PIL image -> (view1, view2, view-1 mask (grid, grid) bool, crop parameters (11,)), as the reference's
    DataAugmentationForSIM: per view a flip of the full image, then RandomResizedCrop (scale 0.08-1, bicubic);
    colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2; blur (sigma 0.1-2) p=1 on view 1, p=0.1 + solarize
    p=0.2 on view 2; normalisation. Scale, jitter, grayscale and blur sigma are configurable (`cpu-tiny` lightens
    them)."""

    def __init__(self, size: int, grid: int, num_masked: int, min_patches: int = 16, scale=(0.08, 1.0),
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), color_jitter=(0.4, 0.4, 0.2, 0.1),
                 gray_p: float = 0.2, blur_sigma=(0.1, 2.0)):
        import torchvision.transforms as T

        self.size, self.grid, self.num_masked, self.min_patches, self.scale = size, grid, num_masked, min_patches, scale
        jitter = [T.RandomApply([T.ColorJitter(*color_jitter)], p=0.8), T.RandomGrayscale(gray_p)]
        blur = T.GaussianBlur(max(3, (size // 10) | 1), sigma=tuple(blur_sigma))
        finish = [T.ToTensor(), T.Normalize(mean, std)]
        self.colour1 = T.Compose(jitter + [blur] + finish)
        self.colour2 = T.Compose(jitter + [T.RandomApply([blur], p=0.1), T.RandomSolarize(128, p=0.2)] + finish)

    @staticmethod
    def _flip(image):
        import torchvision.transforms.functional as TF

        flipped = bool(torch.rand(1) < 0.5)
        return (TF.hflip(image) if flipped else image), flipped

    def _crop(self, image, flipped: bool):
        import torchvision.transforms as T
        import torchvision.transforms.functional as TF

        i, j, h, w = T.RandomResizedCrop.get_params(image, self.scale, (3 / 4, 4 / 3))
        view = TF.resized_crop(image, i, j, h, w, [self.size, self.size], T.InterpolationMode.BICUBIC)
        return view, [i, j, h, w, float(flipped)]

    def spatial(self, image):
        """Both flips, then both crops (the reference's order of torch draws): (view1, view2, crops (11,))."""
        (image1, flip1), (image2, flip2) = self._flip(image), self._flip(image)
        (view1, crop1), (view2, crop2) = self._crop(image1, flip1), self._crop(image2, flip2)
        return view1, view2, torch.tensor(crop1 + crop2 + [image.size[0]], dtype=torch.float64)

    def __call__(self, image):
        view1, view2, crops = self.spatial(image)
        seed = int(torch.randint(0, 2 ** 31, ()))
        mask = block_mask(self.grid, self.num_masked, random.Random(seed), self.min_patches)
        return self.colour1(view1), self.colour2(view2), torch.from_numpy(mask), crops


# ----------------------------------------------------------------------------------------------- positions
def sincos_table(dim: int, grid: int, cls_token: bool = False) -> torch.Tensor:
    """SiameseIM's fixed 2-D sin-cos table (util/pos_embed.py get_2d_sincos_pos_embed): (1, [1 +] grid*grid, dim),
    the first dim/2 channels encode the row, the last dim/2 the column (MAE's table with its halves swapped); a
    zero row for CLS first when `cls_token`."""
    table = sincos_pos_embed(dim, grid)
    table = torch.cat([table[..., dim // 2:], table[..., :dim // 2]], dim=-1)
    return torch.cat([torch.zeros(1, 1, dim), table], dim=1) if cls_token else table


def relative_pos_embed(crops: torch.Tensor, grid: int, dim: int) -> torch.Tensor:
    """Sin-cos embedding (B, grid*grid, 2*dim) of every view-2 patch centre in view-1 patch units
    (get_2d_sincos_pos_embed_relative).

    Channels: row y (dim/2), column x (dim/2), 10*log(scale_h) (dim/2), 10*log(scale_w) (dim/2). For identical
    crops the first `dim` channels equal the absolute table of the grid (`sincos_table`).
    """
    i1, j1, h1, w1, f1, i2, j2, h2, w2, f2, width = crops.double().unbind(1)
    dy, dx, dx_flip = (i2 - i1) / h1, (j2 - j1) / w1, (width - j1 - j2) / w1
    scale_h, scale_w = h2 / h1, w2 / w1
    flipped = (f1 != f2).double()
    r = torch.arange(grid, dtype=torch.float64, device=crops.device) + 0.5
    y = scale_h[:, None, None] * r[None, :, None] + dy[:, None, None] * grid - 0.5
    x_same = scale_w[:, None] * r[None, :] + dx[:, None] * grid - 0.5
    x_flip = -scale_w[:, None] * r[None, :] + dx_flip[:, None] * grid - 0.5
    x = (flipped[:, None] * x_flip + (1 - flipped[:, None]) * x_same)[:, None, :]
    y, x = y.expand(-1, grid, grid), x.expand(-1, grid, grid)
    scales = [10 * torch.log(s)[:, None, None].expand(-1, grid, grid) for s in (scale_h, scale_w)]
    parts = [sincos_1d(v.reshape(v.shape[0], -1), dim // 2) for v in (y, x, *scales)]
    return torch.cat(parts, dim=-1).float()


# ----------------------------------------------------------------------------------------------- model
class TokenBatchNorm(nn.Module):
    """BatchNorm over the channels of (B, N, D) tokens, in fp32 (the reference's PermuteBN). The BatchNorm is a
    child module, so converting it for several processes (`pretrain.common.sync_batchnorm`) swaps only the inner
    `bn` and keeps the transposes."""

    def __init__(self, dim: int, **factory):  # factory: device / dtype, as timm passes them
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, **factory)

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return self.bn(x.float().transpose(1, 2)).transpose(1, 2)


def _blocks(depth: int, dim: int, heads: int, norm: str) -> nn.ModuleList:
    norm_layer = TokenBatchNorm if norm == "bn" else partial(nn.LayerNorm, eps=1e-6)
    return nn.ModuleList(Block(dim, heads, 4.0, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth))


class SiameseIM(nn.Module):
    """Online ViT + projector + predictor, EMA target (encoder + projector); `forward` returns the loss."""

    def __init__(self, encoder: nn.Module, decoder_dim: int = 768, projector_depth: int = 2,
                 predictor_depth: int = 4, decoder_heads: int = 16, norm: str = "bn", neg_weight: float = 0.02):
        super().__init__()
        self.encoder, self.neg_weight = encoder, neg_weight
        self.grid = encoder.patch_embed.grid_size[0]
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.projector_decoder_blocks = _blocks(projector_depth, decoder_dim, decoder_heads, norm)
        self.predictor_decoder_blocks = _blocks(predictor_depth, decoder_dim, decoder_heads, norm)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_table(decoder_dim, self.grid, cls_token=True),
                                              requires_grad=False)
        self.decoder_pos_mlp = nn.Linear(2 * decoder_dim, decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, decoder_dim)
        self.initialize_weights()
        self.target = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "decoder_embed": copy.deepcopy(self.decoder_embed),
                                     "projector": copy.deepcopy(self.projector_decoder_blocks)})
        self.target.requires_grad_(False)

    def initialize_weights(self) -> None:
        """The reference's `initialize_weights`: fixed (untrained, so never weight-decayed) sin-cos position
        tables; the patch embedding Xavier-uniform as a Linear and frozen (MoCo v3), its bias PyTorch's default;
        CLS and mask tokens N(0, 0.02); every Linear Xavier-uniform with zero bias; LayerNorms 1 and 0."""
        encoder = self.encoder
        encoder.pos_embed = nn.Parameter(sincos_table(encoder.embed_dim, self.grid, cls_token=True),
                                         requires_grad=False)
        weight = encoder.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(xavier_init)
        encoder.patch_embed.requires_grad_(False)

    def online_modules(self) -> dict[str, nn.Module]:
        """The online modules the target tracks, under the target's names."""
        return {"encoder": self.encoder, "decoder_embed": self.decoder_embed, "projector": self.projector_decoder_blocks}

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online, parameters only (the reference's `mm_update`:
        the target's BatchNorm statistics are its own, from its training-mode forward passes)."""
        for name, online in self.online_modules().items():
            for t, o in zip(self.target[name].parameters(), online.parameters()):
                t.mul_(momentum).add_(o.detach(), alpha=1 - momentum)

    def _encode(self, encoder: nn.Module, images: torch.Tensor, visible: torch.Tensor | None = None):
        x = encoder.patch_embed(images) + encoder.pos_embed[:, 1:]
        if visible is not None:
            x = x[visible].view(x.shape[0], -1, x.shape[-1])
        cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in encoder.blocks:
            x = blk(x)
        return encoder.norm(x)  # Identity for SiameseIM's encoder (final_norm=False)

    def predict(self, view1: torch.Tensor, mask1: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
        """Predicted features (B, grid*grid, D) of every view-2 position from the visible tokens of view 1."""
        visible = ~mask1.flatten(1)
        z = self.decoder_embed(self._encode(self.encoder, view1, visible))
        for blk in self.projector_decoder_blocks:
            z = blk(z)
        b, dim = z.shape[0], z.shape[-1]
        pos = self.decoder_pos_embed.expand(b, -1, -1)
        z = z + torch.cat([pos[:, :1], pos[:, 1:][visible].view(b, -1, dim)], dim=1)
        queries = self.mask_token + self.decoder_pos_mlp(relative_pos_embed(crops, self.grid, dim).to(z.dtype))
        x = torch.cat([z, queries], dim=1)
        for blk in self.predictor_decoder_blocks:
            x = blk(x)
        return self.decoder_pred(x[:, -queries.shape[1]:])

    @torch.no_grad()
    def targets(self, view2: torch.Tensor) -> torch.Tensor:
        t = self.target["decoder_embed"](self._encode(self.target["encoder"], view2))
        for blk in self.target["projector"]:
            t = blk(t)
        return t[:, 1:]

    def forward(self, view1, view2, mask1, crops):
        pred = self.predict(view1, mask1, crops)
        return unigrad_loss(pred, self.targets(view2), self.neg_weight)


def unigrad_loss(pred: torch.Tensor, target: torch.Tensor, neg_weight: float = 0.02) -> torch.Tensor:
    """(mean_i ||P_i - T_i||^2 + w * mean_i P_i C P_i^T) / D, T layer-normalised, C = T^T T / n averaged over
    processes (when a process group exists); fp32."""
    with torch.autocast(pred.device.type, enabled=False):
        p = pred.float().flatten(0, 1)
        t = F.layer_norm(target.float().flatten(0, 1), (target.shape[-1],)).detach()
        corr = t.T @ t / t.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(corr)
            corr /= dist.get_world_size()
        pos = ((p - t) ** 2).sum(-1).mean()
        neg = ((p @ corr) * p).sum(-1).mean()
        return (pos + neg_weight * neg) / p.shape[-1]


def momentum_at(progress: float, base: float = 0.995) -> float:
    """EMA momentum: base -> 1 by a half cosine over training (progress in [0, 1])."""
    return 1 - 0.5 * (1 + math.cos(math.pi * progress)) * (1 - base)


# ----------------------------------------------------------------------------------------------- pretrain/run.py
def preprocessing(cfg: dict) -> Preprocessing:
    return Preprocessing(IMAGENET_MEAN, IMAGENET_STD, "RGB", None)


TIMM_VIT = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


def arch_kwargs(cfg: dict) -> dict:
    """The exported online encoder: a timm ViT without final norm, mean-pooled patch tokens (SiameseIM's probe),
    with every geometry value that differs from the named timm model."""
    embed_dim, depth, heads = TIMM_VIT[cfg["arch"].split("_")[1]]
    reference = {"img_size": 224, "patch_size": 16, "embed_dim": embed_dim, "depth": depth, "num_heads": heads}
    return {"final_norm": False, "global_pool": "avg", **{k: cfg[k] for k, v in reference.items() if cfg[k] != v}}


def view_transform(cfg: dict) -> SiameseViews:
    grid = cfg["img_size"] // cfg["patch_size"]
    return SiameseViews(cfg["img_size"], grid, cfg["mask_patches"], cfg["min_mask_patches"], tuple(cfg["crop_scale"]),
                        color_jitter=tuple(cfg["color_jitter"]), gray_p=cfg["gray_p"], blur_sigma=cfg["blur_sigma"])


class SiameseIMPretraining(nn.Module):
    """The `pretrain/common.py` face of SiameseIM: (view1, view2, mask, crops) in, (loss, logs) out."""

    def __init__(self, cfg: dict):
        super().__init__()
        encoder = build_backbone(cfg["arch"], **arch_kwargs(cfg))
        self.model = SiameseIM(encoder, cfg["decoder_dim"], cfg["projector_depth"], cfg["predictor_depth"],
                               cfg["decoder_heads"], cfg["head_norm"], cfg["neg_weight"])
        self.base_momentum = cfg["base_momentum"]

    @property
    def backbone(self) -> nn.Module:
        return self.model.encoder

    def forward(self, views: list[torch.Tensor]):
        view1, view2, mask, crops = views
        return self.model(view1, view2, mask.bool(), crops), {}

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        self.model.update_target(momentum_at(progress, self.base_momentum))


def build_model(cfg: dict) -> SiameseIMPretraining:
    return SiameseIMPretraining(cfg)
