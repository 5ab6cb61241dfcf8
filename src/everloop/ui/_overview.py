"""The overview page: the production model, the service's health over the last minutes, the last loop
decisions, a rollout in progress, the latest monitoring window's alerts; for a signed-in admin, the
promote, rollback and rollout forms (handled in `_actions.py`)."""

from __future__ import annotations

import math
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from everloop import loop, monitor, registry
from everloop.train import improvement
from everloop.ui._loop import decision_view, flatten, whole_number
from everloop.ui._web import ago, render, spec, store

router = APIRouter()

HEALTH_MINUTES = 5  # the span of the health numbers, unless ?minutes= says otherwise
MAX_MINUTES = 1440
RECENT_DECISIONS = 5

# After a change (`_actions.py` redirects here with ?done=<what>): the message, filled from the store's
# state now (never from the URL, so a link cannot make the page say anything else).
DONE = {
    "promoted": "Promoted: production is model v{production}.",
    "unchanged": "Model v{production} was already in production; nothing changed.",
    "rolled_back": "Rolled back: production is model v{production}.",
    "rollout_started": "Rollout {rollout.id} started: model v{rollout.candidate} in {rollout.mode} beside "
                       "production v{rollout.production}.",
    "rollout_step": "Rollout {rollout.id}: the canary now answers {rollout.share:g}% of the traffic.",
    "rollout_promoted": "Rollout {rollout.id} promoted: production is model v{production}.",
    "rollout_rolled_back": "Rollout {rollout.id} rolled back: production stays on model v{production}.",
    "rollout_aborted": "Rollout {rollout.id} aborted: production stays on model v{production}.",
}


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, minutes: str | None = None, done: str | None = None) -> HTMLResponse:
    try:
        span = whole_number("minutes", minutes) or HEALTH_MINUTES
        if span > MAX_MINUTES:
            raise ValueError(f"minutes={minutes!r}: expected at most {MAX_MINUTES} (a day)")
    except ValueError as exc:
        return render(request, "overview.html", status_code=422, error=str(exc),
                      **overview_values(request, HEALTH_MINUTES))
    return render(request, "overview.html", **overview_values(request, span, done))


def overview_values(request: Request, minutes: int = HEALTH_MINUTES, done: str | None = None) -> dict[str, Any]:
    """Everything overview.html shows, read from the store: a handful of bounded, indexed queries (no
    prediction payload, one monitoring window's result)."""
    s = store(request)
    now = time.time()
    state = loop.setup_state(s)
    window = monitor.latest_window(s)
    production = None
    if state["production"] is not None:
        production = production_view(registry.get_model(s, state["production"]), window, now)
    rollout = registry.active_rollout(s)
    decisions, _ = loop.decisions(s, limit=RECENT_DECISIONS)
    message = None
    if done in DONE:
        latest = registry.latest_rollout(s) if done.startswith("rollout") else None
        if latest is not None or not done.startswith("rollout"):
            message = DONE[done].format(production=state["production"], rollout=latest)
    return {"state": state, "production": production, "minutes": minutes,
            "health": monitor.recent_service(s, minutes * 60.0, now=now), "lost": monitor.lost_predictions(s),
            "window": window_view(window, now), "decisions": [decision_view(d) for d in decisions],
            "rollout": rollout_view(rollout, now), "message": message, "now": now,
            "first_step": spec(request).rollout.steps[0]}


def production_view(model: registry.ModelVersion, window: dict[str, Any] | None, now: float) -> dict[str, Any]:
    """The production model's numbers: its training metric and baseline (lift: how much it beats the
    baseline, in the metric's units), and the latest window's labelled and estimated values of the
    metric when that window judged this version."""
    m = model.manifest
    baseline = m["baseline"][model.metric]
    live = None
    if window is not None and window["model_version"] == model.version:
        perf = (window["result"] or {}).get("performance") or {}
        value, estimated = perf.get("value"), perf.get("estimated")
        live = {"value": value, "labelled_rows": perf.get("labelled_rows"), "estimated": estimated,
                "threshold": perf.get("threshold"), "decayed": perf.get("decayed"),
                "estimated_decayed": perf.get("estimated_decayed"),
                "change": _change(model.metric, value, model.value),
                "estimated_change": _change(model.metric, estimated, model.value),
                "window": window["window_key"]}
    return {"version": model.version, "created_at": model.created_at, "age": ago(model.created_at, now),
            "estimator": m.get("estimator", ""), "dataset_version": model.dataset_version,
            "metric": model.metric, "value": model.value, "baseline": baseline,
            "lift": improvement(model.metric, model.value, baseline), "live": live,
            "reason": m.get("reason", "")}


def window_view(window: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
    if window is None:
        return None
    result = window["result"] or {}
    health = result.get("health") or {}
    return {"id": window["id"], "key": window["window_key"], "model_version": window["model_version"],
            "judged": window["created_at"], "judged_ago": ago(window["created_at"], now),
            "status": result.get("status", "-"), "alerts": result.get("alerts") or [],
            "not_judged": result.get("not_judged") or {}, "rows": (result.get("window") or {}).get("rows"),
            "latency_p50": health.get("latency_ms_p50"), "latency_p99": health.get("latency_ms_p99"),
            "rows_per_second": health.get("rows_per_second")}


def rollout_view(rollout: registry.Rollout | None, now: float) -> dict[str, Any] | None:
    if rollout is None:
        return None
    return {"id": rollout.id, "mode": rollout.mode, "candidate": rollout.candidate,
            "production": rollout.production, "share": rollout.share, "sample": rollout.sample,
            "steps": rollout.steps, "started": rollout.created_at, "started_ago": ago(rollout.created_at, now),
            "updated": rollout.updated_at, "actor": rollout.actor, "reason": rollout.reason,
            "evidence": flatten(rollout.evidence)}


def _change(metric: str, value: float | None, training: float) -> float | None:
    """How much better (positive) or worse (negative) `value` is than at training, in metric units."""
    if value is None or not math.isfinite(float(value)):
        return None
    return improvement(metric, float(value), training)

