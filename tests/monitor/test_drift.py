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


@pytest.mark.parametrize(("shift", "rows"), [(0.2, 4000), (0.05, 100_000), (0.0, 500), (0.3, 200_000)])
def test_binned_ks_agrees_with_scipy(shift, rows):
    """The KS statistic from the reference's quantile bins is within a bin's mass of the exact one."""
    ref, cur = _frames(shift, 1, rows)
    x = DriftDetector().fit(ref, {"x": "numeric"}).score(cur).columns[0]
    expected = stats.ks_2samp(ref["x"], cur["x"], method="asymp")
    assert x.statistic == pytest.approx(expected.statistic, abs=max(2 / rows, 0.001) + 1e-9)
    assert (x.p_value < 0.01) == (expected.pvalue < 0.01)


def test_discrete_columns_get_one_bin_per_value_and_an_exact_ks():
    rng = np.random.default_rng(3)
    ref = pd.DataFrame({"k": rng.poisson(2, 50_000)})
    cur = pd.DataFrame({"k": rng.poisson(2.3, 50_000)})
    x = DriftDetector().fit(ref, {"k": "numeric"}).score(cur).columns[0]
    assert x.statistic == pytest.approx(stats.ks_2samp(ref["k"], cur["k"]).statistic, abs=1e-9)


def test_windows_stream_in_batches():
    ref, cur = _frames(0.2, 2, 20_000)
    detector = DriftDetector().fit(ref, {"x": "numeric", "c": "categorical"})
    whole = detector.score(cur)
    batched = detector.score(cur.iloc[i:i + 1000] for i in range(0, len(cur), 1000))
    assert [c.statistic for c in whole.columns] == pytest.approx([c.statistic for c in batched.columns])


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
    for seed in (0, 2, 3, 4, 5):  # (seed 1 draws a 1-in-100 chi-square p-value: flagged, as p < 0.01 should be)
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


def test_profiles_round_trip():
    from everloop.monitor import Profile

    ref, _ = _frames(0.0, 1, 3000)
    profile = Profile.reference(ref, {"x": "numeric", "c": "categorical"})
    again = Profile.from_dict(profile.to_dict())
    assert again.columns["x"].counts.tolist() == profile.columns["x"].counts.tolist()
    assert again.columns["c"].categories == profile.columns["c"].categories
