"""The registry suite runs on SQLite and on PostgreSQL."""

import pytest

from tests.conftest import TEMPLATES, promoted_v1


@pytest.fixture(params=["sqlite", "postgresql"])
def trained(request, project):
    """A project with one model in production, on each database: (folder, spec, store); a copy of the
    session's template for that database (tests/conftest.py `StoreTemplates`)."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    spec, store = TEMPLATES.clone(project, url, promoted_v1)
    yield project, spec, store
    store.close()
