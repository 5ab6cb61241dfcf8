import os
from pathlib import Path

import pytest
import sqlalchemy as sa

from everloop.errors import IntegrityError, NotFoundError, StoreError
from everloop.store import ArtifactStore, Store, sha256_bytes


def test_artifacts_are_content_addressed_and_deduplicated(tmp_path: Path):
    artifacts = ArtifactStore(tmp_path)
    digest = artifacts.put(b"hello")
    assert digest == sha256_bytes(b"hello")
    assert artifacts.put(b"hello") == digest
    assert artifacts.get(digest) == b"hello"
    assert not list(tmp_path.rglob(".tmp-*")), "no temporary files are left behind"


def test_tampered_artifact_is_refused(tmp_path: Path):
    artifacts = ArtifactStore(tmp_path)
    digest = artifacts.put(b"model bytes")
    artifacts.path(digest).write_bytes(b"model bytez")
    with pytest.raises(IntegrityError, match="was changed on disk") as info:
        artifacts.get(digest)
    assert info.value.digest == digest


def test_missing_and_malformed_digests(tmp_path: Path):
    artifacts = ArtifactStore(tmp_path)
    with pytest.raises(NotFoundError, match="is missing"):
        artifacts.get("0" * 64)
    with pytest.raises(NotFoundError, match="not a sha256 digest"):
        artifacts.get("../../etc/passwd")


def test_write_failure_leaves_no_partial_blob(tmp_path: Path, monkeypatch):
    artifacts = ArtifactStore(tmp_path)

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        artifacts.put(b"x" * 1000)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_sqlite_store_records_its_format(tmp_path: Path):
    store = Store(tmp_path / ".everloop")
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(store.tables.meta.c.value)).scalar() == "1"
    assert (tmp_path / ".everloop" / "meta.db").exists()


def test_store_refuses_a_newer_format(tmp_path: Path):
    store = Store(tmp_path)
    with store.engine.begin() as conn:
        conn.execute(store.tables.meta.update().values(value="99"))
    store.close()
    with pytest.raises(StoreError, match="store format 99 is not supported"):
        Store(tmp_path)


def test_bad_database_url_is_a_clear_error(tmp_path: Path):
    with pytest.raises(StoreError, match="cannot be opened"):
        Store(tmp_path, "postgresql+psycopg://nobody:secret@127.0.0.1:1/none")


def test_postgresql_store(tmp_path: Path, pg_url: str):
    store = Store(tmp_path, pg_url)
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(store.tables.meta.c.value)).scalar() == "1"
    store.close()


def test_a_store_from_before_new_nullable_columns_gets_them(tmp_path):
    import sqlalchemy as sa

    store = Store(tmp_path / "s")
    with store.engine.begin() as conn:  # as an older build made it
        conn.execute(sa.text("DROP INDEX ix_monitor_runs_window"))
        conn.execute(sa.text("ALTER TABLE monitor_runs DROP COLUMN window_key"))
        conn.execute(sa.text("ALTER TABLE monitor_runs DROP COLUMN complete"))
        conn.execute(sa.text("ALTER TABLE service_stats DROP COLUMN refused_predictions"))
    store.close()
    again = Store(tmp_path / "s")
    columns = {c["name"] for c in sa.inspect(again.engine).get_columns("monitor_runs")}
    assert {"window_key", "complete"} <= columns
    assert "refused_predictions" in {c["name"] for c in sa.inspect(again.engine).get_columns("service_stats")}
    again.close()
