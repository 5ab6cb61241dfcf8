"""`everloop serve --ui`: a real server (ServerProcess, as the CLI runs it) with the dashboard at /ui.
Without an admin token its pages are open and read-only; with one, every page needs a sign-in. The
service's own request handling (body limits, counting) leaves the pages alone: predictions still work,
and no page hit is counted as a prediction request or logged as a prediction. Without --ui, /ui is 404."""

from __future__ import annotations

import httpx
import sqlalchemy as sa

from everloop import registry
from everloop.demo import make_churn
from everloop.serve import ServerProcess
from everloop.store import Store
from tests.conftest import feature_rows, wait_for
from tests.ui.test_overview_loop import page

TOKEN = "serve-ui-admin-token"


def _counts(store: Store) -> tuple[int, int, int]:
    """(requests, prediction requests, predictions logged) as the store holds them."""
    t = store.tables
    with store.engine.connect() as conn:
        requests, predictions = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(t.service_stats.c.requests), 0),
                                                       sa.func.coalesce(sa.func.sum(
                                                           t.service_stats.c.prediction_requests), 0))).one()
        logged = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(t.prediction_batches.c.rows), 0))).scalar()
    return int(requests), int(predictions), int(logged)


def test_serve_ui_mounts_the_pages_read_only_and_leaves_predictions_alone(trained):
    folder, _spec, store = trained
    rows = feature_rows(make_churn(20, seed=5))
    with ServerProcess(folder, ui=True, env={"EVERLOOP_ADMIN_TOKEN": ""}) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        overview = client.get("/ui/")
        assert overview.status_code == 200
        shown = page(overview.text)
        assert shown.ids["production-version"]["data-version"] == str(registry.alias_version(store, "production"))
        assert 'href="/ui/loop"' in overview.text and 'src="/ui/static/plotly.min.js"' in overview.text
        bare = client.get("/ui", follow_redirects=True)
        assert bare.status_code == 200 and bare.url.path == "/ui/"
        for path in ("/ui/loop", "/ui/models", "/ui/data", "/ui/monitoring", "/ui/static/ui.js"):
            assert client.get(path).status_code == 200, path
        assert client.get("/ui/loop?before=abc").status_code == 422
        refused = client.post("/ui/actions/rollback", data={"csrf": "x"})
        assert refused.status_code == 403 and "changes are off" in refused.text
        ui_hits = 10
        answered = client.post("/predict", json={"instances": rows})
        assert answered.status_code == 200 and len(answered.json()["predictions"]) == 20
        # the service counted every request, one of them a prediction; logged only its 20 rows
        counts = wait_for(lambda: (c := _counts(store))[0] >= ui_hits + 1 and c[2] >= 20 and c,
                          "the workers' counts reaching the store")
        assert counts[1:] == (1, 20)
        metrics = client.get("/metrics").text
        assert 'endpoint="/predict"' in metrics and 'endpoint="/ui' not in metrics  # pages: "other"


def test_serve_ui_with_an_admin_token_needs_a_sign_in(trained):
    folder, _spec, store = trained
    with ServerProcess(folder, ui=True, env={"EVERLOOP_ADMIN_TOKEN": TOKEN}) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        first = client.get("/ui", follow_redirects=True)
        assert first.status_code == 200 and first.url.path == "/ui/login"
        assert client.get("/ui/loop", follow_redirects=False).headers["location"] == "/ui/login"
        assert client.post("/ui/actions/rollback", data={"csrf": ""}).status_code == 403
        signed = client.post("/ui/login", data={"token": TOKEN}, follow_redirects=False)
        assert signed.status_code == 303 and signed.headers["location"] == "/ui/"
        assert "path=/ui/" in signed.headers["set-cookie"].lower()
        overview = client.get("/ui/")
        assert overview.status_code == 200
        forms = {f["attrs"]["action"]: f["inputs"] for f in page(overview.text).forms}
        assert forms["/ui/actions/promote"]["csrf"]
        answered = client.post("/predict", json={"features": feature_rows(make_churn(1, seed=6))[0]})
        assert answered.status_code == 200 and answered.json()["model_version"] == 1
        assert registry.alias_version(store, "production") == 1


def test_serve_without_ui_has_no_pages(trained):
    folder, _spec, _store = trained
    with ServerProcess(folder) as server:
        assert httpx.get(server.url + "/ui").status_code == 404
        assert httpx.get(server.url + "/ui/").status_code == 404
