"""The dashboard benchmark's big store: 100 model versions, 1,000 monitoring windows, 10M predictions.

DESIGN.md's bar: every dashboard page within 300 ms on a store of 100 model versions, 1,000 windows
and 10M logged predictions, on SQLite and on PostgreSQL. This script builds such a store, once per
database, and keeps it (bench/ui.py times the pages against it).

How it is made. First a small *seed* project runs the demo scenario without a server (everloop's own
APIs: ingest, train, promote, then 2 stable and 3 shifted windows of 10,000 predictions written by
the service's prediction log writer code, labels through `record_feedback`, and `loop.run_once`
after each window: the monitor judges the window, the loop retrains on drift, gates and promotes).
Its real model artifacts, manifests, monitor results and loop decisions are the templates. Then,
for each database, the big store gets 30 days of history:

- artifacts: the seed's (2 trained pipelines, evaluation rows, row hashes, profiles), by
  `ArtifactStore.put` (API);
- 50 dataset versions (10k-25k rows; loop-made ones with a parent, exports with quarantined rows and
  warnings) by `data.ingest` / `data.ingest_frame` (API), their `created_at` then moved into the past;
- 100 model versions (loop retrains and 3 manual trains; metrics and slices varied), bulk: the seed's
  manifests and real artifacts (training 100 models would take an hour and stamp each "now");
- ~106 alias moves (promotions by the loop and by hand, one forced; 6 rollbacks; candidate moves),
  bulk (`set_alias` stamps "now");
- 10M predictions in ~71k `prediction_batches` rows (1-1000 rows each, log-uniform; 2 workers whose
  ids change daily), bulk: payloads made by the service's writer code (`serve._log.batch_row` on
  `LogEntry`s as the batcher builds them: conformed columns, the encoder's codes, the seed models'
  real probabilities on stable or shifted rows);
- ~20% of the predictions labelled (`feedback`, 1 h - 3 days later), bulk;
- 1,000 `monitor_runs` (10k predictions each, one model version each, ~12 KB of result JSON), bulk:
  the seed's real results (stable and drifted), their numbers varied;
- 2,000 `loop_events` (two turns a window: idle, cooldown, promoted, kept_candidate) with evidence,
  bulk, from the seed's;
- `service_stats`: one row a second per worker for the last day (2 x 86,400; the service's writer
  writes one every 2 s: this is twice as dense), bulk.

Bulk rows are inserted with executemany on SQLite and COPY on PostgreSQL; ids are given explicitly
(PostgreSQL's sequences are moved past them), then PostgreSQL is VACUUM ANALYZEd as autovacuum would
have done on a live store (SQLite gets no ANALYZE: everloop never runs one).

Where. `--dir` (default /tmp/everloop-ui-bench) holds `seed/`, `sqlite/` (a project whose store is
SQLite in `.everloop/meta.db`) and `postgresql/` (a project whose metadata is in the PostgreSQL
database `everloop_ui_bench` on the server of EVERLOOP_DB_URL, default
postgresql+psycopg://postgres@127.0.0.1:5432/: its own database, so the test suite's tables are never
touched; its artifacts in `postgresql/.everloop/artifacts`). A marker file `.everloop/ui_bench.json`
records the recipe: a store whose recipe did not change (and whose row counts still match) is reused.

Run:
    .venv/bin/python bench/ui_store.py                     # both databases, full size (~20-30 min)
    .venv/bin/python bench/ui_store.py --backend sqlite    # one of them
    .venv/bin/python bench/ui_store.py --quick             # 300k predictions, 150 windows (minutes)
    .venv/bin/python bench/ui_store.py --force             # rebuild even when the recipe matches

The last line printed is one JSON object: per database, its project folder, database, build seconds
and sizes.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
import yaml

RECIPE_VERSION = 1  # bump when the build changes what it makes: stores built before are rebuilt
SEED_VERSION = 1
MARKER = "ui_bench.json"
DEFAULT_DIR = Path(os.environ.get("EVERLOOP_UI_BENCH_DIR", "/tmp/everloop-ui-bench"))
PG_DATABASE = "everloop_ui_bench"
DEFAULT_PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SEED_WINDOW_ROWS = 10_000
DAY = 86_400.0


@dataclass(frozen=True)
class Recipe:
    """What the big store holds. `window_rows` = predictions // windows."""

    predictions: int = 10_000_000
    windows: int = 1_000
    models: int = 100
    datasets: int = 50
    workers: int = 2
    days: float = 30.0
    feedback_share: float = 0.2
    stats_hours: float = 24.0
    max_batch_rows: int = 1000
    pool_rows: int = 20_000
    seed: int = 7

    @property
    def window_rows(self) -> int:
        return self.predictions // self.windows

    def check(self) -> None:
        if self.windows < self.models + 10:
            raise SystemExit(f"--windows {self.windows}: needs at least models + 10 = {self.models + 10} "
                             "(each retraining happens at the end of its own window)")
        if self.window_rows < self.max_batch_rows:
            raise SystemExit(f"{self.predictions} predictions in {self.windows} windows is {self.window_rows} "
                             f"a window: fewer than one batch of up to {self.max_batch_rows} rows")
        if self.datasets < 2 or self.datasets > self.models:
            raise SystemExit(f"--datasets {self.datasets}: between 2 and the number of models ({self.models})")

    def key(self) -> str:
        text = json.dumps({"version": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


QUICK = Recipe(predictions=300_000, windows=150, models=100, datasets=20, pool_rows=5000, stats_hours=2.0)


def say(text: str) -> None:
    print(text, flush=True)


# -- targets: where a store lives ----------------------------------------------------------------------


@dataclass
class Target:
    """One big store: a project folder and its metadata database (SQLite in the folder, or PostgreSQL)."""

    name: str  # "sqlite" | "postgresql"
    project: Path
    db_url: str | None  # None: SQLite in the project folder
    store: Any = None
    writer: Any = None
    hashes: dict[int, str] = field(default_factory=dict)  # dataset version -> content hash
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def marker(self) -> Path:
        return self.project / ".everloop" / MARKER

    @property
    def postgres(self) -> bool:
        return self.db_url is not None


def pg_url(recipe: Recipe, server: str | None = None) -> str:
    """The benchmark's own PostgreSQL database on the server of `server` (default: EVERLOOP_DB_URL, else
    the local test server): `everloop_ui_bench` for the full recipe, `everloop_ui_bench_<key>` for others
    (a --quick store never replaces the full one)."""
    base = sa.engine.make_url(server or os.environ.get("EVERLOOP_DB_URL") or DEFAULT_PG_SERVER)
    name = PG_DATABASE if recipe == Recipe() else f"{PG_DATABASE}_{recipe.key()}"
    return base.set(database=name).render_as_string(hide_password=False)


def targets_for(backend: str, folder: Path, recipe: Recipe, server: str | None = None) -> list[Target]:
    """The stores to build or use: `folder`/sqlite and `folder`/postgresql (metadata in `pg_url`)."""
    out = []
    if backend in ("sqlite", "both"):
        out.append(Target("sqlite", folder / "sqlite", None))
    if backend in ("postgresql", "both"):
        out.append(Target("postgresql", folder / "postgresql", pg_url(recipe, server)))
    return out


def _admin_engine(url: str) -> sa.Engine:
    return sa.create_engine(sa.engine.make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")


def _fresh_database(target: Target) -> None:
    """Empty the target's store: its .everloop folder, and for PostgreSQL its own database (dropped and
    created again; refused for any database not named everloop_ui_bench*)."""
    shutil.rmtree(target.project / ".everloop", ignore_errors=True)
    if not target.postgres:
        return
    name = sa.engine.make_url(target.db_url).database or ""
    if not name.startswith(PG_DATABASE):
        raise SystemExit(f"refusing to drop database {name!r}: the benchmark only recreates {PG_DATABASE}*")
    engine = _admin_engine(target.db_url)
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()


def read_marker(target: Target) -> dict[str, Any] | None:
    try:
        return json.loads(target.marker.read_text())
    except (OSError, ValueError):
        return None


def is_current(target: Target, recipe: Recipe) -> bool:
    """Whether the target holds a finished build of `recipe` (marker matches, and the counts it recorded
    are still what the database holds)."""
    marker = read_marker(target)
    if not marker or marker.get("key") != recipe.key() or marker.get("db") != _shown(target.db_url):
        return False
    try:
        engine = (sa.create_engine(target.db_url) if target.postgres
                  else sa.create_engine(f"sqlite:///{target.project / '.everloop' / 'meta.db'}"))
        with engine.connect() as conn:
            found = {table: conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar()
                     for table in ("models", "monitor_runs", "prediction_batches", "loop_events")}
        engine.dispose()
    except sa.exc.SQLAlchemyError:
        return False
    return all(found[t] == marker["counts"].get(t) for t in found)


def _shown(url: str | None) -> str:
    return "sqlite (project folder)" if url is None else sa.engine.make_url(url).render_as_string(hide_password=True)


# -- the seed: the demo scenario, without a server ------------------------------------------------------


def project_spec(window_rows: int) -> dict[str, Any]:
    from everloop.demo import demo_spec

    spec = demo_spec()
    spec["monitoring"]["window"]["rows"] = window_rows
    return spec


def write_project(folder: Path, window_rows: int) -> None:
    from everloop.demo import make_churn

    (folder / "data").mkdir(parents=True, exist_ok=True)
    csv = folder / "data" / "customers.csv"
    if not csv.exists():
        make_churn(10_000, seed=7).to_csv(csv, index=False)
    (folder / "everloop.yaml").write_text("# everloop dashboard benchmark (bench/ui_store.py)\n"
                                          + yaml.safe_dump(project_spec(window_rows), sort_keys=False))


class Pool:
    """Rows of the demo's customers as the service holds them after a request: conformed columns, the
    encoder's codes, the model's probabilities and labels, and each row's true label."""

    def __init__(self, model: Any, frame: pd.DataFrame):
        features = frame.drop(columns=["churned", "customer_id", "event_time"])
        records = json.loads(features.to_json(orient="records"))
        self.columns = model.schema.conform_records(records)
        if self.columns is None:
            raise RuntimeError("the pool's rows did not take the service's fast path (conform_records gave None)")
        self.codes: dict[str, Any] = {}
        predicted = model.predict_conformed(self.columns, self.codes)
        self.labels, self.proba, self.classes = predicted.labels, predicted.proba, predicted.classes
        self.truth = frame["churned"].to_numpy()
        self.version = model.version
        self.size = len(frame)

    def entry(self, start: int, n: int, worker: str, counter: int, created_at: float, version: int,
              latency_ms: float) -> Any:
        """A `LogEntry` of rows start..start+n, as the batcher hands one model call to the log writer."""
        from everloop.serve._log import LogEntry

        part = slice(start, start + n)
        ids = [f"{worker}{c:x}" for c in range(counter, counter + n)]
        return LogEntry(ids, created_at, version, {k: v[part] for k, v in self.columns.items()},
                        self.labels[part], self.proba[part], self.classes, np.full(n, latency_ms),
                        {k: (found[part], vocabulary) for k, (found, vocabulary) in self.codes.items()})


def _serving_model(store: Any, version: int | str = "production") -> Any:
    from everloop import registry
    from everloop.demo import make_churn

    model = registry.load_model(store, version)
    probe = make_churn(300, seed=1).drop(columns=["churned", "customer_id", "event_time"])
    if not model.check_fast_path(probe):
        raise RuntimeError(f"model v{model.version} does not take the fast feature path the service uses")
    return model


def build_seed(folder: Path) -> None:
    """The demo scenario in `folder` without a server: real artifacts, monitor results, loop decisions."""
    from everloop import data, registry, train
    from everloop.demo import make_churn
    from everloop.demo._scenario import START
    from everloop.loop import run_once
    from everloop.serve import record_feedback
    from everloop.serve._log import batch_row
    from everloop.spec import load_spec
    from everloop.store import Store

    marker = folder / ".everloop" / "seed.json"
    try:
        if json.loads(marker.read_text()).get("version") == SEED_VERSION:
            say(f"seed: reusing {folder}")
            return
    except (OSError, ValueError):
        pass
    started = time.perf_counter()
    shutil.rmtree(folder / ".everloop", ignore_errors=True)
    write_project(folder, SEED_WINDOW_ROWS)
    spec, store = load_spec(folder), Store.for_project(folder)
    dataset = data.ingest(store, spec, base=folder)
    say(f"seed: dataset v{dataset.version} ({dataset.rows} rows); training model v1 (the demo's 200-tree model) ...")
    trained = train.train(store, spec, dataset.version, reason="initial model")
    registry.promote(store, spec, trained.version, reason="initial model")
    worker, counter, clock, next_id = "5eed5eed00000001", 0, START + pd.Timedelta(days=7), 10_000
    for n, phase in enumerate(["stable", "stable", "shifted", "shifted", "shifted"], start=1):
        model = _serving_model(store)
        rows = make_churn(SEED_WINDOW_ROWS, shifted=phase == "shifted", seed=7000 + n, start=clock, id_offset=next_id)
        next_id += len(rows)
        clock += pd.Timedelta(minutes=len(rows))
        pool = Pool(model, rows)
        batches, labels = [], []
        for start in range(0, pool.size, 100):  # the demo's requests: 100 rows each
            entry = pool.entry(start, 100, worker, counter, time.time(), model.version, 4.0)
            batches.append(batch_row([entry]))
            labels += [{"id": i, "label": int(y)} for i, y in zip(entry.ids, pool.truth[start:start + 100])]
            counter += 100
        with store.engine.begin() as conn:
            conn.execute(store.tables.prediction_batches.insert(), batches)
        record_feedback(store, labels, partial=False)
        decision = run_once(store, spec)
        say(f"seed: window {n} ({phase}) under model v{model.version}: loop {decision.action}: {decision.reason[:110]}")
    counts = {}
    with store.engine.connect() as conn:
        for table in ("models", "monitor_runs", "loop_events"):
            counts[table] = conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar()
        actions = [a for (a,) in conn.execute(sa.text("SELECT action FROM loop_events"))]
    if counts["models"] < 2 or "promoted" not in actions:
        raise RuntimeError(f"the seed's loop did not retrain and promote (decisions: {actions}); see {folder}")
    store.close()
    marker.write_text(json.dumps({"version": SEED_VERSION, "counts": counts,
                                  "seconds": round(time.perf_counter() - started, 1)}))
    say(f"seed: done in {time.perf_counter() - started:.0f} s ({counts})")


@dataclass
class Templates:
    """What the seed made, to copy and vary."""

    folder: Path
    models: dict[int, dict[str, Any]]  # version -> row (artifact, manifest, metric, value, dataset_version)
    healthy: list[dict[str, Any]]  # monitor results without alerts
    drifted: list[dict[str, Any]]  # monitor results with drift
    events: dict[str, list[dict[str, Any]]]  # loop action -> evidence
    reasons: dict[str, list[str]]  # loop action -> reason

    @classmethod
    def read(cls, folder: Path) -> "Templates":
        engine = sa.create_engine(f"sqlite:///{folder / '.everloop' / 'meta.db'}")
        with engine.connect() as conn:
            models = {r.version: {"artifact": r.artifact, "manifest": json.loads(r.manifest), "metric": r.metric,
                                  "value": r.value, "dataset_version": r.dataset_version}
                      for r in conn.execute(sa.text("SELECT * FROM models ORDER BY version"))}
            results = [json.loads(r) for (r,) in conn.execute(sa.text("SELECT result FROM monitor_runs ORDER BY id"))]
            events: dict[str, list] = {}
            reasons: dict[str, list] = {}
            for action, reason, evidence in conn.execute(sa.text("SELECT action, reason, evidence FROM loop_events")):
                events.setdefault(action, []).append(json.loads(evidence))
                reasons.setdefault(action, []).append(reason)
        engine.dispose()
        healthy = [r for r in results if r["status"] == "healthy"]
        drifted = [r for r in results if "drift" in r["status"]]
        if not healthy or not drifted or "promoted" not in events or len(models) < 2:
            raise RuntimeError(f"the seed in {folder} lacks a healthy window, a drifted one or a promotion: "
                               "delete it to rebuild")
        return cls(folder, models, healthy, drifted, events, reasons)


# -- the timeline: what happened over the store's history ----------------------------------------------


@dataclass
class Version:
    number: int
    created_at: float
    dataset: int
    kind: str  # "initial" | "loop" | "manual"
    template: int  # the seed version whose artifact and manifest it copies
    value: float = 0.0
    window: int = -1  # the window at whose end it was trained
    outcome: str = ""  # promoted | kept_candidate | manual_promoted | manual_kept


@dataclass
class DatasetPlan:
    number: int
    created_at: float
    rows: int
    source: str
    parent: int | None
    shifted: bool
    planted: bool  # an export with rows to quarantine and warnings


@dataclass
class Timeline:
    t_end: float
    t0: float
    dt: float
    versions: list[Version]
    datasets: list[DatasetPlan]
    moves: list[dict[str, Any]]  # alias_history rows in order
    production: list[int]  # production version during each window
    shifted: list[bool]  # each window's regime
    retrain_at: dict[int, Version]  # window -> the loop's retraining at its end
    after_kept: set[int]  # windows following a retraining the gate refused (drift persists: cooldown)


def plan_timeline(recipe: Recipe, templates: Templates, t_end: float) -> Timeline:
    """Deterministic (recipe.seed) history: windows, retrainings, promotions, rollbacks, datasets."""
    rng = np.random.default_rng(recipe.seed)
    W = recipe.windows
    span = recipe.days * DAY
    t0, dt = t_end - span, span / W
    manual = min(3, recipe.models - 2)
    loop_count = recipe.models - 1 - manual
    candidates = np.arange(3, W - 2)
    loop_windows = sorted(rng.choice(candidates, loop_count, replace=False).tolist())
    rest = sorted(set(candidates.tolist()) - set(loop_windows) - {w + 1 for w in loop_windows})
    manual_windows = sorted(rng.choice(rest, manual, replace=False).tolist())
    rest = sorted(set(rest) - set(manual_windows))
    rollback_windows = set(rng.choice(rest, min(6, len(rest)), replace=False).tolist())
    # datasets: v1 before the history; the others come with every k-th loop retraining
    dataset_windows = {loop_windows[int(i)] for i in np.linspace(0, loop_count - 1, recipe.datasets - 1).round()}
    loop_template = max(templates.models)  # the seed's loop-retrained model
    first_template = min(templates.models)
    base_value = templates.models[first_template]["value"]

    datasets = [DatasetPlan(1, t0 - 2 * 3600, 10_000, "data/customers.csv", None, False, False)]
    versions = [Version(1, t0 - 1.5 * 3600, 1, "initial", first_template, base_value)]
    moves = [{"created_at": t0 - 3600, "alias": "production", "from_version": None, "to_version": 1,
              "actor": "alice", "reason": "initial model", "forced": False}]
    production, shifted = [], []
    retrain_at: dict[int, Version] = {}
    after_kept: set[int] = set()
    prod, candidate = 1, None
    loop_set, manual_set = set(loop_windows), set(manual_windows)
    for w in range(W):
        production.append(prod)
        shifted.append(w in loop_set or (w - 1) in after_kept)
        end = t0 + (w + 1) * dt
        if w in dataset_windows:
            n = len(datasets) + 1
            parent = datasets[-1]
            if n % 4 == 0:  # an upstream export, some of its rows quarantined
                datasets.append(DatasetPlan(n, end + 20, int(rng.integers(8000, 15000)),
                                            f"exports/customers-{time.strftime('%Y-%m-%d', time.gmtime(end))}.csv",
                                            None, True, True))
            else:
                rows = min(parent.rows + 3000, 25_000)
                datasets.append(DatasetPlan(n, end + 20, rows,
                                            f"loop: 3000 recent labelled rows + dataset v{parent.number}",
                                            parent.number, True, False))
        if w in loop_set:
            v = Version(len(versions) + 1, end + float(rng.uniform(40, 120)), datasets[-1].number, "loop",
                        loop_template, window=w)
            promoted = rng.random() < 0.6
            v.outcome = "promoted" if promoted else "kept_candidate"
            v.value = base_value + float(rng.normal(0.004 if promoted else -0.012, 0.006))
            versions.append(v)
            retrain_at[w] = v
            if promoted:
                moves.append({"created_at": v.created_at + 5, "alias": "production", "from_version": prod,
                              "to_version": v.number, "actor": "everloop loop",
                              "reason": f"retrained on dataset v{v.dataset} ({datasets[v.dataset - 1].rows} rows) "
                                        "after drift, performance; passed the gate", "forced": False})
                prod = v.number
            else:
                after_kept.add(w)
                moves.append({"created_at": v.created_at + 5, "alias": "candidate", "from_version": candidate,
                              "to_version": v.number, "actor": "everloop loop",
                              "reason": "roc_auc is worse than production's on the same evaluation data",
                              "forced": False})
                candidate = v.number
        elif w in manual_set:
            v = Version(len(versions) + 1, end + float(rng.uniform(60, 600)), datasets[-1].number, "manual",
                        first_template, float(base_value + rng.normal(0.0, 0.006)), window=w)
            versions.append(v)
            forced = len(versions) % 2 == 0
            v.outcome = "manual_promoted"
            moves.append({"created_at": v.created_at + 120, "alias": "production", "from_version": prod,
                          "to_version": v.number, "actor": "alice",
                          "reason": ("hotfix for the billing export (forced past: roc_auc is worse than "
                                     "production's by 0.0061, allowed 0.005)") if forced else "passed the gate",
                          "forced": forced})
            prod = v.number
        elif w in rollback_windows:
            last = next((m for m in reversed(moves) if m["alias"] == "production" and m["from_version"] is not None
                         and m["from_version"] != m["to_version"]), None)
            if last is not None and last["to_version"] == prod:
                moves.append({"created_at": end + 300, "alias": "production", "from_version": prod,
                              "to_version": last["from_version"], "actor": "bob",
                              "reason": "rollback: p99 latency doubled after the promotion", "forced": False})
                prod = last["from_version"]
    # any dataset not yet placed (few loop retrainings) comes as an export near the end
    while len(datasets) < recipe.datasets:
        n = len(datasets) + 1
        datasets.append(DatasetPlan(n, t_end - (recipe.datasets - n + 1) * 600, 9000,
                                    f"exports/customers-extra-{n}.csv", None, False, True))
    return Timeline(t_end, t0, dt, versions, datasets, moves, production, shifted, retrain_at, after_kept)


# -- varying real records ---------------------------------------------------------------------------


def _jitter(value: Any, rng: np.random.Generator, scale: float) -> Any:
    """A number moved by a relative amount ~ N(0, scale); unit-interval numbers stay in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value is None:
        return value
    moved = value * (1 + rng.normal(0, scale))
    if 0 <= value <= 1:
        moved = min(max(moved, 0.0), 1.0)
    return int(round(moved)) if isinstance(value, int) else float(moved)


def _jitter_tree(tree: Any, rng: np.random.Generator, scale: float) -> Any:
    if isinstance(tree, dict):
        return {k: _jitter_tree(v, rng, scale) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_jitter_tree(v, rng, scale) for v in tree]
    return _jitter(tree, rng, scale)


def model_row(v: Version, plan: Timeline, templates: Templates, dataset_hashes: dict[int, str],
              rng: np.random.Generator) -> dict[str, Any]:
    base = templates.models[v.template]
    manifest = copy.deepcopy(base["manifest"])
    metric = base["metric"]
    manifest["metrics"] = _jitter_tree(manifest["metrics"], rng, 0.01) | {metric: v.value}
    manifest["slices"] = _jitter_tree(manifest.get("slices", {}), rng, 0.02)
    rows = plan.datasets[v.dataset - 1].rows
    reason = {"initial": "initial model",
              "loop": f"loop: drift, performance fired on window {v.window}",
              "manual": "manual retrain: learning_rate 0.05 -> 0.04"}[v.kind]
    manifest.update({"dataset_version": v.dataset, "dataset_hash": dataset_hashes[v.dataset], "reason": reason,
                     "train_rows": int(rows * 0.8), "eval_rows": rows - int(rows * 0.8)})
    return {"version": v.number, "created_at": v.created_at, "dataset_version": v.dataset,
            "artifact": base["artifact"], "manifest": manifest, "metric": metric, "value": v.value, "reason": reason}


def monitor_result(w: int, index: int, version: int, expected: float, window: dict[str, Any], shifted: bool,
                   templates: Templates, recipe: Recipe, plan: Timeline, rng: np.random.Generator) -> dict[str, Any]:
    """A window's result: a real one of the seed (drifted or healthy), its numbers varied, its window,
    model and times this window's."""
    pool = templates.drifted if shifted else templates.healthy
    result = copy.deepcopy(pool[int(rng.integers(len(pool)))])
    result["model_version"] = version
    result["created_at"] = window["to"] + 30
    result["window"] = window
    drift = result.get("drift") or {}
    for column in drift.get("columns", []):
        factor = float(np.exp(rng.normal(0, 0.2)))
        for key in ("statistic", "effect", "wasserstein", "psi", "jensen_shannon"):
            if isinstance(column.get(key), float):
                column[key] = column[key] * factor
        if isinstance(column.get("p_value"), float):
            column["p_value"] = column["p_value"] ** factor  # a larger effect, a smaller p-value
    if "current_rows" in drift:
        drift["current_rows"] = window["rows"]
    if result.get("prediction_drift"):
        result["prediction_drift"] = _jitter_tree(result["prediction_drift"], rng, 0.1)
    perf = result.get("performance") or {}
    labelled = int(window["rows"] * recipe.feedback_share)
    drop = 0.06 if shifted else 0.0
    if perf.get("value") is not None:
        perf["value"] = float(expected - drop + rng.normal(0, 0.01))
        perf["decayed"] = perf["value"] < expected - 0.03
    perf.update({"expected": expected, "threshold": expected - 0.03, "labelled_rows": labelled,
                 "window_rows": window["rows"], "from": window["from"], "to": window["to"]})
    if "estimated" in perf and isinstance(perf["estimated"], float):
        perf["estimated"] = float(expected - drop / 2 + rng.normal(0, 0.008))
    health = result.get("health") or {}
    requests = int(window["rows"] / 40 * rng.uniform(0.8, 1.2))
    health.update({"rows": window["rows"], "rows_per_second": window["rows"] / plan.dt,
                   "requests": requests, "prediction_requests": int(requests * 0.97),
                   "client_errors": int(rng.poisson(2)), "server_errors": int(rng.poisson(0.2))})
    for key in ("latency_ms_p50", "latency_ms_p95", "latency_ms_p99"):
        if isinstance(health.get(key), float):
            health[key] = health[key] * float(np.exp(rng.normal(0, 0.15)))
    result["notes"] = [n for n in result.get("notes", []) if not n.startswith("health:")]
    for dist in (result.get("distributions") or {}).values():
        if isinstance(dist.get("current"), list):
            dist["current"] = [int(rng.poisson(c)) if c else 0 for c in dist["current"]]
    result["earlier"] = []
    return result


def monitor_summary(result: dict[str, Any], rows: int) -> dict[str, Any]:
    """The loop's evidence about the monitor (loop/_controller.py `_monitor_summary`)."""
    drift = result.get("drift") or {}
    perf = result.get("performance") or {}
    return {"status": result["status"], "model_version": result["model_version"], "window": result["window"]["key"],
            "window_rows": rows, "alerts": result.get("alerts", []), "not_judged": result.get("not_judged", {}),
            "drifted": drift.get("drifted", []), "metric": perf.get("value"),
            "labelled_rows": perf.get("labelled_rows"), "estimated": perf.get("estimated")}


def gate_evidence(v: Version, production: int, production_value: float, templates: Templates,
                  rng: np.random.Generator) -> tuple[dict[str, Any], list[str]]:
    """The gate's decision for loop version `v` against `production` (the seed's promotion evidence,
    its numbers this comparison's)."""
    base = copy.deepcopy(templates.events["promoted"][0]["gate"])
    passed = v.outcome == "promoted"
    evidence = base.get("evidence", {})
    candidate_on_rows = float(production_value + (rng.uniform(0.001, 0.03) if passed else -rng.uniform(0.006, 0.03)))
    comparison = evidence.get("comparison", {})
    comparison.update({"candidate": candidate_on_rows, "production": production_value,
                       "loss": production_value - candidate_on_rows})
    evidence.update({"candidate": v.value, "production_version": production, "production": production_value})
    evidence["slices"] = _jitter_tree(evidence.get("slices", {}), rng, 0.02)
    reasons = [] if passed else [
        f"roc_auc {candidate_on_rows:.4f} is worse than production v{production}'s {production_value:.4f} on the "
        f"same evaluation data ({comparison.get('rows', 300)} held-out rows neither model trained on) by "
        f"{production_value - candidate_on_rows:.4f} (allowed: promotion.max_regression 0.005)"]
    base.update({"candidate": v.number, "production": production, "passed": passed, "reasons": reasons,
                 "evidence": evidence})
    return base, reasons


# -- writing -------------------------------------------------------------------------------------------


class Writer:
    """Bulk rows into one store's tables: executemany on SQLite, COPY on PostgreSQL."""

    def __init__(self, target: Target):
        self.target = target
        self.engine = target.store.engine
        self.json_columns = {t.name: {c.name for c in t.columns if isinstance(c.type, sa.JSON)}
                             for t in target.store.tables.metadata.sorted_tables}

    def insert(self, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if not self.target.postgres:
            with self.engine.begin() as conn:
                conn.execute(table.insert(), rows)
            return
        from everloop.store._meta import dumps_json

        names = list(rows[0])
        json_names = self.json_columns[table.name]
        with self.engine.begin() as conn:
            cursor = conn.connection.driver_connection.cursor()
            with cursor.copy(f"COPY {table.name} ({', '.join(names)}) FROM STDIN") as copy_in:
                for row in rows:
                    copy_in.write_row([dumps_json(row[n]) if n in json_names else row[n] for n in names])

    def finish(self, tables: list[sa.Table]) -> None:
        """PostgreSQL: move each serial sequence past the ids given, then VACUUM ANALYZE."""
        if not self.target.postgres:
            return
        with self.engine.begin() as conn:
            for table in tables:
                key = table.primary_key.columns.values()[0].name
                conn.execute(sa.text(f"SELECT setval(pg_get_serial_sequence('{table.name}', '{key}'), "
                                     f"coalesce((SELECT max({key}) FROM {table.name}), 1))"))
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE"))


class Progress:
    def __init__(self, label: str, total: int, every: float = 0.05):
        self.label, self.total, self.every = label, total, every
        self.started, self.next = time.perf_counter(), every

    def update(self, done: int) -> None:
        share = done / self.total if self.total else 1.0
        if share + 1e-9 >= self.next or done >= self.total:
            spent = time.perf_counter() - self.started
            eta = spent / share - spent if share > 0 else 0.0
            say(f"  {self.label}: {done:,} / {self.total:,} ({share:.0%}), {spent:.0f} s, about {eta:.0f} s to go")
            while self.next <= share + 1e-9:
                self.next += self.every


def _worker_id(slot: int, day: int) -> str:
    return hashlib.sha256(f"ui-bench-worker-{slot}-{day}".encode()).hexdigest()[:16]


def build(targets: list[Target], recipe: Recipe, folder: Path) -> None:
    """Build the big store on every target (the same history on each, generated once)."""
    from everloop import data
    from everloop.demo import make_churn
    from everloop.demo._scenario import START
    from everloop.serve._log import batch_row
    from everloop.spec import load_spec
    from everloop.store import ArtifactStore, Store

    seed_dir = folder / "seed"
    build_seed(seed_dir)
    templates = Templates.read(seed_dir)
    t_end = float(int(time.time()))
    plan = plan_timeline(recipe, templates, t_end)
    rng = np.random.default_rng(recipe.seed + 1)
    started = time.perf_counter()
    # the artifacts the seed's models reference (pipelines, evaluation rows, row hashes, profiles): no other
    seed_artifacts = ArtifactStore(seed_dir / ".everloop" / "artifacts")
    manifests = json.dumps([m["manifest"] for m in templates.models.values()])
    referenced = {m["artifact"] for m in templates.models.values()} | set(re.findall(r"\b[0-9a-f]{64}\b", manifests))

    for target in targets:
        t = time.perf_counter()
        _fresh_database(target)
        write_project(target.project, recipe.window_rows)
        target.store = Store.for_project(target.project, target.db_url)
        spec = load_spec(target.project)
        # the seed's artifacts (pipelines, evaluation rows, profiles), by the same digests
        copied = 0
        for digest in sorted(referenced):
            path = seed_artifacts.path(digest)
            if path.exists():
                target.store.artifacts.put(path.read_bytes())
                copied += 1
        say(f"[{target.name}] {target.project}: {copied} artifacts copied from the seed; ingesting "
            f"{len(plan.datasets)} dataset versions (API) ...")
        hashes: dict[int, str] = {}
        for d in plan.datasets:
            if d.number == 1:
                version = data.ingest(target.store, spec, base=target.project)
            else:
                frame = make_churn(d.rows, shifted=d.shifted, seed=recipe.seed * 100 + d.number,
                                   start=START + pd.Timedelta(days=d.number), id_offset=100_000 * d.number)
                if d.planted:
                    frame["churned"] = frame["churned"].astype(object)
                    frame.loc[frame.index[:5 + d.number % 7], "churned"] = "unknown"
                    frame.loc[frame.index[40:43], "customer_id"] = None
                    frame["age"] = frame["age"].astype(object)
                    frame.loc[frame.index[60:60 + d.number % 4 + 1], "age"] = "unknown"
                    frame.loc[frame.index[50:50 + d.number % 5 + 1], "region"] = "central"
                version = data.ingest_frame(target.store, spec, frame, source=d.source, parent=d.parent,
                                            mode="quarantine" if d.planted else "reject")
            if version.version != d.number:
                raise RuntimeError(f"dataset {d.number} was stored as v{version.version} (a duplicate?)")
            hashes[d.number] = version.content_hash
        with target.store.engine.begin() as conn:
            table = target.store.tables.datasets
            for d in plan.datasets:
                conn.execute(table.update().where(table.c.version == d.number).values(created_at=d.created_at))
        target.hashes = hashes
        if target.hashes != targets[0].hashes:
            raise RuntimeError(f"[{target.name}] the datasets' content hashes differ from [{targets[0].name}]'s")
        target.writer = Writer(target)
        target.seconds["datasets"] = time.perf_counter() - t

    tables = targets[0].store.tables
    # models, aliases
    rows = [model_row(v, plan, templates, targets[0].hashes, rng) for v in plan.versions]
    values = {v.number: v.value for v in plan.versions}
    history = [{"id": n, **m} for n, m in enumerate(plan.moves, start=1)]
    aliases: dict[str, dict[str, Any]] = {}
    for m in history:
        aliases[m["alias"]] = {"name": m["alias"], "version": m["to_version"], "updated_at": m["created_at"]}
    for target in targets:
        target.writer.insert(tables.models, rows)
        target.writer.insert(tables.alias_history, history)
        target.writer.insert(tables.aliases, list(aliases.values()))
    say(f"models: {len(rows)} versions, {len(history)} alias moves "
        f"({sum(m['alias'] == 'production' for m in history)} of production), bulk")

    # pools of served rows: (template model, regime) -> Pool
    say(f"predicting {recipe.pool_rows:,}-row pools with the seed's models (the service's fast path) ...")
    seed_store = Store.for_project(seed_dir)
    pools: dict[tuple[int, bool], Pool] = {}
    for version in templates.models:
        model = _serving_model(seed_store, version)
        for shifted in (False, True):
            frame = make_churn(recipe.pool_rows, shifted=shifted, seed=recipe.seed * 10 + version * 2 + shifted,
                               id_offset=9_000_000)
            pools[(version, shifted)] = Pool(model, frame)
    seed_store.close()
    template_of = {v.number: v.template for v in plan.versions}

    # predictions, labels, windows, loop decisions: window by window
    say(f"logging {recipe.predictions:,} predictions in {recipe.windows} windows of {recipe.window_rows:,} "
        f"(bulk; payloads by the service's log writer code) ...")
    progress = Progress("predictions", recipe.windows * recipe.window_rows)
    seq, counters = 0, {}
    window_index: dict[int, int] = {}
    batch_buffer: list[dict[str, Any]] = []
    label_buffer: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    totals = {"batches": 0, "labels": 0, "payload_bytes": 0}
    t_pred = time.perf_counter()
    for w in range(recipe.windows):
        version = plan.production[w]
        pool = pools[(template_of[version], plan.shifted[w])]
        start_t = plan.t0 + w * plan.dt
        sizes = []
        left = recipe.window_rows
        while left > 0:
            n = min(left, int(np.exp(rng.uniform(0, np.log(recipe.max_batch_rows)))))
            sizes.append(n)
            left -= n
        times = np.sort(rng.uniform(start_t, start_t + plan.dt, len(sizes)))
        first_seq = seq + 1
        for n, when in zip(sizes, times):
            slot = int(rng.integers(recipe.workers))
            worker = _worker_id(slot, int((when - plan.t0) // DAY))
            counter = counters.get(worker, 0)
            counters[worker] = counter + n
            offset = int(rng.integers(0, pool.size - n + 1))
            entry = pool.entry(offset, n, worker, counter, float(when), version, float(np.exp(rng.normal(1.2, 0.4))))
            seq += 1
            row = batch_row([entry]) | {"seq": seq}
            batch_buffer.append(row)
            totals["payload_bytes"] += len(row["payload"])
            chosen = np.flatnonzero(rng.random(n) < recipe.feedback_share)
            if len(chosen):
                arrive = when + rng.uniform(3600, 3 * DAY, len(chosen))
                for k, at in zip(chosen, arrive):
                    if at < plan.t_end:
                        label_buffer.append({"prediction_id": entry.ids[k], "created_at": float(at),
                                             "label": int(pool.truth[offset + k])})
        index = window_index.get(version, 0)
        window_index[version] = index + 1
        window = {"key": f"rows:{recipe.window_rows}:{index}", "kind": "rows", "size": recipe.window_rows,
                  "index": index, "rows": recipe.window_rows, "complete": True, "from": float(times[0]),
                  "to": float(times[-1]), "first_seq": first_seq, "last_seq": seq}
        result = monitor_result(w, index, version, values[version], window, plan.shifted[w], templates, recipe,
                                plan, rng)
        runs.append({"id": w + 1, "created_at": result["created_at"], "model_version": version, "result": result,
                     "window_key": window["key"], "complete": True})
        events += loop_turns(w, result, plan, templates, values, rng)
        if len(batch_buffer) >= 2000 or w == recipe.windows - 1:
            for target in targets:
                target.writer.insert(tables.prediction_batches, batch_buffer)
                target.writer.insert(tables.feedback, label_buffer)
            totals["batches"] += len(batch_buffer)
            totals["labels"] += len(label_buffer)
            batch_buffer, label_buffer = [], []
        progress.update((w + 1) * recipe.window_rows)
    seconds_predictions = time.perf_counter() - t_pred
    for target in targets:
        target.seconds["predictions"] = seconds_predictions
        for chunk in range(0, len(runs), 100):
            target.writer.insert(tables.monitor_runs, runs[chunk:chunk + 100])
        target.writer.insert(tables.loop_events, events)
    say(f"monitor_runs: {len(runs)} windows; loop_events: {len(events)} decisions (bulk)")

    stats = service_stats(recipe, plan, rng)
    for target in targets:
        for chunk in range(0, len(stats), 20_000):
            target.writer.insert(tables.service_stats, stats[chunk:chunk + 20_000])
        t = time.perf_counter()
        target.writer.finish([tables.models, tables.alias_history, tables.prediction_batches, tables.monitor_runs,
                              tables.loop_events, tables.service_stats])
        target.seconds["finish"] = time.perf_counter() - t
    say(f"service_stats: {len(stats):,} rows ({recipe.workers} workers, one a second for {recipe.stats_hours:g} h)")

    for target in targets:
        counts = table_counts(target)
        sizes = store_sizes(target)
        marker = {"key": recipe.key(), "recipe": asdict(recipe), "db": _shown(target.db_url), "t_end": plan.t_end,
                  "built_at": time.time(), "seconds": round(time.perf_counter() - started, 1), "counts": counts,
                  "sizes": sizes, "production": plan.production[-1], "versions": len(plan.versions),
                  "payload_bytes": totals["payload_bytes"], "labels": totals["labels"]}
        target.marker.write_text(json.dumps(marker, indent=1))
        target.store.close()


def loop_turns(w: int, result: dict[str, Any], plan: Timeline, templates: Templates, values: dict[int, float],
               rng: np.random.Generator) -> list[dict[str, Any]]:
    """The loop's two turns in window `w`: one mid-window, one after it ends."""
    start = plan.t0 + w * plan.dt
    out = []
    rows = result["window"]["rows"]
    for when, last in ((start + plan.dt / 2, False), (start + plan.dt + 15, True)):
        summary = monitor_summary(result, rows if last else rows // 2)
        retrained = plan.retrain_at.get(w) if last else None
        cooling = (w - 1) in plan.after_kept
        if retrained is not None:
            production = plan.production[w]
            gate, reasons = gate_evidence(retrained, production, values[production], templates, rng)
            trained_on = f"dataset v{retrained.dataset} ({plan.datasets[retrained.dataset - 1].rows} rows)"
            if retrained.outcome == "promoted":
                reason = (f"drift, performance fired; model v{retrained.number} trained on {trained_on} passed "
                          "the gate and is in production")
            else:
                reason = (f"drift, performance fired; model v{retrained.number} was refused by the gate: "
                          + "; ".join(reasons))
            evidence = {"triggers": ["drift", "performance"], "monitor": summary, "model_version": retrained.number,
                        "gate": gate}
            out.append({"created_at": retrained.created_at + 6, "action": retrained.outcome, "reason": reason,
                        "evidence": evidence})
            continue
        if cooling:
            wait = max(1.0, 60 - (when - plan.retrain_at[w - 1].created_at) / 60)
            out.append({"created_at": when, "action": "cooldown",
                        "reason": f"drift, performance fired, but the last retraining was less than 60 min ago "
                                  f"({wait:.1f} min to wait)",
                        "evidence": {"triggers": ["drift", "performance"], "monitor": summary, "model_version": None,
                                     "gate": None}})
            continue
        if plan.shifted[w]:  # mid-way through the window a retraining ends: the drift is not visible yet
            summary.update({"status": "healthy", "alerts": [], "drifted": []})
        out.append({"created_at": when, "action": "idle", "reason": "no trigger fired (status: healthy)",
                    "evidence": {"triggers": [], "monitor": summary, "model_version": None, "gate": None}})
    return out


def service_stats(recipe: Recipe, plan: Timeline, rng: np.random.Generator) -> list[dict[str, Any]]:
    """One row a second per worker for the last `stats_hours`, as the service writes them."""
    seconds = int(recipe.stats_hours * 3600)
    out = []
    for slot in range(recipe.workers):
        name = f"web-1:{4100 + slot}"
        when = plan.t_end - seconds + rng.uniform(0, 1, seconds) + np.arange(seconds)
        requests = rng.poisson(3.0, seconds) + 1
        refused = rng.binomial(requests, 0.002)
        other = rng.binomial(requests, 0.001)
        server = rng.binomial(requests, 0.0005)
        for t, r, bad, o, s in zip(when.tolist(), requests.tolist(), refused.tolist(), other.tolist(), server.tolist()):
            out.append({"created_at": t, "worker": name, "requests": r, "client_errors": bad + o, "server_errors": s,
                        "prediction_requests": r - o, "refused_predictions": bad, "other_client_errors": o})
    out.sort(key=lambda row: row["created_at"])
    for n, row in enumerate(out, start=1):
        row["id"] = n
    return out


# -- re-dating: a store built yesterday, as if its history ended now ----------------------------------


TIME_COLUMNS = ("created_at", "updated_at")
RESULT_TIMES = (("created_at",), ("window", "from"), ("window", "to"), ("performance", "from"), ("performance", "to"))


def history_end(engine: sa.Engine) -> float | None:
    """When the store's history ends: its latest service stats row (the service writes them to the end)."""
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT max(created_at) FROM service_stats")).scalar()


def redate(target: Target, now: float | None = None, slack: float = 600.0) -> float:
    """Shift every timestamp of the target's store (each table's created_at / updated_at, and the times in
    the monitor results) so that its history ends `now`, when it ended more than `slack` seconds ago:
    pages that read the latest minutes or hours (health, service stats, "2 h ago") then see a live
    service however long ago the store was built. One transaction (PostgreSQL: VACUUM ANALYZE after).
    The rows' own times inside the prediction payloads are not shifted (no page reads payloads).
    Returns the shift in seconds (0.0 when none was needed)."""
    from everloop.store import Store

    now = time.time() if now is None else now
    store = Store.for_project(target.project, target.db_url)
    end = history_end(store.engine)
    delta = 0.0 if end is None else now - end
    if delta <= slack:
        store.close()
        return 0.0
    say(f"[{target.name}] re-dating the store by {delta / 3600:.1f} h so that its history ends now ...")
    started = time.perf_counter()
    with store.engine.begin() as conn:
        for table in store.tables.metadata.sorted_tables:
            for column in (c for c in table.columns if c.name in TIME_COLUMNS):
                conn.execute(table.update().values({column.name: column + delta}))
        runs = store.tables.monitor_runs
        for run_id, result in conn.execute(sa.select(runs.c.id, runs.c.result)).all():
            for path in RESULT_TIMES:
                holder = result
                for key in path[:-1]:
                    holder = holder.get(key) if isinstance(holder, dict) else None
                if isinstance(holder, dict) and isinstance(holder.get(path[-1]), (int, float)):
                    holder[path[-1]] += delta
            conn.execute(runs.update().where(runs.c.id == run_id).values(result=result))
    if target.postgres:
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE"))
    store.close()
    marker = read_marker(target)
    if marker:
        marker["t_end"] = marker.get("t_end", 0) + delta
        marker["redated"] = marker.get("redated", 0) + delta
        target.marker.write_text(json.dumps(marker, indent=1))
    say(f"[{target.name}] re-dated in {time.perf_counter() - started:.0f} s")
    return delta


# -- reporting -----------------------------------------------------------------------------------------


COUNTED = ("datasets", "models", "alias_history", "prediction_batches", "feedback", "monitor_runs", "loop_events",
           "service_stats")


def table_counts(target: Target) -> dict[str, int]:
    with target.store.engine.connect() as conn:
        counts = {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar() for t in COUNTED}
        counts["predictions"] = conn.execute(sa.text("SELECT coalesce(sum(rows), 0) FROM prediction_batches")).scalar()
    return counts


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def store_sizes(target: Target) -> dict[str, Any]:
    """Megabytes: the metadata database (and its largest tables on PostgreSQL), the artifacts."""
    mb = 1024 ** 2
    out: dict[str, Any] = {"artifacts_mb": round(_dir_bytes(target.project / ".everloop" / "artifacts") / mb, 1)}
    if not target.postgres:
        files = [target.project / ".everloop" / f"meta.db{suffix}" for suffix in ("", "-wal")]
        out["database_mb"] = round(sum(f.stat().st_size for f in files if f.exists()) / mb, 1)
        return out
    with target.store.engine.connect() as conn:
        out["database_mb"] = round(conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar() / mb, 1)
        out["tables_mb"] = {t: round(conn.execute(sa.text(f"SELECT pg_total_relation_size('{t}')")).scalar() / mb, 1)
                            for t in ("prediction_batches", "feedback", "monitor_runs", "loop_events", "service_stats",
                                      "models", "datasets")}
    return out


def ensure(targets: list[Target], recipe: Recipe, folder: Path, force: bool = False) -> dict[str, Any]:
    """Build the targets whose store is missing or of another recipe; returns each one's marker."""
    recipe.check()
    todo = [t for t in targets if force or not is_current(t, recipe)]
    for target in targets:
        if target not in todo:
            say(f"[{target.name}] reusing the store in {target.project} (recipe {recipe.key()} unchanged)")
    if todo:
        if any(t.postgres for t in todo):
            _check_pg(next(t for t in todo if t.postgres))
        _check_disk(folder, recipe)
        started = time.perf_counter()
        build(todo, recipe, folder)
        say(f"built {', '.join(t.name for t in todo)} in {time.perf_counter() - started:.0f} s")
    return {t.name: read_marker(t) for t in targets}


def _check_pg(target: Target) -> None:
    try:
        engine = _admin_engine(target.db_url)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
    except sa.exc.SQLAlchemyError as exc:
        raise SystemExit(f"PostgreSQL at {_shown(target.db_url)} cannot be reached ({exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0]}); set EVERLOOP_DB_URL or pass --backend sqlite") from None


def _check_disk(folder: Path, recipe: Recipe) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(folder).free / 1024 ** 3
    need_gb = 20 if recipe.predictions >= 5_000_000 else 2
    if free_gb < need_gb:
        raise SystemExit(f"only {free_gb:.1f} GB free under {folder}: the build needs at least {need_gb} GB; "
                         "free space or pass --dir elsewhere")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser.parse_args(argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"where the stores live (default {DEFAULT_DIR})")
    parser.add_argument("--pg-server", default=None,
                        help="a PostgreSQL URL whose server to use (default EVERLOOP_DB_URL, else "
                             f"{DEFAULT_PG_SERVER}); the benchmark uses its own database {PG_DATABASE} there")
    parser.add_argument("--quick", action="store_true", help="300k predictions in 150 windows (for development)")
    parser.add_argument("--predictions", type=int)
    parser.add_argument("--windows", type=int)
    parser.add_argument("--force", action="store_true", help="rebuild even when the recipe did not change")


def recipe_from(args: argparse.Namespace) -> Recipe:
    recipe = QUICK if args.quick else Recipe()
    changes = {k: getattr(args, k) for k in ("predictions", "windows") if getattr(args, k) is not None}
    return Recipe(**(asdict(recipe) | changes))


def main() -> None:
    args = parse()
    recipe = recipe_from(args)
    targets = targets_for(args.backend, args.dir, recipe, args.pg_server)
    started = time.perf_counter()
    markers = ensure(targets, recipe, args.dir, args.force)
    say("")
    for target in targets:
        m = markers[target.name] or {}
        say(f"{target.name}: {target.project} ({m.get('db')}), built in {m.get('seconds')} s")
        say(f"  rows: {json.dumps(m.get('counts'))}")
        say(f"  sizes: {json.dumps(m.get('sizes'))}")
    print(json.dumps({"bench": "ui_store", "recipe": recipe.key(), "seconds": round(time.perf_counter() - started, 1),
                      "stores": {t.name: {"project": str(t.project), "db": (markers[t.name] or {}).get("db"),
                                          "build_seconds": (markers[t.name] or {}).get("seconds"),
                                          "counts": (markers[t.name] or {}).get("counts"),
                                          "sizes": (markers[t.name] or {}).get("sizes")} for t in targets}}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
