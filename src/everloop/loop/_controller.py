"""The loop controller: monitor, decide by the spec's triggers, retrain, gate, promote, record why."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from everloop._jsonable import jsonable
from everloop.data import DatasetVersion, get_dataset, ingest_frame, list_datasets, load_frame
from everloop.errors import DataError, EverloopError
from everloop.monitor import (MonitorResult, judge_labelled, judge_rollout, labelled_rows_limit, monitor,
                              send_alert)
from everloop.registry import (PRODUCTION, GateDecision, ModelVersion, Rollout, active_rollout, check_gate,
                               finish_rollout, get_model, load_model, note_rollout, set_alias, start_rollout,
                               step_rollout)
from everloop.spec import ProjectSpec
from everloop.store import Store, prediction_log
from everloop.store._lease import LEASE_TTL, Lease, LeaseBusy, when
from everloop.train import row_hashes, train, valid_labels

CANDIDATE = "candidate"
LOOP_LEASE = "loop"  # the lease a turn of the loop holds (see everloop.store._lease)
ACTOR = "everloop loop"  # the actor of the loop's alias moves and rollout changes
# decisions a person should hear about: what is live changed (or could not), or a candidate was refused
ALERTING = {"promoted", "kept_candidate", "failed", "rollout_started", "rollout_promoted", "rollout_rolled_back"}
# a live rollout's verdict (monitor.judge_rollout) -> the decision the loop records for it
ROLLOUT_ACTIONS = {"wait": "rollout_wait", "step": "rollout_step", "promote": "rollout_promoted",
                   "rollback": "rollout_rolled_back"}
RETRAINED = ("promoted", "kept_candidate", "rollout_started")  # decisions of a turn that retrained
LOOP_SOURCE = "loop: "  # how the source of every dataset the loop stores for a retraining begins


@dataclass
class LoopDecision:
    # idle, cooldown, promoted, kept_candidate, failed, busy (another loop holds the lease); with
    # rollout.mode shadow/canary: rollout_started, then per turn rollout_wait, rollout_step,
    # rollout_promoted or rollout_rolled_back
    action: str
    reason: str
    triggers: list[str] = field(default_factory=list)
    monitor: dict[str, Any] | None = None
    model_version: int | None = None
    gate: dict[str, Any] | None = None
    datasets: dict[str, Any] | None = None  # with retraining.data.from: datasets, the new data (NewDatasets)
    # a rollout's decisions: the rollout started (Rollout.to_dict()), or "id", "verdict" (wait, step,
    # promote, rollback) and every number of the live judgement (monitor.LiveVerdict.evidence)
    rollout: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        for key in ("datasets", "rollout"):  # absent where unused: the output is as it always was
            if out[key] is None:
                del out[key]
        return out


@dataclass
class NewDatasets:
    """The new labelled data of `retraining.data.from: datasets`: the rows of the dataset versions
    ingested after the newest one the production model's data holds (`after`), not those the loop
    stored itself. A row is labelled when its target holds a label valid for the production model (as
    feedback labels are read: `everloop.train.valid_labels`); the others are skipped and counted."""

    after: int
    datasets: list[dict[str, Any]]  # per version, oldest first: version, source, rows, labelled, skipped, ...
    frame: pd.DataFrame  # the latest labelled rows (as many as retraining and judging need), oldest first
    performance: dict[str, Any] = field(default_factory=dict)  # the production model on the latest of them
    notes: list[str] = field(default_factory=list)

    @property
    def versions(self) -> list[int]:
        return [d["version"] for d in self.datasets]

    @property
    def labelled(self) -> int:
        return sum(d["labelled"] for d in self.datasets)

    def labelled_since(self, since: float) -> int:
        """Labelled rows of the new datasets ingested after `since` (seconds since the epoch)."""
        return sum(d["labelled"] for d in self.datasets if d["created_at"] > since)

    def describe(self) -> str:
        """One line for a decision's reason: which datasets, how many labelled rows, the metric."""
        if not self.datasets:
            return f"no dataset ingested after dataset v{self.after}"
        skipped = sum(d["skipped"] for d in self.datasets)
        aside = sum(d["quarantined"] for d in self.datasets)
        text = (f"{_versions(self.versions)} ingested after dataset v{self.after}: {self.labelled} labelled rows"
                + (f" ({skipped} rows without a label the model can read, skipped)" if skipped else "")
                + (f" ({aside} rows set aside at ingest)" if aside else ""))
        perf = self.performance
        if perf.get("value") is not None and np.isfinite(perf["value"]):
            text += f"; {perf['metric']} {perf['value']:.4f} on the latest {perf['labelled_rows']}"
        return text

    def evidence(self) -> dict[str, Any]:
        """What a loop_events row and `--json` say about the new data."""
        return {"from": "datasets", "after": self.after, "versions": self.versions, "labelled_rows": self.labelled,
                "datasets": self.datasets, "performance": self.performance, "notes": self.notes}


def run_once(store: Store, spec: ProjectSpec, *, lease_ttl: float = LEASE_TTL) -> LoopDecision:
    """One turn of the loop. Every outcome, including doing nothing, is recorded with its evidence.

    One turn at a time per store, however many loops share it (an overlapping CronJob, two machines on
    one PostgreSQL): the turn holds the store's loop lease (renewed every `lease_ttl / 3` seconds while
    it runs; a crashed turn's lease expires `lease_ttl` seconds after its last renewal). A turn that
    finds the lease held does nothing but record a "busy" decision naming the holder. Alias moves are
    fenced by the lease: a turn that lost it (stalled past `lease_ttl`) records "failed" and moves none.

    While a shadow or canary rollout is active, a turn judges it on live traffic and acts on the
    verdict (`_drive`) instead of retraining; with `rollout.mode` shadow or canary, a retrained model
    that passes the gate starts a rollout instead of moving production."""
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
    rollout = active_rollout(store)
    if rollout is not None:  # a candidate is on live traffic: a new one would have nothing to compare with
        return _drive(store, spec, lease, rollout, summary)
    new = None
    if spec.retraining.data.from_ == "datasets":
        try:
            new = new_datasets(store, spec)
        except EverloopError as exc:
            return _record(store, LoopDecision("failed", f"reading the new datasets failed: {exc}", [], summary),
                           spec)
    evidence = new.evidence() if new else None
    fired = _triggers(store, spec, result, new)
    said = f"{', '.join(fired)} fired" + (f" ({new.describe()})" if new else "")
    if not fired:
        status = f"status: {result.status}" + (f"; {new.describe()}" if new else "")
        return _record(store, LoopDecision("idle", f"no trigger fired ({status})", [], summary, datasets=evidence),
                       spec)
    last = _last_retrain(store)
    cooldown = spec.retraining.cooldown_minutes * 60
    if last is not None and time.time() - last < cooldown:
        wait = (cooldown - (time.time() - last)) / 60
        return _record(store, LoopDecision("cooldown", f"{said}, but the last retraining was "
                                           f"less than {spec.retraining.cooldown_minutes:g} min ago "
                                           f"({wait:.1f} min to wait)", fired, summary, datasets=evidence), spec)
    try:
        version, dataset, recent = _retrain(store, spec, fired, new)
    except EverloopError as exc:
        return _record(store, LoopDecision("failed", f"retraining failed: {exc}", fired, summary,
                                           datasets=evidence), spec)
    gate = check_gate(store, spec, version)
    trained_on = f"dataset v{dataset.version} ({dataset.rows} rows)"
    if new is not None:
        evidence = evidence | {"trained_on": {"dataset": dataset.version, "rows": dataset.rows, "new_rows": recent}}
        trained_on = f"dataset v{dataset.version} ({dataset.rows} rows: {dataset.source.removeprefix(LOOP_SOURCE)})"
    if gate.passed and spec.rollout.mode != "direct":
        return _start(store, spec, lease, version, LoopDecision(
            "rollout_started", f"{said}; model v{version} trained on {trained_on} passed the gate",
            fired, summary, version, gate.to_dict(), evidence), trained_on)
    if gate.passed:
        decision = LoopDecision("promoted", f"{said}; model v{version} trained on {trained_on} passed "
                                "the gate and is in production", fired, summary, version, gate.to_dict(),
                                evidence)
    else:
        decision = LoopDecision("kept_candidate", f"{said}; model v{version} was refused by the gate: "
                                f"{'; '.join(gate.reasons)}", fired, summary, version, gate.to_dict(),
                                evidence)
    # The move and its audit row commit together: a kill between them would leave a promotion the
    # cooldown cannot see (it reads loop_events).
    try:  # production must still be the model the gate compared with, and this turn still the leader
        if gate.passed:
            set_alias(store, PRODUCTION, version, actor=ACTOR, from_version=gate.production, lease=lease,
                      reason=f"retrained on {trained_on} after {', '.join(fired)}; passed the gate",
                      then=lambda conn: _insert_event(conn, decision))
        else:
            set_alias(store, CANDIDATE, version, actor=ACTOR, reason="; ".join(gate.reasons),
                      lease=lease, then=lambda conn: _insert_event(conn, decision))
    except EverloopError as exc:  # AliasMoved, LeaseLost
        return _record(store, LoopDecision("failed", f"model v{version} trained on {trained_on} was not put live: "
                                           f"{exc}", fired, summary, version, gate.to_dict(), evidence), spec)
    return _alert(spec, decision)


def _start(store: Store, spec: ProjectSpec, lease: Lease, version: int, decision: LoopDecision,
           trained_on: str) -> LoopDecision:
    """Start a `rollout.mode` rollout of model `version` (it passed the gate: `decision.gate`, the
    turn's GateDecision as a dict, is handed to `start_rollout`, which does not run the gate again)
    and record `decision` ("rollout_started", its reason completed with what the candidate now
    serves), or a "failed" decision saying why the rollout could not start (production moved since
    the gate, a rollout started by hand meanwhile, the lease lost)."""
    mode = spec.rollout.mode
    gate = GateDecision(**decision.gate)
    done: dict[str, LoopDecision] = {}

    def audit(conn: sa.Connection, rollout_id: int) -> None:  # in the start's transaction
        row = conn.execute(sa.select(store.tables.rollouts).where(store.tables.rollouts.c.id == rollout_id)).one()
        serves = (f"it answers {row.share:g}% of the requests" if mode == "canary" else
                  f"it scores {row.sample:g}% of production's rows, off the response path")
        done["decision"] = replace(decision, reason=f"{decision.reason} and is tried on live traffic beside "
                                   f"production v{row.production} ({mode} rollout {rollout_id}: {serves})",
                                   rollout=jsonable(dict(row._mapping)))
        _insert_event(conn, done["decision"])

    try:
        start_rollout(store, spec, version, mode, actor=ACTOR, lease=lease, then=audit, gate=gate,
                      reason=f"retrained on {trained_on} after {', '.join(decision.triggers)}; passed the gate")
    except EverloopError as exc:  # AliasMoved, ConflictError, LeaseLost
        return _record(store, replace(decision, action="failed", reason=f"{decision.reason}, but its {mode} "
                                      f"rollout did not start: {exc}"), spec)
    return _alert(spec, done["decision"])


def _drive(store: Store, spec: ProjectSpec, lease: Lease, rollout: Rollout,
           summary: dict[str, Any]) -> LoopDecision:
    """Judge the active `rollout` on live traffic (`monitor.judge_rollout`) and act on the verdict:
    "step" sets a canary's share to `evidence["next_share"]`, "promote" and "rollback" finish it
    (production moves only on promote), "wait" moves nothing. Records the decision (ROLLOUT_ACTIONS)
    with the verdict's reason and evidence and the monitor's summary; a verdict that cannot be
    carried out (another process finished the rollout first, production moved, the lease was lost)
    or a judgement that fails is a "failed" decision, never raised."""
    about = f"{rollout.mode} rollout {rollout.id} of model v{rollout.candidate}"
    try:
        verdict = judge_rollout(store, spec, rollout)
    except EverloopError as exc:  # e.g. a version no longer in the registry
        return _record(store, LoopDecision("failed", f"{about} could not be judged: {exc}", [], summary,
                                           rollout.candidate, rollout={"id": rollout.id}), spec)
    decision = LoopDecision(ROLLOUT_ACTIONS[verdict.action], f"{about}: {verdict.reason}", [], summary,
                            rollout.candidate, rollout={"id": rollout.id, "verdict": verdict.action}
                            | verdict.evidence)
    audit = lambda conn, _id: _insert_event(conn, decision)  # noqa: E731 - in the change's transaction
    try:
        if verdict.action == "step":
            step_rollout(store, rollout.id, verdict.evidence["next_share"], reason=verdict.reason,
                         evidence=verdict.evidence, actor=ACTOR, lease=lease, then=audit)
        elif verdict.action in ("promote", "rollback"):
            outcome = "promoted" if verdict.action == "promote" else "rolled_back"
            finish_rollout(store, rollout.id, outcome, reason=verdict.reason, evidence=verdict.evidence,
                           actor=ACTOR, lease=lease, then=audit)
        else:  # wait: the latest numbers on the rollout, for `everloop rollout status`
            note_rollout(store, rollout.id, verdict.evidence)
            return _record(store, decision, spec)
    except EverloopError as exc:  # ConflictError, AliasMoved (the rollout stays active), LeaseLost
        return _record(store, replace(decision, action="failed", reason=f"{about}: judged '{verdict.action}' "
                                      f"({verdict.reason}), but that was not done: {exc}"), spec)
    return _alert(spec, decision)


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


def new_datasets(store: Store, spec: ProjectSpec) -> NewDatasets:
    """The labelled rows of the dataset versions ingested after the production model's data, for
    `retraining.data.from: datasets`, with the production model's performance on them.

    "After" is after the newest user dataset the production model's data holds: the datasets a loop
    retraining took (its manifest's `retrained_from`), else the dataset it was trained on. Datasets the
    loop stored for its own retrainings (source "loop: ...") are never new data. The frame holds the
    latest `max(retraining.data.recent_rows, the labelled window)` labelled rows, in dataset order (a
    version's rows in file order, newer versions last); per version, `datasets` counts every row. The
    production model is judged on the latest labelled window of them (`labelled_rows_limit`) by the
    monitor's rules (`everloop.monitor.judge_labelled`). Raises NotFoundError without a production
    model, and the store's errors when a dataset or model artifact cannot be read."""
    production = get_model(store, PRODUCTION)
    after = covered_dataset(production.manifest, production.dataset_version)
    found = [d for d in list_datasets(store) if d.version > after and not d.source.startswith(LOOP_SOURCE)]
    window = labelled_rows_limit(spec)
    need = max(spec.retraining.data.recent_rows, window)
    kept: list[pd.DataFrame] = []
    held = 0
    info = []
    for dataset in reversed(found):  # newest first: older rows are kept only while the latest need them
        labelled, skipped = _labelled(load_frame(store, dataset), spec, production.manifest)
        info.append({"version": dataset.version, "source": dataset.source, "rows": dataset.rows,
                     "labelled": len(labelled), "skipped": sum(skipped.values()), **skipped,
                     "quarantined": dataset.quarantined, "created_at": dataset.created_at})
        if held < need and len(labelled):
            kept.append(labelled.tail(need - held))
            held += len(kept[-1])
    frame = pd.concat(kept[::-1], ignore_index=True) if kept else pd.DataFrame()
    new = NewDatasets(after, info[::-1], frame)
    if held:
        _judge(store, spec, production.version, new, frame.tail(window))
    return new


def covered_dataset(manifest: dict[str, Any], dataset_version: int) -> int:
    """The newest dataset version whose rows a model's data holds: the newest of the datasets a loop
    retraining took (`manifest["retrained_from"]["datasets"]`), else the one it was trained on."""
    taken = (manifest.get("retrained_from") or {}).get("datasets")
    return max(taken) if taken else dataset_version


def _labelled(frame: pd.DataFrame, spec: ProjectSpec,
              manifest: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows of a dataset whose target holds a label valid for the model (parsed as its classes, or
    as numbers), and the rows skipped, by why: `no_target_column` (all of them), `empty_labels`, and
    `unreadable_labels` (a class the model never had, text for a regression)."""
    target = spec.data.target
    if target not in frame:
        return frame.iloc[:0], {"no_target_column": len(frame)}
    keep, parsed = valid_labels(manifest["task"], manifest.get("classes"), frame[target].tolist())
    out = frame.iloc[keep].reset_index(drop=True)
    out[target] = parsed
    empty = int(frame[target].isna().sum())
    return out, {"empty_labels": empty, "unreadable_labels": len(frame) - len(keep) - empty}


def _judge(store: Store, spec: ProjectSpec, version: int, new: NewDatasets, rows: pd.DataFrame) -> None:
    """The production model's metric and decay verdict on the latest labelled rows of the new datasets."""
    trained = load_model(store, version)
    metric = trained.manifest["metric"]
    out: dict[str, Any] = {"metric": metric, "expected": trained.manifest["metrics"][metric],
                           "labelled_rows": len(rows), "window_rows": labelled_rows_limit(spec), "value": None,
                           "decayed": False}
    scratch = MonitorResult(version, {"rows": 0}, None, None, {}, {})  # collects notes and "not judged"
    try:
        predictions = trained.predict(rows)
    except DataError as exc:
        new.performance = out | {"why": f"model v{version} cannot read these rows ({exc}); performance not judged"}
        return
    new.performance = judge_labelled(store, spec, trained, rows[spec.data.target].tolist(),
                                     predictions.labels.tolist(), predictions.proba, scratch, {}, out)
    new.notes = scratch.notes


def audit_trail(store: Store, limit: int = 100) -> list[dict[str, Any]]:
    t = store.tables.loop_events
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(t).order_by(t.c.id.desc()).limit(limit)).all()
    return [dict(r._mapping) for r in reversed(rows)]


def _triggers(store: Store, spec: ProjectSpec, result: MonitorResult, new: NewDatasets | None) -> list[str]:
    """The triggers that fire. With new datasets (`from: datasets`) performance and new_labels read their
    labelled rows instead of the prediction log's labels; drift always reads the prediction log."""
    triggers = spec.retraining.triggers
    fired = []
    # only judged signals fire: a window too small for a verdict, or labels too few, never retrain
    drifted = result.drift is not None and result.drift.dataset_drift and "drift" not in result.not_judged
    if "drift" in triggers and (drifted or any(w["dataset_drift"] for w in result.earlier)
                                or _drifted_since_last_turn(store, result.model_version)):
        fired.append("drift")
    performance = new.performance if new is not None else result.performance
    if "performance" in triggers and performance.get("decayed"):
        fired.append("performance")
    if "estimated_performance" in triggers and result.performance.get("estimated_decayed"):
        fired.append("estimated_performance")
    if "schedule" in triggers and spec.retraining.schedule_minutes:
        since = time.time() - (_last_retrain(store) or get_model(store, PRODUCTION).created_at)
        if since >= spec.retraining.schedule_minutes * 60:
            fired.append("schedule")
    if "new_labels" in triggers:
        since = _last_retrain(store) or 0
        labels = new.labelled_since(since) if new is not None else _labels_since(store, since)
        if labels >= spec.retraining.min_new_labels:
            fired.append("new_labels")
    return fired


def _retrain(store: Store, spec: ProjectSpec, fired: list[str],
             new: NewDatasets | None) -> tuple[int, DatasetVersion, int]:
    """Store the retraining data as a dataset version and train on it: (model version, that dataset,
    how many new labelled rows it holds)."""
    if new is None:
        recent = recent_labelled(store, spec, spec.retraining.data.recent_rows)
        if recent.empty:
            raise EverloopError("no labelled predictions to retrain on; send labels to /feedback")
        what = "recent labelled rows"
    else:
        recent = new.frame.tail(spec.retraining.data.recent_rows)
        if recent.empty:
            raise EverloopError(f"no labelled rows in datasets ingested after dataset v{new.after} to retrain "
                                "on; ingest a file with labels ('everloop ingest FILE')")
        what = f"labelled rows of {_versions(new.versions)}"
    production = get_model(store, PRODUCTION)
    reference = get_dataset(store, production.dataset_version)
    frame, recent_from_row = recent, 0
    if spec.retraining.data.include_reference:
        old = load_frame(store, reference)
        recent = _not_in(recent, old, spec)
        if recent.empty:
            which = "recent labelled prediction" if new is None else f"labelled row of {_versions(new.versions)}"
            raise EverloopError(f"every {which} is already in the production model's data; nothing new to "
                                "retrain on")
        frame = pd.concat([old, recent[[c for c in old.columns if c in recent]]], ignore_index=True)
        recent_from_row = len(old)
    dataset = ingest_frame(store, spec, frame, source=f"{LOOP_SOURCE}{len(recent)} {what}"
                           + (f" + dataset v{reference.version}" if spec.retraining.data.include_reference else ""),
                           parent=reference.version)
    template, record = _template(store, production)
    if new is not None:  # which datasets this model's data holds: the next turn's new data come after them
        record = (record or {}) | {"retrained_from": {"from": "datasets", "datasets": new.versions,
                                                      "after": new.after, "rows": len(recent)}}
    result = train(store, spec, dataset.version, reason=f"loop retraining after {', '.join(fired)}",
                   recent_from_row=recent_from_row, recent_weight=spec.retraining.data.recent_weight,
                   template=template, record=record)
    return result.version, dataset, len(recent)


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


def _drifted_since_last_turn(store: Store, model_version: int) -> bool:
    """Did a complete window of `model_version` judged since the loop's last turn drift? A batch job logs
    many windows at once, and `everloop monitor` run between two turns records (so the next turn does
    not judge again) the windows it judged: their drift must still reach the trigger."""
    events, runs = store.tables.loop_events, store.tables.monitor_runs
    with store.engine.connect() as conn:
        last_turn = conn.execute(sa.select(sa.func.max(events.c.created_at))).scalar() or 0.0
        results = conn.execute(sa.select(runs.c.result).where(
            runs.c.model_version == model_version, runs.c.complete.is_(True), runs.c.created_at > last_turn))
        return any((r.get("drift") or {}).get("dataset_drift") and "drift" not in (r.get("not_judged") or {})
                   for r in results.scalars())


def _last_retrain(store: Store) -> float | None:
    """When (epoch seconds) the loop last retrained (promoted, kept a candidate, started a rollout) or a
    rollout last ended promoted or rolled back (by the loop or by hand); None if never."""
    t, r = store.tables.loop_events, store.tables.rollouts
    with store.engine.connect() as conn:
        retrained = conn.execute(sa.select(sa.func.max(t.c.created_at)).where(t.c.action.in_(RETRAINED))).scalar()
        ended = conn.execute(sa.select(sa.func.max(r.c.updated_at))
                             .where(r.c.status.in_(["promoted", "rolled_back"]))).scalar()
    return max((at for at in (retrained, ended) if at is not None), default=None)


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


def _versions(versions: list[int]) -> str:
    return ("dataset v" if len(versions) == 1 else "datasets v") + ", v".join(map(str, versions))


def _record(store: Store, decision: LoopDecision, spec: ProjectSpec | None = None) -> LoopDecision:
    """Write `decision`'s loop_events row (its own transaction), then alert (see `_alert`)."""
    with store.engine.begin() as conn:
        _insert_event(conn, decision)
    return _alert(spec, decision)


def _insert_event(conn: sa.Connection, decision: LoopDecision) -> None:
    """Append `decision` to loop_events in `conn`'s transaction (the caller's, e.g. an alias move's)."""
    evidence = {"triggers": decision.triggers, "monitor": decision.monitor, "model_version": decision.model_version,
                "gate": decision.gate}
    for key in ("datasets", "rollout"):
        if getattr(decision, key) is not None:
            evidence[key] = getattr(decision, key)
    conn.execute(Store.tables.loop_events.insert().values(action=decision.action, reason=decision.reason,
                                                          evidence=jsonable(evidence)))


def _alert(spec: ProjectSpec | None, decision: LoopDecision) -> LoopDecision:
    """Send the webhook alert of a decision a person should hear about, once it is recorded."""
    if spec is not None and decision.action in ALERTING:
        payload = {"event": "loop", "action": decision.action, "reason": decision.reason,
                   "model_version": decision.model_version, "gate": decision.gate}
        if decision.datasets is not None:
            payload["datasets"] = {k: decision.datasets[k] for k in ("versions", "labelled_rows", "trained_on")
                                   if k in decision.datasets}
        if decision.rollout is not None:
            payload["rollout"] = {k: decision.rollout[k] for k in ("id", "verdict", "mode", "share", "candidate",
                                                                  "production") if k in decision.rollout}
        send_alert(spec, payload)
    return decision
