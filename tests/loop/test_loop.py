import json


from everloop import registry
from everloop.demo import make_churn
from everloop.loop import CANDIDATE, audit_trail, run_once
from everloop.monitor import monitor
from everloop.spec import parse_spec
from tests.conftest import send_traffic


def test_no_data_then_healthy_means_idle(client):
    assert run_once(client.store, client.spec).action == "idle"
    send_traffic(client, make_churn(1000, seed=11))
    decision = run_once(client.store, client.spec)
    assert decision.action == "idle" and decision.monitor["status"] == "healthy"


def test_shift_triggers_retraining_promotion_then_cooldown(client):
    store, spec = client.store, client.spec
    send_traffic(client, make_churn(1000, shifted=True, seed=12))
    result = monitor(store, spec, record=False)
    assert result.drift.dataset_drift and "monthly_charges" in result.drift.drifted
    decision = run_once(store, spec)
    assert decision.action == "promoted" and set(decision.triggers) >= {"drift"}
    assert registry.alias_version(store, registry.PRODUCTION) == decision.model_version == 2
    new = registry.get_model(store, 2)
    assert new.manifest["recent_from_row"] == 2000 and "loop retraining" in new.manifest["reason"]
    history = registry.alias_history(store)
    assert history[-1]["actor"] == "everloop loop" and "passed the gate" in history[-1]["reason"]
    client.app.state.holder.refresh()
    send_traffic(client, make_churn(1000, shifted=True, seed=13))
    again = run_once(store, spec)
    assert again.action in ("idle", "cooldown")
    actions = [e["action"] for e in audit_trail(store)]
    assert actions[:1] == ["promoted"] and all(e["evidence"]["monitor"] for e in audit_trail(store))


def test_failed_gate_keeps_production_and_alerts(client):
    store = client.store
    raw = client.spec.model_dump()
    raw["promotion"]["min_metric"] = 0.999
    strict = parse_spec(raw)
    send_traffic(client, make_churn(1000, shifted=True, seed=14))
    decision = run_once(store, strict)
    assert decision.action == "kept_candidate" and "below promotion.min_metric" in decision.reason
    assert registry.alias_version(store, registry.PRODUCTION) == 1
    assert registry.alias_version(store, CANDIDATE) == decision.model_version
    assert audit_trail(store)[-1]["action"] == "kept_candidate"


def test_failed_gate_sends_an_alert(client, webhook):
    url, received = webhook
    raw = client.spec.model_dump()
    raw["promotion"]["min_metric"] = 0.999
    raw["monitoring"]["webhook"] = url
    send_traffic(client, make_churn(1000, shifted=True, seed=15))
    decision = run_once(client.store, parse_spec(raw))
    assert decision.action == "kept_candidate"
    loop_alerts = [r for r in received if r["event"] == "loop"]
    assert loop_alerts and loop_alerts[0]["action"] == "kept_candidate"
    assert "below promotion.min_metric" in loop_alerts[0]["reason"]


def test_a_kill_during_retraining_leaves_everything_consistent(client):
    import signal
    import subprocess
    import sys
    import time

    import sqlalchemy as sa

    from everloop import data

    store = client.store
    folder = store.root.parent
    send_traffic(client, make_churn(1000, shifted=True, seed=16))
    original = (folder / "everloop.yaml").read_text()
    slow = original.replace("max_iter: 50", "max_iter: 5000\n    early_stopping: false")
    assert slow != original
    (folder / "everloop.yaml").write_text(slow)
    code = "from everloop.cli import main; main()"
    process = subprocess.Popen([sys.executable, "-c", code, "loop", "--once", "--project", str(folder)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(data.list_datasets(store)) < 2:  # the retraining data is stored...
        time.sleep(0.05)
    time.sleep(0.5)  # ...and the retraining is under way
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(data.list_datasets(store)) == 2
    assert registry.alias_version(store, registry.PRODUCTION) == 1, "production is untouched"
    assert [m.version for m in registry.list_models(store)] == [1], "no half-registered model"
    for model in registry.list_models(store):
        registry.load_model(store, model.version)  # every artifact referenced is whole and verified
    for dataset in data.list_datasets(store):
        data.load_frame(store, dataset)
    with store.engine.connect() as conn:
        actions = conn.execute(sa.select(store.tables.loop_events.c.action)).scalars().all()
    assert "promoted" not in actions
    (folder / "everloop.yaml").write_text(original)
    again = subprocess.run([sys.executable, "-c", code, "loop", "--once", "--json", "--project", str(folder)],
                           capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout)["action"] == "promoted", again.stderr
    assert registry.alias_version(store, registry.PRODUCTION) == 2


def _labelled_rows(folder, store, spec):
    from fastapi.testclient import TestClient

    from everloop.loop import recent_labelled
    from everloop.serve import create_app

    rows = make_churn(600, seed=21)
    with TestClient(create_app(folder, spec=spec, store=store, watch=False)) as client:
        send_traffic(client, rows.head(300))  # labelled
        send_traffic(client, rows.tail(300), labels=False)  # newer, unlabelled
    latest = recent_labelled(store, spec, 200)
    assert len(latest) == 200  # the latest labelled rows, read past the newer unlabelled ones
    assert latest[spec.data.target].tolist() == rows.head(300)["churned"].tolist()[-200:]
    assert latest["monthly_charges"].tolist() == rows.head(300)["monthly_charges"].tolist()[-200:]
    assert len(recent_labelled(store, spec, 10_000)) == 300


def test_recent_labelled_rows_for_retraining(tmp_path):
    from tests.conftest import served_project

    folder, spec, store = served_project(tmp_path / "p", rows=800)
    _labelled_rows(folder, store, spec)


def test_recent_labelled_rows_on_postgresql(tmp_path, pg_url):
    from tests.conftest import served_project

    folder, spec, store = served_project(tmp_path / "p", rows=800, db_url=pg_url)
    _labelled_rows(folder, store, spec)
    store.close()


def test_a_second_retraining_does_not_take_the_first_ones_recent_rows_again(client):
    """Found by a new user: dataset v3 held v2's recent rows twice, so half of v3's held-out rows had a
    copy in its training rows and its metric was inflated."""
    from everloop import data
    from everloop.train import row_hashes

    raw = client.spec.model_dump()
    raw["retraining"] |= {"triggers": ["new_labels"], "min_new_labels": 100, "cooldown_minutes": 0}
    spec = parse_spec(raw)
    send_traffic(client, make_churn(1000, shifted=True, seed=17))
    assert run_once(client.store, spec).action in ("promoted", "kept_candidate")
    second = data.get_dataset(client.store, 2)
    assert second.rows == 2000 + 1000
    client.app.state.holder.refresh()
    send_traffic(client, make_churn(600, shifted=True, seed=18))
    decision = run_once(client.store, spec)
    assert decision.action in ("promoted", "kept_candidate"), decision.reason
    third = data.get_dataset(client.store, 3)
    assert third.rows == second.rows + 600  # only the new labelled rows, not the first 1000 again
    model = registry.get_model(client.store, decision.model_version)
    held_out = client.store.get_frame(model.manifest["eval_artifact"])
    frame = data.load_frame(client.store, third)
    features = model.manifest["features"]
    # each held-out row is in the dataset once: no copy of it among the rows the model trained on
    import numpy as np

    assert int(np.isin(row_hashes(frame, features), row_hashes(held_out, features)).sum()) == len(held_out)
