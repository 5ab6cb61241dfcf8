"""Shared helpers of the reliability suite (issue 15): the real `everloop` command in its own process,
`everloop doctor --json`, small projects that train in seconds, the prediction log's counts, and the
figures each test adds to the report that `scripts/reliability` prints.

`EVERLOOP_RELIABILITY_FULL=1` switches to the full counts (50+ kills, longer load); without it each
test runs a reduced number so that the folder stays a few minutes of CI. `EVERLOOP_RELIABILITY_REPORT`
names a JSON file the tests add their counts to (summed over tests)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from everloop import data, registry, train
from everloop.spec import load_spec
from everloop.store import Store
from tests.conftest import write_project

FULL = os.environ.get("EVERLOOP_RELIABILITY_FULL") == "1"
REPORT = os.environ.get("EVERLOOP_RELIABILITY_REPORT")
CLI = "from everloop.cli import main; main()"
# one OpenMP thread: on a busy machine HistGradientBoosting's threads fight each other
ENV = {k: v for k, v in os.environ.items() if k != "EVERLOOP_DB_URL"} | {"OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.e2e


def scaled(ci: int, full: int) -> int:
    """`full` under EVERLOOP_RELIABILITY_FULL=1, else `ci`."""
    return full if FULL else ci


def record(**counts: int) -> None:
    """Add `counts` to the report file (no-op without EVERLOOP_RELIABILITY_REPORT). Tests record before
    they assert, so that a failing run's figures are reported too."""
    if not REPORT:
        return
    with open(REPORT, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # the script may run tests in more than one process
        f.seek(0)
        text = f.read()
        totals = json.loads(text) if text.strip() else {}
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + int(value)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(totals))


@dataclass
class Run:
    """What one `everloop ...` process gave."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def env_for(db_url: str | None) -> dict[str, str]:
    return ENV | ({"EVERLOOP_DB_URL": db_url} if db_url else {})


def command(*args: str) -> list[str]:
    """The argv of `everloop ARGS` in a new Python process."""
    return [sys.executable, "-c", CLI, *args]


def cli(*args: str, project: Path, db_url: str | None = None, timeout: float = 300) -> Run:
    """Run `everloop ARGS -p PROJECT` to completion in its own process."""
    done = subprocess.run(command(*args, "-p", str(project)), capture_output=True, text=True,
                          env=env_for(db_url), timeout=timeout, cwd=project)
    return Run(done.returncode, done.stdout, done.stderr)


def doctor(project: Path, db_url: str | None = None) -> tuple[int, dict]:
    """`everloop doctor --json`: (exit code, its report; {} when it printed no JSON)."""
    run = cli("doctor", "--json", project=project, db_url=db_url)
    try:
        return run.code, run.json()
    except json.JSONDecodeError:
        return run.code, {"stdout": run.out[-2000:], "stderr": run.err[-2000:]}


def tune(folder: Path, **sections: dict) -> None:
    """Update sections of a project file (a shallow merge per section)."""
    path = folder / "everloop.yaml"
    spec = yaml.safe_load(path.read_text())
    for key, value in sections.items():
        spec[key] = spec.get(key, {}) | value if isinstance(spec.get(key), dict) else value
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


def small_project(folder: Path, db_url: str | None = None, rows: int = 600) -> tuple[Path, Store]:
    """A project whose model trains in a few seconds (5 boosting rounds; the gate's floor lowered to ROC
    AUC 0.5 to match), with dataset v1 ingested and model v1 in production: (folder, store)."""
    write_project(folder, rows=rows)
    tune(folder, model={"params": {"max_iter": 5}}, promotion={"min_metric": 0.5})  # 5 rounds on few rows
    spec, store = load_spec(folder), Store.for_project(folder, db_url)
    data.ingest(store, spec, base=folder)
    registry.promote(store, spec, train.train(store, spec).version)
    return folder, store


def logged_rows(store: Store) -> int:
    """Predictions the service's log wrote (rows of all prediction batches)."""
    table = store.tables.prediction_batches
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(table.c.rows), 0))).scalar())


def lost_rows(store: Store) -> int:
    """Predictions counted lost at a start after a killed worker (`lost_predictions`)."""
    table = store.tables.lost_predictions
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(table.c.rows), 0))).scalar())


def no_traceback(*texts: str) -> bool:
    return not any("Traceback (most recent call last)" in text for text in texts)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str | None:
    """None (the project's SQLite file) or a fresh PostgreSQL schema's URL."""
    return request.getfixturevalue("pg_url") if request.param == "postgresql" else None


# Each process imports everloop first, then waits for the `go` file: the commands start together
# rather than one import time apart.
_AT_ONCE = """
import os, sys, time
from everloop.cli import main
while not os.path.exists(sys.argv[1]):
    time.sleep(0.005)
sys.argv = ["everloop", *sys.argv[2:]]
main()
"""


def at_once(project: Path, db_url: str | None, *commands: list[str]) -> list[Run]:
    """Run `everloop COMMAND -p PROJECT` for each command in its own process, all released at the same
    moment (after their imports); their runs, in order."""
    go = project / f".go-{time.monotonic_ns()}"
    processes = [subprocess.Popen([sys.executable, "-c", _AT_ONCE, str(go), *c, "-p", str(project)], cwd=project,
                                  env=env_for(db_url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in commands]
    time.sleep(3)  # past their imports, even on a busy machine (they wait for `go` regardless)
    go.touch()
    runs = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        runs.append(Run(process.returncode, out, err))
    go.unlink()
    return runs
