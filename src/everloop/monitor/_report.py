"""The HTML report: drift and performance over windows, and reference-vs-current distributions."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

MAX_DISTRIBUTIONS = 6


def write_report(path: str | Path, runs: list[dict[str, Any]], *, title: str = "everloop monitoring report",
                 focus: dict[str, Any] | None = None, tables: dict[str, list[dict[str, Any]]] | None = None) -> Path:
    """Write a self-contained HTML page (plotly inlined once, no network needed to view it).

    `runs` are monitor results (as dicts) in time order; `focus` (a run, by default the last one with
    drift results) adds its reference-vs-window distributions of the most drifted features, which
    every stored run keeps in coarse bins. `tables` are titled lists of rows shown first."""
    figures = [_over_time(runs)] if runs else []
    if any(r.get("drift") for r in runs):
        figures.append(_feature_heatmap(runs))
    focus = focus or next((r for r in reversed(runs) if r.get("distributions")), None)
    if focus and focus.get("distributions"):
        figures.append(_distributions(focus))
    parts = []
    for n, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if n == 0 else False))
    table = "".join(_table(name, rows) for name, rows in (tables or {}).items() if rows)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}} th{{background:#f3f3f3}}</style></head>
<body><h1>{html.escape(title)}</h1>{table}{''.join(parts)}</body></html>"""
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def _over_time(runs: list[dict[str, Any]]) -> go.Figure:
    x = list(range(1, len(runs) + 1))
    labels = [f"window {i} (model v{r['model_version']})" for i, r in zip(x, runs)]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, subplot_titles=(
        "performance on labelled rows", "share of drifted features"))
    perf = [r["performance"].get("value") for r in runs]
    expected = [r["performance"].get("expected") for r in runs]
    metric = next((r["performance"].get("metric") for r in runs if r["performance"].get("metric")), "metric")
    fig.add_trace(go.Scatter(x=x, y=perf, mode="lines+markers", name=f"{metric} (served)", text=labels), 1, 1)
    fig.add_trace(go.Scatter(x=x, y=expected, mode="lines", name=f"{metric} at training", line={"dash": "dot"}), 1, 1)
    share = [r["drift"]["drifted_share"] if r.get("drift") else None for r in runs]
    fig.add_trace(go.Bar(x=x, y=share, name="drifted share", text=[r["status"] for r in runs]), 2, 1)
    fig.update_layout(height=560, title="Over time", xaxis2_title="monitoring window")
    return fig


def _feature_heatmap(runs: list[dict[str, Any]]) -> go.Figure:
    with_drift = [r for r in runs if r.get("drift")]
    columns = [c["column"] for c in with_drift[-1]["drift"]["columns"]]
    z = []
    for r in with_drift:
        effects = {c["column"]: c["effect"] for c in r["drift"]["columns"]}
        z.append([effects.get(c) for c in columns])
    fig = go.Figure(go.Heatmap(z=list(map(list, zip(*z))), x=list(range(1, len(with_drift) + 1)), y=columns,
                               colorscale="Reds", colorbar={"title": "effect"}))
    fig.update_layout(height=max(300, 28 * len(columns)), title="Drift effect per feature and window "
                      "(KS statistic or total variation distance)", xaxis_title="monitoring window")
    return fig


def _distributions(run: dict[str, Any]) -> go.Figure:
    """Reference vs window of the run's most drifted features: numeric as density lines over the
    reference's quantile bins, categories as grouped bars (shares of rows)."""
    effects = {c["column"]: c for c in run["drift"]["columns"]}
    names = list(run["distributions"])
    fig = make_subplots(rows=len(names), cols=1, subplot_titles=[
        f"{n}: effect {effects[n]['effect']:.3f}, p={effects[n]['p_value']:.2g}{' (drift)' if effects[n]['drifted'] else ''}"
        for n in names])
    for row, name in enumerate(names, start=1):
        d = run["distributions"][name]
        for side, color in (("reference", "#1f77b4"), ("current", "#d62728")):
            counts = np.asarray(d[side], dtype=float)
            shares = counts / counts.sum() if counts.sum() else counts
            if d["kind"] == "categorical":
                fig.add_trace(go.Bar(x=d["categories"], y=shares, name=side, marker_color=color, legendgroup=side,
                                     showlegend=row == 1), row, 1)
            else:
                fig.add_trace(go.Scatter(x=d["edges"][:-1], y=shares, mode="lines", line_shape="hv", name=side,
                                         line={"color": color}, legendgroup=side, showlegend=row == 1), row, 1)
    fig.update_layout(barmode="group", height=260 * len(names),
                      title="Reference vs window, most drifted features (share of rows)")
    return fig


def _table(title: str, rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
