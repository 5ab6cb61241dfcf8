"""A shadow or canary candidate served beside production by a real server (issue 16): answers, routing,
the shadow log, rollout_stats, a failing candidate, a restart mid-rollout."""

from __future__ import annotations

import os
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.pipeline import Pipeline

from everloop import train
from everloop.data import current_schema
from everloop.demo import make_churn
from everloop.features import build_features
from everloop.registry import finish_rollout, start_rollout
from everloop.serve import ServerProcess
from everloop.serve._rollout import BUCKETS, bucket
from everloop.store import prediction_log
from tests.conftest import feature_rows, served_project, wait_for

REPO = str(Path(__file__).resolve().parents[2])  # the server imports RaisingClassifier from here
RAISE_ENV = "EVERLOOP_TEST_CANDIDATE_RAISES"


class RaisingClassifier(ClassifierMixin, BaseEstimator):
    """A classifier that fits and predicts as its inner one, except in a server started with
    RAISE_ENV: "calls" raises when called for requests (the event loop's thread or the shadow worker,
    not the model watcher that loads and warms it), "always" raises on every call (it cannot be loaded)."""

    def __init__(self, estimator: Any = None):
        self.estimator = estimator

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> "RaisingClassifier":
        self.estimator_ = clone(self.estimator or HistGradientBoostingClassifier(max_iter=20)).fit(
            X, y, sample_weight=sample_weight)
        self.classes_ = self.estimator_.classes_
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        mode = os.environ.get(RAISE_ENV)
        serving = threading.current_thread().name in ("MainThread", "everloop-shadow")
        if mode == "always" or (mode == "calls" and serving):
            raise RuntimeError("this candidate raises on every call")
        return self.estimator_.predict_proba(X)

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]




def _ready_rollout(client: httpx.Client, rollout_id: int, loaded: bool = True) -> dict[str, Any]:
    """Wait until /ready reports the rollout (loaded, or with `loaded=False` its error); returns it."""
    def check() -> dict[str, Any] | None:
        body = client.get("/ready").json()
        trial = body.get("rollout")
        if trial and trial["id"] == rollout_id and (trial["loaded"] if loaded else "error" in trial):
            return body
        return None
    return wait_for(check, f"the server to report rollout {rollout_id}")


def _rows(n: int, seed: int = 11, prefix: str = "c") -> list[dict[str, Any]]:
    """`n` request rows, each with its own customer_id (the project's id column)."""
    rows = feature_rows(make_churn(n, seed=seed))
    for k, row in enumerate(rows):
        row["customer_id"] = f"{prefix}{k}"
    return rows


def _logged(store: Any, table: str, **where: Any) -> dict[str, int]:
    """Prediction id -> model version of every logged row of `table` (matching `where`)."""
    t = getattr(store.tables, table)
    query = sa.select(t.c.payload, t.c.model_version)
    for name, value in where.items():
        query = query.where(t.c[name] == value)
    out = {}
    with store.engine.connect() as conn:
        for payload, version in conn.execute(query):
            for i in prediction_log.decode(payload).column(prediction_log.ID).to_pylist():
                out[i] = version
    return out


def _latencies(store: Any, table: str) -> np.ndarray:
    t = getattr(store.tables, table)
    with store.engine.connect() as conn:
        payloads = [p for p, in conn.execute(sa.select(t.c.payload))]
    return np.concatenate([np.asarray(prediction_log.decode(p).column(prediction_log.LATENCY), dtype=float)
                           for p in payloads])


def _stats(store: Any, rollout_id: int) -> dict[int, tuple[int, int, int]]:
    """Version -> (calls, errors, rows) summed over rollout_stats."""
    t = store.tables.rollout_stats
    query = (sa.select(t.c.model_version, sa.func.sum(t.c.calls), sa.func.sum(t.c.errors), sa.func.sum(t.c.rows))
             .where(t.c.rollout == rollout_id).group_by(t.c.model_version))
    with store.engine.connect() as conn:
        return {int(v): (int(c), int(e), int(r)) for v, c, e, r in conn.execute(query)}


@pytest.fixture
def two_versions(tmp_path: Path) -> tuple[Path, Any, Any, int, int]:
    """A served project (v1 in production) and a second version: (folder, spec, store, v1, v2)."""
    folder, spec, store = served_project(tmp_path / "p")
    v2 = train.train(store, spec, reason="candidate").version
    return folder, spec, store, v2 - 1, v2


def _raising_version(store: Any, spec: Any, reason: str) -> int:
    """A new model version whose estimator is a RaisingClassifier."""
    features = build_features(current_schema(store)[1], spec)
    template = Pipeline([("features", features), ("model", RaisingClassifier())])
    return train.train(store, spec, template=template, reason=reason).version


def _answers(client: httpx.Client, rows: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    out = []
    for start in range(0, len(rows), size):
        response = client.post("/predict", json={"instances": rows[start:start + size]})
        assert response.status_code == 200, response.text
        out += response.json()["predictions"]
    return out


def test_shadow_changes_no_answer_and_logs_the_same_ids(two_versions) -> None:
    folder, spec, store, v1, v2 = two_versions
    rows = _rows(600)
    with ServerProcess(folder) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        before = _answers(client, rows, 100)
        rollout = start_rollout(store, spec, v2, "shadow", sample=100, force=True)
        ready = _ready_rollout(client, rollout.id)
        assert ready["ready"] is True and ready["model_version"] == v1
        assert ready["rollout"] == {"id": rollout.id, "mode": "shadow", "candidate_version": v2,
                                    "production_version": v1, "loaded": True, "sample": 100.0}
        model_info = client.get("/model").json()
        assert model_info["version"] == v1 and model_info["rollout"]["candidate_version"] == v2
        after = _answers(client, rows, 100)
        # production answers, unchanged: same predictions and probabilities, no per-row version
        strip = [{k: v for k, v in p.items() if k != "id"} for p in after]
        assert strip == [{k: v for k, v in p.items() if k != "id"} for p in before]
        ids = {p["id"] for p in after}
        shadowed = wait_for(lambda: (lambda got: got if ids <= got.keys() else None)(
            _logged(store, "shadow_batches", rollout=rollout.id)), "the shadow rows to be logged")
        assert {shadowed[i] for i in ids} == {v2}
        assert ids <= _logged(store, "prediction_batches").keys()  # production's rows under the same ids
        stats = wait_for(lambda: (lambda s: s if s.get(v2, (0, 0, 0))[2] >= len(rows) and v1 in s else None)(
            _stats(store, rollout.id)), "rollout_stats")
        assert stats[v2][1] == 0 and stats[v1][1] == 0  # no failed call of either version
        assert stats[v1][2] >= len(rows)
        latencies = _latencies(store, "shadow_batches")
        assert len(latencies) == len(rows) and (latencies > 0).all()
        # a sample: the rows whose prediction id hashes under it, and only those
        finish_rollout(store, rollout.id, "aborted", reason="next: a sample")
        sampled = start_rollout(store, spec, v2, "shadow", sample=30, force=True)
        _ready_rollout(client, sampled.id)
        ids = [p["id"] for p in _answers(client, rows, 100)]
        chosen = {i for i in ids if bucket(i) < 30 * BUCKETS / 100}
        assert 0.2 < len(chosen) / len(ids) < 0.4
        wait_for(lambda: chosen <= _logged(store, "shadow_batches", rollout=sampled.id).keys(), "the sampled rows")
        time.sleep(0.5)  # anything else would have been logged with them
        assert _logged(store, "shadow_batches", rollout=sampled.id).keys() == chosen


def test_canary_share_within_two_points_and_sticky_per_id(two_versions) -> None:
    folder, spec, store, v1, v2 = two_versions
    rows = _rows(2000) * 5
    for k, row in enumerate(rows):  # 10,000 distinct ids
        rows[k] = dict(row, customer_id=f"customer-{k}")
    with ServerProcess(folder) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        rollout = start_rollout(store, spec, v2, "canary", share=25, force=True)
        assert _ready_rollout(client, rollout.id)["rollout"]["share"] == 25.0
        first = _answers(client, rows, 2500)
        versions = [p["model_version"] for p in first]  # every row names the version that answered it
        assert set(versions) == {v1, v2}
        share = versions.count(v2) / len(versions) * 100
        assert 23 <= share <= 27, share
        # sticky: the same ids, sent again in another order and grouping, get the same versions
        order = np.random.default_rng(5).permutation(len(rows))
        again = _answers(client, [rows[k] for k in order], 3333)
        assert [p["model_version"] for p in again] == [versions[k] for k in order]
        # the routing is the stable hash of the id, the same in every worker and restart
        assert versions == [v2 if bucket(r["customer_id"]) < 25 * BUCKETS / 100 else v1 for r in rows]
        # each version's rows logged under its own version
        ids = {p["id"]: p["model_version"] for p in first}
        logged = wait_for(lambda: (lambda got: got if ids.keys() <= got.keys() else None)(
            _logged(store, "prediction_batches")), "the canary rows to be logged")
        assert {i: logged[i] for i in ids} == ids
        # a lone row without an id: one version, named in the body and (MLflow) in a header
        response = client.post("/invocations", json={"dataframe_records": rows[:3]})
        assert response.status_code == 200
        assert response.headers["x-everloop-model-version"].split(",") == [str(v) for v in versions[:3]]
        lone = {k: v for k, v in rows[0].items() if k != "customer_id"}
        answer = client.post("/predict", json={"features": lone}).json()
        assert answer["model_version"] == answer["predictions"][0]["model_version"] in (v1, v2)


def test_a_candidate_that_raises_never_fails_a_request_and_is_counted(two_versions, monkeypatch) -> None:
    folder, spec, store, v1, _ = two_versions
    monkeypatch.syspath_prepend(REPO)
    bad = _raising_version(store, spec, "raises when serving")
    rows = _rows(400)
    env = {RAISE_ENV: "calls", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with ServerProcess(folder, env=env) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        rollout = start_rollout(store, spec, bad, "canary", share=50, force=True)
        _ready_rollout(client, rollout.id)  # loaded by the watcher: it raises only for requests
        answers = _answers(client, rows, 50)
        assert {p["model_version"] for p in answers} == {v1}  # production answered every row
        stats = wait_for(lambda: (lambda s: s if s.get(bad, (0, 0, 0))[1] > 0 else None)(_stats(store, rollout.id)),
                      "the candidate's errors in rollout_stats")
        calls, errors, counted = stats[bad]
        assert errors == calls > 0 and 0 < counted < len(rows)  # every call failed; about half the rows
        assert stats[v1] == (stats[v1][0], 0, len(rows))
        # the same in shadow: production's answers only, the failures counted
        finish_rollout(store, rollout.id, "rolled_back", reason="raises")
        shadow = start_rollout(store, spec, bad, "shadow", sample=100, force=True)
        _ready_rollout(client, shadow.id)
        _answers(client, rows, 100)
        stats = wait_for(lambda: (lambda s: s if s.get(bad, (0, 0, 0))[2] >= len(rows) else None)(
            _stats(store, shadow.id)), "the shadow candidate's errors in rollout_stats")
        assert stats[bad][1] == stats[bad][0] > 0
        assert _logged(store, "shadow_batches", rollout=shadow.id) == {}
        assert "everloop_rollout_failed_calls_total" in client.get("/metrics").text


def test_a_candidate_that_cannot_be_loaded_is_reported_and_counted(two_versions, monkeypatch) -> None:
    folder, spec, store, v1, _ = two_versions
    monkeypatch.syspath_prepend(REPO)
    bad = _raising_version(store, spec, "raises everywhere")
    env = {RAISE_ENV: "always", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with ServerProcess(folder, env=env) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        rollout = start_rollout(store, spec, bad, "canary", share=100, force=True)
        body = _ready_rollout(client, rollout.id, loaded=False)
        assert client.get("/ready").status_code == 200 and body["model_version"] == v1
        assert body["rollout"]["loaded"] is False
        assert f"candidate model v{bad} not loaded" in body["rollout"]["error"]
        assert "raises on every call" in body["rollout"]["error"]
        assert client.get("/model").json()["rollout"]["loaded"] is False
        answers = _answers(client, _rows(100), 20)
        assert {p["model_version"] for p in answers} == {v1}
        stats = wait_for(lambda: (lambda s: s if s.get(bad, (0, 0, 0))[2] >= 100 else None)(
            _stats(store, rollout.id)), "the unloaded candidate's calls in rollout_stats")
        assert stats[bad][1] == stats[bad][0] > 0


def test_a_restart_mid_rollout_resumes_it(two_versions) -> None:
    folder, spec, store, v1, v2 = two_versions
    rows = _rows(1000)
    rollout = None
    with ServerProcess(folder) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        rollout = start_rollout(store, spec, v2, "canary", share=40, force=True)
        _ready_rollout(client, rollout.id)
        before = [p["model_version"] for p in _answers(client, rows, 500)]
    with ServerProcess(folder) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        ready = client.get("/ready").json()  # loaded at start, before the first request
        assert ready["rollout"]["id"] == rollout.id and ready["rollout"]["loaded"] is True
        after = [p["model_version"] for p in _answers(client, rows, 500)]
        assert after == before and v2 in after
        # promoted: production becomes the candidate, the rollout is no longer reported
        finish_rollout(store, rollout.id, "promoted", reason="good")
        wait_for(lambda: (lambda b: b if b.get("model_version") == v2 and "rollout" not in b else None)(
            client.get("/ready").json()), "the promotion to be served")
        answer = client.post("/predict", json={"instances": rows[:5]}).json()
        assert answer["model_version"] == v2 and "model_version" not in answer["predictions"][0]


# -- small and fast ----------------------------------------------------------------------------------


def test_shadow_entries_go_to_shadow_batches_and_rollout_stats_are_deltas(tmp_path: Path) -> None:
    from everloop.serve._log import PredictionLog
    from everloop.store import Store
    from tests.serve.test_log import entry

    store = Store.for_project(tmp_path)
    log = PredictionLog(store, interval=0.05, ledger=False)
    log.stats_interval = 3600  # written when forced only: the rows below are exactly these writes
    log.start()
    production, shadow = entry(0, 10), entry(0, 10, version=2, seed=5)
    shadow.rollout = 7
    assert log.put(production) == 0 and log.put(shadow) == 0
    log.count_call(7, 1, 10, False)
    log.count_call(7, 2, 6, True)
    log.count_call(7, 2, 4, False)
    assert log.flush()
    log._write_stats(force=True)
    log.count_call(7, 2, 3, True)
    log.stop()  # the last counts, since the write before
    assert _logged(store, "prediction_batches") == dict.fromkeys(production.ids, 1)
    assert _logged(store, "shadow_batches", rollout=7) == dict.fromkeys(production.ids, 2)
    t = store.tables.rollout_stats
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.rollout, t.c.model_version, t.c.calls, t.c.errors, t.c.rows)
                            .order_by(t.c.id)).all()
    assert [tuple(r) for r in rows] == [(7, 1, 1, 0, 10), (7, 2, 2, 1, 10), (7, 2, 1, 1, 3)]
    store.close()


def test_interleaved_shadow_calls_are_written_as_one_batch_row_per_table(tmp_path: Path) -> None:
    # production and shadow entries alternate in the queue (one pair per model call): grouped as they
    # come, each call became a batch row of its own (the shadow bench measured ~4x the server CPU)
    from everloop.serve._log import PredictionLog
    from everloop.store import Store
    from tests.serve.test_log import entry

    store = Store.for_project(tmp_path)
    log = PredictionLog(store, interval=0.05, ledger=False)
    calls = [entry(10 * k, 10) for k in range(5)]
    for k, production in enumerate(calls):  # all queued before the writer starts: its first drain takes them
        shadow = entry(10 * k, 10, version=2, seed=k)
        shadow.rollout = 3
        assert log.put(production) == 0 and log.put(shadow) == 0
    log.start()
    assert log.flush()
    log.stop()
    t = store.tables
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.prediction_batches)).scalar() == 1
        assert conn.execute(sa.select(sa.func.count()).select_from(t.shadow_batches)).scalar() == 1
    ids = [i for production in calls for i in production.ids]
    assert _logged(store, "prediction_batches") == dict.fromkeys(ids, 1)
    assert _logged(store, "shadow_batches", rollout=3) == dict.fromkeys(ids, 2)
    store.close()


def test_a_split_request_is_answered_in_its_row_order() -> None:
    from everloop.serve._batcher import Outcome, _Job, _Part, _Split
    from everloop.serve._protocols import Rows

    records = [{"customer_id": k} for k in range(5)]
    job = _Job(None, Rows(records, [["instances", k] for k in range(5)]), _Part(), 0.0)  # type: ignore[arg-type]
    split = _Split.of(job, [True, False, True, False, False])
    (mine, candidate), (theirs, production) = split.parts
    assert (mine, theirs) == ([0, 2], [1, 3, 4])
    assert candidate.rows.locs == [["instances", 0], ["instances", 2]]
    candidate.future.set_result(Outcome([{"id": "a0"}, {"id": "a2"}], warnings=[{"row": 1, "column": "x", "why": "w"}]))
    production.future.set_result(Outcome([{"id": "b1"}, {"id": "b3"}, {"id": "b4"}],
                                         warnings=[{"row": 0, "column": "y", "why": "v"}]))
    split.resolve()
    assert [o["id"] for o in job.future.outcome.outputs] == ["a0", "b1", "a2", "b3", "b4"]
    assert job.future.outcome.warnings == [{"row": 1, "column": "y", "why": "v"}, {"row": 2, "column": "x", "why": "w"}]
    # a refused row in either part refuses the request
    job = _Job(None, Rows(records[:2], [["instances", 0], ["instances", 1]]), _Part(), 0.0)  # type: ignore[arg-type]
    split = _Split.of(job, [True, False])
    split.parts[0][1].future.set_result(Outcome([{"id": "a0"}]))
    split.parts[1][1].future.set_result(Outcome(errors=[{"loc": ["instances", 1, "x"], "msg": "bad"}]))
    split.resolve()
    assert job.future.outcome.errors == [{"loc": ["instances", 1, "x"], "msg": "bad"}]
    assert job.future.outcome.outputs == []


def test_bucket_is_stable_across_processes_and_value_types() -> None:
    assert bucket("customer-1") == zlib.crc32(b"customer-1") % BUCKETS  # not Python's salted hash()
    assert bucket(42) == bucket("42")
