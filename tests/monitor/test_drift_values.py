"""Drift that never misses a value training never had: unseen values and categories, null rates,
per-feature settings from the project file, and date/time features left out of the verdict."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from everloop.errors import SpecError
from everloop.monitor import DriftDetector, Profile, unknown_settings
from everloop.spec import parse_spec

PROJECT = {"name": "p", "data": {"source": "d.csv", "target": "y"}}


def _drift(ref: pd.DataFrame, cur: pd.DataFrame, kinds: dict[str, str], **kw):
    return DriftDetector(**kw).fit(ref, kinds).score(cur)


def test_a_constant_column_that_changes_value_drifts_with_full_effect():
    ref = pd.DataFrame({"flag": np.zeros(1000)})
    cur = pd.DataFrame({"flag": np.ones(200)})
    report = _drift(ref, cur, {"flag": "numeric"})
    col = report.columns[0]
    assert col.drifted and report.dataset_drift
    assert col.effect == 1.0 and col.statistic == 1.0 and col.p_value < 1e-10
    assert col.unseen_share == 1.0 and col.unseen_p_value < 1e-10
    assert col.reasons == ["ks", "unseen values"]
    assert col.wasserstein == pytest.approx(1.0)  # every value is 1 away from the reference's only value


def test_the_last_value_bin_holds_the_last_value_only():
    profile = Profile.reference(pd.DataFrame({"k": [0, 0, 1, 1, 2]}), {"k": "numeric"})
    window = profile.window(pd.DataFrame({"k": [2, 2.5, 3, 1.5, 0]}))
    col = window.columns["k"]
    assert col.counts.tolist() == [0, 1, 1, 1, 2]  # [below, 0, 1, 2, above]: 1.5 lands in the bin of 1
    assert col.unseen == 3 and col.outside == pytest.approx(0.5 + 1.0)


def test_a_new_value_between_known_values_drifts_even_where_the_binned_ks_is_blind():
    """Values 0/10/20; the window puts 30% of rows at 5, taking the mass from 0, so every bin holds the
    reference's share: the binned KS sees nothing, the unseen-values test sees 30% new values."""
    rng = np.random.default_rng(0)
    ref = pd.DataFrame({"k": rng.choice([0, 10, 20], 6000)})
    cur = pd.DataFrame({"k": rng.choice([5, 0, 10, 20], 3000, p=[0.3, 1 / 30, 1 / 3, 1 / 3])})
    col = _drift(ref, cur, {"k": "numeric"}).columns[0]
    assert col.drifted and col.reasons == ["unseen values"]
    assert col.effect < 0.03  # the KS alone would call it healthy
    assert col.unseen_share == pytest.approx((cur["k"] == 5).mean())
    assert col.unseen_share == pytest.approx(0.3, abs=0.03)
    assert col.unseen_expected == pytest.approx(1 / 6002)  # no value seen once: (0 + 1) / (n + 2)


@pytest.mark.parametrize("rows", [50, 5000])
def test_continuous_data_from_the_same_distribution_is_not_new_values(rows):
    for seed in range(8):
        rng = np.random.default_rng(seed)
        ref = pd.DataFrame({"x": rng.normal(size=4000)})
        cur = pd.DataFrame({"x": rng.normal(size=rows)})
        col = _drift(ref, cur, {"x": "numeric"}).columns[0]
        assert "unseen values" not in col.reasons and not col.drifted
        assert col.unseen_expected == pytest.approx(2 / 4001)
        outside = ((cur["x"] < ref["x"].min()) | (cur["x"] > ref["x"].max())).mean()
        assert col.unseen_share == pytest.approx(outside)
        inside = cur.clip(ref["x"].min(), ref["x"].max())
        clipped = _drift(ref, inside, {"x": "numeric"}).columns[0]
        assert clipped.unseen_share == 0.0 and clipped.unseen_p_value == 1.0


def test_a_small_continuous_reference_profiled_one_bin_per_value_expects_new_values():
    """300 distinct values get one bin each, but none repeats: a new value is the norm, not drift; only
    values outside the range count (else every window would be 100% unseen)."""
    rng = np.random.default_rng(4)
    ref = pd.DataFrame({"x": rng.normal(size=300)})
    assert Profile.reference(ref, {"x": "numeric"}).columns["x"].value_bins
    for seed in range(5):
        cur = pd.DataFrame({"x": np.random.default_rng(100 + seed).normal(size=2000)})
        col = _drift(ref, cur, {"x": "numeric"}).columns[0]
        assert col.unseen_share < 0.03 and not col.drifted
        assert col.unseen_expected == pytest.approx(2 / 301)


def test_the_unseen_values_test_is_calibrated_under_exchangeability():
    """P(p < alpha) <= alpha when window and reference come from one distribution: the beta-binomial
    count of values outside the reference's range is exact, not an approximation."""
    rng = np.random.default_rng(7)
    p_values = []
    for _ in range(250):
        both = rng.exponential(size=260)
        ref, cur = pd.DataFrame({"x": both[:200]}), pd.DataFrame({"x": both[200:]})
        p_values.append(_drift(ref, cur, {"x": "numeric"}).columns[0].unseen_p_value)
    for alpha in (0.05, 0.2):
        assert np.mean(np.array(p_values) < alpha) <= alpha + 0.03
    assert np.mean(np.array(p_values) < 0.2) >= 0.1  # and not uselessly conservative


def test_a_new_category_in_40_percent_of_rows_drifts():
    rng = np.random.default_rng(1)
    ref = pd.DataFrame({"c": rng.choice(["a", "b", "c"], 5000)})
    cur = pd.DataFrame({"c": np.where(np.arange(1000) < 400, "z", rng.choice(["a", "b", "c"], 1000))})
    col = _drift(ref, cur, {"c": "categorical"}).columns[0]
    assert col.drifted and "unseen categories" in col.reasons and col.reasons[0] == "chi2"
    assert col.unseen_share == pytest.approx(0.4) and col.unseen_p_value < 1e-10
    assert col.unseen_expected == pytest.approx(1 / 5002)


def test_one_new_category_in_a_hundred_rows_is_not_drift():
    rng = np.random.default_rng(2)
    ref = pd.DataFrame({"c": rng.choice(["a", "b"], 2000)})
    cur = pd.DataFrame({"c": np.append(rng.choice(["a", "b"], 99), "z")})
    col = _drift(ref, cur, {"c": "categorical"}).columns[0]
    assert col.unseen_share == pytest.approx(0.01) and not col.drifted  # significant, but below min_effect


def test_an_id_like_category_expects_new_values():
    ref = pd.DataFrame({"c": [f"id{i}" for i in range(1000)]})
    cur = pd.DataFrame({"c": [f"id{i}" for i in range(1000, 1500)]})
    col = _drift(ref, cur, {"c": "categorical"}).columns[0]
    assert col.unseen_share == 1.0 and "unseen categories" not in col.reasons
    assert col.unseen_expected == pytest.approx(1001 / 1002)


def test_reference_categories_are_never_lumped_in_other_in_a_window():
    from everloop.data import _profile

    ref = pd.DataFrame({"c": ["a", "b"] * 50})
    profile = Profile.reference(ref, {"c": "categorical"})
    new = [f"n{i}" for i in range(_profile.MAX_CATEGORIES)]
    window = profile.window(pd.DataFrame({"c": new + ["a", "b"]}))
    col = window.columns["c"]
    assert col.categories["a"] == 1 and col.categories["b"] == 1 and col.unseen == len(new)


@pytest.mark.parametrize("kind", ["numeric", "categorical"])
def test_nulls_rising_from_0_to_30_percent_drift(kind):
    rng = np.random.default_rng(3)
    values = rng.normal(size=4000) if kind == "numeric" else rng.choice(["a", "b"], 4000).astype(object)
    ref = pd.DataFrame({"v": values[:3000]})
    window = values[3000:].copy()
    window[:300] = np.nan if kind == "numeric" else None
    col = _drift(ref, pd.DataFrame({"v": window}), {"v": kind}).columns[0]
    assert col.null_rate_change == pytest.approx(0.3) and col.null_p_value < 1e-10
    assert col.drifted and "null rate" in col.reasons
    if kind == "numeric":
        assert col.reasons == ["null rate"]  # the present values are from the same distribution


def test_one_null_in_ten_rows_is_not_drift():
    """Fisher's exact test: with no nulls in 100 reference rows, 1 of 10 is p = 10/110, not significant
    (a normal approximation would say p < 0.001)."""
    ref = pd.DataFrame({"v": np.arange(100.0)})
    cur = pd.DataFrame({"v": [np.nan] + list(np.arange(10.0, 100.0, 10.0))})
    col = _drift(ref, cur, {"v": "numeric"}).columns[0]
    assert col.null_rate_change == pytest.approx(0.1)
    assert col.null_p_value == pytest.approx(10 / 110)
    assert not col.drifted


def test_falling_null_rate_is_not_drift():
    ref = pd.DataFrame({"v": [np.nan] * 500 + list(range(500))})
    cur = pd.DataFrame({"v": np.arange(500.0)})
    col = _drift(ref, cur, {"v": "numeric"}).columns[0]
    assert col.null_rate_change == pytest.approx(-0.5) and col.null_p_value == 1.0
    assert "null rate" not in col.reasons


def test_unseen_counts_stream_in_batches():
    rng = np.random.default_rng(5)
    ref = pd.DataFrame({"k": rng.integers(0, 10, 5000), "c": rng.choice(["a", "b"], 5000)})
    cur = pd.DataFrame({"k": rng.integers(0, 14, 4000), "c": rng.choice(["a", "b", "q"], 4000)})
    detector = DriftDetector().fit(ref, {"k": "numeric", "c": "categorical"})
    whole = detector.score(cur)
    batched = detector.score(cur.iloc[i:i + 500] for i in range(0, len(cur), 500))
    assert [c.unseen_share for c in whole.columns] == [c.unseen_share for c in batched.columns]
    assert whole.columns[0].unseen_share == pytest.approx((cur["k"] >= 10).mean())
    assert whole.columns[1].unseen_share == pytest.approx((cur["c"] == "q").mean())


def test_profiles_round_trip_with_value_bins_and_old_profiles_still_read():
    ref = pd.DataFrame({"k": [1, 2, 2, 3] * 10})
    profile = Profile.reference(ref, {"k": "numeric"})
    body = profile.to_dict()
    again = Profile.from_dict(body)
    assert again.columns["k"].value_bins
    assert again.columns["k"].edges.tolist() == profile.columns["k"].edges.tolist()
    stored = {key: v for key, v in body["columns"]["k"].items() if key != "value_bins"}
    old = {"format": 1, "columns": {"k": stored}}
    col = DriftDetector().fit_profile(Profile.from_dict(old)).score(pd.DataFrame({"k": [9] * 50})).columns[0]
    assert col.drifted and col.unseen_share == 1.0  # outside the old profile's range: still counted


def _three_features(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    rng = np.random.default_rng(seed)
    n = 4000
    ref = pd.DataFrame({"a": rng.normal(0, 1, n), "b": rng.normal(0, 1, n), "c": rng.normal(0, 1, n)})
    cur = pd.DataFrame({"a": rng.normal(0.6, 1, n), "b": rng.normal(0.6, 1, n), "c": rng.normal(0, 1, n)})
    return ref, cur, {"a": "numeric", "b": "numeric", "c": "numeric"}


def test_ignore_and_per_feature_thresholds_from_the_project_file_change_the_verdict():
    ref, cur, kinds = _three_features()
    plain = DriftDetector.from_spec(parse_spec(PROJECT).monitoring.drift).fit(ref, kinds).score(cur)
    assert plain.drifted == ["a", "b"] and plain.drifted_share == pytest.approx(2 / 3) and plain.dataset_drift
    effect_b = plain.columns[1].effect
    assert 0.15 < effect_b < 0.5

    spec = parse_spec(PROJECT | {"monitoring": {"drift": {"ignore": ["a"],
                                                          "features": {"b": {"min_effect": 0.5}}}}})
    report = DriftDetector.from_spec(spec.monitoring.drift).fit(ref, kinds).score(cur)
    a, b, c = report.columns
    assert a.ignored and a.drifted  # reported with its own verdict, not counted
    assert not b.ignored and not b.drifted and b.min_effect == 0.5 and b.effect == pytest.approx(effect_b)
    assert report.drifted == [] and report.counted == 2 and report.drifted_share == 0.0
    assert not report.dataset_drift
    body = report.to_dict()
    assert body["ignored"] == ["a"] and body["columns"][0]["ignored"] is True

    strict = parse_spec(PROJECT | {"monitoring": {"drift": {"features": {"c": {"p_value": 0.9999,
                                                                               "min_effect": 0.0}}}}})
    report = DriftDetector.from_spec(strict.monitoring.drift).fit(ref, kinds).score(cur)
    assert report.drifted == ["a", "b", "c"] and report.columns[2].p_value_threshold == 0.9999
    ignored_by_features = parse_spec(PROJECT | {"monitoring": {"drift": {"features": {"a": {"ignore": True},
                                                                                      "b": {"ignore": True}}}}})
    report = DriftDetector.from_spec(ignored_by_features.monitoring.drift).fit(ref, kinds).score(cur)
    assert report.drifted == [] and report.counted == 1 and not report.dataset_drift


def test_drift_settings_are_validated_and_unknown_names_listed():
    with pytest.raises(SpecError, match="monitoring.drift.features.a.threshold: unknown field 'threshold'; "
                       "expected one of: ignore, min_effect, p_value"):
        parse_spec(PROJECT | {"monitoring": {"drift": {"features": {"a": {"threshold": 0.1}}}}})
    with pytest.raises(SpecError, match="listed in 'ignore' but set 'ignore: false'"):
        parse_spec(PROJECT | {"monitoring": {"drift": {"ignore": ["a"], "features": {"a": {"ignore": False}}}}})
    with pytest.raises(SpecError, match="p_value"):
        parse_spec(PROJECT | {"monitoring": {"drift": {"features": {"a": {"p_value": 2}}}}})
    settings = {"ignore": ["a", "zz"], "features": {"yy": {}, "b": {}}}
    spec = parse_spec(PROJECT | {"monitoring": {"drift": settings}})
    assert unknown_settings(spec.monitoring.drift, ["a", "b", "c"]) == ["zz", "yy"]
    ref, cur, kinds = _three_features()
    report = DriftDetector.from_spec(spec.monitoring.drift).fit(ref, kinds).score(cur)
    assert [c.column for c in report.columns] == ["a", "b", "c"]  # unknown names are left out


def test_a_datetime_feature_later_than_training_is_reported_but_not_counted():
    rng = np.random.default_rng(6)
    train_times = pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(rng.uniform(0, 30, 3000), unit="D")
    live_times = pd.Timestamp("2024-02-01", tz="UTC") + pd.to_timedelta(rng.uniform(0, 7, 500), unit="D")
    ref = pd.DataFrame({"when": train_times, "x": rng.normal(size=3000)})
    cur = pd.DataFrame({"when": live_times, "x": rng.normal(size=500)})
    kinds = {"when": "datetime", "x": "numeric"}
    report = DriftDetector.from_spec(parse_spec(PROJECT).monitoring.drift).fit(ref, kinds).score(cur)
    when = report.columns[0]
    assert when.drifted and when.ignored and when.reasons == ["ks", "unseen values"] and when.effect == 1.0
    assert when.unseen_share == 1.0
    assert report.drifted == [] and report.counted == 1 and not report.dataset_drift

    counted = parse_spec(PROJECT | {"monitoring": {"drift": {"features": {"when": {"ignore": False}}}}})
    report = DriftDetector.from_spec(counted.monitoring.drift).fit(ref, kinds).score(cur)
    assert not report.columns[0].ignored and report.drifted == ["when"] and report.dataset_drift


def test_binned_ks_with_value_bins_is_exact_when_no_value_is_new():
    rng = np.random.default_rng(8)
    ref = pd.DataFrame({"k": rng.poisson(3, 20_000)})
    cur = pd.DataFrame({"k": np.minimum(rng.poisson(3.4, 20_000), ref["k"].max())})
    col = _drift(ref, cur, {"k": "numeric"}).columns[0]
    assert col.unseen_share == 0.0
    assert col.statistic == pytest.approx(stats.ks_2samp(ref["k"], cur["k"]).statistic, abs=1e-12)


def test_one_feature_of_many_all_new_values_is_dataset_drift_by_itself():
    """1 of 6 features drifted is under max_drifted_share 0.2, but a column whose every value is new
    must not read as healthy."""
    import numpy as np
    import pandas as pd

    from everloop.monitor import DriftDetector
    from everloop.spec import parse_spec

    rng = np.random.default_rng(3)
    reference = pd.DataFrame({f"x{i}": rng.normal(size=2000) for i in range(5)} | {"const": np.zeros(2000)})
    window = pd.DataFrame({f"x{i}": rng.normal(size=300) for i in range(5)} | {"const": np.ones(300)})
    kinds = {c: "numeric" for c in reference}
    spec = parse_spec({"name": "d", "data": {"source": "x.csv", "target": "y"}})
    report = DriftDetector.from_spec(spec.monitoring.drift).fit(reference, kinds).score(window)
    assert report.drifted == ["const"] and report.drifted_share == 1 / 6
    assert report.dataset_drift and report.severe == ["const"]
    quiet = parse_spec({"name": "d", "data": {"source": "x.csv", "target": "y"},
                        "monitoring": {"drift": {"severe_effect": None}}})
    assert not DriftDetector.from_spec(quiet.monitoring.drift).fit(reference, kinds).score(window).dataset_drift
    same = pd.DataFrame({f"x{i}": rng.normal(size=300) for i in range(5)} | {"const": np.zeros(300)})
    assert not DriftDetector.from_spec(spec.monitoring.drift).fit(reference, kinds).score(same).dataset_drift
