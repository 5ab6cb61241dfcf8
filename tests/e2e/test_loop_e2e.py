"""The whole loop against a real uvicorn server on a loopback port, with real files and databases."""

import threading
import time

import httpx
import pytest

from everloop import registry, train
from everloop.demo import DemoConfig, make_churn, run_demo
from everloop.monitor import monitor
from everloop.serve import ServerProcess
from tests.conftest import feature_rows, served_project

pytestmark = pytest.mark.e2e


def test_the_whole_loop_recovers_after_a_shift(tmp_path):
    result = run_demo(tmp_path / "demo", DemoConfig(history_rows=4000, window_rows=1500), say=lambda _m: None)
    phases = [(w["phase"], w["drift"], w["model"], w["loop"]) for w in result.windows]
    assert not result.drift_before_shift, phases
    assert result.drift_first_shifted_window, phases
    assert result.windows[2]["loop"] == "promoted"
    assert [w["model"] for w in result.windows] == ["v1", "v1", "v1", "v2", "v2"], "the server switched versions"
    c = result.comparison
    assert c["retrained"] > c["old"] + 0.03, c
    assert c["retrained"] >= 0.98 * c["direct"], c
    assert result.passed
    page = result.report.read_text()
    assert "plotly" in page.lower() and "Drift per feature and window" in page and "Verdict: " in page


def test_promotion_under_load_fails_no_request(tmp_path):
    folder, spec, store = served_project(tmp_path / "p")
    rows = feature_rows(make_churn(20, seed=5))
    seen, failures, stop = [], [], threading.Event()
    with ServerProcess(folder) as server:
        def hammer():
            with httpx.Client(base_url=server.url, timeout=10) as client:
                while not stop.is_set():
                    try:
                        answer = client.post("/predict", json={"instances": rows})
                        if answer.status_code != 200:
                            failures.append(answer.status_code)
                        else:
                            seen.append(answer.json()["model_version"])
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        new = train.train(store, spec).version
        registry.promote(store, spec, new, reason="swap under load")
        server.wait_for_version(new)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
    assert not failures
    assert seen[0] == 1 and seen[-1] == new and set(seen) == {1, new}


def test_postgresql_store_with_a_real_server(tmp_path, pg_url):
    folder, spec, store = served_project(tmp_path / "p", db_url=pg_url)
    shifted = make_churn(1000, shifted=True, seed=9)
    features = feature_rows(shifted)
    with ServerProcess(folder, env={"EVERLOOP_DB_URL": pg_url}) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post("/predict", json={"instances": features}).json()
        labels = [{"id": p["id"], "label": y} for p, y in zip(answer["predictions"], shifted["churned"])]
        assert client.post("/feedback", json={"labels": labels}).json()["accepted"] == 1000
    result = monitor(store, spec)
    assert result.window["rows"] == 1000 and result.performance["labelled_rows"] == 1000
    assert result.drift.dataset_drift
    store.close()


def test_metrics_add_up_across_workers(tmp_path):
    folder, spec, store = served_project(tmp_path / "p")
    rows = feature_rows(make_churn(3, seed=5))
    with ServerProcess(folder, workers=2) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(40):
            assert client.post("/predict", json={"instances": rows}).status_code == 200
        deadline = time.monotonic() + 5  # each worker writes its counts within a quarter second
        while True:
            text = client.get("/metrics").text
            line = next(x for x in text.splitlines()
                        if x.startswith('everloop_requests_total{endpoint="/predict",status="200"}'))
            if float(line.split()[-1]) == 40.0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert float(line.split()[-1]) == 40.0
    assert "everloop_process_resident_memory_bytes" in text and "everloop_model_version 1.0" in text
