"""The schema as a human-readable, editable YAML file (`schema.yaml` beside `everloop.yaml`).

The store keeps every accepted version; the file is where people read and change it. The first
ingest writes it; `everloop schema accept` makes an edited file (or a schema evolved from new
data) the current version, so that a changed expectation is a recorded decision, never an accident.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from everloop.data._schema import NUMBER_FORMATS, SCHEMA_FORMAT, ColumnSchema, Schema
from everloop.errors import SpecError
from everloop.spec import ProjectSpec, describe_errors
from everloop.store import Store

SCHEMA_FILE = "schema.yaml"


class _Column(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["numeric", "categorical", "datetime"]
    role: Literal["feature", "target", "id", "timestamp"] = "feature"
    dtype: Literal["float", "int", "string", "bool", "datetime"] = "float"
    nullable: bool = False
    max_null_rate: float = Field(0.0, ge=0, le=1)
    min: float | None = None
    max: float | None = None
    categories: list[str] | None = None
    # How values are written (see ColumnSchema and docs/data.md, "Types and spellings"):
    true_values: list[str] | None = None
    false_values: list[str] | None = None
    number_format: str | None = None
    timezone: str | None = None


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
        if col.categories is not None:
            entry["categories"] = col.categories
        for spelling in ("true_values", "false_values", "number_format", "timezone"):  # only where they apply
            if getattr(col, spelling) is not None:
                entry[spelling] = getattr(col, spelling)
        body["columns"][col.name] = entry
    if schema.ignored:
        body["ignored"] = dict(schema.ignored)
    header = (f"# everloop data schema{f' (version {version})' if version else ''}.\n"
              "# Ranges were inferred with a margin of a quarter of the observed span; categories are the ones seen.\n"
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
        if col.kind == "numeric" and col.min is not None and col.max is not None and col.min > col.max:
            problems.append(f"columns.{col.name}: min {col.min} is above max {col.max}")
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
    if col.timezone is not None:
        try:
            ZoneInfo(col.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            problems.append(f"{where}: timezone {col.timezone!r} is not a time zone name (e.g. Europe/Paris)")
        if col.kind != "datetime":
            problems.append(f"{where}: timezone is only for datetime columns")
    return problems


def evolve(current: Schema, observed: Schema, spec: ProjectSpec | None = None) -> Schema:
    """`current` widened to admit what `observed` (inferred from new data) saw: ranges grow, new
    categories join the domain, a column that now has nulls becomes nullable. New columns are added
    as features; columns the new data lacks are kept (removing one is an edit of the file). A column the
    current schema ignores stays ignored unless `spec` names it under features.numeric/categorical/datetime
    (then it is added with that kind); columns `observed` ignores join the ignored ones with their reasons."""
    seen = {c.name: c for c in observed.columns}
    out = []
    for col in current.columns:
        new = seen.pop(col.name, None)
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
    named = set() if spec is None else {
        n for kind in ("numeric", "categorical", "datetime") for n in getattr(spec.features, kind) or []}
    out += [c for c in seen.values()
            if c.role == "feature" and (c.name not in current.ignored or c.name in named)]
    kept = {c.name for c in out}
    ignored = {n: why for n, why in current.ignored.items() if n not in kept}
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
        for field in ("kind", "role", "dtype", "nullable", "max_null_rate", "min", "max", "true_values",
                      "false_values", "number_format", "timezone"):
            if getattr(a, field) != getattr(b, field):
                lines.append(f"~ {name}.{field}: {getattr(a, field)} -> {getattr(b, field)}")
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
    path.write_text(schema_yaml(Schema.from_dict(row.body), row.version), encoding="utf-8")
    return path
