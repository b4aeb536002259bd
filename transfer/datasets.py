"""Loaders for the real on-disk dataset layouts (the same code reads the miniature and the real datasets).

Every loader checks the layout first and fails with one `LayoutError` that names the missing or malformed
file, says how to fix it and shows the expected layout under --data-root.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "bench"))  # mini data, feature cache

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")

EXPECTED_LAYOUTS = {
    "voc": """VOCdevkit/
  VOC2007/{JPEGImages/<id>.jpg, Annotations/<id>.xml, ImageSets/Main/{trainval,test}.txt}
  VOC2012/{JPEGImages/<id>.jpg, Annotations/<id>.xml, ImageSets/Main/trainval.txt}""",
    "coco": """coco/
  annotations/instances_{train,val}2017.json
  {train,val}2017/<12-digit id>.jpg""",
    "lvis": """lvis/lvis_v1_{train,val}.json      (images resolved from coco_url into coco/{train,val}2017/)
coco/{train,val}2017/<12-digit id>.jpg""",
    "ade20k": """ADEChallengeData2016/
  images/{training,validation}/ADE_{train,val}_<8 digits>.jpg
  annotations/{training,validation}/ADE_{train,val}_<8 digits>.png   (uint8; 0 = other/ignore, 1..150)""",
    "inat18": """inat2018/
  train2018.json, val2018.json        (COCO-style images/annotations/categories)
  train_val2018/<supercategory>/<category id>/<image>.jpg   (paths as in file_name)""",
    "places205": """places205/
  trainvalsplit_places205/{train,val}_places205.csv   (lines: <relative path> <label>)
  images256/<relative path>""",
}


class LayoutError(RuntimeError):
    """A dataset on disk does not have the expected layout; the message names the file and the fix."""


def error_text(e: BaseException) -> str:
    """The message of `e`, without the worker traceback that torch's DataLoader puts into errors it re-raises
    from a worker process ("Caught LayoutError in DataLoader worker process 0. Original Traceback ...")."""
    text = str(e)
    marker = f"{type(e).__name__}: "
    if "Original Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


def _fail(dataset: str, where, problem: str, fix: str = "") -> LayoutError:
    fix = fix or "check --data-root and the dataset's layout (`bench data mini --root DIR` writes an example)"
    return LayoutError(f"{where}: {problem}. {fix}\nExpected layout under --data-root:\n{EXPECTED_LAYOUTS[dataset]}")


def _need(dataset: str, path: Path, what: str = "file") -> Path:
    exists = path.is_file() if what == "file" else path.is_dir()
    if not exists:
        raise _fail(dataset, path, f"missing {what}")
    return path


def _read_json(dataset: str, path: Path, keys: tuple[str, ...]) -> dict:
    try:
        data = json.loads(_need(dataset, path).read_text())
    except json.JSONDecodeError as e:
        raise _fail(dataset, path, f"malformed JSON ({e})") from e
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise _fail(dataset, path, f"JSON lacks required keys {missing}")
    return data


def _check_images(dataset: str, paths) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise _fail(dataset, path, "missing image listed in the annotations")


def open_image(path):
    """An RGB PIL image; an unreadable or corrupt file raises LayoutError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise LayoutError(f"{path}: unreadable or corrupt image ({e}); re-copy or remove it from the list") from e


# ----------------------------------------------------------------------------------------------- classification
@dataclasses.dataclass
class ClassificationSplit:
    name: str
    split: str
    samples: list[tuple[Path, int]]
    num_classes: int
    class_names: list[str]


def load_classification(name: str, data_root, split: str, check_images: bool = True) -> ClassificationSplit:
    """`inat18` or `places205`, split `train` or `val`; labels are contiguous 0..num_classes-1.
    `check_images=False` skips the per-file existence check (`bench data check` does its own pass)."""
    loaders = {"inat18": _load_inat, "places205": _load_places}
    if name not in loaders or split not in ("train", "val"):
        raise ValueError(f"no classification set {name}/{split}; sets: {', '.join(loaders)}; splits: train, val")
    return loaders[name](Path(data_root).resolve(), split, check_images)  # absolute: one feature-cache key per file


def _load_inat(root: Path, split: str, check_images: bool = True) -> ClassificationSplit:
    """iNat 2018 json: classes are the json's categories in id order (8142 in the real dataset)."""
    base = _need("inat18", root / "inat2018", "directory")
    path = base / f"{split}2018.json"
    data = _read_json("inat18", path, ("images", "annotations", "categories"))
    try:
        cats = sorted(data["categories"], key=lambda c: c["id"])
        index = {c["id"]: i for i, c in enumerate(cats)}
        files = {im["id"]: base / im["file_name"] for im in data["images"]}
        samples = [(files[a["image_id"]], index[a["category_id"]]) for a in data["annotations"]]
    except (KeyError, TypeError) as e:
        raise _fail("inat18", path, f"malformed entry (missing or unknown {e})") from e
    if check_images:
        _check_images("inat18", (p for p, _ in samples))
    return ClassificationSplit("inat18", split, samples, len(cats), [c.get("name", str(c["id"])) for c in cats])


PLACES205_CLASSES = 205
ADE20K_CLASSES = 150


def _load_places(root: Path, split: str, check_images: bool = True) -> ClassificationSplit:
    """Places205 csv lists (`<relative path> <label>`); the classes are the train list's labels, which must be
    0..K-1 with K <= 205 (205 for the real lists) and include every val label; names from the class folders
    (e.g. a/abbey -> abbey)."""
    base = _need("places205", root / "places205", "directory")
    lists = {s: base / "trainvalsplit_places205" / f"{s}_places205.csv" for s in ("train", "val")}
    parsed = {s: _read_places_csv(p) for s, p in lists.items()}
    samples = [(base / "images256" / rel, label) for rel, label in parsed[split]]
    if check_images:
        _check_images("places205", (p for p, _ in samples))
    num_classes = _check_places_labels(parsed, lists)
    names = [str(i) for i in range(num_classes)]
    for rel, label in parsed["train"]:
        names[label] = Path(rel).parent.name
    return ClassificationSplit("places205", split, samples, num_classes, names)


def _check_places_labels(parsed: dict, lists: dict) -> int:
    """The number of classes; refuses labels outside 0..204, gaps in the train labels and val-only labels."""
    for split, rows in parsed.items():
        for n, (rel, label) in enumerate(rows, 1):
            if label >= PLACES205_CLASSES:
                raise _fail("places205", f"{lists[split]}:{n}", f"label {label} of {rel} is outside Places205's "
                            f"{PLACES205_CLASSES} classes (0..{PLACES205_CLASSES - 1})", "fix or remove the line")
    train = {label for _, label in parsed["train"]}
    gaps = sorted(set(range(max(train) + 1)) - train)
    if gaps:
        raise _fail("places205", lists["train"], f"labels {gaps[:10]} have no train image (labels must be 0..K-1, "
                    "each with train images)", "fix the labels or add the missing classes' images")
    unseen = sorted({label for _, label in parsed["val"]} - train)
    if unseen:
        raise _fail("places205", lists["val"], f"labels {unseen[:10]} have no train image", "fix the labels")
    return len(train)


def _read_places_csv(path: Path) -> list[tuple[str, int]]:
    rows = []
    for n, line in enumerate(_need("places205", path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise _fail("places205", f"{path}:{n}", f"malformed line {line!r} (expected '<relative path> <label>')")
        rows.append((parts[0], int(parts[1])))
    if not rows:
        raise _fail("places205", path, "empty list")
    return rows


# ----------------------------------------------------------------------------------------------- detection
def load_voc(data_root, year: str, split: str, check_images: bool = True) -> list[dict]:
    """detectron2-style dicts for VOC<year>/<split>: boxes 0-based like detectron2 (xmin-1, ymin-1, xmax, ymax),
    `category_id` indexes VOC_CLASSES, `difficult` kept (the evaluator ignores difficult objects)."""
    base = _need("voc", Path(data_root) / "VOCdevkit" / f"VOC{year}", "directory")
    listing = _need("voc", base / "ImageSets" / "Main" / f"{split}.txt")
    records = []
    for image_id in listing.read_text().split():
        records.append(_read_voc_xml(base, image_id))
    if check_images:
        _check_images("voc", (r["file_name"] for r in records))
    return records


def _read_voc_xml(base: Path, image_id: str) -> dict:
    path = _need("voc", base / "Annotations" / f"{image_id}.xml")
    try:
        tree = ET.parse(path).getroot()
        size = tree.find("size")
        record = {"file_name": str(base / "JPEGImages" / f"{image_id}.jpg"), "image_id": image_id,
                  "height": int(size.find("height").text), "width": int(size.find("width").text),
                  "annotations": []}
        for obj in tree.findall("object"):
            name = obj.find("name").text.strip()
            if name not in VOC_CLASSES:
                raise ValueError(f"unknown class {name!r}")
            box = obj.find("bndbox")
            x0, y0, x1, y1 = (float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
            difficult = obj.find("difficult")
            record["annotations"].append({"bbox": [x0 - 1.0, y0 - 1.0, x1, y1],
                                          "category_id": VOC_CLASSES.index(name),
                                          "difficult": bool(int(difficult.text)) if difficult is not None else False})
    except ET.ParseError as e:
        raise _fail("voc", path, f"malformed XML ({e})") from e
    except (AttributeError, TypeError, ValueError) as e:
        raise _fail("voc", path, f"malformed annotation ({e or 'missing field'})") from e
    return record


COCO_SPLITS = ("train2017", "val2017")


def load_coco(data_root, split: str, check_images: bool = True):
    """(pycocotools COCO, image dir) for `train2017` / `val2017`; verifies the json and every image file."""
    from pycocotools.coco import COCO

    if split not in COCO_SPLITS:
        raise ValueError(f"COCO split {split!r}: one of {COCO_SPLITS}")
    root = _need("coco", Path(data_root) / "coco", "directory")
    path = root / "annotations" / f"instances_{split}.json"
    data = _read_json("coco", path, ("images", "annotations", "categories"))
    images = _need("coco", root / split, "directory")
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while indexing
            coco.createIndex()
        files = [images / im["file_name"] for im in data["images"]]
    except (KeyError, TypeError) as e:
        raise _fail("coco", path, f"malformed entry (missing {e})") from e
    if check_images:
        _check_images("coco", files)
    return coco, images


def load_lvis(data_root, split: str, check_images: bool = True):
    """(lvis.LVIS, image_id -> Path) for `train` / `val`; images resolved from coco_url into coco/<split>2017/."""
    import logging

    from lvis import LVIS

    if split not in ("train", "val"):
        raise ValueError(f"LVIS split {split!r}: train or val")
    path = Path(data_root) / "lvis" / f"lvis_v1_{split}.json"
    data = _read_json("lvis", path, ("images", "annotations", "categories"))
    try:
        for cat in data["categories"]:
            if cat["frequency"] not in ("r", "c", "f"):
                raise ValueError(f"category {cat['id']} has frequency {cat['frequency']!r}")
        files = {im["id"]: Path(data_root) / "coco" / Path(im["coco_url"]).parent.name / Path(im["coco_url"]).name
                 for im in data["images"]}
        for im in data["images"]:
            im["not_exhaustive_category_ids"], im["neg_category_ids"]
        lvis = LVIS.__new__(LVIS)  # LVIS(path) would parse the json a second time
        lvis.logger, lvis.dataset = logging.getLogger("lvis.lvis"), data
        lvis._create_index()
    except (KeyError, TypeError, ValueError) as e:
        raise _fail("lvis", path, f"malformed entry ({e})") from e
    if check_images:
        _check_images("lvis", files.values())
    return lvis, files.__getitem__


def load_ade20k(data_root, split: str) -> list[tuple[Path, Path]]:
    """(image, annotation) pairs for `training` / `validation`; every image needs its annotation PNG."""
    if split not in ("training", "validation"):
        raise ValueError(f"ADE20K split {split!r}: training or validation")
    base = _need("ade20k", Path(data_root) / "ADEChallengeData2016", "directory")
    images = sorted(_need("ade20k", base / "images" / split, "directory").glob("*.jpg"))
    if not images:
        raise _fail("ade20k", base / "images" / split, "no .jpg images")
    pairs = []
    for image in images:
        ann = base / "annotations" / split / f"{image.stem}.png"
        if not ann.is_file():
            raise _fail("ade20k", ann, f"missing annotation for {image.name}")
        _check_ade20k_pair(image, ann)
        pairs.append((image, ann))
    return pairs


def _image_header(dataset: str, path: Path):
    """(size, mode) from the file header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except (OSError, UnidentifiedImageError) as e:
        raise _fail(dataset, path, f"unreadable or corrupt image ({e})", "re-copy it or remove it") from e


def _check_ade20k_pair(image: Path, ann: Path) -> None:
    """Header reads: the annotation is a single-channel 8-bit PNG of its image's size."""
    size, _ = _image_header("ade20k", image)
    ann_size, mode = _image_header("ade20k", ann)
    if mode not in ("L", "P"):
        raise _fail("ade20k", ann, f"annotation mode {mode}, expected 8-bit single-channel (L)", "re-export it")
    if ann_size != size:
        raise _fail("ade20k", ann, f"annotation size {ann_size[0]}x{ann_size[1]} differs from its image "
                    f"{image.name} ({size[0]}x{size[1]})", "re-copy the pair")


def check_ade20k_labels(pairs) -> None:
    """Every annotation's labels are 0 (other/ignore) .. 150: decodes the PNGs (about 1 ms each)."""
    from PIL import Image

    for _, ann in pairs:
        with Image.open(ann) as im:
            low, high = im.getextrema() if im.mode == "L" else im.convert("L").getextrema()
        if high > ADE20K_CLASSES:
            raise _fail("ade20k", ann, f"label {high} outside ADE20K's classes (0 = other/ignore, "
                        f"1..{ADE20K_CLASSES})", "re-export the annotation")


def check_layout(dataset: str, data_root) -> None:
    """Raise LayoutError unless `dataset`'s files are in place under `data_root`."""
    checks = {
        "inat18": lambda r: [load_classification("inat18", r, s) for s in ("train", "val")],
        "places205": lambda r: [load_classification("places205", r, s) for s in ("train", "val")],
        "voc": lambda r: [load_voc(r, "2007", "trainval"), load_voc(r, "2007", "test"), load_voc(r, "2012", "trainval")],
        "coco": lambda r: [load_coco(r, s) for s in COCO_SPLITS],
        "lvis": lambda r: [load_lvis(r, s) for s in ("train", "val")],
        "ade20k": lambda r: [check_ade20k_labels(load_ade20k(r, s)) for s in ("training", "validation")],
    }
    if dataset not in checks:
        raise ValueError(f"unknown dataset {dataset!r}; datasets: {', '.join(checks)}")
    if not Path(data_root).is_dir():
        raise _fail(dataset, Path(data_root), "--data-root does not exist")
    checks[dataset](data_root)
