"""Torchvision C4 engine: architecture of the R50-C4 detector, its pieces, and end-to-end runs on miniature data."""
import json
import math

import pytest
import torch
import torch.nn as nn
from torchvision.ops import roi_align

from benchmarks.runner import RunOptions, run_benchmark
from benchmarks.spec import SpecError, get_spec, resolve
from transfer import detection as det
from transfer.artifact import Backbone, Preprocessing, build_backbone, random_artifact, save_artifact

# a few iterations on tiny images: checks wiring, not accuracy (benchmarks/perf/detection_step.py measures that)
SMOKE = {"max_iter": 3, "steps": [2], "warmup_iters": 1, "ims_per_batch": 2, "roi_batch_per_image": 16,
         "rpn_post_nms_topk_test": 20, "precise_bn_iters": 2, "train_short_sides": [64, 80], "max_size": 134,
         "test_short_side": 64, "test_max_size": 107, "detections_per_image": 10}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def backbone_of(arch="resnet50", prep=None, **kwargs) -> Backbone:
    art = random_artifact(arch, seed=0, **kwargs)
    if prep is not None:
        art.preprocessing = prep
    trunk = build_backbone(arch, **kwargs)
    trunk.load_state_dict(art.state_dict, strict=False)
    return Backbone(art, trunk)


@pytest.fixture(scope="module")
def r50_c4():
    cfg, _ = resolve(get_spec("coco-c4-1x"), "moco")
    torch.manual_seed(0)
    return det.build_model(backbone_of(), 80, cfg), cfg


def test_r50_c4_stages_and_heads(r50_c4):
    """res2..res4 in the backbone, res5 (+ extra BN) in the ROI head, detectron2 R50-C4 shapes and sizes."""
    model, _ = r50_c4
    bb, heads = model.backbone, model.roi_heads
    assert [n_params(m) for m in (bb.stem, bb.res2, bb.res3, bb.res4)] == [9536, 215808, 1219584, 7098368]
    assert not hasattr(bb, "res5") and bb.out_channels == 1024
    assert n_params(heads.res5) == 14964736 + 2 * 2048 and isinstance(heads.res5.norm, nn.BatchNorm2d)
    first = heads.res5[0]
    assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2)          # STRIDE_IN_1X1 False
    assert first.downsample[0].stride == (2, 2) and first.conv1.in_channels == 1024
    rpn = model.rpn.head
    assert (rpn.conv[0][0].in_channels, rpn.conv[0][0].out_channels, rpn.conv[0][0].kernel_size) == (1024, 1024, (3, 3))
    assert rpn.cls_logits.out_channels == 15 and rpn.bbox_pred.out_channels == 60
    box = heads.box_predictor
    assert (box.cls_score.in_features, box.cls_score.out_features, box.bbox_pred.out_features) == (2048, 81, 320)
    mask = heads.mask_head
    assert (mask.deconv.in_channels, mask.deconv.out_channels, mask.deconv.kernel_size, mask.deconv.stride) == \
        (2048, 256, (2, 2), (2, 2))
    assert (mask.predictor.in_channels, mask.predictor.out_channels) == (256, 80)
    assert all(p.requires_grad for p in model.parameters())                          # FREEZE_AT 0
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 53 + 1                                                        # trunk BNs + extra norm


@torch.no_grad()
def test_r50_c4_feature_shapes(r50_c4):
    model, cfg = r50_c4
    model.eval()
    feats = model.backbone(torch.zeros(1, 3, 224, 320))["res4"]
    assert feats.shape == (1, 1024, 14, 20)                                          # stride 16
    boxes = [torch.tensor([[0.0, 0.0, 64.0, 64.0], [10.0, 20.0, 200.0, 100.0]])]
    pooled = model.roi_heads.shared_roi_transform(feats, boxes)
    assert pooled.shape == (2, 2048, 7, 7)
    ref = roi_align(feats, boxes, 14, 1 / 16, sampling_ratio=0, aligned=True)        # ROIAlignV2
    torch.testing.assert_close(pooled, model.roi_heads.res5(ref))
    scores, deltas = model.roi_heads.box_predictor(pooled.mean((2, 3)))
    assert scores.shape == (2, 81) and deltas.shape == (2, 81 * 4) and deltas[:, :4].abs().sum() == 0
    assert model.roi_heads.mask_head(pooled).shape == (2, 80, 14, 14)


def test_anchors_are_detectron2_default_anchors():
    gen = det.AnchorGenerator([32, 64, 128, 256, 512], [0.5, 1.0, 2.0])
    cells = gen.cells
    w, h = cells[:, 2] - cells[:, 0], cells[:, 3] - cells[:, 1]
    torch.testing.assert_close(w * h, torch.tensor([s * s for s in [32, 64, 128, 256, 512] for _ in range(3)],
                                                   dtype=torch.float32))
    torch.testing.assert_close(h / w, torch.tensor([0.5, 1.0, 2.0] * 5))
    assert torch.allclose(cells[:, :2], -cells[:, 2:])                               # centred, unrounded
    from torchvision.models.detection.image_list import ImageList

    anchors = gen(ImageList(torch.zeros(2, 3, 50, 70), [(50, 70)] * 2), [torch.zeros(2, 8, 4, 5)])
    assert len(anchors) == 2 and anchors[0].shape == (4 * 5 * 15, 4)
    centres = (anchors[0][:, :2] + anchors[0][:, 2:]) / 2
    assert centres[15].tolist() == [16.0, 0.0] and centres[-1].tolist() == [64.0, 48.0]  # stride 16, offset 0


def test_input_pipeline_uses_the_backbone_transform():
    prep = Preprocessing(mean=(100.0, 110.0, 120.0), std=(50.0, 60.0, 70.0), highpass_sigma=2.0)
    bb = backbone_of(width=8, prep=prep)
    cfg, _ = resolve(get_spec("voc07+12"), "moco")
    model = det.build_model(bb, 20, cfg)
    a, b = torch.rand(3, 40, 60), torch.rand(3, 50, 30)
    batch = model.batch([a, b])
    assert batch.shape == (2, 3, 50, 60)
    torch.testing.assert_close(batch[0, :, :40, :60], bb.transform(a[None])[0])     # normalise + high-pass
    torch.testing.assert_close(batch[1, :, :50, :30], bb.transform(b[None])[0])
    assert batch[0, :, 40:].abs().sum() == 0 and batch[1, :, :, 30:].abs().sum() == 0


def test_resize_like_detectron2():
    assert det.resized_hw(480, 640, 800, 1333) == (800, 1067)
    assert det.resized_hw(500, 2000, 800, 1333) == (333, 1333)
    assert det.resized_hw(128, 96, 112, 187) == (149, 112)


def test_solver_schedule_and_param_groups():
    cfg = {"gamma": 0.1, "steps": [18000, 22000], "warmup_iters": 100, "warmup_factor": 0.001}
    assert det.lr_factor(0, cfg) == pytest.approx(0.001)
    assert det.lr_factor(50, cfg) == pytest.approx(0.001 * 0.5 + 0.5)
    assert [det.lr_factor(i, cfg) for i in (100, 17999, 18000, 22000)] == pytest.approx([1, 1, 0.1, 0.01])
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    decay, no_decay = det.param_groups(model, 1e-4, 0.0)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {id(model[1].weight), id(model[1].bias)}
    assert len(decay["params"]) == 4                                                 # conv/linear weights + biases


def test_precise_bn_averages_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3))
    data = [torch.randn(4, 3, 5, 5) * (i + 1) + i for i in range(5)]

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, images, targets):
            return self.m(torch.stack(images))

    batches = iter([(list(x), [{} for _ in x]) for x in data])
    det.precise_bn(Wrap(), batches, 5, "cpu")
    bn = model[0]
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean((0, 2, 3)) for x in data]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var((0, 2, 3), unbiased=True) for x in data]).mean(0))
    assert bn.momentum == 0.1


def test_train_batches_shard_group_and_repeat():
    records = [{"width": 100 + (i % 2) * 50, "height": 120, "annotations": [{"category_id": 0 if i else 1}]}
               for i in range(10)]
    shards = [list(islice_batches(det.InfiniteBatches(records, 2, seed=3, rank=r, world=2), 10)) for r in (0, 1)]
    for batches in shards:
        assert all(len({records[i]["width"] > records[i]["height"] for i in b}) == 1 for b in batches)
    first = [det.InfiniteBatches(records, 1, seed=3, rank=r, world=2) for r in (0, 1)]
    a, b = (set(i for bt in islice_batches(s, 5) for i in bt) for s in first)
    assert a.isdisjoint(b) and a | b == set(range(10))                               # one epoch split in two
    factors = det.repeat_factors(records, 0.5)
    assert factors[0] == pytest.approx(math.sqrt(0.5 / 0.1)) and factors[1:].tolist() == [1.0] * 9


def islice_batches(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_engine_choice(monkeypatch):
    monkeypatch.setenv(det.ENGINE_ENV, "torchvision")
    assert det.pick_engine() == "torchvision"
    monkeypatch.setenv(det.ENGINE_ENV, "mmdet")
    with pytest.raises(ValueError, match="torchvision or detectron2"):
        det.pick_engine()
    monkeypatch.delenv(det.ENGINE_ENV)
    assert det.pick_engine() == ("detectron2" if det.detectron2_available() else "torchvision")
    if not det.detectron2_available():
        monkeypatch.setenv(det.ENGINE_ENV, "detectron2")
        with pytest.raises(ValueError, match="import detectron2"):
            det.pick_engine()


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def slim_r50(tmp_path_factory):
    return str(save_artifact(tmp_path_factory.mktemp("det") / "r50w8.safetensors",
                             random_artifact("resnet50", seed=0, width=8)))


@pytest.mark.parametrize("benchmark,metrics", [("voc07+12", {"AP", "AP50", "AP75"}),
                                               ("coco-c4-1x", {"APbb", "APbb50", "APbb75", "APmk", "APmk50"}),
                                               ("lvis-c4", {"APbb", "APbb50", "APmk"})])
def test_bench_run_end_to_end(benchmark, metrics, mini_root, slim_r50, tmp_path, monkeypatch):
    monkeypatch.setenv(det.ENGINE_ENV, "torchvision")
    opts = RunOptions(benchmark=benchmark, backbone=slim_r50, data_root=str(mini_root), budget="tiny",
                      overrides=SMOKE, trials=1, out=str(tmp_path), workers=0)
    (path,) = run_benchmark(opts, log=lambda *a: None)
    record = json.loads(path.read_text())
    assert metrics <= set(record["metrics"]) and all(math.isfinite(v) for v in record["metrics"].values())
    assert record["engine"] == "torchvision" and record["config"]["engine"]["name"] == "torchvision"
    assert record["overrides"]["max_iter"] == 3 and record["protocol"] is False
    assert record["extra"]["iterations"] == 3 and record["config"]["engine"]["resolved"]["max_iter"] == 3
    pictures = sorted((tmp_path / record["extra"]["pictures"]).glob("val-*.png"))  # a few val predictions
    assert len(pictures) == 4 and all(p.stat().st_size < 100_000 for p in pictures)
    curve = record["extra"]["curve"]  # drawn by `bench report --format html`
    assert curve["step"] == [1, 2, 3] and set(curve) == {"step", "loss", "lr"} and curve["lr"][0] < curve["lr"][-1]


def test_vit_backbone_is_refused(mini_root, tmp_path):
    vit = save_artifact(tmp_path / "vit.safetensors", random_artifact("vit_tiny_patch16", img_size=32))
    opts = RunOptions(benchmark="voc07+12", backbone=str(vit), data_root=str(mini_root), budget="tiny",
                      out=str(tmp_path), workers=0)
    with pytest.raises(SpecError, match="does not fit voc07\\+12.*accepts resnet.*benchmarks that accept it"):
        run_benchmark(opts, log=lambda *a: None)


def test_engine_refuses_vit_and_convvit_naming_alternatives():
    """The engine itself (not only the runner's spec check) refuses non-ResNet trunks with the benchmarks that fit."""
    spec = get_spec("coco-c4-1x")
    cfg, _ = resolve(spec, None, "tiny")
    for arch, kwargs in (("vit_tiny_patch16", {"img_size": 32}), ("convvit_tiny", {})):
        bb = backbone_of(arch, **kwargs)
        with pytest.raises(SpecError, match=f"needs a ResNet backbone, got {arch}.*benchmarks that accept it: "
                                            ".*places205"):
            det.run_detection(spec, bb, cfg, "train", 0, "cpu", RunOptions("coco-c4-1x", "x", "/nonexistent"))


class Oracle(nn.Module):
    """Returns each test image's ground truth (in the resized frame the detector sees) as detections."""

    def __init__(self, records):
        super().__init__()
        self.records, self.seen = records, 0

    def forward(self, images):
        out = []
        for img in images:
            r = self.records[self.seen]
            self.seen += 1
            (h, w), anns = img.shape[-2:], [a for a in r["annotations"] if not a.get("iscrowd", 0)]
            scale = torch.tensor([w / r["width"], h / r["height"]] * 2)
            out.append({"boxes": torch.tensor([a["bbox"] for a in anns]).reshape(-1, 4) * scale,
                        "scores": torch.ones(len(anns)),
                        "labels": torch.tensor([a["category_id"] + 1 for a in anns], dtype=torch.int64)})
        return out


@pytest.mark.parametrize("benchmark,name,metric", [("voc07+12", "voc_2007_test", "AP"),
                                                   ("coco-c4-1x", "coco_2017_val", "APbb"),
                                                   ("lvis-c4", "lvis_v1_val", "APbb")])
def test_predict_and_evaluate_score_ground_truth_perfectly(benchmark, name, metric, mini_root):
    """Resizing for the test pass, mapping back to original coordinates, label offsets and the evaluators agree:
    the ground truth returned as detections scores AP 100 at every IoU."""
    cfg, _ = resolve(get_spec(benchmark), None, "tiny")
    cfg["mask_on"] = False
    split = det.load_split(name, str(mini_root))
    data = det.DetectionData(split.records, [cfg["test_short_side"]], cfg["test_max_size"], False)
    loader = torch.utils.data.DataLoader(data, batch_size=1, collate_fn=det.collate)
    preds = det.predict(Oracle(split.records), loader, "cpu", mask_on=False)
    metrics, _ = det.evaluate(split, preds, cfg)
    assert metrics[metric] == pytest.approx(100.0, abs=0.5)
    assert metrics[metric + "75" if metric == "APbb" else "AP75"] == pytest.approx(100.0, abs=0.5)
