"""One way in for every backbone checkpoint: format detection, key mapping and a load audit.

`load_backbone(path)` reads a file without running pickled code (`weights_only`, or a data-only unpickler that
stands inert placeholders in for functions and classes in entries bench drops, such as optimizer and scheduler
state), detects its layout, maps its keys to the canonical torchvision/timm trunk names, and reports matched /
missing / unexpected keys per module plus every dropped key with the reason. A load that would leave any trunk
parameter uninitialised, or carries trunk-prefixed tensors the architecture does not have, is refused with the
audit in the error, unless `allow_partial=True` (which the result record then carries); an artifact holds the
architecture's trunk tensors only.

Layouts are rows of `LAYOUTS`: a name, the prefix that marks trunk keys, and the key families dropped on
purpose (heads, momentum encoders, queues). Adding a layout is adding a row.
"""
from __future__ import annotations

import _compat_pickle
import dataclasses
import pickle
import re
import types
import warnings
import zipfile
from collections import OrderedDict, defaultdict
from pathlib import Path

import torch

from transfer.artifact import (ArtifactError, Backbone, BackboneArtifact, Preprocessing, artifact_from_tensors,
                               build_backbone, check_trunk_only)


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
    (r"(^|\.)(decoder_|mask_token|projector_decoder_blocks|predictor_decoder_blocks|stage\d_output_decode)",
     "masked-image-modelling decoder"),
    (r"(^|\.)(projector|projection_head|predictor|prototypes|neck|bn)\.|(^|(?<!patch_embed)\.)projection\.",
     "SSL projection/prediction head"),  # MMPretrain's patch_embed.projection is the trunk's patch embedding
    (r"(^|\.)(momentum_|target_|mm_)", "momentum / target encoder"),
    (r"(^|\.)(mask_encoder|mask_head)\.", "ADIOS occlusion model"),
    (r"(^|\.)encoder_k\.", "momentum (key) encoder"),
    (r"(^|\.)queue\d?(_ptr)?$", "negative queue"),
)


def _convvit_key(key: str) -> str | None:
    """ConvMAE's encoder keys pass; anything else is not part of a ConvViT trunk."""
    return key if re.match(r"(patch_embed[1-4]|blocks[1-3])\.|pos_embed$|norm\.", key) else None


_MMPRETRAIN_VIT = (  # MMPretrain/MMSelfSup VisionTransformer -> timm (reverse of tools/model_converters/*_to_mmpretrain.py)
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^layers\.(\d+)\.ln([12])\.", r"blocks.\1.norm\2."),
    (r"^layers\.(\d+)\.attn\.(qkv|proj)\.", r"blocks.\1.attn.\2."),
    (r"^layers\.(\d+)\.attn\.gamma1\.weight$", r"blocks.\1.ls1.gamma"),
    (r"^layers\.(\d+)\.ffn\.layers\.0\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^layers\.(\d+)\.ffn\.layers\.1\.", r"blocks.\1.mlp.fc2."),
    (r"^layers\.(\d+)\.ffn\.gamma2\.weight$", r"blocks.\1.ls2.gamma"),
    (r"^ln1\.", "norm."),            # the backbone's final norm (final_norm=True)
    (r"^pre_norm\.", "norm_pre."),   # pre_norm=True (CLIP-style); no bench ViT has one, so the audit refuses it
    (r"^(cls_token|pos_embed)$", r"\1"),
)
_TORCHVISION_VIT = (  # torchvision.models.VisionTransformer -> timm
    (r"^conv_proj\.", "patch_embed.proj."), (r"^class_token$", "cls_token"),
    (r"^encoder\.pos_embedding$", "pos_embed"), (r"^encoder\.ln\.", "norm."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(0|linear_1)\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(3|linear_2)\.", r"blocks.\1.mlp.fc2."),
)


def _renamer(rules):
    """key -> the first rule's substitution, or None (not a trunk key) when no rule matches."""
    def rename(key: str) -> str | None:
        for pattern, repl in rules:
            if re.search(pattern, key):
                return re.sub(pattern, repl, key)
        return None
    return rename


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
    Layout("mmpretrain-vit", "backbone.", _HEADS, rename=_renamer(_MMPRETRAIN_VIT),
           about="MMPretrain/MMSelfSup ViT (MAE, MoCo v3, ...): layers.N.ln1, ffn.layers.0.0, patch_embed.projection"),
    Layout("module-encoder", "module.encoder.",
           ((r"^module\.(encoder_k|projector_k|projector_instance_k)\.", "momentum (key) encoder and its head"),
            (r"^module\.(value_transform|projector_instance)\.", "PixPro pixel-propagation / instance head"))
           + _HEADS, about="SimSiam main_simsiam.py and PixPro ckpt_epoch_*.pth (`model`) checkpoints"),
    Layout("detectron2", "", ((r"^(proposal_generator|roi_heads\.(box|mask)_(predictor|head))\.",
                               "detection heads"),
                              (r"^(backbone\.(bottom_up\.)?)?stem\.fc\.",
                               "classifier / projection head (fc) that the detectron2 converters (detectron2's, "
                               "MoCo's, PixPro's) keep under stem."),
                              (r"^(backbone\.(bottom_up\.)?)?fpn_", "FPN (detection neck)")),
           rename=_detectron2_to_torchvision,
           about="detectron2 .pkl/.pth (MoCo/PixPro/VISSL converters, trained C4/FPN models)"),
    Layout("convmae", "", _HEADS, method="convmae", rename=_convvit_key,
           about="ConvMAE/ConvViT encoder checkpoints (`model` entry; decoder and fusion convs dropped)"),
    Layout("torchvision-vit", "", _HEADS, rename=_renamer(_TORCHVISION_VIT),
           about="torchvision VisionTransformer (vit_b_16-*.pth): conv_proj, encoder.layers.encoder_layer_N"),
    Layout("torchvision", "", _HEADS,
           about="torchvision/timm state dicts; MAE, SiameseIM, DeiT, iBOT, DenseCL, DINO/Barlow/VICReg releases"),
)
WRAPPERS = ("classy_state_dict", "base_model", "state_dict", "model_state_dict", "model", "trunk", "module",
            "teacher", "student", "target_encoder", "encoder")


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
        return all(self.count(kind) == 0 for kind in ("missing", "unexpected", "shape_mismatch"))

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


class _StandIn:
    """Inert stand-in for a pickled global outside the allowlist (a training script's function, an optimizer or
    scheduler class, functools.partial, ...). Unpickling builds these instead of importing or calling anything:
    calls, state and items are recorded, nothing runs. They may live only in entries bench drops anyway
    (optimizer, scheduler, training arguments); `read_state_dict` refuses the file if one sits among the weights.
    """

    name = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return type(self)(*args, **kwargs)

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def add(self, value):
        self.items.append(value)

    def __repr__(self):
        return f"<inert stand-in for {self.name}>"


_STAND_IN_TYPES: dict[str, type] = {}


def _stand_in(qualname: str) -> type:
    if qualname not in _STAND_IN_TYPES:
        _STAND_IN_TYPES[qualname] = type(qualname.rsplit(".", 1)[-1], (_StandIn,), {"name": qualname})
    return _STAND_IN_TYPES[qualname]


def _allowed_globals() -> set[str]:
    """The tensor allowlist: what torch.load(weights_only=True) resolves, less the rebuild functions of sparse,
    nested, quantised, meta and wrapper-subclass tensors (no backbone has them; weights_only validates them, this
    path would not), plus the data-only `_SAFE_GLOBALS`."""
    allowed = {f"{module}.{name}" for module, name in _SAFE_GLOBALS}
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed |= {name for name in _get_allowed_globals()
                    if not re.search(r"_rebuild_(sparse|nested|qtensor|meta|wrapper|device)", name)}
    except ImportError:  # older/newer torch: the rebuild functions every tensor pickle uses
        allowed |= {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter", "torch.Size",
                    "torch._utils._rebuild_parameter_with_state", "_codecs.encode", "torch.device"}
    return allowed


def _data_only_pickle(stood_in: set[str]):
    """A `pickle_module` for torch.load whose unpickler resolves only allowlisted globals and stands an inert
    `_StandIn` in for every other one (collected in `stood_in`); nothing outside the allowlist is imported."""
    allowed = _allowed_globals()

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names (protocol < 3 pickles)
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            qualname = f"{module}.{name}"
            if qualname in allowed or (module.startswith("numpy") and name.endswith("DType")):
                return super().find_class(module, name)
            stood_in.add(qualname)
            return _stand_in(qualname)

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__="bench_data_only_pickle", Unpickler=Unpickler, load=load)


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


def _load_object(path: Path) -> tuple[object, set[str]]:
    """The unpickled object and the globals stood in by inert placeholders; raises CheckpointError otherwise.

    Files torch.load(weights_only=True) accepts load that way. Others (training checkpoints whose optimizer or
    scheduler state pickles functions and classes; legacy and plain pickles such as detectron2 .pkl) go through
    the data-only unpickler; `read_state_dict` then decides whether the stand-ins may stay.
    """
    try:
        with torch.serialization.safe_globals(_torch_safe_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True), set()
    except Exception:
        pass
    if zipfile.is_zipfile(path) and any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        raise CheckpointError(f"{path}: refused: a TorchScript archive, not a checkpoint of weights; save the "
                              "model's state_dict() with torch.save or as safetensors")
    stood_in: set[str] = set()
    data_only = _data_only_pickle(stood_in)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=data_only), stood_in
    except Exception as e:
        if "Invalid magic number" not in str(e):
            raise CheckpointError(_unreadable(path, e)) from e
    stood_in.clear()  # not a torch file: a plain pickle (detectron2 .pkl, Python 2 ones included)
    try:
        with open(path, "rb") as f:
            return data_only.Unpickler(f, encoding="latin1").load(), stood_in
    except Exception as e:
        raise CheckpointError(_unreadable(path, e)) from e


def _unreadable(path: Path, e: Exception) -> str:
    """The real cause of a failed read: a truncated file, or what the reader said."""
    text = f"{type(e).__name__}: {_first_line(e)}"
    if isinstance(e, EOFError) or re.search(r"truncated|ran out of input|EOF|central directory|unexpected end",
                                            text, re.I):
        return f"{path}: truncated file ({text}); the download or copy is incomplete: fetch the file again"
    return f"{path}: not a readable checkpoint ({text})"


def _first_line(e: Exception) -> str:
    """The informative line of an exception message (torch's weights-only errors name the global)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if "unsupported global" in line.lower() or "is not allowed" in line]
    return (named or lines or [""])[0][:300]


def _stand_ins_in(obj) -> set[str]:
    """Names of the stand-in globals anywhere inside `obj` (containers, namespaces, stand-ins' arguments)."""
    found, seen, todo = set(), set(), [obj]
    while todo:
        item = todo.pop()
        if id(item) in seen or isinstance(item, (torch.Tensor, str, bytes, int, float)):
            continue
        seen.add(id(item))
        if isinstance(item, type) and issubclass(item, _StandIn):
            found.add(item.name)
        elif isinstance(item, _StandIn):
            found.add(item.name)
            todo += [item.args, item.kwargs, item.state, item.items]
        elif isinstance(item, dict):
            todo += list(item.keys()) + list(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            todo += list(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            todo += list(vars(item).values())
    return found


def read_state_dict(path: str | Path, state_key: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a checkpoint file, never executing pickled code.

    Metadata holds the file's scalar entries plus `wrapper` (the path of dict keys descended into) and, when
    globals outside the allowlist were stood in by inert placeholders, `stand_ins` ({entry: [globals]}).
    `state_key` ("a.b.c") names that path explicitly instead of the automatic descent through WRAPPERS.
    A stand-in inside the entry that holds the weights refuses the file, naming the global.
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
    root, stood_in = _load_object(path)
    obj = root
    meta = {k: v for k, v in obj.items() if isinstance(v, (str, int, float))} if isinstance(obj, dict) else {}
    forbidden = ("{path}: refused: {where} holds pickled objects of {names}, not tensors or plain data. bench "
                 "never imports or runs pickled code; re-save the weights with torch.save(model.state_dict()) "
                 "or as safetensors.")
    if state_key:
        for part in state_key.split("."):
            if not isinstance(obj, dict) or part not in obj:
                raise CheckpointError(f"{path}: --state-key {state_key!r}: no entry {part!r}; entries: "
                                      f"{', '.join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__}")
            obj = obj[part]
        wrapper = state_key.split(".")
    else:
        try:
            obj, wrapper = _unwrap(obj, path)
        except CheckpointError:
            if stood_in:
                raise CheckpointError(forbidden.format(path=path, where="the file",
                                                       names=", ".join(sorted(stood_in)))) from None
            raise
    if stood_in:
        inside = _stand_ins_in(obj)
        if inside:
            where = f"entry {'.'.join(wrapper)!r}, which holds the weights," if wrapper else "the weights dictionary"
            raise CheckpointError(forbidden.format(path=path, where=where, names=", ".join(sorted(inside))))
        entries = root.items() if isinstance(root, dict) else [("<top level>", root)]
        found = {str(k): sorted(_stand_ins_in(v)) for k, v in entries}
        meta["stand_ins"] = {k: names for k, names in found.items() if names}
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
    for entry, names in meta.get("stand_ins", {}).items():
        notes.append(f"entry {entry!r} pickles, outside the weights, {', '.join(names)}: stood in by inert "
                     "placeholders, nothing imported or run")
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
    model_state = build_backbone(art.arch, **art.arch_kwargs).state_dict()
    report = LoadReport(str(path), fmt, art.arch, audit(model_state, art.state_dict), dropped, notes)
    if not report.ok and not allow_partial:
        raise CheckpointError(
            f"{path}: refused: the load would leave {report.count('missing')} trunk tensors uninitialised, "
            f"{report.count('shape_mismatch')} with the wrong shape or dtype and {report.count('unexpected')} "
            f"tensors that are no part of a {art.arch} trunk.\n{report.summary()}\n"
            "Fix the checkpoint or its --arch (or --prefix); --allow-partial-load overrides (recorded as "
            "non-protocol).")
    for key in [k for k in art.state_dict if k not in model_state or lossy_dtype(art.state_dict[k], model_state[k])
                or tuple(art.state_dict[k].shape) != tuple(model_state[k].shape)]:  # only with --allow-partial-load
        report.dropped[key] = (f"no tensor of this name, shape and dtype in a {art.arch} trunk "
                               "(--allow-partial-load)")
        art.state_dict = {k: v for k, v in art.state_dict.items() if k != key}
    check_trunk_only(art, model_state)
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
