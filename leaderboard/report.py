"""Leaderboard: aggregate result records (mean ± sample std over trials) and render them beside published numbers.

Measured numbers are never averaged across recipe, engine, mode, backbone weights or overrides: each such
combination is its own row. Rows that ran with non-protocol overrides carry a dagger and a footnote.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd


REFERENCES = Path(__file__).with_name("references.csv")
DEFAULT_RESULTS = "results"
DASH = "—"

# aggregation keys: everything that makes two numbers incomparable
GROUP_KEYS = ["benchmark", "recipe", "engine", "mode", "backbone", "backbone_hash", "method", "epochs",
              "protocol", "overrides", "allow_partial_load", "metric"]
ROW_KEYS = ["method", "backbone", "backbone_hash", "epochs", "recipe", "engine", "mode", "overrides",
            "allow_partial_load"]
REF_ROW_KEYS = ["method", "backbone", "epochs", "recipe"]
LONG_COLUMNS = ["kind", "benchmark", "recipe", "engine", "mode", "method", "backbone", "backbone_hash", "epochs",
                "protocol", "overrides", "allow_partial_load", "metric", "mean", "std", "n", "source"]

# The seed paper's tables: (title, [(benchmark, metric, column header), ...]).
TABLES = [
    ("Linear probes (Table 3)", [("places205", "top1", "Places205 top-1"), ("inat18", "top1", "iNat18 top-1")]),
    ("Detection and instance segmentation (Table 4)",
     [("voc07+12", "AP", "VOC AP"), ("voc07+12", "AP50", "VOC AP50"), ("voc07+12", "AP75", "VOC AP75"),
      ("coco-c4-1x", "APbb", "COCO APbb"), ("coco-c4-1x", "APbb50", "COCO APbb50"),
      ("coco-c4-1x", "APbb75", "COCO APbb75"), ("coco-c4-1x", "APmk", "COCO APmk"),
      ("coco-c4-1x", "APmk50", "COCO APmk50"), ("coco-c4-1x", "APmk75", "COCO APmk75")]),
]
BENCHMARK_TITLES = {"places205": "Places205", "inat18": "iNat18", "voc07+12": "VOC", "coco-c4-1x": "COCO",
                    "lvis-c4": "LVIS v1 detection and instance segmentation (C4)",
                    "ade20k": "ADE20K semantic segmentation"}
METRIC_LABELS = {"top1": "top-1", "top5": "top-5"}
METRIC_ORDER = ["top1", "top5", "AP", "AP50", "AP75", "APbb", "APbb50", "APbb75", "APbbr", "APbbc", "APbbf",
                "APmk", "APmk50", "APmk75", "APmkr", "APmkc", "APmkf", "mIoU", "mAcc", "aAcc"]


def load_references(path=None) -> pd.DataFrame:
    """Published numbers (benchmark, recipe, method, pretrain_epochs, backbone, metric, value, source)."""
    refs = pd.read_csv(path or REFERENCES)
    refs["pretrain_epochs"] = refs["pretrain_epochs"].astype("Int64")
    return refs


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof=1; NaN when n=1) and n per GROUP_KEYS, from the long frame of `load_records`.

    Never averages across recipe, engine, mode, backbone hash, overrides or partial-load permission.
    """
    if df.empty:
        return pd.DataFrame(columns=GROUP_KEYS + ["mean", "std", "n"])
    grouped = df.groupby(GROUP_KEYS, dropna=False, sort=True)["value"]
    return grouped.agg(mean="mean", std="std", n="count").reset_index()


def long_frame(measured: pd.DataFrame, refs: pd.DataFrame) -> pd.DataFrame:
    """Measured aggregates and published rows in one long frame, with `kind` = measured | published."""
    meas = measured.assign(kind="measured", source="")
    pub = pd.DataFrame({"kind": "published", "benchmark": refs["benchmark"], "recipe": refs["recipe"],
                        "method": refs["method"], "backbone": refs["backbone"], "epochs": refs["pretrain_epochs"],
                        "metric": refs["metric"], "mean": refs["value"], "source": refs["source"]})
    frames = [f for f in (meas, pub) if not f.empty]
    if not frames:
        return pd.DataFrame(columns=LONG_COLUMNS)
    long = pd.concat(frames, ignore_index=True).reindex(columns=LONG_COLUMNS)
    return long.astype({"epochs": "Int64", "n": "Int64"})


# ----------------------------------------------------------------------------------------------------- markdown

def render_markdown(measured: pd.DataFrame, refs: pd.DataFrame, results_dir) -> str:
    """Table 3, Table 4, then one table per other benchmark, each with measured and published rows."""
    daggers = {}  # filled while rendering, so footnote numbers follow the order of appearance
    lines = ["# Leaderboard", ""]
    if measured.empty:
        lines += [f"No results found in {results_dir}.", ""]
    else:
        lines += [f"Measured rows: mean ± sample std (n trials) of the records in {results_dir}; "
                  "different recipes, engines, modes, weights or overrides are never averaged together.", ""]
    if not refs.empty:
        lines += ["Published rows: leaderboard/references.csv (mode `published`, source in the last column).", ""]
    for title, columns in _tables(measured, refs):
        lines += _table(title, columns, measured, refs, daggers)
    return "\n".join(lines).rstrip() + "\n"


def _tables(measured: pd.DataFrame, refs: pd.DataFrame) -> list[tuple[str, list]]:
    """The fixed tables (plus any other metrics of their benchmarks), then one table per other benchmark."""
    present = pd.concat([measured[["benchmark", "metric"]], refs[["benchmark", "metric"]]]).drop_duplicates()
    present_pairs = set(present.itertuples(index=False, name=None))
    tables, covered = [], set()
    for title, columns in TABLES:
        fixed = {(b, m) for b, m, _ in columns}
        benchmarks = list(dict.fromkeys(b for b, _, _ in columns))
        columns = columns + [(b, m, f"{BENCHMARK_TITLES.get(b, b)} {METRIC_LABELS.get(m, m)}")
                             for b in benchmarks for m in _metrics_of(present, b) if (b, m) not in fixed]
        if any((b, m) in present_pairs for b, m, _ in columns):
            tables.append((title, columns))
        covered.update(benchmarks)
    for bench in sorted(set(present["benchmark"]) - covered):
        title = f"{BENCHMARK_TITLES[bench]} ({bench})" if bench in BENCHMARK_TITLES else bench
        tables.append((title, [(bench, m, m) for m in _metrics_of(present, bench)]))
    return tables


def _metrics_of(present: pd.DataFrame, benchmark: str) -> list[str]:
    metrics = set(present.loc[present["benchmark"] == benchmark, "metric"])
    return sorted(metrics, key=lambda m: (METRIC_ORDER.index(m) if m in METRIC_ORDER else len(METRIC_ORDER), m))


def _table(title: str, columns: list, measured: pd.DataFrame, refs: pd.DataFrame, daggers: dict) -> list[str]:
    rows = table_rows(columns, measured, refs, daggers)
    if not rows:
        return []
    marks = {r["_mark"] for r in rows} - {""}
    cells = [{k: v.replace("|", "\\|") for k, v in r.items() if not k.startswith("_")} for r in rows]
    table = pd.DataFrame(cells).to_markdown(index=False, disable_numparse=True)
    return [f"## {title}", "", table, ""] + (notes + [""] if (notes := footnotes(daggers, marks)) else [])


def table_rows(columns: list, measured: pd.DataFrame, refs: pd.DataFrame, daggers: dict) -> list[dict]:
    """One table's rows as plain-text cells keyed by header: published rows, then measured rows. Private keys:
    `_kind` (published | measured), `_mark` (the row's dagger or ''), `_benchmarks` (those with a value),
    `_group` (the measured row's ROW_KEYS values)."""
    return _published_rows(columns, refs) + _measured_rows(columns, measured, daggers)


def footnotes(daggers: dict, marks: set) -> list[str]:
    """'†k non-protocol: overrides' for every dagger in `marks`, in numbering order."""
    return [f"{mark} non-protocol: {_describe_overrides(*key)}" for key, mark in daggers.items() if mark in marks]


def _published_rows(columns: list, refs: pd.DataFrame) -> list[dict]:
    wanted = refs.merge(pd.DataFrame([(b, m) for b, m, _ in columns], columns=["benchmark", "metric"]))
    if wanted.empty:
        return []
    header = {(b, m): h for b, m, h in columns}
    rows = []
    wanted = wanted.rename(columns={"pretrain_epochs": "epochs"})
    for key, group in wanted.groupby(REF_ROW_KEYS, dropna=False, sort=False):
        row = dict(zip(REF_ROW_KEYS, key))
        cells = {header[(b, m)]: _published_value(v) for b, m, v in zip(group.benchmark, group.metric, group.value)}
        sources = dict.fromkeys(s.strip() for src in group.source for s in str(src).split(";"))
        rows.append(_row(row["method"], row["backbone"], row["epochs"], row["recipe"], DASH, "published",
                         cells, columns, "; ".join(sources)))
        rows[-1].update(_kind="published", _mark="", _benchmarks=sorted(set(group.benchmark)))
    return rows


def _measured_rows(columns: list, measured: pd.DataFrame, daggers: dict) -> list[dict]:
    wanted = measured.merge(pd.DataFrame([(b, m) for b, m, _ in columns], columns=["benchmark", "metric"]))
    if wanted.empty:
        return []
    header = {(b, m): h for b, m, h in columns}
    rows = []
    for key, group in wanted.groupby(ROW_KEYS, dropna=False, sort=True):
        row = dict(zip(ROW_KEYS, key))
        cells = {header[(b, m)]: _measured_value(mean, std, n)
                 for b, m, mean, std, n in zip(group.benchmark, group.metric, group["mean"], group["std"], group.n)}
        mark = _dagger(daggers, row["overrides"], row["allow_partial_load"])
        rows.append(_row(row["method"], _text(row["backbone"]) + mark, row["epochs"], row["recipe"],
                         row["engine"], row["mode"], cells, columns, f"measured, {_short_hash(row['backbone_hash'])}"))
        rows[-1].update(_kind="measured", _mark=mark, _benchmarks=sorted(set(group.benchmark)), _group=row)
    return rows


def _row(method, backbone, epochs, recipe, engine, mode, cells: dict, columns: list, source: str) -> dict:
    row = {"method": _text(method), "backbone": backbone, "epochs": _epochs(epochs), "recipe": _text(recipe),
           "engine": _text(engine), "mode": _text(mode)}
    row.update({h: cells.get(h, DASH) for _, _, h in columns})
    row["source"] = _text(source)
    return row


def _dagger(daggers: dict, overrides: str, allow_partial_load: bool) -> str:
    """'' for protocol rows; else '†k', numbered once per distinct override set in order of appearance."""
    if overrides == "{}" and not allow_partial_load:
        return ""
    return daggers.setdefault((overrides, bool(allow_partial_load)), f"†{len(daggers) + 1}")


def _describe_overrides(overrides: str, allow_partial_load: bool) -> str:
    parts = [f"{k}={json.dumps(v)}" for k, v in json.loads(overrides).items()]
    if allow_partial_load:
        parts.append("allow_partial_load (trunk weights left uninitialised)")
    return ", ".join(parts)


def _measured_value(mean: float, std: float, n: int) -> str:
    spread = DASH if n < 2 or math.isnan(std) else f"{std:.2f}"
    return f"{mean:.2f} ± {spread} ({n})"


def _published_value(value: float) -> str:
    text = f"{value:g}"
    return text if "." in text or "e" in text else text + ".0"


def _epochs(epochs) -> str:
    return DASH if epochs is None or pd.isna(epochs) else str(int(epochs))


def _short_hash(h: str) -> str:
    algo, _, digest = str(h).partition(":")
    return f"{algo}:{digest[:8]}" if digest else str(h)[:12]


def _text(text) -> str:
    return DASH if text is None or (not isinstance(text, str) and pd.isna(text)) else str(text)
