"""`bench report --format html -o DIR`: the leaderboard as one self-contained static page (DIR/index.html).

Inline CSS and JS, charts drawn as inline SVG, pictures embedded as data URIs: the page needs no server and no
network. It holds the seed paper's tables (sortable by any column, filterable by benchmark / recipe / engine /
mode), one chart per benchmark (every trial, mean ± std per row, published numbers as marked lines), the
pretraining runs and every benchmark run with its training curve, pictures and folded resolved config.
The page's state (sort, filters) lives in the URL hash: `#sort=t1:7:desc&benchmark=voc07%2B12`.
"""
from __future__ import annotations

import base64
import datetime
import html
import json
import math
from pathlib import Path

import pandas as pd

from leaderboard import report
from leaderboard.records import iter_records, records_frame, replaced_atomically
from leaderboard.runs import find_pictures, read_jsonl_curve, read_mmengine_curves

FILTERS = ("benchmark", "recipe", "engine", "mode")
SOURCE_LINKS = {  # source names of references.csv -> where to read them
    "MoCo detection README": "https://github.com/facebookresearch/moco/tree/main/detection",
    "SimSiam": "https://arxiv.org/abs/2011.10566",
    "VICReg": "https://arxiv.org/abs/2105.04906",
    "MSCN seed": "https://arxiv.org/abs/2206.07700",
    "ConvMAE": "https://github.com/Alpha-VL/ConvMAE",
    "SiameseIM": "https://github.com/OpenGVLab/Siamese-Image-Modeling",
    "MAE paper": "https://arxiv.org/abs/2111.06377",
    "mmseg": "https://github.com/open-mmlab/mmsegmentation/tree/main/configs/upernet",
    "ViTDet": "https://arxiv.org/abs/2203.16527",
}
esc = html.escape


def write_html(results_dir, out_dir, references: bool = True, metric_order: dict | None = None) -> Path:
    """Write the page to `out_dir`/index.html (atomically) and return its path (`metric_order`: see chart_series)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    with replaced_atomically(path) as tmp:
        tmp.write_text(render_html(results_dir, references, metric_order), encoding="utf-8")
    return path


def render_html(results_dir, references: bool = True, metric_order: dict | None = None) -> str:
    """The page for the records under `results_dir`, as one HTML string."""
    results_dir = Path(results_dir)
    records = list(iter_records(results_dir))
    long = records_frame(records)
    measured = report.aggregate(long)
    refs = report.load_references()
    refs = refs if references else refs.iloc[:0]
    body = [_header(results_dir, records, measured, refs), _tables_section(measured, refs),
            _charts_section(long, refs, metric_order), _pretraining_section(records), _runs_section(records)]
    return PAGE.format(css=CSS, js=JS, body="\n".join(body))


# ------------------------------------------------------------------------------------------------------ header

def _header(results_dir: Path, records: list, measured: pd.DataFrame, refs: pd.DataFrame) -> str:
    values = {k: sorted(set(measured[k].astype(str))) for k in FILTERS}
    values["benchmark"] = sorted(set(values["benchmark"]) | set(refs["benchmark"]))
    values["recipe"] = sorted(set(values["recipe"]) | set(refs["recipe"]))
    values["mode"] = sorted(set(values["mode"]) | ({"published"} if not refs.empty else set()))
    selects = "".join(f'<label>{k} <select data-filter="{k}"><option value="">all</option>'
                      + "".join(f'<option>{esc(v)}</option>' for v in values[k]) + "</select></label>"
                      for k in FILTERS)
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<header><h1>bench leaderboard</h1><p class="meta">{len(records)} result records in '
            f"<code>{esc(str(results_dir.resolve()))}</code>, generated {created}. Measured rows: mean ± sample std "
            "(n trials); different recipes, engines, modes, weights or overrides are never averaged together. "
            "† rows are non-protocol (their overrides are listed under the table). Click a column header to sort."
            f'</p><nav class="filters">{selects}</nav></header>')


# ------------------------------------------------------------------------------------------------------ tables

def _tables_section(measured: pd.DataFrame, refs: pd.DataFrame) -> str:
    daggers, parts = {}, []
    for i, (title, columns) in enumerate(report._tables(measured, refs), 1):
        rows = report.table_rows(columns, measured, refs, daggers)
        if rows:
            parts.append(_table(f"t{i}", title, rows, report.footnotes(daggers, {r["_mark"] for r in rows})))
    if not parts:
        parts.append("<p>No results and no published rows.</p>")
    return '<section id="tables"><h2>Tables</h2>' + "\n".join(parts) + "</section>"


def _table(table_id: str, title: str, rows: list[dict], notes: list[str]) -> str:
    headers = [k for k in rows[0] if not k.startswith("_")]
    head = "".join(f'<th data-col="{j}" title="sort">{esc(h)}</th>' for j, h in enumerate(headers))
    body = []
    for r in rows:
        attrs = _filter_attrs(" ".join(r["_benchmarks"]), r["recipe"],
                              "*" if r["_kind"] == "published" else r["engine"], r["mode"])
        cells = "".join(f"<td>{_source_cell(r[h]) if h == 'source' and r['_kind'] == 'published' else esc(r[h])}</td>"
                        for h in headers)
        body.append(f'<tr class="{r["_kind"]}"{attrs}>{cells}</tr>')
    foot = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return (f'<div class="board-wrap filterable-group"><h3>{esc(title)}</h3><table class="board" id="{table_id}">'
            f'<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            + (f'<ul class="notes">{foot}</ul>' if foot else "") + "</div>")


def _source_cell(text: str) -> str:
    """'A; B' with every source that SOURCE_LINKS knows as a link."""
    parts = []
    for src in (s.strip() for s in text.split(";")):
        url = next((u for k, u in SOURCE_LINKS.items() if src.startswith(k)), None)
        parts.append(f'<a href="{url}">{esc(src)}</a>' if url else esc(src))
    return "; ".join(parts)


def _filter_attrs(benchmark, recipe, engine, mode) -> str:
    values = dict(zip(FILTERS, (benchmark, recipe, engine, mode)))
    return "".join(f' data-{k}="{esc(str(v))}"' for k, v in values.items())


# ------------------------------------------------------------------------------------------------------ charts

def headline_metric(benchmark: str, present: set, metric_order: dict | None = None) -> str | None:
    """The benchmark's first spec metric (`metric_order[benchmark]`, the spec's metrics) that has numbers (else the
    first in METRIC_ORDER, else any); a benchmark without a spec (records from another version) falls back."""
    order = list((metric_order or {}).get(benchmark, []))
    order += report.METRIC_ORDER + sorted(present)
    return next((m for m in order if m in present), None)


def chart_series(long: pd.DataFrame, refs: pd.DataFrame, metric_order: dict | None = None) -> list[dict]:
    """Per benchmark: its headline metric, the measured rows (every trial's value) and the published values
    (`metric_order`: benchmark -> its spec's metrics, given by `bench report`)."""
    charts = []
    for bench in sorted(set(long["benchmark"]) | set(refs["benchmark"])):
        present = set(long.loc[long.benchmark == bench, "metric"]) | set(refs.loc[refs.benchmark == bench, "metric"])
        metric = headline_metric(bench, present, metric_order)
        trials = long[(long.benchmark == bench) & (long.metric == metric)]
        rows = []
        for key, group in trials.groupby(report.ROW_KEYS, dropna=False, sort=True):
            row = dict(zip(report.ROW_KEYS, key))
            rows.append({**row, "values": sorted(group["value"].tolist())})
        pub = refs[(refs.benchmark == bench) & (refs.metric == metric)]
        charts.append({"benchmark": bench, "metric": metric, "rows": rows,
                       "refs": pub.sort_values("value").to_dict("records")})
    return charts


def _charts_section(long: pd.DataFrame, refs: pd.DataFrame, metric_order: dict | None = None) -> str:
    charts = [c for c in chart_series(long, refs, metric_order) if c["rows"] or c["refs"]]
    parts = [_chart(c) for c in charts]
    return '<section id="charts"><h2>Per benchmark</h2>' + ("\n".join(parts) or "<p>Nothing to draw.</p>") + \
        "</section>"


def nice_axis(value: float, ticks: int = 5) -> tuple[float, float]:
    """(axis end, tick step) for an axis from 0 that holds `value`: a step of 1, 2 or 5 x 10^k, about `ticks`."""
    if value <= 0:
        return 1.0, 0.2
    raw = value / ticks
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    return math.ceil(value / step - 1e-9) * step, step


def _chart(chart: dict) -> str:
    """A horizontal dot plot: one line per measured row (trial dots, mean tick, ±std bar), published values as
    dashed vertical lines marked R1, R2, ... (listed under the chart)."""
    rows, refs = chart["rows"], chart["refs"]
    label_w, plot_w, row_h, top, bottom = 260, 520, 22, 34, 30
    height = top + max(1, len(rows)) * row_h + bottom
    values = [v for r in rows for v in r["values"]] + [r["value"] for r in refs]
    hi, step = nice_axis(max(values) * 1.02)
    x = lambda v: label_w + plot_w * v / hi  # noqa: E731
    svg = [f'<svg class="dotplot" viewBox="0 0 {label_w + plot_w + 20} {height}" width="{label_w + plot_w + 20}" '
           f'height="{height}" role="img" aria-label="{esc(chart["benchmark"])} {esc(chart["metric"])}">']
    for k in range(round(hi / step) + 1):  # axis
        v = k * step
        svg.append(f'<line class="grid" x1="{x(v):.1f}" x2="{x(v):.1f}" y1="{top - 6}" y2="{height - bottom}"/>'
                   f'<text class="tick" x="{x(v):.1f}" y="{height - bottom + 14}">{v:g}</text>')
    svg.append(f'<text class="axis" x="{label_w + plot_w / 2}" y="{height - 4}">{esc(chart["metric"])}</text>')
    for i, row in enumerate(rows):
        y = top + i * row_h + row_h / 2
        vals = row["values"]
        mean = sum(vals) / len(vals)
        std = pd.Series(vals).std() if len(vals) > 1 else 0.0
        mark = "" if row["overrides"] == "{}" and not row["allow_partial_load"] else " †"
        label = f'{row["backbone"]}{mark} · {row["recipe"]}/{row["engine"]}/{row["mode"]}'
        attrs = _filter_attrs(chart["benchmark"], row["recipe"], row["engine"], row["mode"])
        lo, hi_std = x(mean - std), x(mean + std)
        svg.append(f'<g class="series"{attrs}><title>{esc(label)}: {mean:.2f} ± {std:.2f} (n={len(vals)})</title>'
                   f'<text class="label" x="{label_w - 8}" y="{y + 4}">{esc(label)}</text>'
                   f'<rect class="std" x="{lo:.1f}" y="{y - 4}" width="{max(1.0, hi_std - lo):.1f}" height="8"/>'
                   f'<line class="mean" x1="{x(mean):.1f}" x2="{x(mean):.1f}" y1="{y - 8}" y2="{y + 8}"/>'
                   + "".join(f'<circle class="trial" cx="{x(v):.1f}" cy="{y:.1f}" r="3.5"><title>{v:.2f}</title>'
                             "</circle>" for v in vals) + "</g>")
    key = []
    for cluster in _clusters([x(r["value"]) for r in refs], min_gap=16):  # one label per group of close lines
        first, last = cluster[0] + 1, cluster[-1] + 1
        label_x = sum(x(refs[i]["value"]) for i in cluster) / len(cluster)
        svg.append(f'<text class="reflabel" x="{label_x:.1f}" y="{top - 16}">'
                   f'{f"R{first}" if first == last else f"R{first}–R{last}"}</text>')
    for j, ref in enumerate(refs, 1):
        rx = x(ref["value"])
        text = _ref_text(ref)
        attrs = _filter_attrs(chart["benchmark"], ref["recipe"], "*", "published")
        svg.append(f'<g class="ref"{attrs}><title>R{j} {esc(text)}</title><line x1="{rx:.1f}" x2="{rx:.1f}" '
                   f'y1="{top - 4}" y2="{height - bottom}"/><path d="M{rx - 4:.1f},{top - 12} l8,0 l-4,7 z"/></g>')
        key.append(f'<li class="refkey"{attrs}>R{j} {esc(text)}</li>')
    svg.append("</svg>")
    title = report.BENCHMARK_TITLES.get(chart["benchmark"], chart["benchmark"])
    return (f'<figure class="chart filterable" id="chart-{_slug(chart["benchmark"])}" '
            f'data-benchmark="{esc(chart["benchmark"])}"><figcaption>{esc(title)} ({esc(chart["benchmark"])}): '
            f'{esc(chart["metric"])} per trial (dots), mean (tick) ± std (bar)</figcaption>{"".join(svg)}'
            + (f'<ol class="refs">{"".join(key)}</ol>' if key else "") + "</figure>")


def _clusters(xs: list[float], min_gap: float) -> list[list[int]]:
    """Indices of sorted positions `xs`, grouped where neighbours are closer than `min_gap`."""
    groups = []
    for i, v in enumerate(xs):
        if groups and v - xs[groups[-1][-1]] < min_gap:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _ref_text(ref: dict) -> str:
    epochs = "" if pd.isna(ref["pretrain_epochs"]) else f' {int(ref["pretrain_epochs"])} ep'
    return f'{ref["method"]}{epochs} ({ref["backbone"]}, {ref["recipe"]}): {ref["value"]:g} — {ref["source"]}'


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)


# ------------------------------------------------------------------------------------------------- run details

def _pretraining_section(records: list) -> str:
    """One block per pretraining output folder named by a record's backbone provenance: curve, pictures, config."""
    runs = {}  # output_dir -> (provenance, benchmarks evaluated on its backbone)
    for _, rec in records:
        prov = rec["config"].get("backbone", {}).get("provenance", {})
        out = (prov.get("config") or {}).get("output_dir")
        if out:
            runs.setdefault(out, (prov, set()))[1].add(rec["benchmark"])
    parts = []
    for out, (prov, benchmarks) in runs.items():
        folder = Path(out)
        curve = read_jsonl_curve(folder / "log.jsonl")
        pictures = find_pictures(folder / "pictures")
        body = (_curve_panels(curve, {}) if curve else f"<p>no log.jsonl in <code>{esc(out)}</code></p>")
        parts.append(f'<details class="pretrain" open data-benchmark="{esc(" ".join(sorted(benchmarks)))}">'
                     f'<summary>{esc(prov.get("method", "?"))} pretraining, {esc(str(prov.get("epochs")))} epochs, '
                     f'{esc(str(prov.get("steps")))} steps '
                     f'(<code>{esc(out)}</code>)</summary>{body}{_pictures(pictures)}'
                     f'{_config(prov.get("config", {}), "resolved pretraining config")}</details>')
    return ('<section id="pretraining" class="filterable-group"><h2>Pretraining runs</h2>' + "\n".join(parts)
            + "</section>") if parts else ""


def _runs_section(records: list) -> str:
    by_bench = {}
    for path, rec in records:
        by_bench.setdefault(rec["benchmark"], []).append((path, rec))
    parts = []
    for bench, runs in sorted(by_bench.items()):
        runs.sort(key=lambda pr: (pr[1]["backbone"]["name"], pr[1]["recipe"], pr[1]["engine"], pr[1]["mode"],
                                  pr[1]["trial"]))
        items = "\n".join(_run(path, rec) for path, rec in runs)
        parts.append(f'<div class="filterable-group" id="runs-{_slug(bench)}"><h3>{esc(bench)} '
                     f'({len(runs)} runs)</h3>{items}</div>')
    return '<section id="runs"><h2>Runs</h2>' + ("\n".join(parts) or "<p>No runs.</p>") + "</section>"


def run_curves(path: Path, rec: dict) -> tuple[dict, dict]:
    """(training curve, eval curve) of a record: `extra.curve` / `extra.eval_curve`, else an mmseg work dir's."""
    extra = rec.get("extra", {})
    curve, evals = extra.get("curve") or {}, extra.get("eval_curve") or {}
    if not curve and extra.get("work_dir"):
        curve, evals = read_mmengine_curves(_resolve(path, extra["work_dir"]))
    return curve, evals


def run_pictures(path: Path, rec: dict) -> list[Path]:
    folder = rec.get("extra", {}).get("pictures")
    return find_pictures(_resolve(path, folder)) if folder else []


def _resolve(record_path: Path, target: str) -> Path:
    target = Path(target)
    if target.is_absolute() or target.exists():
        return target
    return Path(record_path).parent / target


def _run(path: Path, rec: dict) -> str:
    bb = rec["backbone"]
    metrics = "  ".join(f"{k} {v:.2f}" for k, v in rec["metrics"].items())
    dagger = "" if rec["protocol"] else " †"
    attrs = _filter_attrs(rec["benchmark"], rec["recipe"], rec["engine"], rec["mode"])
    curve, evals = run_curves(path, rec)
    overrides = (f'<p class="meta">non-protocol overrides: {esc(json.dumps(rec["overrides"]))}</p>'
                 if rec["overrides"] else "")
    return (f'<details class="run filterable"{attrs} id="run-{rec["run_id"]}"><summary>{esc(bb["name"])}{dagger} · '
            f'{esc(rec["recipe"])}/{esc(rec["engine"])}/{esc(rec["mode"])} · trial {rec["trial"]} · {esc(metrics)}'
            f'</summary><p class="meta"><code>{esc(path.name)}</code> · {esc(rec["created"])} · '
            f'{esc(bb["method"])} · {esc(bb["hash"][:15])} · {rec["timings"].get("total_s", 0):.0f} s</p>{overrides}'
            f'{_curve_panels(curve, evals)}{_pictures(run_pictures(path, rec))}'
            f'{_config(rec["config"], "resolved config")}</details>')


def _config(config: dict, title: str) -> str:
    return (f'<details class="config"><summary>{esc(title)}</summary>'
            f'<pre>{esc(json.dumps(config, indent=1, sort_keys=True))}</pre></details>')


def _pictures(paths: list[Path]) -> str:
    if not paths:
        return ""
    imgs = "".join(f'<figure class="pic"><img alt="{esc(p.stem)}" src="data:image/png;base64,'
                   f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{esc(p.stem)}</figcaption></figure>'
                   for p in paths)
    return f'<div class="pictures">{imgs}</div>'


def _curve_panels(curve: dict, evals: dict) -> str:
    """One small line panel per series of the training curve (loss, lr, ...) and per evaluated metric."""
    panels = [_panel(name, curve["step"], ys) for name, ys in curve.items() if name not in ("step", "epoch")]
    panels += [_panel(name, evals["step"], ys, points=True) for name, ys in evals.items() if name != "step"]
    return f'<div class="curves">{"".join(panels)}</div>' if panels else ""


def _panel(name: str, xs: list, ys: list, points: bool = False) -> str:
    w, h, pad = 250, 110, 46
    if not xs:
        return ""
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    sx = lambda v: pad + (w - pad - 6) * ((v - x0) / (x1 - x0) if x1 > x0 else 0.5)  # noqa: E731
    sy = lambda v: h - 18 - (h - 30) * ((v - y0) / (y1 - y0) if y1 > y0 else 0.5)  # noqa: E731
    pts = " ".join(dict.fromkeys(f"{sx(a):.0f},{sy(b):.0f}" for a, b in zip(xs, ys)))  # one point per pixel
    marks = ("".join(f'<circle cx="{sx(a):.1f}" cy="{sy(b):.1f}" r="2.5"><title>{a}: {b:.4g}</title></circle>'
                     for a, b in zip(xs, ys)) if points or len(xs) == 1 else "")
    return (f'<svg class="curve" viewBox="0 0 {w} {h}" width="{w}" height="{h}"><text class="name" x="{pad}" y="10">'
            f'{esc(name)}</text><text class="tick" x="{pad - 3}" y="{sy(y1) + 4:.1f}" text-anchor="end">{_short(y1)}'
            f'</text><text class="tick" x="{pad - 3}" y="{sy(y0) + 4:.1f}" text-anchor="end">{_short(y0)}</text>'
            f'<text class="tick" x="{pad}" y="{h - 4}">{x0}</text><text class="tick" x="{w - 6}" y="{h - 4}" '
            f'text-anchor="end">{x1}</text><polyline points="{pts}"/>{marks}</svg>')


def _short(value: float) -> str:
    """A tick label of at most 7 characters."""
    return f"{value:.1e}" if value and (abs(value) < 1e-3 or abs(value) >= 1e5) else f"{value:.3g}"


# -------------------------------------------------------------------------------------------------- page shell

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>bench leaderboard</title><style>{css}</style></head>
<body>
{body}
<script>{js}</script>
</body></html>
"""

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1280px;padding:0 16px 40px;color:#222}
h1{margin:16px 0 4px} h2{border-bottom:2px solid #ddd;padding-bottom:2px;margin-top:28px} h3{margin:18px 0 6px}
.meta{color:#666;font-size:12px} code{font-size:12px}
.filters{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:1px solid #eee;z-index:1}
.filters label{margin-right:14px} select{font:inherit}
.board-wrap{overflow-x:auto} table.board{border-collapse:collapse;font-size:12px;white-space:nowrap}
.board th,.board td{border-bottom:1px solid #e4e4e4;padding:3px 8px;text-align:left}
.board th{cursor:pointer;background:#f5f5f5;user-select:none} .board th:hover{background:#e8eefc}
.board th.asc::after{content:" \\25B2"} .board th.desc::after{content:" \\25BC"}
.board tr.published{color:#555;background:#fafaf3} .board tr.measured td:nth-child(2){font-weight:600}
.notes{font-size:12px;color:#555;margin:4px 0}
figure.chart{margin:18px 0} figcaption{font-weight:600;margin-bottom:4px}
svg text{font:11px system-ui,sans-serif} .dotplot .label{text-anchor:end}
.dotplot .tick,.dotplot .axis{text-anchor:middle;fill:#666}
.grid{stroke:#eee} .std{fill:#9ab4e6;opacity:.6} .mean{stroke:#1f3f8f;stroke-width:2} .trial{fill:#e0602a;opacity:.85}
.ref line{stroke:#2a9d55;stroke-dasharray:4 3} .ref path{fill:#2a9d55} .reflabel{fill:#2a9d55;text-anchor:middle}
ol.refs{columns:2;font-size:12px;color:#2a6d45;margin:2px 0 0 0;padding-left:0;list-style:none}
details.run,details.pretrain{border:1px solid #e4e4e4;border-radius:4px;margin:4px 0;padding:3px 8px}
details.run>summary,details.pretrain>summary{cursor:pointer;font-size:13px}
.curves{display:flex;flex-wrap:wrap;gap:8px;margin:6px 0} .curve{border:1px solid #eee;background:#fcfcfc}
.curve polyline{fill:none;stroke:#1f3f8f;stroke-width:1.5} .curve circle{fill:#e0602a}
.curve .tick{fill:#777;font-size:10px}
.pictures{display:flex;flex-wrap:wrap;gap:8px} .pic{margin:0}
.pic img{max-width:384px;image-rendering:pixelated;border:1px solid #ddd}
.pic figcaption{font-weight:400;font-size:11px;color:#666}
details.config pre{max-height:360px;overflow:auto;background:#f7f7f7;font-size:11px;padding:6px}
.hidden{display:none !important}
"""

JS = r"""
// Sorting (click a header), filters (the selects) and both kept in the URL hash, e.g. #sort=t1:7:desc&mode=cached
function cellValue(row, col) {
  const text = row.cells[col].textContent.trim();
  const number = parseFloat(text);
  return isNaN(number) ? text.toLowerCase() : number;
}
function sortTable(table, col, dir) {
  const body = table.tBodies[0], sign = dir === "desc" ? -1 : 1;
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = cellValue(a, col), y = cellValue(b, col);
    if (typeof x !== typeof y) return typeof x === "number" ? -1 : 1;  // numbers first, dashes last
    return (x < y ? -1 : x > y ? 1 : 0) * sign;
  });
  rows.forEach(r => body.appendChild(r));
  table.querySelectorAll("th").forEach(th => th.classList.remove("asc", "desc"));
  table.tHead.rows[0].cells[col].classList.add(dir);
  state.sort = table.id + ":" + col + ":" + dir;
}
function matches(el) {
  return Object.entries(state.filters).every(([key, value]) =>
    !value || !el.dataset[key] || el.dataset[key] === "*" || el.dataset[key].split(" ").includes(value));
}
function applyFilters() {
  document.querySelectorAll("[data-benchmark]").forEach(el => el.classList.toggle("hidden", !matches(el)));
  document.querySelectorAll(".filterable-group").forEach(group => {
    const items = group.querySelectorAll("[data-benchmark]");
    const anyShown = Array.from(items).some(el => !el.classList.contains("hidden"));
    group.classList.toggle("hidden", items.length > 0 && !anyShown);
  });
}
function writeHash() {
  const parts = state.sort ? ["sort=" + state.sort] : [];
  for (const [key, value] of Object.entries(state.filters)) {
    if (value) parts.push(key + "=" + encodeURIComponent(value));
  }
  history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname);
}
const state = {sort: "", filters: {}};
function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  document.querySelectorAll("select[data-filter]").forEach(sel => {
    sel.value = params.get(sel.dataset.filter) || "";
    state.filters[sel.dataset.filter] = sel.value;
  });
  applyFilters();
  const [id, col, dir] = (params.get("sort") || "").split(":");
  const table = id && document.getElementById(id);
  if (table) sortTable(table, +col, dir === "desc" ? "desc" : "asc");
}
document.querySelectorAll("table.board th").forEach(th => th.addEventListener("click", () => {
  sortTable(th.closest("table"), th.cellIndex, th.classList.contains("asc") ? "desc" : "asc");
  writeHash();
}));
document.querySelectorAll("select[data-filter]").forEach(sel => sel.addEventListener("change", () => {
  state.filters[sel.dataset.filter] = sel.value;
  applyFilters();
  writeHash();
}));
window.addEventListener("hashchange", readHash);
readHash();
void document.body.offsetHeight;  // style and layout of the whole page, so that the time below includes them
document.documentElement.dataset.renderMs = performance.now().toFixed(1);  // read by the browser test
"""
