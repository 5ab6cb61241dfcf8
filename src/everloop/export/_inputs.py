"""The ONNX graph's inputs: one per feature column of the schema, and how rows become them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

SECONDS = "float64 seconds since 1970-01-01 UTC"


@dataclass(frozen=True)
class OnnxInput:
    """One input of the graph: a raw feature column, shape (rows, 1).

    `type` is "float64" or "string"; `missing` is how a missing value is written (NaN, or "" for
    strings); `values` the accepted spellings of a true/false column (anything else reads as unseen)."""

    name: str
    type: str
    kind: str  # the schema's kind: numeric, categorical, boolean, datetime
    missing: str
    values: list[str] | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def graph_inputs(schema: Any) -> list[OnnxInput]:
    """The graph's inputs for a schema's feature columns, in schema order. Booleans are strings, as the
    schema reads them: their canonical spellings (`true_values[0]`, `false_values[0]`)."""
    out = []
    for col in schema.features:
        if col.kind == "numeric":
            out.append(OnnxInput(col.name, "float64", "numeric", "NaN"))
        elif col.kind == "datetime":
            out.append(OnnxInput(col.name, "float64", "datetime", "NaN", note=SECONDS))
        elif col.is_bool:
            true, false = (col.true_values or ["True"])[0], (col.false_values or ["False"])[0]
            out.append(OnnxInput(col.name, "string", "boolean", '""', values=[true, false]))
        else:
            out.append(OnnxInput(col.name, "string", "categorical", '""'))
    return out


def onnx_feed(schema: Any, features: pd.DataFrame) -> dict[str, np.ndarray]:
    """Conformed feature rows (`TrainedModel.conform`) as the graph's inputs: float64 (rows, 1) arrays
    with NaN for missing numbers and date/times (as seconds since the epoch, UTC), object (rows, 1)
    arrays of str with "" for missing categories."""
    feed: dict[str, np.ndarray] = {}
    for spec in graph_inputs(schema):
        column = features[spec.name]
        if spec.kind == "datetime":
            stamps = pd.to_datetime(column, errors="coerce", utc=True)
            values = ((stamps - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(
                dtype=np.float64, na_value=np.nan)
        elif spec.type == "float64":
            values = pd.to_numeric(column).to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            raw = column.to_numpy(dtype=object)
            values = np.array(["" if v is None or (isinstance(v, float) and v != v) or v is pd.NA else str(v)
                               for v in raw], dtype=object)
        feed[spec.name] = values.reshape(-1, 1)
    return feed
