"""Shared fixtures: small generated projects (fixed seeds), trained stores built once a session and copied
for each test (`StoreTemplates`), a fresh PostgreSQL schema per test, and a real S3-compatible server
(moto's standalone server in a subprocess on a loopback port, never an in-process mock) with a fresh
bucket per test and dummy credentials."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import sqlalchemy as sa
import yaml

from everloop import data, registry, train
from everloop.demo import demo_spec, make_churn
from everloop.serve import free_port
from everloop.spec import load_spec
from everloop.store import Store

PG_URL = os.environ.get("EVERLOOP_TEST_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")


@functools.lru_cache(maxsize=16)
def _churn_csv(rows: int, seed: int) -> str:
    """make_churn(rows, seed) as CSV text: the same every time (a fixed seed), generated once a session."""
    return make_churn(rows, seed=seed).to_csv(index=False)


def write_project(folder: Path, rows: int = 2000, seed: int = 3, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "customers.csv").write_text(_churn_csv(rows, seed))
    spec = demo_spec()
    spec["monitoring"]["window"]["rows"] = 1000
    spec["model"]["params"] = {"max_iter": 50}
    for key, value in overrides.items():
        spec[key] = value
    (folder / "everloop.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


def served_project(folder: Path, rows: int = 2000, db_url: str | None = None) -> tuple[Path, object, Store]:
    """A project with its data ingested and one model trained and promoted: (folder, spec, store).
    The store is a copy of one built once a session for the same files and database (`TEMPLATES`)."""
    write_project(folder, rows=rows)
    spec, store = TEMPLATES.clone(folder, db_url, promoted_v1)
    return folder, spec, store


# -- trained stores: built once a session, copied for each test -----------------------------------


def promoted_v1(folder: Path, spec, store: Store) -> None:
    """The usual start: the project's data ingested, one model trained and promoted (as production v1)."""
    data.ingest(store, spec, base=folder)
    registry.promote(store, spec, train.train(store, spec).version)


def prior_model(spec):
    """`spec` with a model that ignores the features: the class prior for every row."""
    return spec.model_copy(update={"model": spec.model.model_copy(
        update={"estimator": "sklearn.dummy.DummyClassifier", "params": {"strategy": "prior"}})})


def promoted_v1_and_candidates(folder: Path, spec, store: Store) -> None:
    """`promoted_v1`, then v2 the same model retrained (a good candidate: passes the gate) and v3 a model
    that ignores the features (`prior_model`, a bad one)."""
    promoted_v1(folder, spec, store)
    assert train.train(store, spec).version == 2
    assert train.train(store, prior_model(spec)).version == 3


class StoreTemplates:
    """Stores built once a session and copied into each test's own project folder and database.

    Training costs seconds a test; a copy, milliseconds. `clone(folder, db_url, build)` runs `build(folder,
    spec, store)` once per (files of `folder`, database kind, `build`) in a template folder of its own, then
    gives every caller a private copy: the template's `.everloop/` copied into `folder` (the SQLite database
    with it), or on PostgreSQL its rows inserted into the caller's own (empty) schema, sequences moved past
    them. Times (float `*_at` columns) are shifted so the newest template row is now, as if built just now;
    copied files are dated now too. No caller sees another's writes: the template is never written after
    it is built. The store is built the slow way, in `folder` itself, where a copy could differ from a
    build: `EVERLOOP_DB_URL` or `EVERLOOP_ARTIFACTS_URL` set, a `.everloop/` already in `folder`, or a
    database other than SQLite in the folder or a schema of the test server (`PG_URL`)."""

    def __init__(self) -> None:
        self.root: Path | None = None
        self.built: dict[tuple, _Template] = {}
        self.schemas: list[str] = []

    def clone(self, folder: Path, db_url: str | None,
              build: Callable[[Path, Any, Store], None]) -> tuple[Any, Store]:
        """`folder` (a project already written) with the store `build` (a module-level function, named in
        the key) makes in it, its metadata at `db_url` (None: SQLite in the folder): (spec, store)."""
        kind = "sqlite" if db_url is None else "postgresql" if _pg_schema(db_url) else None
        if (kind is None or (folder / ".everloop").exists()
                or any(os.environ.get(name) for name in ("EVERLOOP_DB_URL", "EVERLOOP_ARTIFACTS_URL"))):
            spec, store = load_spec(folder), Store.for_project(folder, db_url)
            build(folder, spec, store)
            return spec, store
        key = (kind, f"{build.__module__}.{build.__qualname__}", _files_digest(folder))
        if key not in self.built:
            self.built[key] = self._build(folder, kind, build)
        template = self.built[key]
        shutil.copytree(template.folder / ".everloop", folder / ".everloop", copy_function=shutil.copy)
        store = Store.for_project(folder, db_url)
        tables = [t for t in store.tables.metadata.sorted_tables if t.name in template.tables]
        if template.schema is not None:
            _copy_rows(store, template.schema, tables)
        _shift_times(store, tables, time.time() - template.built_at)
        return load_spec(folder), store

    def _build(self, folder: Path, kind: str, build) -> _Template:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="everloop-templates-"))
        template = Path(tempfile.mkdtemp(dir=self.root)) / folder.name  # a build that failed leaves its own
        shutil.copytree(folder, template)
        url = None
        if kind == "postgresql":
            schema = f"tmpl_{uuid.uuid4().hex[:12]}"
            _pg_execute(f"CREATE SCHEMA {schema}")
            self.schemas.append(schema)
            url = _schema_url(schema)
        store = Store.for_project(template, url)
        try:
            build(template, load_spec(template), store)
            with store.engine.connect() as conn:
                tables = {t.name for t in store.tables.metadata.sorted_tables
                          if conn.execute(sa.select(sa.func.count()).select_from(t)).scalar()}
        finally:
            store.close()  # SQLite: the last connection gone, its write-ahead log is folded into meta.db
        if url is None and str(template).encode() in (template / ".everloop" / "meta.db").read_bytes():
            raise RuntimeError(f"the store built by {build.__qualname__} names its folder {template}: a copy "
                               "would point at the template; build it in each test instead")
        return _Template(template, _pg_schema(url) if url else None, frozenset(tables), time.time())

    def close(self) -> None:
        """Remove the template folders and PostgreSQL schemas."""
        for schema in self.schemas:
            _pg_execute(f"DROP SCHEMA {schema} CASCADE")
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        self.root, self.built, self.schemas = None, {}, []


@dataclass(frozen=True)
class _Template:
    """A built store: its project folder, its PostgreSQL schema (None: SQLite in the folder), the tables
    that hold rows, and when it was built (epoch seconds)."""

    folder: Path
    schema: str | None
    tables: frozenset[str]
    built_at: float


TEMPLATES = StoreTemplates()


@pytest.fixture(scope="session", autouse=True)
def _store_templates() -> Iterator[StoreTemplates]:
    """The session's store templates, removed when it ends."""
    yield TEMPLATES
    TEMPLATES.close()


def _files_digest(folder: Path) -> str:
    """One hash of every file under `folder`: its path and its bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}\0{path.stat().st_size}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _schema_url(schema: str) -> str:
    """`PG_URL` with its search_path set to `schema`, as `pg_url` gives."""
    return f"{PG_URL}?options=-csearch_path%3D{schema}"


def _pg_schema(url: str) -> str | None:
    """The schema of a URL made by `_schema_url`; None for any other URL."""
    prefix = _schema_url("")
    schema = url[len(prefix):] if url.startswith(prefix) else ""
    return schema if schema.isidentifier() else None


def _pg_execute(statement: str) -> None:
    engine = sa.create_engine(PG_URL)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def _copy_rows(store: Store, schema: str, tables: list) -> None:
    """Make `store`'s `tables` hold the rows of the template `schema`'s (same database), then move each
    serial column's sequence past the copied values, as inserting them one by one would have."""
    with store.engine.begin() as conn:
        for table in tables:
            columns = ", ".join(f'"{c.name}"' for c in table.columns)
            conn.execute(table.delete())  # opening the store wrote its format row: the template's replaces it
            conn.execute(sa.text(f'INSERT INTO "{table.name}" ({columns}) '
                                 f'SELECT {columns} FROM {schema}."{table.name}"'))
            for column in table.primary_key.columns:
                if isinstance(column.type, sa.Integer):
                    name = f'"{column.name}"'
                    conn.execute(sa.text(
                        f'SELECT setval(seq, COALESCE((SELECT MAX({name}) FROM "{table.name}"), 0) + 1, false) '
                        f"""FROM pg_get_serial_sequence('"{table.name}"', '{column.name}') AS seq """
                        "WHERE seq IS NOT NULL"))


def _shift_times(store: Store, tables: list, seconds: float) -> None:
    """Add `seconds` to every time (a float column named `*_at`) in `store`'s `tables`."""
    with store.engine.begin() as conn:
        for table in tables:
            times = {c.name: c + seconds for c in table.columns
                     if c.name.endswith("_at") and isinstance(c.type, sa.Float)}
            if times:
                conn.execute(table.update().values(times))


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
    # shutdown() waits for the loop's next poll: at the default 0.5 s, half a second per test
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/alerts", received
    server.shutdown()
    server.server_close()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write_project(tmp_path / "proj")


@pytest.fixture
def trained(project: Path):
    """A project with one ingested dataset and one model in production: (folder, spec, store); a copy of
    the session's template for the same files."""
    spec, store = TEMPLATES.clone(project, None, promoted_v1)
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
    yield _schema_url(schema)
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
