"""`everloop promote V --shadow | --canary N` and `everloop rollout ...`: output, JSON and exit codes."""

import json

from everloop import registry
from tests.conftest import copy_of_v1




def test_canary_by_hand_from_start_to_promotion(trained, everloop):
    folder, spec, store = trained
    p = ["-p", str(folder)]
    v2 = copy_of_v1(store)
    empty = everloop("rollout", "status", *p)
    assert empty.code == 0 and "no rollout yet" in empty.out
    started = everloop("promote", str(v2), "--canary", "10", *p)
    assert started.code == 0, started.err
    assert (f"rollout 1: model v{v2} in canary: it answers 10% of the traffic, production v1 the other 90%"
            in started.out)
    assert registry.alias_version(store, "production") == 1
    again = everloop("promote", str(v2), "--shadow", *p)
    assert again.code == 1 and again.err.startswith("error: rollout 1 is already active (canary of model v2")
    stepped = everloop("rollout", "step", "50", *p)
    assert stepped.code == 0 and "it answers 50% of the traffic, production v1 the other 50%" in stepped.out
    status = json.loads(everloop("rollout", "status", "--json", *p).out)
    assert (status["id"], status["status"], status["share"], status["reason"]) == (1, "active", 50.0,
                                                                                   "everloop rollout step 50")
    text = everloop("rollout", "status", *p).out
    assert "steps: 10, 50, 100%" in text and "evidence: none recorded (not judged live yet)" in text
    promoted = everloop("rollout", "promote", "--reason", "looks good", *p)
    assert promoted.code == 0
    assert f"rollout 1 (canary of model v{v2}) promoted: production moved to v{v2}" in promoted.out
    assert registry.alias_version(store, "production") == v2
    assert registry.alias_history(store)[-1]["reason"] == "canary rollout 1: looks good"
    none = everloop("rollout", "rollback", *p)
    assert none.code == 2
    assert none.err.startswith("error: no rollout is active (the latest, rollout 1, was promoted)")


def test_shadow_status_prints_the_evidence_it_holds_and_rollback_keeps_production(trained, everloop):
    folder, spec, store = trained
    p = ["-p", str(folder)]
    v2 = copy_of_v1(store)
    started = everloop("promote", str(v2), "--shadow", "--json", *p)
    assert started.code == 0 and json.loads(started.out)["mode"] == "shadow"
    refused = everloop("rollout", "step", "25", *p)
    assert refused.code == 2 and "rollout 1 is a shadow: it answers no traffic" in refused.err
    # evidence as the loop records it (monitor/_live.py's judgement); its keys are the loop's to choose
    t = store.tables.rollouts
    with store.engine.begin() as conn:
        conn.execute(t.update().values(evidence={"rows": {"candidate": 1200, "production": 1200},
                                                 "agreement": 0.975, "latency_p99_ms": {"candidate": 4.5}}))
    text = everloop("rollout", "status", *p).out
    assert f"model v{v2} in shadow beside production v1: it also scores 100% of the rows" in text
    for line in ("rows.candidate: 1200", "rows.production: 1200", "agreement: 0.9750",
                 "latency_p99_ms.candidate: 4.5000"):
        assert f"  {line}\n" in text, text
    back = everloop("rollout", "rollback", "--reason", "disagrees", *p)
    assert back.code == 0 and f"rolled back: production stayed on v1; v{v2} is no longer served" in back.out
    assert registry.alias_version(store, "production") == 1
    finished = json.loads(everloop("rollout", "status", "--json", *p).out)
    assert (finished["status"], finished["reason"]) == ("rolled_back", "disagrees")


def test_rollout_refusals_exit_with_one_line(trained, everloop):
    folder, spec, store = trained
    p = ["-p", str(folder)]
    both = everloop("promote", "1", "--shadow", "--canary", "10", *p)
    assert both.code == 2 and both.err.startswith("error: --shadow and --canary: choose one")
    same = everloop("promote", "1", "--canary", "10", *p)
    assert same.code == 2 and "model v1 is already in production" in same.err
    bad = everloop("promote", str(copy_of_v1(store)), "--canary", "120", *p)
    assert bad.code == 2 and "canary share 120: expected a percent from 0.01 to 100" in bad.err
    nothing = everloop("rollout", "abort", *p)
    assert nothing.code == 2 and nothing.err.startswith("error: no rollout is active; start one with")
    for run in (both, same, bad, nothing):
        assert "Traceback" not in run.err and len(run.err.strip().splitlines()) == 1
    assert registry.latest_rollout(store) is None
