"""C4 detection transfer: Faster / Mask R-CNN R50-C4 (MoCo protocol) built from torchvision components.

`run_detection` is the engine of every `task: detection` benchmark. It runs detectron2 (transfer/
detectron2_engine.py) whenever `import detectron2` works, else the torchvision engine below;
`BENCH_DET_ENGINE=torchvision|detectron2` forces one.

The torchvision engine rebuilds detectron2's C4 model (GeneralizedRCNN + Res5ROIHeadsExtraNorm):
- backbone: stem + res2..res4 of the transferred trunk, stride 16; every layer trainable (FREEZE_AT 0),
  BatchNorm in training mode (SyncBatchNorm under DDP);
- RPN on res4: one 3x3 conv + objectness / delta 1x1 convs, detectron2's unrounded anchors (sizes 32..512,
  ratios 0.5/1/2, offset 0), top-k 12000/2000 train and 6000/1000 test, NMS 0.7, 256 anchors/img, 1/2 positive,
  L1 losses normalised by 256 x images (detectron2 defaults);
- ROI head: aligned RoIAlign 14x14 (ROIAlignV2) -> res5 (first block stride 2 on the 3x3) -> extra BN ->
  average pool (2048-d) -> K+1 scores and 4K class-specific deltas (weights 10,10,5,5); 512 RoIs/img, 1/4
  positive; test score 0.05, NMS 0.5, 100 detections. Mask R-CNN: the res5 features of the foreground RoIs ->
  2x2 deconv to 256, ReLU, 1x1 predictor -> 14x14 masks;
- input: the backbone's own `transform` (RGB, mean/std on 0-255, MSCN high-pass when the artifact asks for it)
  per image, then zero padding to the batch; short-side resize as detectron2's ResizeShortestEdge, flip;
- solver: SGD momentum 0.9, weight decay with none on norm layers, linear warm-up, steps, gamma; precise BN
  (running statistics recomputed over `precise_bn_iters` training batches) before evaluation;
- evaluation with detectron2's semantics (transfer/det_eval.py).
Multi-GPU: `bench run --gpus N` (opts.num_gpus) spawns N local workers (one per GPU; gloo processes on a CPU-only
machine); launched under torchrun (WORLD_SIZE set) it joins that process group instead. The batch
(`ims_per_batch`) is global and split over the processes, as in detectron2; BN becomes SyncBatchNorm on GPUs.
"""
from __future__ import annotations

import bisect
import copy
import math
import os
import socket
import tempfile
import time
from collections import Counter, OrderedDict
from itertools import islice

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, paste_masks_in_image
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align

from leaderboard.runs import detection_pictures, save_run_pictures, training_curve
from transfer import det_eval
from transfer.artifact import Backbone, BackboneArtifact, Preprocessing, build_backbone, trunk_state_dict
from transfer.detection_data import DetSplit, load_split, num_gpus

ENGINE_ENV = "BENCH_DET_ENGINE"
FEATURE_STRIDE = 16  # res4


# ----------------------------------------------------------------------------------------------- model
def stage_channels(stage: nn.Sequential) -> int:
    last = stage[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


class C4Backbone(nn.Module):
    """Stem + res2..res4 of a torchvision ResNet: image -> {"res4": stride-16 features}."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(OrderedDict(conv1=trunk.conv1, bn1=trunk.bn1, relu=trunk.relu,
                                              maxpool=trunk.maxpool))
        self.res2, self.res3, self.res4 = trunk.layer1, trunk.layer2, trunk.layer3
        self.out_channels = stage_channels(trunk.layer3)

    def forward(self, x: torch.Tensor) -> dict:
        return {"res4": self.res4(self.res3(self.res2(self.stem(x))))}


class AnchorGenerator(nn.Module):
    """detectron2's DefaultAnchorGenerator for one level: anchors of area s^2 and aspect h/w = r (not rounded),
    centred on (x * stride, y * stride)."""

    def __init__(self, sizes, ratios, stride: int = FEATURE_STRIDE):
        super().__init__()
        cells = []
        for size in sizes:
            for ratio in ratios:
                w = math.sqrt(size * size / ratio)
                cells.append([-w / 2, -ratio * w / 2, w / 2, ratio * w / 2])
        self.register_buffer("cells", torch.tensor(cells, dtype=torch.float32), persistent=False)
        self.stride = stride

    def num_anchors_per_location(self) -> list[int]:
        return [len(self.cells)]

    def forward(self, images: ImageList, features: list[torch.Tensor]) -> list[torch.Tensor]:
        fh, fw = features[0].shape[-2:]
        dev = features[0].device
        ys, xs = torch.meshgrid(torch.arange(fh, device=dev) * float(self.stride),
                                torch.arange(fw, device=dev) * float(self.stride), indexing="ij")
        shifts = torch.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4)
        anchors = (shifts + self.cells.view(1, -1, 4)).reshape(-1, 4)
        return [anchors] * len(images.image_sizes)


class RPN(RegionProposalNetwork):
    """torchvision's RPN with detectron2's losses: smooth-L1 (beta 0 = L1) and BCE summed over the sampled
    anchors, both divided by anchors-per-image x images and scaled by the recipe's RPN loss weight."""

    def __init__(self, *args, loss_weight: float = 1.0, smooth_l1_beta: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_weight, self.smooth_l1_beta = loss_weight, smooth_l1_beta

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos))[0]
        sampled = torch.cat([pos, torch.where(torch.cat(neg))[0]])
        normalizer = self.fg_bg_sampler.batch_size_per_image * len(labels)
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        obj = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled], reduction="sum")
        box = F.smooth_l1_loss(pred_bbox_deltas[pos], regression_targets[pos], beta=self.smooth_l1_beta,
                               reduction="sum")
        return obj * self.loss_weight / normalizer, box * self.loss_weight / normalizer


class BoxPredictor(nn.Module):
    """detectron2's FastRCNNOutputLayers: K+1 class scores and 4K class-specific deltas (std 0.01 / 0.001).
    Deltas are returned with a zero background column first, the layout torchvision's RoIHeads decodes."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(dim, num_classes + 1)
        self.bbox_pred = nn.Linear(dim, 4 * num_classes)
        for layer, std in ((self.cls_score, 0.01), (self.bbox_pred, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        return self.cls_score(x), F.pad(self.bbox_pred(x), (4, 0))


class MaskHead(nn.Module):
    """detectron2's MaskRCNNConvUpsampleHead with NUM_CONV 0: 2x2 deconv (stride 2) to 256, ReLU, 1x1 to K."""

    def __init__(self, dim: int, num_classes: int, conv_dim: int = 256):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(dim, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, num_classes, 1)
        nn.init.kaiming_normal_(self.deconv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.deconv.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x):
        return self.predictor(F.relu(self.deconv(x)))


def fast_rcnn_losses(class_logits, box_regression, labels, regression_targets, beta: float) -> dict:
    """Softmax CE over all sampled RoIs + smooth-L1 on the foreground class deltas / number of RoIs."""
    labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
    pos = torch.where(labels > 0)[0]
    deltas = box_regression.reshape(len(labels), -1, 4)[pos, labels[pos]]
    box = F.smooth_l1_loss(deltas, regression_targets[pos], beta=beta, reduction="sum") / max(1, labels.numel())
    return {"loss_cls": F.cross_entropy(class_logits, labels), "loss_box_reg": box}


def mask_loss(mask_logits, boxes, gt_masks, matched_idxs, labels) -> torch.Tensor:
    """Per-pixel BCE on the ground-truth class channel; targets are the GT bitmasks cropped to each RoI with
    aligned RoIAlign and thresholded at 0.5 (detectron2 BitMasks.crop_and_resize)."""
    if mask_logits.numel() == 0:
        return mask_logits.sum() * 0
    m = mask_logits.shape[-1]
    targets = []
    for b, masks, idx in zip(boxes, gt_masks, matched_idxs):
        if len(b):
            rois = torch.cat([idx[:, None].to(b), b], 1)
            targets.append(roi_align(masks[:, None].to(b), rois, (m, m), 1.0, 0, aligned=True)[:, 0] >= 0.5)
    labels = torch.cat(labels) - 1
    logits = mask_logits[torch.arange(len(labels), device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(logits, torch.cat(targets).to(logits.dtype))


class Res5ROIHeads(RoIHeads):
    """detectron2's Res5ROIHeads(+ExtraNorm): box and mask branches share RoIAlign -> res5 per region.

    Proposal matching/sampling, box coding and test-time post-processing are torchvision's RoIHeads."""

    def __init__(self, res5: nn.Module, out_channels: int, num_classes: int, cfg: dict, mask_on: bool):
        super().__init__(None, None, BoxPredictor(out_channels, num_classes), 0.5, 0.5, cfg["roi_batch_per_image"],
                         cfg["roi_positive_fraction"], tuple(cfg["bbox_reg_weights"]), cfg["score_thresh_test"],
                         cfg["nms_thresh_test"], cfg["detections_per_image"])
        self.res5 = res5
        self.mask_head = MaskHead(out_channels, num_classes) if mask_on else None
        self.resolution = cfg["pooler_resolution"]
        self.smooth_l1_beta = cfg.get("smooth_l1_beta", 0.0)

    def shared_roi_transform(self, features: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        x = roi_align(features, boxes, self.resolution, 1.0 / FEATURE_STRIDE, sampling_ratio=0, aligned=True)
        return self.res5(x)

    def forward(self, features, proposals, image_shapes, targets=None):
        x = features["res4"]
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.shared_roi_transform(x, proposals)
        class_logits, box_regression = self.box_predictor(box_features.mean(dim=(2, 3)))
        if self.training:
            losses = fast_rcnn_losses(class_logits, box_regression, labels, regression_targets, self.smooth_l1_beta)
            if self.mask_head is not None:
                fg = [lab > 0 for lab in labels]
                mask_logits = self.mask_head(box_features[torch.cat(fg)])
                losses["loss_mask"] = mask_loss(mask_logits, [p[f] for p, f in zip(proposals, fg)],
                                                [t["masks"] for t in targets],
                                                [m[f] for m, f in zip(matched_idxs, fg)],
                                                [lab[f] for lab, f in zip(labels, fg)])
            return [], losses
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        results = [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]
        if self.mask_head is not None:
            probs = self.mask_head(self.shared_roi_transform(x, boxes)).sigmoid()
            flat = torch.cat(labels) - 1
            probs = probs[torch.arange(len(flat), device=flat.device), flat][:, None]
            for r, p in zip(results, probs.split([len(b) for b in boxes])):
                r["masks"] = p
        return results, {}


class C4RCNN(nn.Module):
    """GeneralizedRCNN with a C4 backbone: list of float RGB images in [0, 1] (already resized) -> losses in
    training, per-image {boxes, scores, labels (1-based), masks} in the input's resized coordinates at test."""

    def __init__(self, transform: nn.Module, backbone: C4Backbone, rpn: RPN, roi_heads: Res5ROIHeads):
        super().__init__()
        self.transform, self.backbone, self.rpn, self.roi_heads = transform, backbone, rpn, roi_heads

    def batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Normalise (+ high-pass) each image on its own, then zero-pad to a batch (detectron2 ImageList)."""
        images = [self.transform(img[None])[0] for img in images]
        h, w = max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)
        out = images[0].new_zeros(len(images), 3, h, w)
        for o, i in zip(out, images):
            o[:, : i.shape[-2], : i.shape[-1]].copy_(i)
        return out

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        sizes = [tuple(i.shape[-2:]) for i in images]
        x = self.batch(images)
        features = self.backbone(x)
        proposals, rpn_losses = self.rpn(ImageList(x, sizes), features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, sizes, targets)
        return {**rpn_losses, **roi_losses} if self.training else detections


def build_model(backbone, num_classes: int, cfg: dict) -> C4RCNN:
    """The C4 detector around a copy of `backbone` (a transfer.artifact.Backbone with a torchvision ResNet)."""
    if cfg["norm"] not in ("SyncBN", "naiveSyncBN", "BN"):
        raise ValueError(f"norm {cfg['norm']!r}: the torchvision engine trains BN layers (BN, SyncBN, naiveSyncBN)")
    if cfg["freeze_at"] != 0:
        raise ValueError("the torchvision engine implements FREEZE_AT 0 (every layer trained), as the recipes ask")
    trunk = copy.deepcopy(backbone.trunk)
    c4 = C4Backbone(trunk)
    res5 = trunk.layer4
    out = stage_channels(res5)
    if cfg["extra_norm"]:
        res5.add_module("norm", nn.BatchNorm2d(out))
    anchors = AnchorGenerator(cfg["anchor_sizes"], cfg["anchor_ratios"])
    rpn = RPN(anchors, RPNHead(c4.out_channels, anchors.num_anchors_per_location()[0]), 0.7, 0.3,
              cfg["rpn_batch_per_image"], cfg["rpn_positive_fraction"],
              {"training": cfg["rpn_pre_nms_topk_train"], "testing": cfg["rpn_pre_nms_topk_test"]},
              {"training": cfg["rpn_post_nms_topk_train"], "testing": cfg["rpn_post_nms_topk_test"]},
              cfg["rpn_nms_thresh"], loss_weight=cfg["rpn_loss_weight"])
    heads = Res5ROIHeads(res5, out, num_classes, cfg, cfg["mask_on"])
    return C4RCNN(copy.deepcopy(backbone.transform), c4, rpn, heads)


# ----------------------------------------------------------------------------------------------- data
def resized_hw(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2 ResizeShortestEdge.get_output_shape."""
    scale = short / min(h, w)
    nh, nw = (short, scale * w) if h < w else (scale * h, short)
    if max(nh, nw) > max_size:
        s = max_size / max(nh, nw)
        nh, nw = nh * s, nw * s
    return int(nh + 0.5), int(nw + 0.5)


def segm_to_mask(segm, h0: int, w0: int, h: int, w: int) -> np.ndarray:
    """COCO/LVIS segmentation (polygons or RLE at h0 x w0) -> uint8 mask at h x w."""
    import pycocotools.mask as mask_util

    if isinstance(segm, list):
        scale = np.array([w / w0, h / h0])
        polys = [(np.asarray(p, dtype=np.float64).reshape(-1, 2) * scale).ravel().tolist() for p in segm]
        return mask_util.decode(mask_util.merge(mask_util.frPyObjects(polys, h, w)))
    rle = mask_util.frPyObjects(segm, h0, w0) if isinstance(segm["counts"], list) else segm
    m = torch.from_numpy(mask_util.decode(rle)).float()[None, None]
    return (F.interpolate(m, size=(h, w), mode="nearest")[0, 0] > 0.5).to(torch.uint8).numpy()


class DetectionData(Dataset):
    """Records -> (float RGB image in [0, 1] resized, target). Train: random short side from `short_sides`
    (detectron2 "choice"), horizontal flip, boxes/labels(1-based)/masks; test: {index, orig_size}."""

    def __init__(self, records, short_sides, max_size, train: bool, mask_on: bool = False, flip: bool = True):
        self.records, self.short_sides, self.max_size = records, list(short_sides), max_size
        self.train, self.mask_on, self.flip = train, mask_on, flip

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        from transfer.datasets import open_image

        r = self.records[i]
        img = open_image(r["file_name"])
        w0, h0 = img.size
        short = self.short_sides[int(torch.randint(len(self.short_sides), ()))] if self.train else self.short_sides[0]
        h, w = resized_hw(h0, w0, short, self.max_size)
        x = pil_to_tensor(img.resize((w, h), Image.BILINEAR)).float().div_(255)
        if not self.train:
            return x, {"index": i, "orig_size": (h0, w0)}
        anns = [a for a in r["annotations"] if not a.get("iscrowd", 0)]
        scale = torch.tensor([w / w0, h / h0, w / w0, h / h0])
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4) * scale
        boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float32))
        target = {"boxes": boxes, "labels": torch.tensor([a["category_id"] + 1 for a in anns], dtype=torch.int64)}
        if self.mask_on:
            masks = [torch.from_numpy(segm_to_mask(a["segmentation"], h0, w0, h, w)) for a in anns]
            target["masks"] = torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=torch.uint8)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
            if self.mask_on:
                target["masks"] = target["masks"].flip(-1)
        b = target["boxes"]
        keep = (b[:, 2] > b[:, 0] + 1e-5) & (b[:, 3] > b[:, 1] + 1e-5)
        return x, {k: v[keep] for k, v in target.items()}


def collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


def repeat_factors(records: list[dict], thresh: float) -> torch.Tensor:
    """detectron2 RepeatFactorTrainingSampler: r(image) = max over its categories of max(1, sqrt(t / f(c)))."""
    cats = [{a["category_id"] for a in r["annotations"]} for r in records]
    freq = Counter(c for cs in cats for c in cs)
    rep = {c: max(1.0, math.sqrt(thresh / (n / len(records)))) for c, n in freq.items()}
    return torch.tensor([max((rep[c] for c in cs), default=1.0) for cs in cats], dtype=torch.float64)


class InfiniteBatches:
    """Endless batches of indices: a seeded permutation per epoch (with stochastic repeat factors when given),
    shared by all ranks and sharded rank::world (detectron2 TrainingSampler / RepeatFactorTrainingSampler),
    grouped into batches of images with the same orientation (ASPECT_RATIO_GROUPING)."""

    def __init__(self, records, batch_size: int, seed: int, rank: int = 0, world: int = 1, repeat=None):
        self.landscape = [int(r["width"] > r["height"]) for r in records]
        self.batch_size, self.seed, self.rank, self.world, self.repeat = batch_size, seed, rank, world, repeat

    def indices(self):
        g = torch.Generator().manual_seed(self.seed)
        n = len(self.landscape)
        while True:
            if self.repeat is None:
                yield from torch.randperm(n, generator=g).tolist()
            else:
                reps = self.repeat.floor() + (torch.rand(n, generator=g, dtype=torch.float64)
                                              < self.repeat - self.repeat.floor())
                idx = torch.repeat_interleave(torch.arange(n), reps.long())
                yield from idx[torch.randperm(len(idx), generator=g)].tolist()

    def __iter__(self):
        buckets = ([], [])
        for i in islice(self.indices(), self.rank, None, self.world):
            bucket = buckets[self.landscape[i]]
            bucket.append(i)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()


# ----------------------------------------------------------------------------------------------- training
def lr_factor(it: int, cfg: dict) -> float:
    """WarmupMultiStepLR: gamma^(steps passed), times a linear warm-up from warmup_factor to 1."""
    factor = cfg["gamma"] ** bisect.bisect_right(cfg["steps"], it)
    if it < cfg["warmup_iters"]:
        alpha = it / cfg["warmup_iters"]
        factor *= cfg["warmup_factor"] * (1 - alpha) + alpha
    return factor


NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float, weight_decay_norm: float) -> list[dict]:
    """detectron2 get_default_optimizer_params: norm-layer parameters get weight_decay_norm, the rest (biases
    included) weight_decay."""
    decay, no_decay = [], []
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if p.requires_grad:
                (no_decay if isinstance(m, NORM_TYPES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": weight_decay_norm}]


def to_device(images, targets, device):
    return ([i.to(device, non_blocking=True) for i in images],
            [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets])


@torch.no_grad()
def precise_bn(model: nn.Module, batches, num_iter: int, device) -> int:
    """fvcore update_bn_stats: reset every BN's running statistics and set them to the plain average of the
    batch statistics of `num_iter` training batches (BN momentum None = cumulative average)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or num_iter <= 0:
        return 0
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for _ in range(num_iter):
        model(*to_device(*next(batches), device))
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    return num_iter


def train(model, batches, cfg: dict, device, log=print) -> dict:
    """Iteration-based SGD as detectron2's SimpleTrainer; returns loss history summary."""
    optimizer = torch.optim.SGD(param_groups(model, cfg["weight_decay"], cfg["weight_decay_norm"]),
                                lr=cfg["base_lr"], momentum=cfg["momentum"])
    model.train()
    history, curve, t0 = [], [], time.perf_counter()
    period = max(1, min(20, cfg["max_iter"] // 10))
    for it in range(cfg["max_iter"]):
        for group in optimizer.param_groups:
            group["lr"] = cfg["base_lr"] * lr_factor(it, cfg)
        losses = model(*to_device(*next(batches), device))
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"detection loss is {loss.item()} at iteration {it} "
                                     f"({ {k: float(v) for k, v in losses.items()} }); lower base_lr or check the "
                                     "backbone's weights and input preprocessing")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
        curve.append({"step": it + 1, "loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"]})
        if (it + 1) % period == 0 or it + 1 == cfg["max_iter"]:
            recent = history[-period:]
            mean = {k: sum(h[k] for h in recent) / len(recent) for k in recent[0]}
            log(f"[det] iter {it + 1}/{cfg['max_iter']} loss {sum(mean.values()):.3f} "
                + " ".join(f"{k[5:]}={v:.3f}" for k, v in mean.items())
                + f" lr {optimizer.param_groups[0]['lr']:.4g} {(time.perf_counter() - t0) / (it + 1):.2f}s/it")
    last = history[-max(1, min(20, len(history))):]
    return {"iterations": len(history), "final_losses": {k: sum(h[k] for h in last) / len(last) for k in last[0]},
            "s_per_iter": (time.perf_counter() - t0) / max(1, len(history)), "curve": training_curve(curve)}


@torch.no_grad()
def predict(model, loader, device, mask_on: bool) -> list[dict]:
    """Detections in original-image coordinates (detectron2 detector_postprocess), labels 0-based."""
    import pycocotools.mask as mask_util

    model.eval()
    out = []
    for images, metas in loader:
        detections = model([i.to(device) for i in images])
        for det, img, meta in zip(detections, images, metas):
            (h, w), (h0, w0) = img.shape[-2:], meta["orig_size"]
            boxes = det["boxes"] * torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h], device=det["boxes"].device)
            boxes = box_ops.clip_boxes_to_image(boxes, (h0, w0))
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            p = {"index": meta["index"], "boxes": boxes[keep].cpu().numpy(),
                 "scores": det["scores"][keep].cpu().numpy(), "labels": (det["labels"][keep] - 1).cpu().numpy()}
            if mask_on:
                masks = paste_masks_in_image(det["masks"][keep], boxes[keep], (h0, w0))[:, 0] > 0.5
                p["rles"] = [mask_util.encode(np.asfortranarray(m.cpu().numpy().astype(np.uint8))) for m in masks]
            out.append(p)
    return out


def evaluate(split: DetSplit, predictions: list[dict], cfg: dict) -> tuple[dict, dict]:
    """The split's metrics (detectron2 evaluator semantics, names of leaderboard/references.csv)."""
    if split.kind == "voc":
        preds = {split.records[p["index"]]["image_id"]: p for p in predictions}
        return det_eval.voc_metrics(split.records, preds, split.class_names, use_07_metric=split.year == 2007)
    results = []
    for p in predictions:
        image_id = split.records[p["index"]]["image_id"]
        for k, (box, score, label) in enumerate(zip(p["boxes"], p["scores"], p["labels"])):
            r = {"image_id": image_id, "category_id": split.cat_ids[int(label)], "score": float(score),
                 "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]}
            if "rles" in p:
                r["segmentation"] = p["rles"][k]
            results.append(r)
    tasks = ("bbox", "segm") if cfg["mask_on"] else ("bbox",)
    if split.kind == "coco":
        return det_eval.coco_metrics(split.api, results, tasks), {"detections": len(results)}
    return (det_eval.lvis_metrics(split.api, results, tasks, max_dets=cfg["detections_per_image"]),
            {"detections": len(results)})


# ----------------------------------------------------------------------------------------------- engine
def detectron2_available() -> bool:
    try:
        import detectron2  # noqa: F401
    except Exception:
        return False
    return True


def pick_engine() -> str:
    """detectron2 when importable, else torchvision; BENCH_DET_ENGINE forces one."""
    forced = os.environ.get(ENGINE_ENV, "").strip().lower()
    if forced and forced not in ("torchvision", "detectron2"):
        raise ValueError(f"{ENGINE_ENV}={forced!r}: use torchvision or detectron2")
    if forced == "detectron2" and not detectron2_available():
        raise ValueError(f"{ENGINE_ENV}=detectron2 but `import detectron2` fails; build detectron2 from source "
                         "or use the torchvision engine")
    return forced or ("detectron2" if detectron2_available() else "torchvision")


def run_detection(spec, backbone, cfg: dict, mode: str, seed: int, device, opts):
    """Engine entry point of `task: detection` benchmarks: (result, engine_cfg)."""
    from transfer.datasets import check_layout
    from transfer.errors import SpecError

    if mode != "train":
        raise SpecError(f"benchmark {spec.name} has no mode {mode!r}; modes: train")
    if backbone.family != "resnet":
        fits = spec.benchmarks_accepting(backbone.family)
        raise SpecError(f"{spec.name}: the C4 detector (res2..res4 backbone, res5 ROI head) needs a ResNet "
                        f"backbone, got {backbone.arch} ({backbone.family}); benchmarks that accept it: "
                        f"{', '.join(fits) or 'none yet'}")
    check_layout(spec.dataset, opts.data_root)
    if pick_engine() == "detectron2":
        from transfer import detectron2_engine

        return detectron2_engine.run(spec, backbone, cfg, seed, device, opts)
    return run_torchvision(spec, backbone, cfg, seed, device, opts)


def run_torchvision(spec, backbone, cfg: dict, seed: int, device, opts):
    """One process, the torchrun process group when WORLD_SIZE is set, or `num_gpus` spawned local workers."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or num_gpus(opts, device) == 1:
        return _worker(spec, backbone, cfg, seed, device, opts)
    import torch.multiprocessing as mp

    n = num_gpus(opts, device)
    with tempfile.TemporaryDirectory(prefix="bench-det-") as tmp:
        portable = (backbone.artifact_meta, trunk_state_dict(backbone.trunk))  # slim ResNets are local classes
        mp.start_processes(_spawned, nprocs=n, args=(n, _free_port(), tmp, spec, portable, cfg, seed,
                                                      torch.device(device).type, opts), join=True)
        return torch.load(os.path.join(tmp, "result.pt"), weights_only=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank, world, port, tmp, spec, portable, cfg, seed, device_type, opts):
    meta, state = portable
    art = BackboneArtifact(meta["arch"], state, Preprocessing.from_dict(meta["preprocessing"]), meta["provenance"],
                           meta["arch_kwargs"])
    trunk = build_backbone(art.arch, **art.arch_kwargs)
    trunk.load_state_dict(state)
    backbone = Backbone(art, trunk)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    out = _worker(spec, backbone, cfg, seed, torch.device("cuda", rank) if device_type == "cuda" else "cpu", opts)
    if rank == 0:
        torch.save(out, os.path.join(tmp, "result.pt"))


def _worker(spec, backbone, cfg: dict, seed: int, device, opts):
    """One process: data, model, training, precise BN, evaluation (sharded, gathered to rank 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    log = print if rank == 0 else (lambda *a, **k: None)
    if cfg["ims_per_batch"] % world:
        raise ValueError(f"ims_per_batch {cfg['ims_per_batch']} is not divisible by {world} processes")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train_splits = [load_split(n, opts.data_root) for n in cfg["train_sets"]]
    test = load_split(cfg["test_sets"][0], opts.data_root)
    records = [r for s in train_splits for r in s.records
               if any(not a.get("iscrowd", 0) for a in r["annotations"])]  # FILTER_EMPTY_ANNOTATIONS
    class_names = train_splits[0].class_names
    model = build_model(backbone, len(class_names), cfg).to(device)
    if world > 1:
        if device.type == "cuda" and cfg["norm"] != "BN":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    repeat = (repeat_factors(records, cfg["repeat_threshold"]) if cfg["sampler"] == "RepeatFactorTrainingSampler"
              else None)
    train_data = DetectionData(records, cfg["train_short_sides"], cfg["max_size"], True, cfg["mask_on"],
                               cfg["random_flip"] == "horizontal")
    loader = DataLoader(train_data, batch_sampler=InfiniteBatches(records, cfg["ims_per_batch"] // world, seed, rank,
                                                                  world, repeat),
                        collate_fn=collate, num_workers=opts.workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(seed * 1000 + rank))
    batches = iter(loader)
    t_data = time.perf_counter() - t0
    log(f"[det] {spec.name}: {len(records)} training images ({', '.join(cfg['train_sets'])}), {len(class_names)} "
        f"classes, {cfg['max_iter']} iterations at {cfg['ims_per_batch']} images/iteration on {world} x {device.type}")
    summary = train(model, batches, cfg, device, log)
    t_train = time.perf_counter() - t0 - t_data
    precise_bn(model, batches, cfg["precise_bn_iters"], device)
    t_bn = time.perf_counter() - t0 - t_data - t_train
    del batches, loader
    test_data = DetectionData(test.records, [cfg["test_short_side"]], cfg["test_max_size"], False)
    shard = torch.utils.data.Subset(test_data, list(range(rank, len(test_data), world)))
    preds = predict(model.module if world > 1 else model,
                    DataLoader(shard, batch_size=1, collate_fn=collate, num_workers=opts.workers), device,
                    cfg["mask_on"])
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, preds)
        preds = [p for g in gathered for p in g]
    metrics, extra = evaluate(test, preds, cfg) if rank == 0 else ({}, {})
    if world > 1:
        box = [metrics, extra]
        dist.broadcast_object_list(box, src=0)
        metrics, extra = box
    t_eval = time.perf_counter() - t0 - t_data - t_train - t_bn
    if rank == 0:  # a few val images with their best detections, drawn by `bench report --format html`
        extra["pictures"] = save_run_pictures(opts.out, f"{spec.name}__{backbone.artifact_meta['weights_hash'][7:19]}"
                                              f"__s{seed}", detection_pictures(test.records, preds, class_names))
    engine_cfg = {"name": "torchvision", "model": ("Mask" if cfg["mask_on"] else "Faster") + " R-CNN C4",
                  "backbone": backbone.arch, "world_size": world, "ims_per_device": cfg["ims_per_batch"] // world,
                  "norm": ("SyncBatchNorm" if world > 1 and device.type == "cuda" and cfg["norm"] != "BN"
                           else "BatchNorm2d (single process)"),
                  "train_images": len(records), "test_images": len(test.records), "num_classes": len(class_names),
                  "test_set": test.name, "evaluator": {"voc": "VOC2007 11-point, IoU .50:.95" if test.year == 2007
                                                       else "VOC area, IoU .50:.95", "coco": "pycocotools COCOeval",
                                                       "lvis": "lvis LVISEval"}[test.kind],
                  "resolved": {k: v for k, v in cfg.items() if k != "source"}}
    result = {"metrics": metrics, "extra": {**summary, **extra, "precise_bn_iters": cfg["precise_bn_iters"]},
              "timings": {"data_s": t_data, "train_s": t_train, "precise_bn_s": t_bn, "eval_s": t_eval}}
    return result, engine_cfg
