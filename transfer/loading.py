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
import warnings
import zipfile
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
    rename: object = None                 # optional key -> canonical key (or None to drop) after the prefix
    about: str = ""                       # who writes files in this layout


_HEADS = (
    (r"(^|\.)fc\.", "classifier / projection head (fc)"),
    (r"(^|\.)(head|heads|fc_norm|classifier)\.", "classification / SSL head"),
    (r"(^|\.)(projector|projection_head|projection|predictor|prototypes|neck|bn)\.", "SSL projection/prediction head"),
    (r"(^|\.)(momentum_|target_|mm_)", "momentum / target encoder"),
    (r"(^|\.)(decoder_|mask_token|projector_decoder_blocks|predictor_decoder_blocks|stage\d_output_decode)",
     "masked-image-modelling decoder"),
    (r"(^|\.)(mask_encoder|mask_head)\.", "ADIOS occlusion model"),
)


def _convvit_key(key: str) -> str | None:
    """ConvMAE's encoder keys pass; anything else is not part of a ConvViT trunk."""
    return key if re.match(r"(patch_embed[1-4]|blocks[1-3])\.|pos_embed$|norm\.", key) else None


def _detectron2_to_torchvision(key: str) -> str | None:
    """Reverse of the MoCo/VISSL detectron2 renaming; None for keys outside the ResNet trunk."""
    key = re.sub(r"^(backbone\.(bottom_up\.)?|roi_heads\.)", "", key)
    if key.startswith("stem."):
        key = key[len("stem."):]
        if re.match(r"conv[23]\.", key):
            raise CheckpointError("detectron2 checkpoint with a deep (3-conv) stem: it matches no torchvision "
                                  "ResNet; use a 7x7-stem checkpoint")
        return re.sub(r"^conv1\.norm\.", "bn1.", key)
    m = re.match(r"res([2-5])\.(\d+)\.(.*)$", key)
    if not m:
        return None
    stage, block, rest = int(m.group(1)) - 1, m.group(2), m.group(3)
    rest = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", rest)
    rest = re.sub(r"^shortcut\.norm\.", "downsample.1.", rest)
    rest = re.sub(r"^shortcut\.", "downsample.0.", rest)
    return f"layer{stage}.{block}.{rest}"


LAYOUTS = (
    Layout("moco", "module.encoder_q.",
           ((r"^module\.encoder_k\.", "momentum (key) encoder"), (r"^module\.queue", "MoCo negative queue"))
           + _HEADS, method="moco", about="MoCo v1/v2 main_moco.py checkpoints"),
    Layout("moco-v3", "module.base_encoder.",
           ((r"^module\.momentum_encoder\.", "momentum encoder"), (r"^module\.predictor\.", "MoCo v3 predictor"))
           + _HEADS, method="moco-v3", about="MoCo v3 ResNet and ViT checkpoints"),
    Layout("vissl", "_feature_blocks.", _HEADS, about="VISSL classy_state_dict trunks"),
    Layout("backbone-prefix", "backbone.", _HEADS, about="MMSelfSup/MMPretrain, solo-learn, DINO teacher"),
    Layout("module-backbone-prefix", "module.backbone.", _HEADS,
           about="DINO student, Barlow Twins/VICReg training checkpoints"),
    Layout("lightning-encoder", "encoder.", _HEADS, method="adios", about="ADIOS Lightning checkpoints"),
    Layout("ddp-module", "module.", _HEADS, about="SwAV, DINO, Barlow Twins, VICReg DDP state dicts"),
    Layout("detectron2", "", ((r"^(proposal_generator|roi_heads\.(box|mask)_(predictor|head))\.",
                               "detection heads"),), rename=_detectron2_to_torchvision,
           about="detectron2 .pkl/.pth (MoCo/VISSL converters, trained C4/FPN models)"),
    Layout("convmae", "", _HEADS, method="convmae", rename=_convvit_key,
           about="ConvMAE/ConvViT encoder checkpoints (`model` entry; decoder and fusion convs dropped)"),
    Layout("torchvision", "", _HEADS,
           about="torchvision/timm state dicts; MAE, SiameseIM, DINO/Barlow/VICReg/SimCLR/BYOL releases"),
)
WRAPPERS = ("classy_state_dict", "base_model", "state_dict", "model_state_dict", "model", "trunk", "module",
            "teacher", "student")


@dataclasses.dataclass
class LoadReport:
    """What a load did, per trunk module: matched, missing, unexpected and shape-mismatched keys."""

    path: str
    format: str
    arch: str
    modules: dict[str, dict[str, list[str]]]
    dropped: dict[str, str]
    notes: list[str] = dataclasses.field(default_factory=list)

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
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "arch": self.arch,
                "counts": {k: self.count(k) for k in ("matched", "missing", "unexpected", "shape_mismatch")},
                "dropped": len(self.dropped), "notes": self.notes,
                "modules": {n: {k: len(v) for k, v in m.items()} for n, m in self.modules.items()}}


# ----------------------------------------------------------------------------------------------- reading
_SAFE_GLOBALS = {  # data-only classes found in real checkpoints besides tensors (MAE/DINO args, numpy values)
    ("argparse", "Namespace"), ("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _DisallowedGlobal(pickle.UnpicklingError):
    pass


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickler for plain pickles (detectron2 .pkl) that resolves only data-only globals."""

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS or (module.startswith("numpy") and name.endswith("DType")):
            return super().find_class(module, name)
        raise _DisallowedGlobal(f"global {module}.{name} is not allowed (not a data-only type)")


def _torch_safe_globals() -> list:
    import argparse
    import importlib

    found = [argparse.Namespace]
    for module, name in _SAFE_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    import numpy

    found += [type(numpy.dtype(t)) for t in ("float32", "float64", "int64", "int32", "bool")]
    return found


def _load_object(path: Path):
    """The unpickled object, resolving only data-only globals; raises CheckpointError otherwise.

    Zip files go through torch.load(weights_only=True); other files (detectron2 .pkl plain pickles, legacy
    torch files) are tried with torch's legacy loader, then with a data-only unpickler.
    """
    refused = ("{path}: refused: the file contains pickled objects other than tensors, arrays and plain "
               "containers ({why}). bench never unpickles code; re-save the weights with torch.save(state_dict) "
               "or as safetensors.")
    try:
        with torch.serialization.safe_globals(_torch_safe_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if zipfile.is_zipfile(path):
            if isinstance(e, pickle.UnpicklingError):
                raise CheckpointError(refused.format(path=path, why=_first_line(e))) from e
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                                  f"{_first_line(e)})") from e
        torch_error = e
    try:
        with open(path, "rb") as f:
            return _DataOnlyUnpickler(f, encoding="latin1").load()
    except _DisallowedGlobal as e:
        raise CheckpointError(refused.format(path=path, why=_first_line(e))) from e
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (torch.load: {_first_line(torch_error)}; "
                              f"pickle: {_first_line(e)})") from e


def _first_line(e: Exception) -> str:
    """The informative line of an exception message (torch's weights-only errors name the global)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if "unsupported global" in line.lower() or "is not allowed" in line]
    return (named or lines or [""])[0][:300]


def read_state_dict(path: str | Path, state_key: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a checkpoint file, never executing pickled code.

    Metadata holds the file's scalar entries plus `wrapper` (the path of dict keys descended into).
    `state_key` ("a.b.c") names that path explicitly instead of the automatic descent through WRAPPERS.
    """
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
    obj = _load_object(path)
    meta = {k: v for k, v in obj.items() if isinstance(v, (str, int, float))} if isinstance(obj, dict) else {}
    if state_key:
        for part in state_key.split("."):
            if not isinstance(obj, dict) or part not in obj:
                raise CheckpointError(f"{path}: --state-key {state_key!r}: no entry {part!r}; entries: "
                                      f"{', '.join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__}")
            obj = obj[part]
        wrapper = state_key.split(".")
    else:
        obj, wrapper = _unwrap(obj, path)
    meta["wrapper"] = ".".join(wrapper)
    return {k: _as_tensor(v) for k, v in obj.items() if _is_array(v)}, meta


def _is_array(v) -> bool:
    import numpy

    return isinstance(v, (torch.Tensor, numpy.ndarray))


def _as_tensor(v) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.from_numpy(v.copy())


def _unwrap(obj, path: Path) -> tuple[dict, list[str]]:
    """Descend through wrapper dicts (WRAPPERS, in order of preference) to the flat tensor dict."""
    trail = []
    while isinstance(obj, dict):
        arrays = sum(_is_array(v) for v in obj.values())
        if arrays and arrays >= len(obj) / 2:
            return obj, trail
        name = next((w for w in WRAPPERS if isinstance(obj.get(w), dict)), None)
        if name is None:
            break
        obj, trail = obj[name], trail + [name]
    raise CheckpointError(f"{path}: no tensor dictionary found (looked inside {', '.join(WRAPPERS)}); "
                          "pass --state-key NAME to say which entry holds the weights")


# ----------------------------------------------------------------------------------------------- layouts
def map_keys(state: dict[str, torch.Tensor], layout: Layout) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Trunk tensors under canonical names, and {dropped key: reason} for every other key."""
    trunk, dropped = OrderedDict(), {}
    for key, value in state.items():
        reason = next((why for pattern, why in layout.dropped if re.search(pattern, key)), None)
        if reason:
            dropped[key] = reason
        elif not key.startswith(layout.prefix):
            dropped[key] = f"outside the trunk prefix {layout.prefix!r}"
        else:
            name = key[len(layout.prefix):]
            name = layout.rename(name) if layout.rename else name
            if name is None:
                dropped[key] = f"not part of the {layout.name} trunk"
            else:
                trunk[name] = value
    return trunk, dropped


def detect_layout(state: dict[str, torch.Tensor], prefix: str | None = None) -> Layout:
    """The layout that maps the most keys onto trunk-like names; an explicit `prefix` wins.

    Two layouts that tie with different mappings, or none that maps anything, raise CheckpointError
    listing the candidates and the unmatched keys: nothing is guessed silently.
    """
    if prefix is not None:
        return Layout("custom-prefix", prefix, _HEADS, about=f"--prefix {prefix!r}")

    def mapped(layout):
        return {k for k in map_keys(state, layout)[0] if _looks_like_trunk(k)}

    scored = sorted(((len(mapped(lay)), i, lay) for i, lay in enumerate(LAYOUTS)), key=lambda t: (-t[0], t[1]))
    (best, _, layout), (second, _, runner_up) = scored[0], scored[1]
    keys = list(state)
    if best == 0:
        raise CheckpointError(
            "no known checkpoint layout matches these keys. Known layouts: "
            + "; ".join(f"{lay.name} (trunk prefix {lay.prefix!r}: {lay.about})" for lay in LAYOUTS)
            + f". Unmatched keys: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}. "
            "Pass --prefix P (and --state-key K) to say where the trunk is.")
    if second == best and mapped(layout) != mapped(runner_up):
        raise CheckpointError(f"ambiguous checkpoint: layouts {layout.name!r} and {runner_up.name!r} both map "
                              f"{best} keys; pass --prefix to choose")
    return layout


def _looks_like_trunk(key: str) -> bool:
    return bool(re.match(r"(conv1|bn1|layer[1-4]|patch_embed[1-4]?|blocks[1-3]?|cls_token|pos_embed|norm)\b", key))


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
        kwargs = {} if grid == 14 else {"img_size": grid * 16}
        if "norm.weight" not in state:  # SiameseIM's online encoder has no final LayerNorm
            kwargs["final_norm"] = False
        return f"vit_{size}_patch16", kwargs
    if "patch_embed1.proj.weight" in state:
        return _infer_convvit(state)
    raise CheckpointError("cannot infer the architecture from the keys; pass --arch")


def _infer_convvit(state: dict[str, torch.Tensor]) -> tuple[str, dict]:
    from transfer.convvit import PRESETS

    dims = tuple(int(state[f"patch_embed{i}.proj.weight"].shape[0]) for i in (1, 2, 3)
                 if f"patch_embed{i}.proj.weight" in state)
    depths = tuple(len({k.split(".")[1] for k in state if k.startswith(f"blocks{i}.")}) for i in (1, 2, 3))
    for arch, preset in PRESETS.items():
        if tuple(preset["embed_dims"]) == dims and tuple(preset["depths"]) == depths:
            grid = int(round(state["pos_embed"].shape[1] ** 0.5)) if "pos_embed" in state \
                else preset["img_size"] // 16
            return arch, ({} if grid * 16 == preset["img_size"] else {"img_size": grid * 16})
    raise CheckpointError(f"ConvViT with dims {dims} and depths {depths} matches no known preset "
                          "(" + ", ".join(f"{a}: {p['embed_dims']}/{p['depths']}" for a, p in PRESETS.items()) + "); pass --arch")


# ----------------------------------------------------------------------------------------------- audit
def lossy_dtype(ckpt_tensor: torch.Tensor, model_tensor: torch.Tensor) -> bool:
    """A checkpoint tensor that cannot be copied into the model's without losing values: integer or bool weights
    for floating parameters (a quantised or corrupted export), complex into real."""
    if model_tensor.is_floating_point():
        return not ckpt_tensor.is_floating_point()
    return ckpt_tensor.is_floating_point() or ckpt_tensor.is_complex()


def audit(model_state: dict[str, torch.Tensor], ckpt_state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per-module matched / missing / unexpected / shape-mismatched keys (BN step counters are optional)."""
    modules = OrderedDict()

    def bucket(key: str) -> dict[str, list[str]]:
        parts = key.split(".")
        name = ".".join(parts[:2]) if re.fullmatch(r"blocks\d?", parts[0]) and len(parts) > 1 else parts[0]
        return modules.setdefault(name, {"matched": [], "missing": [], "unexpected": [], "shape_mismatch": []})

    for key, value in model_state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key not in ckpt_state:
            bucket(key)["missing"].append(key)
        elif tuple(ckpt_state[key].shape) != tuple(value.shape):
            bucket(key)["shape_mismatch"].append(
                f"{key} {tuple(ckpt_state[key].shape)} vs {tuple(value.shape)}")
        elif lossy_dtype(ckpt_state[key], value):  # counted with the shape mismatches: the load is refused
            bucket(key)["shape_mismatch"].append(f"{key} dtype {ckpt_state[key].dtype} vs {value.dtype} (values lost)")
        else:
            bucket(key)["matched"].append(key)
    for key in ckpt_state:
        if key not in model_state:
            bucket(key)["unexpected"].append(key)
    return modules


def to_artifact(path: str | Path, arch: str | None = None, method: str | None = None,
                allow_partial: bool = False, state_key: str | None = None, prefix: str | None = None,
                img_size: int | None = None) -> tuple[BackboneArtifact, LoadReport]:
    """Read any supported checkpoint as a BackboneArtifact, audited; refuses partial loads by default.

    `state_key`/`prefix` override the automatic wrapper descent and layout detection; `img_size` rebuilds a
    ViT for another input size, interpolating its position embeddings (noted in the audit).
    """
    path = Path(path)
    tensors, meta = read_state_dict(path, state_key)
    notes = [f"weights read from entry {meta['wrapper']!r}"] if meta.get("wrapper") else []
    if "bench" in meta:
        art = artifact_from_tensors(tensors, meta, path)
        fmt, dropped = "bench", {}
        if arch is not None and arch != art.arch:
            raise CheckpointError(f"{path}: holds a {art.arch} backbone but --arch {arch} was asked for")
    else:
        layout = detect_layout(tensors, prefix)
        trunk, dropped = map_keys(tensors, layout)
        try:
            inferred, arch_kwargs = infer_arch(trunk)
        except CheckpointError as e:
            if arch is None:
                raise CheckpointError(f"{path}: {e}; pass --arch to audit it against a known architecture") from None
            # the keys do not identify an architecture (e.g. blocks are missing): audit against the one asked for
            width = trunk["conv1.weight"].shape[0] if "conv1.weight" in trunk else 64
            inferred, arch_kwargs = arch, ({"width": int(width)} if arch.startswith("resnet") and width != 64 else {})
        if arch is not None and arch != inferred:
            raise CheckpointError(f"{path}: holds a {inferred} backbone ({layout.name} layout) but --arch {arch} "
                                  "was asked for")
        art = BackboneArtifact(arch=inferred, state_dict=trunk, preprocessing=Preprocessing(),
                               arch_kwargs=arch_kwargs,
                               provenance={"method": layout.method, "source_file": str(path),
                                           "source_format": layout.name, "source_arch": meta.get("arch")})
        fmt = layout.name
    if method:
        art.provenance["method"] = method
    if img_size and art.family in ("vit", "convvit"):
        notes += _resize_pos_embed(art, img_size)
    model = build_backbone(art.arch, **art.arch_kwargs)
    report = LoadReport(str(path), fmt, art.arch, audit(model.state_dict(), art.state_dict), dropped, notes)
    if not report.ok and not allow_partial:
        raise CheckpointError(
            f"{path}: refused: the load would leave {report.count('missing')} trunk tensors uninitialised "
            f"and {report.count('shape_mismatch')} with the wrong shape or dtype.\n{report.summary()}\n"
            "Fix the checkpoint or its --arch; --allow-partial-load overrides (recorded as non-protocol).")
    return art, report


def _resize_pos_embed(art: BackboneArtifact, img_size: int) -> list[str]:
    """Rebuild a ViT/ConvViT for `img_size`: ViT pos_embed resampled bicubically (class token kept), a
    ConvViT's fixed sin-cos table recomputed for the new grid."""
    from timm.layers import resample_abs_pos_embed

    from transfer.convvit import PRESETS, resample_pos_embed

    pos = art.state_dict.get("pos_embed")
    old = art.arch_kwargs.get("img_size", PRESETS.get(art.arch, {}).get("img_size", 224))
    if old == img_size:
        return []
    art.arch_kwargs = {**art.arch_kwargs, "img_size": img_size}
    if pos is None:
        return [f"rebuilt for {img_size} px (no pos_embed in the checkpoint)"]
    grid = img_size // (16 if art.family == "convvit" else art.arch_kwargs.get("patch_size", 16))
    if art.family == "convvit":
        table, how = resample_pos_embed(pos, grid)
    else:
        table = resample_abs_pos_embed(pos, (grid, grid), num_prefix_tokens=1)
        old_grid = int(round((pos.shape[1] - 1) ** 0.5))
        how = f"pos_embed interpolated {old_grid}x{old_grid} -> {grid}x{grid}"
    art.state_dict = {**art.state_dict, "pos_embed": table}
    return [f"{how} for {img_size} px inputs"]


def load_backbone(path: str | Path, arch: str | None = None, method: str | None = None,
                  allow_partial: bool = False, **layout_options) -> tuple[Backbone, LoadReport]:
    """A ready `Backbone` (preprocessing + trunk with the checkpoint's weights) and its load audit.

    `layout_options`: state_key, prefix, img_size (see `to_artifact`).
    """
    art, report = to_artifact(path, arch=arch, method=method, allow_partial=allow_partial, **layout_options)
    trunk = build_backbone(art.arch, **art.arch_kwargs)
    expected = trunk.state_dict()
    usable = {k: v for k, v in art.state_dict.items() if k in expected and v.shape == expected[k].shape
              and not lossy_dtype(v, expected[k])}
    trunk.load_state_dict(usable, strict=False)
    backbone = Backbone(art, trunk)
    backbone.report = report
    return backbone, report
