"""ADIOS (Shi et al., ICML'22): adversarial masking for self-supervised learning.

An occlusion model (a U-Net whose depth follows the image size, then a 1x1 conv and a softmax over N channels)
turns an augmented view into N soft masks that sum to 1 at every pixel. Each mask hides part of that view,
x * (1 - m_n), and a Siamese encoder (SimCLR, BYOL or SimSiam) must map the masked view close to another,
unmasked view of the same image. Every batch makes two optimiser steps on disjoint parameters:

  1. encoder step:  minimise  L_ssl = sum_n ssl(x_orig, x * (1 - m_n))        (masks detached)
  2. occluder step: maximise  L_ssl - alpha_s * sum_n mean_b 1/(sin(pi * a_bn) + 1e-10)
                                    + alpha_e * sum_b sum_n softmax(a_b) log softmax(a_b)    (encoder frozen)

where a_bn is the area fraction of mask n on image b. The sparsity penalty stops the occluder from winning
trivially with an all-covering (a = 1) or empty (a = 0) mask; as in the reference it is not clamped, so its
gradient keeps pushing a collapsing mask back. ADIOS-s samples one mask per image in each step (one masked
forward instead of N; a fresh draw per step, as the reference); its penalties still cover all N masks. BYOL's
target branch is an EMA of the online encoder and projector (tau: 0.99 -> 1 by a half cosine over all steps,
updated every batch). SimSiam masks both views (one occluder pass per view) and averages the reference's
switchable terms: masked p vs unmasked z always, plus `use_symmetry_mask` (unmasked p vs masked z),
`use_no_mask` (both unmasked) and `use_both_mask` (both masked). The ONLINE encoder is exported, as the
reference evaluates it.

Learning rates follow the reference's two pl_bolts LinearWarmupCosineAnnealingLR schedulers, stepped once per
EPOCH (constant within an epoch): warm-up from the absolute `warmup_start_lr` (0.003) to the base lr over
`warmup_epochs`, then a cosine to `min_lr`, ending at epoch `epochs - train_mask_epoch` for the encoder side
(after which the reference's chainable cosine rises again) and at `epochs` for the occluder. `train_mask_epoch`
does nothing else in the reference: the occluder is trained from the first step. SimSiam's predictor keeps a
static lr (the base lr) from the second epoch on, as the reference's `static_lr` group.

Plugs into pretrain/common.py's loop (data, LARS, warm-up + cosine, checkpoint/resume, DDP, AMP, export) through
`DEFAULTS`, `build_model`, `preprocessing`, `param_groups` and `train_step`. The two "optimisers" are one LARS
with two families of parameter groups: encoder side (lr) and occluder (mask_lr). Each step zeroes all gradients
(to None) first and only its own side gets gradients, so `optimizer.step()` moves only that side (optimisers skip
parameters without a gradient: no momentum, no weight decay), exactly as two optimisers would; both families
get their lr from `reference_lr` (see above; `train_step` sets it, overriding common.py's per-step LambdaLR,
whose step count it reads; log.jsonl's first line still shows LambdaLR's), and common.py checkpoints them as one.
Proven equal to the reference (losses, penalty, masks, gradient norms, lrs) by benchmarks/parity/adios.py and
tests/test_adios_parity.py.

Module names follow the reference (`YugeTen/adios`, solo-learn based): `encoder`, `projector`, `predictor`,
`momentum_encoder`, `momentum_projector`, `occluder.mask_encoder` (U-Net), `occluder.mask_head`.
"""
from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pretrain.common import byol_loss, info_nce, is_distributed, unwrap
from transfer.artifact import Preprocessing, build_backbone, feature_dim

DEFAULT_CONFIG = "adios-cpu-tiny"
FRAMEWORKS = ("simclr", "byol", "simsiam")
# solo-learn's normalisation (std 0.228 for red, as the reference), applied to [0, 1] RGB images
MEAN = (0.485, 0.456, 0.406)
STD = (0.228, 0.224, 0.225)

# ADIOS's knobs with the reference's BYOL + ADIOS-s ImageNet-100 values (methods.md 2.3), plus the common keys
# whose reference value differs from pretrain/common.py's default. Configs override these.
DEFAULTS: dict[str, Any] = {
    "framework": "byol",          # simclr | byol | simsiam
    "num_masks": 6,               # N
    "single_mask": False,         # ADIOS-s: one sampled mask per image (one masked forward instead of N)
    "mask_fbase": 32, "unet_norm": "gn",
    "alpha_sparsity": 1.0, "alpha_entropy": 0.0,
    "num_blocks": None,           # U-Net depth; None: floor(log2(img_size) - 1) (SimSiam's reference passes 4)
    "use_symmetry_mask": True, "use_no_mask": True, "use_both_mask": True,   # SimSiam's loss terms
    "train_mask_epoch": 10,       # the encoder's cosine ends at epochs - train_mask_epoch (BYOL's default: 10)
    "warmup_start_lr": 0.003,     # absolute lr of the first (warm-up) epoch, both sides
    "mask_lr": 0.1295,            # occluder lr at lr_batch (scaled with the batch like lr)
    # heads (solo-learn sizes for BYOL)
    "proj_hidden_dim": 4096, "proj_output_dim": 256, "pred_hidden_dim": 8192,
    "temperature": 0.2,           # SimCLR
    "base_tau": 0.99,             # BYOL EMA start (cosine to 1)
    # common keys: the reference uses lr and mask_lr as given at its batch of 128, LARS eta 0.02 with clipping
    "arch": "resnet18", "lr": 0.8088, "lr_batch": 128, "weight_decay": 1e-5, "lars_eta": 0.02,
}


# ----------------------------------------------------------------------------------------------- occluder
def unet_blocks(img_size: int) -> int:
    """U-Net depth for an image size: floor(log2(img_size) - 1) (4 at 32 px, 5 at 64/96 px, 6 at 224 px).

    The reference supports only 4, 5 and 6; here any depth >= 2 works (16 px -> 3), so tiny CPU runs can
    shrink the image without changing the code.
    """
    return max(2, int(math.floor(math.log2(img_size) - 1)))


def _conv_block(cin: int, cout: int, norm: str) -> nn.Sequential:
    """3x3 conv + norm + ReLU (GENESIS blocks: GroupNorm(8), affine InstanceNorm, or none with a conv bias)."""
    if norm == "gn":
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.GroupNorm(min(8, cout), cout), nn.ReLU())
    if norm == "in":
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.InstanceNorm2d(cout, affine=True),
                             nn.ReLU())
    if norm == "no":
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.ReLU())
    raise ValueError(f"unet_norm must be gn, in or no, not {norm!r}")


class UNet(nn.Module):
    """GENESIS-style U-Net with an MLP bottleneck; returns `c` feature channels at full resolution.

    Encoder: `blocks` conv blocks, nearest 2x downsampling between them; the last min(3, blocks - 1) blocks are
    2c wide, the others c (4 blocks: c, 2c, 2c, 2c; 5: c, c, 2c, 2c, 2c; 6: c, c, c, 2c, 2c, 2c, as the
    reference). Bottleneck: flatten 2c x f x f -> 128 -> 128 -> 2c x f x f with ReLUs (f = img / 2^(blocks-1)).
    Decoder: mirror blocks on [upsampled features, skip], nearest 2x upsampling, ending at c channels.
    """

    def __init__(self, img_size: int, c: int = 32, in_chans: int = 3, norm: str = "gn", blocks: int | None = None):
        super().__init__()
        blocks = blocks or unet_blocks(img_size)
        wide = min(3, blocks - 1)
        enc_out = [c] * (blocks - wide) + [2 * c] * wide
        enc_in = [in_chans] + enc_out[:-1]
        dec_out = [enc_out[-2 - i] for i in range(blocks - 1)] + [c]
        dec_in = [prev + skip for prev, skip in zip([enc_out[-1]] + dec_out[:-1], enc_out[::-1])]
        self.down = nn.ModuleList(_conv_block(i, o, norm) for i, o in zip(enc_in, enc_out))
        self.up = nn.ModuleList(_conv_block(i, o, norm) for i, o in zip(dec_in, dec_out))
        self.fmap = img_size
        for _ in range(blocks - 1):
            self.fmap //= 2
        flat = enc_out[-1] * self.fmap ** 2
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                 nn.Linear(128, flat), nn.ReLU())
        self.blocks, self.out_chans = blocks, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            skips.append(x)
            if i < len(self.down) - 1:
                x = F.interpolate(x, size=(x.shape[-2] // 2, x.shape[-1] // 2), mode="nearest")
        if x.shape[-1] != self.fmap or x.shape[-2] != self.fmap:
            raise ValueError(f"occluder built for {self.fmap}x{self.fmap} bottleneck, got {tuple(x.shape[-2:])}: "
                             "images must have the configured img_size")
        x = self.mlp(x).view_as(x)
        for i, block in enumerate(self.up):
            skip = skips[-1 - i]
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        return x


class Occluder(nn.Module):
    """Image -> N soft masks (B, N, H, W): U-Net, 1x1 conv to N channels, softmax over the N channels."""

    def __init__(self, img_size: int, num_masks: int = 6, c: int = 32, norm: str = "gn",
                 num_blocks: int | None = None):
        super().__init__()
        self.mask_encoder = UNet(img_size, c, 3, norm, num_blocks)
        self.mask_head = nn.Conv2d(c, num_masks, 1)
        self.num_masks = num_masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask_head(self.mask_encoder(x)).softmax(dim=1)


def mask_areas(masks: torch.Tensor) -> torch.Tensor:
    """Area fraction of every mask: (B, N, H, W) -> (B, N), in fp32."""
    return masks.float().mean(dim=(2, 3))


def sparsity_penalty(areas: torch.Tensor) -> torch.Tensor:
    """sum_n mean_b 1 / (sin(pi * a_bn) + 1e-10), the reference's formula: minimal at a = 0.5, 1e10 at a = 0
    (no clamp: its gradient -pi cos(pi a) / sin^2(pi a) grows without bound as a mask collapses)."""
    return (1.0 / (torch.sin(areas * math.pi) + 1e-10)).mean(0).sum()


def area_neg_entropy(areas: torch.Tensor) -> torch.Tensor:
    """sum_b sum_n softmax(a_b)_n log softmax(a_b)_n: the reference's alpha_e term (a negative entropy of each
    image's area distribution, summed, not averaged, over the batch as the reference does)."""
    return (areas.softmax(1) * areas.log_softmax(1)).sum()


def apply_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x * (1 - m) on the normalised image (masked pixels go to 0, the mean colour); m: (B, 1, H, W)."""
    return x * (1 - mask)


# ----------------------------------------------------------------------------------------------- SSL losses
def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """-cos(p, stopgrad(z)), mean over the batch."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


# ----------------------------------------------------------------------------------------------- heads
def _mlp(dims: list[int], bn: bool, last_bn: bool = False, bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=bias or last))
        if not last:
            layers += [nn.BatchNorm1d(b)] if bn else []
            layers.append(nn.ReLU())
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)


def build_heads(framework: str, feat_dim: int, proj_hidden: int, proj_out: int,
                pred_hidden: int) -> tuple[nn.Module, nn.Module | None]:
    """(projector, predictor) as solo-learn builds them for each framework."""
    if framework == "simclr":
        return _mlp([feat_dim, proj_hidden, proj_out], bn=False), None
    if framework == "byol":
        return (_mlp([feat_dim, proj_hidden, proj_out], bn=True),
                _mlp([proj_out, pred_hidden, proj_out], bn=True))
    if framework == "simsiam":
        # the reference sets requires_grad False on projector[6].bias, but its flip_inpainter_grad(True) turns it
        # back on at every step, so the bias is trained there (its gradient is ~0: a BatchNorm follows)
        return (_mlp([feat_dim, proj_hidden, proj_hidden, proj_out], bn=True, last_bn=True, bias=False),
                _mlp([proj_out, pred_hidden, proj_out], bn=True, bias=False))
    raise ValueError(f"framework must be one of {FRAMEWORKS}, not {framework!r}")


def tau_at(progress: float, base: float = 0.99) -> float:
    """BYOL EMA momentum at training progress k/K: 1 - (1 - base) (cos(pi k / K) + 1) / 2 (base -> 1)."""
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


# ----------------------------------------------------------------------------------------------- lr schedule
def reference_lr(epoch: int, base_lr: float, warmup_epochs: int, max_epochs: int, warmup_start_lr: float,
                 eta_min: float = 0.0) -> float:
    """LR of `epoch` (0-based) under pl_bolts' LinearWarmupCosineAnnealingLR stepped once per epoch, computed by
    its chainable recursion exactly as the reference runs it: `warmup_start_lr` at epoch 0, linear to `base_lr`
    at epoch warmup_epochs - 1, cosine to `eta_min` at `max_epochs` and, past it, back up (the cosine continues)."""
    w, m = warmup_epochs, max_epochs
    if m <= w:
        raise ValueError(f"the cosine needs max_epochs > warmup_epochs, got {m} <= {w} (epochs - train_mask_epoch "
                         "for the encoder): lower warmup_epochs or train_mask_epoch")
    lr = warmup_start_lr
    for e in range(1, epoch + 1):
        if e < w:
            lr = lr + (base_lr - warmup_start_lr) / (w - 1)
        elif e == w:
            lr = base_lr
        elif (e - 1 - m) % (2 * (m - w)) == 0:
            lr = lr + (base_lr - eta_min) * (1 - math.cos(math.pi / (m - w))) / 2
        else:
            lr = ((1 + math.cos(math.pi * (e - w) / (m - w))) / (1 + math.cos(math.pi * (e - w - 1) / (m - w)))
                  * (lr - eta_min) + eta_min)
    return lr


# ----------------------------------------------------------------------------------------------- model
class ADIOS(nn.Module):
    """Encoder + heads (+ BYOL EMA target) and the occluder; the two objectives of the min-max game."""

    def __init__(self, encoder: nn.Module, framework: str = "byol", img_size: int = 224, num_masks: int = 6,
                 single_mask: bool = False, mask_fbase: int = 32, unet_norm: str = "gn",
                 alpha_sparsity: float = 1.0, alpha_entropy: float = 0.0,
                 proj_hidden_dim: int = 4096, proj_output_dim: int = 256, pred_hidden_dim: int = 8192,
                 temperature: float = 0.2, base_tau: float = 0.99, num_blocks: int | None = None,
                 use_symmetry_mask: bool = True, use_no_mask: bool = True, use_both_mask: bool = True,
                 epochs: int = 1, train_mask_epoch: int = 0, warmup_epochs: int = 0,
                 warmup_start_lr: float = 0.003, min_lr: float = 0.0):
        super().__init__()
        if framework not in FRAMEWORKS:
            raise ValueError(f"framework must be one of {FRAMEWORKS}, not {framework!r}")
        self.framework, self.num_masks, self.single_mask = framework, num_masks, single_mask
        self.alpha_sparsity, self.alpha_entropy = alpha_sparsity, alpha_entropy
        self.temperature, self.base_tau = temperature, base_tau
        self.simsiam_terms_on = {"symmetry": use_symmetry_mask, "no_mask": use_no_mask, "both": use_both_mask}
        self.encoder = encoder
        self.projector, self.predictor = build_heads(framework, feature_dim(encoder), proj_hidden_dim,
                                                     proj_output_dim, pred_hidden_dim)
        if framework == "byol":
            self.momentum_encoder = copy.deepcopy(encoder).requires_grad_(False)
            self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.occluder = Occluder(img_size, num_masks, mask_fbase, unet_norm, num_blocks)
        self.epochs, self.train_mask_epoch = epochs, train_mask_epoch
        self.warmup_epochs, self.warmup_start_lr, self.min_lr = warmup_epochs, warmup_start_lr, min_lr
        self.lr_at(0, "encoder", 1.0)  # fails early on a schedule the reference cannot run
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    @property
    def backbone(self) -> nn.Module:
        """The trunk common.py exports: the online encoder."""
        return self.encoder

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) RGB views -> normalised float32, the input of encoder and occluder."""
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return (x - self.mean) / self.std

    def lr_at(self, epoch: int, side: str, base_lr: float) -> float:
        """The reference's lr in `epoch` for a parameter group of `side` (encoder | occluder | static)."""
        if side == "static":  # SimSiam predictor: the base lr once the scheduler has stepped
            return self.warmup_start_lr if epoch == 0 else base_lr
        horizon = self.epochs - self.train_mask_epoch if side == "encoder" else self.epochs
        return reference_lr(epoch, base_lr, self.warmup_epochs, horizon, self.warmup_start_lr, self.min_lr)

    # -- parameter groups
    def encoder_side(self) -> list[nn.Module]:
        """Modules the encoder step trains (the EMA target is updated separately, never by gradients)."""
        return [m for m in (self.encoder, self.projector, self.predictor) if m is not None]

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.encoder_side() for p in m.parameters()]

    def occluder_parameters(self) -> list[nn.Parameter]:
        return list(self.occluder.parameters())

    # -- branches
    def _online(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, p): projection and prediction (p = z for SimCLR)."""
        z = self.projector(self.encoder(x))
        return z, (self.predictor(z) if self.predictor is not None else z)

    def _target(self, x: torch.Tensor, online_z: torch.Tensor) -> torch.Tensor:
        if self.framework != "byol":
            return online_z
        with torch.no_grad():
            return self.momentum_projector(self.momentum_encoder(x))

    def pair_loss(self, orig: tuple, masked: tuple) -> torch.Tensor:
        """SimCLR / BYOL loss between the unmasked view and one masked view; each is (z, p, target z)."""
        (z_o, p_o, t_o), (z_m, p_m, t_m) = orig, masked
        if self.framework == "simclr":
            return info_nce(z_o, z_m, self.temperature)
        return byol_loss(p_o, t_m) + byol_loss(p_m, t_o)

    def simsiam_terms(self, u1: tuple, u2: tuple, m1: tuple, m2: tuple) -> torch.Tensor:
        """Mean of the reference's SimSiam terms; u: unmasked (z, p) of views 1 and 2, m: their masked (z, p)."""
        (z1, p1), (z2, p2), (z1m, p1m), (z2m, p2m) = u1, u2, m1, m2
        terms = [simsiam_loss(p1m, z2), simsiam_loss(p2m, z1)]          # masked p, unmasked z
        if self.simsiam_terms_on["symmetry"]:
            terms += [simsiam_loss(p2, z1m), simsiam_loss(p1, z2m)]     # unmasked p, masked z
        if self.simsiam_terms_on["no_mask"]:
            terms += [simsiam_loss(p1, z2), simsiam_loss(p2, z1)]
        if self.simsiam_terms_on["both"]:
            terms += [simsiam_loss(p1m, z2m), simsiam_loss(p2m, z1m)]
        return torch.stack(terms).mean()

    def _branch(self, x: torch.Tensor) -> tuple:
        z, p = self._online(x)
        return z, p, self._target(x, z)

    def masks_of(self, x_orig: torch.Tensor, x_tr: torch.Tensor) -> list[torch.Tensor]:
        """Occluder masks of the views that get masked: [x_tr's] ([x_orig's, x_tr's] for SimSiam)."""
        views = (x_orig, x_tr) if self.framework == "simsiam" else (x_tr,)
        return [self.occluder(v) for v in views]

    def ssl_loss(self, x_orig: torch.Tensor, x_tr: torch.Tensor, masks: list[torch.Tensor],
                 mask_ids: torch.Tensor | None = None) -> torch.Tensor:
        """sum_n ssl(x_orig, x_tr * (1 - m_n)) (`masks` from `masks_of`); ADIOS-s: one mask per image, index
        `mask_ids` (B,) (drawn here when None), the same index for both of SimSiam's views."""
        b = x_tr.shape[0]
        if self.single_mask:
            if mask_ids is None:
                mask_ids = torch.randint(self.num_masks, (b,))
            rows, ids = torch.arange(b, device=x_tr.device), mask_ids.to(x_tr.device)
            chosen = [[m[rows, ids].unsqueeze(1) for m in masks]]
        else:
            chosen = [[m[:, n:n + 1] for m in masks] for n in range(self.num_masks)]
        if self.framework == "simsiam":
            u1, u2 = self._online(x_orig), self._online(x_tr)
            return sum(self.simsiam_terms(u1, u2, self._online(apply_mask(x_orig, m1)),
                                          self._online(apply_mask(x_tr, m2))) for m1, m2 in chosen)
        orig = self._branch(x_orig)
        return sum(self.pair_loss(orig, self._branch(apply_mask(x_tr, m))) for (m,) in chosen)

    def encoder_loss(self, x_orig: torch.Tensor, x_tr: torch.Tensor,
                     mask_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to minimise, x_tr's masks): masks computed without gradient."""
        with torch.no_grad():
            masks = self.masks_of(x_orig, x_tr)
        return self.ssl_loss(x_orig, x_tr, masks, mask_ids), masks[-1]

    def occluder_objective(self, x_orig: torch.Tensor, x_tr: torch.Tensor,
                           mask_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(objective the occluder maximises, logs): SSL loss - alpha_s * sparsity + alpha_e * neg. entropy,
        the penalties over every masked view's N masks.

        Call with the encoder side frozen (`frozen`); gradients then reach only the occluder.
        """
        masks = self.masks_of(x_orig, x_tr)
        areas = [mask_areas(m) for m in masks]
        ssl = self.ssl_loss(x_orig, x_tr, masks, mask_ids)
        penalty = sum(sparsity_penalty(a) for a in areas)
        objective = ssl - self.alpha_sparsity * penalty
        if self.alpha_entropy:  # the reference: ADIOS-s per view, full ADIOS over all views' masks at once
            neg_entropy = (sum(area_neg_entropy(a) for a in areas) if self.single_mask
                           else area_neg_entropy(torch.cat(areas, 1)))
            objective = objective + self.alpha_entropy * neg_entropy
        all_areas = torch.cat(areas, 1).detach()
        logs = {"mask_ssl": ssl.detach(), "mask_penalty": penalty.detach(),
                "area_min": all_areas.min(), "area_max": all_areas.max()}
        return objective, logs

    @torch.no_grad()
    def update_momentum(self, tau: float) -> None:
        """BYOL: target <- tau * target + (1 - tau) * online, for encoder and projector parameters."""
        if self.framework != "byol":
            return
        for online, target in ((self.encoder, self.momentum_encoder), (self.projector, self.momentum_projector)):
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.mul_(tau).add_(po.detach(), alpha=1 - tau)


class frozen:
    """Context manager: requires_grad False on the given parameters, restored on exit."""

    def __init__(self, params: Iterable[nn.Parameter]):
        self.params = [p for p in params if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def adios_step(model: ADIOS, enc_opt: torch.optim.Optimizer, occ_opt: torch.optim.Optimizer,
               x_orig: torch.Tensor, x_tr: torch.Tensor, tau: float | None = None,
               autocast=nullcontext, scaler: Any = None) -> dict[str, torch.Tensor]:
    """One batch of the min-max game: the encoder step, then the occluder step, then the EMA.

    `enc_opt` and `occ_opt` may be the same optimiser holding both sides' parameter groups: every step sets all
    gradients to None first and produces gradients for its own side only. Without a DDP forward, gradients are
    averaged over processes here.
    """
    def backward_step(loss, opt, params):
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            _all_reduce_grads(params)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            _all_reduce_grads(params)
            opt.step()

    enc_params, occ_params = model.encoder_parameters(), model.occluder_parameters()
    with autocast():
        loss, _ = model.encoder_loss(x_orig, x_tr)
    backward_step(loss, enc_opt, enc_params)
    with frozen(enc_params):
        with autocast():
            objective, mask_logs = model.occluder_objective(x_orig, x_tr)
        backward_step(-objective, occ_opt, occ_params)
    occ_opt.zero_grad(set_to_none=True)
    logs = {"loss": loss.detach(), **mask_logs}
    if tau is not None:
        model.update_momentum(tau)
    return logs


def _all_reduce_grads(params: Iterable[nn.Parameter]) -> None:
    """Average gradients over processes (instead of DDP's hooks, which do not follow requires_grad flips)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


# ----------------------------------------------------------------------------------------------- common.py hooks
def build_model(cfg: dict) -> ADIOS:
    """ADIOS model from a config (common DEFAULTS < these DEFAULTS < config file < overrides)."""
    cfg = {**DEFAULTS, **cfg}
    arch_kwargs = {"width": cfg["width"]} if cfg.get("width", 64) != 64 else {}
    encoder = build_backbone(cfg["arch"], **arch_kwargs)
    keys = ("framework", "img_size", "num_masks", "single_mask", "mask_fbase", "unet_norm", "alpha_sparsity",
            "alpha_entropy", "proj_hidden_dim", "proj_output_dim", "pred_hidden_dim", "temperature", "base_tau",
            "num_blocks", "use_symmetry_mask", "use_no_mask", "use_both_mask", "epochs", "train_mask_epoch",
            "warmup_epochs", "warmup_start_lr", "min_lr")
    return ADIOS(encoder, **{k: cfg[k] for k in keys if k in cfg})


def preprocessing(cfg: dict) -> Preprocessing:
    """ADIOS's normalisation on 0-255 pixels (what the exported encoder expects at test time)."""
    return Preprocessing(mean=tuple(m * 255 for m in MEAN), std=tuple(s * 255 for s in STD))


def param_groups(model: ADIOS, cfg: dict) -> list[dict]:
    """Encoder side at lr, occluder at mask_lr (both scaled by batch_size / lr_batch as common.py scales lr);
    each group records its side ("adios_side": encoder | occluder | static, SimSiam's predictor) and base lr for
    `train_step`'s reference schedule.

    Weights: weight decay + LARS adaptation with clipping (solo-learn's LARSWrapper(clip=True)); biases and norm
    parameters: neither. The reference applies the same weight decay to both sides.
    """
    scale = cfg["batch_size"] / cfg["lr_batch"]
    lr, mask_lr = cfg["lr"] * scale, cfg["mask_lr"] * scale
    static = [model.predictor] if model.framework == "simsiam" else []
    sides = [([m for m in model.encoder_side() if m not in static], "encoder", lr), (static, "static", lr),
             ([model.occluder], "occluder", mask_lr)]
    groups = []
    for modules, side, base in sides:
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        extra = {"lr": base, "adios_side": side, "adios_base_lr": base}
        groups.append({"params": [p for p in params if p.ndim > 1], "weight_decay": cfg["weight_decay"],
                       "trust_clip": True, **extra})
        groups.append({"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, **extra})
    return [g for g in groups if g["params"]]


def set_reference_lrs(model: ADIOS, optimizer: torch.optim.Optimizer, epoch: int) -> None:
    """Every parameter group's lr for `epoch` from the reference's per-epoch schedules (`ADIOS.lr_at`)."""
    for group in optimizer.param_groups:
        if "adios_side" not in group:
            raise ValueError("ADIOS needs the optimizer built with pretrain.adios.param_groups "
                             "(build_optimizer(..., module=pretrain.adios))")
        group["lr"] = model.lr_at(epoch, group["adios_side"], group["adios_base_lr"])


def train_step(model: nn.Module, views: list[torch.Tensor], optimizer, scheduler, scaler=None,
               autocast=nullcontext, progress: float = 0.0) -> dict[str, torch.Tensor]:
    """common.py's step for ADIOS: both steps of the min-max game on one batch, then the EMA.

    The lrs come from the reference's per-epoch schedules: this step's index is `scheduler.last_epoch` (common.py's
    LambdaLR, stepped once per batch and checkpointed), the steps per epoch follow from `progress` =
    (step + 1) / (epochs * steps_per_epoch). Calls the unwrapped model (a DDP forward would expect gradients for
    every parameter in both steps); gradients are all-reduced by `adios_step` instead.
    """
    m = unwrap(model)
    if progress <= 0:
        raise ValueError("adios.train_step needs progress = (step + 1) / total steps (common.train passes it)")
    step = scheduler.last_epoch
    steps_per_epoch = max(1, round((step + 1) / progress) // m.epochs)
    set_reference_lrs(m, optimizer, step // steps_per_epoch)
    x_orig, x_tr = m.prepare(views[0]), m.prepare(views[1])
    tau = tau_at(progress, m.base_tau) if m.framework == "byol" else None
    logs = adios_step(m, optimizer, optimizer, x_orig, x_tr, tau, autocast, scaler)
    scheduler.step()
    set_reference_lrs(m, optimizer, (step + 1) // steps_per_epoch)  # what common.py logs for the next step
    return logs


# ----------------------------------------------------------------------------------------------- mask figure
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def mask_grid(images: torch.Tensor, masks: torch.Tensor, scale: int = 2):
    """PIL image: one row per image: the image, each mask (white = masked), the argmax partition over the image.

    images: (B, 3, H, W) in [0, 1]; masks: (B, N, H, W) summing to 1 over N.
    """
    import numpy as np
    from PIL import Image

    b, n, h, w = masks.shape
    pad = 2
    cols = n + 2
    canvas = np.full((b * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    imgs = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)
    ms = masks.detach().float().cpu().numpy()
    palette = np.array([PALETTE[i % len(PALETTE)] for i in range(n)], dtype=np.float32)
    for r in range(b):
        y = pad + r * (h + pad)
        tiles = [imgs[r]] + [np.repeat((ms[r, k] * 255).astype(np.uint8)[..., None], 3, axis=2) for k in range(n)]
        colour = palette[ms[r].argmax(0)]
        tiles.append((0.5 * imgs[r] + 0.5 * colour).astype(np.uint8))
        for c, tile in enumerate(tiles):
            x = pad + c * (w + pad)
            canvas[y:y + h, x:x + w] = tile
    img = Image.fromarray(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


@torch.no_grad()
def show_masks(checkpoint: str | Path, output_png: str | Path, images: torch.Tensor | None = None,
               num_images: int = 8) -> Path:
    """Save a PNG grid of images and the occluder's masks from a training checkpoint (common.py's
    checkpoint.pth: `model` and `config`). Rows: image, each of the N masks (white = hidden), the argmax
    partition over the image. Without `images` ((B, 3, H, W) floats in [0, 1]), the first `num_images` images
    of the run's pretraining data are shown, resized to its img_size."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)  # our own training checkpoint
    cfg = {**DEFAULTS, **ckpt["config"]}
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    if images is None:
        images = sample_images(cfg, num_images)
    images = images[:num_images]
    masks = model.occluder(model.prepare(images))
    output_png = Path(output_png)
    output_png.parent.mkdir(parents=True, exist_ok=True)
    mask_grid(images, masks).save(output_png)
    return output_png


@torch.no_grad()
def pictures(model: nn.Module, cfg: dict, num_images: int = 6) -> dict:
    """End-of-run pictures for `bench report` (pretrain/common.py saves them to OUTPUT_DIR/pictures/): the masks
    the occluder draws on a few pretraining images (the --show-masks figure)."""
    was_training = model.training
    model.eval()
    images = sample_images(cfg, num_images)
    masks = model.occluder(model.prepare(images.to(model.mean.device)))
    model.train(was_training)
    return {"masks": mask_grid(images, masks)}


def sample_images(cfg: dict, num_images: int) -> torch.Tensor:
    """Images spread over the run's pretraining data (common.image_files), resized to img_size, in [0, 1]."""
    import torchvision.transforms.v2.functional as TF

    from transfer.datasets import open_image
    from pretrain.common import image_files

    files, _ = image_files(cfg.get("data"))
    step = max(1, len(files) // num_images)
    size = [cfg["img_size"]] * 2
    return torch.stack([TF.to_dtype(TF.to_image(TF.resize(open_image(f), size, antialias=True)), torch.float32,
                                    scale=True) for f in files[::step][:num_images]])


def main(argv: list[str] | None = None) -> None:
    """`python -m pretrain.adios --show-masks CKPT [-o masks.png] [-n 8]` (what run.py's --show-masks calls)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pretrain.adios", description=show_masks.__doc__.split(".")[0])
    parser.add_argument("--show-masks", metavar="CKPT", required=True, help="an ADIOS run's checkpoint.pth")
    parser.add_argument("-o", "--output", default="masks.png", help="PNG to write (default masks.png)")
    parser.add_argument("-n", "--num-images", type=int, default=8)
    args = parser.parse_args(argv)
    print(show_masks(args.show_masks, args.output, num_images=args.num_images))


if __name__ == "__main__":
    main()
