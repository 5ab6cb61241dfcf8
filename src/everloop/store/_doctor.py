"""`everloop doctor`: the store's integrity checked, and what is safe to repair repaired.

Each problem is a `Finding` with a stable code, a severity, where it is and what to do:

- `database_corrupt` (error): SQLite's `PRAGMA quick_check` fails.
- `artifact_missing`, `artifact_corrupt`, `artifact_unreadable` (error): an artifact a row references
  is absent, no longer matches its sha256, or cannot be read.
- `reference_missing` (error): a row names a version that does not exist (model -> dataset, dataset
  -> schema or parent, alias or alias history -> model).
- `temp_file` (warning, repaired): a temporary file or build folder of a writer that never finished.
- `artifact_orphan` (warning, repaired): an artifact no row refers to (a writer killed before its
  metadata commit).
- `unexpected_file` (warning): a file in the artifact folder that is no artifact: left alone.
- `promotion_unaudited` (warning): a promotion by the loop without its `loop_events` "promoted" row.
- `compiled_mismatch` (error, repaired): a compiled library whose sha256 is not the one recorded
  when it was built.
- `compiled_unrecorded` (warning, repaired): a compiled library no everloop process recorded building.
- `log_batch_broken` (error): a prediction log batch whose payload does not decode, or holds other
  rows or ids than its row records.
- `log_unknown_model` (warning): logged predictions of a model version that does not exist.

Repairs (`repair=True`) only delete files nothing reads: temporary files, unreferenced artifacts and
compiled libraries that are refused anyway (they are rebuilt). Temporary and unreferenced files
younger than `grace` seconds are left alone, since a live writer may be about to rename or reference
them. Nothing referenced, and no database row, is ever deleted.
"""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from everloop.errors import IntegrityError, NotFoundError, StoreError
from everloop.store import _artifacts, _predictions
from everloop.store._artifacts import sha256_file
from everloop.store._store import Store

ERROR, WARNING = "error", "warning"
GRACE_SECONDS = 3600.0
LOOP_ACTOR = "everloop loop"  # alias_history.actor of the loop's moves (loop/_controller.py)
PRODUCTION = "production"  # the registry's alias (not imported: the store sits below the registry)
COMPILED_TABLE = "compiled_libraries"

# Where a model's manifest names artifacts (a dotted path), and what each one holds.
MANIFEST_ARTIFACTS = {"eval_artifact": "evaluation rows", "train_hashes": "training row hashes",
                      "monitoring.profile": "reference profile",
                      "monitoring.prediction_profile": "prediction profile",
                      "imported_from.artifact": "imported file"}
_DIGEST = re.compile(rb"[0-9a-f]{64}")
_HEX = set("0123456789abcdef")
# Tables that hold no artifact digests (and the log's payloads are big): not searched for them.
_NO_DIGESTS = {"prediction_batches", "feedback", "service_stats", "leases", "everloop_meta"}


@dataclass
class Finding:
    """One problem: `code` (stable, see the module's table), `severity` ("error" or "warning"),
    `where` (a path, or a row such as "model v3"), `message` (what was found and what to do) and
    `repaired` (what `repair=True` did about it; None when nothing was done)."""

    code: str
    severity: str
    where: str
    message: str
    repaired: str | None = None


@dataclass
class DoctorReport:
    """What `doctor` found (`findings`), how much it looked at (`checked`: counts by kind) and the
    checks it could not make (`notes`). `ok` when no error is left unrepaired."""

    findings: list[Finding] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        """Errors not repaired."""
        return [f for f in self.findings if f.severity == ERROR and f.repaired is None]

    @property
    def warnings(self) -> list[Finding]:
        """Warnings not repaired."""
        return [f for f in self.findings if f.severity == WARNING and f.repaired is None]

    @property
    def repaired(self) -> list[Finding]:
        return [f for f in self.findings if f.repaired is not None]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, code: str, severity: str, where: str, message: str) -> Finding:
        finding = Finding(code, severity, where, message)
        self.findings.append(finding)
        return finding

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "errors": len(self.errors), "warnings": len(self.warnings),
                "repaired": len(self.repaired), "checked": self.checked, "notes": self.notes,
                "findings": [asdict(f) for f in self.findings]}


def doctor(store: Store, repair: bool = False, grace: float = GRACE_SECONDS) -> DoctorReport:
    """Check the store's integrity (see the module's docstring for every check) and, with `repair`,
    delete what is safe to delete: temporary files and unreferenced artifacts older than `grace`
    seconds, and compiled libraries that do not match their recorded hash. Returns the report; raises
    nothing for what it finds (an unreadable database is a StoreError, as for any command)."""
    report = DoctorReport()
    files = _artifact_files(store)  # listed before the references are read: a blob written (and
    # referenced) meanwhile is then never taken for an orphan
    try:
        with store.engine.connect() as conn:
            _check_database(conn, report)
            references = _check_references(conn, report)
            _check_promotions(conn, report)
            _check_log(conn, report)
        _check_artifacts(store, references, report)
        _check_files(store, files, references, report, repair, grace)
        _check_compiled(store, report, repair, grace)
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(f"the metadata database cannot be read: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0]}") from None
    swept = getattr(store, "swept", None)  # what opening the store removed (killed writers' files)
    if swept:
        report.notes.append(f"opening the store removed {len(swept)} temporary files of killed writers")
    if store.artifacts.url:
        report.notes.append(f"artifacts live at {store.artifacts.url}: each referenced one was verified "
                            "there; only the local cache was searched for leftovers")
    return report


def _check_database(conn: sa.Connection, report: DoctorReport) -> None:
    if conn.dialect.name != "sqlite":
        return  # PostgreSQL checks its own pages; nothing cheap to ask
    problems = [r for r in conn.exec_driver_sql("PRAGMA quick_check").scalars() if r != "ok"]
    if problems:
        report.add("database_corrupt", ERROR, "meta.db",
                   f"SQLite's quick_check fails: {'; '.join(problems[:5])}; restore meta.db from a "
                   "backup (or copy what reads with '.recover' in the sqlite3 shell)")


def _check_references(conn: sa.Connection, report: DoctorReport) -> dict[str, list[str]]:
    """Every version a row names must exist. Returns the artifacts the rows reference: digest ->
    who references it ("model v3 (evaluation rows)")."""
    t = Store.tables
    refs: dict[str, list[str]] = defaultdict(list)
    schemas = set(conn.execute(sa.select(t.schemas.c.version)).scalars())
    datasets = conn.execute(sa.select(t.datasets.c.version, t.datasets.c.artifact, t.datasets.c.quarantine,
                                      t.datasets.c.schema_version, t.datasets.c.parent)).all()
    dataset_versions = {d.version for d in datasets}
    for d in datasets:
        refs[d.artifact].append(f"dataset v{d.version}")
        if d.quarantine:
            refs[d.quarantine].append(f"dataset v{d.version} (quarantined rows)")
        if d.schema_version not in schemas:
            report.add("reference_missing", ERROR, f"dataset v{d.version}",
                       f"dataset v{d.version} was validated against schema v{d.schema_version}, which "
                       "does not exist")
        if d.parent is not None and d.parent not in dataset_versions:
            report.add("reference_missing", ERROR, f"dataset v{d.version}",
                       f"dataset v{d.version} names dataset v{d.parent} as its parent, which does not exist")
    models = conn.execute(sa.select(t.models.c.version, t.models.c.dataset_version, t.models.c.artifact,
                                    t.models.c.manifest)).all()
    model_versions = {m.version for m in models}
    for m in models:
        refs[m.artifact].append(f"model v{m.version}")
        for path, what in MANIFEST_ARTIFACTS.items():
            digest = _dig(m.manifest, path)
            if isinstance(digest, str) and digest:
                refs[digest].append(f"model v{m.version} ({what})")
        if m.dataset_version not in dataset_versions:
            report.add("reference_missing", ERROR, f"model v{m.version}",
                       f"model v{m.version} was trained on dataset v{m.dataset_version}, which does not "
                       "exist: its lineage is broken and 'everloop reproduce' cannot rerun it")
    report.checked |= {"datasets": len(datasets), "models": len(models)}
    aliases = conn.execute(sa.select(t.aliases.c.name, t.aliases.c.version)).all()
    for name, version in aliases:
        if version not in model_versions:
            report.add("reference_missing", ERROR, f"alias {name}",
                       f"alias {name!r} points at model v{version}, which does not exist: nothing can load "
                       f"it; point it at an existing version ('everloop promote N --force', or "
                       "'everloop rollback')")
    history = conn.execute(sa.select(t.alias_history.c.id, t.alias_history.c.alias,
                                     t.alias_history.c.from_version, t.alias_history.c.to_version)).all()
    for h in history:
        for version in (h.from_version, h.to_version):
            if version is not None and version not in model_versions:
                report.add("reference_missing", ERROR, f"alias_history #{h.id}",
                           f"alias history #{h.id} ({h.alias} v{h.from_version} -> v{h.to_version}) names "
                           f"model v{version}, which does not exist")
    report.checked |= {"aliases": len(aliases), "alias moves": len(history)}
    return refs


def _mentioned(conn: sa.Connection) -> set[str]:
    """Every sha256-looking string anywhere in the metadata (but the log): an artifact named by a key
    this module does not know of is still never deleted as an orphan."""
    found: set[str] = set()
    for table in Store.tables.metadata.sorted_tables:
        if table.name in _NO_DIGESTS:
            continue
        for row in conn.execute(sa.select(table)):
            found.update(d.decode() for d in _DIGEST.findall(orjson.dumps(
                list(row), default=str, option=orjson.OPT_NON_STR_KEYS)))
    return found


def _check_promotions(conn: sa.Connection, report: DoctorReport) -> None:
    """Each move of production by the loop has its "promoted" audit row (matched by model version)."""
    h, events = Store.tables.alias_history, Store.tables.loop_events
    moves = conn.execute(sa.select(h.c.id, h.c.created_at, h.c.to_version)
                         .where(h.c.alias == PRODUCTION, h.c.actor == LOOP_ACTOR).order_by(h.c.id)).all()
    if not moves:
        return
    audited = Counter((e or {}).get("model_version") for e in conn.execute(
        sa.select(events.c.evidence).where(events.c.action.in_(("promoted", "rollout_promoted")))).scalars())
    for move in moves:
        if audited[move.to_version] > 0:
            audited[move.to_version] -= 1
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(move.created_at))
        report.add("promotion_unaudited", WARNING, f"alias_history #{move.id}",
                   f"the loop put model v{move.to_version} in production at {when} (alias history "
                   f"#{move.id}) but loop_events has no 'promoted' row for it (the loop was killed between "
                   "the two, in a store from before they were one transaction): the audit trail misses "
                   "the decision's evidence, and the next turn's cooldown does not count it")
    report.checked["loop promotions"] = len(moves)


def _check_log(conn: sa.Connection, report: DoctorReport) -> None:
    """Each batch's payload decodes to the rows and ids its row records."""
    t = Store.tables.prediction_batches
    models = set(conn.execute(sa.select(Store.tables.models.c.version)).scalars())
    unknown: Counter[int] = Counter()
    batches = predictions = 0
    query = sa.select(t.c.seq, t.c.worker, t.c.first_counter, t.c.last_counter, t.c.rows, t.c.model_version,
                      t.c.payload).order_by(t.c.seq)
    for chunk in conn.execution_options(yield_per=64).execute(query).partitions():
        for row in chunk:
            batches += 1
            predictions += row.rows
            problem = _batch_problem(row)
            if problem:
                report.add("log_batch_broken", ERROR, f"prediction_batches #{row.seq}",
                           f"prediction log batch #{row.seq} (model v{row.model_version}, {row.rows} "
                           f"predictions recorded): {problem}; the monitor cannot count these predictions "
                           "right (doctor never deletes logged data)")
            if row.model_version and row.model_version not in models:
                unknown[row.model_version] += row.rows
    for version, rows in sorted(unknown.items()):
        report.add("log_unknown_model", WARNING, "prediction_batches",
                   f"{rows} logged predictions name model v{version}, which does not exist: the monitor "
                   "cannot judge them against a model")
    report.checked |= {"log batches": batches, "logged predictions": predictions}


def _batch_problem(row: Any) -> str | None:
    """What is wrong with one prediction_batches row, or None."""
    try:
        table = _predictions.decode(row.payload)
        ids = table.column(_predictions.ID)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a broken stream
        detail = str(exc).strip().splitlines()
        return f"its payload does not decode ({type(exc).__name__}{': ' + detail[0] if detail else ''})"
    if table.num_rows != row.rows or not table.num_rows:
        return f"its payload holds {table.num_rows} predictions, not the {row.rows} its row records"
    first, last = (_predictions.split_id(str(ids[i].as_py())) for i in (0, -1))
    recorded = (row.worker, row.first_counter), (row.worker, row.last_counter)
    if (first, last) != recorded:
        shown = [f"{w}{c:x}" if w is not None else "?" for w, c in (first or (None, 0), last or (None, 0))]
        return (f"its payload holds ids {shown[0]}..{shown[1]}, not the {row.worker}{row.first_counter:x}.."
                f"{row.worker}{row.last_counter:x} its row records (feedback for them would not be found)")
    return None


def _check_artifacts(store: Store, references: dict[str, list[str]], report: DoctorReport) -> None:
    """Every referenced artifact exists and matches its sha256 (read whole, as every reader does)."""
    for digest, users in sorted(references.items()):
        who = ", ".join(users[:3]) + (f" and {len(users) - 3} more" if len(users) > 3 else "")
        if len(digest) != 64 or not set(digest) <= _HEX:
            report.add("reference_missing", ERROR, who, f"{who} names artifact {digest!r}, not a sha256 digest")
            continue
        where = _shown(store, store.artifacts.path(digest))
        try:
            store.artifacts.open(digest)
        except IntegrityError as exc:
            report.add("artifact_corrupt", ERROR, where,
                       f"{who}: {exc}; restore the file from a backup (or ingest or train again)")
        except NotFoundError as exc:
            report.add("artifact_missing", ERROR, where,
                       f"{who}: {exc}; restore it from a backup (or ingest or train again)")
        except StoreError as exc:
            report.add("artifact_unreadable", ERROR, where, f"{who}: {exc}")
    report.checked["artifacts"] = len(references)


@dataclass
class _Files:
    blobs: dict[str, Path] = field(default_factory=dict)  # digest -> path
    temps: list[Path] = field(default_factory=list)
    strays: list[Path] = field(default_factory=list)


def _artifact_files(store: Store) -> _Files:
    """The local artifact folder's files: blobs (`ab/abcdef...`), temporary files (`.tmp-*`, at the top
    or beside the blobs) and anything else."""
    files = _Files()
    root = store.artifacts.root
    if not root.is_dir():
        return files
    for entry in root.iterdir():
        if entry.name.startswith(".tmp-"):
            files.temps.append(entry)
        elif entry.is_dir() and len(entry.name) == 2 and set(entry.name) <= _HEX:
            for path in entry.iterdir():
                if path.name.startswith(".tmp-"):
                    files.temps.append(path)
                elif len(path.name) == 64 and set(path.name) <= _HEX and path.name[:2] == entry.name \
                        and path.is_file():
                    files.blobs[path.name] = path
                else:
                    files.strays.append(path)
        else:
            files.strays.append(entry)
    return files


def _check_files(store: Store, files: _Files, references: dict[str, list[str]], report: DoctorReport,
                 repair: bool, grace: float) -> None:
    for path in files.temps:
        alive = _writer_alive(path)
        if alive:
            continue  # a live writer's file, however old: not a leftover
        finding = report.add("temp_file", WARNING, _shown(store, path),
                             f"temporary file of a writer that did not finish ({_size(path)}, last written "
                             f"{_ago(path)}); nothing reads it")
        _delete(finding, path, repair, 0.0 if alive is False else grace)
    orphans = sorted(set(files.blobs) - set(references))
    if orphans:
        with store.engine.connect() as conn:
            mentioned = _mentioned(conn)  # read now, just before deleting: the latest references
        for digest in orphans:
            path = files.blobs[digest]
            if digest in mentioned:
                continue
            finding = report.add("artifact_orphan", WARNING, _shown(store, path),
                                 f"artifact {digest[:12]} ({_size(path)}) is referenced by no dataset or model "
                                 "row (a writer was killed before its metadata commit); nothing reads it")
            _delete(finding, path, repair, grace)
    for path in files.strays:
        report.add("unexpected_file", WARNING, _shown(store, path),
                   "not an artifact (artifacts are named ab/<sha256>) nor a temporary file; everloop never "
                   "reads it; left alone: remove it by hand if it is not yours")
    report.checked["artifact files"] = len(files.blobs)


def _check_compiled(store: Store, report: DoctorReport, repair: bool, grace: float) -> None:
    """Compiled libraries in `compiled/` match the sha256 recorded by the process that built them."""
    folder = store.root / "compiled"
    table = _compiled_table(store)
    recorded: dict[str, str] = {}
    if table is None:
        report.notes.append(f"compiled libraries not checked against recorded hashes: this store has no "
                            f"{COMPILED_TABLE} table (an everloop from before they were recorded)")
    else:
        with store.engine.connect() as conn:
            recorded = {key: sha for key, sha in conn.execute(sa.select(table.c.key, table.c.sha256))}
    if not folder.is_dir():
        return
    libraries = 0
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():  # a build's temporary folder: complete libraries are renamed out of it
            finding = report.add("temp_file", WARNING, _shown(store, entry),
                                 f"build folder of a compile that did not finish (last written {_ago(entry)})")
            _delete(finding, entry, repair, grace)
            continue
        if entry.suffix == ".lock" or table is None:  # locks: held by builders, empty, harmless
            continue
        libraries += 1
        expected = recorded.get(entry.name, recorded.get(entry.stem))
        try:
            actual = sha256_file(entry)
        except OSError:  # deleted meanwhile (a service replacing a refused library): nothing to check
            continue
        if expected is None:
            finding = report.add("compiled_unrecorded", WARNING, _shown(store, entry),
                                 f"compiled library with no recorded hash (sha256 {actual[:12]}): no everloop "
                                 "process recorded building it, so the service will not load it")
            _delete(finding, entry, repair, grace, "deleted (it is rebuilt when needed)")
        elif actual != expected:
            finding = report.add("compiled_mismatch", ERROR, _shown(store, entry),
                                 f"compiled library's sha256 is {actual[:12]}, not the {expected[:12]} recorded "
                                 "when it was built: the file was replaced; the service refuses to load it")
            _delete(finding, entry, repair, 0.0, "deleted (it is rebuilt when needed)")
    report.checked["compiled libraries"] = libraries


def _compiled_table(store: Store) -> sa.Table | None:
    """The compiled_libraries table: from the store's metadata, else reflected when the database has it."""
    table = Store.tables.metadata.tables.get(COMPILED_TABLE)
    if table is not None:
        return table
    if sa.inspect(store.engine).has_table(COMPILED_TABLE):
        return sa.Table(COMPILED_TABLE, sa.MetaData(), autoload_with=store.engine)
    return None


def _delete(finding: Finding, path: Path, repair: bool, grace: float, done: str = "deleted") -> None:
    """Delete `path` (a file or folder) for `finding` when repairing and it is older than `grace` s."""
    if not repair:
        return
    age = _age(path)
    if age is not None and age < grace:
        finding.message += (f"; left alone: written {age:.0f} s ago, a writer may still be at work (--repair "
                            f"removes it once it is {grace:.0f} s old)")
        return
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        finding.message += f"; could not be deleted: {exc}"
        return
    finding.repaired = done


def _writer_alive(path: Path) -> bool | None:
    """Whether the process that made temporary file `path` runs (None: cannot tell), from the writer's
    pid the artifact store puts in the names of its temporary files (when it does)."""
    check = getattr(_artifacts, "_writer_alive", None)
    return check(path.name) if check is not None else None


def _dig(value: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _age(path: Path) -> float | None:
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return None


def _ago(path: Path) -> str:
    age = _age(path)
    if age is None:
        return "at an unknown time"
    for unit, seconds in (("d", 86400), ("h", 3600), ("min", 60)):
        if age >= seconds:
            return f"{age / seconds:.1f} {unit} ago"
    return f"{age:.0f} s ago"


def _size(path: Path) -> str:
    try:
        size = path.stat().st_size
    except OSError:
        return "size unknown"
    if size < 1024:
        return f"{size} bytes"
    return f"{size / 1024:.1f} KB" if size < 1 << 20 else f"{size / (1 << 20):.1f} MB"


def _shown(store: Store, path: Path) -> str:
    """A path as the user knows it: relative to the project folder when inside it."""
    try:
        return str(path.relative_to(store.root.parent))
    except ValueError:
        return str(path)
