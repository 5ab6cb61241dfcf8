"""Dataset versions: validated against the schema, content-addressed, immutable, deduplicated (by
their rows and the schema version that read them: see `dataset_identity`).

Ingest streams the source batch by batch: each batch is checked, its good rows are appended to a
Parquet file inside the store, and per-column statistics are merged, so memory stays flat however
large the source. Nothing becomes visible until one metadata transaction at the end; a refused or
interrupted ingest leaves the store as it was (at most a temporary file, removed on the way out, or
after a kill when the store is next opened). Ingests commit one at a time (`Store.write_lock`): two
ingests of one file at once give one version, the second reporting it as already stored.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from everloop.data._schema import (
    EXAMPLES,
    Anomaly,
    Schema,
    ValidationReport,
    null_rate_message,
    null_rate_too_high,
)
from everloop.data._sources import TypedReadFailed, iter_batches
from everloop.data._stats import DatasetStats
from everloop.errors import DataError, NotFoundError
from everloop.spec import ProjectSpec, SqlSource
from everloop.store import Store

IngestMode = Literal["reject", "quarantine"]
REASON_COLUMN = "_everloop_reason"


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
    stats: dict[str, Any]
    quarantine: str | None = None  # artifact of the refused rows, each with its reason
    quarantined: int = 0
    deduplicated: bool = False
    notes: list[str] = field(default_factory=list)  # how the source was read (a sniffed delimiter), to show

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "stats"}


def ingest(store: Store, spec: ProjectSpec, path: str | Path | None = None, *, base: str | Path = ".",
           parent: int | None = None, mode: IngestMode = "reject",
           progress: Callable[[int], None] | None = None) -> DatasetVersion:
    """Read a source (the spec's, or `path`) in batches, validate it, and store it as a dataset version.

    mode="reject": any error-level anomaly refuses the whole source, with a report of all of them.
    mode="quarantine": rows with errors of their own are set aside (stored beside the version, each
    with its reason) and the good rows become the version; column-level errors still refuse it."""
    source = path if path is not None else spec.data.source
    label = source if isinstance(source, SqlSource) else str(source)
    name = f"sql: {label.query}" if isinstance(label, SqlSource) else label
    schema_row = current_schema(store)
    types = schema_row[1].kinds if schema_row else None
    notes: list[str] = []
    try:
        batches = iter_batches(source, base, types=types, notes=notes)
        version = _ingest(store, spec, batches, name, schema_row, mode, parent, progress)
    except TypedReadFailed:  # a cell did not parse: read again as text, to report every bad cell
        batches = iter_batches(source, base, as_text=True)
        version = _ingest(store, spec, batches, name, schema_row, mode, parent, progress)
    return replace(version, notes=notes) if notes else version


def ingest_frame(store: Store, spec: ProjectSpec, frame: pd.DataFrame, *, source: str,
                 parent: int | None = None, mode: IngestMode = "reject") -> DatasetVersion:
    """Validate an in-memory frame against the current schema (inferring it the first time) and store it."""
    return _ingest(store, spec, [frame], source, current_schema(store), mode, parent, None)


def validate(store: Store, spec: ProjectSpec, path: str | Path | None = None, *,
             base: str | Path = ".") -> ValidationReport:
    """Check a source against the current schema (or one inferred from it) without storing anything."""
    source = path if path is not None else spec.data.source
    schema_row = current_schema(store)
    types = schema_row[1].kinds if schema_row else None
    try:
        return _scan(spec, iter_batches(source, base, types=types), schema_row, None).report
    except TypedReadFailed:
        return _scan(spec, iter_batches(source, base, as_text=True), schema_row, None).report


class _Scan:
    """The state of one pass over a source."""

    def __init__(self) -> None:
        self.report = ValidationReport(rows=0)
        self.layout: Schema | None = None
        self.stats: DatasetStats | None = None
        self.content = hashlib.sha256()
        self.id_hashes: list[np.ndarray] = []
        self.id_rows: list[np.ndarray] = []  # the source row of each hashed id
        self.good_rows = 0
        self.bad_rows = 0
        self.column_errors: list[Anomaly] = []


def _scan(spec: ProjectSpec, batches: Iterable[pd.DataFrame], schema_row: tuple[int, Schema] | None,
          sink: Callable[[pd.DataFrame, pd.DataFrame | None], None] | None, quarantine: bool = False,
          progress: Callable[[int], None] | None = None) -> _Scan:
    """Check every batch, and hand each batch's good rows (with `quarantine`, also its bad rows and
    their reasons) to `sink` while the source can still be accepted; the scan always goes to the end,
    so that the report counts every anomaly."""
    scan = _Scan()
    schema = schema_row[1] if schema_row else None
    offset = 0
    for batch in batches:
        batch = batch.reset_index(drop=True)
        if schema is None and scan.layout is None:
            scan.layout = Schema.layout(batch, spec)
        active = schema or scan.layout
        if scan.stats is None:
            scan.stats = DatasetStats(active.kinds)
        checked = active.check(batch, mode="dataset", coerce=True, whole=False)
        scan.report.merge(checked.report, offset)
        scan.column_errors += [a for a in checked.report.errors if a.kind in ("missing_column", "empty")]
        good, bad = checked.frame, None
        if checked.bad_rows is not None:
            good = good[~checked.bad_rows]
            bad = batch[checked.bad_rows].astype(str).assign(**{REASON_COLUMN: checked.row_reasons()})
            bad.insert(0, "_everloop_row", np.flatnonzero(checked.bad_rows) + offset + 1)
            scan.bad_rows += len(bad)
        scan.stats.update(good)
        scan.good_rows += len(good)
        for col in active.by_role("id"):
            if col.name in good:
                scan.id_hashes.append(pd.util.hash_array(good[col.name].to_numpy(dtype=object)))
                kept = np.arange(len(batch)) if checked.bad_rows is None else np.flatnonzero(~checked.bad_rows)
                scan.id_rows.append(kept + offset)
        accepting = not scan.column_errors and (quarantine or scan.report.ok)
        if sink is not None and accepting:
            scan.content.update(pd.util.hash_pandas_object(good, index=False).to_numpy().tobytes())
            sink(good, bad)
        offset += len(batch)
        if progress:
            progress(len(batch))
    if offset == 0:
        scan.report.anomalies.append(Anomaly("*", "empty", "error", 0, "no rows"))
        scan.column_errors.append(scan.report.anomalies[-1])
    elif scan.stats is not None:
        _whole_data_checks(schema, scan)
    return scan


def _whole_data_checks(schema: Schema | None, scan: _Scan) -> None:
    """Checks that need every batch: null rates (against a known schema) and duplicate ids."""
    for col in schema.columns if schema else []:
        stats = scan.stats.columns.get(col.name)
        if stats and stats.count and null_rate_too_high(col, stats.null_rate):
            scan.report.anomalies.append(Anomaly(col.name, "null_rate", "warning", stats.nulls,
                                                 f"{stats.nulls} {null_rate_message(col, stats.null_rate)}"))
    if scan.id_hashes:
        hashes = np.concatenate(scan.id_hashes)
        _, first, counts = np.unique(hashes, return_index=True, return_counts=True)
        duplicates = int((counts - 1).sum())
        if duplicates:
            seen = np.zeros(len(hashes), dtype=bool)
            seen[first] = True
            rows = np.concatenate(scan.id_rows)[~seen][:EXAMPLES]
            name = (schema or scan.layout).by_role("id")[0].name
            scan.report.anomalies.append(Anomaly(name, "duplicate_id", "warning", duplicates,
                                                 f"{duplicates} duplicate ids", [int(r) for r in rows]))


def _ingest(store: Store, spec: ProjectSpec, batches: Iterable[pd.DataFrame], source: str,
            schema_row: tuple[int, Schema] | None, mode: IngestMode, parent: int | None,
            progress: Callable[[int], None] | None) -> DatasetVersion:
    with ExitStack() as cleanup:
        good_path = store.artifacts.temp_path(".parquet")
        bad_path = store.artifacts.temp_path(".parquet")
        cleanup.callback(lambda: good_path.unlink(missing_ok=True))
        cleanup.callback(lambda: bad_path.unlink(missing_ok=True))
        writers: dict[str, pq.ParquetWriter] = {}
        cleanup.callback(lambda: [w.close() for w in writers.values()])

        def sink(good: pd.DataFrame, bad: pd.DataFrame | None) -> None:
            _append(writers, "good", good_path, good)
            if bad is not None and len(bad):
                _append(writers, "bad", bad_path, bad)

        scan = _scan(spec, batches, schema_row, sink, mode == "quarantine", progress)
        report = scan.report
        if scan.column_errors or (mode == "reject" and not report.ok):
            raise DataError(f"{source}: {len(report.errors)} problem(s) found, nothing was stored:\n"
                            + "\n".join(f"  - {a.describe()}" for a in report.errors), report=report, path=source)
        if scan.good_rows == 0:
            raise DataError(f"{source}: every row has errors, nothing was stored:\n"
                            + "\n".join(f"  - {a.describe()}" for a in report.errors), report=report, path=source)
        for writer in writers.values():
            writer.close()
        writers.clear()
        schema = schema_row[1] if schema_row else scan.layout.from_stats(scan.stats)
        content = scan.content.hexdigest()
        warnings = [a for a in report.to_dict()["anomalies"] if a["severity"] == "warning"]
        if scan.bad_rows:
            warnings += [a | {"severity": "quarantined"} for a in report.to_dict()["anomalies"] if a["severity"] == "error"]
        t = store.tables
        if schema_row is not None:  # a first ingest (no schema yet) can match no stored version
            with store.engine.connect() as conn:
                found = conn.execute(sa.select(t.datasets).where(
                    t.datasets.c.content_hash == dataset_identity(content, schema_row[0]))).first()
            if found:  # what this read found (a column not in the schema, ...), not what the first one did
                return replace(_row_to_version(found, deduplicated=True), warnings=warnings)
        # Artifacts first: a kill after them leaves only unreferenced blobs, never a row without data.
        artifact = store.artifacts.put_file(good_path)
        quarantine = store.artifacts.put_file(bad_path) if scan.bad_rows else None
        with store.engine.begin() as conn:
            # One ingest commits at a time: a second ingest of the same file, started together with this
            # one, waits here and then finds what this one stored (the schema it inferred, the version).
            store.write_lock(conn)
            schema_version = schema_row[0] if schema_row else _same_schema(conn, store, schema)
            if schema_version is None:
                schema_version = conn.execute(
                    t.schemas.insert().values(body=schema.to_dict(), reason=f"inferred from {source}")
                ).inserted_primary_key[0]
            content_hash = dataset_identity(content, schema_version)
            found = conn.execute(sa.select(t.datasets)
                                 .where(t.datasets.c.content_hash == content_hash)).first()
            if found:
                return replace(_row_to_version(found, deduplicated=True), warnings=warnings)
            values = dict(content_hash=content_hash, artifact=artifact, source=source, rows=scan.good_rows,
                          columns=len(schema.columns), schema_version=schema_version, parent=parent,
                          warnings=warnings, stats=scan.stats.to_dict(), quarantine=quarantine,
                          quarantined=scan.bad_rows)
            version = conn.execute(t.datasets.insert().values(**values)).inserted_primary_key[0]
            row = conn.execute(sa.select(t.datasets).where(t.datasets.c.version == version)).first()
        return _row_to_version(row)


def _same_schema(conn: sa.Connection, store: Store, schema: Schema) -> int | None:
    """The version of the newest stored schema when it is `schema` (an ingest of the same source that
    committed while this one read it inferred it too), else None."""
    t = store.tables.schemas
    row = conn.execute(sa.select(t.c.version, t.c.body).order_by(t.c.version.desc()).limit(1)).first()
    as_stored = json.loads(store.tables.dumps_json(schema.to_dict()))  # as the JSON column gives it back
    return row.version if row is not None and row.body == as_stored else None


def dataset_identity(content: str, schema_version: int) -> str:
    """A dataset version's `content_hash`: sha256 of its rows as read (`content`, the hex digest of the
    stored values) and of the schema version that read them. The same file read under another schema
    (a column added, a kind changed) is another dataset, never "already ingested"."""
    return hashlib.sha256(f"{content} schema v{schema_version}".encode()).hexdigest()


def _append(writers: dict[str, pq.ParquetWriter], key: str, path: Path, frame: pd.DataFrame) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if key not in writers:
        writers[key] = pq.ParquetWriter(path, table.schema)
    elif table.schema != writers[key].schema:
        table = table.cast(writers[key].schema, safe=False)
    writers[key].write_table(table)


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


def load_quarantine(store: Store, dataset: DatasetVersion) -> pd.DataFrame:
    """The rows set aside when the version was ingested in quarantine mode, each with its reason."""
    if not dataset.quarantine:
        return pd.DataFrame(columns=["_everloop_row", REASON_COLUMN])
    return store.get_frame(dataset.quarantine)


def _row_to_version(row: Any, deduplicated: bool = False) -> DatasetVersion:
    m = row._mapping
    return DatasetVersion(version=m["version"], content_hash=m["content_hash"], artifact=m["artifact"],
                          source=m["source"], rows=m["rows"], columns=m["columns"],
                          schema_version=m["schema_version"], parent=m["parent"], created_at=m["created_at"],
                          warnings=m["warnings"], stats=m["stats"], quarantine=m["quarantine"],
                          quarantined=m["quarantined"], deduplicated=deduplicated)
