"""Issue 11, faults 1 and 2 end to end: the command line ingests, trains, promotes and batch-scores a table
of every kind (a bool, a spelled bool, codes with leading zeros, numbers with separators, date/times with
offsets, ints with gaps), a real server serves it, and every path gives the same predictions: `everloop
predict` on CSV and on Parquet, /predict, /invocations (MLflow's split format and CSV) and /v2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from everloop.serve import ServerProcess

pytestmark = pytest.mark.e2e
EVERLOOP = [str(Path(sys.executable).with_name("everloop"))]  # the installed command, as a user runs it
INSTANT = ["2026-03-01T08:15:00+02:00", "2026-03-01T01:15:00-05:00", "2026-03-01T06:15:00Z",
           "2026-03-01T06:15:00"]


def table(rows: int = 240, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    member = rng.random(rows) < 0.5
    minutes = rng.integers(0, 90 * 24 * 60, rows)
    seen = pd.Timestamp("2026-03-01T06:15:00Z") + pd.to_timedelta(minutes, unit="min")
    return pd.DataFrame({
        "amount": [f"{v:,.2f}" for v in rng.uniform(10, 5e5, rows)],  # 1,234.56: numbers with separators
        "visits": pd.array([None if n % 7 == 0 else int(v) for n, v in enumerate(rng.integers(0, 30, rows))],
                           dtype="Int64"),
        "member": member,
        "paperless": rng.choice(["Yes", "No"], rows),
        "zip": rng.choice(["01234", "00501", "12345"], rows),
        "seen_at": [t.tz_convert("Europe/Paris").isoformat() if n % 3 == 0 else t.strftime("%Y-%m-%dT%H:%M:%SZ")
                    if n % 3 == 1 else t.strftime("%Y-%m-%d %H:%M:%S") for n, t in enumerate(seen)],
        "churned": np.where(member, rng.random(rows) < 0.15, rng.random(rows) < 0.85).astype(int),
    })


def everloop(*args: str) -> dict[str, Any]:
    done = subprocess.run(EVERLOOP + list(args) + ["--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("same") / "p"
    folder.mkdir()
    frame = table()
    frame.to_csv(folder / "train.csv", index=False, sep=";")  # a semicolon file: sniffed
    frame.to_parquet(folder / "train.parquet", index=False)
    spec = {"name": "same", "data": {"source": "train.csv", "target": "churned"},
            "model": {"estimator": "sklearn.ensemble.HistGradientBoostingClassifier",
                      "params": {"max_iter": 40}, "seed": 1},
            "evaluation": {"split": {"holdout": 0.2}, "metric": "roc_auc"}, "serving": {"compile_trees": False}}
    (folder / "everloop.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    ingested = everloop("ingest", "-p", str(folder))
    assert ingested["notes"] == ["train.csv: fields separated by semicolons (sniffed from its first lines)"]
    trained = everloop("train", "-p", str(folder))
    everloop("promote", str(trained["version"]), "--force", "-p", str(folder))
    return folder, frame


def test_the_schema_read_every_kind(project):
    folder, _ = project
    schema = yaml.safe_load((folder / "schema.yaml").read_text())["columns"]
    assert {name: (c["kind"], c["dtype"]) for name, c in schema.items()} == {
        "amount": ("numeric", "float"), "visits": ("numeric", "int"), "member": ("categorical", "bool"),
        "paperless": ("categorical", "bool"), "zip": ("categorical", "string"),
        "seen_at": ("datetime", "datetime"), "churned": ("categorical", "string")}
    assert schema["amount"]["number_format"] == "1,234.5"
    assert (schema["member"]["true_values"], schema["paperless"]["false_values"]) == (["True"], ["No"])
    assert schema["zip"]["categories"] == ["00501", "01234", "12345"]


def _rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    features = frame.drop(columns=["churned"]).astype(object)
    def plain(v: Any) -> Any:
        return None if v is None or v is pd.NA else v.item() if hasattr(v, "item") else v

    return [{k: plain(v) for k, v in row.items()} for row in features.to_dict("records")]


def test_every_path_gives_the_same_predictions(project, tmp_path):
    folder, frame = project
    scores = {}
    for name in ("train.csv", "train.parquet"):
        everloop("predict", str(folder / name), str(tmp_path / f"{name}.parquet"), "-p", str(folder))
        scores[name] = pd.read_parquet(tmp_path / f"{name}.parquet")["proba_1"].to_numpy()
    rows = _rows(frame)
    columns = list(rows[0])
    with ServerProcess(folder) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/ready").json()["ready"] is True
        answer = http.post("/predict", json={"instances": rows}).json()
        scores["predict"] = np.array([p["probabilities"]["1"] for p in answer["predictions"]])
        split_body = {"columns": columns, "data": [[r[c] for c in columns] for r in rows]}
        split = http.post("/invocations", json={"dataframe_split": split_body})
        csv_body = frame.drop(columns=["churned"]).to_csv(index=False).encode()
        as_csv = http.post("/invocations", content=csv_body, headers={"content-type": "text/csv"})
        inputs = [{"name": c, "shape": [len(rows), 1], "datatype": "BOOL" if c == "member" else "BYTES",
                   "data": [r[c] for r in rows]} for c in columns]
        v2 = http.post("/v2/models/same/infer", json={"inputs": inputs}).json()
        scores["v2"] = np.array(next(o for o in v2["outputs"] if o["name"] == "predict_proba")["data"][1::2])
        labels = [p["prediction"] for p in answer["predictions"]]
        assert split.json()["predictions"] == labels == as_csv.json()["predictions"]
        # one instant, four ways; a bool spelled as the data never did is refused by every protocol
        base = rows[0]
        four = http.post("/predict", json={"instances": [base | {"seen_at": t} for t in INSTANT]}).json()
        assert len({p["probabilities"]["1"] for p in four["predictions"]}) == 1
        for body, path in (({"features": base | {"member": 0}}, "/predict"),
                           ({"dataframe_records": [base | {"member": "no"}]}, "/invocations")):
            refused = http.post(path, json=body)
            assert refused.status_code == 422, refused.text
            assert refused.json()["detail"][0]["loc"][-1] == "member", refused.text
    for path, got in scores.items():
        assert got == pytest.approx(scores["train.csv"], abs=1e-6), path
    members = frame["member"].to_numpy()
    assert scores["train.csv"][members].mean() < 0.35 < 0.65 < scores["train.csv"][~members].mean()
