"""One value, one reading, whatever the protocol (issue 11, serving side): CSV bodies are read as the
same file would be (any delimiter, a byte-order mark, blank lines), `parameters.strict` takes the
spellings `?strict=` takes, `/feedback` ids are read without surrounding spaces, and a row answers the
same on `/predict`, `/invocations` (JSON and CSV), the Open Inference Protocol and batch scoring."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from fastapi.testclient import TestClient

from everloop import data, registry, train
from everloop.batch import score_file
from everloop.serve import create_app
from everloop.spec import load_spec
from everloop.store import Store
from tests.conftest import served_project

DROP = ["customer_id", "event_time", "churned"]
CSV = {"content-type": "text/csv"}
BOM = b"\xef\xbb\xbf"


@pytest.fixture(scope="module")
def churn(tmp_path_factory):
    """(client, features of the project's first 6 rows): a service of a churn project, for the module."""
    folder, _, store = served_project(tmp_path_factory.mktemp("inputs") / "p")
    table = pd.read_csv(folder / "data" / "customers.csv", dtype=str, keep_default_na=False)
    with TestClient(create_app(folder, watch=False)) as client:
        client.folder, client.store = folder, store
        yield client, table.head(6).drop(columns=DROP)
    store.close()


def probabilities(answer) -> list[float]:
    assert answer.status_code == 200, answer.text
    return [p["probabilities"]["1"] for p in answer.json()["predictions"]]


def v2_columns(frame: pd.DataFrame, **extra) -> dict:
    """One BYTES input per column (as MLServer's PandasCodec sends text)."""
    return {"inputs": [{"name": c, "shape": [len(frame)], "datatype": "BYTES", "data": frame[c].tolist()}
                       for c in frame.columns], **extra}


def v2_probabilities(answer) -> list[float]:
    assert answer.status_code == 200, answer.text
    proba = next(o for o in answer.json()["outputs"] if o["name"] == "predict_proba")
    return np.array(proba["data"]).reshape(proba["shape"])[:, 1].tolist()


def batch_probabilities(client, body: bytes, tmp_path) -> list[float]:
    """The scores `everloop predict` gives the same bytes as a file."""
    (tmp_path / "in.csv").write_bytes(body)
    score_file(client.store, tmp_path / "in.csv", tmp_path / "out.parquet")
    return pd.read_parquet(tmp_path / "out.parquet")["proba_1"].tolist()


# -- CSV bodies read as the same file would ------------------------------------------------------------


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_a_csv_body_with_any_delimiter_answers_as_json_and_as_the_file(churn, delimiter, tmp_path):
    client, features = churn
    expected = probabilities(client.post("/predict", json={"instances": typed(features)}))
    labels = [int(p > 0.5) for p in expected]
    body = features.to_csv(index=False, sep=delimiter).encode()
    answer = client.post("/invocations", content=body, headers=CSV)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"predictions": labels}
    assert len(answer.headers["x-everloop-prediction-ids"].split(",")) == len(features)
    # A byte-order mark, Windows line ends and blank lines change nothing, as in a file.
    messy = BOM + b"\r\n" + body.replace(b"\n", b"\r\n\r\n")
    assert client.post("/invocations", content=messy, headers=CSV).json() == {"predictions": labels}
    assert batch_probabilities(client, messy, tmp_path) == pytest.approx(expected, abs=1e-6)


def test_a_csv_header_that_names_no_feature_says_how_it_was_read(churn):
    client, features = churn
    answer = client.post("/invocations", content="foo;bar\n1;2\n", headers=CSV)
    assert answer.status_code == 422
    [problem] = answer.json()["detail"]
    assert problem["loc"] == ["csv", 0]
    assert problem["msg"].startswith("none of the header's columns ('foo', 'bar') is a feature of the model "
                                     "(read with delimiter ';'); expected age, tenure_months, ")
    # Fields separated by spaces are no CSV the file reader takes either: one column, read with commas.
    spaced = features.to_csv(index=False, sep=" ")
    [problem] = client.post("/invocations", content=spaced, headers=CSV).json()["detail"]
    assert "(read with delimiter ',')" in problem["msg"] and "'age tenure_months " in problem["msg"]


def test_a_column_missing_from_a_csv_header_is_named_once_not_per_row(churn):
    client, features = churn
    body = features.drop(columns=["age", "plan"]).to_csv(index=False, sep=";")
    answer = client.post("/invocations", content=body, headers=CSV)
    assert answer.status_code == 422
    assert answer.json()["detail"] == [
        {"loc": ["csv", 0, name], "msg": f"field required: the header has no column {name!r} (fields separated "
                                         "by ';', sniffed from its first lines)"} for name in ("age", "plan")]


def test_csv_errors_name_the_line_blank_lines_and_quoted_line_breaks_included(churn):
    client, features = churn
    rows = features.head(3).copy()
    rows["plan"] = ["basic", "multi\nline", "basic"]  # a quoted value over two lines
    rows["age"] = ["40", "41", "old"]
    lines = rows.to_csv(index=False).split("\n")
    body = "\n".join(lines[:2] + [""] + lines[2:])  # a blank line before the second row
    answer = client.post("/invocations", content=body, headers=CSV)
    assert answer.status_code == 422
    # header: line 0; rows start on lines 1, 3 (after the blank line) and 5 (after the line break)
    assert answer.json()["detail"] == [{"loc": ["csv", 5, "age"], "msg": "values are not numbers", "input": "old"}]
    short = client.post("/invocations", content="age,plan\n1\n", headers=CSV)
    assert short.status_code == 422 and short.json()["detail"][0]["loc"] == ["csv", 0, "tenure_months"]


# -- the same row on every protocol ---------------------------------------------------------------------


def every_protocol(client, frame: pd.DataFrame, tmp_path) -> dict[str, list]:
    """What each path answers for the rows of `frame` (text cells, "" as sent): probabilities where the
    protocol gives them, else labels."""
    records = frame.to_dict("records")
    csv_body = BOM + frame.to_csv(index=False, sep=";").encode()
    split = {"columns": list(frame.columns), "data": frame.values.tolist()}
    as_split = client.post("/invocations", json={"dataframe_split": split})
    as_csv = client.post("/invocations", content=csv_body, headers=CSV)
    for answer in (as_split, as_csv):
        assert answer.status_code == 200, answer.text
    return {"predict": probabilities(client.post("/predict", json={"instances": records})),
            "v2": v2_probabilities(client.post("/v2/models/churn/infer", json=v2_columns(frame))),
            "batch": batch_probabilities(client, csv_body, tmp_path),
            "invocations": as_split.json()["predictions"], "csv": as_csv.json()["predictions"]}


def typed(frame: pd.DataFrame) -> list[dict]:
    """Rows of text cells as a JSON client sends them: numbers as numbers."""
    return json.loads(pd.read_csv(io.StringIO(frame.to_csv(index=False))).to_json(orient="records"))


def test_a_bom_prefixed_semicolon_csv_answers_as_json_on_every_path(churn, tmp_path):
    client, features = churn
    got = every_protocol(client, features, tmp_path)
    expected = probabilities(client.post("/predict", json={"instances": typed(features)}))
    for path in ("predict", "v2", "batch"):
        assert got[path] == pytest.approx(expected, abs=1e-6), path
    assert got["invocations"] == got["csv"] == [int(p > 0.5) for p in expected]


NULL_TOKENS = {"age": "NA", "monthly_charges": "null", "plan": "N/A", "region": "", "support_calls": "NaN"}


def test_null_tokens_read_as_nulls_on_every_path(churn, tmp_path):
    client, features = churn
    nulled = features.assign(**{c: None for c in NULL_TOKENS})
    expected = probabilities(client.post("/predict", json={"instances": nulled.to_dict("records")}))
    assert expected != probabilities(client.post("/predict", json={"instances": features.to_dict("records")}))
    got = every_protocol(client, features.assign(**NULL_TOKENS), tmp_path)
    for path in ("predict", "v2", "batch"):
        assert got[path] == pytest.approx(expected, abs=1e-6), path
    assert got["invocations"] == got["csv"] == [int(p > 0.5) for p in expected]


# -- parameters.strict ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "strict"), [
    (True, True), ("true", True), (" TRUE ", True), ("yes", True), ("1", True), (1, True),
    (False, False), ("false", False), ("No", False), ("0", False), (0, False)])
def test_v2_parameters_strict_takes_the_spellings_of_the_query(churn, value, strict):
    client, features = churn
    frame = features.head(2).assign(plan=["basic", "gold"])  # row 1: a category never seen in training
    answer = client.post("/v2/models/churn/infer", json=v2_columns(frame, parameters={"strict": value}))
    if strict:
        assert answer.status_code == 422
        assert answer.json()["detail"] == [{"loc": ["inputs", "row", 1, "plan"], "input": "gold", "msg": (
            "category 'gold' not seen in training (refused: strict checks are on)")}]
    else:
        assert answer.status_code == 200, answer.text
        assert len(v2_probabilities(answer)) == 2


@pytest.mark.parametrize("value", ["maybe", "", 2, 1.0, None, [True], {"on": True}])
def test_v2_parameters_strict_refuses_what_is_no_boolean_naming_it(churn, value):
    client, features = churn
    answer = client.post("/v2/models/churn/infer", json=v2_columns(features.head(1), parameters={"strict": value}))
    assert answer.status_code == 422
    assert answer.json()["detail"] == [{"loc": ["parameters", "strict"], "input": value,
                                        "msg": "expected true or false (also 1/0, yes/no)"}]


# -- /feedback ids ---------------------------------------------------------------------------------------


def stored_labels(store, ids: list[str]) -> dict[str, object]:
    table = store.tables.feedback
    with store.engine.connect() as conn:
        rows = conn.execute(table.select().with_only_columns(table.c.prediction_id, table.c.label)
                            .where(table.c.prediction_id.in_(ids))).all()
    return dict(rows)


def test_feedback_ids_are_read_without_surrounding_spaces(churn):
    client, features = churn
    ids = [p["id"] for p in client.post("/predict", json={"instances": features.head(3).to_dict("records")})
           .json()["predictions"]]
    answer = client.post("/feedback", json={"labels": [{"id": f" {ids[0]} ", "label": 1},
                                                       {"id": f"{ids[1]}\t", "label": "0"},
                                                       {"id": " nowhere ", "label": 1}]})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"accepted": 2, "unknown_ids": ["nowhere"]}
    assert stored_labels(client.store, ids) == {ids[0]: 1, ids[1]: 0}
    single = client.post("/feedback", json={"id": f"  {ids[2]}", "label": 1})
    assert single.json() == {"accepted": 1, "unknown_ids": []}
    blank = client.post("/feedback", json={"id": "   ", "label": 1})
    assert blank.status_code == 422
    assert blank.json()["detail"] == [{"loc": ["id"], "msg": (
        "expected an object with a string 'id' and a 'label'; its id is '   '")}]


def test_feedback_file_ids_with_spaces_are_found(churn, everloop, tmp_path):
    client, features = churn
    ids = [p["id"] for p in client.post("/predict", json={"instances": features.head(2).to_dict("records")})
           .json()["predictions"]]
    client.app.state.log.flush()
    (tmp_path / "labels.csv").write_text(f"id,label\n {ids[0]} ,1\n{ids[1]}  ,0\n")
    run = everloop("feedback", str(tmp_path / "labels.csv"), "-p", str(client.folder), "--json")
    assert run.code == 0, run.out + run.err
    assert json.loads(run.out)["accepted"] == 2
    assert stored_labels(client.store, ids) == {ids[0]: 1, ids[1]: 0}


# -- numbers, codes and bools: one reading on every protocol ---------------------------------------------


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    """A service of a model whose features are an integer-coded category (`tier`), a code with leading
    zeros (`zip`), a bool (`member`) and a number (`x`); each decides the label."""
    folder = tmp_path_factory.mktemp("codes")
    (folder / "data").mkdir()
    rng = np.random.default_rng(0)
    n = 1500
    frame = pd.DataFrame({"tier": rng.integers(1, 4, n), "zip": rng.choice(["01234", "02139", "10001"], n),
                          "member": rng.random(n) < 0.5, "x": rng.normal(50, 10, n).round(2)})
    frame["y"] = ((frame.tier == 3) ^ frame.member ^ (frame.zip == "02139") ^ (frame.x > 55)).astype(int)
    frame.to_csv(folder / "data" / "d.csv", index=False)
    (folder / "everloop.yaml").write_text(yaml.safe_dump({
        "name": "codes", "data": {"source": "data/d.csv", "target": "y"},
        "features": {"categorical": ["tier", "zip"], "numeric": ["x"]},
        "model": {"estimator": "sklearn.ensemble.HistGradientBoostingClassifier", "params": {"max_iter": 50},
                  "seed": 1},
        "evaluation": {"split": {"holdout": 0.2}, "metric": "roc_auc"}, "promotion": {"min_metric": 0.5},
        "serving": {"compile_trees": False}}))
    spec, store = load_spec(folder), Store.for_project(folder)
    data.ingest(store, spec, base=folder)
    registry.promote(store, spec, train.train(store, spec).version)
    with TestClient(create_app(folder, watch=False)) as client:
        client.store = store
        yield client
    store.close()


ROW = {"tier": 3, "zip": "02139", "member": True, "x": 50.0}


def one(client, row: dict, datatypes: dict[str, str] | None = None) -> tuple[float, list, float]:
    """(/predict's probability, its warnings, the Open Inference Protocol's probability) for one row."""
    answer = client.post("/predict", json={"features": row})
    assert answer.status_code == 200, answer.text
    types = datatypes or {}
    v2 = client.post("/v2/models/codes/infer", json={"inputs": [
        {"name": c, "shape": [1], "datatype": types.get(c, "BYTES"), "data": [v]} for c, v in row.items()]})
    return probabilities(answer)[0], answer.json().get("warnings", []), v2_probabilities(v2)[0]


@pytest.mark.parametrize(("tier", "datatype"), [(3, "INT64"), (3.0, "FP64"), ("3", "BYTES"),
                                                ("3.0", "BYTES")])
def test_an_integer_category_reads_the_same_as_a_number_or_text(codes, tier, datatype, tmp_path):
    expected, warnings, _ = one(codes, ROW, {"tier": "INT64", "x": "FP64", "member": "BOOL"})
    assert warnings == [] and expected > 0.5  # tier 3 and a member: the label flips twice
    got = one(codes, dict(ROW, tier=tier), {"tier": datatype, "x": "FP64", "member": "BOOL"})
    assert got == (pytest.approx(expected, abs=1e-6), [], pytest.approx(expected, abs=1e-6))
    if isinstance(tier, str):  # the same text in a CSV body and in a file
        body = f"tier,zip,member,x\n{tier},02139,True,50\n".encode()
        assert codes.post("/invocations", content=body, headers=CSV).json() == {"predictions": [1]}
        assert batch_probabilities(codes, body, tmp_path) == pytest.approx([expected], abs=1e-6)


def test_a_code_keeps_its_leading_zero_and_a_number_that_lost_it_is_named(codes):
    expected, _, _ = one(codes, ROW)
    body = b"tier;zip;member;x\n3;02139;true;50\n"
    assert codes.post("/invocations", content=body, headers=CSV).json() == {"predictions": [int(expected > 0.5)]}
    got, warnings, v2 = one(codes, dict(ROW, zip=2139), {"zip": "INT64", "tier": "INT64", "x": "FP64",
                                                        "member": "BOOL"})
    assert warnings == [{"row": 0, "column": "zip", "why": "category '2139' not seen in training"}]
    assert got == pytest.approx(v2, abs=1e-6) and abs(got - expected) > 0.2


@pytest.mark.parametrize(("column", "value", "msg"), [
    ("x", True, "values are not numbers"),
    ("member", 1, "values are not true/false"), ("member", "1", "values are not true/false")])
def test_a_bool_is_no_number_and_a_number_no_bool_on_any_protocol(codes, column, value, msg):
    row = dict(ROW, **{column: value})
    answers = {
        "predict": codes.post("/predict", json={"instances": [row]}),
        "invocations": codes.post("/invocations", json={"dataframe_records": [row]}),
        "v2": codes.post("/v2/models/codes/infer", json={"inputs": [
            {"name": c, "shape": [1], "datatype": "BYTES", "data": [v]} for c, v in row.items()]})}
    locs = {"predict": ["instances", 0, column], "invocations": ["dataframe_records", 0, column],
            "v2": ["inputs", "row", 0, column]}
    for path, answer in answers.items():
        assert answer.status_code == 422, (path, answer.text)
        [problem] = answer.json()["detail"]
        assert problem["loc"] == locs[path] and problem["msg"].startswith(msg) and problem["input"] == value
