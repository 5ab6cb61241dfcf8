"""A replica on another machine follows the shared store (issue 13): a model it cannot load because
the store cannot be reached is tried again rather than refused for good; /model and /metrics say which
version the replica serves, what the alias names, and whether the two agree."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone

import pytest
from fastapi.testclient import TestClient

from everloop import data, registry, train
from everloop.demo import make_churn
from everloop.serve import create_app
from everloop.spec import load_spec
from everloop.store import Store
from tests.conftest import feature_rows, write_project


@pytest.fixture
def machines(tmp_path):
    """Machine A trained v1 (promoted) and v2 (not) into a store whose artifacts are at a file:// share;
    machine B is a folder with only the project file. Yields (A's store, a Store for B, the share)."""
    share = tmp_path / "share"
    share.mkdir()
    urls = {"db_url": f"sqlite:///{tmp_path / 'shared.db'}", "artifacts_url": share.as_uri()}
    a = write_project(tmp_path / "a")
    spec, store_a = load_spec(a), Store.for_project(a, **urls)
    data.ingest(store_a, spec, base=a)
    registry.promote(store_a, spec, train.train(store_a, spec).version)
    other = spec.model_copy(update={"model": spec.model.model_copy(update={"seed": 7})})
    train.train(store_a, other)  # v2: another blob than v1's (the same fit would be the same blob)
    assert registry.get_model(store_a, 1).artifact != registry.get_model(store_a, 2).artifact
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy(a / "everloop.yaml", b / "everloop.yaml")
    store_b = Store.for_project(b, **urls)
    yield store_a, store_b, share
    store_a.close()
    store_b.close()


def metric(client, name: str) -> float:
    line = next(x for x in client.get("/metrics").text.splitlines() if x.startswith(name + " "))
    return float(line.split()[-1])


def test_a_model_that_cannot_be_fetched_yet_is_tried_again_not_refused(machines, monkeypatch):
    monkeypatch.setenv("EVERLOOP_ADMIN_TOKEN", "s3cret")
    admin = {"authorization": "Bearer s3cret"}
    store_a, store_b, share = machines
    away = share.with_name("unmounted")
    share.rename(away)  # B starts while the share is not mounted
    app = create_app(store_b.root.parent, store=store_b, watch=False)
    holder = app.state.holder
    with TestClient(app) as client:
        ready = client.get("/ready")
        assert ready.status_code == 503
        reason = ready.json()["reason"]
        assert reason.startswith("model v1 not loaded yet: artifact store file://") and "does not exist" in reason
        assert reason.endswith("trying again in 1s"), "no advice to promote another model: none is at fault"
        assert holder.retrying and metric(client, "everloop_model_reload_failures_total") == 1.0
        assert not holder.refresh(), "within its wait the version is not tried again"
        reload = client.post("/admin/reload", headers=admin)  # tries at once: still unreachable
        assert reload.status_code == 503 and "trying again in 2s" in reload.json()["detail"]

        away.rename(share)  # mounted again
        assert client.post("/admin/reload", headers=admin).json() == {"swapped": True, "model_version": 1}
        assert holder.current.version == 1 and not holder.retrying
        assert client.get("/ready").json() == {"ready": True, "model_version": 1}
        assert metric(client, "everloop_model_reload_failures_total") == 1.0, "counted once per version"


def test_model_and_metrics_say_what_this_replica_serves_and_what_the_alias_names(machines):
    store_a, store_b, share = machines
    app = create_app(store_b.root.parent, store=store_b, watch=False)
    holder = app.state.holder
    with TestClient(app) as client:
        replica = client.get("/model").json()["replica"]
        assert (replica["alias"], replica["alias_version"], replica["in_step"]) == ("production", 1, True)
        assert replica["pid"] > 0 and replica["host"]
        since = datetime.fromisoformat(replica["serving_since"])
        assert since.tzinfo == timezone.utc
        assert replica["alias_checked_at"] <= replica["serving_since"], "the alias is read, then its model loaded"
        answer = client.post("/predict", json={"instances": feature_rows(make_churn(1, seed=5))}).json()
        assert answer["predictions"][0]["id"].startswith(replica["prediction_id_prefix"])
        assert metric(client, "everloop_model_version") == metric(client, "everloop_alias_version") == 1.0
        checked = metric(client, "everloop_alias_checked_timestamp_seconds")
        assert checked == pytest.approx(datetime.fromisoformat(replica["alias_checked_at"]).timestamp(), abs=0.01)

        # v2 is promoted on A, but its object in the share was changed: refused, v1 keeps serving
        digest = registry.get_model(store_a, 2).artifact
        (share / digest[:2] / digest).write_bytes(b"not a model")
        registry.set_alias(store_a, registry.PRODUCTION, 2, reason="test")
        assert not holder.refresh() and holder.last_error.startswith("model v2 refused: ")
        assert not holder.retrying, "a changed artifact is broken, not unreachable: not tried again"
        replica = client.get("/model").json()["replica"]
        assert client.get("/model").json()["version"] == 1
        assert (replica["alias_version"], replica["in_step"]) == (2, False)
        assert metric(client, "everloop_model_version") == 1.0 and metric(client, "everloop_alias_version") == 2.0


def test_a_model_that_is_fetched_but_cannot_be_loaded_is_refused_for_good(machines):
    """Only fetching is retried: a blob that arrives whole but is not a model (here: one that does not
    unpickle) is the model's fault, and waiting will not fix it."""
    store_a, store_b, _ = machines
    app = create_app(store_b.root.parent, store=store_b, watch=False)
    holder = app.state.holder
    with TestClient(app) as client:
        models = store_a.tables.models
        with store_a.engine.begin() as conn:
            conn.execute(models.update().where(models.c.version == 2)
                         .values(artifact=store_a.artifacts.put(b"not a pickle")))
        registry.set_alias(store_a, registry.PRODUCTION, 2, reason="test")
        assert not holder.refresh(force=True)
        assert holder.last_error.startswith("model v2 refused: model artifact ") and not holder.retrying
        assert client.get("/ready").json()["refused"] == holder.last_error
        assert client.get("/model").json()["version"] == 1


def test_a_forked_worker_issues_ids_of_its_own():
    # gunicorn --preload and multiprocessing fork after import: a shared prefix would collide ids
    import multiprocessing

    from everloop.serve import _batcher

    parent = _batcher.ids_for(1)[0]
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply(_batcher.ids_for, (1,))[0]
    assert child[:16] != parent[:16] and _batcher.id_prefix() == parent[:16]
