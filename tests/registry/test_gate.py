"""The gate compares candidate and production only on rows neither trained on; tolerances in any units."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from everloop import data, registry, train
from everloop.demo import make_churn
from everloop.errors import GateError, SpecError
from everloop.registry._registry import HELD_OUT, TRAFFIC, _Scored, comparison_rows
from everloop.spec import load_spec, parse_spec
from everloop.store import Store
from everloop.train import allowed_loss, describe_tolerance, row_hashes, score_labels, training_hashes
from everloop.train._metrics import format_number
from tests.conftest import send_traffic

MINIMAL = {"name": "churn", "data": {"source": "d.csv", "target": "y"}}


def _auc(model, rows: pd.DataFrame) -> float:
    predictions = model.predict(rows)
    return score_labels("roc_auc", rows["churned"], predictions.labels, predictions.proba, model.classes)


def _new_rows(n: int, seed: int) -> pd.DataFrame:
    rows = make_churn(n, seed=seed)
    rows["customer_id"] = [f"N{seed}-{i}" for i in range(n)]
    return rows


def _retrained(project: Path, keep_old: int | None):
    """v1 on dataset v1; v2 on the first `keep_old` rows of dataset v1 (all when None) plus 1000 new rows,
    as the loop retrains, with v2 in production. Returns (spec, store, old frame, rows v2 kept)."""
    spec, store = load_spec(project), Store.for_project(project)
    first = data.ingest(store, spec, base=project)
    assert train.train(store, spec).version == 1
    old = data.load_frame(store, first)
    kept = old if keep_old is None else old.iloc[:keep_old]
    frame = pd.concat([kept, _new_rows(1000, seed=11)], ignore_index=True)
    second = data.ingest_frame(store, spec, frame, source="old + new", parent=first.version)
    v2 = train.train(store, spec, second.version, recent_from_row=len(kept)).version
    registry.set_alias(store, registry.PRODUCTION, v2, reason="the loop retrained")
    return spec, store, old, len(kept)


def test_the_gate_compares_only_on_rows_neither_model_trained_on(project):
    spec, store, old, kept = _retrained(project, keep_old=1000)
    # v1's held-out rows, found independently of any hashing: the same deterministic split again
    schema = data.get_schema(store, 1)
    _, held_out = train._train.split(old, schema, spec, "classification")
    unseen = old.loc[held_out.index[held_out.index >= kept]]  # v2 trained on every old row before `kept`
    assert 50 < len(unseen) < len(held_out)
    # v2's own held-out rows are new rows v1 never saw: they count too
    second = data.load_frame(store, data.get_dataset(store, 2))
    _, v2_held_out = train._train.split(second, schema, spec, "classification", recent_from_row=kept)
    both = len(held_out) + len(v2_held_out)
    unseen = pd.concat([unseen, v2_held_out], ignore_index=True)

    decision = registry.check_gate(store, spec, 1)
    comparison = decision.evidence["comparison"]
    assert comparison["rows_used"] == HELD_OUT
    assert comparison["rows"] == len(unseen) and comparison["held_out"] == {
        "rows": both, "neither_trained_on": len(unseen)}
    v2 = registry.load_model(store, 2)
    expected = _auc(v2, unseen)
    assert decision.evidence["production"] == pytest.approx(expected, abs=1e-12)
    assert comparison["production"] == pytest.approx(expected, abs=1e-12)
    v1 = registry.load_model(store, 1)
    mine = _auc(v1, unseen)
    assert comparison["candidate"] == pytest.approx(mine, abs=1e-12)
    # the slices are judged on the same rows
    counts = unseen["plan"].value_counts()
    assert {k: v["rows"] for k, v in decision.evidence["slices"].items()} == {
        f"plan={p}": int(n) for p, n in counts.items() if n >= spec.promotion.min_slice_rows}
    assert comparison["allowed_loss"] == 0.005  # the demo project's absolute max_regression
    assert comparison["tolerance"] == "promotion.max_regression 0.005 roc_auc (absolute)"
    assert _auc(v2, old.loc[held_out.index]) > expected + 0.01  # on all of them v2 would look better

    rows = comparison_rows(store, spec, 1, 2)
    v2_trained = training_hashes(store, registry.get_model(store, 2).manifest)
    assert not np.isin(row_hashes(rows.frame, v2.manifest["features"]), v2_trained).any()
    assert len(v2_trained) == kept + 800  # every old row it kept and 80% of the new ones
    scored = _Scored(v2, rows.frame, "roc_auc")  # the bootstrap's fast ROC AUC is scikit-learn's
    sample = np.random.default_rng(0).integers(0, len(rows.frame), len(rows.frame))
    assert scored.fast_metric(sample) == pytest.approx(scored.metric(sample), abs=1e-12)
    store.close()


def test_no_unseen_rows_refuses_then_labelled_traffic_decides(project):
    from fastapi.testclient import TestClient

    from everloop.serve import create_app

    spec, store, old, kept = _retrained(project, keep_old=None)  # the issue: v2 trained on all of v1's data
    # v1's held-out rows are all in v2's training data; v2's own held-out rows (200 new ones) are not
    decision = registry.check_gate(store, spec, 1)
    comparison = decision.evidence["comparison"]
    assert comparison["rows_used"] == HELD_OUT and comparison["rows"] == 200
    second = data.load_frame(store, data.get_dataset(store, 2))
    _, v2_held_out = train._train.split(second, data.get_schema(store, 1), spec, "classification",
                                        recent_from_row=kept)
    assert comparison["production"] == pytest.approx(_auc(registry.load_model(store, 2), v2_held_out), abs=1e-12)
    raw = spec.model_dump()
    raw["promotion"]["min_comparison_rows"] = 500
    spec = parse_spec(raw)
    decision = registry.check_gate(store, spec, 1)
    assert not decision.passed
    assert decision.reasons == [
        "only 200 rows neither model trained on (need 500): cannot compare with production v2; 200 of the "
        f"two models' {decision.evidence['comparison']['held_out']['rows']} held-out rows and no labelled "
        "predictions in the log are unseen by both; send labels for newer predictions (/feedback), lower "
        "promotion.min_comparison_rows, promote with --force, or roll back"]
    assert "production" not in decision.evidence  # no value was claimed for production
    with pytest.raises(GateError):
        registry.promote(store, spec, 1)

    fresh = _new_rows(600, seed=77)
    seen_by_v2 = old.iloc[:60]  # traffic v2 (and v1) trained on must not count
    with TestClient(create_app(project, spec=spec, store=store, watch=False)) as client:
        send_traffic(client, pd.concat([seen_by_v2, fresh], ignore_index=True))
    decision = registry.check_gate(store, spec, 1)
    comparison = decision.evidence["comparison"]
    assert comparison["rows_used"] == TRAFFIC and comparison["rows"] == 600
    assert comparison["traffic"] == {"rows": 660, "neither_trained_on": 600}
    for version, key in ((1, "candidate"), (2, "production")):
        model = registry.load_model(store, version)
        assert comparison[key] == pytest.approx(_auc(model, fresh), abs=1e-6)
    if not decision.passed:
        assert "rows of labelled traffic neither model trained on" in decision.reasons[0]
    store.close()


def test_relative_max_regression_in_the_reason(project):
    spec, store = load_spec(project), Store.for_project(project)
    data.ingest(store, spec, base=project)
    registry.promote(store, spec, train.train(store, spec).version)
    raw = spec.model_dump()
    # the same seed, so the same split: production never trained on the candidate's held-out rows
    raw["model"] = {"estimator": "sklearn.tree.DecisionTreeClassifier", "params": {"max_depth": 1}, "seed": 42}
    weak = train.train(store, parse_spec(raw)).version
    raw = spec.model_dump()
    raw["promotion"] |= {"min_metric": None, "max_regression": "1%", "slice_tolerance": "100%"}
    decision = registry.check_gate(store, parse_spec(raw), weak)
    b = decision.evidence["production"]
    assert decision.evidence["comparison"]["rows_used"] == HELD_OUT  # same split: neither trained on them
    assert decision.evidence["comparison"]["allowed_loss"] == pytest.approx(0.01 * b)
    allowed = f"allowed: promotion.max_regression 1% of {format_number(b)} = {format_number(0.01 * b)} roc_auc)"
    assert any(allowed in r for r in decision.reasons)
    raw["promotion"]["max_regression"] = "60%"  # a weaker model within 60% of production passes
    assert registry.check_gate(store, parse_spec(raw), weak).passed
    store.close()


def test_models_without_stored_training_rows_get_them_from_their_dataset(project):
    spec, store = load_spec(project), Store.for_project(project)
    data.ingest(store, spec, base=project)
    manifest = registry.get_model(store, train.train(store, spec).version).manifest
    stored = training_hashes(store, manifest)
    older = {k: v for k, v in manifest.items() if k != "train_hashes"}
    assert len(stored) == manifest["train_rows"]
    np.testing.assert_array_equal(training_hashes(store, older), stored)
    store.close()


def test_tolerances_mean_the_same_for_every_metric():
    assert allowed_loss("5%", 40.0) == pytest.approx(2.0)
    assert allowed_loss(0.05, 40.0) == 0.05
    assert allowed_loss("5%", -0.2) == pytest.approx(0.01)  # relative to the size of the reference
    assert allowed_loss(0, 0.8) == 0.0
    assert np.isnan(allowed_loss("5%", float("nan")))
    assert describe_tolerance("5%", 0.8123, "roc_auc") == "5% of 0.8123 = 0.0406 roc_auc"
    assert describe_tolerance(0.5, 3.2, "mae") == "0.5 mae (absolute)"
    assert describe_tolerance("2.5 %", 40.0, "mae") == "2.5% of 40 = 1 mae"
    with pytest.raises(ValueError, match="percentage such as '5%'"):
        allowed_loss("five", 1.0)


def test_tolerances_in_the_project_file():
    spec = parse_spec(MINIMAL)
    assert spec.monitoring.performance.max_drop == "5%"
    assert spec.promotion.slice_tolerance == "2%" and spec.promotion.max_regression == 0.0
    assert spec.promotion.min_comparison_rows == 100
    spec = parse_spec(MINIMAL | {"promotion": {"max_regression": "1.5 %", "slice_tolerance": 0.5},
                                 "monitoring": {"performance": {"max_drop": 3}}})
    assert spec.promotion.max_regression == "1.5%" and spec.promotion.slice_tolerance == 0.5
    assert spec.monitoring.performance.max_drop == 3.0
    assert parse_spec(spec.model_dump()) == spec  # round-trips
    drop = "monitoring.performance.max_drop"
    for change, where in [({"promotion": {"max_regression": "abc"}}, "promotion.max_regression"),
                          ({"promotion": {"slice_tolerance": "-2%"}}, "promotion.slice_tolerance"),
                          ({"promotion": {"slice_tolerance": True}}, "promotion.slice_tolerance"),
                          ({"monitoring": {"performance": {"max_drop": -0.1}}}, drop),
                          ({"monitoring": {"performance": {"max_drop": "nan%"}}}, drop)]:
        with pytest.raises(SpecError) as info:
            parse_spec(MINIMAL | change)
        assert (f"{where}: Input should be greater than or equal to 0 (an absolute amount, in the metric's "
                "units) or a percentage such as '5%' (of the reference value)") in str(info.value)
    with pytest.raises(SpecError, match="min_comparison_rows: Input should be greater than or equal to 1"):
        parse_spec(MINIMAL | {"promotion": {"min_comparison_rows": 0}})


def test_row_hashes_match_the_same_row_from_any_source():
    ints = pd.DataFrame({"n": [1, 2, 3], "c": ["a", "b", None], "t": pd.to_datetime(
        ["2024-01-01", "2024-01-02", None], utc=True).as_unit("ns"), "b": [True, False, True]})
    floats = ints.assign(n=[1.0, 2.0, 3.0], c=pd.Series(["a", "b", np.nan], dtype=object),
                         t=pd.to_datetime(["2024-01-01", "2024-01-02", None]).as_unit("us"), b=[1.0, 0.0, 1.0])
    buffer = io.BytesIO()
    ints.to_parquet(buffer, index=False)
    parquet = pd.read_parquet(io.BytesIO(buffer.getvalue()))
    columns = ["n", "c", "t", "b"]
    expected = row_hashes(ints, columns)
    assert expected.dtype == np.uint64 and len(set(expected.tolist())) == 3
    np.testing.assert_array_equal(row_hashes(floats, columns), expected)
    np.testing.assert_array_equal(row_hashes(parquet, columns), expected)
    np.testing.assert_array_equal(row_hashes(ints.iloc[::-1].reset_index(drop=True), columns), expected[::-1])
    objects = ints.astype(object)  # values one by one, as a mixed column holds them
    np.testing.assert_array_equal(row_hashes(objects, columns), expected)
    # different rows differ: a changed value, text vs number, a missing value, another column order
    assert row_hashes(ints.assign(n=[1, 2, 4]), columns)[2] != expected[2]
    assert row_hashes(ints.assign(c=["1", "b", None]), columns)[0] != row_hashes(ints.assign(c=[1, "b", None]),
                                                                                  columns)[0]
    assert row_hashes(ints.assign(n=[1, 2, None]), columns)[2] != expected[2]
    assert (row_hashes(ints, ["c", "n", "t", "b"]) != expected).all()
    assert row_hashes(pd.DataFrame({"x": [0.0]}), ["x"])[0] == row_hashes(pd.DataFrame({"x": [-0.0]}), ["x"])[0]
    assert row_hashes(ints.head(0), columns).shape == (0,)
