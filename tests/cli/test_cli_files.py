"""The command line with files a user really has (issue 11, faults 4 and 6): ambiguous or broken CSVs are
refused with one line naming where, `predict` writes the format its output name says with the columns
asked for and reports what validation saw, paths are relative to the current directory, and exit codes
are the README's (0 success, 1 a check failed, 2 bad input), never a traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pytest
import yaml

from everloop import data
from everloop.demo import make_churn
from everloop.spec import load_spec
from everloop.store import Store
from tests.conftest import Run, served_project, write_project

ID_TIME = ["customer_id", "event_time"]


@pytest.fixture(scope="module")
def proj(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One served churn project (2000 rows, model v1 in production) for the whole module."""
    folder, _, store = served_project(tmp_path_factory.mktemp("cli-files") / "proj")
    yield folder
    store.close()


def churn_rows(n: int = 60, seed: int = 11) -> pd.DataFrame:
    return make_churn(n, seed=seed)


def one_error_line(run: Run) -> str:
    """The run's stderr, checked to be exactly one line starting with 'error:' (no traceback)."""
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.err
    return lines[0]


# -- fault 4: ambiguous and broken files ----------------------------------------------------------------


def test_a_duplicated_header_is_refused_by_ingest_validate_and_predict(proj, tmp_path, everloop):
    frame = churn_rows()
    columns = list(frame.columns)
    at = columns.index("has_streaming")
    columns[at] = "age"  # age is column 3 and now also column 17
    path = tmp_path / "dup.csv"
    frame.set_axis(columns, axis=1).to_csv(path, index=False)
    before = len(data.list_datasets(Store.for_project(proj)))
    out = str(tmp_path / "o.csv")
    for args in (["ingest", str(path)], ["validate", str(path)], ["predict", str(path), out]):
        run = everloop(*args, "-p", str(proj))
        line = one_error_line(run)
        assert run.code == 2, (args, run)
        assert "duplicated column name(s): 'age' at columns 3, 17" in line and str(path) in line
    assert not (tmp_path / "o.csv").exists()
    assert len(data.list_datasets(Store.for_project(proj))) == before  # nothing stored


def test_a_duplicated_column_in_parquet_and_in_a_labels_file_is_refused(proj, tmp_path, everloop):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "dup.parquet"
    table = pa.table([pa.array(["a"]), pa.array(["b"]), pa.array([1])], names=["id", "label", "id"])
    pq.write_table(table, path)
    run = everloop("feedback", str(path), "-p", str(proj))
    assert run.code == 2 and "'id' at columns 1, 3" in one_error_line(run)


def test_the_real_entry_point_prints_no_traceback_for_a_duplicated_header(proj, tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("age,plan,age\n1,basic,2\n")
    code = "from everloop.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code, "validate", str(path), "-p", str(proj)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'age' at columns 1, 3" in result.stderr


def test_a_short_row_is_named_by_its_line_and_data_row(proj, tmp_path, everloop):
    frame = churn_rows(30)
    text = frame.to_csv(index=False).splitlines()
    text[10] = ",".join(text[10].split(",")[:3])  # line 11 of the file = data row 10, three fields left
    path = tmp_path / "short.csv"
    path.write_text("\n".join(text) + "\n")
    out = str(tmp_path / "o.parquet")
    for args in (["validate", str(path)], ["ingest", str(path)], ["predict", str(path), out]):
        run = everloop(*args, "-p", str(proj))
        line = one_error_line(run)
        assert run.code == 2
        assert "line 11 (data row 10): Expected 18 columns (as in the header), got 3" in line
        assert repr(text[10]) in line  # the row itself, to find it by eye


def test_a_quote_left_open_is_named_with_the_lines_it_swallowed(proj, tmp_path, everloop):
    path = tmp_path / "quote.csv"
    path.write_text('age,plan,churned\n1,"basic,0\n2,standard,1\n')
    line = one_error_line(run := everloop("validate", str(path), "-p", str(proj)))
    assert run.code == 2 and "lines 2-3 (data row 1, read as one row: a quote not closed?)" in line


# -- fault 6: predict ---------------------------------------------------------------------------------


def test_predict_writes_csv_and_parquet_by_extension_with_kept_columns_and_file_mode(proj, tmp_path, everloop):
    frame = churn_rows(200)
    source = tmp_path / "in.csv"
    frame.to_csv(source, index=False)
    old = os.umask(0o022)
    try:
        csv_run = everloop("predict", str(source), str(tmp_path / "out.csv"), "--keep", "plan", "--keep", "age",
                           "-p", str(proj), "--json")
        pq_run = everloop("predict", str(source), str(tmp_path / "out.parquet"), "-p", str(proj), "--json")
        os.umask(0o002)
        pq2_run = everloop("predict", str(source), str(tmp_path / "out2.pq"), "-p", str(proj))
    finally:
        os.umask(old)
    assert (csv_run.code, pq_run.code, pq2_run.code) == (0, 0, 0), (csv_run, pq_run, pq2_run)
    assert (tmp_path / "out.csv").read_bytes().startswith(b"customer_id,event_time,plan,age,prediction,")
    assert (tmp_path / "out.parquet").read_bytes()[:4] == b"PAR1"
    assert (tmp_path / "out2.pq").read_bytes()[:4] == b"PAR1"
    # the umask decides, as for any new file (mkstemp's 0600 made the output unreadable to others)
    assert (tmp_path / "out.csv").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out.parquet").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out2.pq").stat().st_mode & 0o777 == 0o664

    as_csv = pd.read_csv(tmp_path / "out.csv")
    as_parquet = pd.read_parquet(tmp_path / "out.parquet")
    scored = ["prediction", "proba_0", "proba_1", "model_version", "prediction_id"]
    assert list(as_csv.columns) == ID_TIME + ["plan", "age"] + scored
    assert list(as_parquet.columns) == ID_TIME + scored
    assert json.loads(csv_run.out)["columns"] == list(as_csv.columns)
    assert json.loads(csv_run.out)["format"] == "csv"
    assert json.loads(pq_run.out)["format"] == "parquet" and json.loads(pq_run.out)["rows"] == 200
    assert as_csv["customer_id"].tolist() == frame["customer_id"].tolist()
    assert as_csv["plan"].tolist() == frame["plan"].tolist() and as_csv["age"].tolist() == frame["age"].tolist()
    # the same predictions in both formats (CSV floats round-trip exactly), from model v1
    np.testing.assert_array_equal(as_csv["proba_1"].to_numpy(), as_parquet["proba_1"].to_numpy())
    assert as_csv["prediction"].tolist() == as_parquet["prediction"].tolist()
    assert set(as_csv["model_version"]) == {1}
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("name", ["out.txt", "out", "out.json", "out.csv.gz"])
def test_predict_refuses_an_output_name_whose_format_it_cannot_tell(proj, tmp_path, everloop, name):
    source = tmp_path / "in.csv"
    churn_rows(20).to_csv(source, index=False)
    run = everloop("predict", str(source), str(tmp_path / name), "-p", str(proj))
    line = one_error_line(run)
    assert run.code == 2 and "expected one of .parquet, .pq, .csv" in line and name in line
    assert not (tmp_path / name).exists() and not list(tmp_path.glob(".tmp-*"))


def test_predict_keep_names_a_missing_column_and_refuses_a_folder_as_output(proj, tmp_path, everloop):
    source = tmp_path / "in.csv"
    churn_rows(20).to_csv(source, index=False)
    run = everloop("predict", str(source), str(tmp_path / "o.csv"), "--keep", "segment", "-p", str(proj))
    line = one_error_line(run)
    assert run.code == 2 and "--keep segment: not a column of the input" in line and "customer_id" in line
    (tmp_path / "folder").mkdir()
    run = everloop("predict", str(source), str(tmp_path / "folder"), "-p", str(proj))
    assert run.code == 2 and "is a folder" in one_error_line(run)


def test_predict_reports_unseen_categories_named_and_counted_in_text_and_json(proj, tmp_path, everloop):
    frame = churn_rows(334)
    frame["plan"] = np.array(["gold", "silver", "bronze", "tin", "iron", "lead"])[np.arange(334) % 6]
    frame.loc[5, "age"] = 500.0  # far above the training range
    frame.loc[[7, 9], "tenure_months"] = np.nan  # nulls where training had none
    source = tmp_path / "new.csv"
    frame.to_csv(source, index=False)
    run = everloop("predict", str(source), str(tmp_path / "o.parquet"), "-p", str(proj))
    assert run.code == 0, run
    assert ("6 categories not seen in training (334 rows): 'gold', 'silver', 'bronze', 'tin', 'iron', ... "
            "(6 in all)") in run.out
    assert "column 'age': 1 values above the schema's maximum" in run.out and "(e.g. rows 6)" in run.out
    assert "column 'tenure_months': 2 missing values" in run.out and "(e.g. rows 8, 10)" in run.out
    warnings = json.loads(everloop("predict", str(source), str(tmp_path / "o.parquet"), "-p", str(proj),
                                   "--json").out)["warnings"]
    unseen = next(w for w in warnings if w["kind"] == "unseen_category")
    assert unseen["count"] == 334
    assert unseen["categories"] == ["gold", "silver", "bronze", "tin", "iron", "lead"]
    kinds = {(w["column"], w["kind"]) for w in warnings}
    assert kinds >= {("age", "out_of_range"), ("tenure_months", "null_values")}


def test_unseen_categories_are_counted_across_chunks(proj, tmp_path, everloop):
    frame = churn_rows(90)
    frame["plan"] = ["gold"] * 30 + ["silver"] * 30 + ["gold"] * 29 + ["tin"]  # chunks of 30: new ones later
    source = tmp_path / "new.csv"
    frame.to_csv(source, index=False)
    run = everloop("predict", str(source), str(tmp_path / "o.csv"), "--chunk-rows", "30", "-p", str(proj),
                   "--json")
    unseen = [w for w in json.loads(run.out)["warnings"] if w["kind"] == "unseen_category"]
    assert len(unseen) == 1 and unseen[0]["categories"] == ["gold", "silver", "tin"]
    assert unseen[0]["count"] == 90  # rows
    assert unseen[0]["message"].startswith(
        "3 categories not seen in training (90 rows): 'gold', 'silver', 'tin'")


# -- fault 6: the same report, the same exit code; messages ----------------------------------------------


def test_a_missing_column_exits_1_in_validate_ingest_and_predict_and_names_no_rows(proj, tmp_path, everloop):
    source = tmp_path / "no_plan.csv"
    churn_rows(40).drop(columns=["plan"]).to_csv(source, index=False)
    runs = {cmd: everloop(*args, "-p", str(proj)) for cmd, args in {
        "validate": ["validate", str(source)], "ingest": ["ingest", str(source)],
        "predict": ["predict", str(source), str(tmp_path / "o.csv")]}.items()}
    assert {cmd: r.code for cmd, r in runs.items()} == {"validate": 1, "ingest": 1, "predict": 1}
    for r in runs.values():
        assert "column 'plan': required categorical column is missing" in r.out + r.err
        assert "(e.g. rows )" not in r.out + r.err and "Traceback" not in r.err
    assert not (tmp_path / "o.csv").exists()


def test_a_file_with_a_header_and_no_rows_exits_2_in_validate_ingest_and_predict(proj, tmp_path, everloop):
    source = tmp_path / "header.csv"
    source.write_text(",".join(churn_rows(1).columns) + "\n")
    codes = [everloop(*args, "-p", str(proj)).code for args in (
        ["validate", str(source)], ["ingest", str(source)], ["predict", str(source), str(tmp_path / "o.csv")])]
    assert codes == [2, 2, 2] and not (tmp_path / "o.csv").exists()  # no data rows: unreadable input


def test_validation_errors_exit_1_in_ingest_as_in_validate(proj, tmp_path, everloop):
    frame = churn_rows(40).astype({"age": object})
    frame.loc[3, "age"] = "forty"
    source = tmp_path / "bad.csv"
    frame.to_csv(source, index=False)
    validate = everloop("validate", str(source), "-p", str(proj))
    ingest = everloop("ingest", str(source), "-p", str(proj))
    assert (validate.code, ingest.code) == (1, 1)
    assert "1 values are not numbers" in validate.out and "1 values are not numbers (e.g. rows 4)" in ingest.err


# -- fault 6: paths relative to the current directory ----------------------------------------------------


def test_paths_are_relative_to_the_current_directory_for_every_command(proj, tmp_path, everloop):
    here = tmp_path / "elsewhere"
    here.mkdir()
    churn_rows(50, seed=21).to_csv(here / "rows.csv", index=False)
    pd.DataFrame({"id": ["no-such-prediction"], "label": [1]}).to_csv(here / "labels.csv", index=False)
    p = ["-p", str(proj)]
    assert everloop("validate", "rows.csv", *p, cwd=here).code == 0
    assert everloop("predict", "rows.csv", "scored.csv", *p, cwd=here).code == 0
    assert len(pd.read_csv(here / "scored.csv")) == 50
    ingest = everloop("ingest", "rows.csv", *p, "--json", cwd=here)
    assert ingest.code == 0 and json.loads(ingest.out)["source"] == str(here / "rows.csv")
    feedback = everloop("feedback", "labels.csv", *p, cwd=here)  # read (exit 1: the id matches nothing)
    assert feedback.code == 1 and "1 ids match no logged prediction" in feedback.out
    for args in (["backtest", "absent.csv"], ["schema", "accept", "--from-data", "absent.csv"],
                 ["ingest", "absent.csv"], ["validate", "absent.csv"]):
        run = everloop(*args, *p, cwd=here)
        assert run.code == 2 and f"{here / 'absent.csv'}: no such file" in one_error_line(run), args


def test_the_project_files_own_source_stays_relative_to_the_project(proj, tmp_path, everloop):
    run = everloop("validate", "-p", str(proj), cwd=tmp_path)  # data/customers.csv is inside the project
    assert run.code == 0 and "no anomalies" in run.out


# -- fault 6: serve and train ---------------------------------------------------------------------------


def test_serve_on_a_busy_port_exits_2_with_one_line_naming_it(proj, everloop):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = everloop("serve", "--port", str(port), "-p", str(proj))
    assert run.code == 2
    assert one_error_line(run) == (f"error: port {port} on 127.0.0.1 is already in use; stop what listens "
                                   "there or choose another with --port")


@pytest.mark.parametrize("value, shown", [("lots", "'lots'"), (-3, "-3")])
def test_an_invalid_model_param_is_one_line_naming_param_and_value(tmp_path, everloop, value, shown):
    folder = write_project(tmp_path / "p", rows=300)
    spec_file = folder / "everloop.yaml"
    body = yaml.safe_load(spec_file.read_text())
    body["model"]["params"] = {"max_iter": value}
    spec_file.write_text(yaml.safe_dump(body, sort_keys=False))
    store = Store.for_project(folder)
    data.ingest(store, load_spec(folder), base=folder)
    run = everloop("train", "-p", str(folder))
    line = one_error_line(run)
    assert run.code == 2
    estimator = "sklearn.ensemble.HistGradientBoostingClassifier"
    assert f"model.params.max_iter: {shown} is refused by {estimator}" in line
    assert "must be an int in the range [1, inf)" in line
    store.close()


# -- fault 6: a sweep of bad inputs: one line, exit 2 ---------------------------------------------------


@pytest.mark.parametrize("case", ["missing", "folder", "empty", "glob", "model", "alias", "binary",
                                  "project is a file"])
def test_bad_inputs_give_one_line_and_exit_2(proj, tmp_path, everloop, case):
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "bin.csv").write_bytes(b"\x00\x01\x02\xff")
    (tmp_path / "folder").mkdir()
    good = str(proj / "data" / "customers.csv")
    out = str(tmp_path / "o.csv")
    args, expected = {
        "missing": (["predict", str(tmp_path / "absent.csv"), out], "absent.csv: no such file"),
        "folder": (["validate", str(tmp_path / "folder")], "matches no .csv or .parquet files"),
        "empty": (["ingest", str(tmp_path / "empty.csv")], "the file is empty"),
        "glob": (["predict", str(tmp_path / "nothing-*.csv"), out], "matches no .csv or .parquet files"),
        "model": (["predict", good, out, "--model", "99"], "model version 99 does not exist"),
        "alias": (["predict", good, out, "--model", "staging"], "alias 'staging' points at no model"),
        "binary": (["feedback", str(tmp_path / "bin.csv")], "binary data, not CSV text"),
        "project is a file": (["models"], "is a file; give the folder that holds everloop.yaml"),
    }[case]
    project = str(proj / "everloop.yaml") if case == "project is a file" else str(proj)
    run = everloop(*args, "-p", project)
    assert run.code == 2 and expected in one_error_line(run), run
    assert not Path(out).exists()


def test_predict_never_overwrites_its_input_nor_invents_folders(tmp_path):
    """Found by a new user: `predict in.csv in.csv` replaced the input with its predictions, exit 0."""
    import pandas as pd
    import pytest

    from everloop import data, registry, train
    from everloop.batch import score_file
    from everloop.errors import DataError
    from everloop.spec import load_spec
    from everloop.store import Store
    from tests.conftest import write_project

    folder = write_project(tmp_path / "p", rows=600)
    spec, store = load_spec(folder), Store.for_project(folder)
    data.ingest(store, spec, base=folder)
    registry.promote(store, spec, train.train(store, spec).version)
    source = folder / "data" / "customers.csv"
    before = source.read_bytes()
    with pytest.raises(DataError, match="would overwrite"):
        score_file(store, source, source)
    assert source.read_bytes() == before
    with pytest.raises(DataError, match="does not exist"):
        score_file(store, source, tmp_path / "no" / "such" / "out.csv")
    assert not (tmp_path / "no").exists()
    out = score_file(store, source, tmp_path / "out.csv")
    assert out.rows == len(pd.read_csv(source))
    store.close()
