"""A batch job's resumable state: finished chunks kept as parts beside the output until it is whole.

Each chunk's scored rows go to `<output folder>/.<output name>.everloop-job/part-NNNNNN.<arrow|csv>`
(rows it set aside to `rejected-NNNNNN...`), then `state.json` records the chunk as finished; every
file is written under a temporary name and renamed, so a kill leaves whole files or none. At the end
the parts are joined into the output in order and the folder is removed. `resume` checks `job.json`
(the input files' sizes and modification times, the model version, the options), skips the finished
chunks' input and goes on. The output is byte-identical to an uninterrupted run's: both are joined
from the same parts in the same way, and a prediction id is the job's prefix plus a counter.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
from dataclasses import asdict
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from everloop.data import Anomaly, ValidationReport, source_files
from everloop.errors import DataError
from everloop.spec import SqlSource
from everloop.spec._secrets import scrub_url

JOB_FORMAT = 1
PART = "part"
REJECTED = "rejected"


def job_dir(output: Path) -> Path:
    """Where a job writing `output` keeps its parts and state."""
    return output.parent / f".{output.name}.everloop-job"


def job_prefix(settings: dict[str, Any]) -> str:
    """The job's prediction-id prefix (16 hex digits, the `worker` of its prediction-log rows): the same
    for the same input files scored by the same model version, so a run again gives byte-identical
    output and replaces, not doubles, its logged predictions. A SQL query's rows may change between
    runs: each run of one gets a prefix of its own."""
    if "sql" in settings["source"]:
        return secrets.token_hex(8)
    key = json.dumps([settings["source"], settings["model_version"]], sort_keys=True).encode()
    return hashlib.sha256(key).hexdigest()[:16]


def fingerprint(source: Path | SqlSource) -> dict[str, Any]:
    """What identifies the input for `--resume`: each file's path, size and modification time (a folder's
    or glob's files in order), or a SQL source's URL and query (whose rows cannot be checked)."""
    if isinstance(source, SqlSource):
        return {"sql": {"url": scrub_url(source.url, "EVERLOOP_SQL"), "query": source.query}}  # no password on disk
    files = source_files(source)
    return {"files": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.exists()]}


class Job:
    """The parts and state of one batch job writing `output` (format `kind`); see the module docstring.

    `settings` (input fingerprint, model version, options) must equal the unfinished job's for `resume`;
    without `resume` an unfinished job's parts are discarded (`discarded` says how many chunks)."""

    def __init__(self, output: Path, kind: str, settings: dict[str, Any], resume: bool) -> None:
        self.output, self.kind = output, kind
        self.dir = job_dir(output)
        self.discarded = 0
        self.discarded_prefix: str | None = None
        self.dir.mkdir(exist_ok=True)
        self._lock = open(self.dir / "lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DataError(f"{output}: another everloop predict is writing this output now; wait for it or "
                            "write elsewhere", path=str(output)) from None
        try:
            self._open(output, settings, resume)
        except BaseException:
            self._lock.close()  # the unfinished run's parts stay for a --resume that matches them
            raise

    def _open(self, output: Path, settings: dict[str, Any], resume: bool) -> None:
        old = _read_json(self.dir / "job.json")
        state = _read_json(self.dir / "state.json") if old else None
        self.nothing_to_resume = resume and old is None  # finished, or never started: run it afresh
        if self.nothing_to_resume:
            resume = False
        if resume and "sql" in old["source"]:
            raise DataError(f"{output}: --resume: the unfinished run scored a SQL query, whose rows may come "
                            "back in another order (or changed) when it runs again: the finished chunks "
                            "cannot be trusted; run without --resume to start afresh", path=str(output))
        if resume:
            changed = [k for k in settings if k != "prefix" and old.get(k) != settings[k]]
            if changed:
                raise DataError(f"{output}: --resume: the unfinished run differs in {', '.join(changed)} "
                                f"({_difference(old, settings, changed[0])}); run without --resume to start "
                                "afresh", path=str(output))
            self.settings = old
        else:
            if state:
                self.discarded = state["chunks"]
            self.discarded_prefix = old.get("prefix") if old else None  # its logged rows go too
            self._clear()
            self.settings = dict(settings, prefix=job_prefix(settings), format=JOB_FORMAT)
            _write_json(self.dir / "job.json", self.settings)
            state = None
        state = state or {"chunks": 0, "rows": 0, "scored": 0, "rejected": 0, "report": None, "columns": []}
        self.chunks: int = state["chunks"]  # finished chunks
        self.rows: int = state["rows"]  # input rows in them
        self.scored: int = state["scored"]
        self.rejected: int = state["rejected"]
        self.columns: list[str] = state["columns"]
        self.report = _report_from(state["report"]) if state["report"] else ValidationReport(rows=0)
        self.resumed_chunks = self.chunks if resume else 0
        for part in self.dir.glob("*-*.*"):  # a killed run's parts of chunks it did not finish
            if part.stem.split("-")[-1].isdigit() and int(part.stem.split("-")[-1]) >= self.chunks:
                part.unlink()
        side = f"{output.stem}.rejected{output.suffix}"
        for name in (output.name, side):  # what a join a kill interrupted left
            for tmp in output.parent.glob(f".tmp-*-{name}"):
                tmp.unlink(missing_ok=True)

    @property
    def prefix(self) -> str:
        return self.settings["prefix"]

    def finish_chunk(self, scored: pd.DataFrame | None, rejected: pd.DataFrame | None,
                     report: ValidationReport, rows: int, log: Callable[[], None] | None = None) -> None:
        """Record one more chunk of `rows` input rows as finished: its parts first, then `log` (its
        predictions into the prediction log), then the state. A kill before the state is written
        leaves the chunk unfinished: a resumed run writes its parts and log rows again."""
        if rejected is not None and len(rejected):
            self._write_part(REJECTED, rejected)
            self.rejected += len(rejected)
        if scored is not None and len(scored):
            self._write_part(PART, scored)
            self.scored += len(scored)
            self.columns = [str(c) for c in scored.columns]
        if log is not None:
            log()
        self.report.merge(report, self.rows)
        self.rows += rows
        self.chunks += 1
        _write_json(self.dir / "state.json", {
            "chunks": self.chunks, "rows": self.rows, "scored": self.scored, "rejected": self.rejected,
            "columns": self.columns, "report": {"rows": self.report.rows,
                                                "anomalies": [asdict(a) for a in self.report.anomalies]}})

    def join(self, kind: str, target: Path) -> bool:
        """Join the finished parts of `kind` (PART or REJECTED) into `target` through a temporary file and
        a rename; False (nothing written) when there are none."""
        parts = self._parts(kind)
        if not parts:
            return False
        tmp, handle = _new_temp(target)
        try:
            with handle:
                if self.kind == "csv":
                    for part in parts:
                        with open(part, "rb") as src:
                            shutil.copyfileobj(src, handle, 1 << 20)
                else:
                    import pyarrow.parquet as pq

                    schema = _one_schema(parts)
                    with pq.ParquetWriter(handle, schema) as writer:
                        for part in parts:
                            with pa.memory_map(str(part)) as source:
                                table = pa.ipc.open_file(source).read_all()
                            writer.write_table(_cast(table, schema) if table.schema != schema else table,
                                               row_group_size=max(1, table.num_rows))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def remove(self) -> None:
        """The job is whole: its parts and state go."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def close(self) -> None:
        if not self._lock.closed:
            self._lock.close()

    def _clear(self) -> None:
        for path in self.dir.iterdir():
            if path.name != "lock":
                path.unlink(missing_ok=True)

    def _parts(self, kind: str) -> list[Path]:
        return sorted(self.dir.glob(f"{kind}-*.{'csv' if self.kind == 'csv' else 'arrow'}"))

    def _write_part(self, kind: str, frame: pd.DataFrame) -> None:
        path = self.dir / f"{kind}-{self.chunks:06d}.{'csv' if self.kind == 'csv' else 'arrow'}"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            if self.kind == "csv":  # the header with the first rows of its kind (never by the files there)
                frame.to_csv(handle, header=(self.scored if kind == PART else self.rejected) == 0, index=False)
            else:
                table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
                with pa.ipc.new_file(handle, table.schema) as writer:
                    writer.write_table(table)
        os.replace(tmp, path)


def _cast(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` in `schema`'s types; a column Arrow cannot cast to text (a JSON object from a SQL source)
    is written as text value by value (JSON for objects and lists)."""
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        columns = []
        for field in schema:
            column = table.column(field.name)
            try:
                columns.append(column.cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                text = [None if v is None else v if isinstance(v, str) else json.dumps(v, default=str)
                        for v in column.to_pylist()]
                columns.append(pa.array(text, type=pa.string()).cast(field.type))
        return pa.Table.from_arrays(columns, schema=schema)


def _one_schema(parts: list[Path]) -> pa.Schema:
    """One Parquet schema for every part: a column all null in some chunks takes the others' type, and one
    whose type differs between chunks (a SQL column holding numbers, then text) is written as text."""
    schemas = []
    for part in parts:
        with pa.memory_map(str(part)) as source:
            schemas.append(pa.ipc.open_file(source).schema)
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        fields = []
        for field in schemas[0]:
            kinds = {s.field(field.name).type for s in schemas} - {pa.null()}
            fields.append(field.with_type(kinds.pop() if len(kinds) == 1 else pa.string()))
        return pa.schema(fields)


def _difference(old: dict[str, Any], new: dict[str, Any], key: str) -> str:
    if key == "source":
        return "the input files changed since (size or modification time)"
    return f"was {old.get(key)!r}, now {new.get(key)!r}"


def _report_from(data: dict[str, Any]) -> ValidationReport:
    return ValidationReport(rows=data["rows"], anomalies=[Anomaly(**a) for a in data["anomalies"]])


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)


def _new_temp(output: Path) -> tuple[Path, IO[bytes]]:
    """A new temporary file beside `output` (same file system: the rename is atomic). Opened with mode
    0o666 so that the umask sets its permissions, as for any new file (mkstemp would make it 0600)."""
    tmp = output.parent / f".tmp-{secrets.token_hex(6)}-{output.name}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise DataError(f"{output}: cannot write there: {exc.strerror or exc}", path=str(output)) from None
    return tmp, os.fdopen(fd, "wb")
