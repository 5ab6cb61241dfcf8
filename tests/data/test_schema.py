import pandas as pd

from everloop.data import Schema
from everloop.spec import parse_spec

SPEC = parse_spec({"name": "t", "data": {"source": "x.csv", "target": "y", "id": "id"}})


def _frame(n: int = 40) -> pd.DataFrame:
    return pd.DataFrame({
        "id": [f"c{i}" for i in range(n)],
        "x": [float(i) for i in range(n)],
        "color": ["red", "blue"] * (n // 2),
        "y": [0, 1] * (n // 2),
    })


def test_infer_kinds_roles_ranges_and_domains():
    schema = Schema.infer(_frame(), SPEC)
    x = schema.column("x")
    # observed 0..39, widened by a quarter of the span, not below zero for data that never was negative
    assert (x.kind, x.dtype, x.min, x.max, x.nullable) == ("numeric", "int", 0.0, 49.0, False)
    assert schema.column("color").categories == ["blue", "red"]
    assert schema.target.name == "y" and schema.target.kind == "categorical"
    assert schema.column("id").role == "id"
    assert Schema.from_dict(schema.to_dict()) == schema


def test_free_text_columns_are_not_features():
    frame = _frame()
    frame["email"] = [f"user{i}@example.com" for i in range(len(frame))]
    assert "email" not in Schema.infer(frame, SPEC).feature_names


def test_conform_reports_each_anomaly_kind():
    schema = Schema.infer(_frame(), SPEC)
    bad = _frame(6)
    bad["x"] = bad["x"].astype(object)
    bad.loc[0, "x"] = "abc"
    bad.loc[1, "x"] = 500.0
    bad.loc[2, "x"] = None
    bad.loc[3, "color"] = "green"
    bad.loc[4, "id"] = "c0"
    bad.loc[5, "y"] = None
    bad["extra"] = 1
    _, report = schema.conform(bad)
    found = {(a.column, a.kind, a.severity) for a in report.anomalies}
    assert ("x", "type_mismatch", "error") in found
    assert ("x", "out_of_range", "warning") in found
    assert ("x", "null_values", "warning") in found
    assert ("color", "unseen_category", "warning") in found
    assert ("id", "duplicate_id", "warning") in found
    assert ("y", "missing_label", "error") in found
    assert ("extra", "unexpected_column", "warning") in found
    mismatch = next(a for a in report.anomalies if a.kind == "type_mismatch")
    assert mismatch.rows == [0] and mismatch.values == ["abc"]


def test_request_mode_needs_features_only():
    schema = Schema.infer(_frame(), SPEC)
    conformed, report = schema.conform(pd.DataFrame([{"x": "3.5", "color": "red"}]), mode="request")
    assert report.ok
    assert conformed["x"].iloc[0] == 3.5
    _, report = schema.conform(pd.DataFrame([{"x": 1.0}]), mode="request")
    assert [(a.column, a.kind) for a in report.errors] == [("color", "missing_column")]


def test_empty_data_is_an_error():
    schema = Schema.infer(_frame(), SPEC)
    _, report = schema.conform(_frame().iloc[:0])
    assert [a.kind for a in report.errors] == ["empty"]
