import json

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from everloop import registry
from everloop.batch import score_file
from everloop.errors import DataError
from everloop.serve import create_app


def test_batch_matches_python_api_and_service(trained, tmp_path):
    folder, spec, store = trained
    source = folder / "data" / "customers.csv"
    out = tmp_path / "scored.parquet"
    result = score_file(store, source, out, chunk_rows=333)
    scored = pd.read_parquet(out)
    frame = pd.read_csv(source)
    assert result.rows == len(frame) == len(scored)
    assert list(scored["customer_id"]) == list(frame["customer_id"])
    api = registry.load_model(store, "production").predict(frame)
    np.testing.assert_array_equal(scored["proba_1"].to_numpy(), api.proba[:, 1])
    rows = json.loads(frame.head(50).drop(columns=["customer_id", "event_time", "churned"]).to_json(orient="records"))
    with TestClient(create_app(folder, watch=False)) as client:
        served = client.post("/predict", json={"instances": rows}).json()["predictions"]
    np.testing.assert_allclose([p["probabilities"]["1"] for p in served], scored["proba_1"].head(50), atol=1e-6)
    assert [p["prediction"] for p in served] == scored["prediction"].head(50).tolist()


def test_bad_rows_with_strict_fail_the_whole_batch_and_write_nothing(trained, tmp_path):
    folder, spec, store = trained
    frame = pd.read_csv(folder / "data" / "customers.csv").head(500)
    frame["age"] = frame["age"].astype(object)
    frame.loc[420, "age"] = "forty"
    source = tmp_path / "bad.csv"
    frame.to_csv(source, index=False)
    out = tmp_path / "scored.parquet"
    with pytest.raises(DataError, match=r"'age': 1 values are not numbers \(e.g. rows 421\)"):
        score_file(store, source, out, chunk_rows=100, strict=True)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_parquet_input_and_missing_file(trained, tmp_path):
    folder, spec, store = trained
    source = tmp_path / "in.parquet"
    pd.read_csv(folder / "data" / "customers.csv").head(100).to_parquet(source)
    assert score_file(store, source, tmp_path / "o.parquet", chunk_rows=30).rows == 100
    with pytest.raises(DataError, match="no such file"):
        score_file(store, tmp_path / "absent.csv", tmp_path / "o2.parquet")
