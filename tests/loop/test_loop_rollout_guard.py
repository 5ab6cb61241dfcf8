"""The loop and rollouts started by hand (issue 16): the loop's direct promotion does not move
production under a rollout started meanwhile, and a rollout the loop starts runs the gate once (the
turn's decision is handed to start_rollout). On SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from everloop import registry
from everloop.demo import make_churn
from everloop.loop import _controller, audit_trail, run_once
from everloop.registry import _rollout
from everloop.serve import create_app
from everloop.spec import parse_spec
from tests.conftest import copy_of_v1, send_traffic, served_project


@pytest.fixture(params=["sqlite", "postgresql"])
def client(request, tmp_path: Path):
    """An in-process service of a project with v1 in production, its store on either database; with
    .spec and .store attached."""
    from fastapi.testclient import TestClient

    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    folder, spec, store = served_project(tmp_path / "proj", db_url=url)
    try:
        with TestClient(create_app(folder, spec=spec, store=store, watch=False)) as client:
            client.spec, client.store = spec, store
            yield client
    finally:
        store.close()


def _with_mode(spec, mode: str):
    raw = spec.model_dump()
    raw["rollout"]["mode"] = mode
    return parse_spec(raw)


def test_a_rollout_the_loop_starts_runs_the_gate_once(client, monkeypatch):
    store, spec = client.store, _with_mode(client.spec, "canary")
    send_traffic(client, make_churn(1000, shifted=True, seed=12))  # drift fires: the loop retrains
    calls: list[tuple[str, int]] = []
    for module in (_controller, _rollout):
        def counted(store_, spec_, candidate, gate=module.check_gate, where=module.__name__):
            calls.append((where, candidate))
            return gate(store_, spec_, candidate)
        monkeypatch.setattr(module, "check_gate", counted)
    decision = run_once(store, spec)
    assert decision.action == "rollout_started", decision.reason
    assert calls == [("everloop.loop._controller", 2)]  # once, by the turn; not again by start_rollout
    rollout = registry.active_rollout(store)
    assert (rollout.candidate, rollout.production, rollout.actor) == (2, 1, "everloop loop")
    assert decision.gate["passed"] is True and decision.gate["production"] == 1
    assert audit_trail(store)[-1]["action"] == "rollout_started"


def test_the_loops_direct_promotion_does_not_move_production_under_a_rollout(client, monkeypatch):
    """A person starts a canary while the loop's turn is gating its retrained model: the turn must not
    move production under it (the look is in the move's transaction); it records a failed decision."""
    store, spec = client.store, _with_mode(client.spec, "direct")
    send_traffic(client, make_churn(1000, shifted=True, seed=12))
    by_hand = copy_of_v1(store)  # v2; the loop's retrained model is v3
    gate, started = _controller.check_gate, []

    def gate_while_alice_starts_a_canary(store_, spec_, candidate):
        started.append(registry.start_rollout(store, spec, by_hand, "canary", share=10, actor="alice"))
        return gate(store_, spec_, candidate)

    monkeypatch.setattr(_controller, "check_gate", gate_while_alice_starts_a_canary)
    decision = run_once(store, spec)
    assert decision.action == "failed" and decision.model_version == 3, decision.reason
    assert decision.gate["passed"] is True
    said = decision.reason.split(" was not put live: ")[1]
    assert said.startswith(f"production was not moved to v3: rollout {started[0].id} is active (canary of "
                           f"model v{by_hand} against production v1, since ")
    assert "'everloop rollout promote'" in said
    assert registry.alias_version(store, registry.PRODUCTION) == 1
    assert [h["to_version"] for h in registry.alias_history(store)] == [1]
    assert registry.active_rollout(store) == started[0]
    event = audit_trail(store)[-1]
    assert (event["action"], event["reason"], event["evidence"]["model_version"]) == ("failed", decision.reason, 3)
