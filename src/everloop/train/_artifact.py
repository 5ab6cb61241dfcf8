"""The model artifact: one fitted pipeline (features + estimator), its schema and its manifest.

Training writes it, and serving, batch scoring and monitoring all load this same object, so no
second implementation of the features exists anywhere.
"""

from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass
from typing import Any

import cloudpickle
import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from everloop.data import Schema, ValidationReport
from everloop.errors import StoreError, TrainError
from everloop.store import Store

ARTIFACT_FORMAT = 1


@dataclass
class Predictions:
    labels: np.ndarray  # predicted class or value per row
    proba: np.ndarray | None  # class probabilities (rows x classes), classifiers only
    classes: list[Any] | None

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per row: the prediction and, for classifiers, each class's probability."""
        labels = self.labels.tolist()
        if self.proba is None:
            return [{"prediction": v} for v in labels]
        names = [str(c) for c in self.classes]
        rows = np.round(self.proba, 6).tolist()
        return [{"prediction": v, "probabilities": dict(zip(names, p))} for v, p in zip(labels, rows)]


@dataclass
class TrainedModel:
    version: int | None
    pipeline: Pipeline
    schema: Schema
    manifest: dict[str, Any]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def classes(self) -> list[Any] | None:
        return self.manifest.get("classes")

    def conform(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, ValidationReport]:
        """Validate and coerce request rows (features only) through the schema."""
        return self.schema.conform(frame, mode="request")

    def predict_conformed(self, features: pd.DataFrame) -> Predictions:
        """Predict rows that already went through `conform`."""
        features = features[self.schema.feature_names]
        if self.task == "classification":
            proba = self.pipeline.predict_proba(features)  # columns: class codes 0..k-1, in manifest order
            classes = self.classes
            labels = np.asarray(classes, dtype=object)[proba.argmax(axis=1)]
            return Predictions(labels, proba, classes)
        return Predictions(np.asarray(self.pipeline.predict(features), dtype=float), None, None)

    def predict(self, frame: pd.DataFrame) -> Predictions:
        """Conform and predict; rows with error-level anomalies raise `DataError`."""
        from everloop.errors import DataError

        features, report = self.conform(frame)
        if not report.ok:
            raise DataError("rows do not match the model's schema:\n" + report.summary(), report=report)
        return self.predict_conformed(features)


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
    payload = pickle.loads(data)
    if payload.get("format") != ARTIFACT_FORMAT:
        raise StoreError(f"model artifact format {payload.get('format')!r} is not supported")
    return TrainedModel(version, payload["pipeline"], Schema.from_dict(payload["schema"]), manifest)

