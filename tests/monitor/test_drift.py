import numpy as np
import pandas as pd
import pytest
from scipy import stats

from everloop.monitor import DriftDetector


def _frames(shift: float = 0.0, seed: int = 0, n: int = 4000):
    rng = np.random.default_rng(seed)
    ref = pd.DataFrame({"x": rng.normal(0, 1, n), "c": rng.choice(["a", "b", "c"], n, p=[0.5, 0.3, 0.2])})
    p = [0.5 - shift, 0.3, 0.2 + shift]
    cur = pd.DataFrame({"x": rng.normal(shift, 1, n), "c": rng.choice(["a", "b", "c"], n, p=p)})
    return ref, cur


def test_ks_matches_scipy():
    ref, cur = _frames(0.2)
    report = DriftDetector().fit(ref, {"x": "numeric", "c": "categorical"}).score(cur)
    x = report.columns[0]
    expected = stats.ks_2samp(ref["x"], cur["x"], method="asymp")
    assert x.statistic == pytest.approx(expected.statistic) and x.p_value == pytest.approx(expected.pvalue)


def test_chi_square_and_total_variation_match_scipy():
    ref, cur = _frames(0.1)
    report = DriftDetector().fit(ref, {"c": "categorical"}).score(cur)
    c = report.columns[0]
    table = np.vstack([ref["c"].value_counts().sort_index(), cur["c"].value_counts().sort_index()]) + 0.5
    statistic, p_value, _, _ = stats.chi2_contingency(table)
    assert c.statistic == pytest.approx(statistic) and c.p_value == pytest.approx(p_value)
    shares = [ref["c"].value_counts(normalize=True).sort_index(), cur["c"].value_counts(normalize=True).sort_index()]
    assert c.effect == pytest.approx(0.5 * np.abs(shares[0] - shares[1]).sum())


def test_same_distribution_is_not_drift_and_a_shift_is():
    kinds = {"x": "numeric", "c": "categorical"}
    for seed in range(5):
        ref, cur = _frames(0.0, seed)
        assert not DriftDetector().fit(ref, kinds).score(cur).drifted
    ref, cur = _frames(0.3)
    report = DriftDetector(max_drifted_share=0.2).fit(ref, kinds).score(cur)
    assert report.drifted == ["x", "c"] and report.dataset_drift and report.drifted_share == 1.0


def test_tiny_effect_on_huge_samples_is_not_flagged():
    rng = np.random.default_rng(1)
    ref = pd.DataFrame({"x": rng.normal(0, 1, 200_000)})
    cur = pd.DataFrame({"x": rng.normal(0.03, 1, 200_000)})  # significant, but trivially small
    column = DriftDetector().fit(ref, {"x": "numeric"}).score(cur).columns[0]
    assert column.p_value < 0.01 and not column.drifted


def test_unseen_categories_and_missing_values_count():
    ref = pd.DataFrame({"c": ["a"] * 500 + ["b"] * 500})
    cur = pd.DataFrame({"c": ["a"] * 300 + [None] * 300 + ["z"] * 400})
    column = DriftDetector().fit(ref, {"c": "categorical"}).score(cur).columns[0]
    assert column.drifted and column.effect == pytest.approx(0.7)
