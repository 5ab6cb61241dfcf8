"""Property: no body a client can send makes the service answer 5xx."""

import json

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from everloop.serve import create_app

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300, max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.conftest import served_project

    folder, spec, store = served_project(tmp_path_factory.mktemp("fuzz") / "p", rows=600)
    row = json.loads(pd.read_csv(folder / "data" / "customers.csv").head(1)
                     .drop(columns=["customer_id", "event_time", "churned"]).to_json(orient="records"))[0]
    with TestClient(create_app(folder, watch=False), raise_server_exceptions=False) as client:
        yield client, row


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(replacements=st.dictionaries(st.sampled_from(["age", "plan", "tenure_months", "region", "extra"]),
                                    json_values, max_size=3),
       form=st.sampled_from(["features", "list", "instances"]))
def test_predict_never_answers_5xx(served, replacements, form):
    client, row = served
    row = dict(row, **replacements)
    body = {"features": row} if form == "features" else (
        {"features": list(row.values())} if form == "list" else {"instances": [row, row]})
    answer = client.post("/predict", content=json.dumps(body), headers={"content-type": "application/json"})
    assert answer.status_code < 500, answer.text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=json_values)
def test_any_json_body_is_never_5xx(served, body):
    client, _ = served
    for path in ("/predict", "/feedback"):
        answer = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert answer.status_code < 500, (path, answer.text)
