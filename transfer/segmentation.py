"""Semantic-segmentation transfer with mmsegmentation: UperNet on ADE20K for ResNet, ViT and ConvViT backbones.

`run_segmentation` is the engine of every `task: segmentation` benchmark (engine name `mmseg`). It builds an
mmengine config from the resolved recipe and runs the real mmseg/mmengine code: `EncoderDecoder` with
`UPerHead` + auxiliary `FCNHead` (ViT: `Feature2Pyramid` neck), the `ADE20KDataset` pipeline, `IoUMetric`
(mIoU, mAcc, aAcc), mmseg's layer-decay optimizer constructor, and mmengine's `Runner` (IterBasedTrainLoop,
checkpoints, resume, DDP under torchrun).

The backbone is the artifact's trunk, wrapped in a small mmseg-registered module that returns multi-scale
features and keeps the trunk's parameter names where the layer-decay rules need them:
- `BenchResNet`: torchvision ResNet (7x7 stem, stride on the 3x3 = mmseg style 'pytorch') -> C2..C5;
- `BenchViTMAE`: timm ViT -> tokens after `out_indices` blocks as stride-16 maps (no final norm, as mmseg's
  MAE backbone); blocks exposed as `layers.N` so mmseg's `LayerDecayOptimizerConstructor` (ViT rule) applies
  to the real block indices; optional layer scale (mmseg MAE `init_values`) and zero-initialised relative
  position bias per block (mmseg's MAEAttention); position embeddings resampled to the crop grid at build time
  and to any other input grid on the fly;
- `BenchConvViT`: ConvMAE's ConvViT (transfer/convvit.py) -> stage 1, stage 2, stage 3 and a 3x3/2
  conv-BN-GELU of stage 3 (ConvMAE's seg backbone; optional relative position bias, `use_rel_pos_bias`), with
  ConvMAE's layer-decay rule
  (`ConvViTLayerDecayOptimizerConstructor`: patch embeds and conv stages id 0, transformer block i id i+1).
The trunk weights are written to the run's work dir as a bench artifact and loaded strictly by the wrapper
(the runner's load audit already refused partial loads). Inputs are normalised with the artifact's mean/std
and channel order, and MSCN artifacts get their high-pass filter, inside the data preprocessor
(`BenchSegDataPreProcessor`).

Work dirs: `<out>/.mmseg/<benchmark>__<recipe>__<weights hash>__s<seed>__<config hash>`; a rerun of the same
trial resumes from the latest mmengine checkpoint there (`opts.resume=False` starts over).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import pickle
import time
import uuid
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from leaderboard.runs import save_run_pictures
from transfer import mmcv_compat

mmcv_compat.install()  # before any mmseg import: pure-PyTorch point_sample / sigmoid_focal_loss without mmcv._ext

from mmseg.engine.optimizers.layer_decay_optimizer_constructor import (  # noqa: E402
    LearningRateDecayOptimizerConstructor)
from mmseg.models.data_preprocessor import SegDataPreProcessor  # noqa: E402
from mmseg.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS  # noqa: E402

from transfer.errors import SpecError  # noqa: E402
from transfer.artifact import (BackboneArtifact, Preprocessing, build_backbone, high_pass,  # noqa: E402
                               read_artifact, save_artifact, trunk_state_dict)

ENGINE = "mmseg"
ENGINE_VERSION = 2  # part of the work-dir key: bump when the built config changes meaning


class SegmentationError(SpecError):
    """A segmentation run that cannot start as asked; the message names the fix (`bench` prints it cleanly)."""


# ----------------------------------------------------------------------------------------------- backbones
def _load_trunk(weights: str, img_size: int | None = None, **build_kwargs) -> tuple[nn.Module, BackboneArtifact]:
    """The artifact's trunk rebuilt with `build_kwargs` (drop path, dynamic size, ...) and its weights loaded
    strictly; ViT/ConvViT position embeddings resampled to `img_size`."""
    art = read_artifact(weights)
    kwargs = {**art.arch_kwargs, **build_kwargs}
    state = dict(art.state_dict)
    if img_size is not None and art.family in ("vit", "convvit"):
        kwargs["img_size"] = img_size
        grid = img_size // 16
        pos = state.get("pos_embed")
        if pos is not None and art.family == "vit":
            from timm.layers import resample_abs_pos_embed

            prefix = 1 if "cls_token" in state else 0
            if pos.shape[1] - prefix != grid * grid:
                state["pos_embed"] = resample_abs_pos_embed(pos, (grid, grid), num_prefix_tokens=prefix)
        elif pos is not None:
            from transfer.convvit import resample_pos_embed

            if pos.shape[1] != grid * grid:
                state["pos_embed"] = resample_pos_embed(pos, grid)[0]
    trunk = build_backbone(art.arch, **kwargs)
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SegmentationError(f"{weights}: trunk weights do not match {art.arch} (missing {missing[:8]}, "
                                f"unexpected {unexpected[:8]})")
    return trunk, art


@MODELS.register_module()
class BenchResNet(nn.Module):
    """torchvision ResNet trunk -> (C2, C3, C4, C5) at strides 4, 8, 16, 32; BN in training mode."""

    def __init__(self, weights: str, arch: str | None = None, weights_hash: str | None = None):
        super().__init__()
        trunk, art = _load_trunk(weights)
        if art.family != "resnet":
            raise SegmentationError(f"{weights}: BenchResNet needs a ResNet artifact, got {art.arch}")
        self.conv1, self.bn1, self.relu, self.maxpool = trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        self.out_channels = [stage_channels(getattr(trunk, f"layer{i}")) for i in range(1, 5)]

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return tuple(outs)


def stage_channels(stage: nn.Sequential) -> int:
    last = stage[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


@MODELS.register_module()
class BenchViTMAE(nn.Module):
    """timm ViT trunk -> the tokens after each block in `out_indices`, as (B, C, H/16, W/16) maps.

    Parameter names follow mmseg's MAE backbone (`patch_embed`, `cls_token`, `pos_embed`, `layers.N`) and the
    class name contains "MAE", which is how mmseg's `LayerDecayOptimizerConstructor` recognises a ViT and gives
    block N the layer id N+1. No final norm (mmseg MAE `final_norm=False`); the class token is dropped.
    """

    def __init__(self, weights: str, img_size: int, out_indices=(3, 5, 7, 11), drop_path_rate: float = 0.0,
                 layer_scale_init: float | None = None, arch: str | None = None, weights_hash: str | None = None,
                 rel_pos_bias: bool = False):
        super().__init__()
        vit, art = _load_trunk(weights, img_size, drop_path_rate=drop_path_rate, dynamic_img_size=True,
                               dynamic_img_pad=True)
        if art.family != "vit":
            raise SegmentationError(f"{weights}: BenchViTMAE needs a ViT artifact, got {art.arch}")
        if getattr(vit, "reg_token", None) is not None or vit.no_embed_class:
            raise SegmentationError(f"{art.arch}: register tokens / no_embed_class ViTs are not supported")
        self.patch_embed, self.cls_token, self.pos_embed = vit.patch_embed, vit.cls_token, vit.pos_embed
        self.norm_pre, self.layers = vit.norm_pre, vit.blocks
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.grid = tuple(vit.patch_embed.grid_size)
        self.embed_dim = vit.embed_dim
        self.out_indices = tuple(out_indices)
        if max(self.out_indices) >= len(self.layers):
            raise SegmentationError(f"out_indices {list(out_indices)} but {art.arch} has {len(self.layers)} blocks")
        if layer_scale_init:
            add_layer_scale(self.layers, self.embed_dim, layer_scale_init)
        if rel_pos_bias:
            if self.num_prefix_tokens > 1:
                raise SegmentationError(f"{art.arch}: relative position bias with {self.num_prefix_tokens} prefix "
                                        "tokens is not supported")
            add_rel_pos_bias(self.layers, self.grid, self.num_prefix_tokens)

    def forward(self, x):
        x = self.patch_embed(x)  # (B, H, W, C): dynamic size, padded to a multiple of the patch
        b, h, w, c = x.shape
        pos = self.pos_embed
        if (h, w) != self.grid:
            from timm.layers import resample_abs_pos_embed

            pos = resample_abs_pos_embed(pos, (h, w), old_size=self.grid, num_prefix_tokens=self.num_prefix_tokens)
        tokens = x.reshape(b, h * w, c)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], 1)
        x = self.norm_pre(tokens + pos)
        outs = []
        for i, blk in enumerate(self.layers):
            x = blk(x)
            if i in self.out_indices:
                outs.append(x[:, self.num_prefix_tokens:].transpose(1, 2).reshape(b, c, h, w).contiguous())
        return tuple(outs)


def relative_position_index(window: tuple[int, int], cls_token: bool) -> tuple[int, torch.Tensor]:
    """(table size, (N, N) index into it) of BEiT's relative position bias over a Wh x Ww window: one entry per
    2-D offset, plus (with a class token, as mmseg's BEiTAttention) cls->token, token->cls and cls->cls."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    index = (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)
    size = (2 * wh - 1) * (2 * ww - 1)
    if not cls_token:                      # ConvMAE's seg Attention (stage 3 has no class token)
        return size, index
    full = torch.zeros((wh * ww + 1,) * 2, dtype=index.dtype)
    full[1:, 1:] = index
    full[0, :], full[:, 0], full[0, 0] = size, size + 1, size + 2
    return size + 3, full


class RelPosBiasAttention(nn.Module):
    """Marker base: see `add_rel_pos_bias`."""


def _rel_pos_attention_forward(self, x, attn_mask=None, is_causal=False):
    """timm Attention.forward with BEiT's bias added to the attention logits: softmax(q k^T * scale + B)."""
    b, n, _ = x.shape
    if n != self.relative_position_index.shape[0]:
        wh, ww = self.rel_pos_window
        raise SegmentationError(f"the relative position bias covers a {wh}x{ww} token window, got {n} tokens: "
                                "feed crop_size inputs (slide inference) or set rel_pos_bias: false")
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.permute(2, 0, 1).unsqueeze(0).to(q.dtype),
                                       dropout_p=self.attn_drop.p if self.training else 0.0)
    x = self.norm(x.transpose(1, 2).reshape(b, n, self.attn_dim))
    return self.proj_drop(self.proj(x))


def add_rel_pos_bias(blocks, window: tuple[int, int], num_prefix_tokens: int) -> None:
    """A zero-initialised relative position bias table per block and head (mmseg's MAE backbone: MAEAttention,
    BEiT's index with cls rows; ConvMAE seg `use_rel_pos_bias=True`: no class token), added to the attention
    logits of every timm block. New parameters `attn.relative_position_bias_table` (the reference names), so the
    layer-decay rules give them their block's id; 2-D, hence weight decay, as in both references."""
    from timm.models.vision_transformer import Attention

    for blk in blocks:
        attn = blk.attn
        if type(attn) is not Attention or getattr(attn, "gate", None) is not None:
            raise SegmentationError(f"relative position bias needs timm's plain Attention, got {type(attn).__name__}")
        size, index = relative_position_index(window, cls_token=num_prefix_tokens == 1)
        attn.relative_position_bias_table = nn.Parameter(torch.zeros(size, attn.num_heads))
        attn.register_buffer("relative_position_index", index, persistent=False)
        attn.rel_pos_window = tuple(window)
        attn.__class__ = type("RelPosAttention", (RelPosBiasAttention, Attention),
                              {"forward": _rel_pos_attention_forward})


def add_layer_scale(blocks, dim: int, init: float) -> None:
    """Per-channel layer scale (timm LayerScale, `gamma`) on both residual branches of every timm block that has
    none: mmseg MAE / ConvMAE `init_values` (new parameters, trained from `init`)."""
    from timm.layers import LayerScale

    for blk in blocks:
        for name in ("ls1", "ls2"):
            if isinstance(getattr(blk, name), nn.Identity):
                setattr(blk, name, LayerScale(dim, init_values=init))


@MODELS.register_module()
class BenchConvViT(nn.Module):
    """ConvMAE's ConvViT -> (stage 1, stage 2, stage 3, stage 3 downsampled) at strides 4, 8, 16, 32.

    Names follow ConvMAE (`patch_embed1..4`, `blocks1..3`, `pos_embed`), which its layer-decay rule reads; the
    stride-32 map is ConvMAE's seg `fpn` (3x3 stride-2 conv, BN, GELU; new). No final norm (ConvMAE seg).
    """

    def __init__(self, weights: str, img_size: int, drop_path_rate: float = 0.0,
                 layer_scale_init: float | None = None, arch: str | None = None, weights_hash: str | None = None,
                 rel_pos_bias: bool = False):
        super().__init__()
        model, art = _load_trunk(weights, img_size, drop_path_rate=drop_path_rate)
        if art.family != "convvit":
            raise SegmentationError(f"{weights}: BenchConvViT needs a ConvViT artifact, got {art.arch}")
        for name in ("patch_embed1", "patch_embed2", "patch_embed3", "patch_embed4", "blocks1", "blocks2",
                     "blocks3"):
            setattr(self, name, getattr(model, name))
        self.pos_embed = model.pos_embed
        self.grid = model.grid
        self.embed_dims = tuple(model.embed_dims)
        d3 = self.embed_dims[-1]
        if layer_scale_init:
            add_layer_scale(self.blocks3, d3, layer_scale_init)
        if rel_pos_bias:
            add_rel_pos_bias(self.blocks3, (self.grid, self.grid), num_prefix_tokens=0)
        self.fpn = nn.Sequential(nn.Conv2d(d3, d3, 3, stride=2), nn.BatchNorm2d(d3), nn.GELU())

    @property
    def out_channels(self) -> list[int]:
        return [*self.embed_dims, self.embed_dims[-1]]

    def forward(self, x):
        h0, w0 = x.shape[-2:]
        x = F.pad(x, (0, -w0 % 16, 0, -h0 % 16))
        s1 = self.patch_embed1(x)
        for blk in self.blocks1:
            s1 = blk(s1)
        s2 = self.patch_embed2(s1)
        for blk in self.blocks2:
            s2 = blk(s2)
        x = self.patch_embed3(s2)
        b, d, h, w = x.shape
        pos = self.pos_embed
        if (h, w) != (self.grid, self.grid):
            pos = _convvit_pos(pos, self.grid, h, w)
        tokens = self.patch_embed4(x.flatten(2).transpose(1, 2)) + pos
        for blk in self.blocks3:
            tokens = blk(tokens)
        s3 = tokens.transpose(1, 2).reshape(b, d, h, w)
        return s1, s2, s3, self.fpn(s3)


def _convvit_pos(pos: torch.Tensor, grid: int, h: int, w: int) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos, (h, w), old_size=(grid, grid), num_prefix_tokens=0)


def convmae_layer_id(name: str, num_layers: int) -> int:
    """ConvMAE's layer-decay rule (SEG/mmcv_custom/layer_decay_optimizer_constructor.py): embeddings, patch
    embeds and the two conv stages id 0, transformer block i id i+1, everything else num_layers - 1 (decay 1)."""
    if name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed"):
        return 0
    if name.startswith(("backbone.patch_embed", "backbone.blocks1", "backbone.blocks2")):
        return 0
    if name.startswith("backbone.blocks3"):
        return int(name.split(".")[2]) + 1
    return num_layers - 1


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class ConvViTLayerDecayOptimizerConstructor(LearningRateDecayOptimizerConstructor):
    """mmseg's layer-decay constructor with ConvMAE's layer ids (paramwise_cfg: num_layers, layer_decay_rate).

    Same groups as mmseg's: 1-D params and biases without weight decay, lr = base_lr * rate^(L + 1 - id) with
    L = num_layers + 2 - 1."""

    def add_params(self, params, module, **kwargs):
        num_layers = self.paramwise_cfg["num_layers"] + 2
        rate = self.paramwise_cfg["layer_decay_rate"]
        groups = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = param.ndim == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token")
            layer_id = convmae_layer_id(name, num_layers)
            key = f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}"
            if key not in groups:
                scale = rate ** (num_layers - layer_id - 1)
                groups[key] = {"weight_decay": 0.0 if no_decay else self.base_wd, "params": [], "param_names": [],
                               "lr_scale": scale, "group_name": key, "lr": scale * self.base_lr}
            groups[key]["params"].append(param)
            groups[key]["param_names"].append(name)
        params.extend(groups.values())


# ----------------------------------------------------------------------------------------------- preprocessing
@MODELS.register_module()
class BenchSegDataPreProcessor(SegDataPreProcessor):
    """mmseg's SegDataPreProcessor (channel order, mean/std, padding) plus the artifact's MSCN high-pass filter,
    applied per image after normalisation and before padding (as `transfer.artifact.InputTransform`)."""

    def __init__(self, *args, highpass_sigma: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.highpass_sigma = highpass_sigma

    def forward(self, data: dict, training: bool = False) -> dict:
        if not self.highpass_sigma:
            return super().forward(data, training)
        data = self.cast_data(data)
        inputs = []
        for x in data["inputs"]:
            if self.channel_conversion and x.size(0) == 3:
                x = x[[2, 1, 0], ...]
            x = x.float()
            if self._enable_normalize:
                x = (x - self.mean) / self.std
            inputs.append(high_pass(x[None], self.highpass_sigma)[0])
        saved = self.channel_conversion, self._enable_normalize
        self.channel_conversion, self._enable_normalize = False, False
        try:
            return super().forward({**data, "inputs": inputs}, training)
        finally:
            self.channel_conversion, self._enable_normalize = saved


# ----------------------------------------------------------------------------------------------- config
def check_recipe(cfg: dict, backbone, spec=None) -> None:
    """Refuse a recipe written for another backbone family, naming the recipe that fits."""
    family = backbone.family
    if cfg["backbone_family"] == family:
        return
    fits = (spec.extra.get("family_recipes", {}).get(family) if spec is not None else None)
    hint = f"run with --recipe {fits}" if fits else "no recipe of this benchmark fits it"
    if cfg["backbone_family"] == "convvit":
        from transfer.artifact import CONVVIT_ARCHS

        hint += f" (the convvit-b recipe needs a ConvViT artifact: {', '.join(CONVVIT_ARCHS)})"
    raise SegmentationError(f"recipe {cfg['name']} is for {cfg['backbone_family']} backbones, this backbone is "
                            f"{family} ({backbone.arch}): {hint}")


def _scale_out_indices(indices, recipe_layers: int, depth: int) -> list[int]:
    """The recipe's ViT out_indices for ViT-B (12 blocks) at the same relative depths of a `depth`-block ViT."""
    if depth == recipe_layers:
        return list(indices)
    return [round((i + 1) * depth / recipe_layers) - 1 for i in indices]


def build_config(spec, cfg: dict, weights: str, art: BackboneArtifact, data_root: str, work_dir: str, seed: int,
                 workers: int = 0, world_size: int = 1, device_type: str = "cpu") -> dict:
    """The full mmengine config (a plain dict) for one run of `cfg` (a resolved recipe)."""
    family = art.family
    crop = int(cfg["crop_size"])
    # SyncBN (the recipe) is torch's CUDA SyncBatchNorm: one process reverts it to BN (mmengine), CPU processes
    # under torchrun (gloo; tests, CPU clusters) use per-process BN
    cpu_ddp = device_type != "cuda" and world_size > 1
    norm_cfg = dict(type="BN" if cpu_ddp and cfg["norm"] == "SyncBN" else cfg["norm"], requires_grad=True)
    prep = art.preprocessing
    dims_note = {}
    if family == "resnet":
        probe = build_backbone(art.arch, **art.arch_kwargs)
        in_channels = [stage_channels(getattr(probe, f"layer{i}")) for i in range(1, 5)]
        backbone = dict(type="BenchResNet", weights=weights, arch=art.arch, weights_hash=art.hash)
        neck = None
    elif family == "vit":
        probe = build_backbone(art.arch, **art.arch_kwargs)
        depth, dim = len(probe.blocks), probe.embed_dim
        out_indices = _scale_out_indices(cfg["out_indices"], cfg["layer_decay_num_layers"], depth)
        in_channels = [dim] * 4
        backbone = dict(type="BenchViTMAE", weights=weights, arch=art.arch, weights_hash=art.hash, img_size=crop,
                        out_indices=out_indices, drop_path_rate=cfg["drop_path_rate"],
                        layer_scale_init=cfg["layer_scale_init"], rel_pos_bias=bool(cfg["rel_pos_bias"]))
        neck = dict(type=cfg["neck"], embed_dim=dim, rescales=list(cfg["neck_rescales"]), norm_cfg=norm_cfg)
        dims_note = {"depth": depth, "embed_dim": dim}
    elif family == "convvit":
        from transfer.convvit import PRESETS

        dims = list(art.arch_kwargs.get("embed_dims", PRESETS[art.arch]["embed_dims"]))
        depth = list(art.arch_kwargs.get("depths", PRESETS[art.arch]["depths"]))[-1]
        in_channels = [*dims, dims[-1]]
        backbone = dict(type="BenchConvViT", weights=weights, arch=art.arch, weights_hash=art.hash, img_size=crop,
                        drop_path_rate=cfg["drop_path_rate"], layer_scale_init=cfg["layer_scale_init"],
                        rel_pos_bias=bool(cfg["rel_pos_bias"]))
        neck = None
        dims_note = {"depth": depth, "embed_dims": dims}
    else:  # pragma: no cover - arch_family admits nothing else
        raise SegmentationError(f"no segmentation backbone for family {family}")
    num_classes, ignore = int(cfg["num_classes"]), int(cfg["ignore_index"])
    if cfg["test_mode"] == "slide":
        test_cfg = dict(mode="slide", crop_size=(crop, crop), stride=(int(cfg["test_stride"]),) * 2)
    else:
        test_cfg = dict(mode="whole")
    model = dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="BenchSegDataPreProcessor", mean=list(prep.mean), std=list(prep.std),
                               bgr_to_rgb=prep.color.upper() == "RGB", pad_val=0, seg_pad_val=ignore,
                               size=(crop, crop), highpass_sigma=prep.highpass_sigma),
        pretrained=None,
        backbone=backbone,
        decode_head=dict(type=cfg["decode_head"], in_channels=in_channels, in_index=[0, 1, 2, 3],
                         pool_scales=tuple(cfg["pool_scales"]), channels=int(cfg["decode_channels"]),
                         dropout_ratio=cfg["dropout_ratio"], num_classes=num_classes, norm_cfg=norm_cfg,
                         align_corners=False, ignore_index=ignore,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        auxiliary_head=dict(type=cfg["aux_head"], in_channels=in_channels[cfg["aux_in_index"]],
                            in_index=cfg["aux_in_index"], channels=int(cfg["aux_channels"]),
                            num_convs=cfg["aux_num_convs"], concat_input=False, dropout_ratio=cfg["dropout_ratio"],
                            num_classes=num_classes, norm_cfg=norm_cfg, align_corners=False, ignore_index=ignore,
                            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False,
                                             loss_weight=cfg["aux_loss_weight"])),
        train_cfg=dict(), test_cfg=test_cfg)
    if neck is not None:
        model["neck"] = neck

    base = str(Path(data_root) / "ADEChallengeData2016")
    train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", reduce_zero_label=cfg["reduce_zero_label"]),
        dict(type="RandomResize", scale=tuple(cfg["scale"]), ratio_range=tuple(cfg["ratio_range"]), keep_ratio=True),
        dict(type="RandomCrop", crop_size=(crop, crop), cat_max_ratio=cfg["cat_max_ratio"]),
        dict(type="RandomFlip", prob=cfg["flip_prob"]),
        *([dict(type="PhotoMetricDistortion")] if cfg["photometric_distortion"] else []),
        dict(type="PackSegInputs")]
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=tuple(cfg["test_scale"]), keep_ratio=True),
        dict(type="LoadAnnotations", reduce_zero_label=cfg["reduce_zero_label"]),
        dict(type="PackSegInputs")]

    def dataset(split):
        return dict(type="ADE20KDataset", data_root=base, reduce_zero_label=cfg["reduce_zero_label"],
                    data_prefix=dict(img_path=f"images/{split}", seg_map_path=f"annotations/{split}"),
                    pipeline=train_pipeline if split == "training" else test_pipeline)

    if cfg["batch_size"] % world_size:
        raise SegmentationError(f"batch_size {cfg['batch_size']} is global and must divide over {world_size} "
                                "processes")
    loader = dict(num_workers=workers, persistent_workers=workers > 0)
    train_dataloader = dict(batch_size=cfg["batch_size"] // world_size, **loader,
                            sampler=dict(type="InfiniteSampler", shuffle=True), dataset=dataset("training"))
    test_dataloader = dict(batch_size=1, **loader, sampler=dict(type="DefaultSampler", shuffle=False),
                           dataset=dataset("validation"))
    evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"], ignore_index=ignore)

    optimizer = {"sgd": lambda: dict(type="SGD", lr=cfg["lr"], momentum=cfg["momentum"],
                                     weight_decay=cfg["weight_decay"]),
                 "adamw": lambda: dict(type="AdamW", lr=cfg["lr"], betas=tuple(cfg["betas"]),
                                       weight_decay=cfg["weight_decay"])}[cfg["optimizer"]]()
    amp = bool(cfg["amp"]) and device_type == "cuda"
    optim_wrapper = dict(type="AmpOptimWrapper" if amp else "OptimWrapper", optimizer=optimizer, clip_grad=None)
    if amp:
        optim_wrapper["loss_scale"] = "dynamic"
    if cfg["layer_decay_rate"] is not None:
        num_layers = dims_note.get("depth", cfg["layer_decay_num_layers"])
        optim_wrapper["paramwise_cfg"] = dict(num_layers=num_layers, layer_decay_rate=cfg["layer_decay_rate"])
        optim_wrapper["constructor"] = ("LayerDecayOptimizerConstructor" if family == "vit"
                                        else "ConvViTLayerDecayOptimizerConstructor")
    max_iters, warmup = int(cfg["max_iters"]), int(cfg["warmup_iters"])
    param_scheduler = []
    if warmup:
        param_scheduler.append(dict(type="LinearLR", start_factor=cfg["warmup_start_factor"], by_epoch=False,
                                    begin=0, end=warmup))
    param_scheduler.append(dict(type="PolyLR", eta_min=cfg["min_lr"], power=cfg["poly_power"], begin=warmup,
                                end=max_iters, by_epoch=False))
    val_interval = int(cfg["val_interval"])
    intermediate_val = val_interval < max_iters
    config = dict(
        default_scope="mmseg",
        # mmseg's tools (tools/test.py, apis.init_model) load the dumped config with Config.fromfile, which
        # imports this first: the mmcv compat ops, bench's registered modules, the checkpoint allow-list
        custom_imports=dict(imports=["transfer.mmseg_reuse"], allow_failed_imports=False),
        test_pipeline=test_pipeline,  # top level, as mmseg's configs have it (inference_model reads it)
        work_dir=work_dir,
        experiment_name=f"{spec.name}_{cfg['name']}_s{seed}_{uuid.uuid4().hex[:8]}",
        model=model,
        train_dataloader=train_dataloader,
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=val_interval),
        test_dataloader=test_dataloader, test_evaluator=evaluator, test_cfg=dict(type="TestLoop"),
        optim_wrapper=optim_wrapper,
        param_scheduler=param_scheduler,
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=min(50, max_iters), log_metric_by_epoch=False),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=int(cfg["checkpoint_interval"]),
                            max_keep_ckpts=2, save_last=True),
            sampler_seed=dict(type="DistSamplerSeedHook")),
        env_cfg=dict(cudnn_benchmark=device_type == "cuda",
                     mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl" if device_type == "cuda" else "gloo")),
        launcher="pytorch" if world_size > 1 else "none",
        sync_bn="torch" if cfg["norm"] == "SyncBN" and world_size > 1 and not cpu_ddp else None,
        randomness=dict(seed=seed, deterministic=False),
        log_processor=dict(by_epoch=False),
        log_level=os.environ.get("BENCH_MMSEG_LOG_LEVEL", "INFO"),
        load_from=None,
        resume=False)
    if cpu_ddp:  # mmengine passes device_ids=[LOCAL_RANK], which DDP refuses for CPU modules
        config["model_wrapper_cfg"] = dict(type="MMDistributedDataParallel", device_ids=None,
                                           broadcast_buffers=False, find_unused_parameters=False)
    if intermediate_val:
        config.update(val_dataloader=copy.deepcopy(test_dataloader), val_evaluator=dict(evaluator),
                      val_cfg=dict(type="ValLoop"))
    return config


def reevaluate_command(config_file: str | os.PathLike, checkpoint: str | os.PathLike) -> str:
    """The one command that re-evaluates a saved checkpoint with mmseg's own tools/test.py and the config bench
    dumped next to it (run from anywhere; PYTHONPATH makes `transfer.mmseg_reuse` importable)."""
    import sys

    import mmseg

    tools = Path(mmseg.__file__).parent / ".mim" / "tools" / "test.py"
    root = Path(__file__).resolve().parents[1]
    return f"PYTHONPATH={root} {sys.executable} {tools} {config_file} {checkpoint}"


def precision(config: dict) -> str:
    """The training precision the built config runs (mmengine reads only optim_wrapper.type; mmseg 1.2.2's MAE
    config also sets a top-level `fp16` key, which mmengine ignores, so that recipe trains in fp32)."""
    wrapper = config["optim_wrapper"]
    if wrapper["type"] == "AmpOptimWrapper":
        return f"fp16 autocast, loss scale {wrapper.get('loss_scale', 'dynamic')} (AmpOptimWrapper)"
    return "fp32 (OptimWrapper)"


def plain(obj):
    """JSON-ready copy of a config (tuples -> lists)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------- checkpoints
def checkpoint_safe_globals() -> list:
    """What mmengine 0.10 pickles into its checkpoints besides tensors (message-hub HistoryBuffers with their
    statistics methods, numpy arrays and scalars), for `torch.load(weights_only=True)` (the torch >= 2.6
    default): an allow-list instead of weights_only=False. The pickle names HistoryBuffer's methods through
    `getattr(HistoryBuffer, "min")`; that global resolves to a getattr limited to exactly those lookups."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray

    def history_buffer_getattr(obj, name):
        if obj is HistoryBuffer and name in {"min", "max", "current", "mean", *HistoryBuffer._statistics_methods}:
            return getattr(obj, name)
        raise pickle.UnpicklingError(f"checkpoint asks for getattr({obj!r}, {name!r}); only HistoryBuffer "
                                     "statistics methods are allowed")

    return [HistoryBuffer, np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar,
            *{type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)},
            (history_buffer_getattr, "builtins.getattr"), (history_buffer_getattr, "__builtin__.getattr")]


def resume_checkpoint(work_dir: Path) -> Path:
    """The checkpoint mmengine's `last_checkpoint` names, resolved inside `work_dir` (it holds an absolute path,
    stale once the results folder is moved or copied); refuses a checkpoint of another folder or a truncated one."""
    import zipfile

    named = Path((work_dir / "last_checkpoint").read_text().strip())
    path = work_dir / named.name
    if not path.is_file():
        raise SegmentationError(f"{work_dir / 'last_checkpoint'} names {named}, which is not in this work dir; "
                                "rerun with --no-resume to start the trial over")
    try:
        with zipfile.ZipFile(path) as z:  # torch checkpoints are zip files: the central directory is at the end
            z.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise SegmentationError(f"{path}: truncated or unreadable checkpoint ({e}); delete it and "
                                f"{work_dir / 'last_checkpoint'} to resume from an earlier one, or rerun with "
                                "--no-resume") from None
    return path


from mmengine.hooks import Hook  # noqa: E402
from mmengine.registry import HOOKS  # noqa: E402


@HOOKS.register_module(force=True)
class FiniteLossHook(Hook):
    """Stops training at the first NaN/inf loss: a diverged run never becomes a record."""

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        loss = (outputs or {}).get("loss")
        if loss is not None and not torch.isfinite(torch.as_tensor(loss)).all():
            raise SegmentationError(f"non-finite loss ({float(loss)}) at iteration {runner.iter + 1}; no record "
                                    f"written. Lower the LR (--lr) or check the backbone; logs in {runner.work_dir}")


def check_finite_model(model: nn.Module, work_dir: Path) -> None:
    """After training: NaN/inf weights (a diverged run) must not become a result record."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SegmentationError(f"training diverged: {len(bad)} tensors hold NaN/inf (e.g. {bad[0]}); no record "
                                f"written. Lower the LR (--lr) or check the backbone; logs in {work_dir}")


def work_dir_for(opts, spec, cfg: dict, art_hash: str, seed: int, world_size: int) -> Path:
    key = json.dumps({"v": ENGINE_VERSION, "recipe": cfg, "data": str(Path(opts.data_root).resolve()),
                      "world": world_size, "weights": art_hash, "seed": seed}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return Path(opts.out) / ".mmseg" / f"{spec.name}__{cfg['name']}__{art_hash.split(':')[-1][:12]}__s{seed}__{digest}"


# ----------------------------------------------------------------------------------------------- engine
def run_segmentation(spec, backbone, cfg: dict, mode: str, seed: int, device, opts):
    """Engine `mmseg`: train UperNet on the benchmark's train split and evaluate mIoU/mAcc/aAcc on val.

    Returns (result {"metrics", "timings", "extra"}, engine_cfg {"name": "mmseg", "config": full mmengine
    config, ...}). Reruns of the same trial resume from the work dir's last checkpoint unless opts.resume is
    False.
    """
    from mmengine.runner import Runner

    from transfer.datasets import check_layout

    if mode != "train":
        raise SegmentationError(f"benchmark {spec.name} has no mode {mode!r}; modes: train")
    check_recipe(cfg, backbone, spec)
    check_layout(spec.dataset, opts.data_root)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if getattr(opts, "num_gpus", 1) > 1 and world_size == 1:
        raise SegmentationError("multi-GPU segmentation runs under torchrun: `bench run ... --gpus N` relaunches "
                                "itself that way, or call `torchrun --nproc_per_node N -m benchmarks.cli run ...`")
    meta = backbone.artifact_meta
    art = BackboneArtifact(arch=backbone.arch, state_dict=trunk_state_dict(backbone.trunk),
                           preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
                           provenance=meta.get("provenance", {}), arch_kwargs=dict(meta.get("arch_kwargs", {})))
    work_dir = work_dir_for(opts, spec, cfg, art.hash, seed, world_size)
    work_dir.mkdir(parents=True, exist_ok=True)
    weights = work_dir / "backbone.safetensors"
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 and not weights.is_file():
        save_artifact(weights, art)
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
    config = build_config(spec, cfg, str(weights), art, opts.data_root, str(work_dir), seed,
                          workers=getattr(opts, "workers", 0), world_size=world_size, device_type=device.type)
    resume = getattr(opts, "resume", True) and (work_dir / "last_checkpoint").is_file()
    config["resume"] = bool(resume)
    config.setdefault("custom_hooks", []).append(dict(type="FiniteLossHook"))
    if resume:  # from this work dir's own checkpoint, wherever the folder was moved or copied
        config["load_from"] = str(resume_checkpoint(work_dir))
    dumped = plain(config)
    from mmengine.config import Config

    t0 = time.perf_counter()
    # mmseg's layer-decay constructor print()s every parameter's group: that goes to the work dir, not the console
    # (mmengine's own logger keeps its stream)
    with open(work_dir / "stdout.log", "a") as sink, contextlib.redirect_stdout(sink), \
            torch.serialization.safe_globals(checkpoint_safe_globals()):
        runner = Runner.from_cfg(Config(copy.deepcopy(config)))
        runner.train()
        check_finite_model(runner.model, work_dir)
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        metrics = runner.test()
        test_s = time.perf_counter() - t1
        pictures = prediction_pictures(runner) if rank == 0 else {}
    wanted = tuple(spec.metrics)
    missing = [m for m in wanted if m not in metrics]
    if missing:
        raise SegmentationError(f"IoUMetric returned {sorted(metrics)}, missing {missing}")
    result = {"metrics": {m: round(float(metrics[m]), 2) for m in wanted},  # IoUMetric: percent, 2 decimals
              "timings": {"train_s": train_s, "test_s": test_s},
              "extra": {"work_dir": str(work_dir), "config_file": str(work_dir / f"{runner.timestamp}.py"),
                        "resumed": bool(resume), "iterations": runner.iter, "precision": precision(config),
                        "reevaluate": reevaluate_command(work_dir / f"{runner.timestamp}.py",
                                                         (work_dir / "last_checkpoint").read_text().strip()),
                        "train_images": len(runner.train_dataloader.dataset),
                        "val_images": len(runner.test_dataloader.dataset)}}
    if pictures:  # a few val images beside their predicted and true label maps, drawn by `bench report`
        result["extra"]["pictures"] = save_run_pictures(opts.out, work_dir.name, pictures)
    engine_cfg = {"name": ENGINE, "model": "UperNet (mmseg EncoderDecoder + UPerHead + FCNHead aux)",
                  "backbone_module": config["model"]["backbone"]["type"],
                  "amp": config["optim_wrapper"]["type"] == "AmpOptimWrapper",
                  "precision": precision(config),
                  "versions": _versions(), "mmcv_compat_ops": mmcv_compat.is_installed(),
                  "config": dumped}
    return result, engine_cfg


def _versions() -> dict:
    import mmcv
    import mmengine
    import mmseg

    return {"mmseg": mmseg.__version__, "mmengine": mmengine.__version__, "mmcv": mmcv.__version__}


@torch.no_grad()
def prediction_pictures(runner, count: int = 4) -> dict:
    """The first `count` val images, each beside its predicted and its true label map (ADE20K palette; ignored
    pixels black), as PIL images for `leaderboard.runs.save_pictures`."""
    import numpy as np
    from mmengine.dataset import pseudo_collate
    from PIL import Image

    dataset = runner.test_dataloader.dataset
    palette = np.array(dataset.metainfo["palette"] + [[0, 0, 0]] * (256 - len(dataset.metainfo["palette"])), np.uint8)
    runner.model.eval()
    pictures = {}
    for i in range(min(count, len(dataset))):
        (sample,) = runner.model.test_step(pseudo_collate([dataset[i]]))
        with Image.open(sample.img_path) as im:
            image = np.asarray(im.convert("RGB"))
        pred = palette[sample.pred_sem_seg.data[0].cpu().numpy()]
        true = palette[sample.gt_sem_seg.data[0].cpu().numpy()]
        pictures[f"val-{Path(sample.img_path).stem}"] = Image.fromarray(np.concatenate([image, pred, true], axis=1))
    return pictures
