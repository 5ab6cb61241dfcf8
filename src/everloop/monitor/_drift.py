"""Data drift per column, from profiles: a two-sample test for significance, an effect size for relevance.

A p-value alone flags trivial differences once windows are large, and an effect size alone is
noisy on small windows; so each signal below counts only when both say so (defaults: p < 0.01 and
effect >= 0.03). A column drifts when any of its signals does, and `ColumnDrift.reasons` says which:
  "ks" (numeric, date/time)  Kolmogorov-Smirnov on the binned distributions; effect = the KS statistic
                      (largest CDF gap, 0..1). Wasserstein distance (in reference standard deviations,
                      values outside the reference's range included) and PSI are reported beside it.
  "chi2" (categorical)  chi-square on the category counts; effect = total variation distance (0..1).
                      Jensen-Shannon distance and PSI are reported beside it.
  "unseen values" / "unseen categories"  the share of the window's present values the reference never
                      had (`unseen_share`), tested one-sided against what a sample from the reference's
                      own distribution would show (see `_unseen`); effect = that share.
  "null rate"         the window's null rate above the reference's (`null_rate_change`), Fisher's exact
                      test one-sided; effect = the rise.
So on a small window the tests decide and on a large one the effect sizes do, and a value never seen
in training is drift whatever the column's type: a KS on binned data cannot see it when it falls in a
bin of values that were seen, the unseen-values test always does.

Per-column settings: `per_column` thresholds, and `ignore`d columns (reported, with their own verdict,
but never counted in the dataset's drifted share). Date/time columns are ignored by default: raw
timestamps move forward with time by nature, so every window of live traffic lies after the training
rows and a KS on them flags every window; name one in `include` (`ignore: false` in the project file)
to count it anyway.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np
import pandas as pd
from scipy import stats
from scipy.spatial import distance

from everloop.data import ColumnProfile, Profile
from everloop.data._profile import MISSING_CATEGORY, OTHER

if TYPE_CHECKING:
    from everloop.spec._model import DriftSpec

# the signals named in ColumnDrift.reasons
KS, CHI2, NULL_RATE = "ks", "chi2", "null rate"
UNSEEN_VALUES, UNSEEN_CATEGORIES = "unseen values", "unseen categories"


@dataclass(frozen=True)
class ColumnDrift:
    """One column's drift. `p_value`/`effect` are the distribution test's (KS or chi-square); the
    unseen-values and null-rate signals have their own share, p-value and expected rate beside them.
    `drifted` is the column's own verdict, also for an `ignored` column (which the dataset verdict does
    not count); `reasons` lists the signals that made it drift."""

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
    unseen_share: float | None = None  # share of present window values the reference never had
    unseen_expected: float | None = None  # that share's expected value for a sample like the reference
    unseen_p_value: float | None = None
    null_rate_change: float | None = None  # window null rate minus the reference's
    null_p_value: float | None = None
    reasons: list[str] = field(default_factory=list)
    ignored: bool = False
    p_value_threshold: float | None = None  # the thresholds this column was judged with
    min_effect: float | None = None

    @property
    def severity(self) -> float:
        """The largest effect among the signals that made the column drift (0 when it did not)."""
        if not self.drifted:
            return 0.0
        effects = {"ks": self.effect, "chi2": self.effect, UNSEEN_VALUES: self.unseen_share,
                   UNSEEN_CATEGORIES: self.unseen_share, NULL_RATE: self.null_rate_change}
        return max((float(effects.get(r) or 0.0) for r in self.reasons), default=0.0)


@dataclass(frozen=True)
class DriftReport:
    """Every column's drift; the dataset's verdict counts only columns not ignored: `drifted_share` is
    the share of those `counted` columns that drifted, and `dataset_drift` is that share above the
    maximum. `drifted` names the counted columns that drifted."""

    columns: list[ColumnDrift]
    drifted_share: float
    dataset_drift: bool
    reference_rows: int
    current_rows: int
    severe: list[str] = field(default_factory=list)  # counted columns that drifted by severe_effect or more

    @property
    def drifted(self) -> list[str]:
        return [c.column for c in self.columns if c.drifted and not c.ignored]

    @property
    def counted(self) -> int:
        return sum(not c.ignored for c in self.columns)

    @property
    def ignored(self) -> list[str]:
        return [c.column for c in self.columns if c.ignored]

    def to_dict(self) -> dict[str, Any]:
        return {"columns": [asdict(c) for c in self.columns], "drifted": self.drifted,
                "drifted_share": self.drifted_share, "dataset_drift": self.dataset_drift,
                "counted": self.counted, "ignored": self.ignored, "severe": self.severe,
                "reference_rows": self.reference_rows, "current_rows": self.current_rows}


class DriftDetector:
    """`DriftDetector(...).fit(reference, kinds).score(current)`, or `DriftDetector.from_spec(drift_spec)`.

    `fit` profiles the reference once (or takes a stored `Profile` with `fit_profile`); `score` takes a
    frame, or an iterable of frames that is counted batch by batch in constant memory.

    `per_column` maps a column to its own (p_value, min_effect); `ignore` names columns reported but not
    counted in the dataset verdict; `include` names date/time columns to count (they are ignored by
    default: see the module docstring). Names that are not columns of the profile are left out."""

    def __init__(self, p_value: float = 0.01, min_effect: float = 0.03, max_drifted_share: float = 0.2, *,
                 per_column: Mapping[str, tuple[float, float]] | None = None, ignore: Iterable[str] = (),
                 include: Iterable[str] = (), severe_effect: float | None = None):
        self.p_value = p_value
        self.severe_effect = severe_effect
        self.min_effect = min_effect
        self.max_drifted_share = max_drifted_share
        self.per_column = dict(per_column or {})
        self.ignore = frozenset(ignore)
        self.include = frozenset(include)

    @classmethod
    def from_spec(cls, spec: "DriftSpec") -> "DriftDetector":
        """A detector with the project file's `monitoring.drift` settings (defaults, `ignore`, `features`)."""
        per_column = {name: (f.p_value if f.p_value is not None else spec.p_value,
                             f.min_effect if f.min_effect is not None else spec.min_effect)
                      for name, f in spec.features.items() if f.p_value is not None or f.min_effect is not None}
        ignore = set(spec.ignore) | {name for name, f in spec.features.items() if f.ignore}
        include = {name for name, f in spec.features.items() if f.ignore is False}
        return cls(spec.p_value, spec.min_effect, spec.max_drifted_share, per_column=per_column, ignore=ignore,
                   include=include, severe_effect=spec.severe_effect)

    def fit(self, reference: pd.DataFrame, kinds: dict[str, str]) -> "DriftDetector":
        return self.fit_profile(Profile.reference(reference, kinds))

    def fit_profile(self, profile: Profile) -> "DriftDetector":
        self.profile_ = profile
        return self

    def score(self, current: pd.DataFrame | Iterable[pd.DataFrame]) -> DriftReport:
        return self.score_profile(self.profile_.window(current))

    def score_profile(self, window: Profile) -> DriftReport:
        """Every reference column judged on the window's profile (made by the reference's `window`)."""
        results = [self._column(name, ref, window.columns[name]) for name, ref in self.profile_.columns.items()]
        counted = [r for r in results if not r.ignored]
        share = sum(r.drifted for r in counted) / len(counted) if counted else 0.0
        reference_rows = max((c.rows for c in self.profile_.columns.values()), default=0)
        current_rows = max((c.rows for c in window.columns.values()), default=0)
        # one feature moved this far (all its values new, a category a third of the rows) is drift however
        # many other features stayed put: a share rule alone calls it healthy with 6 features
        severe = ([r.column for r in counted if r.severity >= self.severe_effect]
                  if self.severe_effect is not None else [])
        return DriftReport(results, share, share > self.max_drifted_share or bool(severe), reference_rows,
                           current_rows, severe)

    def is_ignored(self, name: str, kind: str) -> bool:
        """Whether a column is left out of the dataset verdict: named in `ignore`, or date/time and not
        named in `include`."""
        return name in self.ignore or (kind == "datetime" and name not in self.include)

    def _column(self, name: str, ref: ColumnProfile, cur: ColumnProfile) -> ColumnDrift:
        p_value, min_effect = self.per_column.get(name, (self.p_value, self.min_effect))
        base = (self._categorical if ref.kind == "categorical" else self._numeric)(name, ref, cur, p_value,
                                                                                  min_effect)
        reasons = [base.method] if base.drifted else []
        unseen_share, unseen_expected, unseen_p = _unseen(ref, cur)
        if _significant(unseen_p, unseen_share, p_value, min_effect):
            reasons.append(UNSEEN_CATEGORIES if ref.kind == "categorical" else UNSEEN_VALUES)
        change, null_p = _null_rate(ref, cur)
        if _significant(null_p, change, p_value, min_effect):
            reasons.append(NULL_RATE)
        return ColumnDrift(
            name, base.kind, base.method, base.statistic, base.p_value, base.effect, bool(reasons),
            base.wasserstein, base.psi, base.jensen_shannon, unseen_share, unseen_expected, unseen_p, change,
            null_p, reasons, self.is_ignored(name, ref.kind), p_value, min_effect)

    def _numeric(self, name: str, ref: ColumnProfile, cur: ColumnProfile, p_threshold: float,
                 min_effect: float) -> ColumnDrift:
        n, m = int(ref.counts.sum()), int(cur.counts.sum())
        if not n or not m:
            return ColumnDrift(name, ref.kind, KS, float("nan"), float("nan"), float("nan"), False)
        cdf_ref, cdf_cur = np.cumsum(ref.counts) / n, np.cumsum(cur.counts) / m
        statistic = float(np.max(np.abs(cdf_ref - cdf_cur)))
        p_value = float(stats.kstwobign.sf(statistic * np.sqrt(n * m / (n + m))))
        gaps = np.abs(cdf_ref - cdf_cur)[:-1][1:-1] if len(ref.edges) > 1 else np.array([])
        widths = np.diff(ref.edges)
        scale = ref.std if ref.std and np.isfinite(ref.std) and ref.std > 0 else 1.0
        inside = float((gaps[: len(widths)] * widths[: len(gaps)]).sum()) if len(widths) else 0.0
        # outside the reference's range the CDF gap integrates to the values' mean distance from that range
        wasserstein = (inside + cur.outside / m) / scale
        drifted = _significant(p_value, statistic, p_threshold, min_effect)
        return ColumnDrift(name, ref.kind, KS, statistic, p_value, statistic, drifted, wasserstein,
                           _psi(_deciles(ref.counts), _deciles(cur.counts, like=ref.counts)))

    def _categorical(self, name: str, ref: ColumnProfile, cur: ColumnProfile, p_threshold: float,
                     min_effect: float) -> ColumnDrift:
        levels = sorted(set(ref.categories) | set(cur.categories))
        a = np.array([ref.categories.get(k, 0) for k in levels], dtype=float)
        b = np.array([cur.categories.get(k, 0) for k in levels], dtype=float)
        if not a.sum() or not b.sum():
            return ColumnDrift(name, "categorical", CHI2, float("nan"), float("nan"), float("nan"), False)
        pa, pb = a / a.sum(), b / b.sum()
        effect = 0.5 * float(np.abs(pa - pb).sum())
        js = float(_jensen_shannon(pa, pb))
        if len(levels) < 2:
            return ColumnDrift(name, "categorical", CHI2, 0.0, 1.0, effect, False, jensen_shannon=js)
        statistic, p_value, _, _ = stats.chi2_contingency(np.vstack([a, b]) + 0.5)  # +0.5: no empty cells
        drifted = _significant(float(p_value), effect, p_threshold, min_effect)
        return ColumnDrift(name, "categorical", CHI2, float(statistic), float(p_value), effect, drifted,
                           psi=_psi(a, b), jensen_shannon=js)


def unknown_settings(spec: "DriftSpec", feature_names: Iterable[str]) -> list[str]:
    """Names under `monitoring.drift.ignore` or `monitoring.drift.features` that are not among
    `feature_names` (in the order the project file gives them, each once): their settings have no effect,
    and the caller should say so."""
    known = set(feature_names)
    return list(dict.fromkeys(n for n in [*spec.ignore, *spec.features] if n not in known))


def _significant(p_value: float | None, effect: float | None, p_threshold: float, min_effect: float) -> bool:
    return (p_value is not None and effect is not None and bool(np.isfinite(p_value)) and p_value < p_threshold
            and effect >= min_effect)


def _unseen(ref: ColumnProfile, cur: ColumnProfile) -> tuple[float | None, float | None, float | None]:
    """(share of the window's present values the reference never had, that share's expected value for a
    sample from the reference's own distribution, one-sided p-value of the observed count).

    Under exchangeability (window and reference drawn from one distribution), the probability mass a
    reference of n values leaves unseen is a random U, and the window's unseen count K given U is
    Binomial(m, U); so K is beta-binomial and P(K >= k) is the exact p-value:
    - continuous data, unseen = outside the reference's [min, max]: U is the sum of two of the n + 1
      spacings of n uniforms, U ~ Beta(2, n - 1), E[U] = 2 / (n + 1) (order statistics, e.g. David &
      Nagaraja, "Order Statistics", 2003, sec. 2.5);
    - discrete values (one bin per value and most values repeated) and categories, unseen = not among
      the reference's values: the Good-Turing estimate of the unseen mass is N1 / n, N1 = values seen
      once (Good, 1953, "The population frequencies of species"), which is the leave-one-out share of
      reference rows whose value the other rows lack; U ~ Beta(N1 + 1, n - N1 + 1) is that share's
      posterior under a uniform prior, so discrete columns expect ~0 unseen values, and a column of
      mostly unique values (an id, or continuous data profiled one bin per value) expects almost all.
    None when the window has no present values or the reference too few to say anything."""
    if ref.kind == "categorical":
        seen = {k: v for k, v in ref.categories.items() if k != MISSING_CATEGORY}
        n = sum(seen.values())
        m = sum(v for k, v in cur.categories.items() if k != MISSING_CATEGORY)
        # categories lumped in OTHER are unknown by name: count them all as seen once (the cautious side)
        singletons = sum(v == 1 for k, v in seen.items() if k != OTHER) + seen.get(OTHER, 0)
        if cur.known is None:  # a window not counted in this reference's profile: compare the names
            k = sum(v for c, v in cur.categories.items() if c not in ref.categories and c != MISSING_CATEGORY)
        else:
            k = cur.unseen
        a, b = singletons + 1, n - singletons + 1
    else:
        n, m = int(ref.counts.sum()), int(cur.counts.sum())
        singletons = int((ref.counts[1:-1] == 1).sum()) if ref.value_bins else n
        if ref.value_bins and 2 * singletons <= n:  # discrete: values repeat, so a new value is news
            k, (a, b) = cur.unseen, (singletons + 1, n - singletons + 1)
        else:
            k, (a, b) = int(cur.counts[0] + cur.counts[-1]), (2, n - 1)
    if not m:
        return None, None, None
    share = k / m
    if n < 2 or b <= 0:  # one reference value (or none): its range is a point, nothing is expected
        return share, None, None
    return share, a / (a + b), float(stats.betabinom.sf(k - 1, m, a, b))


def _null_rate(ref: ColumnProfile, cur: ColumnProfile) -> tuple[float | None, float | None]:
    """(window null rate minus the reference's, one-sided p-value that it rose: Fisher's exact test on
    the 2x2 table of null / present rows, the exact two-proportion test, which stays valid on the small
    counts of short windows where the normal approximation does not). None for an empty side."""
    if not ref.rows or not cur.rows:
        return None, None
    change = cur.missing / cur.rows - ref.missing / ref.rows
    if change <= 0:
        return change, 1.0
    table = [[cur.missing, cur.rows - cur.missing], [ref.missing, ref.rows - ref.missing]]
    return change, float(stats.fisher_exact(table, alternative="greater").pvalue)


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
