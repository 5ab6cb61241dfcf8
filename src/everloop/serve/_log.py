"""The prediction log writer: a bounded queue drained by a background thread.

The batcher enqueues one entry per model call (its rows' ids, features, outputs and latencies) and
returns; the writer thread merges the entries it finds queued into one lz4-compressed Arrow payload,
one row of `prediction_batches` (see everloop/store/_predictions.py), a few transactions a second,
so logging costs the request path almost nothing and the writer about a microsecond per prediction.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from everloop.store import Store, prediction_log

log = logging.getLogger("everloop.serve")

# The request counts a worker keeps (PredictionLog.requests, in this order) and writes to service_stats.
STATS_COUNTS = ("requests", "client_errors", "server_errors", "prediction_requests", "refused_predictions",
                "other_client_errors")


@dataclass
class LogEntry:
    """The answered rows of one model call. The writer merges the entries it finds queued into one
    batch row (per model version): a few rows a second, whatever the request rate."""

    ids: list[str]
    created_at: float
    model_version: int | None
    features: dict[str, np.ndarray] | pd.DataFrame  # validated features, by column
    labels: list[Any]
    proba: np.ndarray | None  # rows x classes, classifiers only
    classes: list[Any] | None
    latencies_ms: list[float]

    def columns(self) -> dict[str, np.ndarray]:
        """The features by name as arrays (date/times as ISO text, as requests send them)."""
        if not isinstance(self.features, pd.DataFrame):
            return self.features
        out = {}
        for name in self.features.columns:
            series = self.features[name]
            if pd.api.types.is_datetime64_any_dtype(series):
                out[name] = np.array([None if v is pd.NaT else v.isoformat() for v in series], dtype=object)
            else:
                out[name] = series.to_numpy()
        return out


def batch_row(entries: list[LogEntry]) -> dict[str, Any]:
    """Several model calls' rows (of one model version, in id order) as one row of `prediction_batches`."""
    ids = [i for e in entries for i in e.ids]
    columns = [e.columns() for e in entries]
    features = pa.table({name: pa.array(np.concatenate([c[name] for c in columns]), from_pandas=True)
                         for name in columns[0]})  # from_pandas: NaN and None both become nulls
    proba = None if entries[0].proba is None else np.concatenate([e.proba for e in entries])
    created = np.concatenate([np.full(len(e.ids), e.created_at) for e in entries])
    worker, first = prediction_log.split_id(ids[0])
    return {"worker": worker, "first_counter": first, "last_counter": prediction_log.split_id(ids[-1])[1],
            "rows": len(ids), "created_at": float(created[0]), "model_version": entries[0].model_version or 0,
            "payload": prediction_log.encode(ids, [x for e in entries for x in e.latencies_ms],
                                             [y for e in entries for y in e.labels], proba, entries[0].classes,
                                             features, created)}


class PredictionLog:
    """The batcher puts each micro-batch's rows here in one chunk and returns at once; a thread writes
    them to the store in batches. When `max_queue` rows wait already, a chunk's rows are dropped and
    counted (never silently)."""

    def __init__(self, store: Store, max_queue: int = 100_000, batch: int = 2000, interval: float = 0.2,
                 metrics: Any = None):
        self.store = store
        self.metrics = metrics
        # Counted since start (in STATS_COUNTS' order) by the event loop's thread only; a stats write stores
        # the difference from what it last wrote, so a request counted during a write is never lost.
        self.requests = [0] * len(STATS_COUNTS)
        self._stats_written = [0] * len(STATS_COUNTS)
        self._stats_lock = threading.Lock()  # the writer thread and a forced write (stop, tests)
        self.stats_interval = 2.0
        self._last_stats = time.monotonic()
        self._worker = f"{os.uname().nodename}:{os.getpid()}"
        # A deque, not a queue.Queue: appends and pops are atomic, without a lock and a condition per call.
        self.queue: deque[LogEntry] = deque()
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

    def count_request(self, status: int, prediction: bool = False) -> None:
        """Count one answered request by its HTTP status; `prediction`: a POST to a prediction endpoint.
        A prediction request's 4xx is a refused prediction (bad input), except 499 (the client left);
        other requests' 4xx (a bad /feedback body, an unknown path) are counted apart."""
        counts = self.requests
        counts[0] += 1
        if prediction:
            counts[3] += 1
        if 400 <= status < 500:
            counts[1] += 1
            if not prediction:
                counts[5] += 1
            elif status != 499:
                counts[4] += 1
        elif status >= 500:
            counts[2] += 1

    def put(self, entry: LogEntry) -> int:
        """Enqueue the rows of one model call; returns how many were dropped because the queue was full."""
        n = len(entry.ids)
        if self.enqueued - self.taken + n > self.max_queue:
            self.dropped += n
            if self.metrics is not None:
                self.metrics.log_dropped.inc(n)
            return n
        self.queue.append(entry)
        self.enqueued += n  # the queue's gauge is set by the writer, a few times a second
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
        with self._stats_lock:
            self._last_stats = time.monotonic()
            total = list(self.requests)  # one copy under the GIL; later increments go in the next write
            counts = [now - before for now, before in zip(total, self._stats_written)]
            if not any(counts):
                return
            try:
                with self.store.engine.begin() as conn:
                    conn.execute(self.store.tables.service_stats.insert().values(
                        worker=self._worker, **dict(zip(STATS_COUNTS, counts))))
                self._stats_written = total
            except Exception as exc:  # logged; the counts go with the next write: never break serving
                log.warning("service stats could not be written: %s", exc)

    def _drain(self) -> int:
        """Write what is queued (up to about `batch` rows); returns how many rows that was."""
        entries: list[LogEntry] = []
        rows = 0
        while rows < self.batch:
            try:
                entry = self.queue.popleft()
            except IndexError:
                break
            entries.append(entry)
            rows += len(entry.ids)
        self.taken += rows
        if self.metrics is not None:
            self.metrics.log_queue.set(self.enqueued - self.taken)
            self.metrics.sample()  # the writer thread wakes about every interval: a cheap clock
        self._write_stats()
        if not entries:
            return 0
        try:
            # one batch row per run of one model version (a swap splits them)
            batch_rows = [batch_row(list(group))
                          for _, group in itertools.groupby(entries, key=lambda e: e.model_version)]
            with self.store.engine.begin() as conn:
                conn.execute(self.store.tables.prediction_batches.insert(), batch_rows)
            self.written += rows
        except Exception as exc:  # counted and logged: the service keeps answering
            self.failed += rows
            if self.metrics is not None:
                self.metrics.log_failed.inc(rows)
            log.error("prediction log: %d rows could not be written: %s", rows, exc)
        return rows

