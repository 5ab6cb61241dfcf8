"""Training: the spec's pipeline fitted on a dataset version, evaluated on a holdout, registered."""

from __future__ import annotations

import hashlib
import importlib
import json
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import is_classifier
from sklearn.utils.validation import has_fit_parameter
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline

from everloop.data import Schema, get_dataset, get_schema, load_frame
from everloop.errors import TrainError
from everloop.features import build_features, custom_source_hash
from everloop.spec import ProjectSpec
from everloop.store import Store
from everloop.train._artifact import save_model
from everloop.train._metrics import all_metrics, improvement, score

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
    """Class labels in their natural type: integer-like strings ("0", "1") become ints."""
    series = pd.Series(values, dtype=object)
    try:
        ints = series.map(int)
        if (ints.map(str) == series.map(str)).all():
            return ints.to_numpy(dtype=np.int64)
    except (TypeError, ValueError):
        pass
    return series.to_numpy()


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


def train(store: Store, spec: ProjectSpec, dataset_version: int | None = None, *, reason: str = "",
          recent_from_row: int = 0, recent_weight: float | str = 1.0) -> TrainResult:
    """Fit the spec's pipeline on a dataset version (the latest by default) and register a model version.

    `recent_from_row` marks where the rows of the current world start (the loop appends recent rows
    after the old reference data): evaluation and the monitor's drift reference use only those rows,
    and in training each of them weighs `recent_weight` ('balanced': as much in total as the older rows)."""
    started = time.perf_counter()
    dataset = get_dataset(store, dataset_version)
    schema = get_schema(store, dataset.schema_version)
    frame = load_frame(store, dataset).reset_index(drop=True)  # positions == index, for recent_from_row
    task = task_of(schema)
    metric = spec.evaluation.metric or ("roc_auc" if task == "classification" else "rmse")
    if (metric in ("rmse", "mae", "r2")) != (task == "regression"):
        raise TrainError(f"evaluation.metric {metric!r} does not suit a {task} target")
    if len(frame) - recent_from_row < 20:
        raise TrainError(f"dataset v{dataset.version} has {len(frame) - recent_from_row} rows to evaluate on; "
                         "at least 20 are needed to train and evaluate")
    train_rows, eval_rows = split(frame, schema, spec, task, recent_from_row)
    features = schema.feature_names
    target = schema.target.name
    y_train = as_labels(train_rows[target]) if task == "classification" else train_rows[target].to_numpy()
    y_eval = as_labels(eval_rows[target]) if task == "classification" else eval_rows[target].to_numpy()
    if task == "classification" and len(np.unique(y_train)) < 2:
        raise TrainError(f"the target {target!r} has one class in the training rows; nothing to learn", column=target)

    pipeline = Pipeline([("features", build_features(schema, spec)), ("model", make_estimator(spec, task))])
    weights = _recent_weights(train_rows, recent_from_row, recent_weight)
    if weights is not None and not has_fit_parameter(pipeline.named_steps["model"], "sample_weight"):
        raise TrainError(f"model.estimator {spec.model.estimator} does not accept sample_weight; "
                         "set retraining.data.recent_weight: 1 or include_reference: false")
    pipeline.fit(train_rows[features], y_train, **({"model__sample_weight": weights} if weights is not None else {}))
    metrics, classes = _evaluate(pipeline, task, eval_rows[features], y_eval)
    baseline_model = (DummyClassifier(strategy="prior") if task == "classification" else DummyRegressor()).fit(
        train_rows[features], y_train)
    baseline, _ = _evaluate(baseline_model, task, eval_rows[features], y_eval)
    slices = _slice_metrics(pipeline, task, metric, eval_rows, features, y_eval, spec.evaluation.slices)

    eval_artifact = store.put_frame(eval_rows[features + [target]])
    artifact = save_model(store, pipeline, schema)
    manifest = {
        "format": 1,
        "name": spec.name,
        "task": task,
        "estimator": spec.model.estimator or DEFAULT_ESTIMATORS[task],
        "params": spec.model.params,
        "seed": spec.model.seed,
        "metric": metric,
        "metrics": metrics,
        "baseline": {metric: baseline[metric]},
        "slices": slices,
        "classes": classes,
        "features": features,
        "target": target,
        "dataset_version": dataset.version,
        "dataset_hash": dataset.content_hash,
        "schema_version": dataset.schema_version,
        "eval_artifact": eval_artifact,
        "recent_from_row": recent_from_row,
        "recent_weight": recent_weight,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "spec_hash": hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest(),
        "custom_code_hash": custom_source_hash(spec.features.custom),
        "packages": _packages(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "reason": reason,
    }
    t = store.tables.models
    with store.engine.begin() as conn:
        version = conn.execute(t.insert().values(
            dataset_version=dataset.version, artifact=artifact, manifest=manifest, metric=metric,
            value=metrics[metric], reason=reason)).inserted_primary_key[0]
    return TrainResult(version, metric, metrics[metric], baseline[metric], metrics, dataset.version,
                       time.perf_counter() - started)


def _recent_weights(train_rows: pd.DataFrame, recent_from_row: int, recent_weight: float | str) -> np.ndarray | None:
    recent = np.asarray(train_rows.index) >= recent_from_row
    older = int((~recent).sum())
    if not recent_from_row or not older or recent_weight == 1.0:
        return None
    weight = max(1.0, older / max(int(recent.sum()), 1)) if recent_weight == "balanced" else float(recent_weight)
    return np.where(recent, weight, 1.0)


def _evaluate(model: Any, task: str, features: pd.DataFrame, y: np.ndarray) -> tuple[dict[str, float], list | None]:
    if task == "classification":
        proba = model.predict_proba(features)
        classes = list(model.classes_)
        predicted = np.asarray(classes, dtype=object)[proba.argmax(axis=1)]
        plain = [c.item() if isinstance(c, np.generic) else c for c in classes]
        return all_metrics(task, y, predicted.astype(y.dtype) if y.dtype != object else predicted, proba, classes), plain
    return all_metrics(task, y, model.predict(features), None, None), None


def _slice_metrics(pipeline: Pipeline, task: str, metric: str, eval_rows: pd.DataFrame, features: list[str],
                   y: np.ndarray, slices: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for column in slices:
        if column not in eval_rows:
            raise TrainError(f"evaluation.slices names {column!r}, which is not in the dataset", column=column)
        out[column] = {}
        for value, index in eval_rows.groupby(column, dropna=False).indices.items():
            part = eval_rows.iloc[index]
            if task == "classification":
                proba = pipeline.predict_proba(part[features])
                classes = list(pipeline.classes_)
                predicted = np.asarray(classes)[proba.argmax(axis=1)]
                out[column][str(value)] = score(metric, y[index], predicted, proba, classes)
            else:
                out[column][str(value)] = score(metric, y[index], pipeline.predict(part[features]))
    return out


def _packages() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("everloop", "scikit-learn", "pandas", "numpy", "scipy", "pyarrow", "joblib"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
