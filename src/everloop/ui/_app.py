"""The dashboard's app factory: pages, static files, sign-in."""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any

import plotly
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, Response

from everloop.spec import ProjectSpec, load_spec
from everloop.store import Store
from everloop.ui import _actions, _data, _loop, _models, _monitoring, _overview
from everloop.ui._auth import COOKIE, check_change, csrf_token, is_admin, session_value
from everloop.ui._web import HERE, render, url

ADMIN_TOKEN_ENV = "EVERLOOP_ADMIN_TOKEN"
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
OPEN_PATHS = ("/login", "/static/")  # reachable without signing in when the pages need the token


def create_ui(project_dir: str | Path = ".", *, spec: ProjectSpec | None = None, store: Store | None = None,
              admin_token: str | None = None, require_login: bool = False) -> FastAPI:
    """The dashboard of a project as an ASGI app (mount it, or run it with uvicorn).

    `admin_token` (default: $EVERLOOP_ADMIN_TOKEN; "" counts as none) enables the promote and rollback
    forms for a browser that signed in with it; without one every change is refused (403).
    `require_login`: every page needs the token too (how `everloop serve --ui` mounts it when a token is
    set). Raises SpecError for a bad project file."""
    project_dir = Path(project_dir)
    app = FastAPI(title="everloop dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.spec = spec or load_spec(project_dir)
    app.state.store = store or Store.for_project(project_dir)
    token = admin_token if admin_token is not None else os.environ.get(ADMIN_TOKEN_ENV)
    app.state.admin_token = token or None
    app.state.require_login = bool(require_login and app.state.admin_token)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        path = request.scope["path"].removeprefix(request.scope.get("root_path", ""))
        if app.state.require_login and not path.startswith(OPEN_PATHS) and not is_admin(request):
            if request.method == "GET":
                return RedirectResponse(url(request, "/login"), status_code=303)
            return PlainTextResponse("the admin token is required", status_code=403)
        response = await call_next(request)
        # the pages are not to be framed by another site (clickjacking a promote button)
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Content-Security-Policy", "frame-ancestors 'none'")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_js() -> FileResponse:
        return FileResponse(PLOTLY_JS, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    @app.get("/static/ui.css", include_in_schema=False)
    def css() -> FileResponse:
        return FileResponse(HERE / "static" / "ui.css", media_type="text/css")

    @app.get("/static/ui.js", include_in_schema=False)
    def js() -> FileResponse:
        return FileResponse(HERE / "static" / "ui.js", media_type="text/javascript")

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request) -> HTMLResponse:
        return render(request, "login.html", message=None)

    @app.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        try:  # read as the action forms are: bounded (413), a form or 415
            form = await _actions.read_form(request)
        except _actions.Refused as exc:
            return PlainTextResponse(exc.message, status_code=exc.status)
        expected = app.state.admin_token
        if expected is None or not hmac.compare_digest(form.get("token", "").encode(), expected.encode()):
            why = ("changes are off: no admin token is set" if expected is None else "that is not the admin token")
            return render(request, "login.html", status_code=403, message=why)
        response = RedirectResponse(url(request, "/"), status_code=303)
        response.set_cookie(COOKIE, session_value(expected), httponly=True, samesite="strict",
                            path=url(request, "/") or "/", secure=request.url.scheme == "https")
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        refused = check_change(request, csrf_token(request))  # all but the form's token, before the body
        if not refused:
            try:
                refused = check_change(request, (await _actions.read_form(request)).get("csrf"))
            except _actions.Refused as exc:
                return PlainTextResponse(exc.message, status_code=exc.status)
        if refused:
            return PlainTextResponse(refused, status_code=403)
        response = RedirectResponse(url(request, "/"), status_code=303)
        response.delete_cookie(COOKIE, path=url(request, "/") or "/")
        return response

    for module in (_overview, _models, _data, _monitoring, _loop, _actions):
        app.include_router(module.router)
    return app
