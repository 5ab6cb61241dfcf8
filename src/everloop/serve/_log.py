"""The prediction log writer: a bounded queue drained by a background thread in batches.

A request enqueues one chunk (its rows' ids, features and outputs) and returns; the writer thread
turns chunks into rows, encodes the JSON columns with orjson and inserts them with the database
driver's own executemany, so logging costs the request path almost nothing and the writer little.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import orjson
import sqlalchemy as sa

from everloop.store import Store

if TYPE_CHECKING:
    from everloop.serve._batcher import FeatureSlice

log = logging.getLogger("everloop.serve")


class PredictionLog:
    """Requests put chunks of rows here and return at once; a thread writes them to the store in
    batches. When the queue is full a chunk's rows are dropped and counted (never silently)."""

    def __init__(self, store: Store, max_queue: int = 100_000, batch: int = 2000, interval: float = 0.2,
                 metrics: Any = None):
        self.store = store
        self.metrics = metrics
        self.requests = [0, 0, 0]  # requests, client errors, server errors since the last flush
        self.stats_interval = 2.0
        self._last_stats = time.monotonic()
        self._worker = f"{os.uname().nodename}:{os.getpid()}"
        self.queue: queue.Queue[tuple] = queue.Queue(max_queue // 10)  # chunks, of one request each
        self.batch = batch
        self.interval = interval
        self.dropped = 0
        self.written = 0
        self.failed = 0
        self.enqueued = 0
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

    def put(self, ids: list[str], created_at: float, model_version: int | None, features: FeatureSlice,
            outputs: list[dict[str, Any]], latency_ms: float) -> int:
        """Enqueue one request's rows; returns how many were dropped because the queue was full."""
        dropped = 0
        try:
            self.queue.put_nowait((ids, created_at, model_version, features, outputs, latency_ms))
            self.enqueued += len(ids)
        except queue.Full:
            dropped = len(ids)
        self.dropped += dropped
        if self.metrics is not None:
            self.metrics.log_queue.set(self.queue.qsize())
            if dropped:
                self.metrics.log_dropped.inc(dropped)
        return dropped

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
        while len(rows) < self.batch:
            try:
                ids, at, version, features, outputs, latency = self.queue.get_nowait()
            except queue.Empty:
                break
            dumps = orjson.dumps
            rows.extend((i, at, version, f.decode(), dumps(o).decode(), latency)
                        for i, f, o in zip(ids, features.json_rows(), outputs))
        if self.metrics is not None:
            self.metrics.log_queue.set(self.queue.qsize())
            self.metrics.sample_process()  # the writer thread wakes about every interval: a cheap clock
        self._write_stats()
        if not rows:
            return 0
        try:
            with self.store.engine.begin() as conn:
                conn.exec_driver_sql(self._insert_sql(), rows)
            self.written += len(rows)
        except Exception as exc:  # counted and logged: the service keeps answering
            self.failed += len(rows)
            if self.metrics is not None:
                self.metrics.log_failed.inc(len(rows))
            log.error("prediction log: %d rows could not be written: %s", len(rows), exc)
        return len(rows)


    def _insert_sql(self) -> str:
        """A plain INSERT in the driver's parameter style (JSON columns cast where the type is strict)."""
        dialect = self.store.engine.dialect
        mark = "?" if dialect.paramstyle == "qmark" else "%s"
        json = f"CAST({mark} AS JSON)" if dialect.name == "postgresql" else mark
        return ("INSERT INTO predictions (id, created_at, model_version, features, prediction, latency_ms) "
                f"VALUES ({mark}, {mark}, {mark}, {json}, {json}, {mark})")


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
