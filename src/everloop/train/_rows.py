"""Row identity: which rows a model trained on, as 64-bit hashes of their feature values.

The gate compares a candidate with production only on rows neither trained on; a row of a dataset
version, of a model's stored evaluation rows and of the prediction log must then hash alike when its
features are alike, however each source typed them (int or float, microsecond or nanosecond times,
Arrow strings or Python objects)."""

from __future__ import annotations

import datetime as dt
import numbers
from typing import Any

import numpy as np
import pandas as pd

from everloop.data import get_dataset, load_frame
from everloop.errors import EverloopError
from everloop.store import Store

HASH_COLUMN = "row_hash"
# One marker for a missing value of any kind, so a null logged as None, NaN or NaT is the same value.
_MISSING = np.uint64(0x9E3779B97F4A7C15)


def row_hashes(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """One uint64 per row of `frame` identifying its values in `columns` (in that order).

    Values are first canonicalised by kind, so the same row read from different sources matches:
    numbers and bools as float64 (-0.0 as 0.0), date/times as int64 nanoseconds since the epoch in UTC
    (naive times read as UTC), text as str, and every missing value (None, NaN, NaT, pd.NA) as one
    marker; object columns are canonicalised value by value the same way. Each column is hashed with
    `pandas.util.hash_array` and the columns are combined by `pandas.util.hash_pandas_object(...,
    index=False)` (SipHash with pandas' fixed key: stable across processes and machines).
    Shape: (len(frame),), dtype uint64. Raises EverloopError when a column is absent from `frame`."""
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise EverloopError(f"cannot identify rows by {absent}: the frame has no such columns "
                            f"(it has {list(frame.columns)[:20]})")
    if len(frame) == 0:
        return np.empty(0, dtype=np.uint64)
    hashed = pd.DataFrame({n: _column_hashes(frame[c]) for n, c in enumerate(columns)})
    return pd.util.hash_pandas_object(hashed, index=False).to_numpy(dtype=np.uint64)


def training_hashes(store: Store, manifest: dict[str, Any]) -> np.ndarray:
    """The sorted unique row hashes (uint64) of the rows a model version trained on, over its features.

    From the `train_hashes` artifact its training stored; for models trained before that existed,
    recomputed from its dataset version: every row whose features differ from all of its stored
    evaluation rows. (A training row identical in its features to an evaluation row is then missed;
    rows training left out, such as evaluation rows of a class the training rows lacked, count as
    trained on, which only makes the comparison more careful.) Raises StoreError when an artifact
    is missing or altered."""
    digest = manifest.get("train_hashes")
    if digest:
        return store.get_frame(digest)[HASH_COLUMN].to_numpy(dtype=np.uint64)
    features = manifest["features"]
    frame = load_frame(store, get_dataset(store, manifest["dataset_version"]))
    every = row_hashes(frame, features)
    held_out = row_hashes(store.get_frame(manifest["eval_artifact"]), features)
    return np.unique(every[~np.isin(every, held_out)])


def _column_hashes(values: pd.Series) -> np.ndarray:
    out = np.full(len(values), _MISSING, dtype=np.uint64)
    dtype = values.dtype
    if pd.api.types.is_bool_dtype(dtype) or (pd.api.types.is_numeric_dtype(dtype)
                                             and not pd.api.types.is_object_dtype(dtype)):
        floats = values.to_numpy(dtype=np.float64, na_value=np.nan)
        present = ~np.isnan(floats)
        out[present] = _hash_floats(floats[present])
        return out
    if pd.api.types.is_datetime64_any_dtype(dtype):
        present = values.notna().to_numpy()
        out[present] = _hash_times(_nanoseconds(values[present]))
        return out
    if isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_timedelta64_dtype(dtype):
        values = values.astype(object)
    objects = values.to_numpy(dtype=object, na_value=None)
    present = ~pd.isna(objects)
    if pd.api.types.infer_dtype(objects[present], skipna=False) in ("string", "empty"):
        out[present] = _hash_text(objects[present])
        return out
    for n in np.flatnonzero(present):  # mixed object column: one value at a time, by its own kind
        out[n] = _hash_value(objects[n])
    return out


def _hash_value(value: Any) -> np.uint64:
    is_time = isinstance(value, (dt.datetime, np.datetime64))
    if isinstance(value, (bool, np.bool_, numbers.Real)) and not is_time:
        number = float(value)
        return _MISSING if np.isnan(number) else _hash_floats(np.array([number]))[0]
    if isinstance(value, (dt.datetime, np.datetime64, pd.Timestamp)):
        return _hash_times(_nanoseconds(pd.Series([pd.Timestamp(value)])))[0]
    return _hash_text(np.array([str(value)], dtype=object))[0]


def _nanoseconds(times: pd.Series) -> np.ndarray:
    if times.dt.tz is not None:
        times = times.dt.tz_convert("UTC").dt.tz_localize(None)
    return times.to_numpy(dtype="datetime64[ns]").view(np.int64)


def _hash_floats(floats: np.ndarray) -> np.ndarray:
    return pd.util.hash_array(floats + 0.0)  # + 0.0 turns -0.0 into 0.0: equal numbers, equal bits


def _hash_times(nanoseconds: np.ndarray) -> np.ndarray:
    # Salted so a time and the number of its nanoseconds differ (a column's kind may differ between sources).
    return pd.util.hash_array(nanoseconds.astype(np.int64)) ^ np.uint64(0x5851F42D4C957F2D)


def _hash_text(text: np.ndarray) -> np.ndarray:
    return pd.util.hash_array(np.asarray(text, dtype=object))  # str objects only
