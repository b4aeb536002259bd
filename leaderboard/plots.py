"""`bench report --format png -o DIR`: the page's per-benchmark charts as PNG files (matplotlib), for papers and
slides. Same data as the HTML charts (leaderboard.html.chart_series): every trial as a dot, mean ± std per row,
published values as dashed vertical lines."""
from __future__ import annotations

import statistics
from pathlib import Path

from leaderboard import report
from leaderboard.html import _clusters, _ref_text, _slug, chart_series, nice_axis
from leaderboard.records import load_records


def write_pngs(results_dir, out_dir, references: bool = True, dpi: int = 150,
               metric_order: dict | None = None) -> list[Path]:
    """One `<benchmark>.png` per benchmark with measured or published numbers; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = report.load_references()
    refs = refs if references else refs.iloc[:0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for chart in chart_series(load_records(results_dir), refs, metric_order):
        if not chart["rows"] and not chart["refs"]:
            continue
        fig = _figure(plt, chart)
        path = out / f"{_slug(chart['benchmark'])}.png"
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _figure(plt, chart: dict):
    rows, refs = chart["rows"], chart["refs"]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.35 * max(1, len(rows)) + 0.18 * len(refs)))
    labels = []
    for i, row in enumerate(rows):
        vals = row["values"]
        mean = statistics.fmean(vals)
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        ax.errorbar(mean, i, xerr=std, fmt="|", color="#1f3f8f", markersize=14, capsize=4, elinewidth=6, alpha=0.6)
        ax.scatter(vals, [i] * len(vals), s=18, color="#e0602a", zorder=3)
        mark = "" if row["overrides"] == "{}" and not row["allow_partial_load"] else " †"
        labels.append(f'{row["backbone"]}{mark} · {row["recipe"]}/{row["engine"]}/{row["mode"]}')
    hi, _ = nice_axis(max([v for r in rows for v in r["values"]] + [r["value"] for r in refs]) * 1.02)
    for ref in refs:
        ax.axvline(ref["value"], color="#2a9d55", linestyle="--", linewidth=1)
    for cluster in _clusters([r["value"] for r in refs], min_gap=hi / 40):  # one label per group of close lines
        first, last = cluster[0] + 1, cluster[-1] + 1
        at = statistics.fmean(refs[i]["value"] for i in cluster)
        ax.annotate(f"R{first}" if first == last else f"R{first}–R{last}", (at, 1.0),
                    xycoords=("data", "axes fraction"), ha="center", va="bottom", color="#2a9d55", fontsize=7)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylim(-0.7, max(1, len(rows)) - 0.3)
    ax.invert_yaxis()
    ax.set_xlim(0, hi)
    ax.set_xlabel(chart["metric"])
    ax.grid(axis="x", color="#eee")
    title = report.BENCHMARK_TITLES.get(chart["benchmark"], chart["benchmark"])
    ax.set_title(f'{title} ({chart["benchmark"]}): {chart["metric"]}', fontsize=10, pad=14)
    if refs:
        key = "\n".join(f"R{j} {_ref_text(r)}" for j, r in enumerate(refs, 1))
        ax.annotate(key, (0, 0), xycoords="axes fraction", xytext=(0, -30), textcoords="offset points",
                    va="top", fontsize=6.5, color="#2a6d45")
    fig.tight_layout()
    return fig
