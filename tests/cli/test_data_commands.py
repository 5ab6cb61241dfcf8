import json

import pandas as pd
import yaml
from typer.testing import CliRunner

from everloop.cli import app
from tests.conftest import write_project


def test_ingest_modes_schema_and_datasets_commands(tmp_path):
    folder = write_project(tmp_path / "p")
    p = ["--project", str(folder)]
    runner = CliRunner()
    first = runner.invoke(app, ["ingest", *p])
    assert first.exit_code == 0 and "schema inferred and written to" in first.output
    assert (folder / "schema.yaml").exists()
    frame = pd.read_csv(folder / "data" / "customers.csv").head(100)
    frame["age"] = frame["age"].astype(object)
    frame.loc[7, "age"] = "seven"
    dirty = tmp_path / "dirty.csv"
    frame.to_csv(dirty, index=False)
    refused = runner.invoke(app, ["ingest", str(dirty), *p])
    assert refused.exit_code != 0
    kept = json.loads(runner.invoke(app, ["ingest", str(dirty), "--mode", "quarantine", "--json", *p]).output)
    assert (kept["rows"], kept["quarantined"]) == (99, 1)
    shown = json.loads(runner.invoke(app, ["datasets", "show", str(kept["version"]), "--json", *p]).output)
    assert shown["quarantine_sample"][0]["_everloop_reason"] == "age: values are not numbers"
    diff = json.loads(runner.invoke(app, ["datasets", "diff", "1", str(kept["version"]), "--json", *p]).output)
    assert {r["column"] for r in diff} >= {"age", "plan"}
    listed = json.loads(runner.invoke(app, ["datasets", "--json", *p]).output)
    assert [d["version"] for d in listed] == [1, 2]

    body = yaml.safe_load((folder / "schema.yaml").read_text())
    body["columns"]["plan"]["categories"].append("platinum")
    (folder / "schema.yaml").write_text(yaml.safe_dump(body))
    accepted = json.loads(runner.invoke(app, ["schema", "accept", "--reason", "new plan", "--json", *p]).output)
    assert accepted["version"] == 2 and accepted["changed"]
    shown = json.loads(runner.invoke(app, ["schema", "show", "--json", *p]).output)
    plan = next(c for c in shown["columns"] if c["name"] == "plan")
    assert shown["version"] == 2 and "platinum" in plan["categories"]
    body["columns"]["age"]["min"] = "young"
    (folder / "schema.yaml").write_text(yaml.safe_dump(body))
    bad = runner.invoke(app, ["schema", "accept", *p])
    assert bad.exit_code != 0
