"""Rollout state (registry/_rollout.py): states, refusals, races; on SQLite and PostgreSQL (conftest)."""

import threading

import pytest

from everloop import data, registry, train
from everloop.errors import ConflictError, EverloopError, GateError, NotFoundError
from everloop.registry import _rollout
from everloop.spec import load_spec, parse_spec
from everloop.store import Store
from tests.conftest import copy_of_v1, write_project




def test_canary_starts_at_the_first_step_and_steps(trained):
    folder, spec, store = trained
    v2 = copy_of_v1(store)
    assert registry.active_rollout(store) is None and registry.latest_rollout(store) is None
    started = registry.start_rollout(store, spec, v2, "canary", actor="alice", reason="try it")
    assert (started.mode, started.share, started.sample) == ("canary", 10.0, 0.0)
    assert started.steps == [10.0, 50.0, 100.0]
    assert (started.candidate, started.production, started.status) == (v2, 1, "active")
    assert (started.actor, started.reason, started.evidence) == ("alice", "try it", None)
    assert registry.active_rollout(store) == started == registry.latest_rollout(store)
    stepped = registry.step_rollout(store, started.id, 50, reason="judged live", evidence={"rows": 1200},
                                    actor="loop")
    assert (stepped.share, stepped.status, stepped.actor) == (50.0, "active", "loop")
    assert stepped.evidence == {"rows": 1200}
    # no evidence given: the last judgement's stays
    assert registry.step_rollout(store, started.id, 100, reason="by hand").evidence == {"rows": 1200}
    assert registry.alias_version(store, registry.PRODUCTION) == 1  # a canary moves no alias


def test_shadow_samples_the_specs_share_and_refuses_to_step(trained):
    folder, spec, store = trained
    v2 = copy_of_v1(store)
    shadow = registry.start_rollout(store, spec, v2, "shadow")
    assert (shadow.mode, shadow.share, shadow.sample, shadow.steps) == ("shadow", 0.0, 100.0, [])
    with pytest.raises(EverloopError, match=f"rollout {shadow.id} is a shadow: it answers no traffic"):
        registry.step_rollout(store, shadow.id, 50, reason="no")
    assert registry.get_rollout(store, shadow.id).share == 0.0


def test_bad_arguments_are_refused_naming_them(trained):
    folder, spec, store = trained
    v2 = copy_of_v1(store)
    with pytest.raises(EverloopError, match="canary share 0: expected a percent from"):
        registry.start_rollout(store, spec, v2, "canary", share=0)
    with pytest.raises(EverloopError, match="canary share 0.001: expected a percent from 0.01 to 100"):
        registry.start_rollout(store, spec, v2, "canary", share=0.001)  # below one of the service's 10,000 buckets
    with pytest.raises(EverloopError, match="shadow sample 150: expected a percent from"):
        registry.start_rollout(store, spec, v2, "shadow", sample=150)
    with pytest.raises(EverloopError, match="a shadow answers no traffic"):
        registry.start_rollout(store, spec, v2, "shadow", share=10)
    with pytest.raises(EverloopError, match="rollout mode 'direct'"):
        registry.start_rollout(store, spec, v2, "direct")
    with pytest.raises(EverloopError, match="model v1 is already in production"):
        registry.start_rollout(store, spec, 1, "canary")
    with pytest.raises(NotFoundError, match="model version 9 does not exist"):
        registry.start_rollout(store, spec, 9, "canary")
    with pytest.raises(NotFoundError, match="rollout 7 does not exist"):
        registry.finish_rollout(store, 7, "aborted", reason="x")
    assert registry.latest_rollout(store) is None


def test_a_second_active_rollout_is_refused_naming_the_first(trained):
    folder, spec, store = trained
    v2, v3 = copy_of_v1(store), copy_of_v1(store)
    first = registry.start_rollout(store, spec, v2, "shadow")
    with pytest.raises(ConflictError, match=f"rollout {first.id} is already active \\(shadow of model v{v2} "
                                            "against production v1"):
        registry.start_rollout(store, spec, v3, "canary")
    registry.finish_rollout(store, first.id, "aborted", reason="changed my mind")
    second = registry.start_rollout(store, spec, v3, "canary", share=25)
    assert registry.active_rollout(store).id == second.id and second.share == 25.0


def test_the_gate_guards_the_start_unless_forced(trained):
    folder, spec, store = trained
    raw = spec.model_dump()
    raw["model"] = {"estimator": "sklearn.dummy.DummyClassifier", "params": {}, "seed": 1}
    dummy = train.train(store, parse_spec(raw)).version
    with pytest.raises(GateError, match=f"model v{dummy} was not put in canary") as info:
        registry.start_rollout(store, spec, dummy, "canary")
    assert any("does not beat the trivial baseline" in r for r in info.value.reasons)
    assert registry.active_rollout(store) is None
    forced = registry.start_rollout(store, spec, dummy, "canary", force=True, reason="by hand")
    assert forced.reason.startswith("by hand (forced past: ") and "trivial baseline" in forced.reason


def test_no_production_means_promote_directly(tmp_path):
    folder = write_project(tmp_path / "p", rows=600)  # the refusal does not depend on the size: a quicker fit
    spec, store = load_spec(folder), Store.for_project(folder)
    data.ingest(store, spec, base=folder)
    v1 = train.train(store, spec).version
    with pytest.raises(NotFoundError, match=f"no model is in production .* directly: everloop promote {v1}"):
        registry.start_rollout(store, spec, v1, "shadow")
    store.close()


def test_promoted_moves_production_with_a_history_row(trained):
    folder, spec, store = trained
    v2 = copy_of_v1(store)
    rollout = registry.start_rollout(store, spec, v2, "canary")
    done = registry.finish_rollout(store, rollout.id, "promoted", reason="passed live", actor="loop",
                                   evidence={"agreement": 0.98})
    assert (done.status, done.reason, done.actor, done.evidence) == ("promoted", "passed live", "loop",
                                                                      {"agreement": 0.98})
    assert registry.alias_version(store, registry.PRODUCTION) == v2
    last = registry.alias_history(store)[-1]
    assert (last["from_version"], last["to_version"], last["actor"]) == (1, v2, "loop")
    assert last["reason"] == f"canary rollout {rollout.id}: passed live"
    assert registry.active_rollout(store) is None and registry.latest_rollout(store) == done


@pytest.mark.parametrize("outcome", ["rolled_back", "aborted"])
def test_rolled_back_or_aborted_leaves_production(trained, outcome):
    folder, spec, store = trained
    v2 = copy_of_v1(store)
    rollout = registry.start_rollout(store, spec, v2, "shadow")
    moves = len(registry.alias_history(store))
    done = registry.finish_rollout(store, rollout.id, outcome, reason="worse live",
                                   evidence={"error_rate": 0.5})
    assert (done.status, done.evidence) == (outcome, {"error_rate": 0.5})
    assert registry.alias_version(store, registry.PRODUCTION) == 1
    assert len(registry.alias_history(store)) == moves
    assert registry.active_rollout(store) is None


def test_finishing_twice_or_stepping_a_finished_rollout_is_refused(trained):
    folder, spec, store = trained
    v2 = copy_of_v1(store)
    rollout = registry.start_rollout(store, spec, v2, "canary")
    registry.finish_rollout(store, rollout.id, "rolled_back", reason="bad", actor="loop")
    for finish in (lambda: registry.finish_rollout(store, rollout.id, "promoted", reason="by hand"),
                   lambda: registry.step_rollout(store, rollout.id, 50, reason="by hand")):
        with pytest.raises(ConflictError, match=f"rollout {rollout.id} is not active: it was rolled back "
                                                "at .* by loop \\(bad\\)"):
            finish()
    assert registry.alias_version(store, registry.PRODUCTION) == 1
    assert registry.get_rollout(store, rollout.id).status == "rolled_back"


def test_a_second_finisher_that_read_active_loses_and_undoes_its_alias_move(trained, monkeypatch):
    """The promoter read `active`; a rollback committed before its move: the move is undone."""
    folder, spec, store = trained
    v2 = copy_of_v1(store)
    rollout = registry.start_rollout(store, spec, v2, "canary")
    read = _rollout.get_rollout

    def stale_read(store_, rollout_id):
        seen = read(store_, rollout_id)
        if seen.status == "active":  # the other finisher wins right after this one looked
            monkeypatch.setattr(_rollout, "get_rollout", read)
            registry.finish_rollout(store, rollout_id, "rolled_back", reason="bad", actor="loop")
        return seen

    monkeypatch.setattr(_rollout, "get_rollout", stale_read)
    with pytest.raises(ConflictError, match="it was rolled back"):
        registry.finish_rollout(store, rollout.id, "promoted", reason="by hand")
    assert registry.alias_version(store, registry.PRODUCTION) == 1
    assert [h["to_version"] for h in registry.alias_history(store)] == [1]
    assert registry.get_rollout(store, rollout.id).status == "rolled_back"


def test_production_moved_meanwhile_keeps_the_rollout_active(trained):
    folder, spec, store = trained
    v2, v3 = copy_of_v1(store), copy_of_v1(store)
    rollout = registry.start_rollout(store, spec, v2, "shadow")
    with pytest.raises(registry.RolloutActive, match=f"rollout {rollout.id}"):  # production moves only through it
        registry.promote(store, spec, v3, reason="someone else")
    assert registry.alias_version(store, registry.PRODUCTION) == 1
    aliases = store.tables.aliases  # an older build, without that check, moves production meanwhile
    with store.engine.begin() as conn:
        conn.execute(aliases.update().where(aliases.c.name == registry.PRODUCTION).values(version=v3))
    with pytest.raises(registry.AliasMoved, match="production moved from v1 to v3"):
        registry.finish_rollout(store, rollout.id, "promoted", reason="passed live")
    assert registry.alias_version(store, registry.PRODUCTION) == v3
    assert registry.active_rollout(store).status == "active"
    assert registry.finish_rollout(store, rollout.id, "aborted", reason="stale").status == "aborted"


def test_two_starts_at_once_one_wins(trained, monkeypatch):
    """Both look for an active rollout at the same moment: without the lock both would see none and
    insert. The look waits (bounded) for the other thread to look too; with the lock, the other is
    still queued, so the wait times out and the first commits before the second looks."""
    folder, spec, store = trained
    v2, v3 = copy_of_v1(store), copy_of_v1(store)
    both_looked = threading.Barrier(2, timeout=3)
    look = _rollout._active_row

    def look_together(conn, t):
        row = look(conn, t)
        try:
            both_looked.wait()
        except threading.BrokenBarrierError:
            pass
        return row

    gate, gated = _rollout.check_gate, threading.Barrier(2, timeout=60)

    def gate_together(*args):  # both enter the transaction at once, however long each gate took
        decision = gate(*args)
        gated.wait()
        return decision

    monkeypatch.setattr(_rollout, "_active_row", look_together)
    monkeypatch.setattr(_rollout, "check_gate", gate_together)
    monkeypatch.setattr(_rollout, "_refuse_if_active", lambda store_: None)  # both reach the transaction
    outcomes: dict[int, object] = {}

    def start(version):
        try:
            outcomes[version] = registry.start_rollout(store, spec, version, "canary")
        except Exception as exc:  # noqa: BLE001 - recorded, asserted below
            outcomes[version] = exc

    threads = [threading.Thread(target=start, args=(v,)) for v in (v2, v3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    won = [o for o in outcomes.values() if isinstance(o, registry.Rollout)]
    lost = [o for o in outcomes.values() if not isinstance(o, registry.Rollout)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert isinstance(lost[0], ConflictError) and f"rollout {won[0].id} is already active" in str(lost[0])
    t = store.tables.rollouts
    with store.engine.connect() as conn:
        statuses = [r.status for r in conn.execute(t.select())]
    assert statuses == ["active"]
