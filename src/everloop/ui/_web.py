"""What every page shares: the templates, the per-request context, charts.

A page is a function of an `APIRouter` in its own module (`_overview.py`, `_models.py`, `_data.py`,
`_monitoring.py`, `_loop.py`) that reads the store through everloop's Python API and returns
`render(request, "<page>.html", **values)`; its template extends `base.html`. Store reads run in
FastAPI's thread pool (page functions are plain `def`), never on the event loop."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from everloop.spec import ProjectSpec
from everloop.store import Store

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescape on for .html


def store(request: Request) -> Store:
    return request.app.state.store


def spec(request: Request) -> ProjectSpec:
    return request.app.state.spec


def render(request: Request, name: str, status_code: int = 200, **values: Any) -> HTMLResponse:
    """The page `name` with `values`, plus what base.html needs: the project, the URL prefix (`root`),
    the nav section (`section`: the template name up to its first "_", e.g. "models_compare" ->
    "models"), whether the viewer holds the admin token (`admin`) and its CSRF token (`csrf`, for
    forms: every POST form carries `<input type="hidden" name="csrf" value="{{ csrf }}">`)."""
    from everloop.ui._auth import csrf_token, is_admin

    admin = is_admin(request)
    page = name.removesuffix(".html")
    context = {"project": spec(request).name, "admin": admin, "csrf": csrf_token(request) if admin else "",
               "admin_enabled": request.app.state.admin_token is not None, "page": page,
               "section": page.split("_")[0], "root": request.scope.get("root_path", "").rstrip("/"), **values,
               "page_name": page}  # base.html's default title: a page's own `page` value cannot replace it
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def error_page(request: Request, status: int, message: str, section: str, back: tuple[str, str]) -> HTMLResponse:
    """A page saying why a request cannot be shown (`status`: 404, 422), in nav `section`, linking
    `back` = (path under the prefix, link text)."""
    return render(request, "error.html", status_code=status, status=status, message=message, section=section,
                  back=back)


def url(request: Request, path: str) -> str:
    """An absolute path under the dashboard's prefix ("" for `everloop ui`, "/ui" under `serve --ui`)."""
    return request.scope.get("root_path", "").rstrip("/") + path


def chart(figure: go.Figure, *, id: str, height: int | None = None, click: str | None = None) -> Markup:
    """A plotly figure as a <div> drawn by static/ui.js (plotly.min.js served from the package).
    `click`: a URL template opened when a point is clicked, with {x}, {y} and {customdata} replaced by the
    point's (URL-encoded). The figure's JSON is HTML-escaped in the attribute, so text from the data
    cannot break out of it."""
    if height:
        figure.update_layout(height=height)
    payload = figure.to_json()
    if click:
        return Markup('<div class="chart" id="{}" data-figure="{}" data-click="{}"></div>').format(id, payload, click)
    return Markup('<div class="chart" id="{}" data-figure="{}"></div>').format(id, payload)


class BadParameter(Exception):
    """A query or path parameter a page cannot use: answered with `status` and a page naming it (`message`)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


MAX_ID = 2**31 - 1  # ids and versions are 32-bit integers on PostgreSQL: larger ones exist nowhere


def whole(text: str, name: str, low: int = 1, high: int = MAX_ID, sep: str = "=") -> int:
    """`text` as a whole number in [low, high]: ASCII digits only (int() would take "٣", " 1" or "1_0").
    Raises ValueError naming the parameter (`name`, e.g. "?before"; `sep` " " for a path's part, e.g.
    "window id") and what was expected."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{name}{sep}{text!r}: expected a whole number")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{name}{sep}{value}: expected {low} to {high}")
    return value


def when(seconds: float | None) -> str:
    """A store timestamp (seconds since the epoch) as UTC text, or "-"."""
    if seconds is None or not math.isfinite(float(seconds)):
        return "-"
    return datetime.fromtimestamp(float(seconds), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(seconds: float | None, now: float) -> str:
    """How long ago, in the largest unit that fits ("3 min", "2.5 h", "4 d")."""
    if seconds is None:
        return "-"
    age = max(0.0, now - float(seconds))
    if age < 120:
        return f"{age:.0f} s"
    if age < 7200:
        return f"{age / 60:.0f} min"
    if age < 172800:
        return f"{age / 3600:.1f} h"
    return f"{age / 86400:.0f} d"


def num(value: Any, digits: int = 4) -> str:
    """A number for a table cell: rounded, "-" for None/NaN."""
    if value is None:
        return "-"
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(x):
        return "-"
    return f"{x:.{digits}f}" if not x.is_integer() or digits == 0 else f"{int(x)}"


def pretty(value: Any) -> str:
    """Evidence (JSON-able) as indented text for a <pre>."""
    return json.dumps(value, indent=2, sort_keys=True, default=str)


templates.env.filters.update(when=when, num=num, pretty=pretty)
