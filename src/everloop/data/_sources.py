"""Reading sources into frames: CSV and Parquet files, folders and globs, and SQL queries."""

from __future__ import annotations

import glob
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from everloop.errors import DataError
from everloop.spec import SqlSource

SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def read_source(source: str | Path | SqlSource, base: str | Path = ".") -> pd.DataFrame:
    """All rows of a source; a path is relative to `base` (the project folder)."""
    if isinstance(source, SqlSource):
        return _read_sql(source)
    files = _expand(Path(base), str(source))
    frames = [read_file(path) for path in files]
    if len(frames) == 1:
        return frames[0]
    columns = [list(f.columns) for f in frames]
    if any(c != columns[0] for c in columns):
        odd = next(p for p, c in zip(files, columns) if c != columns[0])
        raise DataError(f"{odd}: its columns differ from {files[0]}'s", path=str(odd))
    return pd.concat(frames, ignore_index=True)


def read_file(path: str | Path) -> pd.DataFrame:
    """One CSV or Parquet file, with a clear error for anything that is not one."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected .csv or .parquet", path=str(path))
    if not path.is_file():
        raise DataError(f"{path}: no such file", path=str(path))
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty", path=str(path))
    try:
        if kind == "parquet":
            return pq.read_table(path).to_pandas()
        return read_csv(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        "re-save the file as UTF-8", path=str(path)) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file has no columns", path=str(path)) from None
    except (pd.errors.ParserError, pd.errors.ParserWarning) as exc:
        raise DataError(f"{path}: malformed CSV: {str(exc).strip()}", path=str(path)) from None
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable {kind} file: {exc}", path=str(path)) from None


def read_csv(path: Path, chunksize: int | None = None) -> Any:
    """pandas' CSV reader, made strict: a row with more fields than the header is an error, never
    silently moved into the index or cut off."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        return pd.read_csv(path, encoding="utf-8", low_memory=False, index_col=False, chunksize=chunksize)


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


def _read_sql(source: SqlSource) -> pd.DataFrame:
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(source.url)
        with engine.connect() as conn:
            return pd.read_sql(sa.text(source.query), conn)
    except (sa.exc.SQLAlchemyError, ImportError) as exc:
        raise DataError(f"sql source: the query failed: {str(exc).splitlines()[0]}") from None
