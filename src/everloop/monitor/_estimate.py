"""Performance estimated without labels, from the model's own confidence (confidence-based
performance estimation, as NannyML's CBPE): if the probabilities are calibrated, a row predicted
0.8 is right four times in five, so expected confusion counts, and every metric built on them,
follow from the probabilities alone. Binary scores are first mapped through the isotonic
calibration fitted on the model's held-out rows at training; the estimate is only as good as that
calibration, and it cannot see a changed relationship between features and label (concept shift)
-- labelled performance remains the ground truth.

The model's own predictions (the arg-max of its raw probabilities) and its raw scores are fixed;
the calibrated probabilities only say how likely each possible label is. On few rows the metric
these rows will show once labelled varies a lot around its expectation, so `estimate_interval`
also gives the spread of that realised metric, and an estimate alarms only when the whole
interval is worse than the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from everloop.errors import EverloopError
from everloop.spec import LOWER_IS_BETTER

ECE_BINS = 10  # as train._metrics.calibration_error
_EPS = 1e-15  # probability clip for log loss, as train._metrics.score


@dataclass(frozen=True)
class Estimate:
    """An estimated metric and the central interval of the value these rows will show once labelled.

    `value` is the CBPE point estimate; `low`/`high` bound the realised metric with probability
    `level` (NaN when the metric is undefined on most possible labellings, e.g. too few rows to
    hold both classes); `rows` is the number of rows the estimate describes. For calibration_error the
    point estimate (the miscalibration the calibration map implies) may lie below the interval: the
    realised ECE of finitely many labels is never 0.
    """

    value: float
    low: float
    high: float
    rows: int

    def worse_than(self, threshold: float, metric: str) -> bool:
        """True only when the whole interval is worse than `threshold`: for higher-is-better metrics
        `high < threshold`, for lower-is-better ones (`everloop.spec.LOWER_IS_BETTER`, e.g. log_loss)
        `low > threshold`. False when the bounds are NaN: no verdict without enough rows."""
        if metric in LOWER_IS_BETTER:
            return bool(np.isfinite(self.low) and self.low > threshold)
        return bool(np.isfinite(self.high) and self.high < threshold)


def estimate_metric(metric: str, proba: np.ndarray,
                    calibration: dict[str, Any] | None = None) -> float | None:
    """The expected value of `metric` on rows with these class probabilities (rows x classes), for the
    model's own predictions (arg-max of `proba`) once the rows' labels arrive.

    Binary probabilities go through the isotonic `calibration` map ({"x": [...], "y": [...]}) first.
    Returns None for a metric that cannot be estimated from confidence (regression metrics) or an empty
    or non-2-D `proba`; NaN when the metric is undefined in expectation (e.g. ROC AUC when every row is
    surely one class). Method: CBPE (NannyML, "Confidence-based Performance Estimation", docs:
    how_it_works/performance_estimation): expected confusion counts from calibrated probabilities;
    ROC AUC from the expected true/false positive curves.
    """
    if proba.ndim != 2 or not len(proba) or proba.shape[1] < 2:
        return None
    expected = _label_probabilities(proba, calibration)
    predicted = proba.argmax(axis=1)
    if metric == "accuracy":
        return float(expected[np.arange(len(proba)), predicted].mean())
    if metric == "log_loss":
        # cross-entropy of the model's own probabilities under the calibrated label distribution
        return float(-(expected * np.log(np.clip(proba, _EPS, 1))).sum(axis=1).mean())
    if metric == "calibration_error":
        # plug-in: the gap between the raw confidence and the calibrated chance of being right, per bin
        right = expected[np.arange(len(proba)), predicted]
        confidence = proba.max(axis=1)
        onehot = _bin_onehot(confidence)
        return float(np.abs((right - confidence) @ onehot).sum() / len(proba))
    if metric == "roc_auc":
        if proba.shape[1] == 2:
            return _expected_auc(proba[:, 1], expected[:, 1])
        weights = expected.mean(axis=0)
        aucs = [_expected_auc(proba[:, k], expected[:, k]) for k in range(proba.shape[1])]
        return float(sum(w * a for w, a in zip(weights, aucs)) / weights.sum())
    if metric == "f1":
        classes = proba.shape[1]
        # expected confusion matrix: [true class, predicted class]
        confusion = np.zeros((classes, classes))
        for k in range(classes):
            confusion[:, k] = expected[predicted == k].sum(axis=0)
        if classes == 2:
            tp, fp, fn = confusion[1, 1], confusion[0, 1], confusion[1, 0]
            return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else None
        per_class, present = _f1_per_class(confusion[None])
        return float(per_class[0].sum() / present[0].sum())  # macro, as score(): classes seen or predicted
    return None  # regression metrics cannot be estimated from confidence


def estimate_interval(metric: str, proba: np.ndarray, calibration: dict[str, Any] | None = None, *,
                      level: float = 0.9, draws: int = 200, seed: int = 0,
                      max_rows: int = 20_000) -> Estimate | None:
    """The CBPE estimate of `metric` on rows with these class probabilities (rows x classes) and the
    central `level` interval of the metric these rows will show once their labels arrive.

    Method: a parametric bootstrap of the realised metric. Labels are drawn `draws` times from the
    calibrated probabilities (Bernoulli for binary, categorical for multiclass); each draw scores the
    model's fixed predictions and raw scores exactly as `everloop.train._metrics.score` would; the
    bounds are order statistics of the draws that cover one more draw with probability >= `level`.
    Draws where the metric is undefined (e.g. one class drawn, for ROC AUC) are left out; when half or
    more are, the bounds are NaN. Bounds are clipped to the metric's range. This is the sampling error NannyML
    reports around CBPE estimates (NannyML docs, "Estimation of Standard Error" / "sampling error",
    how_it_works/estimation_of_standard_error), here computed from the estimated label distribution
    itself rather than from reference-data chunks. Vectorised: binary ROC AUC from the ranks of each
    draw's positives (Mann-Whitney U), other metrics as matrix products.

    Windows beyond `max_rows` rows are subsampled (with `seed`) for the draws and the interval is moved
    to the full window's point estimate; it stays as wide as for `max_rows` rows, i.e. conservative.
    Returns None where `estimate_metric` does (regression metric, empty or non-2-D `proba`). Raises
    EverloopError for a `level` outside (0, 1), `draws` < 1 or `max_rows` < 2.
    """
    if not 0 < level < 1:
        raise EverloopError(f"estimate_interval: level={level} must be between 0 and 1 (e.g. 0.9)")
    if draws < 1 or max_rows < 2:
        raise EverloopError(f"estimate_interval: draws={draws} must be >= 1 and max_rows={max_rows} >= 2")
    value = estimate_metric(metric, proba, calibration)
    if value is None:
        return None
    rows = len(proba)
    rng = np.random.default_rng(seed)
    shift = 0.0
    if rows > max_rows:
        proba = proba[rng.choice(rows, max_rows, replace=False)]
        sub_value = estimate_metric(metric, proba, calibration)
        shift = value - sub_value if sub_value is not None and np.isfinite(value - sub_value) else 0.0
    labels = draw_labels(_label_probabilities(proba, calibration), draws, rng)
    realised = realised_metric(metric, proba, labels)
    realised = realised[np.isfinite(realised)]
    if 2 * len(realised) <= draws:
        return Estimate(value, float("nan"), float("nan"), rows)
    # the realised metric is one more draw from the same distribution: the k-th smallest of m draws
    # bounds it from below with probability k/(m+1), so these order statistics cover it with
    # probability >= level (the nonparametric prediction interval, Wilks 1941); plain quantiles of
    # 200 draws would fall short of `level`
    realised.sort()
    m = len(realised)
    lower = max(int(np.floor((m + 1) * (1 - level) / 2)), 1)
    upper = min(int(np.ceil((m + 1) * (1 + level) / 2)), m)
    low, high = realised[lower - 1] + shift, realised[upper - 1] + shift
    top = np.inf if metric == "log_loss" else 1.0
    return Estimate(value, float(np.clip(low, 0.0, top)), float(np.clip(high, 0.0, top)), rows)


def draw_labels(expected: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """`draws` labellings of the rows, each row's class drawn from its row of `expected` (rows x classes,
    calibrated probabilities): an integer array (draws x rows) of class indices."""
    uniform = rng.random((draws, len(expected)))
    if expected.shape[1] == 2:
        return (uniform < expected[:, 1]).view(np.uint8)
    cumulative = np.cumsum(expected, axis=1)
    labels = np.zeros(uniform.shape, dtype=np.intp)
    for k in range(expected.shape[1] - 1):  # class = how many cumulative bounds the uniform passes
        labels += uniform >= cumulative[:, k]
    return labels


def realised_metric(metric: str, proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The metric of the model's predictions (arg-max of `proba`, rows x classes) and scores against
    each labelling in `labels` (draws x rows of class indices): shape (draws,), NaN where undefined.
    Equal, draw by draw, to `everloop.train._metrics.score` with those labels."""
    rows, classes = proba.shape
    predicted = proba.argmax(axis=1)
    if metric == "calibration_error":
        confidence = proba.max(axis=1)
        onehot = _bin_onehot(confidence)
        correct = (labels == predicted).astype(np.float64)
        return np.abs(correct @ onehot - confidence @ onehot).sum(axis=1) / rows
    if metric == "log_loss":
        losses = -np.log(np.clip(proba, _EPS, 1))
        if classes == 2:
            return (labels.astype(np.float64) @ (losses[:, 1] - losses[:, 0]) + losses[:, 0].sum()) / rows
        return losses[np.arange(rows), labels].mean(axis=1)
    if classes == 2:
        return _realised_binary(metric, proba, labels.astype(np.float64))
    if metric == "roc_auc":
        total, present = np.zeros(len(labels)), np.zeros(len(labels))
        for k in range(classes):
            auc, count = _mann_whitney_auc(proba[:, k], (labels == k).astype(np.float64))
            # weighted one-vs-rest: an absent class weighs nothing (sklearn >= 1.6 warns and skips it)
            total += np.where(count > 0, count * np.nan_to_num(auc), 0.0)
            present += count > 0
        return np.where(present >= 2, total / rows, np.nan)  # one class drawn: undefined, as score()
    # confusion matrices of every draw in one bincount: [draw, true class, predicted class]
    index = (np.arange(len(labels))[:, None] * classes + labels) * classes + predicted
    confusion = np.bincount(index.ravel(), minlength=len(labels) * classes * classes)
    confusion = confusion.reshape(len(labels), classes, classes)
    if metric == "accuracy":
        return np.trace(confusion, axis1=1, axis2=2) / rows
    if metric == "f1":
        per_class, present = _f1_per_class(confusion)
        return per_class.sum(axis=1) / present.sum(axis=1)
    raise EverloopError(f"realised_metric: {metric!r} is not a classification metric; "
                        "expected roc_auc, accuracy, f1, log_loss or calibration_error")


def _realised_binary(metric: str, proba: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Binary metrics for every draw; `positive` is draws x rows of 0.0/1.0 (class 1 drawn)."""
    rows = len(proba)
    if metric == "roc_auc":
        return _mann_whitney_auc(proba[:, 1], positive)[0]
    predicted = (proba.argmax(axis=1) == 1).astype(np.float64)
    tp = positive @ predicted
    drawn, flagged = positive.sum(axis=1), predicted.sum()
    fp, fn = flagged - tp, drawn - tp
    if metric == "accuracy":
        return (rows - fp - fn) / rows
    if metric == "f1":
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    raise EverloopError(f"realised_metric: {metric!r} is not a classification metric; "
                        "expected roc_auc, accuracy, f1, log_loss or calibration_error")


def _mann_whitney_auc(score: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC of one fixed score against every draw's positives (draws x rows of 0.0/1.0), from the
    rank sum of the positives (Mann-Whitney U / (n1 n0); average ranks make ties count one half, as
    sklearn's roc_auc_score): (AUC per draw, NaN with one class; positives per draw)."""
    ranks = rankdata(score)  # once for every draw
    n1 = positive.sum(axis=1)
    n0 = len(score) - n1
    u = positive @ ranks - n1 * (n1 + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n1 > 0) & (n0 > 0), u / (n1 * n0), np.nan), n1


def _f1_per_class(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class F1 of confusion matrices (draws x true x predicted), zero for classes neither seen
    nor predicted, and which classes are present (sklearn's macro average covers only those)."""
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    seen_plus_predicted = confusion.sum(axis=2) + confusion.sum(axis=1)
    present = seen_plus_predicted > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present, 2 * tp / seen_plus_predicted, 0.0), present


def _bin_onehot(confidence: np.ndarray) -> np.ndarray:
    """Rows x ECE_BINS indicator of each row's equal-width confidence bin (as calibration_error)."""
    which = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
    return (which[:, None] == np.arange(ECE_BINS)).astype(np.float64)


def _label_probabilities(proba: np.ndarray, calibration: dict[str, Any] | None) -> np.ndarray:
    """Each row's chance of each label: binary scores through the isotonic calibration map, multiclass
    probabilities through one map per class (one-vs-rest, then renormalised per row, as NannyML's CBPE
    calibrates multiclass models), if the model has them."""
    if not calibration:
        return proba
    if proba.shape[1] == 2 and "x" in calibration:
        positive = np.interp(proba[:, 1], calibration["x"], calibration["y"])
        return np.column_stack([1 - positive, positive])
    maps = calibration.get("classes")
    if maps and len(maps) == proba.shape[1]:
        mapped = np.column_stack([np.interp(proba[:, k], m["x"], m["y"]) for k, m in enumerate(maps)])
        totals = mapped.sum(axis=1, keepdims=True)
        # a row every map sends to 0 keeps its own probabilities rather than a division by zero
        return np.where(totals > 0, mapped / np.where(totals > 0, totals, 1), proba)
    return proba


def _expected_auc(score: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC expected when rows ranked by `score` are each positive with probability p: the ROC curve
    from expected true and false positive counts at every threshold."""
    order = np.argsort(-score, kind="stable")
    p = p[order]
    tp = np.concatenate([[0.0], np.cumsum(p)])
    fp = np.concatenate([[0.0], np.cumsum(1 - p)])
    if tp[-1] <= 0 or fp[-1] <= 0:
        return float("nan")
    return float(np.trapezoid(tp / tp[-1], fp / fp[-1]))
