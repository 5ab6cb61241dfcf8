"""Issue 11, fault 3: no column dropped or misread silently.

A partial `features` section names kinds, never the whole feature list; columns that look like identifiers
are left out with a reason that says how to keep them; every column's role and kind is reported; excluded
columns are never warned about; extra columns in a later file give one line."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from fastapi.testclient import TestClient

from everloop import data, registry, train
from everloop.data import Schema, ValidationReport
from everloop.demo import make_churn
from everloop.errors import DataError, SpecError
from everloop.serve import create_app
from everloop.spec import ProjectSpec, load_spec, parse_spec
from everloop.store import Store
from tests.conftest import write_project

CHURN_FEATURES = ["age", "tenure_months", "monthly_charges", "total_charges", "support_calls",
                  "data_usage_gb", "num_devices", "satisfaction", "days_since_last_login", "contract", "plan",
                  "region", "payment_method", "paperless_billing", "has_streaming"]
ROLES = {"target": "churned", "id": "customer_id", "timestamp": "event_time"}


def _spec(features: dict | None = None, **data_keys: str) -> ProjectSpec:
    body = {"name": "t", "data": {"source": "x.csv", **(data_keys or {"target": "churned"})}}
    return parse_spec(body | ({"features": features} if features is not None else {}))


def _issue_frame(n: int = 200, seed: int = 0) -> pd.DataFrame:
    """The issue's table: an age, a monthly charge, a plan and a label (no id declared)."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "age": rng.integers(18, 80, n),
        "monthly_charges": rng.normal(60, 20, n).round(2),
        "plan": rng.choice(["basic", "standard", "premium"], n),
        "churned": rng.integers(0, 2, n),
    })


def _kinds(schema: Schema) -> dict[str, str]:
    return {c.name: c.kind for c in schema.features}


# -- 1. a partial features section names kinds; the rest is inferred ----------------------------------


def test_naming_one_categorical_keeps_every_other_column():
    frame = _issue_frame()
    schema = Schema.infer(frame, _spec({"categorical": ["plan"]}))
    assert _kinds(schema) == {"age": "numeric", "monthly_charges": "numeric", "plan": "categorical"}
    assert schema.ignored == {}


@pytest.mark.parametrize("features", [{"categorical": []}, {"numeric": []}, {"datetime": []},
                                      {"numeric": [], "categorical": [], "datetime": []}, {}])
def test_an_empty_list_names_no_column_and_is_not_no_features(features):
    schema = Schema.infer(_issue_frame(), _spec(features))
    assert _kinds(schema) == {"age": "numeric", "monthly_charges": "numeric", "plan": "categorical"}


def test_a_named_kind_overrides_what_the_data_looks_like():
    frame = _issue_frame()
    frame["region_code"] = np.random.default_rng(1).choice([10, 20, 30, 40], len(frame))  # integer codes
    schema = Schema.infer(frame, _spec({"categorical": ["region_code"], "numeric": ["age"]}))
    assert _kinds(schema) == {"age": "numeric", "monthly_charges": "numeric", "plan": "categorical",
                              "region_code": "categorical"}
    assert schema.column("region_code").categories == ["10", "20", "30", "40"]
    roles = {r.name: r.why for r in schema.column_roles(_spec({"categorical": ["region_code"]}))}
    assert roles["region_code"] == "features.categorical in the project file"
    assert roles["monthly_charges"] == "inferred: numbers"
    assert roles["age"] == "inferred: whole numbers"
    assert roles["plan"] == "inferred: text, 3 categories"
    assert roles["churned"] == "data.target in the project file"


def test_infer_others_false_keeps_only_the_named_columns_and_says_so():
    schema = Schema.infer(_issue_frame(), _spec({"categorical": ["plan"], "infer_others": False}))
    assert schema.feature_names == ["plan"]
    assert set(schema.ignored) == {"age", "monthly_charges"}
    assert "features.infer_others is false" in schema.ignored["age"]


def test_a_named_column_the_data_lacks_is_an_error_naming_it():
    with pytest.raises(DataError, match=r"not in the data: \['plna'\]"):
        Schema.infer(_issue_frame(), _spec({"categorical": ["plna"]}))


def test_a_column_under_two_keys_is_refused_by_the_project_file():
    with pytest.raises(SpecError, match="'plan' is listed under both features.categorical and features.excl"):
        parse_spec({"name": "t", "data": {"source": "x.csv", "target": "y"},
                    "features": {"categorical": ["plan"], "exclude": ["plan"]}})


def test_partial_features_through_ingest_and_training(tmp_path: Path):
    """The issue's case end to end: `categorical: [plan]` gave a 2-column dataset and a one-feature model."""
    folder = write_project(tmp_path / "p", rows=600, features={"categorical": ["plan"]})
    spec, store = load_spec(folder), Store.for_project(folder)
    version = data.ingest(store, spec, base=folder)
    assert version.columns == 3 + len(CHURN_FEATURES)  # id, timestamp, target and every feature
    assert not [w for w in version.warnings if w["kind"] == "unexpected_column"]
    model = registry.load_model(store, train.train(store, spec).version)
    assert sorted(model.schema.feature_names) == sorted(CHURN_FEATURES)
    assert model.schema.column("plan").kind == "categorical"


# -- 2. identifiers are left out, with a reason that says how to keep them ------------------------------


def _with(frame: pd.DataFrame, **columns: object) -> pd.DataFrame:
    return frame.assign(**columns)


def test_a_sequential_account_number_is_left_out_with_how_to_keep_it():
    frame = _with(_issue_frame(), account_no=np.arange(100001, 100201))
    schema = Schema.infer(frame, _spec())
    assert "account_no" not in schema.feature_names
    assert schema.ignored["account_no"] == (
        "looks like an identifier: whole numbers, 200 different in 200 rows, rising with the row order "
        "(100001 .. 100200); to use it as a feature, name it in the project file: features.numeric: "
        "[account_no] (or features.categorical for codes)")
    kept = Schema.infer(frame, _spec({"numeric": ["account_no"]}))  # named: never dropped
    assert kept.column("account_no").kind == "numeric" and kept.ignored == {}
    as_code = Schema.infer(frame, _spec({"categorical": ["account_no"]}))
    assert as_code.column("account_no").kind == "categorical"


@pytest.mark.parametrize("name, values, how", [
    ("acct", np.random.default_rng(2).permutation(np.arange(500000, 500200)), "a run of consecutive numbers"),
    ("acct", np.arange(900000, 899800, -1), "falling with the row order"),
    ("order_id", np.random.default_rng(3).choice(10**9, 200, replace=False), "named like an identifier"),
    ("customerNumber", np.random.default_rng(4).choice(10**9, 200, replace=False), "named like an id"),
    ("row", np.arange(200), "rising with the row order"),
])
def test_whole_numbers_one_per_row_in_sequence_or_named_as_ids(name, values, how):
    schema = Schema.infer(_with(_issue_frame(), **{name: values}), _spec())
    assert name not in schema.feature_names
    assert how in schema.ignored[name] and f"features.numeric: [{name}]" in schema.ignored[name]


def test_ints_with_gaps_made_float_by_missing_values_are_still_ids():
    ids = np.arange(100001, 100201).astype(float)
    ids[[5, 77]] = np.nan
    schema = Schema.infer(_with(_issue_frame(), account_no=ids), _spec())
    assert "198 different in 198 rows" in schema.ignored["account_no"]


@pytest.mark.parametrize("name, values, why", [
    ("uuid", [str(uuid.UUID(int=i + 1)) for i in range(200)], "identifier or free text: 200 different"),
    ("code", [f"ACC-{i:06d}" for i in range(200)], "identifier or free text: 200 different values"),
    ("email", [f"user{i}@example.com" for i in range(200)], "identifier or free text"),
    ("comment", [f"note {i % 120}" for i in range(200)], "too many different values for a category: 120"),
])
def test_text_with_a_value_per_row_is_left_out(name, values, why):
    schema = Schema.infer(_with(_issue_frame(), **{name: values}), _spec())
    assert name not in schema.feature_names
    assert why in schema.ignored[name]
    assert schema.ignored[name].endswith(f"to use it as a feature, name it in the project file: "
                                         f"features.categorical: [{name}]")


def test_ordinary_features_are_never_taken_for_ids():
    rng = np.random.default_rng(5)
    n = 200
    frame = _with(
        _issue_frame(n),
        charges=rng.normal(60, 20, n).round(2),  # floats: one per row, still a measurement
        sorted_charges=np.sort(rng.normal(60, 20, n)),  # floats in row order
        whole_floats=np.arange(n, dtype=float),  # written as floats, no gaps: a measurement
        income=rng.normal(50_000, 15_000, n).round().astype(int),  # whole, nearly unique, not in sequence
        cents=rng.choice(10**9, n, replace=False),  # whole, unique, spread out, not named as an id
        visits=rng.poisson(3, n),  # whole numbers that repeat
        city=rng.choice([f"city{i}" for i in range(15)], n),  # text that repeats
    )
    schema = Schema.infer(frame, _spec())
    assert schema.ignored == {}
    assert set(schema.feature_names) == set(frame.columns) - {"churned"}


def test_few_rows_are_not_judged():
    frame = _issue_frame(15).assign(account_no=np.arange(100001, 100016))
    assert "account_no" in Schema.infer(frame, _spec()).feature_names


def test_the_demo_churn_data_keeps_every_feature(tmp_path: Path):
    frame = make_churn(3000, seed=7)
    path = tmp_path / "customers.csv"
    frame.to_csv(path, index=False)
    spec = _spec(**ROLES)
    for table in (frame, data.read_source(path, tmp_path)):  # in memory, and as the CSV reader gives it
        schema = Schema.infer(table, spec)
        assert schema.ignored == {}
        assert schema.feature_names == CHURN_FEATURES
    shifted = make_churn(3000, seed=8, shifted=True, id_offset=10_000)
    assert Schema.infer(shifted, spec).feature_names == CHURN_FEATURES


def test_a_model_never_learns_an_undeclared_account_number(tmp_path: Path):
    """The issue's case: 100001.. in training, 200001.. in serving; the same customer gets one score."""
    folder = write_project(tmp_path / "p", rows=600, serving={"compile_trees": False})
    frame = make_churn(600, seed=3).drop(columns=["customer_id"])
    frame.insert(0, "account_no", np.arange(100001, 100601))
    frame.to_csv(folder / "data" / "customers.csv", index=False)
    raw = yaml.safe_load((folder / "everloop.yaml").read_text())
    raw["data"].pop("id")
    (folder / "everloop.yaml").write_text(yaml.safe_dump(raw))
    spec, store = load_spec(folder), Store.for_project(folder)
    data.ingest(store, spec, base=folder)
    version = train.train(store, spec).version
    registry.promote(store, spec, version)
    model = registry.load_model(store, version)
    assert "account_no" not in model.schema.feature_names
    assert "rising with the row order" in model.schema.ignored["account_no"]

    customers = make_churn(50, seed=11).drop(columns=["customer_id", "event_time", "churned"])
    old = model.predict(customers.assign(account_no=np.arange(100001, 100051))).proba[:, 1]
    new = model.predict(customers.assign(account_no=np.arange(200001, 200051))).proba[:, 1]
    np.testing.assert_array_equal(old, new)
    rows = customers.assign(account_no=np.arange(200001, 200051)).to_dict(orient="records")
    with TestClient(create_app(folder, watch=False)) as client:
        answer = client.post("/predict", json={"instances": rows}).json()
    served = [p["probabilities"]["1"] for p in answer["predictions"]]
    np.testing.assert_allclose(served, np.round(old, 6))
    _, report = model.conform(customers.assign(account_no=np.arange(200001, 200051)))
    assert [a for a in report.anomalies if a.kind == "unexpected_column"] == []  # known, ignored on purpose


# -- 3. excluded columns are not warned about; unknown ones give one line -----------------------------


def test_excluded_columns_are_known_and_never_warned_about(tmp_path: Path):
    folder = write_project(tmp_path / "p", rows=400, features={"exclude": ["paperless_billing"]})
    spec, store = load_spec(folder), Store.for_project(folder)
    first = data.ingest(store, spec, base=folder)
    assert first.warnings == []
    schema = data.current_schema(store)[1]
    assert schema.ignored == {"paperless_billing": "features.exclude in the project file"}
    later = make_churn(300, seed=9, id_offset=5000)
    later.to_csv(tmp_path / "later.csv", index=False)
    report = data.validate(store, spec, tmp_path / "later.csv")
    assert report.anomalies == []


def test_extra_columns_in_a_later_file_give_one_line_naming_them():
    frame = _issue_frame()
    schema = Schema.infer(frame, _spec())
    later = frame.assign(coupon=1, source="web")
    _, report = schema.conform(later)
    extra = [a for a in report.anomalies if a.kind == "unexpected_column"]
    assert [(a.column, a.message, a.values, a.count) for a in extra] == [
        ("coupon, source", "columns not in the schema; ignored", ["coupon", "source"], 200)]
    # a file read in batches: still one line, the rows counted, the names not repeated
    merged = ValidationReport(rows=0)
    for n, part in enumerate([later.iloc[:120], later.iloc[120:]]):
        merged.merge(schema.check(part.reset_index(drop=True), whole=False).report, 120 * n)
    extra = [a for a in merged.anomalies if a.kind == "unexpected_column"]
    assert [(a.describe(), a.values, a.count) for a in extra] == [
        ("column 'coupon, source': columns not in the schema; ignored", ["coupon", "source"], 200)]
    single = schema.conform(frame.assign(coupon=1))[1].anomalies
    assert [(a.column, a.message) for a in single] == [("coupon", "not in the schema; ignored")]


# -- the schema file and evolution keep the ignored columns -------------------------------------------


def test_ignored_columns_round_trip_and_evolve(tmp_path: Path):
    frame = _with(_issue_frame(), account_no=np.arange(100001, 100201),
                  email=[f"u{i}@x.io" for i in range(200)])
    spec = _spec({"exclude": ["email"]})
    schema = Schema.infer(frame, spec)
    assert list(schema.ignored) == ["account_no", "email"]
    assert Schema.from_dict(schema.to_dict()) == schema
    path = tmp_path / "schema.yaml"
    path.write_text(data.schema_yaml(schema))
    assert data.load_schema_file(path, spec) == schema
    assert Schema.from_dict({"format": 1, "columns": []}).ignored == {}  # schemas stored before: none
    assert "ignored" not in Schema.infer(_issue_frame(), spec).to_dict()

    newer = frame.assign(account_no=np.arange(300001, 300201))
    assert data.evolve(schema, Schema.infer(newer, spec)) == schema  # still an id: still ignored
    # named later in the project file: the schema says so until it is evolved with that file
    named = _spec({"numeric": ["account_no"], "exclude": ["email"]})
    assert schema.spec_conflicts(named) == [
        f"features.numeric names 'account_no', which the schema leaves out ({schema.ignored['account_no']})"]
    evolved = data.evolve(schema, Schema.infer(newer, named), named)
    assert evolved.column("account_no").kind == "numeric" and list(evolved.ignored) == ["email"]
    assert evolved.spec_conflicts(named) == []
    assert data.schema_changes(schema, evolved) == ["+ column 'account_no' (numeric, feature)",
                                                    "- ignored 'account_no'"]


def test_a_column_both_kept_and_ignored_in_the_file_is_refused(tmp_path: Path):
    spec = _spec()
    schema = Schema.infer(_issue_frame(), spec)
    body = yaml.safe_load(data.schema_yaml(schema))
    body["ignored"] = {"age": "not wanted"}
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(SpecError, match="ignored.age: the column is also under columns"):
        data.load_schema_file(path, spec)


# -- 4. the command line says how it read every column -------------------------------------------------


def test_cli_ingest_and_schema_show_name_every_column_role_kind_and_why(tmp_path: Path):
    from typer.testing import CliRunner

    from everloop.cli import app

    features = {"categorical": ["plan"], "exclude": ["region"]}
    folder = write_project(tmp_path / "p", rows=400, features=features)
    frame = make_churn(400, seed=3)
    frame.insert(1, "account_no", np.arange(100001, 100401))
    frame.to_csv(folder / "data" / "customers.csv", index=False)
    p = ["--project", str(folder)]
    runner = CliRunner()

    first = runner.invoke(app, ["ingest", *p])
    assert first.exit_code == 0, first.output
    text = " ".join(first.output.split())  # rich wraps long lines
    assert "schema v1 inferred from data/customers.csv, column by column:" in text
    for line in ["customer_id: id, categorical (string); data.id in the project file",
                 "event_time: timestamp, datetime (datetime); data.timestamp in the project file",
                 "plan: feature, categorical (string); features.categorical in the project file",
                 "monthly_charges: feature, numeric (float); inferred: numbers",
                 "churned: target, categorical",
                 "region: ignored; features.exclude in the project file",
                 "account_no: ignored; looks like an identifier: whole numbers, 400 different in 400 rows, "
                 "rising with the row order (100001 .. 100400); to use it as a feature, name it in the "
                 "project file: features.numeric: [account_no] (or features.categorical for codes)"]:
        assert line in text
    assert "not in the schema" not in text  # neither the excluded column nor the identifier is warned about

    later = make_churn(200, seed=4, id_offset=9000).assign(coupon=1, source="web")
    later.insert(1, "account_no", np.arange(200001, 200201))
    later.to_csv(tmp_path / "later.csv", index=False)
    second = runner.invoke(app, ["ingest", str(tmp_path / "later.csv"), *p])
    assert second.exit_code == 0, second.output
    lines = [line.strip() for line in second.output.splitlines()]
    assert "checked against schema v1: 14 features; ignored as the schema says: account_no, region (see " \
           "'everloop schema show')" in " ".join(second.output.split())
    assert [line for line in lines if "not in the schema" in line] == [
        "warning: column 'coupon, source': columns not in the schema; ignored"]

    shown = json.loads(runner.invoke(app, ["schema", "show", "--json", *p]).output)
    roles = {r["name"]: r for r in shown["column_roles"]}
    assert roles["account_no"]["role"] == "ignored" and roles["account_no"]["kind"] is None
    assert roles["plan"] == {"name": "plan", "role": "feature", "kind": "categorical", "dtype": "string",
                             "why": "features.categorical in the project file"}
    assert set(shown["ignored"]) == {"account_no", "region"} and shown["schema_conflicts"] == []
    table = runner.invoke(app, ["schema", "show", *p]).output
    assert "account_no" in table and "ignored" in table

    # the project file now names the id as a feature: said on every ingest until the schema takes it
    raw = yaml.safe_load((folder / "everloop.yaml").read_text())
    raw["features"]["numeric"] = ["account_no"]
    (folder / "everloop.yaml").write_text(yaml.safe_dump(raw))
    third = json.loads(runner.invoke(app, ["ingest", str(tmp_path / "later.csv"), "--json", *p]).output)
    assert third["schema_inferred"] is False and third["deduplicated"] is True
    assert third["schema_conflicts"] == [
        "features.numeric names 'account_no', which the schema leaves out ("
        + roles["account_no"]["why"] + ")"]
    source = str(folder / "data" / "customers.csv")
    accepted = runner.invoke(app, ["schema", "accept", "--from-data", source, "--json", *p])
    assert json.loads(accepted.output)["changes"] == ["+ column 'account_no' (numeric, feature)",
                                                       "- ignored 'account_no'"]
    assert json.loads(runner.invoke(app, ["schema", "show", "--json", *p]).output)["schema_conflicts"] == []
