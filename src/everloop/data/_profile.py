"""Column profiles: the statistics drift is computed from, built once for the reference and merged
batch by batch for a window, so a window of any size streams in constant memory.

Numeric (and date/time) columns keep counts in bins whose edges are the reference's quantiles (up
to 1000, fewer for discrete data: then one bin per value, which makes the binned KS statistic exact);
categorical columns keep counts per category. Both sides are counted in the same bins, so KS,
Wasserstein, PSI, chi-square, total variation and Jensen-Shannon all come from counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pandas as pd

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

    def empty_like(self) -> "ColumnProfile":
        """A profile with this one's bins and no rows (for a window to be counted in)."""
        counts = np.zeros_like(self.counts) if self.counts is not None else None
        return ColumnProfile(self.kind, self.edges, counts)

    def update(self, series: pd.Series) -> None:
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
            for key, n in items:
                key = str(key)
                if key in self.categories or len(self.categories) < MAX_CATEGORIES:
                    self.categories[key] = self.categories.get(key, 0) + int(n)
                else:
                    self.categories[OTHER] = self.categories.get(OTHER, 0) + int(n)
            return
        values = numbers(series)
        finite = values[np.isfinite(values)]
        self.missing += len(values) - len(finite)
        self.total += float(finite.sum())
        self.total_sq += float(np.square(finite).sum())
        if len(finite):
            self.counts += _bin_counts(finite, self.edges)

    def merge(self, other: "ColumnProfile") -> None:
        self.rows += other.rows
        self.missing += other.missing
        self.total += other.total
        self.total_sq += other.total_sq
        if self.counts is not None:
            self.counts += other.counts
        for key, n in other.categories.items():
            self.categories[key] = self.categories.get(key, 0) + n

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "rows": self.rows, "missing": self.missing, "total": self.total,
                               "total_sq": self.total_sq}
        if self.edges is not None:
            out |= {"edges": self.edges.tolist(), "counts": self.counts.tolist()}
        else:
            out["categories"] = self.categories
        return out

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "ColumnProfile":
        edges = np.asarray(body["edges"], dtype=float) if "edges" in body else None
        counts = np.asarray(body["counts"], dtype=np.int64) if "counts" in body else None
        return cls(body["kind"], edges, counts, dict(body.get("categories", {})), body["rows"], body["missing"],
                   body.get("total", 0.0), body.get("total_sq", 0.0))


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
                profile = ColumnProfile(kind, _edges(values[np.isfinite(values)], bins))
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
        stamps = series.dt.tz_convert("UTC") if series.dt.tz is not None else series
        values = stamps.astype("int64").to_numpy(dtype=float) / 1e9
        values[series.isna().to_numpy()] = np.nan
        return values
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        return series.to_numpy(dtype=float, na_value=np.nan)
    parsed = pd.to_numeric(series, errors="coerce")
    if parsed.notna().sum() < series.notna().sum():  # text that is not numbers: maybe date/times
        stamps = pd.to_datetime(series, errors="coerce", utc=True, format="mixed")
        if stamps.notna().sum() > parsed.notna().sum():
            return numbers(stamps)
    return parsed.to_numpy(dtype=float, na_value=np.nan)


def _edges(values: np.ndarray, bins: int) -> np.ndarray:
    if not len(values):
        return np.array([0.0])
    ordered = np.sort(values)
    distinct = ordered[np.concatenate([[True], ordered[1:] != ordered[:-1]])]
    if len(distinct) <= bins:  # discrete data: one bin per value (and one edge past the last value)
        return np.append(distinct, distinct[-1] + max(1.0, abs(distinct[-1]) * 1e-9))
    quantiles = ordered[np.linspace(0, len(ordered) - 1, bins + 1).round().astype(np.int64)]
    return np.unique(quantiles)


def _bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of values below edges[0], in [edges[i], edges[i+1]) (the last bin closed), above edges[-1]."""
    below = int((values < edges[0]).sum())
    above = int((values > edges[-1]).sum())
    if len(edges) == 1:  # an empty reference: below, and everything else
        return np.array([below, len(values) - below], dtype=np.int64)
    inside, _ = np.histogram(values, bins=edges)  # numpy's histogram closes the last bin
    return np.concatenate([[below], inside, [above]]).astype(np.int64)
