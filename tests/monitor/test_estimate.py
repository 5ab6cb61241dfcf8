import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score

from everloop.errors import EverloopError
from everloop.monitor import Estimate, estimate_interval, estimate_metric
from everloop.monitor._estimate import draw_labels, realised_metric
from everloop.train._metrics import score


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


# --- estimate_interval: the spread of the metric these rows will show once labelled -------------------------

WEIGHTS = np.array([1.2, -0.8, 0.5])


def _world(rows: int, rng: np.random.Generator, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated binary scores (the true probabilities) and labels drawn from them; `spread` < 1 moves
    the rows toward the decision boundary, where the model is less sure (covariate shift)."""
    p = 1 / (1 + np.exp(-(rng.normal(size=(rows, 3)) * spread @ WEIGHTS - 0.3)))
    return np.column_stack([1 - p, p]), (rng.uniform(size=rows) < p).astype(int)


def _softmax_world(rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated 3-class probabilities and labels drawn from them."""
    logits = rng.normal(size=(rows, 2)) @ np.array([[1.5, -1.0, 0.0], [0.0, 1.0, -1.2]]) + [0.2, 0.0, -0.3]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return proba, (rng.uniform(size=rows)[:, None] > np.cumsum(proba, axis=1)[:, :-1]).sum(axis=1)


def _coverage(metric: str, world, simulations: int, rows: int) -> float:
    covered = 0
    for sim in range(simulations):
        proba, y = world(rows, np.random.default_rng(sim))
        truth = realised_metric(metric, proba, y[None])[0]  # equal to score(): see the test below
        estimate = estimate_interval(metric, proba, level=0.9, seed=100_000 + sim)  # a stream apart from y's
        covered += estimate.low <= truth <= estimate.high
    return covered / simulations


@pytest.mark.parametrize("metric", ["roc_auc", "accuracy", "f1"])
def test_the_interval_covers_the_realised_metric_at_its_level(metric):
    # 600 simulations: the binomial noise of the coverage is 0.012, so 0.85..0.95 is four of it either way
    assert 0.85 <= _coverage(metric, _world, simulations=600, rows=200) <= 0.95


@pytest.mark.parametrize("metric", ["roc_auc", "accuracy", "f1", "log_loss"])
def test_multiclass_interval_covers_the_realised_metric(metric):
    assert 0.85 <= _coverage(metric, _softmax_world, simulations=300, rows=300) <= 0.95


@pytest.mark.parametrize("classes", [2, 3, 4])
@pytest.mark.parametrize("metric", ["roc_auc", "accuracy", "f1", "log_loss", "calibration_error"])
def test_each_draw_is_scored_exactly_as_score_would(metric, classes):
    """The vectorised realised metrics (Mann-Whitney AUC, confusion matrices by bincount) equal
    train._metrics.score draw by draw, small windows with absent classes included."""
    rng = np.random.default_rng(classes)
    for rows in (6, 40):
        logits = rng.normal(size=(rows, classes)) * 2
        proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        labels = draw_labels(proba, 40, rng)
        got = realised_metric(metric, proba, labels)
        with warnings.catch_warnings():  # sklearn warns on labellings missing a class
            warnings.simplefilter("ignore")
            want = np.array([score(metric, y.astype(int), proba.argmax(axis=1), proba, list(range(classes)))
                             for y in labels])
        if metric == "f1" and classes == 2:  # nothing drawn or predicted positive: sklearn says 0, we abstain
            undefined = np.isnan(got)
            assert np.all(want[undefined] == 0)
            got, want = got[~undefined], want[~undefined]
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def churn_model():
    """A small gradient-boosted churn model, its isotonic calibration map fitted on held-out rows (as
    training does), its held-out metrics, and the probabilities it gives on further unseen rows."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.isotonic import IsotonicRegression
    from threadpoolctl import threadpool_limits

    from everloop.demo import make_churn

    frame = make_churn(6000, seed=0)
    x = frame.drop(columns=["customer_id", "event_time", "churned"])
    for column in x.columns:
        if not pd.api.types.is_numeric_dtype(x[column]):
            x[column] = x[column].astype("category")
    y = frame["churned"].to_numpy().astype(int)
    model = HistGradientBoostingClassifier(max_iter=60, categorical_features="from_dtype", random_state=0)
    with threadpool_limits(1):  # OpenMP threads on a busy machine cost seconds here, not save them
        model.fit(x[:3000], y[:3000])
    held_out = model.predict_proba(x[3000:4500])
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(held_out[:, 1], y[3000:4500] == 1)
    calibration = {"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}
    expected = {m: score(m, y[3000:4500], held_out.argmax(axis=1), held_out, [0, 1])
                for m in ("roc_auc", "accuracy", "f1")}
    return calibration, expected, model.predict_proba(x[4500:])


def test_ten_row_windows_of_unchanged_data_never_alarm(churn_model):
    """The issue: ten-row windows of the model's own kind of rows made the point estimate report decay.
    The interval is wide on ten rows, so it never excludes a 5% drop."""
    calibration, expected, proba = churn_model
    point_alarms = 0
    for metric in ("roc_auc", "accuracy", "f1"):
        threshold = expected[metric] - 0.05 * expected[metric]
        for seed in range(8):
            window = proba[np.random.default_rng(seed).choice(len(proba), 10, replace=False)]
            estimate = estimate_interval(metric, window, calibration, seed=seed)
            assert estimate.rows == 10 and estimate.low <= estimate.high
            assert not estimate.worse_than(threshold, metric), (metric, seed, estimate)
            point_alarms += estimate.value < threshold
    assert point_alarms >= 3  # the point estimate alone would have alarmed: the bug this fixes


def test_a_large_clearly_worse_window_does_alarm():
    """5000 rows moved toward the decision boundary: the realised AUC falls far below the expected one,
    and the interval, narrow on 5000 rows, lies wholly below the threshold; a 5000-row window of the
    unchanged world does not alarm."""
    rng = np.random.default_rng(7)
    reference, y_reference = _world(5000, rng)
    expected = score("roc_auc", y_reference, reference.argmax(axis=1), reference, [0, 1])
    threshold = expected - 0.05 * expected
    worse, y_worse = _world(5000, rng, spread=0.25)
    assert score("roc_auc", y_worse, worse.argmax(axis=1), worse, [0, 1]) < expected - 0.15
    estimate = estimate_interval("roc_auc", worse)
    assert estimate.high < threshold and estimate.worse_than(threshold, "roc_auc")
    same, _ = _world(5000, rng)
    assert not estimate_interval("roc_auc", same).worse_than(threshold, "roc_auc")


@pytest.mark.parametrize("metric", ["roc_auc", "accuracy", "f1", "log_loss"])
def test_the_interval_narrows_as_rows_grow(metric):
    rng = np.random.default_rng(3)
    small = estimate_interval(metric, _world(100, rng)[0])
    large = estimate_interval(metric, _world(10_000, rng)[0])
    # the spread of these metrics falls as 1/sqrt(rows): ten times narrower for 100 times the rows
    assert large.high - large.low < (small.high - small.low) / 5
    assert large.low <= large.value <= large.high


def test_windows_beyond_max_rows_are_subsampled_around_the_full_estimate():
    proba, _ = _world(50_000, np.random.default_rng(4))
    estimate = estimate_interval("roc_auc", proba, max_rows=5000)
    assert estimate.rows == 50_000
    assert estimate.value == pytest.approx(estimate_metric("roc_auc", proba))
    assert estimate.low < estimate.value < estimate.high
    assert estimate == estimate_interval("roc_auc", proba, max_rows=5000)  # same seed, same interval
    five_thousand = estimate_interval("roc_auc", proba[:5000])
    assert estimate.high - estimate.low == pytest.approx(five_thousand.high - five_thousand.low, rel=0.3)


def test_mostly_undefined_draws_give_no_bounds_and_no_verdict():
    """Two rows, both almost surely negative: nearly every labelling has one class and no ROC AUC."""
    estimate = estimate_interval("roc_auc", np.array([[0.99, 0.01], [0.98, 0.02]]))
    assert np.isnan(estimate.low) and np.isnan(estimate.high)
    assert not estimate.worse_than(0.99, "roc_auc")


def test_worse_than_needs_the_whole_interval_on_the_bad_side():
    auc = Estimate(value=0.70, low=0.62, high=0.78, rows=500)
    assert auc.worse_than(0.80, "roc_auc") and not auc.worse_than(0.75, "roc_auc")
    loss = Estimate(value=0.50, low=0.45, high=0.55, rows=500)
    assert loss.worse_than(0.40, "log_loss") and not loss.worse_than(0.50, "log_loss")
    assert not Estimate(0.5, float("nan"), float("nan"), 3).worse_than(0.99, "accuracy")


def test_predictions_stay_the_models_own_when_calibration_moves_them():
    """Raw score 0.6 is predicted positive; if the map says such rows are positive 30% of the time, the
    model is right 30% of the time (not 70%), and every draw scores that fixed prediction."""
    proba = np.column_stack([np.full(2000, 0.4), np.full(2000, 0.6)])
    calibration = {"x": [0.0, 1.0], "y": [0.3, 0.3]}
    estimate = estimate_interval("accuracy", proba, calibration)
    assert estimate.value == pytest.approx(0.3)
    assert estimate.low < 0.3 < estimate.high and estimate.high < 0.33


def test_multiclass_f1_is_estimated_as_a_macro_average():
    proba, y = _softmax_world(50_000, np.random.default_rng(5))
    truth = score("f1", y, proba.argmax(axis=1), proba, [0, 1, 2])
    assert estimate_metric("f1", proba) == pytest.approx(truth, abs=0.01)
    estimate = estimate_interval("f1", proba[:2000])
    assert estimate.low < estimate.value < estimate.high


def test_unestimable_metrics_and_bad_arguments():
    proba = np.array([[0.3, 0.7], [0.6, 0.4]])
    assert estimate_interval("rmse", proba) is None and estimate_interval("roc_auc", proba[:0]) is None
    with pytest.raises(EverloopError, match="level"):
        estimate_interval("accuracy", proba, level=1.5)


def test_an_over_confident_multiclass_model_is_calibrated_before_estimating():
    """One-vs-rest isotonic maps (as NannyML's CBPE): without them the estimate of an over-confident
    3-class model is far better than the loss its labels will show, with a tight interval."""
    from everloop.train import calibration_maps
    from everloop.train._metrics import score

    rng = np.random.default_rng(11)

    def rows(n):
        z = rng.normal(size=(n, 3)) * 1.2
        truth = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        proba = np.exp(2.5 * z) / np.exp(2.5 * z).sum(axis=1, keepdims=True)  # over-confident
        y = np.array([rng.choice(3, p=p) for p in truth])
        return proba, y

    held_proba, held_y = rows(3000)
    maps = calibration_maps(held_proba, held_y)
    assert len(maps["classes"]) == 3
    proba, y = rows(5000)
    for metric in ("log_loss", "accuracy"):
        realised = score(metric, y, proba.argmax(axis=1), proba, [0, 1, 2])
        calibrated = estimate_interval(metric, proba, maps)
        assert calibrated.low - 0.02 <= realised <= calibrated.high + 0.02, (metric, realised, calibrated)
        naive = estimate_interval(metric, proba)
        assert not naive.low <= realised <= naive.high  # the fault the maps fix
