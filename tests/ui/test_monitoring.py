"""The Monitoring page: the drift heatmap shows what each window's drift report says and clicks through to
the feature's stored distributions; performance, predictions, latency and errors over windows; bad
parameters answer 404/422 naming them; an empty store says what to do. Also the queries behind it
(everloop.monitor's recent_windows, window_result, service_per_minute) on SQLite and PostgreSQL."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from everloop.monitor import (MAX_WINDOWS, feature_distribution, over_time, prediction_over_time, recent_windows,
                              service_per_minute, window_result)
from everloop.monitor._health import STATS_LAG_SECONDS
from everloop.store import Store
from everloop.ui import create_ui


def figure(page: str, chart_id: str) -> dict[str, Any]:
    """The plotly figure of the chart <div id=chart_id>, parsed from its data-figure attribute."""
    match = re.search(rf'<div class="chart"[^>]*\bid="{chart_id}" data-figure="([^"]*)"', page)
    assert match, f"no chart {chart_id} in the page"
    return json.loads(html.unescape(match.group(1)))


def element(page: str, element_id: str) -> str:
    """The text of the element with that id (tags dropped, entities decoded, spaces collapsed)."""
    match = re.search(rf'<(\w+)[^>]*\bid="{element_id}"[^>]*>(.*?)</\1>', page, re.S)
    assert match, f"no element {element_id} in the page"
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", match.group(2))).split())


def stored_runs(folder: Path) -> list[tuple[int, dict[str, Any]]]:
    """(id, result) of every monitor_runs row, oldest first, read straight from the table."""
    store = Store.for_project(folder)
    try:
        t = store.tables.monitor_runs
        with store.engine.connect() as conn:
            return [(row.id, row.result) for row in conn.execute(sa.select(t.c.id, t.c.result).order_by(t.c.id))]
    finally:
        store.close()


@pytest.fixture(scope="module")
def shifted(demo_project: Path) -> tuple[int, dict[str, Any]]:
    """The latest window the monitor judged as dataset drift (the demo's shift)."""
    drifted = [(i, r) for i, r in stored_runs(demo_project) if (r.get("drift") or {}).get("dataset_drift")]
    assert drifted, "the demo store has no drifted window"
    return drifted[-1]


def test_the_heatmap_shows_the_drift_report_of_the_shifted_window(ui: TestClient, demo_project: Path,
                                                                 shifted: tuple[int, dict[str, Any]]) -> None:
    run_id, result = shifted
    page = ui.get("/monitoring")
    assert page.status_code == 200
    fig = figure(page.text, "drift-heatmap")
    heat = next(t for t in fig["data"] if t["type"] == "heatmap")
    ids = heat["customdata"][0]
    assert ids == [i for i, _ in stored_runs(demo_project)][-len(ids):]  # the latest windows, oldest first
    j = ids.index(run_id)
    columns = {c["column"]: c for c in result["drift"]["columns"]}
    drifted = result["drift"]["drifted"]
    assert len(drifted) >= 3 and set(drifted) <= set(heat["y"])
    for name, column in columns.items():  # every cell of that window is the report's effect
        assert heat["z"][heat["y"].index(name)][j] == pytest.approx(column["effect"], rel=1e-12)
    assert all(row[j] == run_id for row in heat["customdata"])
    assert fig["layout"]["yaxis"]["ticktext"] == heat["y"]  # every feature named on the axis
    marks = next(t for t in fig["data"] if t.get("name") == "drifted")  # the ✕ of that window: the drifted ones
    at_j = {y for x, y in zip(marks["x"], marks["y"]) if x == j + 1}
    assert at_j == {n for n, c in columns.items() if c["drifted"]} and set(drifted) <= at_j
    assert {c for x, c in zip(marks["x"], marks["customdata"]) if x == j + 1} == {run_id}
    div = re.search(r'<div class="chart" id="drift-heatmap"[^>]*>', page.text).group(0)
    click = re.search(r'data-click="([^"]*)"', div).group(1)
    assert html.unescape(click) == "/monitoring/window/{customdata}?feature={y}"
    latest = element(page.text, "latest-drifted")
    assert latest.startswith("Latest window")


def test_the_window_page_shows_the_test_and_both_distributions(ui: TestClient,
                                                              shifted: tuple[int, dict[str, Any]]) -> None:
    run_id, result = shifted
    columns = {c["column"]: c for c in result["drift"]["columns"]}
    stored = result["distributions"]
    kinds = {}  # one drifted feature of each kind whose distribution the monitor stored
    for name in result["drift"]["drifted"]:
        kinds.setdefault("categorical" if stored.get(name, {}).get("kind") == "categorical" else "numeric"
                         if name in stored else None, name)
    kinds.pop(None, None)
    assert set(kinds) == {"categorical", "numeric"}, kinds
    for kind, name in kinds.items():
        page = ui.get(f"/monitoring/window/{run_id}", params={"feature": name})
        assert page.status_code == 200
        column = columns[name]
        assert element(page.text, "test-method").lower().startswith(
            {"ks": "kolmogorov-smirnov", "chi2": "chi-square"}[column["method"]])
        assert float(element(page.text, "test-statistic")) == pytest.approx(column["statistic"], abs=1e-4)
        assert float(element(page.text, "test-p-value")) == pytest.approx(column["p_value"], rel=1e-2)
        assert float(element(page.text, "test-threshold")) == pytest.approx(column["p_value_threshold"])
        assert element(page.text, "test-drifted").startswith("yes")
        d = stored[name]
        if kind == "categorical":
            expected = {"training reference": d["reference"] + ([d["rest"]["reference"]] if any(d["rest"].values())
                                                                else []),
                        "window": d["current"] + ([d["rest"]["current"]] if any(d["rest"].values()) else [])}
        else:
            extra = any(d["missing"].values())
            expected = {side: [d["below"][key]] + d[key] + [d["above"][key]] + ([d["missing"][key]] if extra else [])
                        for side, key in (("training reference", "reference"), ("window", "current"))}
        bars = {t["name"]: t for t in figure(page.text, "feature-distribution")["data"]}
        assert set(bars) == {"training reference", "window"}
        for side, counts in expected.items():
            assert bars[side]["customdata"] == counts
            assert bars[side]["y"] == pytest.approx([c / sum(counts) for c in counts])


def test_a_feature_whose_distribution_was_not_stored_shows_its_test_and_says_so(
        ui: TestClient, shifted: tuple[int, dict[str, Any]]) -> None:
    run_id, result = shifted
    name = next(c["column"] for c in result["drift"]["columns"] if c["column"] not in result["distributions"])
    page = ui.get(f"/monitoring/window/{run_id}", params={"feature": name})
    assert page.status_code == 200
    assert element(page.text, "test-drifted").startswith("no")
    assert f"{name} was not among them" in element(page.text, "no-distribution")
    assert 'id="feature-distribution"' not in page.text


@pytest.mark.parametrize(("path", "status", "message"), [
    ("/monitoring/window/999999", 404, "window id 999999: no monitoring window has that id"),
    ("/monitoring/window/abc", 422, "window id 'abc': expected a whole number"),
    ("/monitoring?windows=abc", 422, "?windows='abc': expected a whole number"),
    ("/monitoring?windows=0", 422, f"?windows=0: expected 1 to {MAX_WINDOWS}"),
    ("/monitoring?windows=201", 422, f"?windows=201: expected 1 to {MAX_WINDOWS}"),
    ("/monitoring?before=x", 422, "?before='x': expected a whole number"),
    ("/monitoring?before=1", 404, "?before=1: no monitoring window has an id below 1"),
    ("/monitoring?before=99999999999999999999", 422, "?before=99999999999999999999: expected 1 to 2147483647"),
    ("/monitoring/window/99999999999999999999", 404, "window id 99999999999999999999: no monitoring window"),
    ("/monitoring?version=99", 404, "?version=99: model v99 has no monitoring windows"),
])
def test_bad_parameters_are_named(ui: TestClient, path: str, status: int, message: str) -> None:
    page = ui.get(path)
    assert page.status_code == status
    assert element(page.text, "problem").startswith(message)


def test_a_feature_not_in_the_window_is_404_naming_it(ui: TestClient, shifted: tuple[int, dict[str, Any]]) -> None:
    run_id, result = shifted
    page = ui.get(f"/monitoring/window/{run_id}", params={"feature": "no<such>feature"})
    assert page.status_code == 404
    problem = element(page.text, "problem")
    assert problem.startswith(f"feature 'no<such>feature' is not in window id {run_id}; its features: ")
    assert all(c["column"] in problem for c in result["drift"]["columns"])
    assert "no<such>" not in page.text  # escaped


def test_windows_are_paged_back_with_before(ui: TestClient, demo_project: Path) -> None:
    ids = [i for i, _ in stored_runs(demo_project)]
    assert len(ids) >= 4
    first = ui.get("/monitoring", params={"windows": 2})
    assert figure(first.text, "drift-heatmap")["data"][0]["customdata"][0] == ids[-2:]
    older = re.search(r'id="older" href="([^"]*)"', first.text).group(1)
    assert html.unescape(older) == f"/monitoring?before={ids[-2]}&windows=2"
    second = ui.get(html.unescape(older))
    assert figure(second.text, "drift-heatmap")["data"][0]["customdata"][0] == ids[-4:-2]
    assert 'id="newest"' in second.text and 'id="newest"' not in first.text
    table_ids = [int(i) for i in re.findall(r'<tr data-run="(\d+)">', second.text)]
    assert table_ids == ids[-4:-2][::-1]  # the table: newest first


def test_performance_predictions_and_health_over_windows(ui: TestClient, demo_project: Path) -> None:
    runs = [r for _, r in stored_runs(demo_project)][-50:]
    page = ui.get("/monitoring").text
    traces = {t["name"]: t for t in figure(page, "performance-over-time")["data"] if t.get("name")}
    assert traces["decay threshold"]["y"] == pytest.approx([r["performance"]["threshold"] for r in runs])
    assert traces["estimated without labels"]["y"] == pytest.approx([r["performance"]["estimated"] for r in runs])
    prediction = {t["name"]: t for t in figure(page, "prediction-drift-over-time")["data"]}
    assert prediction["prediction drift"]["y"] == pytest.approx([r["prediction_drift"]["effect"] for r in runs])
    health = {t["name"]: t for t in figure(page, "health-over-time")["data"]}
    assert health["latency p99"]["y"] == pytest.approx([r["health"]["latency_ms_p99"] for r in runs])
    # the monitor stores each window's score distribution: the median per window is drawn from it
    from everloop.monitor._report import _quantile

    assert all(r["prediction_distribution"] for r in runs)
    medians = {t["name"]: t for t in figure(page, "prediction-distribution")["data"] if t.get("name")}["median"]
    assert medians["y"] == pytest.approx([_quantile(r["prediction_distribution"], "current", 0.5) for r in runs])
    assert 0 < min(medians["y"]) and max(medians["y"]) < 1  # churn probabilities


def test_requests_per_minute_are_the_service_stats_of_the_windows_time(ui: TestClient, demo_project: Path) -> None:
    runs = [r for _, r in stored_runs(demo_project)]
    start, end = min(r["window"]["from"] for r in runs), max(r["window"]["to"] for r in runs)
    store = Store.for_project(demo_project)
    try:
        t = store.tables.service_stats
        with store.engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.created_at, t.c.requests).where(
                t.c.created_at >= start, t.c.created_at <= end + STATS_LAG_SECONDS)).all()
    finally:
        store.close()
    assert rows, "the demo's service wrote no request counts"
    per_minute: dict[int, int] = {}
    for created, requests in rows:
        per_minute[int(created // 60)] = per_minute.get(int(created // 60), 0) + requests
    bars = next(t for t in figure(ui.get("/monitoring").text, "service-per-minute")["data"] if t["name"] == "requests")
    assert bars["y"] == [per_minute[m] for m in sorted(per_minute)]


def test_an_empty_store_says_what_to_do(tmp_path: Path, everloop) -> None:
    assert everloop("init", str(tmp_path / "fresh")).code == 0
    with TestClient(create_ui(tmp_path / "fresh", admin_token="")) as client:
        page = client.get("/monitoring")
        assert page.status_code == 200
        assert "No monitoring windows yet" in element(page.text, "no-windows")
        assert "everloop monitor" in element(page.text, "no-windows")
        assert 'class="chart"' not in page.text
        assert client.get("/monitoring/window/1").status_code == 404


# -- the queries, on both databases --------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    url = None if request.param == "sqlite" else request.getfixturevalue("pg_url")
    opened = Store(tmp_path / "store", db_url=url)
    yield opened
    opened.close()


def _result(index: int, version: int) -> dict[str, Any]:
    return {"status": "healthy", "model_version": version, "window": {"index": index, "rows": 100},
            "drift": {"columns": [{"column": "a", "effect": index / 100, "drifted": False}]},
            "distributions": {"a": {"kind": "categorical", "categories": ["x"], "reference": [1], "current": [2]}},
            "skew": {"examples": ["big"] * 10}, "alerts": [], "performance": {"value": 0.5 + index / 100}}


def test_recent_windows_pages_without_the_bulky_parts(store: Store) -> None:
    t = store.tables.monitor_runs
    with store.engine.begin() as conn:
        for i in range(7):
            conn.execute(t.insert().values(model_version=1 + i % 2, result=_result(i, 1 + i % 2),
                                           window_key=f"k{i}", created_at=1000.0 + i))
        ids = list(conn.execute(sa.select(t.c.id).order_by(t.c.id)).scalars())
    page = recent_windows(store, 3)
    assert [r["run_id"] for r in page.runs] == ids[-3:] and page.latest and page.newer is None
    assert page.older == ids[-3]
    assert [r["window"]["index"] for r in page.runs] == [4, 5, 6]
    assert all("distributions" not in r and "skew" not in r for r in page.runs)
    assert page.runs[0]["drift"]["columns"][0]["effect"] == 0.04 and page.runs[0]["recorded_at"] == 1004.0
    back = recent_windows(store, 3, before=page.older)
    assert [r["run_id"] for r in back.runs] == ids[1:4] and not back.latest and back.newer is None
    oldest = recent_windows(store, 3, before=ids[1])
    assert [r["run_id"] for r in oldest.runs] == ids[:1] and oldest.older is None and oldest.newer == ids[4]
    v2 = recent_windows(store, 2, model_version=2)
    assert [r["window"]["index"] for r in v2.runs] == [3, 5] and v2.older == ids[3]
    assert recent_windows(store, 5, model_version=3).runs == []
    with pytest.raises(ValueError, match="limit 0: expected 1 to 200"):
        recent_windows(store, 0)
    full = window_result(store, ids[2])
    assert full["distributions"]["a"]["current"] == [2] and full["run_id"] == ids[2] and full["window_key"] == "k2"
    assert window_result(store, ids[-1] + 1) is None


def test_service_per_minute_sums_workers_in_sql(store: Store) -> None:
    t = store.tables.service_stats
    rows = [(6000.0, "a", 10, 1, 5, 1), (6030.0, "b", 20, 0, 10, 2), (6059.9, "a", 5, 0, 0, 0),  # minute 100
            (6061.0, "a", 8, 2, 4, 0),  # minute 101
            (5990.0, "a", 99, 9, 9, 9), (6200.0 + STATS_LAG_SECONDS + 1, "a", 99, 9, 9, 9)]  # outside the span
    with store.engine.begin() as conn:
        for created, worker, requests, errors, predictions, refused in rows:
            conn.execute(t.insert().values(created_at=created, worker=worker, requests=requests, client_errors=0,
                                           server_errors=errors, prediction_requests=predictions,
                                           refused_predictions=refused))
    minutes = service_per_minute(store, 6000.0, 6200.0)
    assert [(m["minute"], m["requests"], m["server_errors"], m["prediction_requests"], m["refused_predictions"])
            for m in minutes] == [(6000.0, 35, 1, 15, 3), (6060.0, 8, 2, 4, 0)]
    assert minutes[0]["error_rate"] == pytest.approx(1 / 35) and minutes[1]["refused_rate"] == 0.0
    # the last 3 minutes of the span (its end plus the stats' lag falls in minute 103): 101 to 103
    assert [m["minute"] for m in service_per_minute(store, 6000.0, 6200.0, max_minutes=3)] == [6060.0]
    with pytest.raises(ValueError, match="expected start <= end"):
        service_per_minute(store, 10.0, 5.0)


# -- the figures ----------------------------------------------------------------------------------------


def test_prediction_distribution_over_windows_from_stored_bins() -> None:
    def run(index: int, current: list[int]) -> dict[str, Any]:
        return {"window": {"index": index}, "model_version": 1, "prediction_distribution": {
            "kind": "numeric", "edges": [0.0, 0.5, 1.0], "value_bins": False, "reference": [50, 50],
            "current": current, "below": {"reference": 0, "current": 0}, "above": {"reference": 0, "current": 0},
            "missing": {"reference": 0, "current": 0}}}

    fig = prediction_over_time([run(0, [50, 50]), run(1, [100, 0]), {"window": {"index": 2}}])
    traces = {t.name: t for t in fig.data if t.name}
    assert list(traces["median"].y) == [0.5, 0.25, None]  # linear within a bin; a run without one is a gap
    assert list(traces["reference median"].y) == [0.5, 0.5, None]
    assert prediction_over_time([{"window": {"index": 0}}]) is None
    classes = prediction_over_time([{"window": {"index": 0}, "prediction_distribution": {
        "kind": "categorical", "categories": ["yes", "no"], "reference": [5, 5], "current": [3, 1],
        "rest": {"reference": 0, "current": 0}}}])
    assert {t.name: list(t.y) for t in classes.data} == {"yes": [0.75], "no": [0.25]}


def test_feature_distribution_and_panels() -> None:
    run = {"distributions": {"plan": {"kind": "categorical", "categories": ["a", "b"], "reference": [3, 1],
                                      "current": [1, 1], "new": ["b"], "rest": {"reference": 0, "current": 2}}}}
    fig = feature_distribution(run, "plan")
    assert [list(t.customdata) for t in fig.data] == [[3, 1, 0], [1, 1, 2]]
    assert list(fig.layout.xaxis.ticktext) == ["a", "b (new)", "other categories"]
    assert feature_distribution(run, "other") is None
    with pytest.raises(ValueError, match="panels \\['speed'\\]"):
        over_time([{}], None, ("speed",))


def test_prediction_quantiles_from_real_coarse_bins_are_near_the_scores_own() -> None:
    import numpy as np
    import pandas as pd

    from everloop.data import Profile
    from everloop.monitor._report import coarse_distributions

    rng = np.random.default_rng(7)
    reference = Profile.reference(pd.DataFrame({"prediction": rng.beta(2, 5, 4000)}), {"prediction": "numeric"})
    runs, medians = [], []
    for index, (a, b) in enumerate(((2, 5), (5, 2))):  # the second window's scores moved up
        scores = rng.beta(a, b, 1500)
        window = reference.window(pd.DataFrame({"prediction": scores}))
        d = coarse_distributions(reference, window, ["prediction"])["prediction"]
        runs.append({"window": {"index": index}, "prediction_distribution": d})
        medians.append(float(np.median(scores)))
    traces = {t.name: t for t in prediction_over_time(runs).data if t.name}
    assert list(traces["median"].y)[0] == pytest.approx(medians[0], abs=0.005)
    assert list(traces["median"].y)[1] == pytest.approx(medians[1], abs=0.02)  # few reference bins up there
    assert list(traces["reference median"].y)[0] == pytest.approx(0.2644, abs=0.01)  # Beta(2, 5)'s median
