"""Column profiles: the statistics drift is computed from, built once for the reference and merged
batch by batch for a window, so a window of any size streams in constant memory.

Numeric (and date/time) columns keep counts in bins whose edges are the reference's quantiles (up
to 1000, fewer for discrete data: then one bin per value, which makes the binned KS statistic exact);
categorical columns keep counts per category. Both sides are counted in the same bins, so KS,
Wasserstein, PSI, chi-square, total variation and Jensen-Shannon all come from counts.

Every window value the reference never had is counted, never folded into a neighbouring bin: values
below the reference's minimum or above its maximum land in the first and last count; with one bin per
value, the last bin holds the last value only, and values between the reference's values are counted
in `unseen`; categories the reference never had are counted in `unseen` too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pandas as pd

from everloop.data._stats import epoch_seconds

BINS = 1000
MISSING_CATEGORY = "__missing__"  # missing categorical values, as one category (the features use it too)
MAX_CATEGORIES = 1000
OTHER = "__other__"


@dataclass
class ColumnProfile:
    kind: str  # numeric, categorical, datetime
    edges: np.ndarray | None = None  # numeric: bin edges (reference quantiles)
    counts: np.ndarray | None = None  # numeric: [below edges[0], bins between edges..., above edges[-1]]
    categories: dict[str, int] = field(default_factory=dict)  # categorical
    rows: int = 0
    missing: int = 0
    total: float = 0.0  # numeric sums, for the mean and standard deviation
    total_sq: float = 0.0
    value_bins: bool = False  # numeric: one bin per reference value (edges[:-1] are those values)
    unseen: int = 0  # window: present values the reference never had (see `update`)
    outside: float = 0.0  # window, numeric: summed distance of values outside the reference's range
    known: frozenset[str] | None = None  # window, categorical: the reference's categories (not stored)

    @property
    def present(self) -> int:
        return self.rows - self.missing

    @property
    def mean(self) -> float:
        return self.total / self.present if self.present else float("nan")

    @property
    def std(self) -> float:
        if self.present < 2:
            return float("nan")
        return float(np.sqrt(max(self.total_sq / self.present - self.mean**2, 0.0)))

    @property
    def values(self) -> np.ndarray | None:
        """Numeric profiles with one bin per value: the reference's distinct values; otherwise None."""
        return self.edges[:-1] if self.value_bins and self.edges is not None else None

    def empty_like(self) -> "ColumnProfile":
        """A profile with this one's bins and no rows (for a window to be counted in)."""
        counts = np.zeros_like(self.counts) if self.counts is not None else None
        known = frozenset(self.categories) if self.kind == "categorical" else None
        return ColumnProfile(self.kind, self.edges, counts, value_bins=self.value_bins, known=known)

    def update(self, series: pd.Series) -> None:
        """Count a batch of values. In a window (a profile made by `empty_like`) `unseen` counts the present
        values the reference never had: categories not among its categories; with one bin per value, values
        not among its values; otherwise values outside its [min, max]."""
        self.rows += len(series)
        if self.kind == "categorical":
            if isinstance(series.dtype, (pd.StringDtype, pd.ArrowDtype)):  # text already: count in Arrow
                missing = int(series.isna().sum())
                counts = series.value_counts(dropna=True)
                items = list(counts.items()) + ([(MISSING_CATEGORY, missing)] if missing else [])
            else:
                values = series.astype(object)
                counts = values.where(values.notna(), MISSING_CATEGORY).map(str).value_counts()
                missing = int(counts.get(MISSING_CATEGORY, 0))
                items = list(counts.items())
            self.missing += missing
            known = self.known
            for key, n in items:
                key = str(key)
                if known is not None and key not in known and key != MISSING_CATEGORY:
                    self.unseen += int(n)
                # the reference's categories are always counted by name, so a window never lumps them in OTHER
                named = key in self.categories or (known is not None and key in known)
                if named or len(self.categories) < MAX_CATEGORIES:
                    self.categories[key] = self.categories.get(key, 0) + int(n)
                else:
                    self.categories[OTHER] = self.categories.get(OTHER, 0) + int(n)
            return
        values = numbers(series)
        finite = values[np.isfinite(values)]
        self.missing += len(values) - len(finite)
        with np.errstate(over="ignore"):  # 1e308 squared is inf: the variance is then inf, as it is
            self.total += float(finite.sum())
            self.total_sq += float(np.square(finite).sum())
        if len(finite):
            counts = _bin_counts(finite, self.edges)
            self.counts += counts
            if len(self.edges) > 1:
                low, high = self.edges[0], self.edges[-1]
                self.outside += float((low - finite[finite < low]).sum() + (finite[finite > high] - high).sum())
            if self.value_bins:
                reference = self.edges[:-1]
                at = np.minimum(np.searchsorted(reference, finite), len(reference) - 1)
                self.unseen += int((reference[at] != finite).sum())
            else:
                self.unseen += int(counts[0] + counts[-1])

    def merge(self, other: "ColumnProfile") -> None:
        self.rows += other.rows
        self.missing += other.missing
        self.total += other.total
        self.total_sq += other.total_sq
        self.unseen += other.unseen
        self.outside += other.outside
        if self.counts is not None:
            self.counts += other.counts
        for key, n in other.categories.items():
            self.categories[key] = self.categories.get(key, 0) + n

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "rows": self.rows, "missing": self.missing, "total": self.total,
                               "total_sq": self.total_sq}
        if self.unseen or self.outside:
            out |= {"unseen": self.unseen, "outside": self.outside}
        if self.edges is not None:
            out |= {"edges": self.edges.tolist(), "counts": self.counts.tolist(), "value_bins": self.value_bins}
        else:
            out["categories"] = self.categories
        return out

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "ColumnProfile":
        edges = np.asarray(body["edges"], dtype=float) if "edges" in body else None
        counts = np.asarray(body["counts"], dtype=np.int64) if "counts" in body else None
        # profiles stored before `value_bins` existed read as quantile bins: their unseen values are then
        # those outside the range (their last value bin also held values up to one past the last value)
        return cls(body["kind"], edges, counts, dict(body.get("categories", {})), body["rows"], body["missing"],
                   body.get("total", 0.0), body.get("total_sq", 0.0), bool(body.get("value_bins", False)),
                   int(body.get("unseen", 0)), float(body.get("outside", 0.0)))


@dataclass
class Profile:
    columns: dict[str, ColumnProfile]

    @classmethod
    def reference(cls, frame: pd.DataFrame, kinds: dict[str, str], bins: int = BINS) -> "Profile":
        """The reference's profile: bins from its quantiles, then its own counts in them."""
        columns = {}
        for name, kind in kinds.items():
            if kind == "categorical":
                profile = ColumnProfile("categorical")
            else:
                values = numbers(frame[name])
                edges, value_bins = _edges(values[np.isfinite(values)], bins)
                profile = ColumnProfile(kind, edges, value_bins=value_bins)
                profile.counts = np.zeros(len(profile.edges) + 1, dtype=np.int64)
            profile.update(frame[name])
            columns[name] = profile
        return cls(columns)

    def window(self, batches: pd.DataFrame | Iterable[pd.DataFrame]) -> "Profile":
        """A window's profile in this reference's bins, counted batch by batch."""
        out = Profile({name: col.empty_like() for name, col in self.columns.items()})
        for batch in [batches] if isinstance(batches, pd.DataFrame) else batches:
            for name, col in out.columns.items():
                if name in batch:
                    col.update(batch[name])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": 1, "columns": {name: col.to_dict() for name, col in self.columns.items()}}

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "Profile":
        return cls({name: ColumnProfile.from_dict(col) for name, col in body["columns"].items()})


def numbers(series: pd.Series) -> np.ndarray:
    """A column as float64: numbers as they are, date/times as seconds since the epoch, the rest NaN."""
    if pd.api.types.is_datetime64_any_dtype(series):
        return epoch_seconds(series)  # whatever the resolution: seconds, as stored profiles and ranges
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        return series.to_numpy(dtype=float, na_value=np.nan)
    parsed = pd.to_numeric(series, errors="coerce")
    if parsed.notna().sum() < series.notna().sum():  # text that is not numbers: maybe date/times
        stamps = pd.to_datetime(series, errors="coerce", utc=True, format="mixed")
        if stamps.notna().sum() > parsed.notna().sum():
            return numbers(stamps)
    return parsed.to_numpy(dtype=float, na_value=np.nan)


def _edges(values: np.ndarray, bins: int) -> tuple[np.ndarray, bool]:
    """Bin edges, and whether they give one bin per distinct value. Quantile edges start at the minimum
    and end at the maximum, so values outside the reference's range are counted apart."""
    if not len(values):
        return np.array([0.0]), False
    ordered = np.sort(values)
    distinct = ordered[np.concatenate([[True], ordered[1:] != ordered[:-1]])]
    if len(distinct) <= bins:
        # discrete data: one bin per value; the last edge is the next float after the last value, so the
        # last bin (closed) holds that value only and any larger value is counted above the range
        return np.append(distinct, np.nextafter(distinct[-1], np.inf)), True
    quantiles = ordered[np.linspace(0, len(ordered) - 1, bins + 1).round().astype(np.int64)]
    return np.unique(quantiles), False


def _bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of values below edges[0], in [edges[i], edges[i+1]) (the last bin closed), above edges[-1]."""
    below = int((values < edges[0]).sum())
    above = int((values > edges[-1]).sum())
    if len(edges) == 1:  # an empty reference: below, and everything else
        return np.array([below, len(values) - below], dtype=np.int64)
    inside, _ = np.histogram(values, bins=edges)  # numpy's histogram closes the last bin
    return np.concatenate([[below], inside, [above]]).astype(np.int64)
