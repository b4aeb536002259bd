"""Pure-PyTorch stand-ins for the compiled mmcv ops that mmsegmentation imports at module level.

mmseg 1.2.2 imports `point_sample` (mmseg/utils/mask_classification.py, models/utils/point_sample.py,
san_head.py) and `sigmoid_focal_loss` (models/losses/focal_loss.py) from `mmcv.ops` unconditionally. With
mmcv-lite (no compiled `mmcv._ext`; full mmcv does not build against current torch) `import mmcv.ops` fails, so
`import mmseg.models` fails. `install()` puts a small `mmcv.ops` module in its place that provides exactly these
two ops and raises `ModuleNotFoundError` for every other name, the exception mmseg's guarded imports
(CrissCrossAttention, PSAMask, ...) catch, so models needing real compiled ops stay unavailable and say so.

With full mmcv installed (`mmcv._ext` importable) `install()` does nothing.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import types

import torch
import torch.nn.functional as F

FLT_MIN = 1.1754943508222875e-38  # the kernel clamps p and 1-p at FLT_MIN before the log
PROVIDED = ("point_sample", "sigmoid_focal_loss")


def compiled_ops_available() -> bool:
    """True when mmcv's compiled extension (`mmcv._ext`) can be imported."""
    try:
        return importlib.util.find_spec("mmcv._ext") is not None
    except (ImportError, ValueError):  # mmcv itself missing
        return False


def point_sample(input: torch.Tensor, points: torch.Tensor, align_corners: bool = False, **kwargs) -> torch.Tensor:
    """mmcv.ops.point_sample: bilinear samples of `input` (N, C, H, W) at `points` (N, P, 2) or (N, Hg, Wg, 2),
    given as (x, y) in [0, 1] of the image; zero outside. Returns (N, C, P) or (N, C, Hg, Wg)."""
    add_dim = points.dim() == 3
    if add_dim:
        points = points.unsqueeze(2)
    out = F.grid_sample(input, 2.0 * points - 1.0, align_corners=align_corners, **kwargs)
    return out.squeeze(3) if add_dim else out


def sigmoid_focal_loss(input: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25,
                       weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """mmcv.ops.sigmoid_focal_loss (the CUDA kernel's formula, differentiable by autograd).

    `input` (N, C) logits, `target` (N,) class indices in [0, C] (C = background: negative for every class).
    Per element: p = sigmoid(x); positive (t == c): -alpha (1-p)^gamma log p; negative: -(1-alpha) p^gamma
    log(1-p); times weight[t] when `weight` (C,) is given (rows with the background index take weight 1, where
    the kernel would read past the end). Reduction: 'none' (N, C), 'sum', or 'mean' = sum / N.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be none, mean or sum, got {reduction!r}")
    if input.dim() != 2 or target.dim() != 1 or input.size(0) != target.size(0):
        raise ValueError(f"sigmoid_focal_loss expects input (N, C) and target (N,), got {tuple(input.shape)} "
                         f"and {tuple(target.shape)}")
    if target.dtype != torch.long:
        raise TypeError(f"target must be int64 class indices, got {target.dtype}")
    num_classes = input.size(1)
    positive = F.one_hot(target, num_classes + 1)[:, :num_classes].to(input.dtype)
    p = torch.sigmoid(input)
    floor = math.log(FLT_MIN)
    log_p = F.logsigmoid(input).clamp(min=floor)
    log_1mp = F.logsigmoid(-input).clamp(min=floor)
    loss = -positive * alpha * (1 - p).pow(gamma) * log_p - (1 - positive) * (1 - alpha) * p.pow(gamma) * log_1mp
    if weight is not None:
        if weight.dim() != 1 or weight.numel() != num_classes:
            raise ValueError(f"weight must have shape ({num_classes},), got {tuple(weight.shape)}")
        padded = torch.cat([weight.to(input.dtype), weight.new_ones(1, dtype=input.dtype)])
        loss = loss * padded[target].unsqueeze(1)
    if reduction == "mean":
        return loss.sum() / input.size(0)
    if reduction == "sum":
        return loss.sum()
    return loss


class _CompatOps(types.ModuleType):
    """`mmcv.ops` without compiled ops: the pure-PyTorch ops above, ModuleNotFoundError for anything else."""

    __bench_compat__ = True

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ModuleNotFoundError(
            f"mmcv.ops.{name} needs mmcv's compiled extension (mmcv._ext), which is not installed; bench's "
            f"pure-PyTorch stand-in (transfer/mmcv_compat.py) provides only {', '.join(PROVIDED)}",
            name="mmcv._ext")


def is_installed() -> bool:
    """True when `mmcv.ops` is this module's stand-in."""
    return getattr(sys.modules.get("mmcv.ops"), "__bench_compat__", False)


def install() -> bool:
    """Provide `mmcv.ops` (point_sample, sigmoid_focal_loss) when mmcv's compiled ops are missing.

    Returns True when the stand-in is (now) in place, False when full mmcv is used (nothing changed).
    Call before importing mmseg.models.
    """
    if is_installed():
        return True
    if compiled_ops_available():
        return False
    import mmcv

    ops = _CompatOps("mmcv.ops", __doc__.split("\n\n")[0])
    ops.point_sample = point_sample
    ops.sigmoid_focal_loss = sigmoid_focal_loss
    ops.__all__ = list(PROVIDED)
    sys.modules["mmcv.ops"] = ops
    mmcv.ops = ops
    return True
