"""A shadow or canary candidate judged against production on live traffic (`promotion.live`).

The offline gate compares two models on held-out rows; here the candidate has answered (canary) or
silently scored (shadow) real requests since the rollout started, and the question is whether to
wait, step the canary up, promote, or roll back. Only rows logged since `rollout.created_at` count:
- shadow: the candidate's rows are in `shadow_batches` under the rollout, with the ids of the
  production rows they shadow, so the two versions are compared row by row (agreement, and the metric
  on the labelled rows both scored: paired);
- canary: each version's own rows in `prediction_batches`, so the metric is each version's on its
  own labelled rows (different rows: an unpaired comparison).
Errors come from `rollout_stats` (a shadow candidate's failures never reach the log), latency from the
logged rows. A failing or slow candidate is rolled back at once; otherwise nothing is decided before
`min_rows` scored and `min_labelled_rows` labelled rows, and the metric decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pandas as pd
import sqlalchemy as sa

from everloop._jsonable import jsonable
from everloop.monitor._drift import DriftDetector
from everloop.monitor._estimate import estimate_interval
from everloop.registry import get_model
from everloop.spec import ProjectSpec
from everloop.store import Store, prediction_log
from everloop.train import (allowed_loss, bootstrap_labels, describe_tolerance, improvement, score_labels,
                            valid_labels)

MIN_CALLS = 20  # fewer candidate calls say too little for an error rate
MAX_LATENCY_ROWS = 200  # rows with a latency each version needs before p99s are compared (or min_rows)


@dataclass
class LiveVerdict:
    """What to do with a rollout now. `action`: "wait" | "step" | "promote" | "rollback"; `reason`:
    one line for people; `evidence`: every number the verdict used (JSON-able; for "step" the share to
    step to is `evidence["next_share"]`, in percent)."""

    action: str
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "reason": self.reason, "evidence": self.evidence}


@dataclass
class _Scored:
    """One version's logged rows since the rollout started: ids (unique), predicted values,
    probabilities (rows x classes in the model's class order; None for regression), latency (ms, NaN
    where none was logged)."""

    ids: np.ndarray
    predicted: np.ndarray
    proba: np.ndarray | None
    latency_ms: np.ndarray

    def take(self, rows: np.ndarray) -> "_Scored":
        proba = None if self.proba is None else self.proba[rows]
        return _Scored(self.ids[rows], self.predicted[rows], proba, self.latency_ms[rows])


def judge_rollout(store: Store, spec: ProjectSpec, rollout: Any) -> LiveVerdict:
    """Judge an active rollout on what was logged since it started.

    rollout: anything with `.id`, `.candidate`, `.production` (model versions), `.mode` ("shadow" |
    "canary"), `.share` (canary: percent of traffic the candidate answers), `.steps` (percents) and
    `.created_at` (epoch seconds), such as `everloop.registry.Rollout`.

    Rules (`promotion.live`), in order: the candidate's error rate above `max_error_rate` (over at least
    MIN_CALLS calls) or its p99 latency above `max_latency_ratio` x production's (each with at least
    min(min_rows, MAX_LATENCY_ROWS) timed rows) -> "rollback", without waiting for labels; fewer than
    `min_rows` candidate rows, or fewer than `min_labelled_rows` labelled ones (shadow: rows both versions
    scored; canary: the candidate's own) -> "wait"; a loss of `evaluation.metric` against production
    beyond `max_regression` -> "rollback" (when its 90% interval is not all beyond, "wait" for more
    labels); a canary below its last step -> "step"; else "promote".

    Returns a LiveVerdict; evidence holds rows per version, agreement (shadow), prediction drift between
    the versions' scores, latency p50/p99 per version, error rates, the labelled metric per version with
    a 90% bootstrap interval of the loss, and CBPE estimates (classifiers). Raises NotFoundError when a
    version is not in the registry, and SQLAlchemy's errors when the store cannot be read."""
    since = float(rollout.created_at)
    evidence: dict[str, Any] = {"rollout": rollout.id, "mode": rollout.mode, "share": rollout.share,
                                "candidate": rollout.candidate, "production": rollout.production,
                                "since": since, "thresholds": spec.promotion.live.model_dump()}
    if rollout.production is None:
        return LiveVerdict("wait", f"rollout {rollout.id} has no production version to compare candidate "
                           f"v{rollout.candidate} with: not judged live; promote or abort it by hand",
                           jsonable(evidence))
    evidence |= _measure(store, spec, rollout)
    action, reason = _decide(spec, rollout, evidence)
    return LiveVerdict(action, reason, jsonable(evidence))


def _measure(store: Store, spec: ProjectSpec, rollout: Any) -> dict[str, Any]:
    """Every number the rules use, from the rows logged since the rollout started."""
    manifest = get_model(store, rollout.candidate).manifest
    prod_manifest = get_model(store, rollout.production).manifest
    task, classes, metric = manifest["task"], manifest.get("classes"), manifest["metric"]
    shadow, since = rollout.mode == "shadow", float(rollout.created_at)
    t = store.tables
    with store.engine.connect() as conn:
        prod = _read(conn, _batches(t.prediction_batches, rollout.production, since), classes)
        if shadow:
            query = _batches(t.shadow_batches, rollout.candidate, since)
            cand = _read(conn, query.where(t.shadow_batches.c.rollout == rollout.id), classes)
        else:
            cand = _read(conn, _batches(t.prediction_batches, rollout.candidate, since), classes)
        labels = prediction_log.labels_since(conn, since)  # a label is never older than its prediction
        errors = _errors(conn, t.rollout_stats, rollout.id)
    out: dict[str, Any] = {"rows": {"candidate": len(cand.ids), "production": len(prod.ids)},
                           "latency_ms": _latency(cand, prod),
                           "errors": {"candidate": errors.get(rollout.candidate, _no_calls()),
                                      "production": errors.get(rollout.production, _no_calls())}}
    compared = prod
    if shadow:  # the same requests: compared row by row
        where = pd.Index(prod.ids).get_indexer(cand.ids)
        paired = where >= 0
        cand, compared = cand.take(np.flatnonzero(paired)), prod.take(where[paired])
        out["rows"]["paired"] = int(paired.sum())
        out["agreement"] = _agreement(task, cand, compared)
    out["prediction_drift"] = _drift(spec, task, classes, cand, compared)
    if task == "classification":
        out["estimated"] = {"candidate": _estimate(metric, cand.proba, manifest),
                            "production": _estimate(metric, compared.proba, prod_manifest)}
    out["labelled"] = _labelled(task, classes, metric, labels, cand, compared, shadow)
    return out


def _decide(spec: ProjectSpec, rollout: Any, evidence: dict[str, Any]) -> tuple[str, str]:
    """(action, reason) by `promotion.live`'s rules (see `judge_rollout`); adds the loss against
    production (and, for a step, `next_share`) to `evidence`."""
    live = spec.promotion.live
    shadow = rollout.mode == "shadow"
    c, p = f"candidate v{rollout.candidate}", f"production v{rollout.production}"
    now = "rolled back without waiting for labels"
    failed = evidence["errors"]["candidate"]
    if failed["calls"] >= MIN_CALLS and failed["rate"] > live.max_error_rate:
        return "rollback", (f"{c} failed {failed['errors']} of {failed['calls']} calls "
                            f"({failed['rate']:.1%}), above promotion.live.max_error_rate "
                            f"{live.max_error_rate:.1%}: {now}")
    latency, timed = evidence["latency_ms"], min(live.min_rows, MAX_LATENCY_ROWS)
    ratio = latency["p99_ratio"]
    if (ratio is not None and ratio > live.max_latency_ratio
            and min(latency["candidate"]["rows"], latency["production"]["rows"]) >= timed):
        return "rollback", (f"{c}'s p99 latency {latency['candidate']['p99']:.1f} ms is {ratio:.2f}x {p}'s "
                            f"{latency['production']['p99']:.1f} ms, above promotion.live.max_latency_ratio "
                            f"{live.max_latency_ratio:g}: {now}")
    rows = evidence["rows"]
    if rows["candidate"] < live.min_rows:
        return "wait", (f"{c} has scored {rows['candidate']} of the {live.min_rows} rows "
                        f"promotion.live.min_rows needs ({p}: {rows['production']} rows since the rollout "
                        "started)")
    labelled = evidence["labelled"]
    metric, n = labelled["metric"], labelled["rows"]["candidate"]
    a, b = labelled["candidate"], labelled["production"]
    if n < live.min_labelled_rows:
        which = "rows both versions scored" if shadow else f"{c}'s own rows"
        return "wait", (f"{n} of the {live.min_labelled_rows} labelled rows "
                        f"promotion.live.min_labelled_rows needs ({which} that have a valid label)")
    if not (np.isfinite(a) and np.isfinite(b)):
        return "wait", (f"{metric} is undefined on the labelled rows (candidate {a:.4f} on {n}, production "
                        f"{b:.4f} on {labelled['rows']['production']}; e.g. one class only): waiting for "
                        "more labels")
    loss, allowed = improvement(metric, b, a), allowed_loss(live.max_regression, b)
    tolerance = f"promotion.live.max_regression {describe_tolerance(live.max_regression, b, metric)}"
    labelled |= {"loss": loss, "allowed_loss": allowed, "tolerance": tolerance}
    span = ("" if labelled.get("loss_low") is None else
            f", 90% interval {labelled['loss_low']:.4f}..{labelled['loss_high']:.4f}")
    on = (f"the {n} labelled rows both versions scored" if shadow else
          f"its {n} labelled rows ({p}: {labelled['rows']['production']} of its own)")
    if loss > allowed and labelled.get("loss_low") is not None and labelled["loss_low"] <= allowed:
        # worse by the point estimate but not beyond the tolerance with confidence (a canary's versions
        # answer different rows): a good candidate is not rolled back by the luck of a few labels
        return "wait", (f"{metric} {a:.4f} of {c} vs {p}'s {b:.4f} on {on}: loss {loss:.4f}{span} is not yet "
                        f"clearly beyond {tolerance}; waiting for more labels")
    if loss > allowed:
        return "rollback", (f"{metric} {a:.4f} of {c} is worse than {p}'s {b:.4f} on {on}: by {loss:.4f}"
                            f"{span}; more than {tolerance}")
    passed = f"{metric} {a:.4f} vs {p}'s {b:.4f} on {on} (loss {loss:.4f}{span}; allowed {allowed:.4f})"
    later = [float(s) for s in rollout.steps if float(s) > float(rollout.share)]
    if not shadow and later:
        evidence["next_share"] = later[0]
        return "step", f"{c} passes at {rollout.share:g}% of traffic: {passed}; step to {later[0]:g}%"
    return "promote", f"{c} passes on live traffic ({rollout.mode}): {passed}"


# -- reading ---------------------------------------------------------------------------------------


def _batches(table: sa.Table, version: int, since: float) -> sa.Select:
    return (sa.select(table.c.payload)
            .where(table.c.model_version == version, table.c.created_at >= since).order_by(table.c.seq))


def _read(conn: sa.Connection, query: sa.Select, classes: list[Any] | None) -> _Scored:
    """The rows of the selected batches as columns; probabilities in `classes`' order (the log names the
    classes as text), renormalised (logged rounded to 6 decimals). A repeated id keeps its first row."""
    ids, predicted, proba, latency = [], [], [], []
    for payload, in conn.execution_options(yield_per=64).execute(query):
        table = prediction_log.decode(payload)
        ids.append(table.column(prediction_log.ID).to_numpy(zero_copy_only=False))
        predicted.append(table.column(prediction_log.PREDICTION).to_numpy(zero_copy_only=False))
        latency.append(np.asarray(table.column(prediction_log.LATENCY), dtype=float))
        if classes is not None and prediction_log.PROBA in table.column_names:
            logged = orjson.loads((table.schema.metadata or {}).get(b"classes", b"[]"))
            matrix = np.asarray(table.column(prediction_log.PROBA).combine_chunks().flatten())
            matrix = matrix.reshape(table.num_rows, -1)[:, [logged.index(str(k)) for k in classes]]
            proba.append(matrix / matrix.sum(axis=1, keepdims=True))
    if not ids:
        width = len(classes) if classes is not None else 0
        return _Scored(np.empty(0, dtype=object), np.empty(0, dtype=object),
                       np.empty((0, width)) if classes is not None else None, np.empty(0))
    scored = _Scored(np.concatenate(ids), np.concatenate(predicted),
                     np.vstack(proba) if proba else None, np.concatenate(latency))
    first = ~pd.Index(scored.ids).duplicated()
    return scored if first.all() else scored.take(np.flatnonzero(first))


def _errors(conn: sa.Connection, table: sa.Table, rollout_id: int) -> dict[int, dict[str, Any]]:
    """Calls and failed calls per version under the rollout, summed over the rows the workers wrote
    (each row counts the calls since the worker's previous one, as `service_stats`)."""
    query = (sa.select(table.c.model_version, sa.func.sum(table.c.calls), sa.func.sum(table.c.errors))
             .where(table.c.rollout == rollout_id).group_by(table.c.model_version))
    return {int(version): {"calls": int(calls), "errors": int(errors),
                           "rate": errors / calls if calls else None}
            for version, calls, errors in conn.execute(query)}


def _no_calls() -> dict[str, Any]:
    return {"calls": 0, "errors": 0, "rate": None}


# -- measures --------------------------------------------------------------------------------------


def _agreement(task: str, cand: _Scored, prod: _Scored) -> dict[str, Any]:
    """Shadow: how often the versions predict the same label on the same rows (classification), or the
    mean absolute difference of their values (regression)."""
    n = len(cand.ids)
    if task == "regression":
        diff = np.abs(cand.predicted.astype(float) - prod.predicted.astype(float))
        return {"rows": n, "mean_absolute_difference": float(diff.mean()) if n else None}
    same = np.asarray(cand.predicted, dtype=object) == np.asarray(prod.predicted, dtype=object)
    return {"rows": n, "agreed": int(same.sum()), "rate": float(same.mean()) if n else None}


def _scores(task: str, classes: list[Any] | None, scored: _Scored) -> tuple[pd.Series, str]:
    """What prediction drift is measured on, as the monitor does: P(positive class) for binary, the
    class for multiclass, the value for regression; and the profile kind."""
    if task == "regression":
        return pd.Series(scored.predicted, dtype=float), "numeric"
    if len(classes) == 2:
        return pd.Series(scored.proba[:, 1], dtype=float), "numeric"
    return pd.Series([str(v) for v in scored.predicted], dtype=object), "categorical"


def _drift(spec: ProjectSpec, task: str, classes: list[Any] | None, cand: _Scored,
           prod: _Scored) -> dict[str, Any] | None:
    """The monitor's prediction-drift test (monitoring.drift.prediction thresholds) with production's
    scores as the reference and the candidate's as the window: KS on scores, chi-square and total
    variation on classes. None until both have rows."""
    if not len(cand.ids) or not len(prod.ids):
        return None
    reference, kind = _scores(task, classes, prod)
    current, _ = _scores(task, classes, cand)
    settings = spec.monitoring.drift.prediction
    result = (DriftDetector(settings.p_value, settings.min_effect)
              .fit(pd.DataFrame({"prediction": reference}), {"prediction": kind})
              .score(pd.DataFrame({"prediction": current})).columns[0])
    return {"method": result.method, "statistic": result.statistic, "p_value": result.p_value,
            "effect": result.effect, "drifted": result.drifted, "candidate_rows": len(current),
            "production_rows": len(reference)}


def _latency(cand: _Scored, prod: _Scored) -> dict[str, Any]:
    """p50 and p99 (ms) of each version's logged rows that carry a latency, and the ratio of the p99s
    (candidate / production)."""
    out: dict[str, Any] = {}
    for name, scored in (("candidate", cand), ("production", prod)):
        timed = scored.latency_ms[np.isfinite(scored.latency_ms)]
        p50, p99 = (float(np.percentile(timed, q)) if len(timed) else None for q in (50, 99))
        out[name] = {"rows": len(timed), "p50": p50, "p99": p99}
    a, b = out["candidate"]["p99"], out["production"]["p99"]
    out["p99_ratio"] = a / b if a is not None and b else None
    return out


def _estimate(metric: str, proba: np.ndarray | None, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """CBPE of the version's metric on its rows, with the calibration fitted on its held-out rows."""
    if proba is None or not len(proba):
        return None
    calibration = manifest.get("monitoring", {}).get("calibration")
    estimate = estimate_interval(metric, proba, calibration)
    if estimate is None:
        return None
    return {"value": estimate.value, "low": estimate.low, "high": estimate.high, "rows": estimate.rows}


def _labelled(task: str, classes: list[Any] | None, metric: str, raw: dict[str, Any], cand: _Scored,
              prod: _Scored, paired: bool) -> dict[str, Any]:
    """`metric` of each version on its labelled rows (labels parsed for the candidate's task and classes,
    invalid ones left out) and a 90% bootstrap interval of the loss (production's value minus the
    candidate's, for higher-is-better metrics). Paired (shadow: `cand` and `prod` are the same rows,
    in the same order): both are resampled alike (the same seed and row count draw the same rows, and
    a draw is undefined for both or neither, since that depends on the labels alone); else the two
    bootstraps are independent."""
    names = classes if task == "classification" else None
    out: dict[str, Any] = {"metric": metric, "rows": {}, "paired": paired}
    draws = {}
    for name, scored, seed in (("candidate", cand, 0), ("production", prod, 0 if paired else 1)):
        rows = np.flatnonzero(pd.Index(scored.ids).isin(list(raw)))
        keep, labels = valid_labels(task, classes, [raw[i] for i in scored.ids[rows]])
        rows = rows[np.asarray(keep, dtype=int)]
        out["rows"][name] = len(rows)
        out[name] = float("nan")
        if not len(rows):
            continue
        proba = scored.proba[rows] if scored.proba is not None else None
        out[name] = score_labels(metric, labels, scored.predicted[rows], proba, names)
        draws[name] = bootstrap_labels(metric, labels, scored.predicted[rows], proba, names, seed=seed)
    cand_draws = draws.get("candidate", np.empty(0))
    prod_draws = draws.get("production", np.empty(0))
    if len(cand_draws) and len(prod_draws) and (not paired or len(cand_draws) == len(prod_draws)):
        k = min(len(cand_draws), len(prod_draws))
        losses = improvement(metric, prod_draws[:k], cand_draws[:k])
        out["loss_low"], out["loss_high"] = (float(np.percentile(losses, q)) for q in (5, 95))
    return out
