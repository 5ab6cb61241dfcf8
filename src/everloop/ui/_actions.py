"""The dashboard's state-changing forms: promote (directly, or as a shadow or canary rollout),
rollback, and a rollout's step, promote, rollback and abort. Each does what the CLI command of the same
name does (`everloop promote`, `rollback`, `rollout step|promote|rollback|abort`: the same registry
functions, the gate unless forced), recorded with the actor "dashboard".

Every POST is checked by `_auth.check_change` (the admin token, the form's CSRF token, not cross-site)
and refused with 403 otherwise; the refusal comes before the body is read when it does not depend on
the form. A body over MAX_FORM_BYTES is refused (413), a field that is not what it should be answers
422 naming it, and the registry's refusals are shown on the overview page: the gate or another
process's change (409), an unknown version (404), a value the registry refuses (422); never a 500.
Success redirects (303) to the overview page, which says what changed."""

from __future__ import annotations

import math
from typing import Any, Callable
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from everloop import registry
from everloop.errors import ConflictError, EverloopError, GateError, NotFoundError
from everloop.ui._auth import check_change, csrf_token
from everloop.ui._web import render, spec, store, url

router = APIRouter()

ACTOR = "dashboard"  # the actor of every change made here, in the alias history and the rollouts
MAX_FORM_BYTES = 16 * 1024  # the largest form body read (these forms send well under 1 KB)
MAX_REASON = 500  # characters of a reason kept
MODES = ("direct", "shadow", "canary")
FINISH = {"promote": "promoted", "rollback": "rolled_back", "abort": "aborted"}


class Refused(Exception):
    """A request refused before the registry was asked: its status and the message to show."""

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(message)


@router.post("/actions/promote", response_class=HTMLResponse)
async def promote(request: Request) -> Response:
    """Fields: version; mode "direct" (default: production, through the gate), "shadow" or "canary";
    share (canary only, percent; default: the first of rollout.steps); force ("1": past the gate,
    recorded as forced); reason."""
    async def act(form: dict[str, str]) -> Callable[[], str]:
        version = _whole(form, "version")
        mode = form.get("mode") or "direct"
        if mode not in MODES:
            raise Refused(422, f"mode {mode!r}: expected one of {', '.join(MODES)}")
        share = _percent(form, "share", required=False)
        if share is not None and mode != "canary":
            raise Refused(422, f"share {share:g}: only a canary answers a share of the traffic; leave it empty "
                                f"for {'a shadow' if mode == 'shadow' else 'a direct promotion'}")
        force, reason = form.get("force", "") in ("1", "on", "true", "yes"), _reason(form)
        s, project = store(request), spec(request)

        def run() -> str:
            if mode != "direct":
                registry.start_rollout(s, project, version, mode, share=share, force=force, actor=ACTOR,
                                       reason=reason or f"dashboard: promote --{mode}")
                return "rollout_started"
            decision = registry.promote(s, project, version, reason=reason or "promoted from the dashboard",
                                        force=force, actor=ACTOR)
            return "unchanged" if decision.evidence.get("unchanged") else "promoted"
        return run

    return await _change(request, act)


@router.post("/actions/rollback", response_class=HTMLResponse)
async def rollback(request: Request) -> Response:
    """Fields: reason. Production goes back to the version it served before its latest move."""
    async def act(form: dict[str, str]) -> Callable[[], str]:
        reason, s = _reason(form), store(request)

        def run() -> str:
            registry.rollback(s, reason=reason or "rolled back from the dashboard", actor=ACTOR)
            return "rolled_back"
        return run

    return await _change(request, act)


@router.post("/actions/rollout/{op}", response_class=HTMLResponse)
async def rollout(request: Request, op: str) -> Response:
    """`op`: step (field share: the canary's new percent of traffic), promote, rollback or abort, of
    the active rollout; fields: reason, and rollout (optional: the id the page showed; refused with 409
    when another rollout is active now)."""
    async def act(form: dict[str, str]) -> Callable[[], str]:
        if op != "step" and op not in FINISH:
            raise Refused(404, f"/actions/rollout/{op}: no such change; expected step, promote, rollback or abort")
        share = _percent(form, "share", required=True) if op == "step" else None
        shown = _whole(form, "rollout", required=False)
        reason, s = _reason(form), store(request)

        def run() -> str:
            active = _active(s, shown)
            if op == "step":
                registry.step_rollout(s, active.id, share, actor=ACTOR,
                                      reason=reason or f"dashboard: rollout step {share:g}")
                return "rollout_step"
            registry.finish_rollout(s, active.id, FINISH[op], actor=ACTOR, reason=reason or f"dashboard: rollout {op}")
            return f"rollout_{FINISH[op]}"
        return run

    return await _change(request, act)


async def _change(request: Request, act: Any) -> Response:
    """Check the request, read its form, let `act(form)` validate it into a function that makes the
    change in a thread (the registry waits on the store) and names what was done; then redirect to the
    overview, or show why nothing was changed."""
    refused = check_change(request, csrf_token(request))  # all but the CSRF token: before reading a body
    try:
        if refused:
            raise Refused(403, refused)
        form = await read_form(request)
        refused = check_change(request, form.get("csrf"))
        if refused:
            raise Refused(403, refused)
        run = await act(form)
        done = await run_in_threadpool(run)
    except Refused as exc:
        return await _page(request, exc.status, exc.message)
    except GateError as exc:
        return await _page(request, 409, str(exc))
    except NotFoundError as exc:
        return await _page(request, 404, str(exc))
    except ConflictError as exc:  # another process moved production or finished the rollout; a rollout is active
        return await _page(request, 409, str(exc))
    except EverloopError as exc:  # a value the registry refuses (a share out of range, a shadow's step)
        return await _page(request, 422, str(exc))
    return RedirectResponse(url(request, f"/?done={done}"), status_code=303)


async def _page(request: Request, status: int, message: str) -> HTMLResponse:
    """The overview page, with `message` on top, answered with `status`."""
    from everloop.ui._overview import overview_values

    values = await run_in_threadpool(overview_values, request)
    return render(request, "overview.html", status_code=status, error=message, **values)


async def read_form(request: Request) -> dict[str, str]:
    """The urlencoded form of a POST, read up to MAX_FORM_BYTES (413 past it), the last value of each
    field; a body that is not a form answers 415."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise Refused(415, f"expected a form (application/x-www-form-urlencoded), got {kind or 'no content type'}")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_FORM_BYTES:
        raise Refused(413, f"the form is {int(length)} bytes; the limit is {MAX_FORM_BYTES}")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise Refused(413, f"the form is over the limit of {MAX_FORM_BYTES} bytes")
    except ClientDisconnect:
        raise Refused(400, "the client left before sending the whole form") from None
    try:
        fields = parse_qsl(body.decode("latin-1"), keep_blank_values=True, encoding="utf-8", errors="replace",
                           max_num_fields=50)
    except ValueError as exc:  # more fields than any of these forms has
        raise Refused(413, f"the form has too many fields ({exc})") from None
    return dict(fields)


def _whole(form: dict[str, str], name: str, required: bool = True) -> Any:
    """The field `name` as a whole number >= 1 (None when empty and not `required`); else 422 naming it."""
    text = form.get(name, "").strip()
    if not text and not required:
        return None
    if not text.isdigit() or int(text) < 1:
        raise Refused(422, f"{name} {text!r}: expected a whole number of 1 or more" if text
                       else f"{name}: missing; give a whole number of 1 or more")
    return int(text)


def _percent(form: dict[str, str], name: str, required: bool) -> Any:
    """The field `name` as a percent from 0.01 to 100 (None when empty and not `required`); else 422 naming it."""
    text = form.get(name, "").strip()
    if not text:
        if required:
            raise Refused(422, f"{name}: missing; give a percent from 0.01 to 100")
        return None
    try:
        value = float(text)
    except ValueError:
        raise Refused(422, f"{name} {text!r}: expected a percent from 0.01 to 100") from None
    if not math.isfinite(value) or not 0.01 <= value <= 100:
        raise Refused(422, f"{name} {text!r}: expected a percent from 0.01 to 100")
    return value


def _reason(form: dict[str, str]) -> str:
    return " ".join(form.get("reason", "").split())[:MAX_REASON]  # one line, as the CLI's option gives


def _active(s: Any, shown: int | None) -> registry.Rollout:
    """The active rollout; NotFoundError when none is (as `everloop rollout ...` says), ConflictError
    when it is not the one the page showed (`shown`)."""
    active = registry.active_rollout(s)
    if active is None:
        latest = registry.latest_rollout(s)
        last = f" (the latest, rollout {latest.id}, was {latest.status.replace('_', ' ')})" if latest else ""
        raise NotFoundError(f"no rollout is active{last}; nothing was changed")
    if shown is not None and shown != active.id:
        raise ConflictError(f"rollout {shown} is no longer active (rollout {active.id} is); nothing was changed: "
                            "reload the page and look again")
    return active
