"""detectron2 engine without detectron2: MoCo key conversion and the generated config vs the recipe table."""
import pickle
import re

import pytest
import torch
import torchvision

from benchmarks.spec import get_spec, resolve
from transfer.detectron2_engine import convert_key, convert_state_dict, detectron2_config, write_pkl

D2_KEY = re.compile(r"^(stem\.conv1(\.norm)?|res[2-5]\.\d+\.(conv[123](\.norm)?|shortcut(\.norm)?))"
                    r"\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def expected_key(key: str) -> str:
    """PROTOCOLS.md's MoCo rules written out independently (stem, stages, norms, shortcut)."""
    m = re.match(r"^layer(\d)\.(\d+)\.(.*)$", key)
    if not m:
        return "stem." + key.replace("bn1", "conv1.norm")
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn(\d)", r"conv\1.norm", rest)
    rest = rest.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
    return f"res{stage}.{block}.{rest}"


def test_torchvision_resnet50_converts_with_the_moco_rules(tmp_path):
    state = torchvision.models.resnet50().state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    converted = convert_state_dict(state)
    assert len(converted) == len(state) == 318                   # nothing lost, nothing merged
    for key, value in state.items():
        new = expected_key(key)
        assert convert_key(key) == new and D2_KEY.match(new), key
        assert converted[new].shape == tuple(value.shape)
    assert convert_key("layer1.0.downsample.1.running_var") == "res2.0.shortcut.norm.running_var"
    assert convert_key("bn1.weight") == "stem.conv1.norm.weight"
    assert convert_key("layer4.2.bn3.num_batches_tracked") == "res5.2.conv3.norm.num_batches_tracked"

    blob = pickle.loads(write_pkl(state, tmp_path / "r50.pkl").read_bytes())
    assert blob["__author__"] == "MOCO" and blob["matching_heuristics"] is True
    assert set(blob["model"]) == set(converted)
    with pytest.raises(ValueError, match=".pkl"):
        write_pkl(state, tmp_path / "r50.pth")


def test_moco_checkpoint_prefix_and_matching_heuristics():
    """encoder_q kept and stripped, encoder_k dropped, fc -> stem.fc (ignored); detectron2's longest dot-suffix
    matching then puts res2..res4 in the backbone and res5 in roi_heads (C4)."""
    state = {"module.encoder_q." + k: v for k, v in torchvision.models.resnet50().state_dict().items()}
    state["module.encoder_k.conv1.weight"] = torch.zeros(1)
    state["module.queue"] = torch.zeros(1)
    converted = convert_state_dict(state, prefix="module.encoder_q.")
    assert "stem.fc.weight" in converted and not any("encoder_k" in k or "queue" in k for k in converted)
    model_keys = ["backbone.stem.conv1.weight", "backbone.stem.conv1.norm.running_mean",
                  "backbone.res4.5.conv3.norm.bias", "roi_heads.res5.0.shortcut.weight",
                  "roi_heads.res5.2.conv2.norm.weight", "roi_heads.res5.norm.weight"]

    def match(model_key):
        hits = [k for k in converted if model_key == k or model_key.endswith("." + k)]
        return max(hits, key=len) if hits else None

    assert [match(k) for k in model_keys] == ["stem.conv1.weight", "stem.conv1.norm.running_mean",
                                              "res4.5.conv3.norm.bias", "res5.0.shortcut.weight",
                                              "res5.2.conv2.norm.weight", None]   # ExtraNorm starts fresh


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


COMMON = {  # Base-RCNN-C4-BN + *_moco.yaml + detectron2 defaults (PROTOCOLS.md, harnesses.md 1.3)
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN", "MODEL.ROI_HEADS.NAME": "Res5ROIHeadsExtraNorm",
    "MODEL.BACKBONE.FREEZE_AT": 0, "MODEL.RESNETS.NORM": "SyncBN", "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "MODEL.RESNETS.DEPTH": 50, "MODEL.RESNETS.OUT_FEATURES": ["res4"], "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64, "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375], "INPUT.FORMAT": "RGB",
    "MODEL.ANCHOR_GENERATOR.SIZES": [[32, 64, 128, 256, 512]],
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
    "MODEL.RPN.IN_FEATURES": ["res4"], "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 12000, "MODEL.RPN.POST_NMS_TOPK_TRAIN": 2000,
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000, "MODEL.RPN.POST_NMS_TOPK_TEST": 1000, "MODEL.RPN.NMS_THRESH": 0.7,
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE": 256, "MODEL.RPN.POSITIVE_FRACTION": 0.5,
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlignV2", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 14,
    "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0], "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 512,
    "MODEL.ROI_HEADS.POSITIVE_FRACTION": 0.25, "MODEL.ROI_HEADS.NMS_THRESH_TEST": 0.5,
    "INPUT.MAX_SIZE_TRAIN": 1333, "INPUT.MIN_SIZE_TEST": 800, "INPUT.MAX_SIZE_TEST": 1333,
    "INPUT.RANDOM_FLIP": "horizontal", "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice",
    "SOLVER.IMS_PER_BATCH": 16, "SOLVER.MOMENTUM": 0.9, "SOLVER.WEIGHT_DECAY": 1e-4, "SOLVER.WEIGHT_DECAY_NORM": 0.0,
    "SOLVER.GAMMA": 0.1, "SOLVER.WARMUP_METHOD": "linear", "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR",
    "TEST.PRECISE_BN.ENABLED": True, "TEST.PRECISE_BN.NUM_ITER": 200,
}
VOC = {"MODEL.MASK_ON": False, "MODEL.ROI_HEADS.NUM_CLASSES": 20, "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.05,
       "TEST.DETECTIONS_PER_IMAGE": 100, "INPUT.MIN_SIZE_TRAIN": list(range(480, 801, 32)),
       "DATASETS.TRAIN": ["bench_voc_2007_trainval", "bench_voc_2012_trainval"],
       "DATASETS.TEST": ["bench_voc_2007_test"],
       "SOLVER.STEPS": [18000, 22000], "SOLVER.MAX_ITER": 24000, "DATALOADER.SAMPLER_TRAIN": "TrainingSampler"}
TABLE = {
    ("voc07+12", "moco"): {**COMMON, **VOC, "SOLVER.BASE_LR": 0.02, "SOLVER.WARMUP_ITERS": 100,
                           "SOLVER.WARMUP_FACTOR": 0.001, "MODEL.RPN.LOSS_WEIGHT": 1.0},
    ("voc07+12", "vicreg"): {**COMMON, **VOC, "SOLVER.BASE_LR": 0.1, "SOLVER.WARMUP_ITERS": 1000,
                             "SOLVER.WARMUP_FACTOR": 0.333, "MODEL.RPN.LOSS_WEIGHT": 0.2},
    ("coco-c4-1x", "moco"): {**COMMON, "MODEL.MASK_ON": True, "MODEL.ROI_HEADS.NUM_CLASSES": 80,
                             "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.NUM_CONV": 0,
                             "MODEL.ROI_MASK_HEAD.CONV_DIM": 256, "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14,
                             "INPUT.MIN_SIZE_TRAIN": list(range(640, 801, 32)), "SOLVER.BASE_LR": 0.02,
                             "SOLVER.STEPS": [60000, 80000], "SOLVER.MAX_ITER": 90000, "SOLVER.WARMUP_ITERS": 1000,
                             "SOLVER.WARMUP_FACTOR": 0.001, "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.05,
                             "TEST.DETECTIONS_PER_IMAGE": 100, "DATASETS.TRAIN": ["bench_coco_2017_train"],
                             "DATASETS.TEST": ["bench_coco_2017_val"]},
    ("lvis-c4", "bench"): {**COMMON, "MODEL.MASK_ON": True, "MODEL.ROI_HEADS.NUM_CLASSES": 1203,
                           "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 1e-4, "TEST.DETECTIONS_PER_IMAGE": 300,
                           "DATALOADER.SAMPLER_TRAIN": "RepeatFactorTrainingSampler",
                           "DATALOADER.REPEAT_THRESHOLD": 0.001,
                           "INPUT.MIN_SIZE_TRAIN": list(range(640, 801, 32)), "SOLVER.BASE_LR": 0.02,
                           "SOLVER.STEPS": [120000, 160000], "SOLVER.MAX_ITER": 180000,
                           "DATASETS.TRAIN": ["bench_lvis_v1_train"], "DATASETS.TEST": ["bench_lvis_v1_val"]},
}


@pytest.mark.parametrize("benchmark,recipe", list(TABLE))
def test_config_equals_recipe_table(benchmark, recipe):
    spec = get_spec(benchmark)
    cfg, _ = resolve(spec, recipe)
    config = flat(detectron2_config(cfg, num_classes=spec.num_classes, weights="w.pkl"))
    for key, value in TABLE[benchmark, recipe].items():
        assert key in config, key
        assert config[key] == pytest.approx(value) if isinstance(value, float) else config[key] == value, key
    assert config["MODEL.WEIGHTS"] == "w.pkl"
    assert spec.engines == ("detectron2", "torchvision") and spec.default_mode == "train"


def test_config_follows_backbone_and_budget():
    spec = get_spec("voc07+12")
    cfg, overrides = resolve(spec, "moco", budget="tiny")
    assert overrides["max_iter"] < 24000 and overrides["roi_batch_per_image"] == 16
    config = flat(detectron2_config(cfg, num_classes=20, arch="resnet50", width=16,
                                    preprocessing={"mean": [1, 2, 3], "std": [4, 5, 6], "highpass_sigma": 5.0}))
    assert config["MODEL.RESNETS.WIDTH_PER_GROUP"] == 16 and config["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 64
    assert config["SOLVER.MAX_ITER"] == cfg["max_iter"] and config["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"] == 16
    assert config["MODEL.META_ARCHITECTURE"] == "GeneralizedRCNNHighPass" and config["MODEL.HIGHPASS_SIGMA"] == 5.0
    assert config["MODEL.PIXEL_MEAN"] == [1, 2, 3]
    with pytest.raises(ValueError, match="bottleneck"):
        detectron2_config(cfg, num_classes=20, arch="resnet18")


def test_layout_paths_point_at_the_real_layouts(mini_root):
    from transfer.detectron2_engine import layout_paths

    for benchmark in ("voc07+12", "coco-c4-1x", "lvis-c4"):
        cfg, _ = resolve(get_spec(benchmark), None)
        for name in cfg["train_sets"] + cfg["test_sets"]:
            paths = layout_paths(name, str(mini_root))
            assert (paths["dir"] / "ImageSets" / "Main" / f"{paths['split']}.txt").is_file() if "dir" in paths \
                else paths["json"].is_file(), name


def test_another_global_batch_follows_the_linear_scaling_rule():
    """PROTOCOLS.md: "halve batch and LR and double iterations and steps" (detectron2's auto_scale_workers)."""
    cfg, overrides = resolve(get_spec("voc07+12"), "moco", overrides={"batch_size": 8})
    # the CLI's --batch-size names the recipe's field; the derived values are recorded as overrides too
    assert overrides == {"ims_per_batch": 8, "base_lr": 0.01, "max_iter": 48000, "steps": [36000, 44000],
                         "warmup_iters": 200}
    assert cfg["ims_per_batch"] == 8 and cfg["base_lr"] == pytest.approx(0.01)
    assert (cfg["max_iter"], cfg["steps"], cfg["warmup_iters"]) == (48000, [36000, 44000], 200)
    assert cfg["linear_scaling"]["factor"] == 0.5 and cfg["linear_scaling"]["scaled"]["base_lr"][0] == 0.02
    config = flat(detectron2_config(cfg, num_classes=20, arch="resnet50"))
    assert config["SOLVER.BASE_LR"] == pytest.approx(0.01) and config["SOLVER.IMS_PER_BATCH"] == 8
    # what the user (or a budget preset) sets explicitly is kept; only the rest follows the rule
    seg, _ = resolve(get_spec("ade20k"), "r50", overrides={"batch_size": 32, "max_iter": 1000})
    assert seg["lr"] == pytest.approx(0.02) and seg["max_iters"] == 1000 and "max_iters" not in seg["linear_scaling"]["scaled"]
    tiny, _ = resolve(get_spec("coco-c4-1x"), "moco", budget="tiny", overrides={"lr": 0.05})
    assert tiny["base_lr"] == 0.05 and "base_lr" not in tiny["linear_scaling"]["scaled"]
    # the reference batch changes nothing; linear probes scale their LR at run time (lr_batch)
    assert "linear_scaling" not in resolve(get_spec("voc07+12"), "moco", overrides={"batch_size": 16})[0]
    assert "linear_scaling" not in resolve(get_spec("places205"), "vissl", overrides={"batch_size": 64})[0]


def test_undefined_detectron2_stats_are_left_out():
    """LVISEvaluator multiplies LVISEval's -1 (no large objects in the split, say) by 100; COCOEvaluator gives NaN."""
    from transfer.detectron2_engine import _finite, metrics_from

    results = {"bbox": {"AP": 12.5, "AP50": 30.0, "APl": -100.0, "APs": float("nan"), "APr": 0.0, "AP-cat": 3.0}}
    assert metrics_from(results, "lvis") == {"APbb": 12.5, "APbb50": 30.0, "APbbr": 0.0}
    assert _finite(results)["bbox"]["APl"] is None and _finite(results)["bbox"]["APs"] is None


def test_lvis_evaluation_runs_with_numpy_aliases():
    """detectron2's LVISEvaluator.evaluate() runs lvis 0.5.3, which calls np.float (removed in NumPy 1.24)."""
    import numpy as np

    from transfer.detectron2_engine import NumpyAliased

    class UsesNpFloat:  # stands in for LVISEvaluator: evaluate() reaches lvis' np.float
        def reset(self):
            self.seen = []

        def process(self, inputs, outputs):
            self.seen.append((inputs, outputs))

        def evaluate(self):
            return {"bbox": {"AP": np.float(len(self.seen))}}

    evaluator = NumpyAliased(UsesNpFloat())
    evaluator.reset()
    evaluator.process([1], [2])
    assert evaluator.evaluate() == {"bbox": {"AP": 1.0}}
    assert "float" not in np.__dict__  # the alias is gone again


def test_results_leave_detectron2_training_log_alone(tmp_path):
    """OUTPUT_DIR/metrics.json is detectron2's per-iteration log; bench reads s/iter from it, writes elsewhere."""
    import json

    from transfer.detectron2_engine import RESULTS_FILE, iteration_timing

    assert RESULTS_FILE != "metrics.json"
    rows = [{"iteration": 19, "time": 0.30, "data_time": 0.01, "total_loss": 2.0},
            {"iteration": 39, "time": 0.20, "total_loss": 1.5}, {"iteration": 59, "time": 0.25},
            {"bench_voc_2007_test/bbox/AP": 1.0, "iteration": 59}]  # eval row, no time
    (tmp_path / "metrics.json").write_text("\n".join(map(json.dumps, rows)) + "\n")
    assert iteration_timing(tmp_path) == {"s_per_iter": pytest.approx(0.25), "logged_iters": 3}
    assert iteration_timing(tmp_path / "missing") == {}
