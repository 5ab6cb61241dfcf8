"""The schema as a human-readable, editable YAML file (`schema.yaml` beside `everloop.yaml`).

The store keeps every accepted version; the file is where people read and change it. The first
ingest writes it; `everloop schema accept` makes an edited file (or a schema evolved from new
data) the current version, so that a changed expectation is a recorded decision, never an accident.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from everloop.data._schema import DATE_ORDERS, NUMBER_FORMATS, SCHEMA_FORMAT, ColumnSchema, Schema
from everloop.data._sources import iter_batches
from everloop.data._stats import DatasetStats
from everloop.errors import DataError, SpecError
from everloop.spec import ProjectSpec, SqlSource, describe_errors
from everloop.store import Store, write_atomic

SCHEMA_FILE = "schema.yaml"
# How a column's values are written (ColumnSchema's fields after its domain; see docs/data.md).
_SPELLINGS = ("true_values", "false_values", "number_format", "timezone", "date_order", "not_missing")


class _Column(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["numeric", "categorical", "datetime"]
    role: Literal["feature", "target", "id", "timestamp"] = "feature"
    dtype: Literal["float", "int", "string", "bool", "datetime"] = "float"
    nullable: bool = False
    max_null_rate: float = Field(0.0, ge=0, le=1)
    min: float | None = None  # datetime columns: ISO 8601 text in the file (see `_time_text`)
    max: float | None = None
    categories: list[str] | None = None
    # How values are written (see ColumnSchema and docs/data.md, "Types and spellings"):
    true_values: list[str] | None = None
    false_values: list[str] | None = None
    number_format: str | None = None
    timezone: str | None = None
    date_order: str | None = None
    not_missing: list[str] | None = None
    assumed: str | None = None  # what inference assumed where the data did not decide: a note, not a rule

    @field_validator("min", "max", mode="before")
    @classmethod
    def _time_bound(cls, value: Any, info: ValidationInfo) -> Any:
        """A datetime column's bound as seconds since 1970 (UTC): from ISO 8601 text, or a date/time YAML
        read as one; numbers pass (and other columns' bounds are left to the float check)."""
        if info.data.get("kind") != "datetime" or value is None or isinstance(value, (int, float)):
            return value
        return _time_seconds(value)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_OWN_TIME = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d+)?Z")


def _time_text(seconds: float) -> str:
    """Seconds since 1970 as ISO 8601 UTC text that `_time_seconds` reads back to the same float: whole
    seconds, then the fraction's shortest exact decimals (`2026-03-01T08:15:00.25Z`). Out of the years
    1-9999: the number, as text."""
    whole = math.floor(seconds)
    try:
        text = (_EPOCH + timedelta(seconds=whole)).replace(tzinfo=None).isoformat(timespec="seconds")
    except OverflowError:
        return repr(seconds)
    fraction = seconds - whole  # exact: and whole + fraction gives `seconds` back exactly
    return text + (format(Decimal(repr(fraction)), "f")[1:] if fraction else "") + "Z"


def _time_seconds(value: Any) -> float:
    """A date/time bound written in the schema file -> seconds since 1970 (UTC). Raises ValueError."""
    if isinstance(value, datetime):  # YAML reads an unquoted 2026-03-01T08:15:00Z as one
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(value, date):
        return (datetime(value.year, value.month, value.day, tzinfo=timezone.utc) - _EPOCH).total_seconds()
    text = str(value).strip()
    own = _OWN_TIME.fullmatch(text)
    if own:
        whole = datetime.fromisoformat(own.group(1)).replace(tzinfo=timezone.utc)
        return (whole - _EPOCH).total_seconds() + float("0" + (own.group(2) or ""))
    try:
        return float(text)
    except ValueError:
        pass
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError("expected a date/time in ISO 8601, such as 2026-03-01 or 2026-03-01T08:15:00Z") from None
    return _time_seconds(stamp)


class _SchemaFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal[1] = SCHEMA_FORMAT
    columns: dict[str, _Column]
    ignored: dict[str, str] = Field(default_factory=dict)  # columns of the data left out: name -> why


def schema_yaml(schema: Schema, version: int | None = None) -> str:
    """The schema as YAML text, one block per column, with a header saying how to change it."""
    body = {"format": SCHEMA_FORMAT, "columns": {}}
    for col in schema.columns:
        entry = {"kind": col.kind, "role": col.role, "dtype": col.dtype, "nullable": col.nullable}
        if col.nullable:
            entry["max_null_rate"] = col.max_null_rate
        if col.kind == "numeric":
            entry |= {"min": col.min, "max": col.max}
        elif col.kind == "datetime" and (col.min is not None or col.max is not None):
            entry |= {k: None if v is None else _time_text(v) for k, v in (("min", col.min), ("max", col.max))}
        if col.categories is not None:
            entry["categories"] = col.categories
        for spelling in _SPELLINGS + ("assumed",):  # only where they apply
            if getattr(col, spelling, None) is not None:
                entry[spelling] = getattr(col, spelling)
        body["columns"][col.name] = entry
    if schema.ignored:
        body["ignored"] = dict(schema.ignored)
    header = (f"# everloop data schema{f' (version {version})' if version else ''}.\n"
              "# Ranges were inferred with a margin of a quarter of the observed span (date/times: ISO 8601, UTC);\n"
              "# categories are the ones seen.\n"
              "# 'ignored' lists the data's columns left out, with why; to use one, move it to 'columns'\n"
              "# (with its kind and role: feature) or name it under features in everloop.yaml and run\n"
              "# `everloop schema accept --from-data FILE`.\n"
              "# Edit freely, then run `everloop schema accept` to make this file the current schema.\n")
    return header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


def load_schema_file(path: str | Path, spec: ProjectSpec) -> Schema:
    """Read and check a schema file; every problem is named with its column and field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: no schema file here; the first 'everloop ingest' writes one", path=str(path)) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}", path=str(path)) from None
    try:
        parsed = _SchemaFile.model_validate(raw)
    except ValidationError as exc:
        problems = describe_errors(exc, _SchemaFile)
        raise SpecError(f"{path}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems),
                        path=str(path), problems=problems) from None
    schema = Schema([ColumnSchema(name, **entry.model_dump()) for name, entry in parsed.columns.items()],
                    dict(parsed.ignored))
    problems = _consistency(schema, spec)
    if problems:
        raise SpecError(f"{path}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems),
                        path=str(path), problems=problems)
    return schema


def _consistency(schema: Schema, spec: ProjectSpec) -> list[str]:
    problems = []
    roles = {"target": spec.data.target, "id": spec.data.id, "timestamp": spec.data.timestamp}
    for role, expected in roles.items():
        found = [c.name for c in schema.by_role(role)]
        if expected and found != [expected]:
            problems.append(f"role {role!r}: the project file names {expected!r}, the schema has {found or 'none'}")
        if not expected and found:
            problems.append(f"role {role!r}: the schema marks {found} but the project file names no data.{role}")
    if not schema.features:
        problems.append("no feature columns")
    both = [c.name for c in schema.columns if c.name in schema.ignored]
    if both:
        problems.append(f"ignored.{both[0]}: the column is also under columns; keep it in one of the two")
    for col in schema.columns:
        if col.kind in ("numeric", "datetime") and col.min is not None and col.max is not None \
                and col.min > col.max:
            shown = (lambda v: v) if col.kind == "numeric" else _time_text
            problems.append(f"columns.{col.name}: min {shown(col.min)} is above max {shown(col.max)}")
        if col.categories is not None and col.kind != "categorical":
            problems.append(f"columns.{col.name}: categories are only for categorical columns (kind is {col.kind})")
        if col.categories is not None and len(set(col.categories)) != len(col.categories):
            problems.append(f"columns.{col.name}: categories are listed more than once")
        problems += _spelling_problems(col)
    return problems


def _spelling_problems(col: ColumnSchema) -> list[str]:
    """What is wrong with how a column says its values are written (true/false spellings, number format,
    time zone), one line each."""
    problems = []
    where = f"columns.{col.name}"
    if (col.true_values is not None or col.false_values is not None) and col.dtype != "bool":
        problems.append(f"{where}: true_values/false_values are only for dtype bool (dtype is {col.dtype})")
    trues = {v.strip().lower() for v in col.true_values or []}
    falses = {v.strip().lower() for v in col.false_values or []}
    if trues & falses:
        problems.append(f"{where}: {sorted(trues & falses)} is under both true_values and false_values")
    if col.true_values == [] or col.false_values == []:
        problems.append(f"{where}: true_values and false_values need at least one spelling each")
    if col.number_format is not None and (col.kind != "numeric" or col.number_format not in NUMBER_FORMATS):
        problems.append(f"{where}: number_format {col.number_format!r} is not one of {list(NUMBER_FORMATS)} "
                        "(numeric columns only)")
    if col.date_order is not None and (col.kind != "datetime" or col.date_order not in DATE_ORDERS):
        problems.append(f"{where}: date_order {col.date_order!r} is not one of {list(DATE_ORDERS)} "
                        "(datetime columns only)")
    if col.timezone is not None:
        try:
            ZoneInfo(col.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            problems.append(f"{where}: timezone {col.timezone!r} is not a time zone name (e.g. Europe/Paris)")
        if col.kind != "datetime":
            problems.append(f"{where}: timezone is only for datetime columns")
    return problems


def infer_source(source: str | Path | SqlSource, spec: ProjectSpec, current: Schema | None = None,
                 base: str | Path = ".") -> Schema:
    """A schema of a source's data, inferred batch by batch by the first ingest's rules (the first
    batch decides roles and kinds, every batch the ranges, domains and null rates): the target, id and
    timestamp from the project file, excluded columns and identifiers left out, `features` obeyed.
    Columns `current` already reads as the project file says are read by its rules (spellings, number
    formats, zones), so a later file widens them instead of looking like a new kind; `evolve` then
    merges the two. `source` is a path (relative to `base`), folder, glob or SqlSource.
    Raises DataError for an unreadable or empty source, or one that lacks a column the project file names."""
    layout: Schema | None = None
    stats: DatasetStats | None = None
    for batch in iter_batches(source, base, types=current.kinds if current else None):
        if layout is None:
            layout = _read_as(Schema.layout(batch, spec), current, spec)
            stats = DatasetStats(layout.kinds)
        stats.update(layout.conform(batch)[0])
    if layout is None or stats is None:
        raise DataError(f"{source}: no rows", path=str(source))
    return layout.from_stats(stats)


def _read_as(layout: Schema, current: Schema | None, spec: ProjectSpec) -> Schema:
    """`layout` (inferred from new data) with each column `current` has in the same role and in the kind
    the project file wants read as `current` reads it (no ranges or domains yet)."""
    if current is None:
        return layout
    known = {c.name: c for c in current.columns}
    named = _named_kinds(spec)
    columns = []
    for col in layout.columns:
        old = known.get(col.name)
        if old is not None and old.role == col.role and named.get(col.name, old.kind) == old.kind:
            col = replace(old, nullable=True, max_null_rate=1.0, min=None, max=None, categories=None)
        elif old is not None:  # read again in a new kind from raw text: null tokens as the first ingest read them
            col = replace(col, not_missing=old.not_missing)
        columns.append(col)
    return Schema(columns, dict(layout.ignored))


def _named_kinds(spec: ProjectSpec | None) -> dict[str, str]:
    """Column -> the kind the project file names it under (features.numeric/categorical/datetime)."""
    if spec is None:
        return {}
    return {name: kind for kind in ("numeric", "categorical", "datetime")
            for name in getattr(spec.features, kind) or []}


# Reasons `Schema.infer` records for columns the project file left out: re-decided by each evolve, so that
# a column taken out of features.exclude (or infer_others turned back on) is read again.
_BY_PROJECT_FILE = ("features.exclude", "features.infer_others")
_NOT_NAMED = "not named under features.numeric, categorical or datetime, and features.infer_others is false"


def evolve(current: Schema, observed: Schema, spec: ProjectSpec | None = None) -> Schema:
    """`current` widened to admit what `observed` (inferred from new data, best by `infer_source`)
    saw, and brought in line with the project file `spec`: the same rules as the first ingest.

    Ranges grow, new categories join the domain, a column that now has nulls becomes nullable. New
    columns join as `observed` inferred them (identifiers, free text and excluded columns are left out
    with why); columns the new data lacks are kept (removing one is an edit of the file). With `spec`:
    a feature it excludes (features.exclude, or not named while features.infer_others is false) moves to
    `ignored`; a column it names under another kind than the schema's takes that kind, read from the new
    data; a column the schema ignores joins when it names it, or when it was left out only by a setting
    of the project file that no longer holds. Without `spec`, only the widening and the new columns."""
    seen = {c.name: c for c in observed.columns}
    named = _named_kinds(spec)
    excluded = set(spec.features.exclude) if spec is not None else set()
    only_named = spec is not None and not spec.features.infer_others
    out, dropped = [], {}
    for col in current.columns:
        new = seen.pop(col.name, None)
        if col.role == "feature" and col.name in excluded:
            dropped[col.name] = "features.exclude in the project file"
            continue
        if col.role == "feature" and only_named and col.name not in named:
            dropped[col.name] = _NOT_NAMED
            continue
        if col.role == "feature" and new is not None and named.get(col.name, col.kind) == new.kind != col.kind:
            out.append(new)  # the project file names this kind: the new data's values, read that way
            continue
        if new is None or new.kind != col.kind:
            out.append(col)
            continue
        lo = min(v for v in (col.min, new.min) if v is not None) if col.min is not None or new.min is not None else None
        hi = max(v for v in (col.max, new.max) if v is not None) if col.max is not None or new.max is not None else None
        categories = col.categories
        if col.categories is not None:
            categories = sorted(set(col.categories) | set(new.categories or [])) if new.categories is not None else None
        out.append(replace(col, min=lo, max=hi, categories=categories, nullable=col.nullable or new.nullable,
                           max_null_rate=max(col.max_null_rate, new.max_null_rate)))
    # An ignored column stays ignored (an identifier, or moved there by hand), unless the project file
    # now names it, or only a project-file setting had left it out: then the new data decides.
    sticky = {n for n, why in current.ignored.items()
              if not (any(key in why for key in _BY_PROJECT_FILE) and (n in seen or n in observed.ignored))}
    out += [c for c in seen.values() if c.role == "feature" and (c.name not in sticky or c.name in named)]
    kept = {c.name for c in out}
    ignored = {n: why for n, why in current.ignored.items() if n in sticky and n not in kept}
    ignored |= {n: why for n, why in dropped.items() if n not in kept}
    ignored |= {n: why for n, why in observed.ignored.items() if n not in kept and n not in ignored}
    return Schema(out, ignored)


def accept_schema(store: Store, schema: Schema, reason: str) -> tuple[int, bool]:
    """Make `schema` the current version; (version, False) when it equals the current one already."""
    t = store.tables.schemas
    with store.engine.begin() as conn:
        row = conn.execute(sa.select(t.c.version, t.c.body).order_by(t.c.version.desc()).limit(1)).first()
        if row is not None and Schema.from_dict(row.body) == schema:
            return row.version, False
        version = conn.execute(t.insert().values(body=schema.to_dict(), reason=reason)).inserted_primary_key[0]
    return version, True


def schema_changes(old: Schema, new: Schema) -> list[str]:
    """What differs between two schemas, one line per change."""
    before, after = {c.name: c for c in old.columns}, {c.name: c for c in new.columns}
    lines = [f"+ column {n!r} ({after[n].kind}, {after[n].role})" for n in after if n not in before]
    lines += [f"- column {n!r}" for n in before if n not in after]
    lines += [f"+ ignored {n!r}: {why}" for n, why in new.ignored.items() if n not in old.ignored]
    lines += [f"- ignored {n!r}" for n in old.ignored if n not in new.ignored]
    for name in before.keys() & after.keys():
        a, b = before[name], after[name]
        for field in ("kind", "role", "dtype", "nullable", "max_null_rate", "min", "max", *_SPELLINGS):
            old, new = getattr(a, field, None), getattr(b, field, None)
            if old != new:
                if field in ("min", "max") and b.kind == "datetime":  # seconds since 1970: shown as times
                    old, new = (None if v is None else _time_text(v) for v in (old, new))
                lines.append(f"~ {name}.{field}: {old} -> {new}")
        if a.categories != b.categories:
            added = sorted(set(b.categories or []) - set(a.categories or []))
            removed = sorted(set(a.categories or []) - set(b.categories or []))
            lines.append(f"~ {name}.categories: +{added} -{removed}" if b.categories is not None
                         else f"~ {name}.categories: no domain check")
    return sorted(lines)


def write_schema_file(store: Store, folder: str | Path, *, overwrite: bool = False) -> Path | None:
    """Write the current schema to `folder/schema.yaml` (not over an existing file unless asked)."""
    t = store.tables.schemas
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(t.c.version, t.c.body).order_by(t.c.version.desc()).limit(1)).first()
    path = Path(folder) / SCHEMA_FILE
    if row is None or (path.exists() and not overwrite):
        return None
    write_atomic(path, schema_yaml(Schema.from_dict(row.body), row.version).encode("utf-8"))  # whole or absent
    return path
