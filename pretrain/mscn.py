"""MSCN (Jing, Zhu & LeCun, "Masked Siamese ConvNets"): masking as an extra augmentation for siamese ConvNets.

Per image, `num_views` views (2 standard + 2 extra) get the standard augmentations independently (the dataset in
pretrain/common.py). On the device each view is then normalised, high-pass filtered (x - GaussianBlur_sigma(x):
zeros now mean "no information" and mask edges vanish) and masked (pretrain/masking.py: grid or focal masks,
channel-independent with high probability, Gaussian noise in the masked area). View v belongs to branch v % 2;
both branches are masked, with different magnitudes (`mask_ratio` etc. take [branch 0, branch 1]). The siamese
loss is applied to EVERY pair of views and averaged over the pairs:

- SimCLR: InfoNCE (temperature 0.2, negatives from all ranks), projector 2048-2048-256 with BN after every layer;
- BYOL: projector 2048-4096-256, predictor 256-4096-256 (BN + ReLU between, none after the last linear),
  target = EMA of encoder + projector, tau 0.996 -> 1 (cosine); symmetric 2 - 2 cos loss per pair.

Every component is a config switch, for the paper's ablations (Sec. 6.3, App. B): `highpass_sigma: null`,
`mask_prob: 0` (no masks), `noise_std: 0` (zero fill), `channel_prob: 0`, `focal_prob: 0|1`, `mask_ratio`,
`grid_size`, `num_views: 2` (no extra views), equal branch values (symmetric masking), `share_view: true`.
The exported trunk is the (online) ResNet; its artifact carries the high-pass sigma for every engine.
"""
from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import torch
from torch import nn

from pretrain.common import byol_loss, info_nce
from pretrain.masking import apply_masks, mscn_masks
from transfer.artifact import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, build_backbone, feature_dim, high_pass

DEFAULT_CONFIG = "mscn-cpu-tiny"
FRAMEWORKS = ("simclr", "byol")

DEFAULTS: dict[str, Any] = {
    "framework": "simclr",
    "highpass_sigma": 5.0,        # pixels at img_size; null = no high-pass filter (paper: 5 at 224)
    "num_views": 4,               # 2 standard views + 2 extra masked views
    "share_view": False,          # App. B ablation: all views share one standard augmentation
    # masks, each a number or [branch 0, branch 1] (view v is on branch v % 2); "open" = the paper gives no value
    "mask_prob": 1.0,             # probability that a view is masked at all (open: every view)
    "mask_ratio": [0.15, 0.075],  # fraction of grid cells masked (15%: Fig. 5a; branch 1's: open, half)
    "grid_size": 32, "grid_ref_size": 224,  # 32 px cells at 224 px -> 7 x 7 cells at any resolution
    "focal_prob": 0.4,            # focal mask instead of a grid mask
    "focal_keep": 0.9,            # side of the kept focal square / image side (open; 3rd-party: 200/224)
    "channel_prob": 0.8,          # channel-independent masks (open: "high probability"; 3rd-party 0.7 of grid)
    "noise_std": 0.2,             # Gaussian noise in masked areas, normalised units (open; 3rd-party 0.18); 0 = zero
    # high-pass kernel size: open (3rd-party 11 x 11); transfer/artifact.high_pass uses radius ceil(3 sigma)
    # heads
    "proj_hidden": 2048, "proj_out": 256, "pred_hidden": 4096,
    "temperature": 0.2,           # SimCLR
    "base_tau": 0.996,            # BYOL EMA start (cosine to 1)
}


def num_views(cfg: dict) -> int:
    return cfg["num_views"]


def preprocessing(cfg: dict) -> Preprocessing:
    return Preprocessing(IMAGENET_MEAN, IMAGENET_STD, "RGB", cfg["highpass_sigma"] or None)


def branch_value(value, branch: int):
    """A per-branch knob: a number (both branches) or [branch 0, branch 1]."""
    return value[branch] if isinstance(value, (list, tuple)) else value


def mlp(dims: list[int], last_bn: bool) -> nn.Sequential:
    """Linear layers with BN + ReLU between them; BN after the last one too if `last_bn`."""
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=last and not last_bn))  # a BN follows every other linear
        if not last:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(b))
    return nn.Sequential(*layers)


class MSCN(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        if cfg["framework"] not in FRAMEWORKS:
            raise ValueError(f"framework {cfg['framework']!r}; known: {', '.join(FRAMEWORKS)}")
        self.cfg = cfg
        kw = {"width": cfg["width"]} if cfg["width"] != 64 else {}
        self.backbone = build_backbone(cfg["arch"], **kw)
        dim = feature_dim(self.backbone)
        if cfg["framework"] == "simclr":
            self.projector = mlp([dim, cfg["proj_hidden"], cfg["proj_out"]], last_bn=True)
        else:
            self.projector = mlp([dim, cfg["proj_hidden"], cfg["proj_out"]], last_bn=False)
            self.predictor = mlp([cfg["proj_out"], cfg["pred_hidden"], cfg["proj_out"]], last_bn=False)
            self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
            self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) / 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) / 255, persistent=False)
        self.cells = max(1, round(cfg["grid_ref_size"] / cfg["grid_size"]))  # cells per side

    # ------------------------------------------------------------------------------------------- views
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) RGB -> normalised, high-pass filtered float32 (the test-time input)."""
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        x = (x - self.mean) / self.std
        sigma = self.cfg["highpass_sigma"]
        return high_pass(x, sigma) if sigma else x

    def mask(self, x: torch.Tensor, branch: int) -> torch.Tensor:
        """MSCN masks + noise with the branch's magnitudes, drawn for the whole batch at once; writes into x
        (`prepare` passes a fresh concatenation of the branch's views)."""
        c = {k: branch_value(self.cfg[k], branch)
             for k in ("mask_prob", "mask_ratio", "focal_prob", "focal_keep", "channel_prob", "noise_std")}
        if c["mask_prob"] <= 0:
            return x
        m = mscn_masks(x, c["mask_ratio"], self.cells, c["focal_prob"], c["focal_keep"], c["channel_prob"],
                       c["mask_prob"])
        return apply_masks(x, m, c["noise_std"], inplace=True)

    @torch.no_grad()
    def prepare(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Preprocess every view, then mask it (after all other augmentations), one mask draw per branch."""
        x = [self.preprocess(v) for v in views]
        out = list(x)
        for branch in (0, 1):
            idx = list(range(branch, len(x), 2))
            if not idx:
                continue
            masked = self.mask(torch.cat([x[i] for i in idx]), branch).chunk(len(idx))
            for i, m in zip(idx, masked):
                out[i] = m
        return out

    # ------------------------------------------------------------------------------------------- loss
    def pairs(self, num: int) -> list[tuple[int, int]]:
        return list(itertools.combinations(range(num), 2))

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        with torch.autocast(views[0].device.type, enabled=False):
            x = self.prepare(views)
        if self.cfg["channels_last"]:
            x = [v.contiguous(memory_format=torch.channels_last) for v in x]
        return self.loss(x), {}

    def loss(self, x: list[torch.Tensor]) -> torch.Tensor:
        """Mean over every pair of views of the framework's pair loss; each view its own BN batch."""
        if self.cfg["framework"] == "simclr":
            z = [self.projector(self.backbone(v)) for v in x]
            losses = [info_nce(z[i], z[j], self.cfg["temperature"]) for i, j in self.pairs(len(z))]
        else:
            p = [self.predictor(self.projector(self.backbone(v))) for v in x]
            with torch.no_grad():
                t = [self.target_projector(self.target_backbone(v)) for v in x]
            losses = [byol_loss(p[i], t[j]) + byol_loss(p[j], t[i]) for i, j in self.pairs(len(p))]
        return torch.stack(losses).mean()

    # ------------------------------------------------------------------------------------------- EMA
    def tau(self, progress: float) -> float:
        return 1 - (1 - self.cfg["base_tau"]) * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """BYOL: target <- tau * target + (1 - tau) * online (buffers copied), tau by the cosine schedule."""
        if self.cfg["framework"] != "byol":
            return
        tau = self.tau(progress)
        for online, target in ((self.backbone, self.target_backbone), (self.projector, self.target_projector)):
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.lerp_(po.detach(), 1 - tau)
            for bo, bt in zip(online.buffers(), target.buffers()):
                bt.copy_(bo)


def build_model(cfg: dict) -> MSCN:
    return MSCN(cfg)
