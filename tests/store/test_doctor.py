"""`everloop doctor`: a clean store passes; each planted fault is found with its code and message, and
`repair` fixes the safe ones (and only those)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import sqlalchemy as sa

from everloop import registry
from everloop.store import Store, doctor, prediction_log, sha256_bytes
from tests.conftest import served_project

WORKER = "0123456789abcdef"
OLD = time.time() - 2 * 3600  # older than doctor's grace: a leftover, not a live writer's file


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small training run for the module (ingest, train, promote): each test gets a copy."""
    folder, _, store = served_project(tmp_path_factory.mktemp("doctor") / "proj")
    store.close()
    return folder


@pytest.fixture
def trained(made: Path, tmp_path: Path):
    """A copy of the module's trained project: (folder, None, store)."""
    folder = tmp_path / "proj"
    shutil.copytree(made, folder)
    store = Store.for_project(folder)
    yield folder, None, store
    store.close()


def codes(report) -> list[str]:
    return [f.code for f in report.findings]


def only(report, code: str):
    found = [f for f in report.findings if f.code == code]
    assert len(found) == 1, report.findings
    return found[0]


def model_row(store: Store, version: int = 1):
    t = store.tables.models
    with store.engine.connect() as conn:
        return conn.execute(sa.select(t).where(t.c.version == version)).one()


def copy_model(store: Store) -> int:
    """A second model version (a copy of v1's row: same artifacts), without training again."""
    row = model_row(store)._mapping
    with store.engine.begin() as conn:
        return conn.execute(store.tables.models.insert().values(
            {k: v for k, v in row.items() if k != "version"})).inserted_primary_key[0]


def log_batch(store: Store, rows: int = 3, **changes) -> int:
    """One prediction log batch of model v1 (its row's fields overridden by `changes`); its seq."""
    row = prediction_log.batch_row(WORKER, 0, pa.table({"x": np.arange(rows, dtype=float) / 3}),
                                   np.zeros(rows), None, None, time.time(), 1) | changes
    with store.engine.begin() as conn:
        return conn.execute(store.tables.prediction_batches.insert().values(**row)).inserted_primary_key[0]


def compiled_table(store: Store) -> sa.Table:
    """The compiled_libraries table (defined here with the agreed columns if the store's metadata has
    none yet: doctor reflects it from the database)."""
    table = store.tables.metadata.tables.get("compiled_libraries")
    if table is None:
        table = sa.Table("compiled_libraries", sa.MetaData(), sa.Column("key", sa.Text, primary_key=True),
                         sa.Column("sha256", sa.Text), sa.Column("model_version", sa.Integer),
                         sa.Column("created_at", sa.Float))
    table.create(store.engine, checkfirst=True)
    return table


def test_a_clean_store_passes(trained):
    _, _, store = trained
    log_batch(store)
    report = doctor(store)
    assert report.ok and report.findings == []
    # one dataset; one model: its artifact, evaluation rows, training hashes and two monitoring profiles
    assert {k: report.checked[k] for k in ("datasets", "models", "aliases", "artifacts", "artifact files",
                                           "log batches", "logged predictions")} == \
        {"datasets": 1, "models": 1, "aliases": 1, "artifacts": 6, "artifact files": 6, "log batches": 1,
         "logged predictions": 3}
    assert report.to_dict()["ok"] is True and report.to_dict()["errors"] == 0


def test_a_corrupt_artifact_is_an_error_that_repair_leaves(trained):
    _, _, store = trained
    digest = model_row(store).artifact
    path = store.artifacts.path(digest)
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    report = doctor(store, repair=True, grace=0)
    finding = only(report, "artifact_corrupt")
    assert finding.severity == "error" and finding.repaired is None
    assert finding.where == f".everloop/artifacts/{digest[:2]}/{digest}"
    assert finding.message.startswith("model v1: artifact ") and "was changed on disk" in finding.message
    assert not report.ok and path.exists(), "a referenced artifact is never deleted"


def test_a_missing_artifact_is_an_error(trained):
    _, _, store = trained
    t = store.tables.datasets
    with store.engine.connect() as conn:
        digest = conn.execute(sa.select(t.c.artifact)).scalar()
    store.artifacts.path(digest).unlink()
    report = doctor(store)
    finding = only(report, "artifact_missing")
    assert finding.message.startswith(f"dataset v1: artifact {digest[:12]} is missing")
    assert not report.ok and codes(report) == ["artifact_missing"]


def test_leftover_files_are_found_and_repair_deletes_the_old_ones(trained):
    _, _, store = trained
    root = store.artifacts.root
    old_tmp, fresh_tmp = root / "ab" / ".tmp-killed", root / ".tmp-writing"
    old_tmp.parent.mkdir(exist_ok=True)
    old_tmp.write_bytes(b"x" * 2048)
    fresh_tmp.write_bytes(b"half")
    orphan = store.artifacts.put(b"written by a train killed before its metadata commit")
    old = time.time() - 2 * 3600  # two hours ago, from now (a module-level time drifts on a slow run)
    for path in (old_tmp, store.artifacts.path(orphan)):
        os.utime(path, (old, old))
    stray = root / "notes.txt"
    stray.write_text("mine")

    report = doctor(store)
    assert report.ok, "leftovers are warnings"
    assert sorted(codes(report)) == ["artifact_orphan", "temp_file", "temp_file", "unexpected_file"]
    assert only(report, "artifact_orphan").message.startswith(f"artifact {orphan[:12]} (52 bytes) is referenced "
                                                              "by no dataset or model row")
    temps = {f.where: f for f in report.findings if f.code == "temp_file"}
    assert temps[".everloop/artifacts/ab/.tmp-killed"].message.startswith(
        "temporary file of a writer that did not finish (2.0 KB, last written 2.0 h ago)")
    assert old_tmp.exists(), "no repair without --repair"

    repaired = doctor(store, repair=True)
    done = {f.where: f.repaired for f in repaired.findings}
    assert done == {".everloop/artifacts/ab/.tmp-killed": "deleted", ".everloop/artifacts/.tmp-writing": None,
                    f".everloop/artifacts/{orphan[:2]}/{orphan}": "deleted", ".everloop/artifacts/notes.txt": None}
    assert "left alone: written 0 s ago, a writer may still be at work" in temps_message(repaired, ".tmp-writing")
    assert not old_tmp.exists() and not store.artifacts.path(orphan).exists()
    assert fresh_tmp.exists() and stray.exists()
    assert sorted(codes(doctor(store))) == ["temp_file", "unexpected_file"]


def temps_message(report, name: str) -> str:
    return next(f.message for f in report.findings if f.where.endswith(name))


def test_a_live_writers_temporary_file_is_never_deleted(trained):
    """Temporary files named after their writer: a live one's is kept however old, a dead one's goes at
    once (without waiting out the grace)."""
    from everloop.store import _artifacts

    if not hasattr(_artifacts, "_machine"):
        pytest.skip("this artifact store does not name temporary files after their writer")
    _, _, store = trained
    live = store.artifacts.temp_path(".parquet")  # this process: alive
    os.utime(live, (OLD, OLD))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    dead = store.artifacts.root / f".tmp-{_artifacts._machine()}-{int(ended.stdout)}-abc.parquet"
    dead.write_bytes(b"half")
    report = doctor(store, repair=True)
    assert [(f.code, f.where, f.repaired) for f in report.findings] == [
        ("temp_file", f".everloop/artifacts/{dead.name}", "deleted")]
    assert live.exists() and not dead.exists()


def test_an_artifact_named_anywhere_in_the_metadata_is_never_deleted(trained):
    _, _, store = trained
    digest = store.artifacts.put(b"an artifact a newer everloop references from its manifest")
    os.utime(store.artifacts.path(digest), (OLD, OLD))
    manifest = model_row(store).manifest | {"some_future_artifact": digest}
    with store.engine.begin() as conn:
        conn.execute(store.tables.models.update().values(manifest=manifest))
    report = doctor(store, repair=True, grace=0)
    assert report.findings == [] and store.artifacts.path(digest).exists()


def test_an_alias_on_a_deleted_version_is_an_error(trained):
    _, _, store = trained
    version = copy_model(store)
    registry.set_alias(store, "production", version, reason="test")
    with store.engine.begin() as conn:
        conn.execute(store.tables.models.delete().where(store.tables.models.c.version == version))
    report = doctor(store, repair=True)
    alias = next(f for f in report.findings if f.where == "alias production")
    assert alias.code == "reference_missing" and alias.severity == "error" and alias.repaired is None
    assert alias.message.startswith("alias 'production' points at model v2, which does not exist")
    history = [f.message for f in report.findings if f.where.startswith("alias_history #")]
    assert history == ["alias history #2 (production v1 -> v2) names model v2, which does not exist"]
    assert not report.ok


def test_a_model_on_a_missing_dataset_is_an_error(trained):
    _, _, store = trained
    with store.engine.begin() as conn:
        conn.execute(store.tables.models.update().values(dataset_version=7))
    finding = only(doctor(store), "reference_missing")
    assert finding.where == "model v1"
    assert finding.message.startswith("model v1 was trained on dataset v7, which does not exist")


def test_a_compiled_library_with_a_wrong_hash_is_deleted_by_repair(trained):
    _, _, store = trained
    table = compiled_table(store)
    folder = store.root / "compiled"
    folder.mkdir()
    planted, unrecorded = folder / f"{'a' * 32}.so", folder / f"{'b' * 32}.so"
    lock = folder / f"{'a' * 32}.lock"
    planted.write_bytes(b"\x7fELF planted")
    unrecorded.write_bytes(b"\x7fELF from nowhere")
    lock.touch()
    with store.engine.begin() as conn:
        conn.execute(table.insert().values(key=planted.name, sha256="0" * 64, model_version=1,
                                           created_at=time.time()))
    report = doctor(store)
    mismatch = only(report, "compiled_mismatch")
    assert mismatch.severity == "error" and mismatch.where == f".everloop/compiled/{planted.name}"
    assert mismatch.message.endswith("not the 000000000000 recorded when it was built: the file was replaced; "
                                     "the service refuses to load it")
    assert only(report, "compiled_unrecorded").severity == "warning"
    assert not report.ok and report.checked["compiled libraries"] == 2

    repaired = doctor(store, repair=True, grace=0)
    assert repaired.ok and {f.repaired for f in repaired.findings} == {"deleted (it is rebuilt when needed)"}
    assert not planted.exists() and not unrecorded.exists() and lock.exists()
    assert doctor(store).findings == []


def test_a_matching_compiled_library_passes(trained):
    _, _, store = trained
    table = compiled_table(store)
    library = store.root / "compiled" / f"{'c' * 32}.so"
    library.parent.mkdir()
    library.write_bytes(b"\x7fELF built here")
    with store.engine.begin() as conn:
        conn.execute(table.insert().values(key=library.name, sha256=sha256_bytes(library.read_bytes()),
                                           model_version=1, created_at=time.time()))
    report = doctor(store, repair=True, grace=0)
    assert report.findings == [] and library.exists() and report.checked["compiled libraries"] == 1


def test_a_loop_promotion_without_its_audit_row_is_a_warning(trained):
    _, _, store = trained
    audited, unaudited = copy_model(store), copy_model(store)
    registry.set_alias(store, "production", audited, reason="retrained", actor="everloop loop")
    with store.engine.begin() as conn:
        conn.execute(store.tables.loop_events.insert().values(action="promoted", reason="test",
                                                              evidence={"model_version": audited}))
    assert doctor(store).findings == []
    registry.set_alias(store, "production", unaudited, reason="retrained", actor="everloop loop")
    report = doctor(store, repair=True)
    finding = only(report, "promotion_unaudited")
    assert finding.severity == "warning" and finding.where == "alias_history #3" and finding.repaired is None
    assert f"the loop put model v{unaudited} in production at " in finding.message
    assert "loop_events has no 'promoted' row for it" in finding.message
    assert report.ok and report.checked["loop promotions"] == 2


def test_prediction_log_counts_must_match_its_payloads(trained):
    _, _, store = trained
    log_batch(store)
    short = log_batch(store)
    garbled = log_batch(store)
    t = store.tables.prediction_batches
    with store.engine.begin() as conn:
        conn.execute(t.update().where(t.c.seq == short).values(rows=4))
        conn.execute(t.update().where(t.c.seq == garbled).values(payload=b"not arrow"))
    report = doctor(store, repair=True)
    broken = {f.where: f.message for f in report.findings if f.code == "log_batch_broken"}
    assert broken[f"prediction_batches #{short}"].startswith(
        f"prediction log batch #{short} (model v1, 4 predictions recorded): its payload holds 3 predictions, "
        "not the 4 its row records")
    assert "its payload does not decode (ArrowInvalid" in broken[f"prediction_batches #{garbled}"]
    assert not report.ok and report.checked["log batches"] == 3


def test_logged_ids_must_match_the_recorded_range(trained):
    _, _, store = trained
    seq = log_batch(store, first_counter=5, last_counter=7)
    finding = only(doctor(store), "log_batch_broken")
    assert f"its payload holds ids {WORKER}0..{WORKER}2, not the {WORKER}5..{WORKER}7" in finding.message
    assert finding.where == f"prediction_batches #{seq}"


def test_cli_doctor(trained, everloop):
    folder, _, store = trained
    clean = everloop("doctor", "-p", str(folder))
    assert clean.code == 0 and "ok (no errors); warnings: 0; repaired: 0" in clean.out

    leftover = store.artifacts.root / ".tmp-killed-writer"
    leftover.write_bytes(b"half a parquet file")
    found = everloop("doctor", "-p", str(folder), "--json")
    data = json.loads(found.out)
    assert found.code == 0 and data["ok"] is True and data["warnings"] == 1
    assert data["findings"][0]["code"] == "temp_file" and data["findings"][0]["repaired"] is None

    fixed = everloop("doctor", "-p", str(folder), "--repair", "--grace", "0")
    assert fixed.code == 0 and "deleted" in fixed.out and "repaired: 1" in fixed.out
    assert not leftover.exists()

    path = store.artifacts.path(model_row(store).artifact)
    path.write_bytes(b"tampered")
    broken = everloop("doctor", "-p", str(folder))
    assert broken.code == 1 and "artifact_corrupt" in broken.out and "errors: 1" in broken.out


def test_cli_doctor_without_a_store(project, everloop):
    run = everloop("doctor", "-p", str(project))
    assert run.code == 2 and "no store in" in run.err and "nothing to check" in run.err


def test_postgresql_store(tmp_path: Path, pg_url: str):
    _, _, store = served_project(tmp_path / "proj", db_url=pg_url)
    try:
        assert doctor(store).findings == []
        with store.engine.begin() as conn:
            conn.execute(store.tables.aliases.update().values(version=9))
        report = doctor(store)
        assert codes(report) == ["reference_missing"] and not report.ok
        assert report.findings[0].message.startswith("alias 'production' points at model v9")
    finally:
        store.close()
