"""The SQL source, on SQLite and on the machine's PostgreSQL."""

import pandas as pd
import pytest
import sqlalchemy as sa

from everloop import data
from everloop.errors import DataError
from everloop.spec import parse_spec
from everloop.store import Store


def _spec(url: str, query: str = "SELECT * FROM customers"):
    return parse_spec({"name": "sql", "data": {"source": {"url": url, "query": query}, "target": "churned",
                                               "id": "customer_id", "timestamp": "event_time"}})


def _load(url: str, frame: pd.DataFrame) -> None:
    engine = sa.create_engine(url)
    frame.to_sql("customers", engine, index=False, if_exists="replace")
    engine.dispose()


def _check(tmp_path, url: str, frame: pd.DataFrame) -> None:
    store = Store(tmp_path / ".everloop")
    spec = _spec(url)
    version = data.ingest(store, spec)
    assert version.rows == len(frame) and version.source.startswith("sql: SELECT")
    stored = data.load_frame(store, version)
    assert stored["monthly_charges"].sum() == pytest.approx(frame["monthly_charges"].sum())
    again = data.ingest(store, spec)
    assert again.deduplicated
    with pytest.raises(DataError, match="sql source: the query failed"):
        data.ingest(store, _spec(url, "SELECT * FROM no_such_table"))


def test_sqlite_source(tmp_path, project):
    frame = pd.read_csv(project / "data" / "customers.csv")
    url = f"sqlite:///{tmp_path / 'source.db'}"
    _load(url, frame)
    _check(tmp_path, url, frame)


def test_postgresql_source(tmp_path, project, pg_url):
    frame = pd.read_csv(project / "data" / "customers.csv")
    _load(pg_url, frame)
    _check(tmp_path, pg_url, frame)


def test_unusable_url(tmp_path):
    with pytest.raises(DataError, match="sql source"):
        data.ingest(Store(tmp_path), _spec("nosuchdialect://x/y"))
