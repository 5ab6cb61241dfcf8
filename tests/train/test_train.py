from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from everloop import data, registry, train
from everloop.errors import TrainError
from everloop.spec import parse_spec
from everloop.store import Store
from tests.conftest import write_project


def test_training_records_metrics_baseline_and_lineage(trained):
    folder, spec, store = trained
    model = registry.get_model(store, "production")
    m = model.manifest
    assert m["task"] == "classification" and m["metric"] == "roc_auc"
    assert 0.7 < m["metrics"]["roc_auc"] <= 1 and m["baseline"]["roc_auc"] == pytest.approx(0.5)
    assert set(m["metrics"]) == {"roc_auc", "accuracy", "f1", "log_loss", "calibration_error"}
    assert 0 <= m["metrics"]["calibration_error"] < 0.1
    assert set(m["slices"]["plan"]) == {"basic", "premium", "standard"}
    assert m["dataset_version"] == 1 and m["dataset_hash"] == data.get_dataset(store, 1).content_hash
    assert m["packages"]["scikit-learn"] and m["seed"] == 42 and m["spec_hash"]


def test_training_is_deterministic(trained):
    folder, spec, store = trained
    again = train.train(store, spec)
    first, second = registry.load_model(store, 1), registry.load_model(store, again.version)
    rows = pd.read_csv(folder / "data" / "customers.csv").head(300)
    np.testing.assert_array_equal(first.predict(rows).proba, second.predict(rows).proba)


def test_regression_task(tmp_path: Path):
    folder = write_project(tmp_path / "reg")
    frame = pd.read_csv(folder / "data" / "customers.csv")
    frame.to_csv(folder / "data" / "customers.csv", index=False)
    spec = parse_spec({"name": "charges", "data": {"source": "data/customers.csv", "target": "total_charges",
                                                   "id": "customer_id", "timestamp": "event_time"},
                       "model": {"params": {"max_iter": 50}}})
    store = Store.for_project(folder)
    data.ingest(store, spec, base=folder)
    result = train.train(store, spec)
    assert result.metric == "rmse" and result.value < result.baseline and result.lift > 0
    predictions = registry.load_model(store, result.version).predict(frame.head(5))
    assert predictions.proba is None and predictions.labels.dtype == float


def test_bad_estimator_and_params_are_clear(trained):
    folder, spec, store = trained
    raw = spec.model_dump()
    raw["model"]["estimator"] = "sklearn.ensemble.NoSuchModel"
    with pytest.raises(TrainError, match="cannot be imported"):
        train.train(store, parse_spec(raw))
    raw["model"]["estimator"] = "sklearn.linear_model.LogisticRegression"
    raw["model"]["params"] = {"bogus": 1}
    with pytest.raises(TrainError, match="model.params do not fit"):
        train.train(store, parse_spec(raw))
    raw["model"]["estimator"] = "sklearn.linear_model.LinearRegression"
    raw["model"]["params"] = {}
    with pytest.raises(TrainError, match="is a regressor"):
        train.train(store, parse_spec(raw))


def test_other_estimators_by_dotted_path(trained):
    folder, spec, store = trained
    raw = spec.model_dump()
    raw["model"] = {"estimator": "sklearn.linear_model.LogisticRegression", "params": {"max_iter": 500}, "seed": 1}
    result = train.train(store, parse_spec(raw))
    assert result.value > result.baseline
