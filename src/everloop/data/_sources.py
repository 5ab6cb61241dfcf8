"""Reading sources in batches: CSV and Parquet files, folders and globs, and SQL queries.

Files are never read whole: CSV through pyarrow's streaming reader (strict: a row with the wrong
number of fields is an error, not a silent shift), Parquet by record batches, SQL by chunks.

A CSV cell is read as text, never converted by the reader: what a column's text means is the schema's
to say (`Schema.check` parses it), so that `01234` stays a code, `1,234.5` is a number only where the
schema says numbers are written so, and a value reads the same from every file, body and protocol.
Missing values too: with a schema, the cells of its columns arrive exactly as written (`""`, `NA`) and
the schema reads its null tokens (NULL_TOKENS) as missing, as it does in a JSON value or a CSV body;
other columns get pyarrow's nulls. Before a schema exists, empty cells and null tokens are nulls, and
columns whose every cell is a plain number become numbers (as pyarrow's own inference would, minus its
traps: a code with a leading zero stays text). The field delimiter (`,`, `;`, tab or `|`) is sniffed
from the file's first lines.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from everloop.data._schema import NULL_TOKENS
from everloop.errors import DataError
from everloop.spec import SqlSource
from everloop.spec._secrets import redact_text

SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet"}
BATCH_ROWS = 100_000
CSV_BLOCK_BYTES = 16 << 20
DELIMITERS = (",", ";", "\t", "|")  # the field delimiters sniffed, the first preferred on a tie
SNIFF_ROWS = 50  # rows of a CSV file the delimiter is sniffed from
# Of those rows, the share as wide as the header a delimiter needs: a few rows of the wrong width are the
# file's own error (reported with their line), not a sign of another delimiter; in a file of 3 rows, one.
SNIFF_SHARE = 0.5
# A plain number, as pyarrow's CSV inference reads it, but never with a leading zero (`007` is a code).
PLAIN_NUMBER = r"^[+-]?(?:(?:0|[1-9]\d*)(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$"
PLAIN_INTEGER = r"^[+-]?(?:0|[1-9]\d*)$"
DOT_GROUPED_OR_WHOLE = r"^[+-]?(?:[1-9]\d{0,2}\.\d{3}|\d+)$"  # 88.699 or 12: a dot may group thousands

log = logging.getLogger("everloop.data")


class TypedReadFailed(Exception):
    """A CSV column did not parse as the type asked for; read again with every column as text."""


def iter_batches(source: str | Path | SqlSource, base: str | Path = ".", *,
                 types: dict[str, str] | None = None, as_text: bool = False, batch_rows: int = BATCH_ROWS,
                 notes: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """The rows of a source, batch by batch (pandas frames of at most `batch_rows` rows for Parquet and
    SQL; CSV batches follow pyarrow's blocks).

    CSV cells are text. With `types` (a schema's column -> kind: a schema exists) the cells of those
    columns arrive as written, empty and `NA` cells included, for the schema to read (its null tokens are
    missing values there, as in any JSON value); other columns, and every column with `as_text=True`, are
    text with pyarrow's nulls; with neither (no schema yet) columns whose every cell is a plain number
    become int64/float64 (see PLAIN_NUMBER). `TypedReadFailed` is no longer raised (kept for callers that
    still catch it). `notes`, when given, receives one line per file read in a way the user should know
    about (a sniffed delimiter other than a comma). Raises DataError for a missing, empty, unreadable or
    malformed file, naming it, and for files with a header but no data row (Parquet files with no rows
    alike): zero-row files among others are skipped, as a folder of parts may hold some."""
    if isinstance(source, SqlSource):
        for n, batch in enumerate(_sql_batches(source, batch_rows)):
            if n == 0:
                unique_columns([str(c) for c in batch.columns], "sql source")
            yield batch
        return
    files = _expand(Path(base), str(source))
    first_columns: list[str] | None = None
    for path in files:
        for batch in _file_batches(path, types, as_text, batch_rows, notes):
            if batch.empty:
                continue
            columns = [str(c) for c in batch.columns]
            if first_columns is None:
                unique_columns(columns, str(path))
                first_columns = columns
            elif columns != first_columns:
                raise DataError(f"{path}: its columns differ from {files[0]}'s", path=str(path))
            yield batch
    if first_columns is None:  # bad input, as an empty file is (exit 2), not data that failed its checks
        where = str(files[0]) if len(files) == 1 else f"{source} ({len(files)} files)"
        have = "the file has" if len(files) == 1 else "the files have"
        raise DataError(f"{where}: no rows: {have} a header but no data rows", path=where)


def unique_columns(columns: list[str], where: str) -> None:
    """Raise DataError when a column name occurs more than once (`age,...,age`): which of the two a
    check or a model would read is a guess, so the file is refused, naming the column and its
    positions (1-based, as a spreadsheet counts them). pandera and pandas accept such frames and then
    pick one column silently or fail deep inside; here the user learns what to rename."""
    seen: dict[str, list[int]] = {}
    for n, name in enumerate(columns, start=1):
        seen.setdefault(name, []).append(n)
    repeated = {name: places for name, places in seen.items() if len(places) > 1}
    if repeated:
        named = "; ".join(f"{name!r} at columns {', '.join(map(str, places))}"
                          for name, places in repeated.items())
        raise DataError(f"{where}: duplicated column name(s): {named}; rename them so that each column "
                        "has its own name", path=where)


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


def _file_batches(path: Path, types: dict[str, str] | None, as_text: bool, batch_rows: int,
                  notes: list[str] | None = None) -> Iterator[pd.DataFrame]:
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
    yield from _csv_batches(path, types, as_text, notes)


def _csv_batches(path: Path, types: dict[str, str] | None, as_text: bool,
                 notes: list[str] | None = None) -> Iterator[pd.DataFrame]:
    header, delimiter = _csv_header(path)
    if delimiter != ",":
        note = f"{path.name}: fields separated by {_DELIMITER_NAMES[delimiter]} (sniffed from its first lines)"
        log.info(note)
        if notes is not None:
            notes.append(note)
    # Every cell as text: the schema parses it. With a schema, its columns' cells as written (its null
    # tokens are missing values wherever a value arrives); else empty cells and pyarrow's tokens are null.
    raw = types is not None and not as_text
    convert = pacsv.ConvertOptions(column_types=dict.fromkeys(header, pa.string()),
                                   strings_can_be_null=not raw, quoted_strings_can_be_null=not raw)
    natural = types is None and not as_text  # no schema yet: plain numbers become numbers
    try:
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                                parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                                convert_options=convert)
        for batch in reader:
            if raw:
                batch = _nulls_outside(batch, types)
            yield (_natural_numbers(batch) if natural else batch).to_pandas()
    except pa.ArrowInvalid as exc:
        message = str(exc)
        if "UTF8" in message or "utf8" in message.lower():
            raise DataError(f"{path}: not UTF-8 text; re-save the file as UTF-8", path=str(path)) from None
        if "Empty CSV file" in message:
            raise DataError(f"{path}: the file has no columns", path=str(path)) from None
        if "Expected" in message and "columns, got" in message:
            raise DataError(f"{path}: {_wrong_width(path, len(header), delimiter) or message.strip()}",
                            path=str(path)) from None
        raise DataError(f"{path}: malformed CSV: {message.strip()}", path=str(path)) from None
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable CSV file: {exc}", path=str(path)) from None


_DELIMITER_NAMES = {",": "commas", ";": "semicolons", "\t": "tabs", "|": "'|'"}


_NULL_TOKENS = pa.array(NULL_TOKENS, type=pa.string())


def _nulls_outside(batch: pa.RecordBatch, types: dict[str, str]) -> pa.RecordBatch:
    """The columns a schema does not read (kept for the output, or unknown) with pyarrow's nulls, as
    without a schema; the schema's own columns as written."""
    arrays = [array if name in types else pc.if_else(pc.is_in(array, value_set=_NULL_TOKENS),
                                                    pa.scalar(None, array.type), array)
              for name, array in zip(batch.schema.names, batch.columns)]
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


def _natural_numbers(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Text columns whose every present cell is a plain number (PLAIN_NUMBER) as int64, or float64 when
    some have decimals (or are past int64); every other column as it is. What pyarrow's CSV inference
    does, except that a leading zero keeps a column text, and bools and dates stay text for the schema;
    so does a column whose every decimal is a dot and three digits (`88.699`: maybe 88699 with the dot
    grouping thousands), for the schema to say it could not tell."""
    arrays = []
    for array in batch.columns:
        if pa.types.is_string(array.type) and array.null_count < len(array) \
                and pc.all(pc.match_substring_regex(array, PLAIN_NUMBER)).as_py():
            whole = pc.all(pc.match_substring_regex(array, PLAIN_INTEGER)).as_py()
            if not whole and pc.all(pc.match_substring_regex(array, DOT_GROUPED_OR_WHOLE)).as_py():
                arrays.append(array)
                continue
            try:
                array = pc.cast(array, pa.int64() if whole else pa.float64())
            except pa.ArrowInvalid:  # an integer past int64
                array = pc.cast(array, pa.float64())
        arrays.append(array)
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


def sniff_delimiter(text: str, default: str = ",") -> str:
    """The field delimiter of CSV text (its first lines): of DELIMITERS, the one that splits the header
    into the most fields (at least 2) with at least SNIFF_SHARE of the next SNIFF_ROWS rows as wide as the header
    (a few short rows are the file's own error, reported later with their line). `default` when none
    does (a file of one column). Python's csv.Sniffer guesses from character frequencies and picks
    letters or spaces on real files; this only ever answers one of DELIMITERS."""
    lines = text.splitlines(keepends=True)
    if len(lines) > 1 and not text.endswith(("\n", "\r")):
        text = "".join(lines[:-1])  # the sample may end inside a row
    best, best_key = default, (0.0, 1)
    for delimiter in DELIMITERS:
        try:
            reader = csv.reader(io.StringIO(text), delimiter=delimiter)
            rows = [r for _, r in zip(range(SNIFF_ROWS + 1), reader) if r]
        except csv.Error:
            continue
        if not rows or len(rows[0]) < 2:
            continue
        width = len(rows[0])
        share = sum(len(r) == width for r in rows[1:]) / (len(rows) - 1) if len(rows) > 1 else 1.0
        if share >= SNIFF_SHARE and (share, width) > best_key:
            best, best_key = delimiter, (share, width)
    return best


def _csv_header(path: Path) -> tuple[list[str], str]:
    """The header's column names and the file's field delimiter (sniffed; tabs by default for .tsv)."""
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
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is no part of the first name (as in pyarrow)
    delimiter = sniff_delimiter(text, "\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        return next(csv.reader(io.StringIO(text), delimiter=delimiter), []), delimiter
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV header: {exc}", path=str(path)) from None


def _wrong_width(path: Path, width: int, delimiter: str = ",") -> str | None:
    """Where the first row with a number of fields other than the header's is: pyarrow's streaming
    reader says "Expected 10 columns, got 3" but not on which line. Only run once reading failed, so
    the row-by-row scan (Python's csv module, which counts lines inside quoted values too) costs
    nothing on good files. None when this reader finds no such row (the two parsers disagree)."""
    try:
        return _first_wrong_row(path, width, delimiter)
    except csv.Error:  # e.g. a field past the csv module's size limit: keep pyarrow's own message
        return None


def _first_wrong_row(path: Path, width: int, delimiter: str) -> str | None:
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        next(reader, None)  # the header
        line, row_number = reader.line_num, 0
        for fields in reader:
            if not fields:  # a blank line: pyarrow skips it too, and it is no data row
                line = reader.line_num
                continue
            row_number += 1
            if len(fields) != width:
                shown = delimiter.join(fields)
                shown = shown if len(shown) <= 80 else shown[:77] + "..."
                where = f"line {line + 1} (data row {row_number})"
                if reader.line_num > line + 1:  # the row ran over several lines: a quote left open?
                    where = (f"lines {line + 1}-{reader.line_num} (data row {row_number}, read as one row: "
                             "a quote not closed?)")
                return (f"malformed CSV: {where}: Expected {width} columns (as in the "
                        f"header), got {len(fields)}: {shown!r}; fix or remove that row (a value holding "
                        f"{delimiter!r} needs quotes)")
            line = reader.line_num
    return None


def source_files(source: str | Path, base: str | Path = ".") -> list[Path]:
    """The files a source names, in the order `iter_batches` reads them: the file itself, a folder's
    .csv/.parquet files, or a glob's matches (sorted). Raises DataError when a folder or glob matches none."""
    return _expand(Path(base), str(source))


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
        engine = sa.create_engine(source.resolved_url())  # ${NAME} references: the secret lives in the environment
    except (sa.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        raise DataError(f"sql source: the URL cannot be used: {redact_text(str(exc).splitlines()[0])}") from None
    try:
        with engine.connect() as conn:
            yield from pd.read_sql(sa.text(source.query), conn, chunksize=batch_rows)
    except (sa.exc.SQLAlchemyError, pd.errors.DatabaseError, ImportError) as exc:
        raise DataError(f"sql source: the query failed: {redact_text(str(exc).splitlines()[0])}") from None
    finally:
        engine.dispose()
