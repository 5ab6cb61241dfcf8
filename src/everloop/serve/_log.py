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
import mmap
import os
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import sqlalchemy as sa

from everloop.store import Store, _lease, prediction_log
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
    # Text features' codes as the model's encoder looked them up (features._fast.Codes), when it did:
    # logged as they are, so the writer does not hash every value a second time.
    codes: dict[str, tuple[np.ndarray, Any]] | None = None
    # A shadow candidate's rows (serve/_rollout.py): the rollout's id routes them to `shadow_batches`.
    rollout: int | None = None

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
    features = pa.table({name: _from_codes(entries, columns, name) if _coded(entries, name)
                         else _arrow(np.concatenate([c[name] for c in columns])) for name in columns[0]})
    counts = [len(e.ids) for e in entries]
    worker, first_counter, counters = _counters(entries)
    first = entries[0]
    return prediction_log.batch_row(
        worker, first_counter, features, np.concatenate([np.asarray(e.labels) for e in entries]),
        None if first.proba is None else np.concatenate([e.proba for e in entries]), first.classes,
        np.repeat([e.created_at for e in entries], counts), first.model_version,
        np.concatenate([np.asarray(e.latencies_ms, dtype=np.float64) for e in entries]),
        counters=counters, labels_from_proba=True)  # TrainedModel.predict_conformed's labels


def _coded(entries: list[LogEntry], name: str) -> bool:
    """Whether every entry has the encoder's codes for text feature `name`, of one vocabulary of text."""
    first = entries[0].codes.get(name) if entries[0].codes else None
    if first is None or first[1].dictionary is None:
        return False
    return all(e.codes is not None and name in e.codes and e.codes[name][1] is first[1] for e in entries)


def _from_codes(entries: list[LogEntry], columns: list[dict[str, np.ndarray]], name: str) -> pa.Array:
    """A text feature as a dictionary array straight from the encoder's codes: the model's categories as
    the dictionary, and only the rows with an unseen value or the missing code looked at one by one
    (missing values as nulls, unseen values appended to the dictionary as they were sent)."""
    vocabulary = entries[0].codes[name][1]
    found = np.concatenate([e.codes[name][0] for e in entries]).astype(np.int32)
    odd = found == vocabulary.unseen
    if vocabulary.missing is not None:
        odd |= found == vocabulary.missing  # None/NaN or the literal missing token: the raw value decides
    dictionary = vocabulary.dictionary
    nulls = None
    if odd.any():
        at = np.flatnonzero(odd)
        raw = np.concatenate([c[name] for c in columns])[at] if len(at) * 8 > len(found) else \
            _gather([c[name] for c in columns], at)
        missing = pd.isna(raw)
        nulls = np.zeros(len(found), dtype=bool)
        nulls[at[missing]] = True
        unseen = at[~missing & (found[at] == vocabulary.unseen)]
        if len(unseen):
            new, uniques = pd.factorize(raw[~missing & (found[at] == vocabulary.unseen)])
            found[unseen] = vocabulary.unseen + new
            dictionary = pa.concat_arrays([dictionary, _text(uniques)])
    indices = pa.array(found, mask=nulls) if nulls is not None and nulls.any() else pa.array(found)
    return pa.DictionaryArray.from_arrays(indices, dictionary)


def _gather(arrays: list[np.ndarray], at: np.ndarray) -> np.ndarray:
    """`np.concatenate(arrays)[at]` without concatenating: for a few rows of many."""
    ends = np.cumsum([len(a) for a in arrays])
    which = np.searchsorted(ends, at, side="right")
    starts = ends - np.array([len(a) for a in arrays])
    out = np.empty(len(at), dtype=object)
    for k, (w, i) in enumerate(zip(which, at)):
        out[k] = arrays[w][i - starts[w]]
    return out


def _text(values: Any) -> pa.Array:
    """Values as Arrow text; one Arrow cannot hold (a lone surrogate, which is not UTF-8, or a non-text
    value) is logged in a safe form (backslash escapes, or its str), so one odd row never fails a batch."""
    values = list(values)
    try:
        return pa.array(values, type=pa.string())
    except (pa.ArrowException, UnicodeError, TypeError):
        return pa.array([_safe(v) for v in values], type=pa.string())


def _safe(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


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
    try:
        dictionary = pa.array(uniques, from_pandas=True)
    except (pa.ArrowException, UnicodeError):  # e.g. a lone surrogate: logged escaped, never failing the batch
        dictionary = _text(uniques)
    return pa.DictionaryArray.from_arrays(indices, dictionary)


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


class Ledger:
    """Two counters in a small memory-mapped file, `<store>/serving/<worker>.ledger`: rows handed to the
    log and rows settled (written, or counted as failed). The kernel keeps a killed process's writes to
    the mapping, so the next service to start on the machine finds what a SIGKILLed worker answered
    but never logged (`recover_lost`). ~0.2 us per model call."""

    SIZE = 512  # two uint64 counters, then this process's identity (store/_lease.py's form), UTF-8

    def __init__(self, folder: Path, worker: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{worker}.ledger"
        with open(self.path, "wb") as f:
            f.write(struct.pack("<QQ", 0, 0) + _lease._this_process().encode().ljust(self.SIZE - 16, b"\0"))
        with open(self.path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), self.SIZE)

    def handed(self, rows: int) -> None:
        struct.pack_into("<Q", self._map, 0, rows)

    def settled(self, rows: int) -> None:
        struct.pack_into("<Q", self._map, 8, rows)

    def close(self) -> None:
        """A clean stop: everything handed was settled; nothing to count at the next start."""
        self._map.close()
        self.path.unlink(missing_ok=True)


def recover_lost(store: Store, folder: Path, metrics: Any = None) -> int:
    """Count the predictions killed workers on this machine answered but never logged: each ledger whose
    process is gone (same boot and pid namespace, pid not running) is claimed (renamed: two workers
    starting at once never count one twice), its unsettled rows recorded in `lost_predictions` and
    logged as a warning, and the file removed. Returns the rows counted."""
    total = 0
    for path in sorted(folder.glob("*.ledger")) if folder.is_dir() else []:
        try:
            data = path.read_bytes()
            handed, settled = struct.unpack_from("<QQ", data)
            process = data[16:].rstrip(b"\0").decode()
        except (OSError, struct.error, UnicodeDecodeError):
            continue
        if not _lease._dead(process):
            continue  # alive, another machine's, or cannot tell: not ours to count
        claimed = path.with_name(f"{path.name}.{os.getpid()}.claimed")
        try:
            path.rename(claimed)
        except OSError:
            continue  # another worker claimed it first
        lost, worker = max(handed - settled, 0), path.name.removesuffix(".ledger")
        if lost:
            with store.engine.begin() as conn:
                conn.execute(store.tables.lost_predictions.insert().values(
                    worker=worker, rows=lost, reason="the worker was killed before its log writer wrote them"))
            log.warning("prediction log: %d predictions answered by worker %s (killed) were never logged; "
                        "recorded in lost_predictions", lost, worker)
            if metrics is not None:
                metrics.log_lost.inc(lost)
            total += lost
        claimed.unlink(missing_ok=True)
    return total


class PredictionLog:
    """The batcher puts each micro-batch's rows here in one chunk and returns at once; a thread writes
    them to the store in batches. When `max_queue` rows wait already, a chunk's rows are dropped and
    counted (never silently). While the store is busy or away (a held lock, a restart), a batch is
    retried with backoff for `retry_seconds`, its rows kept; a batch the store refuses for its content
    is written model call by model call, so one bad call never costs another's rows. A graceful stop
    writes everything queued; a killed worker's unwritten rows are counted by the next start
    (`Ledger`, `recover_lost`)."""

    def __init__(self, store: Store, max_queue: int = 100_000, batch: int = 10_000, interval: float = 0.2,
                 metrics: Any = None, retry_seconds: float = 60.0, ledger: bool = True):
        self.store = store
        self.metrics = metrics
        self.retry_seconds = retry_seconds
        self.use_ledger = ledger
        self.ledger: Ledger | None = None
        # Counted since start (in STATS_COUNTS' order) by the event loop's thread only; a stats write stores
        # the difference from what it last wrote, so a request counted during a write is never lost.
        self.requests = [0] * len(STATS_COUNTS)
        self._stats_written = [0] * len(STATS_COUNTS)
        self._stats_lock = threading.Lock()  # the writer thread and a forced write (stop, tests)
        # Under a rollout: (rollout, model version) -> [calls, errors, rows] since start, and as last
        # written; counted by the event loop's and the shadow's threads (hence a lock), see count_call.
        self.rollout_counts: dict[tuple[int, int], list[int]] = {}
        self._rollout_written: dict[tuple[int, int], list[int]] = {}
        self._rollout_lock = threading.Lock()
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
        if self.use_ledger:
            from everloop.serve._batcher import id_prefix  # the batcher imports this module

            folder = self.store.root / "serving"
            try:
                recover_lost(self.store, folder, self.metrics)
                self.ledger = Ledger(folder, id_prefix())
            except Exception as exc:  # never stop serving for it; say so
                log.warning("prediction log: the ledger of unlogged predictions is off (%s)", exc)
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

    def count_call(self, rollout: int, version: int, rows: int, failed: bool) -> None:
        """Count one model call of `rows` rows by model `version` under `rollout` (failed: it raised, or
        the version could not be loaded), for `rollout_stats`."""
        with self._rollout_lock:
            counts = self.rollout_counts.get((rollout, version))
            if counts is None:
                counts = self.rollout_counts[(rollout, version)] = [0, 0, 0]
            counts[0] += 1
            counts[1] += failed
            counts[2] += rows

    def put(self, entry: LogEntry) -> int:
        """Enqueue the rows of one model call; returns how many were dropped because the queue was full."""
        n = len(entry.ids)
        if self.enqueued - self.taken + n > self.max_queue:
            self.dropped += n
            if self.metrics is not None:
                self.metrics.log_dropped.inc(n)
            return n
        self.queue.append(entry)
        self.enqueued += n
        if self.ledger is not None:
            self.ledger.handed(self.enqueued)
        if self.metrics is not None:  # the backlog, rows being written included: it grows while the store is slow
            self.metrics.log_queue.set(self.enqueued - self.written - self.failed)
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

    def stop(self, timeout: float = 30.0) -> None:
        """Write everything queued (a graceful stop loses nothing), then the last request counts."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
        if self._thread.is_alive():  # still retrying a store that is away: do not write beside it
            log.error("prediction log: the writer did not finish within %gs; %d rows not written",
                      timeout, self.enqueued - self.written - self.failed)
            return
        while self._drain():  # everything still queued, batch after batch
            pass
        self._write_stats(force=True)
        if self.ledger is not None and self.written + self.failed == self.enqueued:
            self.ledger.close()
            self.ledger = None

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
            with self._rollout_lock:  # only while a rollout is (or just was) served: else empty
                rollout_total = {key: list(c) for key, c in self.rollout_counts.items()}
            rollout_rows = []
            for (rollout, version), now in rollout_total.items():
                delta = [n - b for n, b in zip(now, self._rollout_written.get((rollout, version), (0, 0, 0)))]
                if any(delta):
                    rollout_rows.append({"rollout": rollout, "worker": self._worker, "model_version": version,
                                         "calls": delta[0], "errors": delta[1], "rows": delta[2]})
            if not any(counts) and not rollout_rows:
                return
            try:
                with self.store.engine.begin() as conn:
                    if any(counts):
                        conn.execute(self.store.tables.service_stats.insert().values(
                            worker=self._worker, **dict(zip(STATS_COUNTS, counts))))
                    if rollout_rows:
                        conn.execute(self.store.tables.rollout_stats.insert(), rollout_rows)
                self._stats_written = total
                self._rollout_written = rollout_total
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
            self.metrics.log_queue.set(self.enqueued - self.written - self.failed)
            self.metrics.sample()  # the writer thread wakes about every interval: a cheap clock
        self._write_stats()
        if not entries:
            return 0
        try:
            self._write_retrying(entries)
            self.written += rows
        except Exception as exc:  # not the store being away: write call by call, and lose only what fails
            if len(entries) == 1 or _unavailable(exc):
                self._failed(rows, exc)
            else:
                for entry in entries:
                    try:
                        self._write([entry])
                        self.written += len(entry.ids)
                    except Exception as one:
                        self._failed(len(entry.ids), one)
        if self.ledger is not None:
            self.ledger.settled(self.written + self.failed)
        if self.metrics is not None:
            self.metrics.log_queue.set(self.enqueued - self.written - self.failed)
        return rows

    def _write(self, entries: list[LogEntry]) -> None:
        # One batch row per run of one model version (a swap or a canary splits them: a batch holds one
        # range of id counters). A shadow candidate's rows (under a rollout) go to shadow_batches; they
        # reuse production's ids, so they are grouped apart first: interleaved with production's, they
        # would otherwise cut every model call into a batch row of its own.
        answered = [e for e in entries if e.rollout is None]
        shadowed = [e for e in entries if e.rollout is not None]
        batch_rows = [batch_row(list(group)) for _, group in itertools.groupby(answered, key=lambda e: e.model_version)]
        shadow_rows = [batch_row(list(group)) | {"rollout": rollout} for (_, rollout), group
                       in itertools.groupby(shadowed, key=lambda e: (e.model_version, e.rollout))]
        with self.store.engine.begin() as conn:
            if batch_rows:
                conn.execute(self.store.tables.prediction_batches.insert(), batch_rows)
            if shadow_rows:
                conn.execute(self.store.tables.shadow_batches.insert(), shadow_rows)

    def _write_retrying(self, entries: list[LogEntry]) -> None:
        """`_write`, retried with backoff (0.1 s doubling to 5 s) while the store is busy or unreachable,
        for up to `retry_seconds` (less once stopping): the rows wait, they are not lost."""
        deadline, pause = time.monotonic() + self.retry_seconds, 0.1
        while True:
            try:
                return self._write(entries)
            except Exception as exc:
                if not _unavailable(exc) or time.monotonic() >= deadline or self._stop.is_set():
                    raise
                log.warning("prediction log: the store is busy or away (%s); retrying in %.1fs",
                            str(exc).splitlines()[0], pause)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

    def _failed(self, rows: int, exc: Exception) -> None:
        self.failed += rows
        if self.metrics is not None:
            self.metrics.log_failed.inc(rows)
        log.error("prediction log: %d rows could not be written: %s", rows, exc)


def _unavailable(exc: Exception) -> bool:
    """A database that is locked, busy, restarting or unreachable (worth waiting for), as opposed to one
    that refuses these rows."""
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)) or (
        isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated)

