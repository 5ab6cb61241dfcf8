"""The data schema: inferred once from data, then every file and every request is checked against it.

`Schema.infer(frame, spec)` learns column kinds, roles, nullability, numeric ranges and categorical
domains. `schema.validate(frame)` reports every anomaly it finds (not only the first), each with
its column, count, example rows and severity; `schema.conform(frame)` also returns the frame
coerced to the schema's types. Ingest, batch scoring and the HTTP service all call these, so a
row is judged the same way wherever it enters.

The checks are vectorised and take fast paths on clean data (a range is only scanned row by row
when the column's min or max is already outside it; categories are checked on the distinct
values, not on every row).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from everloop._jsonable import jsonable
from everloop.data._stats import MAX_TRACKED_CATEGORIES, DatasetStats
from everloop.errors import DataError
from everloop.spec import ProjectSpec

SCHEMA_FORMAT = 1
MAX_DOMAIN = MAX_TRACKED_CATEGORIES  # a categorical column with more distinct values gets no domain check
EXAMPLES = 3
NULL_RATE_SLACK = 0.01  # a column's null rate may exceed the schema's by this much before it is reported
RANGE_MARGIN = 0.25  # inferred ranges are widened by this share of their span on each side

_PLAIN_NUMBERS = {int, float, type(None)}  # what `conform_records` takes as is (bool is not an int here)
_PLAIN_TEXT = {str, type(None)}
_PLAIN_SCALARS = {str, int, float, bool, type(None)}

Kind = Literal["numeric", "categorical", "datetime"]
Role = Literal["feature", "target", "id", "timestamp"]
Severity = Literal["error", "warning"]
Mode = Literal["dataset", "request"]


@dataclass(frozen=True)
class Anomaly:
    column: str
    kind: str  # missing_column, unexpected_column, type_mismatch, null_values, null_rate, out_of_range,
    #            unseen_category, duplicate_id, missing_label, empty
    severity: Severity
    count: int
    message: str
    rows: list[int] = field(default_factory=list)  # example row positions (0-based)
    values: list[Any] = field(default_factory=list)  # the offending values at those rows

    def describe(self) -> str:
        where = f" (e.g. rows {', '.join(str(r + 1) for r in self.rows)})" if self.rows else ""
        return f"column {self.column!r}: {self.message}{where}"


@dataclass
class ValidationReport:
    rows: int
    anomalies: list[Anomaly] = field(default_factory=list)

    @property
    def errors(self) -> list[Anomaly]:
        return [a for a in self.anomalies if a.severity == "error"]

    @property
    def warnings(self) -> list[Anomaly]:
        return [a for a in self.anomalies if a.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "ok": self.ok, "anomalies": [jsonable(asdict(a)) for a in self.anomalies]}

    def summary(self) -> str:
        lines = [f"{a.severity}: {a.describe()}" for a in self.anomalies]
        return "\n".join(lines) if lines else "no anomalies"

    def merge(self, other: "ValidationReport", offset: int) -> None:
        """Fold the report of a later batch (whose rows start at `offset`) into this one."""
        self.rows += other.rows
        index = {(a.column, a.kind, a.severity, _stem(a.message)): n for n, a in enumerate(self.anomalies)}
        for a in other.anomalies:
            key = (a.column, a.kind, a.severity, _stem(a.message))
            shifted = replace(a, rows=[r + offset for r in a.rows])
            if key not in index:
                index[key] = len(self.anomalies)
                self.anomalies.append(shifted)
                continue
            mine = self.anomalies[index[key]]
            count = mine.count + a.count
            keep = EXAMPLES - len(mine.rows)
            self.anomalies[index[key]] = replace(
                mine, count=count, message=f"{count} {_stem(mine.message)}" if mine.kind != "missing_column" else mine.message,
                rows=mine.rows + shifted.rows[:keep], values=mine.values + shifted.values[:keep])


@dataclass
class Checked:
    """What one pass of the checks produced."""

    report: ValidationReport
    frame: pd.DataFrame | None = None  # the input coerced to the schema (when asked for)
    bad_rows: np.ndarray | None = None  # rows with an error-level anomaly of their own
    reasons: list[tuple[np.ndarray, str, str]] = field(default_factory=list)  # (row mask, column, why) per row-level error

    def row_reasons(self) -> np.ndarray:
        """For each bad row, every reason it was refused, joined by '; '."""
        if self.bad_rows is None:
            return np.array([], dtype=object)
        out = np.full(len(self.bad_rows), "", dtype=object)
        for mask, column, why in self.reasons:
            text = f"{column}: {why}"
            out[mask] = np.where(out[mask] == "", text, out[mask] + "; " + text)
        return out[self.bad_rows]


@dataclass(frozen=True)
class ColumnSchema:
    name: str
    kind: Kind
    role: Role = "feature"
    dtype: str = "float"  # float, int, string, bool, datetime: what the data held when inferred
    nullable: bool = False
    max_null_rate: float = 0.0
    min: float | None = None
    max: float | None = None
    categories: list[str] | None = None


@dataclass(frozen=True)
class Schema:
    columns: list[ColumnSchema]

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def infer(cls, frame: pd.DataFrame, spec: ProjectSpec) -> "Schema":
        """Learn a schema from one frame (for data that arrives in batches, see `layout` + `from_stats`)."""
        layout = cls.layout(frame, spec)
        stats = DatasetStats({c.name: c.kind for c in layout.columns})
        stats.update(layout.conform(frame)[0])
        return layout.from_stats(stats)

    @classmethod
    def layout(cls, frame: pd.DataFrame, spec: ProjectSpec) -> "Schema":
        """Kinds, roles and dtypes from a sample of the data (e.g. its first batch), no ranges yet."""
        data = spec.data
        if frame.empty:
            raise DataError("cannot infer a schema from empty data")
        missing = [c for c in (data.target, data.id, data.timestamp) if c and c not in frame.columns]
        if missing:
            raise DataError(f"columns named in the project file are not in the data: {missing}; "
                            f"the data has {list(frame.columns)}")
        roles: dict[str, Role] = {data.target: "target"}
        if data.id:
            roles[data.id] = "id"
        if data.timestamp:
            roles[data.timestamp] = "timestamp"
        numeric, categorical, datetimes = _feature_kinds(frame, spec, roles)
        columns = []
        for name in frame.columns:
            series = frame[name]
            role = roles.get(name, "feature")
            if role == "timestamp":
                kind: Kind = "datetime"
            elif role == "id":
                kind = "categorical"
            elif role == "target":
                kind = "numeric" if _looks_numeric(series) and series.nunique() > 20 else "categorical"
            elif name in numeric:
                kind = "numeric"
            elif name in categorical:
                kind = "categorical"
            elif name in datetimes:
                kind = "datetime"
            else:
                continue  # excluded column
            columns.append(ColumnSchema(str(name), kind, role, _dtype_name(series, kind), nullable=True,
                                        max_null_rate=1.0))
        return cls(columns)

    def from_stats(self, stats: DatasetStats) -> "Schema":
        """This layout completed with the ranges, domains and null rates of the whole data."""
        columns = []
        for col in self.columns:
            s = stats.columns[col.name]
            dtype = ("int" if s.whole and s.valid else "float") if col.kind == "numeric" else col.dtype
            categories = None
            if col.kind == "categorical" and col.role != "id" and not s.other:
                categories = sorted(s.categories)
            lo, hi = _with_margin(s.min, s.max, dtype) if col.kind == "numeric" else (None, None)
            columns.append(replace(col, dtype=dtype, nullable=s.nulls > 0, max_null_rate=round(s.null_rate, 6),
                                   min=lo, max=hi, categories=categories))
        return Schema(columns)

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "Schema":
        if body.get("format") != SCHEMA_FORMAT:
            raise DataError(f"schema format {body.get('format')!r} is not supported (expected {SCHEMA_FORMAT})")
        return cls([ColumnSchema(**c) for c in body["columns"]])

    def to_dict(self) -> dict[str, Any]:
        return {"format": SCHEMA_FORMAT, "columns": [jsonable(asdict(c)) for c in self.columns]}

    # -- views ----------------------------------------------------------------------------------

    def by_role(self, role: Role) -> list[ColumnSchema]:
        return [c for c in self.columns if c.role == role]

    @cached_property  # a frozen schema: computed once (the service asks on every request)
    def features(self) -> list[ColumnSchema]:
        return self.by_role("feature")

    @cached_property
    def feature_names(self) -> list[str]:
        return [c.name for c in self.features]

    @property
    def target(self) -> ColumnSchema:
        return self.by_role("target")[0]

    @property
    def kinds(self) -> dict[str, str]:
        return {c.name: c.kind for c in self.columns}

    def column(self, name: str) -> ColumnSchema:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    # -- checks ---------------------------------------------------------------------------------

    def validate(self, frame: pd.DataFrame, *, mode: Mode = "dataset") -> ValidationReport:
        """Every anomaly of `frame`; nothing is copied that the checks do not need."""
        return self.check(frame, mode=mode, coerce=False).report

    def conform(self, frame: pd.DataFrame, *, mode: Mode = "dataset") -> tuple[pd.DataFrame, ValidationReport]:
        """`frame` coerced to the schema's types, and every anomaly found on the way.

        mode="dataset" needs every column (target, id and timestamp included); mode="request" needs
        the features only and ignores the other roles when present."""
        checked = self.check(frame, mode=mode, coerce=True)
        return checked.frame, checked.report

    def conform_records(self, records: list[dict[str, Any]]) -> dict[str, np.ndarray] | None:
        """The features of request rows as `conform(mode="request")` would coerce them, when every value
        is plainly of its column's type (numbers for numeric columns, scalars for categorical ones).
        None when any value needs a closer look: the caller then runs `check`, which decides and names
        every problem. A shortcut for well-formed requests, not a second set of rules: each value it
        accepts, `check` accepts too and coerces the same way (tested property by property)."""
        out: dict[str, np.ndarray] = {}
        numbers: list[np.ndarray] = []
        for col in self.features:
            values = [r.get(col.name) for r in records]
            types = set(map(type, values))  # one pass in C; the checks below look at the few types only
            if col.kind == "numeric":
                if not types <= _PLAIN_NUMBERS:
                    return None
                try:  # numpy reads None as NaN, as the full check does
                    array = np.array(values, dtype=np.float64)
                except OverflowError:  # an integer past float's range
                    return None
                numbers.append(array)
            elif col.kind == "categorical":
                if types <= _PLAIN_TEXT:
                    out[col.name] = np.array(values, dtype=object)
                    continue
                if (not types <= _PLAIN_SCALARS
                        or (bool in types and (int in types or float in types))  # pandas counts True as 1
                        or (int in types and any(type(v) is int and abs(v) >= 2**53 for v in values))):
                    return None
                array = np.empty(len(values), dtype=object)
                present = [n for n, v in enumerate(values) if v is not None and v == v]  # v == v: not NaN
                if present:
                    array[present] = _category_strings(np.array([values[n] for n in present], dtype=object))
            else:  # date/times: parsing has too many forms for a shortcut
                return None
            out[col.name] = array
        if numbers and np.isinf(np.concatenate(numbers)).any():  # one check for every numeric column
            return None
        return out

    def check(self, frame: pd.DataFrame, *, mode: Mode = "dataset", coerce: bool = True,
              whole: bool = True) -> Checked:
        """The checks behind `validate` and `conform`. `whole=False` says the frame is one batch of
        many: null rates and duplicate ids are then left to the caller, who sees every batch."""
        report = ValidationReport(rows=len(frame))
        checked = Checked(report)
        if frame.empty:
            report.anomalies.append(Anomaly("*", "empty", "error", 0, "no rows"))
            checked.frame = frame if coerce else None
            return checked
        wanted = self.columns if mode == "dataset" else self.features
        known = {c.name for c in self.columns}
        for name in frame.columns:
            if name not in known:
                report.anomalies.append(Anomaly(str(name), "unexpected_column", "warning", len(frame),
                                                "not in the schema; ignored"))
        out: dict[str, pd.Series] = {}
        for col in wanted:
            if col.name not in frame.columns:
                report.anomalies.append(Anomaly(col.name, "missing_column", "error", len(frame),
                                                f"required {col.kind} column is missing"))
                continue
            result = _check_column(col, frame[col.name], checked, whole and mode == "dataset", coerce)
            if coerce:
                out[col.name] = result
        if coerce:
            checked.frame = pd.DataFrame(out, index=frame.index)
        if mode == "dataset" and whole:
            for col in self.by_role("id"):
                if col.name in frame.columns:
                    ids = frame[col.name]
                    dup = ids.duplicated(keep="first").to_numpy() & ids.notna().to_numpy()
                    if dup.any():
                        _add(checked, col.name, "duplicate_id", "warning", dup, ids, "duplicate ids")
        if checked.reasons:
            bad = np.zeros(len(frame), dtype=bool)
            for mask, _, _ in checked.reasons:
                bad |= mask
            checked.bad_rows = bad
        return checked


# -- inference helpers ----------------------------------------------------------------------------


def _with_margin(lo: float | None, hi: float | None, dtype: str) -> tuple[float | None, float | None]:
    """The observed range widened by RANGE_MARGIN of its span on each side (not below zero for data that
    never was negative): a larger sample's natural extremes are not anomalies, impossible values are."""
    if lo is None or hi is None:
        return lo, hi
    span = (hi - lo) * RANGE_MARGIN
    new_lo, new_hi = lo - span, hi + span
    if lo >= 0:
        new_lo = max(new_lo, 0.0)
    if dtype == "int":
        new_lo, new_hi = float(np.floor(new_lo)), float(np.ceil(new_hi))
    return float(new_lo), float(new_hi)


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _looks_numeric(series: pd.Series) -> bool:
    """Numeric dtype, or text of which nearly all values parse as numbers (a CSV column with a few bad cells)."""
    if _is_numeric(series):
        return True
    if pd.api.types.is_bool_dtype(series) or pd.api.types.is_datetime64_any_dtype(series):
        return False
    present = series.dropna()
    if present.empty:
        return False
    parsed = _to_float(present.astype(str) if present.dtype == object else present)
    return bool(parsed.notna().mean() >= 0.95)


def _dtype_name(series: pd.Series, kind: Kind) -> str:
    if kind == "datetime":
        return "datetime"
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if kind == "numeric":
        return "int" if pd.api.types.is_integer_dtype(series) else "float"
    return "string"


def _feature_kinds(frame: pd.DataFrame, spec: ProjectSpec,
                   roles: dict[str, Role]) -> tuple[set[str], set[str], set[str]]:
    feats = spec.features
    explicit = (feats.numeric or []) + (feats.categorical or []) + (feats.datetime or [])
    absent = [c for c in explicit if c not in frame.columns]
    if absent:
        raise DataError(f"features named in the project file are not in the data: {absent}")
    numeric = set(feats.numeric or [])
    categorical = set(feats.categorical or [])
    datetimes = set(feats.datetime or [])
    if feats.numeric is not None or feats.categorical is not None or feats.datetime is not None:
        return numeric, categorical, datetimes
    for name in frame.columns:
        if name in roles or name in feats.exclude:
            continue
        series = frame[name]
        if _looks_numeric(series):
            numeric.add(name)
        elif pd.api.types.is_datetime64_any_dtype(series):
            datetimes.add(name)
        else:
            distinct = series.nunique(dropna=True)
            # Free text and identifiers (nearly one value per row) carry no reusable signal.
            if distinct <= MAX_DOMAIN and distinct <= max(20, 0.5 * len(series)):
                categorical.add(name)
    return numeric, categorical, datetimes


# -- conversion helpers ---------------------------------------------------------------------------


def _to_float(series: pd.Series) -> pd.Series:
    """Numbers as float64; anything that is not a number becomes NaN (ints too large for a float become inf)."""
    if _is_numeric(series):
        return series.astype("float64")
    try:
        return pd.to_numeric(series, errors="coerce").astype("float64")
    except (OverflowError, TypeError, ValueError):
        return series.map(_one_float).astype("float64")


def _one_float(value: object) -> float:
    if isinstance(value, (bool, np.bool_)) or value is None:
        return np.nan
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:
        return np.inf if str(value).strip()[:1] != "-" else -np.inf
    except (TypeError, ValueError):
        return np.nan


def _category_strings(values: np.ndarray) -> np.ndarray:
    """Distinct raw values as category strings: 1, 1.0 (from a CSV) and '1' are one category."""
    out = np.empty(len(values), dtype=object)
    for n, v in enumerate(values):
        if isinstance(v, (float, np.floating)) and np.isfinite(v) and abs(v) < 2**53 and v == int(v):
            out[n] = str(int(v))
        elif isinstance(v, (bool, np.bool_)):
            out[n] = str(bool(v))
        else:
            out[n] = str(v)
    return out


def _parse_datetimes(series: pd.Series) -> pd.Series:
    """UTC timestamps at microsecond resolution, however they arrived (so equal data hashes equal)."""
    if pd.api.types.is_datetime64_any_dtype(series):
        parsed = series.dt.tz_localize("UTC") if series.dt.tz is None else series.dt.tz_convert("UTC")
    else:
        try:
            parsed = pd.to_datetime(series, utc=True, format="ISO8601")
        except (ValueError, TypeError, OverflowError):
            parsed = pd.to_datetime(series, errors="coerce", utc=True, format="mixed")
    return parsed.dt.as_unit("us")


# -- the checks -----------------------------------------------------------------------------------


def _check_column(col: ColumnSchema, series: pd.Series, checked: Checked, null_rates: bool,
                  coerce: bool) -> pd.Series | None:
    if col.kind == "numeric":
        result, nulls = _check_numeric(col, series, checked)
    elif col.kind == "datetime":
        result = _parse_datetimes(series)
        nulls = series.isna().to_numpy()
        _add(checked, col.name, "type_mismatch", "error", result.isna().to_numpy() & ~nulls, series,
             "values are not dates or times")
    else:
        result, nulls = _check_categorical(col, series, checked, coerce)
    _check_nulls(col, series, nulls, checked, null_rates)
    return result if coerce else None


def _check_numeric(col: ColumnSchema, series: pd.Series, checked: Checked) -> tuple[pd.Series, np.ndarray]:
    text = _arrow_text(series)
    if text is not None:  # Arrow-backed text (a CSV read as text, pandas' str dtype): parse in Arrow
        parsed = _parse_numbers(text)
        values = parsed.to_numpy(zero_copy_only=False)
        nulls = text.is_null().to_numpy(zero_copy_only=False)
        _add(checked, col.name, "type_mismatch", "error", np.isnan(values) & ~nulls, series, "values are not numbers")
        result = pd.Series(values, index=series.index, copy=False)
    elif _is_numeric(series):
        values = series.to_numpy(dtype="float64", na_value=np.nan)
        nulls = np.isnan(values)
        result = pd.Series(values, index=series.index, copy=False)
    else:
        # Text or mixed objects: what parses is a number, the rest is a type mismatch.
        raw_nulls = series.isna().to_numpy()
        result = _to_float(series)
        values = result.to_numpy()
        is_bool = _bools(series, values, raw_nulls)
        if is_bool.any():  # True is not the number 1
            values = np.where(is_bool, np.nan, values)
            result = pd.Series(values, index=series.index)
        bad = (np.isnan(values) & ~raw_nulls) | is_bool
        _add(checked, col.name, "type_mismatch", "error", bad, series, "values are not numbers")
        nulls = raw_nulls
    lo, hi = _finite_range(values)
    if lo is None:
        return result, nulls
    if not (np.isfinite(lo) and np.isfinite(hi)):
        _add(checked, col.name, "type_mismatch", "error", np.isinf(values), series, "values are infinite")
    if col.min is not None and lo < col.min:
        _add(checked, col.name, "out_of_range", "warning", (values < col.min) & np.isfinite(values), series,
             f"values below the schema's minimum {col.min:g}")
    if col.max is not None and hi > col.max:
        _add(checked, col.name, "out_of_range", "warning", (values > col.max) & np.isfinite(values), series,
             f"values above the schema's maximum {col.max:g}")
    return result, nulls


NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"


def _arrow_text(series: pd.Series) -> pa.ChunkedArray | None:
    """The Arrow string data behind a pandas str/Arrow-string column, without a copy; None otherwise."""
    if not isinstance(series.dtype, (pd.StringDtype, pd.ArrowDtype)):
        return None
    to_arrow = getattr(series.array, "__arrow_array__", None)
    if to_arrow is None:
        return None
    data = to_arrow()
    if isinstance(data, pa.Array):
        data = pa.chunked_array([data])
    return data if pa.types.is_string(data.type) or pa.types.is_large_string(data.type) else None


def _parse_numbers(text: pa.ChunkedArray) -> pa.ChunkedArray:
    """Text to float64; what is not a number becomes null. One cast when every cell parses, else
    a regular expression picks the cells that do (both run in Arrow's C++)."""
    try:
        return pc.cast(text, pa.float64())
    except pa.ArrowInvalid:
        trimmed = pc.utf8_trim_whitespace(text)
        numeric = pc.match_substring_regex(trimmed, NUMBER)
        return pc.cast(pc.if_else(numeric, trimmed, pa.scalar(None, trimmed.type)), pa.float64())


def _bools(series: pd.Series, values: np.ndarray, nulls: np.ndarray) -> np.ndarray:
    """Which rows hold booleans; only rows that parsed as 0 or 1 need a look."""
    if pd.api.types.is_bool_dtype(series):
        return ~nulls
    out = np.zeros(len(series), dtype=bool)
    if series.dtype == object:
        candidates = np.flatnonzero((values == 0) | (values == 1))
        if len(candidates):
            objects = series.to_numpy(dtype=object)[candidates]
            out[candidates] = [isinstance(v, (bool, np.bool_)) for v in objects]
    return out


def _finite_range(values: np.ndarray) -> tuple[float | None, float | None]:
    """min and max ignoring NaN (fmin/fmax skip NaN without a warning); None when nothing is there."""
    if not len(values):
        return None, None
    lo, hi = np.fmin.reduce(values), np.fmax.reduce(values)
    return (None, None) if np.isnan(lo) else (float(lo), float(hi))


def _check_categorical(col: ColumnSchema, series: pd.Series, checked: Checked,
                       coerce: bool) -> tuple[pd.Series | None, np.ndarray]:
    text = _arrow_text(series)
    if text is not None:  # Arrow-backed text: check the domain in Arrow, keep the column as it is
        nulls = text.is_null().to_numpy(zero_copy_only=False)
        if col.categories is not None:
            known = pc.is_in(text, value_set=pa.array(col.categories, type=text.type))
            if (pc.sum(known).as_py() or 0) < len(text) - text.null_count:
                unseen = ~known.to_numpy(zero_copy_only=False) & ~nulls
                _add(checked, col.name, "unseen_category", "warning", unseen, series,
                     f"categories not seen in training (known: {_short(col.categories)})")
        return (series if coerce else None), nulls
    if series.dtype == object:
        unhashable = series.map(lambda v: isinstance(v, (list, dict, set))).to_numpy()
        if unhashable.any():
            _add(checked, col.name, "type_mismatch", "error", unhashable, series,
                 "values are lists or objects, not categories")
            series = series.where(~unhashable)
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    nulls = codes < 0
    strings = _category_strings(np.asarray(uniques, dtype=object))
    if col.categories is not None and len(strings):
        unseen = ~np.isin(strings, col.categories)
        if unseen.any():
            _add(checked, col.name, "unseen_category", "warning", np.isin(codes, np.flatnonzero(unseen)), series,
                 f"categories not seen in training (known: {_short(col.categories)})")
    if not coerce:
        return None, nulls
    lookup = np.append(strings, None)  # code -1 (missing) reads the trailing None
    return pd.Series(lookup[codes], index=series.index, dtype=object), nulls


def _check_nulls(col: ColumnSchema, series: pd.Series, nulls: np.ndarray, checked: Checked, null_rates: bool) -> None:
    count = int(nulls.sum())
    if not count:
        return
    if col.role == "target":
        _add(checked, col.name, "missing_label", "error", nulls, series, "missing labels")
    elif col.role in ("id", "timestamp"):
        _add(checked, col.name, "null_values", "error", nulls, series, f"missing {col.role} values")
    elif not col.nullable:
        _add(checked, col.name, "null_values", "warning", nulls, series,
             "missing values in a column the schema has none in")
    elif null_rates and null_rate_too_high(col, count / len(nulls)):
        _add(checked, col.name, "null_rate", "warning", nulls, series, null_rate_message(col, count / len(nulls)))


def null_rate_too_high(col: ColumnSchema, rate: float) -> bool:
    return col.nullable and rate > col.max_null_rate + NULL_RATE_SLACK


def null_rate_message(col: ColumnSchema, rate: float) -> str:
    return f"missing values: {rate:.1%} of rows, above the schema's {col.max_null_rate:.1%}"


def _add(checked: Checked, column: str, kind: str, severity: Severity, mask: np.ndarray,
         original: pd.Series, message: str) -> None:
    mask = np.asarray(mask, dtype=bool)
    count = int(mask.sum())
    if not count:
        return
    positions = np.flatnonzero(mask)[:EXAMPLES]
    values = [jsonable(original.iloc[p]) for p in positions]
    checked.report.anomalies.append(Anomaly(column, kind, severity, count, f"{count} {message}",
                                            [int(p) for p in positions], values))
    if severity == "error":
        checked.reasons.append((mask, column, message))


def _stem(message: str) -> str:
    """The message without its leading count, to match anomalies across batches."""
    head, _, rest = message.partition(" ")
    return rest if head.isdigit() else message


def _short(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")
