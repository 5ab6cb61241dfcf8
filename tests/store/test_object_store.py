"""Artifacts at an object-storage URL (EVERLOOP_ARTIFACTS_URL) against a real S3-compatible server
on loopback (tests/store/conftest.py), and at a file:// URL: write once, verify on every read, a
local read-through cache, one-line errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from everloop import data, registry, train
from everloop.errors import IntegrityError, NotFoundError, StoreError
from everloop.spec import load_spec
from everloop.store import ARTIFACTS_URL_ENV, DB_URL_ENV, ArtifactStore, Store, sha256_bytes
from tests.conftest import write_project
from tests.store.conftest import free_port, moto_server, use_endpoint


def object_bytes(s3, digest: str) -> bytes:
    return s3.client.get_object(Bucket=s3.name, Key=s3.key(digest))["Body"].read()


def test_put_writes_the_blob_once_under_its_digest_and_reads_it_back(tmp_path: Path, s3):
    s3.client.put_bucket_versioning(Bucket=s3.name, VersioningConfiguration={"Status": "Enabled"})
    artifacts = ArtifactStore(tmp_path / "cache", s3.url)
    digest = artifacts.put(b"model bytes")
    assert digest == sha256_bytes(b"model bytes")
    assert object_bytes(s3, digest) == b"model bytes"
    assert artifacts.put(b"model bytes") == digest
    versions = s3.client.list_object_versions(Bucket=s3.name, Prefix=s3.key(digest))["Versions"]
    assert len(versions) == 1, "an existing blob is never written again"
    assert artifacts.get(digest) == b"model bytes"
    assert artifacts.path(digest).read_bytes() == b"model bytes", "the writer's cache holds it too"

    big = artifacts.temp_path(".parquet")
    big.write_bytes(b"x" * 3_000_000)
    name = artifacts.put_file(big)
    assert name == sha256_bytes(b"x" * 3_000_000) and not big.exists()
    assert object_bytes(s3, name) == b"x" * 3_000_000
    assert artifacts.open(name).read_bytes() == b"x" * 3_000_000
    assert not list((tmp_path / "cache").rglob(".tmp-*")), "no temporary files are left behind"


def test_another_machine_reads_through_the_url_and_caches(tmp_path: Path, s3):
    digest = ArtifactStore(tmp_path / "a", s3.url).put(b"shared")
    other = ArtifactStore(tmp_path / "b", s3.url)  # an empty cache: another machine
    assert not other.path(digest).exists()
    assert other.get(digest) == b"shared"
    assert other.path(digest).read_bytes() == b"shared"
    s3.client.delete_object(Bucket=s3.name, Key=s3.key(digest))
    assert other.get(digest) == b"shared", "a verified cached copy is read without the network"
    assert other.open(digest) == other.path(digest)


def test_a_changed_object_in_the_bucket_is_refused_by_name(tmp_path: Path, s3):
    digest = ArtifactStore(tmp_path / "a", s3.url).put(b"model bytes")
    s3.client.put_object(Bucket=s3.name, Key=s3.key(digest), Body=b"model bytez")
    other = ArtifactStore(tmp_path / "b", s3.url)
    for read in (other.get, other.open):
        with pytest.raises(IntegrityError) as info:
            read(digest)
        assert info.value.digest == digest
        assert f"{s3.url}/{digest[:2]}/{digest}" in str(info.value)
        assert f"sha256 is now {sha256_bytes(b'model bytez')[:12]}" in str(info.value)
    assert not [p for p in (tmp_path / "b").rglob("*") if p.is_file()], "nothing unverified cached"


def test_a_changed_cached_copy_is_fetched_again(tmp_path: Path, s3, caplog):
    artifacts = ArtifactStore(tmp_path / "cache", s3.url)
    digest = artifacts.put(b"model bytes")
    artifacts.path(digest).write_bytes(b"model bytez")
    assert artifacts.get(digest) == b"model bytes"
    assert artifacts.path(digest).read_bytes() == b"model bytes", "the cache is repaired"
    assert "was changed on disk; fetching it again" in caplog.text
    artifacts.path(digest).write_bytes(b"")
    assert artifacts.open(digest).read_bytes() == b"model bytes"


def test_a_forked_child_reads_through_a_client_of_its_own(tmp_path: Path, s3):
    artifacts = ArtifactStore(tmp_path, s3.url)
    digest = artifacts.put(b"model bytes")  # the parent's s3fs client is in use now
    artifacts.path(digest).unlink()
    pid = os.fork()
    if pid == 0:  # the child: fetch through the URL, report by exit code only
        try:
            os._exit(0 if artifacts.get(digest) == b"model bytes" else 1)
        except BaseException:  # noqa: BLE001 - any failure is exit 2
            os._exit(2)
    assert os.waitpid(pid, 0)[1] == 0
    assert artifacts.path(digest).read_bytes() == b"model bytes"


def test_a_missing_blob_is_not_found_naming_the_url(tmp_path: Path, s3):
    with pytest.raises(NotFoundError) as info:
        ArtifactStore(tmp_path, s3.url).get("ab" * 32)
    assert str(info.value) == (f"artifact {'ab' * 6} is missing from {s3.url} "
                               f"(no object {s3.url}/ab/{'ab' * 32})")


def test_a_missing_bucket_is_a_one_line_store_error(tmp_path: Path, s3):
    artifacts = ArtifactStore(tmp_path, "s3://no-such-bucket/prefix")
    for action in (lambda: artifacts.put(b"x"), lambda: artifacts.get("ab" * 32)):
        with pytest.raises(StoreError) as info:
            action()
        assert type(info.value) is StoreError
        assert str(info.value).startswith("artifact store s3://no-such-bucket/prefix: the bucket "
                                          "'no-such-bucket' does not exist")
        assert "\n" not in str(info.value)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a refused write leaves nothing"


def test_an_unreachable_endpoint_is_a_one_line_store_error(tmp_path: Path, s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nobody listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    artifacts = ArtifactStore(tmp_path, s3.url)
    for action, doing in ((lambda: artifacts.put(b"x"), "writing"),
                          (lambda: artifacts.get("ab" * 32), "reading")):
        with pytest.raises(StoreError) as info:
            action()
        message = str(info.value)
        assert message.startswith(f"artifact store {s3.url}: {doing} artifact ")
        assert "cannot reach the endpoint" in message and "AWS_ENDPOINT_URL_S3" in message
        assert "\n" not in message


def test_denied_access_is_a_one_line_store_error_without_the_secret(tmp_path: Path, monkeypatch):
    # A second server that checks credentials: the dummy key is unknown to it.
    with moto_server(tmp_path / "auth.log", INITIAL_NO_AUTH_ACTION_COUNT="0") as endpoint:
        use_endpoint(monkeypatch, endpoint)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
        artifacts = ArtifactStore(tmp_path / "cache", "s3://locked/prefix")
        with pytest.raises(StoreError) as info:
            artifacts.put(b"x")
    message = str(info.value)
    assert message.startswith("artifact store s3://locked/prefix: writing artifact ")
    assert "access denied" in message and "\n" not in message and "s3cr3t-value" not in message


def test_no_credentials_is_a_one_line_store_error(tmp_path: Path, s3, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError, match="no credentials found; set AWS_ACCESS_KEY_ID"):
        ArtifactStore(tmp_path, s3.url).put(b"x")


@pytest.mark.parametrize("url, expected", [
    ("nosuch://user:hunter2@host/x", "artifact store nosuch://user:***@host/x: not a usable URL"),
    ("s3://", "artifact store s3://: the URL names no bucket"),
    ("s3://AKIAKEY:hunter2@bucket/prefix", "artifact store s3://AKIAKEY:***@bucket/prefix: credentials do not "
                                           "belong in the URL; give the bucket alone (s3://bucket/prefix) and the "
                                           "keys in AWS_ACCESS_KEY_ID"),
])
def test_a_bad_url_is_refused_when_the_store_opens(tmp_path: Path, monkeypatch, url, expected):
    monkeypatch.setenv(ARTIFACTS_URL_ENV, url)
    with pytest.raises(StoreError) as info:
        Store(tmp_path)
    assert str(info.value).startswith(expected)
    assert "hunter2" not in str(info.value) and "\n" not in str(info.value)


def test_without_s3fs_the_error_says_which_extra_to_install(tmp_path: Path):
    # A fresh interpreter where s3fs cannot be imported (this one has it registered already).
    code = ("import sys; sys.modules['s3fs'] = None\n"
            "from everloop.store import Store\n"
            "from everloop.errors import StoreError\n"
            "try:\n    Store(sys.argv[1], artifacts_url='s3://bucket/prefix')\n"
            "except StoreError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("artifact store s3://bucket/prefix: ")
    assert out.stdout.rstrip().endswith("install the extra: pip install 'everloop[s3]'")


def test_a_file_url_is_shared_the_same_way(tmp_path: Path):
    shared = tmp_path / "shared"
    url = shared.as_uri()
    with pytest.raises(StoreError, match=f"the folder {shared} does not exist"):
        ArtifactStore(tmp_path / "a", url).put(b"x")  # e.g. an unmounted share: never filled
    shared.mkdir()
    digest = ArtifactStore(tmp_path / "a", url).put(b"shared")
    assert (shared / digest[:2] / digest).read_bytes() == b"shared"
    assert not list(shared.rglob(".tmp-*"))
    other = ArtifactStore(tmp_path / "b", url)
    assert other.get(digest) == b"shared"
    (shared / digest[:2] / digest).write_bytes(b"shared!")
    shutil.rmtree(tmp_path / "b")
    with pytest.raises(IntegrityError, match=f"at {url}/{digest[:2]}/{digest} was changed in stor"):
        other.get(digest)


def test_local_store_without_url_hints_at_the_setting(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(ARTIFACTS_URL_ENV, raising=False)
    store = Store(tmp_path)
    assert store.artifacts.url is None
    with pytest.raises(NotFoundError, match=f"is missing from .*set {ARTIFACTS_URL_ENV}"):
        store.artifacts.get("ab" * 32)


@pytest.mark.e2e
def test_a_second_machine_scores_with_only_the_two_urls(tmp_path: Path, s3, monkeypatch, everloop):
    """Project A ingests and trains; project B, sharing only EVERLOOP_DB_URL and
    EVERLOOP_ARTIFACTS_URL (its own folder, no .everloop of A's), batch-scores with A's model and
    gets A's predictions."""
    monkeypatch.setenv(DB_URL_ENV, f"sqlite:///{tmp_path / 'shared.db'}")
    monkeypatch.setenv(ARTIFACTS_URL_ENV, s3.url)
    a, b = write_project(tmp_path / "a"), write_project(tmp_path / "b")
    spec, store = load_spec(a), Store.for_project(a)
    data.ingest(store, spec, base=a)
    version = train.train(store, spec).version
    registry.promote(store, spec, version)
    model_digest = registry.get_model(store, "production").artifact
    store.close()
    assert object_bytes(s3, model_digest) == store.artifacts.path(model_digest).read_bytes()

    assert everloop("predict", "data/customers.csv", "mine.csv", cwd=a).code == 0
    run = everloop("predict", "data/customers.csv", "theirs.csv", cwd=b)
    assert run.code == 0, run.out + run.err
    assert f"model v{version}" in run.out
    # the same predictions; prediction ids differ (each job's prefix comes from its own input files' paths)
    pd.testing.assert_frame_equal(pd.read_csv(b / "theirs.csv").drop(columns="prediction_id"),
                                  pd.read_csv(a / "mine.csv").drop(columns="prediction_id"))
    cached = b / ".everloop" / "artifacts" / model_digest[:2] / model_digest
    assert cached.read_bytes() == object_bytes(s3, model_digest), "B cached A's model itself"
    assert not (b / ".everloop" / "meta.db").exists(), "B used the shared metadata only"
