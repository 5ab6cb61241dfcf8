"""`Schema.conform_records` (the service's shortcut for well-formed rows) against `Schema.check`:
whatever the shortcut accepts, the full check accepts too and coerces to the same values."""

import math

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from everloop.data import Schema
from everloop.data._schema import ColumnSchema

SCHEMA = Schema([
    ColumnSchema("x", "numeric", nullable=True, min=0.0, max=10.0),
    ColumnSchema("n", "numeric", dtype="int"),
    ColumnSchema("color", "categorical", dtype="string", nullable=True, categories=["blue", "red"]),
    ColumnSchema("code", "categorical", dtype="int", categories=["1", "2"]),
    ColumnSchema("y", "categorical", role="target", categories=["0", "1"]),
])

# JSON-like values of every kind a client can send, plainly typed or not.
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.sampled_from(["red", "blue", "1", "2.5"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
ROWS = st.lists(st.fixed_dictionaries({name: SCALARS for name in ("x", "n", "color", "code")}), min_size=1, max_size=6)
NUMBER = st.one_of(st.none(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_infinity=False))
CATEGORY = st.one_of(st.none(), st.text(max_size=4), st.booleans(), st.integers(min_value=-(2**52), max_value=2**52),
                     st.floats(allow_infinity=False))
PLAIN_ROWS = st.lists(st.fixed_dictionaries({"x": NUMBER, "n": NUMBER, "color": CATEGORY, "code": CATEGORY}),
                      min_size=1, max_size=6)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a) is type(b)


@settings(max_examples=600, deadline=None)
@given(ROWS)
def test_the_shortcut_agrees_with_the_full_check(records):
    _agree(records)


@settings(max_examples=600, deadline=None)
@given(PLAIN_ROWS)
def test_the_shortcut_takes_plain_rows_and_agrees(records):
    _agree(records)  # mostly accepted: plain values, except bools beside numbers in one column


def _agree(records: list[dict]) -> bool:
    fast = SCHEMA.conform_records(records)
    if fast is None:
        return False  # the full check decides: nothing to compare
    checked = SCHEMA.check(pd.DataFrame.from_records(records, columns=["x", "n", "color", "code"]),
                           mode="request", coerce=True)
    assert checked.bad_rows is None or not checked.bad_rows.any(), checked.report.summary()
    for name, values in fast.items():
        expected = checked.frame[name].tolist()
        got = values.tolist()
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            e = None if e is None or (isinstance(e, float) and math.isnan(e) and values.dtype == object) else e
            assert _same(g, e), (name, g, e, records)
    return True


def test_plain_rows_take_the_shortcut_and_odd_ones_do_not():
    plain = [{"x": 1.5, "n": 3, "color": "red", "code": 1}, {"x": None, "n": 2, "color": None, "code": "2"}]
    columns = SCHEMA.conform_records(plain)
    assert columns is not None
    assert np.isnan(columns["x"][1]) and columns["n"].dtype == np.float64
    assert columns["color"].tolist() == ["red", None] and columns["code"].tolist() == ["1", "2"]
    for odd in ({"x": "1.5"}, {"x": True}, {"x": float("inf")}, {"n": 10**400}, {"color": ["red"]},
                {"code": 2**60}):
        assert SCHEMA.conform_records([plain[0] | odd]) is None, odd
