"""The prediction log writer: a bounded queue drained by a background thread.

The batcher enqueues one entry per model call (references to its rows' ids, feature columns, outputs
and latencies: nothing is copied or converted on the request path) and returns; the writer thread
merges the entries it finds queued into one Arrow payload, one row of `prediction_batches` (see
everloop/store/_predictions.py, `batch_row`), a few transactions a second. The writer works on whole
columns; its only per-value Python work is dictionary-encoding text features (pandas' hash table, about
half of its time on the demo's 6 text features). On a busy 2-core VM: ~0.7-0.9 us of CPU per logged
row with SQLite and ~31 bytes (format 1, 2000-row batches: ~1.4 us and ~93 bytes).
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
from everloop.store._predictions import ID_PREFIX_LENGTH

log = logging.getLogger("everloop.serve")

# The request counts a worker keeps (PredictionLog.requests, in this order) and writes to service_stats.
STATS_COUNTS = ("requests", "client_errors", "server_errors", "prediction_requests", "refused_predictions",
                "other_client_errors")


@dataclass
class LogEntry:
    """The answered rows of one model call. The writer merges the entries it finds queued into one
    batch row (per model version): a few rows a second, whatever the request rate."""

    ids: list[str]  # the ids answered (as the clients got them): consecutive unless rows were refused
    created_at: float
    model_version: int | None
    features: dict[str, np.ndarray] | pd.DataFrame  # validated features, by column
    labels: np.ndarray  # predicted value per row
    proba: np.ndarray | None  # rows x classes, classifiers only
    classes: list[Any] | None
    latencies_ms: list[float] | np.ndarray

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
    """Several model calls' rows (of one model version and worker, in id order) as one row of
    `prediction_batches` (`prediction_log.batch_row` underneath)."""
    columns = [e.columns() for e in entries]
    features = pa.table({name: _arrow(np.concatenate([c[name] for c in columns])) for name in columns[0]})
    counts = [len(e.ids) for e in entries]
    worker, first_counter, counters = _counters(entries)
    first = entries[0]
    return prediction_log.batch_row(
        worker, first_counter, features, np.concatenate([np.asarray(e.labels) for e in entries]),
        None if first.proba is None else np.concatenate([e.proba for e in entries]), first.classes,
        np.repeat([e.created_at for e in entries], counts), first.model_version,
        np.fromiter(itertools.chain.from_iterable(e.latencies_ms for e in entries), np.float64, sum(counts)),
        counters=counters)


def _arrow(values: np.ndarray) -> pa.Array:
    """One feature column as Arrow: text (object arrays) dictionary-encoded by pandas' hash table, the
    only per-value Python work of the writer; numbers as they are (NaN as null, as requests send it)."""
    if values.dtype != object:
        return pa.array(values, from_pandas=True)
    codes, uniques = pd.factorize(values)  # None and NaN: -1
    if not len(uniques):
        return pa.nulls(len(values))
    narrow = codes.astype(np.int8 if len(uniques) < 128 else np.int32)
    indices = pa.array(narrow, mask=codes < 0) if (codes < 0).any() else pa.array(narrow)
    return pa.DictionaryArray.from_arrays(indices, pa.array(uniques, from_pandas=True))


def _counters(entries: list[LogEntry]) -> tuple[str, int, np.ndarray | None]:
    """The entries' worker, their first counter, and all their counters when they do not follow on (rows
    were refused or failed the checks), else None. Read off each entry's first and last id (ids only
    increase): each id is parsed only in an entry with some of its rows refused."""
    cut = ID_PREFIX_LENGTH
    spans = [(int(e.ids[0][cut:], 16), int(e.ids[-1][cut:], 16), len(e.ids)) for e in entries]
    first, rows = spans[0][0], sum(n for *_, n in spans)
    if spans[-1][1] - first == rows - 1:  # as many counters as rows: they follow on
        return entries[0].ids[0][:cut], first, None
    counters = [np.arange(start, end + 1, dtype=np.uint64) if end - start == n - 1
                else np.array([int(i[cut:], 16) for i in e.ids], dtype=np.uint64)
                for e, (start, end, n) in zip(entries, spans)]
    return entries[0].ids[0][:cut], first, np.concatenate(counters)


class PredictionLog:
    """The batcher puts each micro-batch's rows here in one chunk and returns at once; a thread writes
    them to the store in batches. When `max_queue` rows wait already, a chunk's rows are dropped and
    counted (never silently)."""

    def __init__(self, store: Store, max_queue: int = 100_000, batch: int = 10_000, interval: float = 0.2,
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
        self.batch = batch  # rows a write aims for: each column costs a few numpy/Arrow calls per write
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

