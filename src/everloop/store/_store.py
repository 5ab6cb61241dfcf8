"""The store: one metadata database plus the artifacts (a folder, or object storage with the
folder as its cache), opened from the project folder."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa

from everloop.errors import StoreError
from everloop.store import _meta
from everloop.store._artifacts import ARTIFACTS_URL_ENV, ArtifactStore

STORE_DIR = ".everloop"
DB_URL_ENV = "EVERLOOP_DB_URL"


class Store:
    """Metadata (SQLAlchemy) + content-addressed artifacts. Stages talk to each other only through it."""

    tables = _meta

    def __init__(self, root: str | Path, db_url: str | None = None,
                 artifacts_url: str | None = None):
        """Open the store in the folder `root`: metadata at `db_url` (else `EVERLOOP_DB_URL`, else
        SQLite in `root`), artifacts at `artifacts_url` (else `EVERLOOP_ARTIFACTS_URL`, else
        `root/artifacts`; with a URL, `root/artifacts` is its read-through cache). Temporary files
        killed writers left in the artifact folder are removed (`ArtifactStore.sweep_temp`; their
        paths in `.swept`). Raises StoreError for a database that cannot be opened or an artifact
        URL that cannot be used."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifacts = ArtifactStore(self.root / "artifacts",
                                       artifacts_url or os.environ.get(ARTIFACTS_URL_ENV) or None)
        self.db_url = db_url or os.environ.get(DB_URL_ENV) or f"sqlite:///{self.root / 'meta.db'}"
        try:
            self.engine = _meta.make_engine(self.db_url)
            self._create_tables()
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"metadata database {_redact(self.db_url)} cannot be opened: {exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0]}") from None
        # A killed ingest or artifact write leaves its temporary file (tens of MB) behind: gone now.
        self.swept = self.artifacts.sweep_temp()

    @classmethod
    def for_project(cls, project_dir: str | Path, db_url: str | None = None,
                    artifacts_url: str | None = None) -> "Store":
        return cls(Path(project_dir) / STORE_DIR, db_url, artifacts_url)

    def _create_tables(self, attempts: int = 5) -> None:
        """Create the missing tables and check the store's format. Two processes opening a new store
        at once both find a table missing and both create it: the loser's "already exists" (or, on
        PostgreSQL, a duplicate key in its catalog) means the other made it, so look again."""
        for attempt in range(attempts):
            try:
                _meta.metadata.create_all(self.engine)
                self._check_format()
                return
            except sa.exc.SQLAlchemyError as exc:
                if attempt == attempts - 1 or not _created_meanwhile(exc):
                    raise
                time.sleep(0.05 * (attempt + 1))

    def write_lock(self, conn: sa.Connection) -> None:
        """Take the store's write lock for the rest of `conn`'s transaction: whoever takes it next waits
        until this transaction ends, then reads what it wrote. For work that reads, then writes on what
        it read (two ingests of one file: the second finds the first's version). SQLite: the database's
        one write lock (waits up to its busy timeout, 30 s); PostgreSQL: a row lock on the format row."""
        table = _meta.meta
        conn.execute(table.update().where(table.c.key == "format").values(value=table.c.value))

    def _check_format(self) -> None:
        table = _meta.meta
        with self.engine.begin() as conn:
            found = conn.execute(sa.select(table.c.value).where(table.c.key == "format")).scalar()
            if found is None:
                conn.execute(table.insert().values(key="format", value=_meta.FORMAT_VERSION))
            elif found != _meta.FORMAT_VERSION:
                raise StoreError(f"store format {found} is not supported by this everloop (format {_meta.FORMAT_VERSION})")
        inspector = sa.inspect(self.engine)
        for table in _meta.metadata.sorted_tables:
            missing = [c for c in table.columns if c.name not in {c["name"] for c in inspector.get_columns(table.name)}]
            if missing and all(c.nullable for c in missing):  # added since: older rows simply have none
                with self.engine.begin() as conn:
                    for column in missing:
                        ddl = sa.schema.CreateColumn(column).compile(dialect=self.engine.dialect)
                        conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {ddl}"))
                    for index in table.indexes:
                        if any(c in index.columns.values() for c in missing):
                            index.create(conn, checkfirst=True)
            elif missing:
                raise StoreError(f"the store's table {table.name!r} lacks columns {sorted(c.name for c in missing)}: "
                                 "it was made by an older development build of everloop; move .everloop/ aside and "
                                 "ingest again")
            if table.indexes:  # an index added since the store was made (create_all skips existing tables)
                have = {i["name"] for i in inspector.get_indexes(table.name)}
                for index in table.indexes:
                    if index.name not in have:
                        with self.engine.begin() as conn:
                            index.create(conn, checkfirst=True)

    def put_frame(self, frame: pd.DataFrame) -> str:
        """Store a frame as a Parquet artifact (index dropped) and return its digest."""
        buffer = io.BytesIO()
        frame.reset_index(drop=True).to_parquet(buffer, index=False)
        return self.artifacts.put(buffer.getvalue())

    def get_frame(self, digest: str) -> pd.DataFrame:
        """A frame stored by `put_frame`, verified against its digest."""
        return pd.read_parquet(io.BytesIO(self.artifacts.get(digest)))

    def put_json(self, obj: Any) -> str:
        return self.artifacts.put(json.dumps(obj, sort_keys=True, default=str).encode())

    def get_json(self, digest: str) -> Any:
        return json.loads(self.artifacts.get(digest))

    def close(self) -> None:
        self.engine.dispose()


def _created_meanwhile(exc: sa.exc.SQLAlchemyError) -> bool:
    """Did creating a table, index, column or the format row fail because another process just did?"""
    text = str(getattr(exc, "orig", None) or exc).lower()
    return isinstance(exc, sa.exc.IntegrityError) or any(
        words in text for words in ("already exists", "duplicate column", "duplicate key"))


def _redact(url: str) -> str:
    from everloop.spec._secrets import redact_url  # the store is below the spec: imported when an error is shown

    return redact_url(url)
