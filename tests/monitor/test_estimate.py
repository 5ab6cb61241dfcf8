import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score

from everloop.monitor import estimate_metric


@pytest.fixture(scope="module")
def calibrated():
    """A well-specified logistic model: its probabilities are calibrated by construction."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60_000, 3))
    logit = x @ np.array([1.2, -0.8, 0.5]) - 0.3
    y = (rng.uniform(size=len(x)) < 1 / (1 + np.exp(-logit))).astype(int)
    model = LogisticRegression().fit(x[:20_000], y[:20_000])
    return model, x[20_000:], y[20_000:]


@pytest.mark.parametrize("metric", ["roc_auc", "accuracy"])
def test_cbpe_estimates_the_true_metric_without_labels(calibrated, metric):
    model, x, y = calibrated
    proba = model.predict_proba(x)
    truth = roc_auc_score(y, proba[:, 1]) if metric == "roc_auc" else accuracy_score(y, proba.argmax(axis=1))
    assert estimate_metric(metric, proba) == pytest.approx(truth, abs=0.01)


def test_the_estimate_follows_covariate_shift(calibrated):
    """When inputs move to where the model is less sure, the estimate drops as the true metric does."""
    model, x, y = calibrated
    rng = np.random.default_rng(1)
    shifted = x * 0.4  # closer to the boundary: harder rows
    logit = shifted @ np.array([1.2, -0.8, 0.5]) - 0.3
    y_shifted = (rng.uniform(size=len(x)) < 1 / (1 + np.exp(-logit))).astype(int)
    proba = model.predict_proba(shifted)
    truth = roc_auc_score(y_shifted, proba[:, 1])
    estimate = estimate_metric("roc_auc", proba)
    assert estimate == pytest.approx(truth, abs=0.015)
    assert estimate < estimate_metric("roc_auc", model.predict_proba(x)) - 0.05


def test_calibration_map_is_applied():
    proba = np.column_stack([np.full(1000, 0.1), np.full(1000, 0.9)])
    overconfident = {"x": [0.0, 1.0], "y": [0.3, 0.7]}  # the model says 0.9 where 0.66 happens
    assert estimate_metric("accuracy", proba) == pytest.approx(0.9)
    assert estimate_metric("accuracy", proba, overconfident) == pytest.approx(0.66)
