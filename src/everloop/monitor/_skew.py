"""Training-serving skew, measured as what it is: logged requests replayed through the batch path.

The service answers from a fast path (numpy replays of the fitted feature steps, compiled trees) that
is parity-checked once, when a model loads; batch scoring and training use the artifact's scikit-learn
pipeline. Skew is the service computing something differently from that batch path, so it is measured
by replaying what the service logged (its conformed features and its answers) through the batch path
and comparing, not by comparing distributions: a new month or a new category is drift, and a correct
service and the batch path agree on it row by row.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from everloop._jsonable import jsonable
from everloop.data import ColumnSchema
from everloop.spec import ProjectSpec
from everloop.spec._model import SkewSpec
from everloop.train import TrainedModel

MAX_EXAMPLES = 5
# Regression predictions agree when within `tolerance` of each other relatively, or within this much
# absolutely (so that two predictions of exactly 0 and 1e-300 are not skew).
ABSOLUTE_FLOOR = 1e-12


def replay_skew(trained: TrainedModel, features: pd.DataFrame, outputs: list[dict[str, Any]], *,
                max_rows: int = 1000, seed: int = 0, tolerance: float = 1e-5,
                ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Replay a seeded sample of logged requests through the batch path and count the rows that differ.

    `features` holds the logged rows' features as the service conformed them (one row per prediction,
    as `prediction_log.to_rows(...).features`), `outputs` the service's answer for each row
    ({"prediction": ..., "probabilities": {str(class): p}} for classifiers; an "id" key is used when
    present), `ids` optionally the prediction ids (`LoggedRows.ids`). Up to `max_rows` rows are drawn
    without replacement (numpy's default_rng(seed)) and go through exactly what `everloop predict` does:
    the artifact's schema check and coercion (`Schema.check(mode="request")`, as `TrainedModel.conform`),
    then the scikit-learn pipeline (`predict_conformed` with the fast path and compiled trees off).

    A row mismatches when (a) conforming its logged features again changes a value (its column is
    named: the service conformed it differently), (b) the batch path refuses it (the reason is given),
    or (c) its prediction differs: a class label that is not the same, a probability more than
    `tolerance` away (absolute; served probabilities are rounded to 6 decimals), a regression value
    more than `tolerance` away relatively.

    Returns {"rows": n replayed, "mismatched": k, "share": k / n (0.0 when n == 0),
    "prediction_mismatches": rows whose prediction or probabilities differ, "refused": rows the batch
    path refused, "features": [columns whose values change, in schema order], "examples": up to 5
    {"id"?, "column" (a feature) or "output" ("prediction" | "probabilities"), "served", "replayed",
    "reason"? (refused rows)}} (JSON-ready). Never raises on data; raises ValueError when `features`,
    `outputs` (and `ids`) differ in length, max_rows < 1 or tolerance < 0 (caller errors).

    Method: training-serving skew detection as in TFX / TensorFlow Data Validation (serving data
    checked against what training computes), done as Google's "Rules of Machine Learning" #29 and #37
    advise: log the features used at serving time and measure training/serving skew by replaying
    served rows through the training (batch) code path.
    """
    if len(features) != len(outputs) or (ids is not None and len(ids) != len(outputs)):
        counts = f"{len(features)} feature rows, {len(outputs)} outputs"
        counts += "" if ids is None else f", {len(ids)} ids"
        raise ValueError(f"replay_skew: {counts}: give one of each per logged row")
    if max_rows < 1:
        raise ValueError(f"replay_skew: max_rows must be at least 1, got {max_rows}")
    if not tolerance >= 0:
        raise ValueError(f"replay_skew: tolerance must be >= 0, got {tolerance}")
    positions = np.arange(len(outputs))
    if len(positions) > max_rows:
        positions = np.sort(np.random.default_rng(seed).choice(len(positions), size=max_rows, replace=False))
    logged = features.iloc[positions].reset_index(drop=True)
    # a malformed entry is an answer with nothing in it: it agrees with nothing
    served = [o if isinstance(o, dict) else {} for o in (outputs[p] for p in positions)]
    row_ids = [ids[p] if ids is not None else served[k].get("id") for k, p in enumerate(positions)]
    replay = _Replay(len(positions))
    changed: list[str] = []
    conformed = replay.conform(trained, logged)
    if conformed is not None:
        changed = replay.compare_features(trained, logged, conformed)
        replay.compare_predictions(trained, conformed, served, tolerance)
    return replay.summary(row_ids, changed)


def skew_alert(result: dict[str, Any], spec: SkewSpec | ProjectSpec) -> str | None:
    """The alert text for a `replay_skew` result, or None when its mismatch share is within
    `monitoring.skew.max_mismatch_share` (`spec` is the SkewSpec or the whole ProjectSpec).

    E.g. "skew: 12 of 1000 replayed requests gave a different prediction through the batch path
    (1.2% > 0.0%; features that change when conformed again: plan)"."""
    limits = spec.monitoring.skew if isinstance(spec, ProjectSpec) else spec
    rows, mismatched = int(result.get("rows") or 0), int(result.get("mismatched") or 0)
    if not rows or not mismatched:
        return None
    share = float(result.get("share", mismatched / rows))
    if share <= limits.max_mismatch_share:
        return None
    what = "prediction" if result.get("prediction_mismatches") else "result"
    details = [f"{share:.1%} > {limits.max_mismatch_share:.1%}"]
    if result.get("features"):
        details.append(f"features that change when conformed again: {', '.join(result['features'])}")
    if result.get("refused"):
        reason = next((e.get("reason") for e in result.get("examples", []) if e.get("reason")), None)
        details.append(f"{result['refused']} refused by the batch path" + (f" ({reason})" if reason else ""))
    if not result.get("features") and not result.get("refused"):
        details.append("same features, different outputs: the service's feature or model path computes "
                       "differently from the artifact's pipeline")
    return (f"skew: {mismatched} of {rows} replayed requests gave a different {what} through the batch path "
            f"({'; '.join(details)})")


class _Replay:
    """Each replayed row's discrepancies (the first one is its example) and what kind they are."""

    def __init__(self, n: int):
        self.notes: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self.refused = np.zeros(n, dtype=bool)
        self.predicted_wrong = np.zeros(n, dtype=bool)

    def refuse(self, rows: Any, reason: str, column: str | None = None,
               logged: pd.DataFrame | None = None) -> None:
        """Mark `rows` (a slice, mask or positions) refused by the batch path, unless they already are."""
        for k in np.arange(len(self.refused))[rows]:
            if not self.refused[k]:
                self.refused[k] = True
                served = _cell(logged, column, k) if logged is not None and column is not None else None
                self.notes[k].append({"column": column, "served": served, "replayed": None, "reason": reason})

    def conform(self, trained: TrainedModel, logged: pd.DataFrame) -> pd.DataFrame | None:
        """The batch path's schema check and coercion of the logged rows, refusing the rows it refuses;
        None when it refuses them all at once (a missing column, a failure)."""
        try:
            checked = trained.schema.check(logged, mode="request", coerce=True)
        except Exception as exc:  # the batch path fails on these rows: every one of them is a mismatch
            self.refuse(slice(None), f"the batch path's schema check failed: {type(exc).__name__}: {exc}")
            return None
        whole = [a for a in checked.report.errors if a.kind in ("missing_column", "empty")]
        if whole:  # anomalies of the frame, not of a row
            self.refuse(slice(None), "; ".join(a.describe() for a in whole), whole[0].column)
            return None
        for mask, column, why in checked.reasons:
            self.refuse(mask, f"{column}: {why}", column, logged)
        return checked.frame

    def compare_features(self, trained: TrainedModel, logged: pd.DataFrame,
                         conformed: pd.DataFrame) -> list[str]:
        """The feature columns (in schema order) whose logged values change when conformed again."""
        changed = []
        for col in trained.schema.features:
            if col.name not in conformed.columns or col.name not in logged.columns:
                continue
            same = _same_values(col, logged[col.name], conformed[col.name])
            if not same.all():
                changed.append(col.name)
                for k in np.flatnonzero(~same):
                    self.notes[k].append({"column": col.name, "served": _cell(logged, col.name, k),
                                          "replayed": conformed[col.name].iloc[k]})
        return changed

    def compare_predictions(self, trained: TrainedModel, conformed: pd.DataFrame,
                            served: list[dict[str, Any]], tolerance: float) -> None:
        """Predict the accepted rows through the pipeline (as batch scoring does: no fast path, no compiled
        trees) and mark the rows whose served outputs differ; a failure refuses every accepted row."""
        good = np.flatnonzero(~self.refused)
        if not len(good):
            return
        batch = dataclasses.replace(trained, fast=None, compiled=None)
        try:
            predictions = batch.predict_conformed(conformed.iloc[good].reset_index(drop=True))
        except Exception as exc:  # the pipeline cannot predict these rows: they are refused, not skipped
            self.refuse(good, f"the batch path's pipeline failed: {type(exc).__name__}: {exc}")
            return
        labels = predictions.labels.tolist()
        names = [str(c) for c in predictions.classes] if predictions.classes is not None else []
        for j, k in enumerate(good):
            output = served[k]
            got = output.get("prediction")
            if trained.task != "classification":
                if not _same_value(got, labels[j], tolerance):
                    self._wrong(k, "prediction", got, labels[j])
                continue
            if not _same_label(got, labels[j]):
                self._wrong(k, "prediction", got, labels[j])
                continue
            served_proba = output.get("probabilities")
            if served_proba is None or predictions.proba is None:  # an answer without probabilities
                continue
            replayed = dict(zip(names, predictions.proba[j].tolist()))
            if not isinstance(served_proba, dict) or any(not _close(served_proba.get(c), p, tolerance)
                                                         for c, p in replayed.items()):
                self._wrong(k, "probabilities", served_proba, {c: round(p, 6) for c, p in replayed.items()})

    def _wrong(self, k: int, output: str, served: Any, replayed: Any) -> None:
        self.predicted_wrong[k] = True
        self.notes[k].append({"output": output, "served": served, "replayed": replayed})

    def summary(self, row_ids: list[Any], changed: list[str]) -> dict[str, Any]:
        """The result of `replay_skew` (JSON-ready)."""
        n = len(self.refused)
        mismatched = np.array([bool(x) for x in self.notes], dtype=bool)
        examples = []
        for k in np.flatnonzero(mismatched)[:MAX_EXAMPLES]:
            example = {key: value for key, value in self.notes[k][0].items()
                       if not (key == "column" and value is None)}
            if row_ids[k] is not None:
                example = {"id": row_ids[k], **example}
            examples.append(jsonable(example))
        k = int(mismatched.sum())
        return {"rows": n, "mismatched": k, "share": k / n if n else 0.0,
                "prediction_mismatches": int(self.predicted_wrong.sum()), "refused": int(self.refused.sum()),
                "features": changed, "examples": examples}


def _same_values(col: ColumnSchema, logged: pd.Series, replayed: pd.Series) -> np.ndarray:
    """Per row: does conforming again leave the logged value as it was? Nulls equal nulls; a numeric value
    must be the same number (not text), a category the same string, a date/time the same instant (text
    logged as the service renders it, ISO 8601 in UTC)."""
    before = logged.to_numpy(dtype=object)
    after = replayed.to_numpy(dtype=object)
    out = np.empty(len(before), dtype=bool)
    for k, (a, b) in enumerate(zip(before, after)):
        if _is_null(a) or _is_null(b):
            out[k] = _is_null(a) and _is_null(b)
        elif col.kind == "numeric":
            number = isinstance(a, (int, float, np.integer, np.floating))
            out[k] = number and not isinstance(a, (bool, np.bool_)) and float(a) == float(b)
        elif col.kind == "datetime":
            out[k] = _same_instant(a, b)
        else:
            out[k] = isinstance(a, str) and a == b
    return out


def _same_instant(logged: Any, replayed: Any) -> bool:
    stamp = pd.Timestamp(replayed)
    if isinstance(logged, str):
        return logged == stamp.isoformat()  # the log holds date/times as the service renders them
    if isinstance(logged, (datetime, np.datetime64)):
        other = pd.Timestamp(logged)
        other = other.tz_localize("UTC") if other.tz is None else other.tz_convert("UTC")
        return other == stamp
    return False


def _is_null(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _same_label(served: Any, replayed: Any) -> bool:
    """Class labels compare as themselves or as their text (JSON and the log may give 1 for '1')."""
    served, replayed = _scalar(served), _scalar(replayed)
    return served == replayed or str(served) == str(replayed)


def _same_value(served: Any, replayed: Any, tolerance: float) -> bool:
    try:
        a, b = float(_scalar(served)), float(_scalar(replayed))
    except (TypeError, ValueError):
        return False
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=tolerance, abs_tol=ABSOLUTE_FLOOR)


def _close(served: Any, replayed: float, tolerance: float) -> bool:
    try:
        value = float(_scalar(served))
    except (TypeError, ValueError):
        return False
    return abs(value - replayed) <= tolerance


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _cell(frame: pd.DataFrame, column: str, row: int) -> Any:
    return frame[column].iloc[row] if column in frame.columns else None
