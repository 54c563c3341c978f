"""A job's result as one self-contained HTML page: inline CSS and SVG, no script, nothing fetched.

`render(job, manifest, live)` takes the job record (JSON, as `GET /v1/jobs/{id}` answers), the patch's manifest
(None when the patch is gone) and the version's live figures (None when there are none or no such API), and
returns the page. Sections are left out when the job lacks what they show: per-group figures (`result.by_group`,
jobs since this report came in), the trade-off the fit explored (a list of points with `accuracy` and
`unfairness` in the method's report, e.g. Eraser's `curve`), live figures. Every value from the record is
escaped: model names, options and the manifest come from users.
"""

from __future__ import annotations

import json
import math
from html import escape
from typing import Any

HEADLINE = (("accuracy", "accuracy", True), ("balanced_accuracy", "balanced accuracy", True),
            ("worst_group_accuracy", "worst-group accuracy", True), ("dp_diff", "DP gap", False),
            ("eo_diff", "EO gap", False), ("eopp_diff", "EOpp gap", False))
FIGURE_NAMES = {"selection_rate": "selection rate", "accuracy": "accuracy", "tpr": "TPR", "fpr": "FPR"}
BEFORE, AFTER = "#8a8f98", "#2a6fdb"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;margin:0;background:#f6f7f9}
main{max-width:980px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde1e7;padding-bottom:4px}
.sub{color:#5b6372}.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:14px 16px;margin:10px 0}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:5px 8px;border-bottom:1px solid #eceef2;text-align:right}th:first-child,td:first-child{text-align:left}
th{font-weight:600;color:#3b4252;background:#fafbfc}.better{color:#17803d}.worse{color:#b3261e}
.ci{color:#7a8190;font-size:12px;display:block;white-space:nowrap}
code,pre{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace}
pre{background:#f1f3f6;padding:10px;border-radius:6px;overflow:auto}
.legend span{display:inline-block;width:12px;height:12px;border-radius:2px;margin:0 4px -2px 12px}
svg text{font:11px system-ui,sans-serif;fill:#3b4252}
"""


def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _headline(result: dict[str, Any]) -> str:
    before, after = result.get("before") or {}, result.get("after") or {}
    rows = []
    for key, label, higher_better in HEADLINE:
        if key not in before and key not in after:
            continue
        b, a = before.get(key), after.get(key)
        delta, cls = "", ""
        if b is not None and a is not None:
            d = a - b
            delta = f"{d:+.3f}"
            cls = "better" if (d > 0) == higher_better and d != 0 else ("worse" if d != 0 else "")
        rows.append(f"<tr><td>{escape(label)}</td><td>{_f(b)}</td><td>{_f(a)}</td>"
                    f"<td class='{cls}'>{delta}</td></tr>")
    return ("<table id='headline'><tr><th>held-out rows</th><th>before</th><th>after</th><th>change</th></tr>"
            + "".join(rows) + "</table>")


def _cell(v: list[Any] | None) -> str:
    if not v or v[0] is None:
        return "–"
    ci = f" <span class='ci'>[{_f(v[1])}, {_f(v[2])}]</span>" if v[1] is not None else ""
    return f"{_f(v[0])}{ci}"


def _by_group_table(by_group: dict[str, Any]) -> str:
    groups = by_group["groups"]
    figures = [k for k in FIGURE_NAMES if any(k in g["before"] for g in groups)]
    head = "".join(f"<th>{FIGURE_NAMES[k]} before</th><th>{FIGURE_NAMES[k]} after</th>" for k in figures)
    rows = []
    for g in groups:
        cells = "".join(f"<td>{_cell(g['before'].get(k))}</td><td>{_cell(g['after'].get(k))}</td>" for k in figures)
        rows.append(f"<tr><td>{escape(str(g['group']))}</td><td>{g['n']}</td>{cells}</tr>")
    level = by_group.get("level", 0.95)
    note = (f"<p class='sub'>Brackets: {level:.0%} bootstrap intervals ({by_group.get('resamples', '?')} resamples "
            "of each group's held-out rows).</p>")
    return f"<table id='by-group'><tr><th>group</th><th>rows</th>{head}</tr>{''.join(rows)}</table>{note}"


def _rate_bars(by_group: dict[str, Any], figure: str = "selection_rate") -> str:
    """Grouped bars, before and after, per group, with interval whiskers; y from 0 to 1."""
    groups = [g for g in by_group["groups"] if g["before"].get(figure)]
    if not groups:
        return ""
    w, h, left, bottom, top = 640, 260, 48, 40, 16
    plot_h = h - bottom - top
    slot = (w - left - 16) / len(groups)
    bar = min(48.0, slot / 3)
    y = lambda v: top + plot_h * (1 - v)  # noqa: E731
    parts = [f"<svg id='selection-rate-plot' role='img' aria-label='{FIGURE_NAMES[figure]} by group' "
             f"viewBox='0 0 {w} {h}' width='{w}' height='{h}' xmlns='http://www.w3.org/2000/svg'>"]
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f"<line x1='{left}' x2='{w - 8}' y1='{y(tick):.1f}' y2='{y(tick):.1f}' stroke='#e3e6eb'/>"
                     f"<text x='{left - 6}' y='{y(tick) + 4:.1f}' text-anchor='end'>{tick:g}</text>")
    for i, g in enumerate(groups):
        cx = left + slot * (i + 0.5)
        for j, (when, color) in enumerate((("before", BEFORE), ("after", AFTER))):
            v = g[when].get(figure)
            if not v or v[0] is None:
                continue
            x0 = cx + (j - 1) * bar - 2 + 4 * j
            parts.append(f"<rect class='bar {when}' data-group='{escape(str(g['group']))}' data-value='{v[0]:.4f}' "
                         f"x='{x0:.1f}' y='{y(v[0]):.1f}' width='{bar:.1f}' height='{plot_h * v[0]:.1f}' "
                         f"fill='{color}'><title>{escape(str(g['group']))} {when}: {v[0]:.3f}</title></rect>")
            if v[1] is not None:
                xm = x0 + bar / 2
                parts.append(f"<line x1='{xm:.1f}' x2='{xm:.1f}' y1='{y(v[1]):.1f}' y2='{y(v[2]):.1f}' "
                             "stroke='#1d2330' stroke-width='1.2'/>")
        parts.append(f"<text x='{cx:.1f}' y='{h - bottom + 16}' text-anchor='middle'>{escape(str(g['group']))}</text>")
    parts.append("</svg>")
    legend = (f"<div class='legend'><span style='background:{BEFORE}'></span>before"
              f"<span style='background:{AFTER}'></span>after (whiskers: bootstrap interval)</div>")
    return "".join(parts) + legend


def _trade_off_points(report: dict[str, Any]) -> list[dict[str, float]]:
    for value in report.values():
        if isinstance(value, list) and value and all(isinstance(p, dict) for p in value):
            points = [p for p in value if isinstance(p.get("accuracy"), int | float)
                      and isinstance(p.get("unfairness"), int | float)]
            if len(points) >= 2:
                return points
    return []


def _scatter(points: list[dict[str, float]], before: dict[str, Any], after: dict[str, Any], criterion: str) -> str:
    """Accuracy against unfairness of every candidate the fit scored (tuning rows), the start and the choice."""
    marks = [(p["unfairness"], p["accuracy"]) for p in points]
    special = []
    for label, d, color in (("model", before, BEFORE), ("chosen", after, AFTER)):
        if isinstance(d.get("accuracy"), int | float) and isinstance(d.get(criterion), int | float):
            special.append((label, d[criterion], d["accuracy"], color))
    xs = [m[0] for m in marks] + [s[1] for s in special]
    ys = [m[1] for m in marks] + [s[2] for s in special]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1e-3), (y1 if y1 > y0 else y0 + 1e-3)
    pad_x, pad_y = 0.06 * (x1 - x0), 0.06 * (y1 - y0)  # no point on the axes, no label off the plot
    x0, x1, y0, y1 = (x0 - pad_x if x0 - pad_x >= 0 or x0 < 0 else 0.0), x1 + pad_x, y0 - pad_y, y1 + pad_y  # gaps >= 0
    w, h, left, bottom, top, right = 640, 280, 56, 40, 12, 16
    sx = lambda v: left + (w - left - right) * (v - x0) / (x1 - x0)  # noqa: E731
    sy = lambda v: top + (h - top - bottom) * (1 - (v - y0) / (y1 - y0))  # noqa: E731
    parts = [f"<svg id='trade-off-plot' role='img' aria-label='accuracy against unfairness' viewBox='0 0 {w} {h}' "
             f"width='{w}' height='{h}' xmlns='http://www.w3.org/2000/svg'>",
             f"<line x1='{left}' x2='{w - right}' y1='{h - bottom}' y2='{h - bottom}' stroke='#9aa1ad'/>",
             f"<line x1='{left}' x2='{left}' y1='{top}' y2='{h - bottom}' stroke='#9aa1ad'/>",
             f"<text x='{left}' y='{h - bottom + 14}'>{x0:.3f}</text>",
             f"<text x='{w - right}' y='{h - bottom + 14}' text-anchor='end'>{x1:.3f}</text>",
             f"<text x='{(left + w) / 2:.0f}' y='{h - 6}' text-anchor='middle'>"
             f"{escape(criterion)} gap (tuning rows)</text>",
             f"<text x='{left - 6}' y='{h - bottom}' text-anchor='end'>{y0:.3f}</text>",
             f"<text x='{left - 6}' y='{top + 10}' text-anchor='end'>{y1:.3f}</text>"]
    for ux, uy in marks:
        parts.append(f"<circle class='candidate' cx='{sx(ux):.1f}' cy='{sy(uy):.1f}' r='3' fill='#b7c6e4'/>")
    for label, ux, uy, color in special:
        right_half = sx(ux) > (left + w - right) / 2
        tx, anchor = (sx(ux) - 9, "end") if right_half else (sx(ux) + 9, "start")
        parts.append(f"<circle class='{label}' cx='{sx(ux):.1f}' cy='{sy(uy):.1f}' r='6' fill='{color}' "
                     f"stroke='#fff'/><text x='{tx:.1f}' y='{sy(uy) + 4:.1f}' text-anchor='{anchor}'>{label}</text>")
    parts.append("</svg>")
    return "".join(parts) + f"<p class='sub'>{len(marks)} candidates the fit scored; accuracy on the vertical axis.</p>"


def _queries(job: dict[str, Any], result: dict[str, Any]) -> str:
    """Queries the fit spent against its budget, and the evaluation's, as horizontal bars."""
    used, evaluated, budget = result.get("queries_used") or 0, result.get("eval_queries") or 0, job.get("query_budget")
    rows = [("fit", used, AFTER), ("evaluation", evaluated, BEFORE)]
    scale = max([budget or 0, used, evaluated, 1])
    w, row_h, left = 640, 26, 90
    parts = [f"<svg id='queries-plot' role='img' aria-label='queries used' viewBox='0 0 {w} {row_h * 3 + 8}' "
             f"width='{w}' height='{row_h * 3 + 8}' xmlns='http://www.w3.org/2000/svg'>"]
    for i, (label, n, color) in enumerate(rows):
        bw = (w - left - 120) * n / scale
        parts.append(f"<text x='{left - 8}' y='{i * row_h + 17}' text-anchor='end'>{label}</text>"
                     f"<rect class='queries' data-value='{n}' x='{left}' y='{i * row_h + 4}' width='{bw:.1f}' "
                     f"height='{row_h - 8}' fill='{color}'/>"
                     f"<text x='{left + bw + 6:.1f}' y='{i * row_h + 17}'>{n}</text>")
    if budget:
        bx = left + (w - left - 120) * budget / scale
        parts.append(f"<line x1='{bx}' x2='{bx}' y1='0' y2='{row_h * 2}' stroke='#b3261e' stroke-dasharray='4 3'/>"
                     f"<text x='{bx + 4}' y='{row_h * 2 + 16}'>budget {budget}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _manifest(patch_id: str | None, manifest: dict[str, Any] | None) -> str:
    if patch_id is None:
        return "<p>No patch: the job did not store one.</p>"
    head = f"<p>Patch id (SHA-256 of its canonical manifest): <code id='patch-id'>{escape(patch_id)}</code></p>"
    if manifest is None:
        return head + "<p>The patch is no longer stored.</p>"
    blobs = [(name, part["blob"]) for name, part in manifest.items() if isinstance(part, dict) and "blob" in part]
    table = "".join(f"<tr><td>{escape(n)}</td><td><code>{escape(str(b))}</code></td></tr>" for n, b in blobs)
    hashes = f"<table id='hashes'><tr><th>part</th><th>SHA-256</th></tr>{table}</table>" if blobs else ""
    return head + hashes + f"<pre id='manifest'>{escape(json.dumps(manifest, indent=2, sort_keys=True))}</pre>"


def _live(live: dict[str, Any]) -> str:
    """The version's live figures as the live-fairness API gives them (flattened: its shape is that API's)."""
    rows = []

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, sub in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), sub)
        elif isinstance(v, list) and len(v) <= 20 and all(not isinstance(x, dict | list) for x in v):
            rows.append((prefix, ", ".join(_f(x) if isinstance(x, float) else str(x) for x in v)))
        elif not isinstance(v, list):
            rows.append((prefix, _f(v) if isinstance(v, float) else str(v)))

    walk("", live)
    body = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in rows[:200])
    return f"<table id='live'><tr><th>figure</th><th>value</th></tr>{body}</table>"


def render(job: dict[str, Any], manifest: dict[str, Any] | None = None, live: dict[str, Any] | None = None) -> str:
    result = job.get("result") or {}
    report = result.get("report") or {}
    criterion = str(job.get("criterion", "dp"))
    title = f"fairpatch job {job.get('id', '?')}"
    meta = (f"{escape(str(job.get('method')))} on model <b>{escape(str(job.get('model')))}</b> version "
            f"{escape(str(job.get('version')))}, criterion {escape(criterion)}, status "
            f"<b id='status'>{escape(str(job.get('status')))}</b>")
    sections = [f"<h1>{escape(title)}</h1><p class='sub'>{meta}</p>"]
    if job.get("error"):
        sections.append(f"<div class='card'><b>Error:</b> {escape(str(job['error']))}</div>")
    if result:
        sections.append(f"<h2>Before and after, held-out rows ({result.get('holdout_rows', '?')})</h2>"
                        f"<div class='card'>{_headline(result)}</div>")
        by_group = result.get("by_group")
        if by_group and by_group.get("groups"):
            sections.append("<h2>By group</h2><div class='card'>" + _by_group_table(by_group) + "</div>"
                            "<h2>Selection rate by group</h2><div class='card'>" + _rate_bars(by_group) + "</div>")
        points = _trade_off_points(report)
        if points:
            key = criterion if criterion in (report.get("tune_after") or {}) else "unfairness"
            sections.append("<h2>Fairness and accuracy the fit explored</h2><div class='card'>"
                            + _scatter(points, report.get("tune_before") or {}, report.get("tune_after") or {}, key)
                            + "</div>")
        sections.append("<h2>Queries used</h2><div class='card'>" + _queries(job, result) + "</div>")
        sections.append("<h2>Patch</h2><div class='card'>" + _manifest(result.get("patch_id"), manifest) + "</div>")
    if live:
        sections.append("<h2>Live figures of this version</h2><div class='card'>" + _live(live) + "</div>")
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body><main>{''.join(sections)}</main></body></html>")
