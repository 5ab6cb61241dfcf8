"""Batch scoring: a source streamed in chunks through the production artifact into a CSV or Parquet file.

`ChunkScorer` validates and scores one chunk (the same checks, fast feature path and compiled trees as
the service); `BatchWriter` numbers the rows, adds prediction ids, logs them and keeps each chunk as a
finished part of a resumable job (`everloop.batch._job`) until the output is joined, whole, under its
name (through a temporary file and a rename, with the mode any new file gets). Rows with errors of
their own are set aside (unless `strict`) into a side file of the same format, `<output
stem>.rejected<suffix>`: `row` (data row from 1), the input's columns as text and `reason`.
Whole-file problems (a missing column, an unreadable file) refuse everything.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from everloop.batch._job import PART, REJECTED, Job, fingerprint
from everloop.data import ValidationReport, iter_batches, source_files
from everloop.errors import DataError, EverloopError, StoreError
from everloop.registry import PRODUCTION, load_model
from everloop.spec import SqlSource
from everloop.store import Store, prediction_log
from everloop.store._lease import Lease, LeaseBusy
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
    logged: int = 0  # predictions written to the prediction log
    resumed_chunks: int = 0  # chunks an earlier, killed run had finished (with `resume`)
    discarded_chunks: int = 0  # chunks of an unfinished earlier run started afresh (without `resume`)
    seconds: float = 0.0
    compiled: bool = False  # a compiled tree ensemble scored the rows
    notes: list[str] = field(default_factory=list)  # what the user should know about how the run went

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


def score_file(store: Store, source: str | Path | SqlSource, output: str | Path, *,
               model: int | str = PRODUCTION, chunk_rows: int = 100_000, keep: Sequence[str] = (),
               progress: Callable[[int], None] | None = None, strict: bool = False, resume: bool = False,
               log: bool = False, compile_trees: bool | None = None, engine: str = "local",
               address: str | None = None) -> BatchResult:
    """Score every row of a CSV/Parquet file (or folder or glob of them) or SQL query into `output`, whose
    extension sets its format (.csv, or .parquet/.pq); the output appears whole or not at all.

    The output has the input's id and timestamp columns (those the schema names, when present), the
    `keep` columns as they were read, then `prediction`, `proba_<class>` per class (classifiers),
    `model_version` and `prediction_id`. Rows with errors of their own go to `rejected_path(output)` with
    their reasons (see the module docstring); a side file left there by an earlier run is removed when
    none is set aside. Finished chunks are kept until the output is whole (see `everloop.batch._job`):
    `resume` continues a killed run of the same command where it stopped, with a byte-identical result.
    `log` writes the predictions to the store's prediction log (ids as in the output, the id column's
    values as keys), so the monitor sees them and labels join them. `compile_trees`: serve a tree
    ensemble compiled to native code, once it answers like scikit-learn (None: when the input has at
    least COMPILE_ROWS rows, where compiling pays for itself). `engine`: "local" (this process) or "ray":
    the same chunks scored on Ray Data's actors (`everloop.batch._ray`), on the Ray this process is
    connected to, the cluster at `address`, else a new local Ray; the same output, row for row.

    Raises DataError for an unsupported output extension, a `keep` column the input lacks or whose name
    an output column takes, unreadable input, a missing column, no row left to score, or (with `strict`)
    any row with errors: nothing is written then; for `resume` without an unfinished run, or one whose
    input or options differ. NotFoundError for an unknown model version or alias. EverloopError for an
    unknown `engine`; RayUnavailable (`everloop.batch._ray`) for "ray" without Ray installed."""
    kind = output_format(output)  # before any work: a wrong name must not cost a whole scoring run
    if engine not in ("local", "ray"):
        raise EverloopError(f"engine {engine!r}: expected 'local' or 'ray'")
    if engine == "ray":  # before any work too: without Ray nothing can run
        from everloop.batch._ray import import_ray
        import_ray()
    target = Path(output).resolve()
    if not isinstance(source, SqlSource):
        source = Path(source)
        resolved = source.resolve()
        if resolved in (target, rejected_path(target)) or (resolved.is_dir() and resolved in target.parents):
            raise DataError(f"{output}: the output would overwrite (or land inside) the input {resolved}; "
                            "write the predictions elsewhere", path=str(output))
    if not target.parent.is_dir():  # a typo in a path must not create a new tree of folders
        raise DataError(f"{output}: the folder {target.parent} does not exist; create it first",
                        path=str(output))
    trained = load_model(store, model)
    total = count_rows(source)
    if compile_trees is None:
        compile_trees = total is not None and total >= COMPILE_ROWS
    settings = {"source": fingerprint(source), "model_version": trained.version, "chunk_rows": chunk_rows,
                "keep": list(keep), "strict": strict, "log": log, "compile_trees": bool(compile_trees)}
    job = Job(Path(output), kind, settings, resume)
    try:
        with contextlib.ExitStack() as held:
            if log:  # one logging run per job: two would delete and insert each other's log rows
                try:
                    held.enter_context(_job_lease(store, job.prefix))
                except EverloopError:
                    if not job.chunks:  # nothing of this run to resume: leave no job folder behind
                        job.remove()
                    raise
            result = _run(store, trained, job, read=functools.partial(
                iter_batches, source, types=trained.schema.kinds, batch_rows=chunk_rows),
                chunk_rows=chunk_rows, keep=keep, strict=strict, log=log, progress=progress,
                compile_trees=compile_trees, engine=engine, address=address)
    except DataError:  # the same input would fail again: nothing to resume
        job.remove()
        raise
    except sa.exc.SQLAlchemyError as exc:  # the prediction log could not be written (a read-only store)
        raise StoreError(f"the prediction log could not be written: {str(exc).splitlines()[0]}; the finished "
                         f"chunks are kept: fix the store and run again with --resume (or --no-log)") from None
    except OSError as exc:  # a full disk, a folder that became read-only
        raise StoreError(f"{output}: cannot write {exc.filename or 'the output'}: {exc.strerror or exc}; the "
                         f"finished chunks are kept in {job.dir}: make room and run again with --resume") from None
    finally:
        job.close()
    return result


def _job_lease(store: Store, prefix: str) -> Lease:
    try:
        return Lease.acquire(store.engine, f"batch:{prefix}")
    except LeaseBusy as busy:
        raise EverloopError(f"another everloop predict is logging the same job (the same input files and "
                            f"model version) now: {busy.holder}; wait for it, or run with --no-log") from None


def _run(store: Store, trained: TrainedModel, job: Job, *, read: Callable[[], Iterable[pd.DataFrame]],
         chunk_rows: int, keep: Sequence[str], strict: bool, log: bool,
         progress: Callable[[int], None] | None, compile_trees: bool, engine: str,
         address: str | None) -> BatchResult:
    """Score the chunks `read()` gives (each cut to at most `chunk_rows` rows) into `job`, on `engine`."""
    speed_up(store, trained, compile_trees)
    scorer = ChunkScorer(trained, keep=keep, strict=strict, log=log)
    # Read by the model's schema, never inferred again: CSV cells arrive as text and each column is
    # parsed as the first ingest read it (bool spellings, codes with leading zeros, number formats, dates).
    chunks = functools.partial(_at_most, read, chunk_rows)
    writer = BatchWriter(job, trained, store if log else None, progress)
    if engine == "ray":
        from everloop.batch._ray import score_on_ray
        score_on_ray(scorer, chunks, writer, address=address)
    else:
        for chunk in writer.pending(chunks()):
            writer.add(scorer(chunk))
    return writer.finish()


def _at_most(read: Callable[[], Iterable[pd.DataFrame]], rows: int) -> Iterator[pd.DataFrame]:
    """`read()`'s frames cut to at most `rows` rows each (CSV batches follow pyarrow's blocks, whatever
    their rows): the same chunks on every run of the same input, as `--resume` needs."""
    for frame in read():
        for start in range(0, len(frame), rows):
            yield frame.iloc[start:start + rows] if len(frame) > rows else frame


COMPILE_ROWS = 200_000  # compiling takes seconds; it pays for itself on about this many rows


def count_rows(source: Path | SqlSource) -> int | None:
    """Rows in a source, for progress and an ETA, without reading it: Parquet files' metadata, or CSV
    files' line breaks less one header each (a quoted line break counts one more); None for SQL or a
    file that cannot be read (the reading itself then says why)."""
    if isinstance(source, SqlSource):
        return None
    try:
        total = 0
        for path in source_files(source):
            if path.suffix.lower() in (".parquet", ".pq"):
                total += pq.ParquetFile(path).metadata.num_rows
            else:
                total += max(0, _line_breaks(path) - 1)
        return total
    except Exception:
        return None


def _line_breaks(path: Path) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")  # a last line without its line break


def speed_up(store: Store, trained: TrainedModel, compile_trees: bool) -> None:
    """The service's fast paths for `trained`, each only once it gives the pipeline's answers on the
    model's evaluation rows: the numpy feature path (`TrainedModel.check_fast_path`) and, with
    `compile_trees`, the tree ensemble compiled to native code (`everloop.serve._compiled`, cached beside
    the store; all cores, as a batch job has the machine to itself)."""
    from threadpoolctl import threadpool_limits

    from everloop.registry import eval_frame
    from everloop.serve._compiled import compile_model

    probe = eval_frame(store, trained.manifest).head(200)
    # A few hundred probe rows: OpenMP's threads cost more than they give, and on a busy machine their
    # spinning turned these checks from milliseconds into seconds.
    with threadpool_limits(1):
        fast = trained.check_fast_path(probe)
    if fast and compile_trees:
        compile_model(trained, probe, store, nthread=os.cpu_count() or 1)


@dataclass
class ScoredChunk:
    """One chunk of input rows scored: what `ChunkScorer` returns, knowing nothing of where the chunk
    sits in the input (`BatchWriter` numbers rows and assigns prediction ids)."""

    rows: int  # input rows in the chunk
    report: ValidationReport  # its anomalies, rows numbered from 0 within the chunk
    scored: pd.DataFrame | None = None  # the good rows' output columns, except prediction_id
    rejected: pd.DataFrame | None = None  # the bad rows as text and their reasons, except the row number
    bad: np.ndarray | None = None  # positions of the bad rows in the chunk
    features: pd.DataFrame | None = None  # the good rows' conformed features (for the prediction log)
    refused: bool = False  # a whole-file problem, or a bad row under `strict`: nothing may be written


class ChunkScorer:
    """Validates and scores one chunk of input rows at a time: `scorer(chunk) -> ScoredChunk`. Rows with
    errors of their own are set aside unless `strict`; `keep` input columns are copied to the output;
    with `log`, the conformed features come back too."""

    def __init__(self, trained: TrainedModel, keep: Sequence[str] = (), strict: bool = False,
                 log: bool = False) -> None:
        self.trained, self.keep, self.strict, self.log = trained, list(keep), strict, log
        self._roles = [c.name for c in trained.schema.columns if c.role in ("id", "timestamp")]
        self._passthrough: list[str] | None = None

    def __call__(self, chunk: pd.DataFrame) -> ScoredChunk:
        trained = self.trained
        if self._passthrough is None:
            self._passthrough = _output_columns(self._roles, self.keep, list(chunk.columns), trained)
        checked = trained.schema.check(chunk, mode="request", coerce=True)
        checked.report.anomalies = [a for a in checked.report.anomalies  # --keep asked for these
                                    if not (a.kind == "unexpected_column" and a.column in self.keep)]
        whole_file = any(a.kind in ("missing_column", "empty") for a in checked.report.errors)
        if whole_file or (self.strict and not checked.report.ok):
            return ScoredChunk(len(chunk), checked.report, refused=True)
        out = ScoredChunk(len(chunk), checked.report)
        features, good = checked.frame, chunk
        if checked.bad_rows is not None:
            bad = checked.bad_rows
            out.bad = np.flatnonzero(bad)
            out.rejected = _rejected_rows(chunk, bad, checked.row_reasons())
            features, good = features[~bad], chunk[~bad]
        if len(good):
            out.scored = _scored_rows(trained, features, good, self._passthrough)
            if self.log:
                out.features = features
        return out


class BatchWriter:
    """Takes the `ScoredChunk`s of one job in input order: numbers their rows, adds prediction ids, keeps
    each as a finished part of `job`, logs it (with `store`) and reports progress; `finish` joins the
    parts into the output and its side file."""

    def __init__(self, job: Job, trained: TrainedModel, store: Store | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        self.job, self.trained, self.store, self.progress = job, trained, store, progress
        self.started = time.monotonic()
        self.logged = 0
        if store is not None:  # a resumed job logs its unfinished chunk again; a job run again replaces its rows
            batches = store.tables.prediction_batches
            with store.engine.begin() as conn:
                conn.execute(batches.delete().where(batches.c.worker == job.prefix,
                                                    batches.c.first_counter > job.scored))
                if job.discarded_prefix and job.discarded_prefix != job.prefix:  # an unfinished run started
                    conn.execute(batches.delete().where(batches.c.worker == job.discarded_prefix))  # afresh

    def pending(self, chunks: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        """`chunks` less those a resumed job finished already (read again, as the input is read in order,
        but not scored)."""
        for n, chunk in enumerate(chunks):
            if n < self.job.resumed_chunks:
                if self.progress:
                    self.progress(len(chunk))
                continue
            yield chunk

    def add(self, chunk: ScoredChunk) -> None:
        job = self.job
        if chunk.refused:
            report = ValidationReport(rows=0)
            report.merge(job.report, 0)
            report.merge(chunk.report, job.rows)
            problems = "\n".join(f"  - {a.describe()}" for a in report.errors)
            raise DataError(f"rows do not match the model's schema; nothing was written (rows count data "
                            f"rows from 1):\n{problems}", report=report)
        scored, rejected, first = chunk.scored, chunk.rejected, job.scored + 1
        if rejected is not None:
            rejected.insert(0, _free_name("row", rejected.columns), chunk.bad + job.rows + 1)
        if scored is not None:
            counters = np.arange(first, first + len(scored))
            scored["prediction_id"] = pd.arrays.ArrowStringArray(prediction_log.id_strings(job.prefix, counters))
        job.finish_chunk(scored, rejected, chunk.report, chunk.rows, log=lambda: self._log(chunk, scored, first))
        if self.progress:
            self.progress(chunk.rows)

    def _log(self, chunk: ScoredChunk, scored: pd.DataFrame | None, first: int) -> None:
        if self.store is None or scored is None:
            return
        trained = self.trained
        ids = scored["prediction_id"]
        keys = self._keys(scored)
        proba = None
        if trained.task == "classification":
            proba = scored[[f"proba_{c}" for c in trained.classes]].to_numpy(dtype=np.float64)
        features = pa.Table.from_pandas(chunk.features[trained.schema.feature_names], preserve_index=False)
        row = prediction_log.batch_row(self.job.prefix, first, features,
                                       scored["prediction"].to_numpy(), proba, trained.classes, time.time(),
                                       trained.version, keys=keys)
        with self.store.engine.begin() as conn:
            conn.execute(self.store.tables.prediction_batches.insert(), [row])
        self.logged += len(ids)

    def _keys(self, scored: pd.DataFrame) -> pa.Array | None:
        ids = [c.name for c in self.trained.schema.columns if c.role == "id"]
        if not ids or ids[0] not in scored.columns:
            return None
        return pa.array(scored[ids[0]].astype("string"), type=pa.string())

    def finish(self) -> BatchResult:
        job, output = self.job, self.job.output
        if job.rows == 0:  # bad input (exit 2), as a header-only file is (a SQL query that returned none)
            raise DataError("the input has no rows; nothing was written")
        if job.scored == 0:
            problems = "\n".join(f"  - {a.describe()}" for a in job.report.errors)
            raise DataError(f"every row has errors; nothing was written (rows count data rows from 1):\n"
                            f"{problems}", report=job.report)
        side = rejected_path(output)
        # the side file first: an output never appears without its rejected rows; an old one left by an
        # earlier run into this output would describe rows it no longer had
        if not job.join(REJECTED, side):
            side.unlink(missing_ok=True)
        job.join(PART, output)
        job.remove()
        seconds = time.monotonic() - self.started
        anomalies = job.report.to_dict()["anomalies"]
        return BatchResult(job.scored, str(output), self.trained.version, job.kind, job.columns,
                           [a for a in anomalies if a["severity"] == "warning"],
                           job.rejected, str(side) if job.rejected else None,
                           [a for a in anomalies if a["severity"] == "error"], logged=self.logged,
                           resumed_chunks=job.resumed_chunks, discarded_chunks=job.discarded,
                           seconds=round(seconds, 3), compiled=self.trained.compiled is not None,
                           notes=["--resume: no unfinished run wrote this output; scored from the start"]
                           if job.nothing_to_resume else [])


def _scored_rows(trained: TrainedModel, features: pd.DataFrame, rows: pd.DataFrame,
                 passthrough: list[str]) -> pd.DataFrame:
    """The output's rows for good input `rows` (their conformed `features`): passthrough columns,
    prediction, per-class probabilities, model version."""
    predictions = trained.predict_conformed(features)
    out = rows[passthrough].reset_index(drop=True)  # as read: to_numpy() made a Timestamp per tz-aware time
    out["prediction"] = predictions.labels
    if predictions.proba is not None:
        for i, cls in enumerate(predictions.classes):
            out[f"proba_{cls}"] = predictions.proba[:, i]
    out["model_version"] = trained.version
    return out


def _rejected_rows(chunk: pd.DataFrame, bad: np.ndarray, reasons: np.ndarray) -> pd.DataFrame:
    """The side file's rows, less their row numbers: the `bad` rows of `chunk` as text (nulls kept) and
    their reasons (`reason` gets a leading '_' while the input has a column of that name)."""
    out = chunk[bad].astype("string").reset_index(drop=True)
    out[_free_name("reason", out.columns)] = pd.array(reasons, dtype="string")
    return out


def _free_name(name: str, taken: Iterable[str]) -> str:
    taken = set(taken)
    while name in taken:
        name = "_" + name
    return name


def _output_columns(passthrough: list[str], keep: list[str], present: list[str],
                    trained: TrainedModel) -> list[str]:
    """The input columns the output carries: the schema's id/timestamp columns the input has, then `keep`.
    Raises DataError for a kept column the input lacks, or one named like an output column."""
    missing = [c for c in keep if c not in present]
    if missing:
        raise DataError(f"--keep {', '.join(missing)}: not a column of the input; its columns are: "
                        f"{', '.join(present)}")
    made = {"prediction", "model_version", "prediction_id"} | {f"proba_{c}" for c in trained.classes or []}
    clash = [c for c in keep if c in made]
    if clash:
        raise DataError(f"--keep {', '.join(clash)}: the output makes a column of that name; rename it in the "
                        "input first")
    wanted = [c for c in passthrough if c in present] + keep
    return list(dict.fromkeys(wanted))  # a kept id column once
