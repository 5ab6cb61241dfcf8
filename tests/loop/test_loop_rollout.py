"""The loop drives shadow and canary rollouts (issue 16): each turn judges the active rollout on live
traffic and steps, promotes or rolls it back, with the evidence in loop_events; with rollout.mode
shadow/canary a retrained model that passes the gate starts a rollout instead of moving production.
Logs are written directly in the service's format (as tests/monitor/test_live.py does)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import sqlalchemy as sa

from everloop import registry, train
from everloop.demo import make_churn
from everloop.loop import audit_trail, run_once
from everloop.monitor import LiveVerdict
from everloop.spec import parse_spec
from everloop.store import prediction_log

from tests.conftest import (TEMPLATES, feature_rows, promoted_v1_and_candidates, send_traffic, served_project,
                            write_project)

PROD_WORKER, CAND_WORKER = "a" * 16, "b" * 16
LIVE = {"min_rows": 300, "min_labelled_rows": 200, "max_regression": 0.02, "max_latency_ratio": 1.5,
        "max_error_rate": 0.05}


def live_spec(spec, mode: str = "direct", webhook: str | None = None):
    """`spec` with test-sized promotion.live thresholds, `rollout.mode` and a webhook."""
    raw = spec.model_dump()
    raw["promotion"]["live"] = LIVE
    raw["rollout"]["mode"] = mode
    raw["monitoring"]["webhook"] = webhook
    return parse_spec(raw)


@pytest.fixture
def proj(tmp_path: Path):
    """A project with v1 in production, v2 the same model retrained (a good candidate: passes the gate)
    and v3 a model that ignores the features (the class prior for every row): a fresh copy of the
    session's template (tests/conftest.py `promoted_v1_and_candidates`); (spec, store, loaded models)."""
    spec, store = TEMPLATES.clone(write_project(tmp_path / "proj"), None, promoted_v1_and_candidates)
    yield SimpleNamespace(spec=spec, store=store, good=2, bad=3,
                          loaded={v: registry.load_model(store, v) for v in (1, 2, 3)})
    store.close()


def log(m, version: int, frame, worker: str, first: int, *, rollout: int | None = None) -> None:
    """Log `frame` as scored by `version` now (ids worker + first..), 2 ms a row: in prediction_batches,
    or in shadow_batches under `rollout` (a shadow candidate's rows)."""
    model = m.loaded[version]
    proba = model.predict(frame).proba
    features = pa.Table.from_pylist(feature_rows(frame))
    row = prediction_log.batch_row(worker, first, features, np.asarray(model.classes)[proba.argmax(axis=1)],
                                   proba, model.classes, time.time(), version, np.full(len(frame), 2.0))
    table = m.store.tables.prediction_batches if rollout is None else m.store.tables.shadow_batches
    with m.store.engine.begin() as conn:
        conn.execute(table.insert(), [row if rollout is None else row | {"rollout": rollout}])


def label(m, prediction_ids: list[str], truth) -> None:
    with m.store.engine.begin() as conn:
        conn.execute(m.store.tables.feedback.insert(), [
            {"prediction_id": i, "created_at": time.time(), "label": int(y)} for i, y in zip(prediction_ids, truth)])


def ids(worker: str, first: int, n: int) -> list[str]:
    return [f"{worker}{c:x}" for c in range(first, first + n)]


def canary_traffic(m, candidate: int) -> None:
    """800 rows answered by production, 400 by `candidate`, every one labelled."""
    frame = make_churn(1200, seed=13)
    log(m, 1, frame.iloc[:800], PROD_WORKER, 0)
    log(m, candidate, frame.iloc[800:], CAND_WORKER, 0)
    label(m, ids(PROD_WORKER, 0, 800) + ids(CAND_WORKER, 0, 400), frame["churned"])


def loop_alerts(received: list) -> list[dict]:
    return [r for r in received if r["event"] == "loop"]


def test_a_canary_that_ignores_the_features_is_rolled_back_with_its_evidence(proj, webhook):
    url, received = webhook
    spec = live_spec(proj.spec, webhook=url)
    rollout = registry.start_rollout(proj.store, spec, proj.bad, "canary", force=True, actor="alice")
    canary_traffic(proj, proj.bad)

    decision = run_once(proj.store, spec)
    assert decision.action == "rollout_rolled_back", decision.reason
    assert decision.reason.startswith(f"canary rollout {rollout.id} of model v3: roc_auc 0.5000 of candidate v3 "
                                      "is worse than production v1's ")
    assert registry.alias_version(proj.store, registry.PRODUCTION) == 1
    finished = registry.get_rollout(proj.store, rollout.id)
    assert (finished.status, finished.actor) == ("rolled_back", "everloop loop")
    assert finished.evidence["labelled"]["candidate"] == 0.5
    event = audit_trail(proj.store)[-1]
    assert event["action"] == "rollout_rolled_back" and event["reason"] == decision.reason
    evidence = event["evidence"]["rollout"]
    assert (evidence["id"], evidence["verdict"], evidence["candidate"]) == (rollout.id, "rollback", 3)
    assert evidence["rows"] == {"candidate": 400, "production": 800}
    assert evidence["labelled"]["candidate"] == 0.5 and evidence["labelled"]["loss_low"] > 0.02
    assert event["evidence"]["monitor"]["model_version"] == 1  # the monitor ran, as on every turn
    assert event["evidence"]["model_version"] == 3
    [alert] = loop_alerts(received)
    assert alert["action"] == "rollout_rolled_back" and alert["reason"] == decision.reason
    assert alert["rollout"] == {"id": rollout.id, "verdict": "rollback", "mode": "canary", "share": 10.0,
                                "candidate": 3, "production": 1}
    assert registry.active_rollout(proj.store) is None


def test_a_good_canary_is_stepped_then_promoted_over_turns(proj, webhook):
    url, received = webhook
    spec = live_spec(proj.spec, webhook=url)
    rollout = registry.start_rollout(proj.store, spec, proj.good, "canary")
    assert rollout.share == 10
    canary_traffic(proj, proj.good)

    first = run_once(proj.store, spec)
    assert first.action == "rollout_step", first.reason
    assert first.reason.endswith("; step to 50%")
    assert registry.active_rollout(proj.store).share == 50
    assert run_once(proj.store, spec).action == "rollout_step"
    assert registry.active_rollout(proj.store).share == 100
    last = run_once(proj.store, spec)
    assert last.action == "rollout_promoted", last.reason
    assert last.reason.startswith(f"canary rollout {rollout.id} of model v2: candidate v2 passes on live traffic")

    assert registry.alias_version(proj.store, registry.PRODUCTION) == 2
    move = registry.alias_history(proj.store)[-1]
    assert (move["actor"], move["to_version"]) == ("everloop loop", 2)
    assert move["reason"].startswith(f"canary rollout {rollout.id}: candidate v2 passes")
    assert registry.get_rollout(proj.store, rollout.id).status == "promoted"
    events = audit_trail(proj.store)
    assert [e["action"] for e in events] == ["rollout_step", "rollout_step", "rollout_promoted"]
    assert [e["evidence"]["rollout"]["share"] for e in events] == [10, 50, 100]  # the share each was judged at
    assert [e["evidence"]["rollout"].get("next_share") for e in events] == [50, 100, None]
    assert all(e["evidence"]["rollout"]["labelled"]["rows"] == {"candidate": 400, "production": 800}
               for e in events)
    assert [a["action"] for a in loop_alerts(received)] == ["rollout_promoted"]  # steps are not paged


def test_a_candidate_failing_every_call_is_rolled_back_without_labels(proj):
    spec = live_spec(proj.spec)
    rollout = registry.start_rollout(proj.store, spec, proj.good, "shadow")
    log(proj, 1, make_churn(500, seed=15), PROD_WORKER, 0)  # no label anywhere
    with proj.store.engine.begin() as conn:
        conn.execute(proj.store.tables.rollout_stats.insert(), [
            {"created_at": time.time(), "rollout": rollout.id, "worker": w, "model_version": v, "calls": c,
             "errors": e, "rows": c - e} for w, v, c, e in [("w0", 2, 20, 20), ("w1", 2, 10, 10), ("w0", 1, 500, 0)]])

    decision = run_once(proj.store, spec)
    assert decision.action == "rollout_rolled_back"
    assert decision.reason == (f"shadow rollout {rollout.id} of model v2: candidate v2 failed 30 of 30 calls "
                               "(100.0%), above promotion.live.max_error_rate 5.0%: rolled back without waiting "
                               "for labels")
    assert registry.get_rollout(proj.store, rollout.id).status == "rolled_back"
    assert registry.alias_version(proj.store, registry.PRODUCTION) == 1
    evidence = audit_trail(proj.store)[-1]["evidence"]["rollout"]
    assert evidence["errors"]["candidate"] == {"calls": 30, "errors": 30, "rate": 1.0}
    assert evidence["labelled"]["rows"] == {"candidate": 0, "production": 0}


def test_a_rollout_finished_by_someone_else_meanwhile_is_a_failed_decision(proj, monkeypatch):
    spec = live_spec(proj.spec)
    rollout = registry.start_rollout(proj.store, spec, proj.good, "shadow")

    def judged_while_alice_rolls_back(store, spec, active):
        registry.finish_rollout(store, active.id, "rolled_back", reason="not today", actor="alice")
        return LiveVerdict("promote", "candidate v2 passes", {"rows": {"candidate": 1000}})

    monkeypatch.setattr("everloop.loop._controller.judge_rollout", judged_while_alice_rolls_back)
    decision = run_once(proj.store, spec)
    assert decision.action == "failed"
    assert decision.reason.startswith(f"shadow rollout {rollout.id} of model v2: judged 'promote' (candidate v2 "
                                      f"passes), but that was not done: rollout {rollout.id} is not active: it was "
                                      "rolled back at ")
    assert "by alice (not today)" in decision.reason
    assert registry.alias_version(proj.store, registry.PRODUCTION) == 1
    event = audit_trail(proj.store)[-1]
    assert event["action"] == "failed" and event["evidence"]["rollout"] == {
        "id": rollout.id, "verdict": "promote", "rows": {"candidate": 1000}}


def test_production_moved_meanwhile_keeps_the_rollout_active_and_fails_the_turn(proj, monkeypatch):
    spec = live_spec(proj.spec)
    rollout = registry.start_rollout(proj.store, spec, proj.good, "canary")

    def judged_while_bob_promotes(store, spec, active):
        with pytest.raises(registry.RolloutActive):  # production moves only through the rollout...
            registry.set_alias(store, registry.PRODUCTION, 3, actor="bob", reason="by hand")
        aliases = store.tables.aliases  # ...but an older build, without that check, moves it meanwhile
        with store.engine.begin() as conn:
            conn.execute(aliases.update().where(aliases.c.name == registry.PRODUCTION).values(version=3))
        return LiveVerdict("promote", "candidate v2 passes", {})

    monkeypatch.setattr("everloop.loop._controller.judge_rollout", judged_while_bob_promotes)
    decision = run_once(proj.store, spec)
    assert decision.action == "failed" and "but that was not done: " in decision.reason
    assert "v3" in decision.reason.split("but that was not done: ")[1]  # names where production went
    assert registry.alias_version(proj.store, registry.PRODUCTION) == 3
    assert registry.active_rollout(proj.store).id == rollout.id


def test_a_retraining_under_canary_mode_starts_a_rollout_then_waits_and_counts_for_the_cooldown(client, webhook):
    url, received = webhook
    store, spec = client.store, live_spec(client.spec, "canary", url)
    send_traffic(client, make_churn(1000, shifted=True, seed=12))

    started = run_once(store, spec)
    assert started.action == "rollout_started", started.reason
    assert "drift" in started.triggers and started.gate["passed"] is True
    assert started.reason.endswith("passed the gate and is tried on live traffic beside production v1 (canary "
                                   f"rollout {started.rollout['id']}: it answers 10% of the requests)")
    assert registry.alias_version(store, registry.PRODUCTION) == 1  # production did not move
    rollout = registry.active_rollout(store)
    assert (rollout.candidate, rollout.mode, rollout.share, rollout.actor) == (2, "canary", 10, "everloop loop")
    event = audit_trail(store)[-1]
    assert event["action"] == "rollout_started" and event["evidence"]["gate"]["passed"] is True
    assert event["evidence"]["rollout"]["id"] == rollout.id and event["evidence"]["model_version"] == 2
    assert [a["action"] for a in loop_alerts(received)] == ["rollout_started"]

    waiting = run_once(store, spec)  # drift still fires, but nothing is retrained while a rollout is live
    assert waiting.action == "rollout_wait"
    assert waiting.reason == (f"canary rollout {rollout.id} of model v2: candidate v2 has scored 0 of the 300 rows "
                              "promotion.live.min_rows needs (production v1: 0 rows since the rollout started)")
    assert waiting.triggers == [] and waiting.monitor["model_version"] == 1
    assert [m.version for m in registry.list_models(store)] == [1, 2]
    assert registry.active_rollout(store).share == 10

    registry.finish_rollout(store, rollout.id, "rolled_back", reason="by hand", actor="alice")
    t = store.tables
    with store.engine.begin() as conn:  # the start is long past: only the rollout's end is recent
        conn.execute(t.loop_events.update().values(created_at=t.loop_events.c.created_at - 7200))
    assert run_once(store, spec).action == "cooldown"
    with store.engine.begin() as conn:  # and once the end is past the cooldown too, the loop retrains
        conn.execute(t.rollouts.update().values(updated_at=t.rollouts.c.updated_at - 7200))
    again = run_once(store, spec)
    assert again.action == "rollout_started" and again.model_version == 3, again.reason


def test_direct_mode_still_moves_production_and_records_no_rollout(client):
    store, spec = client.store, live_spec(client.spec, "direct")
    send_traffic(client, make_churn(1000, shifted=True, seed=12))
    decision = run_once(store, spec)
    assert decision.action == "promoted" and "rollout" not in decision.to_dict()
    assert registry.alias_version(store, registry.PRODUCTION) == 2
    assert registry.latest_rollout(store) is None
    assert "rollout" not in audit_trail(store)[-1]["evidence"]


def test_a_bad_canary_is_rolled_back_by_the_loop_on_postgresql(tmp_path: Path, pg_url: str):
    folder, spec, store = served_project(tmp_path / "proj", db_url=pg_url)
    dummy = spec.model_copy(update={"model": spec.model.model_copy(
        update={"estimator": "sklearn.dummy.DummyClassifier", "params": {"strategy": "prior"}})})
    bad = train.train(store, dummy).version
    m = SimpleNamespace(store=store, loaded={v: registry.load_model(store, v) for v in (1, bad)})
    try:
        spec = live_spec(spec)
        rollout = registry.start_rollout(store, spec, bad, "canary", force=True)
        canary_traffic(m, bad)
        decision = run_once(store, spec)
        assert decision.action == "rollout_rolled_back", decision.reason
        assert registry.get_rollout(store, rollout.id).status == "rolled_back"
        with store.engine.connect() as conn:
            row = conn.execute(sa.select(store.tables.loop_events).order_by(store.tables.loop_events.c.id.desc())
                               ).first()
        assert row.action == "rollout_rolled_back" and row.evidence["rollout"]["labelled"]["candidate"] == 0.5
    finally:
        store.close()
