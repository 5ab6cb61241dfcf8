"""The registry suite runs on SQLite and on PostgreSQL."""

import pytest

from everloop import data, registry, train
from everloop.spec import load_spec
from everloop.store import Store


@pytest.fixture(params=["sqlite", "postgresql"])
def trained(request, project):
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    spec = load_spec(project)
    store = Store.for_project(project, url)
    data.ingest(store, spec, base=project)
    registry.promote(store, spec, train.train(store, spec).version)
    yield project, spec, store
    store.close()
