"""The command line around schemas and datasets (issue 11): `schema accept --from-data` follows the first
ingest's rules, printed hints keep their brackets, a dataset's identity includes the schema that read
it, the fix a conflict warning suggests works as typed, quarantined rows are named by number, labels
written as 0.0/1.0 are the classes 0/1, and every path on the command line is relative to the current
directory."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from everloop import data
from everloop.spec import load_spec
from everloop.store import Store
from everloop.train._labels import label_parser, parse_label
from tests.conftest import write_project


@pytest.fixture
def ingested(tmp_path: Path, everloop) -> Path:
    """A 300-row churn project whose data.source was ingested once (schema v1, dataset v1)."""
    folder = write_project(tmp_path / "proj", rows=300)
    assert everloop("ingest", "-p", str(folder)).code == 0
    return folder


def _json(run) -> dict:
    assert run.code == 0, run.err + run.out
    return json.loads(run.out)


def _with_new_columns(folder: Path) -> pd.DataFrame:
    """The project's rows with four columns the schema has never seen: an account number handed out in
    sequence (an identifier), an e-mail per row (free text), a small count (a feature) and a column the
    project file will exclude."""
    frame = pd.read_csv(folder / "data" / "customers.csv")
    frame["account_no"] = np.arange(100001, 100001 + len(frame))
    frame["email"] = [f"user{i}@example.com" for i in range(len(frame))]
    frame["visits"] = np.arange(len(frame)) % 7
    frame["internal_flag"] = np.arange(len(frame)) % 3
    return frame


def _set_features(folder: Path, **features) -> None:
    spec_file = folder / "everloop.yaml"
    body = yaml.safe_load(spec_file.read_text())
    body["features"] = features
    spec_file.write_text(yaml.safe_dump(body, sort_keys=False))


# -- 1. schema accept --from-data: the first ingest's rules, names printed whole ------------------------


def test_schema_accept_from_data_adds_columns_as_the_first_ingest_would(ingested, tmp_path, everloop):
    _set_features(ingested, exclude=["internal_flag"])
    _with_new_columns(ingested).to_csv(tmp_path / "new.csv", index=False)
    run = everloop("schema", "accept", "--from-data", "new.csv", "-p", str(ingested), cwd=tmp_path)
    assert run.code == 0, run.err
    # rich markup used to eat "[account_no]": the hint must stay a project-file line one can copy
    assert "features.numeric: [account_no]" in run.out and "features.categorical: [email]" in run.out
    shown = _json(everloop("schema", "show", "--json", "-p", str(ingested)))
    features = {c["name"] for c in shown["columns"] if c["role"] == "feature"}
    assert "visits" in features
    assert not features & {"account_no", "email", "internal_flag"}
    assert shown["ignored"]["internal_flag"] == "features.exclude in the project file"
    assert shown["ignored"]["account_no"].startswith("looks like an identifier")
    assert shown["ignored"]["email"].startswith("looks like an identifier or free text")
    # the first ingest of the same file in a fresh project makes the same features
    fresh = write_project(tmp_path / "fresh", rows=10)
    _set_features(fresh, exclude=["internal_flag"])
    _with_new_columns(ingested).to_csv(fresh / "data" / "customers.csv", index=False)
    assert everloop("ingest", "-p", str(fresh)).code == 0
    first = _json(everloop("schema", "show", "--json", "-p", str(fresh)))
    assert {c["name"] for c in first["columns"] if c["role"] == "feature"} == features


def test_schema_accept_from_data_reads_known_columns_by_the_schema(tmp_path, everloop):
    """A code column the schema holds as text (leading zeros) gains the new file's codes as categories,
    even when none of them has a leading zero (read without the schema, they would look like numbers)."""
    folder = write_project(tmp_path / "proj", rows=300)
    frame = pd.read_csv(folder / "data" / "customers.csv")
    frame["store"] = [f"{n:05d}" for n in np.arange(len(frame)) % 4 + 17]  # 00017 .. 00020
    frame.to_csv(folder / "data" / "customers.csv", index=False)
    assert everloop("ingest", "-p", str(folder)).code == 0
    later = frame.head(100).copy()
    later["store"] = ["12345", "23456"] * 50
    later.to_csv(tmp_path / "later.csv", index=False)
    run = everloop("schema", "accept", "--from-data", "later.csv", "-p", str(folder), cwd=tmp_path)
    assert run.code == 0, run.err
    store = next(c for c in _json(everloop("schema", "show", "--json", "-p", str(folder)))["columns"]
                 if c["name"] == "store")
    assert (store["kind"], store["categories"]) == ("categorical",
                                                    ["00017", "00018", "00019", "00020", "12345", "23456"])


def test_printed_user_text_keeps_its_brackets(ingested, tmp_path, everloop):
    """Column names, categories and reasons are printed as they are, never read as rich markup."""
    frame = pd.read_csv(ingested / "data" / "customers.csv").head(60)
    frame.loc[0, "plan"] = "[gold]"
    frame["[extra]"] = 1
    frame.to_csv(tmp_path / "rows.csv", index=False)
    p = ["-p", str(ingested)]
    ingest = everloop("ingest", "rows.csv", *p, cwd=tmp_path)
    assert ingest.code == 0, ingest.err
    assert "'[gold]'" in ingest.out and "column '[extra]': not in the schema; ignored" in ingest.out
    validate = everloop("validate", "rows.csv", *p, cwd=tmp_path)
    assert "'[gold]'" in validate.out and "[extra]" in validate.out
    shown = everloop("datasets", "show", "2", *p)
    assert "'[gold]'" in shown.out and "column '[extra]'" in shown.out


# -- 2. a dataset's identity includes the schema that read it ------------------------------------------


def test_identical_rows_under_a_new_schema_are_a_new_version_naming_that_schema(ingested, tmp_path, everloop):
    _with_new_columns(ingested).drop(columns=["internal_flag"]).to_csv(tmp_path / "new.csv", index=False)
    p = ["-p", str(ingested)]
    before = everloop("ingest", "new.csv", *p, cwd=tmp_path)  # schema v1 has none of the new columns
    assert before.code == 0, before.err
    assert "no new version: new.csv read with schema v1 gives the rows of dataset v1" in before.out
    # the columns the schema does not know are named, with the command that adds them
    assert "column 'account_no, email, visits': columns not in the schema; ignored" in before.out
    assert f"everloop schema accept --from-data new.csv -p {ingested}" in before.out
    assert everloop("schema", "accept", "--from-data", "new.csv", *p, cwd=tmp_path).code == 0
    after = _json(everloop("ingest", "new.csv", *p, "--json", cwd=tmp_path))
    assert (after["version"], after["schema_version"], after["deduplicated"]) == (2, 2, False)
    assert after["columns"] == 19  # the 18 columns and visits
    text = everloop("ingest", "new.csv", *p, cwd=tmp_path).out
    assert "read with schema v2 gives the rows of dataset v2" in text
    assert "checked against schema v2: 16 features" in text
    # the original file is no copy of dataset v1 any more: it lacks 'visits' under schema v2
    assert everloop("ingest", *p).code == 1


def test_dataset_identity_is_the_rows_and_the_schema_version():
    assert data._datasets.dataset_identity("ab" * 32, 1) != data._datasets.dataset_identity("ab" * 32, 2)
    assert data._datasets.dataset_identity("ab" * 32, 1) == data._datasets.dataset_identity("ab" * 32, 1)


# -- 3. the conflict warning's fix works; roles cannot be excluded ------------------------------------


def test_the_exclude_conflict_fix_is_a_command_that_works(ingested, tmp_path, everloop):
    _set_features(ingested, exclude=["region"])
    here = tmp_path / "elsewhere"
    here.mkdir()
    run = everloop("ingest", "-p", str(ingested), cwd=here)
    assert run.code == 0, run.err
    line = next(line for line in run.out.splitlines() if line.startswith("warning: features.exclude"))
    command = line.split("features section: ", 1)[1]
    assert command == f"everloop schema accept --from-data ../proj/data/customers.csv -p {ingested}"
    accepted = everloop(*shlex.split(command)[1:], cwd=here)
    assert accepted.code == 0, accepted.err
    assert "- column 'region'" in accepted.out
    assert "+ ignored 'region': features.exclude in the project file" in accepted.out
    shown = _json(everloop("schema", "show", "--json", "-p", str(ingested)))
    assert shown["schema_conflicts"] == [] and "region" in shown["ignored"]
    again = _json(everloop("ingest", "-p", str(ingested), "--json"))
    assert (again["version"], again["schema_version"], again["columns"]) == (2, 2, 17)
    assert again["schema_conflicts"] == []


def test_a_named_kind_is_applied_by_the_same_command(ingested, everloop):
    _set_features(ingested, categorical=["num_devices"])  # inferred numeric
    run = everloop("ingest", "-p", str(ingested))
    assert "features.categorical names 'num_devices', which the schema reads as numeric" in run.out
    assert everloop("schema", "accept", "--from-data", str(ingested / "data" / "customers.csv"),
                    "-p", str(ingested)).code == 0
    shown = _json(everloop("schema", "show", "--json", "-p", str(ingested)))
    devices = next(c for c in shown["columns"] if c["name"] == "num_devices")
    values = pd.read_csv(ingested / "data" / "customers.csv")["num_devices"]
    assert devices["kind"] == "categorical"
    assert devices["categories"] == sorted(str(v) for v in values.unique())
    assert shown["schema_conflicts"] == []


@pytest.mark.parametrize("column, role", [("churned", "target"), ("customer_id", "id"),
                                          ("event_time", "timestamp")])
def test_excluding_the_target_id_or_timestamp_is_refused(tmp_path, everloop, column, role):
    folder = write_project(tmp_path / "proj", rows=100)
    _set_features(folder, exclude=["region", column])
    run = everloop("validate", "-p", str(folder))
    assert run.code == 2
    assert (f"features.exclude lists [{column!r}], which is data.{role}: the target, id and timestamp are "
            "never features; remove it from features.exclude") in run.err
    assert "Traceback" not in run.err


# -- 4. quarantined rows are named by number ---------------------------------------------------------


def test_quarantined_rows_are_named_in_ingest_and_datasets_show(ingested, tmp_path, everloop):
    frame = pd.read_csv(ingested / "data" / "customers.csv").head(50)
    frame["age"] = frame["age"].astype(object)
    frame.loc[[3, 17], "age"] = "old"
    frame.loc[30, "churned"] = None
    frame.to_csv(tmp_path / "dirty.csv", index=False)
    p = ["-p", str(ingested)]
    refused = everloop("ingest", "dirty.csv", *p, cwd=tmp_path)
    assert refused.code == 1
    assert f"everloop ingest dirty.csv --mode quarantine -p {ingested}" in refused.err
    run = everloop("ingest", "dirty.csv", "--mode", "quarantine", *p, cwd=tmp_path)
    assert run.code == 0, run.err
    assert "3 rows quarantined: rows 4, 18, 31 (data rows counted from 1" in run.out
    assert "quarantined: column 'age': 2 values are not numbers (e.g. rows 4, 18)" in run.out
    assert "quarantined: column 'churned': 1 missing labels (e.g. rows 31)" in run.out
    as_json = _json(everloop("ingest", "dirty.csv", "--mode", "quarantine", "--json", *p, cwd=tmp_path))
    assert as_json["quarantined_rows"] == [4, 18, 31]
    shown = everloop("datasets", "show", str(as_json["version"]), *p)
    assert "quarantined: column 'age': 2 values are not numbers (e.g. rows 4, 18)" in shown.out
    quarantine_table = shown.out.split("quarantined rows (first 3 of 3)")[1]
    table = [[cell.strip() for cell in line.split("│")[1:3]] for line in quarantine_table.splitlines()
             if line.startswith("│")]
    assert table == [
        ["4", "age: values are not numbers"], ["18", "age: values are not numbers"],
        ["31", "churned: missing labels"]]


# -- 5. integral float labels are integer classes ------------------------------------------------------


def test_labels_written_as_floats_mean_the_integer_classes():
    parse = label_parser("classification", ["0.0", "1.0"])  # an int column with nulls, read as text
    assert [parse(v) for v in (0, 1, 0.0, 1.0, "0", "1", " 1.0 ", "0.0", np.int64(1))] == \
        ["0.0", "1.0", "0.0", "1.0", "0.0", "1.0", "1.0", "0.0", "1.0"]
    assert parse_label("classification", [0, 1], "1.0") == 1
    for bad in (2, "2", 0.5, True, "yes"):
        with pytest.raises(ValueError, match="expected one of the classes"):
            parse(bad)
    # "1" and "1.0" as two classes: only the exact spellings; numbers are not guessed
    both = label_parser("classification", ["1", "1.0"])
    assert (both("1"), both("1.0")) == ("1", "1.0")
    # names that are not numbers keep their meaning
    assert label_parser("classification", ["a", "b"])("a") == "a"


def test_feedback_0_is_recorded_for_a_label_column_written_as_floats(tmp_path, everloop):
    from fastapi.testclient import TestClient

    from everloop import registry, train
    from everloop.serve import create_app
    from tests.conftest import feature_rows

    folder = write_project(tmp_path / "proj", rows=400)
    spec, store = load_spec(folder), Store.for_project(folder)
    data.ingest(store, spec, base=folder)
    frame = pd.read_csv(folder / "data" / "customers.csv")
    frame["churned"] = frame["churned"].astype(float)
    frame.loc[[5, 9], "churned"] = np.nan  # pandas writes the column as 0.0/1.0
    frame.to_csv(tmp_path / "floats.csv", index=False)
    version = data.ingest(store, spec, tmp_path / "floats.csv", base=folder, mode="quarantine")
    model = train.train(store, spec, version.version)
    registry.promote(store, spec, model.version, force=True)
    with TestClient(create_app(folder, watch=False)) as client:
        answer = client.post("/predict", json={"instances": feature_rows(frame.head(4))}).json()
        client.app.state.log.flush()
    ids = [p["id"] for p in answer["predictions"]]
    pd.DataFrame({"id": ids, "label": ["0", "1", "0.0", "1.0"]}).to_csv(tmp_path / "labels.csv", index=False)
    run = everloop("feedback", "labels.csv", "-p", str(folder), cwd=tmp_path)
    assert run.code == 0, run.out + run.err
    assert "4 labels recorded from 4 rows" in run.out
    store.close()


# -- 6. paths on the command line are relative to the current directory --------------------------------


def test_models_import_and_schema_accept_read_paths_from_the_current_directory(ingested, tmp_path, everloop):
    import joblib
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    from everloop.demo._scenario import FEATURES_CATEGORICAL, FEATURES_NUMERIC

    here = tmp_path / "elsewhere"
    here.mkdir()
    frame = pd.read_csv(ingested / "data" / "customers.csv")
    prep = ColumnTransformer([("cat", OneHotEncoder(handle_unknown="ignore"), FEATURES_CATEGORICAL)],
                             remainder="passthrough")
    model = Pipeline([("prep", prep), ("clf", HistGradientBoostingClassifier(max_iter=20))])
    model.fit(frame[FEATURES_NUMERIC + FEATURES_CATEGORICAL], frame["churned"])
    joblib.dump(model, here / "model.joblib")
    p = ["-p", str(ingested)]
    imported = _json(everloop("models", "import", "model.joblib", *p, "--json", cwd=here))
    assert imported["version"] == 1
    missing = everloop("models", "import", "absent.joblib", *p, cwd=here)
    assert missing.code == 2 and str(here / "absent.joblib") in missing.err
    # inside the project, without -p: still the current directory, not the project folder
    sub = ingested / "incoming"
    sub.mkdir()
    _with_new_columns(ingested).drop(columns=["internal_flag"]).head(100).to_csv(sub / "new.csv", index=False)
    assert everloop("schema", "accept", "--from-data", "new.csv", cwd=sub).code == 0
    ingest = _json(everloop("ingest", "new.csv", "--json", cwd=sub))
    assert ingest["source"] == str(sub / "new.csv") and ingest["schema_version"] == 2
    assert _json(everloop("validate", "new.csv", "--json", cwd=sub))["ok"]


# -- the schema file keeps every field the schema has (date/time ranges, date orders) ------------------


def test_the_schema_file_writes_time_ranges_as_iso_text_and_reads_them_back_exactly(ingested, everloop):
    path = ingested / "schema.yaml"
    body = yaml.safe_load(path.read_text())
    stored = next(c for c in _json(everloop("schema", "show", "--json", "-p", str(ingested)))["columns"]
                  if c["name"] == "event_time")
    if stored["min"] is None:  # no range recorded for date/times: nothing to write
        pytest.skip("this build records no date/time ranges")
    assert body["columns"]["event_time"]["min"].endswith("Z")
    same = everloop("schema", "accept", "-p", str(ingested))
    assert same.code == 0 and "no change: schema v1 is already this one" in same.out
    body["columns"]["event_time"]["max"] = "2030-06-30"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    edited = everloop("schema", "accept", "-p", str(ingested))
    assert edited.code == 0, edited.err
    assert "~ event_time.max: " in edited.out and "-> 2030-06-30T00:00:00Z" in edited.out
    event_time = next(c for c in _json(everloop("schema", "show", "--json", "-p", str(ingested)))["columns"]
                      if c["name"] == "event_time")
    assert event_time["max"] == 1909008000.0  # 2030-06-30T00:00:00Z in seconds since 1970
    body["columns"]["event_time"]["max"] = "soon"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    refused = everloop("schema", "accept", "-p", str(ingested))
    assert refused.code == 2
    assert ("columns.event_time.max: expected a date/time in ISO 8601, such as 2026-03-01 or "
            "2026-03-01T08:15:00Z (got 'soon')") in refused.err
    body["columns"]["event_time"]["max"] = "2030-06-30"
    body["columns"]["age"]["date_order"] = "DMY"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    refused = everloop("schema", "accept", "-p", str(ingested))
    assert refused.code == 2
    assert "columns.age: date_order 'DMY' is not one of ['DMY', 'MDY', 'YMD'] (datetime columns only)" \
        in refused.err
