"""Issue 15, faults 9 and 11: races on a shared store (real processes, SQLite and PostgreSQL) and the
temporary files a killed writer leaves behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from everloop import data
from everloop.demo import make_churn
from everloop.errors import StoreError
from everloop.spec import load_spec
from everloop.store import Store
from everloop.store import _artifacts
from everloop.store._store import _meta
from tests.conftest import write_project

# Each process imports everloop first, then waits for the `go` file, so that the commands start
# together rather than one import time apart.
_AT_ONCE = """
import os, sys, time
from everloop.cli import main
while not os.path.exists(sys.argv[1]):
    time.sleep(0.005)
sys.argv = ["everloop", *sys.argv[2:]]
main()
"""


def _at_once(folder: Path, db_url: str | None, *commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Run `everloop COMMAND` for each command in its own process, all released at the same moment,
    in `folder`; their completed processes (exit code, stdout, stderr), in order."""
    go = folder / f"go-{time.monotonic_ns()}"
    env = {k: v for k, v in os.environ.items() if k != "EVERLOOP_DB_URL"}
    if db_url:
        env["EVERLOOP_DB_URL"] = db_url
    processes = [subprocess.Popen([sys.executable, "-c", _AT_ONCE, str(go), *command], cwd=folder, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for command in commands]
    time.sleep(2)  # every process is past its imports (bounded: they wait for `go` regardless)
    go.touch()
    done = []
    for process in processes:
        out, err = process.communicate(timeout=180)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return done


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str | None:
    return request.getfixturevalue("pg_url") if request.param == "postgresql" else None


def test_two_first_uses_of_an_empty_store_both_succeed(tmp_path: Path, db_url):
    folder = write_project(tmp_path / "proj", rows=200)
    runs = _at_once(folder, db_url, *[["models", "--json"], ["datasets", "--json"]] * 2)
    for run in runs:
        assert (run.returncode, run.stderr) == (0, ""), run.stderr
    assert [run.stdout.strip() for run in runs] == ["[]"] * 4
    store = Store.for_project(folder, db_url)
    with store.engine.connect() as conn:  # one format row, whoever wrote it
        assert conn.execute(sa.select(sa.func.count()).select_from(store.tables.meta)).scalar() == 1
    store.close()


def test_two_ingests_of_one_file_at_once_give_one_version(tmp_path: Path, db_url):
    folder = write_project(tmp_path / "proj", rows=2000)
    runs = _at_once(folder, db_url, ["ingest"], ["ingest"])  # a new store: both infer the schema
    for run in runs:
        assert (run.returncode, run.stderr) == (0, ""), run.stderr
    firsts = sorted(run.stdout.splitlines()[0] for run in runs)
    assert firsts == ["dataset v1: 2000 rows x 18 columns from data/customers.csv",
                      "no new version: data/customers.csv read with schema v1 gives the rows of dataset v1: "
                      "2000 rows x 18 columns from data/customers.csv"]

    # A schema exists now: two ingests of a new file race on its dataset version alone.
    make_churn(1500, seed=8).to_csv(folder / "data" / "more.csv", index=False)
    runs = _at_once(folder, db_url, ["ingest", "data/more.csv"], ["ingest", "data/more.csv"])
    for run in runs:
        assert (run.returncode, run.stderr) == (0, ""), run.stderr
    firsts = sorted(run.stdout.splitlines()[0] for run in runs)
    source = folder / "data" / "more.csv"
    assert firsts == [f"dataset v2: 1500 rows x 18 columns from {source}",
                      f"no new version: data/more.csv read with schema v1 gives the rows of dataset v2: "
                      f"1500 rows x 18 columns from {source}"]
    store = Store.for_project(folder, db_url)
    assert [(d.version, d.rows, d.schema_version) for d in data.list_datasets(store)] == [(1, 2000, 1),
                                                                                          (2, 1500, 1)]
    assert data.current_schema(store)[0] == 1, "one schema, not one per racing ingest"
    store.close()


@pytest.mark.parametrize("schema_first", [False, True], ids=["new store", "schema known"])
def test_an_ingest_overtaken_by_one_of_the_same_file_reports_its_version(tmp_path: Path, db_url, monkeypatch,
                                                                         schema_first):
    """The interleaving real processes hit only sometimes, made certain: another ingest of the same file
    commits while this one stores its artifacts (after its own "already stored?" check)."""
    folder = write_project(tmp_path / "proj", rows=300)
    spec, store = load_spec(folder), Store.for_project(folder, db_url)
    if schema_first:
        make_churn(300, seed=9).to_csv(folder / "data" / "old.csv", index=False)
        data.ingest(store, spec, "data/old.csv", base=folder)
    real = type(store.artifacts).put_file
    overtaken = []

    def overtaking(self, path):
        if not overtaken:
            monkeypatch.setattr(type(store.artifacts), "put_file", real)
            overtaken.append(data.ingest(Store.for_project(folder, db_url), spec, base=folder))
        return real(self, path)

    monkeypatch.setattr(type(store.artifacts), "put_file", overtaking)
    late = data.ingest(store, spec, base=folder)
    first = overtaken[0]
    assert (late.version, late.deduplicated, first.deduplicated) == (first.version, True, False)
    assert [d.version for d in data.list_datasets(store)] == [1, 2][:first.version]
    assert data.current_schema(store)[0] == 1
    store.close()


def test_opening_a_store_that_another_process_is_creating_looks_again(tmp_path: Path, monkeypatch):
    """The loser of the table-creation race gets "already exists": it must look again, not fail."""
    Store(tmp_path / "s").close()  # the other process won: every table is there
    real = _meta.metadata.create_all
    calls = []

    def as_if_first(bind, **kwargs):  # the first call saw no table, as the loser did, and creates it
        calls.append(kwargs)
        return real(bind, checkfirst=len(calls) > 1)

    monkeypatch.setattr(_meta.metadata, "create_all", as_if_first)
    store = Store(tmp_path / "s")
    assert len(calls) == 2
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(store.tables.meta.c.value)).scalar() == _meta.FORMAT_VERSION
    store.close()


def test_a_broken_database_is_not_retried_as_a_race(tmp_path: Path, monkeypatch):
    calls = []

    def broken(bind, **kwargs):
        calls.append(kwargs)
        raise sa.exc.OperationalError("CREATE TABLE", {}, Exception("disk I/O error"))

    monkeypatch.setattr(_meta.metadata, "create_all", broken)
    with pytest.raises(StoreError, match="cannot be opened: OperationalError.*disk I/O error"):
        Store(tmp_path / "s")
    assert len(calls) == 1


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _plant(path: Path, age: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * 1000)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_leftover_temporary_files_are_removed_when_the_store_opens(tmp_path: Path):
    root = tmp_path / ".everloop"
    Store(root).close()
    artifacts = root / "artifacts"
    machine, dead = _artifacts._machine(), _dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone = [_plant(artifacts / f".tmp-{machine}-{dead}-abc123.parquet"),  # a killed ingest's rows
                _plant(artifacts / "ab" / f".tmp-{machine}-{dead}-def456"),  # a killed write_atomic
                _plant(artifacts / ".tmp-q8z_k2m1.parquet", age=2 * 3600)]  # an older build's, untouched 2 h
        kept = [_plant(artifacts / f".tmp-{machine}-{sleeper.pid}-live01.parquet", age=5 * 3600),  # being written
                _plant(artifacts / f".tmp-{machine}-{os.getpid()}-mine01"),
                _plant(artifacts / "ab" / ".tmp-w3x9y2z1", age=60),  # unknown writer, recent: maybe live
                _plant(artifacts / f".tmp-0badc0de-{dead}-other1", age=60),  # another machine's writer
                _plant(artifacts / "ab" / ("ab" + "0" * 62))]  # an artifact, never a temporary file
        store = Store(root)
        assert sorted(store.swept) == sorted(gone)
        assert [p for p in gone if p.exists()] == []
        assert [p for p in kept if not p.exists()] == []
        store.close()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_killed_ingest_leaves_no_temporary_file_after_the_next_start(tmp_path: Path):
    folder = write_project(tmp_path / "proj", rows=200)
    make_churn(60_000, seed=5).to_csv(folder / "data" / "big.csv", index=False)
    artifacts = folder / ".everloop" / "artifacts"
    code = "from everloop.cli import main; main()"
    process = subprocess.Popen([sys.executable, "-c", code, "ingest", "data/big.csv"], cwd=folder,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(artifacts.glob(".tmp-*.parquet")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    left = list(artifacts.glob(".tmp-*.parquet"))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and left, "killed while its temporary files existed"
    assert [p for p in left if p.exists()] == left, "a kill leaves them behind"
    store = Store.for_project(folder)  # the next command opening the store
    assert [p for p in left if p.exists()] == []
    assert not list(artifacts.rglob(".tmp-*"))
    version = data.ingest(store, load_spec(folder), "data/big.csv", base=folder)  # and the next ingest works
    assert (version.version, version.rows) == (1, 60_000)
    store.close()
