"""The loop controller: monitor, decide by the spec's triggers, retrain, gate, promote, record why."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from everloop._jsonable import jsonable
from everloop.data import get_dataset, ingest_frame, load_frame
from everloop.errors import EverloopError
from everloop.monitor import MonitorResult, monitor, send_alert
from everloop.registry import PRODUCTION, ModelVersion, check_gate, get_model, load_model, set_alias
from everloop.spec import ProjectSpec
from everloop.store import Store, prediction_log
from everloop.store._lease import LEASE_TTL, Lease, LeaseBusy, when
from everloop.train import row_hashes, train, valid_labels

CANDIDATE = "candidate"
LOOP_LEASE = "loop"  # the lease a turn of the loop holds (see everloop.store._lease)
ALERTING = {"promoted", "kept_candidate", "failed"}  # decisions a person should hear about


@dataclass
class LoopDecision:
    action: str  # idle, cooldown, promoted, kept_candidate, failed, busy (another loop holds the lease)
    reason: str
    triggers: list[str] = field(default_factory=list)
    monitor: dict[str, Any] | None = None
    model_version: int | None = None
    gate: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_once(store: Store, spec: ProjectSpec, *, lease_ttl: float = LEASE_TTL) -> LoopDecision:
    """One turn of the loop. Every outcome, including doing nothing, is recorded with its evidence.

    One turn at a time per store, however many loops share it (an overlapping CronJob, two machines on
    one PostgreSQL): the turn holds the store's loop lease (renewed every `lease_ttl / 3` seconds while
    it runs; a crashed turn's lease expires `lease_ttl` seconds after its last renewal). A turn that
    finds the lease held does nothing but record a "busy" decision naming the holder. Alias moves are
    fenced by the lease: a turn that lost it (stalled past `lease_ttl`) records "failed" and moves none."""
    try:
        lease = Lease.acquire(store.engine, LOOP_LEASE, ttl=lease_ttl)
    except LeaseBusy as busy:
        return _record(store, LoopDecision("busy", f"another loop is running (holder {busy.holder} since "
                                           f"{when(busy.since)}); this turn did nothing"), spec)
    with lease:
        return _turn(store, spec, lease)


def _turn(store: Store, spec: ProjectSpec, lease: Lease) -> LoopDecision:
    result = monitor(store, spec)
    summary = _monitor_summary(result)
    fired = _triggers(store, spec, result)
    if not fired:
        return _record(store, LoopDecision("idle", f"no trigger fired (status: {result.status})", [], summary), spec)
    last = _last_retrain(store)
    cooldown = spec.retraining.cooldown_minutes * 60
    if last is not None and time.time() - last < cooldown:
        wait = (cooldown - (time.time() - last)) / 60
        return _record(store, LoopDecision("cooldown", f"{', '.join(fired)} fired, but the last retraining was "
                                           f"less than {spec.retraining.cooldown_minutes:g} min ago "
                                           f"({wait:.1f} min to wait)", fired, summary), spec)
    try:
        version, dataset_version, rows = _retrain(store, spec, fired)
    except EverloopError as exc:
        return _record(store, LoopDecision("failed", f"retraining failed: {exc}", fired, summary), spec)
    gate = check_gate(store, spec, version)
    trained_on = f"dataset v{dataset_version} ({rows} rows)"
    try:  # production must still be the model the gate compared with, and this turn still the leader
        if gate.passed:
            set_alias(store, PRODUCTION, version, actor="everloop loop", from_version=gate.production, lease=lease,
                      reason=f"retrained on {trained_on} after {', '.join(fired)}; passed the gate")
            return _record(store, LoopDecision("promoted", f"{', '.join(fired)} fired; model v{version} trained on "
                                               f"{trained_on} passed the gate and is in production", fired, summary,
                                               version, gate.to_dict()), spec)
        set_alias(store, CANDIDATE, version, actor="everloop loop", reason="; ".join(gate.reasons), lease=lease)
    except EverloopError as exc:  # AliasMoved, LeaseLost
        return _record(store, LoopDecision("failed", f"model v{version} trained on {trained_on} was not put live: "
                                           f"{exc}", fired, summary, version, gate.to_dict()), spec)
    return _record(store, LoopDecision("kept_candidate", f"{', '.join(fired)} fired; model v{version} was refused by "
                                       f"the gate: {'; '.join(gate.reasons)}", fired, summary, version, gate.to_dict()), spec)


def recent_labelled(store: Store, spec: ProjectSpec, limit: int) -> pd.DataFrame:
    """The latest `limit` served rows that have a label, shaped like a dataset (features, target, id, time).
    Labels are read as the production model's classes (or numbers); a stored label that is not valid for
    it (written by an older build) is left out, never trained on."""
    logged, labels = prediction_log.latest_labelled(store.engine, limit)
    manifest = get_model(store, PRODUCTION).manifest
    keep, parsed = valid_labels(manifest["task"], manifest.get("classes"), labels)
    frame = logged.features.iloc[keep].reset_index(drop=True)
    frame[spec.data.target] = parsed
    if spec.data.id:
        frame[spec.data.id] = [logged.ids[n] for n in keep]  # the prediction id stands in for the entity id
    if spec.data.timestamp:
        frame[spec.data.timestamp] = pd.to_datetime(logged.created_at[keep], unit="s", utc=True)
    return frame


def audit_trail(store: Store, limit: int = 100) -> list[dict[str, Any]]:
    t = store.tables.loop_events
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(t).order_by(t.c.id.desc()).limit(limit)).all()
    return [dict(r._mapping) for r in reversed(rows)]


def _triggers(store: Store, spec: ProjectSpec, result: MonitorResult) -> list[str]:
    triggers = spec.retraining.triggers
    fired = []
    # only judged signals fire: a window too small for a verdict, or labels too few, never retrain
    if "drift" in triggers and result.drift is not None and result.drift.dataset_drift \
            and "drift" not in result.not_judged:
        fired.append("drift")
    if "performance" in triggers and result.performance.get("decayed"):
        fired.append("performance")
    if "estimated_performance" in triggers and result.performance.get("estimated_decayed"):
        fired.append("estimated_performance")
    if "schedule" in triggers and spec.retraining.schedule_minutes:
        since = time.time() - (_last_retrain(store) or get_model(store, PRODUCTION).created_at)
        if since >= spec.retraining.schedule_minutes * 60:
            fired.append("schedule")
    if "new_labels" in triggers and _labels_since(store, _last_retrain(store) or 0) >= spec.retraining.min_new_labels:
        fired.append("new_labels")
    return fired


def _retrain(store: Store, spec: ProjectSpec, fired: list[str]) -> tuple[int, int, int]:
    recent = recent_labelled(store, spec, spec.retraining.data.recent_rows)
    if recent.empty:
        raise EverloopError("no labelled predictions to retrain on; send labels to /feedback")
    production = get_model(store, PRODUCTION)
    reference = get_dataset(store, production.dataset_version)
    frame, recent_from_row = recent, 0
    if spec.retraining.data.include_reference:
        old = load_frame(store, reference)
        recent = _not_in(recent, old, spec)
        if recent.empty:
            raise EverloopError("every recent labelled prediction is already in the production model's data; "
                                "nothing new to retrain on")
        frame = pd.concat([old, recent[[c for c in old.columns if c in recent]]], ignore_index=True)
        recent_from_row = len(old)
    dataset = ingest_frame(store, spec, frame, source=f"loop: {len(recent)} recent labelled rows"
                           + (f" + dataset v{reference.version}" if spec.retraining.data.include_reference else ""),
                           parent=reference.version)
    template, record = _template(store, production)
    result = train(store, spec, dataset.version, reason=f"loop retraining after {', '.join(fired)}",
                   recent_from_row=recent_from_row, recent_weight=spec.retraining.data.recent_weight,
                   template=template, record=record)
    return result.version, dataset.version, dataset.rows


def _not_in(recent: pd.DataFrame, old: pd.DataFrame, spec: ProjectSpec) -> pd.DataFrame:
    """The recent rows that the reference data does not hold yet. A second retraining's reference is
    the first one's dataset, which already holds the recent rows of then: taken again, they would sit
    on both sides of the new model's split (a held-out row with a copy in training scores as if seen).
    Matched by the id column (the prediction id, for logged rows) when the project has one, else by
    every feature and the label (identical rows then count once)."""
    if spec.data.id and spec.data.id in old and spec.data.id in recent:
        return recent[~recent[spec.data.id].astype(str).isin(set(old[spec.data.id].astype(str)))]
    columns = [c for c in old.columns if c in recent and c != spec.data.timestamp]
    return recent[~np.isin(row_hashes(recent, columns), row_hashes(old, columns))]


def _template(store: Store, production: ModelVersion) -> tuple[Any, dict[str, Any] | None]:
    """What a retraining fits: for an imported model (or one refit from an imported one) a fresh clone of
    its own pipeline, so the user's preprocessing and hyper-parameters carry over, with what it came
    from for the new manifest; (None, None) for a model of the project file's pipeline, which the spec
    rebuilds."""
    manifest = production.manifest
    if manifest.get("pipeline_source") not in ("imported", "clone"):
        return None, None
    record = {"template_of": production.version, "imported_from": manifest.get("imported_from")}
    return load_model(store, production.version).pipeline, record


def _last_retrain(store: Store) -> float | None:
    t = store.tables.loop_events
    with store.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.max(t.c.created_at))
                            .where(t.c.action.in_(["promoted", "kept_candidate"]))).scalar()


def _labels_since(store: Store, since: float) -> int:
    t = store.tables.feedback
    with store.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(t).where(t.c.created_at > since)).scalar() or 0


def _monitor_summary(result: MonitorResult) -> dict[str, Any]:
    return {"status": result.status, "model_version": result.model_version, "window": result.window.get("key"),
            "window_rows": result.window["rows"], "alerts": result.alerts, "not_judged": result.not_judged,
            "drifted": result.drift.drifted if result.drift else [], "metric": result.performance.get("value"),
            "labelled_rows": result.performance.get("labelled_rows"),
            "estimated": result.performance.get("estimated")}


def _record(store: Store, decision: LoopDecision, spec: ProjectSpec | None = None) -> LoopDecision:
    evidence = {"triggers": decision.triggers, "monitor": decision.monitor, "model_version": decision.model_version,
                "gate": decision.gate}
    with store.engine.begin() as conn:
        conn.execute(store.tables.loop_events.insert().values(action=decision.action, reason=decision.reason,
                                                              evidence=jsonable(evidence)))
    if spec is not None and decision.action in ALERTING:
        send_alert(spec, {"event": "loop", "action": decision.action, "reason": decision.reason,
                          "model_version": decision.model_version, "gate": decision.gate})
    return decision
