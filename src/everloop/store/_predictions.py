"""The prediction log's storage: one row per model call (a micro-batch), its predictions in one Arrow
IPC payload.

A busy service predicts a hundred thousand rows a second. As a JSON document and an indexed row per
prediction, the log cost ~4 us of CPU per row (as much as predicting it) and halved the throughput of
100-row requests; as one row per model call with the rows' columns in Arrow, it costs a fraction of a
microsecond per row, and the monitor reads windows as columns, without parsing JSON.

Prediction ids are `<worker><counter>` (16 hex digits naming the worker process, then a hex counter);
a batch row records the worker and the range of counters it holds, so an id is found by an indexed
range lookup and confirmed in the batch's own list of ids.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import sqlalchemy as sa

from everloop.store._meta import feedback, prediction_batches

ID_PREFIX_LENGTH = 16
ID, CREATED, LATENCY, PREDICTION, PROBA = "__id", "__created_at", "__latency_ms", "__prediction", "__proba"
INTERNAL = (ID, CREATED, LATENCY, PREDICTION, PROBA)


def split_id(prediction_id: str) -> tuple[str, int] | None:
    """(worker, counter) of a prediction id; None for anything the service cannot have issued."""
    worker, counter = prediction_id[:ID_PREFIX_LENGTH], prediction_id[ID_PREFIX_LENGTH:]
    if len(worker) < ID_PREFIX_LENGTH or not counter or len(counter) > 15:
        return None
    try:
        return worker, int(counter, 16)
    except ValueError:
        return None


def encode(ids: Sequence[str], latencies_ms: Sequence[float], labels: Sequence[Any], proba: np.ndarray | None,
           classes: Sequence[Any] | None, features: pa.Table, created_at: np.ndarray) -> bytes:
    """Logged rows as an Arrow IPC stream: the features by name, then id, time, latency and outputs."""
    columns = dict(zip(features.column_names, features.columns))
    columns[ID] = pa.array(ids, type=pa.string())
    columns[CREATED] = pa.array(created_at, type=pa.float64())
    columns[LATENCY] = pa.array(latencies_ms, type=pa.float64())
    columns[PREDICTION] = pa.array(list(labels))
    metadata = {}
    if proba is not None:
        flat = pa.array(np.ascontiguousarray(proba, dtype=np.float64).ravel())
        columns[PROBA] = pa.FixedSizeListArray.from_arrays(flat, proba.shape[1])
        metadata[b"classes"] = orjson.dumps([str(c) for c in classes or []])
    table = pa.table(columns).replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    # lz4: a few times smaller for the database to write, at a cost of well under a microsecond a row
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(payload).read_all()


@dataclass
class LoggedRows:
    """Logged predictions as columns: what the monitor and the loop read."""

    ids: list[str]
    created_at: np.ndarray  # when each prediction was made
    model_version: np.ndarray
    batch_seq: np.ndarray
    latency_ms: np.ndarray
    features: pd.DataFrame
    outputs: list[dict[str, Any]]  # {"prediction": ..., "probabilities": {class: p}} per row, as answered

    def __len__(self) -> int:
        return len(self.ids)


def to_rows(batches: list[tuple[int, float, int, pa.Table]]) -> LoggedRows:
    """Batch rows (seq, created_at, model_version, decoded payload) as one set of columns (each row with
    its own time)."""
    if not batches:
        return LoggedRows([], np.empty(0), np.empty(0, dtype=int), np.empty(0, dtype=int), np.empty(0),
                          pd.DataFrame(), [])
    tables = [t for *_, t in batches]
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    counts = [t.num_rows for t in tables]
    features = table.drop_columns([c for c in INTERNAL if c in table.column_names]).to_pandas()
    labels = table.column(PREDICTION).to_pylist()
    if PROBA in table.column_names:
        classes = orjson.loads((tables[0].schema.metadata or {}).get(b"classes", b"[]"))
        proba = np.asarray(table.column(PROBA).combine_chunks().flatten()).reshape(len(labels), -1).round(6).tolist()
        outputs = [{"prediction": y, "probabilities": dict(zip(classes, p))} for y, p in zip(labels, proba)]
    else:
        outputs = [{"prediction": y} for y in labels]
    return LoggedRows(table.column(ID).to_pylist(), table.column(CREATED).to_numpy(),
                      np.repeat([b[2] for b in batches], counts),
                      np.repeat([b[0] for b in batches], counts), table.column(LATENCY).to_numpy(), features, outputs)


def iter_batches(conn: sa.Connection, *, model_version: int | None = None, since_seq: int | None = None,
                 since_time: float | None = None, newest_first: bool = False,
                 chunk: int = 64) -> Iterator[tuple[int, float, int, pa.Table]]:
    """Logged batches (seq, created_at, model_version, rows as an Arrow table), a few at a time."""
    t = prediction_batches
    query = sa.select(t.c.seq, t.c.created_at, t.c.model_version, t.c.payload)
    if model_version is not None:
        query = query.where(t.c.model_version == model_version)
    if since_seq is not None:
        query = query.where(t.c.seq >= since_seq)
    if since_time is not None:
        query = query.where(t.c.created_at >= since_time)
    query = query.order_by(t.c.seq.desc() if newest_first else t.c.seq)
    for rows in conn.execution_options(yield_per=chunk).execute(query).partitions():
        for row in rows:
            yield row.seq, row.created_at, row.model_version, decode(row.payload)


def latest_window_start(conn: sa.Connection, rows: int, model_version: int | None = None) -> tuple[int, int] | None:
    """(first batch seq, rows to skip in it) so that reading forwards from there yields the latest `rows` rows."""
    t = prediction_batches
    query = sa.select(t.c.seq, t.c.rows).order_by(t.c.seq.desc())
    if model_version is not None:
        query = query.where(t.c.model_version == model_version)
    total, seq = 0, None
    for seq, count in conn.execution_options(yield_per=1000).execute(query):
        total += count
        if total >= rows:
            return seq, total - rows
    return None if seq is None else (seq, 0)  # fewer rows than the window: all of them


def find(conn: sa.Connection, ids: Sequence[str]) -> dict[str, tuple[int, float, int, pa.Table, int]]:
    """The logged rows of `ids`: id -> (batch seq, created_at, model_version, batch table, row in it)."""
    t = prediction_batches
    wanted: dict[str, list[tuple[int, str]]] = {}
    for prediction_id in ids:
        parts = split_id(prediction_id)
        if parts is not None:
            wanted.setdefault(parts[0], []).append((parts[1], prediction_id))
    found: dict[str, tuple[int, float, int, pa.Table, int]] = {}
    for worker, items in wanted.items():
        lo, hi = min(c for c, _ in items), max(c for c, _ in items)
        query = (sa.select(t.c.seq, t.c.created_at, t.c.model_version, t.c.payload)
                 .where(t.c.worker == worker, t.c.first_counter <= hi, t.c.last_counter >= lo))
        for row in conn.execute(query):
            table = decode(row.payload)
            positions = {i: n for n, i in enumerate(table.column(ID).to_pylist())}
            for _, prediction_id in items:
                if prediction_id in positions:
                    found[prediction_id] = (row.seq, row.created_at, row.model_version, table, positions[prediction_id])
    return found


def labels_since(conn: sa.Connection, since: float) -> dict[str, Any]:
    """Labels given since `since` (a label is never older than its prediction), by prediction id."""
    query = sa.select(feedback.c.prediction_id, feedback.c.label).where(feedback.c.created_at >= since)
    return dict(conn.execute(query).all())


def latest_labelled(engine: sa.Engine, limit: int, model_version: int | None = None,
                    before_seq: int | None = None) -> tuple[LoggedRows, list[Any]]:
    """The latest `limit` logged predictions that have a label (of `model_version`, when given; from
    batches before `before_seq`, when given), oldest first, with their labels as stored.

    Delayed labels make this a window of its own: the newest predictions usually have no label yet,
    so it reaches back past them. Newest batches are read first and each batch's labels are looked
    up by its own ids (on a second connection: the first one streams the batches), so memory stays
    bounded however many labels and predictions there are. Returns (rows, labels), both of length
    <= `limit`."""
    labels: dict[str, Any] = {}
    picked: list[tuple[int, float, int, pa.Table]] = []
    found = 0
    with engine.connect() as conn, engine.connect() as lookup:
        if lookup.execute(sa.select(feedback.c.prediction_id).limit(1)).first() is not None:
            for seq, created_at, version, table in iter_batches(conn, model_version=model_version,
                                                                newest_first=True):
                if before_seq is not None and seq >= before_seq:
                    continue
                ids = table.column(ID).to_pylist()
                here = dict(lookup.execute(sa.select(feedback.c.prediction_id, feedback.c.label)
                                           .where(feedback.c.prediction_id.in_(ids))).all())
                if here:
                    labels.update(here)
                    keep = [n for n, i in enumerate(ids) if i in here]
                    if found + len(keep) > limit:  # only the newest of this batch are needed
                        keep = keep[len(keep) - (limit - found):]
                    picked.append((seq, created_at, version, table.take(keep)))
                    found += len(keep)
                if found >= limit:
                    break
    picked.reverse()  # oldest first
    logged = to_rows(picked)
    return logged, [labels[i] for i in logged.ids]
