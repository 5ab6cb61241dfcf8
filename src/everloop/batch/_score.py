"""Batch scoring: a file streamed in chunks through the production artifact into a CSV or Parquet file.

The output's format follows its extension; it is written to a temporary file beside it and renamed
into place, so it appears whole or not at all, with the mode any new file gets (the umask decides).
Rows with errors of their own are set aside (unless `strict`) into a side file of the same format,
`<output stem>.rejected<suffix>`, written the same way: the input's columns as text, `row` (data row
from 1) and `reason`. Whole-file problems (a missing column, an unreadable file) refuse everything.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from everloop.data import Anomaly, ValidationReport, iter_batches
from everloop.errors import DataError
from everloop.registry import PRODUCTION, load_model
from everloop.store import Store
from everloop.train import TrainedModel


OUTPUT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class BatchResult:
    """What `score_file` wrote: `rows` scored into `output` (`format` csv or parquet, with `columns`),
    `rejected` rows set aside into `rejected_output` (None when there were none), and the validation
    anomalies of the input: `warnings` (unseen categories, nulls, values out of range) and `errors`
    (why rows were set aside), anomaly dicts of `ValidationReport.to_dict`, counted over the whole
    file, rows numbered from 0."""

    rows: int
    output: str
    model_version: int | None
    format: str = "parquet"
    columns: list[str] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    rejected: int = 0
    rejected_output: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_format(output: str | Path) -> str:
    """"csv" or "parquet", from the output file's extension (.csv; .parquet or .pq).

    Raises DataError for any other extension (naming the allowed ones) and for a path that is a folder."""
    path = Path(output)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give a file name, e.g. {path / 'predictions.parquet'}",
                        path=str(path))
    kind = OUTPUT_FORMATS.get(path.suffix.lower())
    if kind is None:
        got = f"extension {path.suffix!r}" if path.suffix else "no extension"
        raise DataError(f"{path}: output file has {got}; expected one of {', '.join(OUTPUT_FORMATS)} "
                        "(the extension sets the format)", path=str(path))
    return kind


def rejected_path(output: str | Path) -> Path:
    """Where `score_file` sets aside the rows it refused: `<output stem>.rejected<suffix>` beside `output`."""
    output = Path(output)
    return output.with_name(f"{output.stem}.rejected{output.suffix}")


def score_file(store: Store, source: str | Path, output: str | Path, *, model: int | str = PRODUCTION,
               chunk_rows: int = 100_000, keep: Sequence[str] = (),
               progress: Callable[[int], None] | None = None, strict: bool = False) -> BatchResult:
    """Score every row of a CSV/Parquet file (or folder or glob of them) into `output`, whose extension sets
    its format (.csv, or .parquet/.pq); the output appears whole or not at all.

    The output has the input's id and timestamp columns (those the schema names, when present), the
    `keep` columns as they were read, then `prediction`, `proba_<class>` per class (classifiers) and
    `model_version`. Rows with errors of their own go to `rejected_path(output)` with their reasons
    (see the module docstring); a side file left there by an earlier run is removed when none is set
    aside. Raises DataError for an unsupported output extension, a `keep` column the input lacks or
    whose name an output column takes, unreadable input, a missing column, no row left to score, or
    (with `strict`) any row with errors: nothing is written then. NotFoundError for an unknown model
    version or alias."""
    kind = output_format(output)  # before any work: a wrong name must not cost a whole scoring run
    source = Path(source).resolve()
    target = Path(output).resolve()
    side = rejected_path(target)
    if source in (target, side) or (source.is_dir() and source in target.parents):
        raise DataError(f"{output}: the output would overwrite (or land inside) the input {source}; "
                        "write the predictions elsewhere", path=str(output))
    if not target.parent.is_dir():  # a typo in a path must not create a new tree of folders
        raise DataError(f"{output}: the folder {target.parent} does not exist; create it first",
                        path=str(output))
    trained = load_model(store, model)
    # Read by the model's schema, never inferred again: CSV cells arrive as text and each column is parsed
    # as the first ingest read it (bool spellings, codes with leading zeros, number formats, date/times).
    chunks = iter_batches(source, types=trained.schema.kinds, batch_rows=chunk_rows)
    return score_chunks(trained, chunks, Path(output), progress=progress, keep=keep, kind=kind, strict=strict)


def score_chunks(trained: TrainedModel, chunks: Iterable[pd.DataFrame], output: Path,
                 progress: Callable[[int], None] | None = None, keep: Sequence[str] = (),
                 kind: str | None = None, strict: bool = False) -> BatchResult:
    """Score `chunks` into `output` (format `kind`, else from its extension) through a temporary file
    beside it, renamed into place at the end, and set rows with errors aside; see `score_file`."""
    kind = kind or output_format(output)
    side = rejected_path(output)
    scored = _TempFile(output, kind)
    aside: _TempFile | None = None  # made at the first bad row: no side file when every row is good
    offset = 0  # input rows read so far
    report = ValidationReport(rows=0)
    passthrough = [c.name for c in trained.schema.columns if c.role in ("id", "timestamp")]
    columns: list[str] = []
    try:
        for chunk in chunks:
            if not offset:
                passthrough = _output_columns(passthrough, list(keep), list(chunk.columns), trained)
            checked = trained.schema.check(chunk, mode="request", coerce=True)
            checked.report.anomalies = [a for a in checked.report.anomalies  # --keep asked for these
                                        if not (a.kind == "unexpected_column" and a.column in keep)]
            report.merge(checked.report, offset)
            whole_file = [a for a in checked.report.errors if a.kind in ("missing_column", "empty")]
            if whole_file or (strict and not checked.report.ok):
                problems = "\n".join(f"  - {a.describe()}" for a in report.errors)
                raise DataError(f"rows do not match the model's schema; nothing was written (rows count data "
                                f"rows from 1):\n{problems}", report=report)
            features, good = checked.frame, chunk
            if checked.bad_rows is not None:
                bad = checked.bad_rows
                aside = aside or _TempFile(side, kind)
                aside.write(_rejected_rows(chunk, bad, checked.row_reasons(), offset), offset)
                features, good = features[~bad], chunk[~bad]
            if len(good):
                scored.write(_scored_rows(trained, features, good, passthrough), offset)
                columns = scored.columns
            offset += len(chunk)
            if progress:
                progress(len(chunk))
        if offset == 0:  # the same anomaly (and exit code) as `validate` and `ingest` give a header-only file
            report.anomalies.append(Anomaly("*", "empty", "error", 0, "no rows"))
            raise DataError("the input has no rows; nothing was written", report=report)
        if scored.rows == 0:
            problems = "\n".join(f"  - {a.describe()}" for a in report.errors)
            raise DataError(f"every row has errors; nothing was written (rows count data rows from 1):\n"
                            f"{problems}", report=report)
        if aside is not None:  # the side file first: an output never appears without its rejected rows
            aside.commit()
        else:  # one left by an earlier run into this output would describe rows it no longer had
            side.unlink(missing_ok=True)
        scored.commit()
    finally:
        scored.discard()
        if aside is not None:
            aside.discard()
    anomalies = report.to_dict()["anomalies"]
    return BatchResult(scored.rows, str(output), trained.version, kind, columns,
                       [a for a in anomalies if a["severity"] == "warning"],
                       aside.rows if aside else 0, str(side) if aside else None,
                       [a for a in anomalies if a["severity"] == "error"])


def _scored_rows(trained: TrainedModel, features: pd.DataFrame, rows: pd.DataFrame,
                 passthrough: list[str]) -> pd.DataFrame:
    """The output's rows for good input `rows` (their conformed `features`): passthrough columns,
    prediction, per-class probabilities, model version."""
    predictions = trained.predict_conformed(features)
    out = pd.DataFrame({c: rows[c].to_numpy() for c in passthrough})
    out["prediction"] = predictions.labels
    if predictions.proba is not None:
        for i, cls in enumerate(predictions.classes):
            out[f"proba_{cls}"] = predictions.proba[:, i]
    out["model_version"] = trained.version
    return out


def _rejected_rows(chunk: pd.DataFrame, bad: np.ndarray, reasons: np.ndarray, offset: int) -> pd.DataFrame:
    """The side file's rows: the `bad` rows of `chunk` as text (nulls kept), their data row numbers from 1
    (`offset` rows came before the chunk) and reasons. `row`/`reason` get a leading '_' while the input
    has a column of that name."""
    out = chunk[bad].astype("string").reset_index(drop=True)
    row, reason = _free_name("row", out.columns), _free_name("reason", out.columns)
    out.insert(0, row, np.flatnonzero(bad) + offset + 1)
    out[reason] = pd.array(reasons, dtype="string")
    return out


def _free_name(name: str, taken: Iterable[str]) -> str:
    taken = set(taken)
    while name in taken:
        name = "_" + name
    return name


class _TempFile:
    """Frames appended to a new temporary file beside `path` (csv or parquet); `commit` renames it onto
    `path`, `discard` removes what is left (always safe to call)."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path, self.kind = path, kind
        try:
            self.tmp, self.handle = _new_temp(path)
        except OSError as exc:
            raise DataError(f"{path}: cannot write there: {exc.strerror or exc}", path=str(path)) from None
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0
        self.columns: list[str] = []

    def write(self, frame: pd.DataFrame, offset: int) -> None:
        """Append `frame`, whose first row is data row `offset + 1` of the input (named in type errors)."""
        if self.kind == "csv":
            frame.to_csv(self.handle, header=self.rows == 0, index=False)
        else:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.handle, table.schema)
            elif table.schema != self.writer.schema:  # e.g. a kept column that is all null in one chunk
                table = _same_types(table, self.writer.schema, offset)
            self.writer.write_table(table)
        self.rows += len(frame)
        self.columns = [str(c) for c in frame.columns]

    def commit(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.handle.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


def _output_columns(passthrough: list[str], keep: list[str], present: list[str],
                    trained: TrainedModel) -> list[str]:
    """The input columns the output carries: the schema's id/timestamp columns the input has, then `keep`.
    Raises DataError for a kept column the input lacks, or one named like an output column."""
    missing = [c for c in keep if c not in present]
    if missing:
        raise DataError(f"--keep {', '.join(missing)}: not a column of the input; its columns are: "
                        f"{', '.join(present)}")
    made = {"prediction", "model_version"} | {f"proba_{c}" for c in trained.classes or []}
    clash = [c for c in keep if c in made]
    if clash:
        raise DataError(f"--keep {', '.join(clash)}: the output makes a column of that name; rename it in the "
                        "input first")
    wanted = [c for c in passthrough if c in present] + keep
    return list(dict.fromkeys(wanted))  # a kept id column once


def _same_types(table: pa.Table, schema: pa.Schema, offset: int) -> pa.Table:
    """A later chunk's table cast to the first chunk's column types (Parquet has one schema per file)."""
    try:
        return table.cast(schema, safe=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        changed = [f.name for f in table.schema if f.name in schema.names and schema.field(f.name).type != f.type]
        before = ", ".join(str(schema.field(c).type) for c in changed)
        raise DataError(f"column(s) {', '.join(changed)} change type from data row {offset + 1} on ({before} "
                        "before); write a .csv output or make the input's types consistent") from None


def _new_temp(output: Path) -> tuple[Path, IO[bytes]]:
    """A new temporary file beside `output` (same file system: the rename is atomic). Opened with mode
    0o666 so that the umask sets its permissions, as for any new file (mkstemp would make it 0600)."""
    tmp = output.parent / f".tmp-{uuid.uuid4().hex[:12]}-{output.name}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return tmp, os.fdopen(fd, "wb")
