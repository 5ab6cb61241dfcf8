"""Dashboard benchmark: how fast every page of `everloop ui` answers on a big store.

DESIGN.md's bar: every page within 300 ms on a store of 100 model versions, 1,000 monitoring windows
and 10M logged predictions, on SQLite and on PostgreSQL. The stores come from bench/ui_store.py
(built here first when missing or of another recipe; reused otherwise).

A store's history ends when it was built; before timing, its timestamps are shifted so that it ends
now (`ui_store.redate`; --no-redate to skip), so pages that read the last minutes or hours of
service stats see a live service on a store built days ago.

For each database in turn: `everloop ui --project P --host 127.0.0.1 --port N` (read-only: no admin
token; metadata in EVERLOOP_DB_URL for PostgreSQL) is started in a process group of its own, waited
for, and its pages fetched with httpx from this process, one request at a time:

    overview   /                               models    /models
    model      /models/{production}            compare   /models/compare?a={previous}&b={production}
    data       /data                           dataset   /data/{latest}
    diff       /data/diff?a={latest-1}&b={latest}
    monitoring /monitoring                     window    /monitoring/window/{latest drifted}?feature={drifted}
    loop       /loop

The parameters are read from the store (production and the version it replaced, the latest two
dataset versions, the latest window with drift and one of its drifted features). A page whose route
does not exist (FastAPI's own 404) is reported as missing and not timed; any other answer but 200 is
reported with its status and not timed. Each page is fetched `--warmup` times, then `--runs` times in
rounds (every page once per round, so a burst of load on the machine hits every page alike); the
median and p95 of the wall time to the whole body are printed with the bar's verdict (p95 <= 300 ms),
and the server's mean CPU time per request (its process tree's user + system time from /proc, read
around each request): on a busy machine the wall time is inflated by waiting for a core, the CPU time
much less (PostgreSQL's own CPU is not in it).

Where a page misses the bar, it is profiled in-process (`create_ui` over the same store, one request
through Starlette's TestClient): time in SQL (every statement with its duration, the everloop
function that issued it, and the database's plan for the slowest: EXPLAIN QUERY PLAN on SQLite,
EXPLAIN ANALYZE on PostgreSQL) and the Python functions with the most cumulative time (cProfile).

Peer: MLflow's tracking server (mlflow 3.17.2 in bench/.venvs/mlflow, as bench/serve.py installs it;
SQLite backend; one uvicorn worker) with one registered model of 100 versions, each from a run with
metrics and parameters. Timed, the same way: the REST calls its UI makes for the registered models
list (registered-models/search) and for the model's page (registered-models/get + model-versions/
search, the versions table). The ratio printed is MLflow's model page (the sum of its two calls'
medians) over everloop's /models median. Skipped, saying why, when it does not install or start.

Run:
    .venv/bin/python bench/ui.py                      # both databases, 20 runs a page (builds the stores first if needed)
    .venv/bin/python bench/ui.py --backend sqlite --runs 5 --no-mlflow
    .venv/bin/python bench/ui.py --quick              # against the --quick stores of ui_store.py

The last line printed is one JSON object: per database and page its status, median and p95 (ms),
the pages within the bar, the missing ones, MLflow's timings and the models-page ratio.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _peers  # noqa: E402
import ui_store  # noqa: E402

BAR_MS = 300.0
PAGES = ["overview", "models", "model", "compare", "data", "dataset", "diff", "monitoring", "window", "loop"]
MLFLOW_VERSION = "3.17.2"


def say(text: str = "") -> None:
    print(text, flush=True)


# -- the page addresses, from the store ---------------------------------------------------------------


def page_paths(target: ui_store.Target) -> dict[str, str]:
    """Each page's path, with parameters taken from the store (bounded reads only)."""
    url = target.db_url or f"sqlite:///{target.project / '.everloop' / 'meta.db'}"
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        production = conn.execute(sa.text("SELECT version FROM aliases WHERE name = 'production'")).scalar()
        previous = conn.execute(sa.text(
            "SELECT from_version FROM alias_history WHERE alias = 'production' AND from_version IS NOT NULL "
            "AND from_version <> to_version ORDER BY id DESC LIMIT 1")).scalar()
        newest = conn.execute(sa.text("SELECT max(version) FROM models")).scalar()
        datasets = [v for (v,) in conn.execute(sa.text("SELECT version FROM datasets ORDER BY version DESC LIMIT 2"))]
        window, feature = None, None
        for run_id, result in conn.execute(sa.text("SELECT id, result FROM monitor_runs ORDER BY id DESC LIMIT 100")):
            result = json.loads(result) if isinstance(result, str) else result
            drifted = (result.get("drift") or {}).get("drifted") or []
            if window is None:
                columns = (result.get("drift") or {}).get("columns") or [{}]
                window, feature = run_id, columns[0].get("column", "age")
            if drifted:
                window, feature = run_id, drifted[0]
                break
    engine.dispose()
    production = production or newest or 1
    other = previous if previous not in (None, production) else (newest if newest != production else 1)
    latest = datasets[0] if datasets else 1
    earlier = datasets[1] if len(datasets) > 1 else latest
    return {"overview": "/", "models": "/models", "model": f"/models/{production}",
            "compare": f"/models/compare?a={other}&b={production}", "data": "/data", "dataset": f"/data/{latest}",
            "diff": f"/data/diff?a={earlier}&b={latest}", "monitoring": "/monitoring",
            "window": f"/monitoring/window/{window or 1}?feature={feature or 'age'}", "loop": "/loop"}


# -- a server in a process group of its own -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A child server started in its own process group (stopped as a group: its workers too)."""

    name: str
    command: list[str]
    env: dict[str, str]
    port: int
    log: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_path: str, timeout: float = 180.0) -> float:
        """Start and wait until `ready_path` answers (any HTTP status); returns the seconds it took."""
        started = time.perf_counter()
        handle = open(self.log, "wb")
        self.process = subprocess.Popen(self.command, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        handle.close()
        while time.perf_counter() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.tail()}")
            try:
                httpx.get(self.url + ready_path, timeout=2.0)
                return time.perf_counter() - started
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer {ready_path} within {timeout:.0f} s: {self.tail()}")

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)  # the group this script created for it, nothing else
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def app_factory() -> Any:
    """The dashboard app for uvicorn --factory, when `everloop ui` is not there: the project from
    $UI_BENCH_PROJECT, the store from it (and EVERLOOP_DB_URL), read-only."""
    from everloop.ui import create_ui

    return create_ui(os.environ["UI_BENCH_PROJECT"], admin_token="")


def everloop_server(target: ui_store.Target, logs: Path) -> Server:
    env = {k: v for k, v in os.environ.items() if k not in ("EVERLOOP_DB_URL", "EVERLOOP_ADMIN_TOKEN")}
    if target.db_url:
        env["EVERLOOP_DB_URL"] = target.db_url
    env["UI_BENCH_NO_TOKEN"] = ""  # an empty variable as the admin token's: read-only
    port = free_port()
    bin_dir = Path(sys.executable).parent
    everloop = bin_dir / "everloop"
    has_ui = everloop.exists() and subprocess.run([str(everloop), "ui", "--help"], capture_output=True,
                                                  env=env, check=False).returncode == 0
    if has_ui:
        command = [str(everloop), "ui", "--project", str(target.project), "--host", "127.0.0.1", "--port", str(port),
                   "--admin-token-env", "UI_BENCH_NO_TOKEN"]
    else:  # the command has not landed: the same app through uvicorn
        env["UI_BENCH_PROJECT"] = str(target.project)
        command = [sys.executable, "-m", "uvicorn", "--factory", "ui:app_factory", "--app-dir", str(HERE),
                   "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    return Server(f"everloop ui ({target.name})", command, env, port, logs / f"everloop-ui-{target.name}.log")


# -- timing --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    path: str
    status: str = "ok"  # ok | missing | "HTTP <code>" | "error: ..."
    ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # the server's CPU per request (its process tree)
    kb: float = 0.0
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.ms) if self.ms else None

    @property
    def p95(self) -> float | None:
        if not self.ms:
            return None
        ordered = sorted(self.ms)
        return ordered[min(len(ordered) - 1, int(round(0.95 * len(ordered) + 0.5)) - 1)]  # nearest rank

    @property
    def cpu(self) -> float | None:
        """Mean server CPU ms per request: each reading is in whole clock ticks (10 ms), the mean of many is not."""
        return statistics.fmean(self.cpu_ms) if self.cpu_ms else None

    @property
    def within(self) -> bool | None:
        return None if self.p95 is None else self.p95 <= BAR_MS

    def to_dict(self) -> dict[str, Any]:
        out = {"path": self.path, "status": self.status}
        if self.ms:
            out |= {"median_ms": round(self.median, 1), "p95_ms": round(self.p95, 1), "runs": len(self.ms),
                    "kb": round(self.kb, 1), "within_bar": self.within}
        if self.cpu_ms:
            out["server_cpu_ms"] = round(self.cpu, 1)
        if self.note:
            out["note"] = self.note
        return out


def _missing_route(response: httpx.Response) -> bool:
    """FastAPI's own answer for a path no route matches (a page's own 404 for a bad parameter is HTML)."""
    return response.status_code == 404 and response.headers.get("content-type", "").startswith("application/json")


def _title(text: str) -> str:
    found = re.search(r"<h1[^>]*>(.*?)</h1>", text, re.S) or re.search(r"<title>(.*?)</title>", text, re.S)
    return re.sub(r"<[^>]+>|\s+", " ", found.group(1)).strip()[:160] if found else text[:160]


CLOCK_TICK = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system, seconds) of `pid` and its descendants alive now; None without a pid."""
    if pid is None:
        return None
    total = 0.0
    for p in _peers._tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) * CLOCK_TICK
        except (OSError, IndexError, ValueError):
            continue
    return total


def time_pages(base: str, paths: dict[str, str], runs: int, warmup: int, pid: int | None = None) -> dict[str, Timing]:
    """Every page: a first look (status), `warmup` more requests, then `runs` rounds over the pages. With
    `pid` (the server's), also the server's CPU time per request: what a busy machine does not inflate."""
    out: dict[str, Timing] = {}
    with httpx.Client(base_url=base, timeout=120.0, follow_redirects=False) as client:
        for name, path in paths.items():
            timing = Timing(path)
            try:
                response = client.get(path)
            except httpx.HTTPError as exc:
                timing.status = f"error: {exc.__class__.__name__}: {exc}"
                out[name] = timing
                continue
            if _missing_route(response):
                timing.status = "missing"
            elif response.status_code != 200:
                timing.status = f"HTTP {response.status_code}"
                timing.note = _title(response.text)
            else:
                timing.kb = len(response.content) / 1024
                for _ in range(max(0, warmup - 1)):
                    client.get(path)
            out[name] = timing
        timed = [name for name, t in out.items() if t.status == "ok"]
        for _ in range(runs):
            for name in timed:
                cpu = cpu_seconds(pid)
                started = time.perf_counter()
                response = client.get(out[name].path)
                _ = response.content
                out[name].ms.append((time.perf_counter() - started) * 1000)
                if cpu is not None:
                    out[name].cpu_ms.append((cpu_seconds(pid) - cpu) * 1000)
                if response.status_code != 200:
                    out[name].note = f"a timed request answered {response.status_code}"
    return out


# -- profiling a slow page in-process -------------------------------------------------------------------


def _issuer() -> str:
    """The innermost everloop function (outside the store's engine plumbing) on the stack: who ran the SQL."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/everloop/" in frame.filename and "/store/_meta" not in frame.filename:
            return f"{frame.filename.split('/everloop/')[-1]}:{frame.lineno} {frame.name}"
    return "?"


def profile_page(target: ui_store.Target, path: str, top: int = 6) -> dict[str, Any]:
    """`path` in-process, after one warm-up request: the fastest of 3 requests with every SQL statement
    recorded (its duration, the everloop function that issued it; the slowest one's plan), then one under cProfile
    (the functions with the most cumulative time; the profiler slows Python several times over)."""
    import fastapi.routing
    from fastapi.testclient import TestClient

    from everloop.store import Store
    from everloop.ui import create_ui

    store = Store.for_project(target.project, target.db_url)
    app = create_ui(target.project, store=store, admin_token="")
    statements: list[dict[str, Any]] = []
    pending: dict[int, tuple[float, str]] = {}

    def before(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        pending[id(cursor)] = (time.perf_counter(), _issuer())

    def after(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        started, issuer = pending.pop(id(cursor), (time.perf_counter(), "?"))
        statements.append({"ms": (time.perf_counter() - started) * 1000, "sql": " ".join(statement.split()),
                           "params": parameters, "many": executemany, "issuer": issuer,
                           "rows": cursor.rowcount})

    profiler = cProfile.Profile()
    original = fastapi.routing.run_in_threadpool

    async def profiled(func: Any, *args: Any, **kwargs: Any) -> Any:
        # page functions are plain `def`: FastAPI runs them (and the template rendering in them) in its
        # thread pool, where a profiler enabled in this thread would not see them
        def run(*a: Any, **k: Any) -> Any:
            profiler.enable()
            try:
                return func(*a, **k)
            finally:
                profiler.disable()

        return await original(run, *args, **kwargs)

    with TestClient(app) as client:
        client.get(path)  # warm: templates compiled, connections open
        sa.event.listen(store.engine, "before_cursor_execute", before)
        sa.event.listen(store.engine, "after_cursor_execute", after)
        total = float("inf")
        try:
            for _ in range(3):  # the fastest of 3 (a busy machine stretches some), its statements kept
                recorded = len(statements)
                started = time.perf_counter()
                response = client.get(path)
                took = (time.perf_counter() - started) * 1000
                if took < total:
                    total = took
                    del statements[:recorded]
                else:
                    del statements[recorded:]
        finally:
            sa.event.remove(store.engine, "before_cursor_execute", before)
            sa.event.remove(store.engine, "after_cursor_execute", after)
        fastapi.routing.run_in_threadpool = profiled  # a second request, under cProfile
        try:
            started = time.perf_counter()
            client.get(path)
            profiled_total = (time.perf_counter() - started) * 1000
        finally:
            fastapi.routing.run_in_threadpool = original
    sql_ms = sum(s["ms"] for s in statements)
    slowest = sorted(statements, key=lambda s: -s["ms"])[:top]
    plan = _plan(store, slowest[0]) if slowest and not slowest[0]["many"] else None
    stats = pstats.Stats(profiler)
    ours, theirs = [], []
    for (filename, line, name), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{filename.split('site-packages/')[-1].split('/src/')[-1]}:{line} {name}"
        if "/everloop/" in filename and "/templates/" not in filename:
            ours.append((cumulative * 1000, where))
        elif any(k in filename for k in ("jinja2", "plotly", "json", "sqlalchemy", "orjson", "/templates/")):
            theirs.append((cumulative * 1000, where))
    ours.sort(reverse=True)
    theirs.sort(reverse=True)
    functions = ours[:14] + theirs[:6]
    store.close()
    return {"path": path, "status": response.status_code, "total_ms": round(total, 1), "sql_ms": round(sql_ms, 1),
            "profiled_ms": round(profiled_total, 1),
            "statements": len(statements), "kb": round(len(response.content) / 1024, 1),
            "slowest": [{"ms": round(s["ms"], 1), "issuer": s["issuer"], "sql": s["sql"][:300]} for s in slowest],
            "plan": plan, "functions": [{"ms": round(ms, 1), "where": where} for ms, where in functions]}


def _plan(store: Any, statement: dict[str, Any]) -> list[str] | None:
    """The database's plan for a recorded statement (SELECTs only)."""
    sql = statement["sql"]
    if not sql.lstrip().upper().startswith(("SELECT", "WITH")):
        return None
    prefix = "EXPLAIN (ANALYZE, BUFFERS) " if store.engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN "
    try:
        with store.engine.connect() as conn:
            rows = conn.exec_driver_sql(prefix + sql, statement["params"] or ()).all()
    except Exception as exc:  # a plan is a help, not a result
        return [f"(no plan: {exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})"]
    return [" | ".join(str(c) for c in row) for row in rows][:25]


# -- MLflow's tracking server ---------------------------------------------------------------------------


MLFLOW_FILL = r"""
import json, sys, time
from mlflow.tracking import MlflowClient
url, versions = sys.argv[1], int(sys.argv[2])
client = MlflowClient(tracking_uri=url, registry_uri=url)
experiment = client.create_experiment("churn")
client.create_registered_model("churn", description="customer churn (the everloop demo's model)")
started = time.perf_counter()
for n in range(1, versions + 1):
    run = client.create_run(experiment, tags={"mlflow.runName": f"retrain-{n}", "trigger": "drift"})
    rid = run.info.run_id
    from mlflow.entities import Metric, Param, RunTag
    now = int(time.time() * 1000)
    auc = 0.78 + 0.02 * ((n * 7919) % 100) / 100
    metrics = [Metric(k, v, now, 0) for k, v in (("roc_auc", auc), ("accuracy", 0.72 + auc / 10),
               ("log_loss", 0.5 - auc / 10), ("baseline_roc_auc", 0.5), ("train_rows", 8000.0 + n),
               ("eval_rows", 2000.0))]
    params = [Param(k, str(v)) for k, v in (("estimator", "HistGradientBoostingClassifier"), ("max_iter", 200),
              ("learning_rate", 0.05), ("seed", 42), ("dataset_version", n // 2 + 1), ("features", 15))]
    client.log_batch(rid, metrics=metrics, params=params, tags=[RunTag("reason", f"loop retrain {n}")])
    client.set_terminated(rid)
    mv = client.create_model_version("churn", source=f"mlflow-artifacts:/{experiment}/{rid}/artifacts/model",
                                     run_id=rid, description=f"retrained after drift ({n})",
                                     tags={"dataset_version": str(n // 2 + 1), "validation": "passed"})
    if n % 2 == 0:
        client.set_registered_model_alias("churn", "production", mv.version)
client.set_registered_model_alias("churn", "candidate", versions)
print(json.dumps({"versions": versions, "seconds": round(time.perf_counter() - started, 1)}))
"""

# The REST calls MLflow's UI (3.17's JS bundle) makes: the registered models list, and one model's page
# (ModelPage: registered-models/get, and model-versions/search for `name='churn'` with its page size,
# 25 by default).
MLFLOW_CALLS = {
    "list": "/ajax-api/2.0/mlflow/registered-models/search?max_results=25&order_by=name%20ASC",
    "model_get": "/ajax-api/2.0/mlflow/registered-models/get?name=churn",
    "model_versions": "/ajax-api/2.0/mlflow/model-versions/search?filter=name%3D%27churn%27&max_results=25",
}


def mlflow_peer(logs: Path, runs: int, warmup: int, versions: int = 100) -> dict[str, Any]:
    """MLflow's tracking server with `versions` model versions; its UI's REST calls timed. Returns
    {"skipped": why} when it cannot be installed or started."""
    import sklearn

    sk = sklearn.__version__
    try:  # the venv bench/serve.py uses for its MLflow peer (the same packages, so one install serves both)
        python, install_s = _peers.ensure_venv(
            "mlflow", [f"mlflow=={MLFLOW_VERSION}", "pandas<3", "uvicorn[standard]", f"scikit-learn=={sk}"],
            f"import mlflow, sklearn, uvloop, httptools; assert sklearn.__version__ == {sk!r}")
    except (subprocess.CalledProcessError, OSError) as exc:
        return {"skipped": f"mlflow {MLFLOW_VERSION} did not install into {_peers.VENVS / 'mlflow'}: {exc}"}
    work = Path(tempfile.mkdtemp(prefix="ui-bench-mlflow-"))
    port = free_port()
    mlflow_bin = str(Path(python).parent / "mlflow")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    server = Server("mlflow server", [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                                      "--artifacts-destination", str(work / "artifacts"), "--host", "127.0.0.1",
                                      "--port", str(port), "--workers", "1"], env, port, logs / "mlflow-server.log")
    try:
        ready = server.start("/health", timeout=240)
        filled = subprocess.run([str(python), "-c", MLFLOW_FILL, server.url, str(versions)], capture_output=True,
                                text=True, env=env, check=False, timeout=900)
        if filled.returncode != 0:
            return {"skipped": f"registering {versions} model versions failed: {filled.stderr.strip()[-800:]}"}
        version = subprocess.run([str(python), "-c", "import mlflow; print(mlflow.__version__)"], capture_output=True,
                                 text=True, check=False).stdout.strip()
        timings = time_pages(server.url, MLFLOW_CALLS, runs, warmup, server.process.pid)
        for name, t in timings.items():
            if t.status == "ok":
                found = httpx.get(server.url + t.path, timeout=60).json()
                count = len(found.get("model_versions") or found.get("registered_models") or
                            ([found["registered_model"]] if "registered_model" in found else []))
                t.note = f"{count} item(s) answered"
        return {"version": version, "install_s": round(install_s, 1), "ready_s": round(ready, 1),
                "fill": json.loads(filled.stdout.strip().splitlines()[-1]),
                "calls": {name: t.to_dict() for name, t in timings.items()}, "_timings": timings}
    except (RuntimeError, subprocess.TimeoutExpired, httpx.HTTPError) as exc:
        return {"skipped": f"mlflow server: {exc}"}
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


# -- output --------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def table(title: str, timings: dict[str, Timing]) -> None:
    say(f"\n### {title}\n")
    say("| page | path | status | median ms | p95 ms | server CPU ms | KB | within 300 ms |")
    say("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    for name, t in timings.items():
        verdict = {True: "yes", False: "**no**", None: "-"}[t.within]
        status = t.status + (f" ({t.note})" if t.note else "")
        say(f"| {name} | `{t.path}` | {status} | {_ms(t.median)} | {_ms(t.p95)} | {_ms(t.cpu)} | {t.kb:,.0f} | "
            f"{verdict} |")


def show_profile(name: str, found: dict[str, Any]) -> None:
    say(f"\n#### {name}: `{found['path']}` (in-process: the fastest of 3 requests after a warm-up)\n")
    say(f"total {found['total_ms']:,.1f} ms, of which SQL {found['sql_ms']:,.1f} ms in {found['statements']} "
        f"statements; HTML {found['kb']:,.0f} KB; status {found['status']}")
    say("slowest statements:")
    for s in found["slowest"]:
        say(f"  {s['ms']:8.1f} ms  {s['issuer']}\n             {s['sql'][:240]}")
    if found.get("plan"):
        say("plan of the slowest:")
        for line in found["plan"]:
            say(f"  {line}")
    say(f"Python, cumulative ms under cProfile (a second request: {found['profiled_ms']:,.0f} ms with the profiler's "
        "overhead; the shares are what counts): everloop's functions, then the libraries'")
    for f in found["functions"]:
        say(f"  {f['ms']:8.1f}  {f['where']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ui_store.add_arguments(parser)
    parser.add_argument("--runs", type=int, default=20, help="timed requests per page (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="requests per page before timing (default 3)")
    parser.add_argument("--no-build", action="store_true", help="do not build missing stores: fail instead")
    parser.add_argument("--no-mlflow", action="store_true", help="skip the MLflow peer")
    parser.add_argument("--no-redate", action="store_true",
                        help="time the store as it is, even when its history ended hours ago (by default its "
                             "timestamps are first shifted to end now: ui_store.redate)")
    parser.add_argument("--profile-all", action="store_true", help="profile every page, not only the slow ones")
    parser.add_argument("--keep-logs", type=Path, default=None, help="keep the servers' logs in this folder")
    args = parser.parse_args()
    recipe = ui_store.recipe_from(args)
    targets = ui_store.targets_for(args.backend, args.dir, recipe, args.pg_server)
    load = os.getloadavg()
    say(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
        + ("  (busy: timings are indicative only)" if load[0] > 1.0 else ""))
    if args.no_build:
        missing = [t.name for t in targets if not ui_store.is_current(t, recipe)]
        if missing:
            raise SystemExit(f"no store of recipe {recipe.key()} for {', '.join(missing)}: run bench/ui_store.py "
                             "first (or drop --no-build)")
        markers = {t.name: ui_store.read_marker(t) for t in targets}
    else:
        markers = ui_store.ensure(targets, recipe, args.dir, args.force)
    if not args.no_redate:
        for target in targets:
            ui_store.redate(target)
    logs = args.keep_logs or Path(tempfile.mkdtemp(prefix="ui-bench-logs-"))
    logs.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict[str, Timing]] = {}
    profiles: dict[str, dict[str, Any]] = {}
    for target in targets:
        counts = (markers.get(target.name) or {}).get("counts", {})
        say(f"\n{target.name}: {target.project} ({ui_store._shown(target.db_url)}); "
            f"{counts.get('models')} model versions, {counts.get('monitor_runs')} windows, "
            f"{counts.get('predictions', 0):,} predictions")
        paths = page_paths(target)
        server = everloop_server(target, logs)
        try:
            ready = server.start("/static/ui.css")
            say(f"  {' '.join(server.command[:2])} ... answered after {ready:.1f} s")
            results[target.name] = time_pages(server.url, paths, args.runs, args.warmup, server.process.pid)
        finally:
            server.stop()
        table(f"everloop ui on {target.name} ({args.runs} runs a page)", results[target.name])
        for name, t in results[target.name].items():
            if t.status == "ok" and (args.profile_all or not t.within):
                try:
                    profiles[f"{target.name}/{name}"] = profile_page(target, t.path)
                except Exception as exc:  # a profile is a help: never lose the timings for it
                    profiles[f"{target.name}/{name}"] = {"path": t.path, "error": f"{exc.__class__.__name__}: {exc}"}

    if profiles:
        say("\n### Profiles of the pages over the bar" + (" (all pages)" if args.profile_all else ""))
        for name, found in profiles.items():
            if "error" in found:
                say(f"\n#### {name}: profiling failed: {found['error']}")
            else:
                show_profile(name, found)

    peer: dict[str, Any] = {"skipped": "--no-mlflow"}
    ratio = None
    if not args.no_mlflow:
        say(f"\nMLflow {MLFLOW_VERSION} tracking server (SQLite backend, 1 worker), 100 model versions ...")
        peer = mlflow_peer(logs, args.runs, args.warmup)
        if "skipped" in peer:
            say(f"MLflow peer skipped: {peer['skipped']}")
        else:
            timings = peer.pop("_timings")
            table(f"MLflow {peer['version']} tracking server: its UI's REST calls ({args.runs} runs each)", timings)
            page = [timings[k].median for k in ("model_get", "model_versions")]
            ours = {name: results[name]["models"].median for name in results if results[name]["models"].median}
            if all(v is not None for v in page) and ours:
                mlflow_page = sum(page)
                ratio = {name: round(mlflow_page / ms, 2) for name, ms in ours.items()}
                say(f"\nmodels page: MLflow's model page calls {mlflow_page:.1f} ms (get + versions search, medians "
                    f"summed); everloop /models: " + ", ".join(f"{n} {ms:.1f} ms" for n, ms in ours.items())
                    + "; MLflow / everloop: " + ", ".join(f"{n} {r:.2f}x" for n, r in ratio.items()))

    summary = {name: {page: t.to_dict() for page, t in pages.items()} for name, pages in results.items()}
    within = {name: f"{sum(1 for t in pages.values() if t.within)}/{sum(1 for t in pages.values() if t.ms)}"
              for name, pages in results.items()}
    missing = sorted({page for pages in results.values() for page, t in pages.items() if t.status == "missing"})
    say(f"\nwithin {BAR_MS:.0f} ms (p95): " + ", ".join(f"{n} {w} timed pages" for n, w in within.items())
        + (f"; missing pages: {', '.join(missing)}" if missing else ""))
    if not args.keep_logs:
        shutil.rmtree(logs, ignore_errors=True)
    print(json.dumps({"bench": "ui", "runs": args.runs, "bar_ms": BAR_MS, "load": [round(x, 2) for x in load],
                      "recipe": recipe.key(), "pages": summary, "within_bar": within, "missing": missing,
                      "slow": sorted(profiles), "mlflow": peer, "models_page_mlflow_over_everloop": ratio}))


if __name__ == "__main__":
    main()
