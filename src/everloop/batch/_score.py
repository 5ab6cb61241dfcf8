"""Batch scoring: a file streamed in chunks through the production artifact into a Parquet file."""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from everloop.data import read_file
from everloop.data._sources import SUFFIXES, read_csv
from everloop.errors import DataError
from everloop.registry import PRODUCTION, load_model
from everloop.store import Store
from everloop.train import TrainedModel


@dataclass(frozen=True)
class BatchResult:
    rows: int
    output: str
    model_version: int | None


def score_file(store: Store, source: str | Path, output: str | Path, *, model: int | str = PRODUCTION,
               chunk_rows: int = 100_000, progress: Callable[[int], None] | None = None) -> BatchResult:
    """Score every row of a CSV/Parquet file; the output appears whole or not at all."""
    trained = load_model(store, model)
    return score_chunks(trained, _chunks(Path(source), chunk_rows), Path(output), progress=progress)


def score_chunks(trained: TrainedModel, chunks: Iterator[pd.DataFrame], output: Path,
                 progress: Callable[[int], None] | None = None) -> BatchResult:
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=".tmp-", suffix=".parquet")
    os.close(fd)
    writer: pq.ParquetWriter | None = None
    rows = 0
    passthrough = [c.name for c in trained.schema.columns if c.role in ("id", "timestamp")]
    try:
        for chunk in chunks:
            features, report = trained.conform(chunk)
            if not report.ok:
                offset_report = "\n".join(f"  - {a.column!r}: {a.message} (e.g. rows "
                                          f"{', '.join(str(rows + r + 1) for r in a.rows)})" for a in report.errors)
                raise DataError(f"rows do not match the model's schema; nothing was written:\n{offset_report}",
                                report=report)
            predictions = trained.predict_conformed(features)
            out = pd.DataFrame({c: chunk[c].to_numpy() for c in passthrough if c in chunk})
            out["prediction"] = predictions.labels
            if predictions.proba is not None:
                for i, cls in enumerate(predictions.classes):
                    out[f"proba_{cls}"] = predictions.proba[:, i]
            out["model_version"] = trained.version
            table = pa.Table.from_pandas(out, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            rows += len(chunk)
            if progress:
                progress(len(chunk))
        if writer is None:
            raise DataError("the input has no rows")
        writer.close()
        writer = None
        os.replace(tmp, output)
    finally:
        if writer is not None:
            writer.close()
        Path(tmp).unlink(missing_ok=True)
    return BatchResult(rows, str(output), trained.version)


def _chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """Chunks of a file, never the whole file in memory."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind == "parquet":
        if not path.is_file() or path.stat().st_size == 0:
            yield read_file(path)  # raises the clear error for a missing or empty file
            return
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
                yield batch.to_pandas()
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable parquet file: {exc}", path=str(path)) from None
        return
    if kind != "csv" or not path.is_file() or path.stat().st_size == 0:
        yield read_file(path)  # raises the clear error for each of these cases
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            yield from read_csv(path, chunksize=chunk_rows)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason}); re-save the file as UTF-8", path=str(path)) from None
    except (pd.errors.ParserError, pd.errors.ParserWarning, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: malformed CSV: {str(exc).strip()}", path=str(path)) from None
