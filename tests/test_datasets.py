"""Miniature datasets in the real layouts: read back by the loaders; broken layouts give one clear error."""
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transfer.datasets import (VOC_CLASSES, LayoutError, check_layout, load_ade20k, load_classification,
                                 load_coco, load_lvis, load_voc, open_image)
from transfer.minidata import make_mini


def test_classification_sets(mini_root):
    inat = load_classification("inat18", mini_root, "train")
    counts = sorted(Counter(label for _, label in inat.samples).values(), reverse=True)
    assert inat.num_classes == 12 and counts[0] >= 8 * counts[-1], "iNat train must be long-tailed"
    assert len(load_classification("inat18", mini_root, "val").samples) == 480
    places = load_classification("places205", mini_root, "val")
    assert places.num_classes == 10 and places.class_names[1] == "beach" and len(places.samples) == 400
    image = open_image(places.samples[0][0])
    assert image.mode == "RGB" and image.size == (96, 96)


def test_places_scenes_are_not_told_apart_by_colour(mini_root):
    """Scene labels come from the objects in the scene, not its palette: nearest class-mean colour stays near
    chance (10 classes; 98.5% when each scene had its own palette), as colour statistics, which random init
    captures, must not solve the scene benchmark."""
    def mean_colours(split):
        data = load_classification("places205", mini_root, split)
        colours = np.stack([np.asarray(open_image(path), np.float32).mean((0, 1)) for path, _ in data.samples])
        return colours, np.array([label for _, label in data.samples])

    (x_train, y_train), (x_val, y_val) = mean_colours("train"), mean_colours("val")
    centroids = np.stack([x_train[y_train == c].mean(0) for c in range(10)])
    predicted = np.linalg.norm(x_val[:, None] - centroids[None], axis=2).argmin(1)
    assert (predicted == y_val).mean() < 0.2


def test_voc(mini_root):
    test = load_voc(mini_root, "2007", "test")
    assert len(test) == 100 and len(load_voc(mini_root, "2012", "trainval")) == 200
    anns = [a for r in test for a in r["annotations"]]
    assert 0 < sum(a["difficult"] for a in anns) < 0.3 * len(anns)
    assert {a["category_id"] for a in anns} <= set(range(len(VOC_CLASSES)))
    r = test[0]
    for a in r["annotations"]:
        x0, y0, x1, y1 = a["bbox"]
        assert 0 <= x0 < x1 <= r["width"] and 0 <= y0 < y1 <= r["height"]


def test_coco_masks_match_areas(mini_root):
    from pycocotools import mask as mask_utils

    coco, image_dir = load_coco(mini_root, "val2017")
    assert len(coco.getImgIds()) == 100 and len(coco.getCatIds()) == 20 and 1 in coco.getCatIds()
    anns = coco.loadAnns(coco.getAnnIds())
    assert any(a["iscrowd"] for a in anns) and any(not a["iscrowd"] for a in anns)
    for ann in anns[:40]:
        mask = coco.annToMask(ann)
        assert abs(mask.sum() - ann["area"]) <= 0.1 * ann["area"] + 8
        if ann["iscrowd"]:
            assert isinstance(ann["segmentation"]["counts"], str)
    assert (image_dir / coco.loadImgs(anns[0]["image_id"])[0]["file_name"]).is_file()


def test_lvis_loads_and_perfect_detections_score_one(mini_root):
    from transfer.det_eval import lvis_metrics

    lvis, image_path = load_lvis(mini_root, "val")
    assert {c["frequency"] for c in lvis.dataset["categories"]} == {"r", "c", "f"}
    assert image_path(lvis.dataset["images"][0]["id"]).is_file()
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in lvis.dataset["annotations"]]
    assert lvis_metrics(lvis, dets, tasks=("bbox",))["APbb"] == pytest.approx(100.0, abs=2)


def test_ade20k(mini_root):
    pairs = load_ade20k(mini_root, "validation")
    assert len(pairs) == 60 and len(load_ade20k(mini_root, "training")) == 200
    labels = np.asarray(Image.open(pairs[0][1]))
    assert labels.dtype == np.uint8 and labels.max() <= 150 and (labels == 0).any() and (labels > 0).mean() > 0.9


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def test_generation_is_deterministic(tmp_path):
    small = dict(scale=0.05, datasets=("voc", "places205", "inat18"))
    a, b, c = (make_mini(tmp_path / n, seed=s, **small) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    assert a == b and _tree_hash(tmp_path / "a") == _tree_hash(tmp_path / "b")
    assert _tree_hash(tmp_path / "a") != _tree_hash(tmp_path / "c")


# ----------------------------------------------------------------------------------------------- broken layouts
@pytest.fixture
def copy_of(mini_root, tmp_path):
    def copy(*parts):
        for part in parts:
            shutil.copytree(mini_root / part, tmp_path / part)
        return tmp_path
    return copy


def _raises_naming(path, fn, *args):
    with pytest.raises(LayoutError) as err:
        fn(*args)
    assert str(path) in str(err.value) and "Expected layout" in str(err.value)


def test_missing_root_and_annotation_files(copy_of, tmp_path):
    _raises_naming(tmp_path / "nowhere", check_layout, "voc", tmp_path / "nowhere")
    root = copy_of("coco", "inat2018")
    (root / "coco/annotations/instances_val2017.json").unlink()
    _raises_naming(root / "coco/annotations/instances_val2017.json", load_coco, root, "val2017")
    (root / "inat2018/val2018.json").unlink()
    _raises_naming(root / "inat2018/val2018.json", load_classification, "inat18", root, "val")
    _raises_naming(root / "lvis", load_lvis, root, "val")


def test_missing_images(copy_of):
    root = copy_of("VOCdevkit", "places205", "ADEChallengeData2016")
    victim = sorted((root / "VOCdevkit/VOC2007/JPEGImages").glob("*.jpg"))[0]
    victim.unlink()
    _raises_naming(victim, load_voc, root, "2007", "trainval")
    victim = sorted((root / "places205/images256").rglob("*.jpg"))[0]
    victim.unlink()
    _raises_naming(victim, check_layout, "places205", root)
    ann = sorted((root / "ADEChallengeData2016/annotations/validation").glob("*.png"))[0]
    ann.unlink()
    _raises_naming(ann, load_ade20k, root, "validation")


def test_malformed_json_xml_csv(copy_of):
    root = copy_of("coco", "VOCdevkit", "places205", "inat2018")
    bad_json = root / "coco/annotations/instances_train2017.json"
    bad_json.write_text('{"images": [')
    _raises_naming(bad_json, load_coco, root, "train2017")
    keys = root / "inat2018/train2018.json"
    keys.write_text(json.dumps({"images": []}))
    _raises_naming(keys, load_classification, "inat18", root, "train")
    xml = sorted((root / "VOCdevkit/VOC2012/Annotations").glob("*.xml"))[0]
    xml.write_text("<annotation><size><width>3</width></size>")
    _raises_naming(xml, load_voc, root, "2012", "trainval")
    csv = root / "places205/trainvalsplit_places205/val_places205.csv"
    csv.write_text("a/arch/val_000000.jpg zero\n")
    _raises_naming(csv, load_classification, "places205", root, "val")


def test_corrupt_image_names_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(LayoutError, match="bad.jpg"):
        open_image(bad)
