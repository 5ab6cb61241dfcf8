"""Task metrics, computed the same way by training, the gate and the monitor."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from everloop.spec import LOWER_IS_BETTER
from everloop.spec._model import parse_tolerance

CLASSIFICATION = ("roc_auc", "accuracy", "f1", "log_loss", "calibration_error")
REGRESSION = ("rmse", "mae", "r2")


def score(metric: str, y_true: np.ndarray, predicted: np.ndarray, proba: np.ndarray | None = None,
          classes: list | None = None) -> float:
    """One metric; NaN when it is undefined on these rows (e.g. ROC AUC with one class present)."""
    y_true = np.asarray(y_true)
    try:
        if metric == "rmse":
            return float(np.sqrt(skm.mean_squared_error(y_true, predicted)))
        if metric == "mae":
            return float(skm.mean_absolute_error(y_true, predicted))
        if metric == "r2":
            return float(skm.r2_score(y_true, predicted))
        if metric == "accuracy":
            return float(skm.accuracy_score(y_true, predicted))
        if metric == "f1":
            if classes is not None and len(classes) == 2:
                return float(skm.f1_score(y_true, predicted, pos_label=classes[1]))
            return float(skm.f1_score(y_true, predicted, average="macro"))
        if metric == "roc_auc":
            if len(np.unique(y_true)) < 2:
                return float("nan")
            if classes is not None and len(classes) == 2:
                return float(skm.roc_auc_score(y_true == classes[1], proba[:, 1]))
            return float(skm.roc_auc_score(y_true, proba, multi_class="ovr", average="weighted", labels=classes))
        if metric == "log_loss":
            return float(skm.log_loss(y_true, np.clip(proba, 1e-15, 1), labels=classes))
        if metric == "calibration_error":
            return calibration_error(y_true, proba, classes)
    except ValueError:
        return float("nan")
    raise ValueError(f"unknown metric {metric!r}")


def bootstrap_scores(metric: str, y_true: np.ndarray, predicted: np.ndarray, proba: np.ndarray | None = None,
                     classes: list | None = None, *, draws: int = 200, seed: int = 0,
                     max_rows: int = 20_000) -> np.ndarray:
    """`metric` on `draws` resamples (with replacement) of the rows: its sampling distribution, by
    Efron's bootstrap (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993). Arrays as for
    `score`, already in the model's label type; rows beyond `max_rows` are subsampled first (the spread
    then is that of `max_rows` rows: cautious). Returns the finite draws only, shape (<= draws,)."""
    y_true, predicted = np.asarray(y_true), np.asarray(predicted)
    rng = np.random.default_rng(seed)
    n = len(y_true)
    if n > max_rows:
        keep = rng.choice(n, max_rows, replace=False)
        y_true, predicted = y_true[keep], predicted[keep]
        proba = proba[keep] if proba is not None else None
        n = max_rows
    if metric == "roc_auc" and proba is not None and proba.shape[1] == 2 and classes is not None and n:
        auc = _bootstrap_binary_auc(y_true == classes[1], proba[:, 1], draws, rng)
        return auc[np.isfinite(auc)]
    out = np.empty(draws)
    for d in range(draws):
        rows = rng.integers(0, n, n)
        out[d] = score(metric, y_true[rows], predicted[rows], proba[rows] if proba is not None else None, classes)
    return out[np.isfinite(out)]


def _bootstrap_binary_auc(positive: np.ndarray, score: np.ndarray, draws: int,
                          rng: np.random.Generator) -> np.ndarray:
    """ROC AUC of `draws` bootstrap resamples at once, as the Mann-Whitney U statistic with each row
    weighted by how often the resample drew it (ties count one half): the scores are sorted once,
    so the cost is draws x rows additions, not `draws` calls to roc_auc_score. NaN for a resample
    with one class only."""
    n = len(score)
    order = np.argsort(score, kind="stable")
    sorted_score, positive = score[order], np.asarray(positive, dtype=bool)[order]
    weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(draws)])[:, order]
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])  # groups of tied scores
    pos = np.add.reduceat(weights * positive, starts, axis=1).astype(float)
    neg = np.add.reduceat(weights * ~positive, starts, axis=1).astype(float)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def calibration_error(y_true: np.ndarray, proba: np.ndarray, classes: list, bins: int = 10) -> float:
    """Expected calibration error of the top-label confidence: the gap between how sure the model
    is and how often it is right, averaged over equal-width confidence bins (0 is perfect)."""
    confidence = proba.max(axis=1)
    correct = np.asarray(classes, dtype=object)[proba.argmax(axis=1)] == np.asarray(y_true, dtype=object)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        members = which == b
        total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(total)


def all_metrics(task: str, y_true: np.ndarray, predicted: np.ndarray, proba: np.ndarray | None,
                classes: list | None) -> dict[str, float]:
    names = CLASSIFICATION if task == "classification" else REGRESSION
    return {m: score(m, y_true, predicted, proba, classes) for m in names}


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def improvement(metric: str, new: float, old: float) -> float:
    """How much better `new` is than `old`, positive when better, in the metric's own units."""
    return new - old if higher_is_better(metric) else old - new


def allowed_loss(tolerance: float | str, reference: float) -> float:
    """A tolerance (`promotion.max_regression`, `promotion.slice_tolerance`,
    `monitoring.performance.max_drop`) as an amount of the metric, in the metric's units: a number is
    that amount (absolute); a percentage string such as "5%" is that share of abs(`reference`) (the
    production model's value for the gate, the training value for decay), so it means the same for a
    ROC AUC near 0.8 and an MAE of 40 dollars. NaN when relative and `reference` is not finite.
    Raises ValueError for anything else."""
    amount, relative = _tolerance_parts(tolerance)
    return amount / 100 * abs(float(reference)) if relative else amount


def describe_tolerance(tolerance: float | str, reference: float, metric: str) -> str:
    """The allowed loss in words, with its units, for reasons and reports: "5% of 0.8123 = 0.0406 roc_auc"
    (relative) or "0.5 mae (absolute)". Raises ValueError for a malformed tolerance."""
    amount, relative = _tolerance_parts(tolerance)
    if not relative:
        return f"{format_number(amount)} {metric} (absolute)"
    return (f"{format_number(amount)}% of {format_number(reference)} = "
            f"{format_number(allowed_loss(tolerance, reference))} {metric}")


def format_number(value: float) -> str:
    """A metric value for people: at most 4 decimals, trailing zeros dropped (0.8123, 2, 0.0406)."""
    value = float(value)
    if not np.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e9):
        return f"{value:.3g}"
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _tolerance_parts(tolerance: float | str) -> tuple[float, bool]:
    """(amount, relative): 5.0, True for "5%"; 0.05, False for 0.05."""
    parsed = parse_tolerance(tolerance)  # the project file's own rule for what is valid
    if isinstance(parsed, str):
        return float(parsed.removesuffix("%")), True
    return parsed, False
