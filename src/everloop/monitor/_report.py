"""The HTML monitoring report: the verdict of the latest window and its reasons first, a summary of that
window, then every signal over windows, a feature x window drift heatmap, and reference-vs-window
distributions that keep values outside the training range and values training never had.

The page is one self-contained file (plotly.js inlined once, no network needed to view it). It reads
monitor results (dicts, as stored in `monitor_runs`) defensively: every key with `.get`, so results of
older builds, windows with no data and signals not judged all render.
"""

from __future__ import annotations

import html
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from everloop.data import ColumnProfile, Profile
from everloop.spec import LOWER_IS_BETTER, ProjectSpec

MAX_DISTRIBUTIONS = 6
COARSE_BINS = 40  # numeric bins kept per stored distribution (plus below / above / missing)
MAX_CATEGORIES = 30  # categories kept per stored distribution (the rest summed), new ones included
MAX_NEW_CATEGORIES = 10
BELOW = "below the training range"
ABOVE = "above the training range"
MISSING = "missing"

_RED, _GREEN, _AMBER, _GREY = "#c62828", "#2e7d32", "#b26a00", "#666666"
_REFERENCE, _CURRENT = "#1f77b4", "#d62728"
_OK, _ALERT, _NOT_JUDGED, _NONE = "ok", "alert", "not judged", ""


# -- stored distributions -----------------------------------------------------------------------------


def coarse_distributions(reference: Profile, window: Profile,
                         columns: list[str]) -> dict[str, dict[str, Any]]:
    """Reference-vs-window distributions of `columns`, small enough to store with every monitor run.

    Numeric and date/time columns: the reference's quantile bins (Profile) merged into at most
    COARSE_BINS groups of about equal reference mass, `edges` (groups + 1 values, seconds since the
    epoch for date/times) with `reference` and `current` counts per group (`value_bins`: each group is
    one value of the reference, edges[:-1]), plus `below` and `above`
    ({"reference": n, "current": n}: values below the reference's first edge / above its last, which
    a window entirely outside the training range puts all its mass in) and `missing` (null counts).
    Categorical columns: up to MAX_CATEGORIES `categories` (the most frequent on either side, always
    including up to MAX_NEW_CATEGORIES the reference never had), their `reference` and `current`
    counts, `new` (those never seen in the reference) and `rest` (counts of the categories left out).
    Columns missing from either profile are skipped. Returns {column: distribution}; counts are ints.
    Results stored by older builds (numeric without below/above/missing) are still read by the report.
    """
    out: dict[str, dict[str, Any]] = {}
    for name in columns:
        ref, cur = reference.columns.get(name), window.columns.get(name)
        if ref is None or cur is None:
            continue
        out[name] = _coarse_categorical(ref, cur) if ref.kind == "categorical" else _coarse_numeric(ref, cur)
    return out


def _coarse_numeric(ref: ColumnProfile, cur: ColumnProfile) -> dict[str, Any]:
    # Profile counts are [below edges[0], one per bin between edges..., above edges[-1]].
    edges = np.asarray(ref.edges if ref.edges is not None else [0.0], dtype=float)
    ref_counts = np.asarray(ref.counts if ref.counts is not None else [0, 0], dtype=np.int64)
    cur_counts = np.asarray(cur.counts if cur.counts is not None else np.zeros_like(ref_counts), dtype=np.int64)
    inner = len(edges) - 1
    if inner > 0:
        groups = np.unique(np.linspace(0, inner, min(COARSE_BINS, inner) + 1).round().astype(np.int64))
        cuts = groups[:-1]
        reference_bins = np.add.reduceat(ref_counts[1:-1], cuts).tolist()
        current_bins = np.add.reduceat(cur_counts[1:-1], cuts).tolist()
        kept_edges = edges[groups].tolist()
    else:  # an empty reference: no bins, everything is below or above its single edge
        reference_bins, current_bins, kept_edges = [], [], edges.tolist()
    # with one bin per reference value and no grouping, each bin is one value: labelled by it
    value_bins = bool(getattr(ref, "value_bins", False)) and len(reference_bins) == inner
    return {"kind": ref.kind, "edges": kept_edges, "value_bins": value_bins, "reference": reference_bins,
            "current": current_bins,
            "below": {"reference": int(ref_counts[0]), "current": int(cur_counts[0])},
            "above": {"reference": int(ref_counts[-1]), "current": int(cur_counts[-1])},
            "missing": {"reference": int(ref.missing), "current": int(cur.missing)}}


def _coarse_categorical(ref: ColumnProfile, cur: ColumnProfile) -> dict[str, Any]:
    ref_total, cur_total = max(sum(ref.categories.values()), 1), max(sum(cur.categories.values()), 1)
    new = sorted((k for k in cur.categories if k not in ref.categories), key=lambda k: -cur.categories[k])
    new = new[:MAX_NEW_CATEGORIES]
    seen = sorted(ref.categories, key=lambda k: -max(ref.categories[k] / ref_total,
                                                     cur.categories.get(k, 0) / cur_total))
    keep = set(seen[:MAX_CATEGORIES - len(new)])
    keys = [k for k in sorted(keep, key=lambda k: -ref.categories[k])] + new
    reference_counts = [int(ref.categories.get(k, 0)) for k in keys]
    current_counts = [int(cur.categories.get(k, 0)) for k in keys]
    return {"kind": "categorical", "categories": keys, "reference": reference_counts, "current": current_counts,
            "new": new, "rest": {"reference": int(sum(ref.categories.values()) - sum(reference_counts)),
                                 "current": int(sum(cur.categories.values()) - sum(current_counts))}}


# -- the page ------------------------------------------------------------------------------------------


def write_report(path: str | Path, runs: list[dict[str, Any]], *, title: str = "everloop monitoring report",
                 focus: dict[str, Any] | None = None, tables: dict[str, list[dict[str, Any]]] | None = None,
                 spec: ProjectSpec | None = None) -> Path:
    """Write the monitoring report of `runs` to `path` as one self-contained HTML file; returns the path.

    `runs` are monitor results (dicts, oldest first; `everloop.monitor.list_runs`). Top to bottom: the
    verdict of the latest run with every alert and every not-judged reason; a summary of its window;
    `tables` (titled lists of rows, e.g. the demo's); charts over windows (labelled and estimated metric
    vs training and the decay threshold, drifted share vs its maximum, prediction drift, latency, error
    rates); the feature x window drift heatmap; the distributions of `focus` (by default the latest run
    that stored some). `spec` supplies thresholds a run does not carry itself (max drifted share, allowed
    drop, health limits); without it those lines are left out. Raises OSError if the file can't be written.
    """
    figures = report_figures(runs, spec=spec, focus=focus)
    focus = focus if focus is not None else _focus(runs)
    parts: list[str] = []
    first = True
    for key, heading, note in (
            ("over_time", "Over windows", "Each tick is one monitoring window: its index and start (UTC)."),
            ("heatmap", "Drift per feature and window",
             "Cell colour: drift effect (KS statistic for numbers, total variation distance for categories); "
             "✕ marks a feature that drifted in that window; features marked (ignored) never count towards "
             "the dataset verdict."),
            ("distributions", f"Reference vs window {_window_name(focus, None)}" if focus else "Distributions",
             "Share of rows per bin, training reference vs the window; values below or above anything seen "
             "in training and missing values have bars of their own; categories training never had are "
             "marked (new).")):
        fig = figures.get(key)
        if fig is None:
            continue
        parts.append(f"<h2>{html.escape(heading)}</h2><p class='note'>{html.escape(note)}</p>")
        if key == "distributions" and any(_old_format(d) for d in _dict(focus.get("distributions")).values()):
            parts.append("<p class='note'>Distributions marked (older format) were stored by an older everloop: "
                         "values outside the training range and missing values were not kept for them.</p>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if first else False,
                                 config={"displaylogo": False}))
        first = False
    latest = runs[-1] if runs else None
    body = (_verdict(latest) + (_summary(latest, spec) if latest else "")
            + "".join(_table(name, rows) for name, rows in (tables or {}).items() if rows) + "".join(parts))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}}
table{{border-collapse:collapse;margin-bottom:1em}} td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left;
vertical-align:top}} th{{background:#f3f3f3}} td.num{{text-align:right}} .note{{color:#555;font-size:90%}}
.verdict{{border-left:8px solid;padding:0.6em 1em;margin:1em 0;background:#fafafa}}
.verdict h2{{margin:0 0 0.3em 0}} .state-alert{{color:{_RED};font-weight:600}}
.state-ok{{color:{_GREEN}}} .state-not-judged{{color:{_AMBER}}}</style></head>
<body><h1>{html.escape(title)}</h1>{body}</body></html>"""
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def report_figures(runs: list[dict[str, Any]], *, spec: ProjectSpec | None = None,
                   focus: dict[str, Any] | None = None) -> dict[str, go.Figure]:
    """The report's plotly figures: {"over_time", "heatmap", "distributions"}, each only when there is
    something to draw (no runs: {}). Window axes use integer ticks (the run's position, labelled with
    its window index and start time); the heatmap labels every feature (tickmode "array")."""
    figures: dict[str, go.Figure] = {}
    if not runs:
        return figures
    figures["over_time"] = _over_time(runs, spec)
    if any(drift_columns(r) for r in runs):
        figures["heatmap"] = _feature_heatmap(runs)
    focus = focus if focus is not None else _focus(runs)
    if focus is not None and _dict(focus.get("distributions")):
        figures["distributions"] = _distributions(focus)
    return figures


# -- verdict and summary ------------------------------------------------------------------------------


def _status(run: dict[str, Any]) -> str:
    status = run.get("status")
    if status:
        return str(status)
    if not _dict(run.get("window")).get("rows"):
        return "no data"
    return "+".join(sorted({a.split(":")[0] for a in _alerts(run)})) or "healthy"


def _colour(status: str) -> str:
    if status == "healthy":
        return _GREEN
    if status in ("not judged", "no data"):
        return _AMBER
    return _RED


def _alerts(run: dict[str, Any]) -> list[str]:
    return [str(a) for a in run.get("alerts") or []]


def _not_judged(run: dict[str, Any]) -> dict[str, str]:
    """{signal: reason}; for results stored before `not_judged` existed, derived from what they say."""
    stored = run.get("not_judged")
    if isinstance(stored, dict):
        return {str(k): str(v) for k, v in stored.items()}
    out: dict[str, str] = {}
    if not _dict(run.get("window")).get("rows"):
        out["everything"] = "no predictions in this window"
        return out
    perf = _dict(run.get("performance"))
    if perf.get("value") is None and perf.get("why"):
        out["performance"] = str(perf["why"])
    return out


def _verdict(run: dict[str, Any] | None) -> str:
    if run is None:
        return (f"<div class='verdict' style='border-color:{_AMBER}'><h2 style='color:{_AMBER}'>No verdict</h2>"
                "<p>No monitoring runs are recorded for this model yet: run <code>everloop monitor</code> after "
                "it has served predictions.</p></div>")
    status = _status(run)
    colour = _colour(status)
    items = []
    for alert in _alerts(run):
        kind, _, rest = alert.partition(":")
        items.append(f"<li><strong style='color:{_RED}'>{html.escape(kind)}</strong>:{html.escape(rest)}</li>"
                     if rest else f"<li style='color:{_RED}'>{html.escape(alert)}</li>")
    for signal, reason in _not_judged(run).items():
        items.append(f"<li><strong style='color:{_AMBER}'>not judged: {html.escape(signal)}</strong>: "
                     f"{html.escape(reason)}</li>")
    if not items:
        items.append(f"<li style='color:{_GREEN}'>every signal judged is within its thresholds</li>")
    for note in run.get("notes") or []:  # findings that are not alerts (e.g. kinds not in alert_on)
        items.append(f"<li style='color:{_GREY}'>note: {html.escape(str(note))}</li>")
    window = _dict(run.get("window"))
    about = (f"model v{html.escape(str(run.get('model_version', '?')))}, "
             f"window {html.escape(_window_name(run, None))}"
             f" ({html.escape(_num(window.get('rows')))} rows, {html.escape(_span(window))}); checked "
             f"{html.escape(_when(run.get('created_at')))}")
    return (f"<div class='verdict' id='verdict' style='border-color:{colour}'>"
            f"<h2 style='color:{colour}'>Verdict: {html.escape(status)}</h2><p>{about}</p>"
            f"<ul>{''.join(items)}</ul></div>")


def _summary(run: dict[str, Any], spec: ProjectSpec | None) -> str:
    window, perf = _dict(run.get("window")), _dict(run.get("performance"))
    drift, pred, health = _dict(run.get("drift")), _dict(run.get("prediction_drift")), _dict(run.get("health"))
    alerts, not_judged = _alerts(run), _not_judged(run)
    metric = str(perf.get("metric") or "metric")

    def state(kinds: tuple[str, ...], judged: bool, signals: tuple[str, ...] = ()) -> str:
        if any(a.startswith(k) for a in alerts for k in kinds):
            return _ALERT
        if not judged or any(key in ("all", "everything") or key.startswith(s) for key in not_judged
                             for s in signals):
            return _NOT_JUDGED
        return _OK

    rows: list[tuple[str, str, str]] = []
    seq = ""
    if window.get("first_seq") is not None:
        seq = f"; prediction batches {_num(window.get('first_seq'))} to {_num(window.get('last_seq'))}"
    kind = (f"a window of {_num(window.get('size'))} {window['kind']}" if window.get("kind") and window.get("size")
            else f"a window by {window['kind']}" if window.get("kind") else "the latest window")
    complete = ", still filling up" if window.get("complete") is False else ""
    rows.append(("window", f"{_window_name(run, None)}: {_num(window.get('rows'))} rows ({kind}{complete}){seq}",
                 _NONE))
    rows.append(("time span", _span(window), _NONE))
    labelled = perf.get("labelled_rows", window.get("labelled_rows"))
    text = _num(labelled)
    if perf.get("from") is not None:  # the labelled window: the latest labelled predictions, however old
        text += f" (the latest labelled predictions, {_span(perf)})"
    rows.append(("labelled rows", text, _NONE))
    threshold = _threshold(perf, spec)
    value = _float(perf.get("value"))
    text = (f"{_num(value)} vs {_num(perf.get('expected'))} at training" if value is not None
            else f"not judged: {perf.get('why') or not_judged.get('performance') or 'no labelled rows'}")
    if value is not None and perf.get("rules") and threshold is not None:  # the rules say it all, with units
        text += f"; worst allowed {_num(threshold)} ({'; '.join(map(str, perf['rules']))})"
    elif value is not None:
        drop = perf.get("allowed_drop")
        if drop is None and spec is not None:
            drop = spec.monitoring.performance.max_drop
        if drop is not None:
            text += f"; allowed drop {_num(drop)}"
        if threshold is not None:
            text += f" (threshold {_num(threshold)})"
    if value is not None:
        text += ": decayed" if perf.get("decayed") else ": within thresholds" if threshold is not None else ""
        if threshold is None and perf.get("why"):
            text += f": {perf['why']}"
    rows.append((f"{metric} on labelled rows", text,
                 state(("decay:",), value is not None, ("performance", "labelled"))))
    estimated = _float(perf.get("estimated"))
    text = "not estimated" if estimated is None else _num(estimated)
    low, high = _float(perf.get("estimated_low")), _float(perf.get("estimated_high"))
    if estimated is not None and low is not None and high is not None:
        text += f" (interval {_num(low)} to {_num(high)})"
    if estimated is not None and perf.get("estimated_why"):
        text += f": {perf['estimated_why']}"
    rows.append((f"{metric} estimated without labels", text,
                 _ALERT if perf.get("estimated_decayed") or any(a.startswith("decay (estimated") for a in alerts)
                 else state((), estimated is not None, ("estimat",))))
    if drift:
        columns = [c for c in drift.get("columns") or [] if isinstance(c, dict)]
        counted = [c for c in columns if not c.get("ignored")]
        drifted = [str(c.get("column")) for c in counted if c.get("drifted")]
        also = [str(c.get("column")) for c in columns if c.get("ignored") and c.get("drifted")]
        limit = _max_share(run, spec)
        text = (f"{len(drifted)} of {len(counted)} counted features drifted ({_pct(drift.get('drifted_share'))}"
                + (f"; dataset drift above {_pct(limit)}" if limit is not None else "") + ")"
                + (f": {', '.join(drifted)}" if drifted else "")
                + (f"; by itself: {', '.join(map(str, drift['severe']))}" if drift.get("severe") else "")
                + (f"; ignored features that drifted: {', '.join(also)}" if also else ""))
    else:
        text = "not measured"
    rows.append(("data drift", text, state(("drift:",), bool(drift), ("drift",))))
    if pred:
        text = (f"effect {_num(pred.get('effect'))}, p = {_p(pred.get('p_value'))}"
                + ("; drifted" if pred.get("drifted") else "; no drift"))
    else:
        text = "not measured"
    rows.append(("prediction drift", text, state(("prediction drift",), bool(pred), ("prediction",))))
    rows.append(("training-serving skew", _skew_text(_dict(run.get("skew"))),
                 state(("skew",), bool(run.get("skew")), ("skew",))))
    rows.append(("health", _health_text(health), state(("health",), bool(health), ("health",))))
    body = "".join(f"<tr><th>{html.escape(name)}</th><td>{html.escape(text)}</td>"
                   f"<td class='state-{s.replace(' ', '-')}'>{html.escape(s)}</td></tr>" for name, text, s in rows)
    return f"<h2>Latest window</h2><table><tr><th>signal</th><th>value</th><th>state</th></tr>{body}</table>"


def _skew_text(skew: dict[str, Any]) -> str:
    if not skew:
        return "not measured"
    if "mismatched" in skew or "rows" in skew:  # replayed through the batch path
        text = f"{_num(skew.get('mismatched'))} of {_num(skew.get('rows'))} replayed rows differ"
        if skew.get("share") is not None:
            text += f" ({_pct(skew.get('share'))})"
        if skew.get("prediction_mismatches"):
            text += f"; {_num(skew['prediction_mismatches'])} with a different prediction"
        if skew.get("refused"):
            text += f"; {_num(skew['refused'])} refused by the batch path"
        features = skew.get("features") or []
        return text + (f"; features: {', '.join(map(str, features))}" if features else "")
    features = skew.get("features") or []
    return f"features: {', '.join(map(str, features))}" if features else "none"


def _health_text(health: dict[str, Any]) -> str:
    if not health:
        return "not measured"
    parts = []
    if health.get("rows_per_second") is not None:
        parts.append(f"{_num(health['rows_per_second'])} rows/s")
    latency = [f"p{q} {_num(health.get(f'latency_ms_p{q}'))}" for q in (50, 95, 99)
               if health.get(f"latency_ms_p{q}") is not None]
    if latency:
        parts.append("latency " + ", ".join(latency) + " ms")
    if health.get("requests") is not None:
        parts.append(f"{_num(health['requests'])} requests")
    for key, name in (("error_rate", "error rate"), ("refused_rate", "refused rate")):
        if key in health:
            parts.append(f"{name} {_pct(health.get(key))}")
    if health.get("server_errors") is not None:
        parts.append(f"{_num(health['server_errors'])} server errors")
    return "; ".join(parts) or "not measured"


# -- charts -----------------------------------------------------------------------------------------


PANELS = ("performance", "drift", "prediction", "latency", "errors")  # over_time's panels, top to bottom
_PANEL_TITLES = {"drift": "share of features drifted", "prediction": "prediction drift (effect)",
                 "latency": "latency (ms)", "errors": "error rates (%)"}


def _ticks(runs: list[dict[str, Any]], versions: bool = False) -> tuple[list[int], list[str], list[str]]:
    """Integer x positions (1..n), their tick texts (every one up to 30 windows, then every k-th), and
    hover labels. `versions`: tick texts name the model version too ("v2 #1"), for runs of several."""
    x = list(range(1, len(runs) + 1))
    text = [(f"v{html.escape(str(r.get('model_version', '?')))} " if versions else "")
            + html.escape(_window_name(r, i)) + (f"<br>{html.escape(_start(r))}" if _start(r) else "")
            for i, r in zip(x, runs)]
    step = max(1, math.ceil(len(x) / 30))
    keep = x[::step]
    hover = [f"window {html.escape(_window_name(r, i))}, model v{html.escape(str(r.get('model_version', '?')))}, "
             f"{html.escape(_span(_dict(r.get('window'))))}: {html.escape(_status(r))}" for i, r in zip(x, runs)]
    return keep, [text[i - 1] for i in keep], hover


def _over_time(runs: list[dict[str, Any]], spec: ProjectSpec | None) -> go.Figure:
    return over_time(runs, spec)


def over_time(runs: list[dict[str, Any]], spec: ProjectSpec | None = None, panels: tuple[str, ...] = PANELS,
              *, versions: bool = False) -> go.Figure:
    """Signals over windows, one panel (subplot, shared x axis) per name in `panels`, in that order:
    "performance" (the metric on labelled rows, estimated without labels (CBPE) with its interval, at
    training, the decay threshold and min_metric), "drift" (share of features drifted vs its maximum),
    "prediction" (prediction drift effect), "latency" (p50 and p99 in ms vs max p99), "errors" (server
    error and refused rates in % vs their maximums). `runs`: monitor results, oldest first; x is the run's
    position 1..n, labelled with its window index and start time (`versions`: and model version).
    `spec` supplies thresholds a run does not carry. Raises ValueError for an unknown or no panel."""
    unknown = [p for p in panels if p not in PANELS]
    if unknown or not panels:
        raise ValueError(f"panels {unknown or '(none)'}: expected some of {', '.join(PANELS)}")
    x = list(range(1, len(runs) + 1))
    tickvals, ticktext, hover = _ticks(runs, versions)
    perfs = [_dict(r.get("performance")) for r in runs]
    metric = next((str(p["metric"]) for p in reversed(perfs) if p.get("metric")), "metric")
    titles = {"performance": f"{html.escape(metric)}: on labelled rows, estimated without labels, at training, "
                             "decay threshold"} | _PANEL_TITLES
    every = tuple(panels) == PANELS  # the report's figure: its layout kept as it always was
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True,
                        vertical_spacing=0.05 if every else min(0.3 / len(panels), 0.12),
                        subplot_titles=tuple(titles[p] for p in panels))
    row_of = {p: i for i, p in enumerate(panels, start=1)}

    def line(y: list[float | None], name: str, panel: str, **style: Any) -> None:
        if any(v is not None for v in y):
            fig.add_trace(go.Scatter(x=x, y=y, name=name, text=hover, connectgaps=False, **style), row_of[panel], 1)

    if "performance" in row_of:
        low = [_float(p.get("estimated_low")) for p in perfs]
        high = [_float(p.get("estimated_high")) for p in perfs]
        if any(v is not None for v in low) and any(v is not None for v in high):
            fig.add_trace(go.Scatter(x=x, y=high, mode="lines", line={"width": 0}, showlegend=False,
                                     hoverinfo="skip"), row_of["performance"], 1)
            fig.add_trace(go.Scatter(x=x, y=low, mode="lines", line={"width": 0}, fill="tonexty",
                                     fillcolor="rgba(255,127,14,0.2)", name="estimate interval"),
                          row_of["performance"], 1)
        line([_float(p.get("estimated")) for p in perfs], "estimated without labels", "performance",
             mode="lines+markers", line={"color": "#ff7f0e", "dash": "dash"},
             marker={"color": ["#c62828" if p.get("estimated_decayed") else "#ff7f0e" for p in perfs]})
        line(_labelled_points(perfs), "on labelled rows", "performance", mode="lines+markers",
             line={"color": "#1f77b4"}, marker={"size": 8, "color": [_RED if p.get("decayed") else "#1f77b4"
                                                                      for p in perfs]})
        line([_float(p.get("expected")) for p in perfs], "at training", "performance", mode="lines",
             line={"color": "#555", "dash": "dot"})
        line([_threshold(p, spec) for p in perfs], "decay threshold", "performance", mode="lines",
             line={"color": _RED, "dash": "dash", "width": 1})
        min_metric = spec.monitoring.performance.min_metric if spec is not None else None
        if min_metric is not None:
            line([float(min_metric)] * len(x), "min_metric", "performance", mode="lines",
                 line={"color": _RED, "dash": "dot"})

    if "drift" in row_of:
        drifts = [_dict(r.get("drift")) for r in runs]
        share = [_float(d.get("drifted_share")) for d in drifts]
        if any(v is not None for v in share):
            fig.add_trace(go.Bar(x=x, y=share, name="drifted share", text=hover, textposition="none",
                                 marker_color=[_RED if d.get("dataset_drift") else "#7f8c9a" for d in drifts]),
                          row_of["drift"], 1)
        line([_max_share(r, spec) for r in runs], "max drifted share", "drift", mode="lines",
             line={"color": _RED, "dash": "dash", "width": 1})

    if "prediction" in row_of:
        preds = [_dict(r.get("prediction_drift")) for r in runs]
        line([_float(p.get("effect")) for p in preds], "prediction drift", "prediction", mode="lines+markers",
             line={"color": "#6a3d9a"}, marker={"size": 8, "color": [_RED if p.get("drifted") else "#6a3d9a"
                                                                      for p in preds]})

    healths = [_dict(r.get("health")) for r in runs]
    limits = _health_limits(spec)
    if "latency" in row_of:
        for q, colour in ((50, "#2ca02c"), (99, "#8c564b")):
            line([_float(h.get(f"latency_ms_p{q}")) for h in healths], f"latency p{q}", "latency",
                 mode="lines+markers", line={"color": colour})
        if limits.get("max_latency_ms_p99") is not None:
            line([float(limits["max_latency_ms_p99"])] * len(x), "max latency p99", "latency", mode="lines",
                 line={"color": _RED, "dash": "dash", "width": 1})
    if "errors" in row_of:
        for key, name, colour in (("error_rate", "error rate", "#d62728"),
                                  ("refused_rate", "refused rate", "#9467bd")):
            values = [_float(h.get(key)) for h in healths]
            line([None if v is None else 100 * v for v in values], name, "errors", mode="lines+markers",
                 line={"color": colour})
            limit = limits.get(f"max_{key}")
            if limit is not None and any(v is not None for v in values):
                line([100 * float(limit)] * len(x), f"max {name}", "errors", mode="lines",
                     line={"color": colour, "dash": "dash", "width": 1})
    for row in range(1, len(panels) + 1):  # integer window ticks on every axis, never fractional ones
        fig.update_xaxes(tickmode="array", tickvals=tickvals, ticktext=ticktext, range=[0.5, len(x) + 0.5],
                         row=row, col=1)
    for panel in ("drift", "prediction"):
        if panel in row_of:
            fig.update_yaxes(rangemode="tozero", row=row_of[panel], col=1)
    if every:
        fig.update_layout(height=1250, xaxis5_title="monitoring window (index, start UTC)",
                          legend={"orientation": "h", "y": -0.08})
    else:
        fig.update_xaxes(title="monitoring window (index, start UTC)", row=len(panels), col=1)
        height = 260 * len(panels) + 120
        fig.update_layout(height=height, margin={"t": 100},  # the legend above the first panel's title
                          legend={"orientation": "h", "y": 1 + 45 / height, "yanchor": "bottom", "x": 0})
        if len(panels) == 1:  # the one title is the chart's: no subplot title needed above the legend
            fig.layout.annotations = ()
            fig.update_layout(title={"text": titles[panels[0]], "font": {"size": 14}}, margin={"t": 90})
    return fig


def prediction_over_time(runs: list[dict[str, Any]], *, versions: bool = False) -> go.Figure | None:
    """The distribution of the model's predictions per window, from the coarse distribution a run stores
    under "prediction_distribution" (the format of coarse_distributions: the score's bins for
    probabilities and regression, the predicted classes for multiclass). Numbers: the window's median
    with its 25-75% and 10-90% bands, and the reference's (held-out scores at training) median, quantiles
    interpolated within bins (values below/above the reference's range sit at its first/last edge);
    classes: each class's share of the window (stacked bars). x as in over_time. Returns None when no
    run stored a prediction distribution (results of builds that did not)."""
    stored = [_dict(r.get("prediction_distribution")) for r in runs]
    if not any(stored):
        return None
    x = list(range(1, len(runs) + 1))
    tickvals, ticktext, hover = _ticks(runs, versions)
    fig = go.Figure()
    if any(d.get("kind") == "categorical" for d in stored):
        shares: dict[str, list[float | None]] = {}
        for j, d in enumerate(stored):
            total = sum(_count(v) for v in d.get("current") or []) + _count(_dict(d.get("rest")).get("current"))
            for name, count in zip(d.get("categories") or [], d.get("current") or []):
                shares.setdefault(str(name), [None] * len(x))[j] = _count(count) / total if total else None
        for name, y in sorted(shares.items(), key=lambda kv: -sum(v or 0 for v in kv[1]))[:MAX_CATEGORIES]:
            fig.add_trace(go.Bar(x=x, y=y, name=html.escape(name), text=hover, textposition="none"))
        fig.update_layout(barmode="stack")
        fig.update_yaxes(tickformat=".0%", title="share of the window's predictions", range=[0, 1])
    else:
        q = {p: [_quantile(d, "current", p / 100) for d in stored] for p in (10, 25, 50, 75, 90)}
        for low, high, name, alpha in ((10, 90, "10-90% of predictions", 0.15), (25, 75, "25-75%", 0.3)):
            fig.add_trace(go.Scatter(x=x, y=q[high], mode="lines", line={"width": 0}, showlegend=False,
                                     hoverinfo="skip", connectgaps=False))
            fig.add_trace(go.Scatter(x=x, y=q[low], mode="lines", line={"width": 0}, fill="tonexty",
                                     fillcolor=f"rgba(106,61,154,{alpha})", name=name, hoverinfo="skip",
                                     connectgaps=False))
        fig.add_trace(go.Scatter(x=x, y=q[50], mode="lines+markers", name="median", text=hover,
                                 line={"color": "#6a3d9a"}, connectgaps=False))
        reference = [_quantile(d, "reference", 0.5) for d in stored]
        if any(v is not None for v in reference):
            fig.add_trace(go.Scatter(x=x, y=reference, mode="lines", name="reference median",
                                     line={"color": "#555", "dash": "dot"}, connectgaps=False))
        fig.update_yaxes(title="prediction")
    fig.update_xaxes(tickmode="array", tickvals=tickvals, ticktext=ticktext, range=[0.5, len(x) + 0.5],
                     title="monitoring window (index, start UTC)")
    fig.update_layout(height=360, legend={"orientation": "h", "y": 1.02, "yanchor": "bottom"})
    return fig


def _quantile(d: dict[str, Any], side: str, q: float) -> float | None:
    """The q-quantile (0..1) of one side ("reference" or "current") of a stored numeric distribution,
    linear within a bin (a value bin is its one value); mass below / above the reference's range counts
    at its first / last edge; missing values left out. None without values or edges."""
    edges = [_float(e) for e in d.get("edges") or []]
    counts = [_count(v) for v in d.get(side) or []]
    if not edges or any(e is None for e in edges) or len(edges) != len(counts) + 1:
        return None
    below, above = _count(_dict(d.get("below")).get(side)), _count(_dict(d.get("above")).get(side))
    total = below + sum(counts) + above
    if not total:
        return None
    target = q * total
    if target <= below:
        return edges[0]
    seen = below
    for i, count in enumerate(counts):
        if count and seen + count >= target:
            if d.get("value_bins"):
                return edges[i]
            return edges[i] + (edges[i + 1] - edges[i]) * (target - seen) / count
        seen += count
    return edges[-1]


def _labelled_points(perfs: list[dict[str, Any]]) -> list[float | None]:
    """The labelled metric per window, drawn only where its labelled window (the latest labelled
    predictions: it can stay the same while drift windows pass without new labels) differs from the
    one already drawn: the same number is not history."""
    out, drawn = [], None
    for p in perfs:
        key = (p.get("from"), p.get("to"), p.get("labelled_rows"))
        value = _float(p.get("value"))
        out.append(value if value is not None and key != drawn else None)
        if value is not None:
            drawn = key
    return out


def _feature_heatmap(runs: list[dict[str, Any]]) -> go.Figure:
    return feature_heatmap(runs)


def feature_heatmap(runs: list[dict[str, Any]], *, run_ids: list[int] | None = None,
                    features: list[str] | None = None, versions: bool = False) -> go.Figure:
    """Features (rows, every one labelled) x windows (integer columns 1..n, oldest first), coloured by
    the drift effect the monitor stored (KS statistic for numbers, total variation distance for
    categories; z is None where a run has no such feature); drifted cells marked with ✕; ignored
    features' labels say so.

    `run_ids` (one per run, e.g. monitor_runs ids): makes cells clickable: y values are then the feature
    names (a category axis), each cell's (and ✕ mark's) customdata is its run's id, and the hover text
    moves to `text`. `features`: the rows to draw, in this order (default: every feature of any run,
    the latest run's order first). `versions`: window ticks name the model version. Raises ValueError
    when `run_ids` does not have one id per run."""
    if run_ids is not None and len(run_ids) != len(runs):
        raise ValueError(f"run_ids: {len(run_ids)} ids for {len(runs)} runs")
    x = list(range(1, len(runs) + 1))
    tickvals, ticktext, _ = _ticks(runs, versions)
    names: list[str] = []
    if features is not None:
        names = list(dict.fromkeys(str(n) for n in features))
    else:
        for run in reversed(runs):  # the latest run's order first, then features only older runs had
            names += [n for n in (str(c.get("column")) for c in drift_columns(run)) if n not in names]
    row_of = {n: i for i, n in enumerate(names)}
    z: list[list[float | None]] = [[None] * len(x) for _ in names]
    hover = [[""] * len(x) for _ in names]
    ignored: dict[str, bool] = {}
    marks_x, marks_y, marks_id = [], [], []
    for j, run in enumerate(runs):
        for c in drift_columns(run):
            i = row_of.get(str(c.get("column")))
            if i is None:
                continue
            ignored[names[i]] = bool(c.get("ignored"))  # runs are oldest first: the latest setting wins
            z[i][j] = _float(c.get("effect"))
            reasons = ", ".join(map(str, c.get("reasons") or []))
            hover[i][j] = (f"{html.escape(names[i])}, window {html.escape(_window_name(run, j + 1))}<br>"
                           f"{html.escape(str(c.get('method', '')))}: effect {_num(c.get('effect'))}, "
                           f"p = {_p(c.get('p_value'))}"
                           + (f", unseen {_pct(c.get('unseen_share'))}"
                              if c.get("unseen_share") is not None else "")
                           + ("<br>drifted" + (f" ({html.escape(reasons)})" if reasons else "")
                              if c.get("drifted") else "")
                           + ("<br>ignored in the dataset verdict" if c.get("ignored") else ""))
            if c.get("drifted"):
                marks_x.append(x[j])
                marks_y.append(i)
                marks_id.append(run_ids[j] if run_ids is not None else None)
    labels = [html.escape(n) + (" (ignored)" if ignored.get(n) else "") for n in names]
    finite = [v for row in z for v in row if v is not None]
    style = {"colorscale": "Reds", "zmin": 0, "zmax": max(0.3, max(finite, default=0.0)),
             "colorbar": {"title": "effect"}, "xgap": 1, "ygap": 1}
    rows: list[Any] = list(range(len(names)))
    if run_ids is None:
        fig = go.Figure(go.Heatmap(z=z, x=x, y=rows, customdata=hover,
                                   hovertemplate="%{customdata}<extra></extra>", **style))
    else:  # clickable: the click names the feature (y) and the run (customdata)
        rows = names
        fig = go.Figure(go.Heatmap(z=z, x=x, y=rows, text=hover, hovertemplate="%{text}<extra></extra>",
                                   customdata=[[run_id for run_id in run_ids] for _ in names], **style))
    if marks_x:
        marks = {"customdata": marks_id} if run_ids is not None else {}
        fig.add_trace(go.Scatter(x=marks_x, y=[rows[i] for i in marks_y], mode="markers", name="drifted",
                                 hoverinfo="skip", marker={"symbol": "x", "size": 10, "color": "black",
                                                           "line": {"color": "white", "width": 1}}, **marks))
    axis = {"type": "category"} if run_ids is not None else {}
    fig.update_yaxes(tickmode="array", tickvals=rows, ticktext=labels, autorange="reversed",
                     automargin=True, **axis)
    fig.update_xaxes(tickmode="array", tickvals=tickvals, ticktext=ticktext, range=[0.5, len(x) + 0.5],
                     title="monitoring window (index, start UTC)")
    fig.update_layout(height=max(320, 24 * len(names) + 200), showlegend=bool(marks_x),
                      legend={"orientation": "h", "y": 1.02, "yanchor": "bottom"})
    return fig


def _distributions(run: dict[str, Any]) -> go.Figure:
    """Reference vs window shares per bin for the run's stored features (the most drifted ones)."""
    stored = _dict(run.get("distributions"))
    names = [n for n, d in stored.items() if isinstance(d, dict)][:MAX_DISTRIBUTIONS]
    columns = {str(c.get("column")): c for c in drift_columns(run)}
    titles = []
    for name in names:
        c = columns.get(name, {})
        title = html.escape(name)
        if c:
            title += f": effect {_num(c.get('effect'))}, p = {_p(c.get('p_value'))}"
            if c.get("unseen_share"):
                title += f", {_pct(c.get('unseen_share'))} unseen in training"
            if c.get("drifted"):
                reasons = ", ".join(map(str, c.get("reasons") or []))
                title += " — drifted" + (f" ({html.escape(reasons)})" if reasons else "")
        if _old_format(stored[name]):
            title += " (older format)"
        titles.append(title)
    height = 420 * len(names)  # room below each plot for its slanted bin labels
    fig = make_subplots(rows=len(names), cols=1, subplot_titles=titles,
                        vertical_spacing=min(190 / height, 1 / max(len(names) - 1, 1)))
    for row, name in enumerate(names, start=1):
        labels, reference, current, outside = _bars(stored[name])
        x = list(range(len(labels)))
        for side, counts, colour in (("training reference", reference, _REFERENCE),
                                     ("window", current, _CURRENT)):
            total = sum(counts)
            shares = [c / total if total else 0.0 for c in counts]
            fig.add_trace(go.Bar(x=x, y=shares, name=side, marker_color=colour, legendgroup=side,
                                 showlegend=row == 1, customdata=[f"{label}: {c:,} rows" for label, c in
                                                                  zip(labels, counts)],
                                 hovertemplate="%{customdata} (%{y:.1%})<extra>" + side + "</extra>"), row, 1)
        for i in outside:  # shade the bars that lie outside what training saw
            fig.add_vrect(x0=i - 0.5, x1=i + 0.5, fillcolor="#fff3cd", opacity=0.7, layer="below", line_width=0,
                          row=row, col=1)
        fig.update_xaxes(tickmode="array", tickvals=x, ticktext=labels, tickangle=-60 if len(x) > 8 else 0,
                         tickfont={"size": 9}, automargin=True, row=row, col=1)
        fig.update_yaxes(tickformat=".0%", row=row, col=1)
    fig.update_layout(barmode="group", height=height, bargap=0.15, margin={"b": 150, "t": 110},
                      legend={"orientation": "h", "y": 1 + 60 / height, "yanchor": "bottom"})
    return fig


def feature_distribution(run: dict[str, Any], feature: str) -> go.Figure | None:
    """One feature's reference-vs-window distribution as the run stored it (`distributions`; see
    coarse_distributions): grouped bars, training reference vs the window, y the share of each side's
    rows in the bar (0..1), each bar's customdata its row count (an int). Bars, left to right: numbers
    (and date/times) below the training range, the bins, above the range, then missing values when
    either side has some; categories: the stored ones ("(new)" marks those training never had), then
    "other categories" when some were summed. Bars outside what training saw are shaded.
    Returns None when the run stored no distribution for `feature` (the monitor keeps the most
    drifted features' only)."""
    stored = _dict(run.get("distributions")).get(feature)
    if not isinstance(stored, dict):
        return None
    labels, reference, current, outside = _bars(stored)
    x = list(range(len(labels)))
    fig = go.Figure()
    for side, counts, colour in (("training reference", reference, _REFERENCE), ("window", current, _CURRENT)):
        total = sum(counts)
        fig.add_trace(go.Bar(x=x, y=[c / total if total else 0.0 for c in counts], name=side, marker_color=colour,
                             customdata=counts, text=labels, textposition="none",
                             hovertemplate="%{text}: %{customdata:,} rows (%{y:.1%})<extra>" + side + "</extra>"))
    for i in outside:
        fig.add_vrect(x0=i - 0.5, x1=i + 0.5, fillcolor="#fff3cd", opacity=0.7, layer="below", line_width=0)
    fig.update_xaxes(tickmode="array", tickvals=x, ticktext=labels, tickangle=-60 if len(x) > 8 else 0,
                     automargin=True)
    fig.update_yaxes(tickformat=".0%", title="share of rows")
    fig.update_layout(barmode="group", bargap=0.15, height=460,
                      legend={"orientation": "h", "y": 1.02, "yanchor": "bottom"})
    return fig


def _bars(d: dict[str, Any]) -> tuple[list[str], list[int], list[int], list[int]]:
    """Bar labels (escaped for plotly), reference and window counts, and the indexes of bars outside the
    training range or its categories, for a stored distribution of either format."""
    reference = [_count(v) for v in d.get("reference") or []]
    current = [_count(v) for v in d.get("current") or []]
    n = max(len(reference), len(current))
    reference += [0] * (n - len(reference))
    current += [0] * (n - len(current))
    outside: list[int] = []
    if d.get("kind") == "categorical":
        categories = [str(k) for k in d.get("categories") or []]
        categories += [f"#{i}" for i in range(len(categories), n)]
        new = {str(k) for k in d["new"]} if isinstance(d.get("new"), list) else {  # older format: reference 0
            k for k, r, c in zip(categories, reference, current) if r == 0 and c > 0}
        labels = []
        for i, k in enumerate(categories[:n]):
            labels.append(html.escape(k) + (" (new)" if k in new else ""))
            if k in new:
                outside.append(i)
        rest = _dict(d.get("rest"))
        if rest.get("reference") or rest.get("current"):
            labels.append("other categories")
            reference.append(_count(rest.get("reference")))
            current.append(_count(rest.get("current")))
        return labels, reference, current, outside
    edges = [_float(e) for e in d.get("edges") or []]
    datetime = d.get("kind") == "datetime"
    if len(edges) == n + 1 and all(e is not None for e in edges) and d.get("value_bins"):
        labels = [_edge(e, datetime) for e in edges[:-1]]
    elif len(edges) == n + 1 and all(e is not None for e in edges):
        labels = [f"[{_edge(edges[i], datetime)}, {_edge(edges[i + 1], datetime)}{']' if i == n - 1 else ')'}"
                  for i in range(n)]
    else:  # edges that do not match the counts: number the bins rather than mislabel them
        labels = [f"bin {i + 1}" for i in range(n)]
    below, above, missing = _dict(d.get("below")), _dict(d.get("above")), _dict(d.get("missing"))
    if below:
        first = f" (< {_edge(edges[0], datetime)})" if edges and edges[0] is not None else ""
        labels.insert(0, BELOW + first)
        reference.insert(0, _count(below.get("reference")))
        current.insert(0, _count(below.get("current")))
        outside.append(0)
    if above:
        last = f" (> {_edge(edges[-1], datetime)})" if edges and edges[-1] is not None else ""
        labels.append(ABOVE + last)
        reference.append(_count(above.get("reference")))
        current.append(_count(above.get("current")))
        outside.append(len(labels) - 1)
    if missing.get("reference") or missing.get("current"):
        labels.append(MISSING)
        reference.append(_count(missing.get("reference")))
        current.append(_count(missing.get("current")))
    return labels, reference, current, outside


# -- small helpers ----------------------------------------------------------------------------------


def _focus(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in reversed(runs) if _dict(r.get("distributions"))), None)


def _old_format(d: Any) -> bool:
    return isinstance(d, dict) and d.get("kind") != "categorical" and "below" not in d


def drift_columns(run: dict[str, Any]) -> list[dict[str, Any]]:
    """A stored monitor result's per-feature drift entries (dicts with "column"), [] when it has none."""
    return [c for c in _dict(run.get("drift")).get("columns") or [] if isinstance(c, dict) and "column" in c]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _float(value: Any) -> float | None:
    """A finite float, or None (for None, NaN, text)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _count(value: Any) -> int:
    number = _float(value)
    return int(number) if number is not None else 0


def _max_share(run: dict[str, Any], spec: ProjectSpec | None) -> float | None:
    stored = _float(_dict(run.get("drift")).get("max_drifted_share"))
    if stored is not None:
        return stored
    return spec.monitoring.drift.max_drifted_share if spec is not None and run.get("drift") else None


def _health_limits(spec: ProjectSpec | None) -> dict[str, Any]:
    """Health thresholds (monitoring.health), when the spec has them."""
    health = getattr(getattr(spec, "monitoring", None), "health", None)
    keys = ("max_error_rate", "max_refused_rate", "max_latency_ms_p99")
    return {key: getattr(health, key, None) for key in keys}


def _threshold(perf: dict[str, Any], spec: ProjectSpec | None) -> float | None:
    """The decay threshold in metric units: the run's own `threshold` when stored, else the training
    value minus the allowed drop (plus, for lower-is-better metrics), the drop absolute or "N%" of it."""
    stored = _float(perf.get("threshold"))
    if stored is not None:
        return stored
    expected = _float(perf.get("expected"))
    drop = perf.get("allowed_drop")
    if drop is None and spec is not None:
        drop = spec.monitoring.performance.max_drop
    loss = _float(drop)
    if loss is None and isinstance(drop, str) and expected is not None:
        match = re.fullmatch(r"\s*([0-9.]+)\s*%\s*", drop)
        loss = abs(expected) * float(match.group(1)) / 100 if match else None
    if expected is None or loss is None:
        return None
    return expected + loss if perf.get("metric") in LOWER_IS_BETTER else expected - loss


def _window_name(run: dict[str, Any] | None, position: int | None) -> str:
    index = _dict((run or {}).get("window")).get("index")
    if index is not None:
        return f"#{index}"
    return f"#{position}" if position is not None else "(latest)"


def _when(seconds: Any) -> str:
    value = _float(seconds)
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value)) if value is not None else "(unknown time)"


def _start(run: dict[str, Any]) -> str:
    value = _float(_dict(run.get("window")).get("from"))
    return time.strftime("%m-%d %H:%M", time.gmtime(value)) if value is not None else ""


def _span(window: dict[str, Any]) -> str:
    start, end = _float(window.get("from")), _float(window.get("to"))
    if start is None or end is None:
        return "no time span"
    first = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start))
    same_day = time.gmtime(start)[:3] == time.gmtime(end)[:3]
    last = time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", time.gmtime(end))
    return f"{first} to {last} UTC ({_duration(end - start)})"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _edge(value: float | None, datetime: bool) -> str:
    if value is None:
        return "?"
    if datetime:
        try:
            return time.strftime("%Y-%m-%d %H:%M", time.gmtime(value))
        except (OverflowError, OSError, ValueError):
            return _num(value)
    return _num(value)


def _num(value: Any) -> str:
    """A number for people: ints with thousands separators, floats to 4 significant places."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    number = _float(value)
    if number is None:
        return str(value) if isinstance(value, str) else "n/a"
    size = abs(number)
    if number == 0 or 1e-3 <= size < 1:
        return f"{number:.4f}".rstrip("0").rstrip(".") if number else "0"
    if 1 <= size < 1e4:
        return f"{number:.4g}"
    if size >= 1e4 and size < 1e15:
        return f"{number:,.0f}"
    return f"{number:.3g}"


def _pct(value: Any) -> str:
    number = _float(value)
    if number is None:
        return "n/a"
    return f"{100 * number:.3g}%" if 0 < abs(number) < 0.01 else f"{100 * number:.1f}%"


def _p(value: Any) -> str:
    number = _float(value)
    return f"{number:.2g}" if number is not None else "n/a"


def _table(title: str, rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td class='num'>{html.escape(_cell(v))}</td>" for v in r.values()) + "</tr>"
                   for r in rows)
    return f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    return _num(value) if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool) else str(value)
