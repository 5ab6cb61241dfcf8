"""Performance estimated without labels, from the model's own confidence (confidence-based
performance estimation, as NannyML's CBPE): if the probabilities are calibrated, a row predicted
0.8 is right four times in five, so expected confusion counts, and every metric built on them,
follow from the probabilities alone. Binary scores are first mapped through the isotonic
calibration fitted on the model's held-out rows at training; the estimate is only as good as that
calibration, and it cannot see a changed relationship between features and label (concept shift)
-- labelled performance remains the ground truth.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def estimate_metric(metric: str, proba: np.ndarray, calibration: dict[str, Any] | None = None) -> float | None:
    """The expected value of `metric` on rows with these class probabilities (rows x classes)."""
    if proba.ndim != 2 or not len(proba):
        return None
    if proba.shape[1] == 2 and calibration:
        positive = np.interp(proba[:, 1], calibration["x"], calibration["y"])
        proba = np.column_stack([1 - positive, positive])
    if metric == "accuracy":
        return float(proba.max(axis=1).mean())
    if metric == "log_loss":
        return float(-(proba * np.log(np.clip(proba, 1e-15, 1))).sum(axis=1).mean())
    if metric == "calibration_error":
        return 0.0  # calibrated by assumption
    if metric == "roc_auc":
        if proba.shape[1] == 2:
            return _expected_auc(proba[:, 1])
        weights = proba.mean(axis=0)
        return float(sum(w * _expected_auc(proba[:, k]) for k, w in enumerate(weights)) / weights.sum())
    if metric == "f1":
        if proba.shape[1] != 2:
            return None
        p = proba[:, 1]
        predicted = p >= 0.5
        tp, fp, fn = p[predicted].sum(), (1 - p[predicted]).sum(), p[~predicted].sum()
        return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else None
    return None  # regression metrics cannot be estimated from confidence


def _expected_auc(p: np.ndarray) -> float:
    """ROC AUC expected when each row is positive with probability p: the ROC curve from expected
    true and false positive counts at every threshold."""
    order = np.argsort(-p, kind="stable")
    p = p[order]
    tp = np.concatenate([[0.0], np.cumsum(p)])
    fp = np.concatenate([[0.0], np.cumsum(1 - p)])
    if tp[-1] <= 0 or fp[-1] <= 0:
        return float("nan")
    return float(np.trapezoid(tp / tp[-1], fp / fp[-1]))
