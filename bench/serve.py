"""Serving benchmark: everloop's HTTP service against the servers a user would pick instead.

What is compared. One model -- the demo's churn classifier (15 features: 9 numeric, 6 categorical;
a scikit-learn Pipeline of imputation, scaling, one-hot encoding and a 200-tree
HistGradientBoostingClassifier), built with everloop's Python API in a temporary project (ingest,
train, promote) -- is served by each server below in turn, on loopback, and loaded with wrk:

    everloop     `everloop serve --workers 2` (validation, metrics, prediction log on: the product as
                 shipped); run a second time with `serving.log_predictions: false` for logging_cost
    flask        the tutorial Flask app (get_json -> DataFrame -> predict_proba -> jsonify), gunicorn -w 2
    fastapi      a plain FastAPI app (pydantic model of the features), uvicorn[standard] --workers 2
    mlflow       the pipeline saved with mlflow.sklearn (signature, pyfunc_predict_fn=predict_proba),
                 `mlflow models serve --env-manager local --workers 2`, /invocations with dataframe_split
    bentoml      a BentoML 1.4 service, 2 workers, adaptive batching on (@bentoml.api(batchable=True))
    mlserver     MLServer 1.7's scikit-learn runtime, 2 parallel workers, adaptive batching on, Open
                 Inference Protocol requests encoded as its PandasCodec encodes a DataFrame
    bare_asgi    a raw ASGI app answering a constant JSON, uvicorn --workers 2, no access log: the ceiling

    shadow       everloop's own cost of a shadow rollout (issue 16): the `everloop` service above, loaded
                 alternately with production alone and with a second model version in shadow
                 (`everloop promote V --shadow`, sample 100%; `everloop rollout abort` after each run),
                 at 1-row and 100-row requests x 16 connections, medians of 2 (off, on) pairs

Every server runs with OMP_NUM_THREADS=1 (on 2 cores, scikit-learn's default OpenMP threads
oversubscribe the CPU with 2 workers) and alone: each is started, checked (HTTP 200, and the
probabilities it answers for one row and for the 100-row batch equal the reference model's), loaded,
and its whole process group stopped before the next one starts.

The peers serve the same fitted pipeline as everloop, exported once: everloop's pipeline holds one
everloop function (`fill_missing_category`, a FunctionTransformer that fills missing categories with
"__missing__"), which is replaced by the equivalent fitted SimpleImputers (NaN, then None ->
"__missing__"); every other fitted step -- the imputers, scaler, encoder and the trees -- is the very
object everloop trained. The export is checked to give identical probabilities (also on rows with
missing values), and is pickled, so the peers' virtualenvs need no everloop, only the same
scikit-learn version.

Each peer is installed into a virtualenv of its own under bench/.venvs/<peer> on first use (a cache:
delete it to reinstall); the peer apps are in bench/_serve_peers/.

Load: wrk (installed with apt-get when missing), a small Lua script per body (POST, JSON), `--latency`
for the percentiles, 1 thread at 1 connection and 2 threads at 16 connections, a warm-up run before
each measured one. Four scenarios: {1 row, 100-row batch} x {1, 16 connections}, each in each
server's own request format. Errors are non-2xx answers plus socket errors (connect, read, write,
timeout) as wrk counts them.

Run:
    .venv/bin/python bench/serve.py              # 10 s per cell (about 8 minutes once the peers are installed)
    .venv/bin/python bench/serve.py --quick      # 3 s per cell, every peer
    .venv/bin/python bench/serve.py --quick --peers flask,bare_asgi    # a subset, while developing
    .venv/bin/python bench/serve.py --quick --only everloop --cells 100x16   # everloop log on/off only
    .venv/bin/python bench/serve.py --only shadow          # the shadow row only (about 5 minutes)

The last line printed is one JSON object; its headline figures are for one-row requests at 16
connections: rps_ratio = everloop requests/s / peer requests/s, p99_ratio = everloop p99 / peer p99
(everloop as shipped, prediction log on), logging_cost = 1 - rps(log on) / rps(log off); and
logging_cost_100, the same at 100-row requests x 16 connections. logging_cpu_cost(_100) are the same
costs from the servers' CPU per request (1 - CPU(log off) / CPU(log on), from /proc: all of the
server's processes), which a busy machine disturbs much less than requests/s. shadow_rps_ratio and
shadow_p99_ratio = the shadow row's medians, shadow on / shadow off, at one-row requests x 16
connections (issue 16's aim: at least 0.5, since the candidate computes every row again, and at most
1.5); "shadow" holds every cell's medians, ratios and per-pair ratios, and the log check: the shadow
rows logged to shadow_batches during the "on" runs against the production rows answered meanwhile
(all_logged: every one, at sample 100%), with the rows the shadow's full queue dropped.
"""

from __future__ import annotations

import os

# Before numpy/scikit-learn load: training HistGradientBoosting on a busy 2-core machine with the
# default OpenMP threads takes minutes instead of seconds; the servers get the same setting below.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import pickle
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers

BENCH = Path(__file__).resolve().parent
APPS = BENCH / "_serve_peers"
HOST = "127.0.0.1"
PEERS = ["flask", "fastapi", "mlflow", "bentoml", "mlserver", "bare_asgi"]
SCENARIOS = [(1, 1), (1, 16), (100, 1), (100, 16)]  # (rows per request, connections)
HEADLINE = (1, 16)
BATCH_ROWS = 100


# name -> (pip packages, import probe, distributions whose versions are reported)
def peer_packages() -> dict[str, tuple[list[str], str, list[str]]]:
    # The peers unpickle everloop's fitted pipeline: they need the very scikit-learn version it was fit
    # with (a cached venv with another one fails the probe and is reinstalled).
    version = metadata.version("scikit-learn")
    sk = f"scikit-learn=={version}"
    same = f"; assert sklearn.__version__ == {version!r}"
    packages = {
        "flask": (["flask", "gunicorn", "pandas", sk], "import flask, gunicorn, pandas, sklearn",
                  ["flask", "gunicorn", "pandas", "numpy", "scikit-learn"]),
        "fastapi": (["fastapi", "uvicorn[standard]", "pandas", sk], "import fastapi, uvicorn, uvloop, httptools, pandas, sklearn",
                    ["fastapi", "pydantic", "uvicorn", "uvloop", "httptools", "pandas", "numpy", "scikit-learn"]),
        # mlflow 3.18.0 does not install here (its mlflow-skinny==3.18.0 is not on the index); pandas<3 as
        # mlflow 3.17 expects; uvicorn[standard] (uvloop,
        # httptools) for its scoring server, which is uvicorn: with plain `pip install mlflow` uvicorn runs
        # on asyncio + h11 and one-connection requests take about 55 ms instead of 8 ms.
        "mlflow": (["mlflow==3.17.2", "pandas<3", "uvicorn[standard]", sk], "import mlflow, sklearn, uvloop, httptools",
                   ["mlflow", "uvicorn", "uvloop", "httptools", "fastapi", "pandas", "numpy", "scikit-learn"]),
        "bentoml": (["bentoml>=1.4,<1.5", "pandas", sk], "import bentoml, pandas, sklearn",
                    ["bentoml", "uvicorn", "starlette", "pydantic", "pandas", "numpy", "scikit-learn"]),
        # MLServer 1.7 needs uvloop 0.21 (a newer one breaks its worker pool).
        "mlserver": (["mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop==0.21.0", sk],
                     "import mlserver, mlserver_sklearn, sklearn",
                     ["mlserver", "mlserver-sklearn", "uvicorn", "uvloop", "pandas", "numpy", "scikit-learn"]),
        "bare_asgi": (["uvicorn[standard]"], "import uvicorn, uvloop, httptools", ["uvicorn", "uvloop", "httptools"]),
    }
    return {name: (pkgs, probe + same if sk in pkgs else probe, dists) for name, (pkgs, probe, dists) in packages.items()}


# -- machine, tools, versions --------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(mem_kb / 1024**2, 1),
            "os": f"{platform.system()} {platform.release()}", "load": os.getloadavg()}


def ensure_wrk() -> str:
    """wrk's path; installs Debian's wrk with apt-get when it is missing (as root), or exits saying how."""
    path = shutil.which("wrk")
    if path:
        return path
    print("wrk not found: installing it with apt-get (Debian package 'wrk') ...", flush=True)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit("serve.py needs the load generator wrk and cannot install it here (needs root and apt-get): "
                 "install it yourself, e.g. `sudo apt-get install -y wrk`, then run again.")
    for step in (["apt-get", "install", "-y", "-q", "wrk"], ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "wrk"]):
        done = subprocess.run(step, capture_output=True, text=True, check=False, env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"})
        if step[1] == "install" and done.returncode == 0 and shutil.which("wrk"):
            return shutil.which("wrk")
    sys.exit(f"serve.py needs the load generator wrk; `apt-get install -y wrk` failed:\n{done.stderr.strip()[-2000:]}")


def wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    return (out.stdout + out.stderr).strip().splitlines()[0].split(" Copyright")[0] if (out.stdout + out.stderr).strip() else "?"


def venv_versions(python: Path | str, dists: list[str]) -> dict[str, str]:
    code = ("import json, sys, platform; from importlib import metadata as m\n"
            "def v(d):\n try: return m.version(d)\n except Exception: return None\n"
            f"print(json.dumps({{'python': platform.python_version(), **{{d: v(d) for d in {dists!r}}}}}))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr.strip()[-300:]}


def dir_mb(path: Path) -> int:
    out = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=False)
    return int(out.stdout.split()[0]) if out.returncode == 0 else -1


# -- the model: an everloop project, and the same pipeline exported for the peers ----------------------


@dataclass
class Fixture:
    work: Path               # temporary folder of this run
    project: Path            # the everloop project
    model_dir: Path          # model.pkl + features.json for the peers
    names: list[str]         # feature names, in schema order
    rows: list[dict]         # BATCH_ROWS rows of features (JSON-ready), rows[0] is the one-row request
    reference: list[float]   # P(churned = 1) of each row, by the exported pipeline
    model_version: int
    mlflow_model: Path | None = None


def build_fixture(work: Path) -> Fixture:
    """A fresh everloop project on the demo's churn data: ingest, train, promote; then the export."""
    import pandas as pd
    import yaml

    from everloop import data, registry, train
    from everloop.demo import demo_spec, make_churn
    from everloop.spec import load_spec
    from everloop.store import Store

    project = work / "project"
    (project / "data").mkdir(parents=True)
    make_churn(10000, seed=7).to_csv(project / "data/customers.csv", index=False)
    (project / "everloop.yaml").write_text(yaml.safe_dump(demo_spec(), sort_keys=False))
    spec = load_spec(project)
    store = Store.for_project(project)
    data.ingest(store, spec, base=project)
    version = train.train(store, spec).version
    registry.promote(store, spec, version)
    model = registry.load_model(store, "production")

    names = list(model.schema.feature_names)
    history = pd.read_csv(project / "data/customers.csv")[names]
    pipeline = pure_sklearn(model.pipeline, history)
    fresh = make_churn(4 * BATCH_ROWS, seed=11)[names].dropna().head(BATCH_ROWS).reset_index(drop=True)
    check_same_model(model.pipeline, pipeline, pd.concat([fresh, history.head(2000)], ignore_index=True))
    rows = json.loads(fresh.to_json(orient="records"))
    reference = pipeline.predict_proba(pd.DataFrame(rows, columns=names))[:, 1].tolist()

    model_dir = work / "model"
    model_dir.mkdir()
    with open(model_dir / "model.pkl", "wb") as f:
        pickle.dump(pipeline, f, protocol=5)
    types = {n: ("int" if pd.api.types.is_integer_dtype(history[n]) else
                 "float" if pd.api.types.is_numeric_dtype(history[n]) else "str") for n in names}
    (model_dir / "features.json").write_text(json.dumps({"names": names, "types": types}))
    (model_dir / "rows.json").write_text(json.dumps(rows))
    return Fixture(work, project, model_dir, names, rows, reference, version)


def pure_sklearn(pipeline, frame):
    """A copy of the fitted `pipeline` in which everloop's `fill_missing_category` FunctionTransformer is
    replaced by equivalent fitted SimpleImputers; every other fitted step is kept as it is."""
    import numpy as np
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    pipeline = pickle.loads(pickle.dumps(pipeline))
    replaced = 0
    for step in pipeline.named_steps.values():
        if not isinstance(step, ColumnTransformer):
            continue
        for name, transformer, columns in step.transformers_:
            if not isinstance(transformer, Pipeline):
                continue
            for i, (sub, inner) in enumerate(transformer.steps):
                func = getattr(inner, "func", None)
                if isinstance(inner, FunctionTransformer) and getattr(func, "__module__", "").startswith("everloop"):
                    if func.__name__ != "fill_missing_category":
                        raise SystemExit(f"cannot export the pipeline: unknown everloop step {func.__module__}.{func.__name__}")
                    fill = Pipeline([
                        ("nan", SimpleImputer(missing_values=np.nan, strategy="constant", fill_value="__missing__")),
                        ("none", SimpleImputer(missing_values=None, strategy="constant", fill_value="__missing__"))])
                    fill.fit(frame[columns].astype(object))
                    transformer.steps[i] = (sub, fill)
                    replaced += 1
        fitted = {name: transformer for name, transformer, _ in step.transformers_}
        step.transformers = [(name, fitted.get(name, t), columns) for name, t, columns in step.transformers]
    if b"everloop" in pickle.dumps(pipeline):
        raise SystemExit("cannot export the pipeline: it still refers to everloop code after replacing "
                         f"{replaced} fill_missing_category step(s); see pure_sklearn() in bench/serve.py")
    return pipeline


def check_same_model(original, exported, frame) -> None:
    """The export answers exactly what everloop's pipeline answers, also where categories are missing."""
    import numpy as np
    from pandas.api.types import is_numeric_dtype

    holes = frame.copy()
    rng = np.random.default_rng(0)
    for column in holes.columns[::3]:
        holes.loc[rng.choice(len(holes), len(holes) // 20, replace=False), column] = np.nan
    as_object = holes.astype({c: object for c in holes.columns if not is_numeric_dtype(holes[c])})
    as_object.iloc[:50, -1] = None
    for sample in (frame, holes, as_object):
        diff = np.abs(original.predict_proba(sample) - exported.predict_proba(sample)).max()
        if diff > 1e-12:
            raise SystemExit(f"the exported pipeline differs from everloop's by {diff:g} in probability")


def save_mlflow_model(fixture: Fixture, python: Path) -> Path:
    out = fixture.work / "mlflow_model"
    done = subprocess.run([str(python), str(APPS / "mlflow_export.py"), str(fixture.model_dir),
                           str(fixture.model_dir / "rows.json"), str(out)],
                          capture_output=True, text=True, check=False, env=os.environ | {"PYTHONDONTWRITEBYTECODE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"mlflow.sklearn.save_model failed: {done.stderr.strip()[-1500:]}")
    return out


def set_prediction_log(project: Path, on: bool) -> None:
    import yaml

    spec = yaml.safe_load((project / "everloop.yaml").read_text())
    spec.setdefault("serving", {})["log_predictions"] = on
    (project / "everloop.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


# -- the servers ----------------------------------------------------------------------------------------


def _p1_lists(rows: list) -> list[float]:
    return [float(r[1]) for r in rows]


def _p1_everloop(answer: dict) -> list[float]:
    return [float(p["probabilities"]["1"]) for p in answer["predictions"]]


@dataclass
class Server:
    key: str                       # the key in the JSON line (the peer name, or everloop / everloop_nolog)
    label: str                     # how the tables show it
    venv: str | None               # bench/.venvs/<venv>, or None for everloop's own
    command: Callable[[int, Fixture], list[str]]
    body: Callable[[Fixture, int], tuple[str, Any]]   # (path, JSON body) for a request of n rows
    answer: Callable[[Any], list[float]] | None        # P(class 1) per row from the response, None: not a model
    ready_timeout: float = 120.0
    env: dict[str, str] = field(default_factory=dict)
    before: Callable[[Fixture], None] | None = None
    settle: Callable[["Running"], str] | None = None  # after the first 200: wait until fully warmed up


def _bin(venv: str, tool: str) -> str:
    return str(_peers.VENVS / venv / "bin" / tool)


def _everloop_bin() -> str:
    here = Path(sys.executable).parent / "everloop"
    return str(here) if here.exists() else (shutil.which("everloop") or "everloop")


def _records(f: Fixture, n: int) -> list[dict]:
    return f.rows[:n]


def _uvicorn(venv: str, app: str, *extra: str) -> Callable[[int, Fixture], list[str]]:
    return lambda port, f: [_bin(venv, "uvicorn"), app, "--app-dir", str(APPS), "--host", HOST, "--port", str(port),
                            "--workers", "2", "--no-access-log", *extra]


def _everloop(port: int, f: Fixture) -> list[str]:
    return [_everloop_bin(), "serve", "--host", HOST, "--port", str(port), "--workers", "2", "--project", str(f.project)]


def _mlserver(port: int, f: Fixture) -> list[str]:
    """MLServer's scikit-learn runtime on the exported pipeline: 2 parallel inference workers, adaptive
    batching (up to 1,600 rows, 2 ms), its metrics and gRPC servers on ports of their own."""
    folder = f.work / "mlserver"
    folder.mkdir(exist_ok=True)
    (folder / "settings.json").write_text(json.dumps({
        "host": HOST, "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
        "parallel_workers": 2, "debug": False}))
    (folder / "model-settings.json").write_text(json.dumps({
        "name": "churn", "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": str(f.model_dir / "model.pkl"), "version": "v1"},
        "max_batch_size": 1600, "max_batch_time": 0.002}))
    return [_bin("mlserver", "mlserver"), "start", str(folder)]


def _mlserver_body(f: Fixture, n: int) -> tuple[str, dict]:
    """An Open Inference Protocol request as MLServer's PandasCodec encodes a DataFrame."""
    rows = _records(f, n)
    inputs = []
    for name in f.names:
        values = [r[name] for r in rows]
        if any(isinstance(v, str) for v in values):
            inputs.append({"name": name, "datatype": "BYTES", "shape": [n, 1], "data": values,
                           "parameters": {"content_type": "str"}})
        else:
            inputs.append({"name": name, "datatype": "FP64", "shape": [n, 1],
                           "data": [None if v is None else float(v) for v in values]})
    return "/v2/models/churn/infer", {"inputs": inputs, "parameters": {"content_type": "pd"},
                                      "outputs": [{"name": "predict_proba"}]}


def _p1_mlserver(answer: dict) -> list[float]:
    return [float(p) for p in answer["outputs"][0]["data"][1::2]]


def _everloop_compiled(running: "Running", timeout: float = 120.0) -> str:
    """everloop serves on scikit-learn until each worker has compiled the trees (in the background):
    measure the steady state, as a long-running service spends its life in it."""
    start = time.monotonic()
    seen = 0
    while time.monotonic() - start < timeout:
        with urllib.request.urlopen(running.url + "/model", timeout=5) as response:
            predictor = json.loads(response.read()).get("predictor")
        seen = seen + 1 if predictor == "compiled" else 0
        if seen >= 10:  # ten answers in a row, from whichever worker took each
            return f"compiled trees serving after {time.monotonic() - start:.1f} s more"
        time.sleep(0.1)
    return f"the compiled trees did not take over within {timeout:g} s: scikit-learn serves"


def _everloop_body(f: Fixture, n: int) -> tuple[str, dict]:
    return "/predict", ({"features": f.rows[0]} if n == 1 else {"instances": _records(f, n)})


def servers() -> list[Server]:
    """Every server, in the order they run (each in each one's own request format)."""
    return [
        Server("bare_asgi", "bare ASGI (constant answer)", "bare_asgi",
               _uvicorn("bare_asgi", "bare_asgi:app", "--lifespan", "off"),
               lambda f, n: ("/predict", f.rows[0] if n == 1 else _records(f, n)), None),
        Server("flask", "Flask + gunicorn -w 2", "flask",
               lambda port, f: [_bin("flask", "gunicorn"), "-w", "2", "-b", f"{HOST}:{port}", "--chdir", str(APPS),
                                "flask_app:app"],
               lambda f, n: ("/predict", f.rows[0] if n == 1 else _records(f, n)),
               lambda a: _p1_lists(a["probabilities"])),
        Server("fastapi", "FastAPI + uvicorn --workers 2", "fastapi", _uvicorn("fastapi", "fastapi_app:app"),
               lambda f, n: ("/predict", f.rows[0]) if n == 1 else ("/predict_batch", _records(f, n)),
               lambda a: _p1_lists(a["probabilities"])),
        # The scoring server is uvicorn; UVICORN_ACCESS_LOG=false turns its access log off (uvicorn reads
        # its options from UVICORN_* variables), as for every other peer.
        Server("mlflow", "MLflow scoring server, --workers 2", "mlflow",
               lambda port, f: [_bin("mlflow", "mlflow"), "models", "serve", "-m", str(f.mlflow_model),
                                "--env-manager", "local", "-h", HOST, "-p", str(port), "--workers", "2"],
               lambda f, n: ("/invocations", {"dataframe_split": {
                   "columns": f.names, "data": [[r[c] for c in f.names] for r in _records(f, n)]}}),
               lambda a: _p1_lists(a["predictions"]),
               env={"UVICORN_ACCESS_LOG": "false"}),
        Server("bentoml", "BentoML, 2 workers, adaptive batching", "bentoml",
               lambda port, f: [_bin("bentoml", "bentoml"), "serve", "bentoml_service:Churn", "--working-dir",
                                str(APPS), "--host", HOST, "--port", str(port)],
               lambda f, n: ("/predict", {"rows": _records(f, n)}), _p1_lists,
               env={"BENTOML_DO_NOT_TRACK": "True"}),
        Server("mlserver", "MLServer, 2 workers, adaptive batching", "mlserver", _mlserver, _mlserver_body,
               _p1_mlserver),
        Server("everloop", "everloop serve --workers 2", None, _everloop, _everloop_body, _p1_everloop,
               before=lambda f: set_prediction_log(f.project, True), settle=_everloop_compiled),
        Server("everloop_nolog", "everloop serve --workers 2, log off", None, _everloop, _everloop_body,
               _p1_everloop, before=lambda f: set_prediction_log(f.project, False), settle=_everloop_compiled),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def post(url: str, body: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Running:
    """One server process (in a process group of its own), its log, and how to stop all of it."""

    def __init__(self, server: Server, fixture: Fixture, logs: Path):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = logs / f"{server.key}.log"
        env = os.environ | {"OMP_NUM_THREADS": "1", "SERVE_MODEL_DIR": str(fixture.model_dir),
                            "PYTHONDONTWRITEBYTECODE": "1", "BENTOML_HOME": str(fixture.work / "bentoml")}
        if server.venv:
            env["PATH"] = f"{_peers.VENVS / server.venv / 'bin'}:{env.get('PATH', '')}"
            env["VIRTUAL_ENV"] = str(_peers.VENVS / server.venv)
        env |= server.env
        self.command = server.command(self.port, fixture)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=fixture.work, start_new_session=True)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, path: str, body: bytes, timeout: float) -> float:
        """Seconds until the server answers 200 to the one-row request."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with code {self.process.returncode} before answering:\n{self.log_tail()}")
            try:
                status, _ = post(self.url + path, body, timeout=5)
                if status == 200:
                    return time.monotonic() - start
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"no 200 answer within {timeout:g} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL after 15 s; returns when no process of it is left."""
        pgid = self.process.pid
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self.process.poll()
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    self.process.wait()
                    return
                time.sleep(0.1)
        self.process.wait()


def check_answers(server: Server, fixture: Fixture, running: Running) -> None:
    """HTTP 200, and the same probabilities as the reference model, for one row and for the batch."""
    for n in (1, BATCH_ROWS):
        path, body = server.body(fixture, n)
        status, raw = post(running.url + path, json.dumps(body).encode(), timeout=30)
        if status != 200:
            raise RuntimeError(f"{n}-row request answered HTTP {status}: {raw[:500]!r}")
        answer = json.loads(raw)
        if server.answer is None:
            continue
        got = server.answer(answer)
        want = fixture.reference[:n]
        if len(got) != n or any(abs(g - w) > 1e-5 for g, w in zip(got, want)):
            raise RuntimeError(f"{n}-row request: probabilities {got[:3]}... differ from the model's {want[:3]}...")


# -- wrk --------------------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text).groups()
    return float(value) * _UNITS[unit]


def parse_wrk(output: str) -> dict[str, Any]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    total = re.search(r"(\d+) requests in", output)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if not rps or not total:
        raise RuntimeError(f"cannot read wrk's output:\n{output}")
    socket_errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()))) if sock else {}
    result = {"rps": float(rps.group(1)), "requests": int(total.group(1)),
              "p50_ms": _ms(p50.group(1)) if p50 else None, "p99_ms": _ms(p99.group(1)) if p99 else None,
              "non2xx": int(non2xx.group(1)) if non2xx else 0, "socket_errors": socket_errors}
    result["errors"] = result["non2xx"] + sum(socket_errors.values())
    return result


def lua_script(folder: Path, name: str, body: bytes) -> Path:
    body_path = folder / f"{name}.json"
    body_path.write_bytes(body)
    script = folder / f"{name}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'local f = assert(io.open("{body_path}", "rb"))\n'
        "wrk.body = f:read(\"*a\")\n"
        "f:close()\n")
    return script


def load_cell(wrk: str, url: str, script: Path, connections: int, seconds: float, warmup: float, running: Any) -> dict:
    """One wrk cell against the running server (after `warmup` seconds of load), with the server's CPU
    per request; raises RuntimeError when the server died under the load."""
    if warmup > 0:
        run_wrk(wrk, url, script, connections, warmup)
    cpu = group_cpu_seconds(running.process.pid)
    cell = run_wrk(wrk, url, script, connections, seconds)
    if running.process.poll() is not None:
        raise RuntimeError(f"the server died under load:\n{running.log_tail()}")
    if cpu is not None and cell["requests"]:
        cell["cpu_us_per_request"] = round((group_cpu_seconds(running.process.pid) - cpu)
                                           / cell["requests"] * 1e6, 1)
    return cell


def run_wrk(wrk: str, url: str, script: Path, connections: int, seconds: float) -> dict[str, Any]:
    threads = min(2, connections)
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "--latency",
               "-s", str(script), url]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout)


# -- one run ----------------------------------------------------------------------------------------------


def measure(server: Server, fixture: Fixture, wrk: str, seconds: float, warmup: float, logs: Path,
            say: Callable[[str], None], scenarios: list[tuple[int, int]] = SCENARIOS) -> dict[str, Any]:
    """Start `server`, check it, load it in each scenario, stop it. {"ready_s", "cells": {(rows, conns): wrk}}."""
    if server.before:
        server.before(fixture)
    running = Running(server, fixture, logs)
    try:
        path, body = server.body(fixture, 1)
        ready = running.wait_ready(path, json.dumps(body).encode(), server.ready_timeout)
        if server.settle:
            say(f"  {server.settle(running)}")
        check_answers(server, fixture, running)
        command = " ".join(running.command).replace(str(BENCH), "bench").replace(str(fixture.work), "$TMP")
        say(f"  ready in {ready:.1f} s, answers checked: {command}")
        cells: dict[tuple[int, int], dict] = {}
        for rows, connections in scenarios:
            path, body = server.body(fixture, rows)
            script = lua_script(fixture.work / "wrk", f"{server.key}_{rows}", json.dumps(body).encode())
            url = running.url + path
            cell = load_cell(wrk, url, script, connections, seconds, warmup, running)
            cells[(rows, connections)] = cell
            say(f"    {rows:>3} row(s) x {connections:>2} conn: {cell['rps']:>9.1f} req/s  p50 {_fmt_ms(cell['p50_ms'])}"
                f"  p99 {_fmt_ms(cell['p99_ms'])}  errors {cell['errors']}"
                + (f"  server CPU {cell['cpu_us_per_request']:.0f} us/request" if "cpu_us_per_request" in cell else ""))
        return {"ready_s": ready, "cells": cells}
    finally:
        running.stop()


def group_cpu_seconds(pgid: int, children: bool = False) -> float | None:
    """CPU seconds (user + system) used so far by the live processes of a process group (a server and
    its workers), from /proc; None where there is no /proc. On a machine that is not idle, requests/s
    move with the neighbours' load; CPU per request much less. `children`: also what their exited
    children used (a compiler a worker ran), so that the sum never falls when one exits."""
    if not os.path.isdir("/proc"):
        return None
    ticks = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()  # after the command, which may hold spaces
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid:  # fields: state, ppid, pgrp, ..., utime (12th), stime (13th)
            ticks += int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms" if value < 1000 else f"{value / 1000:.2f} s"


def tables(results: dict[str, dict], labels: dict[str, str],
           scenarios: list[tuple[int, int]] = SCENARIOS) -> str:
    out = []
    for rows, connections in scenarios:
        title = f"{'one row' if rows == 1 else f'{rows}-row batch'}, {connections} connection{'s' * (connections > 1)}"
        out += [f"### {title}", "", "| server | req/s | rows/s | p50 | p99 | errors | everloop req/s / this |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        ever = results.get("everloop", {}).get("cells", {}).get((rows, connections))
        for key, result in results.items():
            if "error" in result:
                out.append(f"| {labels[key]} | failed | | | | | |")
                continue
            cell = result["cells"][(rows, connections)]
            ratio = "-"
            if ever and cell["rps"]:
                r = ever["rps"] / cell["rps"]
                ratio = f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"
            out.append(f"| {labels[key]} | {cell['rps']:,.1f} | {cell['rps'] * rows:,.0f} | {_fmt_ms(cell['p50_ms'])} | "
                       f"{_fmt_ms(cell['p99_ms'])} | {cell['errors']} | {ratio} |")
        out.append("")
    return "\n".join(out)


def headline(results: dict[str, dict], quick: bool, peers: list[str]) -> dict[str, Any]:
    def cell(key: str, scenario=HEADLINE) -> dict | None:
        result = results.get(key, {})
        return result.get("cells", {}).get(scenario)

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    ever, nolog = cell("everloop"), cell("everloop_nolog")
    line: dict[str, Any] = {"bench": "serve", "quick": quick, "rows": HEADLINE[0], "connections": HEADLINE[1]}
    line["rps_ratio"] = {p: ratio(ever and ever["rps"], (cell(p) or {}).get("rps")) for p in peers}
    line["p99_ratio"] = {p: ratio(ever and ever["p99_ms"], (cell(p) or {}).get("p99_ms")) for p in peers}
    line["logging_cost"] = round(1 - ever["rps"] / nolog["rps"], 3) if ever and nolog and nolog["rps"] else None
    ever_100, nolog_100 = cell("everloop", (BATCH_ROWS, 16)), cell("everloop_nolog", (BATCH_ROWS, 16))
    line["logging_cost_100"] = (round(1 - ever_100["rps"] / nolog_100["rps"], 3)
                                if ever_100 and nolog_100 and nolog_100["rps"] else None)
    # The same from the servers' CPU per request (what the log adds to it), steadier on a busy machine.
    for key, scenario in (("logging_cpu_cost", HEADLINE), ("logging_cpu_cost_100", (BATCH_ROWS, 16))):
        on, off = (cell(k, scenario) or {} for k in ("everloop", "everloop_nolog"))
        if on.get("cpu_us_per_request") and off.get("cpu_us_per_request"):
            line[key] = round(1 - off["cpu_us_per_request"] / on["cpu_us_per_request"], 3)
    line["everloop_rps"] = ever and round(ever["rps"], 1)
    line["everloop_p99_ms"] = ever and ever["p99_ms"]
    line["peer_rps"] = {p: (cell(p) or {}).get("rps") for p in peers}
    batch = (BATCH_ROWS, 16)
    ever_batch = cell("everloop", batch)
    line["rps_ratio_100rows"] = {p: ratio(ever_batch and ever_batch["rps"], (cell(p, batch) or {}).get("rps"))
                                 for p in peers if p != "bare_asgi"}
    line["errors"] = {k: sum(c["errors"] for c in r["cells"].values()) for k, r in results.items() if "cells" in r}
    failed = {k: r["error"].splitlines()[0][:200] for k, r in results.items() if "error" in r}
    if failed:
        line["failed"] = failed
    return line


# -- the shadow row: what a shadow rollout costs the service ----------------------------------------------
#
# One everloop service (the main row's: `everloop serve --workers 2`, prediction log on) is loaded in
# turns off, on, off, on ...: "off" serves production alone, "on" with a shadow rollout of a second
# model version active (`everloop promote V --shadow`, sample rollout.shadow_sample = 100%: the
# candidate also scores every answered row, off the response path). Each "on" is a rollout of its own,
# started before its warm-up and aborted after its measured run (`everloop rollout abort`), so both
# halves run in the same processes and alternate, and machine noise falls on both alike; the medians
# of each half are compared. Each "on" run also checks that the candidate changed no answer and that
# every production row it answered got its shadow row logged (shadow_batches under the rollout).

SHADOW_SCENARIOS = [HEADLINE, (BATCH_ROWS, 16)]  # the headline cell, and 100-row requests
# issue 16's aims: throughput at least half of shadow off (the candidate computes every row a second
# time: at most 2x the cost), p99 at most 1.5x.
SHADOW_AIM = {"rps_ratio_min": 0.5, "p99_ratio_max": 1.5}
WORKERS = 2  # the everloop service's --workers (see _everloop)


def add_candidate(fixture: Fixture) -> int:
    """A second model version to shadow production with, made as the loop would make one: 2,000 newer
    rows appended to the project's source, ingested, and a model trained on the 12,000 (not promoted).
    Its compiled trees are built into the store's cache now, as production's were when the first
    service started, so that each rollout's load of it in the service finds them. Returns its version."""
    import pandas as pd

    from everloop import data, registry, train
    from everloop.demo import make_churn
    from everloop.demo._scenario import START
    from everloop.serve._compiled import compile_model
    from everloop.spec import load_spec
    from everloop.store import Store

    project = fixture.project
    newer = make_churn(2000, seed=8, start=START + pd.Timedelta(minutes=10000), id_offset=10000)
    newer.to_csv(project / "data/customers.csv", mode="a", header=False, index=False)
    spec = load_spec(project)
    store = Store.for_project(project)
    data.ingest(store, spec, base=project)
    version = train.train(store, spec, reason="bench/serve.py: the shadow candidate").version
    model = registry.load_model(store, version)
    probe = registry.eval_frame(store, model.manifest).head(200)
    # as the service's holder does: the fast feature path checked first (only a model on it is compiled)
    if spec.serving.compile_trees and model.check_fast_path(probe):
        compile_model(model, probe, store)
    return version


def _everloop_cli(fixture: Fixture, *args: str) -> tuple[int, Any, str]:
    """`everloop ARGS --project P --json`: (exit code, its JSON answer or None, stderr)."""
    done = subprocess.run([_everloop_bin(), *args, "--project", str(fixture.project), "--json"],
                          capture_output=True, text=True, check=False, timeout=600,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        answer = json.loads(done.stdout) if done.stdout.strip() else None
    except ValueError:
        answer = None
    return done.returncode, answer, done.stderr.strip() or done.stdout.strip()


def start_shadow(fixture: Fixture, candidate: int, force: bool, say: Callable[[str], None]) -> tuple[dict, bool]:
    """`everloop promote CANDIDATE --shadow`: (the rollout as the CLI answers it, whether --force was
    needed). The gate decides first; a candidate it refuses is shadowed anyway with --force (this
    measures the cost, not the model), and said so. Raises RuntimeError when no rollout started."""
    code, answer, err = _everloop_cli(fixture, "promote", str(candidate), "--shadow", *(["--force"] * force))
    if code != 0 and not force and isinstance(answer, dict) and answer.get("passed") is False:
        say(f"    the gate refused v{candidate} ({'; '.join(answer.get('reasons', []))}): shadowed with --force")
        return start_shadow(fixture, candidate, True, say)
    if code != 0 or not isinstance(answer, dict) or answer.get("status") != "active":
        raise RuntimeError(f"everloop promote {candidate} --shadow failed (exit {code}): {err[-1500:]}")
    return answer, force


def abort_shadow(fixture: Fixture) -> None:
    """`everloop rollout abort`; raises RuntimeError when it fails."""
    code, answer, err = _everloop_cli(fixture, "rollout", "abort", "--reason", "bench/serve.py: shadow off")
    if code != 0 or not isinstance(answer, dict) or answer.get("status") != "aborted":
        raise RuntimeError(f"everloop rollout abort failed (exit {code}): {err[-1500:]}")


def wait_rollout(running: Running, rollout_id: int | None, timeout: float = 120.0) -> float:
    """Seconds until every worker serves rollout `rollout_id` with its candidate loaded (None: no rollout):
    GET /model until WORKERS distinct worker pids answered so, none of them otherwise since. Raises
    RuntimeError when the candidate failed to load, the server died, or after `timeout` seconds."""
    start = time.monotonic()
    ready: set[int] = set()
    while time.monotonic() - start < timeout:
        if running.process.poll() is not None:
            raise RuntimeError(f"the server exited with code {running.process.returncode}:\n{running.log_tail()}")
        with urllib.request.urlopen(running.url + "/model", timeout=5) as response:
            info = json.loads(response.read())
        trial, pid = info.get("rollout"), info["replica"]["pid"]
        if rollout_id is None:
            serving = trial is None
        else:
            if trial and trial.get("error"):
                raise RuntimeError(f"rollout {rollout_id}: {trial['error']}")
            serving = bool(trial) and trial["id"] == rollout_id and trial["loaded"]
        if serving:
            ready.add(pid)
        else:
            ready.discard(pid)
        if len(ready) >= WORKERS:
            return time.monotonic() - start
        time.sleep(0.05)
    want = "no rollout" if rollout_id is None else f"rollout {rollout_id} with its candidate loaded"
    raise RuntimeError(f"the workers did not all serve {want} within {timeout:g} s")


def wait_idle(running: Running, timeout: float = 60.0, window: float = 0.5, busy: float = 0.2) -> float:
    """Seconds until the server's processes use under `busy` of one core over `window` seconds: a
    candidate just loaded has its trees compiled (from the cache) in a background thread, which /model
    does not report; this waits for that work to end, so the warm-up and the run measure the steady
    state. Returns at `timeout` anyway (the run then starts on a busy server), or at once without /proc."""
    start = time.monotonic()
    before = group_cpu_seconds(running.process.pid, children=True)
    while before is not None and time.monotonic() - start < timeout:
        time.sleep(window)
        now = group_cpu_seconds(running.process.pid, children=True)
        if now - before < busy * window:
            break
        before = now
    return time.monotonic() - start


def _metric_sum(exposition: str, name: str) -> float:
    """The sum over every label set of metric `name` in a Prometheus text exposition (0 when absent)."""
    total = 0.0
    for line in exposition.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def logged_counts(store: Any, running: Running, rollout_id: int | None, timeout: float = 60.0) -> dict[str, Any]:
    """The prediction log's rows once the service's writers caught up: its log queue empty and nothing
    new written for a second (the shadow thread's rows reach the same writer). `production_rows`: rows
    in prediction_batches; `shadow_rows`: rows in shadow_batches under `rollout_id`; `shadow_dropped`,
    `log_dropped` (rows) and `rollout_failed_calls`: the service's counters, cumulative since it started.
    `settled` False: still moving after `timeout` seconds."""
    import sqlalchemy as sa

    t = store.tables
    last: dict[str, Any] | None = None
    since = start = time.monotonic()
    while True:
        with store.engine.connect() as conn:
            production = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(t.prediction_batches.c.rows), 0))).scalar()
            shadow = 0 if rollout_id is None else conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(t.shadow_batches.c.rows), 0))
                .where(t.shadow_batches.c.rollout == rollout_id)).scalar()
        with urllib.request.urlopen(running.url + "/metrics", timeout=10) as response:
            exposition = response.read().decode()
        counts = {"production_rows": int(production), "shadow_rows": int(shadow),
                  "shadow_dropped": int(_metric_sum(exposition, "everloop_shadow_dropped_total")),
                  "log_dropped": int(_metric_sum(exposition, "everloop_prediction_log_dropped_total")),
                  "rollout_failed_calls": int(_metric_sum(exposition, "everloop_rollout_failed_calls_total"))}
        queued = _metric_sum(exposition, "everloop_prediction_log_queue")
        now = time.monotonic()
        if counts != last:
            last, since = counts, now
        elif queued == 0 and now - since >= 1.0:
            return counts | {"settled": True}
        if now - start > timeout:
            return counts | {"settled": False}
        time.sleep(0.2)


def measure_shadow(fixture: Fixture, candidate: int, wrk: str, seconds: float, warmup: float, logs: Path,
                   say: Callable[[str], None], scenarios: list[tuple[int, int]], pairs: int) -> dict[str, Any]:
    """The shadow row: start the main row's everloop service, then per scenario `pairs` times a run
    with shadow off and one with a shadow rollout of `candidate` on (see the comment above); stop it.
    {"candidate_version", "production_version", "sample", "forced", "ready_s", "runs": {(rows, conns): [run]}},
    each run wrk's numbers plus "shadow" (bool), "cpu_us_per_request", and for "on" runs "rollout" and
    "log" (production_rows, shadow_rows, shadow_dropped, log_dropped, rollout_failed_calls, settled)."""
    from everloop.store import Store

    main_row = next(s for s in servers() if s.key == "everloop")
    server = Server("everloop_shadow", "everloop serve --workers 2, shadow off/on", None, main_row.command,
                    main_row.body, main_row.answer, before=main_row.before, settle=main_row.settle)
    server.before(fixture)
    store = Store.for_project(fixture.project)
    running = Running(server, fixture, logs)
    out: dict[str, Any] = {"candidate_version": candidate, "production_version": fixture.model_version,
                           "forced": False, "runs": {}}
    try:
        path, body = server.body(fixture, 1)
        out["ready_s"] = running.wait_ready(path, json.dumps(body).encode(), server.ready_timeout)
        say(f"  {server.settle(running)}")
        check_answers(server, fixture, running)
        say(f"  ready in {out['ready_s']:.1f} s, answers checked; candidate model v{candidate}, production "
            f"v{fixture.model_version}; {pairs} x (off, on) per cell")
        for rows, connections in scenarios:
            path, body = server.body(fixture, rows)
            script = lua_script(fixture.work / "wrk", f"shadow_{rows}", json.dumps(body).encode())
            url = running.url + path
            runs = out["runs"][(rows, connections)] = []
            for i in range(pairs):
                for shadow in (False, True):
                    rollout = before = None
                    if shadow:
                        before = logged_counts(store, running, None)
                        rollout, out["forced"] = start_shadow(fixture, candidate, out["forced"], say)
                        out["sample"] = rollout["sample"]
                        wait_rollout(running, rollout["id"])
                        wait_idle(running)
                        check_answers(server, fixture, running)  # the shadow changes no answer
                    cell = load_cell(wrk, url, script, connections, seconds, warmup, running)
                    cell["shadow"] = shadow
                    note = ""
                    if shadow:
                        after = logged_counts(store, running, rollout["id"])
                        abort_shadow(fixture)
                        wait_rollout(running, None)
                        wait_idle(running)
                        cell["rollout"] = rollout["id"]
                        cell["log"] = {"production_rows": after["production_rows"] - before["production_rows"],
                                       "shadow_rows": after["shadow_rows"], "settled": after["settled"]}
                        cell["log"] |= {k: after[k] - before[k]
                                        for k in ("shadow_dropped", "log_dropped", "rollout_failed_calls")}
                        log = cell["log"]
                        note = (f"  shadow rows logged {log['shadow_rows']:,} of {log['production_rows']:,} "
                                f"production rows (dropped {log['shadow_dropped']:,}, failed calls "
                                f"{log['rollout_failed_calls']})")
                    runs.append(cell)
                    cpu_text = (f"  server CPU {cell['cpu_us_per_request']:.0f} us/request"
                                if "cpu_us_per_request" in cell else "")
                    say(f"    {rows:>3} row(s) x {connections:>2} conn, shadow {'on ' if shadow else 'off'} "
                        f"({i + 1}/{pairs}): {cell['rps']:>9.1f} req/s  p50 {_fmt_ms(cell['p50_ms'])}  "
                        f"p99 {_fmt_ms(cell['p99_ms'])}  errors {cell['errors']}{cpu_text}{note}")
        return out
    finally:
        running.stop()


def shadow_summary(measured: dict[str, Any]) -> dict[str, Any]:
    """Per cell ("ROWSxCONNS"): the medians of the off and the on runs, the ratios on / off (req/s,
    p99, server CPU per request), errors, and the log check: `all_logged` when the on runs' shadow rows
    equal their production rows times the sample (100%: every row), with the shares found."""
    from statistics import median

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    sample = measured.get("sample", 100.0)
    cells: dict[str, Any] = {}
    for (rows, connections), runs in measured["runs"].items():
        off = [r for r in runs if not r["shadow"]]
        on = [r for r in runs if r["shadow"]]
        if not off or not on:
            continue
        med = {side: {key: median(r[key] for r in group) if all(r.get(key) for r in group) else None
                      for key in ("rps", "p99_ms", "cpu_us_per_request")}
               for side, group in (("off", off), ("on", on))}
        production = sum(r["log"]["production_rows"] for r in on)
        shadowed = sum(r["log"]["shadow_rows"] for r in on)
        expected = production * sample / 100
        cells[f"{rows}x{connections}"] = {
            "rps_off": round(med["off"]["rps"], 1), "rps_on": round(med["on"]["rps"], 1),
            "p99_off_ms": med["off"]["p99_ms"], "p99_on_ms": med["on"]["p99_ms"],
            "rps_ratio": ratio(med["on"]["rps"], med["off"]["rps"]),
            "p99_ratio": ratio(med["on"]["p99_ms"], med["off"]["p99_ms"]),
            "cpu_ratio": ratio(med["on"]["cpu_us_per_request"], med["off"]["cpu_us_per_request"]),
            # each pair's own ratios: how much the machine moved between runs
            "pair_rps_ratios": [ratio(b["rps"], a["rps"]) for a, b in zip(off, on)],
            "pair_p99_ratios": [ratio(b["p99_ms"], a["p99_ms"]) for a, b in zip(off, on)],
            "errors_off": sum(r["errors"] for r in off), "errors_on": sum(r["errors"] for r in on),
            "log": {"production_rows": production, "shadow_rows": shadowed,
                    "shadow_dropped": sum(r["log"]["shadow_dropped"] for r in on),
                    "log_dropped": sum(r["log"]["log_dropped"] for r in on),
                    "rollout_failed_calls": sum(r["log"]["rollout_failed_calls"] for r in on),
                    "share": round(shadowed / production, 4) if production else None,
                    "all_logged": production > 0 and (shadowed == production if sample >= 100
                                                      else abs(shadowed - expected) <= max(0.02 * production, 10)),
                    "settled": all(r["log"]["settled"] for r in on)}}
        cell = cells[f"{rows}x{connections}"]
        cell["aim_met"] = (cell["rps_ratio"] is not None and cell["p99_ratio"] is not None
                           and cell["rps_ratio"] >= SHADOW_AIM["rps_ratio_min"]
                           and cell["p99_ratio"] <= SHADOW_AIM["p99_ratio_max"])
    pairs = max((len(runs) // 2 for runs in measured["runs"].values()), default=0)
    return {"candidate_version": measured["candidate_version"], "production_version": measured["production_version"],
            "sample": sample, "forced": measured["forced"], "pairs": pairs, "aim": SHADOW_AIM, "cells": cells}


def shadow_table(summary: dict[str, Any]) -> str:
    out = [f"### shadow rollout: candidate v{summary['candidate_version']} beside production "
           f"v{summary['production_version']}, sample {summary['sample']:g}% (medians of {summary['pairs']} "
           "alternating off / on runs)", "",
           "| cell | off req/s (p99) | on req/s (p99) | req/s on/off | p99 on/off | CPU/request on/off "
           "| errors on | shadow rows logged / production rows |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for key, c in summary["cells"].items():
        rows, connections = key.split("x")
        log = c["log"]
        logged = (f"{log['shadow_rows']:,} / {log['production_rows']:,} "
                  f"({'all' if log['all_logged'] else 'NOT all'}; dropped {log['shadow_dropped']:,})")
        out.append(f"| {rows} row(s) x {connections} conn | {c['rps_off']:,.1f} ({_fmt_ms(c['p99_off_ms'])}) | "
                   f"{c['rps_on']:,.1f} ({_fmt_ms(c['p99_on_ms'])}) | {c['rps_ratio']} | {c['p99_ratio']} | "
                   f"{c['cpu_ratio'] if c['cpu_ratio'] is not None else '-'} | {c['errors_on']} | {logged} |")
    aim = summary["aim"]
    out += ["", f"aim (issue 16): req/s on/off >= {aim['rps_ratio_min']} (at most 2x the cost), p99 on/off <= "
                f"{aim['p99_ratio_max']}: " + ", ".join(f"{k} {'met' if c['aim_met'] else 'NOT met'}"
                                                      for k, c in summary["cells"].items())]
    if summary["forced"]:
        out.append(f"(the gate refused candidate v{summary['candidate_version']}; it was shadowed with --force)")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 s per cell and 1 s warm-up (default 10 s and 2 s); every peer")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated subset of {','.join(PEERS)} (everloop always runs)")
    parser.add_argument("--seconds", type=float, help="seconds per measured cell (overrides --quick)")
    parser.add_argument("--only", choices=["everloop", "shadow"],
                        help="everloop: only everloop's servers (log on, and off unless --no-nolog); shadow: only "
                             "the shadow row; no peer is installed")
    parser.add_argument("--cells", help="comma-separated subset of the scenarios as ROWSxCONNECTIONS, e.g. 100x16 "
                                        f"(default all: {','.join(f'{r}x{c}' for r, c in SCENARIOS)}; the shadow "
                                        f"row: {','.join(f'{r}x{c}' for r, c in SHADOW_SCENARIOS)})")
    parser.add_argument("--no-nolog", action="store_true", help="skip everloop's log-off run (no logging_cost)")
    parser.add_argument("--no-shadow", action="store_true", help="skip the shadow row")
    parser.add_argument("--shadow-pairs", type=int, default=2, metavar="N",
                        help="the shadow row's (off, on) runs per cell, alternating; medians reported (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (project, logs, bodies)")
    args = parser.parse_args()
    peers = [] if args.only else [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(sorted(unknown))}; choose from {', '.join(PEERS)}")
    scenarios = SCENARIOS
    if args.cells:
        try:
            scenarios = [tuple(int(x) for x in cell.strip().lower().split("x")) for cell in args.cells.split(",")]
        except ValueError:
            scenarios = []
        if not scenarios or not set(scenarios) <= set(SCENARIOS):
            parser.error(f"--cells {args.cells!r}: choose from {','.join(f'{r}x{c}' for r, c in SCENARIOS)}")
    if args.shadow_pairs < 1:
        parser.error(f"--shadow-pairs {args.shadow_pairs}: at least 1")
    if args.only == "shadow" and args.no_shadow:
        parser.error("--only shadow with --no-shadow: nothing to run")
    shadow_row = args.only != "everloop" and not args.no_shadow
    shadow_scenarios = scenarios if args.cells else SHADOW_SCENARIOS
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    warmup = 1.0 if args.quick else 2.0

    def say(text: str) -> None:
        print(text, flush=True)

    wrk = ensure_wrk()
    info = machine()
    say(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM, {info['os']}; "
        f"load average {info['load'][0]:.2f} / {info['load'][1]:.2f} / {info['load'][2]:.2f}")
    if info["load"][0] > 0.5:
        say("  note: the machine is not idle (load average above 0.5): the numbers below will be noisy")
    say(f"wrk: {wrk_version(wrk)}; {seconds:g} s per cell after a {warmup:g} s warm-up; "
        f"threads min(2, connections); OMP_NUM_THREADS=1 for every server")
    mine = venv_versions(sys.executable, ["everloop", "fastapi", "uvicorn", "uvloop", "httptools", "pydantic",
                                          "pandas", "numpy", "scikit-learn"])
    say("everloop venv: " + ", ".join(f"{k} {v}" for k, v in mine.items()))

    packages = peer_packages()
    installs: dict[str, dict] = {}
    broken: dict[str, str] = {}
    for peer in peers:
        pkgs, probe, dists = packages[peer]
        try:
            python, spent = _peers.ensure_venv(peer, pkgs, probe)
        except (subprocess.CalledProcessError, OSError) as exc:
            broken[peer] = f"install failed: {exc}"
            say(f"{peer}: install FAILED ({exc})")
            continue
        installs[peer] = {"install_s": round(spent, 1), "mb": dir_mb(python.parent.parent)}
        versions = venv_versions(python, dists)
        spent_text = f"installed in {spent:.0f} s" if spent else "cached"
        say(f"{peer} venv ({spent_text}, {installs[peer]['mb']} MB): "
            + ", ".join(f"{k} {v}" for k, v in versions.items()))

    work = Path(tempfile.mkdtemp(prefix="everloop-bench-serve-"))
    (work / "wrk").mkdir()
    (work / "logs").mkdir()
    try:
        started = time.perf_counter()
        say("building the model: demo churn data (10,000 rows), ingest, train, promote ...")
        fixture = build_fixture(work)
        say(f"  model v{fixture.model_version} in {time.perf_counter() - started:.0f} s; exported for the peers "
            f"(identical probabilities); {len(fixture.names)} features; {work}")
        if "mlflow" in peers and "mlflow" not in broken:
            try:
                fixture.mlflow_model = save_mlflow_model(fixture, _peers.venv_python("mlflow"))
            except RuntimeError as exc:
                broken["mlflow"] = str(exc)
                say(f"mlflow: {exc}")

        chosen = [] if args.only == "shadow" else [
            s for s in servers() if s.key in peers or s.key == "everloop" or
            (s.key == "everloop_nolog" and not args.no_nolog)]
        labels = {s.key: s.label for s in chosen}
        results: dict[str, dict] = {}
        for server in chosen:
            if server.key in broken:
                results[server.key] = {"error": broken[server.key]}
                continue
            say(f"{server.label}:")
            try:
                results[server.key] = measure(server, fixture, wrk, seconds, warmup, work / "logs", say,
                                              scenarios)
            except Exception as exc:  # noqa: BLE001 - one failing server must not lose the others' numbers
                results[server.key] = {"error": f"{type(exc).__name__}: {exc}"}
                say(f"  {server.key} FAILED: {type(exc).__name__}: {exc}")
        shadow: dict[str, Any] | None = None
        if shadow_row:
            say("the shadow row: a second model version to shadow with (2,000 newer rows, ingest, train) ...")
            started = time.perf_counter()
            try:
                candidate = add_candidate(fixture)
                say(f"  model v{candidate} in {time.perf_counter() - started:.0f} s")
                say("everloop serve --workers 2, shadow rollout off / on:")
                measured = measure_shadow(fixture, candidate, wrk, seconds, warmup, work / "logs", say,
                                          shadow_scenarios, args.shadow_pairs)
                shadow = shadow_summary(measured)
            except Exception as exc:  # noqa: BLE001 - the other rows' numbers are still worth printing
                shadow = {"error": f"{type(exc).__name__}: {exc}"}
                say(f"  shadow FAILED: {type(exc).__name__}: {exc}")

        say("")
        say(f"## Results ({'quick: ' if args.quick else ''}{seconds:g} s per cell; req/s, latency percentiles and "
            f"errors from wrk; rows/s = req/s x rows per request)")
        say("")
        if results:
            say(tables(results, labels, scenarios))
        for key, result in results.items():
            if "error" in result:
                say(f"{key} failed: {result['error']}")
        if shadow and "cells" in shadow:
            say(shadow_table(shadow))
        if args.only == "shadow":
            line = {"bench": "serve", "quick": args.quick, "only": "shadow"}
        else:
            line = headline(results, args.quick, peers)
        if shadow is not None:
            # the headline cell's ratios on top, everything in "shadow"
            cell = shadow.get("cells", {}).get(f"{HEADLINE[0]}x{HEADLINE[1]}", {})
            line["shadow_rps_ratio"], line["shadow_p99_ratio"] = cell.get("rps_ratio"), cell.get("p99_ratio")
            line["shadow"] = shadow
        line["ready_s"] = {k: round(r["ready_s"], 1) for k, r in results.items() if "ready_s" in r}
        line["install"] = installs
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
