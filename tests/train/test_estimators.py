"""Estimators by dotted path: scikit-learn, LightGBM and XGBoost (the `boost` extra); every task."""

import numpy as np
import pandas as pd
import pytest

from everloop import data, registry, train
from everloop.spec import parse_spec
from everloop.store import Store
from tests.conftest import write_project


def _setup(tmp_path, target="churned", **overrides):
    folder = write_project(tmp_path / "p", rows=1500)
    raw = {"name": "t", "data": {"source": "data/customers.csv", "target": target, "id": "customer_id",
                                 "timestamp": "event_time"}} | overrides
    spec = parse_spec(raw)
    store = Store.for_project(folder)
    data.ingest(store, spec, base=folder)
    return folder, spec, store


@pytest.mark.parametrize("estimator", ["lightgbm.LGBMClassifier", "xgboost.XGBClassifier",
                                       "sklearn.ensemble.RandomForestClassifier"])
def test_binary_classifiers(tmp_path, estimator):
    pytest.importorskip(estimator.split(".")[0])
    folder, spec, store = _setup(tmp_path, model={"estimator": estimator, "params": {"n_estimators": 50}})
    result = train.train(store, spec)
    assert result.value > result.baseline + 0.1
    model = registry.load_model(store, result.version)
    predictions = model.predict(pd.read_csv(folder / "data" / "customers.csv").head(5))
    assert set(predictions.labels) <= {0, 1} and predictions.proba.shape == (5, 2)
    assert train.reproduce(store, result.version).identical


@pytest.mark.parametrize("estimator", ["sklearn.ensemble.HistGradientBoostingClassifier",
                                       "lightgbm.LGBMClassifier", "xgboost.XGBClassifier"])
def test_multiclass_with_string_labels(tmp_path, estimator):
    pytest.importorskip(estimator.split(".")[0])
    folder, spec, store = _setup(tmp_path, target="contract", model={"estimator": estimator},
                                 evaluation={"metric": "accuracy"})
    result = train.train(store, spec)
    model = registry.load_model(store, result.version)
    assert model.classes == ["month-to-month", "one-year", "two-year"]
    predictions = model.predict(pd.read_csv(folder / "data" / "customers.csv").head(20))
    assert set(predictions.labels) <= set(model.classes) and predictions.proba.shape == (20, 3)
    assert np.allclose(predictions.proba.sum(axis=1), 1)


@pytest.mark.parametrize("estimator", ["lightgbm.LGBMRegressor", "xgboost.XGBRegressor",
                                       "sklearn.linear_model.Ridge"])
def test_regressors(tmp_path, estimator):
    pytest.importorskip(estimator.split(".")[0])
    folder, spec, store = _setup(tmp_path, target="total_charges", model={"estimator": estimator})
    result = train.train(store, spec)
    assert result.metric == "rmse" and result.value < result.baseline


def test_ordinal_encoding_datetime_features_and_calibration(tmp_path):
    folder = write_project(tmp_path / "p", rows=1500)
    frame = pd.read_csv(folder / "data" / "customers.csv")
    frame["last_order"] = pd.to_datetime(frame["event_time"]) - pd.to_timedelta(frame["days_since_last_login"], "D")
    frame.to_csv(folder / "data" / "customers.csv", index=False)
    spec = parse_spec({"name": "t", "data": {"source": "data/customers.csv", "target": "churned",
                                             "id": "customer_id", "timestamp": "event_time"},
                       "features": {"categorical_encoding": "ordinal"}})
    store = Store.for_project(folder)
    data.ingest(store, spec, base=folder)
    schema = data.current_schema(store)[1]
    assert schema.column("last_order").kind == "datetime" and "last_order" in schema.feature_names
    result = train.train(store, spec)
    model = registry.load_model(store, result.version)
    encoder = model.pipeline.named_steps["features"].named_transformers_["categorical"].named_steps["encode"]
    assert type(encoder).__name__ == "OrdinalEncoder"
    assert "last_order_day_of_week" in list(model.pipeline.named_steps["features"].get_feature_names_out())
    unseen = frame.head(3).assign(plan="platinum")  # unseen categories are safe with ordinal encoding too
    assert model.predict(unseen).proba.shape == (3, 2)
