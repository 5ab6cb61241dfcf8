"""Training-serving skew as a replay: logged requests through the batch path give what the service gave."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from everloop import data, registry, train
from everloop.demo import make_churn
from everloop.errors import SpecError
from everloop.features import _fast
from everloop.monitor import replay_skew, skew_alert
from everloop.registry import PRODUCTION, load_model
from everloop.spec import load_spec, parse_spec
from everloop.spec._model import SkewSpec
from everloop.store import Store, prediction_log
from tests.conftest import send_traffic, write_project


def logged(store: Store) -> prediction_log.LoggedRows:
    """Every logged prediction, oldest first, as the monitor reads them."""
    with store.engine.connect() as conn:
        return prediction_log.to_rows(list(prediction_log.iter_batches(conn)))


def test_genuinely_new_data_is_not_skew(client):
    frame = make_churn(600, seed=41)
    send_traffic(client, frame.iloc[:250], labels=False)
    # a category training never had, nulls where training had none, values far outside training's range
    send_traffic(client, frame.iloc[250:500], labels=False, plan="gold-plus", satisfaction=None,
                 monthly_charges=5000.0)
    send_traffic(client, frame.iloc[500:], labels=False, age="41")  # text: the service's full check coerces
    rows = logged(client.store)
    assert (rows.features["plan"] == "gold-plus").sum() == 250
    assert rows.features["satisfaction"].isna().sum() == 250
    assert client.app.state.holder.current.fast is not None  # the service answered from its fast path

    result = replay_skew(load_model(client.store, PRODUCTION), rows.features, rows.outputs, ids=rows.ids)

    assert result == {"rows": 600, "mismatched": 0, "share": 0.0, "prediction_mismatches": 0, "refused": 0,
                      "features": [], "examples": []}
    assert skew_alert(result, client.spec) is None


def test_a_service_that_scales_a_feature_wrongly_is_skew(client, monkeypatch):
    model = client.app.state.holder.current
    features = model.pipeline.named_steps["features"]
    numeric = next(columns for name, _, columns in features.transformers_ if name == "numeric")
    j = numeric.index("monthly_charges")  # the numeric branch comes first: also its encoded position
    scale = features.named_transformers_["numeric"].named_steps["scale"].scale_[j]
    right_scale = _fast._Scale.transform

    def divides_twice(self: _fast._Scale, values: np.ndarray) -> np.ndarray:
        out = right_scale(self, values)
        out[:, j] /= scale  # the service's scaler divides monthly_charges by its scale twice
        return out

    monkeypatch.setattr(_fast._Scale, "transform", divides_twice)
    send_traffic(client, make_churn(500, seed=42), labels=False)
    rows = logged(client.store)
    trained = load_model(client.store, PRODUCTION)

    result = replay_skew(trained, rows.features, rows.outputs, ids=rows.ids)

    # What the buggy service computes, straight from scikit-learn: the rows whose probabilities it moves
    conformed = trained.conform(rows.features)[0]
    right = trained.pipeline.predict_proba(conformed)
    encoded = features.transform(conformed)
    encoded[:, j] /= scale
    wrong = trained.pipeline.named_steps["model"].predict_proba(encoded)
    expected = int((np.abs(right - wrong).max(axis=1) > 1e-5).sum())
    assert expected > 100  # the bug matters for many rows, not all
    assert result["rows"] == 500
    assert result["mismatched"] == result["prediction_mismatches"] == expected
    assert result["share"] == pytest.approx(expected / 500)
    # the logged inputs were right; the service's transform of them was not
    assert result["features"] == [] and result["refused"] == 0
    first = result["examples"][0]
    assert first["id"] in rows.ids and first["output"] in ("prediction", "probabilities")
    assert first["served"] != first["replayed"]
    alert = skew_alert(result, client.spec)
    assert alert.startswith(f"skew: {expected} of 500 replayed requests gave a different prediction "
                            "through the batch path")
    # a tolerated share of mismatches does not alert
    assert skew_alert(result, SkewSpec(max_mismatch_share=expected / 500)) is None


def test_logged_rows_that_the_batch_path_reads_differently_are_named(client):
    send_traffic(client, make_churn(300, seed=43), labels=False)
    rows = logged(client.store)
    trained = load_model(client.store, PRODUCTION)
    features, outputs = rows.features.copy(), copy.deepcopy(rows.outputs)
    features["age"] = features["age"].astype(object)
    for k in (3, 4, 5):  # logged as text: the service did not coerce the number
        features.loc[k, "age"] = f"{features.loc[k, 'age']:g}"
    features.loc[10, "age"] = "unknown"  # the batch path refuses the row ("n/a" would be a null)
    for k in (30, 31, 32, 33):  # answers of the other class
        (a, p), (b, q) = outputs[k]["probabilities"].items()
        outputs[k]["probabilities"] = {a: q, b: p}
        outputs[k]["prediction"] = int(b) if str(outputs[k]["prediction"]) == a else int(a)
    outputs[40]["probabilities"]["1"] += 1e-4  # beyond the tolerance
    outputs[41]["probabilities"]["1"] += 1e-7  # within it (and within the log's rounding)

    result = replay_skew(trained, features, outputs, ids=rows.ids)

    counts = (result["rows"], result["mismatched"], result["prediction_mismatches"], result["refused"])
    assert counts == (300, 9, 5, 1)
    assert result["features"] == ["age"]
    assert [e["id"] for e in result["examples"]] == [rows.ids[k] for k in (3, 4, 5, 10, 30)]
    assert result["examples"][0] == {"id": rows.ids[3], "column": "age", "served": features.loc[3, "age"],
                                     "replayed": float(features.loc[3, "age"])}
    assert result["examples"][3]["column"] == "age" and "not numbers" in result["examples"][3]["reason"]
    assert result["examples"][4]["output"] == "prediction"
    alert = skew_alert(result, client.spec)
    assert alert.startswith("skew: 9 of 300 replayed requests gave a different prediction through the batch")
    assert "features that change when conformed again: age" in alert
    assert "1 refused by the batch path" in alert

    # a seeded sample: the same rows for the same seed; every row of it counted when every row differs
    for output in outputs:
        output["probabilities"] = {c: 0.5 for c in output["probabilities"]}
    sample = replay_skew(trained, features, outputs, max_rows=50, seed=7)
    assert sample == replay_skew(trained, features, outputs, max_rows=50, seed=7)
    assert (sample["rows"], sample["mismatched"], sample["share"]) == (50, 50, 1.0)
    assert len(sample["examples"]) == 5 and "id" not in sample["examples"][0]  # no ids given, none in outputs


def test_nothing_logged_and_missing_columns_never_raise(client):
    send_traffic(client, make_churn(20, seed=44), labels=False)
    rows = logged(client.store)
    trained = load_model(client.store, PRODUCTION)
    empty = replay_skew(trained, rows.features.iloc[:0], [])
    assert empty == {"rows": 0, "mismatched": 0, "share": 0.0, "prediction_mismatches": 0, "refused": 0,
                     "features": [], "examples": []}
    assert skew_alert(empty, client.spec) is None
    result = replay_skew(trained, rows.features.drop(columns=["plan"]), rows.outputs)
    assert (result["rows"], result["mismatched"], result["refused"]) == (20, 20, 20)
    assert "'plan'" in result["examples"][0]["reason"] and "missing" in result["examples"][0]["reason"]
    with pytest.raises(ValueError, match="20 feature rows, 19 outputs"):
        replay_skew(trained, rows.features, rows.outputs[:19])


@pytest.fixture
def regression_client(tmp_path: Path):
    """A served regression model (total charges from the other features) of a small generated project."""
    from fastapi.testclient import TestClient

    from everloop.serve import create_app

    folder = write_project(
        tmp_path / "reg", rows=600, seed=5,
        data={"source": "data/customers.csv", "target": "total_charges", "id": "customer_id",
              "timestamp": "event_time"},
        features={"exclude": ["churned"]},
        model={"estimator": "sklearn.ensemble.HistGradientBoostingRegressor", "params": {"max_iter": 30},
               "seed": 1},
        evaluation={"split": {"holdout": 0.2}, "metric": "rmse", "slices": []},
    )
    spec, store = load_spec(folder), Store.for_project(folder)
    data.ingest(store, spec, base=folder)
    registry.promote(store, spec, train.train(store, spec).version, force=True)
    with TestClient(create_app(folder, watch=False)) as client:
        client.spec, client.store = spec, store
        yield client
    store.close()


def test_regression_predictions_agree_within_a_relative_tolerance(regression_client):
    client = regression_client
    send_traffic(client, make_churn(200, seed=45), labels=False, plan="gold-plus")
    rows = logged(client.store)
    trained = load_model(client.store, PRODUCTION)
    assert trained.task == "regression"
    assert replay_skew(trained, rows.features, rows.outputs)["mismatched"] == 0

    outputs = copy.deepcopy(rows.outputs)
    served = outputs[7]["prediction"]
    outputs[7]["prediction"] = served * (1 + 1e-3)  # beyond a relative 1e-5
    outputs[8]["prediction"] *= 1 + 1e-7  # within it

    result = replay_skew(trained, rows.features, outputs, ids=rows.ids)

    assert (result["mismatched"], result["prediction_mismatches"], result["features"]) == (1, 1, [])
    assert result["examples"] == [{"id": rows.ids[7], "output": "prediction", "served": served * (1 + 1e-3),
                                   "replayed": pytest.approx(served, rel=1e-9)}]
    assert replay_skew(trained, rows.features, outputs, tolerance=1e-2)["mismatched"] == 0


def test_skew_settings_and_the_old_keys_that_moved_to_drift():
    base = {"name": "p", "data": {"source": "d.csv", "target": "y"}}
    assert SkewSpec() == SkewSpec(sample_rows=1000, max_mismatch_share=0.0, tolerance=1e-5)
    spec = parse_spec(base | {"monitoring": {"skew": {"sample_rows": 200, "max_mismatch_share": 0.01,
                                                      "tolerance": 1e-4}}})
    assert spec.monitoring.skew == SkewSpec(sample_rows=200, max_mismatch_share=0.01, tolerance=1e-4)
    with pytest.raises(SpecError) as raised:
        parse_spec(base | {"monitoring": {"skew": {"max_unseen_share": 0.1, "max_null_rate_change": 0.2}}})
    message = str(raised.value)
    assert "monitoring.skew: max_null_rate_change, max_unseen_share moved to drift" in message
    assert "monitoring.drift" in message
    with pytest.raises(SpecError, match="sample_rows"):
        parse_spec(base | {"monitoring": {"skew": {"sample_rows": 0}}})


def test_date_times_compare_as_the_service_logs_them():
    from everloop.data import ColumnSchema, Schema
    from everloop.monitor._skew import _same_values

    col = ColumnSchema("when", "datetime", dtype="datetime", nullable=True)
    logged = pd.Series(["2026-01-01T06:30:00+00:00", "2026-01-01 06:30:00", None, "2026-01-01T07:30:00+01:00"],
                       dtype=object)
    conformed = Schema([col]).conform(pd.DataFrame({"when": logged}), mode="request")[0]["when"]
    # the service logs each conformed date/time as ISO 8601 in UTC: anything else was not conformed
    assert _same_values(col, logged, conformed).tolist() == [True, False, True, False]
    stamps = pd.Series(pd.to_datetime(["2026-01-01T06:30:00Z", "2026-01-02T00:00:00Z"]))
    assert _same_values(col, stamps, conformed.iloc[:2]).tolist() == [True, False]
