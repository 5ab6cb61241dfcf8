"""`everloop export onnx`: the whole pipeline as one ONNX file, answering as everloop does."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("skl2onnx")
ort = pytest.importorskip("onnxruntime")

from everloop import data, export, registry, train  # noqa: E402
from everloop.spec import parse_spec  # noqa: E402
from everloop.store import Store  # noqa: E402
from tests.conftest import write_project  # noqa: E402

FEATURE_DROP = ["customer_id", "event_time", "churned"]


def _project(tmp_path, rows: int = 1000, **overrides):
    folder = write_project(tmp_path / "p", rows=rows)
    raw = {"name": "t", "data": {"source": "data/customers.csv", "target": "churned", "id": "customer_id",
                                 "timestamp": "event_time"}} | overrides
    spec = parse_spec(raw)
    store = Store.for_project(folder)
    data.ingest(store, spec, base=folder)
    return folder, store, train.train(store, spec).version


def _awkward_rows(folder, n: int = 60) -> pd.DataFrame:
    """Rows from the source with missing numbers and missing and unseen categories."""
    rows = pd.read_csv(folder / "data" / "customers.csv").tail(n).reset_index(drop=True)
    rows.loc[0:9, "age"] = np.nan
    rows.loc[5:14, "monthly_charges"] = np.nan
    rows.loc[10:19, "plan"] = None
    rows.loc[20:29, "region"] = "atlantis"  # never seen in training
    rows.loc[30:34, "contract"] = "lifetime"
    return rows


def _onnx_feed(model, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """The graph's inputs built as an edge device would (not with everloop's helper): numbers as
    float64 with NaN, text as str with "" where missing."""
    feed = {}
    for col in model.schema.features:
        values = rows[col.name]
        if col.kind == "numeric":
            feed[col.name] = values.to_numpy(dtype=np.float64, na_value=np.nan).reshape(-1, 1)
        else:
            feed[col.name] = np.array(["" if pd.isna(v) else str(v) for v in values], dtype=object).reshape(-1, 1)
    return feed


def _same_answers(store, version, path, rows) -> float:
    """Assert the file's labels equal everloop's on `rows`; the largest probability difference."""
    model = registry.load_model(store, version)
    ours = model.predict(rows)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    prediction, probabilities = session.run(["prediction", "probabilities"], _onnx_feed(model, rows))
    assert probabilities.shape == ours.proba.shape
    differ = prediction != ours.labels
    assert np.all(np.abs(ours.proba[differ, 0] - ours.proba[differ, 1]) < 1e-5)  # only at a tie (forests)
    assert differ.sum() <= 2
    return float(np.abs(probabilities - ours.proba).max())


def test_export_answers_as_everloop_does_with_missing_and_unseen_values(trained, tmp_path):
    folder, spec, store = trained
    target = tmp_path / "out" / "churn.onnx"
    result = export.export_onnx(store, "production", target, latency_calls=20)
    assert result.passed and result.path == str(target) and target.stat().st_size == result.bytes > 0
    assert result.labels_equal is True and result.max_abs_diff < 1e-5
    assert result.rows_checked == 400 + 40  # 20% of 2000 evaluation rows, and the unusual copies
    assert "evaluation rows of model v1" in result.rows_source
    assert result.latency_ms["onnxruntime"] > 0 and result.latency_ms["sklearn"] > 0
    assert [i.name for i in result.inputs] == registry.load_model(store, 1).schema.feature_names
    kinds = {i.name: (i.type, i.kind) for i in result.inputs}
    assert kinds["age"] == ("float64", "numeric") and kinds["plan"] == ("string", "categorical")
    assert kinds["paperless_billing"] == ("string", "boolean")
    assert next(i for i in result.inputs if i.name == "paperless_billing").values == ["yes", "no"]
    rows = _awkward_rows(folder)
    assert _same_answers(store, 1, target, rows) < 1e-5
    assert list(target.parent.iterdir()) == [target]  # no temporary file left beside it


def test_without_its_evaluation_rows_the_training_dataset_is_checked(trained, tmp_path):
    folder, spec, store = trained
    store.artifacts.path(registry.get_model(store, 1).manifest["eval_artifact"]).unlink()
    result = export.export_onnx(store, 1, tmp_path / "m.onnx", latency_calls=5)
    assert result.rows_source.startswith("the rows of dataset v1: 2000 rows") and result.rows_checked == 2040
    assert result.passed and (tmp_path / "m.onnx").exists()


def test_printed_example_runs_with_onnxruntime_alone(trained, tmp_path):
    folder, spec, store = trained
    target = tmp_path / "edge.onnx"
    result = export.export_onnx(store, 1, target, latency_calls=5)
    script = tmp_path / "edge.py"
    script.write_text(result.example + textwrap.dedent("""
        import sys
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("sklearn", "everloop", "pandas", "scipy")))
    """))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    answer, loaded = run.stdout.strip().splitlines()
    assert loaded == "[]"
    label, _, probabilities = answer.partition(" ")
    first = registry.eval_frame(store, registry.get_model(store, 1).manifest).head(1)
    ours = registry.load_model(store, 1).predict(first)
    assert int(label) == ours.labels[0]
    assert np.allclose(json.loads(probabilities), ours.proba[0], atol=1e-5)


@pytest.mark.parametrize("model", [
    {"estimator": "sklearn.ensemble.HistGradientBoostingClassifier", "params": {"max_iter": 40}},
    {"estimator": "lightgbm.LGBMClassifier", "params": {"n_estimators": 40, "verbose": -1}},
    {"estimator": "xgboost.XGBClassifier", "params": {"n_estimators": 40}},
    {"estimator": "sklearn.linear_model.LogisticRegression", "params": {"max_iter": 500}},
    {"estimator": "sklearn.ensemble.RandomForestClassifier", "params": {"n_estimators": 20}},
], ids=lambda m: m["estimator"].rsplit(".", 1)[-1])
def test_parity_holds_for_each_estimator_family(tmp_path, model):
    pytest.importorskip(model["estimator"].split(".")[0])
    folder, store, version = _project(tmp_path, model=model)
    result = export.export_onnx(store, version, tmp_path / "m.onnx", latency_calls=5)
    assert result.passed and result.labels_equal and result.max_abs_diff < 1e-5
    assert _same_answers(store, version, tmp_path / "m.onnx", _awkward_rows(folder)) < 1e-5


def test_linear_model_gets_one_hot_features(tmp_path):
    folder, store, version = _project(tmp_path, model={"estimator": "sklearn.linear_model.LogisticRegression",
                                                       "params": {"max_iter": 500}})
    export.export_onnx(store, version, tmp_path / "m.onnx", latency_calls=5)
    import onnx

    ops = {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "OneHotEncoder" in ops and "ArgMax" in ops


def test_ordinal_encoding_and_string_classes_with_a_datetime_feature(tmp_path):
    folder = write_project(tmp_path / "p", rows=1000)
    spec = parse_spec({"name": "t", "data": {"source": "data/customers.csv", "target": "contract",
                                             "id": "customer_id"},
                       "features": {"datetime": ["event_time"], "categorical_encoding": "ordinal"},
                       "evaluation": {"metric": "accuracy"}, "model": {"params": {"max_iter": 30}}})
    store = Store.for_project(folder)
    data.ingest(store, spec, base=folder)
    version = train.train(store, spec).version
    result = export.export_onnx(store, version, tmp_path / "m.onnx", latency_calls=5)
    assert result.passed and result.classes == ["month-to-month", "one-year", "two-year"]
    stamp = next(i for i in result.inputs if i.name == "event_time")
    assert (stamp.type, stamp.kind) == ("float64", "datetime")
    model = registry.load_model(store, version)
    rows = pd.read_csv(folder / "data" / "customers.csv").tail(30).reset_index(drop=True)
    rows.loc[0:4, "event_time"] = None
    ours = model.predict(rows)
    conformed, _ = model.conform(rows)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    prediction, probabilities = session.run(None, export.onnx_feed(model.schema, conformed))
    assert prediction.tolist() == ours.labels.tolist()  # the class labels themselves, as strings
    assert np.abs(probabilities - ours.proba).max() < 1e-5


def test_datetime_parts_match_pandas_over_centuries():
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DoubleTensorType
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    from everloop.export._convert import OPSET, prepare
    from everloop.features._pipeline import datetime_parts

    rng = np.random.default_rng(0)
    seconds = np.concatenate([np.round(rng.uniform(-5e9, 7e9, 5000), 3),  # 1811 to 2191, to the millisecond
                              np.arange(-3, 3) * 86400.0, [951782400.0, 951868799.999, np.nan]])  # 2000-02-29
    stamps = pd.Series(pd.to_datetime(seconds, unit="s", utc=True))
    frame = pd.DataFrame({"a": stamps, "b": stamps[::-1].reset_index(drop=True)})
    prepared, _ = prepare(Pipeline([("parts", FunctionTransformer(datetime_parts))]).fit(frame))
    graph = convert_sklearn(prepared, initial_types=[("x", DoubleTensorType([None, 2]))], target_opset=OPSET)
    out = ort.InferenceSession(graph.SerializeToString()).run(None, {"x": np.c_[seconds, seconds[::-1]]})[0]
    np.testing.assert_array_equal(out, datetime_parts(frame))  # NaN where missing, on both sides


@pytest.mark.parametrize("model", [
    {"estimator": "sklearn.ensemble.HistGradientBoostingRegressor", "params": {"max_iter": 40}},
    {"estimator": "xgboost.XGBRegressor", "params": {"n_estimators": 40}},
], ids=lambda m: m["estimator"].rsplit(".", 1)[-1])
def test_regressor_parity_is_relative_to_the_predictions_scale(tmp_path, model):
    pytest.importorskip(model["estimator"].split(".")[0])
    folder, store, version = _project(tmp_path, data={"source": "data/customers.csv", "target": "total_charges",
                                                      "id": "customer_id", "timestamp": "event_time"},
                                      evaluation={"metric": "rmse"}, model=model)
    result = export.export_onnx(store, version, tmp_path / "r.onnx", latency_calls=5)
    assert result.task == "regression" and result.labels_equal is None and result.passed
    assert result.max_diff <= result.max_abs_diff and result.max_diff < 1e-5
    model = registry.load_model(store, version)
    rows = _awkward_rows(folder)
    session = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
    (prediction,) = session.run(["prediction"], _onnx_feed(model, rows))
    ours = model.predict(rows).labels
    assert prediction.dtype == np.float64 and np.abs(prediction - ours).max() <= 1e-5 * np.abs(ours).max()


def test_an_imported_pipeline_exports_with_its_own_preprocessing(project, tmp_path):
    import joblib
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    from everloop.spec import load_spec

    table = pd.read_csv(project / "data" / "customers.csv")
    X, y = table.drop(columns=FEATURE_DROP), table["churned"]
    categorical = ["contract", "plan", "region", "payment_method", "paperless_billing", "has_streaming"]
    prep = ColumnTransformer([("cat", OneHotEncoder(handle_unknown="ignore"), categorical)], remainder="passthrough")
    joblib.dump(Pipeline([("prep", prep), ("clf", HistGradientBoostingClassifier(max_iter=20))]).fit(X, y),
                tmp_path / "model.joblib")
    spec, store = load_spec(project), Store.for_project(project)
    data.ingest(store, spec, base=project)
    version = registry.import_model(store, spec, tmp_path / "model.joblib", 1).version
    result = export.export_onnx(store, version, tmp_path / "imported.onnx", latency_calls=5)
    assert result.passed and result.labels_equal and result.max_abs_diff < 1e-5
    assert _same_answers(store, version, tmp_path / "imported.onnx", _awkward_rows(project)) < 1e-5


CUSTOM = '''
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.preprocessing import FunctionTransformer


def ratio(frame):
    return np.c_[frame["monthly_charges"] / (frame["tenure_months"] + 1)]


def make_function():
    return FunctionTransformer(ratio)


class Ratio(TransformerMixin, BaseEstimator):
    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return ratio(X)


def make_class():
    return Ratio()
'''


@pytest.mark.parametrize("factory, says", [
    ("make_function", "a FunctionTransformer of exportpkg.features.ratio"),
    ("make_class", "(exportpkg.features.Ratio) cannot be exported to ONNX: a transformer of your own"),
])
def test_a_custom_step_is_refused_by_name(tmp_path, monkeypatch, everloop, factory, says):
    package = tmp_path / "exportpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "features.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    folder, store, version = _project(tmp_path, features={"custom": f"exportpkg.features:{factory}"},
                                      model={"params": {"max_iter": 20}})
    with pytest.raises(export.ExportError) as caught:
        export.export_onnx(store, version, tmp_path / "c.onnx")
    assert caught.value.step == "features/custom"
    assert f"step features/custom {'(' if factory == 'make_function' else ''}" in str(caught.value)
    assert says in str(caught.value)
    run = everloop("export", "onnx", str(version), "-o", str(tmp_path / "c.onnx"), "-p", str(folder))
    assert run.code == 2 and "step features/custom" in run.err
    assert not (tmp_path / "c.onnx").exists()


def test_past_the_tolerance_nothing_is_written(trained, tmp_path, everloop):
    folder, spec, store = trained
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "refused.onnx"
    with pytest.raises(export.ParityError) as caught:
        export.export_onnx(store, 1, target, tolerance=0.0, latency_calls=5)
    result = caught.value.result
    assert result.path is None and not result.passed and result.max_abs_diff > 0
    assert f"largest difference {result.max_diff:.3g} > tolerance 0" in str(caught.value)
    assert list(target.parent.iterdir()) == []  # neither the file nor a temporary one
    run = everloop("export", "onnx", "1", "-o", str(target), "--tolerance", "0", "--json", cwd=folder)
    assert run.code == 1 and "nothing was written" in run.err
    assert json.loads(run.out)["passed"] is False and json.loads(run.out)["path"] is None
    assert not target.exists()
    for meaningless in ("inf", "1", "nan"):  # a tolerance that would check nothing is refused
        run = everloop("export", "onnx", "1", "-o", str(target), "--tolerance", meaningless, cwd=folder)
        assert run.code == 2 and "tolerance" in run.err and not target.exists(), run


def test_cli_writes_the_file_and_prints_the_example(trained, tmp_path, everloop):
    folder, spec, store = trained
    run = everloop("export", "onnx", "production", "--json", cwd=folder)
    assert run.code == 0, run.err
    body = json.loads(run.out)
    assert body["path"] == str(folder / "churn-v1.onnx") and body["passed"] is True
    assert body["bytes"] == (folder / "churn-v1.onnx").stat().st_size
    assert "import onnxruntime as ort" in body["example"] and "sklearn" not in body["example"]
    again = everloop("export", "onnx", "1", cwd=folder)
    assert again.code == 2 and "exists" in again.err and "--force" in again.err
    forced = everloop("export", "onnx", "1", "--force", cwd=folder)
    assert forced.code == 0 and "session.run" in forced.out and "wrote churn-v1.onnx" in forced.out


def test_without_the_extra_the_command_says_what_to_install(trained, tmp_path, everloop, monkeypatch):
    folder, spec, store = trained
    monkeypatch.setitem(sys.modules, "skl2onnx", None)  # `import skl2onnx` now raises ImportError
    run = everloop("export", "onnx", "1", "-o", str(tmp_path / "x.onnx"), cwd=folder)
    assert run.code == 3 and "pip install 'everloop[onnx]'" in run.err and "skl2onnx" in run.err
    assert not (tmp_path / "x.onnx").exists()


def test_everloop_imports_without_the_onnx_packages():
    code = ("import sys\nfor m in ('onnx', 'onnxruntime', 'skl2onnx', 'onnxmltools'): sys.modules[m] = None\n"
            "import everloop.export, everloop.cli\nprint('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
