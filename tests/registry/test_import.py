"""`everloop models import`: a model fitted elsewhere (joblib, skops, MLflow) adopted into the loop."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import sklearn
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from everloop import data, registry, train
from everloop.demo import make_churn
from everloop.demo._scenario import FEATURES_CATEGORICAL, FEATURES_NUMERIC
from everloop.errors import IntegrityError, TrainError
from everloop.spec import load_spec
from everloop.store import Store
from tests.conftest import feature_rows, send_traffic

FEATURES = FEATURES_NUMERIC + FEATURES_CATEGORICAL
TREE_PREDICTOR = "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"


def _user_table(project: Path) -> tuple[pd.DataFrame, pd.Series]:
    """The project's CSV as a notebook reads it: the user's own features and labels."""
    frame = pd.read_csv(project / "data" / "customers.csv")
    return frame[FEATURES], frame["churned"]


def _user_pipeline(project: Path, max_iter: int = 30) -> Pipeline:
    """What a notebook fits: one-hot categories, numbers passed through, gradient boosting."""
    X, y = _user_table(project)
    prep = ColumnTransformer([("cat", OneHotEncoder(handle_unknown="ignore"), FEATURES_CATEGORICAL)],
                             remainder="passthrough")
    model = HistGradientBoostingClassifier(max_iter=max_iter, random_state=0)
    return Pipeline([("prep", prep), ("clf", model)]).fit(X, y)


def _ingested(project: Path):
    spec, store = load_spec(project), Store.for_project(project)
    data.ingest(store, spec, base=project)
    return spec, store


def _served_probabilities(project: Path, spec, store, rows: pd.DataFrame) -> np.ndarray:
    """P(churn) as the service answers `rows` (JSON, rounded to 6 decimals)."""
    from fastapi.testclient import TestClient

    from everloop.serve import create_app

    with TestClient(create_app(project, spec=spec, store=store, watch=False)) as client:
        answer = client.post("/predict", json={"instances": feature_rows(rows)})
        assert answer.status_code == 200, answer.text
    return np.array([p["probabilities"]["1"] for p in answer.json()["predictions"]])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_joblib_pipeline_is_imported_promoted_served_monitored_and_retrained(project, tmp_path):
    from fastapi.testclient import TestClient

    from everloop.loop import run_once
    from everloop.monitor import monitor
    from everloop.serve import create_app

    pipeline = _user_pipeline(project)
    path = tmp_path / "model.joblib"
    joblib.dump(pipeline, path)
    spec, store = _ingested(project)

    result = registry.import_model(store, spec, path, 1)
    assert (result.version, result.found, result.refit, result.in_sample) == (1, "pipeline", False, True)
    assert result.sha256 == _sha256(path) and "takes the raw columns" in result.description
    assert any("is a pickle: loading it ran whatever code it holds" in w for w in result.warnings)
    # in-sample metrics on every row of the dataset, exactly what the user's pipeline gives them
    X, y = _user_table(project)
    assert result.value == pytest.approx(roc_auc_score(y, pipeline.predict_proba(X)[:, 1]), abs=1e-12)
    assert result.baseline == 0.5 and result.lift == pytest.approx(result.value - 0.5)
    manifest = registry.get_model(store, 1).manifest
    assert manifest["pipeline_source"] == "imported" and manifest["in_sample"] is True
    assert manifest["imported_from"]["sha256"] == result.sha256 and manifest["eval_rows"] == len(X)
    assert manifest["reason"] == f"imported from {path} (sha256 {result.sha256[:12]})"
    assert len(train.training_hashes(store, manifest)) == len(np.unique(train.row_hashes(X, FEATURES)))
    assert store.artifacts.get(manifest["imported_from"]["artifact"]) == path.read_bytes()  # the file, kept

    registry.promote(store, spec, 1)
    served = _served_probabilities(project, spec, store, make_churn(300, seed=5))
    expected = pipeline.predict_proba(make_churn(300, seed=5)[FEATURES])[:, 1]
    assert np.abs(served - expected).max() <= 5e-7  # the user's pipeline's answers, to JSON's 6 decimals

    with TestClient(create_app(project, spec=spec, store=store, watch=False)) as client:
        send_traffic(client, make_churn(2000, shifted=True, seed=12))
    watched = monitor(store, spec, record=False)
    assert watched.model_version == 1 and watched.drift.dataset_drift
    shifted = {"monthly_charges", "total_charges", "support_calls", "days_since_last_login", "satisfaction",
               "plan", "region"}  # what make_churn(shifted=True) moves
    assert watched.drift.drifted and set(watched.drift.drifted) <= shifted

    decision = run_once(store, spec)
    assert decision.action == "promoted", decision.reason
    retrained = registry.get_model(store, decision.model_version)
    assert retrained.manifest["pipeline_source"] == "clone" and retrained.manifest["template_of"] == 1
    assert retrained.manifest["imported_from"]["sha256"] == result.sha256
    refit = registry.load_model(store, decision.model_version).pipeline
    # the user's own preprocessing and hyper-parameters, refit: not the project file's pipeline
    assert [name for name, *_ in refit.named_steps["features"].transformers] == ["cat"]
    assert refit.named_steps["model"].max_iter == 30 and spec.model.params == {"max_iter": 50}
    assert refit.named_steps["model"].n_iter_ > 0
    assert retrained.manifest["recent_from_row"] == len(X)

    imported = train.reproduce(store, 1)
    assert not imported.record and not imported.identical
    assert "no training record" in imported.problems[0] and result.sha256 in imported.problems[0]
    assert train.reproduce(store, decision.model_version).identical


def test_card_and_lineage_say_where_an_imported_model_came_from(project, tmp_path):
    path = tmp_path / "model.joblib"
    joblib.dump(_user_pipeline(project), path)
    spec, store = _ingested(project)
    result = registry.import_model(store, spec, path, 1, name="flask churn model")
    origin = f"imported flask churn model from {path.resolve()} (sha256 {result.sha256})"
    lineage = registry.model_lineage(store, 1)
    assert lineage["model"]["origin"] == origin and lineage["datasets"][0]["version"] == 1
    card = registry.write_card(store, 1, tmp_path / "card.html").read_text()
    assert origin in card and "in-sample: the imported model may have seen them" in card
    assert "an imported model has no training record" in card


def test_a_skops_file_is_imported_only_with_its_untrusted_types_named(project, tmp_path):
    sio = pytest.importorskip("skops.io")
    pipeline = _user_pipeline(project)
    path = tmp_path / "model.skops"
    sio.dump(pipeline, path)
    spec, store = _ingested(project)
    with pytest.raises(TrainError) as refused:
        registry.import_model(store, spec, path, 1)
    assert TREE_PREDICTOR in str(refused.value) and f"--trust {TREE_PREDICTOR}" in str(refused.value)
    assert registry.list_models(store) == []

    result = registry.import_model(store, spec, path, 1, trust=[TREE_PREDICTOR])
    assert result.format == "skops" and result.found == "pipeline" and result.sha256 == _sha256(path)
    assert not any("pickle" in w for w in result.warnings)
    registry.promote(store, spec, result.version)
    rows = make_churn(200, seed=6)
    served = _served_probabilities(project, spec, store, rows)
    assert np.abs(served - pipeline.predict_proba(rows[FEATURES])[:, 1]).max() <= 5e-7


def test_an_mlflow_sklearn_directory_is_imported_with_its_signature_checked(project, tmp_path):
    mlflow_sklearn = pytest.importorskip("mlflow.sklearn")
    from mlflow.models import infer_signature

    pipeline = _user_pipeline(project)
    X, _ = _user_table(project)
    folder = tmp_path / "mlflow-model"
    mlflow_sklearn.save_model(pipeline, str(folder), serialization_format="skops",
                              skops_trusted_types=[TREE_PREDICTOR],
                              signature=infer_signature(X.astype({c: float for c in FEATURES_NUMERIC}),
                                                        pipeline.predict(X)))
    spec, store = _ingested(project)
    result = registry.import_model(store, spec, folder, 1, trust=[TREE_PREDICTOR])
    assert result.format == "mlflow (sklearn flavor, skops)" and result.found == "pipeline"
    assert result.sha256 == _sha256(folder / "model.skops")
    made_with = registry.get_model(store, 1).manifest["imported_from"]["made_with"]
    assert made_with["scikit-learn"] == sklearn.__version__
    registry.promote(store, spec, result.version)
    rows = make_churn(200, seed=7)
    served = _served_probabilities(project, spec, store, rows)
    assert np.abs(served - pipeline.predict_proba(rows[FEATURES])[:, 1]).max() <= 5e-7

    # a signature naming a column the schema lacks is refused, with the column named
    bogus = X.assign(bogus=1.0)
    other = Pipeline([("prep", ColumnTransformer([("num", StandardScaler(), ["bogus", "age"])])),
                      ("clf", HistGradientBoostingClassifier(max_iter=5))]).fit(bogus, _user_table(project)[1])
    wrong = tmp_path / "mlflow-wrong"
    mlflow_sklearn.save_model(other, str(wrong), serialization_format="skops",
                              skops_trusted_types=[TREE_PREDICTOR],
                              signature=infer_signature(bogus[["bogus", "age"]], other.predict(bogus)))
    with pytest.raises(TrainError, match=r"signature needs the columns \['bogus'\]"):
        registry.import_model(store, spec, wrong, 1, trust=[TREE_PREDICTOR])


def test_a_bare_estimator_is_refused_with_the_reason_then_imported_with_features(project, tmp_path):
    X, y = _user_table(project)
    encoded = pd.get_dummies(X, columns=FEATURES_CATEGORICAL)
    bare = HistGradientBoostingClassifier(max_iter=20, learning_rate=0.2, random_state=1).fit(encoded, y)
    path = tmp_path / "bare.pkl"
    path.write_bytes(pickle.dumps(bare))
    spec, store = _ingested(project)
    with pytest.raises(TrainError) as refused:
        registry.import_model(store, spec, path, 1)
    message = str(refused.value)
    assert "a bare estimator, HistGradientBoostingClassifier, that wants already-encoded features" in message
    assert f"fitted on {encoded.shape[1]} columns" in message and "--features" in message
    assert registry.list_models(store) == []

    result = registry.import_model(store, spec, path, 1, features=True)
    assert (result.found, result.refit, result.in_sample, result.format) == ("estimator", True, False, "pickle")
    model = registry.load_model(store, result.version)
    steps = [name for name, *_ in model.pipeline.named_steps["features"].transformers]
    assert steps == ["numeric", "categorical"]  # everloop's feature pipeline, in front of ...
    clone = model.pipeline.named_steps["model"]
    assert (clone.max_iter, clone.learning_rate, clone.random_state) == (20, 0.2, 1)  # ... the user's estimator
    assert result.value > result.baseline + 0.1
    assert registry.get_model(store, result.version).manifest["pipeline_source"] == "clone"
    assert train.reproduce(store, result.version).identical  # it has a training record: everloop fitted it


def test_a_pickle_whose_hash_does_not_match_is_never_loaded(project, tmp_path):
    marker = tmp_path / "code-ran"
    trap = tmp_path / "trap.pkl"
    trap.write_bytes(pickle.dumps(_Trap(str(marker))))
    spec, store = _ingested(project)
    # the expected hash is given and the file is not that one: refused before loading
    with pytest.raises(IntegrityError, match="was not loaded"):
        registry.import_model(store, spec, trap, 1, sha256="0" * 64)
    assert not marker.exists()

    # a stored model whose bytes no longer match their hash is refused before unpickling
    path = tmp_path / "model.joblib"
    joblib.dump(_user_pipeline(project), path)
    result = registry.import_model(store, spec, path, 1, sha256=_sha256(path))
    stored = registry.get_model(store, result.version)
    for digest in (stored.artifact, stored.manifest["imported_from"]["artifact"]):
        store.artifacts.path(digest).write_bytes(trap.read_bytes())
    with pytest.raises(IntegrityError, match="changed on disk"):
        registry.load_model(store, result.version)
    with pytest.raises(IntegrityError):
        store.artifacts.get(stored.manifest["imported_from"]["artifact"])
    assert not marker.exists()


class _Trap:
    """Unpickling it writes a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled"))


def test_the_version_a_pickle_was_made_with_is_compared_with_the_running_one(project, tmp_path):
    running = sklearn.__version__
    made = running[:-1] + ("0" if running[-1] != "0" else "1")  # same length: the pickle stays valid
    blob = pickle.dumps(_user_pipeline(project))
    assert running.encode() in blob
    path = tmp_path / "old.pkl"
    path.write_bytes(blob.replace(running.encode(), made.encode()))
    spec, store = _ingested(project)
    result = registry.import_model(store, spec, path, 1)
    mismatch = [w for w in result.warnings if "was saved with scikit-learn" in w]
    assert mismatch and f"scikit-learn {made}; this is scikit-learn {running}" in mismatch[0]
    assert registry.get_model(store, 1).manifest["imported_from"]["made_with"] == {"scikit-learn": made}


@pytest.mark.parametrize("unknown", ["ignore", "error"])
def test_unknown_steps_are_served_through_the_pipeline_itself(project, tmp_path, unknown):
    """Bare steps in branches named like everloop's (whose are step lists) serve the pipeline's own
    answers: each branch gets everloop's missing-value step in front, which makes it a step list the
    fast path replays only after checking it. An encoder that refuses unseen categories cannot be
    replayed: served by scikit-learn, and the import warns about the rows such a model cannot answer."""
    from everloop.serve._holder import ModelHolder

    X, y = _user_table(project)
    strict = Pipeline([
        ("prep", ColumnTransformer([
            ("numeric", StandardScaler(), FEATURES_NUMERIC),
            ("categorical", OneHotEncoder(handle_unknown=unknown), FEATURES_CATEGORICAL)])),
        ("clf", HistGradientBoostingClassifier(max_iter=10, random_state=0)),
    ]).fit(X, y)
    path = tmp_path / "strict.joblib"
    joblib.dump(strict, path)
    spec, store = _ingested(project)
    result = registry.import_model(store, spec, path, 1)
    warned = any("fails on rows with missing values or unseen categories" in w for w in result.warnings)
    assert warned == (unknown == "error")
    registry.promote(store, spec, 1)
    holder = ModelHolder(store, compile_trees=False)
    assert holder.refresh() and holder.last_error is None
    assert (holder.current.fast is None) == (unknown == "error")
    rows = make_churn(100, seed=8)
    assert np.array_equal(holder.current.predict(rows).proba, strict.predict_proba(rows[FEATURES]))


def test_a_regressor_for_a_target_with_classes_is_refused(project, tmp_path):
    from sklearn.ensemble import HistGradientBoostingRegressor

    X, y = _user_table(project)
    path = tmp_path / "regressor.joblib"
    prep = ColumnTransformer([("cat", OneHotEncoder(handle_unknown="ignore"), FEATURES_CATEGORICAL)],
                             remainder="passthrough")
    joblib.dump(Pipeline([("prep", prep), ("reg", HistGradientBoostingRegressor(max_iter=5))]).fit(X, y), path)
    spec, store = _ingested(project)
    with pytest.raises(TrainError, match="a regressor .* but the target 'churned' has classes"):
        registry.import_model(store, spec, path, 1)


@pytest.mark.e2e
def test_the_command_line_imports_and_reproduce_says_there_is_no_record(project, tmp_path):
    X, y = _user_table(project)
    joblib.dump(_user_pipeline(project), project / "model.joblib")
    encoded = pd.get_dummies(X, columns=FEATURES_CATEGORICAL)
    joblib.dump(HistGradientBoostingClassifier(max_iter=5).fit(encoded, y), project / "bare.joblib")
    env = {**os.environ, "COLUMNS": "200"}

    def everloop(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "from everloop.cli import main; main()", *args],
                              cwd=project, capture_output=True, text=True, timeout=300, env=env)

    assert everloop("ingest").returncode == 0
    done = everloop("models", "import", "model.joblib", "--dataset", "1")
    assert done.returncode == 0, done.stderr
    assert ("found: Pipeline(ColumnTransformer(1 branch, the other columns passed through) -> "
            "HistGradientBoostingClassifier)") in done.stdout
    assert "model v1 imported from model.joblib" in done.stdout and "in-sample" in done.stdout
    assert "next: everloop promote 1" in done.stdout and "is a pickle" in done.stderr
    refused = everloop("models", "import", "bare.joblib", "--dataset", "1")
    assert refused.returncode == 2 and "wants already-encoded features" in refused.stderr
    assert "--features" in refused.stderr
    again = everloop("reproduce", "1")
    assert again.returncode == 2 and "no training record" in again.stdout
    lineage = everloop("lineage", "--model", "1")
    assert lineage.returncode == 0 and "pipeline: imported from" in lineage.stdout


def test_an_estimator_fitted_on_a_bare_array_takes_the_columns_in_schema_order(tmp_path):
    """The Flask tutorial's model: fitted on `X.values` of numeric columns, no column names."""
    import yaml
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(4)
    table = pd.DataFrame({"a": rng.normal(size=400), "b": rng.normal(size=400), "c": rng.uniform(size=400)})
    table["y"] = (table["a"] - 2 * table["b"] + rng.normal(scale=0.5, size=400) > 0).astype(int)
    folder = tmp_path / "flask"
    folder.mkdir()
    table.to_csv(folder / "train.csv", index=False)
    (folder / "everloop.yaml").write_text(yaml.safe_dump({"name": "flask", "data": {"source": "train.csv",
                                                                                     "target": "y"}}))
    model = LogisticRegression().fit(table[["a", "b", "c"]].to_numpy(), table["y"])
    joblib.dump(model, folder / "model.joblib")
    spec, store = _ingested(folder)
    result = registry.import_model(store, spec, folder / "model.joblib", 1)
    assert result.found == "pipeline" and any("in the schema's order (a, b, c)" in w for w in result.warnings)
    served = registry.load_model(store, result.version).predict(table.head(50)).proba
    assert np.array_equal(served, model.predict_proba(table[["a", "b", "c"]].head(50).to_numpy()))
