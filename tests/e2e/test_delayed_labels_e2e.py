"""A real server, labels arriving in three late installments, `everloop monitor --json` after each."""

import json

import httpx
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from everloop.cli import app
from everloop.demo import make_churn
from everloop.serve import ServerProcess
from tests.conftest import feature_rows, served_project

pytestmark = pytest.mark.e2e


def _monitor(folder) -> tuple[int, dict]:
    out = CliRunner().invoke(app, ["monitor", "--json", "--project", str(folder)])
    return out.exit_code, json.loads(out.output)


def test_three_late_installments_of_labels(tmp_path):
    folder, spec, store = served_project(tmp_path / "p")
    frame = make_churn(300, seed=51)
    y = frame["churned"].to_numpy()
    with ServerProcess(folder) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        body = client.post("/predict", json={"instances": feature_rows(frame)}).json()
        ids = [p["id"] for p in body["predictions"]]
        p = np.array([r["probabilities"]["1"] for r in body["predictions"]])
        order = np.r_[np.flatnonzero(y == 1)[:10], np.flatnonzero(y == 0)[:20]]
        rest = np.setdiff1d(np.arange(300), order)
        seen = np.array([], dtype=int)
        expected = []
        for part in (order, rest[:100], rest[100:]):
            answer = client.post("/feedback", json={"labels": [{"id": ids[i], "label": int(y[i])} for i in part]})
            assert answer.status_code == 200 and answer.json()["accepted"] == len(part)
            seen = np.r_[seen, part]
            code, result = _monitor(folder)
            perf = result["performance"]
            assert perf["labelled_rows"] == len(seen)
            assert result["window"]["rows"] == 300
            if len(seen) < 50:
                assert perf["value"] is None and result["status"] == "not judged"
                assert result["not_judged"]["performance"].startswith("fewer than 50 labelled rows (30)")
                assert code == 0
            else:
                assert perf["value"] == pytest.approx(roc_auc_score(y[seen], p[seen]), abs=1e-6)
                assert perf["decayed"] == (perf["loss_low"] > perf["allowed_drop"])
                assert code == (1 if result["alerts"] else 0)
            expected.append(perf["labelled_rows"])
    assert expected == [30, 130, 300]
    # one window, judged three times: one stored result, the latest
    runs = store.engine.connect().execute(store.tables.monitor_runs.select()).all()
    assert len(runs) == 1 and runs[0].result["performance"]["labelled_rows"] == 300
    store.close()
