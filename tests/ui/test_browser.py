"""The dashboard in a real browser (issue 17, Must show): Debian's chromium driven by Playwright
against `everloop ui` processes over the demo scenario's store.

Every page opens without a JavaScript error or a request beyond the server's origin, and shows what
the Python API says (the production version, the drifted features in the heatmap, the loop's
promotion with its reason); a real mouse click on a heatmap cell opens that feature's distributions;
signed in with the admin token, a model page's promote form moves production (or says why the gate
refused); the read-only server shows no form that changes anything. A screenshot of every page is
saved (scripts/screenshots writes the README's two).

Never a browser download: chromium is /usr/bin/chromium (scripts/setup installs Debian's with apt).
Without it or Playwright the tests skip, except under CI=true, where they fail."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import httpx
import pytest

from everloop import data, loop, monitor, registry
from everloop.serve import free_port
from everloop.spec import load_spec
from everloop.store import Store
from everloop.ui._web import num
from tests.conftest import wait_for
from tests.ui.conftest import TOKEN

CHROMIUM = Path("/usr/bin/chromium")
CLI = "from everloop.cli import main; main()"
VIEWPORT = {"width": 1280, "height": 800}
ALL_DRAWN = ("() => [...document.querySelectorAll('div.chart[data-figure]')]"
             ".every(d => d.dataset.drawn === '1')")


def _missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install -e '.[dev]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no chromium at {CHROMIUM} (scripts/setup installs Debian's with apt)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless chromium for the module. A missing browser skips, but fails under CI=true."""
    why = _missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the dashboard's browser tests must run in CI: {why}")
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # every request but to 127.0.0.1 goes to a proxy where nothing listens: it fails, and is seen
        dead_proxy = {"server": f"http://127.0.0.1:{free_port()}", "bypass": "127.0.0.1"}
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox"], proxy=dead_proxy)
        yield chromium
        chromium.close()


# -- the dashboard's processes ---------------------------------------------------------------


@dataclass
class Dashboard:
    origin: str  # http://127.0.0.1:PORT
    folder: Path

    def production(self) -> int | None:
        store = Store.for_project(self.folder)
        try:
            return registry.alias_version(store, registry.PRODUCTION)
        finally:
            store.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def _dashboard(folder: Path, log: Path, token: str | None) -> Iterator[Dashboard]:
    """`everloop ui` over `folder` on a free loopback port, with `token` as its admin token (None:
    read-only), stopped on leaving."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVERLOOP_")}
    if token:
        env["EVERLOOP_ADMIN_TOKEN"] = token
    command = [sys.executable, "-c", CLI, "ui", "--port", str(port), "-p", str(folder)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        origin = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: process.poll() is not None or _answers(origin + "/"),
                     "the dashboard answering", timeout=60)
            assert process.poll() is None, log.read_text()
            yield Dashboard(origin, folder)
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def reader_server(demo_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    """The dashboard over the demo store, read-only (no admin token)."""
    with _dashboard(demo_project, tmp_path_factory.mktemp("ui-reader") / "ui.log", None) as server:
        yield server


@pytest.fixture(scope="module")
def admin_server(demo_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    """The dashboard with an admin token over a copy of the demo store, which also holds v3:
    production's artifact again (a candidate the gate passes)."""
    folder = Path(shutil.copytree(demo_project, tmp_path_factory.mktemp("ui-admin") / "demo"))
    store = Store.for_project(folder)
    try:
        assert _copy_of(store, registry.alias_version(store, registry.PRODUCTION)) == 3
    finally:
        store.close()
    with _dashboard(folder, folder.parent / "ui.log", TOKEN) as server:
        yield server


def _copy_of(store: Store, version: int) -> int:
    """A new model version holding `version`'s artifact again; returns its version."""
    t = store.tables.models
    with store.engine.begin() as conn:
        row = conn.execute(t.select().where(t.c.version == version)).first()
        insert = t.insert().values(dataset_version=row.dataset_version, artifact=row.artifact,
                                   manifest=row.manifest, metric=row.metric, value=row.value,
                                   reason=f"a copy of v{version}")
        return conn.execute(insert.returning(t.c.version)).scalar_one()


# -- a browser tab that records what must not happen -----------------------------------------


@dataclass
class Tab:
    """A page in a browser context of its own that records the JavaScript errors (uncaught
    exceptions and console errors, failed resource loads included) and every request to anywhere
    but the dashboard's origin (which the browser sends to a dead proxy: nothing leaves)."""

    page: Any
    origin: str
    errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    checked: int = 0  # errors already looked at by `clean`

    def open(self, path: str) -> Any:
        """Go to `path` (it must answer 200), wait until it loaded and every chart on it is drawn."""
        response = self.page.goto(self.origin + path)
        assert response is not None and response.status == 200, f"{path}: {response and response.status}"
        self.settle()
        return self.page

    def settle(self) -> None:
        """Wait until every chart of the page is drawn (the page has loaded: goto and
        expect_navigation wait for its load event)."""
        self.page.wait_for_function(ALL_DRAWN)

    def new_errors(self) -> list[str]:
        errors, self.checked = self.errors[self.checked:], len(self.errors)
        return errors

    def clean(self) -> None:
        """No error since the last look (one that came after the previous page was checked, such as
        a resource the browser fetched once that page had loaded, is reported here) and no request
        beyond the origin."""
        errors = self.new_errors()
        assert errors == [], f"JavaScript errors: {errors}"
        assert self.foreign == [], f"requests beyond {self.origin}: {self.foreign}"


@contextlib.contextmanager
def _tab(browser: Any, origin: str) -> Iterator[Tab]:
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(60_000)  # a page's waits, on 2 busy cores
    tab = Tab(context.new_page(), origin)

    def request(r: Any) -> None:
        if r.url != origin and not r.url.startswith(origin + "/"):
            tab.foreign.append(r.url)

    def console(m: Any) -> None:
        if m.type == "error":
            tab.errors.append(f"on {tab.page.url}: {m.text} ({m.location.get('url')})")

    context.on("request", request)
    tab.page.on("console", console)
    tab.page.on("pageerror", lambda e: tab.errors.append(f"on {tab.page.url}: uncaught {e}"))
    try:
        yield tab
    finally:
        context.close()


@pytest.fixture(scope="module")
def reader(browser: Any, reader_server: Dashboard) -> Iterator[Tab]:
    with _tab(browser, reader_server.origin) as tab:
        yield tab


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


# -- what the Python API says ----------------------------------------------------------------


@pytest.fixture(scope="module")
def facts(demo_project: Path) -> dict[str, Any]:
    """The values the pages must show, read through everloop's Python API."""
    store = Store.for_project(demo_project)
    try:
        runs = monitor.list_runs(store, limit=50)  # the windows the Monitoring page shows
        ids = [r["run_id"] for r in monitor.recent_windows(store, 50).runs]
        shifted = next(i for i, r in enumerate(runs) if any(c.get("drifted") for c in _columns(r)))
        drifted = [c["column"] for c in _columns(runs[shifted]) if c.get("drifted")]
        stored = monitor.window_result(store, ids[shifted])["distributions"]
        return {"project": load_spec(demo_project).name, "models": registry.list_models(store),
                "production": registry.alias_version(store, registry.PRODUCTION),
                "datasets": data.list_datasets(store), "runs": runs, "shifted": shifted,
                "shifted_id": ids[shifted], "drifted": drifted,
                "clickable": sorted(name for name in drifted if name in stored),
                "promoted": [e for e in loop.audit_trail(store) if e["action"] == "promoted"]}
    finally:
        store.close()


def _columns(run: dict[str, Any]) -> list[dict[str, Any]]:
    return run["drift"]["columns"]


def _pages(f: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    """name -> (path, its <h1>, its <title> up to " · everloop · <project>"), every page."""
    production, first = f["production"], f["models"][0].version
    older, newest = f["datasets"][0].version, f["datasets"][-1].version
    return {
        "overview": ("/", "Overview", "Overview"),
        "models": ("/models", "Models", "Models"),
        "model": (f"/models/{production}", f"Model v{production} production", f"Model v{production}"),
        "compare": (f"/models/compare?a={first}&b={production}",
                    f"Model v{first} and v{production} side by side", f"Compare v{first} and v{production}"),
        "data": ("/data", "Data", "Data"),
        "dataset": (f"/data/{newest}", f"Dataset v{newest}", f"Dataset v{newest}"),
        "diff": (f"/data/diff?a={older}&b={newest}", f"Dataset v{older} → v{newest}",
                 f"Diff v{older} and v{newest}"),
        "monitoring": ("/monitoring", "Monitoring", "Monitoring"),
        "loop": ("/loop", "Loop", "Loop"),
    }


PAGES = ["overview", "models", "model", "compare", "data", "dataset", "diff", "monitoring", "loop"]


# -- the read-only dashboard -----------------------------------------------------------------


@pytest.mark.parametrize("name", PAGES)
def test_every_page_opens_cleanly_and_is_saved_as_a_screenshot(reader: Tab, facts: dict[str, Any],
                                                                shots: Path, name: str):
    path, heading, title = _pages(facts)[name]
    page = reader.open(path)
    assert page.locator("h1").inner_text() == heading
    assert page.title() == f"{title} · everloop · {facts['project']}"
    assert page.locator("header nav a.active").count() == 1
    # read-only: no form that changes anything (the GET forms, compare and filter, stay)
    assert page.locator("header .who").inner_text() == "read-only"
    assert page.locator("form[method=post]").count() == 0
    assert page.locator("#promote-form, #rollback-form").count() == 0
    page.screenshot(path=shots / f"{name}.png", full_page=True)
    assert (shots / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reader.clean()


def test_the_overview_shows_the_production_version_the_registry_has(reader: Tab, facts: dict[str, Any]):
    page = reader.open("/")
    production = facts["production"]
    shown = page.locator("#production-version")
    assert shown.get_attribute("data-version") == str(production)
    assert shown.inner_text() == f"v{production}"
    model = next(m for m in facts["models"] if m.version == production)
    assert page.locator("#production-metric").inner_text() == num(model.value)
    with page.expect_navigation():
        shown.click()  # it links to that model's page
    reader.settle()
    assert page.url == f"{reader.origin}/models/{production}"
    assert page.locator("#model-value").inner_text() == num(model.value)
    reader.clean()


def test_the_heatmap_names_the_features_the_shifted_window_drifted_on(reader: Tab, facts: dict[str, Any]):
    page = reader.open("/monitoring")
    heatmap = page.locator("#drift-heatmap")
    assert heatmap.get_attribute("data-drawn") == "1" and heatmap.locator(".main-svg").count() >= 1
    ticks = heatmap.locator(".yaxislayer-above text").all_text_contents()
    assert facts["drifted"] and set(facts["drifted"]) <= set(ticks), (facts["drifted"], ticks)
    # a row per feature the monitor measured; the drifted ones marked in the shifted window's column
    assert set(ticks) == {c["column"] for run in facts["runs"] for c in _columns(run)}
    marks = page.evaluate("() => document.getElementById('drift-heatmap').data"
                          ".filter(t => t.type === 'scatter').map(t => ({x: t.x, y: t.y}))")
    assert len(marks) == 1 and set(marks[0]["x"]) == {facts["shifted"] + 1}
    assert sorted(marks[0]["y"]) == sorted(facts["drifted"])
    reader.clean()


def test_the_loop_page_shows_the_promotion_with_its_reason_and_evidence(reader: Tab, facts: dict[str, Any]):
    assert len(facts["promoted"]) == 1  # the demo's retraining
    decision = facts["promoted"][0]
    page = reader.open("/loop")
    row = page.locator(f"#decision-{decision['id']}")
    assert row.get_attribute("data-action") == "promoted"
    assert row.locator("td.action").inner_text() == "promoted"
    assert row.locator("td.reason").inner_text() == decision["reason"]
    assert row.locator("td.triggers").inner_text() == ", ".join(decision["evidence"]["triggers"])
    gate = row.locator(f"#decision-{decision['id']}-gate")
    assert not gate.is_visible()  # the evidence is folded until asked for
    row.locator("td.evidence > details > summary").click()
    assert gate.is_visible()
    comparison = decision["evidence"]["gate"]["evidence"]["comparison"]
    assert gate.locator("td.gate-candidate").inner_text() == num(comparison["candidate"])
    assert gate.locator("td.gate-production").inner_text() == num(comparison["production"])
    reader.clean()


def test_clicking_a_heatmap_cell_opens_that_features_distributions(reader: Tab, facts: dict[str, Any]):
    feature = facts["clickable"][0]  # drifted in the shifted window, its distributions stored
    page = reader.open("/monitoring")
    heatmap = page.locator("#drift-heatmap")
    heatmap.scroll_into_view_if_needed()
    # the cell's centre on screen, from the plot area's box and the axes' ranges plotly settled on
    # (the y axis is the features, a category axis drawn reversed: the first one on top)
    axes = page.evaluate("() => { const d = document.getElementById('drift-heatmap'); return "
                         "{x: d.layout.xaxis.range, y: d.layout.yaxis.range, rows: d.data[0].y}; }")
    area = heatmap.locator(".draglayer .xy .nsewdrag").bounding_box()
    (left, right), (bottom, top) = axes["x"], axes["y"]
    column, row = facts["shifted"] + 1, axes["rows"].index(feature)
    x = area["x"] + (column - left) / (right - left) * area["width"]
    y = area["y"] + (top - row) / (top - bottom) * area["height"]
    with page.expect_navigation():
        page.mouse.click(x, y)
    reader.settle()
    window = f"/monitoring/window/{facts['shifted_id']}?feature={quote(feature)}"
    assert page.url == reader.origin + window
    assert page.locator("h1").inner_text().startswith(f"{feature} in window ")
    figure = page.locator("#feature-distribution")
    assert figure.get_attribute("data-drawn") == "1" and figure.locator(".main-svg").count() >= 1
    assert page.locator("#test-drifted").inner_text().startswith("yes")
    reader.clean()


# -- signed in with the admin token ----------------------------------------------------------


@pytest.fixture(scope="module")
def admin(browser: Any, admin_server: Dashboard) -> Iterator[Tab]:
    """A tab signed in through the login form."""
    with _tab(browser, admin_server.origin) as tab:
        page = tab.open("/")
        assert page.locator("form[method=post]").count() == 0  # not signed in yet
        page.locator("header a[href='/login']").click()
        page.locator("input[name=token]").fill(TOKEN)
        with page.expect_navigation():
            page.locator("form[action='/login'] button").click()
        tab.settle()
        assert page.url == admin_server.origin + "/"
        assert page.locator("header .who button").inner_text() == "sign out"
        tab.clean()
        yield tab


def test_signed_in_a_model_pages_promote_form_moves_production(admin: Tab, admin_server: Dashboard):
    page = admin.open("/models/3")
    form = page.locator("#promote-form")
    assert form.is_visible() and page.locator("#promote-note").count() == 0
    form.locator("input[name=reason]").fill("same model, checked in the browser")
    with page.expect_navigation():
        form.locator("button").click()
    admin.settle()
    assert page.url == f"{admin_server.origin}/?done=promoted"
    assert page.locator("#message").inner_text() == "Promoted: production is model v3."
    assert page.locator("#production-version").get_attribute("data-version") == "3"
    assert admin_server.production() == 3
    store = Store.for_project(admin_server.folder)
    try:
        moved = registry.alias_history(store)[-1]
    finally:
        store.close()
    assert (moved["to_version"], moved["actor"], moved["reason"]) == (
        3, "dashboard", "same model, checked in the browser")
    page = admin.open("/models/3")
    assert page.locator("#promote-form").count() == 0
    assert page.locator("#promote-note").inner_text() == "v3 is in production."
    admin.clean()


def test_signed_in_a_promotion_the_gate_refuses_says_why_and_changes_nothing(admin: Tab,
                                                                             admin_server: Dashboard):
    before = admin_server.production()
    store = Store.for_project(admin_server.folder)
    try:
        refusal = registry.check_gate(store, load_spec(admin_server.folder), 1)
    finally:
        store.close()
    assert not refusal.passed  # v1, trained before the shift, loses to production
    page = admin.open("/models/1")
    with page.expect_navigation() as answer:
        page.locator("#promote-form button").click()
    admin.settle()
    assert answer.value.status == 409
    assert page.locator("#error").text_content() == "model v1 was not promoted:" + "".join(
        f"\n  - {reason}" for reason in refusal.reasons)
    assert admin_server.production() == before
    # the browser logs the 409 it was answered, and nothing else
    action = f"{admin.origin}/actions/promote"
    assert admin.new_errors() == [f"on {action}: Failed to load resource: the server responded with a "
                                  f"status of 409 (Conflict) ({action})"]
    admin.clean()
