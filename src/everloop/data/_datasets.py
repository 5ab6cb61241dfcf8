"""Dataset versions: validated against the schema, content-addressed, immutable, deduplicated."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa

from everloop.data._schema import Schema, ValidationReport
from everloop.data._sources import read_source
from everloop.errors import DataError, NotFoundError
from everloop.spec import ProjectSpec
from everloop.store import Store


@dataclass(frozen=True)
class DatasetVersion:
    version: int
    content_hash: str
    artifact: str
    source: str
    rows: int
    columns: int
    schema_version: int
    parent: int | None
    created_at: float
    warnings: list[dict[str, Any]]
    deduplicated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def ingest(store: Store, spec: ProjectSpec, path: str | Path | None = None, *, base: str | Path = ".",
           parent: int | None = None) -> DatasetVersion:
    """Read a source (the spec's, or `path`), validate it, and store it as a dataset version."""
    source = path if path is not None else spec.data.source
    frame = read_source(source, base)
    return ingest_frame(store, spec, frame, source=str(source), parent=parent)


def ingest_frame(store: Store, spec: ProjectSpec, frame: pd.DataFrame, *, source: str,
                 parent: int | None = None) -> DatasetVersion:
    """Validate `frame` against the current schema (inferring it the first time) and store it.

    A frame with error-level anomalies is refused with a `DataError` carrying the report, and the
    store is left exactly as it was.
    """
    schema_row = current_schema(store)
    schema = schema_row[1] if schema_row else Schema.infer(frame, spec)
    conformed, report = schema.conform(frame, mode="dataset")
    if not report.ok:
        raise DataError(f"{source}: {len(report.errors)} problem(s) found, nothing was stored:\n"
                        + "\n".join(f"  - {a.describe()}" for a in report.errors), report=report, path=source)
    content_hash = _content_hash(conformed)
    t = store.tables
    with store.engine.begin() as conn:
        found = conn.execute(sa.select(t.datasets).where(t.datasets.c.content_hash == content_hash)).first()
        if found:
            return _row_to_version(found, deduplicated=True)
    # The artifact first: a kill after it leaves only an unreferenced blob, never a row without data.
    artifact = store.put_frame(conformed)
    with store.engine.begin() as conn:
        if schema_row is None:
            schema_version = conn.execute(
                t.schemas.insert().values(body=schema.to_dict(), reason=f"inferred from {source}")
            ).inserted_primary_key[0]
        else:
            schema_version = schema_row[0]
        values = dict(content_hash=content_hash, artifact=artifact, source=source, rows=len(conformed),
                      columns=conformed.shape[1], schema_version=schema_version, parent=parent,
                      warnings=report.to_dict()["anomalies"])
        version = conn.execute(t.datasets.insert().values(**values)).inserted_primary_key[0]
        row = conn.execute(sa.select(t.datasets).where(t.datasets.c.version == version)).first()
    return _row_to_version(row)


def validate(store: Store, spec: ProjectSpec, path: str | Path | None = None, *,
             base: str | Path = ".") -> ValidationReport:
    """Check a source against the current schema (or one inferred from it) without storing anything."""
    source = path if path is not None else spec.data.source
    frame = read_source(source, base)
    schema_row = current_schema(store)
    schema = schema_row[1] if schema_row else Schema.infer(frame, spec)
    return schema.conform(frame, mode="dataset")[1]


def current_schema(store: Store) -> tuple[int, Schema] | None:
    t = store.tables.schemas
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(t.c.version, t.c.body).order_by(t.c.version.desc()).limit(1)).first()
    return (row.version, Schema.from_dict(row.body)) if row else None


def get_schema(store: Store, version: int) -> Schema:
    t = store.tables.schemas
    with store.engine.connect() as conn:
        body = conn.execute(sa.select(t.c.body).where(t.c.version == version)).scalar()
    if body is None:
        raise NotFoundError(f"schema version {version} does not exist")
    return Schema.from_dict(body)


def list_datasets(store: Store) -> list[DatasetVersion]:
    t = store.tables.datasets
    with store.engine.connect() as conn:
        return [_row_to_version(r) for r in conn.execute(sa.select(t).order_by(t.c.version))]


def get_dataset(store: Store, version: int | None = None) -> DatasetVersion:
    """A dataset version, or the latest when `version` is None."""
    t = store.tables.datasets
    query = sa.select(t).order_by(t.c.version.desc()).limit(1) if version is None else sa.select(t).where(t.c.version == version)
    with store.engine.connect() as conn:
        row = conn.execute(query).first()
    if row is None:
        raise NotFoundError("no dataset has been ingested yet; run 'everloop ingest'" if version is None
                            else f"dataset version {version} does not exist")
    return _row_to_version(row)


def load_frame(store: Store, dataset: DatasetVersion) -> pd.DataFrame:
    """The rows of a dataset version, read from its verified artifact."""
    return store.get_frame(dataset.artifact)


def _content_hash(frame: pd.DataFrame) -> str:
    digest = hashlib.sha256()
    digest.update(repr([(str(c), str(frame[c].dtype)) for c in frame.columns]).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def _row_to_version(row: Any, deduplicated: bool = False) -> DatasetVersion:
    m = row._mapping
    return DatasetVersion(version=m["version"], content_hash=m["content_hash"], artifact=m["artifact"],
                          source=m["source"], rows=m["rows"], columns=m["columns"],
                          schema_version=m["schema_version"], parent=m["parent"], created_at=m["created_at"],
                          warnings=m["warnings"], deduplicated=deduplicated)
