"""Secrets: redacted wherever a URL is logged, scrubbed from the spec every manifest stores, kept in
the environment as `${NAME}` references (issue 15, fault 10); the documented SQL source parses (fault 12)."""

import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from everloop import data, train
from everloop.errors import SpecError
from everloop.monitor import _monitor
from everloop.spec import SqlSource, parse_spec, redact_text, redact_url, resolve_env, scrub_spec
from everloop.store import Store
from everloop.train._reproduce import _source_hint

DOCS = Path(__file__).parents[2] / "docs"
PASSWORD, TOKEN = "S3cret-Pw-123", "T0ken-xyz-789"
PG_SOURCE = f"postgresql+psycopg://bob:{PASSWORD}@db.example.com:5432/sales?sslmode=require"
HOOK = f"https://hooks.example.com/everloop?channel=ml&token={TOKEN}"


@pytest.mark.parametrize(("url", "shown"), [
    (PG_SOURCE, "postgresql+psycopg://bob:***@db.example.com:5432/sales?sslmode=require"),
    (HOOK, "https://hooks.example.com/everloop?channel=ml&token=***"),
    ("https://h.example/x?api_key=a&access_token=b&X-Amz-Signature=c&sig=d&page=2#top",
     "https://h.example/x?api_key=***&access_token=***&X-Amz-Signature=***&sig=***&page=2#top"),
    ("postgresql://bob:pa/ss@db/x", "postgresql://bob:***@db/x"),  # an unencoded / in the password
    ("postgresql://bob:${PG_PASSWORD}@db/x", "postgresql://bob:${PG_PASSWORD}@db/x"),  # a reference holds none
    ("postgresql://bob@db/x?password=pw", "postgresql://bob@db/x?password=***"),
    ("sqlite:///data/sales.db", "sqlite:///data/sales.db"),
    ("data/customers.csv", "data/customers.csv"),
])
def test_a_url_is_shown_with_its_secrets_redacted(url, shown):
    assert redact_url(url) == shown


def test_urls_inside_a_message_are_redacted():
    message = f"Client error '403 Forbidden' for url '{HOOK}' (via {PG_SOURCE})"
    assert redact_text(message) == ("Client error '403 Forbidden' for url "
                                    "'https://hooks.example.com/everloop?channel=ml&token=***' (via "
                                    "postgresql+psycopg://bob:***@db.example.com:5432/sales?sslmode=require)")


def test_a_stored_spec_names_variables_instead_of_holding_secrets():
    source = {"url": PG_SOURCE, "query": "SELECT 1"}
    body = parse_spec({"name": "churn", "data": {"source": source, "target": "y"},
                       "monitoring": {"webhook": HOOK}}).model_dump(mode="json")
    scrubbed = scrub_spec(body)
    assert scrubbed["data"]["source"]["url"] == ("postgresql+psycopg://bob:${EVERLOOP_SQL_PASSWORD}"
                                                 "@db.example.com:5432/sales?sslmode=require")
    assert scrubbed["monitoring"]["webhook"] == ("https://hooks.example.com/everloop?channel=ml"
                                                 "&token=${EVERLOOP_WEBHOOK_TOKEN}")
    assert body["data"]["source"]["url"] == PG_SOURCE, "the spec in use keeps its value"
    assert parse_spec(scrubbed).data.source.query == "SELECT 1", "the stored form is a valid project file"


def test_references_are_resolved_from_the_environment_where_used(monkeypatch):
    source = SqlSource(url="postgresql+psycopg://bob:${PG_PASSWORD}@db/sales", query="SELECT 1")
    monkeypatch.delenv("PG_PASSWORD", raising=False)
    with pytest.raises(SpecError) as missing:
        source.resolved_url()
    assert str(missing.value).startswith("data.source.url needs the environment variable PG_PASSWORD, which is "
                                         "not set; set it to the secret")
    monkeypatch.setenv("PG_PASSWORD", PASSWORD)
    assert source.resolved_url() == f"postgresql+psycopg://bob:{PASSWORD}@db/sales"
    assert source.url == "postgresql+psycopg://bob:${PG_PASSWORD}@db/sales", "the spec keeps the reference"
    assert resolve_env("no reference", "x") == "no reference"


def test_a_malformed_reference_is_refused_naming_the_field():
    with pytest.raises(SpecError) as bad:
        parse_spec({"name": "churn", "data": {"source": "d.csv", "target": "y"},
                    "monitoring": {"webhook": "https://h/x?token=${HOOK TOKEN}"}})
    assert bad.value.problems == [
        "monitoring.webhook: '${' starts a reference to an environment variable: write ${NAME}, NAME made of "
        "letters, digits and '_' (got 'https://h/x?token=${HOOK TOKEN}')"]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request) -> str | None:
    return None if request.param == "sqlite" else request.getfixturevalue("pg_url")


def test_no_secret_of_the_project_file_reaches_the_store(trained, store_url, monkeypatch):
    folder, spec, store = trained
    if store_url:  # the same project on a PostgreSQL store
        store = Store.for_project(folder / "pg", store_url)
        data.ingest(store, spec, base=folder)
    raw = spec.model_dump(mode="json")
    raw["data"]["source"] = {"url": PG_SOURCE, "query": "SELECT * FROM customers"}
    raw["monitoring"]["webhook"] = HOOK
    version = train.train(store, parse_spec(raw)).version  # the data: the dataset version already stored

    t = store.tables.models
    with store.engine.connect() as conn:
        stored = conn.execute(sa.select(sa.cast(t.c.manifest, sa.Text)).where(t.c.version == version)).scalar()
    assert PASSWORD in json.dumps(raw) and TOKEN in json.dumps(raw)
    assert PASSWORD not in stored and TOKEN not in stored
    recorded = json.loads(stored)["spec"]
    assert recorded["data"]["source"]["url"].startswith("postgresql+psycopg://bob:${EVERLOOP_SQL_PASSWORD}@")
    assert recorded["monitoring"]["webhook"].endswith("token=${EVERLOOP_WEBHOOK_TOKEN}")
    if store_url:
        store.close()
        return
    for path in store.root.rglob("*"):  # every byte of the store's folder: the SQLite database, the artifacts
        if path.is_file():
            content = path.read_bytes()
            assert PASSWORD.encode() not in content and TOKEN.encode() not in content, path
    # the scrubbed record still reproduces the model: retraining reads the stored dataset, no secret
    monkeypatch.delenv("EVERLOOP_SQL_PASSWORD", raising=False)
    report = train.reproduce(store, version)
    assert report.identical and not report.problems


def test_a_reference_is_stored_as_written_and_named_when_the_data_is_gone():
    url = "postgresql+psycopg://bob:${PG_PASSWORD}@db/sales?token=${DB_TOKEN}"
    body = parse_spec({"name": "churn", "data": {"source": {"url": url, "query": "SELECT 1"}, "target": "y"}})
    scrubbed = scrub_spec(body.model_dump(mode="json"))
    assert scrubbed["data"]["source"]["url"] == url
    # what `reproduce` adds when the dataset is gone: the source, and which variables to set to ingest it
    assert _source_hint({"spec": scrubbed}) == (f"; its source was {url} (to ingest it again, set the "
                                                "environment variables PG_PASSWORD, DB_TOKEN)")


class _Refusing(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - the http.server API
        self.send_response(403)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_hook():
    """A local webhook answering every POST 403: its URL (http://127.0.0.1:PORT/alerts)."""
    server = HTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/alerts"
    server.shutdown()


@pytest.mark.parametrize("down", [True, False], ids=["nothing-listens", "answers-403"])
def test_a_failed_delivery_logs_the_webhook_without_its_secrets(refusing_hook, caplog, down):
    base = "http://127.0.0.1:9/alerts" if down else refusing_hook
    url = base.replace("http://", f"http://ops:{PASSWORD}@") + f"?token={TOKEN}"
    spec = parse_spec({"name": "churn", "data": {"source": "d.csv", "target": "y"},
                       "monitoring": {"webhook": url}})
    with caplog.at_level(logging.WARNING, logger=_monitor.log.name):
        assert _monitor.send_alert(spec, {"alerts": ["drift"]}) is False
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"alert webhook {redact_url(url)} failed: ")
    assert "ops:***@127.0.0.1" in line and "token=***" in line
    assert PASSWORD not in line and TOKEN not in line
    if not down:  # httpx's message repeats the URL: redacted as well
        assert "403 Forbidden" in line and line.count("token=***") == 2


def test_a_webhook_reference_is_read_from_the_environment_when_sending(webhook, caplog, monkeypatch):
    url, received = webhook
    spec = parse_spec({"name": "churn", "data": {"source": "d.csv", "target": "y"},
                       "monitoring": {"webhook": url + "?token=${HOOK_TOKEN}"}})
    monkeypatch.delenv("HOOK_TOKEN", raising=False)
    with caplog.at_level(logging.WARNING, logger=_monitor.log.name):
        assert _monitor.send_alert(spec, {"alerts": ["drift"]}) is False
    assert caplog.records[0].getMessage().startswith(
        "alert not sent: monitoring.webhook needs the environment variable HOOK_TOKEN, which is not set")
    monkeypatch.setenv("HOOK_TOKEN", TOKEN)
    assert _monitor.send_alert(spec, {"alerts": ["drift"]}) is True
    assert received == [{"alerts": ["drift"]}]


def test_the_documented_sql_source_parses():
    """docs/data.md's example is a valid `data` section: `source: {url, query}`, no `sql:` key (fault 12)."""
    text = (DOCS / "data.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "query:" in b)
    spec = parse_spec({"name": "sales"} | yaml.safe_load(block))
    assert isinstance(spec.data.source, SqlSource)
    assert spec.data.source.url == "postgresql+psycopg://reader:${PG_PASSWORD}@db.internal:5432/sales"
    for doc in ("data.md", "project-file.md"):
        assert "sql: {" not in (DOCS / doc).read_text(), f"docs/{doc} still writes a SQL source as sql: {{...}}"


class _Planted:
    """A pickle that runs code when it is loaded: it writes a file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.write_text, (self.path, "ran")


def test_the_store_is_trusted_like_code(tmp_path):
    """docs/security.md: an artifact is verified against the sha256 the database records, so a writer
    of the artifacts alone is refused (tests/store/test_store.py), but a writer of both the artifacts
    and the database can have a pickle of their own loaded, and its code runs."""
    import pickle

    from everloop.errors import IntegrityError, StoreError
    from everloop.train._artifact import load_artifact

    store, ran = Store(tmp_path / "store"), tmp_path / "ran.txt"
    digest = store.artifacts.put(pickle.dumps(_Planted(ran)))  # the recorded hash matches the planted bytes
    with pytest.raises(StoreError, match="is not an everloop model"):
        load_artifact(store, digest, {}, None)
    assert ran.read_text() == "ran", "the pickle's code ran before everloop could tell it was no model"
    ran.unlink()
    genuine = store.artifacts.put(b"recorded bytes")  # a writer of the artifacts alone: the hash refuses it
    store.artifacts.path(genuine).write_bytes(pickle.dumps(_Planted(ran)))
    with pytest.raises(IntegrityError):
        load_artifact(store, genuine, {}, None)
    assert not ran.exists()
    store.close()


def test_the_service_listens_on_loopback_by_default():
    import inspect

    from everloop.cli._app import serve

    assert inspect.signature(serve).parameters["host"].default.default == "127.0.0.1"


def test_every_test_docs_security_md_names_exists():
    """Each promise of docs/security.md points at a test: the named tests must exist."""
    named = re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", (DOCS / "security.md").read_text())
    assert len(named) >= 8
    root = DOCS.parent
    for path, name in named:
        assert f"def {name}(" in (root / path).read_text(), f"docs/security.md names {path}::{name}"
