import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from everloop.cli import app
from tests.conftest import write_project


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The real `everloop` entry point in a subprocess: exit codes and stderr as a user sees them."""
    code = "from everloop.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd)


def test_the_cli_drives_ingest_train_promote_predict(tmp_path):
    folder = write_project(tmp_path / "p")
    p = ["--project", str(folder)]
    runner = CliRunner()
    ingest = runner.invoke(app, ["ingest", *p, "--json"])
    assert ingest.exit_code == 0, ingest.output
    assert json.loads(ingest.output)["version"] == 1
    datasets = json.loads(runner.invoke(app, ["datasets", *p, "--json"]).output)
    assert [d["rows"] for d in datasets] == [2000]
    trained = json.loads(runner.invoke(app, ["train", *p, "--json"]).output)
    assert trained["version"] == 1 and trained["lift"] > 0
    assert runner.invoke(app, ["promote", "1", *p]).exit_code == 0
    models = json.loads(runner.invoke(app, ["models", *p, "--json"]).output)
    assert models[0]["aliases"] == ["production"]
    out = tmp_path / "scored.parquet"
    scored = runner.invoke(app, ["predict", str(folder / "data" / "customers.csv"), str(out), *p, "--json"])
    assert scored.exit_code == 0 and json.loads(scored.output)["rows"] == 2000
    monitor = runner.invoke(app, ["monitor", *p, "--json"])  # predict logged its rows (serving.log_predictions)
    judged = json.loads(monitor.output)
    assert monitor.exit_code == 0 and judged["window"]["rows"] == 1000 and judged["alerts"] == [], judged
    assert judged["status"] == "not judged" and "labelled" in json.dumps(judged["not_judged"])  # the training rows: no drift
    loop = runner.invoke(app, ["loop", "--once", *p, "--json"])
    assert loop.exit_code == 0 and json.loads(loop.output)["action"] == "idle"


def test_bad_project_file_exits_2_naming_the_field(tmp_path):
    folder = write_project(tmp_path / "p")
    (folder / "everloop.yaml").write_text("name: x\ndata: {source: a.csv, target: y}\nmodel: {seed: soon}\n")
    result = run("models", "--project", str(folder))
    assert result.returncode == 2
    assert "model.seed: Input should be a valid integer" in result.stderr and "(got 'soon')" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_ingest_file_exits_2_and_gate_refusal_exits_1(tmp_path):
    folder = write_project(tmp_path / "p")
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\x00\xff\xfe binary")
    result = run("ingest", str(bad), "--project", str(folder))
    assert result.returncode == 2 and "not UTF-8" in result.stderr and "Traceback" not in result.stderr
    assert run("ingest", "--project", str(folder)).returncode == 0
    (folder / "everloop.yaml").write_text((folder / "everloop.yaml").read_text().replace(
        "min_metric: 0.7", "min_metric: 0.999"))
    assert run("train", "--project", str(folder)).returncode == 0
    refused = run("promote", "1", "--project", str(folder))
    assert refused.returncode == 1 and "below promotion.min_metric 0.999" in refused.stderr


@pytest.mark.parametrize("args", [["promote", "abc"], ["predict"], ["nonsense"], ["serve", "--port", "x"]])
def test_bad_arguments_exit_2(tmp_path, args):
    result = run(*args, "--project", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
