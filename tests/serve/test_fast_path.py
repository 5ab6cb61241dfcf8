"""The serving fast path: the numpy replays of the feature steps and the compiled tree ensembles
answer exactly (features) or within 1e-9 (trees) what scikit-learn answers, or stand aside."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, OrdinalEncoder, StandardScaler

from everloop.features import FastFeatures, fill_missing_category
from everloop.serve._compiled import TOLERANCE, compile_trees


def _frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    colors = np.array(["red", "blue", "green", "rare"], dtype=object)[rng.choice(4, n, p=[0.5, 0.3, 0.19, 0.01])]
    return pd.DataFrame({"x": rng.normal(size=n), "z": rng.exponential(size=n), "color": colors,
                         "size": rng.choice(["s", "m", "l"], n).astype(object)})


@pytest.mark.parametrize("encoder", [
    OneHotEncoder(handle_unknown="ignore", sparse_output=False, min_frequency=5),  # "rare" is infrequent
    OneHotEncoder(handle_unknown="infrequent_if_exist", sparse_output=False, min_frequency=5),
    OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1),
])
def test_fast_features_equal_the_column_transformer(encoder):
    train = _frame()
    features = ColumnTransformer([
        ("numeric", Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())]), ["x", "z"]),
        ("categorical", Pipeline([("fill", FunctionTransformer(fill_missing_category)), ("encode", encoder)]),
         ["color", "size"]),
    ]).fit(train)
    fast = FastFeatures(features)
    rows = _frame(50, seed=1)
    rows.loc[0:4, "x"] = np.nan  # missing numbers, missing, unseen and infrequent categories
    rows.loc[5:9, "color"] = None
    rows.loc[10:14, "color"] = "purple"
    rows.loc[15:19, "size"] = "rare"
    expected = features.transform(rows)
    assert np.array_equal(fast.transform(rows), expected)
    columns = {name: rows[name].to_numpy() for name in rows.columns}  # the request path's column arrays
    assert np.array_equal(fast.transform(columns), expected)


@pytest.mark.parametrize("make", [
    lambda: HistGradientBoostingClassifier(max_iter=30),
    lambda: HistGradientBoostingRegressor(max_iter=30),
    "multiclass",
    "lightgbm",
])
def test_compiled_trees_answer_as_scikit_learn(make, tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 6))
    X[::17, 2] = np.nan  # missing values take the trees' default branches
    y = (X[:, 0] + np.nan_to_num(X[:, 2]) > 0).astype(int)
    if make == "multiclass":
        estimator = HistGradientBoostingClassifier(max_iter=20).fit(X, y + (X[:, 1] > 1))
    elif make == "lightgbm":
        lightgbm = pytest.importorskip("lightgbm")
        estimator = lightgbm.LGBMClassifier(n_estimators=20, verbose=-1).fit(X, y)
    else:
        estimator = make()
        estimator.fit(X, X[:, 0] if isinstance(estimator, HistGradientBoostingRegressor) else y)
    classification = hasattr(estimator, "predict_proba")
    compiled = compile_trees(estimator, classification, X[:100], tmp_path)
    assert compiled is not None
    fresh = rng.normal(size=(50, 6))
    expected = estimator.predict_proba(fresh) if classification else estimator.predict(fresh)
    assert np.allclose(compiled(fresh), expected, rtol=0, atol=TOLERANCE)
    assert len(list(tmp_path.glob("*.so"))) == 1  # cached: a second compile reuses the library
    assert compile_trees(estimator, classification, X[:100], tmp_path) is not None
    assert len(list(tmp_path.glob("*.so"))) == 1


def test_what_cannot_be_compiled_stays_on_scikit_learn(tmp_path):
    X = np.random.default_rng(0).normal(size=(100, 3))
    assert compile_trees(LogisticRegression().fit(X, X[:, 0] > 0), True, X, tmp_path) is None
    # Treelite 4.1's random-forest importer fails under numpy 2: refused, never served wrong
    forest = RandomForestClassifier(n_estimators=5, random_state=0).fit(X, X[:, 0] > 0)
    compiled = compile_trees(forest, True, X, tmp_path)
    assert compiled is None or np.allclose(compiled(X), forest.predict_proba(X), rtol=0, atol=TOLERANCE)


def test_the_service_switches_to_compiled_trees_and_can_be_told_not_to(tmp_path):
    from fastapi.testclient import TestClient

    from everloop.serve import create_app
    from tests.conftest import feature_rows, served_project

    folder, spec, store = served_project(tmp_path / "p", rows=800)
    from everloop.demo import make_churn

    rows = feature_rows(make_churn(20, seed=9))
    with TestClient(create_app(folder)) as client:
        before = client.post("/predict", json={"instances": rows}).json()
        deadline = time.monotonic() + 60
        while client.get("/model").json()["predictor"] != "compiled":
            assert time.monotonic() < deadline, "the compiled trees never took over"
            time.sleep(0.2)
        after = client.post("/predict", json={"instances": rows}).json()
    for a, b in zip(before["predictions"], after["predictions"]):
        assert a["prediction"] == b["prediction"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)

    off = spec.model_copy(update={"serving": spec.serving.model_copy(update={"compile_trees": False})})
    with TestClient(create_app(folder, spec=off)) as client:
        client.post("/predict", json={"instances": rows})
        time.sleep(1)
        assert client.get("/model").json()["predictor"] == "scikit-learn"


def test_no_c_compiler_leaves_scikit_learn_serving(tmp_path, monkeypatch, caplog):
    import everloop.serve._compiled as compiled_module

    monkeypatch.setattr(compiled_module.shutil, "which", lambda name: None)
    X = np.random.default_rng(1).normal(size=(200, 4))
    model = HistGradientBoostingClassifier(max_iter=5).fit(X, X[:, 0] > 0)
    assert compile_trees(model, True, X[:50], tmp_path) is None
    assert "no C compiler" in caplog.text
