"""``comparison.html``: the report as one interactive, self-contained page (plotly).

Four Pareto panels of val acc@1 against a cost: forward GFLOPs, peak training memory, inference latency
at batch 1 and inference img/s (higher is better there). Every configuration is one point, with the 95 %
interval over seeds as its error bar (none with one seed), and the hover
names the configuration, its seeds, the interval and its status. The Pareto front of each panel is a
dashed line. Below: val acc@1 per epoch per configuration (mean ± std over seeds) and the table, sortable
by a click on any header.

The page works offline: plotly.js is embedded in it (``include_plotlyjs=True``, about 4.7 MB), MathJax is
not used, and nothing on it refers to another URL. The numbers are those of comparison.md (`tables.Row`:
the same grouping over seeds, the same intervals).

Training memory: the measured peak (``memory/peak_allocated_mb``, CUDA) where any configuration has one;
else the analytic activation memory of the attention cores at the trial's batch size
(``memory/attn_train_analytic_mb``), and the axis says so.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .plots import _curves, plot_title, throughput_warning
from .results import TrialRecord
from .tables import Row, _first, pareto_front, row_name

__all__ = ["write_html", "html_report"]

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def _ranked(row: Row) -> bool:
    return row.values["acc1"][0] is not None and not row.values["status"].startswith(("errored", "diverged"))


def _memory_axis(rows: Sequence[Row]) -> Tuple[str, Dict[int, Optional[float]], Optional[str]]:
    """(axis title, {id(row): x}, note): measured peak GPU memory where any row has it, else analytic."""
    measured = {id(r): r.values.get("peak_mem_mb") for r in rows}
    if any(v is not None for v in measured.values()):
        return "peak training GPU memory (MB, measured)", measured, None
    analytic = {id(r): _first(r.trials, "memory/attn_train_analytic_mb") for r in rows}
    note = ("no GPU memory was measured (CPU trials): x is the ANALYTIC activation memory the attention cores keep "
            "for backward at the trial's batch size (the variant-dependent part of training memory)")
    return "attention activations for training (MB, analytic)", analytic, note


def _panels(rows: Sequence[Row]) -> List[Dict[str, Any]]:
    mem_title, mem_x, mem_note = _memory_axis(rows)
    return [
        {"title": "acc@1 vs GFLOPs", "axis": "forward GFLOPs per image", "lower": True,
         "x": {id(r): r.values.get("gflops") for r in rows}, "note": None},
        {"title": "acc@1 vs training memory", "axis": mem_title, "lower": True, "x": mem_x, "note": mem_note},
        {"title": "acc@1 vs inference latency", "axis": "inference latency at batch 1 (ms)", "lower": True,
         "x": {id(r): r.values.get("infer_latency_ms") for r in rows}, "note": None},
        {"title": "acc@1 vs inference throughput", "axis": "inference img/s (higher is better)", "lower": False,
         "x": {id(r): r.values.get("infer_img_s") for r in rows}, "note": None},
    ]


def _interval(row: Row) -> Tuple[Optional[float], Optional[float], str]:
    """(plus, minus, text) of the row's acc@1 error bar: the 95 % interval, else none."""
    mean = row.values["acc1"][0]
    ci = row.values.get("acc1_ci")
    if ci is None or mean is None:
        return None, None, "n/a (one seed)"
    return ci[1] - mean, mean - ci[0], f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _accuracy_range(rows: Sequence[Row]) -> Optional[List[float]]:
    """The y range of an accuracy panel: the means and intervals, clipped to [0, 1] (a two-seed interval
    can reach far outside it and would squash the points)."""
    ends = [v for r in rows for v in (r.values["acc1"][0], *(r.values.get("acc1_ci") or ())) if v is not None]
    if not ends:
        return None
    low, high = max(0.0, min(ends)), min(1.0, max(ends))
    pad = max(0.02, 0.05 * (high - low))
    return [max(0.0, low - pad), min(1.0, high + pad) if high + pad <= 1.0 else 1.0 + pad / 2]


def _pareto_figure(rows: Sequence[Row], title: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = _panels(rows)
    fig = make_subplots(rows=2, cols=2, subplot_titles=[p["title"] for p in panels],
                        horizontal_spacing=0.08, vertical_spacing=0.14)
    variants = sorted({r.variant for r in rows})
    ranked = [r for r in rows if _ranked(r)]
    for index, panel in enumerate(panels):
        at = {"row": index // 2 + 1, "col": index % 2 + 1}
        points = [(panel["x"][id(r)], r) for r in ranked if isinstance(panel["x"][id(r)], (int, float))]
        for x, row in points:
            plus, minus, ci_text = _interval(row)
            name = html.escape(row_name(row))  # plotly renders names as (a subset of) HTML
            fig.add_trace(go.Scatter(
                x=[x], y=[row.values["acc1"][0]], mode="markers", name=name, legendgroup=name,
                showlegend=index == 0, marker={"size": 14 if row.best else 10, "symbol": "star" if row.best else "circle",
                                               "color": PALETTE[variants.index(row.variant) % len(PALETTE)]},
                error_y={"type": "data", "symmetric": False, "array": [plus or 0.0], "arrayminus": [minus or 0.0],
                         "visible": plus is not None},
                customdata=[[name, row.values["seeds"], ci_text, html.escape(row.values["status"])]],
                hovertemplate=(f"<b>%{{customdata[0]}}</b><br>seeds: %{{customdata[1]}}<br>val acc@1: %{{y:.3f}}"
                               f"<br>95% CI: %{{customdata[2]}}<br>{html.escape(panel['axis'])}: %{{x:.4g}}"
                               "<br>status: %{customdata[3]}<extra></extra>"),
            ), **at)
        if points:
            front = pareto_front([(x if panel["lower"] else -x, r.values["acc1"][0]) for x, r in points])
            fig.add_trace(go.Scatter(
                x=[points[i][0] for i in front], y=[points[i][1].values["acc1"][0] for i in front],
                mode="lines+markers", name="Pareto front", legendgroup="pareto", showlegend=index == 0,
                line={"dash": "dash", "color": "black", "width": 1},
                marker={"size": 18, "color": "rgba(0,0,0,0)", "line": {"color": "black", "width": 1}},
                hoverinfo="skip",
            ), **at)
        fig.update_xaxes(title_text=panel["axis"], **at)
        fig.update_yaxes(title_text="val acc@1", range=_accuracy_range([r for _, r in points]), **at)
        if not points:
            suffix = "" if index == 0 else str(index + 1)
            fig.add_annotation(text=html.escape(f"no configuration reported {panel['axis']}"), xref=f"x{suffix} domain",
                               yref=f"y{suffix} domain", x=0.5, y=0.5, showarrow=False,
                               font={"size": 11, "color": "firebrick"})
    fig.update_layout(title={"text": html.escape(title), "font": {"size": 14}}, height=900, template="plotly_white",
                      legend={"title": {"text": "configuration (★ best of its variant)"}},
                      margin={"t": 90})
    return fig


def _curves_figure(rows: Sequence[Row]):
    import plotly.graph_objects as go

    fig = go.Figure()
    variants = sorted({r.variant for r in rows})
    colour = {row_name(r): PALETTE[variants.index(r.variant) % len(PALETTE)] for r in rows}
    for name, epochs, means, stds in _curves(rows, "val/acc1"):
        fig.add_trace(go.Scatter(
            x=epochs, y=means, mode="lines+markers", name=html.escape(name), line={"color": colour.get(name)},
            error_y={"type": "data", "array": stds, "visible": any(stds)},
            hovertemplate=f"<b>{html.escape(name)}</b><br>epoch %{{x}}<br>val acc@1 %{{y:.3f}}<extra></extra>",
        ))
    fig.update_layout(title={"text": "val acc@1 per epoch (mean ± std over seeds)", "font": {"size": 14}},
                      xaxis={"title": {"text": "epoch"}, "dtick": 1}, yaxis={"title": {"text": "val acc@1"}},
                      height=450, template="plotly_white")
    return fig


TABLE_COLUMNS = (
    ("configuration", lambda r: row_name(r)), ("variant", lambda r: r.variant), ("seeds", lambda r: r.values["seeds"]),
    ("val acc@1", lambda r: r.values["acc1"][0]), ("± std", lambda r: r.values["acc1"][1]),
    ("acc@1 95% CI", lambda r: r.cell("acc1_ci")), ("vs softmax", lambda r: r.cell("vs_softmax")),
    ("val acc@5", lambda r: r.values["acc5"][0]), ("params (M)", lambda r: r.values["params_m"]),
    ("GFLOPs", lambda r: r.values["gflops"]), ("peak train mem (MB)", lambda r: r.values["peak_mem_mb"]),
    ("attn train act. (MB, analytic)", lambda r: _first(r.trials, "memory/attn_train_analytic_mb")),
    ("train img/s", lambda r: r.values["train_img_s"]), ("infer latency b1 (ms)", lambda r: r.values.get("infer_latency_ms")),
    ("infer img/s", lambda r: r.values.get("infer_img_s")), ("infer batch", lambda r: r.values.get("infer_img_s_batch")),
    *((f"infer peak mem b{b} (MB)", (lambda b: lambda r: r.values.get(f"infer_mem_b{b}"))(b)) for b in (1, 32, 64, 128)),
    ("infer mem", lambda r: r.values.get("infer_mem_source")), ("epochs", lambda r: r.values["epochs"]),
    ("status", lambda r: r.values["status"]), ("best", lambda r: "yes" if r.best else ""),
)


def _cell(value: Any) -> Tuple[str, str]:
    """(shown text, sort key) of one table cell; numbers sort numerically, n/a last."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        text = "n/a" if value is None else str(value)
        return html.escape(text), html.escape(text)
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a", ""
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    return shown, repr(float(value))


def _table(rows: Sequence[Row]) -> str:
    head = "".join(f'<th onclick="sortTable({i})" title="sort">{html.escape(name)}</th>'
                   for i, (name, _) in enumerate(TABLE_COLUMNS))
    body = []
    for row in rows:
        cells = []
        for _, get in TABLE_COLUMNS:
            shown, key = _cell(get(row))
            cells.append(f'<td data-sort="{key}">{shown}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="comparison"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


SORT_SCRIPT = """
function sortTable(col) {
  const table = document.getElementById("comparison");
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const asc = table.dataset.col === String(col) ? table.dataset.dir !== "asc" : true;
  const key = r => r.cells[col].dataset.sort;
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    const nx = parseFloat(x), ny = parseFloat(y);
    if (x === "" || y === "") return (x === "") - (y === "");
    const c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
    return asc ? c : -c;
  });
  rows.forEach(r => body.appendChild(r));
  table.dataset.col = String(col); table.dataset.dir = asc ? "asc" : "desc";
}
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } p.note { color: #a33; font-size: 0.9em; }
div.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.82em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; cursor: pointer; user-select: none; }
td:first-child, td:nth-child(2), th:first-child { text-align: left; }
"""


def html_report(rows: Sequence[Row], records: Sequence[TrialRecord], experiment: str) -> str:
    """The page as one string (plotly.js embedded)."""
    import plotly.io as pio

    title = plot_title(experiment, records)
    config = {"displaylogo": False, "responsive": True}
    pareto = pio.to_html(_pareto_figure(rows, title), full_html=False, include_plotlyjs=True, config=config,
                         div_id="pareto")
    curves = pio.to_html(_curves_figure(rows), full_html=False, include_plotlyjs=False, config=config,
                         div_id="curves")
    notes = [n for n in (throughput_warning(records), _memory_axis(rows)[2]) if n]
    intro = (f"{len(records)} trials, {len(rows)} configurations (trials differing only in seed are one point; "
             "acc@1 is the last reported epoch, mean over seeds, error bars: the 95% interval over seeds). "
             "Hover a point for its configuration, seeds and interval; click a legend entry to hide it; click a "
             "table header to sort.")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Sweep comparison: {html.escape(experiment)}</title>",
        f"<style>{STYLE}</style><script>{SORT_SCRIPT}</script></head><body>",
        f"<h1>Sweep comparison: {html.escape(experiment)}</h1>", f"<p>{html.escape(intro)}</p>",
        *(f'<p class="note">{html.escape(n)}</p>' for n in notes),
        pareto, curves, "<h2>Table</h2>", f'<div class="scroll">{_table(rows)}</div>',
        f'<script type="application/json" id="rows">{_rows_json(rows)}</script>',
        "</body></html>",
    ])


def _rows_json(rows: Sequence[Row]) -> str:
    """The table's values as JSON in the page (for scripts that read it); non-finite numbers are null,
    and '<' is escaped so that no value can close the script element."""
    from finetune.io_utils import json_safe

    data = [{name: get(r) for name, get in TABLE_COLUMNS} for r in rows]
    text = json.dumps(json_safe(data), default=str)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def write_html(rows: Sequence[Row], records: Sequence[TrialRecord], path: Path) -> Path:
    """Write the page to `path` atomically (a reader never sees half a page)."""
    from finetune.io_utils import atomic_path

    page = html_report(rows, records, path.resolve().parent.name)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return path
