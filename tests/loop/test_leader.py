"""One loop leader (issue 13): the loop's lease, and alias moves as compare-and-set, on SQLite and PostgreSQL.

The races run real processes: each "worker" below imports everloop once, then runs the real CLI entry
point `main()` once per line it reads, so that the two sides of a race start within a millisecond of
each other and twenty rounds stay fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from everloop import data, registry, train
from everloop.demo import make_churn
from everloop.errors import NotFoundError
from everloop.loop import LOOP_LEASE, audit_trail, run_once
from everloop.registry._registry import AliasMoved
from everloop.spec import load_spec
from everloop.store import Store
from everloop.store._lease import Lease, LeaseBusy, LeaseLost, current, db_now
from tests.conftest import send_traffic, write_project

# Runs `everloop ARGS` (one JSON list per stdin line) through the real entry point; answers one JSON line
# per run: exit code, stdout, stderr.
WORKER = """
import contextlib, io, json, sys
from everloop.cli import main
import everloop.loop, everloop.monitor, everloop.registry, everloop.train  # imported before the race
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    sys.argv = ["everloop", *json.loads(line)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = 0 if exc.code is None else int(exc.code)
    print(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue()}), flush=True)
"""

# Takes the loop lease for 5 s (renewed by its heartbeat), says so, then waits to be killed. With a second
# argument "elsewhere", it records itself as a process of another machine (another kernel boot).
HOLDER = """
import json, sys, time
from everloop.store import Store, _lease
if sys.argv[2:] == ["elsewhere"]:
    _lease._this_process = lambda: "another-boot pid:[1] 4242"
store = Store(sys.argv[1])
lease = _lease.Lease.acquire(store.engine, "loop", ttl=5)
print(json.dumps({"token": lease.token, "holder": lease.holder}), flush=True)
time.sleep(600)
"""


def _killed_holder(store: Store, *where: str) -> dict:
    """Start a process that takes the loop lease, kill -9 it once it holds it: what it said."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store.root), *where], stdout=subprocess.PIPE,
                              text=True, env=_env())
    held = json.loads(holder.stdout.readline())
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    row = current(store.engine, LOOP_LEASE)
    assert (row["holder"], row["token"]) == (held["holder"], held["token"])  # kill -9 released nothing
    return row


class Workers:
    """Real `everloop` processes, each ready to run a command the moment it gets one."""

    def __init__(self, count: int, env: dict[str, str]):
        self.procs = [subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=env) for _ in range(count)]
        for proc in self.procs:
            assert json.loads(proc.stdout.readline()) == {"ready": True}

    def race(self, *commands: list[str]) -> list[dict]:
        """Hand each worker its command at once; their answers, in order."""
        for proc, args in zip(self.procs, commands):
            proc.stdin.write(json.dumps(args) + "\n")
            proc.stdin.flush()
        return [json.loads(proc.stdout.readline()) for proc in self.procs]

    def close(self) -> None:
        for proc in self.procs:
            proc.stdin.close()
            proc.wait(timeout=60)


def _env(db_url: str | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if db_url:
        env["EVERLOOP_DB_URL"] = db_url
    return env


def _lease_store(tmp_path: Path, db_url: str | None = None) -> Store:
    return Store(tmp_path / "store", db_url)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request, tmp_path):
    """An empty store on each database."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    store = _lease_store(tmp_path, url)
    yield store
    store.close()


# --- the lease ---------------------------------------------------------------------------------------


def test_one_holder_at_a_time_and_the_token_fences_a_lost_holder(any_store):
    engine = any_store.engine
    first = Lease.acquire(engine, "loop", ttl=30)
    with pytest.raises(LeaseBusy) as busy:
        Lease.acquire(engine, "loop")
    assert busy.value.holder == first.holder == f"{os.uname().nodename} pid {os.getpid()}"
    assert busy.value.since == current(engine, "loop")["acquired_at"]
    first.release()
    second = Lease.acquire(engine, "loop", ttl=30)
    assert second.token == first.token + 1
    with engine.begin() as conn:
        with pytest.raises(LeaseLost, match=f"lost the loop lease .*{second.holder} took it"):
            first.check(conn)  # the old holder may write nothing more
        second.check(conn)
    first.release()  # releasing a lost lease leaves the new holder's alone
    with pytest.raises(LeaseBusy):
        Lease.acquire(engine, "loop")
    second.release()
    assert current(engine, "loop")["expires_at"] <= db_now(engine)
    Lease.acquire(engine, "other").release()  # names are independent


def test_the_heartbeat_keeps_a_live_holder_past_its_ttl(any_store):
    engine = any_store.engine
    with Lease.acquire(engine, "loop", ttl=3) as lease:
        first_expiry = current(engine, "loop")["expires_at"]
        deadline = time.time() + 30
        while db_now(engine) <= first_expiry + 0.5 and time.time() < deadline:
            time.sleep(0.1)
        assert current(engine, "loop")["expires_at"] > first_expiry  # renewed...
        with pytest.raises(LeaseBusy):  # ...so still held after its first expiry
            Lease.acquire(engine, "loop")
        assert not lease.lost
        with engine.begin() as conn:
            lease.check(conn)


def _firing_project(folder: Path, db_url: str | None = None):
    """A served project whose loop retrains on every 100 new labels (no cooldown), small enough for a
    turn to take about a second: (folder, spec, store)."""
    write_project(folder, rows=600, retraining={"triggers": ["new_labels"], "min_new_labels": 100,
                                                "cooldown_minutes": 0, "data": {"recent_rows": 3000}},
                  model={"estimator": "sklearn.linear_model.LogisticRegression", "params": {},
                         "seed": 42},
                  serving={"log_predictions": True, "compile_trees": False},
                  promotion={"min_comparison_rows": 20, "max_regression": 0.1})
    spec, store = load_spec(folder), Store.for_project(folder, db_url)
    data.ingest(store, spec, base=folder)
    registry.promote(store, spec, train.train(store, spec).version)
    return folder, spec, store


def test_a_killed_holders_lease_expires_and_the_next_turn_takes_it(tmp_path, everloop):
    """A loop killed on another machine holds the lease until its TTL runs out; then the next turn
    takes it (and releases it when done)."""
    folder, spec, store = _firing_project(tmp_path / "p")
    held = _killed_holder(store, "elsewhere")

    run = everloop("loop", "--once", "--json", "--project", str(folder))
    assert run.code == 0, run.err  # the loser is no failure: cron and CI see success
    answer = json.loads(run.out)
    assert answer["action"] == "busy"
    assert answer["reason"].startswith(f"another loop is running (holder {held['holder']} since ")
    assert audit_trail(store)[-1]["action"] == "busy"
    assert audit_trail(store)[-1]["reason"] == answer["reason"]

    deadline = time.time() + 30
    while db_now(store.engine) <= held["expires_at"] and time.time() < deadline:
        time.sleep(0.1)
    run = everloop("loop", "--once", "--json", "--project", str(folder))
    assert run.code == 0 and json.loads(run.out)["action"] == "idle", run.out
    after = current(store.engine, LOOP_LEASE)
    assert after["token"] == held["token"] + 1 and after["holder"] == f"{os.uname().nodename} pid {os.getpid()}"
    assert after["expires_at"] <= db_now(store.engine)  # released at the end of the turn
    store.close()


def test_a_holder_killed_on_this_machine_frees_the_lease_at_once(tmp_path):
    """Same kernel, same pid namespace, its pid gone: the holder provably no longer exists, so the next
    turn need not wait out the TTL (an OOM-killed cron run, a laptop)."""
    store = _lease_store(tmp_path)
    held = _killed_holder(store)
    assert held["expires_at"] > db_now(store.engine)
    with Lease.acquire(store.engine, LOOP_LEASE) as lease:
        assert lease.token == held["token"] + 1
    store.close()


def test_a_turn_that_lost_its_lease_moves_no_alias(tmp_path, monkeypatch):
    """A loop stalled past its TTL (the heartbeat could not reach the database) while another took over:
    its retrained model is registered, but production does not move and the audit trail says why."""
    from everloop.loop import _controller

    folder, spec, store = _firing_project(tmp_path / "p")
    from fastapi.testclient import TestClient

    from everloop.serve import create_app

    with TestClient(create_app(folder, spec=spec, store=store, watch=False)) as client:
        send_traffic(client, make_churn(150, seed=31))
    real_gate = _controller.check_gate

    def stalled_gate(*args, **kwargs):  # another loop takes the lease while this one judges its model
        with store.engine.begin() as conn:
            conn.execute(store.tables.leases.update().values(expires_at=0.0))
        Lease.acquire(store.engine, LOOP_LEASE, ttl=30)
        return real_gate(*args, **kwargs)

    monkeypatch.setattr(_controller, "check_gate", stalled_gate)
    decision = run_once(store, spec)
    assert decision.action == "failed" and "lost the loop lease" in decision.reason
    assert registry.alias_version(store, registry.PRODUCTION) == 1
    assert registry.alias_version(store, "candidate") is None
    assert [h["to_version"] for h in registry.alias_history(store)] == [1]
    store.close()


def test_a_loop_does_not_promote_over_a_move_made_during_its_retraining(tmp_path, monkeypatch):
    """A person promotes (or rolls back) while the loop judges its candidate against the old production:
    the loop's move is refused, the person's stands, and the audit trail says what happened."""
    from fastapi.testclient import TestClient

    from everloop.loop import _controller
    from everloop.serve import create_app

    folder, spec, store = _firing_project(tmp_path / "p")
    train.train(store, spec, reason="a person's model")  # v2
    with TestClient(create_app(folder, spec=spec, store=store, watch=False)) as client:
        send_traffic(client, make_churn(150, seed=32))
    real_gate = _controller.check_gate

    def gate_while_a_person_promotes(*args, **kwargs):
        decision = real_gate(*args, **kwargs)
        registry.set_alias(store, registry.PRODUCTION, 2, reason="a person's promotion")
        return decision

    monkeypatch.setattr(_controller, "check_gate", gate_while_a_person_promotes)
    decision = run_once(store, spec)
    assert decision.action == "failed" and decision.model_version == 3
    assert "production moved from v1 to v2 meanwhile" in decision.reason
    assert registry.alias_version(store, registry.PRODUCTION) == 2
    assert [(h["from_version"], h["to_version"]) for h in registry.alias_history(store)] == [(None, 1), (1, 2)]
    store.close()


# --- two loops at once, against PostgreSQL --------------------------------------------------------------


def test_two_loops_started_together_retrain_once_20_times(tmp_path, pg_url):
    from fastapi.testclient import TestClient

    from everloop.serve import create_app

    folder, spec, store = _firing_project(tmp_path / "p", pg_url)
    workers = Workers(2, _env(pg_url))
    command = ["loop", "--once", "--json", "--project", str(folder)]
    busy_rounds = 0
    try:
        with TestClient(create_app(folder, spec=spec, store=store, watch=False)) as client:
            for round_ in range(20):
                models = len(registry.list_models(store))
                moves = len(registry.alias_history(store))
                events = len(audit_trail(store, limit=1000))
                send_traffic(client, make_churn(120, seed=100 + round_))  # 120 new labels: the trigger fires
                answers = workers.race(command, command)
                actions = sorted(json.loads(a["out"])["action"] for a in answers)
                assert all(a["code"] in (0, 1) for a in answers), answers
                # exactly one turn retrains; the other found the lease held, or (had it come after the
                # first turn ended) found no new labels since that retraining
                retrained = [a for a in actions if a in ("promoted", "kept_candidate")]
                assert len(retrained) == 1, (round_, answers)
                assert len(registry.list_models(store)) == models + 1, round_
                production_moves = [h for h in registry.alias_history(store)[moves:]]
                assert len(production_moves) == (1 if retrained == ["promoted"] else 0)
                new_events = audit_trail(store, limit=1000)[events:]
                assert sorted(e["action"] for e in new_events) == actions
                for event in new_events:
                    if event["action"] == "busy":
                        busy_rounds += 1
                        assert event["reason"].startswith("another loop is running (holder ")
                        assert " pid " in event["reason"] and " since " in event["reason"]
                    else:
                        assert event["action"] in ("promoted", "kept_candidate", "idle"), event
    finally:
        workers.close()
    history = registry.alias_history(store)
    assert all(b["from_version"] == a["to_version"] for a, b in zip(history, history[1:]))
    assert busy_rounds > 0  # the two turns did overlap (each holds the lease for a whole retraining)
    store.close()


def test_a_busy_loop_exits_0_from_the_command_line(tmp_path, pg_url):
    """The CronJob's view: two cold `everloop loop --once` processes; both exit 0, one retrained."""
    folder, spec, store = _firing_project(tmp_path / "p", pg_url)
    lease = Lease.acquire(store.engine, LOOP_LEASE, ttl=60)
    cli = [sys.executable, "-c", "from everloop.cli import main; main()", "loop", "--once", "--json",
           "--project", str(folder)]
    done = subprocess.run(cli, capture_output=True, text=True, env=_env(pg_url), timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["action"] == "busy"
    assert lease.holder in json.loads(done.stdout)["reason"]
    lease.release()
    assert len(registry.list_models(store)) == 1
    store.close()


# --- alias moves: compare-and-set ---------------------------------------------------------------------


@pytest.fixture
def three_models(tmp_path, request):
    """v1 in production, v2 and v3 trained; on SQLite or (param 'postgresql') PostgreSQL."""
    url = request.getfixturevalue("pg_url") if getattr(request, "param", "sqlite") == "postgresql" else None
    folder = write_project(tmp_path / "p", rows=600, evaluation={"split": {"holdout": 0.2}, "metric": "roc_auc"},
                           model={"estimator": "sklearn.linear_model.LogisticRegression", "params": {}, "seed": 42})
    spec, store = load_spec(folder), Store.for_project(folder, url)
    data.ingest(store, spec, base=folder)
    registry.promote(store, spec, train.train(store, spec).version)
    train.train(store, spec, reason="v2")
    train.train(store, spec, reason="v3")
    yield folder, spec, store, url
    store.close()


def test_a_move_from_a_version_production_left_is_refused(three_models):
    _, spec, store, _ = three_models
    registry.set_alias(store, registry.PRODUCTION, 2, reason="first", from_version=1)
    with pytest.raises(AliasMoved, match=r"^production moved from v1 to v2 meanwhile .*retry") as moved:
        registry.set_alias(store, registry.PRODUCTION, 3, reason="second, decided on v1", from_version=1)
    assert (moved.value.expected, moved.value.found) == (1, 2)
    assert registry.alias_version(store, registry.PRODUCTION) == 2
    assert [(h["from_version"], h["to_version"]) for h in registry.alias_history(store)] == [(None, 1), (1, 2)]
    registry.set_alias(store, "candidate", 1, reason="first move of a new alias", from_version=None)
    with pytest.raises(AliasMoved, match="^candidate moved from no model to v1 meanwhile"):
        registry.set_alias(store, "candidate", 2, reason="decided while it pointed at nothing", from_version=None)
    assert registry.alias_version(store, "candidate") == 1


def test_promote_refuses_when_production_moved_during_its_gate(three_models, monkeypatch):
    from everloop.registry import _registry

    _, spec, store, _ = three_models
    real_gate = _registry.check_gate

    def gate_during_a_rollout(*args, **kwargs):
        decision = real_gate(*args, **kwargs)
        registry.set_alias(store, registry.PRODUCTION, 2, reason="someone else's promotion")
        return decision

    monkeypatch.setattr(_registry, "check_gate", gate_during_a_rollout)
    with pytest.raises(AliasMoved, match="production moved from v1 to v2 meanwhile"):
        registry.promote(store, spec, 3, force=True)
    assert registry.alias_version(store, registry.PRODUCTION) == 2
    assert [h["to_version"] for h in registry.alias_history(store)] == [1, 2]


def test_rollback_refuses_when_production_moved_after_it_read_the_history(three_models, monkeypatch):
    _, spec, store, _ = three_models
    from everloop.registry import _registry

    registry.promote(store, spec, 2, force=True)
    original = _registry.set_alias

    def late(*args, **kwargs):  # a promotion lands between rollback's read and its move
        monkeypatch.setattr(_registry, "set_alias", original)
        original(store, registry.PRODUCTION, 3, reason="a promotion meanwhile")
        return original(*args, **kwargs)

    monkeypatch.setattr(_registry, "set_alias", late)
    with pytest.raises(AliasMoved, match="production moved from v2 to v3 meanwhile"):
        registry.rollback(store)
    assert registry.alias_version(store, registry.PRODUCTION) == 3


def test_promoting_production_again_changes_nothing_and_rollback_still_goes_back(three_models):
    # A self-move (v2 -> v2) in the history made rollback "go back" to v2 and lose v1 for good.
    _, spec, store, _ = three_models
    registry.promote(store, spec, 2, force=True)
    decision = registry.promote(store, spec, 2, force=True)
    assert decision.evidence == {"unchanged": True} and decision.production == 2
    assert [(h["from_version"], h["to_version"]) for h in registry.alias_history(store)] == [(None, 1), (1, 2)]
    assert registry.rollback(store) == 1 and registry.alias_version(store, registry.PRODUCTION) == 1
    # a store written before: its self-move rows are skipped
    t = store.tables.alias_history
    with store.engine.begin() as conn:
        conn.execute(t.insert().values(alias="production", from_version=1, to_version=1, actor="old", reason="old",
                                       forced=False))
    assert registry.rollback(store) == 2


def test_no_rollback_without_history(tmp_path):
    store = Store(tmp_path / "s")
    with pytest.raises(NotFoundError):
        registry.rollback(store)


@pytest.mark.parametrize("three_models", ["sqlite", "postgresql"], indirect=True)
def test_racing_promotes_and_rollbacks_lose_no_update(three_models):
    """Three real processes move production at once, six times: each either moves it or is told it
    moved meanwhile; the history is one unbroken chain and ends where the alias points."""
    folder, spec, store, url = three_models
    registry.promote(store, spec, 2, force=True)  # so that there is a version to roll back to
    workers = Workers(3, _env(url))
    project = ["--project", str(folder)]
    refused = moved = 0
    try:
        for _ in range(6):
            before = len(registry.alias_history(store))
            answers = workers.race(["promote", "2", "--force", *project], ["promote", "3", "--force", *project],
                                   ["rollback", *project])
            for answer in answers:
                if answer["code"] == 0:
                    moved += 1
                else:
                    # exit code: the CLI's to choose (a refusal); what matters is that it is not 0
                    assert answer["code"] in (1, 2) and "production moved from v" in answer["err"], answer
                    assert "meanwhile" in answer["err"] and "retry" in answer["err"]
                    refused += 1
            # one history row per move (promoting the version already in production moves nothing)
            succeeded = sum(a["code"] == 0 and "already in production" not in a["out"] for a in answers)
            assert len(registry.alias_history(store)) == before + succeeded
    finally:
        workers.close()
    history = registry.alias_history(store)
    assert all(b["from_version"] == a["to_version"] for a, b in zip(history, history[1:])), history
    assert registry.alias_version(store, registry.PRODUCTION) == history[-1]["to_version"]
    assert moved >= 6 and moved + refused == 18
