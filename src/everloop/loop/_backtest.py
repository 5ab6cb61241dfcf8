"""`everloop backtest`: replay a time-ordered labelled dataset through the retraining policy.

Train on the first period; then, window by window, every strategy predicts the window before it
may learn from it (so no strategy sees its own test rows): the spec's policy (monitor, triggers,
cooldown, data selection, gate), never retraining, and retraining after every window. The metric
over time and the number of retrainings of each show what a policy buys and what it costs, before
it runs in production. Every training fits what the loop would retrain: with a store whose production
model was imported (or refit from an import), a fresh clone of that model's pipeline, as the loop
clones it; else the project file's model.estimator. Everything happens in memory; the store is only
read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from everloop.data import Profile, Schema
from everloop.errors import DataError, EverloopError
from everloop.monitor import DriftDetector, decay_threshold, estimate_interval, labelled_decay
from everloop.loop._controller import _template
from everloop.registry import PRODUCTION, alias_version, get_model
from everloop.spec import ProjectSpec
from everloop.store import Store
from everloop.train import (Fitted, allowed_loss, as_labels, bootstrap_labels, calibration_maps, fit, improvement,
                            score_labels)
from everloop.train._train import estimator_name

LABELLED = "__labelled__"  # which rows have a real label
ROW = "__row__"  # each row's position in the history: which rows a model trained on, exactly


@dataclass
class _Model:
    fitted: Fitted
    rows: pd.DataFrame  # what it was trained on (reference + recent), for the next data selection
    recent_from: int  # where the rows of its current world start in `rows`
    profile: Profile
    trained_at: Any  # the time (or window number) of its training, for the cooldown
    calibration: dict[str, Any] | None = None  # for estimated performance, as the live monitor has
    reference_draws: np.ndarray | None = None  # its metric bootstrapped over its held-out rows


@dataclass
class BacktestResult:
    metric: str
    windows: list[dict[str, Any]] = field(default_factory=list)
    retrainings: dict[str, int] = field(default_factory=dict)
    replays: str = "the project file's model.estimator"  # what every training fits (see `replayed`)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric, "windows": len(self.windows), "retrainings": self.retrainings,
                               "replays": self.replays}
        for strategy in ("policy", "never", "every_window"):
            values = [w[strategy] for w in self.windows if w[strategy] is not None and np.isfinite(w[strategy])]
            out[f"mean_{strategy}"] = float(np.mean(values)) if values else None
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "windows": self.windows}


def backtest(frame: pd.DataFrame, spec: ProjectSpec, *, initial_rows: int | None = None,
             window_rows: int | None = None, progress: Callable[[str], None] | None = None,
             store: Store | None = None) -> BacktestResult:
    """Replay `frame` (labelled; ordered by data.timestamp when there is one) through the policy.

    `store`: the project's store, read to replay what the loop retrains (`replayed`); without one, the
    project file's model.estimator. `BacktestResult.replays` says which (`progress` hears it first)."""
    template, replays = replayed(store, spec)
    if progress:
        progress(f"replays {replays}")
    if spec.data.timestamp and spec.data.timestamp in frame:
        frame = frame.sort_values(spec.data.timestamp, kind="stable")
    frame = frame.reset_index(drop=True)
    window_rows = window_rows or spec.monitoring.window.rows or 1000
    initial_rows = initial_rows or max(2 * window_rows, len(frame) // 5)
    if len(frame) < initial_rows + window_rows:
        raise DataError(f"{len(frame)} rows are too few to backtest: the first period takes {initial_rows} and each "
                        f"window {window_rows}; pass smaller --initial-rows / --window-rows")
    conformed, schema = _conform(frame, spec, initial_rows)
    kinds = {c.name: c.kind for c in schema.features}
    first = _train(conformed.iloc[:initial_rows], 0, schema, spec, kinds, when=_time(conformed, spec, 0),
                   template=template)
    result = BacktestResult(first.fitted.metric, retrainings={"policy": 0, "never": 0, "every_window": 0},
                            replays=replays)
    models = {"policy": first, "never": first, "every_window": first}
    starts = list(range(initial_rows, len(conformed) - window_rows + 1, window_rows))
    for n, start in enumerate(starts, start=1):
        window = conformed.iloc[start:start + window_rows]
        seen = conformed.iloc[:start + window_rows]
        row: dict[str, Any] = {"window": n, "start": str(window[spec.data.timestamp].iloc[0])
                               if spec.data.timestamp else start}
        for name, model in models.items():
            row[name] = _metric(model.fitted, window, schema, spec.monitoring.min_labelled_rows)
        row["labelled_rows"] = int(window[LABELLED].sum())
        policy = models["policy"]
        drift = DriftDetector.from_spec(spec.monitoring.drift).fit_profile(policy.profile).score(
            window[schema.feature_names])
        judged = len(window) >= spec.monitoring.min_rows
        fired = _fired(spec, policy, judged and drift.dataset_drift, window, schema, judged)
        row |= {"drifted_share": drift.drifted_share, "triggers": fired, "action": "idle",
                "reason": "no trigger fired"}
        last = n == len(starts)  # nothing is left to predict after the last window: no retraining
        if fired and last:
            row |= {"action": "end", "reason": f"{', '.join(fired)} fired after the last window"}
        elif fired and not _cooling(spec, policy, window, n):
            candidate = _retrain(policy, seen, window, schema, spec, kinds, n, template)
            if candidate is not None and _passes(candidate, policy, schema, spec):
                models["policy"] = candidate
                result.retrainings["policy"] += 1
                row |= {"action": "promoted", "reason": f"{', '.join(fired)} fired; the retrained model passed"}
            else:
                row |= {"action": "refused", "reason": f"{', '.join(fired)} fired; the retrained model "
                        + ("could not be trained" if candidate is None else "was refused by the gate")}
        elif fired:
            row |= {"action": "cooldown", "reason": f"{', '.join(fired)} fired within "
                    f"{spec.retraining.cooldown_minutes:g} min (data time) of the last retraining"}
        if not last and row["labelled_rows"]:  # a window without labels teaches nothing new
            every = _retrain(models["every_window"], seen, window, schema, spec, kinds, n, template)
            if every is not None:
                models["every_window"] = every
                result.retrainings["every_window"] += 1
        result.windows.append(row)
        if progress:
            progress(f"window {n}: policy {_fmt(row['policy'])}, never {_fmt(row['never'])}, every window "
                     f"{_fmt(row['every_window'])} ({row['labelled_rows']} labelled rows); {row['action']}")
    return result


def replayed(store: Store | None, spec: ProjectSpec) -> tuple[Any, str]:
    """What a backtest fits, as the loop would retrain the production model (`_controller._template`):
    (its pipeline, to clone, and "a fresh clone of model vN's pipeline ...") for a model imported or refit
    from an import; (None, "the project file's model.estimator ...") otherwise, or without a store or a
    production model."""
    named = spec.model.estimator.rpartition(".")[2] if spec.model.estimator else "HistGradientBoosting, the default"
    estimator = f"the project file's model.estimator ({named})"
    version = alias_version(store, PRODUCTION) if store is not None else None
    if version is None:
        return None, estimator + ("" if store is None else ": no model is in production")
    template, _ = _template(store, get_model(store, version))
    if template is None:
        return None, f"{estimator}, from which the loop retrains production model v{version}"
    return template, (f"a fresh clone of model v{version}'s pipeline (in production), as the loop retrains it: "
                      f"{estimator_name(template).rpartition('.')[2]} with its own preprocessing")


def write_backtest_report(path: Any, result: BacktestResult, title: str = "everloop backtest") -> Any:
    """The metric per window for each strategy, with the policy's retrainings marked."""
    import html
    from pathlib import Path

    import plotly.graph_objects as go

    x = [w["window"] for w in result.windows]
    fig = go.Figure()
    for name, label in (("policy", "the spec's policy"), ("never", "never retrain"),
                        ("every_window", "retrain every window")):
        fig.add_trace(go.Scatter(x=x, y=[w[name] for w in result.windows], mode="lines+markers",
                                 name=f"{label} ({result.retrainings[name]} retrainings)"))
    promoted = [w for w in result.windows if w["action"] == "promoted"]
    fig.add_trace(go.Scatter(x=[w["window"] for w in promoted], y=[w["policy"] for w in promoted], mode="markers",
                             marker={"symbol": "star", "size": 14}, name="policy retrained after this window"))
    fig.update_layout(title=f"{result.metric} per window (each model predicts a window before it may learn from it)",
                      xaxis_title="window", yaxis_title=result.metric, height=480)
    s = result.summary()
    cell = lambda v: html.escape(_fmt(v) if isinstance(v, float) or v is None else str(v))  # noqa: E731
    strategies = "".join(
        f"<tr><th>{label}</th><td>{cell(s[f'mean_{name}'])}</td><td>{s['retrainings'][name]}</td></tr>"
        for name, label in (("policy", "the spec's policy"), ("never", "never retrain"),
                            ("every_window", "retrain every window")))
    columns = ("window", "start", "labelled_rows", "policy", "never", "every_window", "drifted_share", "action",
               "reason")
    windows = "".join("<tr>" + "".join(f"<td>{cell(w.get(c))}</td>" for c in columns) + "</tr>"
                      for w in result.windows)
    style = "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left} table{border-collapse:collapse}"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head>"
            f"<body style='font-family:system-ui,sans-serif;margin:2em'><h1>{html.escape(title)}</h1>"
            f"<p>Each training fits {html.escape(result.replays)}.</p>"
            f"<p>{s['windows']} windows; mean {html.escape(result.metric)} per strategy (windows with too few "
            f"labels have none):</p><table><tr><th>strategy</th><th>mean {html.escape(result.metric)}</th>"
            f"<th>retrainings</th></tr>{strategies}</table>"
            f"{fig.to_html(full_html=False, include_plotlyjs='inline')}"
            f"<h2>Window by window</h2><table><tr>{''.join(f'<th>{c}</th>' for c in columns)}</tr>{windows}"
            f"</table></body></html>")
    Path(path).write_text(page, encoding="utf-8")
    return Path(path)


def _conform(frame: pd.DataFrame, spec: ProjectSpec, initial_rows: int) -> tuple[pd.DataFrame, Schema]:
    """The frame read through the schema inferred from its first period's labelled rows, with a column
    saying which rows have a real label: only those are ever scored or trained on."""
    target = spec.data.target
    if target not in frame:
        raise DataError(f"the backtest data have no column {target!r} (data.target)", column=target)
    labelled = frame[target].notna().to_numpy()
    if not labelled.any():
        raise DataError(f"no row of the backtest data has a label in {target!r}", column=target)
    schema = Schema.infer(frame.iloc[:initial_rows][labelled[:initial_rows]], spec)
    filled = frame.copy()
    # unlabelled rows are conformed with a stand-in label, which is dropped again right after
    filled.loc[~labelled, target] = frame.loc[labelled, target].iloc[0]
    conformed, report = schema.conform(filled, mode="dataset")
    if not report.ok:
        raise DataError("the data do not match the schema inferred from its first period:\n" + report.summary(),
                        report=report)
    conformed[LABELLED] = labelled
    conformed[ROW] = np.arange(len(conformed))
    return conformed, schema


def _train(rows: pd.DataFrame, recent_from: int, schema: Schema, spec: ProjectSpec, kinds: dict[str, str],
           when: Any, template: Any = None) -> _Model:
    """Fit on the labelled rows only (a clone of `template` when given, as `fit` does); the drift
    reference is every row of the current world."""
    keep = rows[LABELLED].to_numpy()
    recent_labelled = int(keep[:recent_from].sum())
    fitted = fit(rows[keep].drop(columns=LABELLED), schema, spec, recent_from_row=recent_labelled,
                 recent_weight=spec.retraining.data.recent_weight, template=template)
    profile = Profile.reference(rows.iloc[recent_from:][schema.feature_names], kinds)
    held_out = fitted.eval_rows.assign(**{LABELLED: True})
    scored = _scored(fitted, held_out, schema, 1)
    draws = bootstrap_labels(fitted.metric, *scored, fitted.classes) if scored else None
    calibration = None
    if fitted.task == "classification":
        calibration = calibration_maps(fitted.pipeline.predict_proba(held_out[schema.feature_names]), fitted.y_eval)
    return _Model(fitted, rows.reset_index(drop=True), recent_from, profile, when, calibration, draws)


def _retrain(current: _Model, seen: pd.DataFrame, window: pd.DataFrame, schema: Schema, spec: ProjectSpec,
             kinds: dict[str, str], n: int, template: Any = None) -> _Model | None:
    """The spec's data selection: the latest recent_rows labelled rows, after the current model's own
    training rows when include_reference is set."""
    recent = seen[seen[LABELLED].to_numpy()]
    if spec.retraining.data.include_reference:  # rows the current model was given are not taken twice
        recent = recent[~recent[ROW].isin(current.rows[ROW])]
    recent = recent.iloc[-spec.retraining.data.recent_rows:]
    if spec.retraining.data.include_reference:  # as the live loop: the current model's whole training data
        rows = pd.concat([current.rows, recent], ignore_index=True)
        recent_from = len(current.rows)
    else:
        rows, recent_from = recent.reset_index(drop=True), 0
    try:
        return _train(rows, recent_from, schema, spec, kinds, when=_time(window, spec, -1, n), template=template)
    except EverloopError:
        return None


def _passes(candidate: _Model, current: _Model, schema: Schema, spec: ProjectSpec) -> bool:
    """The live gate's rules: beat the baseline and reach min_metric on the candidate's held-out rows,
    and lose no more than max_regression against the current model on the rows neither trained on
    (both models' held-out rows minus both training sets); too few of those refuses, as live."""
    metric = candidate.fitted.metric
    mine = candidate.fitted.metrics[metric]
    if not np.isfinite(mine) or improvement(metric, mine, candidate.fitted.baseline[metric]) <= 0:
        return False
    if spec.promotion.min_metric is not None and improvement(metric, mine, spec.promotion.min_metric) < 0:
        return False
    held_out = pd.concat([candidate.fitted.eval_rows, current.fitted.eval_rows]).drop_duplicates(ROW)
    trained = pd.concat([candidate.fitted.train_rows[ROW], current.fitted.train_rows[ROW]])
    rows = held_out[~held_out[ROW].isin(trained)].assign(**{LABELLED: True})
    if len(rows) < spec.promotion.min_comparison_rows:
        return False
    a, b = _metric(candidate.fitted, rows, schema, 1), _metric(current.fitted, rows, schema, 1)
    if a is None or b is None or not (np.isfinite(a) and np.isfinite(b)):
        return False
    return improvement(metric, b, a) <= allowed_loss(spec.promotion.max_regression, b)


def _fired(spec: ProjectSpec, model: _Model, drifted: bool, window: pd.DataFrame, schema: Schema,
           judged: bool) -> list[str]:
    """The live loop's triggers on one window, by the monitor's own rules: drift (when judged),
    performance on the window's real labels (enough of them, and decayed beyond the uncertainty of
    both the window and the training value), estimated performance (the whole interval worse)."""
    triggers, fired = spec.retraining.triggers, []
    metric = model.fitted.metric
    expected = model.fitted.metrics[metric]
    threshold, _ = decay_threshold(spec, metric, expected)
    if "drift" in triggers and drifted:
        fired.append("drift")
    scored = _scored(model.fitted, window, schema, spec.monitoring.min_labelled_rows)
    if "performance" in triggers and scored is not None:
        value = score_labels(metric, *scored, model.fitted.classes)
        if np.isfinite(value):
            draws = bootstrap_labels(metric, *scored, model.fitted.classes)
            reference = model.reference_draws if model.reference_draws is not None else np.empty(0)
            if labelled_decay(spec, metric, expected, value, draws, reference)["decayed"]:
                fired.append("performance")
    if "estimated_performance" in triggers and judged and model.fitted.task == "classification":
        proba = model.fitted.pipeline.predict_proba(window[schema.feature_names])
        estimate = estimate_interval(metric, proba, model.calibration)
        if estimate is not None and estimate.worse_than(threshold, metric):
            fired.append("estimated_performance")
    if "schedule" in triggers or "new_labels" in triggers:
        fired.append("schedule" if "schedule" in triggers else "new_labels")  # every window brings new labels
    return fired


def _cooling(spec: ProjectSpec, model: _Model, window: pd.DataFrame, n: int) -> bool:
    """Within the cooldown of the policy's last retraining, in the data's time: the decision on a window
    is taken when its last row has been seen."""
    if not spec.data.timestamp or not isinstance(model.trained_at, pd.Timestamp):
        return False
    now = window[spec.data.timestamp].iloc[-1]
    return (now - model.trained_at).total_seconds() < spec.retraining.cooldown_minutes * 60


def _time(frame: pd.DataFrame, spec: ProjectSpec, position: int, n: int = 0) -> Any:
    if spec.data.timestamp and spec.data.timestamp in frame and len(frame):
        return frame[spec.data.timestamp].iloc[position]
    return n


def _scored(fitted: Fitted, rows: pd.DataFrame, schema: Schema,
            min_labelled: int) -> tuple[Any, np.ndarray, np.ndarray | None] | None:
    """(truth, predicted, proba) on the rows' real labels (classes the model never saw left out);
    None with fewer than `min_labelled` of them."""
    rows = rows[rows[LABELLED].to_numpy()]
    if len(rows) < min_labelled:
        return None
    features = rows[schema.feature_names]
    target = rows[schema.target.name]
    if fitted.task == "classification":
        y = as_labels(target)
        proba = fitted.pipeline.predict_proba(features)
        known = np.isin(y, np.asarray(fitted.classes, dtype=object))
        if not known.all():  # a class the model never saw cannot be scored
            y, proba = y[known], proba[known]
        return y, np.asarray(fitted.classes, dtype=object)[proba.argmax(axis=1)], proba
    return target.to_numpy(), fitted.pipeline.predict(features), None


def _metric(fitted: Fitted, rows: pd.DataFrame, schema: Schema, min_labelled: int) -> float | None:
    """The metric on the rows' real labels; None with fewer than `min_labelled` of them."""
    scored = _scored(fitted, rows, schema, min_labelled)
    return None if scored is None else score_labels(fitted.metric, *scored, fitted.classes)


def _fmt(value: float | None) -> str:
    return "not judged" if value is None or not np.isfinite(value) else f"{value:.4f}"
