"""C4 detection through detectron2 itself (engine `detectron2`, used whenever `import detectron2` works).

Three parts, only the last one imports detectron2:
- `convert_state_dict` / `write_pkl`: the MoCo convert-pretrain-to-detectron2 rules (moco@7397dfe) on a
  torchvision ResNet state dict, pickled with `matching_heuristics` so res5 lands in `roi_heads.res5`;
- `detectron2_config`: the full detectron2 config of a recipe as a plain nested dict with detectron2's keys
  (Base-RCNN-C4-BN + the VOC / COCO / LVIS recipe), dumped to YAML and merged into `get_cfg()`;
- `run`: registers `Res5ROIHeadsExtraNorm` (moco's train_net.py: Res5ROIHeads + one norm layer after res5),
  a high-pass meta-architecture for MSCN backbones, and the datasets of --data-root under `bench_<name>`,
  then trains with detectron2's DefaultTrainer through `launch` (`bench run --gpus N` processes)
  and evaluates with PascalVOCDetectionEvaluator / COCOEvaluator / LVISEvaluator.
"""
from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import yaml

DEPTHS = {"resnet50": 50, "resnet101": 101, "resnet152": 152}
PREFIX = "bench_"  # registered dataset names: bench_voc_2007_trainval, bench_coco_2017_val, ...


# ----------------------------------------------------------------------------------------------- weights
def convert_key(key: str) -> str:
    """MoCo / detectron2 convert-torchvision-to-d2 renaming of one torchvision ResNet key, rules in order."""
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def convert_state_dict(state: dict, prefix: str | None = None) -> dict:
    """Renamed numpy weights; with `prefix` (e.g. `module.encoder_q.`) only keys under it, prefix stripped."""
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {convert_key(k): v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
            for k, v in state.items()}


def write_pkl(state: dict, path: str | os.PathLike, prefix: str | None = None) -> Path:
    """detectron2 weights file: {"model", "__author__": "MOCO", "matching_heuristics": True} as .pkl."""
    path = Path(path)
    if path.suffix != ".pkl":
        raise ValueError(f"{path}: detectron2 reads converted weights only from a .pkl file")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"model": convert_state_dict(state, prefix), "__author__": "MOCO",
                     "matching_heuristics": True}, f)
    return path


# ----------------------------------------------------------------------------------------------- config
def resnet_config(arch: str, width: int = 64) -> dict:
    """MODEL.RESNETS for a torchvision-style bottleneck ResNet (width = stem channels; 64 is standard)."""
    if arch not in DEPTHS:
        raise ValueError(f"detectron2's C4 head (Res5ROIHeads) needs a bottleneck ResNet-50/101/152, got {arch}")
    return {"DEPTH": DEPTHS[arch], "OUT_FEATURES": ["res4"], "NUM_GROUPS": 1, "WIDTH_PER_GROUP": width,
            "STEM_OUT_CHANNELS": width, "RES2_OUT_CHANNELS": 4 * width, "STRIDE_IN_1X1": False,
            "RES5_DILATION": 1}


def detectron2_config(cfg: dict, *, num_classes: int, arch: str = "resnet50", width: int = 64,
                      preprocessing: dict | None = None, weights: str = "", output_dir: str = "./output",
                      device: str = "cuda", num_workers: int = 4, seed: int = -1) -> dict:
    """The detectron2 config of a resolved recipe `cfg`, as a nested dict with detectron2's keys."""
    prep = preprocessing or {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "color": "RGB"}
    resnets = resnet_config(arch, width)
    resnets["NORM"] = cfg["norm"]
    model = {
        "META_ARCHITECTURE": "GeneralizedRCNNHighPass" if prep.get("highpass_sigma") else "GeneralizedRCNN",
        "DEVICE": device, "WEIGHTS": str(weights), "MASK_ON": bool(cfg["mask_on"]),
        "PIXEL_MEAN": list(prep["mean"]), "PIXEL_STD": list(prep["std"]),
        "BACKBONE": {"NAME": "build_resnet_backbone", "FREEZE_AT": cfg["freeze_at"]},
        "RESNETS": resnets,
        "ANCHOR_GENERATOR": {"NAME": "DefaultAnchorGenerator", "SIZES": [list(cfg["anchor_sizes"])],
                             "ASPECT_RATIOS": [list(cfg["anchor_ratios"])], "OFFSET": 0.0},
        "PROPOSAL_GENERATOR": {"NAME": "RPN", "MIN_SIZE": 0},
        "RPN": {"HEAD_NAME": "StandardRPNHead", "IN_FEATURES": ["res4"], "BOUNDARY_THRESH": -1,
                "IOU_THRESHOLDS": [0.3, 0.7], "IOU_LABELS": [0, -1, 1],
                "BATCH_SIZE_PER_IMAGE": cfg["rpn_batch_per_image"], "POSITIVE_FRACTION": cfg["rpn_positive_fraction"],
                "BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0], "SMOOTH_L1_BETA": 0.0, "LOSS_WEIGHT": cfg["rpn_loss_weight"],
                "PRE_NMS_TOPK_TRAIN": cfg["rpn_pre_nms_topk_train"],
                "POST_NMS_TOPK_TRAIN": cfg["rpn_post_nms_topk_train"],
                "PRE_NMS_TOPK_TEST": cfg["rpn_pre_nms_topk_test"], "POST_NMS_TOPK_TEST": cfg["rpn_post_nms_topk_test"],
                "NMS_THRESH": cfg["rpn_nms_thresh"]},
        "ROI_HEADS": {"NAME": "Res5ROIHeadsExtraNorm" if cfg["extra_norm"] else "Res5ROIHeads",
                      "NUM_CLASSES": num_classes, "IN_FEATURES": ["res4"], "IOU_THRESHOLDS": [0.5],
                      "IOU_LABELS": [0, 1],
                      "BATCH_SIZE_PER_IMAGE": cfg["roi_batch_per_image"],
                      "POSITIVE_FRACTION": cfg["roi_positive_fraction"], "SCORE_THRESH_TEST": cfg["score_thresh_test"],
                      "NMS_THRESH_TEST": cfg["nms_thresh_test"], "PROPOSAL_APPEND_GT": True},
        "ROI_BOX_HEAD": {"POOLER_TYPE": "ROIAlignV2", "POOLER_RESOLUTION": cfg["pooler_resolution"],
                         "POOLER_SAMPLING_RATIO": 0, "BBOX_REG_WEIGHTS": list(cfg["bbox_reg_weights"]),
                         "SMOOTH_L1_BETA": 0.0, "CLS_AGNOSTIC_BBOX_REG": False},
        "ROI_MASK_HEAD": {"NAME": "MaskRCNNConvUpsampleHead", "NUM_CONV": 0, "CONV_DIM": 256,
                          "POOLER_TYPE": "ROIAlignV2", "POOLER_RESOLUTION": cfg["pooler_resolution"],
                          "POOLER_SAMPLING_RATIO": 0, "CLS_AGNOSTIC_MASK": False},
    }
    if prep.get("highpass_sigma"):
        model["HIGHPASS_SIGMA"] = float(prep["highpass_sigma"])
    return {
        "VERSION": 2,
        "MODEL": model,
        "INPUT": {"FORMAT": prep.get("color", "RGB"), "MIN_SIZE_TRAIN": list(cfg["train_short_sides"]),
                  "MIN_SIZE_TRAIN_SAMPLING": "choice", "MAX_SIZE_TRAIN": cfg["max_size"],
                  "MIN_SIZE_TEST": cfg["test_short_side"], "MAX_SIZE_TEST": cfg["test_max_size"],
                  "RANDOM_FLIP": cfg["random_flip"], "MASK_FORMAT": "polygon"},
        "DATASETS": {"TRAIN": [PREFIX + n for n in cfg["train_sets"]], "TEST": [PREFIX + n for n in cfg["test_sets"]]},
        "DATALOADER": {"NUM_WORKERS": num_workers, "ASPECT_RATIO_GROUPING": True, "SAMPLER_TRAIN": cfg["sampler"],
                       "REPEAT_THRESHOLD": cfg["repeat_threshold"], "FILTER_EMPTY_ANNOTATIONS": True},
        "SOLVER": {"LR_SCHEDULER_NAME": "WarmupMultiStepLR", "IMS_PER_BATCH": cfg["ims_per_batch"],
                   "BASE_LR": cfg["base_lr"], "MOMENTUM": cfg["momentum"], "NESTEROV": False,
                   "WEIGHT_DECAY": cfg["weight_decay"], "WEIGHT_DECAY_NORM": cfg["weight_decay_norm"],
                   "GAMMA": cfg["gamma"], "STEPS": list(cfg["steps"]), "MAX_ITER": cfg["max_iter"],
                   "WARMUP_FACTOR": cfg["warmup_factor"], "WARMUP_ITERS": cfg["warmup_iters"],
                   "WARMUP_METHOD": "linear", "CHECKPOINT_PERIOD": max(cfg["max_iter"], 1),
                   "REFERENCE_WORLD_SIZE": 0},
        "TEST": {"EVAL_PERIOD": 0, "DETECTIONS_PER_IMAGE": cfg["detections_per_image"],
                 "PRECISE_BN": {"ENABLED": cfg["precise_bn_iters"] > 0, "NUM_ITER": max(cfg["precise_bn_iters"], 1)}},
        "OUTPUT_DIR": str(output_dir),
        "SEED": seed,
    }


# ----------------------------------------------------------------------------------------------- detectron2
def register_components() -> None:
    """Res5ROIHeadsExtraNorm (as in moco's train_net.py) and the high-pass meta-architecture; idempotent."""
    from detectron2.layers import get_norm
    from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

    if "Res5ROIHeadsExtraNorm" not in ROI_HEADS_REGISTRY:
        @ROI_HEADS_REGISTRY.register()
        class Res5ROIHeadsExtraNorm(Res5ROIHeads):
            """Res5ROIHeads with one extra norm layer after res5 (MoCo paper)."""

            def __init__(self, cfg, input_shape):
                super().__init__(cfg, input_shape)
                self.res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, self.res5[-1].out_channels))

    if "GeneralizedRCNNHighPass" not in META_ARCH_REGISTRY:
        @META_ARCH_REGISTRY.register()
        class GeneralizedRCNNHighPass(GeneralizedRCNN):
            """GeneralizedRCNN whose normalised images get the MSCN high-pass filter before padding."""

            def __init__(self, cfg):
                super().__init__(cfg)
                self.highpass_sigma = cfg.MODEL.HIGHPASS_SIGMA

            def preprocess_image(self, batched_inputs):
                from detectron2.structures import ImageList

                from transfer.artifact import high_pass

                images = [self._move_to_current_device(x["image"]) for x in batched_inputs]
                images = [high_pass(((x - self.pixel_mean) / self.pixel_std)[None], self.highpass_sigma)[0]
                          for x in images]
                return ImageList.from_tensors(images, self.backbone.size_divisibility,
                                              padding_constraints=self.backbone.padding_constraints)


def layout_paths(name: str, data_root: str) -> dict:
    """Where a split lives in the real layouts (transfer/datasets.py EXPECTED_LAYOUTS)."""
    kind, version, split = name.split("_", 2)
    root = Path(data_root)
    if kind == "voc":
        return {"dir": root / "VOCdevkit" / f"VOC{version}", "split": split, "year": int(version)}
    if kind == "coco":
        return {"json": root / "coco" / "annotations" / f"instances_{split}{version}.json",
                "images": root / "coco" / f"{split}{version}"}
    if kind == "lvis":
        return {"json": root / "lvis" / f"lvis_{version}_{split}.json"}
    raise ValueError(f"unknown detection split {name!r} (voc_<year>_<split>, coco_2017_<split>, lvis_v1_<split>)")


def register_datasets(names: list[str], data_root: str) -> None:
    """Register `bench_<name>` for each split from the real layouts: detectron2's own VOC and COCO loaders
    (so its evaluators read the same files); LVIS through bench's loader with the json's own categories."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances, register_pascal_voc

    from transfer.datasets import VOC_CLASSES

    for name in names:
        if PREFIX + name in DatasetCatalog.list():
            continue
        kind = name.split("_")[0]
        paths = layout_paths(name, data_root)
        if kind == "voc":
            register_pascal_voc(PREFIX + name, str(paths["dir"]), paths["split"], paths["year"], list(VOC_CLASSES))
        elif kind == "coco":
            register_coco_instances(PREFIX + name, {}, str(paths["json"]), str(paths["images"]))
        else:
            _register_lvis(PREFIX + name, name, data_root, str(paths["json"]))
        MetadataCatalog.get(PREFIX + name).set(bench_kind=kind)


def _register_lvis(registered: str, name: str, data_root: str, json_file: str) -> None:
    """LVIS with metadata from the json itself (detectron2's built-in LVIS metadata assumes 1203 classes)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from transfer.detection_data import load_split

    def records():
        split = load_split(name, data_root)
        for r in split.records:
            r["annotations"] = [{**{k: a[k] for k in ("bbox", "category_id", "segmentation")}, "bbox_mode": 0}
                                for a in r["annotations"]]  # BoxMode.XYXY_ABS
        return split.records

    split = load_split(name, data_root)
    DatasetCatalog.register(registered, records)
    MetadataCatalog.get(registered).set(
        json_file=json_file, evaluator_type="lvis", thing_classes=split.class_names,
        thing_dataset_id_to_contiguous_id={c: i for i, c in enumerate(split.cat_ids)})


class NumpyAliased:
    """A detectron2 evaluator whose evaluate() runs under det_eval.numpy_aliases (lvis 0.5.3 calls `np.float`,
    gone since NumPy 1.24); reset/process pass through (inference_on_dataset needs only these three)."""

    def __init__(self, evaluator):
        self.evaluator = evaluator

    def reset(self):
        return self.evaluator.reset()

    def process(self, inputs, outputs):
        return self.evaluator.process(inputs, outputs)

    def evaluate(self):
        from transfer.det_eval import numpy_aliases

        with numpy_aliases():
            return self.evaluator.evaluate()


def _evaluator(dataset_name: str, output_dir: str, max_dets: int):
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import COCOEvaluator, LVISEvaluator, PascalVOCDetectionEvaluator

    kind = MetadataCatalog.get(dataset_name).bench_kind
    if kind == "voc":
        return PascalVOCDetectionEvaluator(dataset_name)
    if kind == "coco":
        return COCOEvaluator(dataset_name, output_dir=output_dir)
    return NumpyAliased(LVISEvaluator(dataset_name, output_dir=output_dir, max_dets_per_image=max_dets))


def _defined(value) -> bool:
    """False for undefined APs: NaN (COCOEvaluator) or negative (LVISEvaluator reports LVISEval's -1 x 100)."""
    return isinstance(value, (int, float)) and bool(np.isfinite(value)) and value >= 0


def metrics_from(results: dict, kind: str) -> dict:
    """detectron2 evaluator results -> leaderboard names (VOC: AP/AP50/AP75; COCO/LVIS: APbb*, APmk*).
    Undefined values (NaN, LVIS's -100) and per-category entries are left out."""
    if "bbox" not in results and len(results) == 1:  # several test sets: {dataset: {task: ...}}
        results = next(iter(results.values()))
    if kind == "voc":
        return {k: float(results["bbox"][k]) for k in ("AP", "AP50", "AP75")}
    return {f"AP{tag}{k[2:]}": float(v) for task, tag in (("bbox", "bb"), ("segm", "mk"))
            for k, v in results.get(task, {}).items() if k.startswith("AP") and "-" not in k and _defined(v)}


def _finite(value):
    """Evaluator results with undefined APs (NaN, -100) as None, so the record stays plain JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return float(value) if _defined(value) else None


RESULTS_FILE = "bench_results.json"   # OUTPUT_DIR/metrics.json is detectron2's own training log: left alone


def iteration_timing(output_dir: str | os.PathLike) -> dict:
    """s/iter from detectron2's training log OUTPUT_DIR/metrics.json (one JSON object per logged iteration; `time`
    is IterationTimer's windowed median): median over the logged iterations, and how many were logged."""
    path = Path(output_dir) / "metrics.json"
    if not path.is_file():
        return {}
    times = [row["time"] for row in map(json.loads, path.read_text().splitlines()) if "time" in row]
    return {"s_per_iter": float(np.median(times)), "logged_iters": len(times)} if times else {}


def _main(config_file: str, names: list[str], data_root: str, result_file: str) -> None:
    """Runs in every launched process: register, build DefaultTrainer, train (precise BN + final eval)."""
    import argparse

    from detectron2.config import get_cfg
    from detectron2.engine import DefaultTrainer, default_setup
    from detectron2.utils import comm

    register_components()
    register_datasets(names, data_root)
    cfg = get_cfg()
    cfg.MODEL.HIGHPASS_SIGMA = 0.0
    cfg.merge_from_file(config_file)
    cfg.freeze()
    default_setup(cfg, argparse.Namespace(config_file=config_file, eval_only=False, resume=False))

    class Trainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            return _evaluator(dataset_name, output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"),
                              cfg.TEST.DETECTIONS_PER_IMAGE)

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    if comm.is_main_process():
        Path(result_file).write_text(json.dumps(getattr(trainer, "_last_eval_results", {}), default=float))


def run(spec, backbone, cfg: dict, seed: int, device, opts):
    """Train + evaluate one trial with detectron2; returns (result, engine_cfg)."""
    import torch
    from detectron2.engine import launch

    from transfer.detection_data import load_split, num_gpus

    t0 = time.perf_counter()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(opts.out).resolve() / "detectron2" / f"{spec.name}-{cfg['name']}-seed{seed}-{stamp}"
    weights = write_pkl(backbone.trunk.state_dict(), out_dir / "backbone.pkl")
    classes = load_split(cfg["train_sets"][0], opts.data_root).class_names
    device = torch.device(device)
    config = detectron2_config(cfg, num_classes=len(classes), arch=backbone.arch,
                               width=backbone.artifact_meta.get("arch_kwargs", {}).get("width", 64),
                               preprocessing=backbone.artifact_meta["preprocessing"], weights=str(weights),
                               output_dir=str(out_dir), device=device.type, num_workers=opts.workers, seed=seed)
    config_file = out_dir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    n = num_gpus(opts, device)
    result_file = out_dir / RESULTS_FILE
    launch(_main, n, dist_url="auto",
           args=(str(config_file), list(cfg["train_sets"]) + list(cfg["test_sets"]), opts.data_root,
                 str(result_file)))
    results = json.loads(result_file.read_text())
    metrics = metrics_from(results, cfg["test_sets"][0].split("_")[0])
    engine_cfg = {"name": "detectron2", "num_gpus": n, "config": config, "config_file": str(config_file),
                  "weights": str(weights), "num_classes": len(classes)}
    return {"metrics": metrics, "extra": {"detectron2_results": _finite(results), "output_dir": str(out_dir),
                                          "detectron2_log": str(out_dir / "metrics.json")},
            "timings": {"train_eval_s": time.perf_counter() - t0, **iteration_timing(out_dir)}}, engine_cfg
