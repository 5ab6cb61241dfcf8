"""Health: server errors and refused predictions counted apart from other requests' 4xx, and their alerts."""

from __future__ import annotations

import time
from typing import Any

import pytest

from everloop.demo import make_churn
from everloop.errors import SpecError
from everloop.monitor import health_alerts, service_errors
from everloop.serve._log import PredictionLog
from everloop.spec import ProjectSpec, parse_spec
from tests.conftest import feature_rows

BAD_ROW = {"features": {"age": "x"}}  # a feature of the wrong type: 422


def _v2_body(row: dict[str, Any]) -> dict[str, Any]:
    return {"inputs": [{"name": k, "datatype": "BYTES" if isinstance(v, str) else "FP64", "shape": [1],
                        "data": [v]} for k, v in row.items()]}


def _health_spec(spec: ProjectSpec, **health: Any) -> ProjectSpec:
    raw = spec.model_dump()
    raw["monitoring"]["health"] = {**raw["monitoring"]["health"], **health}
    return parse_spec(raw)


def _mixed_traffic(client, monkeypatch) -> None:
    """12 prediction requests (5 good, 5 refused as bad input, 2 server errors) and 8 other requests
    (6 of them 4xx: bad /feedback bodies, an unknown id, an unknown path)."""
    rows = feature_rows(make_churn(30, seed=41))
    ids = []
    for start in (0, 10, 20):  # 3 good /predict
        answer = client.post("/predict", json={"instances": rows[start:start + 10]})
        assert answer.status_code == 200
        ids.append(answer.json()["predictions"][0]["id"])
    assert client.post("/invocations", json={"dataframe_records": rows[:2]}).status_code == 200
    assert client.post(f"/v2/models/{client.spec.name}/infer", json=_v2_body(rows[0])).status_code == 200
    for _ in range(4):
        assert client.post("/predict", json=BAD_ROW).status_code == 422
    assert client.post("/invocations", json={"dataframe_records": [{"age": "x"}]}).status_code == 422

    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("a bug in the model call")

    with monkeypatch.context() as patch:
        patch.setattr(client.app.batcher, "submit", broken)
        for _ in range(2):
            assert client.post("/predict", json={"instances": rows[:3]}).status_code == 500

    for _ in range(3):
        assert client.post("/feedback", json={"labels": []}).status_code == 422
    assert client.post("/feedback", json={"labels": [{"id": "no-such-id", "label": 1}]}).status_code == 404
    assert client.post("/feedback", json={"labels": [{"id": ids[0], "label": 1}]}).status_code == 200
    for _ in range(2):
        assert client.get("/nope").status_code == 404
    assert client.get("/health").status_code == 200


EXPECTED = {"requests": 20, "prediction_requests": 12, "refused_predictions": 5, "server_errors": 2,
            "other_client_errors": 6, "client_errors": 11}


def test_counts_refusals_server_errors_and_other_requests_apart(client, monkeypatch):
    start = time.time()
    _mixed_traffic(client, monkeypatch)
    client.app.state.log._write_stats(force=True)
    counts = service_errors(client.store, start, time.time())
    assert {k: counts[k] for k in EXPECTED} == EXPECTED
    # /feedback's and /nope's 4xx count in neither rate: 2 server errors of 20, 5 refused of 12
    assert counts["error_rate"] == pytest.approx(2 / 20)
    assert counts["refused_rate"] == pytest.approx(5 / 12)


def test_counts_cover_the_time_span_asked_for(client):
    log = client.app.state.log
    for _ in range(3):
        client.get("/nope")
    log._write_stats(force=True)
    middle = time.time()
    time.sleep(0.01)  # created_at of the next stats row is strictly later
    assert client.post("/predict", json=BAD_ROW).status_code == 422
    assert client.post("/feedback", json={"labels": []}).status_code == 422
    log._write_stats(force=True)
    later = service_errors(client.store, middle, None)
    assert (later["requests"], later["prediction_requests"], later["refused_predictions"],
            later["other_client_errors"]) == (2, 1, 1, 1)
    assert later["error_rate"] == 0.0 and later["refused_rate"] == 1.0
    everything = service_errors(client.store, None, None)
    assert (everything["requests"], everything["other_client_errors"]) == (5, 4)
    before = service_errors(client.store, None, middle - 3600)
    assert before["requests"] == 0 and before["error_rate"] is None and before["refused_rate"] is None


def test_a_client_that_left_is_no_refused_prediction_and_counts_are_never_lost(trained):
    _, _, store = trained
    log = PredictionLog(store)  # not started: this test writes the stats itself
    for status, prediction in [(200, True), (499, True), (413, True), (503, True), (404, False), (200, False)]:
        log.count_request(status, prediction)
    log._write_stats(force=True)
    log.count_request(500, False)  # counted after a write: goes in the next one
    log._write_stats(force=True)
    log._write_stats(force=True)  # nothing new: no row
    counts = service_errors(store, None, None)
    assert {k: counts[k] for k in EXPECTED} == {"requests": 7, "prediction_requests": 4,
                                               "refused_predictions": 1, "server_errors": 2,
                                               "other_client_errors": 1, "client_errors": 3}
    with store.engine.connect() as conn:
        assert len(conn.execute(store.tables.service_stats.select()).fetchall()) == 2


def test_alerts_on_the_service_s_own_counts(client, monkeypatch):
    start = time.time()
    _mixed_traffic(client, monkeypatch)
    client.app.state.log._write_stats(force=True)
    health = service_errors(client.store, start, time.time())
    assert health_alerts(health, client.spec) == []  # 20 requests: under min_requests 100, not judged
    judged = _health_spec(client.spec, min_requests=10)
    assert health_alerts(health, judged) == [
        "health: error rate 10% > monitoring.health.max_error_rate 1% (2 of 20 requests failed with 5xx)",
        "health: 41.7% of predictions refused as bad input > monitoring.health.max_refused_rate 20% "
        "(5 of 12 prediction requests answered 4xx)",
    ]
    lenient = _health_spec(client.spec, min_requests=10, max_error_rate=0.1, max_refused_rate=0.5)
    assert health_alerts(health, lenient) == []  # rates equal to or under their maximum


def _health(**values: Any) -> dict[str, Any]:
    base = {"rows": 400, "latency_ms_p50": 4.0, "latency_ms_p95": 9.0, "latency_ms_p99": 812.0, "requests": 400,
            "prediction_requests": 400, "refused_predictions": 0, "server_errors": 30, "other_client_errors": 0,
            "error_rate": 30 / 400, "refused_rate": 0.0}
    return base | values


def test_alert_texts_for_each_threshold(client):
    spec = _health_spec(client.spec, max_error_rate=0.05, max_latency_ms_p99=250)
    assert health_alerts(_health(), spec) == [
        "health: error rate 7.5% > monitoring.health.max_error_rate 5% (30 of 400 requests failed with 5xx)",
        "health: latency p99 812 ms > monitoring.health.max_latency_ms_p99 250 ms (400 predictions)",
    ]
    refused = _health(server_errors=0, error_rate=0.0, refused_predictions=160, refused_rate=0.4)
    assert health_alerts(refused, spec) == [
        "health: 40% of predictions refused as bad input > monitoring.health.max_refused_rate 20% "
        "(160 of 400 prediction requests answered 4xx)",
        "health: latency p99 812 ms > monitoring.health.max_latency_ms_p99 250 ms (400 predictions)",
    ]
    # just above the limit: enough digits that the two never read the same
    close = _health(server_errors=201, requests=20000, error_rate=201 / 20000, latency_ms_p99=None)
    assert health_alerts(close, _health_spec(client.spec)) == [
        "health: error rate 1.005% > monitoring.health.max_error_rate 1% "
        "(201 of 20000 requests failed with 5xx)"]


def test_no_alert_when_healthy_off_or_not_judged(client):
    spec = _health_spec(client.spec, max_error_rate=0.05, max_latency_ms_p99=250)
    healthy = _health(server_errors=4, error_rate=0.01, latency_ms_p99=100.0)
    assert health_alerts(healthy, spec) == []
    assert health_alerts(_health(latency_ms_p99=None), _health_spec(client.spec, max_error_rate=0.1)) == []
    assert client.spec.monitoring.health.max_latency_ms_p99 is None  # latency is off by default
    few = _health(requests=99, prediction_requests=99, rows=99, server_errors=50, error_rate=50 / 99,
                  refused_predictions=49, refused_rate=49 / 99)
    assert health_alerts(few, spec) == []  # under min_requests (100): not judged, nothing said
    assert health_alerts({}, spec) == [] and health_alerts({"requests": 0, "error_rate": None}, spec) == []


def test_health_settings_in_the_project_file(client):
    health = client.spec.monitoring.health
    assert (health.max_error_rate, health.max_refused_rate, health.max_latency_ms_p99, health.min_requests) == (
        0.01, 0.2, None, 100)
    raw = client.spec.model_dump()
    raw["monitoring"]["health"] = {"max_error_rate": 1.5}
    with pytest.raises(SpecError, match="monitoring.health.max_error_rate"):
        parse_spec(raw)
