from pathlib import Path

import pandas as pd
import pytest

from everloop import data
from everloop.data import _sources
from everloop.errors import DataError
from everloop.spec import load_spec
from everloop.store import Store


@pytest.fixture
def ingested(project: Path):
    spec, store = load_spec(project), Store.for_project(project)
    data.ingest(store, spec, base=project)
    return project, spec, store


def _dirty(project: Path, tmp_path: Path, n: int = 300) -> Path:
    frame = pd.read_csv(project / "data" / "customers.csv").head(n)
    frame["age"] = frame["age"].astype(object)
    frame.loc[[10, 250], "age"] = "unknown"
    frame.loc[20, "churned"] = None
    frame.loc[30, "plan"] = "platinum"  # a warning: stays in the version
    path = tmp_path / "dirty.csv"
    frame.to_csv(path, index=False)
    return path


def test_reject_refuses_everything_and_reports_all(ingested, tmp_path):
    project, spec, store = ingested
    with pytest.raises(DataError) as info:
        data.ingest(store, spec, _dirty(project, tmp_path), base=project)
    kinds = {(a.column, a.kind) for a in info.value.report.anomalies}
    assert {("age", "type_mismatch"), ("churned", "missing_label"), ("plan", "unseen_category")} <= kinds
    assert len(data.list_datasets(store)) == 1


def test_quarantine_keeps_good_rows_and_sets_bad_ones_aside_with_reasons(ingested, tmp_path):
    project, spec, store = ingested
    version = data.ingest(store, spec, _dirty(project, tmp_path), base=project, mode="quarantine")
    assert (version.rows, version.quarantined) == (297, 3)
    rows = data.load_frame(store, version)
    assert len(rows) == 297 and "platinum" in set(rows["plan"])  # warnings do not quarantine
    bad = data.load_quarantine(store, version)
    reasons = dict(zip(bad["_everloop_row"], bad["_everloop_reason"]))
    assert reasons == {11: "age: values are not numbers", 21: "churned: missing labels",
                       251: "age: values are not numbers"}
    assert list(bad.loc[bad["_everloop_row"] == 11, "age"]) == ["unknown"]  # the row as it came
    kinds = {(w["column"], w["kind"], w["severity"]) for w in version.warnings}
    assert ("age", "type_mismatch", "quarantined") in kinds and ("plan", "unseen_category", "warning") in kinds


def test_quarantine_still_refuses_a_missing_column(ingested, tmp_path):
    project, spec, store = ingested
    path = tmp_path / "narrow.csv"
    pd.read_csv(project / "data" / "customers.csv").drop(columns=["region"]).head(50).to_csv(path, index=False)
    with pytest.raises(DataError, match="'region': required categorical column is missing"):
        data.ingest(store, spec, path, base=project, mode="quarantine")
    assert len(data.list_datasets(store)) == 1


def test_reports_and_checks_span_batches(project, tmp_path, monkeypatch):
    """Counts, example rows and duplicate ids are exact when the source is read in many batches."""
    monkeypatch.setattr(_sources, "CSV_BLOCK_BYTES", 4096)  # a few dozen rows per batch
    spec, store = load_spec(project), Store.for_project(project)
    frame = pd.read_csv(project / "data" / "customers.csv")
    frame.loc[1500, "customer_id"] = frame.loc[3, "customer_id"]  # duplicate far apart
    frame["age"] = frame["age"].astype(object)
    frame.loc[[5, 900, 1800], "age"] = "old"
    path = tmp_path / "many.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError) as info:
        data.ingest(store, spec, path, base=project)
    report = info.value.report
    assert report.rows == 2000
    mismatch = next(a for a in report.anomalies if a.kind == "type_mismatch")
    assert (mismatch.count, mismatch.rows) == (3, [5, 900, 1800])
    version = data.ingest(store, spec, path, base=project, mode="quarantine")
    assert version.quarantined == 3
    duplicate = next(w for w in version.warnings if w["kind"] == "duplicate_id")
    assert duplicate["count"] == 1 and duplicate["rows"] == [1500]  # the source row, 0-based


def test_validate_reports_without_storing(ingested, tmp_path):
    project, spec, store = ingested
    report = data.validate(store, spec, _dirty(project, tmp_path), base=project)
    assert not report.ok and len(data.list_datasets(store)) == 1


def test_null_rate_above_the_schemas(tmp_path):
    from tests.conftest import write_project

    project = write_project(tmp_path / "p")
    frame = pd.read_csv(project / "data" / "customers.csv")
    frame.loc[frame.index[:20], "satisfaction"] = None  # 1%: the schema learns nullable, rate 1%
    frame.to_csv(project / "data" / "customers.csv", index=False)
    spec, store = load_spec(project), Store.for_project(project)
    data.ingest(store, spec, base=project)
    schema = data.current_schema(store)[1]
    assert schema.column("satisfaction").nullable and schema.column("satisfaction").max_null_rate == 0.01
    later = frame.head(500).copy()
    later.loc[later.index[:100], "satisfaction"] = None  # 20%
    path = tmp_path / "later.csv"
    later.to_csv(path, index=False)
    version = data.ingest(store, spec, path, base=project)
    rate = next(w for w in version.warnings if w["kind"] == "null_rate")
    assert rate["column"] == "satisfaction" and "20.0% of rows, above the schema's 1.0%" in rate["message"]


def test_datetime_and_truncated_files(ingested, tmp_path):
    project, spec, store = ingested
    frame = pd.read_csv(project / "data" / "customers.csv").head(20)
    frame["event_time"] = frame["event_time"].astype(object)
    frame.loc[4, "event_time"] = "yesterday-ish"
    bad_time = tmp_path / "time.csv"
    frame.to_csv(bad_time, index=False)
    with pytest.raises(DataError, match=r"'event_time': 1 values are not dates or times \(e.g. rows 5\)"):
        data.ingest(store, spec, bad_time, base=project)
    text = (project / "data" / "customers.csv").read_text()
    truncated = tmp_path / "truncated.csv"
    truncated.write_text(text[: len(text) // 2])  # cut in the middle of a row
    with pytest.raises(DataError, match="malformed CSV: .*Expected 18 columns"):
        data.ingest(store, spec, truncated, base=project)
    assert len(data.list_datasets(store)) == 1
