import json

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from everloop import registry, train
from everloop.serve import create_app
from everloop.spec import parse_spec
from tests.conftest import write_project

DROP = ["customer_id", "event_time", "churned"]


def _rows(folder, n=3):
    frame = pd.read_csv(folder / "data" / "customers.csv").head(n)
    return json.loads(frame.drop(columns=DROP).to_json(orient="records")), frame["churned"].tolist()


@pytest.fixture
def client(trained):
    folder, spec, store = trained
    with TestClient(create_app(folder, watch=False)) as c:
        c.folder, c.store, c.spec = folder, store, spec
        yield c


def test_three_request_forms_agree(client):
    rows, _ = _rows(client.folder)
    names = list(rows[0])
    by_name = client.post("/predict", json={"features": rows[0]}).json()
    as_list = client.post("/predict", json={"features": [rows[0][n] for n in names]}).json()
    batch = client.post("/predict", json={"instances": rows}).json()
    assert by_name["model_version"] == 1
    first = [r["predictions"][0] for r in (by_name, as_list, batch)]
    assert len({json.dumps({k: v for k, v in p.items() if k != "id"}) for p in first}) == 1
    assert len(batch["predictions"]) == 3 and len({p["id"] for p in batch["predictions"]}) == 3
    assert set(first[0]["probabilities"]) == {"0", "1"} and first[0]["prediction"] in (0, 1)


def test_bad_requests_name_each_field(client):
    rows, _ = _rows(client.folder)
    bad = dict(rows[1], age="old", tenure_months=[1])
    del bad["plan"]
    answer = client.post("/predict", json={"instances": [rows[0], bad]})
    assert answer.status_code == 422
    locs = [d["loc"] for d in answer.json()["detail"]]
    assert ["instances", 1, "plan"] in locs
    answer = client.post("/predict", json={"features": dict(rows[0], age="old")})
    assert answer.status_code == 422
    assert answer.json()["detail"] == [{"loc": ["features", "age"], "msg": "values are not numbers", "input": "old"}]
    answer = client.post("/predict", json={"features": [1, 2]})
    assert answer.status_code == 422 and "in schema order" in answer.json()["detail"][0]["msg"]


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[]", b"null", b'"text"', b'{"instances": []}',
                                  b'{"instances": [1, "a", null]}', b'{"features": null}', b'{"other": 1}',
                                  b'{"features": {"age": {"nested": 1}}}', b'{"instances": {"a": 1}}'])
def test_malformed_bodies_are_4xx_never_500(client, body):
    answer = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert 400 <= answer.status_code < 500, answer.text
    assert answer.json()["detail"]


def test_oversized_batch_is_413(trained, tmp_path):
    folder, spec, store = trained
    raw = spec.model_dump()
    raw["serving"]["max_batch_rows"] = 2
    with TestClient(create_app(folder, spec=parse_spec(raw), watch=False)) as c:
        rows, _ = _rows(folder, 3)
        assert c.post("/predict", json={"instances": rows}).status_code == 413


def test_predictions_are_logged_and_feedback_joins_them(client):
    rows, labels = _rows(client.folder)
    answer = client.post("/predict", json={"instances": rows}).json()
    ids = [p["id"] for p in answer["predictions"]]
    fb = client.post("/feedback", json={"labels": [{"id": i, "label": y} for i, y in zip(ids, labels)]})
    assert fb.status_code == 200 and fb.json() == {"accepted": 3, "unknown_ids": []}
    assert client.post("/feedback", json={"id": "nope", "label": 1}).status_code == 404
    bad = client.post("/feedback", json={"id": ids[0], "label": "maybe"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["label"]
    t = client.store.tables
    from everloop import registry

    traced = registry.prediction_lineage(client.store, ids[1])
    assert traced["prediction"]["label"] == labels[1] and traced["model"]["version"] == 1
    assert traced["datasets"][0]["version"] == 1
    assert traced["prediction"]["output"] == {k: v for k, v in answer["predictions"][1].items() if k != "id"}
    assert traced["prediction"]["features"]["contract"] == rows[1]["contract"]
    from everloop.store import prediction_log

    with client.store.engine.connect() as conn:
        logged = prediction_log.to_rows(list(prediction_log.iter_batches(conn)))
        assert logged.ids == ids and set(logged.model_version) == {1}  # one model call: one batch row
        assert conn.execute(t.prediction_batches.select()).all()[0].rows == 3
        assert logged.features["monthly_charges"].tolist() == pytest.approx([r["monthly_charges"] for r in rows])
        assert len(conn.execute(t.feedback.select()).all()) == 3


def test_health_ready_model_and_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"ready": True, "model_version": 1}
    info = client.get("/model").json()
    assert info["version"] == 1 and info["lineage"]["dataset_version"] == 1
    assert "monthly_charges" in [c["name"] for c in info["schema"]["columns"]]
    rows, _ = _rows(client.folder)
    client.post("/predict", json={"instances": rows})
    client.post("/predict", json={"features": {}})
    text = client.get("/metrics").text
    assert 'everloop_requests_total{endpoint="/predict",status="200"} 1.0' in text
    assert 'everloop_requests_total{endpoint="/predict",status="422"} 1.0' in text
    assert "everloop_model_version 1.0" in text
    assert "everloop_prediction_log_dropped" in text and "everloop_request_latency_seconds_bucket" in text
    assert "process_resident_memory_bytes" in text and "everloop_inflight_requests" in text
    for _ in range(5):
        client.post("/predict", json={"features": rows[0]})
    text = client.get("/metrics").text
    assert 'everloop_requests_total{endpoint="/predict",status="200"} 6.0' in text
    # the latency histogram counted every /predict request once (its +Inf bucket is cumulative)
    assert 'everloop_request_latency_seconds_bucket{endpoint="/predict",le="+Inf"} 7.0' in text
    assert 'everloop_request_latency_seconds_count{endpoint="/predict"} 7.0' in text


def test_not_ready_without_a_production_model(tmp_path):
    folder = write_project(tmp_path / "empty")
    with TestClient(create_app(folder, watch=False)) as c:
        assert c.get("/ready").status_code == 503
        assert c.post("/predict", json={"features": {}}).status_code == 503


def test_hot_swap_and_broken_model_refused(client):
    store, spec = client.store, client.spec
    rows, _ = _rows(client.folder)
    new = train.train(store, spec)
    registry.set_alias(store, registry.PRODUCTION, new.version, reason="test")
    holder = client.app.state.holder
    assert holder.refresh()
    assert client.post("/predict", json={"features": rows[0]}).json()["model_version"] == new.version
    broken = train.train(store, spec)
    artifact = registry.get_model(store, broken.version).artifact
    store.artifacts.path(artifact).write_bytes(b"corrupted")
    registry.set_alias(store, registry.PRODUCTION, broken.version, reason="test")
    assert not holder.refresh()
    assert "refused" in holder.last_error
    assert client.post("/predict", json={"features": rows[0]}).json()["model_version"] == new.version
    assert "everloop_model_reload_failures_total 1.0" in client.get("/metrics").text


def test_admin_reload_needs_the_token(client, monkeypatch):
    assert client.post("/admin/reload").status_code == 403
    monkeypatch.setenv("EVERLOOP_ADMIN_TOKEN", "s3cret")
    assert client.post("/admin/reload").status_code == 401
    ok = client.post("/admin/reload", headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["model_version"] == 1


def test_api_token_guards_every_prediction_endpoint(trained, monkeypatch):
    folder, spec, store = trained
    monkeypatch.setenv("EVERLOOP_API_TOKEN", "t0ken")
    rows, _ = _rows(folder, 1)
    requests = [("/predict", {"features": rows[0]}), ("/invocations", {"dataframe_records": rows}),
                ("/v2/models/churn/infer", {"inputs": [{"name": k, "datatype": "BYTES" if isinstance(v, str) else "FP64",
                                                        "shape": [1], "data": [v]} for k, v in rows[0].items()]})]
    with TestClient(create_app(folder, watch=False)) as client:
        for path, body in requests:
            refused = client.post(path, json=body)
            assert refused.status_code == 401 and "bearer token" in refused.json()["detail"], path
            wrong = client.post(path, json=body, headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401, path
            ok = client.post(path, json=body, headers={"authorization": "Bearer t0ken"})
            assert ok.status_code == 200, (path, ok.text)
        assert client.get("/health").status_code == 200  # probes stay open
        text = client.get("/metrics").text
        assert 'everloop_requests_total{endpoint="/predict",status="401"} 2.0' in text


def test_micro_batching_can_be_turned_off(trained):
    folder, spec, store = trained
    off = spec.model_copy(update={"serving": spec.serving.model_copy(update={"micro_batching": False})})
    rows, _ = _rows(folder, 3)
    with TestClient(create_app(folder, spec=off, watch=False)) as client:
        answer = client.post("/predict", json={"instances": rows})
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 3
        assert client.app.batcher.max_rows == 0 and client.app.batcher.max_wait_s == 0.0
