"""The overview and loop pages show what the Python API says: the production version, the training
metric and lift, the health counts the workers reported, the last decisions and their evidence, a
rollout in progress; the audit trail pages back with ?before= and filters by ?action=; bad parameters
answer 422 naming them; an empty project says what to run first. The queries behind them
(loop.decisions, monitor.recent_service, ...) run on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from everloop import loop, monitor, registry
from everloop.spec import load_spec
from everloop.store import Store
from everloop.train import improvement
from everloop.ui import create_ui
from tests.conftest import write_project


# -- reading pages ----------------------------------------------------------------------------------


class _Page(HTMLParser):
    """Every element's attributes and text, by id; the rows (cell texts) of every table by id (a
    nested table's text counts in its outer cell too); every form with its inputs' values."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: dict[str, dict[str, Any]] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.forms: list[dict[str, Any]] = []
        self._open: list[tuple[str, str | None]] = []  # (tag, id) of each open element
        self._text: dict[str, list[str]] = {}
        self._tables: list[dict[str, Any]] = []  # per open table: id, the open row's cells, the open cell

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "form":
            self.forms.append({"attrs": found, "inputs": {}})
        if tag in ("input", "select") and self.forms and found.get("name"):
            self.forms[-1]["inputs"][found["name"]] = found.get("value")
        if tag in ("input", "br", "meta", "link"):
            return  # void elements: never closed
        if found.get("id"):
            self.ids[found["id"]] = found
            self._text[found["id"]] = []
        if tag == "table":
            self._tables.append({"id": found.get("id") or "", "cells": None, "cell": None})
            self.tables.setdefault(self._tables[-1]["id"], [])
        elif tag == "tr" and self._tables:
            self._tables[-1]["cells"] = []
        elif tag in ("td", "th") and self._tables and self._tables[-1]["cells"] is not None:
            self._tables[-1]["cell"] = []
        self._open.append((tag, found.get("id")))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            open_tag, _ = self._open.pop()
            if open_tag == tag:
                break
        table = self._tables[-1] if self._tables else None
        if table is None:
            return
        if tag in ("td", "th") and table["cell"] is not None:
            table["cells"].append(" ".join("".join(table["cell"]).split()))
            table["cell"] = None
        elif tag == "tr" and table["cells"] is not None:
            self.tables[table["id"]].append(table["cells"])
            table["cells"] = None
        elif tag == "table":
            self._tables.pop()

    def handle_data(self, data: str) -> None:
        for _, element_id in self._open:
            if element_id:
                self._text[element_id].append(data)
        for table in self._tables:
            if table["cell"] is not None:
                table["cell"].append(data)

    def text(self, element_id: str) -> str:
        assert element_id in self._text, f"no element with id={element_id!r} on the page"
        return " ".join("".join(self._text[element_id]).split())


def page(html: str) -> _Page:
    parsed = _Page()
    parsed.feed(html)
    return parsed


def body_rows(parsed: _Page, table_id: str) -> list[list[str]]:
    """The rows of a table without its header row."""
    return [row for row in parsed.tables[table_id] if row and row[0] != "#"]


def num(value: float) -> str:
    return f"{value:.4f}"


# -- the overview, on the demo store -------------------------------------------------------------


def test_the_overview_shows_the_production_model_as_the_registry_has_it(ui: TestClient, demo_project: Path):
    store = Store.for_project(demo_project)
    production = registry.get_model(store, registry.alias_version(store, "production"))
    window = monitor.latest_window(store)
    answer = ui.get("/")
    assert answer.status_code == 200
    shown = page(answer.text)
    assert shown.ids["production-version"]["data-version"] == str(production.version)
    assert shown.text("production-version") == f"v{production.version}"
    assert shown.text("production-metric") == num(production.value)
    baseline = production.manifest["baseline"][production.metric]
    assert shown.text("production-lift") == f"{improvement(production.metric, production.value, baseline):+.4f}"
    # the latest window judged the production model: its labelled metric, and how far from training
    assert window["model_version"] == production.version
    live = window["result"]["performance"]["value"]
    assert shown.text("live-metric").startswith(f"{production.metric} live {num(live)} on 1500 labelled rows")
    assert f"{improvement(production.metric, live, production.value):+.4f} vs training" in shown.text("live-metric")
    assert shown.text("window-status") == window["result"]["status"]
    health = window["result"]["health"]
    assert shown.text("latency").startswith(f"{health['latency_ms_p50']:.1f} / {health['latency_ms_p99']:.1f} ms")
    assert "no-rollout" in shown.ids and "promote-form" not in shown.ids  # read-only: no form


def test_the_overview_lists_the_last_five_decisions_newest_first(ui: TestClient, demo_project: Path):
    trail = loop.audit_trail(Store.for_project(demo_project))
    shown = page(ui.get("/").text)
    rows = body_rows(shown, "last-decisions")
    assert [(r[2], r[3]) for r in rows] == [(d["action"], d["reason"]) for d in reversed(trail[-5:])]
    assert [int(r[0]) for r in rows] == [d["id"] for d in reversed(trail[-5:])]


def test_the_overview_health_sums_what_the_workers_reported_in_the_span(demo_copy: Path):
    store = Store.for_project(demo_copy)
    t = store.tables
    now = time.time()
    with store.engine.begin() as conn:  # the demo's traffic a day back: only the rows below are recent
        for table in (t.service_stats, t.prediction_batches):
            conn.execute(table.update().values(created_at=table.c.created_at - 86400))
        counts = dict(requests=100, client_errors=5, server_errors=2, prediction_requests=80,
                      refused_predictions=4, other_client_errors=1)
        conn.execute(t.service_stats.insert(), [dict(counts, worker="a", created_at=now - 30),
                                                dict(counts, worker="b", created_at=now - 60),
                                                dict(counts, worker="a", created_at=now - 600)])  # 10 min ago
        conn.execute(t.lost_predictions.insert().values(worker="w1", rows=37, reason="killed"))
    with TestClient(create_ui(demo_copy, admin_token="")) as client:
        shown = page(client.get("/").text)
        assert shown.text("requests") == "200 (160 predictions, 8 refused as bad input)"
        assert shown.text("error-rate") == "2.00% (4 of 200)"
        assert shown.text("refused-rate") == "5.00%"
        assert shown.text("throughput").startswith(f"{160 / 300:.2f} prediction requests/s")
        assert shown.text("log-drops").startswith("37 predictions answered but never logged (1 killed worker")
        wider = page(client.get("/?minutes=15").text)  # the row of 10 minutes ago counts too
        assert wider.text("requests") == "300 (240 predictions, 12 refused as bad input)"


@pytest.mark.parametrize("minutes", ["abc", "0", "-3", "1441", "2.5"])
def test_a_bad_health_span_is_422_naming_it(ui: TestClient, minutes: str):
    answer = ui.get("/", params={"minutes": minutes})
    assert answer.status_code == 422
    assert page(answer.text).text("error").startswith(f"minutes={minutes!r}: expected")


def test_the_overview_shows_a_rollout_in_progress_with_its_latest_evidence(demo_copy: Path):
    spec, store = load_spec(demo_copy), Store.for_project(demo_copy)
    production = registry.alias_version(store, "production")
    rollout = registry.start_rollout(store, spec, 1, "canary", share=10, force=True, reason="try v1 again")
    registry.note_rollout(store, rollout.id, {"verdict": "wait", "candidate": {"rows": 123, "error_rate": 0.0}})
    with TestClient(create_ui(demo_copy, admin_token="")) as client:
        shown = page(client.get("/").text)
    assert shown.text("rollout-share") == "10%"
    summary = shown.text("rollout-summary")
    assert summary.startswith(f"Rollout {rollout.id}: model v1 in canary beside production v{production}")
    assert "try v1 again" in summary
    assert shown.tables["rollout-evidence"] == [["verdict", "wait"], ["candidate.rows", "123"],
                                                ["candidate.error_rate", "0"]]
    assert "rollout-actions" not in shown.ids  # read-only


def test_an_empty_project_says_what_to_run_first(tmp_path: Path, everloop):
    assert everloop("init", str(tmp_path / "fresh")).code == 0
    with TestClient(create_ui(tmp_path / "fresh", admin_token="")) as client:
        overview, trail = page(client.get("/").text), client.get("/loop")
    assert overview.text("next-step") == "everloop ingest"
    assert "production-version" not in overview.ids
    assert overview.text("no-decisions").startswith("No loop decision yet")
    assert overview.text("no-alerts").startswith("No monitoring window judged yet")
    assert trail.status_code == 200 and "decisions" not in page(trail.text).ids
    assert page(trail.text).text("no-decisions").startswith("No loop decision yet. Run everloop loop --once")


def test_a_trained_but_unpromoted_project_says_to_promote(project: Path):
    from everloop import data, train

    spec, store = load_spec(project), Store.for_project(project)
    data.ingest(store, spec, base=project)
    version = train.train(store, spec).version
    with TestClient(create_ui(project, admin_token="")) as client:
        assert page(client.get("/").text).text("next-step") == f"everloop promote {version}"


# -- the loop page -------------------------------------------------------------------------------


def test_the_loop_page_shows_every_decision_with_its_evidence(ui: TestClient, demo_project: Path):
    trail = loop.audit_trail(Store.for_project(demo_project))
    answer = ui.get("/loop")
    assert answer.status_code == 200
    shown = page(answer.text)
    rows = body_rows(shown, "decisions")
    assert [(int(r[0]), r[2], r[3]) for r in rows] == [(d["id"], d["action"], d["reason"]) for d in reversed(trail)]
    promoted = next(d for d in trail if d["action"] == "promoted")  # the demo's retraining
    row = next(r for r in rows if int(r[0]) == promoted["id"])
    assert row[4] == ", ".join(promoted["evidence"]["triggers"]) == "drift, performance"
    # its evidence: the monitor's numbers and the gate's comparison, candidate vs production
    monitor_said = promoted["evidence"]["monitor"]
    monitor_rows = dict(map(tuple, shown.tables[f"decision-{promoted['id']}-monitor"]))
    assert monitor_rows["status"] == monitor_said["status"] == "drift+decay+prediction_drift"
    assert monitor_rows["drifted features"] == ", ".join(monitor_said["drifted"])
    assert monitor_rows["metric (labelled)"] == f"{num(monitor_said['metric'])} on 1500 labelled rows"
    assert all(alert in monitor_rows["alerts"] for alert in monitor_said["alerts"])
    gate = promoted["evidence"]["gate"]
    comparison, metric = gate["evidence"]["comparison"], gate["evidence"]["metric"]
    gate_rows = shown.tables[f"decision-{promoted['id']}-gate"]
    assert gate_rows[0] == ["", f"candidate v{gate['candidate']}", f"production v{gate['production']}"]
    assert gate_rows[1] == [f"{metric} on {comparison['rows']} comparison rows ({comparison['rows_used']})",
                            num(comparison["candidate"]), num(comparison["production"])]
    assert gate_rows[2] == ["loss against production", f"{num(comparison['loss'])} (allowed "
                            f"{num(comparison['allowed_loss'])}: {comparison['tolerance']})"]
    slices = [[f"slice {name} ({v['rows']} rows)", num(v["candidate"]), num(v["production"])]
              for name, v in gate["evidence"]["slices"].items()]
    assert gate_rows[-len(slices):] == slices
    assert "Gate: passed" in shown.text(f"decision-{promoted['id']}")


def _events(store: Store, actions: list[str]) -> list[int]:
    """Append loop_events rows with these actions (reason "turn N"); returns their ids, oldest first."""
    t = store.tables.loop_events
    with store.engine.begin() as conn:
        last = conn.execute(sa.select(sa.func.max(t.c.id))).scalar() or 0
        conn.execute(t.insert(), [{"action": a, "reason": f"turn {n}", "evidence": {"triggers": []}}
                                  for n, a in enumerate(actions)])
        return list(conn.execute(sa.select(t.c.id).where(t.c.id > last).order_by(t.c.id)).scalars())


def test_the_loop_page_pages_back_and_filters_by_action(demo_copy: Path):
    store = Store.for_project(demo_copy)
    actions = ["failed" if n % 10 == 0 else "idle" for n in range(120)]
    added = _events(store, actions)
    failed = [i for i, a in zip(added, actions) if a == "failed"]
    ids = [d["id"] for d in loop.audit_trail(store, limit=1000)]  # the demo's decisions, then these
    assert ids[-120:] == added and len(ids) > 120
    with TestClient(create_ui(demo_copy, admin_token="")) as client:
        first = page(client.get("/loop").text)
        assert [int(r[0]) for r in body_rows(first, "decisions")] == ids[::-1][:50]
        older = first.ids["older"]["href"]
        assert older == f"/loop?before={ids[::-1][49]}"
        second = page(client.get(older).text)
        assert [int(r[0]) for r in body_rows(second, "decisions")] == ids[::-1][50:100]
        third = page(client.get(second.ids["older"]["href"]).text)
        assert [int(r[0]) for r in body_rows(third, "decisions")] == ids[::-1][100:]  # the rest, < 50
        assert "older" not in third.ids and third.ids["newest"]["href"] == "/loop"
        only = page(client.get("/loop", params={"action": "failed"}).text)
        assert [int(r[0]) for r in body_rows(only, "decisions")] == failed[::-1]
        assert {r[2] for r in body_rows(only, "decisions")} == {"failed"}
        promoted = page(client.get("/loop?action=promoted").text)
        assert [r[2] for r in body_rows(promoted, "decisions")] == ["promoted"]
        none = page(client.get("/loop?action=rollout_step").text)
        assert "decisions" not in none.ids and none.text("no-decisions").startswith("No rollout_step decision")


@pytest.mark.parametrize("query, named", [("before=abc", "before='abc'"), ("before=0", "before='0'"),
                                          ("before=-1", "before='-1'"), ("action=nope", "action='nope'")])
def test_bad_loop_parameters_are_422_naming_them(ui: TestClient, query: str, named: str):
    answer = ui.get(f"/loop?{query}")
    assert answer.status_code == 422
    assert page(answer.text).text("error").startswith(f"{named}: ")


# -- the queries, on SQLite and PostgreSQL --------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db_project(request, tmp_path: Path):
    """A project (no data) whose store is SQLite or a fresh PostgreSQL schema: (folder, store)."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    folder = write_project(tmp_path / "p", rows=50)
    store = Store.for_project(folder, url)
    yield folder, store
    store.close()


def test_decisions_page_by_id_and_filter(db_project):
    _, store = db_project
    ids = _events(store, ["idle", "promoted", "idle", "failed", "idle", "promoted", "idle"])
    rows, older = loop.decisions(store, limit=3)
    assert [r["id"] for r in rows] == ids[::-1][:3] and older == ids[4]
    rows, older = loop.decisions(store, limit=3, before=older)
    assert [r["id"] for r in rows] == ids[::-1][3:6] and older == ids[1]
    rows, older = loop.decisions(store, limit=3, before=older)
    assert [r["id"] for r in rows] == [ids[0]] and older is None
    rows, older = loop.decisions(store, limit=1, action="promoted")
    assert [r["id"] for r in rows] == [ids[5]] and older == ids[5]
    rows, older = loop.decisions(store, limit=1, action="promoted", before=older)
    assert [(r["id"], r["reason"]) for r in rows] == [(ids[1], "turn 1")] and older is None
    for bad in ({"limit": 0}, {"before": 0}, {"action": "nope"}):
        with pytest.raises(Exception, match="expected"):
            loop.decisions(store, **bad)


def test_recent_service_sums_the_span_of_every_worker(db_project):
    _, store = db_project
    t = store.tables
    now = 1_800_000_000.0
    with store.engine.begin() as conn:
        conn.execute(t.service_stats.insert(), [
            dict(worker="a", created_at=now - age, requests=10, client_errors=1, server_errors=1,
                 prediction_requests=8, refused_predictions=1, other_client_errors=0)
            for age in (400, 250, 100, 10, -5)])  # -5: after `now`, not counted
        conn.execute(t.prediction_batches.insert(), [
            dict(worker="w" * 16, first_counter=n * 100, last_counter=n * 100 + 99, rows=100, created_at=now - age,
                 model_version=1, payload=b"") for n, age in enumerate((400, 200, 20))])
    health = monitor.recent_service(store, 300, now=now)
    assert {k: health[k] for k in ("requests", "server_errors", "prediction_requests", "refused_predictions",
                                   "logged_rows", "logged_batches")} == {
        "requests": 30, "server_errors": 3, "prediction_requests": 24, "refused_predictions": 3,
        "logged_rows": 200, "logged_batches": 2}
    assert health["error_rate"] == pytest.approx(0.1) and health["refused_rate"] == pytest.approx(0.125)
    assert health["last_report"] == pytest.approx(now - 10)
    empty = monitor.recent_service(store, 60, now=now - 1000)
    assert empty["requests"] == 0 and empty["error_rate"] is None and empty["last_report"] is None


def test_the_pages_render_on_both_stores(db_project):
    folder, store = db_project
    ids = _events(store, ["idle", "promoted"])
    with TestClient(create_ui(folder, store=store, admin_token="")) as client:
        overview, trail = client.get("/"), client.get("/loop?action=promoted")
    assert overview.status_code == trail.status_code == 200
    assert page(overview.text).text("next-step") == "everloop ingest"
    assert [int(r[0]) for r in body_rows(page(overview.text), "last-decisions")] == ids[::-1]
    assert [int(r[0]) for r in body_rows(page(trail.text), "decisions")] == [ids[1]]


@pytest.mark.parametrize("path", [
    "/loop?before=9223372036854775808", "/loop?before=2147483648", "/loop?before=%D9%A3", "/?minutes=%D9%A3",
    "/monitoring?windows=%D9%A3", "/monitoring?before=99999999999999999999", "/monitoring/window/%D9%A3",
    "/monitoring/window/%20%201", "/models/%D9%A3", "/data/%D9%A3",
    "/models/compare?a=1&b=99999999999999999999"])
def test_numbers_out_of_range_or_not_ascii_digits_are_refused_by_name(ui, path: str):
    # a number past the store's 32-bit ids was a database error (500) on /loop; "٣" was read as 3
    answer = ui.get(path)
    assert answer.status_code == 422, (path, answer.status_code)
    assert "expected" in answer.text
