"""Shared fixtures: small generated projects (fixed seeds), a fresh PostgreSQL schema per test, and a
real S3-compatible server (moto's standalone server in a subprocess on a loopback port, never an
in-process mock) with a fresh bucket per test and dummy credentials."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from everloop import data, registry, train
from everloop.demo import demo_spec, make_churn
from everloop.serve import free_port
from everloop.spec import load_spec
from everloop.store import Store

PG_URL = os.environ.get("EVERLOOP_TEST_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")


def write_project(folder: Path, rows: int = 2000, seed: int = 3, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    make_churn(rows, seed=seed).to_csv(folder / "data" / "customers.csv", index=False)
    spec = demo_spec()
    spec["monitoring"]["window"]["rows"] = 1000
    spec["model"]["params"] = {"max_iter": 50}
    for key, value in overrides.items():
        spec[key] = value
    (folder / "everloop.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


def served_project(folder: Path, rows: int = 2000, db_url: str | None = None) -> tuple[Path, object, Store]:
    """A project with its data ingested and one model trained and promoted: (folder, spec, store)."""
    write_project(folder, rows=rows)
    spec, store = load_spec(folder), Store.for_project(folder, db_url)
    data.ingest(store, spec, base=folder)
    registry.promote(store, spec, train.train(store, spec).version)
    return folder, spec, store


def copy_of_v1(store: Store) -> int:
    """A new model version holding model v1's artifact again: a candidate that passes the gate against
    v1 (no loss), cheaper than training one more. Returns its version."""
    t = store.tables.models
    with store.engine.begin() as conn:
        v1 = conn.execute(t.select().where(t.c.version == 1)).first()
        return conn.execute(t.insert().values(dataset_version=v1.dataset_version, artifact=v1.artifact,
                                              manifest=v1.manifest, metric=v1.metric, value=v1.value,
                                              reason="a copy of v1").returning(t.c.version)).scalar_one()


def wait_for(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll `check` until it returns something truthy, and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"{what} did not happen within {timeout:g}s")


def feature_rows(frame) -> list[dict]:
    """Rows of a churn frame as request bodies: the features only, JSON types."""
    return json.loads(frame.drop(columns=["customer_id", "event_time", "churned"]).to_json(orient="records"))


def send_traffic(client, rows, labels: bool = True, **overrides) -> None:
    """POST a churn frame to a service in batches of 250 (with `overrides` in every row), send its labels
    to /feedback unless `labels` is False, and wait until the prediction log has written it all."""
    features = feature_rows(rows)
    for row in features:
        row.update(overrides)
    for start in range(0, len(rows), 250):
        answer = client.post("/predict", json={"instances": features[start:start + 250]}).json()
        if labels:
            truth = rows["churned"].iloc[start:start + 250].tolist()
            client.post("/feedback", json={"labels": [{"id": p["id"], "label": y}
                                                      for p, y in zip(answer["predictions"], truth)]})
    client.app.state.log.flush()


@pytest.fixture
def client(trained):
    """An in-process client of the service of the `trained` project, with .spec and .store attached."""
    from fastapi.testclient import TestClient

    from everloop.serve import create_app

    folder, spec, store = trained
    with TestClient(create_app(folder, watch=False)) as client:
        client.spec, client.store = spec, store
        yield client


@pytest.fixture
def webhook():
    """A local HTTP server that records every JSON body POSTed to it: (url, received)."""
    received: list = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/alerts", received
    server.shutdown()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write_project(tmp_path / "proj")


@pytest.fixture
def trained(project: Path):
    """A project with one ingested dataset and one model in production: (folder, spec, store)."""
    spec = load_spec(project)
    store = Store.for_project(project)
    data.ingest(store, spec, base=project)
    version = train.train(store, spec).version
    registry.promote(store, spec, version)
    yield project, spec, store
    store.close()


@pytest.fixture
def pg_url() -> str:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards.
    Skipped when no server answers, except under CI=true, where that is a failure."""
    sa = pytest.importorskip("sqlalchemy")
    engine = sa.create_engine(PG_URL)
    try:
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001 - any connection problem
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG_URL} is required under CI=true: {exc}")
        pytest.skip(f"no PostgreSQL at {PG_URL}")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


@dataclass
class Run:
    """What one `everloop ...` command gave: exit code and output."""

    code: int
    out: str
    err: str


@pytest.fixture
def everloop(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Run]:
    """Run the real entry point `main()` in-process, as `everloop ARGS` typed in `cwd`: its exit code and
    output. An exception main() lets through (a traceback for the user) fails the test."""
    from everloop.cli import main

    def run(*args: str, cwd: Path | None = None) -> Run:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["everloop", *args])
        if cwd is not None:
            monkeypatch.chdir(cwd)
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = 0 if exc.code is None else int(exc.code)
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


# -- object storage -------------------------------------------------------------------------------

REGION = "us-east-1"


@contextlib.contextmanager
def moto_server(log: Path, **env: str) -> Iterator[str]:
    """Run `python -m moto.server` on 127.0.0.1 until the block ends; yields its endpoint URL.
    `env` joins the server's environment (INITIAL_NO_AUTH_ACTION_COUNT=0: it checks credentials)."""
    for module in ("moto.server", "s3fs", "boto3"):
        try:
            __import__(module)
        except ImportError as exc:
            if os.environ.get("CI") == "true":  # scripts/setup installs them: a skip would hide it
                pytest.fail(f"{module} is required under CI=true: {exc}")
            pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")
    port = free_port()
    server_env = {k: v for k, v in os.environ.items() if k != "INITIAL_NO_AUTH_ACTION_COUNT"} | env
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=server_env)
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The endpoint URL of one moto server shared by the whole session."""
    with moto_server(tmp_path_factory.mktemp("moto") / "server.log") as endpoint:
        yield endpoint


def use_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point the standard AWS environment at `endpoint` with dummy credentials, and nowhere else: no
    profile or credentials file of this machine, no instance metadata lookup."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@dataclass
class Bucket:
    """A fresh bucket on the moto server: `url` is `s3://<name>/artifacts`; `client`, boto3's."""

    name: str
    url: str
    endpoint: str
    client: Any

    def key(self, digest: str) -> str:
        """The object key under which everloop stores `digest`."""
        return f"artifacts/{digest[:2]}/{digest}"


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """A fresh bucket, with the standard AWS environment pointed at the moto server."""
    import boto3

    use_endpoint(monkeypatch, s3_endpoint)
    name = f"everloop-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION)
    client.create_bucket(Bucket=name)
    return Bucket(name, f"s3://{name}/artifacts", s3_endpoint, client)
