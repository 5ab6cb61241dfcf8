"""The HTML report: drift and performance over windows, and reference-vs-current distributions."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

MAX_DISTRIBUTIONS = 6


def write_report(path: str | Path, runs: list[dict[str, Any]], *, title: str = "everloop monitoring report",
                 reference: pd.DataFrame | None = None, current: pd.DataFrame | None = None,
                 kinds: dict[str, str] | None = None, summary: list[dict[str, Any]] | None = None) -> Path:
    """Write a self-contained HTML page (plotly inlined once, no network needed to view it).

    `runs` are monitor results (as dicts) in time order; `reference`/`current` feature frames, when
    given, add distribution plots for the most drifted features of the last run."""
    figures = [_over_time(runs)] if runs else []
    if runs and runs[-1].get("drift"):
        figures.append(_feature_heatmap(runs))
    if reference is not None and current is not None and runs and runs[-1].get("drift"):
        figures.append(_distributions(runs[-1], reference, current, kinds or {}))
    parts = []
    for n, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if n == 0 else False))
    table = _summary_table(summary) if summary else ""
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


def _distributions(run: dict[str, Any], reference: pd.DataFrame, current: pd.DataFrame,
                   kinds: dict[str, str]) -> go.Figure:
    ranked = sorted(run["drift"]["columns"], key=lambda c: -(c["effect"] or 0))[:MAX_DISTRIBUTIONS]
    fig = make_subplots(rows=len(ranked), cols=1, subplot_titles=[
        f"{c['column']}: effect {c['effect']:.3f}, p={c['p_value']:.2g}{' (drift)' if c['drifted'] else ''}"
        for c in ranked])
    for row, c in enumerate(ranked, start=1):
        name = c["column"]
        for frame, label, color in ((reference, "reference", "#1f77b4"), (current, "current", "#d62728")):
            values = frame[name]
            if kinds.get(name) == "numeric":
                fig.add_trace(go.Histogram(x=values, histnorm="probability", name=label, opacity=0.55,
                                           marker_color=color, showlegend=row == 1, nbinsx=40), row, 1)
            else:
                shares = values.astype(str).value_counts(normalize=True).sort_index()
                fig.add_trace(go.Bar(x=shares.index, y=shares.values, name=label, marker_color=color,
                                     showlegend=row == 1), row, 1)
    fig.update_layout(barmode="overlay", height=260 * len(ranked), title="Reference vs current, most drifted features")
    return fig


def _summary_table(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<h2>Summary</h2><table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
