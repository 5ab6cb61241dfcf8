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

import datetime as dt
import re
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from everloop._jsonable import jsonable
from everloop.data._stats import MAX_TRACKED_CATEGORIES, DatasetStats, epoch_seconds
from everloop.errors import DataError
from everloop.spec import ProjectSpec

SCHEMA_FORMAT = 1
MAX_DOMAIN = MAX_TRACKED_CATEGORIES  # a categorical column with more distinct values gets no domain check
EXAMPLES = 3
NULL_RATE_SLACK = 0.01  # a column's null rate may exceed the schema's by this much before it is reported
RANGE_MARGIN = 0.25  # inferred ranges are widened by this share of their span on each side

# -- how values are written (the reading rules of docs/data.md, "Types and spellings") -------------------
NUMERIC_SHARE = 0.95  # text is numbers (or dates) when this share of its values parse; the rest are errors
LEADING_ZERO = r"^[+-]?0\d"  # `007`, `01234`: a code, always text
ISO_DATETIME = (r"^\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?)?\s*"
                r"(?:[Zz]|[+-]\d{2}(?::?\d{2})?)?$")
# Text that means true or false (compared in lower case). A column is bool when all its values are these
# and both values occur; it then takes the spellings its data used, and no others.
BOOL_SPELLINGS = {"true": True, "false": False, "yes": True, "no": False, "t": True, "f": False,
                  "y": True, "n": False}
# Numbers written with group separators or a decimal comma: the format's name (an example of it) ->
# (the group separator characters, the decimal mark). Plain numbers (`1234.5`, `1e3`) need none. When
# the data fit several equally (`3,5` fits 1234,5 and 1.234,5), the first listed wins; `1,234` alone
# (three digits after one comma, every value) reads as a thousand and more, as in English-language data.
_SPACES = " \u00a0\u202f"  # a space, a no-break space, a narrow no-break space
NUMBER_FORMATS = {"1,234.5": (",", "."), "1234,5": ("", ","), "1.234,5": (".", ","), "1 234,5": (_SPACES, ","),
                  "1 234.5": (_SPACES, "."), "1'234.5": ("'\u2019", ".")}


def _format_pattern(groups: str, decimal: str) -> str:
    """A value in one of NUMBER_FORMATS: digits grouped by threes (or not grouped at all), then decimals."""
    whole = rf"\d{{1,3}}(?:[{re.escape(groups)}]\d{{3}})+|\d+" if groups else r"\d+"
    return rf"^[+-]?(?:{whole})(?:{re.escape(decimal)}\d+)?$"


_FORMATS = {name: (groups, decimal, _format_pattern(groups, decimal)) for name, (groups, decimal)
            in NUMBER_FORMATS.items()}
# One value that fits two readings: a dot that is a decimal point or groups thousands (`88.699`), a comma
# that groups thousands or is a decimal comma (`1,234`). A column of only such values is undecided.
_DOT_GROUPED = r"^[+-]?[1-9]\d{0,2}\.\d{3}$"
_COMMA_GROUPED = r"^[+-]?[1-9]\d{0,2},\d{3}$"
EXAMPLE_TIME = "2000-01-01T00:00:00Z"  # the date/time of `Schema.example_row`: any valid instant would do

# Text that means a missing value, in every column of every kind and on every path (a CSV file, a JSON
# value, a CSV body, Parquet text): pyarrow's CSV null values (pandas' read_csv uses them too), spelled
# exactly so (no case folding, no trimming). A column whose first data held one of them as a value (`NA`
# for Namibia in a Parquet column of country codes) lists it under `not_missing`; there it is a value.
NULL_TOKENS = ("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
               "N/A", "NA", "NULL", "NaN", "n/a", "nan", "null")

# Dates written with numbers in another order than ISO 8601 (`31.12.2026`, `12/31/2026`, `2026/12/31`).
# A column takes one order (`date_order`: DMY, MDY or YMD), learned from its first data: day first when
# some first part is above 12, month first when some second part is; when none decides, by the separator
# (a dot or a dash: day first, as in Europe; a slash: month first, as in the US), and the ingest line says
# so. Every later value is read in that order, or refused.
_CLOCK = r"(?:[T ]\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?)?\s*(?:[Zz]|[+-]\d{2}(?::?\d{2})?)?"
_DAY_MONTH = r"^\s*(\d{1,2})([./-])(\d{1,2})\2(\d{4})(" + _CLOCK + r")\s*$"  # DMY or MDY
_YEAR_FIRST = r"^\s*(\d{4})([./])(\d{1,2})\2(\d{1,2})(" + _CLOCK + r")\s*$"  # YMD (`-`: ISO 8601 itself)
DATE_ORDERS = {"DMY": "day first", "MDY": "month first", "YMD": "year first"}
DATE_EXAMPLES = {"DMY": "31.12.2026", "MDY": "12/31/2026", "YMD": "2026/12/31"}
# How far a date/time may lie outside the first data's range before it is out of range: a quarter of the
# span (as numbers), but at least a year before and ten years after, for data arrives after training.
_YEAR_SECONDS = 365.25 * 86400
TIME_MARGIN_BEFORE = 1 * _YEAR_SECONDS
TIME_MARGIN_AFTER = 10 * _YEAR_SECONDS

_PLAIN_NUMBERS = {int, float, type(None)}  # what `conform_records` takes as is (bool is not an int here)
_PLAIN_TEXT = {str, type(None)}
_PLAIN_SCALARS = {str, int, float, bool, type(None)}
_BOOL_PLAIN = {bool, str}
_BOOL_NULLABLE = {bool, str, type(None)}

Kind = Literal["numeric", "categorical", "datetime"]
Role = Literal["feature", "target", "id", "timestamp"]
Severity = Literal["error", "warning"]
Mode = Literal["dataset", "request"]


@dataclass(frozen=True)
class Anomaly:
    column: str
    kind: str  # missing_column, unexpected_column, type_mismatch, null_values, null_rate, out_of_range,
    #            unseen_category, duplicate_id, missing_label, empty, number_format, nonexistent_time
    severity: Severity
    count: int
    message: str
    rows: list[int] = field(default_factory=list)  # example row positions (0-based)
    values: list[Any] = field(default_factory=list)  # the offending values at those rows
    categories: list[str] = field(default_factory=list)  # unseen_category: the distinct unseen values

    def describe(self) -> str:
        """One line: `column 'age': 2 values are not numbers (e.g. rows 4, 19): 'forty', '12x'` (rows from 1;
        values that did not read, or were read another way, are named)."""
        where = f" (e.g. rows {', '.join(str(r + 1) for r in self.rows)})" if self.rows else ""
        if self.kind in _NAMES_VALUES and self.values:
            where += ": " + ", ".join(dict.fromkeys(_shown(v) for v in self.values))
        return f"column {self.column!r}: {self.message}{where}"


_NAMES_VALUES = {"type_mismatch", "number_format", "nonexistent_time"}  # lines that name their values


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
        index = {_merge_key(a): n for n, a in enumerate(self.anomalies)}
        for a in other.anomalies:
            key = _merge_key(a)
            shifted = replace(a, rows=[r + offset for r in a.rows])
            if key not in index:
                index[key] = len(self.anomalies)
                self.anomalies.append(shifted)
                continue
            mine = self.anomalies[index[key]]
            count = mine.count + a.count
            if mine.kind == "unseen_category":  # count the distinct categories of every batch, and their rows
                self.anomalies[index[key]] = _merge_unseen(mine, shifted, count)
                continue
            of_columns = mine.kind in ("missing_column", "unexpected_column")  # about columns, not rows
            keep = 0 if of_columns else EXAMPLES - len(mine.rows)
            self.anomalies[index[key]] = replace(
                mine, count=count, message=mine.message if of_columns else f"{count} {_stem(mine.message)}",
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
    # How the values are written (learned by the first ingest; every later read follows it, see docs/data.md):
    true_values: list[str] | None = None  # bool features: the data's spellings of true, the first canonical
    false_values: list[str] | None = None  # ... and of false ("True"/"False" when None)
    number_format: str | None = None  # numeric columns written with separators: a key of NUMBER_FORMATS
    timezone: str | None = None  # datetime columns: the zone of values without an offset (None: UTC)
    date_order: str | None = None  # datetime columns written 31.12.2026 and the like: a key of DATE_ORDERS
    not_missing: list[str] | None = None  # NULL_TOKENS the first data held as values here (`NA`: Namibia)
    # What inference chose where the data did not decide, and how to choose otherwise (shown with the kind;
    # a note, not part of the contract: two schemas that read values alike are equal whatever it says).
    assumed: str | None = field(default=None, compare=False)

    @cached_property
    def null_text(self) -> frozenset[str]:
        """The text that means a missing value in this column: NULL_TOKENS, but for those the column holds
        as values (`not_missing`, or one of its categories); empty text always."""
        kept = set(self.not_missing or ()) | set(self.categories or ())
        return frozenset(t for t in NULL_TOKENS if t == "" or t not in kept)

    @cached_property
    def category_set(self) -> frozenset[str]:
        return frozenset(self.categories or ())

    @cached_property
    def null_text_array(self) -> pa.Array:
        return pa.array(sorted(self.null_text), type=pa.string())

    @cached_property  # frozen: computed once per column (the service asks on every request)
    def bool_lookup(self) -> dict[str, str]:
        """Each spelling of a bool feature, lower case, -> the canonical spelling of its value."""
        trues, falses = self.true_values or ["True"], self.false_values or ["False"]
        spelled = {v.strip().lower(): falses[0] for v in falses}
        return spelled | {v.strip().lower(): trues[0] for v in trues}

    @cached_property
    def bool_spelled(self) -> dict[Any, str]:
        """JSON true/false and each exact spelling of a bool feature -> its canonical spelling (the service's
        shortcut; other cases of a spelling go through `bool_lookup`)."""
        trues, falses = self.true_values or ["True"], self.false_values or ["False"]
        return {v: falses[0] for v in falses} | {v: trues[0] for v in trues} | {True: trues[0], False: falses[0]}

    @property
    def is_bool(self) -> bool:
        """A true/false feature: read by its spellings (`true_values`, `false_values`); the rest refused."""
        return self.kind == "categorical" and self.dtype == "bool" and self.role == "feature"


_LATER_FIELDS = ("date_order", "not_missing", "assumed")


@dataclass(frozen=True)
class ColumnRole:
    """How the schema reads one column of the data, and why: `role` is feature, target, id, timestamp,
    or "ignored" (left out of the schema, with `kind` and `dtype` None); `why` names the project file's
    key that decided it (data.target, features.numeric, ...) or what inference saw."""

    name: str
    role: str
    kind: str | None
    dtype: str | None
    why: str

    def describe(self) -> str:
        """One line: `name: role, kind (dtype); why`."""
        if self.role == "ignored":
            return f"{self.name}: ignored; {self.why}"
        return f"{self.name}: {self.role}, {self.kind} ({self.dtype}); {self.why}"


@dataclass(frozen=True)
class Schema:
    columns: list[ColumnSchema]
    # Columns of the data left out of the schema at inference (excluded, identifiers, free text): name -> why.
    # Known, so a later file that has them is not warned about them.
    ignored: dict[str, str] = field(default_factory=dict)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def infer(cls, frame: pd.DataFrame, spec: ProjectSpec) -> "Schema":
        """Learn a schema from one frame (for data that arrives in batches, see `layout` + `from_stats`).

        Roles come from the project file (data.target, data.id, data.timestamp). A column named under
        features.numeric / categorical / datetime takes that kind and is always a feature; every other
        column (unless excluded, or features.infer_others is false) is inferred: numbers are numeric,
        dates datetime, text and bools categorical, and columns that look like identifiers or free text
        are left out, each with its reason in `Schema.ignored` (see `_inferred_kind`).
        Raises DataError for empty data or a column the project file names that the data lacks."""
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
        numeric, categorical, datetimes, ignored = _feature_kinds(frame, spec, roles)
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
            else:  # left out: `_feature_kinds` said why
                ignored.setdefault(str(name), "not a feature")
                continue
            columns.append(ColumnSchema(str(name), kind, role, nullable=True, max_null_rate=1.0,
                                        **_value_format(series, kind, role)))
        return cls(columns, ignored)

    def from_stats(self, stats: DatasetStats) -> "Schema":
        """This layout completed with the ranges, domains and null rates of the whole data."""
        columns = []
        for col in self.columns:
            s = stats.columns[col.name]
            dtype = ("int" if s.whole and s.valid else "float") if col.kind == "numeric" else col.dtype
            categories = None
            if col.kind == "categorical" and col.role != "id" and not s.other:
                categories = sorted(s.categories)
            lo, hi = (_with_margin(s.min, s.max, dtype) if col.kind == "numeric"
                      else _time_margin(s.min, s.max) if col.kind == "datetime" else (None, None))
            columns.append(replace(col, dtype=dtype, nullable=s.nulls > 0, max_null_rate=round(s.null_rate, 6),
                                   min=lo, max=hi, categories=categories))
        return Schema(columns, dict(self.ignored))

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "Schema":
        if body.get("format") != SCHEMA_FORMAT:
            raise DataError(f"schema format {body.get('format')!r} is not supported (expected {SCHEMA_FORMAT})")
        return cls([ColumnSchema(**c) for c in body["columns"]], dict(body.get("ignored") or {}))

    def to_dict(self) -> dict[str, Any]:
        # Fields added later only where they are set: a schema that needs none keeps its stored form.
        body: dict[str, Any] = {"format": SCHEMA_FORMAT, "columns": [
            {k: v for k, v in jsonable(asdict(c)).items() if v is not None or k not in _LATER_FIELDS}
            for c in self.columns]}
        if self.ignored:  # only when there are some: schemas stored before it existed keep their form
            body["ignored"] = dict(self.ignored)
        return body

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

    def example_row(self) -> dict[str, Any]:
        """One request row of the features (name -> JSON value), each value of its column's own kind and
        taken from the schema: numbers the middle of the column's range (whole for int columns), bools
        true, categories the first known one, date/times as ISO 8601 text. It passes `check`
        like any good request: the service warms a model up with it and the API docs show it. Date/times
        are the middle of the column's range when the schema has one, else EXAMPLE_TIME."""
        row: dict[str, Any] = {}
        for col in self.features:
            if col.kind == "numeric":
                lo = next((v for v in (col.min, col.max) if v is not None), 0.0)
                hi = col.max if col.max is not None else lo
                middle = (lo + hi) / 2
                row[col.name] = int(round(middle)) if col.dtype == "int" else middle
            elif col.kind == "datetime":  # the middle of the schema's range, when it has one
                middle = (col.min + col.max) / 2 if col.min is not None and col.max is not None else None
                row[col.name] = EXAMPLE_TIME if middle is None else _iso(middle)
            elif col.is_bool:
                row[col.name] = True
            else:
                row[col.name] = col.categories[0] if col.categories else "example"
        return row

    def column(self, name: str) -> ColumnSchema:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def column_roles(self, spec: ProjectSpec) -> list[ColumnRole]:
        """Every column the schema knows, with its role, kind, dtype and why: the schema's columns in
        order, then the ignored ones. `why` names the project file's key when `spec` decided it, else
        what inference saw (read back from the schema: kind and dtype), or the recorded reason."""
        keys = {spec.data.target: "data.target", spec.data.id: "data.id",
                spec.data.timestamp: "data.timestamp"}
        for kind in ("numeric", "categorical", "datetime"):
            keys |= {name: f"features.{kind}" for name in getattr(spec.features, kind) or []}
        out = []
        for col in self.columns:
            named = keys.get(col.name)
            if named and named.startswith("features.") and named != f"features.{col.kind}":
                named = None  # the file was edited after inference: see `spec_conflicts`
            why = f"{named} in the project file" if named else f"inferred: {_kind_evidence(col)}"
            out.append(ColumnRole(col.name, col.role, col.kind, col.dtype, why))
        out += [ColumnRole(name, "ignored", None, None, why) for name, why in self.ignored.items()]
        return out

    def spec_conflicts(self, spec: ProjectSpec) -> list[str]:
        """Where the project file's `features` section and this schema disagree (the file was edited after
        the schema was inferred; the schema, the contract, wins until it is changed): one line each."""
        lines = []
        features = {c.name: c for c in self.features}
        for kind in ("numeric", "categorical", "datetime"):
            for name in getattr(spec.features, kind) or []:
                col = features.get(name)
                if col is None:
                    why = self.ignored.get(name, "not in the schema")
                    lines.append(f"features.{kind} names {name!r}, which the schema leaves out ({why})")
                elif col.kind != kind:
                    lines.append(f"features.{kind} names {name!r}, which the schema reads as {col.kind}")
        lines += [f"features.exclude names {name!r}, which the schema uses as a feature"
                  for name in spec.features.exclude if name in features]
        return lines

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
            elif col.is_bool:  # JSON true/false and the column's spellings; null only where training had some
                if not types <= (_BOOL_NULLABLE if col.nullable else _BOOL_PLAIN):  # no ints: True == 1
                    return None
                spelled = col.bool_spelled
                found = [spelled.get(v) for v in values]  # bools and exact spellings: one lookup each
                if None in found:  # nulls, and spellings in another case (" YES")
                    for n, v in enumerate(values):
                        if found[n] is None and v is not None:
                            found[n] = col.bool_lookup.get(v.strip().lower()) if type(v) is str else None
                            if found[n] is None:
                                return None  # not a spelling of this column: the full check names it
                array = np.array(found, dtype=object)
            elif col.kind == "categorical":
                missing = col.null_text  # text meaning a missing value ("", "NA", ...): None, as in `check`
                if str in types and types <= _PLAIN_SCALARS:
                    if not missing.isdisjoint(values):
                        values = [None if type(v) is str and v in missing else v for v in values]
                    if col.categories is not None and any(type(v) is str and re.match(WHOLE_NUMBER_TEXT, v)
                                                          for v in set(values) - col.category_set):
                        return None  # `3.0` for the category 3: the full check reads it
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
              whole: bool = True, per_value: bool = False) -> Checked:
        """The checks behind `validate` and `conform`. `whole=False` says the frame is one batch of
        many: null rates and duplicate ids are then left to the caller, who sees every batch.
        `per_value=True` (the service: one model call holds many clients' rows) reads each value on its
        own where a file's batch would be read as a whole (see `_check_numeric`)."""
        report = ValidationReport(rows=len(frame))
        checked = Checked(report)
        if frame.empty:
            report.anomalies.append(Anomaly("*", "empty", "error", 0, "no rows"))
            checked.frame = frame if coerce else None
            return checked
        wanted = self.columns if mode == "dataset" else self.features
        # Columns the schema left out on purpose (excluded, identifiers) are known: no warning. The rest:
        # one line naming them all.
        known = {c.name for c in self.columns} | self.ignored.keys()
        unknown = [str(name) for name in frame.columns if name not in known]
        if unknown:
            report.anomalies.append(Anomaly(
                ", ".join(unknown), "unexpected_column", "warning", len(frame),
                "not in the schema; ignored" if len(unknown) == 1 else "columns not in the schema; ignored",
                values=unknown))
        out: dict[str, pd.Series] = {}
        for col in wanted:
            if col.name not in frame.columns:
                report.anomalies.append(Anomaly(col.name, "missing_column", "error", len(frame),
                                                f"required {col.kind} column is missing"))
                continue
            result = _check_column(col, frame[col.name], checked, whole and mode == "dataset", coerce,
                                   per_value=per_value)
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
    """Numeric dtype, or text of which nearly all values are numbers (a CSV column with a few bad cells),
    written plainly or all in one of NUMBER_FORMATS; never text with leading zeros (see `_numeric_reading`)."""
    return _numeric_reading(series)[0]


def _present(series: pd.Series) -> pd.Series:
    """The values of a column that are there: neither null nor text meaning missing (NULL_TOKENS, which a
    Parquet file or a frame may hold as text where a CSV file has nulls)."""
    present = series.dropna()
    if present.dtype == object or isinstance(present.dtype, (pd.StringDtype, pd.ArrowDtype)):
        present = present[~present.isin(NULL_TOKENS)]
    return present


def _present_text(series: pd.Series) -> pd.Series | None:
    """A text column's present values, trimmed; None for a column that is not all text."""
    if _is_numeric(series) or pd.api.types.is_bool_dtype(series) \
            or pd.api.types.is_datetime64_any_dtype(series):
        return None
    present = _present(series)
    if present.dtype == object and not all(isinstance(v, str) for v in present):
        return None
    return present.astype(str).str.strip()


def _numeric_reading(series: pd.Series) -> tuple[bool, str | None]:
    """(whether the column holds numbers, the key of NUMBER_FORMATS they are written in, or None: plainly).

    Text is numbers when at least NUMERIC_SHARE of its present values parse, plainly (`1234.5`, `1e3`) or
    else in the one format of NUMBER_FORMATS that parses the most of them (`1,234.5`; `1.234,5`). Text
    with a leading zero (`007`, `01234`: postal and product codes) is never numbers: read through a float,
    the code would lose its zeros, and `01234` and `1234` would become one value."""
    if _is_numeric(series):
        return True, None
    if pd.api.types.is_bool_dtype(series) or pd.api.types.is_datetime64_any_dtype(series):
        return False, None
    present = _present(series)
    if present.empty:
        return False, None
    if present.dtype == object and not all(isinstance(v, str) for v in present):
        parsed = _to_float(present)  # objects from a frame: numbers and text mixed
        return bool(parsed.notna().mean() >= NUMERIC_SHARE), None
    text = present.astype(str).str.strip()
    if text.str.contains(r"\d").mean() < NUMERIC_SHARE or text.str.match(LEADING_ZERO).any():
        return False, None
    share, best = _number_share(text)
    return (True, best) if share >= NUMERIC_SHARE else (False, None)


def _number_share(text: pd.Series) -> tuple[float, str | None]:
    """(the share of `text` that is numbers, the key of NUMBER_FORMATS they are written in or None: plainly).
    Plain numbers when NUMERIC_SHARE of them are; else the format that parses the most (numbers written in
    more than one way, 1,234.5 beside 1.234,5: the most common way, and the others are errors naming it)."""
    plain = _to_float(text).notna()
    if plain.mean() >= NUMERIC_SHARE:
        return float(plain.mean()), None
    best, share, written = None, 0.0, plain.to_numpy()
    for name, (_, _, pattern) in _FORMATS.items():
        matched = text.str.match(pattern).to_numpy(dtype=bool)
        written = written | matched
        if matched.mean() > share:
            best, share = name, float(matched.mean())
    return float(written.mean()), best


def _number_doubt(text: pd.Series, number_format: str | None) -> str | None:
    """What inference assumed when every number written with a separator fits two readings and no value
    decides: `88.699` (a decimal point, or a dot grouping thousands: 88699) where no value has two dots, a
    comma, or four digits before a dot or without one; `1,234` (grouped thousands, or a decimal comma)
    where no value has a dot or two commas. None when the values decide."""
    accept = "for this column in schema.yaml and run 'everloop schema accept'"
    if number_format is None:
        dotted = text[text.str.contains(".", regex=False)]
        if dotted.empty or not dotted.str.match(_DOT_GROUPED).all() or text.str.contains(r"[eE,]").any() \
                or text[~text.index.isin(dotted.index)].str.match(r"^[+-]?\d{4,}$").any():
            return None
        example = dotted.iloc[0]
        return (f"no value decides whether a dot is a decimal point or groups thousands ({example!r}): read "
                f"as a decimal point ({example} = {float(example):g}); if the dots group thousands, set "
                f"number_format: '1.234,5' {accept}")
    if number_format == "1,234.5":
        commas = text[text.str.contains(",", regex=False)]
        if commas.empty or not commas.str.match(_COMMA_GROUPED).all() \
                or text.str.contains(".", regex=False).any():
            return None
        example = commas.iloc[0]
        return (f"no value decides whether a comma groups thousands or is a decimal comma ({example!r}): "
                f"read as grouping thousands ({example} = {float(example.replace(',', '')):g}); if it is a "
                f"decimal comma, set number_format: '1234,5' {accept}")
    return None


def _not_numbers(text: pd.Series) -> str | None:
    """For text that is mostly numbers (at least half of it) but not enough to be read as numbers, which
    values are not: "12 of 200 values are not numbers: '-' (10 rows), '?' (2 rows)"; None otherwise.
    A lone `-`, `?` or `.` is not taken for a missing value: in a spreadsheet a dash shows a zero as often
    as a gap, so the user decides (an empty cell, or NA, is missing everywhere)."""
    if text.empty or text.str.match(LEADING_ZERO).any():
        return None
    share, number_format = _number_share(text)
    if not 0.5 <= share < NUMERIC_SHARE:
        return None
    pattern = _FORMATS[number_format][2] if number_format else None
    numbers = _to_float(text).notna() | (text.str.match(pattern) if pattern else False)
    others = text[~numbers.to_numpy(dtype=bool)]
    counts = others.value_counts().head(3)
    named = ", ".join(f"{v!r} ({n} {'row' if n == 1 else 'rows'})" for v, n in counts.items())
    more = ", ..." if others.nunique() > 3 else ""
    return f"{len(others)} of {len(text)} values are not numbers: {named}{more}"


def _date_order(text: pd.Series) -> tuple[str | None, str | None]:
    """(the order in which a text column writes its dates with numbers, a key of DATE_ORDERS, or None when
    it does not; what was assumed when no value decides, or None). Day first when more values have a first
    part above 12 than a second one (the rest are then errors), month first the other way round; when no
    part is above 12, by the separator (see DATE_ORDERS)."""
    parts = text.str.extract(_DAY_MONTH)
    written = parts[0].notna()
    if not written.any():
        return ("YMD", None) if text.str.match(_YEAR_FIRST).any() else (None, None)
    first, second = parts.loc[written, 0].astype(int), parts.loc[written, 2].astype(int)
    days_first, months_first = int((first > 12).sum()), int((second > 12).sum())
    if days_first or months_first:
        return ("DMY" if days_first >= months_first else "MDY"), None
    separator = parts.loc[written, 1].mode().iloc[0]
    order, other = ("MDY", "DMY") if separator == "/" else ("DMY", "MDY")
    example = text[written].iloc[0]
    read = _iso_dates(pd.Series([example]), order).iloc[0]
    return order, (f"no value decides whether the day or the month comes first ({example!r}, every part "
                   f"12 or less): read {DATE_ORDERS[order]} ({example} = {read}); if {DATE_ORDERS[other]}, "
                   f"set date_order: {other} for this column in schema.yaml and run 'everloop schema accept'")


def _looks_datetime(series: pd.Series) -> bool:
    """A date/time dtype, date or time objects (a Parquet date32 column), or text of which nearly all present
    values are dates or times: ISO 8601 (with an offset, `Z`, or none), or dates written with numbers in
    one order (`31.12.2026`, `12/31/2026`, `2026/12/31`; see `_date_order`). Other spellings (`Mar 1
    2026`, two-digit years) are not guessed; name such a column under features.datetime."""
    if pd.api.types.is_datetime64_any_dtype(series):
        return True
    if _is_numeric(series) or pd.api.types.is_bool_dtype(series):
        return False
    present = _present(series)
    if present.empty:
        return False
    if present.dtype == object and not all(isinstance(v, str) for v in present):
        return all(isinstance(v, (dt.date, np.datetime64)) for v in present)
    text = present.astype(str).str.strip()
    if text.str.match(ISO_DATETIME).mean() >= NUMERIC_SHARE:
        return True
    order = _date_order(text)[0]
    if order is None:
        return False
    parsed = pd.to_datetime(_iso_dates(text, order), errors="coerce", format="ISO8601", utc=True)
    return bool(parsed.notna().mean() >= NUMERIC_SHARE)


def _value_format(series: pd.Series, kind: Kind, role: Role) -> dict[str, Any]:
    """How a column's values are written, learned with its kind from the first data: the `dtype`, and for
    bool features their spellings, for numbers written with separators their format, for date/times with
    a zone (a Parquet column in Europe/Paris) that zone and for dates written with numbers their order,
    for text the null tokens it holds as values. Every later read of the column follows it. `assumed` says
    what was chosen where the data did not decide (and how to choose otherwise)."""
    name = str(series.name)
    text = _present_text(series)
    if kind == "datetime":
        tz = getattr(series.dtype, "tz", None)
        zone = getattr(tz, "key", None) or getattr(tz, "zone", None)  # a named zone; fixed offsets are UTC
        order, doubt = _date_order(text) if text is not None else (None, None)
        return {"dtype": "datetime", "timezone": zone if zone not in (None, "UTC", "utc") else None,
                "date_order": order, "assumed": doubt}
    if kind == "numeric":
        number_format = _numeric_reading(series)[1]
        notes = [_number_doubt(text, number_format) if text is not None else None, _code_hint(name, series)]
        return {"dtype": "int" if pd.api.types.is_integer_dtype(series) else "float",
                "number_format": number_format, "assumed": "; ".join(n for n in notes if n) or None}
    spellings = _bool_spellings(series) if role == "feature" else None
    if spellings is not None:
        return {"dtype": "bool", "true_values": spellings[0], "false_values": spellings[1]}
    held = None
    if series.dtype == object or isinstance(series.dtype, (pd.StringDtype, pd.ArrowDtype)):
        found = set(series.dropna().unique().tolist()) if series.dtype != object else \
            {v for v in series.dropna().unique().tolist() if isinstance(v, str)}
        held = sorted(found & set(NULL_TOKENS) - {""}) or None  # empty text is missing, always
    not_numbers = _not_numbers(text) if text is not None and role == "feature" else None
    assumed = (f"mostly numbers, but {not_numbers}; read as text, as categories; if those values mean a "
               "missing one, leave their cells empty, and the column reads as numbers") if not_numbers else None
    return {"dtype": "bool" if pd.api.types.is_bool_dtype(series) else "string", "not_missing": held,
            "assumed": assumed}


# Integer codes: whole numbers whose column name says they are codes (a postal code, a store number) get a
# hint in the ingest line on how to read them as categories. A word anywhere in the name, or the last word.
CODE_NAME_WORDS = frozenset({"zip", "zipcode", "postal", "postcode", "plz", "fips", "naics", "sic", "isic"})
CODE_LAST_WORDS = frozenset({"code", "region", "district", "county", "store", "branch", "shop", "dept",
                             "department", "segment", "sector", "station", "category", "zone"})


def _code_hint(name: str, series: pd.Series) -> str | None:
    """How to read a column of whole numbers named like codes (zip, store_id, region_code) as categories;
    None for other columns. Numbers they stay, as the user may mean them (TFDV does the same, silently)."""
    words = _words(name)
    if not (set(words) & CODE_NAME_WORDS or (words and words[-1] in CODE_LAST_WORDS | ID_NAME_WORDS)):
        return None
    values = _to_float(series).to_numpy()
    values = values[np.isfinite(values)]
    if not len(values) or not np.array_equal(values, np.round(values)):
        return None
    distinct = len(np.unique(values))
    if distinct > MAX_DOMAIN:
        return None
    return (f"named like a code ({distinct} different whole numbers): if they are codes, not quantities, "
            f"name it in the project file: features.categorical: [{name}]")


def _bool_spellings(series: pd.Series) -> tuple[list[str], list[str]] | None:
    """(true spellings, false spellings) of a true/false column, the most frequent of each first; None when
    the column is not one. Bools are; text is when every present value is a spelling in BOOL_SPELLINGS
    (any case) and both values occur (a column holding only `f` may be anything, `m` and `f` are not bools)."""
    present = _present(series)
    if present.empty:
        return None
    if pd.api.types.is_bool_dtype(series) or all(isinstance(v, (bool, np.bool_)) for v in present.unique()):
        return ["True"], ["False"]
    if present.dtype == object and not all(isinstance(v, str) for v in present.unique()):
        return None
    counts = present.astype(str).str.strip().value_counts()
    if len(counts) > 2 * len(BOOL_SPELLINGS):  # no more distinct spellings than there are
        return None
    truth = {str(v): BOOL_SPELLINGS.get(str(v).lower()) for v in counts.index}
    if None in truth.values() or len(set(truth.values())) != 2:
        return None
    out: tuple[list[str], list[str]] = ([], [])
    for value in counts.index:  # most frequent first: the first spelling of each value is its canonical one
        spelled = out[0] if truth[str(value)] else out[1]
        if str(value).lower() not in {s.lower() for s in spelled}:
            spelled.append(str(value))
    return out


# Identifier detection (see `_inferred_kind`). A column is judged only on at least ID_MIN_ROWS present
# values: on fewer, one value per row is what most columns show.
ID_MIN_ROWS = 20
ID_UNIQUE_SHARE = 0.95  # "one value per row": at least this share of the present values are distinct
ID_DENSE_SPAN = 1.5  # whole numbers spread over at most this many times their count: a run of numbers
ID_NAME_WORDS = frozenset({"id", "ids", "identifier", "no", "nr", "num", "number", "key", "code", "uuid",
                           "guid", "ref", "reference", "serial", "account"})


def _feature_kinds(frame: pd.DataFrame, spec: ProjectSpec,
                   roles: dict[str, Role]) -> tuple[set[str], set[str], set[str], dict[str, str]]:
    """The numeric, categorical and date/time features of `frame`, and the columns left out with why.
    Columns named under features.<kind> take that kind; every other one that has no role is inferred
    (unless excluded or features.infer_others is false).
    Raises DataError for a named column the data lacks."""
    feats = spec.features
    numeric = set(feats.numeric or [])
    categorical = set(feats.categorical or [])
    datetimes = set(feats.datetime or [])
    absent = [c for c in [*(feats.numeric or []), *(feats.categorical or []), *(feats.datetime or [])]
              if c not in frame.columns]
    if absent:
        raise DataError(f"features named in the project file are not in the data: {absent}; "
                        f"the data has {list(frame.columns)}")
    ignored: dict[str, str] = {}
    for name in frame.columns:
        if name in roles or name in numeric or name in categorical or name in datetimes:
            continue
        if name in feats.exclude:
            ignored[str(name)] = "features.exclude in the project file"
        elif not feats.infer_others:
            ignored[str(name)] = ("not named under features.numeric, categorical or datetime, and "
                                  "features.infer_others is false")
        else:
            kind, why = _inferred_kind(str(name), frame[name])
            if kind is None:
                ignored[str(name)] = why
            else:
                {"numeric": numeric, "categorical": categorical, "datetime": datetimes}[kind].add(name)
    return numeric, categorical, datetimes, ignored


def _inferred_kind(name: str, series: pd.Series) -> tuple[Kind | None, str]:
    """The kind of a column nobody named, or None and why it is no feature.

    Numbers are numeric, unless they look like an identifier (`_numeric_identifier`); dates are datetime;
    bools and text are categorical, unless the text has a different value on nearly every row (an
    identifier, a UUID, a code or free text: no value recurs, so none can be learned; the rule of
    AutoGluon's DropUniqueFeatureGenerator, max_unique_ratio 0.99, here 0.95 on at least ID_MIN_ROWS
    values) or too many values to be a category (more than MAX_DOMAIN, or than half the rows and 20)."""
    if _looks_numeric(series):
        why = _numeric_identifier(name, series)
        return (None, why) if why else ("numeric", "")
    if _looks_datetime(series):
        return "datetime", ""
    if pd.api.types.is_bool_dtype(series):
        return "categorical", ""
    present = series.dropna()
    distinct = int(present.nunique())
    unique = len(present) >= ID_MIN_ROWS and distinct >= ID_UNIQUE_SHARE * len(present)
    if not unique and distinct <= MAX_DOMAIN and distinct <= max(20, 0.5 * len(series)):
        return "categorical", ""
    # Left out: say what kept it from being numbers or dates, not only what it is as text.
    text = _present_text(series)
    not_numbers = _not_numbers(text) if text is not None else None
    if not_numbers:
        read = f"numbers, but {not_numbers}; read as text, it has"
        keep = (f"if those values mean a missing one, leave their cells empty (then it reads as numbers), or "
                f"name it in the project file: features.numeric: [{name}] (those values are then errors)")
    elif text is not None and _like_dates(text):
        read = ("dates, but not written in a way everloop reads by itself (ISO 8601, 31.12.2026, ...); as text "
                "it has")
        keep = f"to read it as dates, name it in the project file: features.datetime: [{name}]"
    else:
        read = ""
        keep = f"to use it as a feature, name it in the project file: features.categorical: [{name}]"
    examples = f"{distinct} different values in {len(present)} rows (e.g. {_examples(present)})"
    if unique:
        what = read or "looks like an identifier or free text:"
        return None, f"{what} {examples}, none recurs; {keep}"
    if read:
        return None, f"{read} {examples}, too many for a category; {keep}"
    return None, (f"too many different values for a category: {distinct} in {len(present)} rows "
                  f"(e.g. {_examples(present)}); {keep}")


def _like_dates(text: pd.Series) -> bool:
    """Whether text reads as dates to pandas' lenient parser (`Mar 1 2026`, `10.02.26`): only for a hint."""
    sample = text.head(200)
    try:
        parsed = pd.to_datetime(sample, errors="coerce", format="mixed")
    except (ValueError, TypeError, OverflowError):
        return False
    return bool(parsed.notna().mean() >= NUMERIC_SHARE)


def _numeric_identifier(name: str, series: pd.Series) -> str | None:
    """Why a column of numbers looks like an identifier, or None when it is an ordinary number.

    An identifier is whole numbers (an integer column; floats only when they are whole numbers made float
    by missing values), a different one on nearly every row (ID_UNIQUE_SHARE of at least ID_MIN_ROWS), and
    besides one of: rising or falling with the row order (numbers handed out in sequence), a run of
    consecutive numbers (spread over at most ID_DENSE_SPAN times their count: 100001 .. 102000 shuffled)
    or long digit strings (`_long_digits`: phone numbers), or a name whose last word says so (account_no,
    customer_number, order_id). A measurement has
    fractions (monthly charges) or repeats (age, counts); whole amounts that are all different, like
    incomes, are neither in row order, nor dense, nor named as ids, and stay features."""
    if pd.api.types.is_bool_dtype(series):
        return None
    if pd.api.types.is_float_dtype(series) and not series.isna().any():
        return None  # a float column without gaps was written as floats: a measurement
    values = _to_float(series).to_numpy()
    values = values[np.isfinite(values)]
    if len(values) < ID_MIN_ROWS or not np.array_equal(values, np.round(values)):
        return None
    distinct = len(np.unique(values))
    if distinct < ID_UNIQUE_SHARE * len(values):
        return None
    steps = np.diff(values)
    lo, hi = float(values.min()), float(values.max())
    if (steps >= 0).all() or (steps <= 0).all():
        how = f"{'rising' if steps.sum() >= 0 else 'falling'} with the row order"
    elif hi - lo + 1 <= ID_DENSE_SPAN * distinct:
        how = "a run of consecutive numbers"
    elif _long_digits(values):
        how = "long numbers (7 digits or more) of one length, not rounded, like phone or card numbers"
    elif _words(name)[-1:] and _words(name)[-1] in ID_NAME_WORDS:
        how = "named like an identifier"
    else:
        return None
    return (f"looks like an identifier: whole numbers, {distinct} different in {len(values)} rows, {how} "
            f"({lo:.0f} .. {hi:.0f}); to use it as a feature, name it in the project file: "
            f"features.numeric: [{name}] (or features.categorical for codes)")


def _long_digits(values: np.ndarray) -> bool:
    """Whole numbers that are digit strings with no arithmetic meaning (phone, card, tax numbers): every
    one at least 7 digits long, nearly all (ID_UNIQUE_SHARE) of one length, and their last digit a 0 no more
    often than by chance. Amounts that large are rounded (1250000) or span several lengths."""
    magnitude = np.abs(values)
    if not len(values) or magnitude.min() < 1e6:
        return False
    lengths = np.floor(np.log10(magnitude)).astype(int)
    one_length = np.bincount(lengths - lengths.min()).max() >= ID_UNIQUE_SHARE * len(values)
    return bool(one_length and np.mean(magnitude % 10 == 0) < 0.3)


def _words(name: str) -> list[str]:
    """The words of a column name, lower case: 'accountNo' and 'account_no' -> ['account', 'no']."""
    return [w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", name)]


def _examples(present: pd.Series, n: int = 3) -> str:
    return ", ".join(repr(v) if isinstance(v, str) else str(v) for v in present.head(n).tolist())


def _kind_evidence(col: ColumnSchema) -> str:
    """What inference saw in a column, read back from its schema entry."""
    # getattr: how values are written is recorded by the type-parsing part of the schema, when it knows
    number_format, zone = getattr(col, "number_format", None), getattr(col, "timezone", None)
    assumed = f"; {col.assumed}" if col.assumed else ""
    if col.kind == "numeric":
        return ("whole numbers" if col.dtype == "int" else "numbers") + (
            f", written as {number_format}" if number_format else "") + assumed
    if col.kind == "datetime":
        order = (f", written {DATE_ORDERS[col.date_order]} (like {DATE_EXAMPLES[col.date_order]})"
                 if col.date_order in DATE_ORDERS else "")
        return "dates and times" + order + (f", those without an offset in {zone}" if zone else "") + assumed
    if col.dtype == "bool":
        trues, falses = getattr(col, "true_values", None), getattr(col, "false_values", None)
        return "true/false values" + (f" (written {trues[0]}/{falses[0]})" if trues and falses else "")
    if col.dtype != "string":
        return f"{col.dtype} values"
    held = ""
    if col.not_missing:
        are = "is a value" if len(col.not_missing) == 1 else "are values"
        held = f" ({', '.join(map(repr, col.not_missing))} {are} here, not missing)"
    text = f"text, {len(col.categories)} categories" if col.categories is not None else "text"
    return text + held + assumed


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


def _parse_datetimes(series: pd.Series, timezone: str | None = None,
                     date_order: str | None = None) -> pd.Series:
    """UTC timestamps at microsecond resolution, however they arrived (so equal data hashes equal): one
    instant written with any offset, with `Z`, or without an offset (read in `timezone`, UTC when None)
    is one value. Text is read as ISO 8601 first; dates written with numbers in another order in the
    column's `date_order` (see `_iso_dates`); what is neither, by pandas' "mixed" parser (dateutil: `Mar 1
    2026`); what none reads is NaT. Values that are not text or times are NaT."""
    return _read_datetimes(series, timezone, date_order)[0]


def _read_datetimes(series: pd.Series, timezone: str | None = None,
                    date_order: str | None = None) -> tuple[pd.Series, np.ndarray]:
    """`_parse_datetimes`, and which values are wall-clock times the zone's clock skips (02:30 on the night
    summer time starts): those are read as the time shifted forward by the gap, and reported."""
    skipped = np.zeros(len(series), dtype=bool)
    if pd.api.types.is_datetime64_any_dtype(series):
        if series.dt.tz is not None:
            return series.dt.tz_convert("UTC").dt.as_unit("us"), skipped
        local, skipped = _localize(series, timezone)
        return local.dt.as_unit("us"), skipped
    if _is_numeric(series) or pd.api.types.is_bool_dtype(series):  # 5 is no date: its unit is a guess
        return pd.Series(pd.NaT, index=series.index, dtype="datetime64[us, UTC]"), skipped
    if series.dtype == object:
        times = series.map(lambda v: isinstance(v, (str, dt.date, np.datetime64))).to_numpy(dtype=bool)
        if not times.all():
            series = series.where(times)
    if timezone is None or timezone == "UTC":
        return _parse_times(series, True, date_order), skipped
    # Values with an offset are instants; the others are wall-clock times in the schema's zone.
    text = series.astype(object).where(series.notna())
    offset = text.map(_has_offset).to_numpy(dtype=bool)
    out = pd.Series(pd.NaT, index=series.index, dtype="datetime64[us, UTC]")
    if offset.any():
        out[offset] = _parse_times(text[offset], True, date_order)
    if (~offset).any():
        local, gaps = _localize(_parse_times(text[~offset], False, date_order), timezone)
        out[~offset] = local.dt.as_unit("us")
        skipped[~offset] = gaps
    return out, skipped


# How an ISO 8601 time ends when it names its offset: only after a time of day (`08:15+02:00`, `T08Z`),
# never a date's own parts (the `-23` of `2025-06-23` is a day, not an offset).
OFFSET = (r"(?:\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?|T\d{2}(?:\d{2}(?:\d{2}(?:[.,]\d+)?)?)?)\s*"
          r"(?:[Zz]|[+-]\d{2}(?::?\d{2})?)$")


def _has_offset(value: Any) -> bool:
    """A time that names its offset (text ending in one, or an aware datetime): an instant in any zone."""
    if isinstance(value, str):
        return re.search(OFFSET, value.strip()) is not None
    return isinstance(value, dt.datetime) and value.tzinfo is not None


def _parse_times(series: pd.Series, utc: bool, date_order: str | None = None) -> pd.Series:
    try:
        parsed = pd.to_datetime(series, utc=utc, format="ISO8601")
    except (ValueError, TypeError, OverflowError):
        # Not all ISO 8601: dates written with numbers in the column's order become ISO text, and only
        # what still does not read goes to pandas' lenient parser (which would read 2026-02-10 day first).
        original = series.astype(object).where(series.notna())
        text = _iso_dates(original, date_order)
        try:
            parsed = pd.to_datetime(text, utc=utc, format="ISO8601", errors="coerce")
        except (ValueError, TypeError, OverflowError):  # naive and aware objects mixed: as UTC
            parsed = pd.to_datetime(text, utc=True, format="ISO8601", errors="coerce")
        # what was rewritten and still does not read (31.13.2026) is no date: never dateutil's guess
        rest = (parsed.isna() & text.notna() & (text == original)).to_numpy()
        if rest.any():
            try:
                others = pd.to_datetime(text[rest], errors="coerce", utc=utc, format="mixed",
                                        dayfirst=date_order == "DMY")
            except (ValueError, TypeError, OverflowError):
                others = pd.Series(pd.NaT, index=text.index[rest])
            if not pd.api.types.is_datetime64_any_dtype(others):  # naive and aware values mixed
                others = pd.to_datetime(others, errors="coerce", utc=True)
            if (others.dt.tz is None) != (parsed.dt.tz is None):  # aware beside naive: not times here
                others = pd.Series(pd.NaT, index=others.index, dtype=parsed.dtype)
            parsed = parsed.copy()
            parsed[rest] = others.dt.as_unit("us") if len(others) else others
    if not pd.api.types.is_datetime64_any_dtype(parsed):  # naive and aware values mixed: not times here
        parsed = pd.to_datetime(parsed, errors="coerce", utc=True)
    return parsed.dt.as_unit("us")


def _iso_dates(text: pd.Series, date_order: str | None) -> pd.Series:
    """Text dates written with numbers (see DATE_ORDERS) rewritten as ISO 8601, their time kept: year-first
    ones always (`2026/12/31`), day/month ones in `date_order`. Without an order, a day/month date is
    None (refused: `03/01/2026` is March or January, and reading each value its own way gives one column
    two orders). Every other value as it is."""
    strings = text.map(lambda v: isinstance(v, str)).to_numpy(dtype=bool)
    if not strings.any():
        return text
    out = text.astype(object).copy()
    words = text[strings].astype(str)
    year_first = words.str.extract(_YEAR_FIRST)
    hit = year_first[0].notna()
    if hit.any():
        y = year_first[hit]
        out.loc[y.index] = y[0] + "-" + y[2] + "-" + y[3] + y[4]
    day_month = words.str.extract(_DAY_MONTH)
    hit = day_month[0].notna()
    if hit.any():
        d = day_month[hit]
        if date_order == "DMY":
            out.loc[d.index] = d[3] + "-" + d[2] + "-" + d[0] + d[4]
        elif date_order == "MDY":
            out.loc[d.index] = d[3] + "-" + d[0] + "-" + d[2] + d[4]
        else:
            out.loc[d.index] = None
    return out


def _localize(naive: pd.Series, timezone: str | None) -> tuple[pd.Series, np.ndarray]:
    """Naive times read as wall-clock times in `timezone` (UTC when None), as UTC, and which of them the
    clock skips. A time the clock skips (spring forward) moves forward by the gap; one it shows twice
    (fall back) is the first, as in Python's fold=0."""
    skipped = np.zeros(len(naive), dtype=bool)
    if naive.dt.tz is not None:
        return naive.dt.tz_convert("UTC"), skipped
    if timezone is None or timezone == "UTC":
        return naive.dt.tz_localize("UTC"), skipped
    first = np.ones(len(naive), dtype=bool)  # ambiguous=True: the daylight-saving (first) reading
    local = naive.dt.tz_localize(timezone, ambiguous=first, nonexistent="NaT")
    skipped = (local.isna() & naive.notna()).to_numpy()
    if skipped.any():
        local = naive.dt.tz_localize(timezone, ambiguous=first, nonexistent="shift_forward")
    return local.dt.tz_convert("UTC"), skipped


def _iso(seconds: float) -> str:
    """Seconds since the epoch as ISO 8601 text in UTC (`2026-03-01T06:15:00Z`)."""
    stamp = pd.Timestamp(round(seconds * 1e6), unit="us", tz="UTC")
    # by hand: strftime fails before year 1 and does not pad year 1 to 0001
    return (f"{stamp.year:04d}-{stamp.month:02d}-{stamp.day:02d}"
            f"T{stamp.hour:02d}:{stamp.minute:02d}:{stamp.second:02d}Z")


def _time_margin(lo: float | None, hi: float | None) -> tuple[float | None, float | None]:
    """A date/time column's observed range (seconds since the epoch) widened by RANGE_MARGIN of its span,
    and at least TIME_MARGIN_BEFORE before it and TIME_MARGIN_AFTER after it: later data is later in time,
    while year 1 or 9999 is a placeholder or a typo."""
    if lo is None or hi is None:
        return lo, hi
    span = (hi - lo) * RANGE_MARGIN
    return float(lo - max(span, TIME_MARGIN_BEFORE)), float(hi + max(span, TIME_MARGIN_AFTER))


# -- the checks -----------------------------------------------------------------------------------


def _check_column(col: ColumnSchema, series: pd.Series, checked: Checked, null_rates: bool,
                  coerce: bool, per_value: bool = False) -> pd.Series | None:
    if col.kind == "numeric":
        result, nulls = _check_numeric(col, series, checked, per_value)
    elif col.kind == "datetime":
        result, nulls = _check_datetime(col, series, checked)
    elif col.is_bool:
        result, nulls = _check_bool(col, series, checked)
    else:
        result, nulls = _check_categorical(col, series, checked, coerce)
    _check_nulls(col, series, nulls, checked, null_rates)
    return result if coerce else None


def _missing_text(col: ColumnSchema, series: pd.Series, rows: np.ndarray) -> np.ndarray:
    """Of the rows `rows` (a mask: values that did not read as the column's kind), those that hold text
    meaning a missing value in this column (`ColumnSchema.null_text`: "", "NA", "null", ...). Only failed
    values are looked at, so clean data costs nothing: no null token reads as a number, date or bool."""
    out = np.zeros(len(series), dtype=bool)
    at = np.flatnonzero(rows)
    if not len(at):
        return out
    text = _arrow_text(series)
    if text is not None:
        taken = pc.take(text, pa.array(at))
        out[at] = _is_in(taken, col.null_text_array)
    else:
        missing = col.null_text
        out[at] = [isinstance(v, str) and v in missing for v in series.to_numpy(dtype=object)[at]]
    return out


def _is_in(text: pa.ChunkedArray | pa.Array, values: pa.Array) -> np.ndarray:
    """Which cells of Arrow text are one of `values` (a null is none), as a numpy mask."""
    return pc.fill_null(pc.is_in(text, value_set=values), False).to_numpy(zero_copy_only=False)


def _check_numeric(col: ColumnSchema, series: pd.Series, checked: Checked,
                   per_value: bool = False) -> tuple[pd.Series, np.ndarray]:
    """Numbers as float64 (NaN for missing values, null tokens among them); text is read plainly, or in the
    column's `number_format`. A batch whose values all read plainly while some are not in that format
    (a file pandas wrote back: `1.38` in a `1234,5` column) is read plainly, with a `number_format`
    warning: per batch, not per value, for `1.380` reads one way or the other, never both in one batch.
    `per_value` (request rows: one model call mixes many clients' requests, and a value must read the
    same whatever else is in flight): a value in the format reads in the format; one that is not but
    reads plainly reads plainly, with the warning on its row."""
    if _is_numeric(series):
        values = series.to_numpy(dtype="float64", na_value=np.nan)
        nulls = np.isnan(values)
        _check_range(col, values, series, checked)
        return pd.Series(values, index=series.index, copy=False), nulls
    values, nulls, bad = _read_numbers(series, col.number_format)
    if bad.any():
        missing = _missing_text(col, series, bad)
        nulls, bad = nulls | missing, bad & ~missing
    if bad.any() and col.number_format is not None:
        plain, _, plain_bad = _read_numbers(series, None)
        if per_value:
            readable = bad & ~plain_bad
            if readable.any():
                _add(checked, col.name, "number_format", "warning", readable, series,
                     f"values are not written as {col.number_format} (the training data's format): read plainly "
                     "(a decimal point, no group separators)")
                values, bad = np.where(readable, plain, values), bad & ~readable
        elif not (plain_bad & ~nulls).any():
            _add(checked, col.name, "number_format", "warning", bad, series,
                 f"values are not written as {col.number_format} (the training data's format) but plainly: "
                 "every value of this batch was read plainly (a decimal point, no group separators)")
            values, bad = np.where(nulls, np.nan, plain), np.zeros(len(values), dtype=bool)
    _add(checked, col.name, "type_mismatch", "error", bad, series,
         "values are not numbers" + (f" written as {col.number_format}" if col.number_format else ""))
    values = np.where(bad, np.nan, values)
    _check_range(col, values, series, checked)
    return pd.Series(values, index=series.index, copy=False), nulls


def _read_numbers(series: pd.Series, number_format: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Text or objects as (float64 values, which are null, which did not read as a number): text plainly
    or in `number_format`; bools are no numbers (True is not 1); NaN read from text counts as not read."""
    text = _arrow_text(series)
    if text is not None:  # Arrow-backed text (a CSV read as text, pandas' str dtype): parse in Arrow
        values = _parse_numbers(text, number_format).to_numpy(zero_copy_only=False)
        nulls = text.is_null().to_numpy(zero_copy_only=False)
        return values, nulls, np.isnan(values) & ~nulls
    # Text or mixed objects: what parses is a number, the rest is a type mismatch.
    nulls = series.isna().to_numpy()
    values = _to_float(series if number_format is None else _unformat(series, number_format)).to_numpy()
    is_bool = _bools(series, values, nulls)
    if is_bool.any():  # True is not the number 1
        values = np.where(is_bool, np.nan, values)
    return values, nulls, (np.isnan(values) & ~nulls) | is_bool


def _check_range(col: ColumnSchema, values: np.ndarray, series: pd.Series, checked: Checked) -> None:
    lo, hi = _finite_range(values)
    if lo is None:
        return
    if not (np.isfinite(lo) and np.isfinite(hi)):
        _add(checked, col.name, "type_mismatch", "error", np.isinf(values), series, "values are infinite")
    if col.min is not None and lo < col.min:
        _add(checked, col.name, "out_of_range", "warning", (values < col.min) & np.isfinite(values), series,
             f"values below the schema's minimum {col.min:g}")
    if col.max is not None and hi > col.max:
        _add(checked, col.name, "out_of_range", "warning", (values > col.max) & np.isfinite(values), series,
             f"values above the schema's maximum {col.max:g}")


def _check_datetime(col: ColumnSchema, series: pd.Series, checked: Checked) -> tuple[pd.Series, np.ndarray]:
    """Date/times as UTC (see `_read_datetimes`); text meaning missing is null; a value that is no date (or
    not in the column's date order) is an error; one outside the schema's range, or a wall-clock time the
    schema's zone skips, a warning."""
    result, skipped = _read_datetimes(series, col.timezone, col.date_order)
    nulls = series.isna().to_numpy()
    bad = result.isna().to_numpy() & ~nulls
    if bad.any():
        missing = _missing_text(col, series, bad)
        nulls, bad = nulls | missing, bad & ~missing
    order = (f" (this column takes dates written {DATE_ORDERS[col.date_order]}, like "
             f"{DATE_EXAMPLES[col.date_order]}, or ISO 8601)" if col.date_order in DATE_ORDERS else "")
    _add(checked, col.name, "type_mismatch", "error", bad, series, f"values are not dates or times{order}")
    _add(checked, col.name, "nonexistent_time", "warning", skipped, series,
         f"local times that do not exist in {col.timezone} (the clock skips them when summer time starts): "
         "read as the time after the gap")
    if col.min is not None or col.max is not None:
        seconds = epoch_seconds(result)
        lo, hi = _finite_range(seconds)
        if lo is not None and col.min is not None and lo < col.min:
            _add(checked, col.name, "out_of_range", "warning", seconds < col.min, series,
                 f"values before the schema's earliest {_iso(col.min)}")
        if hi is not None and col.max is not None and hi > col.max:
            _add(checked, col.name, "out_of_range", "warning", seconds > col.max, series,
                 f"values after the schema's latest {_iso(col.max)}")
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


def _parse_numbers(text: pa.ChunkedArray, number_format: str | None = None) -> pa.ChunkedArray:
    """Text to float64; what is not a number becomes null. One cast when every cell parses, else
    a regular expression picks the cells that do (both run in Arrow's C++). With `number_format` (a key
    of NUMBER_FORMATS), only text in that format is a number: `1,234.5` is 1234.5 in "1,234.5", and
    `1.234` is 1234 in "1.234,5" (there, `1.5` is no number at all: it is not written that way)."""
    if number_format is None:
        try:
            return pc.cast(text, pa.float64())
        except pa.ArrowInvalid:
            trimmed = pc.utf8_trim_whitespace(text)
            numeric = pc.match_substring_regex(trimmed, NUMBER)
            return pc.cast(pc.if_else(numeric, trimmed, pa.scalar(None, trimmed.type)), pa.float64())
    groups, decimal, pattern = _FORMATS[number_format]
    trimmed = pc.utf8_trim_whitespace(text)
    kept = pc.if_else(pc.match_substring_regex(trimmed, pattern), trimmed, pa.scalar(None, trimmed.type))
    if groups:
        kept = pc.replace_substring_regex(kept, f"[{re.escape(groups)}]", "")
    if decimal != ".":
        kept = pc.replace_substring(kept, decimal, ".")
    return pc.cast(kept, pa.float64())


def _unformat(series: pd.Series, number_format: str) -> pd.Series:
    """An object column with its text read in `number_format` (as floats, NaN where it is not in that
    format); numbers and other objects stay as they are, for the caller's checks."""
    values = series.to_numpy(dtype=object, copy=True)
    text = np.flatnonzero([isinstance(v, str) for v in values])
    if len(text):
        strings = pa.chunked_array([pa.array(values[text].tolist(), type=pa.string())])
        parsed = _parse_numbers(strings, number_format)
        values[text] = parsed.to_numpy(zero_copy_only=False)
    return pd.Series(values, index=series.index, dtype=object)


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


def _check_bool(col: ColumnSchema, series: pd.Series, checked: Checked) -> tuple[pd.Series, np.ndarray]:
    """A true/false feature: bools, and text in one of the column's own spellings (any case), become its
    canonical spellings (`true_values[0]`, `false_values[0]`); anything else (`5`, `0`, `"maybe"`, a
    spelling the data never used) is an error naming the spellings it takes. MLflow's schema enforcement
    turns 0/1 into bools silently for a boolean column; here a value means what the training data meant."""
    trues, falses = col.true_values or ["True"], col.false_values or ["False"]
    lookup = col.bool_lookup
    if pd.api.types.is_bool_dtype(series):  # bool, or pandas' nullable boolean
        nulls = series.isna().to_numpy()
        flags = series.to_numpy(dtype=object, na_value=None)
        out = np.where(flags == True, trues[0], falses[0]).astype(object)  # noqa: E712 - an object array
        out[nulls] = None
        return pd.Series(out, index=series.index, dtype=object), nulls
    if series.dtype == object:  # keyed by type too: True == 1 in Python, and pandas would merge them
        values = series.to_numpy(dtype=object)
        codes = np.empty(len(values), dtype=np.intp)
        index: dict[Any, int] = {}
        uniques_values: list[Any] = []
        for i, value in enumerate(values):
            try:
                key: Any = (type(value), value)
                hash(key)
            except TypeError:  # a list or a dict: no spelling of anything
                key = (type(value), id(value))
            n = index.get(key)
            if n is None:
                n = index[key] = len(uniques_values)
                uniques_values.append(value)
            codes[i] = n
    else:
        codes, found = pd.factorize(series, use_na_sentinel=True)
        uniques_values = list(found)
    mapped = np.empty(len(uniques_values) + 1, dtype=object)  # the last slot: missing (code -1)
    bad_codes, null_codes = [], [-1]
    for n, value in enumerate(uniques_values):
        if value is None or (not isinstance(value, (str, list, tuple, dict, set, np.ndarray)) and pd.isna(value)):
            null_codes.append(n)  # None, NaN, NA, NaT
        elif isinstance(value, (bool, np.bool_)):
            mapped[n] = trues[0] if value else falses[0]
        elif isinstance(value, str) and value.strip().lower() in lookup:
            mapped[n] = lookup[value.strip().lower()]
        elif isinstance(value, str) and value in col.null_text:  # "", "NA", ...: missing, as in a CSV file
            null_codes.append(n)
        else:
            bad_codes.append(n)
    codes = np.asarray(codes)
    nulls = np.isin(codes, null_codes)
    if bad_codes:
        _add(checked, col.name, "type_mismatch", "error", np.isin(codes, bad_codes), series,
             f"values are not true/false: this column takes {' or '.join(trues)} for true and "
             f"{' or '.join(falses)} for false (any case), or JSON true/false")
    return pd.Series(mapped[codes], index=series.index, dtype=object), nulls


def _check_categorical(col: ColumnSchema, series: pd.Series, checked: Checked,
                       coerce: bool) -> tuple[pd.Series | None, np.ndarray]:
    text = _arrow_text(series)
    if text is not None:  # Arrow-backed text: check the domain in Arrow, keep the column as it is
        nulls = text.is_null().to_numpy(zero_copy_only=False)
        missing = np.zeros(len(text), dtype=bool)
        if col.categories is not None:
            known = pc.is_in(text, value_set=pa.array(col.categories, type=text.type))
            if (pc.sum(known).as_py() or 0) < len(text) - text.null_count:  # only then can a token be there
                unseen = ~known.to_numpy(zero_copy_only=False) & ~nulls
                missing = _missing_text(col, series, unseen)
                unseen &= ~missing
                if unseen.any():
                    distinct = pc.unique(pc.filter(text, pa.array(unseen))).to_pylist()
                    whole = _whole_number_categories(col, distinct)
                    if whole:  # `3.0` (pandas wrote a column of codes with gaps as floats): the category 3
                        unseen &= ~_is_in(text, pa.array(list(whole)))
                        series = series.replace(whole) if coerce else series
                        distinct = [v for v in distinct if v not in whole]
                    if unseen.any():
                        _add_unseen(checked, col, unseen, series, [str(v) for v in distinct])
        else:
            missing = _is_in(text, col.null_text_array)
        if missing.any():  # text meaning a missing value ("", "NA", ...) is null, as a CSV reader makes it
            nulls = nulls | missing
            series = series.where(~missing)
        return (series if coerce else None), nulls
    if series.dtype == object:
        unhashable = series.map(lambda v: isinstance(v, (list, dict, set))).to_numpy()
        if unhashable.any():
            _add(checked, col.name, "type_mismatch", "error", unhashable, series,
                 "values are lists or objects, not categories")
            series = series.where(~unhashable)
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    missing = col.null_text  # text meaning a missing value ("", "NA", ...) is null, as a CSV reader makes it
    tokens = [n for n, v in enumerate(uniques) if isinstance(v, str) and v in missing]
    if tokens:
        codes = np.where(np.isin(codes, tokens), -1, codes)
    nulls = codes < 0
    strings = _category_strings(np.asarray(uniques, dtype=object))
    if col.categories is not None and len(strings):
        unseen = ~np.isin(strings, col.categories)
        unseen[tokens] = False
        texts = [n for n in np.flatnonzero(unseen) if isinstance(uniques[n], str)]
        whole = _whole_number_categories(col, [strings[n] for n in texts])
        for n in texts:  # `3.0` (pandas wrote a column of codes with gaps as floats): the category 3
            if strings[n] in whole:
                strings[n], unseen[n] = whole[strings[n]], False
        if unseen.any():
            _add_unseen(checked, col, np.isin(codes, np.flatnonzero(unseen)), series, list(strings[unseen]))
    if not coerce:
        return None, nulls
    lookup = np.append(strings, None)  # code -1 (missing) reads the trailing None
    return pd.Series(lookup[codes], index=series.index, dtype=object), nulls


WHOLE_NUMBER_TEXT = r"^[+-]?\d+\.0+$"  # 3.0: a whole number written as a float


def _whole_number_categories(col: ColumnSchema, texts: list[Any]) -> dict[str, str]:
    """Unseen text that is a whole number written as a float (`3.0`, as pandas writes a column of integer
    codes with gaps) -> the category it is (`3`), where the domain has it: the number 3.0 and a Parquet
    float read as that category too, so the text does."""
    out = {}
    for text in texts:
        if isinstance(text, str) and re.match(WHOLE_NUMBER_TEXT, text):
            whole = str(int(float(text)))
            if whole in col.category_set:
                out[text] = whole
    return out


def _check_nulls(col: ColumnSchema, series: pd.Series, nulls: np.ndarray, checked: Checked, null_rates: bool) -> None:
    count = int(nulls.sum())
    if not count:
        return
    if col.role == "target":
        _add(checked, col.name, "missing_label", "error", nulls, series, "missing labels")
    elif col.role in ("id", "timestamp"):
        _add(checked, col.name, "null_values", "error", nulls, series, f"missing {col.role} values")
    elif not col.nullable and col.is_bool:  # no missing state was learned: neither true nor false is a guess
        _add(checked, col.name, "null_values", "error", nulls, series,
             "missing values in a true/false column the training data had none in; send true or false")
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


def _add_unseen(checked: Checked, col: ColumnSchema, mask: np.ndarray, original: pd.Series,
                categories: list[str]) -> None:
    """An unseen_category warning that counts categories and rows apart and names the categories:
    "6 categories not seen in training (334 rows): 'a', 'b', ..." (TFDV reports the rows only)."""
    before = len(checked.report.anomalies)
    _add(checked, col.name, "unseen_category", "warning", mask, original, "unseen")
    if len(checked.report.anomalies) > before:
        a = checked.report.anomalies[-1]
        kept = categories[:MAX_DOMAIN]
        tail = f" (known: {_short(col.categories or [])})"
        checked.report.anomalies[-1] = replace(a, message=unseen_message(kept, a.count, tail), categories=kept)


def unseen_message(categories: list[str], rows: int, tail: str = "") -> str:
    """"N categories not seen in training (R rows): 'a', 'b', ..." + tail; N reads "1000+" when the
    list was capped at MAX_DOMAIN distinct values."""
    n = len(categories)
    count = f"{n}+" if n >= MAX_DOMAIN else str(n)
    shown = [repr(c if len(c) <= 40 else c[:37] + "...") for c in categories[:5]]
    names = ", ".join(shown) + (f", ... ({count} in all)" if n > 5 else "")
    return (f"{count} {'category' if n == 1 else 'categories'} not seen in training "
            f"({rows} {'row' if rows == 1 else 'rows'}): {names}{tail}")


def _merge_unseen(mine: Anomaly, later: Anomaly, rows: int) -> Anomaly:
    """Two batches' unseen_category warnings of one column as one: distinct categories and rows summed."""
    known = set(mine.categories)
    extra = [c for c in later.categories if c not in known][:max(0, MAX_DOMAIN - len(mine.categories))]
    categories = mine.categories + extra
    _, sep, rest = mine.message.partition(" (known: ")
    keep = EXAMPLES - len(mine.rows)
    return replace(mine, count=rows, message=unseen_message(categories, rows, sep + rest), categories=categories,
                   rows=mine.rows + later.rows[:keep], values=mine.values + later.values[:keep])


def _merge_key(a: Anomaly) -> tuple[str, str, str, str]:
    """Anomalies of two batches with this key are one anomaly (an unseen_category message names the
    batch's own categories, so the column and kind decide)."""
    return a.column, a.kind, a.severity, "" if a.kind == "unseen_category" else _stem(a.message)


def _stem(message: str) -> str:
    """The message without its leading count, to match anomalies across batches."""
    head, _, rest = message.partition(" ")
    return rest if head.isdigit() else message


def _short(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")
