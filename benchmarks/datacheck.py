"""`bench data check`: is a --data-root complete before the GPU hours start?

For each dataset the annotation files are parsed with the loaders of transfer/datasets.py (without their
per-file check), the number of images per split and of classes is compared with the real dataset's published
sizes (or, under a miniature root, with the counts `bench data mini` recorded in its marker file), labels are
checked against the class lists, and every listed image gets a parallel header read plus an end-of-file check
(a truncated JPEG/PNG has a valid header but no end marker). Problems are summarised one line per kind and
split, with counts, a few example paths and the fix; any problem makes the command exit 1.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from transfer import datasets as D
from transfer.progress import progress

# Published sizes of the real splits (images per split, number of classes), each with its source.
REAL_SIZES = {
    # host.robots.ox.ac.uk/pascal/VOC/voc2007/dbstats.html (Main: trainval 5,011 images, test 4,952) and
    # host.robots.ox.ac.uk/pascal/VOC/voc2012/dbstats.html (Main: trainval 11,540 images); 20 classes.
    "voc": ({"2007_trainval": 5011, "2007_test": 4952, "2012_trainval": 11540}, 20),
    # cocodataset.org 2017 release, instances_{train,val}2017.json: 118,287 / 5,000 images, 80 categories.
    "coco": ({"train": 118287, "val": 5000}, 80),
    # lvisdataset.org/dataset, LVIS v1.0: train 100,170 images, val 19,809 images, 1,203 categories.
    "lvis": ({"train": 100170, "val": 19809}, 1203),
    # sceneparsing.csail.mit.edu (ADEChallengeData2016): 20,210 training, 2,000 validation images, 150 classes.
    "ade20k": ({"training": 20210, "validation": 2000}, 150),
    # github.com/visipedia/inat_comp/tree/master/2018 README: 8,142 species, 437,513 train, 24,426 val images.
    "inat18": ({"train": 437513, "val": 24426}, 8142),
    # Zhou et al., "Learning Deep Features for Scene Recognition using Places Database", NeurIPS 2014, Sec. 4:
    # 2,448,873 training images of 205 categories; validation 100 images per category (20,500);
    # places.csail.mit.edu/downloadData.html (trainvalsplit_places205.tar.gz).
    "places205": ({"train": 2448873, "val": 20500}, 205),
    # Russakovsky et al., "ImageNet Large Scale Visual Recognition Challenge", IJCV 2015, Table 2 (ILSVRC2012):
    # 1,281,167 training, 50,000 validation images, 1,000 classes.
    "imagenet": ({"train": 1281167, "val": 50000}, 1000),
}
DATASETS = tuple(REAL_SIZES)
LAYOUTS = {**D.EXPECTED_LAYOUTS, "imagenet": "imagenet/{train,val}/<wnid>/<image>.JPEG   (ILSVRC2012, ImageFolder)"}
MINI_MARKER = ".bench-mini.json"

FIXES = {
    "layout": "lay the files out as expected under --data-root",
    "missing": "re-copy the listed images from the dataset's archive (or drop them from the annotation list)",
    "unreadable": "re-copy these files; they are not images PIL can open",
    "truncated": "re-copy these files; they end before the image's end-of-file marker (an interrupted copy)",
    "count": "the split is incomplete or has extra entries: re-extract the official archive / annotation file",
    "classes": "the class list differs from the dataset's: use the official annotation files / lists",
    "labels": "labels outside the class list: use the official annotation files / lists",
}


@dataclasses.dataclass
class Problem:
    kind: str          # one of FIXES
    where: str         # dataset/split
    count: int
    detail: str
    examples: list = dataclasses.field(default_factory=list)
    fix: str = ""      # overrides FIXES[kind]

    def line(self, root: Path, max_examples: int = 3) -> str:
        shown = [_relative(p, root) for p in self.examples[:max_examples]]
        more = f", ... (+{len(self.examples) - len(shown)})" if len(self.examples) > len(shown) else ""
        examples = f"; e.g. {', '.join(shown)}{more}" if shown else ""
        return f"{self.kind.upper():<10} {self.where}: {self.detail}{examples}"

    def fix_line(self) -> str:
        return f"{'':<11}fix: " + (self.fix or FIXES[self.kind]).replace("\n", "\n" + " " * 16)


@dataclasses.dataclass
class Split:
    """One split to verify: its listed files, its expected size and (optionally) label checks."""
    dataset: str
    name: str
    files: list
    expected: int | None
    label_pngs: list = dataclasses.field(default_factory=list)  # ADE20K annotation PNGs (values must be <= 150)


def _relative(path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def expected_sizes(root: Path) -> dict:
    """dataset -> ({split: images}, classes): the published sizes, or a miniature root's own counts."""
    marker = root / MINI_MARKER
    if not marker.is_file():
        return REAL_SIZES
    from transfer import minidata

    summary = json.loads(marker.read_text())["summary"]
    classes = {"voc": len(D.VOC_CLASSES), "coco": len(minidata.COCO_CATEGORIES),
               "lvis": len(minidata.COCO_CATEGORIES), "ade20k": 150, "inat18": minidata.INAT_CLASSES,
               "places205": len(minidata.PLACES_SCENES)}
    return {name: (splits, classes[name]) for name, splits in summary.items()}


def resolve_datasets(names) -> list[str]:
    """Benchmark or dataset names -> dataset names (default: every benchmark's dataset)."""
    from benchmarks.spec import load_specs

    specs = load_specs()
    if not names:
        return sorted({spec.dataset for spec in specs.values()}, key=DATASETS.index)
    out = []
    for name in names:
        dataset = specs[name].dataset if name in specs else name
        if dataset not in DATASETS:
            raise SystemExit(f"bench data check: unknown benchmark or dataset {name!r}; "
                             f"benchmarks: {', '.join(specs)}; datasets: {', '.join(DATASETS)}")
        if dataset not in out:
            out.append(dataset)
    return out


# ----------------------------------------------------------------------------------------------- per dataset
def collect(dataset: str, root: Path, sizes: dict, problems: list) -> list[Split]:
    """Parse `dataset`'s annotation files into Splits; layout, class and label problems go to `problems`."""
    expected, num_classes = sizes.get(dataset, ({}, None))
    try:
        return COLLECTORS[dataset](root, expected, num_classes, problems)
    except D.LayoutError as e:
        problems.append(Problem("layout", dataset, 1, str(e).splitlines()[0], fix=layout_fix(dataset)))
        return []


def layout_fix(dataset: str) -> str:
    return f"lay the files out as expected under --data-root:\n{LAYOUTS[dataset]}"


def _class_count(dataset: str, found: int, num_classes, problems: list, names=()) -> None:
    if num_classes is not None and found != num_classes:
        problems.append(Problem("classes", dataset, abs(found - num_classes),
                                f"{found} classes, expected {num_classes}", list(names)))


def _voc(root, expected, num_classes, problems):
    splits = []
    for key in ("2007_trainval", "2007_test", "2012_trainval"):
        year, split = key.split("_")
        try:
            records = D.load_voc(root, year, split, check_images=False)
        except D.LayoutError as e:  # unknown class names are reported by the loader with the XML's path
            kind = "labels" if "unknown class" in str(e) else "layout"
            problems.append(Problem(kind, f"voc/{key}", 1, str(e).splitlines()[0],
                                    fix=layout_fix("voc") if kind == "layout" else ""))
            continue
        splits.append(Split("voc", key, [r["file_name"] for r in records], expected.get(key)))
    return splits


def _coco(root, expected, num_classes, problems):
    splits = []
    for split in ("train", "val"):
        coco, images = D.load_coco(root, f"{split}2017", check_images=False)
        _labels(coco.dataset, f"coco/{split}", num_classes, problems)
        splits.append(Split("coco", split, [images / im["file_name"] for im in coco.dataset["images"]],
                            expected.get(split)))
    return splits


def _lvis(root, expected, num_classes, problems):
    splits = []
    for split in ("train", "val"):
        lvis, file_of = D.load_lvis(root, split, check_images=False)
        _labels(lvis.dataset, f"lvis/{split}", num_classes, problems)
        splits.append(Split("lvis", split, [file_of(im["id"]) for im in lvis.dataset["images"]], expected.get(split)))
    return splits


def _labels(data: dict, where: str, num_classes, problems: list) -> None:
    """COCO-style json: the number of categories and annotations whose category is not in the list."""
    known = {c["id"] for c in data["categories"]}
    _class_count(where, len(known), num_classes, problems, [c.get("name", c["id"]) for c in data["categories"]][
        num_classes or 0:])
    unknown = [a for a in data["annotations"] if a.get("category_id") not in known]
    if unknown:
        problems.append(Problem("labels", where, len(unknown), f"{len(unknown)} annotations name a category "
                                f"outside the {len(known)} categories (ids {sorted({a.get('category_id') for a in unknown})[:5]})"))


def _ade20k(root, expected, num_classes, problems):
    base = D._need("ade20k", root / "ADEChallengeData2016", "directory")
    splits = []
    for split in ("training", "validation"):
        images = sorted(D._need("ade20k", base / "images" / split, "directory").glob("*.jpg"))
        anns = sorted((base / "annotations" / split).glob("*.png"))
        stems = {p.stem for p in images}
        orphans = [p for p in anns if p.stem not in stems]
        missing = [base / "annotations" / split / f"{p.stem}.png" for p in images
                   if not (base / "annotations" / split / f"{p.stem}.png").is_file()]
        if missing:
            problems.append(Problem("missing", f"ade20k/{split}", len(missing),
                                    f"{len(missing)} of {len(images)} images have no annotation PNG", missing))
        if orphans:
            problems.append(Problem("missing", f"ade20k/{split}", len(orphans),
                                    f"{len(orphans)} annotation PNGs have no image", [base / "images" / split /
                                                                                       f"{p.stem}.jpg" for p in orphans]))
        splits.append(Split("ade20k", split, images, expected.get(split),
                            [p for p in anns if p.stem in stems]))
    return splits


def _classification(dataset):
    def collect_split(root, expected, num_classes, problems):
        splits = []
        for split in ("train", "val"):
            data = D.load_classification(dataset, root, split, check_images=False)
            splits.append(Split(dataset, split, [p for p, _ in data.samples], expected.get(split)))
            if dataset == "inat18" or split == "train":  # each iNat json has its own list; Places has one for both
                _class_count(f"{dataset}/{split}", data.num_classes, num_classes, problems,
                             data.class_names[num_classes or 0:])
            if split == "train":
                unused = sorted(set(range(data.num_classes)) - {label for _, label in data.samples})
                if unused and dataset == "places205":
                    problems.append(Problem("labels", f"{dataset}/train", len(unused),
                                            f"{len(unused)} labels in 0..{data.num_classes - 1} have no train "
                                            f"image (ids {unused[:5]})"))
        if dataset == "places205":  # one folder per label
            _places_folders(root, problems)
        return splits
    return collect_split


def _places_folders(root: Path, problems: list) -> None:
    folders = {}
    for rel, label in D._read_places_csv(root / "places205" / "trainvalsplit_places205" / "train_places205.csv"):
        folders.setdefault(label, set()).add(str(Path(rel).parent))
    mixed = {label: sorted(f) for label, f in folders.items() if len(f) > 1}
    if mixed:
        label, names = next(iter(mixed.items()))
        problems.append(Problem("labels", "places205/train", len(mixed), f"{len(mixed)} labels span several class "
                                f"folders (label {label}: {', '.join(names[:3])})"))


def _imagenet(root, expected, num_classes, problems):
    """ImageNet for pretraining (ImageFolder: imagenet/{train,val}/<wnid>/*.JPEG)."""
    splits, classes = [], {}
    for split in ("train", "val"):
        base = root / "imagenet" / split
        if not base.is_dir():
            raise D.LayoutError(f"{base}: missing directory")
        folders = sorted(p for p in base.iterdir() if p.is_dir())
        classes[split] = {p.name for p in folders}
        files = [f for d in folders for f in sorted(d.iterdir()) if f.suffix.lower() in (".jpeg", ".jpg", ".png")]
        splits.append(Split("imagenet", split, files, expected.get(split)))
    _class_count("imagenet/train", len(classes["train"]), num_classes, problems)
    extra = classes["val"] ^ classes["train"]
    if extra:
        problems.append(Problem("classes", "imagenet/val", len(extra), f"{len(extra)} class folders are in only one of "
                                f"train and val ({', '.join(sorted(extra)[:3])})"))
    return splits


COLLECTORS = {"voc": _voc, "coco": _coco, "lvis": _lvis, "ade20k": _ade20k,
              "inat18": _classification("inat18"), "places205": _classification("places205"), "imagenet": _imagenet}


# ----------------------------------------------------------------------------------------------- file pass
JPEG_END, PNG_END = b"\xff\xd9", b"IEND\xaeB`\x82"


def check_file(path, max_label: int | None = None, full: bool = False) -> str | None:
    """None when the image is fine, else the kind of problem: missing, unreadable, truncated or labels.

    Reads the header (PIL) and the last KiB (JPEG end-of-image / PNG IEND marker): a copy cut short keeps a valid
    header but loses its end. `full` decodes every pixel instead; `max_label` decodes a label PNG and checks it.
    """
    from PIL import Image

    try:
        size = os.path.getsize(path)
    except OSError:
        return "missing"
    try:
        with Image.open(path) as image:
            fmt = image.format
            if full or max_label is not None:
                image.load()
                if max_label is not None and image.getextrema() and _max_value(image) > max_label:
                    return "labels"
    except OSError as e:  # PIL raises OSError (incl. UnidentifiedImageError) for bad or truncated data
        return "truncated" if "truncated" in str(e) else "unreadable"
    except Exception:  # noqa: BLE001 - any decoder failure means the file is unusable
        return "unreadable"
    end = {"JPEG": JPEG_END, "PNG": PNG_END}.get(fmt)
    if end is not None:
        with open(path, "rb") as f:
            f.seek(max(0, size - 1024))
            if end not in f.read():
                return "truncated"
    return None


def _max_value(image) -> int:
    extrema = image.getextrema()
    return max(e[1] for e in extrema) if isinstance(extrema[0], tuple) else extrema[1]


def scan(tasks: list[tuple], workers: int, full: bool, bar) -> list[str | None]:
    """check_file over (path, max_label) tasks in a thread pool (I/O bound), reporting progress."""
    results = [None] * len(tasks)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = pool.map(lambda t: check_file(t[0], t[1], full), tasks, chunksize=64)
        for i, result in enumerate(futures):
            results[i] = result
            bar.update(1)
    return results


# ----------------------------------------------------------------------------------------------- driver
def check(data_root, names=(), quick: int | None = None, workers: int | None = None, full: bool = False,
          seed: int = 0, progress_every: float = 30.0) -> tuple[list[Problem], dict]:
    """All problems under `data_root` for the named benchmarks/datasets, and {dataset/split: images listed}."""
    root = Path(data_root)
    if not root.is_dir():
        raise SystemExit(f"bench data check: --data-root {root} is not a directory")
    sizes = expected_sizes(root)
    problems, splits = [], []
    for dataset in resolve_datasets(names):
        if dataset not in sizes:  # a miniature root without this dataset
            problems.append(Problem("layout", dataset, 1, f"not written by `bench data mini` under {root}"))
            continue
        splits += collect(dataset, root, sizes, problems)
    listed = {f"{s.dataset}/{s.name}": len(s.files) for s in splits}
    for s in splits:
        if s.expected is not None and len(s.files) != s.expected:
            problems.append(Problem("count", f"{s.dataset}/{s.name}", abs(len(s.files) - s.expected),
                                    f"{len(s.files):,} images listed, expected {s.expected:,}"))
    rng = random.Random(seed)
    tasks, owners = [], []
    for index, s in enumerate(splits):
        items = [(f, None) for f in s.files] + [(f, 150) for f in s.label_pngs]
        if quick and len(items) > quick:
            items = rng.sample(items, quick)
        tasks += items
        owners += [index] * len(items)
    bar = progress(total=len(tasks), desc="bench data check", every=progress_every, unit="files")
    results = scan(tasks, workers or min(32, 4 * (os.cpu_count() or 1)), full, bar)
    bar.close()
    grouped = {}
    for (path, _), owner, result in zip(tasks, owners, results):
        if result is not None:
            grouped.setdefault((result, owner), []).append(path)
    for (kind, index), paths in grouped.items():
        owner, checked = splits[index], owners.count(index)
        what = {"missing": "missing", "unreadable": "unreadable", "truncated": "truncated",
                "labels": "label PNGs with values above 150"}[kind]
        problems.append(Problem(kind, f"{owner.dataset}/{owner.name}", len(paths),
                                f"{len(paths):,} of {checked:,} checked files {what}", paths))
    return problems, listed


def report(problems: list[Problem], listed: dict, root, quick: int | None = None) -> str:
    """The summary a person can act on: one line per problem kind and split, then the verdict."""
    root = Path(root)
    lines = []
    for kind in FIXES:  # the problems of one kind, then each distinct fix once
        mine = sorted((p for p in problems if p.kind == kind), key=lambda p: p.where)
        lines += [p.line(root) for p in mine] + list(dict.fromkeys(p.fix_line() for p in mine))
    total = sum(listed.values())
    sampled = f" (--quick: up to {quick} sampled files per split)" if quick else ""
    head = ["  ".join(f"{k}={v:,}" for k, v in listed.items())] if listed else []
    verdict = (f"bench data check: {len(problems)} problem(s) under {root}{sampled}" if problems else
               f"bench data check: OK, {total:,} images in {len(listed)} splits under {root}{sampled}")
    return "\n".join([*head, *lines, verdict])
