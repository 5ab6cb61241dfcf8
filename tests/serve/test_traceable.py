"""Issue 11, faults 4 (HTTP) and 5: every protocol answers with prediction ids that /feedback takes labels
for, /predict says which row has an unusual value (strict: refuses it), and a body that gives a column
twice is refused instead of read as one of its values."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from everloop import monitor
from everloop.data import ColumnSchema, Schema
from everloop.serve import create_app
from everloop.serve._batcher import MISSING, STRICT, MicroBatcher, RowWarnings
from everloop.serve._protocols import ClientError, Rows, ids_headers, load_body
from everloop.store import prediction_log
from tests.conftest import feature_rows, served_project

DROP = ["customer_id", "event_time", "churned"]


@pytest.fixture(scope="module")
def shared_project(tmp_path_factory):
    """A project with a model in production, shared by the tests of this module that keep no labels."""
    folder, spec, store = served_project(tmp_path_factory.mktemp("traceable") / "p")
    yield folder, spec, store
    store.close()


def client_of(project) -> TestClient:
    folder, spec, store = project
    client = TestClient(create_app(folder, spec=spec, store=store, watch=False))
    client.spec, client.store = spec, store
    return client


@pytest.fixture(scope="module")
def served(shared_project):
    """(client, the project's table): a service of the module's project."""
    with client_of(shared_project) as client:
        yield client, pd.read_csv(shared_project[0] / "data" / "customers.csv")


def v2_body(frame: pd.DataFrame, **extra) -> dict:
    """One input per feature, as MLServer's PandasCodec sends a DataFrame."""
    features = frame.drop(columns=DROP)
    return {"inputs": [{"name": c, "shape": [len(features)], "datatype": "BYTES" if features[c].dtype == object
                        or str(features[c].dtype) == "str" else "FP64", "data": features[c].tolist()}
                       for c in features.columns], **extra}


def header_ids(response) -> list[str]:
    """The ids of an /invocations answer: its header lines, which HTTP clients join with ', '."""
    return [i.strip() for i in response.headers["x-everloop-prediction-ids"].split(",")]


# -- prediction ids on every protocol ---------------------------------------------------------------


def test_every_protocol_answers_ids_that_take_labels(trained):
    with client_of(trained) as client:
        check_ids_take_labels(client, pd.read_csv(trained[0] / "data" / "customers.csv"))


def check_ids_take_labels(client: TestClient, table: pd.DataFrame) -> None:
    rows = table.head(12)
    predict = client.post("/predict", json={"instances": feature_rows(rows.iloc[0:3])}).json()
    answers = [(p["id"], p["prediction"]) for p in predict["predictions"]]

    split = json.loads(rows.iloc[3:6].drop(columns=DROP).to_json(orient="split", index=False))
    mlflow = client.post("/invocations", json={"dataframe_split": split})
    assert mlflow.status_code == 200 and list(mlflow.json()) == ["predictions"]  # MLflow's format, unchanged
    answers += list(zip(header_ids(mlflow), mlflow.json()["predictions"], strict=True))

    csv = client.post("/invocations", content=rows.iloc[6:9].drop(columns=DROP).to_csv(index=False),
                      headers={"content-type": "text/csv"})
    answers += list(zip(header_ids(csv), csv.json()["predictions"], strict=True))

    v2 = client.post("/v2/models/churn/infer", json=v2_body(rows.iloc[9:12], id="req-7")).json()
    outputs = {o["name"]: o for o in v2["outputs"]}
    assert v2["id"] == "req-7" and outputs["prediction_id"]["datatype"] == "BYTES"
    assert outputs["prediction_id"]["shape"] == [3, 1]
    answers += list(zip(outputs["prediction_id"]["data"], outputs["predict"]["data"], strict=True))

    ids = [i for i, _ in answers]
    assert len(set(ids)) == 12
    truth = rows["churned"].tolist()
    fed = client.post("/feedback", json={"labels": [{"id": i, "label": y} for i, y in zip(ids, truth)]})
    assert fed.status_code == 200 and fed.json() == {"accepted": 12, "unknown_ids": []}

    # Joined: each id names the row it was answered for (the logged prediction is the answered one) ...
    logged, labels = prediction_log.latest_labelled(client.store.engine, 100)
    by_id = {i: (o["prediction"], y) for i, o, y in zip(logged.ids, logged.outputs, labels)}
    assert {i: by_id[i] for i in ids} == {i: (p, y) for (i, p), y in zip(answers, truth)}
    # ... and the monitor's labelled window counts every one of them.
    result = monitor.monitor(client.store, client.spec, record=False, notify=False)
    assert result.performance["labelled_rows"] == 12


def test_a_large_mlflow_batch_gets_every_id_over_several_header_lines(served):
    client, table = served
    rows = table.head(900)
    answer = client.post("/invocations", json={"dataframe_records": feature_rows(rows)})
    lines = answer.headers.get_list("x-everloop-prediction-ids")
    assert len(lines) > 1 and all(len(line) <= 4000 for line in lines)  # under clients' line limits
    ids = header_ids(answer)
    assert len(ids) == 900 == len(set(ids)) and len(answer.json()["predictions"]) == 900
    fed = client.post("/feedback", json={"labels": [{"id": i, "label": int(y)}
                                                    for i, y in zip(ids, rows["churned"])]})
    assert fed.json() == {"accepted": 900, "unknown_ids": []}


def test_ids_headers_split_at_commas_and_keep_the_order():
    ids = [f"{n:020x}" for n in range(1000)]
    lines = ids_headers(ids)
    assert all(name == b"x-everloop-prediction-ids" and len(value) <= 4000 for name, value in lines)
    assert b",".join(value for _, value in lines).decode().split(",") == ids
    assert ids_headers(["a", "b"]) == [(b"x-everloop-prediction-ids", b"a,b")]


# -- per-row warnings and strict ------------------------------------------------------------------


def unusual(table: pd.DataFrame) -> list[dict]:
    """Three rows: age -5 in row 0 (never negative in training), an unseen plan in row 1, a null
    tenure and monthly charges of 1e308 in row 2."""
    rows = feature_rows(table.head(3))
    rows[0]["age"] = -5
    rows[1]["plan"] = "gold"
    rows[2]["tenure_months"] = None
    rows[2]["monthly_charges"] = 1e308
    return rows


def expected_warnings(client) -> list[dict]:
    schema = {c["name"]: c for c in client.get("/model").json()["schema"]["columns"]}
    assert schema["age"]["min"] >= 0 and not schema["tenure_months"]["nullable"]
    return [{"row": 0, "column": "age", "why": f"value -5 is below the schema's minimum {schema['age']['min']:g}"},
            {"row": 1, "column": "plan", "why": "category 'gold' not seen in training"},
            {"row": 2, "column": "tenure_months", "why": "missing value in a column that had none in training"},
            {"row": 2, "column": "monthly_charges",
             "why": f"value 1e+308 is above the schema's maximum {schema['monthly_charges']['max']:.15g}"}]


def test_predict_names_each_unusual_value_by_row_and_column(served):
    client, table = served
    clean = client.post("/predict", json={"instances": feature_rows(table.head(3))})
    assert clean.status_code == 200 and "warnings" not in clean.json()  # nothing added to a clean answer
    answer = client.post("/predict", json={"instances": unusual(table)})
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 3
    assert answer.json()["warnings"] == expected_warnings(client)
    # The schema's full check (taken when a value needs a closer look: a number sent as text) finds the same.
    slow = unusual(table)
    slow[1]["age"] = str(slow[1]["age"])
    assert client.post("/predict", json={"instances": slow}).json()["warnings"] == expected_warnings(client)
    single = client.post("/predict", json={"features": unusual(table)[1]}).json()
    assert single["warnings"] == [{"row": 0, "column": "plan", "why": "category 'gold' not seen in training"}]


def test_strict_per_request_refuses_each_unusual_value(served):
    client, table = served
    refused = client.post("/predict?strict=true", json={"instances": unusual(table)})
    assert refused.status_code == 422
    detail = refused.json()["detail"]
    assert [(d["loc"], d["input"]) for d in detail] == [
        (["instances", 0, "age"], -5), (["instances", 1, "plan"], "gold"),
        (["instances", 2, "tenure_months"], None), (["instances", 2, "monthly_charges"], 1e308)]
    assert [d["msg"] for d in detail] == [f"{w['why']} {STRICT}" for w in expected_warnings(client)]
    assert client.post("/predict?strict=1", json={"instances": feature_rows(table.head(3))}).status_code == 200
    assert client.post("/predict?strict=false", json={"instances": unusual(table)}).status_code == 200
    bad = client.post("/predict?strict=maybe", json={"instances": unusual(table)})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "strict"]
    # The other protocols take the same opt-in.
    mlflow = client.post("/invocations?strict=true", json={"dataframe_records": unusual(table)})
    assert mlflow.status_code == 422 and mlflow.json()["detail"][1]["loc"] == ["dataframe_records", 1, "plan"]
    body = v2_body(table.head(3))
    body["inputs"][[i["name"] for i in body["inputs"]].index("plan")]["data"][1] = "gold"
    v2 = client.post("/v2/models/churn/infer?strict=true", json=body)
    assert v2.status_code == 422 and v2.json()["detail"][0]["loc"] == ["inputs", "row", 1, "plan"]
    assert client.post("/v2/models/churn/infer", json=body | {"parameters": {"strict": True}}).status_code == 422
    assert client.post("/v2/models/churn/infer", json=body).status_code == 200


def test_strict_in_the_project_file_refuses_on_every_protocol(shared_project):
    folder, spec, store = shared_project
    strict = spec.model_copy(update={"serving": spec.serving.model_copy(update={"strict": True})})
    table = pd.read_csv(folder / "data" / "customers.csv")
    with TestClient(create_app(folder, spec=strict, store=store, watch=False)) as client:
        rows = unusual(table)
        for path, body in [("/predict", {"instances": rows}), ("/invocations", {"dataframe_records": rows}),
                           ("/predict?strict=false", {"instances": rows})]:  # a request cannot turn it off
            answer = client.post(path, json=body)
            assert answer.status_code == 422 and len(answer.json()["detail"]) == 4, path
        clean = feature_rows(table.head(3))
        assert client.post("/predict", json={"instances": clean}).status_code == 200
        assert client.post("/invocations", json={"dataframe_records": clean}).status_code == 200


def test_a_strict_request_is_refused_alone_in_a_shared_model_call(served):
    """Requests gathered into one model call: the strict one with an unusual row is refused, the others
    are answered with their own warnings only, and only answered rows are logged."""
    client, table = served
    model = client.app.state.holder.current
    logged: list = []
    batcher = MicroBatcher(max_rows=1024, max_wait_s=0.0, on_predicted=lambda entry, outputs: logged.append(entry))
    clean = feature_rows(table.head(2))
    rows = unusual(table)

    def job(records: list[dict]) -> Rows:
        return Rows(records, [["instances", n] for n in range(len(records))])

    async def run() -> list:
        futures = [batcher.submit(model, job(clean), time.perf_counter()),
                   batcher.submit(model, job(rows), time.perf_counter(), strict=True),
                   batcher.submit(model, job(rows[1:2]), time.perf_counter())]
        try:
            return list(await asyncio.gather(*futures))
        finally:
            batcher.stop()

    first, refused, warned = asyncio.run(run())
    assert len(first.outputs) == 2 and not first.warnings and not first.errors
    assert [d["loc"] for d in refused.errors][1] == ["instances", 1, "plan"] and not refused.outputs
    assert warned.warnings == [{"row": 0, "column": "plan", "why": "category 'gold' not seen in training"}]
    assert len(logged) == 1 and logged[0].ids == [o["id"] for o in first.outputs + warned.outputs]


def test_row_warnings_follow_each_columns_schema():
    """Both forms of conformed rows (the fast path's arrays, the full check's frame) give the same
    warnings; a column without a range, domain or null-free training warns about nothing."""
    schema = Schema([ColumnSchema("free", "numeric", nullable=True),
                     ColumnSchema("count", "numeric", dtype="int", min=0.0, max=10.0),
                     ColumnSchema("plan", "categorical", dtype="string", nullable=True, categories=["a", "b"]),
                     ColumnSchema("code", "categorical", dtype="string"),  # too many values for a domain
                     ColumnSchema("seen", "datetime", dtype="datetime"),
                     ColumnSchema("y", "categorical", "target", categories=["0", "1"])])
    arrays = {"free": np.array([np.nan, -1e9, 1e9]), "count": np.array([10.0, -1.0, np.nan]),
              "plan": np.array(["a", None, "z"], dtype=object), "code": np.array([None, "q", "r"], dtype=object),
              "seen": pd.to_datetime(pd.Series(["2026-01-01", None, "2026-01-02"]), utc=True).to_numpy()}
    expected = [(0, "code", MISSING), (1, "count", "value -1 is below the schema's minimum 0"),
                (1, "seen", MISSING), (2, "count", MISSING), (2, "plan", "category 'z' not seen in training")]
    rules = RowWarnings(schema)
    assert [(w.row, w.column, w.why) for w in rules.find(arrays)] == expected
    frame = pd.DataFrame(arrays).astype({"plan": "str", "code": "str"})
    assert [(w.row, w.column, w.why) for w in rules.find(frame)] == expected
    clean = {"free": np.array([np.nan]), "count": np.array([0.0]), "plan": np.array([None], dtype=object),
             "code": np.array(["new"], dtype=object), "seen": np.array(["2026-01-01"], dtype="datetime64[us]")}
    assert rules.find(clean) == []


# -- a column given twice is refused, never read as one of its values -------------------------------


def repeat_key(body: str, key: str, value: str) -> bytes:
    """`body` with `"key": value` added again after its first occurrence."""
    at = body.index(f'"{key}":')
    return (body[:at] + f'"{key}": {value}, ' + body[at:]).encode()


def test_repeated_keys_in_json_bodies_are_refused(served):
    client, table = served
    row = feature_rows(table.head(1))[0]
    one = json.dumps({"features": row})
    answer = client.post("/predict", content=repeat_key(one, "age", "70"))
    assert answer.status_code == 422
    assert answer.json()["detail"] == [{"loc": ["features", "age"], "msg": "'age' is given 2 times in this object "
                                        "(keys 0 and 1): which value is meant is ambiguous; send it once"}]
    rows = feature_rows(table.head(3))
    batch = json.dumps({"instances": rows})
    second = batch.index("{", batch.index("}"))  # the second row's object
    body = batch[:second] + repeat_key(batch[second:], "plan", '"basic"').decode()
    answer = client.post("/predict", content=body.encode())
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["instances", 1, "plan"]

    records = json.dumps({"dataframe_records": rows})
    answer = client.post("/invocations", content=repeat_key(records, "region", '"east"'),
                         headers={"content-type": "application/json"})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["dataframe_records", 0, "region"]
    columnar = json.dumps({"inputs": {c: [r[c] for r in rows] for c in rows[0]}})
    answer = client.post("/invocations", content=repeat_key(columnar, "age", "[1, 2, 3]"),
                         headers={"content-type": "application/json"})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["inputs", "age"]
    v2 = json.dumps(v2_body(table.head(3)))
    answer = client.post("/v2/models/churn/infer", content=repeat_key(v2, "shape", "[3]"))
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["inputs", 0, "shape"]


def test_repeated_columns_in_tables_are_refused_naming_their_positions(served):
    client, table = served
    features = table.head(3).drop(columns=DROP)
    names = list(features.columns)
    split = json.loads(features.to_json(orient="split", index=False))
    split["columns"].append("age")
    split["data"] = [r + [99] for r in split["data"]]
    answer = client.post("/invocations", json={"dataframe_split": split})
    assert answer.status_code == 422
    assert answer.json()["detail"] == [{"loc": ["dataframe_split", "columns"], "msg": (
        f"column 'age' is given 2 times (positions 0 and {len(names)}): which value is meant is ambiguous; "
        "send it once")}]

    csv = features.assign(extra=features["plan"]).rename(columns={"extra": "plan"}).to_csv(index=False)
    answer = client.post("/invocations", content=csv, headers={"content-type": "text/csv"})
    assert answer.status_code == 422
    assert answer.json()["detail"] == [{"loc": ["csv", 0, "plan"], "msg": (
        f"column 'plan' is given 2 times in the header (fields {names.index('plan')} and {len(names)}, from 0): "
        "which value is meant is ambiguous; send it once")}]

    body = v2_body(table.head(3))
    body["inputs"].append(dict(body["inputs"][0], data=[1.0, 2.0, 3.0]))
    answer = client.post("/v2/models/churn/infer", json=body)
    assert answer.status_code == 422
    assert answer.json()["detail"] == [{"loc": ["inputs", len(names), "name"], "msg": (
        f"input 'age' is given 2 times (inputs 0 and {len(names)}): which value is meant is ambiguous; "
        "send it once")}]


def test_bodies_that_only_look_like_repeats_are_answered(served):
    client, table = served
    rows = feature_rows(table.head(2))
    expected = client.post("/predict", json={"instances": rows}).json()["predictions"]
    spaced = json.dumps({"instances": rows}, separators=(" , ", " : ")).encode()  # space before each colon
    text = json.dumps({"instances": rows, "note": 'he said "plan": "gold"'}).encode()  # `":` inside text
    for body in (spaced, text):
        answer = client.post("/predict", content=body)
        assert answer.status_code == 200, answer.text
        assert [p["prediction"] for p in answer.json()["predictions"]] == [p["prediction"] for p in expected]
    spaced_repeat = spaced.replace(b'"age" :', b'"age" : 1 , "age" :', 1)
    assert client.post("/predict", content=spaced_repeat).status_code == 422
    escaped = json.dumps({"features": rows[0]}).replace('"age":', '"age": 1, "\\u0061ge":', 1).encode()
    assert client.post("/predict", content=escaped).status_code == 422  # the same key, written otherwise


KEYS = st.sampled_from(["a", "b", "age", "a\"", "x:y", "é"])
SCALARS = st.one_of(st.none(), st.integers(-5, 5), st.sampled_from(['":', '" :', "plain", "\\", "}{"]))


@st.composite
def objects(draw, depth: int = 0) -> str:
    """A JSON object written by hand (keys may repeat; whitespace anywhere JSON allows it)."""
    pairs = draw(st.lists(st.tuples(KEYS, SCALARS if depth > 1 else st.one_of(SCALARS, objects(depth + 1),
                                                                                st.lists(objects(depth + 1),
                                                                                         max_size=3))),
                          max_size=4))
    space = draw(st.sampled_from(["", " ", "\n", "\t "]))

    def text(value) -> str:
        if isinstance(value, str) and value.startswith("{"):
            return value
        if isinstance(value, list):
            return "[" + ",".join(value) + "]"
        return json.dumps(value)

    return "{" + ",".join(f"{space}{json.dumps(k)}{space}:{space}{text(v)}" for k, v in pairs) + "}"


def _has_repeats(raw: str) -> bool:
    found = []
    json.loads(raw, object_pairs_hook=lambda pairs: found.append(len({k for k, _ in pairs}) < len(pairs)) or {})
    return any(found)


@settings(max_examples=200, deadline=None)
@given(objects(), st.booleans())
def test_load_body_refuses_exactly_the_bodies_with_a_repeated_key(raw, large):
    if large:  # past the size where the colons are counted by numpy
        raw = "[" + ",".join([raw] * (5000 // len(raw) + 1)) + "]"
    try:
        body = load_body(raw.encode())
    except ClientError as exc:
        assert exc.status == 422 and _has_repeats(raw), raw
        return
    assert not _has_repeats(raw), raw
    assert body == json.loads(raw)


# -- a byte-order mark is not part of the body --------------------------------------------------------


def test_a_csv_or_json_body_with_a_byte_order_mark_reads_as_without(served):
    client, table = served
    csv = table.head(4).drop(columns=DROP).to_csv(index=False).encode()
    plain = client.post("/invocations", content=csv, headers={"content-type": "text/csv"})
    marked = client.post("/invocations", content=b"\xef\xbb\xbf" + csv, headers={"content-type": "text/csv"})
    assert plain.status_code == marked.status_code == 200, marked.text
    assert marked.json() == plain.json()
    body = json.dumps({"instances": feature_rows(table.head(4))}).encode()
    marked = client.post("/predict", content=b"\xef\xbb\xbf" + body)
    assert marked.status_code == 200
    assert [p["prediction"] for p in marked.json()["predictions"]] == plain.json()["predictions"]


# -- clients nobody here wrote, against a real server -------------------------------------------------


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    from everloop.serve import ServerProcess

    folder, spec, store = served_project(tmp_path_factory.mktemp("traceable-e2e") / "p", rows=1000)
    with ServerProcess(folder) as server:
        yield server, pd.read_csv(folder / "data" / "customers.csv")
    store.close()


@pytest.mark.e2e
def test_mlflow_and_triton_clients_work_and_their_ids_take_labels(running):
    import httpx
    import requests
    import tritonclient.http as triton
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient
    from mlflow.utils.proto_json_utils import dump_input_data

    server, table = running
    features = table.drop(columns=DROP)
    expected = httpx.post(server.url + "/predict", json={"instances": feature_rows(table.head(8))}).json()
    labels = [p["prediction"] for p in expected["predictions"]]
    # MLflow's own client reads MLflow's answer as before ...
    response = ScoringServerClient("127.0.0.1", server.port).invoke(features.head(8))
    assert list(response.get_predictions(predictions_format="ndarray")) == labels
    # ... and the ids come in the header, for any batch size MLflow's HTTP stack (requests) reads.
    answer = requests.post(server.url + "/invocations", data=dump_input_data(features),
                           headers={"content-type": "application/json"}, timeout=60)
    ids = header_ids(answer)
    assert len(ids) == len(features) == len(set(ids)) == len(answer.json()["predictions"])

    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    inputs = []
    for name in features.columns:
        column = features.head(8)[[name]].to_numpy()
        numeric = features[name].dtype.kind in "if"
        tensor = triton.InferInput(name, list(column.shape), "FP64" if numeric else "BYTES")
        tensor.set_data_from_numpy(column.astype(np.float64 if numeric else np.object_), binary_data=False)
        inputs.append(tensor)
    result = client.infer("churn", inputs, outputs=[triton.InferRequestedOutput("predict", binary_data=False)])
    assert result.as_numpy("predict").ravel().tolist() == labels
    triton_ids = [i.decode() if isinstance(i, bytes) else i for i in result.as_numpy("prediction_id").ravel()]
    assert len(set(triton_ids)) == 8

    truth = table["churned"].tolist()
    fed = httpx.post(server.url + "/feedback", json={"labels": [
        {"id": i, "label": y} for i, y in zip(ids + triton_ids, truth + truth[:8])]}, timeout=60)
    assert fed.status_code == 200 and fed.json() == {"accepted": len(ids) + 8, "unknown_ids": []}
