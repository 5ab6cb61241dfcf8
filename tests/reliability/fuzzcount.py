"""A pytest plugin for `scripts/reliability` (`-p tests.reliability.fuzzcount`): counts the cases the
schemathesis test (tests/serve/test_schemathesis.py) sends and how many answered 5xx, into the
reliability report. It wraps `schemathesis.Case.call`, the one call through which every case goes."""

from __future__ import annotations

from typing import Any

counts = {"fuzz_cases": 0, "fuzz_5xx": 0}


def pytest_configure(config: Any) -> None:
    import schemathesis

    real = schemathesis.Case.call

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        response = real(self, *args, **kwargs)
        counts["fuzz_cases"] += 1
        counts["fuzz_5xx"] += int(response.status_code >= 500)
        return response

    schemathesis.Case.call = call


def pytest_unconfigure(config: Any) -> None:
    from tests.reliability.conftest import record

    record(**counts)
