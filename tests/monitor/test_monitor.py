"""The monitor on a served model: streaming windows, skew, error rates, estimated performance, alerts."""


import pytest

from everloop.demo import make_churn
from everloop.monitor import _monitor, list_runs, monitor
from everloop.spec import parse_spec
from tests.conftest import send_traffic



def test_windows_stream_in_batches_with_the_same_result(client, monkeypatch):
    send_traffic(client, make_churn(1000, shifted=True, seed=31))
    whole = monitor(client.store, client.spec, record=False)
    monkeypatch.setattr(_monitor, "READ_BATCH", 97)
    batched = monitor(client.store, client.spec, record=False)
    assert [c.statistic for c in whole.drift.columns] == pytest.approx([c.statistic for c in batched.drift.columns])
    assert whole.performance["value"] == pytest.approx(batched.performance["value"])
    assert whole.window["rows"] == batched.window["rows"] == 1000


def test_estimated_performance_without_labels(client):
    send_traffic(client, make_churn(1000, seed=32), labels=False)
    result = monitor(client.store, client.spec, record=False)
    performance = result.performance
    assert performance["labelled_rows"] == 0 and performance["value"] is None
    assert performance["estimated"] == pytest.approx(performance["expected"], abs=0.05)
    assert not performance["estimated_decayed"]


def test_values_training_never_had_are_drift_not_skew(client):
    send_traffic(client, make_churn(600, seed=33), plan="gold-plus", satisfaction=None)
    result = monitor(client.store, client.spec, record=False)
    columns = {c.column: c for c in result.drift.columns}
    assert columns["plan"].drifted and "unseen categories" in columns["plan"].reasons
    assert columns["plan"].unseen_share == 1.0
    assert columns["satisfaction"].drifted and "null rate" in columns["satisfaction"].reasons
    # the service computed exactly what the batch path computes from the same rows: no skew
    assert result.skew["rows"] == 600 and result.skew["mismatched"] == 0
    assert not any(a.startswith("skew:") for a in result.alerts)


def test_health_has_latency_and_error_rate(client):
    send_traffic(client, make_churn(300, seed=34))
    for _ in range(10):
        client.post("/predict", json={"features": {"age": "x"}})
    client.app.state.log._write_stats(force=True)
    health = monitor(client.store, client.spec, record=False).health
    assert health["latency_ms_p50"] > 0 and health["latency_ms_p99"] >= health["latency_ms_p50"]
    # refused predictions are bad input, counted apart from server errors
    assert health["refused_predictions"] == 10 and health["server_errors"] == 0 and health["error_rate"] == 0
    assert health["refused_rate"] == pytest.approx(10 / (health["prediction_requests"]))


def test_alerts_reach_the_webhook_and_runs_are_stored(client, webhook):
    url, received = webhook
    raw = client.spec.model_dump()
    raw["monitoring"]["webhook"] = url
    send_traffic(client, make_churn(1000, shifted=True, seed=35))
    result = monitor(client.store, parse_spec(raw))
    assert result.status.startswith("drift") and received and received[0]["event"] == "monitor"
    assert received[0]["alerts"] == result.alerts
    stored = list_runs(client.store, limit=1)[-1]
    assert stored["status"] == result.status and stored["distributions"]
    # the scores' distribution, reference vs window, counting every scored row of the window
    scores = stored["prediction_distribution"]
    inside = sum(scores["current"]) + scores["below"]["current"] + scores["above"]["current"]
    assert inside + scores["missing"]["current"] == result.window["rows"] == 1000 and sum(scores["reference"]) > 0


def test_prediction_drift_alerts_unless_left_out_of_alert_on(client):
    send_traffic(client, make_churn(1000, shifted=True, seed=36))
    result = monitor(client.store, client.spec, record=False)
    assert result.prediction_drift.drifted and result.prediction_drift.effect >= 0.1
    assert any(a.startswith("prediction drift:") for a in result.alerts) and "prediction_drift" in result.status
    raw = client.spec.model_dump()
    raw["monitoring"]["alert_on"] = ["drift", "decay"]
    quiet = monitor(client.store, parse_spec(raw), record=False)
    assert not any(a.startswith("prediction drift:") for a in quiet.alerts)
    assert any(n.startswith("prediction drift:") for n in quiet.notes)


def test_stable_traffic_raises_no_alert_of_any_kind(client):
    send_traffic(client, make_churn(1000, seed=37))
    result = monitor(client.store, client.spec, record=False)
    assert result.alerts == [] and result.status == "healthy", (result.alerts, result.not_judged)


def test_a_window_pages_once_however_often_the_loop_turns(client, webhook):
    url, received = webhook
    raw = client.spec.model_dump()
    raw["monitoring"]["webhook"] = url
    spec = parse_spec(raw)
    send_traffic(client, make_churn(1000, shifted=True, seed=38))
    first = monitor(client.store, spec)
    assert first.alerts and len(received) == 1
    again = monitor(client.store, spec)
    assert again.alerts == first.alerts and len(received) == 1, "the same window's alerts are not sent twice"
    assert len(list_runs(client.store)) == 1


def test_a_failed_delivery_is_tried_again_and_a_filling_window_pages_once(client, webhook):
    url, received = webhook
    raw = client.spec.model_dump()
    raw["monitoring"]["webhook"] = "http://127.0.0.1:9/down"  # nothing listens: the delivery fails
    send_traffic(client, make_churn(600, shifted=True, seed=39))
    down = monitor(client.store, parse_spec(raw))
    assert down.alerts and down.delivered == []
    raw["monitoring"]["webhook"] = url
    spec = parse_spec(raw)
    up = monitor(client.store, spec)
    assert len(received) == 1 and set(up.delivered) >= {"drift"}
    send_traffic(client, make_churn(200, shifted=True, seed=40))  # the same window fills up: new numbers
    monitor(client.store, spec)
    assert len(received) == 1
