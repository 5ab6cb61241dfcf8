from pathlib import Path

import pandas as pd
import pytest

from everloop import data
from everloop.errors import DataError
from everloop.spec import load_spec
from everloop.store import Store


def _store_state(store: Store, folder: Path) -> tuple[int, int, list[str]]:
    blobs = sorted(p.name for p in (folder / ".everloop" / "artifacts").rglob("*") if p.is_file()) \
        if (folder / ".everloop" / "artifacts").exists() else []
    return len(data.list_datasets(store)), int(data.current_schema(store) is not None), blobs


def test_first_ingest_infers_the_schema(project: Path):
    spec, store = load_spec(project), Store.for_project(project)
    version = data.ingest(store, spec, base=project)
    assert (version.version, version.rows) == (1, 2000)
    schema = data.get_schema(store, version.schema_version)
    assert schema.column("churned").role == "target"
    assert schema.column("customer_id").role == "id"
    assert schema.column("event_time").kind == "datetime"
    assert schema.column("monthly_charges").kind == "numeric"
    assert schema.column("plan").categories == ["basic", "premium", "standard"]
    assert len(schema.features) == 15


def test_same_content_is_deduplicated(project: Path, tmp_path: Path):
    spec, store = load_spec(project), Store.for_project(project)
    first = data.ingest(store, spec, base=project)
    copy = tmp_path / "copy.parquet"
    pd.read_csv(project / "data" / "customers.csv").to_parquet(copy)
    again = data.ingest(store, spec, copy, base=project)
    assert again.deduplicated and again.version == first.version
    assert len(data.list_datasets(store)) == 1


def test_later_files_are_validated_and_warnings_kept(project: Path, tmp_path: Path):
    spec, store = load_spec(project), Store.for_project(project)
    data.ingest(store, spec, base=project)
    frame = pd.read_csv(project / "data" / "customers.csv").head(100)
    frame.loc[0, "age"] = 200  # above the schema's maximum: a warning, stored
    frame.loc[1, "plan"] = "platinum"  # unseen category: a warning, stored
    path = tmp_path / "next.csv"
    frame.to_csv(path, index=False)
    version = data.ingest(store, spec, path, base=project)
    kinds = {(w["column"], w["kind"]) for w in version.warnings}
    assert ("age", "out_of_range") in kinds and ("plan", "unseen_category") in kinds


def test_every_error_is_reported_and_the_store_is_unchanged(project: Path, tmp_path: Path):
    spec, store = load_spec(project), Store.for_project(project)
    data.ingest(store, spec, base=project)
    before = _store_state(store, project)
    frame = pd.read_csv(project / "data" / "customers.csv").head(50)
    frame["age"] = frame["age"].astype(object)
    frame.loc[[3, 7], "age"] = "unknown"
    frame.loc[5, "churned"] = None
    frame = frame.drop(columns=["region"])
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError) as info:
        data.ingest(store, spec, path, base=project)
    message = str(info.value)
    assert "column 'age': 2 values are not numbers (e.g. rows 4, 8)" in message
    assert "column 'churned': 1 missing labels" in message
    assert "column 'region': required categorical column is missing" in message
    assert "nothing was stored" in message
    assert _store_state(store, project) == before


@pytest.mark.parametrize(("content", "expected"), [
    (b"", "the file is empty"),
    (b"age,plan,churned\n", "no rows"),
    (b"\x00\x01\x02\x03binary\xff\xfe garbage\x00" * 50, "not UTF-8"),
    ("age,plan\n1,caf\u00e9\n".encode("latin-1"), "not UTF-8"),
    (b'age,plan,churned\n1,"basic,0\n2,standard,1\n', "malformed CSV"),
    (b"age,plan,churned\n1,basic,0,7,8\n", "malformed CSV"),
])
def test_bad_files_get_a_clear_error_and_leave_the_store_as_it_was(project: Path, tmp_path: Path, content, expected):
    spec, store = load_spec(project), Store.for_project(project)
    data.ingest(store, spec, base=project)
    before = _store_state(store, project)
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=expected):
        data.ingest(store, spec, path, base=project)
    assert _store_state(store, project) == before


def test_garbage_parquet_and_unknown_suffix(project: Path, tmp_path: Path):
    spec, store = load_spec(project), Store.for_project(project)
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable parquet file"):
        data.ingest(store, spec, tmp_path / "x.parquet", base=project)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataError, match="unsupported file type '.json'"):
        data.ingest(store, spec, tmp_path / "x.json", base=project)
    with pytest.raises(DataError, match="no such file"):
        data.ingest(store, spec, tmp_path / "absent.csv", base=project)
    assert _store_state(store, project) == (0, 0, [])


def test_first_file_missing_the_target_is_refused(project: Path, tmp_path: Path):
    spec, store = load_spec(project), Store.for_project(project)
    path = tmp_path / "no_target.csv"
    pd.read_csv(project / "data" / "customers.csv").drop(columns=["churned"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"not in the data: \['churned'\]"):
        data.ingest(store, spec, path, base=project)
    assert _store_state(store, project) == (0, 0, [])


def test_folder_and_glob_sources(project: Path):
    frame = pd.read_csv(project / "data" / "customers.csv")
    parts = project / "parts"
    parts.mkdir()
    frame.iloc[:1000].to_csv(parts / "a.csv", index=False)
    frame.iloc[1000:].to_parquet(parts / "b.parquet")
    assert len(data.read_source("parts", project)) == 2000
    assert len(data.read_source("parts/*.csv", project)) == 1000
    with pytest.raises(DataError, match="matches no .csv or .parquet files"):
        data.read_source("parts/*.txt", project)
