"""The prediction log keeps what it answered: codes from the encoder stored as the values sent, one bad
model call never costing another's rows, a busy store waited for (its backlog shown), a graceful stop
losing nothing, and a killed worker's unwritten rows counted at the next start."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from everloop.registry import PRODUCTION, load_model
from everloop.registry._registry import alias_version
from everloop.serve import ServerProcess
from everloop.serve._batcher import ids_for
from everloop.serve._log import Ledger, LogEntry, PredictionLog, batch_row, recover_lost
from everloop.serve._metrics import ServiceMetrics
from everloop.store import Store, _lease, prediction_log
from everloop.demo import make_churn
from tests.conftest import feature_rows, served_project

MISSING_TOKEN = "__missing__"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    folder, _, store = served_project(tmp_path_factory.mktemp("log") / "p")
    trained = load_model(store, alias_version(store, PRODUCTION))
    assert trained.check_fast_path(make_churn(500, seed=9).drop(columns=["churned"]))
    return trained


def _entries(model, records: list[dict], coded: bool, per_call: int = 50) -> list[LogEntry]:
    out = []
    for start in range(0, len(records), per_call):
        columns = model.schema.conform_records(records[start:start + per_call])
        codes = {} if coded else None
        p = model.predict_conformed(columns, codes)
        out.append(LogEntry(ids_for(len(p.labels)), 1.0, 1, columns, p.labels, p.proba, p.classes,
                            [2.0] * len(p.labels), codes))
    return out


def test_encoder_codes_are_logged_as_the_values_sent(model):
    """Known, unseen, missing and lone-surrogate values: the codes path stores exactly what hashing each
    value stores (the values as sent; the surrogate escaped, never failing the batch)."""
    records = feature_rows(make_churn(400, seed=4))
    records[3]["plan"] = "never-seen"
    records[4]["plan"] = None
    records[5]["region"] = "\ud800"  # not UTF-8: Arrow cannot hold it as it is
    records[6]["contract"] = MISSING_TOKEN  # the literal missing token stays text, not a null
    records[70]["plan"] = "another-new"
    coded = _entries(model, records, coded=True)
    assert coded[0].codes and "plan" in coded[0].codes
    hashed = _entries(model, records, coded=False)
    a = prediction_log.decode(batch_row(coded)["payload"])
    b = prediction_log.decode(batch_row(hashed)["payload"])
    for name in ("plan", "region", "contract", "payment_method"):
        assert a.column(name).to_pylist() == b.column(name).to_pylist(), name
    plan = a.column("plan").to_pylist()
    assert plan[3] == "never-seen" and plan[4] is None and plan[70] == "another-new"
    assert plan[0] == records[0]["plan"]
    assert a.column("region").to_pylist()[5] == "\\ud800"
    assert a.column("contract").to_pylist()[6] == MISSING_TOKEN
    assert a.column("__prediction").to_pylist() == list(np.concatenate([e.labels for e in coded]))


def _entry(first: int, n: int, plan: str = "basic") -> LogEntry:
    return LogEntry([f"fedcba9876543210{first + p:x}" for p in range(n)], 1.0, 1,
                    {"age": np.arange(n, dtype=float), "plan": np.array([plan] * n, dtype=object)},
                    np.zeros(n), None, None, [1.0] * n)


def test_one_bad_call_costs_no_other_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A model call whose rows the store refuses (here: its batch cannot be built) is counted as failed;
    the calls merged with it are written."""
    import everloop.serve._log as module

    real = module.batch_row

    def picky(entries):
        if any(e.features["plan"][0] == "poison" for e in entries):
            raise ValueError("cannot encode this call")
        return real(entries)

    monkeypatch.setattr(module, "batch_row", picky)
    store = Store.for_project(tmp_path)
    log = PredictionLog(store, interval=10)  # nothing written until the flush: all three merge
    for e in (_entry(0, 30), _entry(30, 7, plan="poison"), _entry(37, 20)):
        log.put(e)
    log.start()
    assert log.flush()
    log.stop()
    assert (log.written, log.failed) == (50, 7)
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.sum(store.tables.prediction_batches.c.rows))).scalar() == 50


def test_a_busy_store_is_waited_for_and_its_backlog_shown(tmp_path: Path):
    """A lock held on the SQLite store for a while: nothing is lost, and the queue gauge shows the rows
    waiting meanwhile (it read 0 for a whole lock before)."""
    store = Store.for_project(tmp_path)
    store.engine.dispose()  # the writer's database calls give up after 0.2 s instead of 30, then retry
    store.engine = sa.create_engine(store.db_url, connect_args={"timeout": 0.2})
    metrics = ServiceMetrics()
    log = PredictionLog(store, interval=0.05, metrics=metrics)
    blocker = sqlite3.connect(store.db_url.removeprefix("sqlite:///"), timeout=1)
    blocker.execute("BEGIN EXCLUSIVE")
    log.start()
    for k in range(5):
        log.put(_entry(k * 10, 10))
    time.sleep(1.0)
    backlog = metrics.log_queue._value.get()
    assert backlog == 50 and log.written == 0 and log.failed == 0
    blocker.rollback()
    blocker.close()
    assert log.flush(timeout=15)
    log.stop()
    assert (log.written, log.failed) == (50, 0) and metrics.log_queue._value.get() == 0


def _dead_process() -> str:
    """The identity (store/_lease.py's form) of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    mine = _lease._this_process()
    if not mine:
        pytest.skip("process identity needs Linux's /proc")
    return f"{mine.rpartition(' ')[0]} {child.pid}"


def test_a_killed_workers_unlogged_rows_are_counted_once(tmp_path: Path):
    store = Store.for_project(tmp_path)
    folder = tmp_path / "serving"
    ledger = Ledger(folder, "0123456789abcdef")
    ledger.handed(120)
    ledger.settled(100)
    ledger._map.close()
    # rewrite the identity as a dead process's (this one is alive: its ledger must be left alone)
    data = bytearray(ledger.path.read_bytes())
    assert recover_lost(store, folder) == 0 and ledger.path.exists()
    data[16:] = _dead_process().encode().ljust(Ledger.SIZE - 16, b"\0")
    ledger.path.write_bytes(bytes(data))
    metrics = ServiceMetrics()
    assert recover_lost(store, folder, metrics) == 20
    assert recover_lost(store, folder) == 0  # counted once
    assert not list(folder.iterdir())
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(store.tables.lost_predictions)).all()
    assert [(r.worker, r.rows) for r in rows] == [("0123456789abcdef", 20)]
    assert metrics.log_lost._value.get() == 20


def _logged(store: Store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.coalesce(sa.func.sum(store.tables.prediction_batches.c.rows), 0))).scalar()


def _lost(store: Store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.coalesce(sa.func.sum(store.tables.lost_predictions.c.rows), 0))).scalar()


@pytest.fixture
def project(tmp_path: Path):
    return served_project(tmp_path / "p")


def test_sigterm_loses_no_answered_prediction(project):
    folder, _, store = project
    body = {"instances": feature_rows(make_churn(20, seed=2))}
    server = ServerProcess(folder).start()
    answered = 0
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for _ in range(40):
                response = client.post("/predict", json=body)
                assert response.status_code == 200
                answered += len(response.json()["predictions"])
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=30)
    finally:
        server.stop()
    assert _logged(store) == answered == 800
    assert _lost(store) == 0
    assert not list((store.root / "serving").glob("*.ledger"))  # a clean stop leaves no ledger


def test_sigkill_loses_are_counted_at_the_next_start(project):
    """The store is locked while the service answers (so its writer holds the rows, retrying), then the
    service is killed: the next start records exactly the answered rows the log lacks."""
    folder, _, store = project
    body = {"instances": feature_rows(make_churn(25, seed=3))}
    server = ServerProcess(folder).start()
    database = store.db_url.removeprefix("sqlite:///")
    blocker = sqlite3.connect(database, timeout=5)
    answered = 0
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            blocker.execute("BEGIN EXCLUSIVE")
            for _ in range(8):
                response = client.post("/predict", json=body)
                assert response.status_code == 200
                answered += len(response.json()["predictions"])
            time.sleep(0.5)
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(timeout=10)
    finally:
        blocker.rollback()
        blocker.close()
        server.stop()
    assert answered == 200 and _logged(store) == 0
    with ServerProcess(folder) as again, httpx.Client(base_url=again.url, timeout=10) as client:
        assert client.get("/health").status_code == 200
        lost = _lost(store)
        metrics = client.get("/metrics").text
    assert lost == answered
    assert "everloop_prediction_log_lost_total 200.0" in metrics
