"""Comparing two dataset versions by their stored statistics (no data is re-read)."""

from __future__ import annotations

from typing import Any

from everloop.data._datasets import DatasetVersion


def diff_datasets(a: DatasetVersion, b: DatasetVersion) -> list[dict[str, Any]]:
    """One row per column: how its statistics moved from `a` to `b`.

    Numeric: null rate, mean, std, min, max, and the mean's shift in units of a's standard deviation.
    Categorical: null rate, distinct values, categories that appeared or vanished, and the total
    variation distance between the two category distributions (0 same, 1 disjoint)."""
    before, after = a.stats["columns"], b.stats["columns"]
    rows = []
    for name in list(before) + [n for n in after if n not in before]:
        x, y = before.get(name), after.get(name)
        row: dict[str, Any] = {"column": name, "kind": (x or y)["kind"]}
        if x is None or y is None:
            row["change"] = "added" if x is None else "removed"
            rows.append(row)
            continue
        row["null_rate"] = (x["null_rate"], y["null_rate"])
        if x["kind"] == "numeric":
            for stat in ("mean", "std", "min", "max"):
                row[stat] = (x.get(stat), y.get(stat))
            if x.get("std") and x.get("mean") is not None and y.get("mean") is not None:
                row["mean_shift_sd"] = (y["mean"] - x["mean"]) / x["std"]
        elif x["kind"] == "categorical":
            cx, cy = x.get("categories", {}), y.get("categories", {})
            nx, ny = sum(cx.values()) or 1, sum(cy.values()) or 1
            row["distinct"] = (x.get("distinct"), y.get("distinct"))
            row["new_categories"] = sorted(set(cy) - set(cx))[:20]
            row["vanished_categories"] = sorted(set(cx) - set(cy))[:20]
            row["tvd"] = 0.5 * sum(abs(cx.get(k, 0) / nx - cy.get(k, 0) / ny) for k in set(cx) | set(cy))
        rows.append(row)
    return rows
