"""Linear probes on frozen features (VISSL iNat18 / Places205 protocol), in two real execution modes.

- `protocol`: the reference recipe as written: frozen trunk in eval mode, freshly augmented crops every
  epoch, one BN + Linear head at the recipe LR, evaluated on val after the last epoch.
- `cached`: features of `augmented_passes` augmented passes over train (+ centre crops of val and of a held-out
  part of train) are extracted once and cached on disk, keyed by backbone hash + data + transform. A grid of
  heads over several LRs then trains in one pass over the cached features (epoch e reads pass e mod K); the LR
  is chosen on the held-out split of train, never on val, and the record says which LR won.

Heads: ResNet trunks get BatchNorm (affine) + Linear on res5 global-pooled features; ViT trunks get
BatchNorm without affine (eps 1e-6) + Linear on the CLS token (MAE recipe head).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T
from tqdm import tqdm

from benchmarks.datasets import ClassificationSplit, open_image
from transfer.artifact import Backbone

FEATURE_CACHE_VERSION = "features/1"


# ----------------------------------------------------------------------------------------------- data
class ImageList(Dataset):
    """(path, label) samples -> (float RGB tensor in [0, 1], label)."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(open_image(path)), label


def train_transform(crop_size: int) -> T.Compose:
    return T.Compose([T.RandomResizedCrop(crop_size, antialias=True), T.RandomHorizontalFlip(),
                      T.ToImage(), T.ToDtype(torch.float32, scale=True)])


def test_transform(resize_size: int, crop_size: int) -> T.Compose:
    return T.Compose([T.Resize(resize_size, antialias=True), T.CenterCrop(crop_size),
                      T.ToImage(), T.ToDtype(torch.float32, scale=True)])


def loader(samples, transform, batch_size: int, workers: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(ImageList(samples, transform), batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      generator=generator, persistent_workers=False, pin_memory=torch.cuda.is_available())


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of train indices into (fit, held-out)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_hold = max(1, math.ceil(fraction * n))
    return sorted(order[n_hold:]), sorted(order[:n_hold])


# ----------------------------------------------------------------------------------------------- features
@torch.no_grad()
def extract_features(backbone: Backbone, data: DataLoader, device: torch.device, desc: str):
    """Pooled trunk features (float32, CPU) and labels for every sample of `data`, in order."""
    backbone.eval().to(device)
    feats, labels = [], []
    for images, y in tqdm(data, desc=desc, leave=False, dynamic_ncols=True):
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats.append(backbone(images).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


def cache_key(backbone: Backbone, split: ClassificationSplit, transform, pass_seed: int | None) -> str:
    """Hash of everything the features depend on: weights, preprocessing, samples, transform, seed."""
    h = hashlib.sha256()
    meta = backbone.artifact_meta
    h.update(json.dumps([FEATURE_CACHE_VERSION, meta["weights_hash"], meta["preprocessing"], meta["arch"],
                         split.name, split.split, repr(transform), pass_seed]).encode())
    for path, label in split.samples:
        h.update(f"{path}|{label}|{os.path.getsize(path)}\n".encode())
    return h.hexdigest()[:24]


def cached_features(backbone, split, transform, pass_seed, cache_dir: Path, device, batch_size, workers, desc):
    """Features from the disk cache, extracting and caching them on a miss. Returns (feats, labels, hit)."""
    path = cache_dir / f"{split.name}-{split.split}-{cache_key(backbone, split, transform, pass_seed)}.pt"
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return blob["features"], blob["labels"], True
    if pass_seed is not None:
        torch.manual_seed(pass_seed)
    data = loader(split.samples, transform, batch_size, workers, seed=pass_seed or 0)
    feats, labels = extract_features(backbone, data, device, desc)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"features": feats, "labels": labels}, tmp)
    os.replace(tmp, path)
    return feats, labels, False


# ----------------------------------------------------------------------------------------------- heads
class LinearHeads(nn.Module):
    """G independent BN + Linear heads on the same features, trained together.

    BatchNorm statistics depend only on the input, so one normalisation serves every head; each head keeps
    its own affine BN parameters (when `affine`) and Linear layer, hence its own learning rate.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 1, affine: bool = True, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=eps)
        self.scale = nn.Parameter(torch.ones(num_heads, dim)) if affine else None
        self.shift = nn.Parameter(torch.zeros(num_heads, dim)) if affine else None
        self.linears = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_heads))
        for linear in self.linears:
            nn.init.normal_(linear.weight, std=0.01)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) features -> (G, B, C) logits."""
        x = self.norm(x)
        outs = []
        for g, linear in enumerate(self.linears):
            xg = x * self.scale[g] + self.shift[g] if self.scale is not None else x
            outs.append(linear(xg))
        return torch.stack(outs)

    def param_groups(self, lrs: list[float], weight_decay: float) -> list[dict]:
        """One group per head for its Linear (with weight decay) and one for its BN affine (without)."""
        groups = []
        for g, (linear, lr) in enumerate(zip(self.linears, lrs)):
            groups.append({"params": list(linear.parameters()), "lr": lr, "base_lr": lr,
                           "weight_decay": weight_decay})
        if self.scale is not None:
            # per-head affine rows share one tensor; per-head LRs are applied by gradient scaling in `fit_heads`
            groups.append({"params": [self.scale, self.shift], "lr": 1.0, "base_lr": 1.0, "weight_decay": 0.0,
                           "affine": True})
        return groups


def lr_factor(cfg: dict, progress: float) -> float:
    """LR multiplier at `progress` epochs: linear warm-up, then step decay at milestones or cosine."""
    warmup = cfg.get("warmup_epochs") or 0
    if progress < warmup:
        return progress / warmup
    if cfg["milestones"] == "cosine":
        span = max(cfg["epochs"] - warmup, 1e-8)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / span)))
    return cfg["gamma"] ** sum(progress >= m for m in cfg["milestones"])


def make_optimizer(cfg: dict, groups: list[dict]) -> torch.optim.Optimizer:
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=1.0, momentum=cfg["momentum"], nesterov=cfg["nesterov"])
    if cfg["optimizer"] == "lars":
        from timm.optim import Lars

        return Lars(groups, lr=1.0, momentum=cfg["momentum"])
    raise ValueError(f"unknown optimizer {cfg['optimizer']!r} in recipe")


def fit_heads(heads: LinearHeads, epoch_batches: Callable[[int], Iterable], steps_per_epoch: int, cfg: dict,
              lrs: list[float], device: torch.device, desc: str = "train heads") -> list[float]:
    """Train all heads for cfg['epochs'] epochs; `epoch_batches(e)` yields (features, labels). Returns losses."""
    heads.to(device).train()
    groups = heads.param_groups(lrs, cfg["weight_decay"])
    optimizer = make_optimizer(cfg, groups)
    lr_per_head = torch.tensor(lrs, device=device).view(-1, 1)
    losses, step = [], 0
    bar = tqdm(range(cfg["epochs"]), desc=desc, leave=False, dynamic_ncols=True)
    for epoch in bar:
        for x, y in epoch_batches(epoch):
            factor = lr_factor(cfg, step / steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            logits = heads(x.to(device, non_blocking=True))
            y = y.to(device, non_blocking=True)
            loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(lrs)), reduction="mean") * len(lrs)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"linear-probe loss is {loss.item()} at epoch {epoch}, step {step}; "
                                         "lower the LR (recipe or --lr-grid) or check the backbone's features")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if heads.scale is not None:  # the shared affine tensors get each head's own LR
                heads.scale.grad.mul_(lr_per_head)
                heads.shift.grad.mul_(lr_per_head)
            optimizer.step()
            losses.append(loss.item() / len(lrs))
            step += 1
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


@torch.no_grad()
def evaluate_heads(heads: LinearHeads, feats: torch.Tensor, labels: torch.Tensor, device, batch_size=4096):
    """Per-head top-1 and top-5 accuracy (%) on the given features."""
    heads.to(device).eval()
    correct1 = correct5 = 0
    for i in range(0, len(feats), batch_size):
        logits = heads(feats[i:i + batch_size].to(device))
        y = labels[i:i + batch_size].to(device)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top == y.view(1, -1, 1)
        correct1 = correct1 + hits[..., 0].sum(1)
        correct5 = correct5 + hits.any(-1).sum(1)
    n = max(len(feats), 1)
    return (100.0 * correct1 / n).tolist(), (100.0 * correct5 / n).tolist()


def feature_batches(feats: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
    """Shuffled mini-batches of cached features, reshuffled per epoch with a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(feats), generator=generator)
    for i in range(0, len(feats), batch_size):
        idx = order[i:i + batch_size]
        if len(idx) > 1:  # BatchNorm needs two samples
            yield feats[idx], labels[idx]


# ----------------------------------------------------------------------------------------------- runs
def scaled_lr(cfg: dict) -> float:
    return cfg["lr"] * cfg["batch_size"] / cfg["lr_batch"]


def head_for(backbone: Backbone, num_classes: int, num_heads: int) -> LinearHeads:
    if backbone.family == "resnet":
        return LinearHeads(backbone.dim, num_classes, num_heads, affine=True, eps=1e-5)
    return LinearHeads(backbone.dim, num_classes, num_heads, affine=False, eps=1e-6)


def run_protocol(backbone, train: ClassificationSplit, val: ClassificationSplit, cfg: dict, seed: int, device,
                 workers: int) -> dict:
    """The reference recipe: fresh augmented crops every epoch through the frozen trunk, one head."""
    torch.manual_seed(seed)
    backbone.eval().to(device)
    heads = head_for(backbone, val.num_classes, 1)
    lr = scaled_lr(cfg)
    data = loader(train.samples, train_transform(cfg["crop_size"]), cfg["batch_size"], workers, shuffle=True,
                  seed=seed)

    def epoch_batches(epoch):
        for images, y in data:
            if len(y) < 2:
                continue
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                feats = backbone(images.to(device, non_blocking=True)).float()
            yield feats, y

    t0 = time.perf_counter()
    losses = fit_heads(heads, epoch_batches, len(data), cfg, [lr], device, desc="protocol epochs")
    t_train = time.perf_counter() - t0
    val_feats, val_labels = extract_features(
        backbone, loader(val.samples, test_transform(cfg["resize_size"], cfg["crop_size"]), cfg["batch_size"],
                         workers), device, "val features")
    top1, top5 = evaluate_heads(heads, val_feats, val_labels, device)
    return {"metrics": {"top1": top1[0], "top5": top5[0]},
            "extra": {"lr": lr, "final_loss": losses[-1], "steps": len(losses)},
            "timings": {"train_s": t_train, "eval_s": time.perf_counter() - t0 - t_train}}


def run_cached(backbone, train: ClassificationSplit, val: ClassificationSplit, cfg: dict, cached: dict, seed: int,
               device, workers: int, cache_dir: Path, feature_seed: int = 0) -> dict:
    """Cached features + a grid of heads over LRs, the LR chosen on a held-out split of train."""
    t0 = time.perf_counter()
    fit_idx, hold_idx = holdout_split(len(train.samples), cached["holdout_fraction"], feature_seed)
    fit = ClassificationSplit(train.name, "train", [train.samples[i] for i in fit_idx], train.num_classes,
                              train.class_names)
    hold = ClassificationSplit(train.name, "train", [train.samples[i] for i in hold_idx], train.num_classes,
                               train.class_names)
    test_tf = test_transform(cfg["resize_size"], cfg["crop_size"])
    common = dict(cache_dir=cache_dir, device=device, batch_size=max(cfg["batch_size"], 64), workers=workers)
    hits = []
    passes = []
    for k in range(cached["augmented_passes"]):
        f, y, hit = cached_features(backbone, fit, train_transform(cfg["crop_size"]), feature_seed * 1000 + k,
                                    desc=f"train features (pass {k + 1})", **common)
        passes.append((f, y))
        hits.append(hit)
    hold_f, hold_y, hit_h = cached_features(backbone, hold, test_tf, None, desc="held-out features", **common)
    val_f, val_y, hit_v = cached_features(backbone, val, test_tf, None, desc="val features", **common)
    t_feat = time.perf_counter() - t0

    base = scaled_lr(cfg)
    lrs = [base * m for m in cached["lr_multipliers"]]
    torch.manual_seed(seed)
    heads = head_for(backbone, val.num_classes, len(lrs))
    steps = math.ceil(len(fit.samples) / cfg["batch_size"])
    batches = lambda e: feature_batches(*passes[e % len(passes)], cfg["batch_size"], seed * 100003 + e)  # noqa: E731
    losses = fit_heads(heads, batches, steps, cfg, lrs, device, desc=f"{len(lrs)} heads")
    t_train = time.perf_counter() - t0 - t_feat

    hold_top1, _ = evaluate_heads(heads, hold_f, hold_y, device)
    best = max(range(len(lrs)), key=lambda g: (hold_top1[g], -abs(math.log(lrs[g] / base))))
    top1, top5 = evaluate_heads(heads, val_f, val_y, device)
    return {"metrics": {"top1": top1[best], "top5": top5[best]},
            "extra": {"lr_selection": {"chosen_lr": lrs[best], "recipe_lr": base, "split": "held-out train",
                                       "holdout_size": len(hold.samples), "fit_size": len(fit.samples),
                                       "heldout_top1_by_lr": dict(zip(map(str, lrs), hold_top1))},
                      "feature_cache": {"dir": str(cache_dir), "hits": sum(hits) + hit_h + hit_v,
                                        "lookups": len(hits) + 2},
                      "final_loss": losses[-1], "steps": len(losses)},
            "timings": {"features_s": t_feat, "train_s": t_train,
                        "eval_s": time.perf_counter() - t0 - t_feat - t_train}}
