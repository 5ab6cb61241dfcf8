from pathlib import Path

import pandas as pd
import pytest
import yaml

from everloop import data
from everloop.errors import SpecError
from everloop.spec import load_spec
from everloop.store import Store


@pytest.fixture
def ingested(project: Path):
    spec, store = load_spec(project), Store.for_project(project)
    data.ingest(store, spec, base=project)
    path = data.write_schema_file(store, project)
    return project, spec, store, path


def test_schema_file_round_trips(ingested):
    project, spec, store, path = ingested
    assert path == project / "schema.yaml"
    assert data.load_schema_file(path, spec) == data.current_schema(store)[1]
    assert data.write_schema_file(store, project) is None, "an existing file is not overwritten"


def test_accepting_an_edited_file_changes_what_is_flagged(ingested, tmp_path):
    project, spec, store, path = ingested
    body = yaml.safe_load(path.read_text())
    body["columns"]["plan"]["categories"].append("platinum")
    old_max = body["columns"]["age"]["max"]
    body["columns"]["age"]["max"] = 120
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    schema = data.load_schema_file(path, spec)
    changes = data.schema_changes(data.current_schema(store)[1], schema)
    assert changes == [f"~ age.max: {old_max} -> 120.0", "~ plan.categories: +['platinum'] -[]"]
    assert data.accept_schema(store, schema, "new plan launched") == (2, True)
    assert data.accept_schema(store, schema, "again") == (2, False)
    frame = pd.read_csv(project / "data" / "customers.csv").head(50)
    frame.loc[0, "plan"] = "platinum"
    later = tmp_path / "later.csv"
    frame.to_csv(later, index=False)
    version = data.ingest(store, spec, later, base=project)
    assert version.schema_version == 2 and not version.warnings


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda b: b["columns"]["age"].update(min="low"), "columns.age.min: Input should be a valid number"),
    (lambda b: b["columns"]["age"].update(kind="number"), "columns.age.kind: Input should be"),
    (lambda b: b["columns"]["age"].update(colour="red"), "columns.age.colour: unknown field 'colour'; expected one of:"),
    (lambda b: b["columns"]["age"].update(min=200, max=100), "columns.age: min 200.0 is above max 100.0"),
    (lambda b: b["columns"]["churned"].update(role="feature"), "role 'target': the project file names 'churned'"),
    (lambda b: b["columns"]["plan"].update(categories=["a", "a"]), "columns.plan: categories are listed more than once"),
])
def test_a_bad_schema_file_names_the_field(ingested, edit, expected):
    project, spec, store, path = ingested
    body = yaml.safe_load(path.read_text())
    edit(body)
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(SpecError) as info:
        data.load_schema_file(path, spec)
    assert expected in str(info.value)


def test_evolve_from_new_data(ingested):
    project, spec, store, path = ingested
    current = data.current_schema(store)[1]
    frame = pd.read_csv(project / "data" / "customers.csv").head(200)
    frame.loc[0, "region"] = "antarctica"
    frame.loc[1, "age"] = 150
    evolved = data.evolve(current, data.Schema.infer(frame, spec))
    assert "antarctica" in evolved.column("region").categories
    assert evolved.column("age").max >= 150 and evolved.column("age").min <= current.column("age").min


def test_diff_of_two_versions(ingested, tmp_path):
    from everloop.demo import make_churn

    project, spec, store, path = ingested
    shifted = tmp_path / "shifted.csv"
    make_churn(2000, shifted=True, seed=4).to_csv(shifted, index=False)
    b = data.ingest(store, spec, shifted, base=project)
    rows = {r["column"]: r for r in data.diff_datasets(data.get_dataset(store, 1), b)}
    assert rows["support_calls"]["mean_shift_sd"] > 0.5  # support calls went up
    assert rows["age"]["mean_shift_sd"] == pytest.approx(0, abs=0.15)
    assert rows["region"]["tvd"] > 0.1 and rows["contract"]["tvd"] < 0.05
