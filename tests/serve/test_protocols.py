"""MLflow's /invocations and the Open Inference Protocol answer what /predict answers."""

import json

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from everloop.serve import create_app

DROP = ["customer_id", "event_time", "churned"]


@pytest.fixture
def served(trained):
    folder, spec, store = trained
    frame = pd.read_csv(folder / "data" / "customers.csv").head(5).drop(columns=DROP)
    with TestClient(create_app(folder, watch=False)) as client:
        expected = client.post("/predict", json={"instances": json.loads(frame.to_json(orient="records"))}).json()
        yield client, frame, [p["prediction"] for p in expected["predictions"]], expected


def test_mlflow_formats(served):
    client, frame, labels, _ = served
    records = json.loads(frame.to_json(orient="records"))
    split = json.loads(frame.to_json(orient="split", index=False))
    bodies = [{"dataframe_split": split}, {"dataframe_records": records}, {"instances": records},
              {"inputs": {c: [r[c] for r in records] for c in frame.columns}}, records,
              {"dataframe_split": split, "params": {"anything": 1}}]
    for body in bodies:
        answer = client.post("/invocations", json=body)
        assert answer.status_code == 200, (body, answer.text)
        assert answer.json() == {"predictions": labels}
    csv = client.post("/invocations", content=frame.to_csv(index=False), headers={"content-type": "text/csv"})
    assert csv.status_code == 200 and csv.json() == {"predictions": labels}
    assert client.get("/ping").status_code == 200 and client.get("/version").text


def test_mlflow_errors_name_the_field(served):
    client, frame, _, _ = served
    records = json.loads(frame.to_json(orient="records"))
    records[2]["age"] = "old"
    answer = client.post("/invocations", json={"dataframe_records": records})
    assert answer.status_code == 422
    assert answer.json()["detail"] == [{"loc": ["dataframe_records", 2, "age"], "msg": "values are not numbers",
                                        "input": "old"}]
    both = client.post("/invocations", json={"instances": records, "inputs": records})
    assert both.status_code == 422 and "exactly one of" in both.json()["detail"][0]["msg"]
    short = client.post("/invocations", content="age,plan\n1\n", headers={"content-type": "text/csv"})
    assert short.status_code == 422


def test_open_inference_protocol(served):
    client, frame, labels, expected = served
    columnar = {"id": "req-1", "parameters": {"content_type": "pd"}, "inputs": [
        {"name": c, "shape": [len(frame)], "datatype": "FP64" if frame[c].dtype.kind == "f" else
         ("INT64" if frame[c].dtype.kind == "i" else "BYTES"), "data": frame[c].tolist()} for c in frame.columns]}
    answer = client.post("/v2/models/churn/infer", json=columnar)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["id"] == "req-1" and body["model_name"] == "churn" and body["model_version"] == "1"
    predict = next(o for o in body["outputs"] if o["name"] == "predict")
    assert predict["data"] == labels and predict["datatype"] == "INT64"
    proba = next(o for o in body["outputs"] if o["name"] == "predict_proba")
    expected_proba = [p["probabilities"]["1"] for p in expected["predictions"]]
    assert np.allclose(np.array(proba["data"]).reshape(proba["shape"])[:, 1], expected_proba, atol=1e-6)
    tensor = {"inputs": [{"name": "input-0", "shape": list(frame.shape), "datatype": "BYTES",
                          "data": [v for row in frame.itertuples(index=False) for v in row]}]}
    assert client.post("/v2/models/churn/infer", json=tensor).json()["outputs"][0]["data"] == labels
    meta = client.get("/v2/models/churn").json()
    assert meta["name"] == "churn" and [i["name"] for i in meta["inputs"]] == list(frame.columns)
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/models/churn/ready").status_code == 200
    assert client.post("/v2/models/other/infer", json=columnar).status_code == 404
    bad = client.post("/v2/models/churn/infer", json={"inputs": [{"name": "age", "shape": [3], "data": [1]}]})
    assert bad.status_code == 422


def test_openapi_shows_the_real_features(served):
    client, frame, _, _ = served
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    row = body["oneOf"][0]["properties"]["features"]["oneOf"][0]
    assert list(row["properties"]) == list(frame.columns)
    assert row["properties"]["age"]["type"] == "number" and row["properties"]["plan"]["type"] == "string"
    assert "/v2/models/{name}/infer" in spec["paths"] and "/invocations" in spec["paths"]
