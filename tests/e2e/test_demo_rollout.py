"""`everloop demo --rollout canary` (issue 16): the demo's retrained model goes live through a canary
the loop steps, judges and promotes on real traffic to a real server, window by window."""

import json
import re
from pathlib import Path

import pytest
import yaml

from everloop import registry
from everloop.demo import DemoConfig, DemoResult, answered_by, rollout_settings, run_demo
from everloop.errors import EverloopError
from everloop.loop import audit_trail
from everloop.spec import load_spec
from everloop.store import Store

pytestmark = pytest.mark.e2e

# One stable window, then the shifted window that triggers the retraining; the canary then needs three
# passing turns (20% -> 50% -> 100% -> promoted), and one more window is the held-out traffic.
SMALL = DemoConfig(history_rows=3000, window_rows=1000, stable_windows=1, shifted_windows=1, batch_rows=200)


def test_the_demo_canary_is_stepped_and_promoted_by_the_loop(tmp_path):
    said: list[str] = []
    result = run_demo(tmp_path / "demo", SMALL, say=said.append, rollout="canary")
    windows = [(w["window"], w["phase"], w["loop"], answered_by(w)) for w in result.windows]

    rollout = result.rollout
    assert rollout is not None and rollout["outcome"] == "promoted", (windows, rollout)
    assert rollout["mode"] == "canary" and (rollout["production"], rollout["candidate"]) == (1, 2)
    assert rollout["shares"] == [20.0, 50.0, 100.0], rollout["shares"]
    assert [(t["window"], t["decision"], t["share"]) for t in rollout["turns"]] == [
        (2, "rollout_started", 20.0), (3, "rollout_step", 20.0), (4, "rollout_step", 50.0),
        (5, "rollout_promoted", 100.0)]

    # the final verdict's evidence: the candidate beat production on its own labelled rows
    evidence = rollout["evidence"]
    live = rollout_settings("canary", SMALL.window_rows)["live"]
    assert evidence["rows"]["candidate"] >= live["min_rows"]
    labelled = evidence["labelled"]
    assert labelled["rows"]["candidate"] >= live["min_labelled_rows"]
    assert labelled["candidate"] > labelled["production"] and labelled["loss"] < labelled["allowed_loss"]

    # who answered: v1 alone before the rollout, then about the set share of the rows per window (split per
    # customer_id), then v2 alone
    answered = [w["answered"] for w in result.windows]
    assert answered[0] == {"v1": 1000} and answered[1] == {"v1": 1000}
    for w, share in zip(result.windows[2:5], (20, 50, 100)):
        assert w["rollout"] == {"id": rollout["id"], "mode": "canary", "candidate": 2, "share": share}
        assert abs(100 * w["answered"].get("v2", 0) / 1000 - share) <= 4, (share, w["answered"])
    assert answered[5] == {"v2": 1000} and result.windows[5]["rollout"] is None
    assert len(result.windows) == 6, windows

    # the audit trail holds every decision, in order, as the windows report them
    store = Store.for_project(tmp_path / "demo")
    trail = audit_trail(store)
    assert [e["action"] for e in trail] == [w["loop"] for w in result.windows] == [
        "idle", "rollout_started", "rollout_step", "rollout_step", "rollout_promoted", "idle"]
    assert [e["evidence"]["rollout"]["next_share"] for e in trail if e["action"] == "rollout_step"] == [50, 100]
    assert trail[4]["reason"] == rollout["reason"] == result.windows[4]["reason"]

    # the retrained model is production and answered the held-out window, better than the old one did
    # (within 2% of a model trained directly on shifted data is the full-size demo's bar, not this one's)
    assert registry.alias_version(store, "production") == 2 == result.versions["after"]
    assert registry.latest_rollout(store).status == "promoted"
    assert result.comparison["retrained"] > result.comparison["old"] + 0.03, result.comparison
    assert result.rollout_promoted
    assert any("v2 (sticky per customer_id)" in line for line in said)
    store.close()

    # the project file says which rollout and why its thresholds fit the window
    spec_text = (tmp_path / "demo" / "everloop.yaml").read_text()
    assert "# judged on live traffic" in spec_text
    spec = load_spec(tmp_path / "demo")
    assert spec.rollout.mode == "canary" and spec.rollout.steps == [20, 50, 100]
    assert (spec.promotion.live.min_rows, spec.promotion.live.min_labelled_rows) == (100, 100)
    assert yaml.safe_load(spec_text)["rollout"]["mode"] == "canary"

    out = json.loads(json.dumps(result.to_dict()))  # what --json prints
    assert out["rollout"]["outcome"] == "promoted" and out["mode"] == "canary" and out["rollout_promoted"]
    assert out["rollout"]["shares"] == [20.0, 50.0, 100.0] and out["windows"][2]["answered"] == answered[2]


def passing(mode: str, outcome: str | None) -> DemoResult:
    """A demo result that passes on every count but the rollout's: drift only after the shift, recovered,
    a new version after; the rollout (`outcome`; None: none started) as given."""
    windows = [{"phase": "stable", "drift": False}, {"phase": "shifted", "drift": True}]
    rollout = None if outcome is None else {"outcome": outcome}
    return DemoResult(Path("demo"), windows=windows, comparison={"old": 0.75, "retrained": 0.83, "direct": 0.835},
                      versions={"before": 1, "after": 2}, mode=mode, rollout=rollout)


def test_passed_needs_the_rollout_promoted_under_canary_and_shadow():
    assert passing("direct", None).passed  # no rollout to wait for
    for mode in ("canary", "shadow"):
        assert passing(mode, "promoted").passed
        for outcome in (None, "rolled_back", "unfinished", "active"):
            result = passing(mode, outcome)
            assert not result.passed and not result.rollout_promoted, (mode, outcome)
            assert result.to_dict()["rollout_promoted"] is False
    assert "rollout" not in passing("direct", None).to_dict()  # direct: the output is as it always was


def test_demo_refuses_an_unknown_rollout_mode(everloop, tmp_path):
    run = everloop("demo", "--rollout", "bogus", "--dir", str(tmp_path / "demo"))
    assert run.code == 2
    said = " ".join(re.sub("[│╭╮╰╯─]", " ", run.out + run.err).split())  # rich's box, unwrapped
    assert "'--rollout'" in said and "'bogus' is not one of 'direct', 'canary', 'shadow'" in said, said
    assert not (tmp_path / "demo").exists()  # refused before anything ran


def test_run_demo_refuses_an_unknown_rollout_mode(tmp_path):
    with pytest.raises(EverloopError, match="rollout 'bogus': expected one of direct, canary, shadow"):
        run_demo(tmp_path / "demo", SMALL, say=lambda _m: None, rollout="bogus")
    assert not (tmp_path / "demo").exists()
