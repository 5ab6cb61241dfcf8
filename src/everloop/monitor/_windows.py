"""Monitoring windows defined by the data, not by when the monitor runs.

A window is the n-th block of `monitoring.window.rows` predictions of one model version (counted in
the order they were logged), or the n-th period of `monitoring.window.minutes` of the predictions'
own time (aligned to the epoch, UTC). Running the monitor twice over the same rows therefore judges
the same window, and its stored result is updated rather than duplicated; the windows over time are
the data's history, not the history of cron runs. This is how NannyML chunks data (by size or by
period) and how Evidently's test suites are meant to be run on fixed batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from everloop.spec import ProjectSpec
from everloop.store import Store, prediction_log

# A logged batch's time is that of its first row; its other rows are at most a few seconds later.
BATCH_SPAN_SECONDS = 60.0


@dataclass(frozen=True)
class Window:
    """One window of one model version's predictions.

    `rows` is how many predictions it holds so far; `complete` is False for the block (or period) still
    filling up. Row windows are read from batch `first_seq` on, skipping `skip` rows of it, for `size`
    rows; time windows are the rows whose own time is in [start, end) (epoch seconds)."""

    kind: str  # "rows" or "minutes"
    size: float  # rows per block, or minutes per period
    index: int
    rows: int
    complete: bool
    first_seq: int | None = None
    skip: int = 0
    start: float | None = None
    end: float | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.size:g}:{self.index}"

    def to_dict(self) -> dict:
        return {"key": self.key, "kind": self.kind, "size": self.size, "index": self.index, "rows": self.rows,
                "complete": self.complete}


def plan(store: Store, spec: ProjectSpec, model_version: int, *, recorded: set[str] | None = None,
         catch_up: int = 10) -> tuple[list[Window], Window | None]:
    """Which windows of `model_version` to judge now, and which one gives the current verdict.

    The verdict window is the one still filling up when it already holds `monitoring.min_rows`
    predictions, else the latest complete one (so a block that has just begun does not hide the one
    that just ended), else the only one there is. Complete windows not yet recorded as complete
    (`recorded`: their keys) are judged too, up to `catch_up` of them, oldest first, so a monitor that
    runs less often than windows fill still sees every window. Returns (windows to judge in order,
    the verdict window); ([], None) when the model has no predictions."""
    recorded = recorded or set()
    window = spec.monitoring.window
    t = store.tables.prediction_batches
    with store.engine.connect() as conn:
        if window.rows is not None:
            found = conn.execute(sa.select(t.c.seq, t.c.rows).where(t.c.model_version == model_version)
                                 .order_by(t.c.seq)).all()
            windows = _row_windows(found, window.rows)
        else:
            found = conn.execute(sa.select(t.c.seq, t.c.created_at, t.c.rows)
                                 .where(t.c.model_version == model_version).order_by(t.c.seq)).all()
            windows = _time_windows(found, window.minutes)
    if not windows:
        return [], None
    last = windows[-1]
    if last.complete or last.rows >= spec.monitoring.min_rows or len(windows) == 1:
        verdict = last
    else:
        verdict = windows[-2]
    missed = [w for w in windows if w.complete and w.key not in recorded and w is not verdict]
    todo = missed[-catch_up:] + [verdict]
    return sorted(todo, key=lambda w: w.index), verdict


def read(store: Store, window: Window, model_version: int,
         read_rows: int = 20_000) -> Iterator[prediction_log.LoggedRows]:
    """The window's logged predictions, oldest first, in pieces of about `read_rows` rows."""
    t = store.tables.prediction_batches
    pending: list[tuple[int, float, int, pa.Table]] = []
    count, left = 0, window.rows if window.kind == "rows" else None
    with store.engine.connect() as conn:
        if window.kind == "rows":
            batches = prediction_log.iter_batches(conn, model_version=model_version, since_seq=window.first_seq)
        else:
            batches = prediction_log.iter_batches(conn, model_version=model_version,
                                                  since_time=window.start - BATCH_SPAN_SECONDS)
        skip = window.skip
        for seq, created_at, version, table in batches:
            if window.kind == "rows":
                if skip:
                    table, skip = table.slice(skip), 0
                table = table.slice(0, left)
                left -= table.num_rows
            else:
                if created_at >= window.end:
                    break
                times = table.column(prediction_log.CREATED)
                table = table.filter(pc.and_(pc.greater_equal(times, window.start), pc.less(times, window.end)))
            if table.num_rows:
                pending.append((seq, created_at, version, table))
                count += table.num_rows
            if count >= read_rows:
                yield prediction_log.to_rows(pending)
                pending, count = [], 0
            if left is not None and left <= 0:
                break
    if pending:
        yield prediction_log.to_rows(pending)


def _row_windows(found: list, size: int) -> list[Window]:
    if not found:
        return []
    seqs = np.array([r[0] for r in found])
    ends = np.cumsum([r[1] for r in found])  # rows up to and including each batch
    total = int(ends[-1])
    out = []
    for index in range((total - 1) // size + 1):
        first_row = index * size
        at = int(np.searchsorted(ends, first_row, side="right"))  # the batch holding row `first_row`
        before = int(ends[at - 1]) if at else 0
        rows = min(size, total - first_row)
        out.append(Window("rows", size, index, rows, rows == size, first_seq=int(seqs[at]), skip=first_row - before))
    return out


def _time_windows(found: list, minutes: float) -> list[Window]:
    if not found:
        return []
    period = minutes * 60
    newest = max(r[1] for r in found)
    counts: dict[int, int] = {}
    for _, created_at, rows in found:
        index = int(created_at // period)
        counts[index] = counts.get(index, 0) + rows
    # a period is complete once the data has moved past its end: the data's time, not the clock's
    return [Window("minutes", minutes, index, rows, (index + 1) * period <= newest, start=index * period,
                   end=(index + 1) * period) for index, rows in sorted(counts.items())]
