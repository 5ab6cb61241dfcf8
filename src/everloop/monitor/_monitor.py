"""Monitoring a model's served predictions: data drift, prediction drift, training-serving skew,
performance (on real labels, and estimated without them), and system health.

Two windows, because labels arrive late:
- the **drift window** is a block of `monitoring.window.rows` predictions (or a period of
  `monitoring.window.minutes` of their own time; see `_windows`): drift, prediction drift, skew,
  estimated performance and health are judged on it;
- the **labelled window** is the latest `monitoring.performance.labelled_rows` predictions that have
  a real label, however old: the metric is computed on exactly those rows, never on rows whose
  label has not arrived.
No verdict is given without enough rows (`min_rows`, `min_labelled_rows`); what could not be judged
is said, with the reason, in `not_judged`, and the status is then "not judged", never "healthy".

Windows are read from the prediction log in batches and folded into profiles and small accumulators,
so a window of any size is monitored in constant memory; the reference side was profiled once, at
training, and is stored with the model.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from everloop._jsonable import jsonable
from everloop.data import Profile
from everloop.errors import SpecError, StoreError
from everloop.monitor import _windows
from everloop.monitor._drift import ColumnDrift, DriftDetector, DriftReport, unknown_settings
from everloop.monitor._estimate import estimate_interval
from everloop.monitor._health import health_alerts, service_errors
from everloop.monitor._report import coarse_distributions
from everloop.monitor._skew import replay_skew, skew_alert
from everloop.registry import PRODUCTION, load_model
from everloop.spec import ProjectSpec, redact_text, redact_url, resolve_env
from everloop.store import Store, prediction_log
from everloop.train import (TrainedModel, allowed_loss, bootstrap_labels, describe_tolerance, higher_is_better,
                            improvement, score_labels, valid_labels)

log = logging.getLogger("everloop.monitor")
READ_BATCH = 20_000
LATENCY_BUCKETS_MS = np.concatenate([[0], np.geomspace(0.05, 60_000, 400)])
WEBHOOK_ENV = "EVERLOOP_WEBHOOK_URL"
DEFAULT_LABELLED_ROWS = 5000
ALERT_KINDS = ("drift", "decay", "prediction drift", "skew", "health")


@dataclass
class MonitorResult:
    """One judged window. `status` is "no data", the alerting kinds joined by "+" (e.g. "drift+decay"),
    "not judged" (no alert, but a signal could not be judged: see `not_judged`), or "healthy"."""

    model_version: int
    window: dict[str, Any]
    drift: DriftReport | None
    prediction_drift: ColumnDrift | None
    performance: dict[str, Any]
    health: dict[str, Any]
    skew: dict[str, Any] = field(default_factory=dict)
    distributions: dict[str, Any] = field(default_factory=dict)  # coarse reference vs window, for reports
    # the model's scores (positive-class probability, or the predicted value), coarse reference vs window
    prediction_distribution: dict[str, Any] = field(default_factory=dict)
    alerts: list[str] = field(default_factory=list)
    not_judged: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # reported, not alerts (e.g. ignored settings)
    delivered: list[str] = field(default_factory=list)  # alert kinds the webhook has received for the window
    # earlier windows this run judged for the first time (a batch job logs several at once) that alerted:
    # {"window", "status", "alerts", "drift"}; their alerts are in `alerts` too, naming their window
    earlier: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)

    @property
    def status(self) -> str:
        if not self.window["rows"]:
            return "no data"
        kinds = [k for k in ALERT_KINDS if any(a.split(":")[0].split(" (")[0] == k for a in self.alerts)]
        if kinds:
            return "+".join(k.replace(" ", "_") for k in kinds)
        return "not judged" if self.not_judged else "healthy"

    @property
    def ok(self) -> bool:
        return not self.alerts

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"status": self.status, "model_version": self.model_version, "created_at": self.created_at,
                         "window": self.window, "alerts": self.alerts, "not_judged": self.not_judged,
                         "notes": self.notes, "delivered": self.delivered,
                         "drift": self.drift.to_dict() if self.drift else None,
                         "prediction_drift": self.prediction_drift.__dict__ if self.prediction_drift else None,
                         "performance": self.performance, "health": self.health, "skew": self.skew,
                         "distributions": self.distributions, "prediction_distribution": self.prediction_distribution,
                         "earlier": self.earlier})


def monitor(store: Store, spec: ProjectSpec, *, model: int | str = PRODUCTION, record: bool = True,
            notify: bool = True) -> MonitorResult:
    """Judge the model's current window (and any complete window not judged yet) against what it was
    trained on; returns the current window's result.

    The current window is the block (or period) still filling up once it holds `monitoring.min_rows`
    predictions, else the latest complete one. With `record`, each judged window's result is stored in
    `monitor_runs` under the window's key, replacing an earlier result for the same rows. With
    `notify`, the current window's alerts are POSTed to the webhook.

    Raises NotFoundError (no such model or alias) and StoreError (a model without reference profiles)."""
    trained = load_model(store, model)
    plan, current = _windows.plan(store, spec, trained.version, recorded=_recorded_complete(store, trained.version))
    if current is None:
        result = MonitorResult(trained.version, {"rows": 0, "labelled_rows": 0}, None, None,
                               {"labelled_rows": 0}, {}, not_judged={"all": "no predictions logged yet"})
        return result
    references = reference_profiles(store, trained)
    cache: dict[str, Any] = {}  # what every judged window of this model shares, computed once
    out = None
    earlier: list[MonitorResult] = []
    for window in plan:
        result = judge(store, spec, trained, window, references, latest=window is current, cache=cache)
        if window is not current and result.alerts:
            earlier.append(result)
        if window is current:
            out = result
            # Complete windows judged here for the first time alert too: a batch job logs many windows at
            # once, and a shift inside it must not be reported as healthy because the last window is.
            for past in earlier:
                where = f"window {past.window['index']} (rows {past.window['rows']}, judged now)"
                out.alerts += [f"{_kind(a)}: in {where}: {a.partition(': ')[2]}" for a in past.alerts]
                out.earlier.append({"window": past.window, "status": past.status, "alerts": past.alerts,
                                    "dataset_drift": bool(past.drift and past.drift.dataset_drift
                                                          and "drift" not in past.not_judged)})
            # a window pages once per kind of alert (drift, decay, ...): a loop turning every few seconds
            # over the same rows, or a window filling up with the same drift, does not page again; a
            # delivery that failed is tried again on the next run
            delivered = _stored_delivered(store, trained.version, window.key)
            new = sorted({_kind(a) for a in result.alerts} - delivered)
            if notify and new and send_alert(spec, {"event": "monitor", "status": result.status,
                                                    "model_version": result.model_version, "new": new,
                                                    "alerts": result.alerts, "window": result.window}):
                delivered |= set(new)
            result.delivered = sorted(delivered)
        if record:
            _record(store, result, window)
    return out


def _kind(alert: str) -> str:
    return alert.split(":")[0]


def judge(store: Store, spec: ProjectSpec, trained: TrainedModel, window: _windows.Window,
          references: tuple[Profile, Profile] | None = None, *, latest: bool = True,
          cache: dict[str, Any] | None = None) -> MonitorResult:
    """Every signal of one window; nothing stored. With `latest`, performance is judged on the latest
    labels of all; otherwise (a past window) on those of predictions up to the window's end. `cache`
    keeps what several windows of one model share (the training value's bootstrap) between calls."""
    m = spec.monitoring
    profile, prediction_profile = references or reference_profiles(store, trained)
    counted = profile.window([])
    scores = prediction_profile.window([])
    acc = _Accumulator(trained, m.skew.sample_rows)
    for rows in _windows.read(store, window, trained.version, READ_BATCH):
        for name, column in counted.columns.items():
            if name in rows.features:
                column.update(rows.features[name])
        scores.columns["prediction"].update(_prediction_scores(trained, rows.outputs))
        acc.update(rows)
    info = window.to_dict() | acc.window_info()
    result = MonitorResult(trained.version, info, None, None, {}, {})
    before_seq = None if latest or acc.last_seq is None else acc.last_seq + 1
    result.performance = _labelled_performance(store, spec, trained, before_seq, result,
                                               {} if cache is None else cache)
    if not acc.rows:
        result.not_judged["drift"] = "no predictions in this window"
        return result
    judged = acc.rows >= m.min_rows
    detector = DriftDetector.from_spec(m.drift)
    result.drift = detector.fit_profile(profile).score_profile(counted)
    unknown = unknown_settings(m.drift, list(profile.columns))
    if unknown:
        result.notes.append(f"monitoring.drift names {', '.join(unknown)}, which the model does not use as "
                            "features: those settings have no effect")
    result.prediction_drift = DriftDetector(m.drift.prediction.p_value, m.drift.prediction.min_effect).fit_profile(
        prediction_profile).score_profile(scores).columns[0]
    result.distributions = coarse_distributions(profile, counted, _most_drifted(result.drift))
    result.prediction_distribution = coarse_distributions(prediction_profile, scores, ["prediction"]).get("prediction", {})
    _estimated_performance(spec, trained, acc, result, judged)
    result.skew = replay_skew(trained, acc.sample_features(), acc.sample_outputs, max_rows=m.skew.sample_rows,
                              tolerance=m.skew.tolerance)
    result.health = acc.health() | service_errors(store, acc.first_at, acc.last_at)
    requests = result.health.get("requests") or 0
    if requests < m.health.min_requests:  # said, but not a reason to withhold "healthy" on drift and labels
        result.notes.append(f"health: {requests} requests in the window's time, fewer than "
                            f"monitoring.health.min_requests {m.health.min_requests}: error rates not judged")
    alerts: list[tuple[str, str]] = []
    if not judged:
        result.not_judged["drift"] = (f"{acc.rows} predictions in this window, fewer than monitoring.min_rows "
                                      f"{m.min_rows}: drift not judged yet")
    else:
        d = result.drift
        if d.dataset_drift:
            text = (f"drift: {len(d.drifted)} of {d.counted} features drifted ({d.drifted_share:.0%}; the "
                    f"dataset drifts above {m.drift.max_drifted_share:.0%}): {', '.join(d.drifted)}")
            if d.severe:
                columns = {c.column: c for c in d.columns}
                text += "; by itself, as each moved by at least drift.severe_effect " + \
                        f"{m.drift.severe_effect:g}: " + ", ".join(
                            f"{n} ({'/'.join(columns[n].reasons)}, effect {columns[n].severity:.2f})" for n in d.severe)
            alerts.append(("drift", text))
        p = result.prediction_drift
        if p.drifted:
            alerts.append(("prediction_drift", f"prediction drift: the model's "
                           f"{'scores' if p.kind != 'categorical' else 'predicted classes'} moved from those on "
                           f"its reference rows (effect {p.effect:.3f}, p={p.p_value:.2g})"))
    perf = result.performance
    if perf.get("decayed"):
        alerts.append(("decay", f"decay: {perf['metric']} {perf['value']:.4f} on the latest "
                                f"{perf['labelled_rows']} labelled predictions; {perf['why']}"))
    if perf.get("estimated_decayed"):
        alerts.append(("estimated_decay", f"decay (estimated without labels): {perf['metric']} "
                                          f"{perf['estimated']:.4f} (90% interval {perf['estimated_low']:.4f}.."
                                          f"{perf['estimated_high']:.4f}); {perf['estimated_why']}"))
    text = skew_alert(result.skew, spec)
    if text:
        alerts.append(("skew", text))
    alerts += [("health", a) for a in health_alerts(result.health, spec)]
    for kind, text in alerts:
        (result.alerts if kind in m.alert_on else result.notes).append(text)
    return result


def reference_profiles(store: Store, trained: TrainedModel) -> tuple[Profile, Profile]:
    """The profiles of the model's training rows and of its held-out scores, stored with it at training."""
    stored = trained.manifest.get("monitoring", {})
    if "profile" not in stored:
        raise StoreError(f"model v{trained.version} has no reference profile (it was trained by an older "
                         "development build); retrain it")
    return (Profile.from_dict(store.get_json(stored["profile"])),
            Profile.from_dict(store.get_json(stored["prediction_profile"])))


def list_runs(store: Store, limit: int = 100, model_version: int | None = None) -> list[dict[str, Any]]:
    """The latest `limit` judged windows (results as dicts), oldest first; one per window."""
    t = store.tables.monitor_runs
    query = sa.select(t.c.result).order_by(t.c.id.desc()).limit(limit)
    if model_version is not None:
        query = query.where(t.c.model_version == model_version)
    with store.engine.connect() as conn:
        rows = conn.execute(query).scalars().all()
    return list(reversed(rows))


def send_alert(spec: ProjectSpec, payload: dict[str, Any]) -> bool:
    """POST `payload` as JSON to the webhook (monitoring.webhook or EVERLOOP_WEBHOOK_URL), if one is set.
    A failure is logged, never raised: alerting must not break monitoring. `${NAME}` references in
    the URL are read from the environment now; the log shows the URL and the error with secrets redacted."""
    url = spec.monitoring.webhook or os.environ.get(WEBHOOK_ENV)
    if not url:
        return False
    import httpx

    try:
        httpx.post(resolve_env(url, "monitoring.webhook"), json=jsonable(payload), timeout=5).raise_for_status()
        return True
    except SpecError as exc:
        log.warning("alert not sent: %s", exc)
        return False
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # its message may carry the URL: redacted too
        log.warning("alert webhook %s failed: %s", redact_url(url), redact_text(str(exc)))
        return False


def labelled_rows_limit(spec: ProjectSpec) -> int:
    """How many of the latest labelled predictions the performance window holds."""
    m = spec.monitoring
    return m.performance.labelled_rows or m.window.rows or DEFAULT_LABELLED_ROWS


def decay_threshold(spec: ProjectSpec, metric: str, expected: float,
                    against_training: bool = True) -> tuple[float | None, list[str]]:
    """The worst value of `metric` that is not decay, and the rules it comes from (texts with units);
    (None, []) when no rule applies. `against_training=False` (a model whose training value was
    measured on rows it may have trained on) leaves only min_metric."""
    perf = spec.monitoring.performance
    sign = 1 if higher_is_better(metric) else -1
    candidates = []
    if against_training:
        candidates.append((expected - sign * allowed_loss(perf.max_drop, expected),
                           f"allowed worsening from training's {expected:.4f}: "
                           f"{describe_tolerance(perf.max_drop, expected, metric)} (monitoring.performance.max_drop)"))
    if perf.min_metric is not None:
        candidates.append((perf.min_metric, f"monitoring.performance.min_metric {perf.min_metric}"))
    if not candidates:
        return None, []
    # the stricter rule is the one demanding the better value
    threshold = max(c[0] for c in candidates) if sign > 0 else min(c[0] for c in candidates)
    return threshold, [c[1] for c in candidates]


def _in_sample(trained: TrainedModel, result: MonitorResult) -> bool:
    """An imported model's metrics may come from rows it trained on: too good to judge decay against."""
    if not trained.manifest.get("in_sample"):
        return False
    note = (f"model v{trained.version} was imported and its metrics were measured on rows it may have "
            "trained on: decay against them is not judged (only monitoring.performance.min_metric); import "
            "with --held-out rows to judge it")
    if note not in result.notes:
        result.notes.append(note)
    return True


# -- pieces ---------------------------------------------------------------------------------------


def _labelled_performance(store: Store, spec: ProjectSpec, trained: TrainedModel, before_seq: int | None,
                          result: MonitorResult, cache: dict[str, Any]) -> dict[str, Any]:
    """The metric on the latest labelled predictions of the model (before `before_seq`, for a past
    window): only rows with a real label that is valid for the model count."""
    metric = trained.manifest["metric"]
    expected = trained.manifest["metrics"][metric]
    limit = labelled_rows_limit(spec)
    logged, raw = prediction_log.latest_labelled(store.engine, limit, trained.version, before_seq=before_seq)
    keep, labels = valid_labels(trained.task, trained.classes, raw)
    invalid = len(raw) - len(labels)
    out: dict[str, Any] = {"metric": metric, "expected": expected, "labelled_rows": len(labels),
                           "window_rows": limit, "value": None, "decayed": False}
    if invalid:
        out["invalid_labels"] = invalid
        result.notes.append(f"{invalid} stored labels are not valid for model v{trained.version} and were "
                            "left out of its performance")
    if len(keep):
        out["from"], out["to"] = float(logged.created_at[keep[0]]), float(logged.created_at[keep[-1]])
    outputs = [logged.outputs[n] for n in keep]
    predicted = [o["prediction"] for o in outputs]
    proba = None
    if trained.task == "classification" and outputs:
        proba = _answered_proba(trained, outputs)
        proba /= proba.sum(axis=1, keepdims=True)  # logged rounded to 6 decimals; log loss wants sums of 1
    return judge_labelled(store, spec, trained, labels, predicted, proba, result, cache, out)


def judge_labelled(store: Store, spec: ProjectSpec, trained: TrainedModel, labels: list[Any],
                   predicted: list[Any], proba: np.ndarray | None, result: MonitorResult,
                   cache: dict[str, Any] | None = None, out: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's metric on labelled rows and the decay verdict on it, as the monitor judges its
    labelled window: `monitoring.min_labelled_rows`, the 90% bootstrap intervals of `labelled_decay`,
    `decay_threshold`'s rules and the trivial baseline.

    `labels` are valid labels (see `everloop.train.valid_labels`), `predicted` the model's prediction
    for each, `proba` its class probabilities (rows x classes, rows summing to 1, the manifest's class
    order; None for regression). `result` receives what could not be judged (`not_judged`) and notes;
    `cache` keeps the training value's bootstrap between calls for one model; `out` holds keys to
    return beside the verdict. Returns `out` with metric, expected, labelled_rows, value, decayed and
    why, and once judged threshold, rules, allowed_drop and `labelled_decay`'s intervals. Raises
    NotFoundError or IntegrityError (everloop.errors) when the model's evaluation rows cannot be read."""
    metric = trained.manifest["metric"]
    expected = trained.manifest["metrics"][metric]
    cache = {} if cache is None else cache
    if out is None:
        out = {"metric": metric, "expected": expected, "labelled_rows": len(labels), "value": None,
               "decayed": False}
    need = spec.monitoring.min_labelled_rows
    if len(labels) < need:
        out["why"] = (f"fewer than {need} labelled rows ({len(labels)}): performance not judged yet")
        result.not_judged["performance"] = out["why"]
        return out
    if trained.task == "classification":
        value = score_labels(metric, labels, predicted, proba, trained.classes)
    else:
        value = score_labels(metric, labels, predicted)
    out["value"] = value
    if not np.isfinite(value):
        present = sorted({str(v) for v in labels})
        if trained.task == "classification" and len(present) < 2:
            out["why"] = (f"{metric} is undefined on one class: all {len(labels)} labelled rows are "
                          f"{present[0]!r}; performance not judged")
        else:
            out["why"] = f"{metric} is undefined on these {len(labels)} labelled rows; performance not judged"
        result.not_judged["performance"] = out["why"]
        return out
    in_sample = _in_sample(trained, result)
    threshold, rules = decay_threshold(spec, metric, expected, not in_sample)
    out["threshold"], out["rules"] = threshold, rules
    out["allowed_drop"] = allowed_loss(spec.monitoring.performance.max_drop, expected)
    names = trained.classes if trained.task == "classification" else None
    window_draws = bootstrap_labels(metric, labels, predicted, proba if names else None, names)
    if in_sample:
        reference = np.empty(0)
    else:
        if "reference_draws" not in cache:
            cache["reference_draws"] = _reference_draws(store, trained)
        reference = cache["reference_draws"]
    out |= labelled_decay(spec, metric, expected, value, window_draws, reference)
    baseline = trained.manifest.get("baseline", {}).get(metric)
    if not out["decayed"] and baseline is not None and "value_low" in out:
        # worse than predicting the majority class (or the mean) is decay whatever else is known
        favourable = out["value_high"] if higher_is_better(metric) else out["value_low"]
        if improvement(metric, favourable, baseline) < 0:
            out["decayed"] = True
            out["why"] = (f"worse than the trivial baseline's {baseline:.4f} even at the favourable end of its "
                          f"90% interval ({favourable:.4f})")
    if "value_low" not in out:
        result.not_judged["performance"] = out["why"]
    return out


def labelled_decay(spec: ProjectSpec, metric: str, expected: float, value: float, window_draws: np.ndarray,
                   reference_draws: np.ndarray) -> dict[str, Any]:
    """Decay on real labels, judged with the uncertainty of both numbers: the window's metric
    (`window_draws`: its bootstrap distribution) and the training value it is compared with
    (`reference_draws`: the model's metric bootstrapped over its held-out rows). Decay only when the
    loss is beyond the allowed drop (or the metric below min_metric) even at the favourable end of a
    90% interval: a window of 100 labels from unchanged traffic differs from a 400-row evaluation by
    chance more often than not, and a point comparison called that decay (about 40% of such windows).
    Returns {decayed, why, value_low, value_high, loss, loss_low, loss_high}."""
    perf = spec.monitoring.performance
    out: dict[str, Any] = {"decayed": False}
    if not len(window_draws):
        out["why"] = f"{metric} {value:.4f}; its uncertainty could not be estimated: not judged"
        return out
    better, worse = (95, 5) if higher_is_better(metric) else (5, 95)
    out["value_low"], out["value_high"] = (float(np.percentile(window_draws, q)) for q in (5, 95))
    reasons = []
    allowed = allowed_loss(perf.max_drop, expected)
    if len(reference_draws):
        rng = np.random.default_rng(1)
        pairs = min(len(window_draws), len(reference_draws))
        losses = improvement(metric, rng.permutation(reference_draws)[:pairs], window_draws[:pairs])
        low, high = float(np.percentile(losses, 5)), float(np.percentile(losses, 95))
        out |= {"loss": improvement(metric, expected, value), "loss_low": low, "loss_high": high}
        if low > allowed:
            reasons.append(f"worse than at training ({expected:.4f}) by {out['loss']:.4f} (90% interval "
                           f"{low:.4f}..{high:.4f}), more than the allowed "
                           f"{describe_tolerance(perf.max_drop, expected, metric)} (monitoring.performance.max_drop)")
    favourable = float(np.percentile(window_draws, better))
    if perf.min_metric is not None and improvement(metric, favourable, perf.min_metric) < 0:
        reasons.append(f"below monitoring.performance.min_metric {perf.min_metric} even at the favourable end "
                       f"of its 90% interval ({favourable:.4f})")
    out["decayed"] = bool(reasons)
    out["why"] = "; ".join(reasons) if reasons else (
        f"within thresholds, or too uncertain to say ({metric} {value:.4f}, 90% interval "
        f"{out['value_low']:.4f}..{out['value_high']:.4f}; training {expected:.4f})")
    return out


def _reference_draws(store: Store, trained: TrainedModel) -> np.ndarray:
    """The model's metric on its own held-out rows, bootstrapped: how well the training value is known."""
    manifest = trained.manifest
    frame = store.get_frame(manifest["eval_artifact"])
    if not len(frame):
        return np.empty(0)
    predictions = trained.predict(frame)
    return bootstrap_labels(manifest["metric"], frame[manifest["target"]], predictions.labels, predictions.proba,
                            trained.classes if trained.task == "classification" else None)


def _estimated_performance(spec: ProjectSpec, trained: TrainedModel, acc: "_Accumulator", result: MonitorResult,
                           judged: bool) -> None:
    """CBPE on every row of the window (classifiers), with its sampling interval: decay only when the
    whole interval is worse than the threshold."""
    perf = result.performance
    perf |= {"estimated": None, "estimated_low": None, "estimated_high": None, "estimated_decayed": False}
    if not acc.proba:
        return
    metric = perf["metric"]
    calibration = trained.manifest.get("monitoring", {}).get("calibration")
    estimate = estimate_interval(metric, np.vstack(acc.proba), calibration)
    if estimate is None or not np.isfinite(estimate.value):
        return
    perf |= {"estimated": estimate.value, "estimated_low": estimate.low, "estimated_high": estimate.high}
    if not judged:
        perf["estimated_why"] = f"{acc.rows} predictions, fewer than monitoring.min_rows: not judged"
        return
    threshold, rules = decay_threshold(spec, metric, perf["expected"], not _in_sample(trained, result))
    if threshold is None:
        perf["estimated_why"] = "no threshold to judge against (see notes)"
        return
    perf["estimated_decayed"] = bool(estimate.worse_than(threshold, metric))
    perf["estimated_why"] = (f"even the interval's best end is worse than {threshold:.4f} ({'; '.join(rules)})"
                             if perf["estimated_decayed"] else
                             f"within thresholds, or too uncertain to say (worst allowed {threshold:.4f})")


class _Accumulator:
    """Scores, latencies, times and a uniform sample of rows of a window, folded in batch by batch."""

    def __init__(self, trained: TrainedModel, sample_rows: int, seed: int = 0):
        self.trained = trained
        self.rows = 0
        self.first_seq = self.last_seq = None
        self.first_at = self.last_at = None
        self.latency = np.zeros(len(LATENCY_BUCKETS_MS) + 1, dtype=np.int64)
        self.proba: list[np.ndarray] = []  # every row's probabilities, for estimation without labels
        self.sample_rows = sample_rows
        self.rng = np.random.default_rng(seed)
        self.sample_keys = np.empty(0)
        self.sample: list[pd.DataFrame] = []
        self.sample_outputs: list[dict[str, Any]] = []

    def update(self, rows: prediction_log.LoggedRows) -> None:
        n = len(rows)
        self.rows += n
        self.first_seq = self.first_seq if self.first_seq is not None else int(rows.batch_seq[0])
        self.last_seq = int(rows.batch_seq[-1])
        lo, hi = float(rows.created_at.min()), float(rows.created_at.max())
        self.first_at = lo if self.first_at is None else min(self.first_at, lo)
        self.last_at = hi if self.last_at is None else max(self.last_at, hi)
        latency = rows.latency_ms[~np.isnan(rows.latency_ms)]  # batch jobs' rows have none (NaN)
        self.latency += np.bincount(np.searchsorted(LATENCY_BUCKETS_MS, latency), minlength=len(self.latency))
        if self.trained.task == "classification":
            self.proba.append(_answered_proba(self.trained, rows.outputs))
        self._sample(rows)

    def _sample(self, rows: prediction_log.LoggedRows) -> None:
        """Keep the rows with the smallest random keys seen so far: a uniform sample of the window."""
        keys = np.concatenate([self.sample_keys, self.rng.random(len(rows))])
        frame = pd.concat(self.sample + [rows.features], ignore_index=True) if self.sample else rows.features
        outputs = self.sample_outputs + rows.outputs
        if len(keys) > self.sample_rows:
            keep = np.sort(np.argpartition(keys, self.sample_rows - 1)[: self.sample_rows])
            keys, frame = keys[keep], frame.iloc[keep].reset_index(drop=True)
            outputs = [outputs[i] for i in keep]
        self.sample_keys, self.sample, self.sample_outputs = keys, [frame], outputs

    def sample_features(self) -> pd.DataFrame:
        return self.sample[0] if self.sample else pd.DataFrame()

    def window_info(self) -> dict[str, Any]:
        return {"rows": self.rows, "from": self.first_at, "to": self.last_at, "first_seq": self.first_seq,
                "last_seq": self.last_seq}

    def health(self) -> dict[str, Any]:
        span = (self.last_at - self.first_at) if self.rows else 0.0
        out = {"rows": self.rows, "rows_per_second": self.rows / span if span > 0 else None}
        for q in (50, 95, 99):
            out[f"latency_ms_p{q}"] = _quantile_from_counts(self.latency, LATENCY_BUCKETS_MS, q / 100)
        return out


def _answered_proba(trained: TrainedModel, outputs: list[dict[str, Any]]) -> np.ndarray:
    """The class probabilities the service answered (rows x classes, in the model's class order)."""
    names = [str(c) for c in trained.classes]
    return np.array([[o["probabilities"][c] for c in names] for o in outputs], dtype=float)


def _most_drifted(drift: DriftReport, top: int = 6) -> list[str]:
    ranked = sorted(drift.columns, key=lambda c: -(c.effect if np.isfinite(c.effect) else 0))
    return [c.column for c in ranked[:top]]


def _prediction_scores(trained: TrainedModel, predictions: list[dict[str, Any]]) -> pd.Series:
    """What prediction drift is measured on: P(positive class) for binary, the class for multiclass,
    the value for regression."""
    if trained.task == "regression":
        return pd.Series([p["prediction"] for p in predictions], dtype=float)
    if len(trained.classes) == 2:
        positive = str(trained.classes[1])
        return pd.Series([p["probabilities"][positive] for p in predictions], dtype=float)
    return pd.Series([str(p["prediction"]) for p in predictions], dtype=object)


def _quantile_from_counts(counts: np.ndarray, edges: np.ndarray, q: float) -> float | None:
    total = counts.sum()
    if not total:
        return None
    index = int(np.searchsorted(np.cumsum(counts), q * total))
    return float(edges[min(index, len(edges) - 1)])


def _recorded_complete(store: Store, model_version: int) -> set[str]:
    t = store.tables.monitor_runs
    with store.engine.connect() as conn:
        return set(conn.execute(sa.select(t.c.window_key).where(t.c.model_version == model_version,
                                                                t.c.complete.is_(True))).scalars())


def _stored_delivered(store: Store, model_version: int, key: str) -> set[str]:
    """The alert kinds already delivered to the webhook for this window."""
    t = store.tables.monitor_runs
    with store.engine.connect() as conn:
        stored = conn.execute(sa.select(t.c.result).where(t.c.model_version == model_version,
                                                          t.c.window_key == key)).scalar()
    return set((stored or {}).get("delivered") or [])


def _record(store: Store, result: MonitorResult, window: _windows.Window) -> None:
    """Store the window's result, replacing an earlier result for the same rows."""
    t = store.tables.monitor_runs
    values = {"model_version": result.model_version, "result": result.to_dict(), "window_key": window.key,
              "complete": window.complete, "created_at": time.time()}
    with store.engine.begin() as conn:
        updated = conn.execute(t.update().where(t.c.model_version == result.model_version,
                                                t.c.window_key == window.key).values(**values)).rowcount
        if not updated:
            conn.execute(t.insert().values(**values))

