"""Metadata (SQLAlchemy: SQLite by default, PostgreSQL by URL) and content-addressed artifacts (a local
folder by default, object storage by URL)."""

from everloop.store import _predictions as prediction_log
from everloop.store._artifacts import ARTIFACTS_URL_ENV, ArtifactStore, sha256_bytes, write_atomic
from everloop.store._doctor import DoctorReport, Finding, doctor
from everloop.store._store import DB_URL_ENV, STORE_DIR, Store

__all__ = ["ARTIFACTS_URL_ENV", "ArtifactStore", "DB_URL_ENV", "DoctorReport", "Finding", "STORE_DIR", "Store",
           "doctor", "prediction_log", "sha256_bytes", "write_atomic"]
