"""Monitoring one window of served predictions: data drift, prediction drift, training-serving skew,
performance (labelled, and estimated without labels), and system health.

The window is read from the prediction log in batches and folded into profiles and small
accumulators, so a window of any size is monitored in constant memory; the reference side was
profiled once, at training, and is stored with the model.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pandas as pd
import sqlalchemy as sa

from everloop._jsonable import jsonable
from everloop.data import Profile
from everloop.errors import StoreError
from everloop.monitor._drift import ColumnDrift, DriftDetector, DriftReport
from everloop.monitor._estimate import estimate_metric
from everloop.registry import PRODUCTION, load_model
from everloop.spec import ProjectSpec
from everloop.store import Store, prediction_log
from everloop.train import TrainedModel, improvement, score_labels

log = logging.getLogger("everloop.monitor")
READ_BATCH = 20_000
LATENCY_BUCKETS_MS = np.concatenate([[0], np.geomspace(0.05, 60_000, 400)])
WEBHOOK_ENV = "EVERLOOP_WEBHOOK_URL"


@dataclass
class MonitorResult:
    model_version: int
    window: dict[str, Any]
    drift: DriftReport | None
    prediction_drift: ColumnDrift | None
    performance: dict[str, Any]
    health: dict[str, Any]
    skew: dict[str, Any] = field(default_factory=dict)
    distributions: dict[str, Any] = field(default_factory=dict)  # coarse reference vs window, for reports
    alerts: list[str] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)

    @property
    def status(self) -> str:
        if not self.window["rows"]:
            return "no data"
        kinds = [k for k in ("drift", "decay", "skew") if any(a.startswith(k) for a in self.alerts)]
        return "+".join(kinds) if kinds else "healthy"

    @property
    def ok(self) -> bool:
        return not self.alerts

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"status": self.status, "model_version": self.model_version, "created_at": self.created_at,
                         "window": self.window, "alerts": self.alerts,
                         "drift": self.drift.to_dict() if self.drift else None,
                         "prediction_drift": self.prediction_drift.__dict__ if self.prediction_drift else None,
                         "performance": self.performance, "health": self.health, "skew": self.skew,
                         "distributions": self.distributions})


def monitor(store: Store, spec: ProjectSpec, *, model: int | str = PRODUCTION, record: bool = True,
            notify: bool = True) -> MonitorResult:
    """Check the latest window of the model's predictions against what it was trained on."""
    trained = load_model(store, model)
    profile, prediction_profile = reference_profiles(store, trained)
    window = profile.window([])
    scores = prediction_profile.window([])
    acc = _Accumulator(trained)
    for batch in iter_window(store, spec, trained.version):
        features = batch.attrs["features"]
        for name, column in window.columns.items():
            if name in features:
                column.update(features[name])
        scores.columns["prediction"].update(_prediction_scores(trained, batch.attrs["predictions"]))
        acc.update(batch)
    info = acc.window_info()
    if not info["rows"]:
        return _finish(store, spec, MonitorResult(trained.version, info, None, None, {"labelled_rows": 0}, {}),
                       record, notify)
    d = spec.monitoring.drift
    detector = DriftDetector(d.p_value, d.min_effect, d.max_drifted_share)
    drift = detector.fit_profile(profile).score_profile(window)
    prediction_drift = DriftDetector(d.p_value, d.min_effect).fit_profile(prediction_profile).score_profile(
        scores).columns[0]
    performance = acc.performance(spec)
    skew = _skew(trained, profile, window, spec)
    result = MonitorResult(trained.version, info, drift, prediction_drift, performance, acc.health(store, spec),
                           skew, _coarse(profile, window, drift))
    if drift.dataset_drift:
        result.alerts.append(f"drift: {len(drift.drifted)} of {len(drift.columns)} features drifted "
                             f"({drift.drifted_share:.0%} > {d.max_drifted_share:.0%}): {', '.join(drift.drifted)}")
    if performance.get("decayed"):
        result.alerts.append(f"decay: {performance['metric']} {performance['value']:.4f} on "
                             f"{performance['labelled_rows']} labelled rows; {performance['why']}")
    if performance.get("estimated_decayed"):
        result.alerts.append(f"decay (estimated without labels): {performance['metric']} "
                             f"{performance['estimated']:.4f}; {performance['estimated_why']}")
    if skew.get("features"):
        result.alerts.append(f"skew: serving values unlike training in {', '.join(skew['features'])}")
    return _finish(store, spec, result, record, notify)


def iter_window(store: Store, spec: ProjectSpec, model_version: int | None) -> Iterator[pd.DataFrame]:
    """The latest window of logged predictions (by rows or minutes) with their labels, in batches of about
    READ_BATCH rows: columns seq (the model call's), created_at, latency_ms and label, with the features
    (a frame) and the outputs (a list) in `.attrs`."""
    window = spec.monitoring.window
    with store.engine.connect() as conn:
        skip = 0
        if window.minutes is not None:
            newest = conn.execute(sa.select(sa.func.max(store.tables.prediction_batches.c.created_at))).scalar()
            batches = prediction_log.iter_batches(conn, model_version=model_version,
                                                  since_time=(newest or time.time()) - window.minutes * 60)
        else:  # the latest N rows: find the batch they start in, then read forwards in order
            start = prediction_log.latest_window_start(conn, window.rows, model_version)
            if start is None:
                return
            first, skip = start
            batches = prediction_log.iter_batches(conn, model_version=model_version, since_seq=first)
        labels: dict[str, Any] | None = None
        pending, rows = [], 0
        for batch in _chain_final(batches):
            if batch is not None:
                if skip:  # the oldest batch holds rows from before the window
                    batch = (*batch[:3], batch[3].slice(skip))
                    skip = 0
                pending.append(batch)
                rows += batch[3].num_rows
                if rows < READ_BATCH:
                    continue
            if not pending:
                break
            if labels is None:  # every label of the window (a label is never older than its prediction)
                labels = prediction_log.labels_since(conn, min(b[1] for b in pending))
            logged = prediction_log.to_rows(pending)
            frame = pd.DataFrame({"seq": logged.batch_seq, "created_at": logged.created_at,
                                  "latency_ms": logged.latency_ms, "label": [labels.get(i) for i in logged.ids]})
            frame.attrs["features"] = logged.features
            frame.attrs["predictions"] = logged.outputs
            yield frame
            pending, rows = [], 0


def _chain_final(items: Iterator[Any]) -> Iterator[Any]:
    """The items, then one None: the caller's cue to flush what it holds."""
    yield from items
    yield None


def reference_profiles(store: Store, trained: TrainedModel) -> tuple[Profile, Profile]:
    """The profiles of the model's training rows and of its held-out scores, stored with it at training."""
    stored = trained.manifest.get("monitoring", {})
    if "profile" not in stored:
        raise StoreError(f"model v{trained.version} has no reference profile (it was trained by an older "
                         "development build); retrain it")
    return (Profile.from_dict(store.get_json(stored["profile"])),
            Profile.from_dict(store.get_json(stored["prediction_profile"])))


def list_runs(store: Store, limit: int = 100) -> list[dict[str, Any]]:
    t = store.tables.monitor_runs
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.result).order_by(t.c.id.desc()).limit(limit)).scalars().all()
    return list(reversed(rows))


def send_alert(spec: ProjectSpec, payload: dict[str, Any]) -> bool:
    """POST `payload` as JSON to the webhook (monitoring.webhook or EVERLOOP_WEBHOOK_URL), if one is set.
    A failure is logged, never raised: alerting must not break monitoring."""
    url = spec.monitoring.webhook or os.environ.get(WEBHOOK_ENV)
    if not url:
        return False
    import httpx

    try:
        httpx.post(url, json=jsonable(payload), timeout=5).raise_for_status()
        return True
    except httpx.HTTPError as exc:
        log.warning("alert webhook %s failed: %s", url, exc)
        return False


# -- pieces ---------------------------------------------------------------------------------------


class _Accumulator:
    """Labels, scores, latencies and times of a window, folded in batch by batch."""

    def __init__(self, trained: TrainedModel):
        self.trained = trained
        self.rows = 0
        self.first_seq = self.last_seq = None
        self.first_at = self.last_at = None
        self.latency = np.zeros(len(LATENCY_BUCKETS_MS) + 1, dtype=np.int64)
        self.labels: list[Any] = []
        self.labelled_outputs: list[dict[str, Any]] = []
        self.proba: list[np.ndarray] = []  # every row's probabilities, for estimation without labels

    def update(self, batch: pd.DataFrame) -> None:
        self.rows += len(batch)
        self.first_seq = self.first_seq if self.first_seq is not None else int(batch["seq"].iloc[0])
        self.last_seq = int(batch["seq"].iloc[-1])
        lo, hi = float(batch["created_at"].min()), float(batch["created_at"].max())
        self.first_at = lo if self.first_at is None else min(self.first_at, lo)
        self.last_at = hi if self.last_at is None else max(self.last_at, hi)
        self.latency += np.bincount(np.searchsorted(LATENCY_BUCKETS_MS, batch["latency_ms"].to_numpy(dtype=float)),
                                    minlength=len(self.latency))
        outputs = batch.attrs["predictions"]
        for label, output in zip(batch["label"], outputs):
            if label is not None:
                self.labels.append(label)
                self.labelled_outputs.append(output)
        if self.trained.task == "classification":
            names = [str(c) for c in self.trained.classes]
            self.proba.append(np.array([[o["probabilities"][n] for n in names] for o in outputs], dtype=float))

    def window_info(self) -> dict[str, Any]:
        return {"rows": self.rows, "labelled_rows": len(self.labels), "from": self.first_at, "to": self.last_at,
                "first_seq": self.first_seq, "last_seq": self.last_seq}

    def performance(self, spec: ProjectSpec) -> dict[str, Any]:
        trained = self.trained
        metric = trained.manifest["metric"]
        expected = trained.manifest["metrics"][metric]
        perf = spec.monitoring.performance
        out: dict[str, Any] = {"metric": metric, "expected": expected, "labelled_rows": len(self.labels),
                               "value": None, "decayed": False, "estimated": None, "estimated_decayed": False}
        if self.proba:
            calibration = trained.manifest.get("monitoring", {}).get("calibration")
            estimated = estimate_metric(metric, np.vstack(self.proba), calibration)
            if estimated is not None and np.isfinite(estimated):
                out["estimated"] = estimated
                reasons = _decay_reasons(metric, estimated, expected, perf)
                out["estimated_decayed"] = bool(reasons)
                out["estimated_why"] = "; ".join(reasons) or "within thresholds"
        if len(self.labels) < spec.monitoring.min_labelled_rows:
            out["why"] = f"fewer than {spec.monitoring.min_labelled_rows} labelled rows"
            return out
        predicted = [o["prediction"] for o in self.labelled_outputs]
        if trained.task == "classification":
            names = [str(c) for c in trained.classes]
            proba = np.array([[o["probabilities"][n] for n in names] for o in self.labelled_outputs])
            value = score_labels(metric, [str(v) for v in self.labels], predicted, proba, trained.classes)
        else:
            value = score_labels(metric, self.labels, predicted)
        out["value"] = value
        reasons = _decay_reasons(metric, value, expected, perf)
        out["decayed"] = bool(reasons) and bool(np.isfinite(value))
        out["why"] = "; ".join(reasons) if reasons else "within thresholds"
        return out

    def health(self, store: Store, spec: ProjectSpec) -> dict[str, Any]:
        span = (self.last_at - self.first_at) if self.rows else 0.0
        out = {"rows": self.rows, "rows_per_second": self.rows / span if span > 0 else None}
        for q in (50, 95, 99):
            out[f"latency_ms_p{q}"] = _quantile_from_counts(self.latency, LATENCY_BUCKETS_MS, q / 100)
        out |= _errors(store, self.first_at, self.last_at)
        return out


def _decay_reasons(metric: str, value: float, expected: float, perf: Any) -> list[str]:
    reasons = []
    if not np.isfinite(value):
        return reasons
    if perf.min_metric is not None and improvement(metric, value, perf.min_metric) < 0:
        reasons.append(f"below monitoring.performance.min_metric {perf.min_metric}")
    if improvement(metric, value, expected) < -perf.max_drop:
        reasons.append(f"{abs(improvement(metric, value, expected)):.4f} worse than at training ({expected:.4f}; "
                       f"allowed drop {perf.max_drop})")
    return reasons


def _prediction_scores(trained: TrainedModel, predictions: list[dict[str, Any]]) -> pd.Series:
    """What prediction drift is measured on: P(positive class) for binary, the class for multiclass,
    the value for regression."""
    if trained.task == "regression":
        return pd.Series([p["prediction"] for p in predictions], dtype=float)
    if len(trained.classes) == 2:
        positive = str(trained.classes[1])
        return pd.Series([p["probabilities"][positive] for p in predictions], dtype=float)
    return pd.Series([str(p["prediction"]) for p in predictions], dtype=object)


def _skew(trained: TrainedModel, reference: Profile, window: Profile, spec: ProjectSpec) -> dict[str, Any]:
    """Training-serving skew: serving values a correct pipeline would not produce from the training
    distribution (nulls the training data did not have, categories it never had, values outside
    its whole range) -- a sign that serving computes a feature differently, not that the world moved."""
    limits = spec.monitoring.skew
    details, flagged = {}, []
    for name, cur in window.columns.items():
        ref = reference.columns[name]
        if not cur.rows:
            continue
        null_change = cur.missing / cur.rows - (ref.missing / ref.rows if ref.rows else 0.0)
        entry = {"null_rate_change": null_change}
        if cur.kind == "categorical":
            unseen = sum(n for k, n in cur.categories.items() if k not in ref.categories)
            entry["unseen_share"] = unseen / max(cur.present, 1)
        elif cur.counts is not None:
            entry["outside_range_share"] = (cur.counts[0] + cur.counts[-1]) / max(cur.present, 1)
        details[name] = entry
        if (null_change > limits.max_null_rate_change or entry.get("unseen_share", 0) > limits.max_unseen_share
                or entry.get("outside_range_share", 0) > limits.max_out_of_range_share):
            flagged.append(name)
    return {"features": flagged, "columns": details}


def _coarse(reference: Profile, window: Profile, drift: DriftReport, top: int = 6) -> dict[str, Any]:
    """Reference and window distributions of the most drifted features, coarsened to ~40 bins."""
    out = {}
    for column in sorted(drift.columns, key=lambda c: -(c.effect if np.isfinite(c.effect) else 0))[:top]:
        ref, cur = reference.columns[column.column], window.columns[column.column]
        if ref.kind == "categorical":
            keys = sorted(set(ref.categories) | set(cur.categories), key=lambda k: -ref.categories.get(k, 0))[:30]
            out[column.column] = {"kind": "categorical", "categories": keys,
                                  "reference": [ref.categories.get(k, 0) for k in keys],
                                  "current": [cur.categories.get(k, 0) for k in keys]}
        else:
            inner = ref.counts[1:-1]
            groups = np.linspace(0, len(inner), min(40, len(inner)) + 1).astype(int) if len(inner) else np.array([0])
            cuts = np.unique(groups[:-1])
            out[column.column] = {"kind": ref.kind, "edges": ref.edges[np.minimum(groups, len(ref.edges) - 1)].tolist(),
                                  "reference": np.add.reduceat(inner, cuts).tolist() if len(inner) else [],
                                  "current": np.add.reduceat(cur.counts[1:-1], cuts).tolist() if len(inner) else []}
    return out


def _quantile_from_counts(counts: np.ndarray, edges: np.ndarray, q: float) -> float | None:
    total = counts.sum()
    if not total:
        return None
    index = int(np.searchsorted(np.cumsum(counts), q * total))
    return float(edges[min(index, len(edges) - 1)])


def _errors(store: Store, start: float | None, end: float | None) -> dict[str, Any]:
    """Requests and client/server errors the service counted over the window's time span."""
    if start is None:
        return {}
    t = store.tables.service_stats
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(sa.func.sum(t.c.requests), sa.func.sum(t.c.client_errors),
                                     sa.func.sum(t.c.server_errors))
                           .where(t.c.created_at >= start, t.c.created_at <= end + 60)).first()
    requests, client, server = (int(v or 0) for v in row)
    return {"requests": requests, "client_errors": client, "server_errors": server,
            "error_rate": (client + server) / requests if requests else None}


def _finish(store: Store, spec: ProjectSpec, result: MonitorResult, record: bool, notify: bool) -> MonitorResult:
    if record:
        with store.engine.begin() as conn:
            conn.execute(store.tables.monitor_runs.insert().values(model_version=result.model_version,
                                                                   result=result.to_dict()))
    if notify and result.alerts:
        send_alert(spec, {"event": "monitor", "status": result.status, "model_version": result.model_version,
                          "alerts": result.alerts, "window": result.window})
    return result
