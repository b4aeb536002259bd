"""`bench report`: the leaderboard in every format, the one place that picks between the tables (report.py), the
page (html.py) and the charts (plots.py)."""
from __future__ import annotations

from pathlib import Path

from leaderboard.html import write_html
from leaderboard.plots import write_pngs
from leaderboard.records import load_records
from leaderboard.report import DEFAULT_RESULTS, aggregate, load_references, long_frame, render_markdown


def render_report(results_dir=None, fmt="markdown", references=True, out_dir=None, metric_order=None) -> str:
    """The leaderboard for `results_dir` (default ./results) as markdown tables, or the long frame as csv/json.

    fmt "html" writes `out_dir`/index.html (leaderboard/html.py) and "png" one chart per benchmark into `out_dir`
    (leaderboard/plots.py); both return the path(s) written, one per line. `metric_order` (benchmark -> its spec's
    metrics) picks each chart's headline metric.
    """
    results_dir = Path(results_dir or DEFAULT_RESULTS)
    if fmt in ("html", "png"):
        if out_dir is None:
            raise ValueError(f"--format {fmt} writes files: give the folder with -o DIR")
        if fmt == "html":
            return str(write_html(results_dir, out_dir, references=references, metric_order=metric_order))
        written = write_pngs(results_dir, out_dir, references=references, metric_order=metric_order)
        return "\n".join(map(str, written)) or f"no charts: no records in {results_dir} and no published rows"
    measured = aggregate(load_records(results_dir))
    refs = load_references()
    refs = refs if references else refs.iloc[:0]
    if fmt == "markdown":
        return render_markdown(measured, refs, results_dir)
    long = long_frame(measured, refs)
    if fmt == "csv":
        return long.to_csv(index=False)
    if fmt == "json":
        return long.to_json(orient="records", indent=2, force_ascii=False)
    raise ValueError(f"unknown report format {fmt!r}; formats: markdown, csv, json, html, png")
