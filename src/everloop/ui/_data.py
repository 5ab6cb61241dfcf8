"""The data pages: dataset versions with their sizes and sources, the current schema, one version
(its profile, anomalies and quarantined rows, what was built and trained from it), and the diff of
two versions."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from markupsafe import Markup
from plotly.subplots import make_subplots

from everloop import data, registry
from everloop.errors import EverloopError, NotFoundError
from everloop.ui._models import version_param
from everloop.ui._web import BadParameter, chart, error_page, render, spec, store

router = APIRouter()


def _error(request: Request, status: int, message: str) -> HTMLResponse:
    return error_page(request, status, message, "data", ("/data", "All dataset versions"))


@router.get("/data", response_class=HTMLResponse)
def datasets(request: Request, before: str | None = None) -> HTMLResponse:
    try:
        older_than = version_param(before, "before", required=False)
    except BadParameter as bad:
        return _error(request, bad.status, str(bad))
    s = store(request)
    return render(request, "data.html", page=data.dataset_page(s, before=older_than),
                  before=older_than, schema=data.schema_view(s, spec(request)))


@router.get("/data/diff", response_class=HTMLResponse)
def diff(request: Request, a: str | None = None, b: str | None = None) -> HTMLResponse:
    try:
        va, vb = version_param(a, "a"), version_param(b, "b")
        s = store(request)
        da, db = data.get_dataset(s, va), data.get_dataset(s, vb)
    except BadParameter as bad:
        return _error(request, bad.status, str(bad))
    except NotFoundError as exc:
        return _error(request, 404, str(exc))
    rows = data.diff_datasets(da, db)
    return render(request, "data_diff.html", a=da, b=db, rows=rows,
                  shift_chart=_shift_chart(rows, va))


@router.get("/data/{version}", response_class=HTMLResponse)
def dataset(request: Request, version: str) -> HTMLResponse:
    try:
        number = version_param(version, "dataset version", path=True)
        s = store(request)
        found = data.get_dataset(s, number)
        lineage = registry.dataset_lineage_view(s, number)
    except BadParameter as bad:
        return _error(request, bad.status, str(bad))
    except NotFoundError as exc:
        return _error(request, 404, str(exc))
    quarantine, quarantine_error = None, None
    if found.quarantined:
        try:
            quarantine = _quarantine_rows(data.quarantine_head(s, found))
        except EverloopError as exc:  # the artifact is missing or altered: say so, show the rest
            quarantine_error = str(exc)
    return render(request, "data_detail.html", d=found, columns=data.column_summary(found),
                  lineage=lineage, quarantine=quarantine, quarantine_error=quarantine_error,
                  anomalies=data.anomaly_summary(found))


def _quarantine_rows(frame: pd.DataFrame) -> dict[str, Any]:
    """The quarantined rows as the table shows them: the source's columns, then per row its data
    row number, its values (as read, text) and why it was set aside."""
    columns = [c for c in frame.columns if c not in (data.QUARANTINE_ROW, data.QUARANTINE_REASON)]
    rows = [{"row": r.get(data.QUARANTINE_ROW, "-"), "reason": r.get(data.QUARANTINE_REASON, "-"),
             "values": [r[c] for c in columns]} for r in frame.to_dict(orient="records")]
    return {"columns": columns, "rows": rows}


def _shift_chart(rows: list[dict[str, Any]], va: int) -> Markup | None:
    """How far each column moved: numeric columns' mean shift in units of v`va`'s standard
    deviation, categorical columns' total variation distance; None when no column has either."""
    numeric = [r for r in rows if "mean_shift_sd" in r]
    categorical = [r for r in rows if "tvd" in r]
    if not numeric and not categorical:
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"numeric: mean shift (sd of v{va})",
                                                        "categorical: total variation distance"))
    if numeric:
        fig.add_trace(go.Bar(x=[r["mean_shift_sd"] for r in numeric],
                             y=[r["column"] for r in numeric], orientation="h",
                             marker_color="#1f77b4", name="mean shift (sd)"), row=1, col=1)
    if categorical:
        fig.add_trace(go.Bar(x=[r["tvd"] for r in categorical],
                             y=[r["column"] for r in categorical], orientation="h",
                             marker_color="#ff7f0e", name="tvd"), row=1, col=2)
    fig.update_xaxes(range=[0, 1], row=1, col=2)
    bars = max(len(numeric), len(categorical))
    fig.update_layout(showlegend=False, height=max(260, 24 * bars + 100),
                      margin={"l": 150, "r": 20, "t": 40, "b": 40})
    return chart(fig, id="diff-shift")
