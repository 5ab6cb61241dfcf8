"""Metadata tables (SQLAlchemy Core): SQLite in the project folder by default, any SQLAlchemy URL otherwise."""

from __future__ import annotations

import time

import orjson
import sqlalchemy as sa
from sqlalchemy import event

FORMAT_VERSION = "1"

metadata = sa.MetaData()


def _now_column() -> sa.Column:
    return sa.Column("created_at", sa.Float, nullable=False, default=time.time)


meta = sa.Table(
    "everloop_meta", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

schemas = sa.Table(
    "schemas", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=True),
    _now_column(),
    sa.Column("body", sa.JSON, nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
)

datasets = sa.Table(
    "datasets", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=True),
    _now_column(),
    sa.Column("content_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("artifact", sa.String(64), nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("columns", sa.Integer, nullable=False),
    sa.Column("schema_version", sa.Integer, nullable=False),
    sa.Column("parent", sa.Integer, nullable=True),
    sa.Column("warnings", sa.JSON, nullable=False),
    sa.Column("stats", sa.JSON, nullable=False),
    sa.Column("quarantine", sa.String(64), nullable=True),
    sa.Column("quarantined", sa.Integer, nullable=False, default=0),
)

models = sa.Table(
    "models", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=True),
    _now_column(),
    sa.Column("dataset_version", sa.Integer, nullable=False),
    sa.Column("artifact", sa.String(64), nullable=False),
    sa.Column("manifest", sa.JSON, nullable=False),
    sa.Column("metric", sa.String(32), nullable=False),
    sa.Column("value", sa.Float, nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
)

aliases = sa.Table(
    "aliases", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False, default=time.time),
)

# Append-only: every move of every alias, so what served at any past moment can be answered.
alias_history = sa.Table(
    "alias_history", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    _now_column(),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("from_version", sa.Integer, nullable=True),
    sa.Column("to_version", sa.Integer, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("forced", sa.Boolean, nullable=False, default=False),
)

# The prediction log: one row per model call, its rows in one Arrow IPC payload (see _predictions.py).
prediction_batches = sa.Table(
    "prediction_batches", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("worker", sa.String(32), nullable=False),  # the prediction ids' prefix: the writing worker
    sa.Column("first_counter", sa.BigInteger, nullable=False),  # the range of id counters in the batch
    sa.Column("last_counter", sa.BigInteger, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    _now_column(),
    sa.Column("model_version", sa.Integer, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Index("ix_prediction_batches_created_at", "created_at"),
    sa.Index("ix_prediction_batches_worker", "worker", "first_counter"),
)

feedback = sa.Table(
    "feedback", metadata,
    sa.Column("prediction_id", sa.String(32), primary_key=True),
    _now_column(),
    sa.Column("label", sa.JSON, nullable=False),
)

monitor_runs = sa.Table(
    "monitor_runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    _now_column(),
    sa.Column("model_version", sa.Integer, nullable=True),
    sa.Column("result", sa.JSON, nullable=False),
    # a window is defined by its rows (the n-th block of N predictions, or a period of the data's time):
    # a re-run over the same rows updates its row instead of adding one
    sa.Column("window_key", sa.String(64), nullable=True),
    sa.Column("complete", sa.Boolean, nullable=True),
    sa.Index("ix_monitor_runs_window", "model_version", "window_key"),
)

# The service's request counts, written by each worker about once a second: error rates for the monitor.
service_stats = sa.Table(
    "service_stats", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    _now_column(),
    sa.Column("worker", sa.String(64), nullable=False),
    sa.Column("requests", sa.Integer, nullable=False),  # every request, on any path
    sa.Column("client_errors", sa.Integer, nullable=False),  # every 4xx answer, on any path
    sa.Column("server_errors", sa.Integer, nullable=False),  # every 5xx answer, on any path
    # POSTs to /predict, /invocations and /v2/models/{name}/infer, and their 4xx answers (bad input);
    # other requests' 4xx (a bad /feedback body, an unknown path) apart: they say nothing of the model.
    # Nullable: a store made before they existed gets them added (rows written then have none)
    sa.Column("prediction_requests", sa.Integer, nullable=True),
    sa.Column("refused_predictions", sa.Integer, nullable=True),
    sa.Column("other_client_errors", sa.Integer, nullable=True),
    # the dashboard's and the monitor's reads are bounded by time (a day of a busy service is ~10^5 rows)
    sa.Index("ix_service_stats_created_at", "created_at"),
)

# The loop's audit trail: every decision with its evidence.
loop_events = sa.Table(
    "loop_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    _now_column(),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("evidence", sa.JSON, nullable=False),
)


# The compiled-tree cache (serve/_compiled.py): each shared library's sha256, recorded by the process
# that built it; a cached file is loaded only when it still has this hash (a planted one never runs).
compiled_libraries = sa.Table(
    "compiled_libraries", metadata,
    sa.Column("key", sa.String(128), primary_key=True),  # the cache file's name: "<key>.so"
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("model_version", sa.Integer, nullable=True),  # the model it was first built for
    _now_column(),
)


# Predictions a service answered but could not log because its worker was killed (SIGKILL, OOM) before
# its writer wrote them: counted by the next service to start on that machine (serve/_log.py's ledger).
lost_predictions = sa.Table(
    "lost_predictions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    _now_column(),
    sa.Column("worker", sa.String(64), nullable=False),  # the killed worker's id prefix
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)


# Shadow and canary rollouts (registry/_rollout.py): at most one `active` at a time. The candidate is
# judged against `production` on live traffic and then promoted or rolled back by the loop or by hand.
rollouts = sa.Table(
    "rollouts", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    _now_column(),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("candidate", sa.Integer, nullable=False),
    sa.Column("production", sa.Integer, nullable=True),  # the version it is compared with (production at start)
    sa.Column("mode", sa.String(16), nullable=False),  # shadow | canary
    sa.Column("share", sa.Float, nullable=False),  # canary: percent of traffic the candidate answers; shadow: 0
    sa.Column("sample", sa.Float, nullable=False),  # shadow: percent of rows the candidate also scores
    sa.Column("steps", sa.JSON, nullable=False),  # canary: the percents to step through
    sa.Column("status", sa.String(16), nullable=False),  # active | promoted | rolled_back | aborted
    sa.Column("actor", sa.String(255), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("evidence", sa.JSON, nullable=True),  # the last judgement's numbers
    sa.Index("ix_rollouts_status", "status"),
)

# A shadow candidate's predictions: the same format as prediction_batches (store/_predictions.py), the
# same prediction ids as the production rows they shadow, kept apart so that nothing reading the log
# (monitoring, feedback, retraining) ever mistakes them for answers a client got.
shadow_batches = sa.Table(
    "shadow_batches", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rollout", sa.Integer, nullable=False),
    sa.Column("worker", sa.String(32), nullable=False),
    sa.Column("first_counter", sa.BigInteger, nullable=False),
    sa.Column("last_counter", sa.BigInteger, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    _now_column(),
    sa.Column("model_version", sa.Integer, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Index("ix_shadow_batches_rollout", "rollout", "seq"),
)

# Per worker and version under a rollout, written with service_stats: model calls and the failed ones
# (a shadow candidate's errors never reach a client, so they are counted here).
rollout_stats = sa.Table(
    "rollout_stats", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    _now_column(),
    sa.Column("rollout", sa.Integer, nullable=False),
    sa.Column("worker", sa.String(64), nullable=False),
    sa.Column("model_version", sa.Integer, nullable=False),
    sa.Column("calls", sa.Integer, nullable=False),
    sa.Column("errors", sa.Integer, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Index("ix_rollout_stats_rollout", "rollout"),
)


# Leases (see _lease.py): one row per name; whoever holds an unexpired row may do that work.
leases = sa.Table(
    "leases", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(255), nullable=False),  # host and pid, for people
    sa.Column("process", sa.String(255), nullable=False),  # boot id, pid namespace, pid: is the holder alive?
    sa.Column("token", sa.BigInteger, nullable=False),  # +1 at every acquisition: the holder's identity
    sa.Column("acquired_at", sa.Float, nullable=False),  # the database's clock, epoch seconds
    sa.Column("expires_at", sa.Float, nullable=False),
)


def dumps_json(value: object) -> str:
    """JSON columns through orjson: the prediction log writes thousands of rows a second, and the
    standard library's encoder would hold the GIL against the request handlers for most of it."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS).decode()


def make_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30}, json_serializer=dumps_json)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):  # WAL lets the server log while the CLI reads
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True, json_serializer=dumps_json)
