"""One way in for every backbone checkpoint: format detection, key mapping and a load audit.

`load_backbone(path)` reads a file without unpickling arbitrary objects (`weights_only`), detects its layout,
maps its keys to the canonical torchvision/timm trunk names, and reports matched / missing / unexpected keys
per module plus every dropped key with the reason. A load that would leave any trunk parameter uninitialised
is refused with the audit in the error, unless `allow_partial=True` (which the result record then carries).

Layouts are rows of `LAYOUTS`: a name, the prefix that marks trunk keys, and the key families dropped on
purpose (heads, momentum encoders, queues). Adding a layout is adding a row.
"""
from __future__ import annotations

import dataclasses
import pickle
import re
from collections import OrderedDict, defaultdict
from pathlib import Path

import torch

from transfer.artifact import (ArtifactError, Backbone, BackboneArtifact, Preprocessing, artifact_from_tensors,
                               build_backbone)


class CheckpointError(ArtifactError):
    """A checkpoint that cannot be loaded as asked; the message names the file, the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    prefix: str                           # trunk keys start with this (stripped)
    dropped: tuple[tuple[str, str], ...]  # (regex on the full key, reason) for keys removed on purpose
    method: str = "external"              # default method label for leaderboard rows


_HEADS = (
    (r"(^|\.)fc\.", "classifier / projection head (fc)"),
    (r"(^|\.)head\.", "classification head"),
    (r"(^|\.)(projector|projection_head|projection|predictor|prototypes)\.", "SSL projection/prediction head"),
)
LAYOUTS = (
    Layout("moco", "module.encoder_q.",
           ((r"^module\.encoder_k\.", "momentum (key) encoder"), (r"^module\.queue", "MoCo negative queue"))
           + _HEADS, method="moco"),
    Layout("torchvision", "", _HEADS),
)
WRAPPERS = ("state_dict", "model", "module")


@dataclasses.dataclass
class LoadReport:
    """What a load did, per trunk module: matched, missing, unexpected and shape-mismatched keys."""

    path: str
    format: str
    arch: str
    modules: dict[str, dict[str, list[str]]]
    dropped: dict[str, str]

    def count(self, kind: str) -> int:
        return sum(len(m[kind]) for m in self.modules.values())

    @property
    def ok(self) -> bool:
        return self.count("missing") == 0 and self.count("shape_mismatch") == 0

    def table(self) -> str:
        """Per-module audit as a fixed-width table."""
        rows = [f"{'module':<14}{'matched':>8}{'missing':>8}{'unexpected':>11}{'shape!=':>8}"]
        for name, m in self.modules.items():
            rows.append(f"{name:<14}{len(m['matched']):>8}{len(m['missing']):>8}{len(m['unexpected']):>11}"
                        f"{len(m['shape_mismatch']):>8}")
        return "\n".join(rows)

    def summary(self, max_keys: int = 8) -> str:
        lines = [f"{self.path}: format={self.format} arch={self.arch} "
                 f"matched={self.count('matched')} missing={self.count('missing')} "
                 f"unexpected={self.count('unexpected')} shape_mismatch={self.count('shape_mismatch')} "
                 f"dropped={len(self.dropped)}", self.table()]
        for kind in ("missing", "shape_mismatch", "unexpected"):
            keys = [k for m in self.modules.values() for k in m[kind]]
            if keys:
                more = f" ... (+{len(keys) - max_keys})" if len(keys) > max_keys else ""
                lines.append(f"{kind}: {', '.join(keys[:max_keys])}{more}")
        reasons = defaultdict(int)
        for reason in self.dropped.values():
            reasons[reason] += 1
        lines += [f"dropped {n} keys: {reason}" for reason, n in sorted(reasons.items())]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "arch": self.arch,
                "counts": {k: self.count(k) for k in ("matched", "missing", "unexpected", "shape_mismatch")},
                "dropped": len(self.dropped),
                "modules": {n: {k: len(v) for k, v in m.items()} for n, m in self.modules.items()}}


# ----------------------------------------------------------------------------------------------- reading
def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a checkpoint file, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:
            raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: the file contains pickled objects other than tensors and plain containers "
            f"({str(e).splitlines()[0]}). bench never unpickles arbitrary code; re-save the checkpoint's "
            "state_dict with torch.save or convert it to safetensors.") from e
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    meta = {k: v for k, v in obj.items() if isinstance(v, (str, int, float))} if isinstance(obj, dict) else {}
    return _unwrap(obj, path), meta


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """Descend through wrapper dicts ('state_dict', 'model', 'module') to the flat tensor dict."""
    while isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(obj) / 2:
            return tensors
        inner = next((obj[w] for w in WRAPPERS if isinstance(obj.get(w), dict)), None)
        if inner is None:
            break
        obj = inner
    raise CheckpointError(f"{path}: no tensor dictionary found (looked inside {', '.join(WRAPPERS)}); "
                          "pass --state-key NAME to say which entry holds the weights")


# ----------------------------------------------------------------------------------------------- layouts
def detect_layout(keys: list[str]) -> Layout:
    """The layout whose trunk prefix covers the most keys that look like trunk weights."""
    def score(layout: Layout) -> int:
        return sum(k.startswith(layout.prefix) and _looks_like_trunk(k[len(layout.prefix):]) for k in keys)

    best = max(LAYOUTS, key=score)
    if score(best) == 0:
        raise CheckpointError("no known checkpoint layout matches these keys; known layouts: "
                              + ", ".join(f"{lay.name} (prefix {lay.prefix!r})" for lay in LAYOUTS)
                              + f"; first keys: {', '.join(keys[:6])}")
    return best


def _looks_like_trunk(key: str) -> bool:
    return bool(re.match(r"(conv1|bn1|layer[1-4]|patch_embed|blocks|cls_token|pos_embed|norm)\b", key))


def map_keys(state: dict[str, torch.Tensor], layout: Layout) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Trunk tensors under canonical names, and {dropped key: reason} for every other key."""
    trunk, dropped = OrderedDict(), {}
    for key, value in state.items():
        reason = next((why for pattern, why in layout.dropped if re.search(pattern, key)), None)
        if reason:
            dropped[key] = reason
        elif key.startswith(layout.prefix):
            trunk[key[len(layout.prefix):]] = value
        else:
            dropped[key] = f"outside the trunk prefix {layout.prefix!r}"
    return trunk, dropped


def infer_arch(state: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """Architecture and builder kwargs from trunk key names and shapes."""
    if "conv1.weight" in state:
        bottleneck = "layer1.0.conv3.weight" in state
        blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        arch = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
                ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101",
                ((3, 8, 36, 3), True): "resnet152"}.get((blocks, bottleneck))
        if arch is None:
            raise CheckpointError(f"ResNet with blocks per stage {blocks} matches no torchvision ResNet")
        width = state["conv1.weight"].shape[0]
        return arch, ({} if width == 64 else {"width": int(width)})
    if "patch_embed.proj.weight" in state:
        dim, patch = state["patch_embed.proj.weight"].shape[0], state["patch_embed.proj.weight"].shape[-1]
        size = {192: "tiny", 384: "small", 768: "base", 1024: "large"}.get(dim)
        if size is None or patch != 16:
            raise CheckpointError(f"ViT with width {dim} and patch {patch} matches no known timm ViT")
        tokens = state["pos_embed"].shape[1] - 1 if "pos_embed" in state else 196
        grid = int(round(tokens ** 0.5))
        return f"vit_{size}_patch16", ({} if grid == 14 else {"img_size": grid * 16})
    raise CheckpointError("cannot infer the architecture from the keys; pass --arch")


# ----------------------------------------------------------------------------------------------- audit
def audit(model_state: dict[str, torch.Tensor], ckpt_state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per-module matched / missing / unexpected / shape-mismatched keys (BN step counters are optional)."""
    modules = OrderedDict()

    def bucket(key: str) -> dict[str, list[str]]:
        parts = key.split(".")
        name = ".".join(parts[:2]) if parts[0] == "blocks" and len(parts) > 1 else parts[0]
        return modules.setdefault(name, {"matched": [], "missing": [], "unexpected": [], "shape_mismatch": []})

    for key, value in model_state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key not in ckpt_state:
            bucket(key)["missing"].append(key)
        elif tuple(ckpt_state[key].shape) != tuple(value.shape):
            bucket(key)["shape_mismatch"].append(
                f"{key} {tuple(ckpt_state[key].shape)} vs {tuple(value.shape)}")
        else:
            bucket(key)["matched"].append(key)
    for key in ckpt_state:
        if key not in model_state:
            bucket(key)["unexpected"].append(key)
    return modules


def to_artifact(path: str | Path, arch: str | None = None, method: str | None = None,
                allow_partial: bool = False) -> tuple[BackboneArtifact, LoadReport]:
    """Read any supported checkpoint as a BackboneArtifact, audited; refuses partial loads by default."""
    path = Path(path)
    tensors, meta = read_state_dict(path)
    if "bench" in meta:
        art = artifact_from_tensors(tensors, meta, path)
        fmt, trunk, dropped = "bench", art.state_dict, {}
    else:
        layout = detect_layout(list(tensors))
        trunk, dropped = map_keys(tensors, layout)
        arch_kwargs = {}
        if arch is None:
            arch, arch_kwargs = infer_arch(trunk)
        art = BackboneArtifact(arch=arch, state_dict=trunk, preprocessing=Preprocessing(),
                               arch_kwargs=arch_kwargs,
                               provenance={"method": method or layout.method, "source_file": str(path),
                                           "source_format": layout.name,
                                           "source_arch": meta.get("arch")})
        fmt = layout.name
    if arch is not None and arch != art.arch:
        raise CheckpointError(f"{path}: holds a {art.arch} backbone but --arch {arch} was asked for")
    if method:
        art.provenance["method"] = method
    model = build_backbone(art.arch, **art.arch_kwargs)
    report = LoadReport(str(path), fmt, art.arch, audit(model.state_dict(), trunk), dropped)
    if not report.ok and not allow_partial:
        raise CheckpointError(
            f"{path}: refused: the load would leave {report.count('missing')} trunk tensors uninitialised "
            f"and {report.count('shape_mismatch')} with the wrong shape.\n{report.summary()}\n"
            "Fix the checkpoint or its --arch; --allow-partial-load overrides (recorded as non-protocol).")
    return art, report


def load_backbone(path: str | Path, arch: str | None = None, method: str | None = None,
                  allow_partial: bool = False) -> tuple[Backbone, LoadReport]:
    """A ready `Backbone` (preprocessing + trunk with the checkpoint's weights) and its load audit."""
    art, report = to_artifact(path, arch=arch, method=method, allow_partial=allow_partial)
    trunk = build_backbone(art.arch, **art.arch_kwargs)
    usable = {k: v for k, v in art.state_dict.items()
              if k in trunk.state_dict() and v.shape == trunk.state_dict()[k].shape}
    trunk.load_state_dict(usable, strict=False)
    backbone = Backbone(art, trunk)
    backbone.report = report
    return backbone, report
