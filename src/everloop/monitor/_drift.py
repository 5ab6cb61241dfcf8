"""Data drift per column: a two-sample test for significance plus an effect size for relevance.

A p-value alone flags trivial differences once windows are large, and an effect size alone is
noisy on small windows; a column drifts only when both say so:
  numeric      Kolmogorov-Smirnov test; effect = the KS statistic (largest CDF gap, 0..1)
  categorical  chi-square test on the category counts; effect = total variation distance (0..1)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from everloop.features import MISSING_CATEGORY


@dataclass(frozen=True)
class ColumnDrift:
    column: str
    kind: str
    method: str
    statistic: float
    p_value: float
    effect: float
    drifted: bool


@dataclass(frozen=True)
class DriftReport:
    columns: list[ColumnDrift]
    drifted_share: float
    dataset_drift: bool
    reference_rows: int
    current_rows: int

    @property
    def drifted(self) -> list[str]:
        return [c.column for c in self.columns if c.drifted]

    def to_dict(self) -> dict[str, Any]:
        return {"columns": [asdict(c) for c in self.columns], "drifted": self.drifted,
                "drifted_share": self.drifted_share, "dataset_drift": self.dataset_drift,
                "reference_rows": self.reference_rows, "current_rows": self.current_rows}


class DriftDetector:
    """`DriftDetector(...).fit(reference, kinds).score(current)`; reference statistics are computed once in fit."""

    def __init__(self, p_value: float = 0.01, min_effect: float = 0.05, max_drifted_share: float = 0.2):
        self.p_value = p_value
        self.min_effect = min_effect
        self.max_drifted_share = max_drifted_share

    def fit(self, reference: pd.DataFrame, kinds: dict[str, str]) -> "DriftDetector":
        self.kinds_ = dict(kinds)
        self.rows_ = len(reference)
        self.numeric_ = {c: np.sort(_numeric(reference[c])) for c, k in kinds.items() if k in ("numeric", "datetime")}
        self.counts_ = {c: _categories(reference[c]).value_counts() for c, k in kinds.items() if k == "categorical"}
        return self

    def score(self, current: pd.DataFrame) -> DriftReport:
        results = []
        for column, kind in self.kinds_.items():
            if kind in ("numeric", "datetime"):
                results.append(self._numeric(column, _numeric(current[column])))
            else:
                results.append(self._categorical(column, _categories(current[column]).value_counts()))
        share = sum(r.drifted for r in results) / len(results) if results else 0.0
        return DriftReport(results, share, share > self.max_drifted_share, self.rows_, len(current))

    def _numeric(self, column: str, current: np.ndarray) -> ColumnDrift:
        reference = self.numeric_[column]
        if len(reference) == 0 or len(current) == 0:
            return ColumnDrift(column, "numeric", "ks", float("nan"), float("nan"), float("nan"), False)
        result = stats.ks_2samp(reference, current, method="asymp")
        effect = float(result.statistic)
        drifted = bool(result.pvalue < self.p_value and effect >= self.min_effect)
        return ColumnDrift(column, "numeric", "ks", effect, float(result.pvalue), effect, drifted)

    def _categorical(self, column: str, current: pd.Series) -> ColumnDrift:
        reference = self.counts_[column]
        levels = reference.index.union(current.index)
        ref = reference.reindex(levels, fill_value=0).to_numpy(dtype=float)
        cur = current.reindex(levels, fill_value=0).to_numpy(dtype=float)
        if ref.sum() == 0 or cur.sum() == 0:
            return ColumnDrift(column, "categorical", "chi2", float("nan"), float("nan"), float("nan"), False)
        effect = 0.5 * float(np.abs(ref / ref.sum() - cur / cur.sum()).sum())
        if len(levels) < 2:
            return ColumnDrift(column, "categorical", "chi2", 0.0, 1.0, effect, False)
        statistic, p_value, _, _ = stats.chi2_contingency(np.vstack([ref, cur]) + 0.5)  # +0.5: no empty cells
        drifted = bool(p_value < self.p_value and effect >= self.min_effect)
        return ColumnDrift(column, "categorical", "chi2", float(statistic), float(p_value), effect, drifted)


def _numeric(series: pd.Series) -> np.ndarray:
    if not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_datetime64_any_dtype(series):
        as_time = pd.to_datetime(series, errors="coerce", utc=True) if not pd.api.types.is_numeric_dtype(series) else None
        if as_time is not None and as_time.notna().any():  # date/time: seconds since the epoch
            return (as_time.dropna().astype("int64") / 1e9).to_numpy(dtype=float)
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)
    return values[np.isfinite(values)]


def _categories(series: pd.Series) -> pd.Series:
    values = series.astype(object)
    return values.where(values.notna(), MISSING_CATEGORY).map(str)
