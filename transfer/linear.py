"""Linear probes on frozen features (VISSL iNat18 / Places205 protocol), in two real execution modes.

- `protocol`: the reference recipe as written: frozen trunk in eval mode, freshly augmented crops every
  epoch, one BN + Linear head at the recipe LR, evaluated on val after the last epoch.
- `cached`: features of `augmented_passes` augmented passes over train (+ centre crops of val and of a held-out
  part of train) are extracted once and cached on disk, keyed by backbone hash + data + transform. A grid of
  heads over several LRs then trains in one pass over the cached features (epoch e reads pass e mod K); the LR
  is chosen on the held-out split of train (top-1, ties broken by held-out cross-entropy), never on val, and the
  record says which LR won.

Heads: ResNet trunks get VISSL's eval_mlp, BatchNorm2d (affine, over channels) + Linear, on the recipe's
`feature`: `res5avg` (global average pool, 2048-d for ResNet-50) or `res5` average-pooled with AvgPool2d
`feature_pool` = [kernel, stride] (VISSL's Places205 config: [6, 1] -> 2x2 x 2048 = 8192-d at 224 crops).
ViT trunks get BatchNorm without affine (eps 1e-6) + Linear on the CLS token (MAE recipe head).
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

from transfer.datasets import ClassificationSplit, open_image
from leaderboard.records import replaced_atomically
from leaderboard.runs import training_curve
from transfer.artifact import Backbone
from transfer.progress import progress

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


class MAERandomResizedCrop(torch.nn.Module):
    """MAE's util/crop.py RandomResizedCrop (BYOL's TF sampling): one draw of area and log-aspect, sides rounded
    and clamped to the image, no retry loop (torchvision retries 10 times, then centre-crops)."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=T.InterpolationMode.BICUBIC):
        super().__init__()
        self.size, self.scale, self.ratio, self.interpolation = size, scale, ratio, interpolation

    def params(self, height: int, width: int) -> tuple[int, int, int, int]:
        target_area = height * width * torch.empty(1).uniform_(*self.scale).item()
        log_ratio = torch.log(torch.tensor(self.ratio))
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = min(int(round(math.sqrt(target_area * aspect))), width)
        h = min(int(round(math.sqrt(target_area / aspect))), height)
        i = torch.randint(0, height - h + 1, size=(1,)).item()
        j = torch.randint(0, width - w + 1, size=(1,)).item()
        return i, j, h, w

    def forward(self, image):
        height, width = T.functional.get_size(image)
        i, j, h, w = self.params(height, width)
        return T.functional.resized_crop(image, i, j, h, w, [self.size, self.size], self.interpolation,
                                         antialias=True)

    def __repr__(self) -> str:
        return f"MAERandomResizedCrop(size={self.size}, interpolation={self.interpolation.value})"


def train_transform(crop_size: int, crop: str = "torchvision", interpolation: str = "bilinear") -> T.Compose:
    """RandomResizedCrop + flip. Recipe keys: `crop` torchvision (VISSL) | mae (util/crop.py), `interpolation`."""
    mode = T.InterpolationMode(interpolation)
    cropper = (MAERandomResizedCrop(crop_size, interpolation=mode) if crop == "mae"
               else T.RandomResizedCrop(crop_size, interpolation=mode, antialias=True))
    return T.Compose([cropper, T.RandomHorizontalFlip(), T.ToImage(), T.ToDtype(torch.float32, scale=True)])


def test_transform(resize_size: int, crop_size: int, interpolation: str = "bilinear") -> T.Compose:
    return T.Compose([T.Resize(resize_size, interpolation=T.InterpolationMode(interpolation), antialias=True),
                      T.CenterCrop(crop_size), T.ToImage(), T.ToDtype(torch.float32, scale=True)])


def recipe_transforms(cfg: dict) -> tuple[T.Compose, T.Compose]:
    """(train, test) transforms of a resolved linear recipe."""
    interpolation = cfg.get("interpolation", "bilinear")
    return (train_transform(cfg["crop_size"], cfg.get("crop", "torchvision"), interpolation),
            test_transform(cfg["resize_size"], cfg["crop_size"], interpolation))


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
def feature_pool(backbone: Backbone, cfg: dict) -> tuple[int, int] | None:
    """(kernel, stride) of the AvgPool2d on res5 for recipe feature `res5`; None for the backbone's own pooled
    feature (`res5avg`, and always for ViT / ConvViT trunks, whose recipes probe a token)."""
    feature = cfg.get("feature", "res5avg")
    if feature not in ("res5", "res5avg"):
        raise ValueError(f"unknown linear-probe feature {feature!r} in recipe; known: res5 (with feature_pool), "
                         "res5avg")
    if feature == "res5avg" or backbone.family != "resnet":
        return None
    kernel, stride = cfg["feature_pool"]
    return int(kernel), int(stride)


def feature_description(backbone: Backbone, cfg: dict) -> str:
    pool = feature_pool(backbone, cfg)
    if pool is not None:
        return f"res5 AvgPool2d(kernel {pool[0]}, stride {pool[1]}), flattened"
    return {"resnet": "res5 global average pool", "convvit": "mean of the normalised stage-3 tokens",
            "vit": "CLS token" if getattr(backbone.trunk, "global_pool", "token") == "token"
            else "mean of the patch tokens"}[backbone.family]


def res5_grid(crop_size: int, pool: tuple[int, int]) -> int:
    """Positions of the pooled res5 map of a torchvision ResNet (stride 32: five halvings, rounding up)."""
    side = crop_size
    for _ in range(5):
        side = (side - 1) // 2 + 1
    if side < pool[0]:
        raise ValueError(f"res5 is {side}x{side} at crop {crop_size}, smaller than the AvgPool2d kernel {pool[0]}; "
                         "lower feature_pool (the tiny budgets use [1, 1]: 2x2 at 64 px, as [6, 1] at 224)")
    return ((side - pool[0]) // pool[1] + 1) ** 2


def res5_pooled(backbone: Backbone, images: torch.Tensor, pool: tuple[int, int]) -> torch.Tensor:
    """VISSL's LINEAR_EVAL_FEAT_POOL_OPS_MAP res5 entry: AvgPool2d(kernel, stride) on res5, flattened (B, C*S)."""
    t = backbone.trunk
    x = t.maxpool(t.relu(t.bn1(t.conv1(backbone.transform(images)))))
    x = t.layer4(t.layer3(t.layer2(t.layer1(x))))
    return F.avg_pool2d(x, pool[0], pool[1]).flatten(1)


@torch.no_grad()
def trunk_features(backbone: Backbone, images: torch.Tensor, device: torch.device,
                   pool: tuple[int, int] | None = None) -> torch.Tensor:
    """Features of one batch from a backbone already in eval mode on `device` (res5 pooled by `pool` if given)."""
    images = images.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = backbone(images) if pool is None else res5_pooled(backbone, images, pool)
    return out.float().cpu()


def extract_features(backbone: Backbone, samples, transform, device, batch_size: int, workers: int, desc: str,
                     seed: int | None = None, pool: tuple[int, int] | None = None):
    """Pooled trunk features (float32, CPU) and labels of every sample, in order.

    Under torch.distributed each rank extracts every world-th sample and the rows are gathered on all ranks.
    """
    rank, world = dist_info()
    backbone.eval().to(device)
    mine = torch.arange(rank, len(samples), world)
    data = DataLoader(Subset(ImageList(samples, transform, seed), mine.tolist()), batch_size=batch_size,
                      num_workers=workers, pin_memory=torch.cuda.is_available())
    feats, labels = [], []
    for images, y in progress(data, desc=desc, leave=False, disable=rank > 0, unit="batch"):
        feats.append(trunk_features(backbone, images, device, pool))
        labels.append(torch.as_tensor(y))
    feats = torch.cat(feats) if feats else torch.empty(0, backbone.dim)
    labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    return gather_rows(feats, mine, len(samples)), gather_rows(labels, mine, len(samples))


def cache_key(backbone: Backbone, split: ClassificationSplit, transform, pass_seed: int | None,
              pool: tuple[int, int] | None = None) -> str:
    """Hash of everything the features depend on: weights, preprocessing, samples, transform, seed, pooling."""
    h = hashlib.sha256()
    meta = backbone.artifact_meta
    h.update(json.dumps([FEATURE_CACHE_VERSION, meta["weights_hash"], meta["preprocessing"], meta["arch"],
                         split.name, split.split, repr(transform), pass_seed]
                        + ([list(pool)] if pool is not None else [])).encode())
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


def cached_features(backbone, split, transform, pass_seed, cache_dir: Path, device, batch_size, workers, desc,
                    pool=None):
    """Features from the disk cache, extracting and caching them on a miss. Returns (feats, labels, hit)."""
    path = cache_dir / f"{split.name}-{split.split}-{cache_key(backbone, split, transform, pass_seed, pool)}.pt"
    blob = read_feature_cache(path, len(split.samples))
    if blob is not None:
        return blob["features"], blob["labels"], True
    feats, labels = extract_features(backbone, split.samples, transform, device, batch_size, workers, desc,
                                     seed=pass_seed, pool=pool)
    if dist_info()[0] == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path) as tmp:  # a full disk leaves no partial entry behind
            torch.save({"features": feats, "labels": labels}, tmp)
    return feats, labels, False


# ----------------------------------------------------------------------------------------------- heads
def _trunc_normal_001(linear: nn.Linear) -> None:
    """MAE main_linprobe.py: trunc_normal_(head.weight, std=0.01) (MoCo v3); timm zero-initialises the bias."""
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)


# recipe key `head_init`: VISSL's eval_mlp keeps nn.Linear's default (kaiming-uniform weight, uniform bias)
HEAD_INITS = {"default": lambda linear: None, "trunc_normal_0.01": _trunc_normal_001}


class LinearHeads(nn.Module):
    """G independent BN + Linear heads on the same features, trained together.

    BatchNorm statistics depend only on the input, so one normalisation serves every head; each head keeps
    its own affine BN parameters (when `affine`) and Linear layer, hence its own learning rate. With `channels`
    < dim the (B, dim) features are a flattened (B, channels, positions) map and BatchNorm runs per channel over
    batch and positions, as VISSL's eval_mlp BatchNorm2d before its flatten + Linear.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 1, affine: bool = True, eps: float = 1e-5,
                 init: str = "default", channels: int | None = None):
        super().__init__()
        self.channels = channels or dim
        if dim % self.channels:
            raise ValueError(f"feature dim {dim} is not a multiple of {self.channels} channels")
        self.norm = nn.BatchNorm1d(self.channels, affine=False, eps=eps)
        self.scale = nn.Parameter(torch.ones(num_heads, self.channels)) if affine else None
        self.shift = nn.Parameter(torch.zeros(num_heads, self.channels)) if affine else None
        self.linears = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_heads))
        if init not in HEAD_INITS:
            raise ValueError(f"unknown head_init {init!r} in recipe; known: {', '.join(HEAD_INITS)}")
        for linear in self.linears:
            HEAD_INITS[init](linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) features -> (G, B, C) logits."""
        if self.channels == x.shape[1]:
            x, per_channel = self.norm(x), lambda t: t
        else:
            x, per_channel = self.norm(x.view(len(x), self.channels, -1)), lambda t: t[:, None]
        outs = []
        for g, linear in enumerate(self.linears):
            xg = x * per_channel(self.scale[g]) + per_channel(self.shift[g]) if self.scale is not None else x
            outs.append(linear(xg.flatten(1)))
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
                           "affine": True, "lars_exclude": True})  # BN gamma/beta: 1-d per head
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


class LARS(torch.optim.Optimizer):
    """MAE's LARS (facebookresearch/mae util/lars.py, from MoCo v3): every matrix parameter's update
    (gradient + weight decay) is scaled by trust_coefficient * ||p|| / ||update||, whatever the weight decay;
    parameters <= 1-d (and groups marked `lars_exclude`, e.g. per-head BN affine rows) get neither decay nor
    adaptation. Heavy-ball momentum without dampening, then p -= lr * mu.

    timm's `Lars` is not this: with weight decay 0 and always_adapt=False it applies no trust ratio at all, and
    its ratio divides by ||g|| + wd ||p|| + eps instead of ||g + wd p||.
    """

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1 and not g["lars_exclude"]:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, g["trust_coefficient"] * param_norm / update_norm,
                                                one), one)
                    dp = dp.mul(q)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def make_optimizer(cfg: dict, groups: list[dict]) -> torch.optim.Optimizer:
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=1.0, momentum=cfg["momentum"], nesterov=cfg["nesterov"])
    if cfg["optimizer"] == "lars":
        return LARS(groups, lr=1.0, momentum=cfg["momentum"])
    raise ValueError(f"unknown optimizer {cfg['optimizer']!r} in recipe")


def fit_heads(heads: LinearHeads, epoch_batches: Callable[[int], Iterable], steps_per_epoch: int, cfg: dict,
              lrs: list[float], device: torch.device, desc: str = "train heads") -> list[float]:
    """Train all heads for cfg['epochs'] epochs; `epoch_batches(e)` yields (features, labels). Returns losses."""
    heads.to(device).train()
    groups = heads.param_groups(lrs, cfg["weight_decay"])
    optimizer = make_optimizer(cfg, groups)
    lr_per_head = torch.tensor(lrs, device=device).view(-1, 1)
    losses, step = [], 0
    bar = progress(range(cfg["epochs"]), desc=desc, leave=False, disable=dist_info()[0] > 0, unit="epoch")
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


def head_for(backbone: Backbone, num_classes: int, num_heads: int, cfg: dict) -> LinearHeads:
    """The recipe's head: VISSL eval_mlp (BatchNorm2d affine eps 1e-5 over channels + Linear) on ResNet features,
    MAE's BatchNorm1d(affine=False, eps 1e-6) + Linear on ViT / ConvViT tokens."""
    init = cfg.get("head_init", "default")
    if backbone.family == "resnet":
        pool = feature_pool(backbone, cfg)
        positions = res5_grid(cfg["crop_size"], pool) if pool is not None else 1
        return LinearHeads(backbone.dim * positions, num_classes, num_heads, affine=True, eps=1e-5, init=init,
                           channels=backbone.dim)
    return LinearHeads(backbone.dim, num_classes, num_heads, affine=False, eps=1e-6, init=init)


def run_protocol(backbone, train: ClassificationSplit, val: ClassificationSplit, cfg: dict, seed: int, device,
                 workers: int) -> dict:
    """The reference recipe: fresh augmented crops every epoch through the frozen trunk, one head.

    Each global batch is split across ranks for the trunk; the gathered features train the head identically on
    every rank, so N processes give the 1-process result for the same global batch.
    """
    torch.manual_seed(seed)
    rank, world = dist_info()
    backbone.eval().to(device)
    heads = head_for(backbone, val.num_classes, 1, cfg)
    pool = feature_pool(backbone, cfg)
    lr = scaled_lr(cfg)
    train_tf, test_tf = recipe_transforms(cfg)
    images = ImageList(train.samples, train_tf, seed=seed)
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
            yield (gather_rows(trunk_features(backbone, x, device, pool), local, len(batch)),
                   gather_rows(torch.as_tensor(y), local, len(batch)))

    t0 = time.perf_counter()
    losses = fit_heads(heads, epoch_batches, steps, cfg, [lr], device, desc="protocol epochs")
    t_train = time.perf_counter() - t0
    val_feats, val_labels = extract_features(backbone, val.samples, test_tf, device, cfg["batch_size"], workers,
                                             "val features", pool=pool)
    top1, top5, _ = evaluate_heads(heads, val_feats, val_labels, device)
    return {"metrics": {"top1": top1[0], "top5": top5[0]},
            "extra": {"lr": lr, "final_loss": losses[-1], "steps": len(losses), "world_size": world,
                      "curve": loss_curve(losses)},
            "timings": {"train_s": t_train, "eval_s": time.perf_counter() - t0 - t_train}}


def run_cached(backbone, train: ClassificationSplit, val: ClassificationSplit, cfg: dict, cached: dict, seed: int,
               device, workers: int, cache_dir: Path, feature_seed: int | None = None) -> dict:
    """Cached features + a grid of heads over LRs, the LR chosen on a held-out split of train.

    The augmented passes and the held-out split are drawn from `feature_seed`: by default the trial's seed
    (`cached.per_trial_passes`, default true), so the spread of trials includes augmentation and split variance
    as protocol trials do; with per_trial_passes false every trial reuses seed 0's passes from the cache."""
    if feature_seed is None:
        feature_seed = seed if cached.get("per_trial_passes", True) else 0
    t0 = time.perf_counter()
    fit_idx, hold_idx = holdout_split(len(train.samples), cached["holdout_fraction"], feature_seed)
    fit = ClassificationSplit(train.name, "train", [train.samples[i] for i in fit_idx], train.num_classes,
                              train.class_names)
    hold = ClassificationSplit(train.name, "train", [train.samples[i] for i in hold_idx], train.num_classes,
                               train.class_names)
    train_tf, test_tf = recipe_transforms(cfg)
    common = dict(cache_dir=cache_dir, device=device, batch_size=max(cfg["batch_size"], 64), workers=workers,
                  pool=feature_pool(backbone, cfg))
    hits = []
    passes = []
    for k in range(cached["augmented_passes"]):
        f, y, hit = cached_features(backbone, fit, train_tf, feature_seed * 1000 + k,
                                    desc=f"train features (pass {k + 1})", **common)
        passes.append((f, y))
        hits.append(hit)
    hold_f, hold_y, hit_h = cached_features(backbone, hold, test_tf, None, desc="held-out features", **common)
    val_f, val_y, hit_v = cached_features(backbone, val, test_tf, None, desc="val features", **common)
    t_feat = time.perf_counter() - t0

    base = scaled_lr(cfg)
    lrs = [base * m for m in cached["lr_multipliers"]]
    torch.manual_seed(seed)
    heads = head_for(backbone, val.num_classes, len(lrs), cfg)
    steps = math.ceil(len(fit.samples) / cfg["batch_size"])
    batches = lambda e: feature_batches(*passes[e % len(passes)], cfg["batch_size"], seed * 100003 + e)  # noqa: E731
    losses = fit_heads(heads, batches, steps, cfg, lrs, device, desc=f"{len(lrs)} heads")
    t_train = time.perf_counter() - t0 - t_feat

    hold_top1, _, hold_loss = evaluate_heads(heads, hold_f, hold_y, device)
    best = best_head(hold_top1, hold_loss)
    top1, top5, _ = evaluate_heads(heads, val_f, val_y, device)
    metrics = {"top1": top1[best], "top5": top5[best]}
    refit = None
    if cached.get("refit"):
        refit = refit_head(backbone, train, hold, passes, cfg, cached, lrs[best], seed, feature_seed, device, common)
        top1_r, top5_r, _ = evaluate_heads(refit["head"], val_f, val_y, device)
        metrics = {"top1": top1_r[0], "top5": top5_r[0]}
        refit = {"lr": lrs[best], "train_size": len(train.samples), "steps": refit["steps"],
                 "grid_head_top1": top1[best],
                 "features_s": refit["features_s"], "train_s": refit["train_s"]}
    return {"metrics": metrics,
            "extra": {"lr_selection": {"chosen_lr": lrs[best], "recipe_lr": base, "split": "held-out train",
                                       "holdout_size": len(hold.samples), "fit_size": len(fit.samples),
                                       "heldout_top1_by_lr": dict(zip(map(str, lrs), hold_top1)),
                                       "heldout_loss_by_lr": dict(zip(map(str, lrs), hold_loss)),
                                       # diagnostics only (never used to choose): every grid head's val top-1
                                       "val_top1_by_lr": dict(zip(map(str, lrs), top1)),
                                       "refit": refit},
                      "feature_cache": {"dir": str(cache_dir), "hits": sum(hits) + hit_h + hit_v,
                                        "lookups": len(hits) + 2},
                      "feature_passes": {"count": len(passes), "seed": feature_seed,
                                         "per_trial": feature_seed == seed and cached.get("per_trial_passes", True),
                                         "why": "passes and held-out split drawn per trial: trial spread includes "
                                                "augmentation variance" if cached.get("per_trial_passes", True)
                                         else "one set of passes for every trial (cache reuse); trial spread "
                                              "leaves out augmentation and split variance"},
                      "final_loss": losses[-1], "steps": len(losses), "curve": loss_curve(losses)},
            "timings": {"features_s": t_feat, "train_s": t_train,
                        "eval_s": time.perf_counter() - t0 - t_feat - t_train}}


def refit_head(backbone, train, hold, passes, cfg, cached, lr, seed, feature_seed, device, common) -> dict:
    """`cached.refit`: after the LR choice, one head at the chosen LR on all of train, as the protocol trains:
    the fit split's cached passes plus the same number of augmented passes of the held-out split."""
    t0 = time.perf_counter()
    full = []
    for k, (f, y) in enumerate(passes):
        hf, hy, _ = cached_features(backbone, hold, recipe_transforms(cfg)[0], feature_seed * 1000 + k,
                                    desc=f"held-out train features (pass {k + 1})", **common)
        full.append((torch.cat([f, hf]), torch.cat([y, hy])))
    t_feat = time.perf_counter() - t0
    torch.manual_seed(seed)
    head = head_for(backbone, train.num_classes, 1, cfg)
    steps = math.ceil(len(train.samples) / cfg["batch_size"])
    batches = lambda e: feature_batches(*full[e % len(full)], cfg["batch_size"], seed * 100003 + e)  # noqa: E731
    losses = fit_heads(head, batches, steps, cfg, [lr], device, desc="refit head")
    return {"head": head, "steps": len(losses), "features_s": t_feat, "train_s": time.perf_counter() - t0 - t_feat}
