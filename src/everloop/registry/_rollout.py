"""Shadow and canary rollouts: a candidate tried on live traffic beside production, state in the store.

A rollout is one row of the `rollouts` table. Its states:

    active ──> promoted      production moved to the candidate (an alias history row says so)
           ├─> rolled_back   judged worse (by the loop or a person); production untouched
           └─> aborted       stopped without a verdict; production untouched

At most one rollout is active per store; a finished one never changes again. While active, every
service replica reads it (`active_rollout`, polled) and serves the candidate as its mode says:
`shadow` (production answers; the candidate also scores `sample` percent of the rows, off the
response path) or `canary` (the candidate answers `share` percent of the traffic, stepped up through
`steps`). Every change is a compare-and-set on `status = 'active'`, so of two processes finishing
one rollout (the loop and a person, two loops on two machines) exactly one wins; the other gets a
ConflictError naming what happened. While one is active, production moves only by its promotion: a
direct promote or rollback (by hand or the loop) is refused with RolloutActive (`set_alias`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import sqlalchemy as sa

from everloop.errors import ConflictError, EverloopError, GateError, NotFoundError
from everloop.registry._registry import (PRODUCTION, AliasMoved, GateDecision, _user, _when, alias_version,
                                         check_gate, get_model, set_alias)
from everloop.spec import ProjectSpec
from everloop.store import Store
from everloop.store._lease import Lease

ACTIVE = "active"
FINISHED = ("promoted", "rolled_back", "aborted")
MODES = ("shadow", "canary")


@dataclass
class Rollout:
    """One rollout. `share`: canary, percent of traffic the candidate answers (shadow: 0); `sample`:
    shadow, percent of production's rows the candidate also scores (canary: 0); `steps`: canary, the
    percents the loop steps through; `actor` and `reason`: of the latest change; times in epoch
    seconds; `evidence`: the latest judgement's numbers (monitor/_live.py's), None before any."""

    id: int
    candidate: int
    production: int | None
    mode: str
    share: float
    sample: float
    steps: list[float]
    status: str
    actor: str
    reason: str
    created_at: float
    updated_at: float
    evidence: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Called inside a rollout change's transaction with (connection, rollout id): the loop's audit row.
Then = Callable[[sa.Connection, int], None]


def active_rollout(store: Store) -> Rollout | None:
    """The active rollout, or None: one indexed query (the service polls it every few seconds)."""
    t = store.tables.rollouts
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(t).where(t.c.status == ACTIVE).order_by(t.c.id.desc()).limit(1)).first()
    return None if row is None else _to_rollout(row)


def latest_rollout(store: Store) -> Rollout | None:
    """The active rollout, else the latest finished one; None when there was never one."""
    t = store.tables.rollouts
    with store.engine.connect() as conn:
        active_first = (t.c.status == ACTIVE).desc()
        row = conn.execute(sa.select(t).order_by(active_first, t.c.id.desc()).limit(1)).first()
    return None if row is None else _to_rollout(row)


def get_rollout(store: Store, rollout_id: int) -> Rollout:
    """Rollout `rollout_id`; raises NotFoundError when there is none."""
    t = store.tables.rollouts
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(t).where(t.c.id == rollout_id)).first()
    if row is None:
        raise NotFoundError(f"rollout {rollout_id} does not exist; see 'everloop rollout status'")
    return _to_rollout(row)


def start_rollout(store: Store, spec: ProjectSpec, candidate: int, mode: str, *,
                  share: float | None = None, sample: float | None = None, force: bool = False,
                  actor: str | None = None, reason: str = "", lease: Lease | None = None,
                  then: Then | None = None, gate: GateDecision | None = None) -> Rollout:
    """Start trying model `candidate` beside production on live traffic, in `mode` "shadow" or "canary".

    canary: the candidate answers `share` percent of requests (default: the first of `rollout.steps`);
    shadow: it answers none and also scores `sample` percent of production's rows (default
    `rollout.shadow_sample`). Percents from MIN_PERCENT (0.01) to 100. The candidate must pass the offline gate
    (`check_gate`) unless `force` (recorded in the reason); a caller that has just run the gate (the
    loop) passes its decision as `gate` and it is not run again: the rollout starts only if production
    is still the version that decision compared with. Raises EverloopError for a bad mode or percent
    or a `gate` of another candidate, NotFoundError for an unknown version or when nothing is in
    production (nothing to compare with: promote directly), GateError when refused, ConflictError
    naming the rollout already active, AliasMoved when production moved since the gate compared with
    it, LeaseLost with a lost `lease`. `then(conn, rollout_id)` runs in the same transaction (the
    loop's audit row commits with it)."""
    if mode not in MODES:
        raise EverloopError(f"rollout mode {mode!r}: expected 'shadow' or 'canary' (everloop promote V moves "
                            "all traffic at once)")
    if gate is not None and gate.candidate != candidate:
        raise EverloopError(f"the gate decision given is for model v{gate.candidate}, not v{candidate}: "
                            "pass the candidate's own (check_gate), or none to run the gate")
    get_model(store, candidate)
    production = alias_version(store, PRODUCTION)
    if production is None:
        raise NotFoundError(f"no model is in production to try model v{candidate} against; promote it "
                            f"directly: everloop promote {candidate}")
    if production == candidate:
        raise EverloopError(f"model v{candidate} is already in production; a rollout tries another version "
                            "beside it")
    if mode == "canary":
        if sample is not None:
            raise EverloopError("a canary answers its share of the traffic: sample is for shadow rollouts")
        share = _percent("canary share", spec.rollout.steps[0] if share is None else share)
        sample, steps = 0.0, [float(s) for s in spec.rollout.steps]
    else:
        if share is not None:
            raise EverloopError("a shadow answers no traffic: share is for canary rollouts (use sample)")
        share, steps = 0.0, []
        sample = _percent("shadow sample", spec.rollout.shadow_sample if sample is None else sample)
    _refuse_if_active(store)  # before the gate's work; checked again below, under the lock
    decision = gate if gate is not None else check_gate(store, spec, candidate)
    production = decision.production  # what the gate compared with: the lock below checks it is still live
    if not decision.passed and not force:
        listed = "\n".join(f"  - {r}" for r in decision.reasons)
        raise GateError(f"model v{candidate} was not put in {mode}:\n{listed}", reasons=decision.reasons)
    why = reason or "passed the gate"
    if not decision.passed:
        why = f"{why} (forced past: {'; '.join(decision.reasons)})"
    t, aliases = store.tables.rollouts, store.tables.aliases
    with store.engine.begin() as conn:
        if lease is not None:
            lease.check(conn)
        # Write-lock production's alias row first: concurrent starts (and alias moves) queue here, so
        # the look for an active rollout below sees whichever committed first. PostgreSQL re-checks the
        # WHERE after the wait; SQLite takes its one write lock before any read of this transaction.
        locked = conn.execute(aliases.update()
                              .where(aliases.c.name == PRODUCTION, aliases.c.version == production)
                              .values(version=aliases.c.version))
        if locked.rowcount != 1:
            found = conn.execute(sa.select(aliases.c.version).where(aliases.c.name == PRODUCTION)).scalar()
            raise AliasMoved(PRODUCTION, production, found)
        active = _active_row(conn, t)
        if active is not None:
            raise _already_active(_to_rollout(active))
        now = time.time()
        new_id = conn.execute(t.insert().values(
            created_at=now, updated_at=now, candidate=candidate, production=production, mode=mode,
            share=share, sample=sample, steps=steps, status=ACTIVE, actor=actor or _user(), reason=why,
            evidence=None)
            .returning(t.c.id)).scalar_one()
        if then is not None:
            then(conn, new_id)
    return get_rollout(store, new_id)


def step_rollout(store: Store, rollout_id: int, share: float, *, reason: str,
                 evidence: dict[str, Any] | None = None, actor: str | None = None,
                 lease: Lease | None = None, then: Then | None = None) -> Rollout:
    """Set an active canary's share of traffic to `share` percent, from MIN_PERCENT to 100; `evidence` (if given)
    replaces the recorded one. Raises EverloopError for a bad share or a shadow rollout (it answers no
    traffic), NotFoundError for an unknown id, ConflictError when it is no longer active."""
    share = _percent("canary share", share)
    rollout = get_rollout(store, rollout_id)
    if rollout.mode != "canary":
        raise EverloopError(f"rollout {rollout_id} is a {rollout.mode}: it answers no traffic, so it has no "
                            "share to step; promote it, roll it back or abort it")
    values: dict[str, Any] = {"share": share, "reason": reason, "actor": actor or _user()}
    if evidence is not None:
        values["evidence"] = evidence
    with store.engine.begin() as conn:
        if lease is not None:
            lease.check(conn)
        _change(conn, store, rollout_id, values)
        if then is not None:
            then(conn, rollout_id)
    return get_rollout(store, rollout_id)


def note_rollout(store: Store, rollout_id: int, evidence: dict[str, Any]) -> None:
    """Record the latest judgement's `evidence` on an active rollout without changing anything else
    (a "wait" verdict: `everloop rollout status` shows where it stands). A rollout no longer active
    is left as it ended."""
    t = store.tables.rollouts
    with store.engine.begin() as conn:
        conn.execute(t.update().where(t.c.id == rollout_id, t.c.status == ACTIVE)
                     .values(evidence=evidence, updated_at=time.time()))


def finish_rollout(store: Store, rollout_id: int, outcome: str, *, reason: str,
                   evidence: dict[str, Any] | None = None, actor: str | None = None,
                   lease: Lease | None = None, then: Then | None = None) -> Rollout:
    """End an active rollout as `outcome`: "promoted" moves production to the candidate, only if it
    still points at the version the rollout compared with (the move, its alias history row and the
    status commit together); "rolled_back" or "aborted" leave production alone (the candidate is
    simply served no more). `evidence` (if given) replaces the recorded one. Raises EverloopError for
    an unknown outcome, NotFoundError for an unknown id, ConflictError when the rollout is no longer
    active (another finisher won), AliasMoved when production moved meanwhile (the rollout stays
    active: roll it back or abort it), LeaseLost with a lost `lease`."""
    if outcome not in FINISHED:
        raise EverloopError(f"rollout outcome {outcome!r}: expected one of {', '.join(FINISHED)}")
    rollout = get_rollout(store, rollout_id)
    if rollout.status != ACTIVE:
        raise _not_active(rollout)
    actor = actor or _user()
    values: dict[str, Any] = {"status": outcome, "reason": reason, "actor": actor}
    if evidence is not None:
        values["evidence"] = evidence

    def mark(conn: sa.Connection) -> None:
        _change(conn, store, rollout_id, values)
        if then is not None:
            then(conn, rollout_id)

    if outcome == "promoted":
        set_alias(store, PRODUCTION, rollout.candidate, actor=actor, from_version=rollout.production,
                  reason=f"{rollout.mode} rollout {rollout_id}: {reason}", lease=lease, then=mark,
                  rollout=rollout_id)  # the one move production allows under this rollout
    else:
        with store.engine.begin() as conn:
            if lease is not None:
                lease.check(conn)
            mark(conn)
    return get_rollout(store, rollout_id)


def _change(conn: sa.Connection, store: Store, rollout_id: int, values: dict[str, Any]) -> None:
    """Update rollout `rollout_id` with `values` if it is still active, else raise ConflictError (or
    NotFoundError) saying what it is now. The UPDATE comes first: it is the compare-and-set, and on
    SQLite a transaction that writes first never reads a snapshot another writer made stale."""
    t = store.tables.rollouts
    done = conn.execute(t.update().where(t.c.id == rollout_id, t.c.status == ACTIVE)
                        .values(**values, updated_at=time.time()))
    if done.rowcount == 1:
        return
    row = conn.execute(sa.select(t).where(t.c.id == rollout_id)).first()
    if row is None:
        raise NotFoundError(f"rollout {rollout_id} does not exist; see 'everloop rollout status'")
    raise _not_active(_to_rollout(row))


def _refuse_if_active(store: Store) -> None:
    active = active_rollout(store)
    if active is not None:
        raise _already_active(active)


def _active_row(conn: sa.Connection, t: sa.Table) -> Any:
    return conn.execute(sa.select(t).where(t.c.status == ACTIVE).limit(1)).first()


def _already_active(active: Rollout) -> ConflictError:
    return ConflictError(
        f"rollout {active.id} is already active ({active.mode} of model v{active.candidate} against "
        f"production v{active.production}, since {_when(active.created_at)}); finish it first with "
        "'everloop rollout promote', 'rollback' or 'abort'")


def _not_active(rollout: Rollout) -> ConflictError:
    return ConflictError(f"rollout {rollout.id} is not active: it was {rollout.status.replace('_', ' ')} "
                         f"at {_when(rollout.updated_at)} by {rollout.actor} ({rollout.reason}); nothing was "
                         "changed")


MIN_PERCENT = 0.01  # the service splits traffic in 10,000 buckets: a smaller share would answer no request


def _percent(name: str, value: float) -> float:
    value = float(value)
    if not MIN_PERCENT <= value <= 100:  # NaN fails this too
        raise EverloopError(f"{name} {value:g}: expected a percent from {MIN_PERCENT:g} to 100")
    return value


def _to_rollout(row: Any) -> Rollout:
    return Rollout(row.id, row.candidate, row.production, row.mode, row.share, row.sample,
                   [float(s) for s in row.steps], row.status, row.actor, row.reason, row.created_at,
                   row.updated_at, row.evidence)
