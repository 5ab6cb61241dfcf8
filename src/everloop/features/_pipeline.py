"""The feature pipeline, built from the schema and the spec: one fitted object for training and serving."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, OrdinalEncoder, StandardScaler

from everloop.data import Schema
from everloop.data._profile import MISSING_CATEGORY
from everloop.errors import TrainError
from everloop.spec import ProjectSpec



def fill_missing_category(frame: pd.DataFrame | np.ndarray) -> np.ndarray:
    """Categories as objects with one explicit token for missing (None and NaN alike)."""
    values = frame.to_numpy(dtype=object) if isinstance(frame, pd.DataFrame) else np.asarray(frame, dtype=object)
    missing = pd.isna(values)
    if missing.any():
        values = values.copy()
        values[missing] = MISSING_CATEGORY
    return values


DATETIME_PARTS = ("year", "month", "day", "day_of_week", "hour")


def datetime_parts(frame: pd.DataFrame) -> np.ndarray:
    """Each date/time column as year, month, day, weekday and hour (NaN where missing)."""
    parts = []
    for name in frame.columns:
        values = pd.to_datetime(frame[name], errors="coerce", utc=True)
        parts += [getattr(values.dt, part).to_numpy(dtype=float, na_value=np.nan) for part in DATETIME_PARTS]
    return np.column_stack(parts) if parts else np.empty((len(frame), 0))


def _datetime_names(transformer: object, names: list[str]) -> list[str]:
    return [f"{n}_{part}" for n in names for part in DATETIME_PARTS]


def build_features(schema: Schema, spec: ProjectSpec) -> ColumnTransformer:
    """Numeric: median impute + scale. Categorical: explicit missing token + one-hot (or ordinal), safe
    with unseen values. Date/time: year, month, day, weekday, hour, imputed."""
    numeric = [c.name for c in schema.features if c.kind == "numeric"]
    categorical = [c.name for c in schema.features if c.kind == "categorical"]
    datetimes = [c.name for c in schema.features if c.kind == "datetime"]
    if not numeric and not categorical and not datetimes and not spec.features.custom:
        raise TrainError("no feature columns: the schema has only the target, id and timestamp")
    branches: list[tuple[str, Any, list[str]]] = []
    if numeric:
        branches.append(("numeric", Pipeline([
            ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
            ("scale", StandardScaler()),
        ]), numeric))
    if categorical:
        encode = (OneHotEncoder(handle_unknown="ignore", sparse_output=False, min_frequency=5)
                  if spec.features.categorical_encoding == "onehot"
                  else OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1))
        branches.append(("categorical", Pipeline([
            ("fill", FunctionTransformer(fill_missing_category, feature_names_out="one-to-one")),
            ("encode", encode),
        ]), categorical))
    if datetimes:
        branches.append(("datetime", Pipeline([
            ("parts", FunctionTransformer(datetime_parts, feature_names_out=_datetime_names)),
            ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
        ]), datetimes))
    if spec.features.custom:
        branches.append(("custom", load_custom(spec.features.custom), numeric + categorical + datetimes))
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
