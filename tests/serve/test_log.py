"""The service's prediction log writer: the batcher's entries (feature columns as numpy arrays or a
checked frame, ids as answered) merged per model version into format 2 batch rows, and read back as
exactly what was answered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from everloop.serve._log import LogEntry, PredictionLog, batch_row
from everloop.store import Store, prediction_log

PREFIX = "fedcba9876543210"
CLASSES = [0, 1]


def entry(first: int, n: int, version: int = 1, seed: int = 0, skip: tuple[int, ...] = ()) -> LogEntry:
    """The answered rows of one model call of n rows whose ids start at counter `first` (rows at `skip`
    refused: their ids are not logged), with fast-path columns: floats (NaN for missing) and text."""
    rng = np.random.default_rng(seed)
    keep = [p for p in range(n) if p not in skip]
    plan = np.array(["basic", "pro", None], dtype=object)[rng.integers(0, 3, n)][keep]
    member = np.array([True, False, None], dtype=object)[rng.integers(0, 3, n)][keep]
    age = rng.integers(18, 80, n).astype(float)[keep]
    age[::5] = np.nan
    proba = rng.dirichlet([1, 1], n)[keep]
    labels = np.asarray(CLASSES, dtype=object)[proba.argmax(axis=1)]
    return LogEntry([f"{PREFIX}{first + p:x}" for p in keep], 1_700_000_000.0 + first, version,
                    {"age": age, "charges": rng.normal(50, 9, n)[keep], "plan": plan, "member": member},
                    labels, proba, CLASSES, [0.5 + first] * len(keep))


def expected(entries: list[LogEntry]) -> pd.DataFrame:
    return pd.DataFrame({name: np.concatenate([e.features[name] for e in entries])
                         for name in entries[0].features})


def read(store: Store) -> tuple[list, prediction_log.LoggedRows]:
    with store.engine.connect() as conn:
        batches = list(prediction_log.iter_batches(conn))
    return batches, prediction_log.to_rows(batches)


def test_entries_read_back_as_they_were_answered(tmp_path: Path):
    store = Store.for_project(tmp_path)
    log = PredictionLog(store, interval=0.05)
    log.start()
    entries = [entry(0, 30, seed=1), entry(30, 20, seed=2), entry(50, 10, seed=3, skip=(2, 7)),
               entry(60, 5, version=2, seed=4)]
    for e in entries:
        assert log.put(e) == 0
    assert log.flush()
    log.stop()
    batches, rows = read(store)
    assert rows.ids == [i for e in entries for i in e.ids]
    assert rows.ids[50:52] == [f"{PREFIX}{50:x}", f"{PREFIX}{51:x}"] and rows.ids[52] == f"{PREFIX}{53:x}"
    assert rows.model_version.tolist() == [1] * 58 + [2] * 5
    assert rows.created_at.tolist() == [e.created_at for e in entries for _ in e.ids]
    assert rows.latency_ms.tolist() == [x for e in entries for x in e.latencies_ms]
    frame = expected(entries)
    pd.testing.assert_frame_equal(rows.features[["age", "charges"]], frame[["age", "charges"]].astype(float))
    assert rows.features["plan"].tolist() == frame["plan"].tolist()  # None stays None
    assert rows.features["member"].tolist() == frame["member"].tolist()
    labels = [y for e in entries for y in e.labels]
    proba = np.round(np.concatenate([e.proba for e in entries]), 6).tolist()
    assert rows.outputs == [{"prediction": y, "probabilities": {"0": p, "1": q}}
                            for y, (p, q) in zip(labels, proba)]
    assert log.written == 63 and log.failed == 0 and log.dropped == 0
    store.close()


def test_ids_that_follow_on_are_not_stored():
    row = batch_row([entry(100, 40), entry(140, 60)])
    stored = pa.ipc.open_stream(row["payload"]).read_all()
    assert (row["worker"], row["first_counter"], row["last_counter"], row["rows"]) == (PREFIX, 100, 199, 100)
    assert prediction_log.COUNTER not in stored.column_names and prediction_log.ID not in stored.column_names
    assert stored.schema.field("plan").type == pa.dictionary(pa.int8(), pa.string())
    assert stored.schema.field("age").type == pa.int8()  # whole numbers, restored to float64 on reading
    # rows the checks refused leave gaps: then the counters are stored
    gap = batch_row([entry(100, 40), entry(141, 60)])
    assert prediction_log.COUNTER in pa.ipc.open_stream(gap["payload"]).read_all().column_names
    ids = prediction_log.decode(gap["payload"]).column(prediction_log.ID).to_pylist()
    assert ids == [f"{PREFIX}{c:x}" for c in [*range(100, 140), *range(141, 201)]]


def test_a_checked_frame_with_date_times_is_logged_as_text():
    frame = pd.DataFrame({"when": pd.to_datetime(["2024-01-02 03:04:05", None]), "plan": ["a", "b"],
                          "n": [1.5, np.nan]})
    e = LogEntry([f"{PREFIX}0", f"{PREFIX}1"], 1.0, 1, frame, np.array([0.5, 1.5]), None, None, [1.0, 2.0])
    rows = prediction_log.to_rows([(1, 1.0, 1, prediction_log.decode(batch_row([e])["payload"]))])
    assert rows.features["when"].iloc[0] == "2024-01-02T03:04:05" and pd.isna(rows.features["when"].iloc[1])
    assert rows.features["plan"].tolist() == ["a", "b"]
    assert rows.features["n"].iloc[0] == 1.5 and np.isnan(rows.features["n"].iloc[1])
    assert rows.outputs == [{"prediction": 0.5}, {"prediction": 1.5}]


def test_a_full_queue_drops_and_counts(tmp_path: Path):
    store = Store.for_project(tmp_path)
    log = PredictionLog(store, max_queue=50)
    assert log.put(entry(0, 40)) == 0
    assert log.put(entry(40, 20)) == 20  # past max_queue: dropped, counted
    assert log.dropped == 20
    log.start()
    log.stop()
    assert read(store)[1].ids == [f"{PREFIX}{c:x}" for c in range(40)]
    store.close()


@pytest.mark.parametrize("text", [np.array([None, None], dtype=object), np.array([np.nan, None], dtype=object)])
def test_a_text_column_with_only_missing_values(text):
    e = LogEntry([f"{PREFIX}0", f"{PREFIX}1"], 1.0, 1, {"plan": text}, np.array([0.5, 1.5]), None, None,
                 [1.0, 1.0])
    rows = prediction_log.to_rows([(1, 1.0, 1, prediction_log.decode(batch_row([e])["payload"]))])
    assert rows.features["plan"].isna().all() and len(rows.features) == 2
