"""Task metrics, computed the same way by training, the gate and the monitor."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from everloop.spec import LOWER_IS_BETTER

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
