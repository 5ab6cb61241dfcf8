"""The monitor's history, read cheaply: the latest judged windows without their bulky parts, one window
in full, and the service's request counts per minute. What the dashboard's Monitoring page draws; the
CLI can use the same.

A stored result (`monitor_runs.result`) can be tens of KB, most of it the reference-vs-window
distributions: pages of windows read never more than the latest `limit` rows (by primary key, so
`ORDER BY id DESC LIMIT n` walks the key's index) and keep only the parts they draw (on SQLite
extracted in SQL; PostgreSQL's json type would re-parse the whole value for each part, so there the
rows' results are read once and trimmed here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from everloop.monitor._health import STATS_LAG_SECONDS
from everloop.store import Store

MAX_WINDOWS = 200
# the parts of a result a page of windows needs (not distributions, skew examples, earlier windows)
SUMMARY_KEYS = ("status", "window", "alerts", "not_judged", "notes", "drift", "prediction_drift", "performance",
                "health", "prediction_distribution")
_STATS = ("requests", "server_errors", "client_errors", "prediction_requests", "refused_predictions")


@dataclass
class WindowPage:
    """A page of judged windows, oldest first. `runs`: result dicts with SUMMARY_KEYS present in the
    stored result (missing ones absent) plus "run_id" (monitor_runs.id), "model_version" and
    "recorded_at" (epoch seconds the row was written). `older`: the `before` that pages to the windows
    just before these (None: these are the oldest); `newer`: the `before` of the next newer page (None:
    the newest page is the one without `before`, or this is it: see `latest`)."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    older: int | None = None
    newer: int | None = None
    latest: bool = True


def recent_windows(store: Store, limit: int = 50, *, before: int | None = None,
                   model_version: int | None = None) -> WindowPage:
    """The latest `limit` judged windows (monitor_runs rows) with id < `before` (all when None), of
    `model_version` when given, oldest first, each without its stored distributions (see WindowPage).

    `limit`: 1..MAX_WINDOWS. Reads `limit` rows plus two id lookups for the paging links. Raises
    ValueError for a limit out of range, SQLAlchemy's errors when the store cannot be read."""
    if not 1 <= limit <= MAX_WINDOWS:
        raise ValueError(f"limit {limit}: expected 1 to {MAX_WINDOWS} windows")
    t = store.tables.monitor_runs
    scope = [] if model_version is None else [t.c.model_version == model_version]
    if store.engine.dialect.name == "sqlite":  # the parts extracted in SQL: the bulk never leaves the file
        parts = [t.c.result[k].label(k) for k in SUMMARY_KEYS]
    else:  # PostgreSQL's json type detoasts and parses the whole value again for every `->`: read it once
        parts = [t.c.result]
    query = (sa.select(t.c.id, t.c.model_version, t.c.created_at, *parts)
             .where(*scope, *([] if before is None else [t.c.id < before])).order_by(t.c.id.desc()).limit(limit))
    with store.engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
        if not rows:
            return WindowPage(latest=before is None)
        first, last = rows[-1]["id"], rows[0]["id"]
        older = conn.execute(sa.select(t.c.id).where(*scope, t.c.id < first).limit(1)).scalar()
        # the next newer page is the `limit` windows after this one's newest: its `before` is one past them
        after = conn.execute(sa.select(t.c.id).where(*scope, t.c.id > last).order_by(t.c.id)
                             .limit(limit + 1)).scalars().all()
    runs = []
    for row in reversed(rows):
        result = row["result"] if "result" in row else row
        run = {k: result[k] for k in SUMMARY_KEYS if isinstance(result, Mapping) and result.get(k) is not None}
        runs.append(run | {"run_id": row["id"], "model_version": row["model_version"],
                           "recorded_at": row["created_at"]})
    return WindowPage(runs=runs, older=first if older is not None else None,
                      newer=after[limit] if len(after) > limit else None, latest=not after)


def window_result(store: Store, run_id: int) -> dict[str, Any] | None:
    """One judged window's whole stored result (with its distributions) plus "run_id", "model_version",
    "window_key" and "recorded_at"; None when no monitor_runs row has that id."""
    t = store.tables.monitor_runs
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(t.c.id, t.c.model_version, t.c.window_key, t.c.created_at, t.c.result)
                           .where(t.c.id == run_id)).mappings().first()
    if row is None:
        return None
    result = row["result"] if isinstance(row["result"], dict) else {}
    return result | {"run_id": row["id"], "model_version": row["model_version"], "window_key": row["window_key"],
                     "recorded_at": row["created_at"]}


def service_per_minute(store: Store, start: float, end: float, *, max_minutes: int = 1440) -> list[dict[str, Any]]:
    """The service's request counts (service_stats, summed over workers in SQL) per UTC minute written in
    [start, end] (epoch seconds; rows written up to STATS_LAG_SECONDS after `end` count, as in
    `service_errors`), at most the last `max_minutes` UTC minutes of that span (the last being the one
    `end` plus that lag falls in).

    Returns [{"minute": epoch seconds of the minute's start (a multiple of 60), "requests",
    "server_errors", "client_errors", "prediction_requests", "refused_predictions" (ints; columns a
    store made by an older build lacks count 0), "error_rate" (server errors / requests),
    "refused_rate" (refused / prediction requests): floats in [0, 1] or None without requests}],
    oldest first, minutes without rows left out. Raises ValueError when end < start or max_minutes < 1."""
    if end < start or max_minutes < 1:
        raise ValueError(f"service_per_minute: span {start}..{end} and max_minutes {max_minutes}: expected "
                         "start <= end and at least 1 minute")
    t = store.tables.service_stats
    end += STATS_LAG_SECONDS
    start = max(start, (end // 60 - max_minutes + 1) * 60)  # whole minutes: the last one is end's
    if store.engine.dialect.name == "postgresql":
        minute = sa.func.floor(t.c.created_at / 60)
    else:  # SQLite's CAST truncates (times are positive); PostgreSQL's would round
        minute = sa.cast(t.c.created_at / 60, sa.Integer)
    minute = minute.label("minute")
    query = (sa.select(minute, *(sa.func.coalesce(sa.func.sum(t.c[k]), 0).label(k) for k in _STATS))
             .where(t.c.created_at >= start, t.c.created_at <= end).group_by(minute).order_by(minute))
    with store.engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    out = []
    for row in rows:
        counts = {k: int(row[k]) for k in _STATS}
        out.append({"minute": float(int(row["minute"]) * 60), **counts,
                    "error_rate": counts["server_errors"] / counts["requests"] if counts["requests"] else None,
                    "refused_rate": (counts["refused_predictions"] / counts["prediction_requests"]
                                     if counts["prediction_requests"] else None)})
    return out
