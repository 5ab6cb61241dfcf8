"""The service under faults (issue 15): a locked store holds only the calls that need it (fault 1), a
failed hot swap is tried again until it loads (7), input that answered 500 answers a 4xx naming the
problem (8, and the lone surrogates of 2), and tokens are compared in constant time (10). The tests run
a real uvicorn server, but for the 503 of a lock that outlasts /feedback's wait: in-process, with that
wait shortened."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from everloop import registry, train
from everloop.demo import make_churn
from everloop.serve import ServerProcess, _app, create_app
from everloop.serve._protocols import TOO_DEEP
from everloop.store import Store, prediction_log
from tests.conftest import feature_rows, served_project, wait_for

API_TOKEN, ADMIN_TOKEN = "api-t0ken-4217", "adm-t0ken-9031"
API = {"authorization": f"Bearer {API_TOKEN}"}
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
ROWS = feature_rows(make_churn(3, seed=5))
INFER = "/v2/models/churn/infer"




def _stored_labels(store: Store) -> dict[str, Any]:
    t = store.tables.feedback
    with store.engine.connect() as conn:
        return dict(conn.execute(sa.select(t.c.prediction_id, t.c.label)).all())


def _ids(client: httpx.Client | TestClient, rows: list[dict] = ROWS) -> list[str]:
    answer = client.post("/predict", json={"instances": rows})
    assert answer.status_code == 200, answer.text
    return [p["id"] for p in answer.json()["predictions"]]


@contextmanager
def _locked(folder: Path, pg_url: str | None) -> Iterator[None]:
    """Another connection holds the store's write lock (SQLite: BEGIN EXCLUSIVE) or, on PostgreSQL, an
    ACCESS EXCLUSIVE lock on the feedback and aliases tables, for the block."""
    if pg_url is None:
        conn = sqlite3.connect(folder / ".everloop" / "meta.db", isolation_level=None, timeout=30)
        conn.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("LOCK TABLE feedback, aliases IN ACCESS EXCLUSIVE MODE")
            try:
                yield
            finally:
                conn.rollback()
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str | None:
    """None (the project's SQLite file), or a fresh PostgreSQL schema's URL."""
    return request.getfixturevalue("pg_url") if request.param == "postgresql" else None


# -- fault 1: a locked store holds /feedback and /admin/reload, never the event loop ------------------


@pytest.mark.e2e
def test_a_locked_store_holds_feedback_and_reload_but_not_predictions_or_health(tmp_path, db_url):
    folder, _, store = served_project(tmp_path / "p", rows=1000, db_url=db_url)
    env = {"EVERLOOP_ADMIN_TOKEN": ADMIN_TOKEN} | ({"EVERLOOP_DB_URL": db_url} if db_url else {})
    with ServerProcess(folder, env=env) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        ids = _ids(client)
        # the first label flushes the log: its id is in the store before the store is locked
        first = client.post("/feedback", json={"id": ids[0], "label": 1})
        assert first.json() == {"accepted": 1, "unknown_ids": []}
        answers: dict[str, httpx.Response] = {}

        def call(name: str, path: str, **kwargs: Any) -> None:
            with httpx.Client(base_url=server.url, timeout=60) as own:
                answers[name] = own.post(path, **kwargs)

        label = {"json": {"id": ids[0], "label": 0}}
        calls = [threading.Thread(target=call, args=("feedback", "/feedback"), kwargs=label)]
        if db_url:  # PostgreSQL locks reads too: reading the alias waits (SQLite's WAL lets it read)
            calls.append(threading.Thread(target=call, args=("reload", "/admin/reload"),
                                          kwargs={"headers": ADMIN}))
        with _locked(folder, db_url):
            for thread in calls:
                thread.start()
            time.sleep(0.5)  # the calls reach the server and wait on the lock
            for _ in range(3):  # each within a bounded wait, while the calls above still wait
                assert client.get("/health", timeout=5).json() == {"status": "ok"}
                answer = client.post("/predict", json={"instances": ROWS}, timeout=5)
                assert answer.status_code == 200 and answer.json()["model_version"] == 1
                assert client.get("/ready", timeout=5).json() == {"ready": True, "model_version": 1}
            assert all(thread.is_alive() for thread in calls), "the calls that need the store wait for it"
            assert not answers
        for thread in calls:
            thread.join(timeout=90)
        assert answers["feedback"].status_code == 200
        assert answers["feedback"].json() == {"accepted": 1, "unknown_ids": []}
        if db_url:
            assert answers["reload"].json() == {"swapped": False, "model_version": 1}
    assert _stored_labels(store) == {ids[0]: 0}, "the label sent while the store was locked is stored"
    store.close()


def test_feedback_answers_503_when_a_lock_outlasts_its_wait_and_stores_nothing(tmp_path, db_url, monkeypatch):
    folder, _, store = served_project(tmp_path / "p", rows=1000, db_url=db_url)
    monkeypatch.setattr(_app, "FEEDBACK_LOCK_WAIT_S", 0.5)
    served = Store.for_project(folder, db_url)
    with TestClient(create_app(folder, store=served, watch=False)) as client:
        ids = _ids(client)
        assert client.post("/feedback", json={"id": ids[0], "label": 1}).status_code == 200
        answers: list[Any] = []
        waiting = threading.Thread(target=lambda: answers.append(
            client.post("/feedback", json={"labels": [{"id": ids[1], "label": 0}]})))
        with _locked(folder, db_url):
            waiting.start()
            waiting.join(timeout=20)  # bounded: an unbounded wait would hold the lock, and the test, forever
            assert client.get("/health").status_code == 200
        waiting.join()
        [busy] = answers
        assert busy.status_code == 503, busy.text
        detail = busy.json()["detail"]
        assert detail.startswith("the store is busy or cannot be reached (")
        assert ("lock timeout" if db_url else "database is locked") in detail
        assert detail.endswith("no label of this request was stored: send it again")
        assert _stored_labels(store) == {ids[0]: 1}
        again = client.post("/feedback", json={"labels": [{"id": ids[1], "label": 0}]})
        assert again.json() == {"accepted": 1, "unknown_ids": []}
    assert _stored_labels(store) == {ids[0]: 1, ids[1]: 0}
    store.close()
    served.close()


# -- fault 7: a failed hot swap is tried again -----------------------------------------------------------


@contextmanager
def _broken_artifact(store: Store, version: int) -> Iterator[None]:
    """The model artifact of `version` changed on disk for the block, then restored byte for byte."""
    path = store.artifacts.path(registry.get_model(store, version).artifact)
    original = path.read_bytes()
    path.write_bytes(b"half a model")
    try:
        yield
    finally:
        path.write_bytes(original)


def _refusal(client: httpx.Client, version: int) -> dict[str, Any] | None:
    model = client.get("/model").json()
    return model if model.get("refused", "").startswith(f"model v{version} refused: ") else None


@pytest.mark.e2e
def test_a_failed_hot_swap_is_tried_again_until_the_artifact_is_restored(tmp_path):
    folder, spec, store = served_project(tmp_path / "p", rows=1000)
    for seed in (7, 11):  # v2 and v3: other blobs than v1's (the same fit would be the same blob)
        train.train(store, spec.model_copy(update={"model": spec.model.model_copy(update={"seed": seed})}))
    env = {"EVERLOOP_ADMIN_TOKEN": ADMIN_TOKEN}
    with ServerProcess(folder, env=env) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        # v2 is promoted while its artifact is broken: refused, reported, v1 serves; restored: swapped in
        with _broken_artifact(store, 2):
            registry.set_alias(store, registry.PRODUCTION, 2, reason="test")
            model = wait_for(lambda: _refusal(client, 2), "/model reporting v2's refusal")
            assert model["version"] == 1 and "was changed on disk" in model["refused"]
            assert "trying again in " in model["refused"]
            assert (model["replica"]["alias_version"], model["replica"]["in_step"]) == (2, False)
            ready = client.get("/ready").json()
            assert ready["ready"] and ready["model_version"] == 1
            assert ready["refused"].startswith("model v2 refused: ")
            assert client.post("/predict", json={"instances": ROWS}).json()["model_version"] == 1
        server.wait_for_version(2, timeout=90)  # no restart: the watcher tried again
        assert "refused" not in client.get("/model").json()
        assert client.get("/ready").json() == {"ready": True, "model_version": 2}

        # v3 the same, and /admin/reload tries at once: refused while broken, loaded once restored
        with _broken_artifact(store, 3):
            registry.set_alias(store, registry.PRODUCTION, 3, reason="test")
            wait_for(lambda: _refusal(client, 3), "/model reporting v3's refusal")
            broken = client.post("/admin/reload", headers=ADMIN)
            assert broken.status_code == 409
            assert broken.json()["detail"].startswith("model v3 refused: artifact ")
        reload = client.post("/admin/reload", headers=ADMIN)
        assert reload.status_code == 200 and reload.json()["model_version"] == 3
        assert client.post("/predict", json={"instances": ROWS}).json()["model_version"] == 3
    store.close()


# -- fault 8 and 10: bodies and headers a client can send ------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> Iterator[tuple[httpx.Client, Store]]:
    """A real server with API and admin tokens: (a client sending the API token, the store)."""
    folder, _, store = served_project(tmp_path_factory.mktemp("faults") / "p", rows=1000)
    env = {"EVERLOOP_API_TOKEN": API_TOKEN, "EVERLOOP_ADMIN_TOKEN": ADMIN_TOKEN}
    with ServerProcess(folder, env=env) as server, \
            httpx.Client(base_url=server.url, headers=API, timeout=30) as client:
        yield client, store
    store.close()


POSTS = ["/predict", "/invocations", INFER, "/feedback", "/admin/reload"]
TOO_DEEP_BODIES = {
    "1025 levels (orjson's limit is 1024)": b"[" * 1025 + b"]" * 1025,
    "100,000 levels": b"[" * 100_000 + b"]" * 100_000,
    "1000 levels with a NaN (the standard parser's turn)": b'{"a":' * 1000 + b"NaN" + b"}" * 1000,
}


@pytest.mark.e2e
@pytest.mark.parametrize("path", POSTS)
@pytest.mark.parametrize("body", list(TOO_DEEP_BODIES), ids=list(TOO_DEEP_BODIES))
def test_json_nested_too_deep_answers_400_on_every_post_endpoint(guarded, path, body):
    client, _ = guarded
    answer = client.post(path, content=TOO_DEEP_BODIES[body], headers={"content-type": "application/json"}
                         | (ADMIN if path == "/admin/reload" else {}))
    assert answer.status_code == 400 and answer.json() == {"detail": TOO_DEEP}


def _with(row: dict, **values: Any) -> str:
    """A row as JSON text with some values replaced by raw JSON text."""
    marked = dict(row, **{name: f"@{name}@" for name in values})
    text = json.dumps(marked)
    for name, raw in values.items():
        text = text.replace(f'"@{name}@"', raw)
    return text


DEEP_VALUE = "[" * 1000 + "1" + "]" * 1000  # read by orjson, but no feature value
TOO_DEEP_VALUE = ("the value nests lists or objects more than 32 levels deep; a feature takes one value "
                  "(a number, a text, true/false or null)")


@pytest.mark.e2e
def test_a_deeply_nested_value_is_refused_naming_it_and_costs_no_other_row(guarded):
    client, _ = guarded
    deep_row = _with(ROWS[1], plan=DEEP_VALUE)
    predict = client.post("/predict", content=f'{{"instances": [{json.dumps(ROWS[0])}, {deep_row}]}}')
    assert predict.status_code == 422
    assert predict.json()["detail"] == [{"loc": ["instances", 1, "plan"], "msg": TOO_DEEP_VALUE}]
    invocations = client.post("/invocations", content=f'{{"dataframe_records": [{deep_row}]}}',
                              headers={"content-type": "application/json"})
    assert invocations.json()["detail"] == [{"loc": ["dataframe_records", 0, "plan"], "msg": TOO_DEEP_VALUE}]
    # v2's data lists are flattened (iteratively): 1000 levels are one value, not a tensor of the features
    v2 = client.post(INFER, content=f'{{"inputs": [{{"name": "x", "shape": [1], "datatype": "FP64", '
                                    f'"data": {DEEP_VALUE}}}]}}')
    assert v2.status_code == 422 and v2.json()["detail"][0]["loc"] == ["inputs", 0]
    assert v2.json()["detail"][0]["msg"].startswith("expected one input per feature (age, ")
    inputs = json.dumps([{"name": n, "shape": [1], "datatype": "BYTES" if isinstance(v, str) else "FP64",
                          "data": [v]} for n, v in ROWS[0].items()])
    strict = client.post(INFER, content=f'{{"inputs": {inputs}, "parameters": {{"strict": {DEEP_VALUE}}}}}')
    assert strict.status_code == 422  # the option is named, its value quoted shortened
    assert strict.json()["detail"] == [{"loc": ["parameters", "strict"], "input": "[[[[[[[...]]]]]]]",
                                        "msg": "expected true or false (also 1/0, yes/no)"}]
    feedback = client.post("/feedback", content=f'{{"id": {DEEP_VALUE}, "label": 1}}')
    assert feedback.status_code == 422 and feedback.json()["detail"][0]["loc"] == ["id"]
    assert feedback.json()["detail"][0]["msg"].endswith("its id is [[[[[[[...]]]]]]]")
    # requests sent together are gathered into one model call: the deep one is refused before it joins
    answers: list[httpx.Response] = []

    def send(body: str) -> None:
        answers.append(client.post("/predict", content=body))

    bodies = [json.dumps({"instances": ROWS})] * 6 + [f'{{"features": {deep_row}}}'] * 2
    threads = [threading.Thread(target=send, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(a.status_code for a in answers) == [200] * 6 + [422] * 2


LONE = "\ud800"


def _surrogate_cases() -> dict[str, tuple[str, str, list[Any]]]:
    """name -> (path, body as JSON text with a lone surrogate escaped in it, the loc the answer names)."""
    row = dict(ROWS[1], plan=LONE)
    names = list(ROWS[0])
    split = {"columns": names, "data": [list(ROWS[0].values()), list(row.values())]}
    inputs = [{"name": n, "shape": [2], "datatype": "BYTES" if isinstance(ROWS[0][n], str) else "FP64",
               "data": [ROWS[0][n], row[n]]} for n in names]
    return {
        "a feature of /predict's second row": ("/predict", json.dumps({"instances": [ROWS[0], row]}),
                                               ["instances", 1, "plan"]),
        "a cell of /invocations' dataframe_split": ("/invocations", json.dumps({"dataframe_split": split}),
                                                    ["dataframe_split", "data", 1, names.index("plan")]),
        "a feature name of /predict": ("/predict", json.dumps({"features": {"pl" + LONE: 1}}), ["features"]),
        "a value of a v2 input": (INFER, json.dumps({"inputs": inputs}),
                                  ["inputs", names.index("plan"), "data", 1]),
        "a feedback id": ("/feedback",
                          json.dumps({"labels": [{"id": "x", "label": 1}, {"id": LONE, "label": 1}]}),
                          ["labels", 1, "id"]),
        "a feedback label": ("/feedback", json.dumps({"id": "x", "label": "yes" + LONE}), ["label"]),
    }


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(_surrogate_cases()))
def test_a_lone_surrogate_is_refused_at_the_door_naming_where(guarded, case):
    client, _ = guarded
    path, body, loc = _surrogate_cases()[case]
    assert "\\ud800" in body  # escaped: the JSON text itself is ASCII
    answer = client.post(path, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422
    [problem] = answer.json()["detail"]
    assert problem["loc"] == loc
    assert "holds a lone surrogate" in problem["msg"] and "\\ud800" in problem["msg"]


@pytest.mark.e2e
def test_an_id_twice_in_one_feedback_body_keeps_its_last_label(guarded):
    client, store = guarded
    a, b, _ = _ids(client)
    answer = client.post("/feedback", json={"labels": [{"id": a, "label": 1}, {"id": b, "label": 1},
                                                       {"id": a, "label": 0}]})
    assert answer.status_code == 200 and answer.json() == {"accepted": 2, "unknown_ids": []}
    stored = _stored_labels(store)
    assert (stored[a], stored[b]) == (0, 1)
    # a refused item for a repeated id refuses the request (nothing stored), naming that item
    refused = client.post("/feedback", json={"labels": [{"id": a, "label": 1}, {"id": a, "label": 7}]})
    assert refused.status_code == 422
    assert [p["loc"] for p in refused.json()["detail"]] == [["labels", 1, "label"]]
    assert _stored_labels(store)[a] == 0


@pytest.mark.e2e
def test_tokens_are_compared_whole(guarded):
    client, _ = guarded
    wrong = API_TOKEN[:-1] + ("0" if API_TOKEN[-1] != "0" else "1")  # the same length, one character off
    assert len(wrong) == len(API_TOKEN) and wrong != API_TOKEN
    for path, body in (("/predict", {"instances": ROWS}), ("/feedback", {"id": "x", "label": 1})):
        refused = client.post(path, json=body, headers={"authorization": f"Bearer {wrong}"})
        assert refused.status_code == 401 and refused.json() == {"detail": "a valid bearer token is required"}
    # not ASCII: compared as the bytes sent (a text comparison in constant time would raise: a 500)
    odd = client.post("/predict", json={"instances": ROWS}, headers={"authorization": b"Bearer \xe9\xff"})
    assert odd.status_code == 401
    assert client.post("/predict", json={"instances": ROWS}).status_code == 200  # the right token
    admin_wrong = ADMIN_TOKEN[:-1] + ("0" if ADMIN_TOKEN[-1] != "0" else "1")
    refused = client.post("/admin/reload", headers={"authorization": f"Bearer {admin_wrong}"})
    assert refused.status_code == 401
    assert refused.json() == {"detail": "a valid admin bearer token is required"}
    assert client.post("/admin/reload", headers=API).status_code == 401, "the API token is no admin token"
    reload = client.post("/admin/reload", headers=ADMIN)
    assert reload.status_code == 200 and reload.json() == {"swapped": False, "model_version": 1}


# -- fault 8 on PostgreSQL: the same labels at once through two workers --------------------------------


@pytest.mark.e2e
def test_the_same_labels_sent_at_once_to_two_workers_are_upserted(tmp_path, pg_url):
    folder, _, store = served_project(tmp_path / "p", rows=1000, db_url=pg_url)
    with ServerProcess(folder, workers=2, env={"EVERLOOP_DB_URL": pg_url}) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            ids = _ids(client, feature_rows(make_churn(40, seed=8)))

        def logged() -> bool:  # each worker flushes its own log: wait for the one that predicted
            with store.engine.connect() as conn:
                return len(prediction_log.find(conn, ids)) == len(ids)

        wait_for(logged, "the predictions in the log")
        answers: list[httpx.Response] = []
        for _ in range(8):  # each round: two clients, two connections, the same ids in opposite orders
            start = threading.Barrier(2)

            def send(labels: list[dict[str, Any]]) -> None:
                with httpx.Client(base_url=server.url, timeout=60) as own:
                    start.wait()
                    answers.append(own.post("/feedback", json={"labels": labels}))

            threads = [threading.Thread(target=send, args=([{"id": i, "label": 0} for i in ids],)),
                       threading.Thread(target=send, args=([{"id": i, "label": 1} for i in reversed(ids)],))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert [a.status_code for a in answers] == [200] * 16
        assert all(a.json() == {"accepted": 40, "unknown_ids": []} for a in answers)
        stored = _stored_labels(store)
        assert set(stored) == set(ids) and set(stored.values()) <= {0, 1}
        with httpx.Client(base_url=server.url, timeout=30) as client:  # a later label replaces them
            later = client.post("/feedback", json={"labels": [{"id": i, "label": 1} for i in ids]})
            assert later.status_code == 200
    assert _stored_labels(store) == {i: 1 for i in ids}
    store.close()


# -- after a tester: raw surrogate bytes, an exhausted pool, a client leaving mid-body, a dripped body ------


RAW_SURROGATE = b"\xed\xa0\x80"  # U+D800 written as UTF-8 bytes: not UTF-8, but the standard parser takes it


@pytest.mark.e2e
def test_a_lone_surrogate_sent_as_raw_bytes_is_refused_and_costs_no_other_request(guarded):
    """In a yes/no column it failed the whole micro-batch (500s for other clients too)."""
    client, _ = guarded
    row = dict(ROWS[0], has_streaming="__X__")
    body = json.dumps({"features": row}).encode().replace(b"__X__", RAW_SURROGATE)
    good = {"instances": ROWS}
    results: list[int] = []

    def others() -> None:
        for _ in range(30):
            results.append(client.post("/predict", json=good).status_code)

    threads = [threading.Thread(target=others) for _ in range(3)]
    for t in threads:
        t.start()
    bad = [client.post(path, content=payload, headers={"content-type": "application/json"})
           for path, payload in [("/predict", body)] * 8]
    for t in threads:
        t.join()
    for answer in bad:
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"][0]["loc"] == ["features", "has_streaming"]
    assert results == [200] * 90


def test_feedback_answers_503_when_every_pooled_connection_is_taken(tmp_path, monkeypatch):
    """Many feedback calls waiting on a lock held every pooled connection: the next got SQLAlchemy's
    pool TimeoutError, answered 500; it is the store being busy (503, nothing stored)."""
    folder, _, store = served_project(tmp_path / "p", rows=1000)

    def exhausted(*args, **kwargs):
        raise sa.exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached, connection timed out")

    monkeypatch.setattr(_app, "record_feedback", exhausted)
    with TestClient(create_app(folder, watch=False)) as client:
        ids = _ids(client)
        busy = client.post("/feedback", json={"id": ids[0], "label": 1})
    assert busy.status_code == 503 and "QueuePool limit" in busy.json()["detail"]
    assert _stored_labels(store) == {}
    store.close()


@pytest.mark.e2e
def test_a_client_leaving_mid_body_is_no_server_error(guarded):
    """A /feedback client that closes its connection mid-body: counted as 499 (the prediction endpoints'
    count), never a 500 in the metrics and the monitor's error rate."""
    client, _ = guarded
    port = int(str(client.base_url).rsplit(":", 1)[1].rstrip("/"))

    def count(status: str) -> float:
        text = client.get("/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("everloop_requests_total{") and 'endpoint="/feedback"' in line
                   and f'status="{status}"' in line)

    before_500, before_499 = count("500"), count("499")
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + API_TOKEN.encode() + b"\r\nContent-Length: 1000\r\n\r\n{")
            time.sleep(0.2)
    wait_for(lambda: count("499") >= before_499 + 3, "three 499s counted")
    assert count("500") == before_500
