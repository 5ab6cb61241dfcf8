"""Performance on real labels only: labels that arrive late, partly, of one class, or not at all."""

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.metrics import mean_absolute_error, roc_auc_score

from everloop import data, registry, train
from everloop.demo import make_churn
from everloop.monitor import list_runs, monitor
from everloop.serve import create_app
from everloop.spec import load_spec
from everloop.store import Store
from tests.conftest import feature_rows, write_project


def predict(client, frame) -> tuple[list[str], np.ndarray]:
    """POST the frame's rows; the prediction ids and P(churn) the service answered."""
    body = client.post("/predict", json={"instances": feature_rows(frame)}).json()
    client.app.state.log.flush()
    ids = [p["id"] for p in body["predictions"]]
    return ids, np.array([p["probabilities"]["1"] for p in body["predictions"]])


def label(client, ids, labels) -> None:
    answer = client.post("/feedback", json={"labels": [{"id": i, "label": y} for i, y in zip(ids, labels)]})
    assert answer.status_code == 200, answer.text


def test_labels_arriving_in_three_late_installments(client):
    frame = make_churn(200, seed=41)
    ids, p = predict(client, frame)
    y = frame["churned"].to_numpy()
    order = np.r_[np.flatnonzero(y == 1)[:5], np.flatnonzero(y == 0)[:15]]  # both classes in the first 20
    rest = np.setdiff1d(np.arange(200), order)
    installments = [order, rest[:70], rest[70:]]

    label(client, [ids[i] for i in installments[0]], y[installments[0]].tolist())
    first = monitor(client.store, client.spec, record=False)
    assert first.performance["labelled_rows"] == 20
    assert first.performance["value"] is None and not first.performance["decayed"]
    assert first.not_judged["performance"] == "fewer than 50 labelled rows (20): performance not judged yet"
    assert first.status == "not judged"

    label(client, [ids[i] for i in installments[1]], y[installments[1]].tolist())
    second = monitor(client.store, client.spec, record=False)
    seen = np.r_[installments[0], installments[1]]
    assert second.performance["labelled_rows"] == 90
    assert second.performance["value"] == pytest.approx(roc_auc_score(y[seen], p[seen]), abs=1e-6)
    assert "performance" not in second.not_judged

    label(client, [ids[i] for i in installments[2]], y[installments[2]].tolist())
    third = monitor(client.store, client.spec, record=False)
    assert third.performance["labelled_rows"] == 200
    assert third.performance["value"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
    # unchanged traffic: 200 labels are too few to call a gap to training's 400-row value decay
    perf = third.performance
    assert perf["value_low"] < perf["value"] < perf["value_high"]
    assert not perf["decayed"] and perf["loss_low"] <= perf["allowed_drop"]
    assert "performance" not in third.not_judged


def test_unlabelled_rows_are_never_scored_as_a_class(client):
    """90 of 100 labelled: the metric is the one on exactly those 90, not on 100 with invented labels."""
    frame = make_churn(100, seed=42)
    ids, p = predict(client, frame)
    y = frame["churned"].to_numpy()
    label(client, ids[:90], y[:90].tolist())
    result = monitor(client.store, client.spec, record=False)
    assert result.performance["labelled_rows"] == 90
    assert result.performance["value"] == pytest.approx(roc_auc_score(y[:90], p[:90]), abs=1e-6)


def test_labels_of_one_class_are_said_to_leave_roc_auc_undefined(client):
    frame = make_churn(400, seed=43)
    ids, _ = predict(client, frame)
    zeros = [i for i, v in zip(ids, frame["churned"]) if v == 0][:120]
    label(client, zeros, [0] * len(zeros))
    result = monitor(client.store, client.spec, record=False)
    assert result.performance["labelled_rows"] == 120 and result.performance["value"] is not None
    assert result.not_judged["performance"].startswith("roc_auc is undefined on one class: all 120 labelled rows")
    assert result.status != "healthy" and not result.performance["decayed"]


def test_the_labelled_window_reaches_past_newer_unlabelled_predictions(client):
    """The performance window is the latest N labelled predictions, separate from the drift window."""
    raw = client.spec.model_dump()
    raw["monitoring"]["performance"]["labelled_rows"] = 150
    from everloop.spec import parse_spec

    spec = parse_spec(raw)
    old = make_churn(300, seed=44)
    ids, p = predict(client, old)
    label(client, ids, old["churned"].tolist())
    predict(client, make_churn(700, seed=45))  # newer, no labels yet
    result = monitor(client.store, spec, record=False)
    y = old["churned"].to_numpy()
    assert result.window["rows"] == 1000 and result.performance["labelled_rows"] == 150
    assert result.performance["value"] == pytest.approx(roc_auc_score(y[-150:], p[-150:]), abs=1e-6)


@pytest.fixture
def regression(tmp_path):
    folder = write_project(tmp_path / "reg", rows=1200,
                           data={"source": "data/customers.csv", "target": "monthly_charges", "id": "customer_id",
                                 "timestamp": "event_time"},
                           model={"estimator": "sklearn.ensemble.HistGradientBoostingRegressor",
                                  "params": {"max_iter": 30}, "seed": 1},
                           evaluation={"split": {"holdout": 0.2}, "metric": "mae", "slices": []},
                           promotion={}, monitoring={"window": {"rows": 1000}})
    spec, store = load_spec(folder), Store.for_project(folder)
    data.ingest(store, spec, base=folder)
    registry.promote(store, spec, train.train(store, spec).version)
    with TestClient(create_app(folder, watch=False)) as client:
        client.spec, client.store = spec, store
        yield client
    store.close()


def test_a_regression_window_with_an_unlabelled_row(regression):
    frame = make_churn(100, seed=46)
    rows = frame.drop(columns=["customer_id", "event_time", "monthly_charges"]).to_dict(orient="records")
    body = regression.post("/predict", json={"instances": rows}).json()
    regression.app.state.log.flush()
    ids = [r["id"] for r in body["predictions"]]
    predicted = np.array([r["prediction"] for r in body["predictions"]])
    truth = frame["monthly_charges"].to_numpy()
    label(regression, ids[:99], truth[:99].tolist())
    result = monitor(regression.store, regression.spec, record=False)
    perf = result.performance
    assert perf["labelled_rows"] == 99
    assert perf["value"] == pytest.approx(mean_absolute_error(truth[:99], predicted[:99]), rel=1e-6)
    # the default allowed drop is relative to the training value: it means the same in dollars or cents
    assert perf["allowed_drop"] == pytest.approx(0.05 * perf["expected"])
    assert "5%" in " ".join(perf["rules"])


def test_a_rerun_over_the_same_rows_updates_its_window(client):
    from everloop.loop import run_once

    send = make_churn(2500, seed=47)
    ids, _ = predict(client, send)
    label(client, ids, send["churned"].tolist())
    first = monitor(client.store, client.spec)
    # window rows 1000: two complete blocks and one filling (500 rows) that gives the verdict
    assert first.window["index"] == 2 and first.window["rows"] == 500 and not first.window["complete"]
    runs = list_runs(client.store)
    assert [(r["window"]["index"], r["window"]["rows"]) for r in runs] == [(0, 1000), (1, 1000), (2, 500)]
    for _ in range(4):
        run_once(client.store, client.spec)
    assert [r["window"]["index"] for r in list_runs(client.store)] == [0, 1, 2]
    more = make_churn(600, seed=48)
    predict(client, more)
    again = monitor(client.store, client.spec)
    assert again.window["index"] == 3 and again.window["rows"] == 100
    assert [(r["window"]["index"], r["window"]["rows"]) for r in list_runs(client.store)] == [
        (0, 1000), (1, 1000), (2, 1000), (3, 100)]


def test_a_bad_label_stored_by_an_older_build_never_crashes_monitoring_or_the_loop(client):
    import time

    from everloop.loop import run_once

    frame = make_churn(1000, shifted=True, seed=49)
    ids, _ = predict(client, frame)
    label(client, ids[1:], frame["churned"].tolist()[1:])
    with client.store.engine.begin() as conn:  # unchecked, as an older build stored it
        conn.execute(client.store.tables.feedback.insert().values(prediction_id=ids[0], label="expensive",
                                                                  created_at=time.time()))
    result = monitor(client.store, client.spec, record=False)
    assert result.performance["labelled_rows"] == 999 and result.performance["invalid_labels"] == 1
    assert any("not valid for model v1" in n for n in result.notes)
    decision = run_once(client.store, client.spec)
    assert decision.action == "promoted", decision.reason


def test_labelled_decay_needs_the_uncertainty_of_both_numbers_to_exclude_the_threshold():
    from everloop.monitor import labelled_decay
    from everloop.spec import parse_spec
    from everloop.train import bootstrap_labels

    spec = parse_spec({"name": "d", "data": {"source": "x.csv", "target": "y"}})  # max_drop "5%"
    rng = np.random.default_rng(0)

    def auc_draws(rows, strength):
        y = rng.integers(0, 2, rows)
        score = y * strength + rng.normal(0, 1, rows)
        p = 1 / (1 + np.exp(-score))
        proba = np.column_stack([1 - p, p])
        return roc_auc_score(y, p), bootstrap_labels("roc_auc", y, (p > 0.5).astype(int), proba, [0, 1])

    expected, reference = auc_draws(400, 1.2)
    same_value, same = auc_draws(100, 1.2)  # unchanged traffic, few labels
    verdict = labelled_decay(spec, "roc_auc", expected, same_value, same, reference)
    assert not verdict["decayed"] and verdict["why"].startswith("within thresholds, or too uncertain to say")
    worse_value, worse = auc_draws(3000, 0.3)  # the relationship weakened: AUC far below
    verdict = labelled_decay(spec, "roc_auc", expected, worse_value, worse, reference)
    assert verdict["decayed"] and verdict["loss_low"] > 0.05 * expected
    assert "more than the allowed 5% of" in verdict["why"]


def test_worse_than_the_trivial_baseline_is_decay_even_without_a_training_reference(client):
    """Labels that contradict the model (as after a flip of the relationship): an imported model with
    in-sample metrics has no training value to compare with, but below the baseline is decay."""
    frame = make_churn(600, seed=52)
    ids, _ = predict(client, frame)
    label(client, ids, (1 - frame["churned"]).tolist())  # the opposite of the truth the model learned
    model = client.store.tables.models
    import sqlalchemy as sa

    with client.store.engine.begin() as conn:
        manifest = conn.execute(sa.select(model.c.manifest).where(model.c.version == 1)).scalar()
        conn.execute(model.update().where(model.c.version == 1).values(manifest=manifest | {"in_sample": True}))
    result = monitor(client.store, client.spec, record=False)
    perf = result.performance
    assert perf["value"] < 0.5 and perf["decayed"]
    assert perf["why"].startswith("worse than the trivial baseline's 0.5000")
    assert any(n.startswith("model v1 was imported") for n in result.notes)
