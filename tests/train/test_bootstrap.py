"""Bootstrap distributions of metrics: the fast binary ROC AUC is sklearn's on every resample."""

import numpy as np
import pytest
from sklearn.metrics import mean_absolute_error, roc_auc_score

from everloop.train._metrics import _bootstrap_binary_auc, bootstrap_scores


def test_the_vectorised_auc_equals_sklearn_on_the_same_resamples_ties_included():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 700)
    score = np.round(y * 0.8 + rng.normal(size=700), 1)  # many ties
    fast = _bootstrap_binary_auc(y == 1, score, 30, np.random.default_rng(5))
    draw = np.random.default_rng(5)
    for value in fast:
        rows = draw.integers(0, 700, 700)
        assert value == pytest.approx(roc_auc_score(y[rows], score[rows]), abs=1e-12)


def test_bootstrap_spread_shrinks_with_rows_and_centres_on_the_metric():
    rng = np.random.default_rng(1)
    for metric in ("roc_auc", "mae"):
        widths = []
        for n in (100, 5000):
            y = rng.integers(0, 2, n)
            p = np.clip(0.3 * y + rng.uniform(0, 0.7, n), 0, 1)
            proba = np.column_stack([1 - p, p])
            if metric == "roc_auc":
                draws = bootstrap_scores(metric, y, (p > 0.5).astype(int), proba, [0, 1])
                point = roc_auc_score(y, p)
            else:
                draws = bootstrap_scores(metric, y.astype(float), p)
                point = mean_absolute_error(y, p)
            assert len(draws) == 200
            assert np.percentile(draws, 5) < point < np.percentile(draws, 95)
            widths.append(np.percentile(draws, 95) - np.percentile(draws, 5))
        assert widths[1] < widths[0] / 4
