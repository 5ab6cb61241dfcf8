"""Issue 15, fault 6: the loop's alias move and its loop_events row commit in one transaction, so a
kill between them cannot leave a promotion without its audit row (which the cooldown reads)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from everloop import registry
from everloop.demo import make_churn
from everloop.loop import CANDIDATE, _controller, audit_trail, run_once
from everloop.spec import parse_spec
from tests.conftest import send_traffic


class Killed(Exception):
    """Stands for the process dying between the alias move and its audit row."""


def _fail_audit_of(monkeypatch: pytest.MonkeyPatch, action: str) -> None:
    real = _controller._insert_event

    def insert(conn, decision):
        if decision.action == action:
            raise Killed(f"no {action} row")
        real(conn, decision)

    monkeypatch.setattr(_controller, "_insert_event", insert)


def _events(store) -> list[str]:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(store.tables.loop_events.c.action)).scalars().all()


def test_a_promotion_whose_audit_row_fails_is_not_made(client, monkeypatch):
    store, spec = client.store, client.spec
    send_traffic(client, make_churn(1000, shifted=True, seed=12))
    history = registry.alias_history(store)
    _fail_audit_of(monkeypatch, "promoted")
    with pytest.raises(Killed):
        run_once(store, spec)
    assert registry.alias_version(store, registry.PRODUCTION) == 1, "production did not move"
    assert registry.alias_history(store) == history, "no history row without its audit row"
    assert "promoted" not in _events(store)
    assert [m.version for m in registry.list_models(store)] == [1, 2], "the retrained model stays a version"

    monkeypatch.undo()  # the next turn is not in cooldown (nothing was promoted) and promotes
    decision = run_once(store, spec)
    assert decision.action == "promoted" and decision.model_version == 3
    assert registry.alias_version(store, registry.PRODUCTION) == 3
    last = registry.alias_history(store)[-1]
    assert (last["from_version"], last["to_version"], last["actor"]) == (1, 3, "everloop loop")
    event = audit_trail(store)[-1]
    assert (event["action"], event["evidence"]["model_version"]) == ("promoted", 3)
    assert len(registry.alias_history(store)) == len(history) + 1 and _events(store).count("promoted") == 1


def test_a_kept_candidate_whose_audit_row_fails_moves_no_candidate(client, monkeypatch):
    store = client.store
    raw = client.spec.model_dump()
    raw["promotion"]["min_metric"] = 0.999
    strict = parse_spec(raw)
    send_traffic(client, make_churn(1000, shifted=True, seed=14))
    _fail_audit_of(monkeypatch, "kept_candidate")
    with pytest.raises(Killed):
        run_once(store, strict)
    assert registry.alias_version(store, CANDIDATE) is None
    assert registry.alias_history(store, CANDIDATE) == []
    assert "kept_candidate" not in _events(store)


def test_set_alias_writes_the_callers_rows_in_its_transaction(trained):
    _, _, store = trained
    events = store.tables.loop_events

    def audit(conn):
        conn.execute(events.insert().values(action="promoted", reason="test", evidence={}))

    def broken(conn):
        audit(conn)
        raise Killed("after the audit row, before the commit")

    registry.set_alias(store, "staging", 1, reason="test", then=audit)
    assert registry.alias_version(store, "staging") == 1
    assert [h["to_version"] for h in registry.alias_history(store, "staging")] == [1]
    assert _events(store) == ["promoted"]
    with pytest.raises(Killed):
        registry.set_alias(store, "canary", 1, reason="test", then=broken)
    assert registry.alias_version(store, "canary") is None and registry.alias_history(store, "canary") == []
    assert _events(store) == ["promoted"]
