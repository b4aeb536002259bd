"""Detection metrics: VOC07 evaluator on hand-built cases; COCO/LVIS wrappers equal pycocotools / lvis."""
import contextlib
import io
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest

from transfer.det_eval import coco_metrics, lvis_metrics, numpy_aliases, voc_ap, voc_eval_class, voc_metrics


def gt(*boxes, difficult=()):
    return np.array(boxes, dtype=float).reshape(-1, 4), np.array([i in difficult for i in range(len(boxes))])


def test_difficult_boxes_are_neither_tp_nor_fp():
    gts = {"a": gt([0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], difficult=(1,))}
    dets = [("a", 0.95, [20, 20, 30, 30]),   # difficult: ignored (not a FP, not a TP)
            ("a", 0.9, [0, 0, 10, 10]),      # TP
            ("a", 0.7, [60, 60, 70, 70]),    # FP
            ("a", 0.5, [40, 40, 50, 50])]    # TP
    # rec [0, .5, .5, 1], prec [0, 1, .5, 2/3]: 11-point AP = (6 * 1 + 5 * 2/3) / 11
    assert voc_eval_class(dets, gts, 0.5) == pytest.approx((6 + 5 * 2 / 3) / 11)
    # the same detections with the difficult box counted as an ordinary object: 3 positives
    plain = {"a": gt([0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50])}
    assert voc_eval_class(dets, plain, 0.5) == pytest.approx((7 * 1 + 4 * 0.75) / 11)


def test_eleven_point_interpolation_vs_area():
    rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert voc_ap(np.array([0.25]), np.array([1.0])) == pytest.approx(3 / 11)   # t = 0, .1, .2


def test_duplicates_and_iou_thresholds():
    gts = {"a": gt([0, 0, 10, 10])}
    dup = [("a", 0.9, [0, 0, 10, 10]), ("a", 0.8, [0, 0, 10, 10])]     # second one is a FP
    assert voc_eval_class(dup, gts, 0.5) == pytest.approx(1.0)
    assert voc_eval_class(dup[::-1], gts, 0.5) == pytest.approx(1.0)
    loose = [("a", 0.9, [0, 0, 10, 6.2])]                              # IoU 0.62
    aps = [voc_eval_class(loose, gts, t / 100) for t in range(50, 100, 5)]
    assert aps == [1.0, 1.0, 1.0] + [0.0] * 7
    metrics, extra = voc_metrics([{"image_id": "a", "annotations": [{"bbox": [0, 0, 10, 10], "category_id": 0}]}],
                                 {"a": {"boxes": [[0, 0, 10, 6.2]], "scores": [0.9], "labels": [0]}}, ["x"])
    assert metrics == pytest.approx({"AP": 30.0, "AP50": 100.0, "AP75": 0.0})


def test_voc_boxes_and_scores_rounded_as_detectron2_writes_them():
    """PascalVOCDetectionEvaluator writes f"{score:.3f} {xmin+1:.1f} {ymin+1:.1f} {xmax:.1f} {ymax:.1f}" and
    voc_eval reads that back: a box 5.04 px tall (IoU .504 > .5 unrounded) is stored as 5.0 (IoU .5, not > .5)."""
    records = [{"image_id": "a", "annotations": [{"bbox": [0, 0, 10, 10], "category_id": 0}]}]
    for box in ([0, 0, 10, 5.04], [0, 0, 5.04, 10], [4.96, 0, 10, 10], [0, 4.96, 10, 10]):  # each side rounded
        metrics, _ = voc_metrics(records, {"a": {"boxes": [box], "scores": [0.9], "labels": [0]}}, ["x"])
        assert metrics["AP50"] == 0.0, box
    metrics, _ = voc_metrics(records, {"a": {"boxes": [[0.04, 0, 10, 5.06]], "scores": [0.9], "labels": [0]}},
                             ["x"])  # xmin+1 = 1.04 -> 1.0, ymax 5.06 -> 5.1: IoU .51
    assert metrics["AP50"] == 100.0
    # scores 0.9004 (FP) and 0.9001 (TP) both become 0.900: the tie falls to voc_eval's argsort (file order)
    two = {"a": {"boxes": [[50, 50, 60, 60], [0, 0, 10, 10]], "scores": [0.9004, 0.9001], "labels": [0, 0]}}
    assert voc_metrics(records, two, ["x"])[0]["AP50"] == pytest.approx(50.0)  # FP, then TP: precision .5
    flipped = {"a": {"boxes": [[0, 0, 10, 10], [50, 50, 60, 60]], "scores": [0.9001, 0.9004], "labels": [0, 0]}}
    assert voc_metrics(records, flipped, ["x"])[0]["AP50"] == pytest.approx(100.0)


def test_voc_metrics_average_classes_with_positives():
    records = [{"image_id": 1, "annotations": [{"bbox": [0, 0, 10, 10], "category_id": 0},
                                               {"bbox": [20, 20, 40, 40], "category_id": 1, "difficult": False}]},
               {"image_id": 2, "annotations": [{"bbox": [0, 0, 20, 20], "category_id": 1, "difficult": True}]}]
    preds = {1: {"boxes": [[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], "scores": [0.9, 0.3, 0.8],
                 "labels": [0, 1, 1]},
             2: {"boxes": [[0, 0, 20, 20], [0, 0, 5, 5]], "scores": [0.99, 0.1], "labels": [1, 2]}}
    metrics, extra = voc_metrics(records, preds, ["a", "b", "c"])
    # class a: AP 1; class b: FP (.8) before TP (.3), the difficult match (.99) ignored -> rec [0, 0, 1],
    # prec [0, 0, .5] -> 11-point AP .5; class c has no positives and is left out of the mean.
    assert metrics == pytest.approx({"AP": 75.0, "AP50": 75.0, "AP75": 75.0})
    assert extra["classes_without_positives"] == ["c"]
    assert extra["AP50_per_class"] == pytest.approx({"a": 100.0, "b": 50.0})
    assert voc_metrics(records, {}, ["a", "b", "c"])[0] == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}


# ----------------------------------------------------------------------------------------------- COCO / LVIS
def _dataset(rng, n_images=6, n_cats=3, lvis=False):
    images, anns, masks = [], [], {}
    for i in range(1, n_images + 1):
        images.append({"id": i, "width": 64, "height": 48, "file_name": f"{i}.jpg",
                       **({"not_exhaustive_category_ids": [], "neg_category_ids": [3] if i == 1 else []}
                          if lvis else {})})
        for _ in range(rng.integers(1, 4)):
            x, y = rng.integers(0, 30), rng.integers(0, 20)
            w, h = rng.integers(4, 30), rng.integers(4, 25)
            poly = [x, y, x + w, y, x + w, y + h, x, y + h]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.integers(1, n_cats + 1)),
                         "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h), "iscrowd": 0,
                         "segmentation": [[float(v) for v in poly]]})
    cats = [{"id": c, "name": f"c{c}", "frequency": "rcf"[c % 3], "synonyms": [f"c{c}"], "image_count": 1,
             "instance_count": 1} for c in range(1, n_cats + 1)]
    return {"images": images, "annotations": anns, "categories": cats}


def _detections(rng, data):
    dets = []
    for a in data["annotations"]:
        for _ in range(2):
            x, y, w, h = (np.array(a["bbox"]) + rng.normal(0, 2, 4)).tolist()
            w, h = max(w, 1.0), max(h, 1.0)
            m = np.zeros((48, 64), dtype=np.uint8, order="F")
            m[int(max(y, 0)):int(y + h), int(max(x, 0)):int(x + w)] = 1
            dets.append({"image_id": a["image_id"], "category_id": int(rng.choice([a["category_id"], 1])),
                         "bbox": [x, y, w, h], "score": float(rng.random()),
                         "segmentation": mask_util.encode(np.asfortranarray(m))})
    return dets


def test_coco_wrapper_equals_cocoeval():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    data = _dataset(rng)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    dets = _detections(rng, data)
    ours = coco_metrics(coco, dets)
    for task, tag in (("bbox", "bb"), ("segm", "mk")):
        task_dets = [{k: v for k, v in d.items() if k != "bbox"} for d in dets] if task == "segm" else dets
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(coco, coco.loadRes(task_dets), task)
            ev.evaluate(), ev.accumulate(), ev.summarize()
        for suffix, value in zip(["", "50", "75", "s", "m", "l"], ev.stats[:6]):
            if value >= 0:
                assert ours[f"AP{tag}{suffix}"] == pytest.approx(100 * value)
            else:
                assert f"AP{tag}{suffix}" not in ours          # undefined -> left out, never NaN
    assert ours["APbb50"] > 0 and all(np.isfinite(list(ours.values())))
    assert coco_metrics(coco, [])["APbb"] == 0.0


def test_lvis_wrapper_equals_lvis_eval(tmp_path):
    from lvis import LVIS, LVISEval, LVISResults

    rng = np.random.default_rng(1)
    data = _dataset(rng, lvis=True)
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(data))
    gt_api = LVIS(str(path))
    dets = _detections(rng, data)
    for d in dets:
        d["segmentation"] = {**d["segmentation"], "counts": d["segmentation"]["counts"].decode()}
    ours = lvis_metrics(gt_api, dets)
    for task, tag in (("bbox", "bb"), ("segm", "mk")):
        task_dets = [{k: v for k, v in d.items() if k != "bbox"} for d in dets] if task == "segm" else dets
        with contextlib.redirect_stdout(io.StringIO()), numpy_aliases():
            ev = LVISEval(gt_api, LVISResults(gt_api, [dict(d) for d in task_dets], max_dets=300), task)
            ev.run()
        res = ev.get_results()
        for suffix in ["", "50", "75", "s", "m", "l", "r", "c", "f"]:
            if res[f"AP{suffix}"] >= 0:
                assert ours[f"AP{tag}{suffix}"] == pytest.approx(100 * res[f"AP{suffix}"])
    assert {"APbb", "APbbr", "APbbc", "APbbf", "APmk", "APmkr"} <= set(ours)
