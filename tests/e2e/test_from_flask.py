"""Issue 12, bullet 5 and docs/from-flask.md: the page's five commands, run as written, take a pipeline
served by the usual Flask script into everloop, and the Flask script's client keeps working: the same
URL path and body, and the answer's `prediction` is what the Flask script answered.

The test plays the notebook: a scikit-learn pipeline (ColumnTransformer + HistGradientBoosting) fitted
on a generated churn table given as lists of values, as the Flask script's `model.predict([features])`
gives it, and saved with joblib; the table is `train.csv`, its feature columns in training order and
the label last. It then runs the page's ```bash block line by line in one shell in that folder (with
.venv/bin on PATH), merges the page's ```yaml block into everloop.yaml right after `init` (the page
says: before `serve`), runs `serve` in the background on a free port instead of 5000, posts the client's
`{"features": [...]}` bodies, and stops the server. Skipped until `everloop models import` exists.
A fast test checks `serving.flask_compatible` in process: the fields with it, the answer as before without.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import joblib
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OrdinalEncoder

from everloop.demo import make_churn
from everloop.serve import create_app
from tests.conftest import feature_rows, served_project
from tests.e2e.test_readme import Shell, command_of

PAGE = Path(__file__).parents[2] / "docs" / "from-flask.md"
BIN = Path(sys.executable).parent  # .venv/bin
CATEGORICAL = ["contract", "plan", "region", "payment_method"]


def models_import_exists() -> bool:
    done = subprocess.run([str(BIN / "everloop"), "models", "import", "--help"], capture_output=True,
                          timeout=120)
    return done.returncode == 0




def page_block(language: str) -> list[str]:
    """The lines of the page's first ```{language} block."""
    found = re.search(rf"```{language}\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S)
    assert found, f"{PAGE}: no ```{language} block"
    return [line for line in found.group(1).splitlines() if line.strip()]


def notebook(folder: Path) -> tuple[Pipeline, pd.DataFrame]:
    """What the user brings: model.joblib and train.csv in `folder`; returns the pipeline and the rows
    their clients send (features only, not in train.csv)."""
    table = make_churn(1400, seed=31).drop(columns=["customer_id", "event_time", "paperless_billing",
                                                     "has_streaming"])
    features = [c for c in table.columns if c != "churned"]
    positions = [features.index(c) for c in CATEGORICAL]  # the Flask script's model sees lists: no names
    pipeline = Pipeline([
        ("prepare", ColumnTransformer([("categories", OrdinalEncoder(handle_unknown="use_encoded_value",
                                                                     unknown_value=-1), positions)],
                                      remainder="passthrough")),
        ("model", HistGradientBoostingClassifier(max_iter=40, random_state=0)),
    ])
    train, clients = table.iloc[:1200], table.iloc[1200:]
    pipeline.fit(train[features].astype(object).to_numpy().tolist(), train["churned"])
    joblib.dump(pipeline, folder / "model.joblib")
    train.to_csv(folder / "train.csv", index=False)
    return pipeline, clients[features]


@pytest.mark.e2e
@pytest.mark.skipif(not models_import_exists(), reason="`everloop models import` does not exist yet")
def test_the_five_commands_take_a_flask_model_into_everloop_with_its_clients_unchanged(tmp_path: Path) -> None:
    lines = page_block("bash")
    commands = [command_of(line).split()[:2] for line in lines]
    assert commands == [["everloop", "init"], ["everloop", "ingest"], ["everloop", "models"],
                        ["everloop", "promote"], ["everloop", "serve"]], "the page's five commands changed"
    assert "everloop models import model.joblib --dataset 1" in lines[2]
    setting = yaml.safe_load("\n".join(page_block("yaml")))
    assert setting == {"serving": {"flask_compatible": True}}

    folder = tmp_path / "churn-model"
    folder.mkdir()
    pipeline, rows = notebook(folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVERLOOP_", "PROMETHEUS_"))}
    env |= {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    shell = Shell(folder, env, tmp_path / "logs")
    server_pid: int | None = None
    try:
        for line in lines:
            command = command_of(line)
            if command.startswith("everloop serve "):
                server, server_pid, port = shell.serve(command, 5000, folder / "server.pid")
                continue
            ran = shell.run(line)
            assert ran.code == 0, f"{line!r} exited {ran.code}:\n{ran.out}\n{ran.err}"
            if command.startswith("everloop init "):
                spec_file = folder / "everloop.yaml"
                spec = yaml.safe_load(spec_file.read_text())
                assert spec["name"] == "churn-model"
                assert spec["data"] == {"source": "train.csv", "target": "churned"}
                spec_file.write_text(yaml.safe_dump(spec | setting, sort_keys=False))
            if command.startswith("everloop models import "):
                assert "model v1 imported from model.joblib" in ran.out, ran.out
        assert server_pid is not None
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url)

        # the Flask script's client, unchanged: one row per request, values in training order
        bodies = [{"features": values} for values in json.loads(rows.to_json(orient="values"))]
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/model").json()["features"] == list(rows.columns)
            answers = [client.post("/predict", json=body) for body in bodies[:40]]
        for body, answer in zip(bodies, answers):
            assert answer.status_code == 200, answer.text
            got = answer.json()
            flask = {"prediction": pipeline.predict([body["features"]]).tolist()}  # what app.py answered
            assert got["status"] == "ok" and got["prediction"] == flask["prediction"]
            assert list(got)[:2] == ["status", "prediction"] and got["model_version"] == 1
            proba = pipeline.predict_proba([body["features"]])[0]
            served = got["predictions"][0]["probabilities"]
            np.testing.assert_allclose([served["0"], served["1"]], proba, atol=1e-6)
        assert {a.json()["prediction"][0] for a in answers} == {0, 1}  # both classes seen: a real check

        shell.stop(server_pid, server)
        server_pid = None
    finally:
        if server_pid is not None:
            try:
                os.kill(server_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        shell.close()


def _wait_ready(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=2).json().get("model_version") == 1:
                return
        except (httpx.HTTPError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server at {url} was not ready with model v1 within {timeout:g}s")


def test_the_flag_adds_the_flask_fields_and_without_it_the_answer_is_unchanged(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    folder, spec, store = served_project(tmp_path / "p", rows=600)
    rows = make_churn(3, seed=8)
    bodies = [{"features": feature_rows(rows)[0]}, {"instances": feature_rows(rows)}]
    flagged = spec.model_copy(update={"serving": spec.serving.model_copy(update={"flask_compatible": True})})
    answers: dict[bool, list[dict]] = {}
    for flag, used in ((False, spec), (True, flagged)):
        with TestClient(create_app(folder, spec=used, store=store, watch=False)) as client:
            answers[flag] = [client.post("/predict", json=body).json() for body in bodies]
            refused = client.post("/predict", json={"features": [1, 2]})
            assert refused.status_code == 422 and list(refused.json()) == ["detail"]  # refusals as before
            warned = client.post("/predict", json={"features": feature_rows(rows)[0] | {"plan": "gold"}}).json()
            assert "warnings" in warned and ("status" in warned) is flag
    for plain in answers[False]:
        assert list(plain) == ["model_version", "predictions"]
    for plain, flask in zip(answers[False], answers[True]):
        labels = [p["prediction"] for p in plain["predictions"]]
        assert flask["status"] == "ok" and flask["prediction"] == labels  # a list, in row order
        assert list(flask) == ["status", "prediction", "model_version", "predictions"]
        assert flask["predictions"][0]["probabilities"] == plain["predictions"][0]["probabilities"]
    assert len(answers[True][0]["prediction"]) == 1 and len(answers[True][1]["prediction"]) == 3
    store.close()
