"""The models pages: every version with its metric and lift, the alias history, lineage, one model
(metrics, slices, feature importances, its card's facts), two models side by side."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from markupsafe import Markup

from everloop import registry
from everloop.errors import EverloopError, NotFoundError
from everloop.store import Store
from everloop.ui._web import BadParameter, chart, error_page, render, store, url, whole

router = APIRouter()

_A, _B = "#1f77b4", "#ff7f0e"  # the two models of a comparison, in every chart of it


def version_param(text: str | None, name: str, *, required: bool = True,
                  path: bool = False) -> int | None:
    """A model or dataset version given as text ("3", or "v3"): the number; None when absent and
    not `required`. `name`: the query parameter ("a"), or with `path`, what the path names ("model
    version"). Raises BadParameter (422) for anything but a positive whole number."""
    if text is None or text == "":
        if required:
            raise BadParameter(422, f"{name}: missing; expected a version number, e.g. ?{name}=1")
        return None
    digits = text[1:] if text[:1] in ("v", "V") else text
    try:
        return whole(digits, name)
    except ValueError:
        given = f"{name} {text!r}" if path else f"{name}={text!r}"
        raise BadParameter(422, f"{given}: expected a version number (1, 2, ...)") from None


def _error(request: Request, status: int, message: str) -> HTMLResponse:
    return error_page(request, status, message, "models", ("/models", "All model versions"))


@router.get("/models", response_class=HTMLResponse)
def models(request: Request, before: str | None = None) -> HTMLResponse:
    try:
        older_than = version_param(before, "before", required=False)
    except BadParameter as bad:
        return _error(request, bad.status, str(bad))
    s = store(request)
    page = registry.model_page(s, before=older_than)
    production = registry.alias_version(s, registry.PRODUCTION)
    newest = [m["version"] for m in page.models]
    # the compare form starts at production against the newest version, or at the two newest
    if production is not None and newest and production != newest[0]:
        compare_a = production
    else:
        compare_a = newest[1] if len(newest) > 1 else (newest[0] if newest else None)
    return render(request, "models.html", page=page, before=older_than, production=production,
                  moves=registry.latest_alias_moves(s), compare_a=compare_a,
                  lineage=registry.lineage_overview(s, page.models),
                  metric_chart=_metric_chart(page.models, url(request, "/models/{customdata}")) if page.models else None)


@router.get("/models/compare", response_class=HTMLResponse)
def compare(request: Request, a: str | None = None, b: str | None = None) -> HTMLResponse:
    try:
        va, vb = version_param(a, "a"), version_param(b, "b")
        comparison = registry.compare_models(store(request), va, vb)
    except BadParameter as bad:
        return _error(request, bad.status, str(bad))
    except NotFoundError as exc:
        return _error(request, 404, str(exc))
    return render(request, "models_compare.html", c=comparison, va=va, vb=vb,
                  importances_chart=_importances_chart(comparison["importances"], va, vb),
                  slices_chart=_slices_chart(comparison, va, vb))


@router.get("/models/{version}", response_class=HTMLResponse)
def model(request: Request, version: str) -> HTMLResponse:
    try:
        number = version_param(version, "model version", path=True)
        s = store(request)
        row = registry.model_summary(s, number)
        lineage = registry.model_lineage_view(s, number)
    except BadParameter as bad:
        return _error(request, bad.status, str(bad))
    except NotFoundError as exc:
        return _error(request, 404, str(exc))
    importances, why_none = _importances(s, number, row["estimator"])
    return render(request, "models_detail.html", m=row, lineage=lineage,
                  card=registry.model_card(s, number), importances=importances, why_none=why_none,
                  production=registry.alias_version(s, registry.PRODUCTION),
                  importances_chart=_importance_bars(importances, number) if importances else None)


def _importances(s: Store, version: int,
                 estimator: str) -> tuple[list[tuple[str, float]] | None, str | None]:
    """The model's feature importances, or None and why there are none to show."""
    try:
        found = registry.feature_importances(s, version)
    except EverloopError as exc:  # an artifact missing or altered: say so, show the rest
        return None, f"the model's artifact could not be read to find them: {exc}"
    if found is None:
        short = estimator.rsplit(".", 1)[-1]
        return None, (f"{short} records no feature importances (only estimators with "
                      "feature_importances_, such as random forests, do)")
    return found, None


def _metric_chart(models: list[dict[str, Any]], click: str) -> Markup:
    """Each version's metric and its trivial baseline's, by version."""
    ordered = sorted(models, key=lambda m: m["version"])
    metrics = sorted({m["metric"] for m in ordered})
    fig = go.Figure()
    for metric in metrics:
        rows = [m for m in ordered if m["metric"] == metric]
        versions = [m["version"] for m in rows]
        fig.add_trace(go.Scatter(x=versions, y=[m["value"] for m in rows], mode="lines+markers",
                                 name=metric, customdata=versions,
                                 hovertemplate=f"model v%{{x}}: {metric} %{{y:.4f}}"
                                               "<extra></extra>"))
        fig.add_trace(go.Scatter(x=versions, y=[m["baseline"] for m in rows], mode="lines",
                                 name=f"trivial baseline ({metric})", hoverinfo="skip",
                                 line={"dash": "dot", "color": "#888"}))
    ticks = [m["version"] for m in ordered]
    fig.update_layout(height=300, margin={"l": 50, "r": 20, "t": 30, "b": 40},
                      xaxis_title="model version", yaxis_title=" / ".join(metrics),
                      xaxis={"tickmode": "array", "tickvals": ticks} if len(ticks) <= 30 else {},
                      legend={"orientation": "h", "y": 1.15})
    return chart(fig, id="models-metric", click=click)  # a point opens its version


def _importance_bars(importances: list[tuple[str, float]], version: int) -> Markup:
    names = [n for n, _ in importances][::-1]  # plotly draws the first bar at the bottom
    values = [v for _, v in importances][::-1]
    fig = go.Figure(go.Bar(x=values, y=names, orientation="h", name=f"v{version}", marker_color=_A))
    fig.update_layout(height=max(240, 22 * len(names) + 80),
                      margin={"l": 160, "r": 20, "t": 20, "b": 40},
                      xaxis_title="importance (mean decrease in impurity)")
    return chart(fig, id="importances")


def _importances_chart(importances: dict[str, Any], va: int, vb: int) -> Markup | None:
    """Grouped bars of both models' importances, the most important feature on top; None when
    neither model has any."""
    a = importances["a"] if isinstance(importances["a"], list) else []
    b = importances["b"] if isinstance(importances["b"], list) else []
    if not a and not b:
        return None
    da, db = dict(a), dict(b)
    names = sorted(set(da) | set(db), key=lambda n: max(da.get(n, 0.0), db.get(n, 0.0)))
    fig = go.Figure()
    for label, values, color in ((f"v{va}", da, _A), (f"v{vb}", db, _B)):
        if values:
            fig.add_trace(go.Bar(y=names, x=[values.get(n) for n in names], orientation="h",
                                 name=label, marker_color=color))
    fig.update_layout(barmode="group", height=max(260, 30 * len(names) + 80),
                      margin={"l": 160, "r": 20, "t": 30, "b": 40}, xaxis_title="importance",
                      legend={"orientation": "h", "y": 1.08})
    return chart(fig, id="compare-importances")


def _slices_chart(comparison: dict[str, Any], va: int, vb: int) -> Markup | None:
    rows = comparison["slices"]
    if not rows:
        return None
    names = [r["slice"] for r in rows]
    fig = go.Figure([go.Bar(x=names, y=[r["a"] for r in rows], name=f"v{va}", marker_color=_A),
                     go.Bar(x=names, y=[r["b"] for r in rows], name=f"v{vb}", marker_color=_B)])
    fig.update_layout(barmode="group", height=300, margin={"l": 50, "r": 20, "t": 30, "b": 60},
                      yaxis_title=comparison["slice_metric"],
                      legend={"orientation": "h", "y": 1.12})
    return chart(fig, id="compare-slices")
