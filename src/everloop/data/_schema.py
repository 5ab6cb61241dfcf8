"""The data schema: inferred once from data, then every file and every request is conformed to it.

`Schema.infer(frame, spec)` learns column kinds, roles, nullability, numeric ranges and categorical
domains. `schema.conform(frame)` coerces a frame to those kinds and reports every anomaly it finds
(not only the first), each with its column, count, example rows and severity. Ingest and the HTTP
service both call `conform`, so a row is judged the same way wherever it enters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from everloop._jsonable import jsonable
from everloop.errors import DataError
from everloop.spec import ProjectSpec

SCHEMA_FORMAT = 1
MAX_DOMAIN = 1000  # a categorical column with more distinct values gets no domain check
EXAMPLES = 3

Kind = Literal["numeric", "categorical", "datetime"]
Role = Literal["feature", "target", "id", "timestamp"]
Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Anomaly:
    column: str
    kind: str  # missing_column, type_mismatch, null_values, out_of_range, unseen_category, ...
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


@dataclass(frozen=True)
class ColumnSchema:
    name: str
    kind: Kind
    role: Role = "feature"
    nullable: bool = False
    min: float | None = None
    max: float | None = None
    categories: list[str] | None = None


@dataclass(frozen=True)
class Schema:
    columns: list[ColumnSchema]

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def infer(cls, frame: pd.DataFrame, spec: ProjectSpec) -> "Schema":
        """Learn a schema from a frame, using the spec's roles and any explicit feature lists."""
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
        numeric, categorical = _feature_kinds(frame, spec, roles)
        columns = []
        for name in frame.columns:
            series = frame[name]
            role = roles.get(name, "feature")
            if role == "timestamp":
                kind: Kind = "datetime"
            elif role == "id":
                kind = "categorical"
            elif role == "target":
                kind = "numeric" if _is_numeric(series) and series.nunique() > 20 else "categorical"
            elif name in numeric:
                kind = "numeric"
            elif name in categorical:
                kind = "categorical"
            else:
                continue  # excluded column
            columns.append(_infer_column(name, kind, role, series))
        return cls(columns)

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

    @property
    def features(self) -> list[ColumnSchema]:
        return self.by_role("feature")

    @property
    def feature_names(self) -> list[str]:
        return [c.name for c in self.features]

    @property
    def target(self) -> ColumnSchema:
        return self.by_role("target")[0]

    def column(self, name: str) -> ColumnSchema:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    # -- validation -----------------------------------------------------------------------------

    def conform(self, frame: pd.DataFrame, *, mode: Literal["dataset", "request"] = "dataset") -> tuple[pd.DataFrame, ValidationReport]:
        """Coerce `frame` to the schema and report every anomaly.

        mode="dataset" needs every column (target, id and timestamp included); mode="request" needs
        the features only and ignores the other roles when present.
        """
        report = ValidationReport(rows=len(frame))
        if frame.empty:
            report.anomalies.append(Anomaly("*", "empty", "error", 0, "no rows"))
            return frame, report
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
            out[col.name] = _conform_column(col, frame[col.name], report)
        conformed = pd.DataFrame(out, index=frame.index)
        if mode == "dataset":
            for col in self.by_role("id"):
                if col.name in conformed:
                    dup = conformed[col.name].duplicated(keep="first") & conformed[col.name].notna()
                    _add(report, col.name, "duplicate_id", "warning", dup, conformed[col.name], "duplicate ids")
        return conformed, report


# -- helpers --------------------------------------------------------------------------------------


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _feature_kinds(frame: pd.DataFrame, spec: ProjectSpec, roles: dict[str, Role]) -> tuple[set[str], set[str]]:
    feats = spec.features
    explicit = (feats.numeric or []) + (feats.categorical or [])
    absent = [c for c in explicit if c not in frame.columns]
    if absent:
        raise DataError(f"features named in the project file are not in the data: {absent}")
    numeric = set(feats.numeric or [])
    categorical = set(feats.categorical or [])
    if feats.numeric is not None or feats.categorical is not None:
        return numeric, categorical
    for name in frame.columns:
        if name in roles or name in feats.exclude:
            continue
        series = frame[name]
        if _is_numeric(series):
            numeric.add(name)
        elif pd.api.types.is_datetime64_any_dtype(series):
            continue  # datetime features come with issue-level support; skipped for now
        else:
            distinct = series.nunique(dropna=True)
            # Free text and identifiers (nearly one value per row) carry no reusable signal.
            if distinct <= MAX_DOMAIN and distinct <= max(20, 0.5 * len(series)):
                categorical.add(name)
    return numeric, categorical


def _infer_column(name: str, kind: Kind, role: Role, series: pd.Series) -> ColumnSchema:
    nullable = bool(series.isna().any())
    if kind == "numeric":
        values = pd.to_numeric(series, errors="coerce")
        return ColumnSchema(name, kind, role, nullable, _finite(values.min()), _finite(values.max()))
    if kind == "categorical" and role != "id":
        domain = _as_category(series).dropna().unique()
        categories = sorted(map(str, domain)) if len(domain) <= MAX_DOMAIN else None
        return ColumnSchema(name, kind, role, nullable, categories=categories)
    return ColumnSchema(name, kind, role, nullable)


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def _as_category(series: pd.Series) -> pd.Series:
    """Categorical values as Python strings (None for missing), so 1, 1.0 (from a CSV) and '1' are one category."""
    mask = series.isna().to_numpy()
    if pd.api.types.is_float_dtype(series):
        values = series.to_numpy(dtype=float)
        whole = np.isfinite(values) & (np.abs(values) < 2**53)
        whole[whole] = values[whole] == np.round(values[whole])
        strings = pd.Series([str(int(v)) if w else str(v) for v, w in zip(values, whole)], index=series.index,
                            dtype=object)
    else:
        strings = series.astype(object).map(str)
    strings[mask] = None
    return strings


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


def _conform_column(col: ColumnSchema, series: pd.Series, report: ValidationReport) -> pd.Series:
    was_null = series.isna()
    if col.kind == "numeric":
        if pd.api.types.is_bool_dtype(series) or (series.dtype == object and series.map(type).eq(bool).any()):
            bad = series.map(lambda v: isinstance(v, (bool, np.bool_)))
            values = _to_float(series.where(~bad))
            bad = bad | (values.isna() & ~was_null)
        else:
            values = _to_float(series)
            bad = values.isna() & ~was_null
        _add(report, col.name, "type_mismatch", "error", bad, series, "values are not numbers")
        infinite = np.isinf(values)
        _add(report, col.name, "type_mismatch", "error", infinite, series, "values are infinite")
        if col.min is not None:
            _add(report, col.name, "out_of_range", "warning", values < col.min, series,
                 f"values below the schema's minimum {col.min:g}")
        if col.max is not None:
            _add(report, col.name, "out_of_range", "warning", values > col.max, series,
                 f"values above the schema's maximum {col.max:g}")
        result = values
    elif col.kind == "datetime":
        result = pd.to_datetime(series, errors="coerce", utc=True, format="mixed")
        _add(report, col.name, "type_mismatch", "error", result.isna() & ~was_null, series,
             "values are not dates or times")
    else:
        bad = series.map(lambda v: isinstance(v, (list, dict)))
        _add(report, col.name, "type_mismatch", "error", bad, series, "values are lists or objects, not categories")
        result = _as_category(series.where(~bad))
        if col.categories is not None:
            unseen = result.notna() & ~result.isin(col.categories)
            _add(report, col.name, "unseen_category", "warning", unseen, series,
                 f"categories not seen in training (known: {_short(col.categories)})")
    if not col.nullable or col.role in ("target", "id"):
        severity: Severity = "error" if col.role in ("target", "id", "timestamp") else "warning"
        what = "missing labels" if col.role == "target" else "missing values in a column the schema has none in"
        _add(report, col.name, "missing_label" if col.role == "target" else "null_values", severity,
             was_null, series, what)
    return result


def _add(report: ValidationReport, column: str, kind: str, severity: Severity, mask: pd.Series,
         original: pd.Series, message: str) -> None:
    mask_array = np.asarray(mask, dtype=bool)
    count = int(mask_array.sum())
    if not count:
        return
    positions = np.flatnonzero(mask_array)[:EXAMPLES]
    values = [jsonable(original.iloc[p]) for p in positions]
    report.anomalies.append(Anomaly(column, kind, severity, count, f"{count} {message}",
                                    [int(p) for p in positions], values))


def _short(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")
