"""Metadata (SQLAlchemy: SQLite by default, PostgreSQL by URL) and content-addressed artifacts."""

from everloop.store import _predictions as prediction_log
from everloop.store._artifacts import ArtifactStore, sha256_bytes
from everloop.store._store import DB_URL_ENV, STORE_DIR, Store

__all__ = ["ArtifactStore", "DB_URL_ENV", "STORE_DIR", "Store", "prediction_log", "sha256_bytes"]
