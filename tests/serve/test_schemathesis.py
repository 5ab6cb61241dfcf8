"""Fuzz every endpoint from the service's own OpenAPI schema (schemathesis): no input may yield a 5xx."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from everloop.serve import create_app
from tests.conftest import served_project


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    folder, spec, store = served_project(tmp_path_factory.mktemp("schemathesis") / "p", rows=600)
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(folder, watch=False))


def test_no_server_errors(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/predict", "/invocations", "/feedback", "/v2/models/{name}/infer"}
    seen: set[tuple[str, int]] = set()
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call()
            seen.add((case.path, response.status_code))
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)

        check()
    assert ("/predict", 422) in seen and ("/health", 200) in seen  # the requests really reached the app
