"""Service health over a window: error rates that count the right requests, and the alerts they raise.

Every service worker counts its answered requests and writes them to the store's `service_stats` table
every couple of seconds (everloop/serve/_log.py): all requests, server errors (5xx, any path), prediction
requests (POSTs to /predict, /invocations and /v2/models/{name}/infer) and those refused as bad input
(their 4xx), and the other requests' 4xx apart. Only server errors make the service unhealthy: a 4xx is
the caller's fault, and a bad /feedback body or a probe of an unknown path says nothing about the model.
Refused predictions are judged on their own: many of them mean callers send what the model cannot take.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from everloop.spec import ProjectSpec
from everloop.store import Store

# A stats row is written up to the writer's stats interval (2 s) after the requests it counts, later when
# the store is slow: rows written this long after the window's end still count towards it.
STATS_LAG_SECONDS = 10.0

_COUNTS = ("requests", "client_errors", "server_errors", "prediction_requests", "refused_predictions",
           "other_client_errors")


def service_errors(store: Store, start: float | None, end: float | None) -> dict[str, Any]:
    """The request counts the service's workers wrote over a time span, summed over workers, and the rates.

    `start`, `end`: epoch seconds (the window's first and last prediction); None leaves that side open.
    Rows written up to STATS_LAG_SECONDS after `end` count, since a worker writes its counts a little
    after answering (the span is only as precise as the workers' stats interval, about 2 s).

    Returns {"requests", "prediction_requests", "refused_predictions", "server_errors",
    "other_client_errors", "client_errors" (every 4xx, as before), "error_rate" (server errors / all
    requests), "refused_rate" (refused predictions / prediction requests)}: counts are ints, rates are
    floats in [0, 1], or None when their denominator is 0 (no requests: not judged). Raises SQLAlchemy's
    errors when the store cannot be read. Counting follows the "errors" golden signal of Google's SRE book
    (ch. 6, "Monitoring Distributed Systems"): the rate of requests that fail, not of requests refused.
    """
    t = store.tables.service_stats
    query = sa.select(*(sa.func.coalesce(sa.func.sum(t.c[name]), 0) for name in _COUNTS))
    if start is not None:
        query = query.where(t.c.created_at >= start)
    if end is not None:
        query = query.where(t.c.created_at <= end + STATS_LAG_SECONDS)
    with store.engine.connect() as conn:
        row = conn.execute(query).one()
    counts = {name: int(value) for name, value in zip(_COUNTS, row)}
    requests, predictions = counts["requests"], counts["prediction_requests"]
    return counts | {
        "error_rate": counts["server_errors"] / requests if requests else None,
        "refused_rate": counts["refused_predictions"] / predictions if predictions else None,
    }


def health_alerts(health: dict[str, Any], spec: ProjectSpec) -> list[str]:
    """Alert texts (each starting with "health: ") for the thresholds of `monitoring.health` a window's
    health crosses: server error rate, refused-prediction rate and latency p99.

    `health`: the monitor's health dict (keys read with .get: requests, server_errors, error_rate,
    prediction_requests, refused_predictions, refused_rate, rows, latency_ms_p99 in milliseconds).
    Each signal is judged only when what it is computed over reaches `monitoring.health.min_requests`
    (all requests for the error rate, prediction requests for the refused rate, logged predictions for
    latency); below that it is not judged and says nothing. A rate alerts when strictly above its
    maximum. Returns an empty list when healthy or not judged; never raises on missing keys.
    """
    limits = spec.monitoring.health
    alerts = []
    requests = health.get("requests") or 0
    rate = health.get("error_rate")
    if requests >= limits.min_requests and rate is not None and rate > limits.max_error_rate:
        shown, limit = _percents(rate, limits.max_error_rate)
        alerts.append(f"health: error rate {shown} > monitoring.health.max_error_rate {limit} "
                      f"({health.get('server_errors', 0)} of {requests} requests failed with 5xx)")
    predictions = health.get("prediction_requests") or 0
    refused = health.get("refused_rate")
    if predictions >= limits.min_requests and refused is not None and refused > limits.max_refused_rate:
        shown, limit = _percents(refused, limits.max_refused_rate)
        alerts.append(f"health: {shown} of predictions refused as bad input > "
                      f"monitoring.health.max_refused_rate {limit} ({health.get('refused_predictions', 0)} of "
                      f"{predictions} prediction requests answered 4xx)")
    p99, rows = health.get("latency_ms_p99"), health.get("rows") or 0
    if (limits.max_latency_ms_p99 is not None and p99 is not None and rows >= limits.min_requests
            and p99 > limits.max_latency_ms_p99):
        alerts.append(f"health: latency p99 {p99:.4g} ms > monitoring.health.max_latency_ms_p99 "
                      f"{limits.max_latency_ms_p99:.4g} ms ({rows} predictions)")
    return alerts


def _percents(value: float, limit: float) -> tuple[str, str]:
    """Both shares as percentages, with enough digits that a value above its limit never reads as equal."""
    for digits in range(3, 8):
        shown, bound = f"{value * 100:.{digits}g}%", f"{limit * 100:.{digits}g}%"
        if shown != bound:
            break
    return shown, bound
