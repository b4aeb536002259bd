"""Miniature datasets in the exact real layouts, drawn from one synthetic world (deterministic per seed).

The world: 20 object classes (5 shapes x 4 colour/texture families) placed without overlap on textured scene
backgrounds of 10 scene classes. Every label is learnable from pixels, so a backbone that learned anything
beats random init. Object k is VOC class k, one of 20 real COCO categories, one of 20 LVIS-style categories
(frequency groups f/c/r) and one of 20 ADE20K "thing" labels; iNat uses 12 fine-grained object classes with
long-tailed counts; Places has 10 scene classes recognised by their two characteristic objects on backgrounds
unrelated to the scene (version 1 painted each scene in its own palette: colour means alone, which random init
captures, scored 98.5%, and random init beat three of four SSL methods, the reverse of real Places205).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from transfer.datasets import VOC_CLASSES

DATASETS = ("voc", "coco", "lvis", "ade20k", "inat18", "places205")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = np.array([(215, 45, 40), (45, 185, 70), (50, 80, 225), (230, 200, 40)], dtype=np.float32)
COCO_CATEGORIES = [(1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"),
                   (4, "motorcycle", "vehicle"), (5, "airplane", "vehicle"), (6, "bus", "vehicle"),
                   (7, "train", "vehicle"), (9, "boat", "vehicle"), (16, "bird", "animal"), (17, "cat", "animal"),
                   (18, "dog", "animal"), (19, "horse", "animal"), (20, "sheep", "animal"), (21, "cow", "animal"),
                   (44, "bottle", "kitchen"), (62, "chair", "furniture"), (63, "couch", "furniture"),
                   (64, "potted plant", "furniture"), (67, "dining table", "furniture"), (72, "tv", "electronic")]
LVIS_FREQUENCY = "ffffffcccccccccrrrrr"
ADE_STUFF = {"wall": 1, "floor": 4, "sky": 3, "grass": 10, "road": 7}
ADE_THINGS = [13, 21, 20, 77, 91, 81, 128, 103, 127, 18, 37, 27, 38, 120, 23, 80, 24, 34, 90, 142]
INAT_CLASSES = 12
PLACES_SCENES = ("a/arch", "b/beach", "c/corridor", "d/desert", "f/forest", "h/highway", "k/kitchen",
                 "m/mountain", "o/office", "r/river")
JPEG_QUALITY = 90
WORLD_VERSION = 2  # bump when the drawing changes, so cached trees are regenerated


# ----------------------------------------------------------------------------------------------- drawing
def shape_polygon(shape: int, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of one of the 5 shapes, centred at (cx, cy) with radius r, rotated by `angle`."""
    if shape == 0:
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 20, endpoint=False)]
    elif shape == 1:
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == 2:
        pts = [(0, -1), (0.95, 0.8), (-0.95, 0.8)]
    elif shape == 3:
        pts = [(0, -1), (0.55, 0), (0, 1), (-0.55, 0)]
    else:
        a = 0.33
        pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a),
               (-a, -a)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def object_texture(k: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Colour family k % 4 with its own texture: solid, stripes, dots or checker."""
    family = k % 4
    color = COLORS[family] * rng.uniform(0.85, 1.1)
    yy, xx = np.mgrid[0:h, 0:w]
    pattern = [np.ones((h, w)), 0.6 + 0.4 * (np.sin(yy * 1.2) > 0), 0.6 + 0.4 * ((xx % 4 < 2) & (yy % 4 < 2)),
               0.6 + 0.4 * (((xx // 3) + (yy // 3)) % 2)][family]
    return np.clip(color * pattern[..., None] + rng.normal(0, 8, (h, w, 3)), 0, 255)


def scene_background(scene: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One of 10 scene classes: a texture family with a class-specific palette, jittered per image."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = yy / h, xx / w
    f = rng.uniform(0.8, 1.2)
    base = [u, np.sin(yy * 0.5 * f) > 0, np.sin(xx * 0.5 * f) > 0, ((xx // (8 * f)) + (yy // (8 * f))) % 2,
            _smooth_noise(h, w, 4, rng), rng.random((h, w)), np.sin((xx + yy) * 0.35 * f) > 0,
            np.sin(np.hypot(u - 0.5, v - 0.5) * 40 * f) > 0, u > rng.uniform(0.35, 0.65),
            ((xx % (10 * f)) < 2) | ((yy % (10 * f)) < 2)][scene].astype(np.float32)
    palette = np.random.default_rng(1000 + scene).uniform(30, 225, (2, 3)).astype(np.float32)
    palette += rng.normal(0, 10, (2, 3))
    img = palette[0] * (1 - base[..., None]) + palette[1] * base[..., None]
    return np.clip(img + rng.normal(0, 6, (h, w, 3)), 0, 255)


def _smooth_noise(h: int, w: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0


def place_objects(h: int, w: int, n: int, rng: np.random.Generator, r_range=(0.12, 0.3)) -> list[dict]:
    """Up to n non-overlapping objects (rejection sampling on bounding circles)."""
    placed = []
    for _ in range(n * 20):
        if len(placed) == n:
            break
        r = rng.uniform(*r_range) * min(h, w)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        if all(math.hypot(cx - p["cx"], cy - p["cy"]) > r + p["r"] + 2 for p in placed):
            placed.append({"k": int(rng.integers(20)), "cx": cx, "cy": cy, "r": r,
                           "angle": rng.uniform(0, 2 * math.pi)})
    return placed


def draw(img: np.ndarray, objects: list[dict], rng: np.random.Generator, label_map=None, labels=None):
    """Paint objects into img (H, W, 3 float) and optional label_map; returns (polygons, masks)."""
    h, w = img.shape[:2]
    polygons, masks = [], []
    for obj in objects:
        poly = shape_polygon(obj["k"] // 4, obj["cx"], obj["cy"], obj["r"], obj["angle"])
        canvas = Image.new("L", (w, h), 0)
        ImageDraw.Draw(canvas).polygon(poly, fill=1)
        mask = np.asarray(canvas, dtype=bool)
        img[mask] = object_texture(obj["k"], h, w, rng)[mask]
        if label_map is not None:
            label_map[mask] = labels[obj["k"]]
        polygons.append([round(c, 2) for xy in poly for c in xy])
        masks.append(mask)
    return polygons, masks


def save_jpeg(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=JPEG_QUALITY)


def detection_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[dict], list, list]:
    h, w = (size, int(size * 1.33)) if rng.random() < 0.6 else (int(size * 1.33), size)
    img = scene_background(int(rng.integers(10)), h, w, rng)
    objects = place_objects(h, w, int(rng.integers(1, 5)), rng)
    polygons, masks = draw(img, objects, rng)
    return img, objects, polygons, masks


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------------------------- datasets
def write_voc(root: Path, rng: np.random.Generator, counts: dict, size: int) -> dict:
    """VOC2007 trainval/test and VOC2012 trainval with difficult flags on the smallest objects."""
    summary = {}
    for year, splits in (("2007", ("trainval", "test")), ("2012", ("trainval",))):
        base = root / "VOCdevkit" / f"VOC{year}"
        for split in splits:
            ids = []
            for i in range(counts[f"voc{year}_{split}"]):
                image_id = f"{len(ids) + (0 if split == 'trainval' else 5000) + 1:06d}" if year == "2007" \
                    else f"2008_{i + 1:06d}"
                img, objects, _, masks = detection_image(rng, size)
                save_jpeg(img, base / "JPEGImages" / f"{image_id}.jpg")
                _write_voc_xml(base / "Annotations" / f"{image_id}.xml", year, image_id, img.shape, objects, masks)
                ids.append(image_id)
            listing = base / "ImageSets" / "Main" / f"{split}.txt"
            listing.parent.mkdir(parents=True, exist_ok=True)
            listing.write_text("".join(f"{i}\n" for i in ids))
            summary[f"{year}_{split}"] = len(ids)
    return summary


def _write_voc_xml(path: Path, year: str, image_id: str, shape, objects, masks) -> None:
    h, w = shape[:2]
    parts = [f"<annotation><folder>VOC{year}</folder><filename>{image_id}.jpg</filename>"
             f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size><segmented>0</segmented>"]
    for obj, mask in zip(objects, masks):
        x, y, bw, bh = _bbox(mask)
        difficult = int(obj["r"] < 0.13 * min(h, w))
        parts.append(f"<object><name>{VOC_CLASSES[obj['k']]}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>{int(x) + 1}</xmin><ymin>{int(y) + 1}</ymin>"
                     f"<xmax>{int(x + bw)}</xmax><ymax>{int(y + bh)}</ymax></bndbox></object>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts) + "</annotation>\n")


def write_coco_and_lvis(root: Path, rng: np.random.Generator, counts: dict, size: int) -> dict:
    """COCO instances (polygons, a few iscrowd RLE) and LVIS v1 annotations over the same images."""
    from pycocotools import mask as mask_utils

    summary = {}
    next_image, next_ann = 1, 1
    for split in ("train", "val"):
        images, anns, lvis_images, lvis_anns = [], [], [], []
        for _ in range(counts[f"coco_{split}"]):
            img, objects, polygons, masks = detection_image(rng, size)
            name = f"{next_image:012d}.jpg"
            save_jpeg(img, root / "coco" / f"{split}2017" / name)
            h, w = img.shape[:2]
            images.append({"id": next_image, "file_name": name, "height": h, "width": w, "license": 1})
            present = set()
            for obj, poly, mask in zip(objects, polygons, masks):
                crowd = rng.random() < 0.05
                seg = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                seg["counts"] = seg["counts"].decode()
                ann = {"id": next_ann, "image_id": next_image, "category_id": COCO_CATEGORIES[obj["k"]][0],
                       "bbox": _bbox(mask), "area": float(mask.sum()), "iscrowd": int(crowd),
                       "segmentation": seg if crowd else [poly]}
                anns.append(ann)
                lvis_anns.append({"id": next_ann, "image_id": next_image, "category_id": obj["k"] + 1,
                                  "bbox": ann["bbox"], "area": ann["area"], "segmentation": [poly]})
                present.add(obj["k"] + 1)
                next_ann += 1
            absent = [c for c in range(1, 21) if c not in present]
            lvis_images.append({"id": next_image, "height": h, "width": w,
                                "coco_url": f"http://images.cocodataset.org/{split}2017/{name}",
                                "not_exhaustive_category_ids": [],
                                "neg_category_ids": [int(c) for c in rng.choice(absent, 2, replace=False)]})
            next_image += 1
        cats = [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup in COCO_CATEGORIES]
        _write_json(root / "coco" / "annotations" / f"instances_{split}2017.json",
                    {"info": {"description": "bench miniature COCO", "year": 2017}, "licenses": [{"id": 1}],
                     "images": images, "annotations": anns, "categories": cats})
        _write_json(root / "lvis" / f"lvis_v1_{split}.json",
                    {"info": {"description": "bench miniature LVIS v1"}, "licenses": [],
                     "images": lvis_images, "annotations": lvis_anns, "categories": _lvis_categories(lvis_anns)})
        summary[split] = len(images)
    return summary


def _lvis_categories(anns: list[dict]) -> list[dict]:
    cats = []
    for k, (_, name, _) in enumerate(COCO_CATEGORIES):
        mine = [a for a in anns if a["category_id"] == k + 1]
        cats.append({"id": k + 1, "name": name.replace(" ", "_"), "synonyms": [name.replace(" ", "_")],
                     "def": f"miniature-world {SHAPES[k // 4]} class {k}", "synset": f"{name.replace(' ', '_')}.n.01",
                     "frequency": LVIS_FREQUENCY[k], "image_count": len({a["image_id"] for a in mine}),
                     "instance_count": len(mine)})
    return cats


def write_ade20k(root: Path, rng: np.random.Generator, counts: dict, size: int) -> dict:
    """Stuff bands (wall/floor/sky/grass/road) + thing objects; a few pixels left 0 (other/ignore)."""
    summary = {}
    base = root / "ADEChallengeData2016"
    stuff = list(ADE_STUFF.values())
    for split, prefix in (("training", "train"), ("validation", "val")):
        for i in range(counts[f"ade_{split}"]):
            img = np.zeros((size, size, 3), np.float32)
            labels = np.zeros((size, size), np.uint8)
            cut = int(rng.uniform(0.3, 0.7) * size)
            for (y0, y1), label in zip(((0, cut), (cut, size)), rng.choice(stuff, 2, replace=False)):
                img[y0:y1] = scene_background(stuff.index(label) * 2, y1 - y0, size, rng)
                labels[y0:y1] = label
            draw(img, place_objects(size, size, int(rng.integers(1, 4)), rng), rng, labels, ADE_THINGS)
            x0, y0 = rng.integers(0, size - 8, 2)
            labels[y0:y0 + 6, x0:x0 + 6] = 0
            name = f"ADE_{prefix}_{i + 1:08d}"
            save_jpeg(img, base / "images" / split / f"{name}.jpg")
            (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(labels, mode="L").save(base / "annotations" / split / f"{name}.png")
        summary[split] = counts[f"ade_{split}"]
    return summary


def write_inat(root: Path, rng: np.random.Generator, counts: dict, size: int) -> dict:
    """12 fine-grained object classes, one object per image, long-tailed train counts, balanced val."""
    train_counts = [max(3, int(counts["inat_train_head"] * 0.8 ** c)) for c in range(INAT_CLASSES)]
    cats = [{"id": c, "name": f"{SHAPES[c // 4]}_{c % 4}", "supercategory": "Plantae" if c < 6 else "Animalia",
             "kingdom": "Plantae" if c < 6 else "Animalia"} for c in range(INAT_CLASSES)]
    summary, next_id = {}, 1
    for split, per_class in (("train", train_counts), ("val", [counts["inat_val_per_class"]] * INAT_CLASSES)):
        images, anns = [], []
        for c, n in enumerate(per_class):
            for _ in range(n):
                img = scene_background(int(rng.integers(10)), size, size, rng)
                r = rng.uniform(0.25, 0.4) * size
                cx, cy = rng.uniform(r, size - r, 2)
                draw(img, [{"k": c, "cx": cx, "cy": cy, "r": r, "angle": rng.uniform(0, 2 * math.pi)}], rng)
                file_name = f"train_val2018/{cats[c]['supercategory']}/{c}/{next_id:08x}.jpg"
                save_jpeg(img, root / "inat2018" / file_name)
                images.append({"id": next_id, "file_name": file_name, "width": size, "height": size})
                anns.append({"id": next_id, "image_id": next_id, "category_id": c})
                next_id += 1
        _write_json(root / "inat2018" / f"{split}2018.json",
                    {"info": {"description": "bench miniature iNat 2018"}, "images": images, "annotations": anns,
                     "categories": cats, "licenses": []})
        summary[split] = len(images)
    return summary


def write_places(root: Path, rng: np.random.Generator, counts: dict, size: int) -> dict:
    """10 scene classes recognised by their contents, as real scenes are (a kitchen has a stove and a fridge):
    scene s shows its two characteristic objects, classes s and s + 10, on a background of a random scene layout
    and palette that says nothing about s."""
    names = PLACES_SCENES
    summary = {}
    for split in ("train", "val"):
        lines = []
        for i in range(counts[f"places_{split}"]):
            scene = i % len(names)
            img = scene_background(int(rng.integers(10)), size, size, rng)
            objects = []
            while len(objects) < 2:
                objects = place_objects(size, size, 2, rng, (0.16, 0.24))
            for obj, k in zip(objects, (scene, scene + 10)):
                obj["k"] = k
            draw(img, objects, rng)
            rel = f"{names[scene]}/{split}_{i:06d}.jpg"
            save_jpeg(img, root / "places205" / "images256" / rel)
            lines.append(f"{rel} {scene}\n")
        listing = root / "places205" / "trainvalsplit_places205" / f"{split}_places205.csv"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("".join(lines))
        summary[split] = len(lines)
    return summary


def _counts(scale: float) -> dict:
    # Validation sets are larger than the train sets' share would suggest: at 96 inat val images one image was
    # 1.04 points and backbones could not be told apart; 480 / 400 make one image ~0.2 / 0.25 points.
    base = {"voc2007_trainval": 200, "voc2007_test": 100, "voc2012_trainval": 200, "coco_train": 200,
            "coco_val": 100, "ade_training": 200, "ade_validation": 60, "inat_train_head": 80,
            "inat_val_per_class": 40, "places_train": 300, "places_val": 400}
    return {k: max(2, int(round(v * scale))) for k, v in base.items()}


def make_mini(root, seed: int = 0, scale: float = 1.0, image_size: int = 96, datasets=None) -> dict:
    """Write the miniature datasets under `root`; idempotent (a marker records seed, scale, size, datasets).

    Classification images are `image_size` px square, detection images ~4/3 of that on the long side.
    """
    root = Path(root)
    datasets = tuple(datasets or DATASETS)
    counts, det_size = _counts(scale), int(image_size * 4 / 3)
    key = {"version": WORLD_VERSION, "seed": seed, "scale": scale, "image_size": image_size,
           "datasets": list(datasets), "counts": counts}
    marker = root / ".bench-mini.json"
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        return json.loads(marker.read_text())["summary"]
    writers = {"voc": (write_voc, det_size), "coco": (write_coco_and_lvis, det_size),
               "ade20k": (write_ade20k, det_size), "inat18": (write_inat, image_size),
               "places205": (write_places, image_size)}
    summary = {}
    for offset, name in enumerate(DATASETS):
        wanted = name in datasets or (name == "coco" and "lvis" in datasets)  # LVIS annotates COCO images
        if not wanted or name not in writers:
            continue
        writer, size = writers[name]
        result = writer(root, np.random.default_rng([seed, offset]), counts, size)
        if name == "coco":
            summary["coco"] = summary["lvis"] = result
        else:
            summary[name] = result
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"key": key, "summary": summary}))
    return summary
