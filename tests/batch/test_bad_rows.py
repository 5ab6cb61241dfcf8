"""Batch scoring sets rows with errors of their own aside, with their reasons, and scores the rest
(issue 14): a side file `<stem>.rejected<suffix>` beside the output, exit 1 when rows were set aside,
`--strict` refusing the whole file as before; whole-file problems still refuse everything."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from everloop.batch import score_file
from everloop.demo import make_churn
from everloop.errors import DataError

BAD = {1234: ("age", "forty"), 5000: ("monthly_charges", "inf"), 9876: ("age", "[1, 2]")}  # 0-based rows


def with_bad_rows(path, rows: int = 10_000):
    """A churn CSV of `rows` rows (no target) with the BAD cells (of rows it has) written in; returns the frame."""
    frame = make_churn(rows, seed=11).drop(columns=["churned"]).astype({"age": object, "monthly_charges": object})
    for row, (column, value) in BAD.items():
        if row < rows:
            frame.loc[row, column] = value
    frame.to_csv(path, index=False)
    return frame


def test_bad_rows_are_set_aside_and_the_rest_scored_as_alone(trained, tmp_path):
    folder, spec, store = trained
    frame = with_bad_rows(tmp_path / "in.csv")
    result = score_file(store, tmp_path / "in.csv", tmp_path / "out.parquet", chunk_rows=3000)
    assert (result.rows, result.rejected) == (10_000 - 3, 3)
    assert result.rejected_output == str(tmp_path / "out.rejected.parquet")
    assert {(e["column"], e["kind"]) for e in result.errors} == {("age", "type_mismatch"),
                                                                ("monthly_charges", "type_mismatch")}

    side = pd.read_parquet(tmp_path / "out.rejected.parquet")
    assert side["row"].tolist() == [r + 1 for r in sorted(BAD)]  # data rows from 1
    assert side["customer_id"].tolist() == frame.loc[sorted(BAD), "customer_id"].tolist()
    assert side["age"].tolist()[0] == "forty" and side["age"].tolist()[2] == "[1, 2]"
    assert side["reason"].tolist() == ["age: values are not numbers", "monthly_charges: values are infinite",
                                       "age: values are not numbers"]
    assert list(side.columns) == ["row", *frame.columns, "reason"]

    frame.drop(index=list(BAD)).to_csv(tmp_path / "good.csv", index=False)
    alone = score_file(store, tmp_path / "good.csv", tmp_path / "alone.parquet", chunk_rows=3000)
    assert alone.rejected == 0 and alone.rejected_output is None
    ours, theirs = pd.read_parquet(tmp_path / "out.parquet"), pd.read_parquet(tmp_path / "alone.parquet")
    pd.testing.assert_frame_equal(ours.drop(columns="prediction_id"), theirs.drop(columns="prediction_id"))
    assert ours["prediction_id"].is_unique  # one id per scored row
    assert not (tmp_path / "alone.rejected.parquet").exists() and not list(tmp_path.glob(".tmp-*"))
    assert not list(tmp_path.glob(".*.everloop-job"))  # the job's parts go once the output is whole


def test_csv_output_gets_a_csv_side_file_and_a_stale_one_goes(trained, tmp_path):
    folder, spec, store = trained
    frame = with_bad_rows(tmp_path / "in.csv", rows=2000)
    frame.insert(0, "row", range(2000))  # a column named like the side file's own: that one gives way
    frame.to_csv(tmp_path / "in.csv", index=False)
    score_file(store, tmp_path / "in.csv", tmp_path / "out.csv", chunk_rows=300)
    side = pd.read_csv(tmp_path / "out.rejected.csv", dtype=str, keep_default_na=False)
    assert side["_row"].tolist() == ["1235"] and side["row"].tolist() == ["1234"]
    assert side["reason"].tolist() == ["age: values are not numbers"]

    frame.drop(index=[1234]).to_csv(tmp_path / "in.csv", index=False)
    result = score_file(store, tmp_path / "in.csv", tmp_path / "out.csv", chunk_rows=300)
    assert (result.rows, result.rejected) == (1999, 0)
    assert not (tmp_path / "out.rejected.csv").exists()  # it described rows this output no longer has


def test_strict_refuses_the_whole_file_and_a_missing_column_always_does(trained, tmp_path):
    folder, spec, store = trained
    with_bad_rows(tmp_path / "in.csv", rows=2000)
    with pytest.raises(DataError, match=r"'age': 1 values are not numbers \(e.g. rows 1235\)"):
        score_file(store, tmp_path / "in.csv", tmp_path / "out.parquet", chunk_rows=500, strict=True)
    make_churn(50, seed=2).drop(columns=["plan"]).to_csv(tmp_path / "noplan.csv", index=False)
    with pytest.raises(DataError, match="column 'plan': required categorical column is missing"):
        score_file(store, tmp_path / "noplan.csv", tmp_path / "out.parquet")
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".tmp-*"))


def test_a_file_of_bad_rows_only_writes_nothing(trained, tmp_path):
    folder, spec, store = trained
    make_churn(20, seed=2).assign(age="old").to_csv(tmp_path / "in.csv", index=False)
    with pytest.raises(DataError, match="every row has errors; nothing was written"):
        score_file(store, tmp_path / "in.csv", tmp_path / "out.csv")
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".tmp-*"))


def test_the_cli_exits_1_with_the_counts_0_when_all_good_and_strict_writes_nothing(trained, tmp_path, everloop):
    folder, spec, store = trained
    with_bad_rows(tmp_path / "in.csv")
    p = ("-p", str(folder))
    run = everloop("predict", str(tmp_path / "in.csv"), str(tmp_path / "out.parquet"), *p)
    assert run.code == 1, run
    assert (f"9997 rows scored into {tmp_path / 'out.parquet'}; 3 rows set aside in "
            f"{tmp_path / 'out.rejected.parquet'} (reasons: column 'age': 2 values are not numbers; "
            "column 'monthly_charges': 1 values are infinite)") in run.out
    as_json = json.loads(everloop("predict", str(tmp_path / "in.csv"), str(tmp_path / "o.csv"), *p, "--json").out)
    assert (as_json["rows"], as_json["rejected"]) == (9997, 3)
    assert as_json["rejected_output"] == str(tmp_path / "o.rejected.csv")

    strict = everloop("predict", str(tmp_path / "in.csv"), str(tmp_path / "s.parquet"), "--strict", *p)
    assert strict.code == 1 and "nothing was written" in strict.err
    assert not list(tmp_path.glob("s*.parquet"))

    make_churn(300, seed=5).to_csv(tmp_path / "good.csv", index=False)
    good = everloop("predict", str(tmp_path / "good.csv"), str(tmp_path / "g.parquet"), *p)
    assert good.code == 0, good
    assert good.out.split()[:5] == ["300", "rows", "scored", "into", str(tmp_path / "g.parquet")]
    assert "set aside" not in good.out and not (tmp_path / "g.rejected.parquet").exists()
    assert np.isfinite(pd.read_parquet(tmp_path / "g.parquet")["proba_1"]).all()
