"""The serving path of the fitted feature steps: the same outputs, without scikit-learn's per-call overhead.

A request batch is a handful of rows, and for so few rows scikit-learn's input checks cost far more
than the arithmetic: a fitted OneHotEncoder takes ~0.6 ms to encode 8 rows. `FastFeatures` replays
the fitted parameters of the common steps with plain numpy (imputer statistics, scaler means and
scales, encoder lookup tables read off the fitted encoder itself) and runs every other step as it
is. It is used only after `TrainedModel.check_fast_path` has seen it give the pipeline's exact
outputs, so it is an optimisation, never a second definition of the features.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from sklearn import config_context
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, OrdinalEncoder, StandardScaler

from everloop.features._pipeline import MISSING_CATEGORY, fill_missing_category

NUMPY_BRANCHES = ("numeric", "categorical")  # branches whose steps take plain arrays as well as frames
UNKNOWN = "\x00everloop-unseen\x00"  # a category no training set holds: probes the encoder's unknown handling

Columns = Mapping[str, Any]  # a DataFrame, or a dict of column arrays by name
Codes = dict[str, "tuple[np.ndarray, Vocabulary]"]  # per text feature: each row's code, and what codes mean
VECTOR_ROWS = 2048  # from this many rows, categories are looked up by pandas' hash table (see _Lookup.encode)


class FastFeatures:
    """What `features.transform(frame)` returns, for a frame or a dict of column arrays."""

    def __init__(self, features: ColumnTransformer):
        self.branches: list[tuple[str, Any, list[str]]] = []
        self.needs_config = False  # scikit-learn's config only matters to steps that still run as themselves
        for name, transformer, columns in features.transformers_:
            if name == "remainder":
                continue
            if name in NUMPY_BRANCHES:
                steps = [_replay(step) for _, step in transformer.steps]
                self.needs_config |= not all(isinstance(step, _REPLAYS) for step in steps)
                if name == "categorical" and len(steps) == 2 and isinstance(steps[0], _FillMissing) \
                        and isinstance(steps[1], _Lookup):
                    steps = _EncodeColumns(steps[1])  # both steps at once, column by column: no stacking
                self.branches.append((name, steps, list(columns)))
            else:
                self.needs_config = True
                self.branches.append((name, transformer, list(columns)))

    def transform(self, columns: Columns, codes: Codes | None = None) -> np.ndarray:
        """The encoded matrix (rows x encoded features, float64). With `codes` (a dict), also each
        looked-up text feature's codes as the encoder found them (see `Vocabulary`): the prediction log
        stores those instead of hashing every value a second time."""
        if self.needs_config:
            with config_context(assume_finite=True):
                return self._transform(columns, codes)
        return self._transform(columns, codes)

    def _transform(self, columns: Columns, codes: Codes | None) -> np.ndarray:
        parts = []
        for name, steps, names in self.branches:
            if isinstance(steps, _EncodeColumns):
                data: Any = steps.transform(columns, names, codes)
            elif name in NUMPY_BRANCHES:
                kind = float if name == "numeric" else object
                data = np.column_stack([_array(columns[c], kind) for c in names])
                for step in steps:
                    data = step.transform(data)
            else:  # date parts and user transformers may need names: they get a frame
                frame = columns[names] if isinstance(columns, pd.DataFrame) else pd.DataFrame(
                    {c: columns[c] for c in names})
                data = steps.transform(frame)
            parts.append(np.asarray(data, dtype=float))
        return np.hstack(parts) if len(parts) > 1 else parts[0]


def _array(column: Any, kind: type) -> np.ndarray:
    if isinstance(column, pd.Series):
        return column.to_numpy(dtype=kind)
    return np.asarray(column, dtype=kind)


def _replay(step: Any) -> Any:
    """A numpy stand-in for a fitted step where one exists, else a copy of the step that forgot the
    column names it was fitted with (the schema has checked the rows; names would only warn)."""
    try:
        if type(step) is FunctionTransformer and step.func is fill_missing_category and step.kw_args is None:
            return _FillMissing()
        if type(step) is SimpleImputer and step.strategy != "constant" and not step.add_indicator:
            return _Impute(step)
        if type(step) is StandardScaler:
            return _Scale(step)
        if type(step) in (OneHotEncoder, OrdinalEncoder):
            return _Lookup(step)
    except Exception:  # a configuration the stand-ins do not cover: the step itself runs
        pass
    step = copy.copy(step)
    if hasattr(step, "feature_names_in_"):
        del step.feature_names_in_
    return step


class _FillMissing:
    """`fill_missing_category`: None and NaN become the explicit missing token."""

    def transform(self, data: np.ndarray) -> np.ndarray:
        return fill_missing_category(data)


class _Impute:
    def __init__(self, step: SimpleImputer):
        if np.isnan(step.statistics_).any() or (step.missing_values == step.missing_values):
            raise ValueError("only NaN markers and columns with a statistic")  # both: leave it to the step
        self.fill = np.asarray(step.statistics_, dtype=float)

    def transform(self, data: np.ndarray) -> np.ndarray:
        data = np.asarray(data, dtype=float)
        missing = np.isnan(data)
        return np.where(missing, self.fill, data) if missing.any() else data


class _Scale:
    def __init__(self, step: StandardScaler):
        self.mean = step.mean_ if step.with_mean else None
        self.scale = step.scale_ if step.with_std else None

    def transform(self, data: np.ndarray) -> np.ndarray:
        data = np.array(data, dtype=float)  # a copy, as the scaler makes: callers may reuse their input
        if self.mean is not None:
            data -= self.mean
        if self.scale is not None:
            data /= self.scale
        return data


class _Lookup:
    """A fitted one-hot or ordinal encoder as one table per input column: each known category, and any
    unseen one, maps to the output block the encoder itself gives it (probed once, here)."""

    def __init__(self, step: OneHotEncoder | OrdinalEncoder):
        widths = (list(step._n_features_outs) if isinstance(step, OneHotEncoder)
                  else [1] * len(step.categories_))
        probe_rows = max(len(c) for c in step.categories_) + 1
        probe = np.empty((probe_rows, len(step.categories_)), dtype=object)
        for j, categories in enumerate(step.categories_):
            values = list(categories) + [UNKNOWN]
            probe[:, j] = [values[min(i, len(values) - 1)] for i in range(probe_rows)]  # then UNKNOWN
        with config_context(assume_finite=True), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "unknown categories found": the probe means it
            encoded = step.transform(probe)
        encoded = encoded.toarray() if hasattr(encoded, "toarray") else np.asarray(encoded, dtype=float)
        self.width = int(sum(widths))
        self.tables: list[tuple[int, int, dict[Any, int], np.ndarray]] = []
        start = 0
        for j, categories in enumerate(step.categories_):
            end = start + widths[j]
            table = np.ascontiguousarray(encoded[: len(categories) + 1, start:end])  # the last row: unseen
            codes = {value: n for n, value in enumerate(categories)}
            self.tables.append((start, end, codes, table))
            start = end
        if start != encoded.shape[1]:
            raise ValueError("the encoder's output blocks do not add up")

    def transform(self, data: np.ndarray) -> np.ndarray:
        return self.encode([data[:, j] for j in range(data.shape[1])])

    def encode(self, columns: list[Any], fill_missing: bool = False, found_out: list | None = None) -> np.ndarray:
        """Each column's values through its table (unseen values to its last row); with `fill_missing`,
        None and NaN count as the missing token first (what `fill_missing_category` does). `found_out`
        (a list) receives each column's row codes (intp; `len(categories)` for unseen)."""
        n = len(columns[0])
        out = np.empty((n, self.width), dtype=float)
        for values, (start, end, codes, table) in zip(columns, self.tables):
            unseen = len(table) - 1
            if n >= VECTOR_ROWS:  # a batch job's chunk: one hash lookup in C instead of a dict.get per value
                found, missing = _lookup_many(values, codes)
                found[found < 0] = unseen
                if fill_missing:
                    found[missing] = codes.get(MISSING_CATEGORY, unseen)
            else:
                if fill_missing:
                    missing = codes.get(MISSING_CATEGORY, unseen)
                    each = (missing if v is None or v != v else codes.get(v, unseen) for v in values)  # v != v: NaN
                else:
                    each = (codes.get(v, unseen) for v in values)
                found = np.fromiter(each, dtype=np.intp, count=n)
            out[:, start:end] = table[found]
            if found_out is not None:
                found_out.append(found)
        return out


def _lookup_many(values: Any, codes: dict[Any, int]) -> tuple[np.ndarray, np.ndarray]:
    """(code of each value, -1 when unknown; which values are missing) by a hash table: Arrow's for
    Arrow-backed text against text categories (no Python object per value: ~15x faster), else pandas'."""
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.StringDtype) \
            and values.dtype.storage == "pyarrow" and all(type(c) is str for c in codes):
        import pyarrow as pa
        import pyarrow.compute as pc

        array = pa.array(values)
        found = pc.index_in(array, value_set=pa.array(list(codes), type=array.type)).fill_null(-1)
        return found.to_numpy().astype(np.intp), array.is_null().to_numpy(zero_copy_only=False)
    values = _array(values, object)
    return pd.Index(list(codes), dtype=object).get_indexer(values), pd.isna(values)


class _EncodeColumns:
    """Missing-token filling and a lookup encoder, done column by column straight from the request's
    columns (no object matrix is stacked first)."""

    def __init__(self, lookup: _Lookup):
        self.lookup = lookup
        self.vocabularies = [Vocabulary(list(codes), codes.get(MISSING_CATEGORY)) for _, _, codes, _ in lookup.tables]

    def transform(self, columns: Columns, names: list[str], codes: Codes | None = None) -> np.ndarray:
        many = len(columns[names[0]]) >= VECTOR_ROWS  # columns as they are: see _lookup_many
        found: list[np.ndarray] | None = [] if codes is not None else None
        out = self.lookup.encode([columns[name] if many else _array(columns[name], object) for name in names],
                                 fill_missing=True, found_out=found)
        if codes is not None:
            codes.update(zip(names, zip(found, self.vocabularies)))
        return out


class Vocabulary:
    """What a text feature's codes mean: code `i < len(categories)` is `categories[i]`, `unseen`
    (`len(categories)`) a value the encoder does not know, and `missing` (or None) the code missing
    values (None, NaN) share with the literal missing token. `dictionary` is the categories as one
    Arrow text array (built once), or None when they are not all text: codes then cannot stand in
    for the values."""

    def __init__(self, categories: list[Any], missing: int | None):
        self.categories = categories
        self.unseen = len(categories)
        self.missing = missing
        self._dictionary: Any = False

    @property
    def dictionary(self) -> Any:
        if self._dictionary is False:
            import pyarrow as pa

            text = all(type(c) is str for c in self.categories)
            self._dictionary = pa.array(self.categories, type=pa.string()) if text else None
        return self._dictionary


_REPLAYS = (_FillMissing, _Impute, _Scale, _Lookup)
