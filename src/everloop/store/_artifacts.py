"""Content-addressed artifacts: bytes stored under their sha256, written atomically, verified on read."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from everloop.errors import IntegrityError, NotFoundError, StoreError


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    """A folder of immutable blobs named by their sha256 (`ab/abcdef...`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise NotFoundError(f"artifact {digest!r} is not a sha256 digest")
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        """Store `data` and return its digest; storing the same bytes twice is a no-op."""
        digest = sha256_bytes(data)
        target = self.path(digest)
        if target.exists():
            return digest
        target.parent.mkdir(parents=True, exist_ok=True)
        # Temporary file in the same folder + fsync + rename: a reader never sees half a blob,
        # even when the process is killed mid-write.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def temp_path(self, suffix: str = "") -> Path:
        """A fresh path inside the store for writing a large artifact in pieces; hand it to `put_file`."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=suffix)
        os.close(fd)
        return Path(tmp)

    def put_file(self, path: Path) -> str:
        """Move a file written at `temp_path()` into the store under its sha256 (read in chunks)."""
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
            os.fsync(handle.fileno())
        name = digest.hexdigest()
        target = self.path(name)
        if target.exists():
            path.unlink()
            return name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        return name

    def open(self, digest: str) -> Path:
        """The path of a stored artifact, verified first (for readers that stream a file themselves)."""
        target = self.path(digest)
        if not target.exists():
            raise NotFoundError(f"artifact {digest[:12]} is missing from {self.root}")
        sha = hashlib.sha256()
        with open(target, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                sha.update(chunk)
        if sha.hexdigest() != digest:
            raise IntegrityError(f"artifact {digest[:12]} at {target} was changed on disk (its sha256 is now "
                                 f"{sha.hexdigest()[:12]}); refusing to use it", digest=digest)
        return target

    def get(self, digest: str) -> bytes:
        """The bytes stored under `digest`, refused when they no longer match it."""
        target = self.path(digest)
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"artifact {digest[:12]} is missing from {self.root}") from None
        except OSError as exc:
            raise StoreError(f"artifact {digest[:12]} cannot be read: {exc}") from None
        actual = sha256_bytes(data)
        if actual != digest:
            raise IntegrityError(
                f"artifact {digest[:12]} at {target} was changed on disk (its sha256 is now {actual[:12]}); "
                "refusing to use it",
                digest=digest,
            )
        return data
