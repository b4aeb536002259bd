"""ADE20K UperNet engine (transfer/segmentation.py): recipe -> mmengine config key by key, end-to-end runs of a
slim ResNet-50 and a ViT-Tiny on miniature ADE20K (tiny budget, a few iterations), mIoU against a direct
confusion matrix, resume from an mmengine checkpoint, layer-decay learning rates, weights reaching the model."""
import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.runner import RunOptions, run_benchmark
from benchmarks.spec import get_spec, resolve
from transfer.artifact import Preprocessing, random_artifact, save_artifact
from transfer.loading import load_backbone
from transfer import segmentation as seg  # mmseg is a dependency: no skip

FEW = {"max_iters": 6, "checkpoint_interval": 3, "val_interval": 6}  # on top of the tiny budget


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    """A small miniature ADE20K (40 train / 12 val images, 128 px)."""
    from transfer.minidata import make_mini

    root = tmp_path_factory.mktemp("ade")
    make_mini(root, seed=0, scale=0.2, datasets=["ade20k"])
    return root


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("backbones")
    out = {}
    for arch, kw in (("resnet50", {"width": 16}), ("vit_tiny_patch16", {}), ("convvit_tiny", {})):
        out[arch] = save_artifact(d / f"{arch}.safetensors", random_artifact(arch, seed=0, **kw))
    return out


def _opts(artifact, root, out, **kw):
    return RunOptions(benchmark="ade20k", backbone=str(artifact), data_root=str(root), budget="tiny",
                      out=str(out), workers=0, overrides=dict(FEW), **kw)


@pytest.fixture(scope="module")
def resnet_run(artifacts, ade_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    [path] = run_benchmark(_opts(artifacts["resnet50"], ade_root, out), log=lambda *a, **k: None)
    return json.loads(Path(path).read_text()), out


# ----------------------------------------------------------------------------------------------- recipes
PROTOCOL = {  # shared/PROTOCOLS.md, ADE20K section
    "r50": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, poly_power=0.9, min_lr=1e-4,
                batch_size=16, decode_channels=512, pool_scales=[1, 2, 3, 6], aux_loss_weight=0.4, max_iters=160000,
                crop_size=512, layer_decay_rate=None),
    "vit-b": dict(optimizer="adamw", lr=1e-4, betas=[0.9, 0.999], weight_decay=0.05, layer_decay_rate=0.65,
                  layer_decay_num_layers=12, drop_path_rate=0.1, warmup_iters=1500, min_lr=0.0, batch_size=16,
                  out_indices=[3, 5, 7, 11], neck_rescales=[4, 2, 1, 0.5], decode_channels=768, test_mode="slide",
                  test_stride=341, max_iters=160000, crop_size=512, rel_pos_bias=True, amp=False),
    "convvit-b": dict(layer_decay_rate=0.75, layer_decay_num_layers=11, drop_path_rate=0.2, optimizer="adamw",
                      lr=1e-4, weight_decay=0.05, max_iters=160000, decode_channels=768, test_stride=341,
                      rel_pos_bias=True),
}
COMMON = dict(scale=[2048, 512], ratio_range=[0.5, 2.0], cat_max_ratio=0.75, flip_prob=0.5,
              photometric_distortion=True, test_scale=[2048, 512], reduce_zero_label=True, num_classes=150)


def _pipeline(config, split, type_):
    loader = config["train_dataloader" if split == "train" else "test_dataloader"]
    return next(t for t in loader["dataset"]["pipeline"] if t["type"] == type_)


def config_value(config: dict, key: str):
    """Where each recipe field lands in the mmengine config (None where the recipe leaves it unused)."""
    model, ow = config["model"], config["optim_wrapper"]
    sched = {s["type"]: s for s in config["param_scheduler"]}
    crop = _pipeline(config, "train", "RandomCrop")
    getters = {
        "decode_head": lambda: model["decode_head"]["type"], "aux_head": lambda: model["auxiliary_head"]["type"],
        "decode_channels": lambda: model["decode_head"]["channels"],
        "pool_scales": lambda: list(model["decode_head"]["pool_scales"]),
        "dropout_ratio": lambda: model["decode_head"]["dropout_ratio"],
        "aux_in_index": lambda: model["auxiliary_head"]["in_index"],
        "aux_channels": lambda: model["auxiliary_head"]["channels"],
        "aux_num_convs": lambda: model["auxiliary_head"]["num_convs"],
        "aux_loss_weight": lambda: model["auxiliary_head"]["loss_decode"]["loss_weight"],
        "num_classes": lambda: model["decode_head"]["num_classes"],
        "ignore_index": lambda: model["decode_head"]["ignore_index"],
        "norm": lambda: model["decode_head"]["norm_cfg"]["type"],
        "neck": lambda: model.get("neck", {}).get("type"),
        "neck_rescales": lambda: model["neck"]["rescales"] if "neck" in model else None,
        "out_indices": lambda: model["backbone"].get("out_indices"),
        "drop_path_rate": lambda: model["backbone"].get("drop_path_rate", 0.0),
        "layer_scale_init": lambda: model["backbone"].get("layer_scale_init"),
        "rel_pos_bias": lambda: model["backbone"].get("rel_pos_bias", False),
        "reduce_zero_label": lambda: _pipeline(config, "train", "LoadAnnotations")["reduce_zero_label"],
        "scale": lambda: list(_pipeline(config, "train", "RandomResize")["scale"]),
        "ratio_range": lambda: list(_pipeline(config, "train", "RandomResize")["ratio_range"]),
        "crop_size": lambda: crop["crop_size"][0],
        "cat_max_ratio": lambda: crop["cat_max_ratio"],
        "flip_prob": lambda: _pipeline(config, "train", "RandomFlip")["prob"],
        "photometric_distortion": lambda: any(t["type"] == "PhotoMetricDistortion"
                                              for t in config["train_dataloader"]["dataset"]["pipeline"]),
        "test_scale": lambda: list(_pipeline(config, "test", "Resize")["scale"]),
        "test_mode": lambda: model["test_cfg"]["mode"],
        "test_stride": lambda: model["test_cfg"]["stride"][0] if model["test_cfg"]["mode"] == "slide" else None,
        "optimizer": lambda: ow["optimizer"]["type"].lower(),
        "lr": lambda: ow["optimizer"]["lr"],
        "momentum": lambda: ow["optimizer"].get("momentum"),
        "betas": lambda: list(ow["optimizer"]["betas"]) if "betas" in ow["optimizer"] else None,
        "weight_decay": lambda: ow["optimizer"]["weight_decay"],
        "layer_decay_rate": lambda: ow.get("paramwise_cfg", {}).get("layer_decay_rate"),
        "layer_decay_num_layers": lambda: ow.get("paramwise_cfg", {}).get("num_layers"),
        "warmup_iters": lambda: sched["LinearLR"]["end"] if "LinearLR" in sched else 0,
        "warmup_start_factor": lambda: sched["LinearLR"]["start_factor"] if "LinearLR" in sched else None,
        "poly_power": lambda: sched["PolyLR"]["power"],
        "min_lr": lambda: sched["PolyLR"]["eta_min"],
        "max_iters": lambda: config["train_cfg"]["max_iters"],
        "batch_size": lambda: config["train_dataloader"]["batch_size"],
        "val_interval": lambda: config["train_cfg"]["val_interval"],
        "checkpoint_interval": lambda: config["default_hooks"]["checkpoint"]["interval"],
    }
    return getters[key]()


NOT_IN_CONFIG = {"name", "source", "backbone_family", "features", "amp",  # amp: CUDA only, see engine_cfg["amp"]
                 "linear_scaling"}  # provenance of lr / iterations, which are checked themselves


def assert_config_matches(config: dict, recipe: dict):
    for key, value in recipe.items():
        if key in NOT_IN_CONFIG or (key == "warmup_start_factor" and not recipe["warmup_iters"]):
            continue  # (no warm-up, no start factor)
        got = config_value(config, key)
        if isinstance(value, float) or isinstance(got, float):
            assert got is not None and math.isclose(got, value), (key, got, value)
        else:
            assert got == value, (key, got, value)
    # the schedule's ends follow the recipe's lengths
    sched = config["param_scheduler"]
    assert sched[-1]["begin"] == recipe["warmup_iters"] and sched[-1]["end"] == recipe["max_iters"]
    crop = recipe["crop_size"]
    assert tuple(config["model"]["data_preprocessor"]["size"]) == (crop, crop)
    if recipe["test_mode"] == "slide":
        assert tuple(config["model"]["test_cfg"]["crop_size"]) == (crop, crop)


@pytest.mark.parametrize("recipe,arch", [("r50", "resnet50"), ("vit-b", "vit_tiny_patch16"),
                                         ("convvit-b", "convvit_tiny")])
def test_config_equals_recipe_key_by_key(recipe, arch, artifacts, ade_root, tmp_path):
    spec = get_spec("ade20k")
    cfg, overrides = resolve(spec, recipe)
    assert overrides == {}
    for key, value in {**COMMON, **PROTOCOL[recipe]}.items():  # the spec carries PROTOCOLS.md's values
        assert cfg[key] == value, (recipe, key, cfg[key], value)
    backbone, _ = load_backbone(artifacts[arch])
    from transfer.artifact import BackboneArtifact

    art = BackboneArtifact(backbone.arch, {}, Preprocessing(), {}, backbone.artifact_meta["arch_kwargs"])
    config = seg.build_config(spec, cfg, "w.safetensors", art, str(ade_root), str(tmp_path), seed=0)
    if recipe == "convvit-b":  # layer decay counts the real blocks: ConvViT-Tiny's transformer stage has 2
        assert config["optim_wrapper"]["paramwise_cfg"]["num_layers"] == 2
        cfg = {**cfg, "layer_decay_num_layers": 2}
    assert_config_matches(config, cfg)  # ViT-Tiny has ViT-B's 12 blocks: compared as is
    assert config["optim_wrapper"].get("constructor") == {"r50": None, "vit-b": "LayerDecayOptimizerConstructor",
                                                         "convvit-b": "ConvViTLayerDecayOptimizerConstructor"}[recipe]


def test_recipe_for_another_family_is_refused(artifacts):
    spec = get_spec("ade20k")
    backbone, _ = load_backbone(artifacts["vit_tiny_patch16"])
    cfg, _ = resolve(spec, "r50")
    with pytest.raises(seg.SegmentationError, match="--recipe vit-b"):
        seg.check_recipe(cfg, backbone, spec)
    cfg, _ = resolve(spec, "convvit-b")
    with pytest.raises(seg.SegmentationError, match="convvit"):
        seg.check_recipe(cfg, backbone, spec)


# ----------------------------------------------------------------------------------------------- end to end
def test_resnet_end_to_end_record(resnet_run):
    record, out = resnet_run
    assert record["engine"] == "mmseg" and record["task"] == "segmentation" and record["recipe"] == "r50"
    assert set(record["metrics"]) == {"mIoU", "mAcc", "aAcc"}
    assert all(0.0 <= v <= 100.0 for v in record["metrics"].values())
    assert record["protocol"] is False
    assert record["overrides"]["crop_size"] == 64 and record["overrides"]["max_iters"] == 6
    assert record["extra"]["iterations"] == 6 and record["extra"]["val_images"] == 12
    # the dumped mmengine config matches the resolved (overridden) recipe key by key
    assert_config_matches(record["config"]["engine"]["config"], record["config"]["recipe"])
    assert record["config"]["engine"]["config"]["model"]["backbone"]["type"] == "BenchResNet"



def test_prediction_pictures_show_image_prediction_and_truth(resnet_run, ade_root):
    from mmseg.datasets import ADE20KDataset

    record, out = resnet_run
    pictures = sorted((out / record["extra"]["pictures"]).glob("val-*.png"))
    assert len(pictures) == 4
    palette = np.array(ADE20KDataset.METAINFO["palette"] + [[0, 0, 0]] * 106, np.uint8)
    ann_dir = Path(ade_root) / "ADEChallengeData2016" / "annotations" / "validation"
    for picture in pictures:
        gt = np.asarray(Image.open(ann_dir / (picture.stem[len("val-"):] + ".png"))).astype(np.int64)
        h, w = gt.shape
        shown = np.asarray(Image.open(picture).convert("RGB"))
        assert shown.shape == (h, 3 * w, 3)  # image | prediction | truth
        assert np.array_equal(shown[:, 2 * w:], palette[np.where(gt == 0, 255, gt - 1)])  # reduce_zero_label
        assert set(map(tuple, shown[:, w:2 * w].reshape(-1, 3))) <= set(map(tuple, palette[:150]))  # class colours


def plain_equal(a, b) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def _direct_miou(dump: list, ann_dir: Path) -> dict:
    """mIoU/mAcc/aAcc from a confusion matrix of the dumped predictions vs the annotation PNGs read here
    (label 0 -> ignore 255, others -1: reduce_zero_label)."""
    conf = np.zeros((150, 150), np.int64)
    for sample in dump:
        gt = np.asarray(Image.open(ann_dir / Path(sample["seg_map_path"]).name)).astype(np.int64)
        gt = np.where(gt == 0, 255, gt - 1)
        pred = sample["pred_sem_seg"]["data"].squeeze(0).numpy().astype(np.int64)
        keep = gt != 255
        conf += np.bincount(gt[keep] * 150 + pred[keep], minlength=150 * 150).reshape(150, 150)
    tp = np.diag(conf).astype(float)
    gt_n, pred_n = conf.sum(1), conf.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (gt_n + pred_n - tp)
        acc = tp / gt_n
    return {"mIoU": round(float(np.nanmean(iou)) * 100, 2), "mAcc": round(float(np.nanmean(acc)) * 100, 2),
            "aAcc": round(float(tp.sum() / conf.sum()) * 100, 2)}


def test_miou_equals_direct_confusion_matrix(resnet_run, ade_root, tmp_path):
    from mmengine.config import Config
    from mmengine.runner import Runner

    record, _ = resnet_run
    config = Config.fromfile(record["extra"]["config_file"])  # the config file mmengine dumped for the run
    assert plain_equal(config.to_dict(), record["config"]["engine"]["config"])
    work = Path(config["work_dir"])
    dump = tmp_path / "preds.pkl"
    config.update(work_dir=str(tmp_path / "eval"), load_from=str(work / "iter_6.pth"), resume=False,
                  experiment_name="confusion-check",
                  test_evaluator=[config["test_evaluator"], dict(type="DumpResults", out_file_path=str(dump))])
    with torch.serialization.safe_globals(seg.checkpoint_safe_globals()):
        metrics = Runner.from_cfg(config).test()
    preds = pickle.loads(dump.read_bytes())
    assert len(preds) == 12
    direct = _direct_miou(preds, ade_root / "ADEChallengeData2016" / "annotations" / "validation")
    for key in ("mIoU", "mAcc", "aAcc"):
        assert metrics[key] == pytest.approx(direct[key], abs=0.011), key
        assert record["metrics"][key] == pytest.approx(metrics[key], abs=1e-6), key  # same checkpoint, same eval


def test_resume_from_mmengine_checkpoint(resnet_run, artifacts, ade_root):
    record, out = resnet_run
    work = Path(record["extra"]["work_dir"])
    assert (work / "iter_3.pth").is_file() and (work / "iter_6.pth").is_file()
    # as if killed after iteration 3: the latest checkpoint is iter_3
    (work / "last_checkpoint").write_text(str(work / "iter_3.pth"))
    before = (work / "iter_3.pth").read_bytes()
    with torch.serialization.safe_globals(seg.checkpoint_safe_globals()):
        straight = torch.load(work / "iter_6.pth", map_location="cpu")  # the uninterrupted run's last state
    (work / "iter_6.pth").unlink()
    [path] = run_benchmark(_opts(artifacts["resnet50"], ade_root, out), log=lambda *a, **k: None)
    again = json.loads(Path(path).read_text())
    assert again["extra"]["resumed"] is True and again["extra"]["work_dir"] == str(work)
    assert again["extra"]["iterations"] == 6
    assert (work / "iter_3.pth").read_bytes() == before  # not retrained from 0 (that would rewrite iter_3)
    with torch.serialization.safe_globals(seg.checkpoint_safe_globals()):
        ckpt = torch.load(work / "iter_6.pth", map_location="cpu")
    assert ckpt["meta"]["iter"] == 6 and ckpt["meta"]["experiment_name"] != straight["meta"]["experiment_name"]
    assert ckpt["param_schedulers"] == straight["param_schedulers"]  # the poly schedule continued from step 3
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(straight["optimizer"]["param_groups"][0]["lr"])


def test_vit_end_to_end(artifacts, ade_root, tmp_path):
    opts = _opts(artifacts["vit_tiny_patch16"], ade_root, tmp_path, recipe="vit-b")
    opts.overrides.update(test_scale=[512, 128])  # 128 px test images: slide inference over 4 windows of 64
    [path] = run_benchmark(opts, log=lambda *a, **k: None)
    record = json.loads(Path(path).read_text())
    assert set(record["metrics"]) == {"mIoU", "mAcc", "aAcc"}
    assert all(0.0 <= v <= 100.0 for v in record["metrics"].values())
    config = record["config"]["engine"]["config"]
    assert_config_matches(config, record["config"]["recipe"])
    assert config["model"]["neck"]["type"] == "Feature2Pyramid"
    assert config["model"]["test_cfg"] == {"mode": "slide", "crop_size": [64, 64], "stride": [341, 341]}
    assert record["extra"]["precision"] == "fp32 (OptimWrapper)" == record["config"]["engine"]["precision"]
    assert config["optim_wrapper"]["constructor"] == "LayerDecayOptimizerConstructor"


# ----------------------------------------------------------------------------------------------- model pieces
def _model_and_optimizer(artifact, recipe, tmp_path, **overrides):
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope

    init_default_scope("mmseg")
    spec = get_spec("ade20k")
    cfg, _ = resolve(spec, recipe, "tiny", overrides)
    backbone, _ = load_backbone(artifact)
    from transfer.artifact import read_artifact

    art = read_artifact(artifact)
    config = seg.build_config(spec, cfg, str(artifact), art, "unused", str(tmp_path), seed=0)
    model = seg.MODELS.build(config["model"])
    model.init_weights()  # what the Runner does before training
    return model, build_optim_wrapper(model, config["optim_wrapper"]), config, backbone


def test_vit_layer_decay_rates(artifacts, tmp_path):
    model, wrapper, config, backbone = _model_and_optimizer(artifacts["vit_tiny_patch16"], "vit-b", tmp_path)
    base_lr = config["optim_wrapper"]["optimizer"]["lr"]
    assert base_lr == pytest.approx(1e-4 * 4 / 16)  # the recipe's 1e-4 at batch 16, linearly scaled to tiny's 4
    names = {id(p): n for n, p in model.named_parameters()}
    blocks = set()
    for group in wrapper.optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            if name in ("backbone.cls_token", "backbone.pos_embed") or name.startswith("backbone.patch_embed"):
                layer = 0
            elif m := re.match(r"backbone\.layers\.(\d+)\.", name):
                layer = int(m.group(1)) + 1
                blocks.add(layer)
            else:
                layer = 13  # neck, heads: full LR
            assert group["lr"] == pytest.approx(base_lr * 0.65 ** (13 - layer)), name
            no_decay = p.ndim == 1 or name.endswith(".bias")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert blocks == set(range(1, 13))  # every one of the 12 real blocks has its own rate
    # layer scale (init 1.0) and drop path from the recipe are in the blocks
    blk = model.backbone.layers[11]
    assert torch.equal(blk.ls1.gamma, torch.ones(192)) and blk.drop_path1.drop_prob == pytest.approx(0.1)


def test_convvit_layer_decay_rates_use_real_blocks(artifacts, tmp_path):
    model, wrapper, config, _ = _model_and_optimizer(artifacts["convvit_tiny"], "convvit-b", tmp_path)
    assert config["optim_wrapper"]["paramwise_cfg"]["num_layers"] == 2  # convvit_tiny: 2 transformer blocks
    base_lr = config["optim_wrapper"]["optimizer"]["lr"]
    names = {id(p): n for n, p in model.named_parameters()}
    for group in wrapper.optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            m = re.match(r"backbone\.blocks3\.(\d+)\.", name)
            layer = (int(m.group(1)) + 1 if m else
                     0 if name.startswith(("backbone.patch_embed", "backbone.blocks1", "backbone.blocks2")) else 3)
            assert group["lr"] == pytest.approx(base_lr * 0.75 ** (3 - layer)), name
    outs = model.backbone(torch.randn(2, 3, 64, 64))  # the crop: the relative position bias's window
    assert [o.shape[1] for o in outs] == [32, 48, 96, 96] and outs[0].shape[-2:] == (16, 16)
    with pytest.raises(seg.SegmentationError, match="window"):
        model.backbone(torch.randn(1, 3, 80, 48))
    model, *_ = _model_and_optimizer(artifacts["convvit_tiny"], "convvit-b", tmp_path, rel_pos_bias=False)
    x = torch.randn(1, 3, 80, 48)  # not a multiple of the crop: padded, position table resampled
    outs = model.backbone(x)
    assert [o.shape[1] for o in outs] == [32, 48, 96, 96] and outs[0].shape[-2:] == (20, 12)


@pytest.mark.parametrize("arch", ["resnet50", "vit_tiny_patch16"])
def test_artifact_weights_reach_the_model(arch, artifacts, tmp_path):
    recipe = "r50" if arch == "resnet50" else "vit-b"
    model, _, _, backbone = _model_and_optimizer(artifacts[arch], recipe, tmp_path)
    trunk = backbone.trunk.state_dict()
    mine = model.backbone.state_dict()
    if arch == "resnet50":
        for k, v in trunk.items():
            if not k.startswith("fc."):
                assert torch.equal(mine[k], v), k
    else:
        for k, v in trunk.items():
            if k.startswith("blocks."):
                assert torch.equal(mine["layers." + k[len("blocks."):]], v), k
        assert torch.equal(mine["patch_embed.proj.weight"], trunk["patch_embed.proj.weight"])
        assert mine["pos_embed"].shape == (1, 1 + 4 * 4, 192)  # resampled to the 64 px crop


def test_highpass_in_data_preprocessor_matches_input_transform():
    from transfer.artifact import InputTransform

    prep = Preprocessing(highpass_sigma=1.5)
    pre = seg.BenchSegDataPreProcessor(mean=list(prep.mean), std=list(prep.std), bgr_to_rgb=True, size=(40, 40),
                                       pad_val=0, seg_pad_val=255, highpass_sigma=1.5)
    rgb = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    out = pre({"inputs": [rgb.flip(0)], "data_samples": None}, training=False)["inputs"]  # loaded as BGR
    ref = InputTransform(prep)(rgb[None].float() / 255)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_vit_checkpoint_without_blocks_is_refused(artifacts, ade_root, tmp_path):
    """The load audit runs before the engine: a ViT whose blocks would stay random never reaches UperNet."""
    from transfer.artifact import read_artifact
    from transfer.loading import CheckpointError

    state = {k: v for k, v in read_artifact(artifacts["vit_tiny_patch16"]).state_dict.items()
             if not k.startswith("blocks.")}
    torch.save({"model": state}, tmp_path / "no_blocks.pth")
    opts = _opts(tmp_path / "no_blocks.pth", ade_root, tmp_path / "out", recipe="vit-b", arch="vit_tiny_patch16")
    with pytest.raises(CheckpointError, match="refused"):
        run_benchmark(opts, log=lambda *a, **k: None)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- relative position bias
def test_rel_pos_bias_attention_equals_mmseg_mae_attention():
    """bench's timm Attention + bias equals mmseg 1.2.2's MAEAttention (BEiT index with class-token rows) on the
    same weights and a random (trained-looking) table; the table starts at zero as MAEAttention.init_weights."""
    from mmseg.models.backbones.mae import MAEAttention
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    dim, heads, window = 32, 4, (3, 4)
    block = Block(dim, heads, qkv_bias=True)
    seg.add_rel_pos_bias([block], window, num_prefix_tokens=1)
    attn = block.attn
    reference = MAEAttention(dim, heads, window, bias="qv_bias")
    reference.init_weights()
    assert attn.relative_position_bias_table.shape == reference.relative_position_bias_table.shape
    assert torch.count_nonzero(attn.relative_position_bias_table) == 0
    assert torch.count_nonzero(reference.relative_position_bias_table) == 0
    assert torch.equal(attn.relative_position_index, reference.relative_position_index)
    with torch.no_grad():
        reference.relative_position_bias_table.normal_()
        attn.relative_position_bias_table.copy_(reference.relative_position_bias_table)
        reference.qkv.weight.copy_(attn.qkv.weight)
        reference.q_bias.normal_(), reference.v_bias.normal_()
        attn.qkv.bias.copy_(torch.cat([reference.q_bias, torch.zeros(dim), reference.v_bias]))
        reference.proj.load_state_dict(attn.proj.state_dict())
    x = torch.randn(2, 1 + 12, dim)
    torch.testing.assert_close(attn(x), reference(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(seg.SegmentationError, match="window"):
        attn(torch.randn(2, 1 + 16, dim))


def test_rel_pos_bias_without_class_token_is_convmae_index():
    """ConvMAE's seg Attention (no class token): table (2Wh-1)(2Ww-1), index = BEiT's token-token block."""
    from mmseg.models.backbones.beit import BEiTAttention

    size, index = seg.relative_position_index((3, 4), cls_token=False)
    assert size == 5 * 7 and torch.equal(index, BEiTAttention(8, 2, (3, 4)).relative_position_index[1:, 1:])
    assert index[0, 0] == index[5, 5] == 2 * 7 + 3   # zero offset: centre of the (5, 7) table
    assert index[0, 1] == 2 * 7 + 2 and index[1, 0] == 2 * 7 + 4 and index[0, 4] == 1 * 7 + 3


def test_vit_backbone_gets_zero_rel_pos_bias_per_block_with_its_layer_id(artifacts, tmp_path):
    from mmseg.engine.optimizers.layer_decay_optimizer_constructor import get_layer_id_for_vit

    model, wrapper, config, _ = _model_and_optimizer(artifacts["vit_tiny_patch16"], "vit-b", tmp_path)
    assert config["model"]["backbone"]["rel_pos_bias"] is True
    tables = {n: p for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")}
    assert len(tables) == len(model.backbone.layers) == 12
    for name, table in tables.items():
        assert table.shape == ((2 * 4 - 1) ** 2 + 3, 3) and torch.count_nonzero(table) == 0  # 64 px crop: 4x4
        assert get_layer_id_for_vit(name, 14) == int(name.split(".")[2]) + 1
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in wrapper.optimizer.param_groups for p in g["params"]}
    table = tables["backbone.layers.11.attn.relative_position_bias_table"]
    assert lr_of[id(table)][1] == 0.05  # 2-D: weight decay, as mmseg's constructor gives it
    no_bias, *_ = _model_and_optimizer(artifacts["vit_tiny_patch16"], "vit-b", tmp_path, rel_pos_bias=False)
    x = torch.randn(1, 3, 64, 64)
    no_bias.backbone.load_state_dict(model.backbone.state_dict(), strict=False)
    model.eval(), no_bias.eval()
    for a, b in zip(model.backbone(x), no_bias.backbone(x)):  # zero table: the pretrained function unchanged
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dumped_config_reevaluates_with_mmseg_tools(resnet_run, tmp_path):
    """The record's `reevaluate` command (mmseg's own tools/test.py on the config bench dumped and the last
    checkpoint), run in a fresh process from elsewhere, gives the record's mIoU."""
    import os
    import shlex
    import subprocess

    from mmengine.config import Config

    first, out = resnet_run
    # the newest record of that work dir: test_resume_from_mmengine_checkpoint may have retrained iter_6 since
    records = [json.loads(p.read_text()) for p in sorted(Path(out).glob("*.json"), key=lambda p: p.stat().st_mtime)]
    record = [r for r in records if r.get("extra", {}).get("work_dir") == first["extra"]["work_dir"]][-1]
    config = Config.fromfile(record["extra"]["config_file"])  # imports transfer.mmseg_reuse (custom_imports)
    assert config.custom_imports["imports"] == ["transfer.mmseg_reuse"]
    assert config.test_pipeline == config.test_dataloader.dataset.pipeline
    command = record["extra"]["reevaluate"]
    env_assignment, *argv = shlex.split(command)
    env = {**os.environ, "OMP_NUM_THREADS": "1", env_assignment.split("=", 1)[0]: env_assignment.split("=", 1)[1]}
    out = subprocess.run(argv + ["--work-dir", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    miou = re.findall(r"mIoU: ([0-9.]+)", out.stdout + out.stderr)
    assert miou and float(miou[-1]) == pytest.approx(record["metrics"]["mIoU"], abs=0.01)
