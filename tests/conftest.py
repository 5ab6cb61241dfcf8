"""Shared fixtures: small generated projects (fixed seeds), and a fresh PostgreSQL schema per test."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import yaml

from everloop import data, registry, train
from everloop.demo import demo_spec, make_churn
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
