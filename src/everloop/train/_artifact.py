"""The model artifact: one fitted pipeline (features + estimator), its schema and its manifest.

Training writes it, and serving, batch scoring and monitoring all load this same object, so no
second implementation of the features exists anywhere.
"""

from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import cloudpickle
import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from everloop.data import Schema, ValidationReport
from everloop.errors import StoreError, TrainError
from everloop.features import FastFeatures
from everloop.features._fast import VECTOR_ROWS, Codes, Columns
from everloop.store import Store

ARTIFACT_FORMAT = 1


@dataclass
class Predictions:
    labels: np.ndarray  # predicted class or value per row
    proba: np.ndarray | None  # class probabilities (rows x classes), classifiers only
    classes: list[Any] | None

    def records(self, ids: list[str] | None = None) -> list[dict[str, Any]]:
        """One JSON-ready dict per row: its id (when given), the prediction and, for classifiers, each
        class's probability."""
        labels = self.labels.tolist()
        if self.proba is None:
            if ids is None:
                return [{"prediction": v} for v in labels]
            return [{"id": i, "prediction": v} for i, v in zip(ids, labels)]
        names = [str(c) for c in self.classes]
        rows = np.round(self.proba, 6).tolist()
        if len(names) == 2:  # the common case, without a zip per row
            a, b = names
            if ids is None:
                return [{"prediction": v, "probabilities": {a: p, b: q}} for v, (p, q) in zip(labels, rows)]
            return [{"id": i, "prediction": v, "probabilities": {a: p, b: q}} for i, v, (p, q) in zip(ids, labels, rows)]
        if ids is None:
            return [{"prediction": v, "probabilities": dict(zip(names, p))} for v, p in zip(labels, rows)]
        return [{"id": i, "prediction": v, "probabilities": dict(zip(names, p))} for i, v, p in zip(ids, labels, rows)]


@dataclass
class TrainedModel:
    version: int | None
    pipeline: Pipeline
    schema: Schema
    manifest: dict[str, Any]
    fast: FastFeatures | None = None  # the low-overhead feature path, once `check_fast_path` approved it
    compiled: Callable[[np.ndarray], np.ndarray] | None = None  # the estimator as native code (serving)

    def check_fast_path(self, frame: pd.DataFrame) -> bool:
        """Use the low-overhead feature path only if it gives exactly the pipeline's outputs on `frame`
        (and on the same rows with missing values and unseen categories)."""
        features = self._probe_rows(frame)
        if features is None:
            return False
        self.fast = None
        try:
            slow = self._outputs(features)
        except Exception:  # an imported pipeline that cannot take missing values or unseen categories:
            return False  # requests then run through the pipeline itself, which answers them or says why
        try:
            self.fast = FastFeatures(self.pipeline.named_steps["features"])
            if not np.array_equal(slow, self._outputs(features)):
                self.fast = None
            else:  # batch-sized inputs take the vectorised lookups (features._fast.VECTOR_ROWS): check them too
                repeats = -(-VECTOR_ROWS // len(features))
                many = pd.concat([features] * repeats, ignore_index=True)
                if not np.array_equal(np.concatenate([slow] * repeats), self._outputs(many)):
                    self.fast = None
        except Exception:  # a step that needs a frame: keep the pipeline's own path
            self.fast = None
        return self.fast is not None

    def probe_encoded(self, frame: pd.DataFrame) -> np.ndarray:
        """`frame`'s rows (and their unusual variants) as the estimator sees them: to check a compiled estimator."""
        features = self._probe_rows(frame)
        if features is None:
            raise ValueError("no valid rows to probe the model with")
        return self.pipeline.named_steps["features"].transform(features[self.schema.feature_names])

    def _probe_rows(self, frame: pd.DataFrame) -> pd.DataFrame | None:
        """`frame` conformed, plus copies of a few rows with missing values and unseen categories; None
        when `frame` has no valid rows."""
        features, report = self.conform(frame)
        if not report.ok or features.empty:
            return None
        return pd.concat([features, _unusual_rows(features)], ignore_index=True)

    def _outputs(self, features: Columns, codes: Codes | None = None) -> np.ndarray:
        if self.fast is not None:
            encoded = self.fast.transform(features, codes)
            if self.compiled is not None:
                return self.compiled(encoded)
            estimator = self.pipeline.named_steps["model"]
            return estimator.predict_proba(encoded) if self.task == "classification" else estimator.predict(encoded)
        features = features[self.schema.feature_names]
        return self.pipeline.predict_proba(features) if self.task == "classification" else self.pipeline.predict(features)

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def classes(self) -> list[Any] | None:
        return self.manifest.get("classes")

    def conform(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, ValidationReport]:
        """Validate and coerce request rows (features only) through the schema."""
        return self.schema.conform(frame, mode="request")

    def predict_conformed(self, features: Columns, codes: Codes | None = None) -> Predictions:
        """Predict rows that already went through `conform` (a frame, or with the fast path on, the
        columns `Schema.conform_records` returns). `codes` (a dict), with the fast path on, receives
        the text features' codes as the encoder looked them up (`FastFeatures.transform`)."""
        outputs = self._outputs(features, codes)
        if self.task == "classification":
            classes = self.classes  # proba columns are class codes 0..k-1, in manifest order
            labels = np.asarray(classes, dtype=object)[outputs.argmax(axis=1)]
            return Predictions(labels, outputs, classes)
        return Predictions(np.asarray(outputs, dtype=float), None, None)

    def predict(self, frame: pd.DataFrame) -> Predictions:
        """Conform and predict; rows with error-level anomalies raise `DataError`."""
        from everloop.errors import DataError

        features, report = self.conform(frame)
        if not report.ok:
            raise DataError("rows do not match the model's schema:\n" + report.summary(), report=report)
        return self.predict_conformed(features)


def _unusual_rows(features: pd.DataFrame, n: int = 20) -> pd.DataFrame:
    """Copies of a few conformed rows where each value is missing (in its column's own type: NaN, None,
    NaT) and each category unseen: the cases a fast path most easily gets wrong. Every value keeps its
    column's type, so the probe tests the features and never trips over a value no request could send."""
    head = features.head(n)
    missing = head.copy()
    unseen = head.copy()
    for name in head.columns:
        column = head[name]
        if column.dtype == object or isinstance(column.dtype, pd.StringDtype):  # categories, bools as text
            missing[name] = pd.Series([None] * len(head), index=head.index, dtype=column.dtype)
            unseen[name] = "\x00unseen"
        elif pd.api.types.is_float_dtype(column):
            missing[name] = np.nan
        elif pd.api.types.is_datetime64_any_dtype(column):
            missing[name] = pd.Series(pd.NaT, index=head.index, dtype=column.dtype)
    return pd.concat([missing, unseen], ignore_index=True)


def save_model(store: Store, pipeline: Pipeline, schema: Schema, custom: str | None = None) -> str:
    """Store the fitted pipeline and its schema as one artifact. The module of a user transformer
    (`features.custom`) is pickled by value: its code travels inside the artifact, so a service or
    batch job loads the model without the user's package, and the code cannot drift from the model."""
    module = importlib.import_module(custom.partition(":")[0]) if custom else None
    if module is not None:
        cloudpickle.register_pickle_by_value(module)
    try:
        payload = cloudpickle.dumps({"format": ARTIFACT_FORMAT, "pipeline": pipeline, "schema": schema.to_dict()})
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise TrainError(f"the fitted model cannot be saved: {exc}") from None
    finally:
        if module is not None:
            cloudpickle.unregister_pickle_by_value(module)
    return store.artifacts.put(payload)


def load_artifact(store: Store, digest: str, manifest: dict[str, Any], version: int | None) -> TrainedModel:
    """Load a model artifact; its bytes are verified against the digest before unpickling."""
    data = store.artifacts.get(digest)  # verified against its sha256 before anything is unpickled
    try:
        payload = pickle.loads(data)
    except Exception as exc:  # any unpickling failure: another format, a missing class, a broken file
        raise StoreError(f"model artifact {digest[:12]} cannot be loaded: {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict):
        raise StoreError(f"model artifact {digest[:12]} is not an everloop model")
    if payload.get("format") != ARTIFACT_FORMAT:
        raise StoreError(f"model artifact format {payload.get('format')!r} is not supported")
    return TrainedModel(version, payload["pipeline"], Schema.from_dict(payload["schema"]), manifest)

