"""Per-column statistics accumulated batch by batch, so that any size of data streams in constant memory.

Used to infer a schema from a whole file in one pass, to store each dataset version's statistics,
and to compare two versions (`everloop datasets diff`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

MAX_TRACKED_CATEGORIES = 1000  # past this, a column keeps a count of "other" values instead


@dataclass
class ColumnStats:
    kind: str  # numeric, categorical, datetime
    count: int = 0
    nulls: int = 0
    min: float | None = None
    max: float | None = None
    total: float = 0.0
    total_sq: float = 0.0
    whole: bool = True  # every numeric value so far was a whole number
    categories: dict[str, int] = field(default_factory=dict)
    other: int = 0  # values beyond MAX_TRACKED_CATEGORIES distinct ones

    def update(self, series: pd.Series) -> None:
        self.count += len(series)
        nulls = int(series.isna().sum())
        self.nulls += nulls
        if self.kind == "numeric":
            values = series.to_numpy(dtype=float, na_value=np.nan)
            values = values[np.isfinite(values)]
            if len(values):
                lo, hi = float(values.min()), float(values.max())
                self.min = lo if self.min is None else min(self.min, lo)
                self.max = hi if self.max is None else max(self.max, hi)
                self.total += float(values.sum())
                self.total_sq += float(np.square(values).sum())
                self.whole = self.whole and bool((values == np.round(values)).all())
        elif self.kind == "categorical":
            for value, n in series.value_counts(dropna=True).items():
                key = str(value)
                if key in self.categories or len(self.categories) < MAX_TRACKED_CATEGORIES:
                    self.categories[key] = self.categories.get(key, 0) + int(n)
                else:
                    self.other += int(n)
        elif self.kind == "datetime" and nulls < len(series):
            # seconds since the epoch (UTC; naive times as UTC), exact for years 1 .. 9999 (no nanoseconds)
            lo_s, hi_s = epoch_seconds(pd.Series([pd.Timestamp(series.min()), pd.Timestamp(series.max())]))
            self.min = lo_s if self.min is None else min(self.min, lo_s)
            self.max = hi_s if self.max is None else max(self.max, hi_s)

    @property
    def valid(self) -> int:
        return self.count - self.nulls

    @property
    def null_rate(self) -> float:
        return self.nulls / self.count if self.count else 0.0

    @property
    def mean(self) -> float | None:
        return self.total / self.valid if self.kind == "numeric" and self.valid else None

    @property
    def std(self) -> float | None:
        if self.kind != "numeric" or self.valid < 2:
            return None
        variance = max(self.total_sq / self.valid - (self.total / self.valid) ** 2, 0.0)
        return float(np.sqrt(variance * self.valid / (self.valid - 1)))

    @property
    def distinct(self) -> int | None:
        return len(self.categories) + (1 if self.other else 0) if self.kind == "categorical" else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "count": self.count, "nulls": self.nulls,
                               "null_rate": round(self.null_rate, 6)}
        if self.kind in ("numeric", "datetime"):
            out |= {"min": self.min, "max": self.max}
        if self.kind == "numeric":
            out |= {"mean": self.mean, "std": self.std, "whole": self.whole}
        if self.kind == "categorical":
            top = sorted(self.categories.items(), key=lambda kv: (-kv[1], kv[0]))
            out |= {"distinct": self.distinct, "categories": dict(top[:MAX_TRACKED_CATEGORIES]), "other": self.other}
        return out

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "ColumnStats":
        stats = cls(body["kind"], body["count"], body["nulls"], body.get("min"), body.get("max"))
        if body["kind"] == "numeric" and body.get("mean") is not None:
            valid = stats.valid
            stats.total = body["mean"] * valid
            std = body.get("std") or 0.0
            stats.total_sq = (std**2 * (valid - 1) / valid + body["mean"] ** 2) * valid if valid > 1 else body["mean"] ** 2
            stats.whole = body.get("whole", False)
        stats.categories = dict(body.get("categories", {}))
        stats.other = body.get("other", 0)
        return stats


def epoch_seconds(times: pd.Series) -> np.ndarray:
    """Date/times as seconds since 1970-01-01 UTC (float64; NaN for NaT), naive times read as UTC, whatever
    their resolution: computed in microseconds, so years 1 .. 9999 fit. The one conversion behind date/time
    statistics, schema ranges and profiles."""
    if times.dt.tz is not None:
        times = times.dt.tz_convert("UTC").dt.tz_localize(None)
    since = times.dt.as_unit("us") - pd.Timestamp(0).as_unit("us")
    return since.dt.total_seconds().to_numpy(dtype=float, na_value=np.nan)


class DatasetStats:
    """Statistics of every column, updated with each batch."""

    def __init__(self, kinds: dict[str, str]):
        self.columns = {name: ColumnStats(kind) for name, kind in kinds.items()}
        self.rows = 0

    def update(self, frame: pd.DataFrame) -> None:
        self.rows += len(frame)
        for name, stats in self.columns.items():
            if name in frame:
                stats.update(frame[name])

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "columns": {n: s.to_dict() for n, s in self.columns.items()}}
