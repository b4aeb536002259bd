"""Backbone artifacts: one portable file per backbone (safetensors + JSON metadata).

An artifact holds the trunk weights in canonical torchvision (ResNet) or timm (ViT) names, the architecture,
the input preprocessing the backbone needs at test time (mean/std on 0-255 pixels, channel order, optional
MSCN high-pass sigma) and provenance (method, epochs, data, code version). Every engine builds its input
pipeline from `Preprocessing`, so an MSCN backbone gets its high-pass filter everywhere.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

ARTIFACT_FORMAT = "bench.backbone/1"
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
VIT_ARCHS = ("vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16", "vit_large_patch16")
CONVVIT_ARCHS = ("convvit_tiny", "convvit_base")  # transfer/convvit.py PRESETS


class ArtifactError(ValueError):
    """A backbone file that cannot be used; the message names the file and the fix."""


@dataclasses.dataclass
class Preprocessing:
    """Input convention of a backbone: pixels 0-255 -> (x - mean) / std, then optional high-pass."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    color: str = "RGB"
    highpass_sigma: float | None = None

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "color": self.color,
                "highpass_sigma": self.highpass_sigma}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(tuple(d.get("mean", IMAGENET_MEAN)), tuple(d.get("std", IMAGENET_STD)),
                   d.get("color", "RGB"), d.get("highpass_sigma"))


@dataclasses.dataclass
class BackboneArtifact:
    arch: str
    state_dict: dict[str, torch.Tensor]
    preprocessing: Preprocessing = dataclasses.field(default_factory=Preprocessing)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    arch_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def family(self) -> str:
        return arch_family(self.arch)

    @property
    def hash(self) -> str:
        return weights_hash(self.state_dict)

    def metadata(self) -> dict:
        return {"format": ARTIFACT_FORMAT, "arch": self.arch, "arch_kwargs": self.arch_kwargs,
                "preprocessing": self.preprocessing.to_dict(), "provenance": self.provenance,
                "weights_hash": self.hash}


# ----------------------------------------------------------------------------------------------- architectures
def arch_family(arch: str) -> str:
    """'resnet', 'vit' or 'convvit' (the transfer protocols each architecture family fits)."""
    if arch.startswith("resnet"):
        return "resnet"
    if arch.startswith("vit_"):
        return "vit"
    if arch.startswith("convvit"):
        return "convvit"
    raise ArtifactError(f"unknown architecture {arch!r}; known: {', '.join(RESNET_ARCHS + VIT_ARCHS + CONVVIT_ARCHS)}")


def build_backbone(arch: str, **arch_kwargs) -> nn.Module:
    """The trunk alone, returning pooled features: torchvision ResNet (fc = Identity), timm ViT (no head) or
    ConvMAE's ConvViT (mean of the normalised stage-3 tokens).

    `width` (ResNet) scales every stage's channels, for slim CPU-scale backbones; `img_size` (ViT, ConvViT) sets
    the position-embedding grid.
    """
    family = arch_family(arch)
    if family == "resnet":
        import torchvision

        kwargs = dict(arch_kwargs)
        width = kwargs.pop("width", 64)
        model = _slim_resnet(arch, width) if width != 64 else getattr(torchvision.models, arch)(weights=None,
                                                                                                 **kwargs)
        model.fc = nn.Identity()
        return model
    if family == "vit":
        import timm

        return timm.create_model(f"{arch}_224", pretrained=False, num_classes=0, **arch_kwargs)
    from transfer.convvit import build_convvit

    try:
        return build_convvit(arch, **arch_kwargs)
    except ValueError as e:
        raise ArtifactError(str(e)) from None


def _slim_resnet(arch: str, width: int) -> nn.Module:
    """A ResNet with every stage `width/64` as wide: same keys and depth as `arch`, fewer channels."""
    import torchvision.models.resnet as R

    block, layers = {"resnet18": (R.BasicBlock, [2, 2, 2, 2]), "resnet34": (R.BasicBlock, [3, 4, 6, 3]),
                     "resnet50": (R.Bottleneck, [3, 4, 6, 3]), "resnet101": (R.Bottleneck, [3, 4, 23, 3]),
                     "resnet152": (R.Bottleneck, [3, 8, 36, 3])}[arch]

    class SlimResNet(R.ResNet):
        def __init__(self):
            nn.Module.__init__(self)
            self._norm_layer = nn.BatchNorm2d
            self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._make_layer(block, width, layers[0])
            self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
            self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
            self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Identity()
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    return SlimResNet()


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled feature vector the trunk returns."""
    if hasattr(model, "num_features"):
        return int(model.num_features)
    return int(model.layer4[-1].conv3.out_channels if hasattr(model.layer4[-1], "conv3")
               else model.layer4[-1].conv2.out_channels)


def trunk_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical trunk weights: parameters and buffers, minus heads and BN step counters."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if not k.startswith(("fc.", "head.")) and not k.endswith("num_batches_tracked")}


def check_trunk_only(artifact: "BackboneArtifact", model_state: dict[str, torch.Tensor] | None = None) -> None:
    """Raise ArtifactError unless every tensor of the artifact is a parameter or buffer of its architecture's trunk,
    with that tensor's shape (heads, projectors and anything else never enter an artifact)."""
    if model_state is None:
        model_state = build_backbone(artifact.arch, **artifact.arch_kwargs).state_dict()
    stray = [f"{k} {tuple(v.shape)}" for k, v in artifact.state_dict.items()
             if k not in model_state or tuple(v.shape) != tuple(model_state[k].shape)]
    if stray:
        raise ArtifactError(f"artifact for {artifact.arch} {artifact.arch_kwargs or ''} holds {len(stray)} tensors "
                            f"that are no trunk parameter or buffer of that architecture: {', '.join(stray[:8])}")


# ----------------------------------------------------------------------------------------------- preprocessing
class InputTransform(nn.Module):
    """Images as floats in [0, 1] (B, 3, H, W, RGB) -> the tensor the backbone expects.

    Normalises with the artifact's mean/std (0-255 scale), flips to BGR if asked, and applies the MSCN
    high-pass filter (image minus its Gaussian blur) after normalisation when `highpass_sigma` is set.
    Runs batched on the model's device.
    """

    def __init__(self, prep: Preprocessing):
        super().__init__()
        self.bgr = prep.color.upper() == "BGR"
        self.register_buffer("mean", torch.tensor(prep.mean).view(1, 3, 1, 1) / 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(prep.std).view(1, 3, 1, 1) / 255.0, persistent=False)
        self.sigma = prep.highpass_sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bgr:
            x = x.flip(1)
        x = (x - self.mean) / self.std
        if self.sigma:
            x = high_pass(x, self.sigma)
        return x


def high_pass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """x minus its Gaussian blur (separable, reflect padding, kernel 2*ceil(3 sigma)+1, batched)."""
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    coords = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    blurred = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    blurred = F.conv2d(blurred, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x - blurred


class Backbone(nn.Module):
    """Preprocessing + trunk: float RGB images in [0, 1] -> pooled features."""

    def __init__(self, artifact: BackboneArtifact, trunk: nn.Module):
        super().__init__()
        self.artifact_meta = artifact.metadata()
        self.arch = artifact.arch
        self.family = artifact.family
        self.transform = InputTransform(artifact.preprocessing)
        self.trunk = trunk
        self.dim = feature_dim(trunk)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.transform(images))


# ----------------------------------------------------------------------------------------------- file I/O
def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """Content hash of the weights (names, dtypes, shapes, bytes): equal weights hash equally in any format."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()[:16]


def code_version() -> str:
    """git revision of this checkout (with '+dirty' when modified), or 'unknown' outside git."""
    from leaderboard.records import git_rev

    return git_rev()


def save_artifact(path: str | os.PathLike, artifact: BackboneArtifact) -> Path:
    """Write the artifact atomically (temp file + rename) as safetensors with JSON metadata; refuses tensors
    that are not part of the trunk (`check_trunk_only`)."""
    from safetensors.torch import save_file

    from leaderboard.records import replaced_atomically

    check_trunk_only(artifact)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in artifact.state_dict.items()}
    with replaced_atomically(path) as tmp:
        save_file(tensors, str(tmp), metadata={"bench": json.dumps(artifact.metadata())})
    return path


def read_artifact(path: str | os.PathLike) -> BackboneArtifact:
    """Read a file written by `save_artifact`; raises ArtifactError naming the file if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise ArtifactError(f"{path}: not a readable safetensors file ({e}); re-export it with "
                            "`bench backbone convert` or the pretraining run") from e
    return artifact_from_tensors(tensors, meta, path)


def artifact_from_tensors(tensors: dict[str, torch.Tensor], meta: dict, path: str | os.PathLike) -> BackboneArtifact:
    """Assemble an artifact from safetensors contents; `path` only names the file in errors."""
    if "bench" not in meta:
        raise ArtifactError(f"{path}: safetensors file without bench metadata; convert it with "
                            "`bench backbone convert FILE -o OUT --arch ARCH`")
    info = _artifact_info(meta["bench"], path)
    if info.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path}: artifact format {info.get('format')!r}, expected {ARTIFACT_FORMAT!r}")
    return BackboneArtifact(arch=info["arch"], state_dict=tensors,
                            preprocessing=Preprocessing.from_dict(info.get("preprocessing", {})),
                            provenance=info.get("provenance", {}), arch_kwargs=info.get("arch_kwargs", {}))


def _artifact_info(text: str, path) -> dict:
    """The artifact's bench metadata, checked: valid JSON naming a known architecture."""
    fix = "re-export it with `bench backbone convert FILE -o OUT --arch ARCH` or the pretraining run"
    try:
        info = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: corrupt bench metadata (bad JSON: {e}); {fix}") from None
    if not isinstance(info, dict) or not isinstance(info.get("arch"), str):
        raise ArtifactError(f"{path}: bench metadata names no architecture ('arch'); {fix}")
    if not isinstance(info.get("arch_kwargs", {}), dict):
        raise ArtifactError(f"{path}: bench metadata 'arch_kwargs' is not a mapping; {fix}")
    try:
        check_arch(info["arch"])
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}; {fix}") from None
    return info


def check_arch(arch: str) -> None:
    """Raise ArtifactError unless `arch` can be built (ResNet depths, timm ViTs, ConvViT presets)."""
    family = arch_family(arch)
    if family == "vit":
        import timm

        if timm.is_model(f"{arch}_224"):
            return
    elif family == "convvit":
        from transfer.convvit import PRESETS

        if arch in PRESETS:
            return
    elif arch in RESNET_ARCHS:
        return
    raise ArtifactError(f"unknown architecture {arch!r}; known: {', '.join(RESNET_ARCHS + VIT_ARCHS + CONVVIT_ARCHS)}")


def random_artifact(arch: str, seed: int = 0, **arch_kwargs) -> BackboneArtifact:
    """The random-init reference backbone (torchvision/timm default initialisation, seeded)."""
    torch.manual_seed(seed)
    model = build_backbone(arch, **arch_kwargs)
    return BackboneArtifact(arch=arch, state_dict=trunk_state_dict(model), arch_kwargs=arch_kwargs,
                            provenance={"method": "random-init", "epochs": 0, "data": None, "seed": seed,
                                        "code_version": code_version()})
