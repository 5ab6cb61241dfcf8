"""Training: the spec's pipeline fitted on a dataset version, evaluated on a holdout, registered."""

from __future__ import annotations

import hashlib
import importlib
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import clone, is_classifier
from sklearn.utils.validation import has_fit_parameter
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.isotonic import IsotonicRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import LabelEncoder
from threadpoolctl import threadpool_limits

from everloop.data import DatasetVersion, Profile, Schema, get_dataset, get_schema, load_frame
from everloop.errors import TrainError
from everloop.features import build_features, custom_source_hash
from everloop.spec import ProjectSpec, scrub_spec
from everloop.store import Store
from everloop.train._artifact import save_model
from everloop.train._labels import whole_numbers
from everloop.train._metrics import REGRESSION, all_metrics, bootstrap_scores, improvement, score
from everloop.train._rows import HASH_COLUMN, row_hashes

# Training runs with a fixed number of OpenMP/BLAS threads, so that a retraining elsewhere uses the
# same reduction order; recorded in the manifest.
TRAIN_THREADS = 2

DEFAULT_ESTIMATORS = {
    "classification": "sklearn.ensemble.HistGradientBoostingClassifier",
    "regression": "sklearn.ensemble.HistGradientBoostingRegressor",
}


@dataclass(frozen=True)
class TrainResult:
    version: int
    metric: str
    value: float
    baseline: float
    metrics: dict[str, float]
    dataset_version: int
    seconds: float

    @property
    def lift(self) -> float:
        return improvement(self.metric, self.value, self.baseline)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"lift": self.lift}


def task_of(schema: Schema) -> str:
    return "regression" if schema.target.kind == "numeric" else "classification"


def as_labels(values: Any) -> np.ndarray:
    """Class labels in their natural type: integer-like values ("0", "1", and "0.0"/1.0 as pandas writes
    an int column with nulls) become ints, by the rule of `whole_numbers` (not `007`, not when two
    distinct spellings would become one class)."""
    series = pd.Series(values, dtype=object)
    spelled = series.map(lambda v: str(v).strip())
    numbers = whole_numbers(spelled.unique()) if len(series) else {}
    if numbers:
        return spelled.map(numbers).to_numpy(dtype=np.int64)
    return series.to_numpy()


def score_labels(metric: str, truth: Any, predicted: Any, proba: np.ndarray | None = None,
                 classes: list[Any] | None = None) -> float:
    """`metric` of predictions against raw truth values. With `classes` (classification), truth goes
    through `as_labels` and the predicted labels are cast to its type, so "1", 1 and 1.0 are one class."""
    y, predicted = _label_arrays(truth, predicted, classes)
    return score(metric, y, predicted, proba, classes)


def bootstrap_labels(metric: str, truth: Any, predicted: Any, proba: np.ndarray | None = None,
                     classes: list[Any] | None = None, *, draws: int = 200, seed: int = 0) -> np.ndarray:
    """The bootstrap distribution of `score_labels` (see `bootstrap_scores`): finite draws, shape (<= draws,)."""
    y, predicted = _label_arrays(truth, predicted, classes)
    return bootstrap_scores(metric, y, predicted, proba, classes, draws=draws, seed=seed)


def _label_arrays(truth: Any, predicted: Any, classes: list[Any] | None) -> tuple[np.ndarray, np.ndarray]:
    if classes is None:
        return np.asarray(truth, dtype=float), np.asarray(predicted, dtype=float)
    y = as_labels(truth)
    return y, np.asarray(predicted, dtype=object).astype(y.dtype)


def make_estimator(spec: ProjectSpec, task: str) -> Any:
    path = spec.model.estimator or DEFAULT_ESTIMATORS[task]
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise TrainError(f"model.estimator {path!r} cannot be imported; expected a dotted path such as "
                         f"{DEFAULT_ESTIMATORS[task]!r}") from None
    try:
        estimator = cls(**spec.model.params)
    except TypeError as exc:
        raise TrainError(f"model.params do not fit {path}: {exc}") from None
    if "random_state" in estimator.get_params() and "random_state" not in spec.model.params:
        estimator.set_params(random_state=spec.model.seed)
    if is_classifier(estimator) != (task == "classification"):
        raise TrainError(f"model.estimator {path} is a {'classifier' if is_classifier(estimator) else 'regressor'}, "
                         f"but the target {task == 'classification' and 'has classes' or 'is numeric'} "
                         f"({task})")
    return estimator


def split(frame: pd.DataFrame, schema: Schema, spec: ProjectSpec, task: str,
          recent_from_row: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training and evaluation rows. The holdout is drawn only from rows at positions >= `recent_from_row`:
    a model retrained on old + recent data is judged on the world it will serve, not the one that passed."""
    older, pool = frame.iloc[:recent_from_row], frame.iloc[recent_from_row:]
    holdout = spec.evaluation.split.holdout
    if spec.evaluation.split.by_time:
        ordered = pool.sort_values(spec.data.timestamp, kind="stable")
        cut = int(round(len(ordered) * (1 - holdout)))
        fit_rows, eval_rows = ordered.iloc[:cut], ordered.iloc[cut:]
    else:
        target = pool[schema.target.name]
        stratify = target if task == "classification" and target.value_counts().min() >= 2 else None
        fit_rows, eval_rows = train_test_split(pool, test_size=holdout, random_state=spec.model.seed,
                                               stratify=stratify)
    return pd.concat([older, fit_rows]), eval_rows


@dataclass
class Fitted:
    """What fitting the spec's pipeline on a frame produced (nothing is stored yet)."""

    pipeline: Pipeline
    task: str
    metric: str
    metrics: dict[str, float]
    baseline: dict[str, float]
    slices: dict[str, dict[str, float]]
    classes: list[Any] | None
    train_rows: pd.DataFrame
    eval_rows: pd.DataFrame
    y_eval: np.ndarray  # the held-out labels as the estimator saw them (class codes for classifiers)


def fit(frame: pd.DataFrame, schema: Schema, spec: ProjectSpec, *, recent_from_row: int = 0,
        recent_weight: float | str = 1.0, template: Pipeline | None = None) -> Fitted:
    """Split, fit the spec's pipeline (features + estimator), and evaluate it and a trivial baseline on
    the held-out rows. Deterministic: the same frame, schema and spec give the same model.

    With `template` (a ("features", ...), ("model", ...) Pipeline, fitted or not: an imported model's),
    a fresh `sklearn.base.clone` of it is fitted instead of the spec's pipeline (`refit_template`), so
    its own preprocessing and hyper-parameters carry over; the split, labels and weights are the same."""
    frame = frame.reset_index(drop=True)  # positions == index, for recent_from_row
    task = task_of(schema)
    metric = spec.evaluation.metric or ("roc_auc" if task == "classification" else "rmse")
    if (metric in REGRESSION) != (task == "regression"):
        raise TrainError(f"evaluation.metric {metric!r} does not suit a {task} target")
    if len(frame) - recent_from_row < 20:
        raise TrainError(f"{len(frame) - recent_from_row} rows to evaluate on; at least 20 are needed")
    train_rows, eval_rows = split(frame, schema, spec, task, recent_from_row)
    features, target = schema.feature_names, schema.target.name
    if task == "classification":
        # Estimators get class codes 0..k-1 (XGBoost, for one, accepts nothing else); the manifest
        # keeps the labels, which every prediction is mapped back to.
        encoder = LabelEncoder().fit(as_labels(train_rows[target]))
        if len(encoder.classes_) < 2:
            raise TrainError(f"the target {target!r} has one class in the training rows; nothing to learn",
                             column=target)
        classes = [c.item() if isinstance(c, np.generic) else c for c in encoder.classes_]
        known = np.isin(as_labels(eval_rows[target]), encoder.classes_)
        eval_rows = eval_rows[known]  # a class the training rows never saw cannot be scored
        y_train = encoder.transform(as_labels(train_rows[target]))
        y_eval = encoder.transform(as_labels(eval_rows[target]))
    else:
        classes, y_train, y_eval = None, train_rows[target].to_numpy(), eval_rows[target].to_numpy()

    if template is None:
        pipeline = Pipeline([("features", build_features(schema, spec)), ("model", make_estimator(spec, task))])
    else:
        pipeline = refit_template(template, spec.model.seed)
        if is_classifier(pipeline) != (task == "classification"):
            raise TrainError(f"the pipeline to refit ({estimator_name(pipeline)}) is "
                             f"{'a classifier' if is_classifier(pipeline) else 'a regressor'}, but the target "
                             f"{target!r} needs {'a classifier' if task == 'classification' else 'a regressor'}")
    weights = _recent_weights(train_rows, recent_from_row, recent_weight)
    weight_param = sample_weight_param(pipeline)
    if weights is not None and weight_param is None:
        name = spec.model.estimator if template is None else estimator_name(pipeline)
        raise TrainError(f"model.estimator {name} does not accept sample_weight; "
                         "set retraining.data.recent_weight: 1 or include_reference: false")
    with threadpool_limits(limits=TRAIN_THREADS):
        pipeline.fit(train_rows[features], y_train,
                     **({weight_param: weights} if weights is not None and weight_param else {}))
    metrics = _evaluate(pipeline, task, eval_rows[features], y_eval)
    dummy = DummyClassifier(strategy="prior") if task == "classification" else DummyRegressor()
    baseline = _evaluate(dummy.fit(train_rows[features], y_train), task, eval_rows[features], y_eval)
    slices = _slice_metrics(pipeline, task, metric, eval_rows, features, y_eval, spec.evaluation.slices)
    return Fitted(pipeline, task, metric, metrics, {metric: baseline[metric]}, slices, classes, train_rows,
                  eval_rows, y_eval)


def train(store: Store, spec: ProjectSpec, dataset_version: int | None = None, *, reason: str = "",
          recent_from_row: int = 0, recent_weight: float | str = 1.0, template: Pipeline | None = None,
          record: dict[str, Any] | None = None) -> TrainResult:
    """Fit the spec's pipeline on a dataset version (the latest by default) and register a model version.

    `recent_from_row` marks where the rows of the current world start (the loop appends recent rows
    after the old reference data): evaluation and the monitor's drift reference use only those rows,
    and in training each of them weighs `recent_weight` ('balanced': as much in total as the older rows).
    With `template`, a fresh clone of that pipeline is fitted instead of the spec's (see `fit`); the
    manifest then says `pipeline_source: clone`, names its estimator, and carries `record` (what the
    template came from, e.g. `template_of` and `imported_from`)."""
    started = time.perf_counter()
    dataset = get_dataset(store, dataset_version)
    schema = get_schema(store, dataset.schema_version)
    frame = load_frame(store, dataset)
    fitted = fit(frame, schema, spec, recent_from_row=recent_from_row, recent_weight=recent_weight,
                 template=template)
    extra = dict(record or {})
    if template is not None:
        extra |= {"pipeline_source": "clone", "estimator": estimator_name(fitted.pipeline),
                  "params": estimator_params(fitted.pipeline)}
    return register_fitted(store, spec, dataset, schema, frame, fitted, reason=reason, started=started,
                           recent_from_row=recent_from_row, recent_weight=recent_weight, extra=extra)


def register_fitted(store: Store, spec: ProjectSpec, dataset: DatasetVersion, schema: Schema,
                    frame: pd.DataFrame, fitted: Fitted, *, reason: str, started: float, recent_from_row: int = 0,
                    recent_weight: float | str = 1.0, extra: dict[str, Any] | None = None) -> TrainResult:
    """Store a fitted pipeline as a model version of `dataset` (`frame` its rows): the artifact, its
    evaluation rows, the hashes of the rows it trained on (`fitted.train_rows`), the monitor's
    references and the manifest (`extra` keys added last, overriding). `started` is the
    `time.perf_counter()` the work began at. Returns the TrainResult of the new version."""
    features, target = schema.feature_names, schema.target.name
    slice_columns = [c for c in spec.evaluation.slices if c not in features and c != target]
    eval_artifact = store.put_frame(fitted.eval_rows[features + [target] + slice_columns])
    # Which rows this model learned from, so the gate can compare it only on rows it never saw.
    trained_on = np.unique(row_hashes(fitted.train_rows, features))
    train_hashes = store.put_frame(pd.DataFrame({HASH_COLUMN: trained_on}))
    artifact = save_model(store, fitted.pipeline, schema, spec.features.custom)
    manifest = {
        "format": 1,
        "name": spec.name,
        "task": fitted.task,
        "estimator": spec.model.estimator or DEFAULT_ESTIMATORS[fitted.task],
        "params": spec.model.params,
        "seed": spec.model.seed,
        "metric": fitted.metric,
        "metrics": fitted.metrics,
        "baseline": fitted.baseline,
        "slices": fitted.slices,
        "classes": fitted.classes,
        "features": features,
        "target": target,
        "dataset_version": dataset.version,
        "dataset_hash": dataset.content_hash,
        "schema_version": dataset.schema_version,
        "eval_artifact": eval_artifact,
        "train_hashes": train_hashes,
        "recent_from_row": recent_from_row,
        "recent_weight": recent_weight,
        "train_rows": len(fitted.train_rows),
        "eval_rows": len(fitted.eval_rows),
        "reason": reason,
        "monitoring": monitoring_references(store, fitted, frame.iloc[recent_from_row:], schema),
    } | reproducibility_record(spec, store.root.parent) | (extra or {})
    t = store.tables.models
    with store.engine.begin() as conn:
        version = conn.execute(t.insert().values(
            dataset_version=dataset.version, artifact=artifact, manifest=manifest, metric=fitted.metric,
            value=fitted.metrics[fitted.metric], reason=reason)).inserted_primary_key[0]
    return TrainResult(version, fitted.metric, fitted.metrics[fitted.metric], fitted.baseline[fitted.metric],
                       fitted.metrics, dataset.version, time.perf_counter() - started)


def refit_template(template: Pipeline, seed: int) -> Pipeline:
    """A fresh `sklearn.base.clone` of `template` (its parameters, none of its fitted state), with every
    `random_state` left at None set to `seed`, so that the refit can be reproduced."""
    pipeline = clone(template)
    unseeded = {k: seed for k, v in pipeline.get_params(deep=True).items()
                if (k == "random_state" or k.endswith("__random_state")) and v is None}
    return pipeline.set_params(**unseeded) if unseeded else pipeline


def sample_weight_param(pipeline: Pipeline) -> str | None:
    """The `fit` keyword that passes sample weights to the pipeline's estimator: `model__sample_weight`,
    or through a nested Pipeline to its last step; None when the estimator takes none."""
    model = pipeline.named_steps["model"]
    if has_fit_parameter(model, "sample_weight"):
        return "model__sample_weight"
    if isinstance(model, Pipeline) and has_fit_parameter(model.steps[-1][1], "sample_weight"):
        return f"model__{model.steps[-1][0]}__sample_weight"
    return None


def final_estimator(pipeline: Any) -> Any:
    """The last step of a (possibly nested) Pipeline: the estimator that makes the predictions."""
    while isinstance(pipeline, Pipeline):
        pipeline = pipeline.steps[-1][1]
    return pipeline


def estimator_name(pipeline: Any) -> str:
    """The dotted class path of a pipeline's final estimator, public module where it has one."""
    cls = type(final_estimator(pipeline))
    module = cls.__module__
    if module.startswith("sklearn."):  # sklearn.ensemble._hist_gradient_boosting.x -> sklearn.ensemble
        public = ".".join(part for part in module.split(".") if not part.startswith("_"))
        try:
            if getattr(importlib.import_module(public), cls.__name__, None) is cls:
                module = public
        except ImportError:
            pass
    return f"{module}.{cls.__qualname__}"


def estimator_params(pipeline: Any) -> dict[str, Any]:
    """The final estimator's own parameters that are plain JSON values (the rest are objects)."""
    params = final_estimator(pipeline).get_params(deep=False)
    return {k: v for k, v in params.items()
            if v is None or isinstance(v, (bool, int, float, str)) and not isinstance(v, np.generic)}


def monitoring_references(store: Store, fitted: Fitted, reference_rows: pd.DataFrame, schema: Schema) -> dict[str, Any]:
    """What the monitor compares every window with, computed once here and stored with the model:
    the profile of the training rows of the current world, the profile of the model's scores on its
    held-out rows, and (classifiers) the calibration maps that confidence-based performance
    estimation needs."""
    kinds = {c.name: c.kind for c in schema.features}
    features = schema.feature_names
    profile = Profile.reference(reference_rows[features], kinds)
    eval_features = fitted.eval_rows[features]
    out: dict[str, Any] = {"profile": store.put_json(profile.to_dict())}
    if fitted.task == "classification":
        proba = fitted.pipeline.predict_proba(eval_features)
        out["calibration"] = calibration_maps(proba, fitted.y_eval)
        if proba.shape[1] == 2:
            scores, kind = pd.Series(proba[:, 1]), "numeric"
        else:
            scores, kind = pd.Series(np.asarray(fitted.classes, dtype=object)[proba.argmax(axis=1)]).map(str), "categorical"
    else:
        scores, kind = pd.Series(fitted.pipeline.predict(eval_features)), "numeric"
    out["prediction_profile"] = store.put_json(Profile.reference(pd.DataFrame({"prediction": scores}),
                                                                 {"prediction": kind}).to_dict())
    return out


def calibration_maps(proba: np.ndarray, y_codes: np.ndarray) -> dict[str, Any]:
    """Isotonic maps from a classifier's probabilities (rows x classes) to how often each class was
    right on held-out rows with class codes `y_codes` (0..k-1): for binary models one map of P(class 1)
    ({"x", "y"}), for multiclass one per class, one-vs-rest ({"classes": [{"x", "y"}, ...]}), as
    NannyML's CBPE calibrates before estimating. An over-confident model estimated without them would
    report a loss far better than the one its labels will show."""
    def fit(scores: np.ndarray, hits: np.ndarray) -> dict[str, list[float]]:
        iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(scores, hits)
        return {"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}

    if proba.shape[1] == 2:
        return fit(proba[:, 1], y_codes == 1)
    return {"classes": [fit(proba[:, k], y_codes == k) for k in range(proba.shape[1])]}


def reproducibility_record(spec: ProjectSpec, project_dir: Path) -> dict[str, Any]:
    """Everything besides the data that made a model: the whole spec, user code, packages, platform.
    The spec is stored scrubbed of secrets (a literal password or webhook key becomes a `${NAME}`
    reference to the environment): every reader of the store reads manifests."""
    spec_body = scrub_spec(spec.model_dump(mode="json"))
    return {
        "spec": spec_body,
        "spec_hash": hashlib.sha256(json.dumps(spec_body, sort_keys=True).encode()).hexdigest(),
        "custom_code_hash": custom_source_hash(spec.features.custom),
        "git": _git(project_dir),
        "packages": packages(),
        "threads": TRAIN_THREADS,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


def packages() -> dict[str, str]:
    """Versions of the packages a model's behaviour depends on (those installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("everloop", "scikit-learn", "pandas", "numpy", "scipy", "pyarrow", "joblib", "lightgbm",
                 "xgboost", "xgboost-cpu"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _git(folder: Path) -> dict[str, Any] | None:
    """The commit of the project's git checkout and whether it had uncommitted changes, if it is one."""
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=5)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def _recent_weights(train_rows: pd.DataFrame, recent_from_row: int, recent_weight: float | str) -> np.ndarray | None:
    recent = np.asarray(train_rows.index) >= recent_from_row
    older = int((~recent).sum())
    if not recent_from_row or not older or recent_weight == 1.0:
        return None
    weight = max(1.0, older / max(int(recent.sum()), 1)) if recent_weight == "balanced" else float(recent_weight)
    return np.where(recent, weight, 1.0)


def _evaluate(model: Any, task: str, features: pd.DataFrame, y: np.ndarray) -> dict[str, float]:
    if task == "classification":
        proba = model.predict_proba(features)
        return all_metrics(task, y, proba.argmax(axis=1), proba, list(range(proba.shape[1])))
    return all_metrics(task, y, model.predict(features), None, None)


def _slice_metrics(pipeline: Pipeline, task: str, metric: str, eval_rows: pd.DataFrame, features: list[str],
                   y: np.ndarray, slices: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for column in slices:
        if column not in eval_rows:
            raise TrainError(f"evaluation.slices names {column!r}, which is not in the dataset", column=column)
        out[column] = {}
        for value, index in eval_rows.groupby(column, dropna=False).indices.items():
            part = eval_rows.iloc[index][features]
            if task == "classification":
                proba = pipeline.predict_proba(part)
                out[column][str(value)] = score(metric, y[index], proba.argmax(axis=1), proba,
                                                list(range(proba.shape[1])))
            else:
                out[column][str(value)] = score(metric, y[index], pipeline.predict(part))
    return out
