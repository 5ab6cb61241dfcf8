"""The prediction log's storage: one row per model call (a micro-batch), its predictions in one Arrow
IPC payload.

A busy service predicts a hundred thousand rows a second, and a batch job millions a minute. As a
JSON document and an indexed row per prediction, the log cost ~4 us of CPU per row (as much as
predicting it); as one row per batch with the rows' columns in Arrow, the monitor reads windows as
columns, without parsing JSON.

Prediction ids are `<worker><counter>` (16 hex digits naming the worker process, then a hex counter);
a batch row records the worker and the range of counters it holds, so an id is found by an indexed
range lookup and confirmed in the batch's own list of ids.

Payload formats (`decode` reads both and returns the same logical table for either):
- 1 (older stores): the features as given, the ids as text, one float64 time and latency per row, the
  predicted values, the probabilities as float64; lz4-compressed. ~1 us of writer CPU per row.
- 2: the writer's cost per row was mostly per-row Python objects and bytes (SQLite's insert costs
  ~2 ns of CPU a byte), so: no ids (the worker and first counter are in the schema's metadata, and
  counters follow on unless a `__counter` column says otherwise), times and latencies run-length
  encoded, text and predicted classes dictionary-encoded with the narrowest indices, numbers that are
  whole (or whole hundredths) in the narrowest integer type, probabilities as integer millionths
  (what the service answers: rounded to 6 decimals), no compression (see `encode`). Field metadata
  records what `decode` restores. ~31 bytes a prediction on the demo's 15 features (format 1: ~92).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from everloop.store._meta import feedback, prediction_batches

ID_PREFIX_LENGTH = 16
MAX_COUNTER = 16**15 - 1  # an id's counter has at most 15 hex digits (see split_id)
ID, CREATED, LATENCY, PREDICTION, PROBA = "__id", "__created_at", "__latency_ms", "__prediction", "__proba"
KEY = "__key"  # the input's own id (a batch job's id column), when given: never a feature
INTERNAL = (ID, CREATED, LATENCY, PREDICTION, PROBA, KEY)
COUNTER = "__counter"  # format 2 only: each row's counter minus the first, when they do not follow on

FORMAT = b"everloop.log"  # schema metadata key of format 2 payloads (absent in format 1)
_TYPE = b"type"  # field metadata: the type a narrowed column is restored to
_SCALE = b"scale"  # field metadata: a narrowed column's integers are its values times this
_MILLIONTHS = b"millionths"  # field metadata: probabilities stored as integer millionths
_INTEGERS = [(t, int(np.iinfo(t).min), int(np.iinfo(t).max)) for t in (np.int8, np.int16, np.int32)]
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_HEX_LIMITS = np.array([16**k for k in range(1, 15)], dtype=np.uint64)  # a counter below 16**k has <= k digits


def split_id(prediction_id: str) -> tuple[str, int] | None:
    """(worker, counter) of a prediction id; None for anything the service cannot have issued."""
    worker, counter = prediction_id[:ID_PREFIX_LENGTH], prediction_id[ID_PREFIX_LENGTH:]
    if len(worker) < ID_PREFIX_LENGTH or not counter or len(counter) > 15:
        return None
    try:
        return worker, int(counter, 16)
    except ValueError:
        return None


def batch_row(worker: str, first_counter: int, features: pa.Table, labels: np.ndarray, proba: np.ndarray | None,
              classes: Sequence[Any] | None, created_at: float | np.ndarray, model_version: int | None,
              latencies_ms: np.ndarray | None = None, keys: pa.Array | pa.ChunkedArray | None = None, *,
              counters: np.ndarray | None = None, labels_from_proba: bool = False) -> dict[str, Any]:
    """One row of `prediction_batches` (a dict to insert) holding `n = features.num_rows` predictions.

    Their ids are `worker` + hex counters `first_counter .. first_counter + n - 1` (the service's id
    form, so `find` and `everloop feedback` find them), or `worker` + `counters` when given (increasing;
    the service skips the counters of rows it refused). Columnar all the way: no Python object per
    row, so a 100k-row call costs milliseconds.

    worker: 16 characters (the ids' prefix). features: n rows by name, any Arrow types (text and
    dictionary columns are stored dictionary-encoded, whole numbers in the narrowest integer type;
    `decode` gives them back as plain columns of the given types). labels: (n,) predicted value per
    row; for classifiers `classes[proba.argmax(axis=1)]` (as `TrainedModel.predict_conformed` gives
    them), stored as class codes, else as values. proba: (n, len(classes)) class probabilities or None
    (regression). classes: the model's classes, in proba's column order. created_at: seconds since the
    epoch, one for all rows or (n,). model_version: None for none. latencies_ms: (n,) milliseconds per
    row, or None (stored as nulls: decoded as NaN). keys: (n,) the input's id per row (stored as
    `__key`, never a feature), or None. labels_from_proba: the caller's labels are proba's argmax by
    construction (`predict_conformed`'s): stored as codes without comparing them value by value.

    Raises ValueError when a length does not match n, n is 0, the worker is not 16 characters, counters
    do not increase, or a counter would not fit an id (at most 15 hex digits)."""
    n = features.num_rows
    if n == 0:
        raise ValueError("batch_row: no rows (features has 0 rows)")
    if len(worker) != ID_PREFIX_LENGTH:
        raise ValueError(f"batch_row: worker {worker!r} must be {ID_PREFIX_LENGTH} characters (the ids' prefix)")
    for name, value in (("labels", labels), ("proba", proba), ("latencies_ms", latencies_ms), ("keys", keys),
                        ("counters", counters), ("created_at", None if np.ndim(created_at) == 0 else created_at)):
        if value is not None and len(value) != n:
            raise ValueError(f"batch_row: {name} has {len(value)} rows; features has {n}")
    offsets = None
    if counters is not None:
        counters = np.asarray(counters, dtype=np.uint64)
        if n > 1 and not (counters[1:] > counters[:-1]).all():
            raise ValueError("batch_row: counters must increase")
        first_counter = int(counters[0])
        last_counter = int(counters[-1])
        if last_counter - first_counter != n - 1:  # not consecutive: each row's offset is stored
            offsets = counters - np.uint64(first_counter)
    else:
        last_counter = first_counter + n - 1
    if first_counter < 0 or last_counter > MAX_COUNTER:
        raise ValueError(f"batch_row: counters {first_counter}..{last_counter} do not fit an id "
                         f"(0..{MAX_COUNTER}: at most 15 hex digits)")
    payload = encode(worker, first_counter, features, labels, proba, classes, created_at, latencies_ms, keys,
                     offsets, labels_from_proba)
    first_time = float(created_at if np.ndim(created_at) == 0 else created_at[0])
    return {"worker": worker, "first_counter": first_counter, "last_counter": last_counter, "rows": n,
            "created_at": first_time, "model_version": model_version or 0, "payload": payload}


def encode(worker: str, first_counter: int, features: pa.Table, labels: np.ndarray, proba: np.ndarray | None,
           classes: Sequence[Any] | None, created_at: float | np.ndarray, latencies_ms: np.ndarray | None = None,
           keys: pa.Array | pa.ChunkedArray | None = None, offsets: np.ndarray | None = None,
           labels_from_proba: bool = False) -> bytes:
    """Logged rows as a format 2 Arrow IPC stream (see the module's docstring; `batch_row` checks the
    arguments). Uncompressed: on the demo's rows (31 bytes a prediction) lz4 took ~50 ns of CPU a row
    more to save 3 bytes, which SQLite inserts for ~8 ns (zstd: 12 bytes for ~150 ns)."""
    n = features.num_rows
    columns: dict[str, pa.Array] = {}
    fields: list[pa.Field] = []

    def put(name: str, array: pa.Array, metadata: dict[bytes, bytes] | None = None) -> None:
        columns[name] = array
        fields.append(pa.field(name, array.type, metadata=metadata))

    for name, column in zip(features.column_names, features.columns):
        put(name, *_compact(column))
    if keys is not None:
        put(KEY, *_compact(keys, dictionary=False))
    if offsets is not None:
        put(COUNTER, *_compact(pa.array(offsets, type=pa.uint64()), dictionary=False))
    put(CREATED, _runs(created_at, n))
    put(LATENCY, _runs(latencies_ms, n))
    metadata = {FORMAT: b"2", b"worker": worker.encode(), b"first": str(first_counter).encode()}
    put(PREDICTION, _labels(labels, proba, classes, labels_from_proba))
    if proba is not None:
        proba = np.asarray(proba, dtype=np.float64)
        metadata[b"classes"] = orjson.dumps([str(c) for c in classes or []])
        scaled = np.rint(proba * 1e6)  # what np.round(proba, 6) computes before dividing
        if np.isfinite(scaled).all() and scaled.min(initial=0) >= 0 and scaled.max(initial=0) <= 1e6:
            flat = pa.array(scaled.astype(np.uint32).ravel())
            put(PROBA, pa.FixedSizeListArray.from_arrays(flat, proba.shape[1]), {_MILLIONTHS: b"1"})
        else:  # not probabilities in [0, 1]: kept as they are
            put(PROBA, pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(proba).ravel()),
                                                         proba.shape[1]))
    table = pa.Table.from_arrays(list(columns.values()), schema=pa.schema(fields, metadata=metadata))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode(payload: bytes) -> pa.Table:
    """A payload (either format) as its logical table: the features by name (as given), `__key` when
    stored, then `__id` (text), `__created_at` and `__latency_ms` (float64 per row), `__prediction`
    (the predicted values) and, for classifiers, `__proba` (fixed-size lists of float64; schema
    metadata `classes`: the class names as text)."""
    table = pa.ipc.open_stream(payload).read_all()
    metadata = table.schema.metadata or {}
    if FORMAT not in metadata:  # format 1: already the logical table
        return table
    columns = {field.name: _restore(field, column) for field, column in zip(table.schema, table.columns)}
    first = int(metadata[b"first"])
    if COUNTER in columns:
        counters = columns.pop(COUNTER).to_numpy() + np.uint64(first)
    else:
        counters = np.arange(first, first + table.num_rows, dtype=np.uint64)
    columns[ID] = pa.chunked_array([_id_strings(metadata[b"worker"], counters)])
    order = ([name for name in columns if name not in INTERNAL]
             + [name for name in (KEY, ID, CREATED, LATENCY, PREDICTION, PROBA) if name in columns])
    out = {b"classes": metadata[b"classes"]} if b"classes" in metadata else {}
    return pa.table({name: columns[name] for name in order}).replace_schema_metadata(out)


def _compact(column: pa.Array | pa.ChunkedArray, dictionary: bool = True) -> tuple[pa.Array, dict | None]:
    """A column in fewer bytes, and the field metadata `decode` restores it with: text dictionary-encoded
    (when values repeat), dictionary indices and whole numbers in the narrowest integer type."""
    if isinstance(column, pa.ChunkedArray):
        array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    else:
        array = column if isinstance(column, pa.Array) else pa.array(column)
    kind = array.type
    if dictionary and (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        encoded = array.dictionary_encode()
        if 2 * len(encoded.dictionary) <= len(array):  # repeats: cheaper as codes
            array, kind = encoded, encoded.type
    if pa.types.is_dictionary(kind):
        indices, _ = _narrowest(array.indices)
        return pa.DictionaryArray.from_arrays(indices, array.dictionary), None
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        narrowed, scale = _narrowest(array, (1, 100) if pa.types.is_floating(kind) else (1,))
        if narrowed is not array:
            return narrowed, {_TYPE: str(kind).encode(), _SCALE: str(scale).encode()}
    return array, None


def _narrowest(array: pa.Array, scales: tuple[int, ...] = (1,)) -> tuple[pa.Array, int]:
    """Integers, or floats that are all whole numbers (scale 1) or whole hundredths (scale 100: prices,
    rounded measures), as the smallest signed integer type that holds them times the scale, when
    dividing by it gives every value back exactly (nulls kept; not -0.0, which would come back as 0.0).
    Returns (that array, scale), or (the array itself, 1). In numpy on the array's own buffers: a
    pyarrow compute call costs ~10 us, which on every column of every batch adds up to more than the
    rows themselves."""
    kind, n = array.type, len(array)
    if array.null_count == n or kind.bit_width == 8:
        return array, 1
    width = kind.bit_width // 8
    validity, data = array.buffers()[:2]
    values = np.frombuffer(data, dtype=kind.to_pandas_dtype(), count=n, offset=array.offset * width)
    valid = None
    if array.null_count:
        valid = np.unpackbits(np.frombuffer(validity, dtype=np.uint8), count=array.offset + n,
                              bitorder="little")[array.offset:].view(bool)
    present = values if valid is None else values[valid]
    low, high = present.min().item(), present.max().item()  # Python numbers: cheap scalar arithmetic
    floating = pa.types.is_floating(kind)
    if floating and not (math.isfinite(low) and math.isfinite(high)):  # NaN, infinities
        return array, 1
    for scale in scales:
        # round(): half to even, as np.rint; the exact check below decides anyway
        target = next((t for t, smallest, largest in _INTEGERS
                       if smallest <= round(low * scale) and round(high * scale) <= largest), None)
        if target is None or np.dtype(target).itemsize >= width:
            return array, 1  # a larger scale needs a wider type still
        if floating and not _exact(present[:64], scale, target):  # a first look spares most columns a pass
            continue
        whole = (present if scale == 1 else np.rint(present * scale)).astype(target)
        if floating:
            if not np.array_equal(whole / scale if scale > 1 else whole, present):
                continue  # fractions (of hundredths)
            if low <= 0 <= high and np.signbit(present[whole == 0]).any():  # -0.0
                return array, 1
        if valid is None:
            return pa.array(whole), scale
        full = np.zeros(n, dtype=target)
        full[valid] = whole
        return pa.array(full, mask=~valid), scale
    return array, 1


def _exact(values: np.ndarray, scale: int, target: type) -> bool:
    """Whether `values` times `scale` are whole numbers that give `values` back exactly."""
    whole = (values if scale == 1 else np.rint(values * scale)).astype(target)
    return np.array_equal(whole / scale if scale > 1 else whole, values)


def _runs(values: float | np.ndarray | None, n: int) -> pa.Array:
    """float64 per row as runs of equal values (a time per model call, a latency per request), or as
    plain values when runs would not be shorter."""
    if values is None or np.ndim(values) == 0:
        value = pa.array([values], type=pa.float64())
        return pa.RunEndEncodedArray.from_arrays(pa.array(np.array([n], dtype=np.int32)), value)
    values = np.asarray(values, dtype=np.float64)
    ends = np.flatnonzero(values[1:] != values[:-1]).astype(np.int32) + 1
    if 2 * (len(ends) + 1) > n:  # mostly distinct: plain is smaller
        return pa.array(values)
    starts = np.concatenate([[0], ends])
    return pa.RunEndEncodedArray.from_arrays(pa.array(np.append(ends, np.int32(n))), pa.array(values[starts]))


def _labels(labels: np.ndarray, proba: np.ndarray | None, classes: Sequence[Any] | None,
            from_proba: bool = False) -> pa.Array:
    """Predicted classes as codes into the classes (when they are proba's argmax, as the service and batch
    scoring predict them; `from_proba`: the caller knows they are, so they are not compared), else the
    values as they are."""
    labels = np.asarray(labels)
    if proba is not None and classes:
        codes = np.asarray(proba).argmax(axis=1)
        values = np.empty(len(classes), dtype=object)
        values[:] = list(classes)
        dictionary = pa.array(list(classes))
        # equal, and of the same Arrow type (1 == True == 1.0, but each decodes as its own type)
        if (from_proba or np.array_equal(values[codes], labels)) and pa.array(labels[:1]).type == dictionary.type:
            codes = codes.astype(np.int8 if len(classes) < 128 else np.int32)
            return pa.DictionaryArray.from_arrays(pa.array(codes), dictionary)
    return pa.array(labels) if labels.dtype != object else pa.array(labels.tolist())


def _restore(field: pa.Field, column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A stored format 2 column as the plain column it was given as."""
    kind = column.type
    metadata = field.metadata or {}
    if pa.types.is_run_end_encoded(kind):
        return pc.run_end_decode(column)
    if pa.types.is_dictionary(kind):
        return column.cast(kind.value_type)
    if _TYPE in metadata:
        kind = pa.type_for_alias(metadata[_TYPE].decode())
        scale = int(metadata.get(_SCALE, b"1"))
        restored = column.cast(kind)
        return restored if scale == 1 else pc.divide(restored, pa.scalar(scale, kind))
    if _MILLIONTHS in metadata:
        size = kind.list_size
        chunks = [pa.FixedSizeListArray.from_arrays(pa.array(chunk.flatten().to_numpy() / 1e6), size)
                  for chunk in column.chunks]
        return pa.chunked_array(chunks, type=pa.list_(pa.float64(), size))
    return column


def id_strings(worker: str, counters: np.ndarray) -> pa.Array:
    """Prediction ids `worker` + each counter (>= 0) in lower-case hex, as an Arrow string array: the ids
    the service gives, built without a Python string per row (a batch job's `prediction_id` column)."""
    return _id_strings(worker.encode("ascii"), np.asarray(counters, dtype=np.uint64))


def _id_strings(worker: bytes, counters: np.ndarray) -> pa.Array:
    """`worker` + each counter in lower-case hex (as the service writes ids), without a Python string per
    row: every id's 32 possible characters in one byte matrix (the counter's 8 bytes as 16 hex digits),
    then each row's used part (the prefix and the digits from the first significant one) as one buffer."""
    n = len(counters)
    digits = np.searchsorted(_HEX_LIMITS, counters, side="right") + 1  # hex digits of each counter
    octets = counters.astype(">u8").view(np.uint8).reshape(n, 8)
    matrix = np.empty((n, ID_PREFIX_LENGTH + 16), dtype=np.uint8)
    matrix[:, :ID_PREFIX_LENGTH] = np.frombuffer(worker, dtype=np.uint8)
    matrix[:, ID_PREFIX_LENGTH::2] = _HEX[octets >> 4]
    matrix[:, ID_PREFIX_LENGTH + 1::2] = _HEX[octets & 15]
    used = np.ones(matrix.shape, dtype=bool)
    used[:, ID_PREFIX_LENGTH:] = np.arange(16) >= (16 - digits)[:, None]
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(ID_PREFIX_LENGTH + digits, out=offsets[1:])
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(matrix[used]))


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
