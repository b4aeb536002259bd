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
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from transfer.artifact import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, build_backbone
from transfer.convvit import sincos_1d, sincos_pos_embed

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
def block_mask(grid: int, num_masked: int, rng: np.random.Generator, min_patches: int = 16,
               min_aspect: float = 0.3) -> np.ndarray:
    """BEiT block-wise mask (grid, grid) with exactly `num_masked` ones: random blocks of >= `min_patches`
    patches and aspect ratio in [min_aspect, 1/min_aspect], any shortfall filled with random patches."""
    mask = np.zeros((grid, grid), dtype=bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10 * num_masked):
        left_to_mask = num_masked - mask.sum()
        if left_to_mask < min(min_patches, num_masked) or left_to_mask <= 0:
            break
        area = rng.uniform(min(min_patches, left_to_mask), left_to_mask)
        aspect = math.exp(rng.uniform(*log_aspect))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if not (0 < h < grid and 0 < w < grid):
            continue
        top, left = rng.integers(0, grid - h + 1), rng.integers(0, grid - w + 1)
        block = mask[top:top + h, left:left + w]
        new = h * w - block.sum()
        if 0 < new <= left_to_mask:
            block[:] = True
    shortfall = num_masked - int(mask.sum())
    if shortfall > 0:
        free = np.flatnonzero(~mask.reshape(-1))
        mask.reshape(-1)[rng.choice(free, shortfall, replace=False)] = True
    return mask


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

    def _crop(self, image):
        import torchvision.transforms as T
        import torchvision.transforms.functional as TF

        flipped = bool(torch.rand(()) < 0.5)
        if flipped:
            image = TF.hflip(image)
        i, j, h, w = T.RandomResizedCrop.get_params(image, self.scale, (3 / 4, 4 / 3))
        view = TF.resized_crop(image, i, j, h, w, [self.size, self.size], T.InterpolationMode.BICUBIC)
        return view, [i, j, h, w, float(flipped)]

    def __call__(self, image):
        view1, crop1 = self._crop(image)
        view2, crop2 = self._crop(image)
        seed = int(torch.randint(0, 2 ** 31, ()))
        mask = block_mask(self.grid, self.num_masked, np.random.default_rng(seed), self.min_patches)
        crops = torch.tensor(crop1 + crop2 + [image.size[0]], dtype=torch.float64)
        return self.colour1(view1), self.colour2(view2), torch.from_numpy(mask), crops


# ----------------------------------------------------------------------------------------------- positions
def relative_pos_embed(crops: torch.Tensor, grid: int, dim: int) -> torch.Tensor:
    """Sin-cos embedding (B, grid*grid, 2*dim) of every view-2 patch centre in view-1 patch units.

    Channels: x (dim/2), y (dim/2), 10*log(scale_h) (dim/2), 10*log(scale_w) (dim/2). For identical crops the
    first `dim` channels equal the absolute sin-cos table of the grid (`sincos_pos_embed`).
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
    parts = [sincos_1d(v.reshape(v.shape[0], -1), dim // 2) for v in (x, y, *scales)]
    return torch.cat(parts, dim=-1).float()


# ----------------------------------------------------------------------------------------------- model
class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channels of (B, N, D) tokens (the reference's PermuteBN), computed in fp32."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float().transpose(1, 2)).transpose(1, 2)


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
        for p in encoder.patch_embed.parameters():  # frozen at its init (MoCo v3 trick, as the reference)
            p.requires_grad = False
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.projector_decoder_blocks = _blocks(projector_depth, decoder_dim, decoder_heads, norm)
        self.predictor_decoder_blocks = _blocks(predictor_depth, decoder_dim, decoder_heads, norm)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        table = torch.cat([torch.zeros(1, 1, decoder_dim), sincos_pos_embed(decoder_dim, self.grid)], dim=1)
        self.decoder_pos_embed = nn.Parameter(table, requires_grad=False)  # zero slot for CLS
        self.decoder_pos_mlp = nn.Linear(2 * decoder_dim, decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, decoder_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        self.target = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "decoder_embed": copy.deepcopy(self.decoder_embed),
                                     "projector": copy.deepcopy(self.projector_decoder_blocks)})
        self.target.requires_grad_(False)

    def online_modules(self) -> dict[str, nn.Module]:
        """The online modules the target tracks, under the target's names."""
        return {"encoder": self.encoder, "decoder_embed": self.decoder_embed, "projector": self.projector_decoder_blocks}

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online (parameters and BN buffers)."""
        for name, online in self.online_modules().items():
            for t, o in zip(self.target[name].state_dict().values(), online.state_dict().values()):
                if t.is_floating_point():
                    t.mul_(momentum).add_(o.detach(), alpha=1 - momentum)
                else:
                    t.copy_(o)

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
