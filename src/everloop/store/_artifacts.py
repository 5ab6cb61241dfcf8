"""Content-addressed artifacts: bytes named by their sha256, written atomically, verified on read.

Artifacts live in the project's folder (`.everloop/artifacts`, the default), or at an
object-storage URL shared by many machines (`EVERLOOP_ARTIFACTS_URL`: `s3://bucket/prefix`,
`file:///shared/folder`, any fsspec URL; S3 needs the `everloop[s3]` extra). With a URL, the local
folder is a read-through cache: a blob is written once under `<url>/ab/<digest>` (never
overwritten), fetched into the cache on first read, and verified against its digest on every read,
cached or not; a cached copy that no longer matches is fetched again. The S3 endpoint and
credentials come from the standard AWS environment (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ...).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from everloop.errors import IntegrityError, NotFoundError, StoreError
from everloop.store._lease import _this_process

ARTIFACTS_URL_ENV = "EVERLOOP_ARTIFACTS_URL"
TEMP_PREFIX = ".tmp-"  # a file being written; renamed to its digest when whole
STALE_TEMP_SECONDS = 3600.0  # a temporary file of an unknown writer, untouched this long, is a leftover
log = logging.getLogger("everloop.store")
T = TypeVar("T")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks; FileNotFoundError when it is absent."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


class ArtifactStore:
    """Immutable blobs named by their sha256 (`ab/abcdef...`) in the folder `root`, or at `url` with
    `root` as the local cache. Raises StoreError (one line naming the URL) when the object store
    cannot be reached, the bucket is missing or access is denied."""

    def __init__(self, root: str | Path, url: str | None = None):
        self.root = Path(root)
        self.remote = _Remote(url) if url else None

    @property
    def url(self) -> str | None:
        """Where the artifacts live (credentials redacted), or None for the local folder alone."""
        return self.remote.shown if self.remote else None

    def path(self, digest: str) -> Path:
        """The local path (the store, or its cache) of `digest`; NotFoundError if not a sha256."""
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise NotFoundError(f"artifact {digest!r} is not a sha256 digest")
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        """Store `data` and return its digest; storing the same bytes twice is a no-op."""
        digest = sha256_bytes(data)
        if self.remote is not None:
            self.remote.upload(digest, data)
        target = self.path(digest)
        if not target.exists():
            write_atomic(target, data)
        return digest

    def temp_path(self, suffix: str = "") -> Path:
        """A fresh local path for writing a large artifact in pieces; hand it to `put_file`."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = _mkstemp(self.root, suffix)
        os.close(fd)
        return Path(tmp)

    def sweep_temp(self, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
        """Remove the temporary files (`.tmp-*`, in the folder and its `ab/` subfolders) that killed
        writers left behind, and return their paths: a file whose writer ran on this machine (same
        kernel boot and pid namespace) and whose pid is gone, or whose writer cannot be told (another
        machine sharing the folder, an older build's name) and that nobody wrote to for `max_age`
        seconds. A file of a live writer is never touched, however old. Unreadable folders are skipped."""
        removed: list[Path] = []
        now = time.time()
        folders = [self.root]
        try:
            with os.scandir(self.root) as entries:
                folders += [Path(e.path) for e in entries
                            if len(e.name) == 2 and e.is_dir(follow_symlinks=False)]
        except OSError:
            return removed
        for folder in folders:
            try:
                with os.scandir(folder) as entries:
                    temps = [e for e in entries
                             if e.name.startswith(TEMP_PREFIX) and e.is_file(follow_symlinks=False)]
                for entry in temps:
                    alive = _writer_alive(entry.name)
                    if alive is False or (alive is None and now - entry.stat().st_mtime > max_age):
                        Path(entry.path).unlink(missing_ok=True)
                        removed.append(Path(entry.path))
            except OSError:  # gone meanwhile (another sweeper), or not ours to remove: leave it
                continue
        if removed:
            log.info("removed %d temporary files left by killed writers in %s", len(removed), self.root)
        return removed

    def put_file(self, path: Path) -> str:
        """Move a file written at `temp_path()` into the store under its sha256 (read in chunks);
        with a URL, upload it first (S3 multipart for large files)."""
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        name = sha256_file(path)
        if self.remote is not None:
            self.remote.upload(name, path)
        target = self.path(name)
        if target.exists():
            path.unlink()
            return name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        return name

    def open(self, digest: str) -> Path:
        """The local path of a stored artifact, verified first (for readers that stream it)."""
        return self._verified(digest, lambda path: path, sha256_file)

    def get(self, digest: str) -> bytes:
        """The bytes stored under `digest`, refused when they no longer match it."""
        return self._verified(digest, Path.read_bytes, sha256_bytes)

    def _verified(self, digest: str, read: Callable[[Path], T], hash_of: Callable[[T], str]) -> T:
        """`read(path)` of the local copy once `hash_of` it matches `digest`; with a URL, a missing
        or changed local copy is fetched (once) first."""
        target = self.path(digest)
        for fetched in (False, True):
            try:
                value = read(target)
                actual: str | None = hash_of(value)
            except FileNotFoundError:
                actual = None
            except OSError as exc:
                raise StoreError(f"artifact {digest[:12]} cannot be read from {target}: {exc}") \
                    from None
            if actual == digest:
                return value
            if self.remote is None or fetched:
                if actual is None:
                    raise NotFoundError(f"artifact {digest[:12]} is missing from {self.root} (if "
                                        "this store's artifacts live in object storage, set "
                                        f"{ARTIFACTS_URL_ENV})")
                raise IntegrityError(f"artifact {digest[:12]} at {target} was changed on disk (its "
                                     f"sha256 is now {actual[:12]}); refusing to use it",
                                     digest=digest)
            if actual is not None:
                log.warning("cached artifact %s at %s was changed on disk; fetching it again "
                            "from %s", digest[:12], target, self.remote.shown)
            self.remote.fetch(digest, target)
        raise AssertionError("unreachable")


class _Remote:
    """Blobs at `<url>/ab/<digest>` in an fsspec filesystem, written once and never overwritten."""

    def __init__(self, url: str):
        self.url = url
        self.shown = _redact(url if url.endswith("://") else url.rstrip("/"))
        scheme, _, rest = url.partition("://")
        if scheme in ("s3", "s3a") and "@" in rest.split("/", 1)[0]:  # s3://KEY:SECRET@bucket: boto reads no such form
            raise StoreError(f"artifact store {self.shown}: credentials do not belong in the URL; give the bucket "
                             "alone (s3://bucket/prefix) and the keys in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                             "(or an AWS profile or role)")
        self._fs, base = self._connect()  # StoreError without fsspec: the import below is safe
        self._pid = os.getpid()
        self.base = base.rstrip("/")
        from fsspec.implementations.local import LocalFileSystem

        self.local = isinstance(self._fs, LocalFileSystem)
        # The part that must exist before anything is written: the bucket, or the folder itself.
        self.bucket = self.base if self.local else self.base.split("/", 1)[0]
        if not self.bucket:
            raise StoreError(f"artifact store {self.shown}: the URL names no bucket; expected e.g. "
                             f"s3://bucket/prefix in {ARTIFACTS_URL_ENV}")

    def _connect(self) -> tuple[Any, str]:
        try:
            import fsspec

            # A fresh instance reads the endpoint and credentials from the environment now; no
            # listings cache, so a blob another machine wrote a moment ago is seen.
            return fsspec.core.url_to_fs(self.url, skip_instance_cache=True,
                                         use_listings_cache=False)
        except ImportError as exc:
            extra = exc.name == "fsspec" or self.url.startswith(("s3://", "s3a://"))
            hint = "; install the extra: pip install 'everloop[s3]'" if extra else ""
            raise StoreError(f"artifact store {self.shown}: {_line(exc)}{hint}") from None
        except Exception as exc:  # noqa: BLE001 - ValueError, TypeError, ... for a bad URL
            raise StoreError(f"artifact store {self.shown}: not a usable URL ({_line(exc)}); "
                             "expected e.g. s3://bucket/prefix or file:///shared/folder in "
                             f"{ARTIFACTS_URL_ENV}") from None

    @property
    def fs(self) -> Any:
        """The fsspec filesystem; opened anew in a forked child (s3fs clients are not fork-safe)."""
        if self._pid != os.getpid():
            self._fs, _ = self._connect()
            self._pid = os.getpid()
        return self._fs

    def key(self, digest: str) -> str:
        return f"{self.base}/{digest[:2]}/{digest}"

    def name(self, digest: str) -> str:
        """The blob's URL, for messages."""
        return f"{self.shown}/{digest[:2]}/{digest}"

    def upload(self, digest: str, source: bytes | Path) -> None:
        """Write the blob unless it is there already; readers never see half of it (an S3 PUT is
        atomic; a local folder gets a temporary file and a rename)."""
        key = self.key(digest)
        doing = f"writing artifact {digest[:12]}"
        if self._call(doing, self.fs.exists, key):
            return
        if self.local:
            if not os.path.isdir(self.bucket):  # an unmounted share: never fill the mount point
                raise self._no_bucket()
            write_atomic(Path(key), source)
            return
        try:
            if isinstance(source, Path):
                self.fs.put_file(str(source), key)
            else:
                self.fs.pipe_file(key, source)
        except FileNotFoundError:
            raise self._no_bucket() from None
        except Exception as exc:  # noqa: BLE001 - fsspec backends raise their own kinds
            raise self._error(doing, exc) from None

    def fetch(self, digest: str, target: Path) -> None:
        """Download the blob into the cache at `target`, verified before it replaces what was there.
        NotFoundError when it is absent; IntegrityError, naming the object, when it differs."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _mkstemp(target.parent)
        os.close(fd)
        try:
            try:
                self.fs.get_file(self.key(digest), tmp)
            except FileNotFoundError:
                if not self._call(f"reading artifact {digest[:12]}", self.fs.exists, self.bucket):
                    raise self._no_bucket() from None
                raise NotFoundError(f"artifact {digest[:12]} is missing from {self.shown} "
                                    f"(no object {self.name(digest)})") from None
            except Exception as exc:  # noqa: BLE001 - fsspec backends raise their own kinds
                raise self._error(f"reading artifact {digest[:12]}", exc) from None
            actual = sha256_file(tmp)
            if actual != digest:
                raise IntegrityError(f"artifact {digest[:12]} at {self.name(digest)} was changed "
                                     f"in storage (its sha256 is now {actual[:12]}); refusing to "
                                     "use it", digest=digest)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _call(self, doing: str, func: Callable[..., Any], *args: Any) -> Any:
        try:
            return func(*args)
        except Exception as exc:  # noqa: BLE001 - fsspec backends raise their own kinds
            raise self._error(doing, exc) from None

    def _no_bucket(self) -> StoreError:
        what = f"the folder {self.bucket}" if self.local else f"the bucket {self.bucket!r}"
        return StoreError(f"artifact store {self.shown}: {what} does not exist (or is not visible "
                          f"with these credentials); create it or fix {ARTIFACTS_URL_ENV}")

    def _error(self, doing: str, exc: BaseException) -> StoreError:
        kinds = {kind.__name__ for kind in type(exc).__mro__}
        if kinds & {"NoCredentialsError", "PartialCredentialsError"}:
            why = ("no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                   "(or AWS_PROFILE)")
        elif isinstance(exc, PermissionError):
            why = f"access denied ({_line(exc)}); check the credentials and the bucket's policy"
        elif kinds & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                      "ReadTimeoutError"} or isinstance(exc, (ConnectionError, TimeoutError)):
            why = (f"cannot reach the endpoint ({_line(exc)}); check AWS_ENDPOINT_URL_S3 / "
                   "AWS_ENDPOINT_URL and that the server is up")
        else:
            why = f"{type(exc).__name__}: {_line(exc)}"
        return StoreError(_redact(f"artifact store {self.shown}: {doing} failed: {why}"))


def write_atomic(target: Path, source: bytes | Path) -> None:
    """Write `source` (bytes, or a file to copy) at `target` through a temporary file in the same
    folder, fsync and rename: a reader never sees half a blob, even when the process is killed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp(target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(source, Path):
                with open(source, "rb") as src:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        handle.write(chunk)
            else:
                handle.write(source)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mkstemp(folder: Path, suffix: str = "") -> tuple[int, str]:
    """A new temporary file in `folder` named after its writer, `.tmp-<machine>-<pid>-<random>`, so
    that `ArtifactStore.sweep_temp` can tell a killed writer's leftovers from a live writer's file."""
    return tempfile.mkstemp(dir=folder, prefix=f"{TEMP_PREFIX}{_machine()}-{os.getpid()}-", suffix=suffix)


def _machine() -> str:
    """8 hex digits naming this kernel boot and pid namespace (where a pid means one process), or
    'unknown' where that cannot be read (not Linux)."""
    where = _this_process().rpartition(" ")[0]
    return hashlib.sha256(where.encode()).hexdigest()[:8] if where else "unknown"


def _writer_alive(name: str) -> bool | None:
    """Is the process that made temporary file `name` alive? None when that cannot be told: another
    machine or container, or a name without a writer (an older build's)."""
    match = re.match(rf"{re.escape(TEMP_PREFIX)}([0-9a-f]{{8}})-(\d+)-", name)
    if match is None or match[1] != _machine():
        return None
    try:
        os.kill(int(match[2]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OverflowError:  # no such pid could exist: not a name this code made
        return None
    return True


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _redact(text: str) -> str:
    """`text` with the password of any `scheme://user:password@` and any URL query hidden."""
    text = re.sub(r"(\w://[^/\s:@]*):[^/\s@]*@", r"\1:***@", text)
    return re.sub(r"(\w://[^\s?]*)\?\S*", r"\1?***", text)
