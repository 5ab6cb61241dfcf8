"""The feature pipeline, built from the schema and the spec: one fitted object for training and serving."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

from everloop.data import Schema
from everloop.errors import TrainError
from everloop.spec import ProjectSpec

MISSING_CATEGORY = "__missing__"


def fill_missing_category(frame: pd.DataFrame) -> np.ndarray:
    """Categories as objects with one explicit token for missing (None and NaN alike)."""
    values = pd.DataFrame(frame).astype(object)
    return values.where(values.notna(), MISSING_CATEGORY).to_numpy()


def build_features(schema: Schema, spec: ProjectSpec) -> ColumnTransformer:
    """Numeric: median impute + scale. Categorical: explicit missing token + one-hot, safe with unseen values."""
    numeric = [c.name for c in schema.features if c.kind == "numeric"]
    categorical = [c.name for c in schema.features if c.kind == "categorical"]
    if not numeric and not categorical and not spec.features.custom:
        raise TrainError("no feature columns: the schema has only the target, id and timestamp")
    branches: list[tuple[str, Any, list[str]]] = []
    if numeric:
        branches.append(("numeric", Pipeline([
            ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
            ("scale", StandardScaler()),
        ]), numeric))
    if categorical:
        branches.append(("categorical", Pipeline([
            ("fill", FunctionTransformer(fill_missing_category, feature_names_out="one-to-one")),
            ("encode", OneHotEncoder(handle_unknown="ignore", sparse_output=False, min_frequency=5)),
        ]), categorical))
    if spec.features.custom:
        branches.append(("custom", load_custom(spec.features.custom), numeric + categorical))
    return ColumnTransformer(branches, remainder="drop", verbose_feature_names_out=False)


def load_custom(reference: str) -> Any:
    """Call the user's `module:callable` factory and return the transformer it makes."""
    module_name, _, attr = reference.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise TrainError(f"features.custom {reference!r} cannot be imported: {exc}") from None
    transformer = factory()
    if not hasattr(transformer, "fit") or not hasattr(transformer, "transform"):
        raise TrainError(f"features.custom {reference!r} returned {type(transformer).__name__}, "
                         "which has no fit/transform")
    return transformer


def custom_source_hash(reference: str | None) -> str | None:
    """sha256 of the user transformer's module source, recorded so a changed transformer is noticed."""
    if not reference:
        return None
    import hashlib
    import inspect

    module = importlib.import_module(reference.partition(":")[0])
    try:
        return hashlib.sha256(inspect.getsource(module).encode()).hexdigest()
    except (OSError, TypeError):
        return None
