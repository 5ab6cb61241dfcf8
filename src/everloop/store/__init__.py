"""Metadata (SQLAlchemy: SQLite by default, PostgreSQL by URL) and content-addressed artifacts."""

from everloop.store._artifacts import ArtifactStore, sha256_bytes
from everloop.store._store import DB_URL_ENV, STORE_DIR, Store

__all__ = ["ArtifactStore", "DB_URL_ENV", "STORE_DIR", "Store", "sha256_bytes"]
