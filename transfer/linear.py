"""Linear probes on frozen features (VISSL iNat18 / Places205 protocol), in two real execution modes.

- `protocol`: the reference recipe as written: frozen trunk in eval mode, freshly augmented crops every
  epoch, one BN + Linear head at the recipe LR, evaluated on val after the last epoch.
- `cached`: features of `augmented_passes` augmented passes over train (+ centre crops of val and of a held-out
  part of train) are extracted once and cached on disk, keyed by backbone hash + data + transform. A grid of
  heads over several LRs then trains in one pass over the cached features (epoch e reads pass e mod K); the LR
  is chosen on the held-out split of train (top-1, ties broken by held-out cross-entropy), never on val, and the
  record says which LR won.

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
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2 as T
from tqdm import tqdm

from transfer.datasets import ClassificationSplit, open_image
from leaderboard.runs import training_curve
from transfer.artifact import Backbone

FEATURE_CACHE_VERSION = "features/1"


# ----------------------------------------------------------------------------------------------- data
class ImageList(Dataset):
    """(path, label) samples -> (float RGB tensor in [0, 1], label).

    With a `seed`, sample i's random transform draws from its own generator seeded by (seed, epoch, i), so the
    augmentations do not depend on worker count, batch order or how samples are sharded across ranks.
    """

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable, seed: int | None = None):
        self.samples, self.transform, self.seed, self.epoch = samples, transform, seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        image = open_image(path)
        if self.seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + self.epoch * 100_003 + i)
            return self.transform(image), label


def train_transform(crop_size: int) -> T.Compose:
    return T.Compose([T.RandomResizedCrop(crop_size, antialias=True), T.RandomHorizontalFlip(),
                      T.ToImage(), T.ToDtype(torch.float32, scale=True)])


def test_transform(resize_size: int, crop_size: int) -> T.Compose:
    return T.Compose([T.Resize(resize_size, antialias=True), T.CenterCrop(crop_size),
                      T.ToImage(), T.ToDtype(torch.float32, scale=True)])


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of train indices into (fit, held-out)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_hold = max(1, math.ceil(fraction * n))
    return sorted(order[n_hold:]), sorted(order[:n_hold])


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(local: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
    """Rows held by each rank (at global positions `index`) -> the full (total, ...) tensor on every rank."""
    rank, world = dist_info()
    if world == 1:
        return local
    size = math.ceil(total / world)
    pad = lambda t, fill: torch.cat([t, t.new_full((size - len(t), *t.shape[1:]), fill)])  # noqa: E731
    rows = [torch.empty((size, *local.shape[1:]), dtype=local.dtype) for _ in range(world)]
    where = [torch.empty(size, dtype=torch.long) for _ in range(world)]
    dist.all_gather(rows, pad(local, 0))
    dist.all_gather(where, pad(index, -1))
    out = local.new_empty((total, *local.shape[1:]))
    for r, w in zip(rows, where):
        out[w[w >= 0]] = r[w >= 0]
    return out


# ----------------------------------------------------------------------------------------------- features
@torch.no_grad()
def trunk_features(backbone: Backbone, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Features of one batch from a backbone already in eval mode on `device`."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return backbone(images.to(device, non_blocking=True)).float().cpu()


def extract_features(backbone: Backbone, samples, transform, device, batch_size: int, workers: int, desc: str,
                     seed: int | None = None):
    """Pooled trunk features (float32, CPU) and labels of every sample, in order.

    Under torch.distributed each rank extracts every world-th sample and the rows are gathered on all ranks.
    """
    rank, world = dist_info()
    backbone.eval().to(device)
    mine = torch.arange(rank, len(samples), world)
    data = DataLoader(Subset(ImageList(samples, transform, seed), mine.tolist()), batch_size=batch_size,
                      num_workers=workers, pin_memory=torch.cuda.is_available())
    feats, labels = [], []
    for images, y in tqdm(data, desc=desc, leave=False, dynamic_ncols=True, disable=rank > 0):
        feats.append(trunk_features(backbone, images, device))
        labels.append(torch.as_tensor(y))
    feats = torch.cat(feats) if feats else torch.empty(0, backbone.dim)
    labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    return gather_rows(feats, mine, len(samples)), gather_rows(labels, mine, len(samples))


def cache_key(backbone: Backbone, split: ClassificationSplit, transform, pass_seed: int | None) -> str:
    """Hash of everything the features depend on: weights, preprocessing, samples, transform, seed."""
    h = hashlib.sha256()
    meta = backbone.artifact_meta
    h.update(json.dumps([FEATURE_CACHE_VERSION, meta["weights_hash"], meta["preprocessing"], meta["arch"],
                         split.name, split.split, repr(transform), pass_seed]).encode())
    for path, label in split.samples:
        h.update(f"{path}|{label}|{os.path.getsize(path)}\n".encode())
    return h.hexdigest()[:24]


def read_feature_cache(path: Path, num_samples: int) -> dict | None:
    """A cache entry, or None when it is absent or unusable (truncated, foreign, wrong length): then the features
    are extracted again and the entry rewritten, so a bad entry never sticks."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        ok = (len(blob["features"]) == num_samples == len(blob["labels"])
              and bool(torch.isfinite(blob["features"]).all()))
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError ... for damaged files
        print(f"feature cache {path}: unreadable ({type(e).__name__}); extracting again")
        return None
    if not ok:
        print(f"feature cache {path}: wrong length or non-finite values; extracting again")
        return None
    return blob


def cached_features(backbone, split, transform, pass_seed, cache_dir: Path, device, batch_size, workers, desc):
    """Features from the disk cache, extracting and caching them on a miss. Returns (feats, labels, hit)."""
    path = cache_dir / f"{split.name}-{split.split}-{cache_key(backbone, split, transform, pass_seed)}.pt"
    blob = read_feature_cache(path, len(split.samples))
    if blob is not None:
        return blob["features"], blob["labels"], True
    feats, labels = extract_features(backbone, split.samples, transform, device, batch_size, workers, desc,
                                     seed=pass_seed)
    if dist_info()[0] == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            torch.save({"features": feats, "labels": labels}, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # a full disk leaves no partial entry behind
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
    bar = tqdm(range(cfg["epochs"]), desc=desc, leave=False, dynamic_ncols=True, disable=dist_info()[0] > 0)
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
                                         "lower the LR (`bench run --lr`, or the recipe) or check the backbone's features")
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
    """Per-head top-1 and top-5 accuracy (%) and mean cross-entropy on the given features."""
    heads.to(device).eval()
    correct1 = correct5 = loss = 0
    for i in range(0, len(feats), batch_size):
        logits = heads(feats[i:i + batch_size].to(device))
        y = labels[i:i + batch_size].to(device)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top == y.view(1, -1, 1)
        correct1 = correct1 + hits[..., 0].sum(1)
        correct5 = correct5 + hits.any(-1).sum(1)
        loss = loss + F.cross_entropy(logits.transpose(1, 2), y.expand(len(logits), -1), reduction="none").sum(1)
    n = max(len(feats), 1)
    return (100.0 * correct1 / n).tolist(), (100.0 * correct5 / n).tolist(), (loss / n).tolist()


def best_head(top1: list[float], loss: list[float]) -> int:
    """Index of the head with the best held-out top-1; ties, common on small held-out splits (30 images: 3.3
    points an image), go to the lower held-out cross-entropy, a finer measure on the same images."""
    return max(range(len(top1)), key=lambda g: (top1[g], -loss[g]))


def feature_batches(feats: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
    """Shuffled mini-batches of cached features, reshuffled per epoch with a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(feats), generator=generator)
    for i in range(0, len(feats), batch_size):
        idx = order[i:i + batch_size]
        if len(idx) > 1:  # BatchNorm needs two samples
            yield feats[idx], labels[idx]


# ----------------------------------------------------------------------------------------------- runs
def loss_curve(losses: list[float]) -> dict:
    """The per-step training loss (mean over heads) as the record's `extra.curve` (leaderboard/runs.py)."""
    return training_curve([{"step": i + 1, "loss": v} for i, v in enumerate(losses)])


def scaled_lr(cfg: dict) -> float:
    return cfg["lr"] * cfg["batch_size"] / cfg["lr_batch"]


def head_for(backbone: Backbone, num_classes: int, num_heads: int) -> LinearHeads:
    if backbone.family == "resnet":
        return LinearHeads(backbone.dim, num_classes, num_heads, affine=True, eps=1e-5)
    return LinearHeads(backbone.dim, num_classes, num_heads, affine=False, eps=1e-6)


def run_protocol(backbone, train: ClassificationSplit, val: ClassificationSplit, cfg: dict, seed: int, device,
                 workers: int) -> dict:
    """The reference recipe: fresh augmented crops every epoch through the frozen trunk, one head.

    Each global batch is split across ranks for the trunk; the gathered features train the head identically on
    every rank, so N processes give the 1-process result for the same global batch.
    """
    torch.manual_seed(seed)
    rank, world = dist_info()
    backbone.eval().to(device)
    heads = head_for(backbone, val.num_classes, 1)
    lr = scaled_lr(cfg)
    images = ImageList(train.samples, train_transform(cfg["crop_size"]), seed=seed)
    steps = math.ceil(len(images) / cfg["batch_size"])

    def epoch_batches(epoch):
        images.epoch = epoch
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        batches = [order[i:i + cfg["batch_size"]] for i in range(0, len(order), cfg["batch_size"])]
        batches = [b for b in batches if len(b) >= max(2, world)]  # BatchNorm needs 2; every rank needs 1
        shards = [b[rank::world].tolist() for b in batches]
        data = DataLoader(images, batch_sampler=shards, num_workers=workers, pin_memory=torch.cuda.is_available())
        for batch, (x, y) in zip(batches, data):
            local = torch.arange(rank, len(batch), world)
            yield (gather_rows(trunk_features(backbone, x, device), local, len(batch)),
                   gather_rows(torch.as_tensor(y), local, len(batch)))

    t0 = time.perf_counter()
    losses = fit_heads(heads, epoch_batches, steps, cfg, [lr], device, desc="protocol epochs")
    t_train = time.perf_counter() - t0
    val_feats, val_labels = extract_features(backbone, val.samples, test_transform(cfg["resize_size"],
                                             cfg["crop_size"]), device, cfg["batch_size"], workers, "val features")
    top1, top5, _ = evaluate_heads(heads, val_feats, val_labels, device)
    return {"metrics": {"top1": top1[0], "top5": top5[0]},
            "extra": {"lr": lr, "final_loss": losses[-1], "steps": len(losses), "world_size": world,
                      "curve": loss_curve(losses)},
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

    hold_top1, _, hold_loss = evaluate_heads(heads, hold_f, hold_y, device)
    best = best_head(hold_top1, hold_loss)
    top1, top5, _ = evaluate_heads(heads, val_f, val_y, device)
    return {"metrics": {"top1": top1[best], "top5": top5[best]},
            "extra": {"lr_selection": {"chosen_lr": lrs[best], "recipe_lr": base, "split": "held-out train",
                                       "holdout_size": len(hold.samples), "fit_size": len(fit.samples),
                                       "heldout_top1_by_lr": dict(zip(map(str, lrs), hold_top1)),
                                       "heldout_loss_by_lr": dict(zip(map(str, lrs), hold_loss))},
                      "feature_cache": {"dir": str(cache_dir), "hits": sum(hits) + hit_h + hit_v,
                                        "lookups": len(hits) + 2},
                      "final_loss": losses[-1], "steps": len(losses), "curve": loss_curve(losses)},
            "timings": {"features_s": t_feat, "train_s": t_train,
                        "eval_s": time.perf_counter() - t0 - t_feat - t_train}}
