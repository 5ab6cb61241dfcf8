"""Issue 11, data side: one reading of every value, whichever path it takes.

Null tokens (`NA`, `null`, empty text) are missing values in every kind of column on every path, unless the
first data held one as a value (`NA` for Namibia); dates written day or month first take one order per
column; a Parquet date column is dates; a number that fits two readings is named at ingest; a file pandas
wrote back is read plainly; date/times have a range; integer codes get a hint and phone numbers are
identifiers; a header-only file is bad input; type mismatches name their values; local times the clock
skips are reported; a column with `-` for missing says why it is not numbers.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from everloop import data
from everloop.batch import score_file
from everloop.data import ColumnSchema, Schema, iter_batches
from everloop.data._schema import NULL_TOKENS
from everloop.data._stats import epoch_seconds
from everloop.data._stats import ColumnStats
from everloop.errors import DataError
from everloop.serve import create_app
from everloop.spec import ProjectSpec
from tests.data.test_types_stay_put import invocations, make_project, predict, v2_infer, v2_proba

SPEC = ProjectSpec.model_validate({"name": "t", "data": {"source": "x.csv", "target": "y"}})
Y = [0, 1] * 20


def infer(**columns: list[Any]) -> Schema:
    """A schema inferred from 40 rows of the given columns (each list repeated to 40 values)."""
    frame = pd.DataFrame({name: (values * 40)[:40] for name, values in columns.items()} | {"y": Y})
    return Schema.infer(frame, SPEC)


def csv_schema(tmp_path: Path, frame: pd.DataFrame, sep: str = ",") -> tuple[Schema, Path]:
    """The schema a first ingest infers from `frame` written as a CSV file (read as the reader reads it)."""
    path = tmp_path / "first.csv"
    frame.to_csv(path, index=False, sep=sep)
    return Schema.infer(pd.concat(list(iter_batches(path))), SPEC), path


def why(schema: Schema, name: str) -> str:
    return next(r.why for r in schema.column_roles(SPEC) if r.name == name)


# -- 1. null tokens: one definition, every kind, every path -------------------------------------------------


def test_null_tokens_are_pyarrows_csv_null_values():
    assert list(NULL_TOKENS) == pacsv.ConvertOptions().null_values


TOKENS = ["NA", "", "null", "N/A", "NaN", "#N/A"]


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory) -> tuple[Schema, Path]:
    """A schema inferred from a CSV file with nulls in a column of each kind."""
    folder = tmp_path_factory.mktemp("tokens")
    frame = pd.DataFrame({"n": [1.5, 2.5, None, 4.0] * 10, "c": ["a", "b", None, "a"] * 10,
                          "b": ["yes", "no", None, "yes"] * 10,
                          "t": ["2026-03-01", "2026-03-02", None, "2026-03-04"] * 10, "y": Y})
    schema, path = csv_schema(folder, frame)
    assert {c.name: (c.kind, c.dtype, c.nullable) for c in schema.features} == {
        "n": ("numeric", "float", True), "c": ("categorical", "string", True),
        "b": ("categorical", "bool", True), "t": ("datetime", "datetime", True)}
    return schema, folder


@pytest.mark.parametrize("token", TOKENS)
def test_a_null_token_is_missing_in_every_kind_on_every_path(every_kind, token):
    schema, folder = every_kind
    row = {"n": token, "c": token, "b": token, "t": token}
    # JSON values (object columns), as /predict and /v2 BYTES send them
    checked = schema.check(pd.DataFrame([row], dtype=object), mode="request")
    assert checked.report.errors == [] and checked.report.anomalies == [], checked.report.summary()
    assert checked.frame.isna().all(axis=None), checked.frame
    # a CSV body (/invocations text/csv) and pandas' own text columns
    assert schema.check(pd.DataFrame([row], dtype="str"), mode="request").frame.isna().all(axis=None)
    # a CSV file scored with the schema: cells arrive as written, the schema reads them
    path = folder / "later.csv"
    path.write_text("n,c,b,t\n" + ",".join([f'"{token}"' if token else ""] * 4) + "\n1.5,a,yes,2026-03-01\n")
    batch = next(iter_batches(path, types=schema.kinds))
    assert batch["c"].tolist()[0] == token  # as written: the schema decides what it means
    frame, report = schema.conform(batch, mode="request")
    assert frame.iloc[0].isna().all() and report.errors == []
    assert frame.iloc[1].tolist() == [1.5, "a", "yes", pd.Timestamp("2026-03-01", tz="UTC")]
    # the service's shortcut agrees (a missing category), or leaves the row to the full check
    fast = schema.conform_records([{"n": None, "c": token, "b": True, "t": None}])
    assert fast is None or fast["c"].tolist() == [None]


def test_a_token_over_http_scores_as_a_null_and_as_the_csv_file(tmp_path):
    rng = np.random.default_rng(3)
    rows = 300
    frame = pd.DataFrame({"x": rng.normal(size=rows).round(2),
                          "plan": rng.choice(["basic", "premium", None], rows).tolist(),
                          "visits": [None if n % 9 == 0 else float(v)
                                     for n, v in enumerate(rng.integers(0, 9, rows))]})
    frame["churned"] = ((frame["plan"].isna()) | (frame["x"] > 1)).astype(int)
    folder, spec, store = make_project(tmp_path / "p", frame)
    base = {"x": 0.1, "plan": None, "visits": None}
    with TestClient(create_app(folder, watch=False)) as client:
        null = predict(client, [base])[0]
        for token in ("NA", "", "null", "N/A"):
            row = base | {"plan": token, "visits": token}
            assert predict(client, [row]) == [null], token
            assert v2_proba(v2_infer(client, [row | {"visits": None}])) == pytest.approx([null]), token
            body = f"x,plan,visits\n0.1,{token},{token}\n".encode()
            answer = client.post("/invocations", content=body, headers={"content-type": "text/csv"})
            assert answer.status_code == 200, (token, answer.text)
            assert answer.json()["predictions"] == invocations(client, [base]).json()["predictions"]
        (tmp_path / "na.csv").write_text("x,plan,visits\n0.1,NA,NA\n0.1,,\n")
        score_file(store, tmp_path / "na.csv", tmp_path / "na.parquet")
        assert pd.read_parquet(tmp_path / "na.parquet")["proba_1"].tolist() == pytest.approx([null, null])


def test_a_token_the_first_data_held_as_a_category_stays_one(tmp_path):
    """Parquet country codes with `NA` for Namibia: a category there, on every path; empty text is
    missing all the same (a CSV file cannot tell it from an empty cell)."""
    frame = pd.DataFrame({"country": ["NA", "DE", "FR", None] * 10, "y": Y})
    frame.to_parquet(tmp_path / "first.parquet", index=False)
    schema = Schema.infer(pd.concat(list(iter_batches(tmp_path / "first.parquet"))), SPEC)
    col = schema.column("country")
    assert (col.categories, col.not_missing, col.nullable) == (["DE", "FR", "NA"], ["NA"], True)
    assert "'NA' is a value here, not missing" in why(schema, "country")
    request = pd.DataFrame({"country": ["NA", "", "null", "DE"]}, dtype=object)
    checked = schema.check(request, mode="request")
    assert checked.frame["country"].tolist() == ["NA", None, None, "DE"] and checked.report.anomalies == []
    assert schema.conform_records([{"country": "NA"}, {"country": ""}])["country"].tolist() == ["NA", None]
    (tmp_path / "later.csv").write_text("country,x\nNA,1\n,2\nDE,3\n")
    batch = pd.concat(list(iter_batches(tmp_path / "later.csv", types=schema.kinds)))
    read = schema.conform(batch, mode="request")[0]["country"]
    assert [v if isinstance(v, str) else None for v in read] == ["NA", None, "DE"]
    # the same table first read from CSV: NA is a missing value there, as pandas and pyarrow read it
    from_csv, _ = csv_schema(tmp_path, frame)
    assert (from_csv.column("country").categories, from_csv.column("country").not_missing) == (["DE", "FR"], None)
    assert from_csv.check(request, mode="request").frame["country"].tolist() == [None, None, None, "DE"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.fixed_dictionaries({"c": st.sampled_from(["a", "NA", "", "null", None, 3, 2.0, True]),
                                       "cc": st.sampled_from(["DE", "NA", "", "N/A", None])}),
                min_size=1, max_size=5))
def test_the_shortcut_reads_null_tokens_as_the_full_check(records):
    schema = Schema([ColumnSchema("c", "categorical", dtype="string", nullable=True, categories=["a"]),
                     ColumnSchema("cc", "categorical", dtype="string", nullable=True, categories=["DE", "NA"],
                                  not_missing=["NA"])])
    fast = schema.conform_records(records)
    if fast is None:
        return
    checked = schema.check(pd.DataFrame.from_records(records, columns=["c", "cc"]), mode="request")
    for name, values in fast.items():
        expected = [None if v is None or (isinstance(v, float) and math.isnan(v)) else v
                    for v in checked.frame[name].tolist()]
        assert values.tolist() == expected, (name, records)


# -- 2. dates written day or month first: one order per column -------------------------------------------


@pytest.mark.parametrize(("written", "order", "assumed"), [
    (["13.02.2026", "10.02.2026"], "DMY", False), (["02/13/2026", "02/10/2026"], "MDY", False),
    (["10.02.2026", "11.03.2026"], "DMY", True), (["10/02/2026", "11/03/2026"], "MDY", True),
    (["10-02-2026 08:15", "11-03-2026 23:59"], "DMY", True), (["2026/02/13", "2026/02/10"], "YMD", False)])
def test_a_date_column_takes_one_order_and_says_when_it_assumed_it(written, order, assumed):
    schema = infer(d=written)
    col = schema.column("d")
    assert (col.kind, col.date_order) == ("datetime", order)
    evidence = why(schema, "d")
    assert ("no value decides whether the day or the month comes first" in evidence) == assumed, evidence
    if assumed:
        other = {"DMY": "MDY", "MDY": "DMY"}[order]
        assert f"set date_order: {other}" in evidence


def test_every_later_value_is_read_in_the_columns_order_or_refused(tmp_path):
    written = ["13.02.2026", "10.02.2026", "01.12.2025", "28.02.2026"] * 10
    schema, _ = csv_schema(tmp_path, pd.DataFrame({"d": written, "y": Y}))
    assert schema.column("d").date_order == "DMY"
    request = pd.DataFrame({"d": ["10.02.2026", "13.02.2026", "10/02/2026 08:30", "2026-02-10", "02/13/2026",
                                  "31.02.2026"]}, dtype=object)
    checked = schema.check(request, mode="request")
    assert checked.frame["d"].tolist()[:4] == [pd.Timestamp(t, tz="UTC") for t in (
        "2026-02-10", "2026-02-13", "2026-02-10 08:30", "2026-02-10")]
    [error] = checked.report.errors
    assert (error.column, error.count, error.values) == ("d", 2, ["02/13/2026", "31.02.2026"])
    assert "day first, like 31.12.2026, or ISO 8601" in error.message
    # an ISO column never guesses an order: 03/01/2026 is March or January
    iso = infer(d=["2026-02-10", "2026-03-11"])
    assert iso.column("d").date_order is None
    refused = iso.check(pd.DataFrame({"d": ["10.02.2026", "2026-02-10"]}), mode="request")
    assert refused.bad_rows.tolist() == [True, False]


def test_dates_a_reader_cannot_order_get_a_datetime_hint():
    schema = infer(d=[f"{m} {n} 2026" for n in range(1, 31) for m in ("Mar", "Apr")])
    reason = schema.ignored["d"]
    assert "features.datetime: [d]" in reason and "features.categorical" not in reason


# -- 3. Parquet dates ----------------------------------------------------------------------------------


def test_parquet_dates_are_dates_as_from_csv(tmp_path):
    days = pd.Timestamp("2026-01-01") + pd.to_timedelta(np.arange(40) * 7, unit="D")
    iso = [d.strftime("%Y-%m-%d") for d in days]
    table = pa.table({"d32": pa.array([d.date() for d in days], pa.date32()), "iso": pa.array(iso),
                      "large": pa.array(iso, pa.large_string()), "dict": pa.array(iso).dictionary_encode(),
                      "y": pa.array(Y)})
    pq.write_table(table, tmp_path / "t.parquet")
    schema = Schema.infer(pd.concat(list(iter_batches(tmp_path / "t.parquet"))), SPEC)
    dates = ["d32", "iso", "large", "dict"]
    assert {c.name: c.kind for c in schema.features} == dict.fromkeys(dates, "datetime")
    pd.DataFrame(dict.fromkeys(dates, iso) | {"y": Y}).to_csv(tmp_path / "t.csv", index=False)
    from_parquet = schema.conform(pd.concat(list(iter_batches(tmp_path / "t.parquet"))))[0]
    from_csv = schema.conform(pd.concat(list(iter_batches(tmp_path / "t.csv", types=schema.kinds))))[0]
    assert from_parquet[dates].equals(from_csv[dates])
    assert from_csv["d32"].iloc[1] == pd.Timestamp("2026-01-08", tz="UTC")


# -- 4. numbers that fit two readings --------------------------------------------------------------------


def test_a_number_that_fits_two_readings_is_named_at_ingest(tmp_path):
    frame = pd.DataFrame({"dots": ["88.699", "1.485", "32.969", "412"] * 10,
                          "commas": ["1,234", "5,678", "9,001", "12"] * 10,
                          "decided": ["88.699", "1.5", "32.969", "412"] * 10,
                          "grouped": ["1.234.567", "88.699", "2.000", "7"] * 10, "y": Y})
    schema, _ = csv_schema(tmp_path, frame, sep=";")
    values = schema.conform(pd.concat(list(iter_batches(tmp_path / "first.csv"))))[0]
    assert values["dots"].tolist()[:2] == [88.699, 1.485]  # the reading chosen: a decimal point ...
    assert "no value decides whether a dot is a decimal point or groups thousands ('88.699'): read as a " \
           "decimal point (88.699 = 88.699); if the dots group thousands, set number_format: '1.234,5'" \
           in why(schema, "dots")  # ... and said, with how to choose the other
    assert values["commas"].tolist()[:2] == [1234.0, 5678.0]
    assert "read as grouping thousands (1,234 = 1234); if it is a decimal comma, set number_format: " \
           "'1234,5'" \
           in why(schema, "commas")
    assert "no value decides" not in why(schema, "decided") + why(schema, "grouped")
    assert values["grouped"].tolist()[:2] == [1234567.0, 88699.0]


# -- 6. a file pandas wrote back ------------------------------------------------------------------------


def test_a_decimal_comma_file_written_back_by_pandas_is_read_plainly(tmp_path):
    schema, path = csv_schema(tmp_path, pd.DataFrame({"v": ["1,38", "2,5", "13,75", "1380,5"] * 10, "y": Y}),
                              sep=";")
    assert schema.column("v").number_format == "1234,5"
    pd.read_csv(path, sep=";", decimal=",").to_csv(tmp_path / "back.csv", index=False)  # 1.38 in a comma file
    frame, report = schema.conform(pd.concat(list(iter_batches(tmp_path / "back.csv", types=schema.kinds))))
    assert frame["v"].tolist()[:4] == [1.38, 2.5, 13.75, 1380.5] and report.ok
    [note] = [a for a in report.anomalies if a.column == "v"]
    assert (note.kind, note.severity, note.count) == ("number_format", "warning", 40)
    assert "read plainly" in note.describe() and "'1.38'" in note.describe()
    # per batch, not per value: in a batch that mixes the two ways, the value not in the format is refused
    mixed = schema.check(pd.DataFrame({"v": ["1,380", "1.38"]}), mode="request")
    assert mixed.frame["v"].tolist()[0] == 1.38 and mixed.bad_rows.tolist() == [False, True]


# -- 5. date/times have a range ---------------------------------------------------------------------------


def test_datetimes_out_of_range_are_warned_about_like_numbers():
    schema = infer(t=[f"2026-0{m}-1{m}T08:00:00Z" for m in range(1, 10)])
    col = schema.column("t")
    year = 365.25 * 86400
    first, last = pd.Timestamp("2026-01-11T08:00Z").timestamp(), pd.Timestamp("2026-09-19T08:00Z").timestamp()
    assert (col.min, col.max) == (first - year, last + 10 * year)  # a year before, ten after, at least
    request = pd.DataFrame({"t": ["0001-01-01", "9999-12-31", "2026-05-05", "2031-01-01"]})
    checked = schema.check(request, mode="request")
    assert checked.report.ok
    found = {(a.kind, a.count, tuple(a.rows)) for a in checked.report.anomalies}
    assert found == {("out_of_range", 1, (0,)), ("out_of_range", 1, (1,))}
    assert {a.message for a in checked.report.anomalies} == {
        "1 values before the schema's earliest 2025-01-11T02:00:00Z",
        "1 values after the schema's latest 2036-09-18T20:00:00Z"}
    example = schema.example_row()["t"]
    assert schema.check(pd.DataFrame({"t": [example]}), mode="request").report.anomalies == []
    stats = ColumnStats("datetime")  # year 9999 is past pandas' nanoseconds: still counted
    stats.update(pd.Series(pd.to_datetime(["9999-12-31", "0001-01-01"], utc=True, format="ISO8601")))
    assert (stats.min, stats.max) == (-62135596800.0, 253402214400.0)
    assert epoch_seconds(pd.Series(pd.to_datetime(["1970-01-02"], utc=True))).tolist() == [86400.0]


def test_the_service_warns_per_row_about_datetimes_out_of_range():
    from everloop.serve._batcher import RowWarnings

    schema = infer(t=[f"2026-0{m}-1{m}T08:00:00Z" for m in range(1, 10)])
    request = pd.DataFrame({"t": ["0001-01-01", "2026-05-05", "9999-12-31"]})
    found = RowWarnings(schema).find(schema.check(request, mode="request").frame)
    assert [(w.row, w.column, w.value) for w in found] == [
        (0, "t", "0001-01-01T00:00:00Z"), (2, "t", "9999-12-31T00:00:00Z")]
    assert found[0].why == "date/time 0001-01-01T00:00:00Z is before the schema's earliest 2025-01-11T02:00:00Z"


def test_local_times_the_clock_skips_are_reported():
    schema = Schema([ColumnSchema("t", "datetime", dtype="datetime", timezone="Europe/Berlin")])
    checked = schema.check(pd.DataFrame({"t": ["2026-03-29 02:30", "2026-03-29 03:30", "2026-10-25 02:30"]}),
                           mode="request")
    assert checked.frame["t"].tolist() == [pd.Timestamp(t) for t in (
        "2026-03-29T01:00Z", "2026-03-29T01:30Z", "2026-10-25T00:30Z")]
    [gap] = checked.report.anomalies
    assert (gap.kind, gap.severity, gap.rows, gap.values) == \
        ("nonexistent_time", "warning", [0], ["2026-03-29 02:30"])
    assert "do not exist in Europe/Berlin" in gap.message


# -- 7. integer codes and phone numbers ---------------------------------------------------------------------


def test_integer_codes_get_a_hint_and_phone_numbers_are_identifiers():
    rng = np.random.default_rng(2)
    schema = infer(zip_code=rng.choice([10115, 20095, 80331, 50667], 40).tolist(),
                   store_id=rng.choice([3, 7, 12], 40).tolist(), rooms=rng.choice([1, 2, 3, 4], 40).tolist(),
                   phone=rng.integers(10**9, 10**10, 40).tolist(),
                   income=rng.integers(20_000, 99_999, 40).tolist(),
                   price=(rng.integers(100, 900, 40) * 10_000).tolist())
    assert {c.name: c.kind for c in schema.features} == dict.fromkeys(
        ["zip_code", "store_id", "rooms", "income", "price"], "numeric")
    assert "features.categorical: [zip_code]" in why(schema, "zip_code")
    assert "features.categorical: [store_id]" in why(schema, "store_id")
    assert "features.categorical" not in why(schema, "rooms") + why(schema, "income")
    assert "like phone or card numbers" in schema.ignored["phone"]
    assert "features.numeric: [phone]" in schema.ignored["phone"]


# -- 8. the smaller ones ----------------------------------------------------------------------------------


def test_a_header_only_file_is_bad_input_not_a_failed_check(tmp_path):
    (tmp_path / "h.csv").write_text("a,b,y\n")
    with pytest.raises(DataError, match="no rows: the file has a header but no data rows") as info:
        list(iter_batches(tmp_path / "h.csv"))
    assert info.value.report is None  # exit 2 (bad input), as an empty file
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "a.csv").write_text("a,b,y\n")
    (parts / "b.csv").write_text("a,b,y\n1,2,0\n")
    assert pd.concat(list(iter_batches(parts)))["a"].tolist() == [1]  # an empty part among others is skipped


def test_type_mismatch_lines_name_their_values():
    schema = infer(age=[30, 41, 52, 63])
    report = schema.validate(pd.DataFrame({"age": ["forty", "31", "12x", "forty", "?"], "y": [0, 1] * 2 + [0]}))
    [error] = report.errors
    assert error.describe() == "column 'age': 4 values are not numbers (e.g. rows 1, 3, 4): 'forty', '12x'"


def test_a_dash_for_missing_says_why_the_column_is_not_numbers():
    rng = np.random.default_rng(0)
    values = [str(v) for v in rng.normal(size=36).round(2)] + ["-"] * 4
    reason = infer(m=values).ignored["m"]
    assert reason.startswith("numbers, but 4 of 40 values are not numbers: '-' (4 rows); read as text")
    assert "features.numeric: [m]" in reason and "leave their cells empty" in reason
    few = infer(m=["1", "2", "3", "-"])
    assert few.column("m").kind == "categorical"
    assert "mostly numbers, but 10 of 40 values are not numbers: '-' (10 rows)" in why(few, "m")
    # once the cells are empty, the column is numbers
    assert infer(m=["1", "2", "3", None]).column("m").kind == "numeric"


def test_profile_numbers_of_datetimes_are_seconds_whatever_the_resolution():
    from everloop.data import numbers

    stamps = pd.Series(pd.to_datetime(["2026-03-01T06:15Z", None], utc=True))
    for unit in ("s", "ms", "us", "ns"):
        got = numbers(stamps.dt.as_unit(unit))
        assert got[0] == 1772345700.0 and np.isnan(got[1])


# -- found by a tester trying to break the above ------------------------------------------------------------


def test_a_request_value_reads_the_same_whatever_else_is_in_the_model_call():
    # The service checks many clients' rows in one call: a per-batch reading let "1.500" read as 1.5
    # whenever another client sent a plain "1.5" at the same moment.
    schema = Schema([ColumnSchema("amount", "numeric", number_format="1.234,5", min=0.0, max=1e6)])
    alone = schema.check(pd.DataFrame({"amount": ["1.500"]}), mode="request", per_value=True)
    mixed = schema.check(pd.DataFrame({"amount": ["1.500", "1.5", "2,5"]}), mode="request", per_value=True)
    assert alone.frame["amount"].tolist() == [1500.0]
    assert mixed.frame["amount"].tolist() == [1500.0, 1.5, 2.5] and mixed.report.ok
    [note] = [a for a in mixed.report.anomalies if a.kind == "number_format"]
    assert note.rows == [1] and note.severity == "warning"


@pytest.mark.parametrize("written", ["2025-06-23", "2025-06-23T00:00:00", "2025-06-23 00:00",
                                     "2025-06-23T00:00:00+02:00", "2025-06-22T22:00:00Z"])
def test_a_date_alone_is_read_in_the_schemas_zone_like_every_other_spelling(written):
    # `-23` (the day) was read as a UTC offset: a date alone was two hours off every other spelling
    schema = Schema([ColumnSchema("t", "datetime", dtype="datetime", timezone="Europe/Berlin")])
    read = schema.check(pd.DataFrame({"t": [written]}), mode="request").frame["t"]
    assert read.iloc[0] == pd.Timestamp("2025-06-22T22:00:00Z")


def test_a_date_before_year_1_is_a_warning_not_a_crash():
    from everloop.serve._batcher import RowWarnings

    schema = infer(t=[f"2026-0{m}-1{m}T08:00:00Z" for m in range(1, 10)])
    checked = schema.check(pd.DataFrame({"t": ["2026-05-05", "0001-01-01T00:00:00+01:00"]}), mode="request")
    found = RowWarnings(schema).find(checked.frame)
    assert [(w.row, w.value) for w in found] == [(1, "0000-12-31T23:00:00Z")]


@pytest.mark.parametrize(("text", "where"), [
    ("amount;plan\n1.500;a\n2.000;b;x\n3.000;c\n", "line 3 (data row 2): Expected 2 columns (as in the header), got 3"),
    ("amount;plan\n1.500;a\n2,5\n", "line 3 (data row 2): Expected 2 columns (as in the header), got 1")])
def test_one_row_of_the_wrong_width_does_not_change_the_sniffed_delimiter(tmp_path, text, where):
    path = tmp_path / "rows.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=re.escape(where)):
        list(iter_batches(path))
