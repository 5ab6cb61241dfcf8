"""Read-only views of dataset versions for people (the dashboard; a command could print them too): a
page of versions without their statistics, the current schema with each column's role and
constraints, one version's column summary, and the first quarantined rows read without the rest.

Every query is bounded; no view reads a dataset's rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from everloop.data._datasets import REASON_COLUMN, DatasetVersion
from everloop.data._schema import Schema
from everloop.spec import ProjectSpec
from everloop.store import Store

PAGE_SIZE = 100  # dataset versions per page
QUARANTINE_ROWS = 50  # quarantined rows shown
CATEGORIES_SHOWN = 8  # categories listed per column (then a count)
QUARANTINE_ROW = "_everloop_row"  # a quarantined row's data row in the source, counted from 1
QUARANTINE_REASON = REASON_COLUMN  # ... and why it was set aside


@dataclass(frozen=True)
class DatasetPage:
    """One page of dataset versions, newest first. `datasets`: dicts of version, created_at
    (seconds since the epoch), source, rows, columns, schema_version, parent, quarantined,
    content_hash and `warnings` (how many warnings the ingest recorded); `total`: versions in the
    store; `before`: the version to pass as `before` for the next (older) page, None on the last."""

    datasets: list[dict[str, Any]]
    total: int
    before: int | None


def dataset_page(store: Store, *, limit: int = PAGE_SIZE, before: int | None = None) -> DatasetPage:
    """The `limit` newest dataset versions older than `before` (all when None), newest first, read
    without their column statistics (what `list_datasets` returns, less `stats`, which can be
    large). Raises ValueError for `limit` < 1."""
    if limit < 1:
        raise ValueError(f"limit: expected at least 1, got {limit}")
    t = store.tables.datasets
    c = t.c
    query = (sa.select(c.version, c.created_at, c.source, c.rows, c.columns, c.schema_version,
                       c.parent, c.quarantined, c.content_hash, c.warnings)
             .order_by(c.version.desc()).limit(limit + 1))
    if before is not None:
        query = query.where(c.version < before)
    with store.engine.connect() as conn:
        rows = conn.execute(query).all()
        total = conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
    datasets = [dict(r._mapping) | {"warnings": len(r.warnings or [])} for r in rows[:limit]]
    return DatasetPage(datasets, total, rows[limit - 1].version if len(rows) > limit else None)


def schema_view(store: Store, spec: ProjectSpec) -> dict[str, Any] | None:
    """The current schema for people, None before the first ingest: version, created_at, reason,
    `columns` (name, role, kind, dtype, nullable, max_null_rate, min, max (date/times: seconds
    since the epoch), categories (the first CATEGORIES_SHOWN), category_count, why), `ignored`
    ({name: why}) and `conflicts` (where the project file's features section disagrees:
    `Schema.spec_conflicts`)."""
    t = store.tables.schemas
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(t).order_by(t.c.version.desc()).limit(1)).first()
    if row is None:
        return None
    schema = Schema.from_dict(row.body)
    why = {r.name: r.why for r in schema.column_roles(spec)}
    columns = [{"name": c.name, "role": c.role, "kind": c.kind, "dtype": c.dtype,
                "nullable": c.nullable, "max_null_rate": c.max_null_rate,
                "min": c.min, "max": c.max,
                "categories": (c.categories or [])[:CATEGORIES_SHOWN],
                "category_count": len(c.categories) if c.categories is not None else None,
                "why": why.get(c.name, "")} for c in schema.columns]
    return {"version": row.version, "created_at": row.created_at, "reason": row.reason,
            "columns": columns, "ignored": dict(schema.ignored),
            "conflicts": schema.spec_conflicts(spec)}


def column_summary(dataset: DatasetVersion) -> list[dict[str, Any]]:
    """A dataset version's profile from the statistics its ingest recorded (no rows read): one dict
    per column with kind, count, nulls, null_rate (0..1), and by kind mean, std, min, max (numeric;
    date/times: min and max in seconds since the epoch), distinct, `distinct_at_least` (True when
    the ingest stopped tracking categories at its limit: there are more) and `top` (the most
    frequent categories with their counts, at most CATEGORIES_SHOWN)."""
    out = []
    for name, c in (dataset.stats.get("columns") or {}).items():
        row = {"column": name, "kind": c.get("kind"), "count": c.get("count"),
               "nulls": c.get("nulls"), "null_rate": c.get("null_rate"),
               "mean": c.get("mean"), "std": c.get("std"),
               "min": c.get("min"), "max": c.get("max"), "distinct": c.get("distinct"),
               "distinct_at_least": bool(c.get("other")), "top": []}
        if c.get("categories"):
            ranked = sorted(c["categories"].items(), key=lambda kv: (-kv[1], kv[0]))
            row["top"] = ranked[:CATEGORIES_SHOWN]
        out.append(row)
    return out


def anomaly_summary(dataset: DatasetVersion, examples: int = 10) -> list[dict[str, Any]]:
    """What the ingest of a version found, for people: one dict per anomaly it recorded (severity
    "quarantined" for row errors whose rows were set aside, else "warning"), with column, kind,
    count, message and `rows`: at most `examples` example rows, data rows counted from 1 as every
    message counts them (the store keeps them from 0). Quarantined first, then by column."""
    out = [{"severity": a.get("severity"), "column": a.get("column", ""), "kind": a.get("kind"),
            "count": a.get("count"), "message": a.get("message", ""),
            "rows": [r + 1 for r in (a.get("rows") or [])[:examples]]} for a in dataset.warnings]
    return sorted(out, key=lambda a: (a["severity"] != "quarantined", a["column"]))


def quarantine_head(store: Store, dataset: DatasetVersion,
                    rows: int = QUARANTINE_ROWS) -> pd.DataFrame:
    """The first `rows` rows `load_quarantine` would return (source values as text, `_everloop_row`:
    the data row counted from 1, and the reason), decoding only the first row groups of the
    artifact (which is hashed whole first, to verify it): memory and decoding stay small however
    many rows were set aside. Raises NotFoundError or IntegrityError when the artifact is missing
    or altered."""
    if not dataset.quarantine:
        return pd.DataFrame(columns=[QUARANTINE_ROW, QUARANTINE_REASON])
    path = store.artifacts.open(dataset.quarantine)
    with pq.ParquetFile(path) as parquet:
        batches = []
        for batch in parquet.iter_batches(batch_size=max(rows, 1)):
            batches.append(batch)
            if sum(b.num_rows for b in batches) >= rows:
                break
        table = pa.Table.from_batches(batches, schema=parquet.schema_arrow)
    return table.to_pandas().head(rows)
