"""`everloop models import` of the pipeline shapes users bring: each serves the numbers of its own
predict/predict_proba on the user's file as pandas reads it, or is refused with the reason (issue 12).

One small generated table (fixed seed) with the column types that trip a model fitted on
`pandas.read_csv`: a True/False column (pandas: bool; everloop's schema: the text 'True'/'False'), an
integer code column the project file makes categorical (pandas: int; everloop: '1', '2', '3'),
numbers with missing values, text, and three kinds of target (0/1, strings, numbers).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestRegressor
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, OrdinalEncoder, StandardScaler

from everloop import data, registry
from everloop.errors import TrainError
from everloop.registry._import import AsRead, _as_bool, _as_number, describe
from everloop.spec import load_spec
from everloop.store import Store

NUMERIC, CATEGORICAL = ["age", "income"], ["member", "plan"]
TARGETS = {"y": "classes 0/1", "label": "string classes", "amount": "numbers"}


def _table(rows: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    table = pd.DataFrame({"age": rng.integers(18, 80, rows), "income": rng.normal(50, 10, rows).round(2),
                          "member": rng.random(rows) < 0.5, "plan": rng.choice(["basic", "plus", "pro"], rows),
                          "code": rng.choice([1, 2, 3], rows)})
    table.loc[rng.random(rows) < 0.1, "income"] = np.nan
    signal = table["member"] * 2 + (table["income"].fillna(50) - 50) / 10 + (table["code"] == 2)
    table["y"] = (signal + rng.normal(size=rows) > 1).astype(int)
    table["label"] = np.where(table["y"] == 1, "churned", "stayed")
    table["amount"] = table["age"] * 3 + table["income"].fillna(50) + 5 * table["member"] + rng.normal(size=rows)
    return table


def _project(folder: Path, target: str = "y", **features) -> tuple[Path, object, Store, pd.DataFrame, pd.Series]:
    """A project whose train.csv holds the table with one target; ingested. Returns the folder, spec,
    store, and the features and target as the user's notebook reads them (pandas.read_csv)."""
    folder.mkdir(parents=True)
    _table().drop(columns=[t for t in TARGETS if t != target]).to_csv(folder / "train.csv", index=False)
    spec = {"name": "kinds", "data": {"source": "train.csv", "target": target}}
    if features:
        spec["features"] = features
    (folder / "everloop.yaml").write_text(yaml.safe_dump(spec))
    spec, store = load_spec(folder), Store.for_project(folder)
    data.ingest(store, spec, base=folder)
    X = pd.read_csv(folder / "train.csv")
    return folder, spec, store, X, X.pop(target)


def _served(folder: Path, spec, store, version: int, X: pd.DataFrame, task: str) -> np.ndarray:
    """What the HTTP service answers for the rows of X sent as JSON (true/false, numbers, text)."""
    from fastapi.testclient import TestClient

    from everloop.serve import create_app

    registry.promote(store, spec, version)
    with TestClient(create_app(folder, spec=spec, store=store, watch=False)) as client:
        answer = client.post("/predict", json={"instances": json.loads(X.to_json(orient="records"))})
        assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    if task == "regression":
        return np.array([p["prediction"] for p in predictions])
    return np.array([list(p["probabilities"].values()) for p in predictions])


def _numeric_only(frame: pd.DataFrame) -> pd.DataFrame:
    """A notebook's FunctionTransformer step: the numbers, missing ones as 0."""
    return frame[NUMERIC].fillna(0)


def _one_hot_bools() -> Pipeline:
    return Pipeline([("prep", ColumnTransformer([("oh", OneHotEncoder(handle_unknown="ignore"), CATEGORICAL)],
                                                remainder="passthrough")),
                     ("impute", SimpleImputer()), ("clf", LogisticRegression(max_iter=1000))])


SHAPES = {
    # name: (target, project-file features, the user's pipeline, the columns it is fitted on)
    "one-hot of a True/False column": ("y", {}, _one_hot_bools, None),
    "SimpleImputer + StandardScaler on numbers": (
        "y", {}, lambda: make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression()), NUMERIC),
    "OrdinalEncoder, an int code the project makes categorical": (
        "y", {"categorical": ["member", "plan", "code"]},
        lambda: Pipeline([("prep", ColumnTransformer([
            ("ord", OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1), CATEGORICAL + ["code"]),
            ("num", SimpleImputer(), NUMERIC)])), ("clf", HistGradientBoostingClassifier(max_iter=20))]), None),
    "a FunctionTransformer first": (
        "y", {}, lambda: make_pipeline(FunctionTransformer(_numeric_only), LogisticRegression()), None),
    "a classifier with string labels": (
        "label", {}, lambda: Pipeline([("prep", ColumnTransformer([
            ("oh", OneHotEncoder(handle_unknown="ignore"), CATEGORICAL), ("num", SimpleImputer(), NUMERIC)])),
            ("clf", LogisticRegression(max_iter=1000))]), None),
    "a regressor": (
        "amount", {}, lambda: Pipeline([("prep", ColumnTransformer([
            ("oh", OneHotEncoder(handle_unknown="ignore"), CATEGORICAL), ("num", SimpleImputer(), NUMERIC)])),
            ("reg", RandomForestRegressor(n_estimators=10, random_state=0))]), None),
    "remainder='passthrough' (never the fast path)": (
        "y", {}, lambda: Pipeline([("prep", ColumnTransformer([("oh", OneHotEncoder(handle_unknown="ignore"),
                                                                 ["plan"])], remainder="passthrough")),
                                   ("clf", HistGradientBoostingClassifier(max_iter=20, random_state=0))]), None),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_pipeline_shape_serves_its_own_answers(tmp_path, shape):
    target, features, make, columns = SHAPES[shape]
    folder, spec, store, X, y = _project(tmp_path / "p", target, **features)
    pipeline = make().fit(X[columns] if columns else X, y)
    joblib.dump(pipeline, folder / "model.joblib")
    result = registry.import_model(store, spec, folder / "model.joblib", 1)
    assert result.found == "pipeline" and not result.refit
    checked = registry.get_model(store, 1).manifest["imported_from"]["checked"]
    assert checked["rows"] == len(X) and checked["max_difference"] <= 1e-9 and checked["read_from"] == "train.csv"
    task = "regression" if target == "amount" else "classification"
    own = pipeline.predict(X[columns] if columns else X) if task == "regression" else \
        pipeline.predict_proba(X[columns] if columns else X)
    assert np.abs(_served(folder, spec, store, 1, X, task) - own).max() <= 5e-7  # JSON's 6 decimals
    call = "predict" if task == "regression" else "predict_proba"
    assert result.serves == (f"model v1 serves {describe(pipeline)} from model.joblib as it is, with its own "
                             f"fitted state; its answers equal its own {call} on {len(X)} rows of train.csv")


def test_a_true_false_column_reaches_the_pipeline_as_pandas_read_it(tmp_path):
    """The tester's silent wrong answer: a OneHotEncoder fitted on a bool column got 'True'/'False' from
    everloop, its one-hot was all zeros, and the service answered 0.742 where the pipeline says 0.833."""
    from everloop.serve._holder import ModelHolder

    folder, spec, store, X, y = _project(tmp_path / "p")
    assert X["member"].dtype == bool
    pipeline = _one_hot_bools().fit(X, y)
    joblib.dump(pipeline, folder / "model.joblib")
    result = registry.import_model(store, spec, folder / "model.joblib", 1)
    model = registry.load_model(store, 1)
    step = model.pipeline.named_steps["features"]
    assert isinstance(step, AsRead) and step.kinds == {"member": "bool"}
    # the metric is the pipeline's own, not that of a pipeline blind to 'member'
    assert result.value == pytest.approx(roc_auc_score(y, pipeline.predict_proba(X)[:, 1]), abs=1e-12)
    registry.promote(store, spec, 1)
    holder = ModelHolder(store, compile_trees=False)
    assert holder.refresh() and holder.last_error is None
    rows = X.head(60).assign(member=X["member"].head(60).map({True: "True", False: "False"}))
    assert np.array_equal(holder.current.predict(rows).proba, pipeline.predict_proba(X.head(60)))


def test_answers_that_differ_from_the_models_own_refuse_the_import_naming_the_column(tmp_path):
    """The safety net for the mismatches not foreseen: dates pandas leaves as text, which everloop reads
    as dates; a pipeline one-hot encoding that text would get unseen dates and answer otherwise."""
    rng = np.random.default_rng(1)
    table = pd.DataFrame({"x": rng.normal(size=300), "day": rng.choice(["2024-01-01", "2024-02-01"], 300)})
    table["y"] = (table["x"] + 2 * (table["day"] == "2024-02-01") + rng.normal(size=300) > 1).astype(int)
    folder = tmp_path / "p"
    folder.mkdir()
    table.to_csv(folder / "train.csv", index=False)
    (folder / "everloop.yaml").write_text(yaml.safe_dump({"name": "d", "data": {"source": "train.csv",
                                                                                 "target": "y"}}))
    spec, store = load_spec(folder), Store.for_project(folder)
    data.ingest(store, spec, base=folder)
    X = pd.read_csv(folder / "train.csv")
    pipeline = Pipeline([("prep", ColumnTransformer([("oh", OneHotEncoder(handle_unknown="ignore"), ["day"])],
                                                    remainder="passthrough")),
                         ("clf", LogisticRegression())]).fit(X[["x", "day"]], X["y"])
    joblib.dump(pipeline, folder / "model.joblib")
    with pytest.raises(TrainError) as refused:
        registry.import_model(store, spec, folder / "model.joblib", 1)
    message = str(refused.value)
    assert "everloop would answer otherwise than the model, so it was not imported" in message
    assert "on the first 300 rows of train.csv as pandas.read_csv reads them" in message
    assert "The model gets day as 2024-0" in message and "(datetime) where pandas.read_csv read '2024-0" in message
    assert "x as" not in message  # a column that reaches the model as pandas read it is not blamed
    assert registry.list_models(store) == []


def test_a_bare_estimator_fitted_on_some_raw_columns_is_served_those_columns(tmp_path):
    folder, spec, store, X, y = _project(tmp_path / "p")
    model = HistGradientBoostingClassifier(max_iter=15, random_state=0).fit(X[["income", "age"]], y)
    joblib.dump(model, folder / "bare.joblib")
    result = registry.import_model(store, spec, folder / "bare.joblib", 1)
    assert result.found == "pipeline" and not result.refit
    assert result.description == ("HistGradientBoostingClassifier, fitted on 2 of the raw columns (income, age), "
                                  "which it is given")
    step = registry.load_model(store, 1).pipeline.named_steps["features"]
    assert step.columns == ["income", "age"] and not step.kinds
    served = _served(folder, spec, store, 1, X.head(80), "classification")
    assert np.abs(served - model.predict_proba(X[["income", "age"]].head(80))).max() <= 5e-7


def test_with_features_the_result_says_a_clone_serves_not_the_files_weights(tmp_path):
    folder, spec, store, X, y = _project(tmp_path / "p")
    encoded = pd.get_dummies(X, columns=["plan"]).fillna(0)
    joblib.dump(LogisticRegression(C=0.5, max_iter=500).fit(encoded, y), folder / "bare.joblib")
    result = registry.import_model(store, spec, folder / "bare.joblib", 1, features=True)
    assert result.refit and result.found == "estimator"
    assert result.serves == ("model v1 serves a fresh clone of LogisticRegression (same class and "
                             "hyper-parameters; nothing fitted in bare.joblib is used), fitted by everloop behind "
                             "its own feature pipeline on the training rows of dataset v1")
    manifest = registry.get_model(store, 1).manifest
    assert manifest["reason"].startswith(f"a fresh clone of the estimator in {folder / 'bare.joblib'} (sha256 ")
    assert manifest["reason"].endswith("fitted by everloop behind its own features on dataset v1")


def test_an_unfitted_pipeline_an_empty_file_and_a_truncated_one_say_so(tmp_path):
    folder, spec, store, X, y = _project(tmp_path / "p")
    joblib.dump(_one_hot_bools(), folder / "unfitted.joblib")
    with pytest.raises(TrainError) as refused:
        registry.import_model(store, spec, folder / "unfitted.joblib", 1)
    assert str(refused.value).startswith("unfitted.joblib: the pipeline is not fitted (call fit before saving)")
    joblib.dump(LogisticRegression(), folder / "bare.joblib")
    with pytest.raises(TrainError, match=r"^bare.joblib: the model is not fitted \(call fit before saving\).*"
                                         r"or pass --features"):
        registry.import_model(store, spec, folder / "bare.joblib", 1)

    (folder / "empty.pkl").write_bytes(b"")
    with pytest.raises(TrainError) as empty:
        registry.import_model(store, spec, folder / "empty.pkl", 1)
    message = str(empty.value)
    assert message.startswith("empty.pkl is empty, not a pickled model") and "EOFError" not in message
    blob = pickle.dumps(_one_hot_bools().fit(X, y))
    (folder / "cut.pkl").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(TrainError, match="cut.pkl ends before the pickled model does: the file is truncated"):
        registry.import_model(store, spec, folder / "cut.pkl", 1)
    assert registry.list_models(store) == []


def test_a_source_that_moved_is_checked_on_the_stored_rows_read_back_by_pandas(tmp_path):
    folder, spec, store, X, y = _project(tmp_path / "p")
    pipeline = _one_hot_bools().fit(X, y)
    joblib.dump(pipeline, folder / "model.joblib")
    shutil.move(folder / "train.csv", tmp_path / "elsewhere.csv")
    result = registry.import_model(store, spec, folder / "model.joblib", 1)
    assert any(w.startswith("dataset v1's source train.csv cannot be read here") for w in result.warnings)
    checked = registry.get_model(store, 1).manifest["imported_from"]["checked"]
    assert checked["read_from"] == "dataset v1" and checked["rows"] == len(X)
    served = registry.load_model(store, 1).predict(X.head(50)).proba
    assert np.array_equal(served, pipeline.predict_proba(X.head(50)))


def test_values_become_what_pandas_read_csv_makes_of_them():
    flags = pd.Series(["True", "False", "true"], dtype=object)
    assert _as_bool(flags).tolist() == [True, False, True] and _as_bool(flags).dtype == bool
    missing = _as_bool(pd.Series(["True", None], dtype=object))
    assert missing.dtype == object and missing[0] is True and np.isnan(missing[1])
    codes = _as_number(pd.Series(["1", "02139", "3"], dtype=object))
    assert codes.dtype == np.int64 and codes.tolist() == [1, 2139, 3]
    mixed = _as_number(pd.Series(["1.5", "x", None], dtype=object))
    assert mixed.dtype == float and mixed[0] == 1.5 and mixed[1:].isna().all()
    frame = pd.DataFrame({"a": ["True", "False"], "b": [1.0, 2.0], "c": ["x", "y"]})
    out = AsRead({"a": "bool"}, ["b", "a"]).fit(frame).transform(frame)
    assert list(out.columns) == ["b", "a"] and out["a"].tolist() == [True, False]
    assert AsRead(array=True).transform(frame).tolist() == [["True", 1.0, "x"], ["False", 2.0, "y"]]


def test_a_model_fitted_after_dropna_is_checked_on_the_rows_without_missing_values(tmp_path):
    folder, spec, store, X, y = _project(tmp_path / "p")
    complete = X["income"].notna()
    model = LogisticRegression().fit(X.loc[complete, NUMERIC], y[complete])
    joblib.dump(model, folder / "model.joblib")
    result = registry.import_model(store, spec, folder / "model.joblib", 1)
    assert registry.get_model(store, 1).manifest["imported_from"]["checked"]["rows"] == int(complete.sum())
    assert any("fails on rows with missing values" in w for w in result.warnings)
    served = registry.load_model(store, 1).predict(X[complete].head(50)).proba
    assert np.array_equal(served, model.predict_proba(X.loc[complete, NUMERIC].head(50)))
