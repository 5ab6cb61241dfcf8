"""The Models and Data pages show what the registry and data APIs say: the versions, the alias
history, lineage, one model (metrics, slices, importances, card), two compared, dataset versions,
the schema, one version's profile, anomalies and quarantined rows, a diff; bad parameters answer
404/422 pages that name them."""

from __future__ import annotations

import re
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from everloop import data, registry, train
from everloop.spec import load_spec
from everloop.store import Store
from everloop.ui import create_ui
from everloop.ui._web import num
from tests.conftest import write_project

# -- reading the pages ------------------------------------------------------------------------


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, text: str) -> None:
        if self._cell is not None:
            self._cell.append(text)


def table(page: str, id: str, header: bool = False) -> list[list[str]]:
    """The cell texts of each row of the <table id=...> (the header row only when asked)."""
    found = re.search(rf'<table[^>]*id="{id}"[^>]*>(.*?)</table>', page, re.S)
    assert found, f"no table with id={id!r} on the page"
    cells = _Cells()
    cells.feed(found.group(1))
    rows = [r for r in cells.rows if r]
    return rows if header else rows[1:] if "<thead>" in found.group(1) else rows


def text(page: str, id: str) -> str:
    """The text of the element with id=..., tags removed."""
    found = re.search(rf'<(\w+)[^>]*id="{id}"[^>]*>(.*?)</\1>', page, re.S)
    assert found, f"no element with id={id!r} on the page"
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", found.group(2))).split())


def facts(page: str, id: str) -> dict[str, str]:
    """A two-column table (label, value) as a dict."""
    return {row[0]: row[1] for row in table(page, id)}


def f4(x: float) -> str:
    """A number as the model card's facts show it."""
    return f"{x:.4f}"


# -- the demo store: models -------------------------------------------------------------------


def test_models_table_is_registry_list_models(ui: TestClient, demo_project: Path) -> None:
    store = Store.for_project(demo_project)
    models = registry.list_models(store)
    page = ui.get("/models")
    assert page.status_code == 200
    rows = table(page.text, "models-table")
    assert [r[0] for r in rows] == [f"v{m.version}" for m in reversed(models)]
    for row, m in zip(rows, reversed(models)):
        baseline = m.manifest["baseline"][m.metric]
        assert row[2:6] == [m.metric, num(m.value), num(baseline), f"{m.value - baseline:+.4f}"]
        assert row[6] == f"v{m.dataset_version}"
        assert row[7] == " ".join(m.aliases)
    production = registry.alias_version(store, registry.PRODUCTION)
    assert text(page.text, "production-version") == f"v{production}"
    assert f"{len(models)} model versions" in page.text


def test_alias_history_is_the_latest_moves_newest_first(ui: TestClient, demo_project: Path) -> None:
    history = registry.alias_history(Store.for_project(demo_project))
    rows = table(ui.get("/models").text, "alias-history")
    assert len(rows) == len(history) >= 2  # the demo promotes v1, the loop the retrained v2
    for row, move in zip(rows, reversed(history)):
        before = f"v{move['from_version']}" if move["from_version"] else "none"
        assert row[1:5] == [move["alias"], before, f"v{move['to_version']}", move["actor"]]
        assert row[5].startswith(move["reason"])


def test_lineage_links_dataset_to_model_to_promotions(ui: TestClient, demo_project: Path) -> None:
    store = Store.for_project(demo_project)
    rows = table(ui.get("/models").text, "lineage")
    shown = {row[1] for row in rows}
    assert shown == {f"model v{m.version}" for m in registry.list_models(store)}
    retrained = registry.alias_version(store, registry.PRODUCTION)
    row = next(r for r in rows if r[1] == f"model v{retrained}")
    model = registry.get_model(store, retrained)
    assert row[0].startswith(f"dataset v{model.dataset_version}")
    move = registry.model_lineage(store, retrained)["alias_moves"][-1]
    assert move["reason"] in row[3] and f"(from v{move['from_version']})" in row[3]


def test_one_model_shows_its_metrics_slices_card_and_lineage(ui: TestClient,
                                                             demo_project: Path) -> None:
    store = Store.for_project(demo_project)
    version = registry.alias_version(store, registry.PRODUCTION)
    m = registry.get_model(store, version).manifest
    page = ui.get(f"/models/{version}")
    assert page.status_code == 200
    assert re.search(rf'<h1>Model v{version} <span class="alias">production</span>', page.text)
    assert text(page.text, "model-value") == num(m["metrics"][m["metric"]])
    metrics = facts(page.text, "model-metrics")
    assert {k: metrics[k] for k in m["metrics"]} == {k: f4(v) for k, v in m["metrics"].items()}
    assert metrics[f"trivial baseline ({m['metric']})"] == f4(m["baseline"][m["metric"]])
    slices = facts(page.text, "model-slices")
    assert slices == {f"{c} = {level}": f4(v)
                      for c, levels in m["slices"].items() for level, v in levels.items()}
    assert facts(page.text, "card-data")["training rows"] == str(m["train_rows"])
    record = facts(page.text, "card-reproducibility")
    assert record["reproduce with"] == f"everloop reproduce {version}"
    lineage = registry.model_lineage(store, version)
    chain = [r[0] for r in table(page.text, "model-lineage")]
    assert chain == [f"v{d['version']}" for d in lineage["datasets"]]
    assert len(table(page.text, "model-moves")) == len(lineage["alias_moves"])
    # the demo's HistGradientBoostingClassifier has no feature_importances_: the page says so
    none = text(page.text, "no-importances")
    assert "HistGradientBoostingClassifier records no feature importances" in none
    assert registry.feature_importances(store, version) is None


def test_compare_shows_both_versions_side_by_side(ui: TestClient, demo_project: Path) -> None:
    store = Store.for_project(demo_project)
    a, b = (registry.get_model(store, v).manifest for v in (1, 2))
    page = ui.get("/models/compare?a=1&b=2")
    assert page.status_code == 200
    assert 'id="compare"' in page.text
    rows = {r[0].split(" (")[0]: r[1:] for r in table(page.text, "compare-metrics")}
    assert set(rows) == set(a["metrics"]) | set(b["metrics"])
    for name, (shown_a, shown_b, change) in rows.items():
        assert (shown_a, shown_b) == (num(a["metrics"][name]), num(b["metrics"][name]))
        better = train.improvement(name, b["metrics"][name], a["metrics"][name])
        assert change.startswith(f"{better:+.4f}")
    slices = {r[0]: r[1:3] for r in table(page.text, "compare-slices-table")}
    assert slices == {f"{c}={level}": [num(v), num(b["slices"][c][level])]
                      for c, levels in a["slices"].items() for level, v in levels.items()}
    params = {r[0]: r[1:] for r in table(page.text, "compare-params")}
    assert params["estimator"] == [a["estimator"], b["estimator"]]
    assert set(params) == {"estimator"} | set(a["params"]) | set(b["params"])
    assert 'id="compare-slices"' in page.text  # the grouped bar chart of the slices


def test_promote_form_only_for_the_admin(ui: TestClient, admin_ui: TestClient,
                                         demo_copy: Path) -> None:
    assert "/actions/promote" not in ui.get("/models/1").text
    page = admin_ui.get("/models/1").text
    form = re.search(r'<form[^>]*action="/actions/promote"[^>]*>(.*?)</form>', page, re.S)
    assert form, "the admin sees a promote form"
    assert 'name="version" value="1"' in form.group(1)
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', form.group(1))
    assert csrf and len(csrf.group(1)) == 64
    production = registry.alias_version(Store.for_project(demo_copy), registry.PRODUCTION)
    # the version in production has no form
    assert "/actions/promote" not in admin_ui.get(f"/models/{production}").text


@pytest.mark.parametrize("path, status, named", [
    ("/models/99", 404, "model version 99 does not exist"),
    ("/models/abc", 422, "model version 'abc': expected a version number"),
    ("/models/compare?a=x&b=1", 422, "a='x': expected a version number"),
    ("/models/compare?a=1", 422, "b: missing"),
    ("/models/compare?a=1&b=99", 404, "model version 99 does not exist"),
    ("/models?before=zz", 422, "before='zz'"),
    ("/models/0", 422, "model version '0'"),
    ("/data/99", 404, "dataset version 99 does not exist"),
    ("/data/-1", 422, "dataset version '-1'"),
    ("/data/diff?a=1", 422, "b: missing"),
    ("/data/diff?a=1&b=2.5", 422, "b='2.5'"),
    ("/data/diff?a=99&b=1", 404, "dataset version 99 does not exist"),
    ("/data?before=x", 422, "before='x'"),
])
def test_bad_parameters_answer_a_page_naming_them(ui: TestClient, path: str, status: int,
                                                  named: str) -> None:
    page = ui.get(path)
    assert page.status_code == status
    assert named in text(page.text, "error")
    assert "<h1>" in page.text and "text/html" in page.headers["content-type"]


# -- the demo store: data ---------------------------------------------------------------------


def test_datasets_table_is_list_datasets(ui: TestClient, demo_project: Path) -> None:
    store = Store.for_project(demo_project)
    datasets = data.list_datasets(store)
    rows = table(ui.get("/data").text, "datasets-table")
    assert [r[0] for r in rows] == [f"v{d.version}" for d in reversed(datasets)]
    for row, d in zip(rows, reversed(datasets)):
        assert row[2:7] == [str(d.rows), str(d.columns), str(d.quarantined), str(len(d.warnings)),
                            d.source]
        assert row[7] == (f"v{d.parent}" if d.parent else "-")


def test_schema_shows_every_column_with_role_and_kind(ui: TestClient, demo_project: Path) -> None:
    version, schema = data.current_schema(Store.for_project(demo_project))
    page = ui.get("/data").text
    rows = table(page, "schema")
    roles = [r[:3] for r in rows[:len(schema.columns)]]
    assert roles == [[c.name, c.role, c.kind] for c in schema.columns]
    assert f"Schema v{version}" in page
    plan = next(r for r in rows if r[0] == "plan")
    assert plan[7] == ", ".join(next(c for c in schema.columns if c.name == "plan").categories)


def test_one_dataset_shows_its_profile_and_anomalies(ui: TestClient, demo_project: Path) -> None:
    store = Store.for_project(demo_project)
    d = data.get_dataset(store, 2)
    page = ui.get("/data/2").text
    assert text(page, "dataset-rows") == str(d.rows)
    profile = {r[0]: r for r in table(page, "profile")}
    assert list(profile) == list(d.stats["columns"])
    age = d.stats["columns"]["age"]
    assert profile["age"][3:7] == [num(age[k]) for k in ("mean", "std", "min", "max")]
    plan = d.stats["columns"]["plan"]
    top = max(plan["categories"], key=plan["categories"].get)
    assert profile["plan"][8].startswith(f"{top} ({plan['categories'][top]})")
    anomalies = table(page, "anomalies")
    assert sorted((r[0], r[1], r[2], r[3]) for r in anomalies) == sorted(
        (w["severity"], w["column"], w["kind"], str(w["count"])) for w in d.warnings)
    assert d.warnings  # the demo's retraining data has values above the schema's range
    warning = next(r for r in anomalies if r[2] == d.warnings[0]["kind"])
    assert warning[5] == ", ".join(str(r + 1) for r in d.warnings[0]["rows"])  # data rows from 1
    assert "No rows were quarantined" in text(page, "quarantine")
    lineage = registry.dataset_lineage(store, 2)
    models = [r[0] for r in table(page, "dataset-models")]
    assert models == [f"v{m['version']}" for m in lineage["models"]]


def test_diff_shows_what_diff_datasets_reports(ui: TestClient, demo_project: Path) -> None:
    store = Store.for_project(demo_project)
    report = data.diff_datasets(data.get_dataset(store, 1), data.get_dataset(store, 2))
    page = ui.get("/data/diff?a=1&b=2")
    assert page.status_code == 200
    rows = {r[0]: r for r in table(page.text, "diff")}
    assert list(rows) == [r["column"] for r in report]
    for r in report:
        shown = rows[r["column"]]
        if "mean_shift_sd" in r:
            assert shown[6] == f"{r['mean_shift_sd']:+.2f} sd"
            assert shown[3] == f"{num(r['mean'][0])} → {num(r['mean'][1])}"
        if "tvd" in r:
            assert shown[7].startswith(f"tvd {r['tvd']:.3f}")
    assert 'id="diff-shift"' in page.text


def test_diff_names_added_removed_columns_and_new_categories(demo_copy: Path) -> None:
    """A dataset version whose recorded statistics lack a column, have a new one and a new
    category."""
    store = Store.for_project(demo_copy)
    t = store.tables.datasets
    with store.engine.begin() as conn:
        row = conn.execute(t.select().where(t.c.version == 2)).first()
        stats = dict(row.stats)
        columns = dict(stats["columns"])
        columns.pop("age")
        columns["loyalty_score"] = dict(columns["satisfaction"])
        plan = dict(columns["plan"])
        plan["categories"] = dict(plan["categories"]) | {"enterprise": 300}
        columns["plan"] = plan
        stats["columns"] = columns
        values = {k: v for k, v in row._mapping.items() if k != "version"}
        values |= {"content_hash": "f" * 64, "stats": stats, "parent": 2}
        new = conn.execute(t.insert().values(values).returning(t.c.version)).scalar_one()
    report = data.diff_datasets(data.get_dataset(store, 2), data.get_dataset(store, new))
    changed = {r["column"]: r["change"] for r in report if "change" in r}
    assert changed == {"age": "removed", "loyalty_score": "added"}
    with TestClient(create_ui(demo_copy, admin_token="")) as client:
        rows = {r[0]: r for r in table(client.get(f"/data/diff?a=2&b={new}").text, "diff")}
    assert rows["age"][2] == f"removed in v{new}"
    assert rows["loyalty_score"][2] == f"added in v{new}"
    assert "new: enterprise" in rows["plan"][7]


# -- paging, bounds ---------------------------------------------------------------------------


def _more_versions(store: Store, n: int) -> None:
    """`n` more model versions (model v1's row again) and `n` more dataset versions (v1's row
    again)."""
    t = store.tables
    with store.engine.begin() as conn:
        m = conn.execute(t.models.select().where(t.models.c.version == 1)).first()
        d = conn.execute(t.datasets.select().where(t.datasets.c.version == 1)).first()
        model = {k: v for k, v in m._mapping.items() if k != "version"}
        dataset = {k: v for k, v in d._mapping.items() if k != "version"}
        for i in range(n):
            conn.execute(t.models.insert().values(model))
            conn.execute(t.datasets.insert().values(dataset | {"content_hash": f"{i:064x}"}))


def test_lists_are_paged_by_100(demo_copy: Path) -> None:
    store = Store.for_project(demo_copy)
    _more_versions(store, 101)
    models = registry.list_models(store)
    datasets = data.list_datasets(store)
    with TestClient(create_ui(demo_copy, admin_token="")) as client:
        first = client.get("/models").text
        newest = [f"v{m.version}" for m in reversed(models)]
        assert [r[0] for r in table(first, "models-table")] == newest[:100]
        older = re.search(r'href="/models\?before=(\d+)" id="models-older"', first)
        assert older and int(older.group(1)) == models[-100].version
        second = client.get(f"/models?before={older.group(1)}").text
        assert [r[0] for r in table(second, "models-table")] == newest[100:]
        assert 'id="models-older"' not in second

        first = client.get("/data").text
        newest = [f"v{d.version}" for d in reversed(datasets)]
        assert [r[0] for r in table(first, "datasets-table")] == newest[:100]
        older = re.search(r'href="/data\?before=(\d+)" id="datasets-older"', first)
        assert older
        assert [r[0] for r in table(client.get(f"/data?before={older.group(1)}").text,
                                    "datasets-table")] == newest[100:]
    assert len(registry.latest_alias_moves(store, limit=1)) == 1


def test_lineage_of_a_long_retraining_chain_is_bounded(demo_copy: Path) -> None:
    """A loop builds each dataset on the last: 30 more versions in a chain, a model on the
    newest."""
    store = Store.for_project(demo_copy)
    t = store.tables
    with store.engine.begin() as conn:
        d = conn.execute(t.datasets.select().where(t.datasets.c.version == 2)).first()
        m = conn.execute(t.models.select().where(t.models.c.version == 2)).first()
        parent = 2
        for i in range(30):
            values = {k: v for k, v in d._mapping.items() if k != "version"}
            parent = conn.execute(t.datasets.insert().values(
                values | {"content_hash": f"{i:064x}", "parent": parent})
                .returning(t.datasets.c.version)).scalar_one()
        values = {k: v for k, v in m._mapping.items() if k != "version"}
        model = conn.execute(t.models.insert().values(values | {"dataset_version": parent})
                             .returning(t.models.c.version)).scalar_one()
    full = registry.model_lineage(store, model)
    view = registry.model_lineage_view(store, model, depth=20)
    assert len(full["datasets"]) == 32
    assert view["datasets"] == full["datasets"][:20] and view["more_datasets"]
    assert view["alias_moves"] == full["alias_moves"]
    with TestClient(create_ui(demo_copy, admin_token="")) as client:
        page = client.get(f"/models/{model}").text
        assert len(table(page, "model-lineage")) == 20
        assert "goes further back" in text(page, "lineage-more")
        page = client.get("/data/1").text
    derived = registry.dataset_lineage_view(store, 1, depth=20)
    assert [x["version"] for x in derived["derived_datasets"]] == [
        x["version"] for x in registry.dataset_lineage(store, 1)["derived_datasets"]][:20]
    assert derived["more_derived"]
    assert "later versions built from those" in page


def test_model_page_reads_only_the_keys_a_row_shows(demo_project: Path) -> None:
    store = Store.for_project(demo_project)
    page = registry.model_page(store, limit=1)
    newest = registry.list_models(store)[-1]
    assert page.models == [registry.model_row(newest)]
    assert page.before == newest.version and page.total == len(registry.list_models(store))
    with pytest.raises(ValueError, match="limit"):
        registry.model_page(store, limit=0)


# -- an empty project -------------------------------------------------------------------------


def test_pages_of_an_empty_project_say_what_to_do(tmp_path: Path, everloop) -> None:
    assert everloop("init", str(tmp_path / "fresh")).code == 0
    with TestClient(create_ui(tmp_path / "fresh", admin_token="")) as client:
        models = client.get("/models")
        assert models.status_code == 200
        assert "No model versions yet" in text(models.text, "models-empty")
        assert "everloop promote" in text(models.text, "alias-history")
        datasets = client.get("/data")
        assert datasets.status_code == 200
        assert "everloop ingest" in text(datasets.text, "datasets-empty")
        assert "No schema yet" in text(datasets.text, "schema")
        assert client.get("/models/1").status_code == 404
        assert client.get("/data/diff?a=1&b=2").status_code == 404


# -- a store with importances and quarantined rows, on SQLite and PostgreSQL -----------------


@pytest.fixture(params=["sqlite", "postgresql"])
def mixed(request: pytest.FixtureRequest, tmp_path: Path):
    """A project with a clean dataset v1, a dataset v2 whose 60 unlabelled rows were quarantined, a
    random forest (has feature_importances_) and a logistic regression (has none): (folder, store,
    rf, lr)."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    folder = write_project(tmp_path / "proj", rows=1500)
    spec = load_spec(folder)
    store = Store.for_project(folder, url)
    data.ingest(store, spec, base=folder)
    frame = pd.read_csv(folder / "data" / "customers.csv")
    frame.loc[frame.index[:60], "churned"] = None
    frame.to_csv(folder / "data" / "unlabelled.csv", index=False)
    data.ingest(store, spec, folder / "data" / "unlabelled.csv", mode="quarantine")

    def estimator(name: str, params: dict) -> object:
        model = spec.model.model_copy(update={"estimator": name, "params": params})
        return spec.model_copy(update={"model": model})

    rf = train.train(store, estimator("sklearn.ensemble.RandomForestClassifier",
                                      {"n_estimators": 15, "max_depth": 5})).version
    lr = train.train(store, estimator("sklearn.linear_model.LogisticRegression",
                                      {"max_iter": 300})).version
    yield folder, store, rf, lr
    store.close()


def test_importances_where_the_estimator_has_them(mixed) -> None:
    folder, store, rf, lr = mixed
    with TestClient(create_ui(folder, store=store, admin_token="")) as client:
        listed = table(client.get("/models").text, "models-table")
        newest = [f"v{m.version}" for m in reversed(registry.list_models(store))]
        assert [r[0] for r in listed] == newest

        importances = registry.feature_importances(store, rf)
        features = registry.get_model(store, rf).manifest["features"]
        # the one-hot columns' importances are summed back into their input column's
        assert importances and {name for name, _ in importances} <= set(features)
        assert sum(v for _, v in importances) == pytest.approx(1.0)
        page = client.get(f"/models/{rf}").text
        assert 'id="importances"' in page  # the bar chart
        assert table(page, "importances-table") == [[name, num(v)] for name, v in importances]

        page = client.get(f"/models/{lr}")
        assert page.status_code == 200
        none = text(page.text, "no-importances")
        assert "LogisticRegression records no feature importances" in none

        page = client.get(f"/models/compare?a={rf}&b={lr}").text
        assert 'id="compare-importances"' in page  # grouped bars, drawn for the model that has them
        assert "LogisticRegression) records no feature importances" in page
        params = {r[0]: r for r in table(page, "compare-params")}
        assert params["n_estimators"][1:] == ["15", "-"]
        assert params["max_iter"][1:] == ["-", "300"]
        assert 'data-differs="yes"><td>estimator' in page


def test_quarantined_rows_of_a_version(mixed) -> None:
    folder, store, _, _ = mixed
    d = data.get_dataset(store, 2)
    assert d.quarantined == 60
    expected = data.load_quarantine(store, d).head(50)
    assert data.quarantine_head(store, d).equals(expected)
    with TestClient(create_ui(folder, store=store, admin_token="")) as client:
        listed = table(client.get("/data").text, "datasets-table")
        assert [r[4] for r in listed] == ["60", "0"]
        page = client.get("/data/2").text
    assert text(page, "dataset-quarantined") == "60"
    rows = table(page, "quarantine")
    assert len(rows) == 50
    assert [r[0] for r in rows] == [str(n) for n in expected["_everloop_row"]]
    assert [r[1] for r in rows] == list(expected[data.QUARANTINE_REASON])
    anomalies = table(page, "anomalies")
    assert anomalies[0][:4] == ["quarantined", "churned", "missing_label", "60"]
    # example rows counted from 1, as the quarantined rows' numbers (the store keeps them from 0)
    assert anomalies[0][5] == ", ".join(str(n) for n in expected["_everloop_row"][:3])
    assert "The first 50 of 60 rows" in page


def test_dataset_page_query_leaves_out_the_statistics(demo_project: Path) -> None:
    store = Store.for_project(demo_project)
    page = data.dataset_page(store)
    assert all("stats" not in d for d in page.datasets)
    newest = [d.version for d in reversed(data.list_datasets(store))]
    assert [d["version"] for d in page.datasets] == newest
    with store.engine.connect() as conn:
        count = sa.select(sa.func.count()).select_from(store.tables.datasets)
        assert page.total == conn.execute(count).scalar()
