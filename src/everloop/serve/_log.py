"""The prediction log writer: a bounded queue drained by a background thread in batches.

A request enqueues one chunk (its rows' ids, features and outputs) and returns; the writer thread
turns chunks into rows, encodes the JSON columns with orjson and inserts them with the database
driver's own executemany, so logging costs the request path almost nothing and the writer little.
"""

from __future__ import annotations

import logging
import os
import functools
import itertools
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson
import sqlalchemy as sa

from everloop.store import Store

if TYPE_CHECKING:
    from everloop.serve._batcher import BatchFeatures

log = logging.getLogger("everloop.serve")

ROWS_PER_INSERT = 250  # 1,500 parameters a statement: under SQLite's limit (32,766) and PostgreSQL's (65,535)


class PredictionLog:
    """The batcher puts each micro-batch's rows here in one chunk and returns at once; a thread writes
    them to the store in batches. When `max_queue` rows wait already, a chunk's rows are dropped and
    counted (never silently)."""

    def __init__(self, store: Store, max_queue: int = 100_000, batch: int = 2000, interval: float = 0.2,
                 metrics: Any = None):
        self.store = store
        self.metrics = metrics
        self.requests = [0, 0, 0]  # requests, client errors, server errors since the last flush
        self.stats_interval = 2.0
        self._last_stats = time.monotonic()
        self._worker = f"{os.uname().nodename}:{os.getpid()}"
        # A deque, not a queue.Queue: appends and pops are atomic, without a lock and a condition per call.
        self.queue: deque[tuple] = deque()
        self.max_queue = max_queue
        self.batch = batch
        self.interval = interval
        self.dropped = 0
        self.enqueued = 0  # rows put (by the event loop's thread only)
        self.taken = 0  # rows taken off the queue (by the writer thread only)
        self.written = 0
        self.failed = 0
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by flush(), so a waiting caller is not held for a whole interval
        self._thread = threading.Thread(target=self._run, name="everloop-prediction-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def count_request(self, status: int) -> None:
        counts = self.requests
        counts[0] += 1
        if 400 <= status < 500:
            counts[1] += 1
        elif status >= 500:
            counts[2] += 1

    def put(self, ids: list[str], created_at: float, model_version: int | None, features: BatchFeatures,
            rows: list[int] | None, outputs: list[dict[str, Any]], latencies_ms: list[float]) -> int:
        """Enqueue the rows of one micro-batch (`rows`: which of `features`' rows, None for all);
        returns how many were dropped because the queue was full."""
        waiting = self.enqueued - self.taken
        if waiting + len(ids) > self.max_queue:
            self.dropped += len(ids)
            if self.metrics is not None:
                self.metrics.log_dropped.inc(len(ids))
            return len(ids)
        self.queue.append((ids, created_at, model_version, features, rows, outputs, latencies_ms))
        self.enqueued += len(ids)  # the queue's gauge is set by the writer, a few times a second
        return 0

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written."""
        target = self.enqueued
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self.written + self.failed < target:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        while self._drain():  # everything still queued, batch after batch
            pass
        self._write_stats(force=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            # A full batch: write on. Less: wait for more (or a flush), so that a busy service writes a
            # few large transactions a second instead of a small one per request.
            if self._drain() < self.batch:
                self._wake.wait(self.interval)
                self._wake.clear()

    def _write_stats(self, force: bool = False) -> None:
        """Every few seconds, this worker's request and error counts, for the monitor's error rate."""
        if not force and time.monotonic() - self._last_stats < self.stats_interval:
            return
        self._last_stats = time.monotonic()
        counts, self.requests = self.requests, [0, 0, 0]
        if not counts[0]:
            return
        try:
            with self.store.engine.begin() as conn:
                conn.execute(self.store.tables.service_stats.insert().values(
                    worker=self._worker, requests=counts[0], client_errors=counts[1], server_errors=counts[2]))
        except Exception as exc:  # counted in the log only: stats must never break serving
            log.warning("service stats could not be written: %s", exc)

    def _drain(self) -> int:
        """Write what is queued (up to one batch); returns how many rows that was."""
        rows: list[tuple] = []
        dumps = orjson.dumps
        while len(rows) < self.batch:
            try:
                ids, at, version, features, positions, outputs, latencies = self.queue.popleft()
            except IndexError:
                break
            self.taken += len(ids)
            encoded = features.json_rows()
            if positions is not None:
                encoded = [encoded[p] for p in positions]
            rows.extend(zip(ids, itertools.repeat(at), itertools.repeat(version), encoded,
                            [dumps(o).decode() for o in outputs], latencies))
        if self.metrics is not None:
            self.metrics.log_queue.set(self.enqueued - self.taken)
            self.metrics.sample()  # the writer thread wakes about every interval: a cheap clock
        self._write_stats()
        if not rows:
            return 0
        try:
            with self.store.engine.begin() as conn:
                for start in range(0, len(rows), ROWS_PER_INSERT):
                    group = rows[start:start + ROWS_PER_INSERT]
                    conn.exec_driver_sql(self._insert_sql(len(group)),
                                         tuple(itertools.chain.from_iterable(group)))
            self.written += len(rows)
        except Exception as exc:  # counted and logged: the service keeps answering
            self.failed += len(rows)
            if self.metrics is not None:
                self.metrics.log_failed.inc(len(rows))
            log.error("prediction log: %d rows could not be written: %s", len(rows), exc)
        return len(rows)


    @functools.lru_cache(maxsize=8)
    def _insert_sql(self, n: int) -> str:
        """An INSERT of `n` rows in one statement, in the driver's parameter style (JSON columns cast where
        the type is strict). One statement, not executemany: the driver releases and retakes the GIL
        around every statement it runs, and under load each retake waits for the request thread."""
        dialect = self.store.engine.dialect
        mark = "?" if dialect.paramstyle == "qmark" else "%s"
        json = f"CAST({mark} AS JSON)" if dialect.name == "postgresql" else mark
        values = f"({mark}, {mark}, {mark}, {json}, {json}, {mark})"
        return ("INSERT INTO predictions (id, created_at, model_version, features, prediction, latency_ms) "
                "VALUES " + ", ".join([values] * n))


def record_feedback(store: Store, rows: list[dict[str, Any]]) -> list[str]:
    """Store labels for known prediction ids (a later label replaces an earlier one); return unknown ids."""
    t = store.tables
    ids = [r["prediction_id"] for r in rows]
    with store.engine.begin() as conn:
        known = set(conn.execute(sa.select(t.predictions.c.id).where(t.predictions.c.id.in_(ids))).scalars())
        keep = [r for r in rows if r["prediction_id"] in known]
        if keep:
            conn.execute(t.feedback.delete().where(t.feedback.c.prediction_id.in_([r["prediction_id"] for r in keep])))
            conn.execute(t.feedback.insert(), keep)
    return [i for i in ids if i not in known]
