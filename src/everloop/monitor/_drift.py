"""Data drift per column, from profiles: a two-sample test for significance, an effect size for relevance.

A p-value alone flags trivial differences once windows are large, and an effect size alone is
noisy on small windows; a column drifts only when both say so (defaults: p < 0.01 and effect >= 0.03):
  numeric, date/time  Kolmogorov-Smirnov on the binned distributions; effect = the KS statistic
                      (largest CDF gap, 0..1). Wasserstein distance (in reference standard deviations)
                      and PSI are reported beside it.
  categorical         chi-square on the category counts; effect = total variation distance (0..1).
                      Jensen-Shannon distance and PSI are reported beside it.
So on a small window the test decides and on a large one the effect size does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd
from scipy import stats
from scipy.spatial import distance

from everloop.data import ColumnProfile, Profile


@dataclass(frozen=True)
class ColumnDrift:
    column: str
    kind: str
    method: str
    statistic: float
    p_value: float
    effect: float
    drifted: bool
    wasserstein: float | None = None  # numeric: in reference standard deviations
    psi: float | None = None
    jensen_shannon: float | None = None  # categorical


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
    """`DriftDetector(...).fit(reference, kinds).score(current)`.

    `fit` profiles the reference once (or takes a stored `Profile` with `fit_profile`); `score` takes a
    frame, or an iterable of frames that is counted batch by batch in constant memory."""

    def __init__(self, p_value: float = 0.01, min_effect: float = 0.03, max_drifted_share: float = 0.2):
        self.p_value = p_value
        self.min_effect = min_effect
        self.max_drifted_share = max_drifted_share

    def fit(self, reference: pd.DataFrame, kinds: dict[str, str]) -> "DriftDetector":
        return self.fit_profile(Profile.reference(reference, kinds))

    def fit_profile(self, profile: Profile) -> "DriftDetector":
        self.profile_ = profile
        return self

    def score(self, current: pd.DataFrame | Iterable[pd.DataFrame]) -> DriftReport:
        return self.score_profile(self.profile_.window(current))

    def score_profile(self, window: Profile) -> DriftReport:
        results = [self._column(name, ref, window.columns[name]) for name, ref in self.profile_.columns.items()]
        share = sum(r.drifted for r in results) / len(results) if results else 0.0
        reference_rows = max((c.rows for c in self.profile_.columns.values()), default=0)
        current_rows = max((c.rows for c in window.columns.values()), default=0)
        return DriftReport(results, share, share > self.max_drifted_share, reference_rows, current_rows)

    def _column(self, name: str, ref: ColumnProfile, cur: ColumnProfile) -> ColumnDrift:
        if ref.kind == "categorical":
            return self._categorical(name, ref, cur)
        return self._numeric(name, ref, cur)

    def _numeric(self, name: str, ref: ColumnProfile, cur: ColumnProfile) -> ColumnDrift:
        n, m = int(ref.counts.sum()), int(cur.counts.sum())
        if not n or not m:
            return ColumnDrift(name, ref.kind, "ks", float("nan"), float("nan"), float("nan"), False)
        cdf_ref, cdf_cur = np.cumsum(ref.counts) / n, np.cumsum(cur.counts) / m
        statistic = float(np.max(np.abs(cdf_ref - cdf_cur)))
        p_value = float(stats.kstwobign.sf(statistic * np.sqrt(n * m / (n + m))))
        gaps = np.abs(cdf_ref - cdf_cur)[:-1][1:-1] if len(ref.edges) > 1 else np.array([])
        widths = np.diff(ref.edges)
        scale = ref.std if ref.std and np.isfinite(ref.std) and ref.std > 0 else 1.0
        wasserstein = float((gaps[: len(widths)] * widths[: len(gaps)]).sum() / scale) if len(widths) else 0.0
        drifted = bool(p_value < self.p_value and statistic >= self.min_effect)
        return ColumnDrift(name, ref.kind, "ks", statistic, p_value, statistic, drifted, wasserstein,
                           _psi(_deciles(ref.counts), _deciles(cur.counts, like=ref.counts)))

    def _categorical(self, name: str, ref: ColumnProfile, cur: ColumnProfile) -> ColumnDrift:
        levels = sorted(set(ref.categories) | set(cur.categories))
        a = np.array([ref.categories.get(k, 0) for k in levels], dtype=float)
        b = np.array([cur.categories.get(k, 0) for k in levels], dtype=float)
        if not a.sum() or not b.sum():
            return ColumnDrift(name, "categorical", "chi2", float("nan"), float("nan"), float("nan"), False)
        pa, pb = a / a.sum(), b / b.sum()
        effect = 0.5 * float(np.abs(pa - pb).sum())
        js = float(_jensen_shannon(pa, pb))
        if len(levels) < 2:
            return ColumnDrift(name, "categorical", "chi2", 0.0, 1.0, effect, False, jensen_shannon=js)
        statistic, p_value, _, _ = stats.chi2_contingency(np.vstack([a, b]) + 0.5)  # +0.5: no empty cells
        drifted = bool(p_value < self.p_value and effect >= self.min_effect)
        return ColumnDrift(name, "categorical", "chi2", float(statistic), float(p_value), effect, drifted,
                           psi=_psi(a, b), jensen_shannon=js)


def _deciles(counts: np.ndarray, like: np.ndarray | None = None) -> np.ndarray:
    """Counts regrouped into about ten groups of equal reference mass (those of `like`, if given)."""
    basis = like if like is not None else counts
    cuts = np.searchsorted(np.cumsum(basis) / max(basis.sum(), 1), np.linspace(0.1, 0.9, 9), side="right")
    return np.add.reduceat(counts, np.unique(np.concatenate([[0], cuts]))[: len(counts)])


def _psi(expected: np.ndarray, actual: np.ndarray) -> float:
    e = np.clip(expected / max(expected.sum(), 1), 1e-6, None)
    a = np.clip(actual / max(actual.sum(), 1), 1e-6, None)
    return float(((a - e) * np.log(a / e)).sum())


def _jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance, natural logarithm (as scipy and Evidently report it)."""
    return float(distance.jensenshannon(p, q))
