"""Batch scoring: a file streamed in chunks through the production artifact into a Parquet file."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from everloop.data import TypedReadFailed, iter_batches
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
    source = Path(source).resolve()
    try:
        chunks = iter_batches(source, types=trained.schema.kinds, batch_rows=chunk_rows)
        return score_chunks(trained, chunks, Path(output), progress=progress)
    except TypedReadFailed:  # a cell did not parse: read again as text, to name every bad row
        return score_chunks(trained, iter_batches(source, as_text=True, batch_rows=chunk_rows), Path(output),
                            progress=progress)


def score_chunks(trained: TrainedModel, chunks: Iterable[pd.DataFrame], output: Path,
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
