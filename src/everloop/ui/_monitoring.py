"""The Monitoring page: a feature x window drift heatmap whose cells open that feature's reference-vs-window
distributions, the labelled and estimated (CBPE) metric against the decay threshold, the predictions'
distribution, latency and errors over windows, the service's requests per minute, and a table of the
windows. Reads the latest N windows only (`?windows=`, paged back with `?before=`), without their stored
distributions; one window's in full on its own page."""

from __future__ import annotations

import time
from typing import Any

import plotly.graph_objects as go
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from everloop.monitor import (MAX_WINDOWS, drift_columns, feature_distribution, feature_heatmap, over_time, prediction_over_time,
                              recent_windows, service_per_minute, window_result)
from everloop.ui._web import MAX_ID, BadParameter, chart, render, spec, store, url, whole

router = APIRouter()

DEFAULT_WINDOWS = 50
MAX_FEATURES = 40  # heatmap rows: beyond that, the features that drifted first, then the largest effects
SERVICE_MINUTES = 180  # the requests-per-minute chart covers at most the last 3 hours of the windows shown (a
# day was ~170,000 stats rows summed on every view: 100-400 ms on the big store)
TESTS = {"ks": "Kolmogorov-Smirnov (two-sample, on the binned distributions)", "chi2": "chi-square (category counts)"}
EFFECTS = {"ks": "KS statistic (largest CDF gap)", "chi2": "total variation distance"}


def _int(request: Request, name: str, low: int, high: int | None = None, default: int | None = None) -> int | None:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    try:
        return whole(text, f"?{name}", low, MAX_ID if high is None else high)
    except ValueError as exc:
        raise BadParameter(422, str(exc)) from None


def _problem(request: Request, problem: BadParameter) -> HTMLResponse:
    return render(request, "monitoring_error.html", status_code=problem.status, message=problem.message)


@router.get("/monitoring", response_class=HTMLResponse)
def monitoring(request: Request) -> HTMLResponse:
    try:
        limit = _int(request, "windows", 1, MAX_WINDOWS, DEFAULT_WINDOWS)
        before = _int(request, "before", 1, MAX_ID)
        version = _int(request, "version", 1, MAX_ID)
    except BadParameter as problem:
        return _problem(request, problem)
    page = recent_windows(store(request), limit, before=before, model_version=version)
    runs = page.runs
    if not runs and version is not None:
        return _problem(request, BadParameter(404, f"?version={version}: model v{version} has no monitoring windows"
                                              + (f" before window id {before}" if before else "")))
    if not runs and before is not None:
        return _problem(request, BadParameter(404, f"?before={before}: no monitoring window has an id below "
                                              f"{before}"))
    values: dict[str, Any] = {"runs": runs, "paging": page, "limit": limit, "before": before, "version": version,
                              "max_windows": MAX_WINDOWS, "charts": {}}
    if runs:
        values.update(_charts(request, runs))
        values["rows"] = [_row(run) for run in reversed(runs)]  # newest first
        latest = runs[-1]
        values["latest"] = latest
        values["latest_drifted"] = [c for c in drift_columns(latest) if c.get("drifted")]
    return render(request, "monitoring.html", **values)


def _charts(request: Request, runs: list[dict[str, Any]]) -> dict[str, Any]:
    project = spec(request)
    versions = len({r.get("model_version") for r in runs}) > 1
    charts: dict[str, Any] = {}
    features = _heatmap_features(runs)
    shown = len({str(c.get("column")) for r in runs for c in drift_columns(r)})
    if features:
        # a click opens the cell's window (its run id is the cell's customdata) at its feature (y)
        charts["heatmap"] = chart(feature_heatmap(runs, run_ids=[r["run_id"] for r in runs], features=features,
                                                  versions=versions), id="drift-heatmap",
                                  click=url(request, "/monitoring/window/{customdata}?feature={y}"))
    charts["performance"] = chart(over_time(runs, project, ("performance",), versions=versions),
                                  id="performance-over-time")
    predictions = prediction_over_time(runs, versions=versions)
    charts["prediction_distribution"] = (chart(predictions, id="prediction-distribution") if predictions is not None
                                         else None)
    charts["prediction"] = chart(over_time(runs, project, ("prediction",), versions=versions),
                                 id="prediction-drift-over-time")
    charts["health"] = chart(over_time(runs, project, ("latency", "errors"), versions=versions),
                             id="health-over-time")
    start, end = _span(runs)
    minutes = service_per_minute(store(request), start, end, max_minutes=SERVICE_MINUTES)
    charts["service"] = chart(_service_figure(minutes, start, end), id="service-per-minute") if minutes else None
    return {"charts": charts, "features_shown": len(features), "features_total": shown,
            "service_minutes": len(minutes), "service_span": (start, end)}


def _effect(column: dict[str, Any]) -> float:
    effect = column.get("effect")
    return float(effect) if isinstance(effect, (int, float)) and effect == effect else 0.0


def _heatmap_features(runs: list[dict[str, Any]]) -> list[str]:
    """Every feature up to MAX_FEATURES; beyond that the ones that drifted in a window shown, then those
    with the largest effect, in the latest window's order."""
    order = list(dict.fromkeys(str(c.get("column")) for run in reversed(runs) for c in drift_columns(run)))
    if len(order) <= MAX_FEATURES:
        return order
    score: dict[str, tuple[bool, float]] = {}
    for run in runs:
        for c in drift_columns(run):
            name = str(c.get("column"))
            drifted, best = score.get(name, (False, 0.0))
            score[name] = (drifted or bool(c.get("drifted")), max(best, _effect(c)))
    keep = set(sorted(order, key=lambda n: (not score[n][0], -score[n][1]))[:MAX_FEATURES])
    return [n for n in order if n in keep]


def _span(runs: list[dict[str, Any]]) -> tuple[float, float]:
    """The time the windows shown cover: their first and last prediction (when they were judged, for
    windows without predictions)."""
    starts, ends = [], []
    for run in runs:
        window = run.get("window") if isinstance(run.get("window"), dict) else {}
        first, last = window.get("from"), window.get("to")
        starts.append(float(first) if isinstance(first, (int, float)) else float(run["recorded_at"]))
        ends.append(float(last) if isinstance(last, (int, float)) else float(run["recorded_at"]))
    return min(starts), max(max(ends), min(starts))


def _service_figure(minutes: list[dict[str, Any]], start: float, end: float) -> go.Figure:
    """Requests, server errors and refused predictions per minute (bars a minute wide on a time axis),
    and the server error rate (%, right axis)."""
    x = [time.strftime("%Y-%m-%d %H:%M:30", time.gmtime(m["minute"])) for m in minutes]  # bars centred
    fig = go.Figure()
    for key, name, colour in (("requests", "requests", "#7f8c9a"), ("server_errors", "server errors (5xx)", "#c62828"),
                              ("refused_predictions", "refused predictions (4xx)", "#9467bd")):
        fig.add_trace(go.Bar(x=x, y=[m[key] for m in minutes], name=name, marker_color=colour, width=50_000))
    rates = [None if m["error_rate"] is None else 100 * m["error_rate"] for m in minutes]
    fig.add_trace(go.Scatter(x=x, y=rates, name="server error rate (%)", yaxis="y2", mode="lines+markers",
                             line={"color": "#c62828", "dash": "dot"}))
    top = max([r for r in rates if r is not None] + [1.0])
    first = max(start, minutes[-1]["minute"] - 60 * SERVICE_MINUTES)  # the span drawn: the windows' (its last day)
    span = [time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) for t in (first // 60 * 60 - 60, end // 60 * 60 + 120)]
    fig.update_layout(height=320, barmode="overlay", xaxis={"title": "minute (UTC)", "type": "date", "range": span},
                      yaxis={"title": "per minute", "rangemode": "tozero"},
                      yaxis2={"title": "server error rate (%)", "overlaying": "y", "side": "right",
                              "range": [0, 1.1 * top], "showgrid": False, "tickformat": ".3~g"},
                      legend={"orientation": "h", "y": 1.02, "yanchor": "bottom"})
    return fig


def _row(run: dict[str, Any]) -> dict[str, Any]:
    """One line of the windows table."""
    window = run.get("window") if isinstance(run.get("window"), dict) else {}
    drift = run.get("drift") if isinstance(run.get("drift"), dict) else {}
    perf = run.get("performance") if isinstance(run.get("performance"), dict) else {}
    counted = [c for c in drift_columns(run) if not c.get("ignored")]
    return {"id": run["run_id"], "version": run.get("model_version"), "index": window.get("index"),
            "span": _span_text(window.get("from"), window.get("to")), "rows": window.get("rows"),
            "complete": window.get("complete"), "status": run.get("status") or "-",
            "drifted": [str(c.get("column")) for c in counted if c.get("drifted")], "counted": len(counted),
            "drifted_share": drift.get("drifted_share"), "metric": perf.get("metric"), "value": perf.get("value"),
            "decayed": perf.get("decayed"), "estimated": perf.get("estimated"), "threshold": perf.get("threshold"),
            "alerts": [str(a) for a in run.get("alerts") or []]}


def _span_text(start: Any, end: Any) -> str:
    """"2026-11-30 10:13:54 to 10:13:55" (the end's date too when it differs), UTC; "-" without times."""
    if not isinstance(start, (int, float)) or not isinstance(end, (int, float)):
        return "-"
    first, last = time.gmtime(start), time.gmtime(end)
    return (time.strftime("%Y-%m-%d %H:%M:%S", first) + " to "
            + time.strftime("%H:%M:%S" if first[:3] == last[:3] else "%Y-%m-%d %H:%M:%S", last))


@router.get("/monitoring/window/{run_id}", response_class=HTMLResponse)
def window(request: Request, run_id: str) -> HTMLResponse:
    try:
        number = whole(run_id, "window id", 0, 10**30, sep=" ")  # past the ids: not found (404)
    except ValueError as exc:
        return _problem(request, BadParameter(422, f"{exc} (the id in the Monitoring page's windows table)"))
    run = window_result(store(request), number) if 1 <= number <= MAX_ID else None
    if run is None:
        return _problem(request, BadParameter(404, f"window id {number}: no monitoring window has that id"))
    columns = drift_columns(run)
    feature = request.query_params.get("feature")
    column = None
    figure = None
    if feature is not None:
        column = next((c for c in columns if str(c.get("column")) == feature), None)
        if column is None:
            known = ", ".join(str(c.get("column")) for c in columns) or "none (its drift was not measured)"
            return _problem(request, BadParameter(404, f"feature {feature!r} is not in window id {number}; its "
                                                       f"features: {known}"))
        fig = feature_distribution(run, feature)
        figure = chart(fig, id="feature-distribution") if fig is not None else None
    stored = run.get("distributions") if isinstance(run.get("distributions"), dict) else {}
    window_info = run.get("window") if isinstance(run.get("window"), dict) else {}
    ranked = sorted(columns, key=lambda c: (not c.get("drifted"), -_effect(c)))
    return render(request, "monitoring_window.html", run=run, window=window_info, feature=feature, column=column,
                  figure=figure, columns=ranked, stored=sorted(stored), tests=TESTS, effects=EFFECTS,
                  distribution=stored.get(feature) if feature is not None else None)
