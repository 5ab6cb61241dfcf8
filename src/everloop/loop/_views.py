"""Bounded reads of the loop's audit trail for pages and listings: the latest decisions, paged and
filtered by action, and where a project stands before its loop can run."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from everloop.errors import EverloopError
from everloop.loop._controller import ROLLOUT_ACTIONS
from everloop.store import Store

# Every action a loop_events row can hold (see LoopDecision.action), in the order a reader meets them.
ACTIONS = ("idle", "cooldown", "busy", "promoted", "kept_candidate", "failed", "rollout_started",
           *ROLLOUT_ACTIONS.values())
MAX_PAGE = 500  # decisions one call returns at most


def decisions(store: Store, *, limit: int = 50, before: int | None = None,
              action: str | None = None) -> tuple[list[dict[str, Any]], int | None]:
    """One page of the audit trail, newest first: `(rows, older)`.

    `rows`: up to `limit` loop_events rows as dicts (id, created_at in epoch seconds, action, reason,
    evidence: the decision's triggers, monitor summary, gate decision, rollout verdict), each with an id
    below `before` when given, and only of `action` when given. `older`: the `before` of the next
    (older) page, None when there is none. One query on the primary key (`ORDER BY id DESC LIMIT`),
    whatever the trail's length; a filter by a rare action walks back until it finds `limit` rows.

    Raises EverloopError for `limit` outside 1..MAX_PAGE, a `before` below 1 or an unknown `action`
    (the message lists the known ones)."""
    if not 1 <= limit <= MAX_PAGE:
        raise EverloopError(f"limit {limit}: expected 1 to {MAX_PAGE} decisions")
    if before is not None and before < 1:
        raise EverloopError(f"before {before}: expected a decision id of 1 or more")
    if action is not None and action not in ACTIONS:
        raise EverloopError(f"action {action!r}: not a loop decision; expected one of {', '.join(ACTIONS)}")
    t = store.tables.loop_events
    query = sa.select(t).order_by(t.c.id.desc()).limit(limit + 1)  # one more: is there an older page?
    if before is not None:
        query = query.where(t.c.id < before)
    if action is not None:
        query = query.where(t.c.action == action)
    with store.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(query)]
    older = rows[limit - 1]["id"] if len(rows) > limit else None
    return rows[:limit], older


def setup_state(store: Store) -> dict[str, Any]:
    """Where a project stands on its way to a running loop, from three indexed reads: {"datasets": the
    latest dataset version or 0, "models": the latest model version or 0, "production": the version
    the production alias names or None, "next": the command to run next, or None once a model is in
    production}."""
    t = store.tables
    with store.engine.connect() as conn:
        datasets = conn.execute(sa.select(sa.func.max(t.datasets.c.version))).scalar() or 0
        models = conn.execute(sa.select(sa.func.max(t.models.c.version))).scalar() or 0
        production = conn.execute(sa.select(t.aliases.c.version).where(t.aliases.c.name == "production")).scalar()
    step = None
    if not datasets:
        step = "everloop ingest"
    elif not models:
        step = "everloop train"
    elif production is None:
        step = f"everloop promote {models}"
    return {"datasets": datasets, "models": models, "production": production, "next": step}
