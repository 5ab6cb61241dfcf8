"""Reading sources in batches: CSV and Parquet files, folders and globs, and SQL queries.

Files are never read whole: CSV through pyarrow's streaming reader (strict: a row with the wrong
number of fields is an error, not a silent shift), Parquet by record batches, SQL by chunks.
"""

from __future__ import annotations

import csv
import glob
import io
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from everloop.errors import DataError
from everloop.spec import SqlSource

SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
BATCH_ROWS = 100_000
CSV_BLOCK_BYTES = 16 << 20


class TypedReadFailed(Exception):
    """A CSV column did not parse as the type asked for; read again with every column as text."""


def iter_batches(source: str | Path | SqlSource, base: str | Path = ".", *, types: dict[str, str] | None = None,
                 as_text: bool = False, batch_rows: int = BATCH_ROWS) -> Iterator[pd.DataFrame]:
    """The rows of a source, batch by batch. `types` (column -> numeric/categorical/datetime) makes a
    CSV reader parse columns as the schema says; a cell that does not parse raises `TypedReadFailed`,
    and `as_text=True` then reads every CSV column as text so that each bad cell can be reported."""
    if isinstance(source, SqlSource):
        yield from _sql_batches(source, batch_rows)
        return
    files = _expand(Path(base), str(source))
    first_columns: list[str] | None = None
    for path in files:
        for batch in _file_batches(path, types, as_text, batch_rows):
            columns = [str(c) for c in batch.columns]
            if first_columns is None:
                first_columns = columns
            elif columns != first_columns:
                raise DataError(f"{path}: its columns differ from {files[0]}'s", path=str(path))
            yield batch


def read_source(source: str | Path | SqlSource, base: str | Path = ".") -> pd.DataFrame:
    """All rows of a (small) source as one frame."""
    try:
        batches = list(iter_batches(source, base))
    except TypedReadFailed:
        batches = list(iter_batches(source, base, as_text=True))
    if not batches:
        raise DataError(f"{source}: no rows")
    return batches[0] if len(batches) == 1 else pd.concat(batches, ignore_index=True)


def read_file(path: str | Path) -> pd.DataFrame:
    """One CSV or Parquet file, with a clear error for anything that is not one."""
    return read_source(Path(path).resolve())


def _file_batches(path: Path, types: dict[str, str] | None, as_text: bool, batch_rows: int) -> Iterator[pd.DataFrame]:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected .csv or .parquet", path=str(path))
    if not path.is_file():
        raise DataError(f"{path}: no such file", path=str(path))
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty", path=str(path))
    if kind == "parquet":
        try:
            # No pre-buffering: the reader decodes batch by batch instead of holding a whole row group.
            for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=batch_rows,
                                                                             use_threads=False):
                yield batch.to_pandas()
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable parquet file: {exc}", path=str(path)) from None
        return
    yield from _csv_batches(path, types, as_text)


def _csv_batches(path: Path, types: dict[str, str] | None, as_text: bool) -> Iterator[pd.DataFrame]:
    header = _csv_header(path)
    if as_text:
        column_types = {name: pa.string() for name in header}
    else:
        arrow = {"numeric": pa.float64(), "categorical": pa.string()}
        column_types = {name: arrow[kind] for name, kind in (types or {}).items() if kind in arrow and name in header}
    convert = pacsv.ConvertOptions(column_types=column_types, strings_can_be_null=True)
    try:
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                                parse_options=pacsv.ParseOptions(newlines_in_values=True),
                                convert_options=convert)
        for batch in reader:
            yield batch.to_pandas()
    except pa.ArrowInvalid as exc:
        message = str(exc)
        if "conversion error" in message and "UTF8" not in message and not as_text:
            raise TypedReadFailed(message) from None
        if "UTF8" in message or "utf8" in message.lower():
            raise DataError(f"{path}: not UTF-8 text; re-save the file as UTF-8", path=str(path)) from None
        if "Empty CSV file" in message:
            raise DataError(f"{path}: the file has no columns", path=str(path)) from None
        raise DataError(f"{path}: malformed CSV: {message.strip()}", path=str(path)) from None
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable CSV file: {exc}", path=str(path)) from None


def _csv_header(path: Path) -> list[str]:
    with open(path, "rb") as handle:
        head = handle.read(1 << 20)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not merely a character cut at the end of the sample
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-save the file as UTF-8",
                            path=str(path)) from None
        text = head[:exc.start].decode("utf-8")
    if "\x00" in text:
        raise DataError(f"{path}: binary data, not CSV text", path=str(path))
    try:
        return next(csv.reader(io.StringIO(text)), [])
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV header: {exc}", path=str(path)) from None


def _expand(base: Path, pattern: str) -> list[Path]:
    path = Path(pattern) if Path(pattern).is_absolute() else base / pattern
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
    elif any(ch in pattern for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path)))
    else:
        return [path]
    if not files:
        raise DataError(f"{path}: matches no .csv or .parquet files", path=str(path))
    return files


def _sql_batches(source: SqlSource, batch_rows: int) -> Iterator[pd.DataFrame]:
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(source.url)
    except (sa.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        raise DataError(f"sql source: the URL cannot be used: {str(exc).splitlines()[0]}") from None
    try:
        with engine.connect() as conn:
            yield from pd.read_sql(sa.text(source.query), conn, chunksize=batch_rows)
    except (sa.exc.SQLAlchemyError, pd.errors.DatabaseError, ImportError) as exc:
        raise DataError(f"sql source: the query failed: {str(exc).splitlines()[0]}") from None
    finally:
        engine.dispose()
