"""Bounded reads of the service's recent health for pages and listings: request counts and rates over
the last minutes, the prediction log's throughput, predictions lost to killed workers, and the latest
judged monitoring window. None of them reads a prediction payload; each is one or two indexed queries.

Latency is not among the counts the service writes to the store: each prediction's latency is in the
prediction log's payloads, and the monitor computes percentiles per window (`latest_window`'s
`result["health"]`: latency_ms_p50, latency_ms_p99). Live latency histograms are on the service's
/metrics (Prometheus)."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from everloop.errors import EverloopError
from everloop.store import Store

MAX_SECONDS = 24 * 3600.0

_COUNTS = ("requests", "client_errors", "server_errors", "prediction_requests", "refused_predictions",
           "other_client_errors")


def recent_service(store: Store, seconds: float = 300.0, *, now: float | None = None) -> dict[str, Any]:
    """What the service did over the last `seconds` (before `now`, epoch seconds; default: the clock).

    Returns {"seconds", "since" (epoch seconds), the request counts summed over every worker
    ("requests", "prediction_requests", "refused_predictions", "server_errors", "client_errors",
    "other_client_errors": ints), "error_rate" (5xx / requests), "refused_rate" (refused / prediction
    requests): floats in [0, 1] or None without requests, "requests_per_second",
    "predictions_per_second" (prediction requests a second), "logged_rows" and "logged_batches"
    (predictions the prediction log stored in the span, service and batch jobs alike),
    "logged_rows_per_second", "last_report" (epoch seconds of the newest service_stats row of the
    span, None when no worker reported)}. Two range sums over indexed times (a day of 2 workers
    reporting every second is ~170,000 stats rows).

    Raises EverloopError for `seconds` outside (0, 86400]."""
    if not 0 < seconds <= MAX_SECONDS:
        raise EverloopError(f"seconds {seconds:g}: expected more than 0 and at most {MAX_SECONDS:g} (a day)")
    now = time.time() if now is None else now
    since = now - seconds
    stats, batches = store.tables.service_stats, store.tables.prediction_batches
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(
            *(sa.func.coalesce(sa.func.sum(stats.c[name]), 0) for name in _COUNTS), sa.func.max(stats.c.created_at),
        ).where(stats.c.created_at >= since, stats.c.created_at <= now)).one()
        logged = conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(batches.c.rows), 0))
                              .where(batches.c.created_at >= since, batches.c.created_at <= now)).one()
    counts = {name: int(value) for name, value in zip(_COUNTS, row[:len(_COUNTS)])}
    last_report = row[len(_COUNTS)]
    requests, predictions = counts["requests"], counts["prediction_requests"]
    return counts | {
        "seconds": seconds, "since": since,
        "error_rate": counts["server_errors"] / requests if requests else None,
        "refused_rate": counts["refused_predictions"] / predictions if predictions else None,
        "requests_per_second": requests / seconds, "predictions_per_second": predictions / seconds,
        "logged_batches": int(logged[0]), "logged_rows": int(logged[1]),
        "logged_rows_per_second": int(logged[1]) / seconds,
        "last_report": last_report,
    }


def lost_predictions(store: Store, limit: int = 5) -> dict[str, Any]:
    """Predictions answered but never logged because their worker was killed before writing them
    (recorded by the next service to start on that machine): {"rows": total, "kills": how many
    workers' losses were recorded, "latest": up to `limit` records, newest first (id, created_at,
    worker, rows, reason)}. The table holds one row per killed worker, so the totals scan it whole.
    Rows dropped because the log's queue was full are not in the store: the service's /metrics
    counts them (everloop_prediction_log_dropped_total)."""
    t = store.tables.lost_predictions
    with store.engine.connect() as conn:
        kills, rows = conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(t.c.rows), 0))).one()
        latest = conn.execute(sa.select(t).order_by(t.c.id.desc()).limit(limit)).all()
    return {"rows": int(rows), "kills": int(kills), "latest": [dict(r._mapping) for r in latest]}


def latest_window(store: Store) -> dict[str, Any] | None:
    """The monitoring window judged last (the newest monitor_runs row, by primary key): {"id",
    "created_at" (when last judged, epoch seconds), "model_version", "window_key", "complete",
    "result" (MonitorResult.to_dict(): status, alerts, not_judged, performance, health, ...)}, or None
    when no window was judged yet. Reads one row."""
    t = store.tables.monitor_runs
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(t).order_by(t.c.id.desc()).limit(1)).first()
    return None if row is None else dict(row._mapping)
