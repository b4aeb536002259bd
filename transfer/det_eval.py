"""Detection metrics with detectron2's semantics, named as in leaderboard/references.csv (values in percent).

- `voc_metrics`: detectron2's PascalVOCDetectionEvaluator (py-faster-rcnn `voc_eval`): per class, detections
  sorted by score are matched greedily to the best-overlapping ground truth; IoU must be strictly above the
  threshold; a match to a *difficult* box is neither TP nor FP, and difficult boxes do not count as positives.
  AP per class with the VOC2007 11-point rule (or the area rule), averaged over classes at IoU .50:.95 step .05:
  AP (mean over the 10 thresholds), AP50, AP75. Boxes are in detectron2's 0-based continuous coordinates
  (xmin/ymin of the XML minus 1), where detectron2's "+1" arithmetic reduces to the plain IoU used here.
  Detections are first rounded as detectron2 writes them into its per-class result files (boxes to 0.1 px,
  scores to 3 decimals) and sorted with voc_eval's own argsort, so ties fall as in detectron2.
- `coco_metrics` / `lvis_metrics`: thin wrappers over pycocotools COCOeval and lvis LVISEval that return
  APbb*, APmk* like detectron2's COCOEvaluator / LVISEvaluator (box field dropped for mask evaluation).

Undefined metrics (no ground truth in an area range or frequency group: COCOeval/LVISEval report -1) are left
out of the returned dict instead of being NaN, so result records stay finite.
"""
from __future__ import annotations

import contextlib
import copy
import io

import numpy as np

VOC_IOUS = tuple(t / 100 for t in range(50, 100, 5))
COCO_STATS = ("", "50", "75", "s", "m", "l")           # COCOeval.stats[0:6] -> APbb, APbb50, ...
LVIS_STATS = ("", "50", "75", "s", "m", "l", "r", "c", "f")
TASK_TAG = {"bbox": "bb", "segm": "mk"}


# ----------------------------------------------------------------------------------------------- VOC
def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool = True) -> float:
    """Area under the precision/recall curve: VOC2007 11-point interpolation, or the exact VOC2010+ area."""
    if use_07_metric:
        return float(sum((prec[rec >= t].max() if (rec >= t).any() else 0.0) for t in np.arange(0.0, 1.1, 0.1))
                     / 11.0)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one XYXY box with each of `boxes` (continuous coordinates)."""
    iw = np.maximum(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0.0)
    ih = np.maximum(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0.0)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return inter / np.maximum(union, np.finfo(np.float64).eps)


def voc_eval_class(dets: list[tuple], gts: dict, iou_thresh: float, use_07_metric: bool = True) -> float | None:
    """AP of one class. dets: [(image_id, score, xyxy)]; gts: {image_id: (boxes (G, 4), difficult (G,))}.

    Returns None when the class has no non-difficult ground truth (its AP is undefined).
    """
    npos = sum(int((~difficult).sum()) for _, difficult in gts.values())
    if npos == 0:
        return None
    order = np.argsort(-np.array([d[1] for d in dets], dtype=np.float64))  # voc_eval's own (unstable) argsort
    taken = {img: np.zeros(len(boxes), dtype=bool) for img, (boxes, _) in gts.items()}
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    for rank, d in enumerate(order):
        image_id, _, box = dets[d]
        boxes, difficult = gts.get(image_id, (np.zeros((0, 4)), np.zeros(0, dtype=bool)))
        if len(boxes) == 0:
            fp[rank] = 1
            continue
        overlaps = box_iou(np.asarray(box, dtype=np.float64), boxes)
        j = int(overlaps.argmax())
        if overlaps[j] > iou_thresh:
            if difficult[j]:
                continue                      # neither TP nor FP
            if taken[image_id][j]:
                fp[rank] = 1                  # duplicate detection
            else:
                tp[rank], taken[image_id][j] = 1, True
        else:
            fp[rank] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(rec, prec, use_07_metric)


def as_written_by_detectron2(box, score: float) -> tuple[np.ndarray, float]:
    """A detection as PascalVOCDetectionEvaluator writes it to its result file and voc_eval reads it back:
    f"{score:.3f} {xmin + 1:.1f} {ymin + 1:.1f} {xmax:.1f} {ymax:.1f}" (1-based xmin/ymin), here returned in
    bench's 0-based continuous coordinates."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return (np.array([float(f"{x0 + 1:.1f}") - 1, float(f"{y0 + 1:.1f}") - 1, float(f"{x1:.1f}"),
                      float(f"{y1:.1f}")]), float(f"{score:.3f}"))


def voc_metrics(records: list[dict], predictions: dict, class_names, use_07_metric: bool = True,
                iou_thresholds=VOC_IOUS) -> tuple[dict, dict]:
    """(metrics {AP, AP50, AP75}, per-class AP50) over `records` (detectron2-style dicts with `annotations`
    [{bbox xyxy, category_id, difficult}]) and predictions {image_id: {boxes (N, 4), scores (N,), labels (N,)}},
    labels being 0-based class indices. Classes without positives are left out of the mean (listed in extra).
    Boxes and scores are rounded as detectron2's result files store them (0.1 px, 3 decimals) before matching."""
    num_classes = len(class_names)
    gts = [dict() for _ in range(num_classes)]
    for r in records:
        anns = r.get("annotations", [])
        for c in range(num_classes):
            mine = [a for a in anns if a["category_id"] == c]
            gts[c][r["image_id"]] = (np.array([a["bbox"] for a in mine], dtype=np.float64).reshape(-1, 4),
                                     np.array([bool(a.get("difficult", False)) for a in mine], dtype=bool))
    dets = [[] for _ in range(num_classes)]
    for image_id, p in predictions.items():
        for box, score, label in zip(np.asarray(p["boxes"]), np.asarray(p["scores"]), np.asarray(p["labels"])):
            box, score = as_written_by_detectron2(box, score)
            dets[int(label)].append((image_id, score, box))
    aps = {t: {} for t in iou_thresholds}
    for c in range(num_classes):
        for t in iou_thresholds:
            ap = voc_eval_class(dets[c], gts[c], t, use_07_metric)
            if ap is not None:
                aps[t][class_names[c]] = 100.0 * ap
    per_iou = {t: float(np.mean(list(v.values()))) if v else 0.0 for t, v in aps.items()}
    metrics = {"AP": float(np.mean(list(per_iou.values()))), "AP50": per_iou[0.5], "AP75": per_iou[0.75]}
    extra = {"AP50_per_class": aps[0.5], "metric": "VOC2007 11-point" if use_07_metric else "VOC2010 area",
             "classes_without_positives": [n for n in class_names if n not in aps[0.5]]}
    return metrics, extra


# ----------------------------------------------------------------------------------------------- COCO / LVIS
def _named(task: str, stats, suffixes) -> dict:
    tag = TASK_TAG[task]
    return {f"AP{tag}{s}": float(v) * 100 for s, v in zip(suffixes, stats) if v >= 0}


def _for_task(results: list[dict], task: str) -> list[dict]:
    """Results for one IoU type; mask AP uses mask areas, so the box is dropped (as detectron2 does)."""
    if task == "segm":
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results if "segmentation" in r]
    return copy.deepcopy(results)


def coco_metrics(coco_gt, results: list[dict], tasks=("bbox", "segm")) -> dict:
    """COCOeval stats in percent: APbb, APbb50, APbb75, APbbs/m/l (bbox) and APmk... (segm).

    `results` are COCO-format detections (image_id, category_id of the json, bbox XYWH, score, optional RLE
    `segmentation`). No detections at all gives AP 0 (the model found nothing)."""
    from pycocotools.cocoeval import COCOeval

    out = {}
    for task in tasks:
        dets = _for_task(results, task)
        if not dets:
            out.update({f"AP{TASK_TAG[task]}{s}": 0.0 for s in COCO_STATS[:3]})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(dets), task)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        out.update(_named(task, evaluator.stats[:6], COCO_STATS))
    return out


@contextlib.contextmanager
def numpy_aliases():
    """lvis 0.5.3 (the last release) calls `np.float`, removed in NumPy 1.24: provide it while LVISEval runs."""
    missing = "float" not in np.__dict__
    if missing:
        np.float = float
    try:
        yield
    finally:
        if missing:
            del np.float


def lvis_metrics(lvis_gt, results: list[dict], tasks=("bbox", "segm"), max_dets: int = 300) -> dict:
    """LVISEval results in percent: APbb, APbb50, APbb75, APbbs/m/l, APbbr/c/f and the same for APmk."""
    from lvis import LVISEval, LVISResults

    out = {}
    for task in tasks:
        dets = _for_task(results, task)
        if not dets:
            out.update({f"AP{TASK_TAG[task]}{s}": 0.0 for s in LVIS_STATS[:3]})
            continue
        with contextlib.redirect_stdout(io.StringIO()), numpy_aliases():
            evaluator = LVISEval(lvis_gt, LVISResults(lvis_gt, dets, max_dets=max_dets), task)
            evaluator.run()
        res = evaluator.get_results()
        out.update(_named(task, [res[f"AP{s}"] for s in LVIS_STATS], LVIS_STATS))
    return out
