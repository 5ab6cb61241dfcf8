"""Production does not move under an active shadow or canary rollout (issue 16): a direct promotion or
rollback is refused, in the move's own transaction, naming the rollout and how to finish it; the
rollout's own promotion still moves it. And `start_rollout(gate=...)` takes a gate decision already
made instead of running the gate again. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re
import threading

import pytest
import sqlalchemy as sa

from everloop import registry, train
from everloop.errors import EverloopError, GateError
from everloop.registry import _registry, _rollout
from everloop.registry._registry import RolloutActive
from tests.conftest import copy_of_v1, wait_for

FINISH = ("Finish it first: 'everloop rollout promote' moves production to v{c}; 'everloop rollout rollback' "
          "or 'everloop rollout abort' keeps v1 and stops serving v{c}")


def _refusal(what: str, rollout, candidate: int) -> str:
    """The RolloutActive message, up to the time the rollout started (local time: matched apart)."""
    return (f"{what}: rollout {rollout.id} is active ({rollout.mode} of model v{candidate} against production "
            "v1, since ")


def _unmoved(store, history: list) -> None:
    assert registry.alias_version(store, registry.PRODUCTION) == 1
    assert registry.alias_history(store) == history


def test_promote_rollback_and_set_alias_are_refused_under_an_active_rollout(trained):
    folder, spec, store = trained
    v2, v3 = copy_of_v1(store), copy_of_v1(store)
    rollout = registry.start_rollout(store, spec, v2, "canary", share=10)
    history = registry.alias_history(store)
    with pytest.raises(RolloutActive) as promoted:
        registry.promote(store, spec, v3, reason="by hand")
    assert str(promoted.value).startswith(_refusal(f"model v{v3} was not promoted", rollout, v2))
    assert str(promoted.value).endswith(FINISH.format(c=v2))
    assert promoted.value.rollout == rollout.id
    with pytest.raises(RolloutActive, match=re.escape(_refusal("production was not rolled back", rollout, v2))):
        registry.rollback(store)
    with pytest.raises(RolloutActive, match=re.escape(_refusal(f"production was not moved to v{v3}", rollout, v2))):
        registry.set_alias(store, registry.PRODUCTION, v3, reason="the loop's direct promotion")
    _unmoved(store, history)
    assert registry.active_rollout(store) == rollout  # untouched
    registry.set_alias(store, "staging", v3, reason="other aliases move freely")
    assert registry.alias_version(store, "staging") == v3
    # promoting the version already in production moves nothing: no refusal either
    assert registry.promote(store, spec, 1).evidence == {"unchanged": True}
    # the rollout's own promotion moves production; then direct moves work again
    done = registry.finish_rollout(store, rollout.id, "promoted", reason="passed live")
    assert done.status == "promoted" and registry.alias_version(store, registry.PRODUCTION) == v2
    assert registry.rollback(store) == 1
    registry.promote(store, spec, v3)
    assert [h["to_version"] for h in registry.alias_history(store)] == [1, v2, 1, v3]


def test_a_rollout_started_after_promotes_first_look_is_seen_by_the_move(trained, monkeypatch):
    """The gate's work runs between promote's early look and the move: a rollout started meanwhile
    (by a person, or another loop) is found by the look in the move's transaction."""
    folder, spec, store = trained
    v2, v3 = copy_of_v1(store), copy_of_v1(store)
    gate, started = _registry.check_gate, []

    def gate_while_someone_starts_a_rollout(store_, spec_, candidate):
        started.append(registry.start_rollout(store, spec, v2, "shadow", actor="alice"))
        return gate(store_, spec_, candidate)

    monkeypatch.setattr(_registry, "check_gate", gate_while_someone_starts_a_rollout)
    with pytest.raises(RolloutActive) as refused:
        registry.promote(store, spec, v3)
    assert len(started) == 1 and registry.active_rollout(store).id == started[0].id
    assert str(refused.value).startswith(_refusal(f"production was not moved to v{v3}", started[0], v2))
    assert registry.alias_version(store, registry.PRODUCTION) == 1
    assert [h["to_version"] for h in registry.alias_history(store)] == [1]


def test_a_start_and_a_promotion_racing_one_wins(trained):
    """PostgreSQL, two threads: the start holds production's alias row (its transaction not yet
    committed) while the promotion's move waits for that row; once the start commits, the move must
    see the rollout and refuse. (SQLite runs one writer at a time: nothing interleaves.)"""
    folder, spec, store = trained
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite runs one writer at a time: no interleaving to test")
    v2, v3 = copy_of_v1(store), copy_of_v1(store)
    xid: list[str] = []
    holding, release = threading.Event(), threading.Event()

    def hold(conn, rollout_id):  # inside the start's transaction, the alias row locked
        xid.append(conn.execute(sa.text("select backend_xid::text from pg_stat_activity "
                                        "where pid = pg_backend_pid()")).scalar_one())
        holding.set()
        assert release.wait(30)

    outcome: dict = {}

    def run(name, fn):
        try:
            outcome[name] = fn()
        except Exception as exc:  # noqa: BLE001 - the test reads it
            outcome[name] = exc

    start = threading.Thread(target=run, args=("start", lambda: registry.start_rollout(
        store, spec, v2, "canary", share=10, then=hold)))
    start.start()
    assert holding.wait(30)
    promote = threading.Thread(target=run, args=("promote", lambda: registry.promote(store, spec, v3)))
    promote.start()
    try:
        # the promotion's move is waiting on the start's transaction (its row lock)
        waiting = sa.text("select count(*) from pg_locks where locktype = 'transactionid' "
                          "and transactionid::text = :xid and not granted")
        with store.engine.connect() as conn:
            wait_for(lambda: conn.execute(waiting, {"xid": xid[0]}).scalar_one() > 0 or None,
                     "the promotion to wait for the start's row lock")
    finally:
        release.set()
        start.join(30)
        promote.join(30)
    rollout = outcome["start"]
    assert isinstance(rollout, registry.Rollout) and rollout.status == "active"
    assert isinstance(outcome["promote"], RolloutActive), outcome["promote"]
    assert str(outcome["promote"]).startswith(_refusal(f"production was not moved to v{v3}", rollout, v2))
    assert registry.alias_version(store, registry.PRODUCTION) == 1
    assert [h["to_version"] for h in registry.alias_history(store)] == [1]


def test_the_cli_refuses_a_direct_promote_or_rollback_under_a_rollout(trained, everloop, monkeypatch):
    folder, spec, store = trained
    monkeypatch.setenv("EVERLOOP_DB_URL", store.db_url)  # the CLI opens the same store
    p = ["-p", str(folder)]
    v2, v3 = copy_of_v1(store), copy_of_v1(store)
    assert everloop("promote", str(v2), "--canary", "10", *p).code == 0
    promoted = everloop("promote", str(v3), *p)
    rollout = registry.active_rollout(store)
    assert promoted.code == 1 and "Traceback" not in promoted.err
    assert promoted.err.startswith("error: " + _refusal(f"model v{v3} was not promoted", rollout, v2))
    assert FINISH.format(c=v2) in " ".join(promoted.err.split())  # the console may wrap the line
    back = everloop("rollback", *p)
    assert back.code == 1
    assert back.err.startswith("error: " + _refusal("production was not rolled back", rollout, v2))
    assert registry.alias_version(store, registry.PRODUCTION) == 1
    finished = everloop("rollout", "promote", *p)
    assert finished.code == 0 and registry.alias_version(store, registry.PRODUCTION) == v2


def test_the_cli_still_runs_the_gate_for_a_rollout(trained, everloop, monkeypatch):
    folder, spec, store = trained
    monkeypatch.setenv("EVERLOOP_DB_URL", store.db_url)
    dummy = spec.model_copy(update={"model": spec.model.model_copy(
        update={"estimator": "sklearn.dummy.DummyClassifier", "params": {"strategy": "prior"}})})
    weak = train.train(store, dummy).version  # predicts the class prior: roc_auc 0.5, below min_metric 0.7
    refused = everloop("promote", str(weak), "--canary", "10", "--json", "-p", str(folder))
    assert refused.code == 1
    answer = json.loads(refused.out)
    assert (answer["candidate"], answer["passed"]) == (weak, False)
    assert any("roc_auc" in r and "0.7" in r for r in answer["reasons"]), answer["reasons"]
    assert registry.latest_rollout(store) is None


def test_start_rollout_takes_the_gate_decision_it_is_given(trained, monkeypatch):
    folder, spec, store = trained
    v2, v3 = copy_of_v1(store), copy_of_v1(store)
    decision = registry.check_gate(store, spec, v2)
    assert decision.passed and decision.production == 1

    def no_second_gate(*args):
        raise AssertionError("the gate ran again")

    monkeypatch.setattr(_rollout, "check_gate", no_second_gate)
    with pytest.raises(EverloopError, match=f"the gate decision given is for model v{v2}, not v{v3}"):
        registry.start_rollout(store, spec, v3, "canary", gate=decision)
    failed = registry.GateDecision(v3, 1, False, ["worse than production"], {})
    with pytest.raises(GateError, match=f"model v{v3} was not put in canary:\n  - worse than production"):
        registry.start_rollout(store, spec, v3, "canary", gate=failed)
    forced = registry.start_rollout(store, spec, v3, "canary", gate=failed, force=True, reason="try")
    assert forced.reason == "try (forced past: worse than production)"
    registry.finish_rollout(store, forced.id, "aborted", reason="next")
    started = registry.start_rollout(store, spec, v2, "shadow", gate=decision, reason="passed")
    assert (started.candidate, started.production, started.reason) == (v2, 1, "passed")
    registry.finish_rollout(store, started.id, "aborted", reason="next")
    # a decision about a production that is no longer live starts nothing
    registry.promote(store, spec, v3, force=True)
    with pytest.raises(registry.AliasMoved, match=f"production moved from v1 to v{v3}"):
        registry.start_rollout(store, spec, v2, "canary", gate=decision)
    assert registry.active_rollout(store) is None
