"""The prediction log's payloads: `batch_row` writes format 2 (columnar, dictionary-encoded, ids as
counters), `decode` reads it and the format 1 payloads already in users' stores into the same logical
table, and `to_rows`, `find` and `latest_labelled` give the same values for either."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pytest
import sqlalchemy as sa

from everloop.store import Store, prediction_log
from everloop.store._predictions import _id_strings

WORKER = "0123456789abcdef"
CLASSES = ["no", "yes"]


def format1_payload(ids, latencies_ms, labels, proba, classes, features: pa.Table, created_at) -> bytes:
    """A payload exactly as everloop wrote it before format 2 (its `encode`, kept here as the reference)."""
    columns = dict(zip(features.column_names, features.columns))
    columns[prediction_log.ID] = pa.array(ids, type=pa.string())
    columns[prediction_log.CREATED] = pa.array(created_at, type=pa.float64())
    columns[prediction_log.LATENCY] = pa.array(latencies_ms, type=pa.float64())
    columns[prediction_log.PREDICTION] = pa.array(list(labels))
    metadata = {}
    if proba is not None:
        flat = pa.array(np.ascontiguousarray(proba, dtype=np.float64).ravel())
        columns[prediction_log.PROBA] = pa.FixedSizeListArray.from_arrays(flat, proba.shape[1])
        metadata[b"classes"] = orjson.dumps([str(c) for c in classes or []])
    table = pa.table(columns).replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def rows(n: int = 500, seed: int = 0):
    """n predictions of a classifier on mixed features (with nulls, whole numbers, text, bools)."""
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 90, n).astype(float)
    age[::17] = np.nan
    plan = np.array(["basic", "plus", "pro"], dtype=object)[rng.integers(0, 3, n)]
    plan[::13] = None
    features = pa.table({
        "age": pa.array(age, from_pandas=True),  # whole numbers with nulls: stored as int8
        "charges": rng.normal(50, 20, n).round(2),  # whole hundredths: stored as int16 hundredths
        "ratio": rng.random(n),  # other fractions: stored as float64
        "big": rng.integers(-(2**40), 2**40, n),  # int64 past int32: kept
        "plan": pa.array(plan, from_pandas=True),  # repeated text: dictionary-encoded
        "note": pa.array([f"note {i}" for i in range(n)]),  # distinct text: kept
        "member": pa.array(rng.random(n) < 0.5),
        "zero": pa.array([-0.0, 0.0] * (n // 2)),  # -0.0 kept as float64, not narrowed to 0
        "nothing": pa.nulls(n),
    })
    proba = rng.dirichlet([1, 1], n)
    labels = np.asarray(CLASSES, dtype=object)[proba.argmax(axis=1)]
    created = np.repeat([1_700_000_000.25, 1_700_000_001.5], [n // 2, n - n // 2])
    latencies = np.repeat(rng.random(n // 50) * 10, 50)  # one latency per 50-row request
    return features, labels, proba, created, latencies


def logged(table: pa.Table, seq: int = 1) -> prediction_log.LoggedRows:
    return prediction_log.to_rows([(seq, 0.0, 3, table)])


def assert_same_rows(a: prediction_log.LoggedRows, b: prediction_log.LoggedRows) -> None:
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.created_at, b.created_at)
    np.testing.assert_array_equal(a.latency_ms, b.latency_ms)
    np.testing.assert_array_equal(a.model_version, b.model_version)
    pd.testing.assert_frame_equal(a.features, b.features)
    assert a.outputs == b.outputs


def test_a_batch_reads_back_as_the_same_rows_as_the_old_format_gives():
    features, labels, proba, created, latencies = rows()
    ids = [f"{WORKER}{c:x}" for c in range(40, 540)]
    old = prediction_log.decode(format1_payload(ids, latencies, labels.tolist(), proba, CLASSES, features,
                                                created))
    row = prediction_log.batch_row(WORKER, 40, features, labels, proba, CLASSES, created, 3, latencies)
    new = prediction_log.decode(row["payload"])
    assert new.schema.names == old.schema.names
    assert new.schema.metadata == old.schema.metadata
    for name in old.column_names:
        if name != prediction_log.PROBA:  # the new form keeps probabilities to 6 decimals, as answered
            assert new.column(name).equals(old.column(name)), name
    assert_same_rows(logged(new), logged(old))
    assert row | {"payload": None} == {"worker": WORKER, "first_counter": 40, "last_counter": 539, "rows": 500,
                                       "created_at": 1_700_000_000.25, "model_version": 3, "payload": None}
    assert len(row["payload"]) < len(format1_payload(ids, latencies, labels.tolist(), proba, CLASSES,
                                                           features, created))


def test_old_and_new_batches_read_together_and_are_found_by_id(tmp_path: Path):
    store = Store.for_project(tmp_path)
    features, labels, proba, created, latencies = rows(200)
    old_ids = [f"{WORKER}{c:x}" for c in range(1, 201)]
    old = {"worker": WORKER, "first_counter": 1, "last_counter": 200, "rows": 200, "created_at": created[0],
           "model_version": 3,
           "payload": format1_payload(old_ids, latencies, labels.tolist(), proba, CLASSES, features, created)}
    new = prediction_log.batch_row(WORKER, 201, features, labels, proba, CLASSES, created, 3, latencies,
                                   keys=pa.array([f"C{i}" for i in range(200)]))
    with store.engine.begin() as conn:
        conn.execute(store.tables.prediction_batches.insert(), [old, new])
    with store.engine.connect() as conn:
        together = prediction_log.to_rows(list(prediction_log.iter_batches(conn)))
        found = prediction_log.find(conn, [old_ids[7], f"{WORKER}{201 + 9:x}", f"{WORKER}{401:x}", "nope"])
    assert together.ids == old_ids + [f"{WORKER}{c:x}" for c in range(201, 401)]
    assert prediction_log.KEY not in together.features.columns  # never a feature
    assert together.outputs[:200] == together.outputs[200:]
    pd.testing.assert_frame_equal(together.features.iloc[:200],
                                  together.features.iloc[200:].reset_index(drop=True))
    assert sorted(found) == sorted([old_ids[7], f"{WORKER}{210:x}"])
    seq, _, version, table, position = found[f"{WORKER}{210:x}"]
    assert (seq, version, position) == (2, 3, 9)
    assert table.column(prediction_log.KEY)[position].as_py() == "C9"
    assert table.column("plan")[position].as_py() == features.column("plan")[9].as_py()
    store.close()


def test_the_latest_labelled_rows_are_the_same_from_either_format(tmp_path: Path):
    features, labels, proba, created, latencies = rows(100)
    results = []
    for form in ("old", "new"):
        store = Store.for_project(tmp_path / form)
        ids = [f"{WORKER}{c:x}" for c in range(1, 101)]
        if form == "old":
            row = {"worker": WORKER, "first_counter": 1, "last_counter": 100, "rows": 100,
                   "created_at": created[0], "model_version": 3,
                   "payload": format1_payload(ids, latencies, labels.tolist(), proba, CLASSES, features, created)}
        else:
            row = prediction_log.batch_row(WORKER, 1, features, labels, proba, CLASSES, created, 3, latencies)
        with store.engine.begin() as conn:
            conn.execute(store.tables.prediction_batches.insert(), [row])
            conn.execute(store.tables.feedback.insert(), [{"prediction_id": ids[i], "created_at": 1.0,
                                                           "label": CLASSES[i % 2]} for i in (3, 50, 97)])
        results.append(prediction_log.latest_labelled(store.engine, 2))
        store.close()
    (old_rows, old_labels), (new_rows, new_labels) = results
    assert new_labels == old_labels == ["no", "yes"]  # the latest two labelled: rows 50 and 97
    assert new_rows.ids == [f"{WORKER}{51:x}", f"{WORKER}{98:x}"]
    assert_same_rows(new_rows, old_rows)


def test_each_column_comes_back_as_it_was_given():
    features, labels, proba, created, latencies = rows()
    table = prediction_log.decode(prediction_log.batch_row(WORKER, 0, features, labels, proba, CLASSES, created,
                                                           None, latencies)["payload"])
    assert table.select(features.column_names).equals(features)  # types, nulls, -0.0, all of it
    stored = pa.ipc.open_stream(prediction_log.batch_row(WORKER, 0, features, labels, proba, CLASSES, created,
                                                         None, latencies)["payload"]).read_all().schema
    assert stored.field("age").type == pa.int8() and stored.field("charges").type == pa.int16()
    assert stored.field("ratio").type == pa.float64()
    assert stored.field("big").type == pa.int64() and stored.field("zero").type == pa.float64()
    assert stored.field("plan").type == pa.dictionary(pa.int8(), pa.string())
    assert stored.field("note").type == pa.string()
    assert stored.field(prediction_log.PREDICTION).type == pa.dictionary(pa.int8(), pa.string())
    assert prediction_log.ID not in stored.names  # the ids are the worker and counters


def test_labels_keep_their_own_types():
    features = pa.table({"x": [1.5, 2.5, 3.5]})
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    for classes in ([0, 1], [False, True], ["0", "1"]):
        labels = np.asarray(classes, dtype=object)[proba.argmax(axis=1)]
        table = prediction_log.decode(prediction_log.batch_row(WORKER, 0, features, labels, proba, classes, 1.0,
                                                               1)["payload"])
        assert table.column(prediction_log.PREDICTION).to_pylist() == labels.tolist()
        assert [type(v) for v in table.column(prediction_log.PREDICTION).to_pylist()] == [type(classes[0])] * 3
    # labels that are not proba's argmax (a threshold of the caller's): stored as given
    labels = np.array([1, 1, 1])
    table = prediction_log.decode(prediction_log.batch_row(WORKER, 0, features, labels, proba, [0, 1], 1.0,
                                                           1)["payload"])
    assert table.column(prediction_log.PREDICTION).to_pylist() == [1, 1, 1]
    assert logged(table).outputs[0] == {"prediction": 1, "probabilities": {"0": 0.9, "1": 0.1}}
    # regression: values, no probabilities; no latency: NaN
    table = prediction_log.decode(prediction_log.batch_row(WORKER, 0, features, np.array([0.25, 1e-9, -3.0]),
                                                           None, None, 1.0, 1)["payload"])
    rows_ = logged(table)
    assert rows_.outputs == [{"prediction": 0.25}, {"prediction": 1e-9}, {"prediction": -3.0}]
    assert np.isnan(rows_.latency_ms).all() and rows_.created_at.tolist() == [1.0, 1.0, 1.0]


def test_ids_with_gaps_and_large_counters():
    features = pa.table({"x": [1.0, 2.0, 3.0, 4.0]})
    labels, proba = np.array([0.0, 1.0, 2.0, 3.0]), None
    counters = np.array([5, 6, 9, 16**15 - 1], dtype=np.uint64)
    row = prediction_log.batch_row(WORKER, 0, features, labels, proba, None, 2.0, 1, np.array([1.5, 2, 3, 3]),
                                   counters=counters)
    assert (row["first_counter"], row["last_counter"]) == (5, 16**15 - 1)
    table = prediction_log.decode(row["payload"])
    assert table.column(prediction_log.LATENCY).to_pylist() == [1.5, 2, 3, 3]  # distinct: stored plain
    assert table.column(prediction_log.ID).to_pylist() == [f"{WORKER}{c:x}" for c in (5, 6, 9, 16**15 - 1)]
    assert [prediction_log.split_id(i)[1] for i in table.column(prediction_log.ID).to_pylist()] == counters.tolist()


@pytest.mark.parametrize("counters", [[0, 1, 15, 16, 255, 256, 4095, 4096], [16**k for k in range(15)],
                                      [16**k - 1 for k in range(1, 16)], list(range(10**6, 10**6 + 50))])
def test_id_strings_are_the_services_ids(counters):
    expected = [f"{WORKER}{c:x}" for c in counters]
    assert _id_strings(WORKER.encode(), np.array(counters, dtype=np.uint64)).to_pylist() == expected


def test_a_batch_job_sized_call_round_trips():
    n = 100_000
    rng = np.random.default_rng(1)
    features = pa.table({"x": rng.normal(size=n), "k": rng.integers(0, 5, n),
                         "c": pa.array(np.array(["a", "b", "c"])[rng.integers(0, 3, n)])})
    proba = rng.dirichlet([1, 1, 1], n)
    labels = np.asarray(["a", "b", "c"], dtype=object)[proba.argmax(axis=1)]
    row = prediction_log.batch_row(WORKER, 10**9, features, labels, proba, ["a", "b", "c"], 5.0, 2,
                                   keys=pa.array(np.arange(n) * 7))
    table = prediction_log.decode(row["payload"])
    assert row["rows"] == n and row["last_counter"] == 10**9 + n - 1
    assert table.select(["x", "k", "c"]).equals(features)
    assert table.column(prediction_log.KEY).to_numpy().tolist() == (np.arange(n) * 7).tolist()
    assert table.column(prediction_log.ID)[n - 1].as_py() == f"{WORKER}{10**9 + n - 1:x}"
    assert table.column(prediction_log.PREDICTION).to_pylist() == labels.tolist()
    np.testing.assert_array_equal(np.asarray(table.column(prediction_log.PROBA).combine_chunks().flatten())
                                  .reshape(n, 3), np.round(proba, 6))
    assert len(row["payload"]) / n < 40  # 8 (x) + 1 (k) + 1 (c) + 4 (key) + 1 (label) + 12 (proba) bytes


@pytest.mark.parametrize("change, message", [
    ({"labels": np.zeros(2)}, "labels has 2 rows; features has 3"),
    ({"latencies_ms": np.zeros(4)}, "latencies_ms has 4 rows; features has 3"),
    ({"created_at": np.zeros(2)}, "created_at has 2 rows; features has 3"),
    ({"keys": pa.array([1])}, "keys has 1 rows; features has 3"),
    ({"worker": "abc"}, "worker 'abc' must be 16 characters"),
    ({"first_counter": 16**15 - 2}, "do not fit an id"),
    ({"counters": np.array([3, 5, 4])}, "counters must increase"),
    ({"features": pa.table({"x": pa.array([], pa.float64())}), "labels": np.zeros(0)}, "no rows"),
])
def test_bad_arguments_are_named(change, message):
    arguments = {"worker": WORKER, "first_counter": 0, "features": pa.table({"x": [1.0, 2.0, 3.0]}),
                 "labels": np.zeros(3), "proba": None, "classes": None, "created_at": 1.0, "model_version": 1}
    with pytest.raises(ValueError, match=message):
        prediction_log.batch_row(**(arguments | change))


def test_a_stored_batch_is_one_row_of_the_table(tmp_path: Path):
    store = Store.for_project(tmp_path)
    features, labels, proba, created, latencies = rows(50)
    row = prediction_log.batch_row(WORKER, 7, features, labels, proba, CLASSES, created, 4, latencies)
    with store.engine.begin() as conn:
        conn.execute(store.tables.prediction_batches.insert(), [row])
    with store.engine.connect() as conn:
        stored = conn.execute(sa.select(store.tables.prediction_batches)).one()
    assert (stored.worker, stored.first_counter, stored.last_counter, stored.rows, stored.model_version) == \
        (WORKER, 7, 56, 50, 4)
    store.close()


@pytest.mark.parametrize("values, stored", [
    ([0.29, 1.1, -2.5, 1e6 / 3], pa.float64()),  # a third: not hundredths
    ([0.29, 1.1, -2.5, 12345.67], pa.int32()),  # hundredths
    ([1.005, 2.0], pa.float64()),  # 1.005 * 100 is 100.49999...: not exactly hundredths
    ([0.07, None, 19.99, float("nan")], pa.int16()),  # NaN from pandas: null
    ([2.0**31, 0.5], pa.float64()),  # past int32
    ([1.0, float("inf")], pa.float64()),
    ([0.0, -0.0, 3.0], pa.float64()),
    ([7, -3, 120], pa.int8()),  # int64 in, int8 stored, int64 out
])
def test_numbers_come_back_bit_for_bit(values, stored):
    column = pa.array(values, from_pandas=True) if any(isinstance(v, float) for v in values) else pa.array(values)
    features = pa.table({"v": column})
    row = prediction_log.batch_row(WORKER, 0, features, np.zeros(len(values)), None, None, 1.0, 1)
    assert pa.ipc.open_stream(row["payload"]).read_all().schema.field("v").type == stored
    back = prediction_log.decode(row["payload"]).column("v").combine_chunks()
    assert back.type == column.type and back.is_valid().equals(column.is_valid())
    np.testing.assert_array_equal(np.asarray(back.fill_null(0)).view(np.int64),
                                  np.asarray(column.fill_null(0)).view(np.int64))  # the very bits
