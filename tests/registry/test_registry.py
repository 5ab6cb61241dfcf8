import pytest

from everloop import registry, train
from everloop.errors import GateError, NotFoundError
from everloop.spec import parse_spec


def _weak_spec(spec):
    raw = spec.model_dump()
    # the same seed, so the same split: production never trained on the candidate's held-out rows
    raw["model"] = {"estimator": "sklearn.tree.DecisionTreeClassifier", "params": {"max_depth": 1}, "seed": 42}
    return parse_spec(raw)


def test_worse_candidate_is_refused_with_the_reason(trained):
    folder, spec, store = trained
    weak = train.train(store, _weak_spec(spec))
    with pytest.raises(GateError) as info:
        registry.promote(store, spec, weak.version)
    reason = next(r for r in info.value.reasons if "production" in r)
    assert "worse than production v1's" in reason and "on the same evaluation data" in reason
    assert registry.alias_version(store, registry.PRODUCTION) == 1


def test_min_metric_and_baseline_are_enforced(trained):
    folder, spec, store = trained
    raw = spec.model_dump()
    raw["promotion"]["min_metric"] = 0.99
    decision = registry.check_gate(store, parse_spec(raw), 1)
    assert not decision.passed and "below promotion.min_metric 0.99" in decision.reasons[0]
    raw["model"] = {"estimator": "sklearn.dummy.DummyClassifier", "params": {}, "seed": 1}
    raw["promotion"]["min_metric"] = None
    dummy = train.train(store, parse_spec(raw))
    decision = registry.check_gate(store, spec, dummy.version)
    assert any("does not beat the trivial baseline" in r for r in decision.reasons)


def test_forced_promotion_is_recorded_and_rollback_restores(trained):
    folder, spec, store = trained
    weak = train.train(store, _weak_spec(spec))
    registry.promote(store, spec, weak.version, force=True, reason="testing")
    assert registry.alias_version(store, registry.PRODUCTION) == weak.version
    history = registry.alias_history(store)
    assert history[-1]["forced"] and "forced past" in history[-1]["reason"]
    assert history[-1]["from_version"] == 1
    assert registry.rollback(store) == 1
    assert registry.alias_version(store, registry.PRODUCTION) == 1
    assert [h["to_version"] for h in registry.alias_history(store)] == [1, weak.version, 1]


def test_listing_and_missing_versions(trained):
    folder, spec, store = trained
    models = registry.list_models(store)
    assert [(m.version, m.aliases) for m in models] == [(1, ["production"])]
    with pytest.raises(NotFoundError, match="model version 9 does not exist"):
        registry.get_model(store, 9)
    with pytest.raises(NotFoundError, match="alias 'staging' points at no model"):
        registry.get_model(store, "staging")


def test_a_candidate_worse_on_one_slice_is_refused(trained):
    folder, spec, store = trained
    raw = spec.model_dump()
    raw["features"]["categorical_encoding"] = "ordinal"
    raw["promotion"] |= {"max_regression": 1.0, "min_metric": None}
    good = parse_spec(raw)
    prod = train.train(store, good).version
    registry.promote(store, good, prod, force=True)
    raw["model"] = {"estimator": "tests.registry.saboteur.WorseOnPremium", "params": {"max_iter": 50}, "seed": 42}
    bad = train.train(store, parse_spec(raw)).version
    decision = registry.check_gate(store, good, bad)
    assert not decision.passed
    assert len(decision.reasons) == 1 and decision.reasons[0].startswith("on slice plan=premium")
    assert decision.evidence["slices"]["plan=basic"]["candidate"] == pytest.approx(
        decision.evidence["slices"]["plan=basic"]["production"])


def test_what_served_at_a_past_moment(trained):
    import time

    folder, spec, store = trained
    first_moment = time.time()
    time.sleep(0.05)
    second = train.train(store, spec).version
    registry.promote(store, spec, second, force=True, reason="test")
    assert registry.alias_at(store, "production", first_moment) == 1
    assert registry.alias_at(store, "production", time.time()) == second
    assert registry.alias_at(store, "production", 0) is None


def test_lineage_both_ways(trained):
    folder, spec, store = trained
    back = registry.model_lineage(store, 1)
    assert [d["version"] for d in back["datasets"]] == [1]
    assert back["alias_moves"][0]["to_version"] == 1 and back["alias_moves"][0]["alias"] == "production"
    forward = registry.dataset_lineage(store, 1)
    assert [m["version"] for m in forward["models"]] == [1]


def test_model_card(trained, tmp_path):
    folder, spec, store = trained
    page = registry.write_card(store, 1, tmp_path / "card.html").read_text()
    for part in ("Model card: churn model v1", "beats the trivial baseline", "roc_auc by slice", "plan = basic",
                 "Reproducibility record", "everloop reproduce 1", "Calibration", "ROC curve"):
        assert part in page
