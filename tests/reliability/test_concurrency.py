"""Two of the same command at once on one store, SQLite and PostgreSQL, in real processes: two first uses
of an empty store, two ingests of one file, two `loop --once`. Both succeed, or one says plainly what it
waited for; `everloop doctor` passes after."""

from __future__ import annotations

from pathlib import Path

import pytest

from everloop import data
from everloop.demo import make_churn
from everloop.spec import load_spec
from tests.conftest import write_project
from tests.reliability.conftest import at_once, doctor, small_project, tune

pytestmark = pytest.mark.e2e


def _doctor_passes(folder: Path, db_url: str | None) -> None:
    code, report = doctor(folder, db_url)
    assert (code, report.get("errors")) == (0, 0), report


def test_two_first_uses_of_an_empty_store(tmp_path: Path, db_url):
    """An ingest and a listing both create the store's tables; neither may fail for the other."""
    folder = write_project(tmp_path / "p", rows=300)
    runs = at_once(folder, db_url, ["ingest"], ["datasets", "--json"])
    assert [(r.code, r.err) for r in runs] == [(0, ""), (0, "")], runs
    assert runs[0].out.startswith("dataset v1: 300 rows")
    listed = runs[1].json()  # before or after the ingest's commit, never half of it
    assert listed == [] or [(d["version"], d["rows"]) for d in listed] == [(1, 300)], listed
    _doctor_passes(folder, db_url)


def test_two_ingests_of_one_file(tmp_path: Path, db_url):
    folder, store = small_project(tmp_path / "p", db_url, rows=300)
    path = folder / "data" / "more.csv"
    make_churn(2000, seed=8, id_offset=10_000).to_csv(path, index=False)
    runs = at_once(folder, db_url, ["ingest", str(path)], ["ingest", str(path)])
    assert [(r.code, r.err) for r in runs] == [(0, ""), (0, "")], runs
    firsts = sorted(r.out.splitlines()[0] for r in runs)
    assert firsts[0].startswith("dataset v2: 2000 rows"), firsts
    assert firsts[1].startswith("no new version: ") and "gives the rows of dataset v2" in firsts[1], firsts
    assert [d.version for d in data.list_datasets(store)] == [1, 2]
    _doctor_passes(folder, db_url)
    store.close()


def test_two_loop_turns(tmp_path: Path, db_url):
    """Both turns want to retrain (a schedule trigger, no cooldown, a new dataset): one does, the other
    holds off, naming the lease's holder."""
    folder, store = small_project(tmp_path / "p", db_url, rows=300)
    tune(folder, retraining={"triggers": ["schedule"], "schedule_minutes": 0.01, "cooldown_minutes": 0,
                             "data": {"from": "datasets"}},
         promotion={"min_metric": 0.5, "max_regression": 0.5, "slice_tolerance": 0.5})
    path = folder / "data" / "new.csv"
    make_churn(600, seed=11, id_offset=20_000).to_csv(path, index=False)
    data.ingest(store, load_spec(folder), str(path), base=folder)
    runs = at_once(folder, db_url, ["loop", "--once", "--json"], ["loop", "--once", "--json"])
    assert [r.code for r in runs] == [0, 0], runs
    decisions = sorted((r.json()["action"], r.json()["reason"]) for r in runs)
    assert [a for a, _ in decisions] == ["busy", "promoted"], decisions
    assert decisions[0][1].startswith("another loop is running (holder "), decisions  # says whom it yields to
    _doctor_passes(folder, db_url)
    store.close()
