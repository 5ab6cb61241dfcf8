"""Clients nobody here wrote, against a real server: MLflow's scoring client on /invocations and
tritonclient on the Open Inference Protocol, answered with the same predictions as /predict."""

import json

import httpx
import numpy as np
import pandas as pd
import pytest

from everloop.serve import ServerProcess
from tests.conftest import served_project

pytestmark = pytest.mark.e2e
DROP = ["customer_id", "event_time", "churned"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder, spec, store = served_project(tmp_path_factory.mktemp("clients") / "p", rows=1000)
    frame = pd.read_csv(folder / "data" / "customers.csv").head(8).drop(columns=DROP)
    with ServerProcess(folder) as running:
        expected = httpx.post(running.url + "/predict",
                              json={"instances": json.loads(frame.to_json(orient="records"))}).json()
        yield running, frame, expected


def test_mlflow_scoring_client(server):
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    running, frame, expected = server
    client = ScoringServerClient("127.0.0.1", running.port)
    client.wait_server_ready(timeout=10)
    response = client.invoke(frame)
    assert list(response.get_predictions(predictions_format="ndarray")) == \
        [p["prediction"] for p in expected["predictions"]]


def test_tritonclient_http(server):
    import tritonclient.http as triton

    running, frame, expected = server
    client = triton.InferenceServerClient(url=f"127.0.0.1:{running.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("churn")
    metadata = client.get_model_metadata("churn")
    assert [i["name"] for i in metadata["inputs"]] == list(frame.columns)
    inputs = []
    for name in frame.columns:
        column = frame[[name]].to_numpy()
        if frame[name].dtype.kind in "if":
            tensor = triton.InferInput(name, list(column.shape), "FP64")
            tensor.set_data_from_numpy(column.astype(np.float64), binary_data=False)
        else:
            tensor = triton.InferInput(name, list(column.shape), "BYTES")
            tensor.set_data_from_numpy(column.astype(np.object_), binary_data=False)
        inputs.append(tensor)
    outputs = [triton.InferRequestedOutput("predict", binary_data=False),
               triton.InferRequestedOutput("predict_proba", binary_data=False)]
    result = client.infer("churn", inputs, outputs=outputs)
    assert result.as_numpy("predict").ravel().tolist() == [p["prediction"] for p in expected["predictions"]]
    proba = result.as_numpy("predict_proba")[:, 1]
    assert np.allclose(proba, [p["probabilities"]["1"] for p in expected["predictions"]], atol=1e-6)
