"""The detection splits both detection engines read (transfer/detection.py: torchvision, transfer/detectron2_engine.py:
detectron2) from the real layouts, and the number of processes `bench run --gpus N` launches."""
from __future__ import annotations

import dataclasses
import os

import torch


@dataclasses.dataclass
class DetSplit:
    """One dataset split: detectron2-style records, class names, and what its evaluator needs."""

    name: str
    kind: str                      # voc | coco | lvis
    records: list[dict]
    class_names: list[str]
    api: object = None             # pycocotools COCO / lvis LVIS ground truth
    cat_ids: list | None = None    # contiguous index -> dataset category id
    year: int | None = None


def _json_records(api, imgs: dict, anns_of, path_of) -> tuple[list[dict], list[int], list[str]]:
    cat_ids = sorted(api.cats)
    index = {c: i for i, c in enumerate(cat_ids)}
    records = []
    for image_id in sorted(imgs):
        img = imgs[image_id]
        anns = [{"bbox": [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]],
                 "category_id": index[a["category_id"]], "iscrowd": a.get("iscrowd", 0),
                 "segmentation": a.get("segmentation")} for a in anns_of(image_id)]
        records.append({"file_name": str(path_of(img)), "image_id": image_id, "height": img["height"],
                        "width": img["width"], "annotations": anns})
    return records, cat_ids, [api.cats[c]["name"] for c in cat_ids]


def load_split(name: str, data_root: str) -> DetSplit:
    """voc_<year>_<split>, coco_2017_<train|val>, lvis_v1_<train|val> from the real layouts under data_root."""
    from transfer import datasets as D

    kind, version, split = name.split("_", 2)
    if kind == "voc":
        return DetSplit(name, "voc", D.load_voc(data_root, int(version), split), list(D.VOC_CLASSES),
                        year=int(version))
    if kind == "coco":
        coco, image_dir = D.load_coco(data_root, f"{split}{version}")
        records, cat_ids, names = _json_records(coco, coco.imgs, lambda i: coco.imgToAnns.get(i, []),
                                                lambda img: os.path.join(image_dir, img["file_name"]))
        return DetSplit(name, "coco", records, names, coco, cat_ids)
    if kind == "lvis":
        lvis, path_of = D.load_lvis(data_root, split)
        records, cat_ids, names = _json_records(lvis, lvis.imgs, lambda i: lvis.img_ann_map.get(i, []),
                                                lambda img: path_of(img["id"]))
        return DetSplit(name, "lvis", records, names, lvis, cat_ids)
    raise ValueError(f"unknown detection split {name!r} (voc_<year>_<split>, coco_2017_<split>, lvis_v1_<split>)")


def num_gpus(opts, device) -> int:
    """Processes to launch (`bench run --gpus N`): one per GPU, or N gloo processes on a CPU-only machine."""
    n = int(getattr(opts, "num_gpus", 1) or 1)
    if n > 1 and torch.device(device).type == "cuda" and torch.cuda.device_count() < n:
        raise ValueError(f"--gpus {n} but {torch.cuda.device_count()} GPUs are visible")
    return n
