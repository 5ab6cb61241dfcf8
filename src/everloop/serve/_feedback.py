"""Recording ground-truth labels (feedback): the one path HTTP `/feedback` and `everloop feedback` share.

Each label is checked against the model version that made its prediction (its manifest's task and
classes, through `everloop.train.label_parser`) and stored in its canonical form, so a stored label can
always be read back by the monitor and the loop. A later label replaces an earlier one: within one call
(the last item for an id wins) and across calls (an upsert, so concurrent calls cannot collide).
"""

from __future__ import annotations

import reprlib
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from dataclasses import field as _field
from typing import Any, Callable, Iterator

import sqlalchemy as sa

from everloop.store import Store, prediction_log
from everloop.train import label_parser

SHAPE = "expected an object with a string 'id' and a 'label'"


@dataclass
class FeedbackProblem:
    """One refused item: `where` it was (the caller's position, e.g. ["labels", 3] or "row 5"), its id
    (None when it has none), why, and which part of it is at fault ("id", "label", or None: the item)."""

    where: Any
    id: str | None
    why: str
    field: str | None = None


@dataclass
class FeedbackResult:
    """What one call recorded. `accepted`: labels stored (one per distinct known id); `unknown_ids`: ids
    no logged prediction has (each once, in order); `problems`: refused items; `superseded`: valid items
    replaced by a later item for the same id in the same call; `received`: items in the call."""

    received: int
    accepted: int = 0
    unknown_ids: list[str] = _field(default_factory=list)
    problems: list[FeedbackProblem] = _field(default_factory=list)
    superseded: int = 0

    @property
    def complete(self) -> bool:
        """Every item was recorded (or replaced by a later one for its id): nothing refused or unknown."""
        return not self.problems and not self.unknown_ids

    def to_dict(self) -> dict[str, Any]:
        return {"received": self.received, "accepted": self.accepted, "unknown_ids": self.unknown_ids,
                "superseded": self.superseded, "problems": [asdict(p) for p in self.problems]}


def record_feedback(store: Store, items: list[dict[str, Any]], *, partial: bool,
                    lock_wait: float | None = None) -> FeedbackResult:
    """Validate and store labels for logged predictions, in one transaction.

    `items`: `{"id": str, "label": Any}` dicts, each with an optional "where" (its position for messages;
    default its index). An id is read without surrounding whitespace (`" abc "` is `"abc"`; unknown ids
    are reported so). Each is checked for shape, matched to its logged prediction
    (`prediction_log.find`), and its label parsed against the manifest (task, classes) of the model
    version that made that prediction (`everloop.train.label_parser`). Ids repeated in the call: the last
    valid item wins. Valid labels of known ids are upserted (SQLite/PostgreSQL `ON CONFLICT DO UPDATE`,
    so a later label replaces an earlier one and two concurrent calls cannot collide). With
    `partial=False` (HTTP) nothing is stored when any item is refused; with `partial=True` (a file) the
    valid items are stored and the refused ones reported. Unknown ids are reported, never an error.
    `lock_wait`: the longest wait, in seconds, for a lock another connection holds on the tables
    (None: the engine's own, 30 s on SQLite and none on PostgreSQL).

    Returns a `FeedbackResult`. Raises only what the database raises (sqlalchemy errors; a lock held
    past `lock_wait`: sqlalchemy.exc.OperationalError, nothing stored)."""
    result = FeedbackResult(received=len(items))
    tries: dict[str, list[tuple[Any, Any]]] = {}  # id -> (where, label) of each well-shaped item, in order
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            result.problems.append(FeedbackProblem(n, None, SHAPE))
            continue
        where = item.get("where", n)
        prediction_id = item.get("id")
        if isinstance(prediction_id, str):  # " abc": spaces from a joined header, a padded cell; no id has any
            prediction_id = prediction_id.strip()
        if not isinstance(prediction_id, str) or not prediction_id:
            why = f"{SHAPE}; its id is {reprlib.repr(item.get('id'))}"  # short, whatever it nests
            result.problems.append(FeedbackProblem(where, None, why, "id"))
        elif "label" not in item:
            result.problems.append(FeedbackProblem(where, prediction_id, f"{SHAPE}; it has no label", "label"))
        else:
            tries.setdefault(prediction_id, []).append((where, item["label"]))

    t = store.tables
    with store.engine.begin() as conn, _lock_wait(conn, lock_wait):
        # Only ids the service can have issued are looked up: a NUL or a lone surrogate in a query
        # parameter is an error on PostgreSQL, and such an id is unknown anyway.
        found = prediction_log.find(conn, [i for i in tries if i.isascii() and i.isprintable()])
        versions = sorted({version for _, _, version, _, _ in found.values()})
        manifests = dict(conn.execute(sa.select(t.models.c.version, t.models.c.manifest)
                                      .where(t.models.c.version.in_(versions))).all()) if versions else {}
        parsers = {version: _parser(manifests.get(version), version) for version in versions}
        rows = []
        now = time.time()
        for prediction_id, attempts in tries.items():
            if prediction_id not in found:
                result.unknown_ids.append(prediction_id)
                continue
            parse = parsers[found[prediction_id][2]]
            chosen: list[Any] = []  # the valid labels, in order: the last one is stored
            for where, label in attempts:
                try:
                    if isinstance(parse, str):  # the model's manifest is unusable: nothing can be checked
                        raise ValueError(parse)
                    chosen.append(parse(label))
                except ValueError as exc:
                    result.problems.append(FeedbackProblem(where, prediction_id, str(exc), "label"))
            if chosen:
                result.superseded += len(chosen) - 1
                rows.append({"prediction_id": prediction_id, "created_at": now, "label": chosen[-1]})
        result.problems.sort(key=lambda p: _order(p.where))
        if rows and (partial or not result.problems):
            rows.sort(key=lambda r: r["prediction_id"])  # one lock order: concurrent upserts cannot deadlock
            _upsert(conn, t.feedback, rows)
            result.accepted = len(rows)
    return result


def ids_for_keys(store: Store, keys: list[str]) -> dict[str, str]:
    """The prediction id of the newest logged prediction for each of `keys` (values of the input's id
    column, which batch jobs log as `__key`), for labels that come back keyed by the user's own id.

    Reads the log newest batch first and stops once every key is found, so the cost grows with how far
    back the oldest key's prediction is (a whole log's payloads at worst). Keys never logged are absent.
    Raises only what the database raises."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = pa.array(sorted(set(keys)), type=pa.string())
    found: dict[str, str] = {}
    with store.engine.connect() as conn:
        for *_, table in prediction_log.iter_batches(conn, newest_first=True):
            if prediction_log.KEY not in table.column_names:  # a served batch: no keys
                continue
            column = pc.cast(table.column(prediction_log.KEY), pa.string())
            hits = pc.is_in(column, value_set=wanted)
            if not pc.any(hits).as_py():
                continue
            pairs = zip(pc.filter(column, hits).to_pylist(), pc.filter(table.column(prediction_log.ID), hits).to_pylist())
            for key, prediction_id in reversed(list(pairs)):  # the newest: a batch's last row, the newest batch
                found.setdefault(key, prediction_id)
            if len(found) == len(wanted):
                break
    return found


def _parser(manifest: Any, version: int) -> Callable[[Any], Any] | str:
    """The label parser of one model version, or why there is none (as a problem message)."""
    if not isinstance(manifest, dict):
        return (f"model version {version}, which made this prediction, is not in the registry; "
                "its label cannot be checked")
    try:
        return label_parser(manifest.get("task", ""), manifest.get("classes"))
    except ValueError as exc:
        return f"model version {version}, which made this prediction: {exc}"


def _order(where: Any) -> tuple[int, Any]:
    """Problems in the caller's order: numbers and number-ending positions (["labels", 3], "row 5") by it."""
    last = where[-1] if isinstance(where, list) and where else where
    if isinstance(last, str) and last.rsplit(" ", 1)[-1].isdigit():
        last = int(last.rsplit(" ", 1)[-1])
    return (0, last) if isinstance(last, int) else (1, str(where))


@contextmanager
def _lock_wait(conn: sa.Connection, seconds: float | None) -> Iterator[None]:
    """Within the block, wait at most `seconds` for a lock held by another connection (then the
    database raises): SQLite's busy timeout for this connection, PostgreSQL's lock_timeout for this
    transaction. Other databases, or None: as configured."""
    if seconds is None:
        yield
        return
    ms = max(int(seconds * 1000), 1)
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = {ms}")  # ends with the transaction
        yield
    elif conn.dialect.name == "sqlite":
        raw = conn.connection.dbapi_connection
        before = raw.execute("PRAGMA busy_timeout").fetchone()[0]
        raw.execute(f"PRAGMA busy_timeout = {ms}")
        try:
            yield
        finally:  # the connection goes back to the pool with the engine's own timeout
            raw.execute(f"PRAGMA busy_timeout = {int(before)}")
    else:
        yield


def _upsert(conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """Insert or replace (by primary key) with the dialect's upsert; delete + insert elsewhere."""
    dialect = conn.dialect.name
    if dialect in ("sqlite", "postgresql"):
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        statement = insert(table)
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.prediction_id],
            set_={"label": statement.excluded.label, "created_at": statement.excluded.created_at})
        conn.execute(statement, rows)
        return
    ids = [r["prediction_id"] for r in rows]
    for start in range(0, len(ids), 1000):  # a bounded IN list
        conn.execute(table.delete().where(table.c.prediction_id.in_(ids[start:start + 1000])))
    conn.execute(table.insert(), rows)
