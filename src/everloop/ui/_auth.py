"""Who may change things: the admin token (EVERLOOP_ADMIN_TOKEN, or the variable `everloop ui
--admin-token-env` names: never on the command line, where other users can read it).

The browser presents it once on /login and then holds a session cookie: an HMAC of the token, so the
token itself is never stored in the browser, HttpOnly and SameSite=Strict (a cross-site request carries
no cookie). Every POST that changes something also needs the form's CSRF token (an HMAC of the session)
and is refused when the browser says the request came from another site (Origin, Sec-Fetch-Site):
defence in depth behind SameSite. Without an admin token configured, nothing can be changed (403)."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

COOKIE = "everloop_ui"


def _mac(token: str, what: str) -> str:
    return hmac.new(token.encode(), what.encode(), hashlib.sha256).hexdigest()


def session_value(token: str) -> str:
    """The cookie value proving the browser presented `token`."""
    return _mac(token, "session")


def bearer(request: Request) -> bool:
    """The request carries the admin token in its Authorization header (a script, not a browser's cookie)."""
    token = request.app.state.admin_token
    header = request.headers.get("authorization", "")
    return (token is not None and header.lower().startswith("bearer ")
            and hmac.compare_digest(header[7:].strip().encode(), token.encode()))


def is_admin(request: Request) -> bool:
    """The request holds the admin token: as a bearer header, or as the session cookie."""
    token = request.app.state.admin_token
    if token is None:
        return False
    if bearer(request):
        return True
    cookie = request.cookies.get(COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), session_value(token).encode())


def csrf_token(request: Request) -> str:
    token = request.app.state.admin_token
    return _mac(token, "csrf") if token else ""


def cross_site(request: Request) -> bool:
    """The browser says this request was sent by another site's page."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return True
    origin = request.headers.get("origin")
    if origin and origin != "null":
        host = request.headers.get("host", "")
        return origin.split("://", 1)[-1].rstrip("/") != host
    return origin == "null"


def check_change(request: Request, form_csrf: str | None) -> str | None:
    """Why a state-changing POST is refused (a 403's message), or None when it may go ahead."""
    if request.app.state.admin_token is None:
        return "changes are off: start the dashboard with an admin token (EVERLOOP_ADMIN_TOKEN) to enable them"
    if not is_admin(request):
        return "the admin token is required: sign in on the login page"
    if cross_site(request):
        return "refused a cross-site request"
    if bearer(request):  # no browser adds this header by itself: a forged cross-site request cannot carry it
        return None
    if not form_csrf or not hmac.compare_digest(form_csrf.encode(), csrf_token(request).encode()):
        return "the form's CSRF token is missing or wrong: reload the page and submit again"
    return None
