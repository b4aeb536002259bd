"""What a run leaves beside its numbers for the report to draw: a training curve and a few pictures.

Conventions (read by `bench report --format html|png`):
- a benchmark record's `extra.curve` is {"step": [...], "<series>": [...], ...} (e.g. loss, lr) and
  `extra.eval_curve` the same at evaluation points (e.g. AP, mIoU); `training_curve` builds them, at most
  MAX_POINTS points. An mmseg run's curve is read from its work dir's mmengine JSON logs (`extra.work_dir`).
- a pretraining run's curve is its `log.jsonl` (one line per step), found through the artifact's provenance
  (`config.output_dir`).
- pictures are a few small PNGs in a `pictures/` folder: `<output_dir>/pictures/` for pretraining, and
  `extra.pictures` (a folder, absolute or relative to the record's folder) for a benchmark run; `save_pictures`
  writes them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

MAX_POINTS = 200
PICTURE_SIDE = 384  # longest side of a saved picture, px
MAX_PICTURES = 8
MMENGINE_HOUSEKEEPING = ("iter", "epoch", "time", "data_time", "memory")  # logged scalars that are not curves


def _indices(n: int, max_points: int) -> list[int]:
    """At most `max_points` evenly spread indices of range(n), always keeping the first and the last."""
    if n <= max_points:
        return list(range(n))
    return sorted({round(i * (n - 1) / (max_points - 1)) for i in range(max_points)})


def training_curve(rows: list[dict], x: str = "step", max_points: int = MAX_POINTS) -> dict:
    """Column-wise curve {x: [...], key: [...]} from per-step dicts (keys that are finite numbers in every row),
    thinned to `max_points` evenly spaced rows; {} for no rows."""
    rows = [r for r in rows if x in r]
    if not rows:
        return {}
    keys = [k for k in rows[0] if k != x and all(_finite(r.get(k)) for r in rows)]
    keep = [rows[i] for i in _indices(len(rows), max_points)]
    return {x: [r[x] for r in keep], **{k: [float(r[k]) for r in keep] for k in keys}}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_jsonl_curve(path, max_points: int = MAX_POINTS) -> dict:
    """A pretraining `log.jsonl` (one JSON object per step) as a training curve; {} when missing or empty."""
    path = Path(path)
    if not path.is_file():
        return {}
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return training_curve(rows, max_points=max_points)


def read_mmengine_curves(work_dir, max_points: int = MAX_POINTS) -> tuple[dict, dict]:
    """(train curve, eval curve) from the mmengine scalar logs under `work_dir` (`<timestamp>/vis_data/
    scalars.json`, one folder per start; a resumed run's later lines win); ({}, {}) when there are none."""
    logs = sorted(Path(work_dir).glob("*/vis_data/scalars.json")) if Path(work_dir).is_dir() else []
    train, evals = {}, {}
    for log in logs:
        for line in log.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "step" in row:
                row = {k: v for k, v in row.items() if k not in MMENGINE_HOUSEKEEPING}
                (train if "loss" in row else evals)[row["step"]] = row
    return tuple(training_curve([rows[k] for k in sorted(rows)], max_points=max_points) for rows in (train, evals))


def save_pictures(folder, pictures: dict, max_side: int = PICTURE_SIDE) -> list[Path]:
    """Write up to MAX_PICTURES PIL images {name: image} as `folder/<name>.png`, each shrunk to `max_side`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, image in list(pictures.items())[:MAX_PICTURES]:
        image = image.copy()
        image.thumbnail((max_side, max_side))
        path = folder / f"{name}.png"
        image.save(path, optimize=True)
        written.append(path)
    return written


def find_pictures(folder) -> list[Path]:
    """The PNGs of a pictures folder, sorted by name (at most MAX_PICTURES); [] when it does not exist."""
    folder = Path(folder)
    return sorted(folder.glob("*.png"))[:MAX_PICTURES] if folder.is_dir() else []


def save_run_pictures(results_dir, name: str, pictures: dict) -> str:
    """Save a benchmark run's pictures under `results_dir`/pictures/`name`/ and return that folder relative to
    `results_dir` (the record's `extra.pictures`)."""
    relative = Path("pictures") / name
    save_pictures(Path(results_dir) / relative, pictures)
    return str(relative)


def detection_pictures(records: list[dict], predictions: list[dict], class_names: list[str], count: int = 4,
                       max_boxes: int = 5) -> dict:
    """The first `count` evaluated images with their `max_boxes` best detections drawn (box, class, score).

    `records` are detection.py's split records (file_name), `predictions` its `predict` output (index, boxes in
    original-image pixels, scores, 0-based labels)."""
    from PIL import Image, ImageDraw

    pictures = {}
    for pred in sorted(predictions, key=lambda p: p["index"])[:count]:
        record = records[pred["index"]]
        with Image.open(record["file_name"]) as im:
            image = im.convert("RGB")
        scale = max(1, 256 // max(image.size))  # miniature images: enlarge so the labels stay readable
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        draw = ImageDraw.Draw(image)
        for i in sorted(range(len(pred["scores"])), key=lambda i: -pred["scores"][i])[:max_boxes]:
            box = [float(v) * scale for v in pred["boxes"][i]]
            draw.rectangle(box, outline=(255, 64, 32), width=2)
            draw.text((box[0] + 2, box[1] + 1), f"{class_names[int(pred['labels'][i])]} {pred['scores'][i]:.2f}",
                      fill=(255, 255, 0))
        pictures[f"val-{Path(record['file_name']).stem}"] = image
    return pictures
