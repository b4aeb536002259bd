"""The training loop every pretraining method shares (MAE / MoCo v3 `main_pretrain` style).

Config: `pretrain/configs/<name>.yaml` merged over the common DEFAULTS and the method's DEFAULTS, then
`key=value` overrides (values parsed as YAML). Data: `--data DIR` (ImageFolder or ImageNet layout, labels
unused) or, by default, the train images of the miniature inat18 + places205 sets, generated on demand.
Optimiser: LARS (timm; biases and norm weights without weight decay and without LARS adaptation), LR scaled
linearly from `lr_batch` to the global batch, linear warm-up then cosine, stepped per iteration. Checkpoints
(`checkpoint.pth`: model, optimizer, scheduler, scaler, step, per-rank RNG states) every `ckpt_every` steps and
at the end; `resume: true` continues bit-for-bit (augmentations are seeded per sample and epoch, the sampler per
epoch). DDP under torchrun with per-rank seeds, SyncBatchNorm (an all-reduce BatchNorm on CPU/gloo), rank-0
logging and checkpointing; bf16 autocast on CUDA, channels_last everywhere. At the end the method's trunk is exported
as a backbone artifact (`backbone.safetensors`) whose metadata records method, config and preprocessing.

A method module (pretrain/<method>.py) provides:
    DEFAULTS: dict                 its knobs (config keys) and their defaults
    DEFAULT_CONFIG: str            config used when none is given
    build_model(cfg) -> nn.Module  forward(views: list of uint8 (B, 3, S, S) tensors) -> (loss, logs dict);
                                   `.backbone` is the exported trunk; optional `.after_step(progress)` (e.g. EMA)
    preprocessing(cfg) -> Preprocessing   what the backbone needs at test time
and optionally `num_views(cfg)` (default 2), `param_groups(model, cfg)`, `train_step(...)` (same signature as
`train_step` here, for methods with more than one optimiser).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import random
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2 as T

from leaderboard.records import replaced_atomically
from leaderboard.runs import save_pictures

CONFIG_DIR = Path(__file__).parent / "configs"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

DEFAULTS: dict[str, Any] = {
    "method": None, "seed": 0,
    "data": None,                 # null: miniature inat18 + places205 train images (generated on demand)
    "arch": "resnet50", "width": 64,
    "img_size": 224,
    "epochs": 100, "batch_size": 4096,  # global batch
    "lr": 4.8, "lr_batch": 4096,  # lr at lr_batch; scaled linearly to batch_size
    "optimizer": "lars",          # lars | adamw
    "weight_decay": 1e-6, "momentum": 0.9, "lars_eta": 0.001, "betas": [0.9, 0.999],
    "clip_grad": None,            # max gradient norm (null: no clipping)
    "warmup_epochs": 10, "min_lr": 0.0,
    # standard augmentations, per view
    "crop_scale": [0.08, 1.0], "color_jitter": [0.4, 0.4, 0.2, 0.1], "jitter_p": 0.8, "gray_p": 0.2,
    "blur_p": 0.5, "blur_sigma": [0.1, 2.0], "solarize_p": 0.0,
    # runtime
    "workers": 4, "precision": "bf16",  # bf16 | fp16 | fp32 (autocast is used on CUDA only)
    "channels_last": True, "ckpt_every": 500, "log_every": 1,
    "output_dir": None,           # null: runs/pretrain/<config name>
    "max_steps": None,            # stop early (schedule unchanged), e.g. to test resuming
    # evaluation during training (VISSL benchmark-suite style): every `eval_every` steps the trunk is exported to
    # OUT/backbone-step<N>.safetensors and `bench sweep` cells for `eval_benchmarks` are scheduled, not awaited
    "eval_every": None, "eval_benchmarks": [], "eval_data_root": None, "eval_out": None, "eval_budget": None,
    "eval_launcher": "local",     # local (a detached `bench sweep` process) | slurm (a submitit job array)
    "resume": False,
    "force": False,               # start over in an output_dir that already holds a checkpoint (it is replaced)
}

# keys that may change between a run and its resumption (runtime, not the recipe)
RESUMABLE_KEYS = {"resume", "force", "max_steps", "workers", "log_every", "ckpt_every", "output_dir", "eval_every",
                  "eval_benchmarks", "eval_data_root", "eval_out", "eval_budget", "eval_launcher", "config_name"}


# ----------------------------------------------------------------------------------------------- config
def load_config(method: str, config: str | None = None, overrides: list[str] = ()) -> dict:
    """Common DEFAULTS < method DEFAULTS < config file < `key=value` overrides. Unknown keys are refused."""
    module = method_module(method)
    defaults = {**DEFAULTS, **module.DEFAULTS}
    name = config or module.DEFAULT_CONFIG
    path = Path(name) if Path(name).suffix in (".yaml", ".yml") else CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(p.stem for p in sorted(CONFIG_DIR.glob(f"{method}*.yaml")))
        raise SystemExit(f"config {path} not found; configs for {method}: {known}")
    cfg = dict(defaults)
    file_cfg = {k: _number_or_value(v) for k, v in (yaml.safe_load(path.read_text()) or {}).items()}
    for source, items in ((str(path), file_cfg.items()), ("override", (_parse_override(o) for o in overrides))):
        for key, value in items:
            if key not in defaults:
                raise SystemExit(f"{source}: unknown key {key!r}; keys: {', '.join(sorted(defaults))}")
            cfg[key] = value
    if cfg["method"] not in (None, method):
        raise SystemExit(f"{path} is a {cfg['method']} config, not {method}")
    check_values(cfg, path)
    cfg["method"], cfg["config_name"] = method, path.stem
    cfg["output_dir"] = cfg["output_dir"] or str(Path("runs") / "pretrain" / path.stem)
    return cfg


POSITIVE_KEYS = ("epochs", "batch_size", "lr_batch", "img_size", "ckpt_every", "log_every", "width")


def check_values(cfg: dict, path: Path) -> None:
    """Counts and sizes are positive numbers, the LR a non-negative one (e.g. `epochs=0`, `lr=-1` refused)."""
    for key in POSITIVE_KEYS:
        if key in cfg and not (isinstance(cfg[key], int) and not isinstance(cfg[key], bool) and cfg[key] > 0):
            raise SystemExit(f"{key}={cfg[key]!r} ({path} or override): must be a positive integer")
    if not (isinstance(cfg["lr"], (int, float)) and cfg["lr"] >= 0 and math.isfinite(cfg["lr"])):
        raise SystemExit(f"lr={cfg['lr']!r} ({path} or override): must be a number >= 0")
    if not (isinstance(cfg["workers"], int) and cfg["workers"] >= 0):
        raise SystemExit(f"workers={cfg['workers']!r} ({path} or override): must be an integer >= 0")
    if cfg["max_steps"] is not None and not (isinstance(cfg["max_steps"], int) and cfg["max_steps"] > 0):
        raise SystemExit(f"max_steps={cfg['max_steps']!r}: must be a positive integer or null")


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise SystemExit(f"override {text!r} is not key=value")
    key, value = text.split("=", 1)
    return key.strip(), _number_or_value(yaml.safe_load(value))


def _number_or_value(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string: such strings become floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def method_module(method: str):
    try:
        return importlib.import_module(f"pretrain.{method}")
    except ModuleNotFoundError as e:
        raise SystemExit(f"unknown pretraining method {method!r} ({e})") from None


# ----------------------------------------------------------------------------------------------- data
def image_files(data: str | None) -> tuple[list[Path], str]:
    """Pretraining images and a description of where they came from."""
    if data is None:
        from transfer.datasets import CACHE_ROOT, load_classification
        from transfer.minidata import make_mini

        root = CACHE_ROOT / "mini"
        make_mini(root, seed=0, datasets=("inat18", "places205"))
        files = [p for name in ("inat18", "places205") for p, _ in load_classification(name, root, "train").samples]
        return files, f"mini inat18+places205 train ({root})"
    root = Path(data)
    if (root / "train").is_dir():  # ImageNet layout
        root = root / "train"
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(f"--data {data}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return files, str(root)


def sample_images(cfg: dict, num_images: int) -> torch.Tensor:
    """The first `num_images` pretraining images, resized and centre-cropped to img_size: (N, 3, S, S) in [0, 1]."""
    from transfer.datasets import open_image

    files, _ = image_files(cfg.get("data"))
    size = cfg["img_size"]
    crop = T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size), T.PILToTensor()])
    return torch.stack([crop(open_image(f)) for f in files[:num_images]]).float() / 255


def standard_augmentation(cfg: dict) -> T.Compose:
    """Random resized crop, flip, colour jitter, grayscale, Gaussian blur (kernel ~10% of the side), solarize."""
    size = cfg["img_size"]
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    return T.Compose([
        T.RandomResizedCrop(size, scale=tuple(cfg["crop_scale"]), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(*cfg["color_jitter"])], p=cfg["jitter_p"]),
        T.RandomGrayscale(p=cfg["gray_p"]),
        T.RandomApply([T.GaussianBlur(kernel, sigma=tuple(cfg["blur_sigma"]))], p=cfg["blur_p"]),
        T.RandomSolarize(128, p=cfg["solarize_p"]),
        T.PILToTensor(),
    ])


class MultiViewDataset(Dataset):
    """Image i of epoch e -> `num_views` independently augmented uint8 views (or one view repeated, `shared`).

    The transform draws from a generator seeded by (seed, epoch, i): views do not depend on workers, batch order
    or rank, so a resumed run sees exactly the images the uninterrupted run would have seen.
    """

    def __init__(self, files: list[Path], transform, num_views: int, seed: int, shared: bool = False,
                 joint: bool = False):
        self.files, self.transform, self.num_views, self.seed, self.shared = files, transform, num_views, seed, shared
        self.joint = joint  # the transform returns every view itself (a list of tensors)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from transfer.datasets import open_image

        image = open_image(self.files[i])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + self.epoch * 100_003 + i)
            if self.joint:
                return list(self.transform(image))
            if self.shared:
                return [self.transform(image)] * self.num_views
            return [self.transform(image) for _ in range(self.num_views)]


class EpochSampler(Sampler):
    """This rank's share of a per-epoch permutation (seeded by seed + epoch), from batch `start` on."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.epoch, self.start = 0, 0

    def steps_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.size, generator=g)[: self.steps_per_epoch() * self.batch_size * self.world]
        batches = order.view(-1, self.world, self.batch_size)[self.start:, self.rank]
        return iter(batches.reshape(-1).tolist())

    def __len__(self) -> int:
        return (self.steps_per_epoch() - self.start) * self.batch_size


# ----------------------------------------------------------------------------------------------- distributed
def setup_distributed() -> tuple[torch.device, int, int]:
    """(device, rank, world size); joins the torchrun process group (nccl on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return device, rank, world


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GatherLayer(torch.autograd.Function):
    """all_gather with gradients (backward: sum the gradient over ranks, keep this rank's slice); any backend."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


class AllReduceSum(torch.autograd.Function):
    """all_reduce(sum) with gradients (the gradient of a sum over ranks is the sum of the gradients)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` over ranks (rank order), differentiably; `x` itself in a single process."""
    return GatherLayer.apply(x) if is_distributed() else x


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent for one pair of views: 2N anchors per rank, cosine similarity / T, self excluded, the
    other view of the same image positive, every other embedding of the global batch (both views, all ranks) a
    negative; mean over anchors, in fp32."""
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = nn.functional.normalize(z1.float(), dim=1), nn.functional.normalize(z2.float(), dim=1)
        n = z1.shape[0]
        keys = torch.cat([gather(z1), gather(z2)])
        total = keys.shape[0] // 2
        idx = torch.arange(n, device=z1.device) + n * (dist.get_rank() if is_distributed() else 0)
        logits = torch.cat([z1, z2]) @ keys.T / temperature
        logits[torch.arange(2 * n, device=z1.device), torch.cat([idx, idx + total])] = float("-inf")
        return nn.functional.cross_entropy(logits, torch.cat([idx + total, idx]))


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z) per sample, averaged (z is the target branch's output: no gradient)."""
    return (2 - 2 * nn.functional.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for CPU/gloo (torch's needs GPUs): batch statistics summed over ranks with autograd."""

    def _check_input_dim(self, x: torch.Tensor) -> None:  # (N, C, ...) of any rank, as SyncBatchNorm
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        c, shape = x.shape[1], [1, x.shape[1]] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / c], device=x.device, dtype=x.dtype)
        stats = AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        centred = x - mean.view(shape)  # two passes, as BatchNorm: E[x^2] - mean^2 cancels when |mean| >> std
        var = AllReduceSum.apply((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm -> SyncBatchNorm (CUDA) or AllReduceBatchNorm (CPU); same parameters and buffers.

    Only plain BatchNorm layers are swapped: a module that wraps one (e.g. SiameseIM's TokenBatchNorm, which
    transposes tokens around its `bn` child) keeps its own forward. A BatchNorm subclass with its own forward
    would lose it in the swap and is refused with an error naming it."""
    _refuse_custom_batchnorm(model)
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _all_reduce_batchnorm(model)


def _refuse_custom_batchnorm(model: nn.Module) -> None:
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, AllReduceBatchNorm)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and type(module) not in plain \
                and type(module).forward is not nn.modules.batchnorm._BatchNorm.forward:
            raise TypeError(f"{name} ({type(module).__name__}) overrides BatchNorm.forward; converting it for "
                            "several processes would drop that forward. Wrap a plain nn.BatchNorm child instead "
                            "(as pretrain/siameseim.py TokenBatchNorm does).")


def _all_reduce_batchnorm(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, AllReduceBatchNorm):
            new = AllReduceBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats)
            new.weight, new.bias = child.weight, child.bias  # the same Parameters (requires_grad kept)
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            setattr(model, name, new)
        else:
            _all_reduce_batchnorm(child)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------- optimisation
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights: decay + LARS adaptation; biases and norm parameters (1-d): neither (timm Lars adapts only
    groups with weight decay)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """LR factor at step k: linear warm-up k / `warmup` (0 at the first step), then cosine down to `floor`; the
    per-iteration schedule of MAE / ConvMAE / SiameseIM (util/lr_sched.py) and SimCLR / BYOL."""

    def __init__(self, warmup: int, total: int, floor: float = 0.0):
        self.warmup, self.total, self.floor = warmup, total, floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def build_optimizer(model: nn.Module, cfg: dict, steps_per_epoch: int, module=None):
    """(LARS optimizer, per-step LambdaLR warm-up + cosine) with the LR scaled to the global batch."""
    from timm.optim import Lars

    lr = cfg["lr"] * cfg["batch_size"] / cfg["lr_batch"]
    groups = (module.param_groups(model, cfg) if module is not None and hasattr(module, "param_groups")
              else param_groups(model, cfg["weight_decay"]))
    if cfg["optimizer"] == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg["betas"]))
    elif cfg["optimizer"] == "lars":
        opt = Lars(groups, lr=lr, momentum=cfg["momentum"], trust_coeff=cfg["lars_eta"])
    else:
        raise SystemExit(f"optimizer {cfg['optimizer']!r}: lars or adamw")
    total = cfg["epochs"] * steps_per_epoch
    factor = WarmupCosine(round(cfg["warmup_epochs"] * steps_per_epoch), total, cfg["min_lr"] / lr if lr else 0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ----------------------------------------------------------------------------------------------- step
def autocast_for(device: torch.device, precision: str):
    if device.type != "cuda" or precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast("cuda", dtype=dtype)


def train_step(model: nn.Module, views: list[torch.Tensor], optimizer, scheduler, scaler=None,
               autocast=nullcontext, progress: float = 0.0, clip_grad: float | None = None) -> dict[str, float]:
    """Forward (the model computes its loss), backward, optional gradient-norm clipping, optimizer and scheduler
    step, `after_step` hook."""
    with autocast():
        loss, logs = model(views)
    optimizer.zero_grad(set_to_none=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        optimizer.step()
    scheduler.step()
    hook = getattr(unwrap(model), "after_step", None)
    if hook is not None:
        hook(progress)
    return {"loss": loss.detach(), **logs}


# ----------------------------------------------------------------------------------------------- checkpoints
def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states, as tensors and plain values (torch.load-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: Path, model, optimizer, scheduler, scaler, step: int, cfg: dict, rank: int) -> None:
    """Rank 0 writes model/optimizer/scheduler/scaler/step and every rank's RNG state (atomically)."""
    states = [None] * dist.get_world_size() if is_distributed() else None
    if states is not None:
        dist.all_gather_object(states, rng_state())
    if rank != 0:
        return
    model_state = unwrap(model).state_dict()
    check_finite_state(model_state, path, step)
    ckpt = {"model": model_state, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "step": step, "config": cfg, "rng": states or [rng_state()]}
    with replaced_atomically(path) as tmp:
        torch.save(ckpt, tmp)


def check_finite_state(state: dict, path: Path, step: int) -> None:
    """Refuse to replace the last good checkpoint with weights or BN statistics holding NaN/inf."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SystemExit(f"non-finite model state at step {step} ({len(bad)} tensors, e.g. {bad[0]}); not saved, "
                         f"{path} keeps the last good checkpoint. Resume with --resume and a lower lr, "
                         "precision=fp32 or clip_grad=1.0.")


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler, rank: int) -> int:
    """Restore everything `save_checkpoint` wrote; returns the step to continue from."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["model"], ckpt["step"]
    except Exception as e:  # truncated or foreign file: torch raises RuntimeError, pickle errors, EOFError ...
        raise SystemExit(f"{path}: unreadable or truncated checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                         "restore it from a copy, or start over with --force (the checkpoint is replaced)") from None
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    states = ckpt["rng"]
    set_rng_state(states[rank] if rank < len(states) else states[0])
    return ckpt["step"]


# ----------------------------------------------------------------------------------------------- export
def export_backbone(model: nn.Module, cfg: dict, module, path: Path, steps: int, data: str) -> Path:
    """The method's trunk as a bench artifact: weights, preprocessing, provenance (method, config, data)."""
    from transfer.artifact import BackboneArtifact, code_version, save_artifact, trunk_state_dict

    if hasattr(module, "arch_kwargs"):  # ViT / ConvViT geometry
        arch_kwargs = module.arch_kwargs(cfg)
    else:
        arch_kwargs = {"width": cfg["width"]} if cfg.get("width", 64) != 64 else {}
    provenance = {"method": cfg["method"], "framework": cfg.get("framework"), "epochs": cfg["epochs"],
                  "steps": steps, "data": data, "config": {k: v for k, v in cfg.items() if k not in ("resume", "force")},
                  "code_version": code_version()}
    artifact = BackboneArtifact(cfg["arch"], trunk_state_dict(unwrap(model).backbone), module.preprocessing(cfg),
                                provenance, arch_kwargs)
    return save_artifact(path, artifact)


def schedule_evaluation(model: nn.Module, cfg: dict, module, out: Path, step: int, data: str):
    """Export this step's trunk and schedule its benchmark cells (evaluate_checkpoint)."""
    if not cfg["eval_benchmarks"] or not cfg["eval_data_root"]:
        raise SystemExit("eval_every needs eval_benchmarks=[...] and eval_data_root=DIR")
    artifact = export_backbone(model, cfg, module, out / f"backbone-step{step}.safetensors", step, data)
    return evaluate_checkpoint(str(artifact), cfg["eval_benchmarks"], cfg["eval_data_root"],
                               cfg["eval_out"] or str(out / "evals"), launcher=cfg["eval_launcher"],
                               budget=cfg["eval_budget"])


def evaluate_checkpoint(artifact: str, benchmarks: list[str], data_root: str, out: str, trials: int = 1,
                        launcher: str = "local", run_args: list[str] | None = None, budget: str | None = None):
    """Schedule the benchmark cells of one pretraining checkpoint (VISSL's benchmark-suite scheduler) through the
    `bench sweep` command line, so pretraining imports nothing from benchmarks/: a detached local sweep that
    training does not wait for (returns its Popen), or `bench sweep --launcher slurm`, which submits the SLURM
    array and returns (its CompletedProcess; a failed submission raises)."""
    artifact, out = str(Path(artifact).resolve()), str(Path(out).resolve())
    cmd = [sys.executable, "-m", "benchmarks.cli", "sweep", "--backbones", artifact, "--benchmarks", *benchmarks,
           "--trials", str(trials), "--data-root", str(Path(data_root).resolve()), "--out", out]
    cmd += ["--budget", budget] if budget else []
    cmd += ["--launcher", "slurm"] if launcher == "slurm" else []
    cmd += ["--", *run_args] if run_args else []
    log = Path(out) / "logs" / f"sweep__{Path(artifact).name.split('.')[0]}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        if launcher == "slurm":
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

# ----------------------------------------------------------------------------------------------- loop
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_run_dir(cfg: dict, out: Path) -> None:
    """Before anything is written: refuse to overwrite a run's checkpoint without `--resume` / `--force`,
    `--resume` without a checkpoint, and resuming with a recipe that differs from the checkpoint's."""
    ckpt = out / "checkpoint.pth"
    if cfg["resume"] and cfg.get("force"):
        raise SystemExit("--resume and --force contradict each other: --resume continues the run in "
                         f"{out}, --force starts it over")
    if cfg["resume"] and not ckpt.is_file():
        raise SystemExit(f"--resume: no checkpoint {ckpt}; check --output-dir (or the config's name), or drop "
                         "--resume to start a new run")
    logged = (out / "log.jsonl").is_file() and (out / "log.jsonl").stat().st_size > 0
    if not cfg["resume"] and not cfg.get("force") and (ckpt.is_file() or logged):
        raise SystemExit(f"{out} already holds a run ({ckpt.name if ckpt.is_file() else 'log.jsonl'}); continue it "
                         "with --resume, start over with --force (its checkpoint and log are replaced), or choose "
                         "another --output-dir")
    if cfg.get("force") and not cfg["resume"]:
        (out / "log.jsonl").unlink(missing_ok=True)  # a fresh run: do not mix its log with the old one
    if cfg["resume"] and (out / "config.yaml").is_file():
        try:
            before = yaml.safe_load((out / "config.yaml").read_text()) or {}
        except yaml.YAMLError as e:
            raise SystemExit(f"{out / 'config.yaml'}: unreadable ({e}); restore it or start over with --force") \
                from None
        changed = sorted(k for k in set(before) | set(cfg) if k not in RESUMABLE_KEYS
                         and _number_or_value(before.get(k)) != cfg.get(k))
        if changed:
            diff = ", ".join(f"{k}: {before.get(k)!r} -> {cfg.get(k)!r}" for k in changed)
            raise SystemExit(f"--resume with a changed config ({diff}); resume with the run's own config "
                             f"({out / 'config.yaml'}), or start a new run in another --output-dir")


def train(cfg: dict, log=print) -> Path:
    """Pretrain `cfg['method']` as configured; returns the exported artifact's path."""
    from transfer.progress import progress

    module = method_module(cfg["method"])
    device, rank, world = setup_distributed()
    if cfg["batch_size"] % world:
        raise SystemExit(f"batch_size {cfg['batch_size']} is not divisible by {world} processes")
    out = Path(cfg["output_dir"])
    check_run_dir(cfg, out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not (cfg["resume"] and (out / "config.yaml").is_file()):  # a resumed run keeps its own config.yaml
            (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    else:
        log = lambda *a, **k: None  # noqa: E731
    seed_everything(cfg["seed"] + rank)  # per-rank masks/noise; the data is seeded per sample

    files, data_desc = image_files(cfg["data"])
    num_views = module.num_views(cfg) if hasattr(module, "num_views") else 2
    joint = hasattr(module, "view_transform")  # the method builds its own views (e.g. with crop parameters)
    transform = module.view_transform(cfg) if joint else standard_augmentation(cfg)
    dataset = MultiViewDataset(files, transform, num_views, cfg["seed"], cfg.get("share_view", False), joint)
    local_batch = cfg["batch_size"] // world
    sampler = EpochSampler(len(dataset), local_batch, cfg["seed"], rank, world)
    steps_per_epoch = sampler.steps_per_epoch()
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(dataset)} images are fewer than one batch of {cfg['batch_size']}")
    total = cfg["epochs"] * steps_per_epoch
    log(f"{cfg['method']} [{cfg['config_name']}]: {len(dataset)} images from {data_desc}; {world} process(es) on "
        f"{device}; {cfg['epochs']} epochs x {steps_per_epoch} steps, global batch {cfg['batch_size']}")

    model = module.build_model(cfg).to(device)
    cuda = device.type == "cuda"
    if cfg["channels_last"]:  # also on CPU: ~1.6x faster for slim ResNets there
        model = model.to(memory_format=torch.channels_last)
    if world > 1:
        model = sync_batchnorm(model, device)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer, scheduler = build_optimizer(unwrap(model), cfg, steps_per_epoch, module)
    scaler = torch.amp.GradScaler("cuda") if cuda and cfg["precision"] == "fp16" else None
    autocast = autocast_for(device, cfg["precision"])
    step_fn = getattr(module, "train_step", train_step)

    ckpt_path = out / "checkpoint.pth"
    step = last_saved = 0
    if cfg["resume"]:
        step = last_saved = load_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, rank)
        log(f"resumed from {ckpt_path} at step {step}")
    stop = min(total, cfg["max_steps"] or total)
    bar = progress(total=stop, initial=step, disable=rank != 0, desc=cfg["method"], unit="step")
    log_file = open(out / "log.jsonl", "a") if rank == 0 else None
    model.train()
    evaluations = []  # scheduled checkpoint evaluations (Popen or submitit jobs); training never waits for them
    last = time.perf_counter()
    while step < stop:
        epoch, offset = divmod(step, steps_per_epoch)
        dataset.epoch, sampler.epoch, sampler.start = epoch, epoch, offset
        loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=cfg["workers"],
                            pin_memory=cuda, drop_last=True, generator=torch.Generator(),
                            persistent_workers=False)
        for views in loader:
            views = [v.to(device, non_blocking=True) for v in views]
            if cfg["channels_last"]:
                views = [v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for v in views]
            lr = optimizer.param_groups[0]["lr"]
            extra = {"clip_grad": cfg["clip_grad"]} if cfg["clip_grad"] else {}
            logs = step_fn(model, views, optimizer, scheduler, scaler, autocast, progress=(step + 1) / total, **extra)
            loss = logs["loss"].detach().clone()
            if world > 1:
                dist.all_reduce(loss)
                loss /= world
            if not torch.isfinite(loss):
                kept = f"the last good checkpoint {ckpt_path} (step {last_saved}) is kept" if last_saved else \
                    "no checkpoint was written yet"
                raise SystemExit(f"{cfg['method']}: non-finite loss ({loss.item()}) at step {step + 1}; {kept}. "
                                 "Resume with --resume and a lower lr, precision=fp32 or clip_grad=1.0.")
            step += 1
            now = time.perf_counter()
            speed, last = cfg["batch_size"] / (now - last), now  # images/s, data loading included
            if rank == 0:
                record = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": lr,
                          **{k: float(v) for k, v in logs.items() if k != "loss"}}
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                if step % cfg["log_every"] == 0 or step == stop:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.3g}", img_s=f"{speed:.0f}")
            bar.update(1)
            if step % cfg["ckpt_every"] == 0 or step == stop:
                save_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, step, cfg, rank)
                last_saved = step
            if cfg["eval_every"] and step % cfg["eval_every"] == 0 and rank == 0:
                evaluations.append(schedule_evaluation(model, cfg, module, out, step, data_desc))
            if step >= stop:
                break
    bar.close()
    if log_file:
        log_file.close()
    artifact = out / "backbone.safetensors"
    if rank == 0:
        export_backbone(model, cfg, module, artifact, step, data_desc)
        log(f"backbone artifact -> {artifact}")
        if hasattr(module, "pictures"):  # e.g. ADIOS masks, ConvMAE reconstructions, for `bench report`
            save_pictures(out / "pictures", module.pictures(unwrap(model), cfg))
        if evaluations:
            log(f"{len(evaluations)} checkpoint evaluations scheduled; `bench status --out "
                f"{cfg['eval_out'] or out / 'evals'}` follows them")
    if is_distributed():
        dist.barrier()
    return artifact
