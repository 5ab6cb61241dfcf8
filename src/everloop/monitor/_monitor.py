"""Monitoring one window of served predictions: data drift, prediction drift, performance, health."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from everloop._jsonable import jsonable
from everloop.data import get_dataset, load_frame
from everloop.monitor._drift import ColumnDrift, DriftDetector, DriftReport
from everloop.registry import PRODUCTION, eval_frame, load_model
from everloop.spec import ProjectSpec
from everloop.store import Store
from everloop.train import TrainedModel, as_labels, improvement, score

REFERENCE_SAMPLE = 50_000


@dataclass
class MonitorResult:
    model_version: int
    window: dict[str, Any]
    drift: DriftReport | None
    prediction_drift: ColumnDrift | None
    performance: dict[str, Any]
    health: dict[str, Any]
    alerts: list[str] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)

    @property
    def status(self) -> str:
        if not self.window["rows"]:
            return "no data"
        kinds = [k for k in ("drift", "decay") if any(a.startswith(k) for a in self.alerts)]
        return "+".join(kinds) if kinds else "healthy"

    @property
    def ok(self) -> bool:
        return not self.alerts

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "model_version": self.model_version, "created_at": self.created_at,
                "window": self.window, "alerts": self.alerts,
                "drift": self.drift.to_dict() if self.drift else None,
                "prediction_drift": self.prediction_drift.__dict__ if self.prediction_drift else None,
                "performance": self.performance, "health": self.health}


def load_window(store: Store, spec: ProjectSpec, model_version: int | None = None) -> pd.DataFrame:
    """The latest window of logged predictions (by rows or minutes), joined with their feedback labels."""
    t = store.tables
    query = (sa.select(t.predictions.c.seq, t.predictions.c.id, t.predictions.c.created_at,
                       t.predictions.c.model_version, t.predictions.c.features, t.predictions.c.prediction,
                       t.predictions.c.latency_ms, t.feedback.c.label)
             .select_from(t.predictions.outerjoin(t.feedback, t.feedback.c.prediction_id == t.predictions.c.id)))
    if model_version is not None:
        query = query.where(t.predictions.c.model_version == model_version)
    window = spec.monitoring.window
    if window.minutes is not None:
        query = query.where(t.predictions.c.created_at >= time.time() - window.minutes * 60)
    else:
        query = query.order_by(t.predictions.c.seq.desc()).limit(window.rows)
    with store.engine.connect() as conn:
        rows = conn.execute(query).all()
    rows.sort(key=lambda r: r.seq)
    if not rows:
        return pd.DataFrame(columns=["seq", "id", "created_at", "model_version", "latency_ms", "label"])
    frame = pd.DataFrame({"seq": [r.seq for r in rows], "id": [r.id for r in rows],
                          "created_at": [r.created_at for r in rows], "model_version": [r.model_version for r in rows],
                          "latency_ms": [r.latency_ms for r in rows], "label": [r.label for r in rows]})
    features = pd.DataFrame.from_records([r.features for r in rows])
    frame.attrs["features"] = features
    frame.attrs["predictions"] = [r.prediction for r in rows]
    return frame


def monitor(store: Store, spec: ProjectSpec, *, model: int | str = PRODUCTION, record: bool = True) -> MonitorResult:
    """Check the latest window of the model's predictions against its training data and thresholds."""
    trained = load_model(store, model)
    window = load_window(store, spec, trained.version)
    info = _window_info(window)
    if window.empty:
        return _finish(store, MonitorResult(trained.version, info, None, None, {"labelled_rows": 0}, {}), record)
    reference = reference_frame(store, trained)
    current = window.attrs["features"]
    kinds = {c.name: c.kind for c in trained.schema.features}
    d = spec.monitoring.drift
    detector = DriftDetector(d.p_value, d.min_effect, d.max_drifted_share).fit(reference, kinds)
    drift = detector.score(current)
    prediction_drift = _prediction_drift(store, trained, window.attrs["predictions"], detector)
    performance = _performance(trained, spec, window)
    health = _health(window)
    alerts = []
    if drift.dataset_drift:
        alerts.append(f"drift: {len(drift.drifted)} of {len(drift.columns)} features drifted "
                      f"({drift.drifted_share:.0%} > {d.max_drifted_share:.0%}): {', '.join(drift.drifted)}")
    if performance.get("decayed"):
        alerts.append(f"decay: {performance['metric']} {performance['value']:.4f} on {performance['labelled_rows']} "
                      f"labelled rows; {performance['why']}")
    return _finish(store, MonitorResult(trained.version, info, drift, prediction_drift, performance, health, alerts),
                   record)


def reference_frame(store: Store, trained: TrainedModel) -> pd.DataFrame:
    """The model's training data from the current world (its recent rows when the loop retrained it on
    old + recent data), features only, sampled to a fixed size with a fixed seed."""
    frame = load_frame(store, get_dataset(store, trained.manifest["dataset_version"]))
    frame = frame.iloc[trained.manifest.get("recent_from_row", 0):]
    if len(frame) > REFERENCE_SAMPLE:
        frame = frame.sample(REFERENCE_SAMPLE, random_state=0)
    return frame[trained.schema.feature_names]


def list_runs(store: Store, limit: int = 100) -> list[dict[str, Any]]:
    t = store.tables.monitor_runs
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.result).order_by(t.c.id.desc()).limit(limit)).scalars().all()
    return list(reversed(rows))


def _finish(store: Store, result: MonitorResult, record: bool) -> MonitorResult:
    if record:
        with store.engine.begin() as conn:
            conn.execute(store.tables.monitor_runs.insert().values(
                model_version=result.model_version, result=jsonable(result.to_dict())))
    return result


def _window_info(window: pd.DataFrame) -> dict[str, Any]:
    if window.empty:
        return {"rows": 0, "labelled_rows": 0, "from": None, "to": None}
    return {"rows": len(window), "labelled_rows": int(window["label"].notna().sum()),
            "from": float(window["created_at"].min()), "to": float(window["created_at"].max()),
            "first_seq": int(window["seq"].iloc[0]), "last_seq": int(window["seq"].iloc[-1])}


def _prediction_scores(trained: TrainedModel, predictions: list[dict[str, Any]]) -> tuple[str, pd.Series]:
    """What prediction drift is measured on: P(positive class) for binary, the class for multiclass, the value for regression."""
    if trained.task == "regression":
        return "numeric", pd.Series([p["prediction"] for p in predictions], dtype=float)
    classes = [str(c) for c in trained.classes]
    if len(classes) == 2:
        return "numeric", pd.Series([p["probabilities"][classes[1]] for p in predictions], dtype=float)
    return "categorical", pd.Series([str(p["prediction"]) for p in predictions], dtype=object)


def _prediction_drift(store: Store, trained: TrainedModel, served: list[dict[str, Any]],
                      detector: DriftDetector) -> ColumnDrift:
    """Served predictions against the model's predictions on its held-out evaluation rows
    (its own training rows would give over-confident, unrepresentative scores)."""
    kind, current = _prediction_scores(trained, served)
    ref_features, _ = trained.conform(eval_frame(store, trained.manifest))
    _, ref_scores = _prediction_scores(trained, trained.predict_conformed(ref_features).records())
    one = DriftDetector(detector.p_value, detector.min_effect).fit(pd.DataFrame({"prediction": ref_scores}),
                                                                   {"prediction": kind})
    return one.score(pd.DataFrame({"prediction": current})).columns[0]


def _performance(trained: TrainedModel, spec: ProjectSpec, window: pd.DataFrame) -> dict[str, Any]:
    metric = trained.manifest["metric"]
    expected = trained.manifest["metrics"][metric]
    labelled = window["label"].notna().to_numpy()
    out: dict[str, Any] = {"metric": metric, "expected": expected, "labelled_rows": int(labelled.sum()),
                           "value": None, "decayed": False}
    if labelled.sum() < spec.monitoring.min_labelled_rows:
        out["why"] = f"fewer than {spec.monitoring.min_labelled_rows} labelled rows"
        return out
    served = [p for p, keep in zip(window.attrs["predictions"], labelled) if keep]
    labels = window["label"][labelled].tolist()
    if trained.task == "classification":
        y = as_labels([str(v) for v in labels])
        names = [str(c) for c in trained.classes]
        proba = np.array([[p["probabilities"][n] for n in names] for p in served])
        predicted = np.asarray([p["prediction"] for p in served]).astype(y.dtype)
        value = score(metric, y, predicted, proba, trained.classes)
    else:
        value = score(metric, np.asarray(labels, dtype=float), np.array([p["prediction"] for p in served]))
    out["value"] = value
    perf = spec.monitoring.performance
    reasons = []
    if perf.min_metric is not None and improvement(metric, value, perf.min_metric) < 0:
        reasons.append(f"below monitoring.performance.min_metric {perf.min_metric}")
    if improvement(metric, value, expected) < -perf.max_drop:
        reasons.append(f"{abs(improvement(metric, value, expected)):.4f} worse than at training ({expected:.4f}; "
                       f"allowed drop {perf.max_drop})")
    out["decayed"] = bool(reasons) and bool(np.isfinite(value))
    out["why"] = "; ".join(reasons) if reasons else "within thresholds"
    return out


def _health(window: pd.DataFrame) -> dict[str, Any]:
    latency = window["latency_ms"].to_numpy(dtype=float)
    span = float(window["created_at"].max() - window["created_at"].min())
    return {"rows": len(window), "rows_per_second": len(window) / span if span > 0 else None,
            "latency_ms_p50": float(np.percentile(latency, 50)), "latency_ms_p95": float(np.percentile(latency, 95)),
            "latency_ms_p99": float(np.percentile(latency, 99))}
