"""Issue 11, faults 1 and 2: every value is read the way the first ingest meant it, on every path.

Fault 1: a model with a date/time feature is served (its warm-up and probe rows are of each column's own
kind), one instant written four ways gets one score, and a refused model is named, with why, by every
endpoint. Fault 2: what the first ingest inferred (bool spellings, codes with leading zeros, numbers with
separators, the delimiter of a file) is the contract of every later read: a second ingest, batch scoring
of CSV and Parquet, the three HTTP protocols and the loop's retraining rows. The property test at the end:
any table that ingests gives the same predictions from CSV, Parquet and HTTP.
"""

from __future__ import annotations

import dataclasses

import datetime as dt
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from everloop import data, registry, train
from everloop.batch import score_file
from everloop.data import ColumnSchema, Schema, iter_batches
from everloop.data._schema import NUMBER_FORMATS, _parse_datetimes
from everloop.errors import DataError, StoreError, TrainError
from everloop.serve import create_app
from everloop.spec import load_spec
from everloop.store import Store

# One instant written four ways: two offsets, `Z`, and naive (UTC).
INSTANT = ["2026-03-01T08:15:00+02:00", "2026-03-01T01:15:00-05:00", "2026-03-01T06:15:00Z",
           "2026-03-01T06:15:00"]


# -- a small project: a bool decides the label, a date/time with offsets, codes with leading zeros ----------


def churn_table(rows: int = 400, seed: int = 0, spell: tuple[str, str] | None = None) -> pd.DataFrame:
    """Members (True/False, or text spelled `spell`) rarely churn, others mostly do; `seen_at` mixes
    offsets, `Z` and naive times; `zip` holds codes with leading zeros."""
    rng = np.random.default_rng(seed)
    member = rng.random(rows) < 0.5
    minutes = rng.integers(0, 60 * 24 * 60, rows)
    seen = pd.Timestamp("2026-03-01T06:15:00Z") + pd.to_timedelta(minutes, unit="min")
    forms = [t.tz_convert("Europe/Paris").isoformat() if n % 4 == 0
             else t.tz_convert("America/New_York").isoformat() if n % 4 == 1
             else t.strftime("%Y-%m-%dT%H:%M:%SZ") if n % 4 == 2 else t.strftime("%Y-%m-%dT%H:%M:%S")
             for n, t in enumerate(seen)]
    churned = np.where(member, rng.random(rows) < 0.1, rng.random(rows) < 0.9).astype(int)
    return pd.DataFrame({
        "x": rng.normal(0, 1, rows).round(3),
        "member": member if spell is None else np.where(member, spell[0], spell[1]),
        "zip": rng.choice(["01234", "00501", "12345", "09999"], rows),
        "plan": rng.choice(["basic", "premium"], rows),
        "seen_at": forms,
        "churned": churned,
    })


def make_project(folder: Path, frame: pd.DataFrame, name: str = "train.csv",
                 **spec: Any) -> tuple[Path, Any, Store]:
    """Write `frame` as the project's data, ingest it, train and promote: (folder, spec, store)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if name.endswith(".parquet"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False, sep="\t" if name.endswith(".tsv") else ",")
    body = {"name": "t", "data": {"source": name, "target": spec.pop("target", "churned")},
            "model": {"estimator": spec.pop("estimator", "sklearn.ensemble.HistGradientBoostingClassifier"),
                      "params": spec.pop("params", {"max_iter": 30}), "seed": 1},
            "evaluation": {"split": {"holdout": 0.2}, "metric": "roc_auc"},
            "serving": {"compile_trees": False}} | spec
    (folder / "everloop.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    project, store = load_spec(folder), Store.for_project(folder)
    data.ingest(store, project, base=folder)
    registry.promote(store, project, train.train(store, project).version, force=True)
    return folder, project, store


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Path, Any, Store]:
    return make_project(tmp_path_factory.mktemp("types") / "p", churn_table())


@pytest.fixture(scope="module")
def client(served):
    folder, spec, store = served
    with TestClient(create_app(folder, watch=False)) as running:
        running.spec, running.store = spec, store
        yield running


ROW = {"x": 0.1, "member": True, "zip": "01234", "plan": "basic", "seen_at": INSTANT[0]}


def predict(client: TestClient, rows: list[dict[str, Any]]) -> list[float]:
    """P(churn) of each row over /predict (200 expected)."""
    answer = client.post("/predict", json={"instances": rows})
    assert answer.status_code == 200, answer.text
    return [p["probabilities"]["1"] for p in answer.json()["predictions"]]


def invocations(client: TestClient, rows: list[dict[str, Any]]) -> Any:
    columns = list(rows[0])
    split = {"columns": columns, "data": [[r[c] for c in columns] for r in rows]}
    return client.post("/invocations", json={"dataframe_split": split})


def v2_infer(client: TestClient, rows: list[dict[str, Any]]) -> Any:
    def tensor(name: str) -> dict[str, Any]:
        values = [r[name] for r in rows]
        kind = "BOOL" if all(isinstance(v, bool) for v in values) else "FP64" if all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) else "BYTES"
        return {"name": name, "shape": [len(rows), 1], "datatype": kind, "data": values}
    return client.post("/v2/models/t/infer", json={"inputs": [tensor(name) for name in rows[0]]})


def v2_proba(answer: Any) -> list[float]:
    assert answer.status_code == 200, answer.text
    output = next(o for o in answer.json()["outputs"] if o["name"] == "predict_proba")
    return output["data"][1::2]


# -- fault 1: date/times ------------------------------------------------------------------------------


def test_a_model_with_a_datetime_feature_is_served(client):
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["model_version"] == 1, ready.text
    columns = client.get("/model").json()["schema"]["columns"]
    assert {c["name"]: c["kind"] for c in columns}["seen_at"] == "datetime"


def test_one_instant_written_four_ways_gets_one_score_on_every_path(client, served, tmp_path):
    rows = [ROW | {"seen_at": form} for form in INSTANT]
    scores = predict(client, rows)
    assert len(set(scores)) == 1, scores
    assert v2_proba(v2_infer(client, rows)) == pytest.approx(scores, abs=1e-6)
    one = invocations(client, rows[:1]).json()["predictions"][0]
    assert invocations(client, rows).json()["predictions"] == [one] * 4
    # batch: a CSV file with the four spellings
    folder, spec, store = served
    pd.DataFrame(rows).to_csv(tmp_path / "four.csv", index=False)
    score_file(store, tmp_path / "four.csv", tmp_path / "four.parquet")
    batch = pd.read_parquet(tmp_path / "four.parquet")["proba_1"].tolist()
    assert batch == pytest.approx(scores, abs=1e-6) and len(set(batch)) == 1
    # ingest: the four are one stored value, 06:15 UTC
    schema = data.current_schema(store)[1]
    stored = schema.conform(pd.DataFrame(rows).assign(churned=0), mode="dataset")[0]["seen_at"]
    assert stored.tolist() == [pd.Timestamp("2026-03-01T06:15:00Z")] * 4


def test_naive_times_are_utc_unless_the_schema_names_a_zone():
    series = pd.Series(["2026-03-01T07:15:00", "2026-03-01T06:15:00Z", "2026-07-01T08:15:00", None, "soon"])
    paris = _parse_datetimes(series, "Europe/Paris")
    assert paris.tolist()[:3] == [pd.Timestamp("2026-03-01T06:15:00Z"), pd.Timestamp("2026-03-01T06:15:00Z"),
                                  pd.Timestamp("2026-07-01T06:15:00Z")]  # +01:00 in winter, +02:00 in summer
    assert paris.isna().tolist()[3:] == [True, True]
    assert _parse_datetimes(series[:1]).tolist() == [pd.Timestamp("2026-03-01T07:15:00Z")]
    # A clock that skips 02:30 (spring forward) moves it on; a number is no time (its unit is a guess).
    assert _parse_datetimes(pd.Series(["2026-03-29T02:30:00"]), "Europe/Paris").tolist() == \
        [pd.Timestamp("2026-03-29T01:00:00Z")]
    assert _parse_datetimes(pd.Series([5, 1.7e9]), None).isna().all()
    assert _parse_datetimes(pd.Series([5, "2026-03-01"], dtype=object), None).isna().tolist() == [True, False]
    # A zone recorded from data that had one (a Parquet column in Europe/Paris) is the schema's.
    local = pd.DataFrame({"t": pd.date_range("2026-03-01", periods=30, freq="h", tz="Europe/Paris"),
                          "y": [0, 1] * 15})
    spec = load_spec_for("y")
    assert Schema.infer(local, spec).column("t").timezone == "Europe/Paris"
    assert Schema.infer(local.assign(t=local["t"].dt.tz_convert("UTC")), spec).column("t").timezone is None


def load_spec_for(target: str) -> Any:
    from everloop.spec import ProjectSpec

    return ProjectSpec.model_validate({"name": "t", "data": {"source": "x.csv", "target": target}})


EVERY_KIND = Schema([
    ColumnSchema("n", "numeric", dtype="int", min=3.0, max=8.0),
    ColumnSchema("f", "numeric", dtype="float", nullable=True, min=-1.5, max=2.5, number_format="1.234,5"),
    ColumnSchema("none", "numeric", dtype="float", nullable=True),
    ColumnSchema("c", "categorical", dtype="string", categories=["01234", "b"]),
    ColumnSchema("free", "categorical", dtype="string"),
    ColumnSchema("b", "categorical", dtype="bool", categories=["no", "yes"], true_values=["yes"],
                 false_values=["no"]),
    ColumnSchema("old_bool", "categorical", dtype="bool", categories=["False", "True"]),
    ColumnSchema("t", "datetime", dtype="datetime"),
    ColumnSchema("local", "datetime", dtype="datetime", timezone="Asia/Kolkata"),
    ColumnSchema("y", "categorical", role="target", categories=["0", "1"]),
])


def test_every_warm_up_row_is_of_each_columns_own_kind():
    row = EVERY_KIND.example_row()
    assert row == {"n": 6, "f": 0.5, "none": 0.0, "c": "01234", "free": "example", "b": True, "old_bool": True,
                   "t": "2000-01-01T00:00:00Z", "local": "2000-01-01T00:00:00Z"}
    frame, report = EVERY_KIND.conform(pd.DataFrame([row]), mode="request")
    assert report.anomalies == [], report.summary()
    assert frame.iloc[0].to_dict() == {"n": 6.0, "f": 0.5, "none": 0.0, "c": "01234", "free": "example",
                                       "b": "yes", "old_bool": "True", "t": pd.Timestamp("2000-01-01", tz="UTC"),
                                       "local": pd.Timestamp("2000-01-01", tz="UTC")}


ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
                      st.sampled_from(INSTANT + ["yes", "No", "1.234,5", "01234", "2026-13-45", "NaT", "nan"]),
                      st.datetimes(timezones=st.sampled_from([None, dt.timezone.utc])), st.dates(),
                      st.lists(st.integers(), max_size=1))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.fixed_dictionaries({c.name: ANY_VALUE for c in EVERY_KIND.features}), min_size=1, max_size=4))
def test_the_checks_read_or_refuse_any_value_by_its_column(records):
    """Whatever a client sends, each column's reading either gives a value of its kind or refuses it with
    an error naming that column; it never raises."""
    frame = pd.DataFrame.from_records(records, columns=EVERY_KIND.feature_names)
    checked = EVERY_KIND.check(frame, mode="request")
    good = np.ones(len(frame), dtype=bool) if checked.bad_rows is None else ~checked.bad_rows
    rows = checked.frame[good]
    for col in EVERY_KIND.features:
        values = rows[col.name].dropna()
        if col.kind == "datetime":
            assert str(rows[col.name].dtype) == "datetime64[us, UTC]"
        elif col.kind == "numeric":
            assert rows[col.name].dtype == np.float64
        elif col.is_bool:
            assert set(values) <= {col.true_values[0] if col.true_values else "True",
                                   col.false_values[0] if col.false_values else "False"}
    for error in checked.report.errors:
        assert error.column in EVERY_KIND.feature_names


def test_the_fast_path_is_checked_on_probe_rows_of_every_kind(client):
    from everloop.registry import eval_frame

    model = client.app.state.holder.current
    probe = model._probe_rows(eval_frame(client.store, model.manifest).head(50))
    assert probe is not None and len(probe) == 90  # the rows, then 20 of them missing, then 20 unseen
    assert probe["seen_at"].dtype == "datetime64[us, UTC]" and probe["seen_at"].iloc[50:70].isna().all()
    assert set(probe["member"].iloc[:50]) <= {"True", "False"} and probe["member"].iloc[50:70].isna().all()
    assert set(probe["zip"].iloc[70:]) == {"\x00unseen"} and probe["zip"].iloc[:50].str.startswith("0").any()
    assert model.fast is not None  # approved: the fast path gives the pipeline's own outputs on them


def test_a_refused_model_is_named_with_why_by_every_endpoint(served, monkeypatch):
    folder, spec, store = served

    def broken(store: Store, *args: Any) -> Any:  # the files arrived; unpickling them fails
        raise StoreError("model artifact 5f3a9c0e12ab cannot be loaded: ModuleNotFoundError: "
                         "No module named 'x'")

    monkeypatch.setattr("everloop.serve._holder.load_artifact", broken)
    with TestClient(create_app(folder, watch=False)) as running:
        answers = {"/ready": running.get("/ready"), "/v2/health/ready": running.get("/v2/health/ready"),
                   "/model": running.get("/model"), "/v2/models/t": running.get("/v2/models/t"),
                   "/predict": running.post("/predict", json={"features": ROW}),
                   "/invocations": invocations(running, [ROW]), "/v2/models/t/infer": v2_infer(running, [ROW])}
    for path, answer in answers.items():
        assert answer.status_code == 503, (path, answer.text)
        why = answer.json().get("reason") or answer.json().get("detail")
        assert why.startswith("model v1 refused: model artifact 5f3a9c0e12ab cannot be loaded"), (path, why)
        assert "no model is in production yet" not in why


def test_a_refused_new_version_is_named_while_the_old_one_serves(served, monkeypatch):
    folder, spec, store = served
    from everloop.serve import _holder

    real_load, real_get, target = _holder.load_artifact, _holder.get_model, [1]

    loads = []

    def load(store: Store, artifact: str, manifest: Any, version: int) -> Any:
        loads.append(version)
        if version == 2:
            raise DataError("column 'seen_at': 1 values are not dates or times")
        return real_load(store, artifact, manifest, version)

    def get(store: Store, version: int) -> Any:  # a v2 whose files are v1's: only its load fails
        return dataclasses.replace(real_get(store, 1), version=2) if version == 2 else real_get(store, version)

    monkeypatch.setattr(_holder, "load_artifact", load)
    monkeypatch.setattr(_holder, "get_model", get)
    monkeypatch.setattr(_holder, "alias_version", lambda store, alias: target[0])
    with TestClient(create_app(folder, watch=False)) as running:
        holder = running.app.state.holder
        target[0] = 2
        assert not holder.refresh()
        ready = running.get("/ready").json()
        assert ready == {"ready": True, "model_version": 1,
                         "refused": "model v2 refused: column 'seen_at': 1 values are not dates or times; "
                                    "trying again in 1s"}
        assert running.post("/predict", json={"features": ROW}).json()["model_version"] == 1
        target[0] = 1  # the alias back on the model being served: nothing refused any more
        assert not holder.refresh() and running.get("/ready").json() == {"ready": True, "model_version": 1}
        target[0] = 2  # promoted again: tried again (a fix may have followed), refused for the same reason
        assert not holder.refresh() and running.get("/ready").json()["refused"].startswith("model v2 refused")
        assert loads.count(2) == 2 and not holder.refresh() and loads.count(2) == 2  # once per move, not per check


# -- fault 2: bools read by their own spellings ---------------------------------------------------------


def test_a_bool_feature_takes_its_spellings_and_refuses_anything_else(client):
    member, other = predict(client, [ROW, ROW | {"member": False}])
    assert member < 0.35 < 0.65 < other  # the bool decides: members rarely churn
    for spelled in (True, "True", "true", "TRUE", " true "):
        assert predict(client, [ROW | {"member": spelled}]) == [member], spelled
    for spelled in (False, "False", "false", "FALSE"):
        assert predict(client, [ROW | {"member": spelled}]) == [other], spelled
    for value in (0, 1, "0", "no", "yes", 5, 0.0, "maybe", None):
        for name, answer in (("predict", client.post("/predict", json={"features": ROW | {"member": value}})),
                             ("invocations", invocations(client, [ROW | {"member": value}])),
                             ("v2", v2_infer(client, [ROW | {"member": value}]))):
            assert answer.status_code == 422, (name, value, answer.text)
            detail = answer.json()["detail"]
            assert any(d["loc"][-1] == "member" for d in detail), (name, value, detail)
            msg = next(d["msg"] for d in detail if d["loc"][-1] == "member")
            expected = "training data had none" if value is None else "takes True for true and False for false"
            assert expected in msg, (value, msg)


def test_a_lower_case_training_csv_is_read_the_same_when_batch_scored(tmp_path):
    """The issue's exact case: `true`/`false` in the training CSV, then the same file batch-scored."""
    folder, spec, store = make_project(tmp_path / "p", churn_table(spell=("true", "false")))
    schema = data.current_schema(store)[1]
    member = schema.column("member")
    assert member.true_values == ["true"] and member.categories == ["false", "true"]
    score_file(store, folder / "train.csv", tmp_path / "out.parquet")
    frame = pd.read_csv(folder / "train.csv", keep_default_na=False, dtype=str)
    scores = pd.read_parquet(tmp_path / "out.parquet")["proba_1"].to_numpy()
    members = (frame["member"] == "true").to_numpy()
    assert scores[~members].mean() > 0.7 and scores[members].mean() < 0.3  # nothing read as an unseen category
    with TestClient(create_app(folder, watch=False)) as running:
        rows = [{"x": float(r.x), "member": r.member == "true", "zip": r.zip, "plan": r.plan,
                 "seen_at": r.seen_at} for r in frame.head(40).itertuples()]
        assert predict(running, rows) == pytest.approx(scores[:40].tolist(), abs=1e-6)
        spelled, native = rows[0] | {"member": "TRUE"}, rows[0] | {"member": True}
        assert predict(running, [spelled]) == predict(running, [native])
        assert running.post("/predict", json={"features": rows[0] | {"member": "True "}}).status_code == 200
        assert running.post("/predict", json={"features": rows[0] | {"member": "no"}}).status_code == 422


def test_a_second_ingest_and_the_loops_rows_keep_the_contract(served, client, tmp_path):
    folder, spec, store = served
    later = churn_table(60, seed=5)
    later["member"] = np.where(later["member"], "TRUE", "false")
    later.to_csv(tmp_path / "later.csv", index=False)
    version = data.ingest(store, spec, tmp_path / "later.csv")
    stored = data.load_frame(store, version)
    assert sorted(set(stored["member"])) == ["False", "True"] and stored["zip"].str.startswith("0").any()
    assert (stored["member"] == "True").tolist() == (later["member"] == "TRUE").tolist()
    later.loc[3, "member"], later.loc[7, "member"] = "yes", None
    later.to_csv(tmp_path / "bad.csv", index=False)
    refused = r"(?s)'member': 1 values are not true/false.*rows 4.*'member': 1 missing"
    with pytest.raises(DataError, match=refused):
        data.ingest(store, spec, tmp_path / "bad.csv")
    kept = data.ingest(store, spec, tmp_path / "bad.csv", mode="quarantine")
    assert kept.quarantined == 2 and kept.rows == 58
    reasons = data.load_quarantine(store, kept)["_everloop_reason"].tolist()
    assert reasons[0].startswith("member: values are not true/false")
    assert "training data had none" in reasons[1]
    # The loop's retraining rows: served rows, labelled, read back through the same schema.
    from everloop.loop._controller import recent_labelled

    rows = [ROW | {"member": spelled} for spelled in ("true", False, "TRUE", "False")]
    ids = [p["id"] for p in client.post("/predict", json={"instances": rows}).json()["predictions"]]
    assert client.post("/feedback", json={"labels": [{"id": i, "label": 1} for i in ids]}).status_code == 200
    client.app.state.log.flush()
    recent = recent_labelled(store, spec, 4)
    assert recent["member"].tolist() == ["True", "False", "True", "False"]
    loop_rows = data.load_frame(store, data.ingest_frame(store, spec, recent, source="loop rows"))
    assert loop_rows["member"].tolist() == ["True", "False", "True", "False"]
    assert loop_rows["seen_at"].tolist() == [pd.Timestamp("2026-03-01T06:15:00Z")] * 4
    assert loop_rows["zip"].tolist() == ["01234"] * 4


def test_bools_only_with_both_values_and_known_spellings():
    spec = load_spec_for("y")
    y = [0, 1] * 20
    cases = {("Y", "N"): (["Y"], ["N"]), ("yes", "No"): (["yes"], ["No"]), ("t", "f"): (["t"], ["f"])}
    for (yes, no), spelled in cases.items():
        col = Schema.infer(pd.DataFrame({"b": [yes, no, yes, yes] * 10, "y": y}), spec).column("b")
        assert (col.dtype, col.true_values, col.false_values) == ("bool", *spelled), (yes, no)
    for values in (["f"] * 40, ["m", "f"] * 20, ["yes", "no", "maybe", "no"] * 10):
        col = Schema.infer(pd.DataFrame({"b": values, "y": y}), spec).column("b")
        assert col.dtype == "string" and col.true_values is None, values
    mixed = Schema.infer(pd.DataFrame({"b": ["yes", "Yes", "YES", "no", "y"] * 8, "y": y}), spec).column("b")
    assert (mixed.true_values, mixed.false_values) == (["yes", "y"], ["no"])


BOOLS = Schema([ColumnSchema("b", "categorical", dtype="bool", categories=["no", "yes"],
                              true_values=["yes", "y"], false_values=["no"]),
                 ColumnSchema("nb", "categorical", dtype="bool", nullable=True, categories=["False", "True"],
                              true_values=["True"], false_values=["False"])])
SPELLED = ["yes", "YES", " y", "no", "No", "True", "false", "maybe", "", "1"]
BOOL_VALUES = st.one_of(st.none(), st.booleans(), st.sampled_from(SPELLED),
                        st.integers(-2, 2), st.floats(allow_nan=True), st.lists(st.booleans(), max_size=1))


def test_the_shortcut_takes_plain_bools_and_spellings():
    plain = [{"b": True, "nb": None}, {"b": "NO", "nb": False}, {"b": "y", "nb": "true"}]
    assert {k: v.tolist() for k, v in BOOLS.conform_records(plain).items()} == \
        {"b": ["yes", "no", "yes"], "nb": [None, "False", "True"]}
    for odd in ({"b": "maybe"}, {"b": 1}, {"b": None}, {"nb": 0}, {"b": "true"}):
        assert BOOLS.conform_records([plain[0] | odd]) is None, odd  # the full check decides (and names)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.fixed_dictionaries({"b": BOOL_VALUES, "nb": BOOL_VALUES}), min_size=1, max_size=5))
def test_the_shortcut_agrees_with_the_full_check_on_bool_columns(records):
    fast = BOOLS.conform_records(records)
    checked = BOOLS.check(pd.DataFrame.from_records(records, columns=["b", "nb"]), mode="request")
    if fast is None:
        return
    assert checked.bad_rows is None, checked.report.summary()
    for name, values in fast.items():
        assert values.tolist() == checked.frame[name].tolist(), (name, records)


# -- fault 2: codes, numbers with separators, delimiters ----------------------------------------------


def test_codes_with_leading_zeros_stay_text_on_every_read(client, served, tmp_path):
    folder, spec, store = served
    zip_col = data.current_schema(store)[1].column("zip")
    assert (zip_col.kind, zip_col.dtype, zip_col.categories) == ("categorical", "string",
                                                                ["00501", "01234", "09999", "12345"])
    rows = [ROW | {"zip": code} for code in ("00501", "01234", "12345")]
    pd.DataFrame(rows).to_csv(tmp_path / "codes.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "codes.parquet", index=False)
    for name in ("codes.csv", "codes.parquet"):
        score_file(store, tmp_path / name, tmp_path / f"{name}.out.parquet")
        out = pd.read_parquet(tmp_path / f"{name}.out.parquet")["proba_1"].tolist()
        assert out == pytest.approx(predict(client, rows), abs=1e-6), name
    checked = data.current_schema(store)[1].check(pd.read_csv(tmp_path / "codes.csv"), mode="request")
    unseen = [(a.kind, a.count, a.values) for a in checked.report.anomalies if a.column == "zip"]
    assert unseen == [("unseen_category", 2, [501, 1234])]  # pandas' own read of the file lost the zeros
    first = next(iter_batches(tmp_path / "codes.csv"))  # no schema yet: codes stay text, numbers are numbers
    assert first["zip"].tolist() == ["00501", "01234", "12345"] and first["x"].dtype == "float64"


@pytest.mark.parametrize("number_format", list(NUMBER_FORMATS))
def test_numbers_with_separators_are_numbers_in_their_own_format(number_format, tmp_path):
    groups, decimal = NUMBER_FORMATS[number_format]

    def written(value: float) -> str:
        text = f"{value:,.2f}".replace(",", "\x00").replace(".", decimal).replace("\x00", groups[:1])
        return text

    values = [1234.5, -98765.25, 12.0, 1000000.75] * 10
    sep = ";" if decimal == "," else ","
    pd.DataFrame({"amount": [written(v) for v in values], "y": [0, 1] * 20}).to_csv(
        tmp_path / "a.csv", index=False, sep=sep)
    frame = next(iter_batches(tmp_path / "a.csv"))
    schema = Schema.infer(frame, load_spec_for("y"))
    col = schema.column("amount")
    assert (col.kind, col.number_format) == ("numeric", number_format)
    assert schema.conform(frame)[0]["amount"].tolist() == values
    # Later reads in the same format, and plain JSON numbers, are the same numbers; another format is refused.
    plain = "1234.5" if decimal == "." else "1234,5"
    request = pd.DataFrame({"amount": [written(1234.5), 1234.5, plain, "12.5.1"]}, dtype=object)
    checked = schema.check(request, mode="request")
    assert checked.frame["amount"].tolist()[:3] == [1234.5] * 3
    assert checked.bad_rows.tolist() == [False, False, False, True]
    assert checked.report.errors[0].message == f"1 values are not numbers written as {number_format}"


def test_a_column_written_two_ways_is_refused_clearly():
    frame = pd.DataFrame({"amount": ["1,234.5", "2,000.25", "1.234,5", "17"] * 10, "y": [0, 1] * 20})
    schema = Schema.infer(frame, load_spec_for("y"))
    assert schema.column("amount").number_format == "1,234.5"
    errors = schema.validate(frame).errors
    assert [(a.column, a.count, a.message) for a in errors] == \
        [("amount", 10, "10 values are not numbers written as 1,234.5")]


@pytest.mark.parametrize(("sep", "suffix", "said"), [
    (";", ".csv", "semicolons"), ("\t", ".csv", "tabs"), ("|", ".csv", "'|'"), ("\t", ".tsv", "tabs"),
    (",", ".csv", None)])
def test_delimiters_are_sniffed_and_stated(sep, suffix, said, tmp_path):
    frame = pd.DataFrame({"name": ["a,b", "c;d", "e|f", "g\th"] * 5, "price": ["1,5", "2,25", "3", "4"] * 5,
                          "code": ["007", "010", "100", "999"] * 5, "y": [0, 1] * 10})
    path = tmp_path / f"f{suffix}"
    frame.to_csv(path, index=False, sep=sep)
    notes: list[str] = []
    read = pd.concat(list(iter_batches(path, notes=notes)))
    assert read.columns.tolist() == ["name", "price", "code", "y"]
    assert read["name"].tolist() == frame["name"].tolist() and read["code"].tolist() == frame["code"].tolist()
    stated = f"f{suffix}: fields separated by {said} (sniffed from its first lines)"
    assert notes == ([stated] if said else [])


def test_ingest_states_the_delimiter_and_batch_reads_it(served, tmp_path):
    folder, spec, store = served
    rows = churn_table(20, seed=9)
    rows.to_csv(tmp_path / "semi.csv", index=False, sep=";")
    rows.to_csv(tmp_path / "comma.csv", index=False)
    version = data.ingest(store, spec, tmp_path / "semi.csv")
    assert version.notes == ["semi.csv: fields separated by semicolons (sniffed from its first lines)"]
    assert version.to_dict()["notes"] == version.notes and version.rows == 20
    for name in ("semi.csv", "comma.csv"):
        score_file(store, tmp_path / name, tmp_path / f"{name}.parquet")
    semi, comma = (pd.read_parquet(tmp_path / f"{name}.csv.parquet").drop(columns="prediction_id")
                   for name in ("semi", "comma"))
    assert semi.equals(comma)


# -- the property: any table that ingests gives the same predictions on every path ----------------------

NULL_TOKENS = {"", "#n/a", "#n/a n/a", "#na", "-1.#ind", "-1.#qnan", "-nan", "1.#ind", "1.#qnan", "n/a", "na",
               "null", "nan", "none"}  # what a CSV reader takes for a missing value (pyarrow's list, any case)
TEXT = st.text(st.sampled_from("abcXYZé ,;|'\"-_.0123456789"), min_size=1, max_size=6).filter(
    lambda s: s.strip().lower() not in NULL_TOKENS and s == s.strip())
OFFSETS = ["+02:00", "-05:00", "+05:30", "+00:00", "Z", ""]


def _with_nulls(draw: Any, values: list[Any], nulls: bool) -> list[Any]:
    if not nulls:
        return values
    holes = draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values)))
    return [None if hole and n % 3 == 0 else v for n, (v, hole) in enumerate(zip(values, holes))]


@st.composite
def columns(draw: Any, kind: str, rows: int) -> list[Any]:
    """One column of a user's table, as Python values (None for a missing value)."""
    nulls = draw(st.booleans())
    if kind == "number":
        values = draw(st.lists(st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False), min_size=rows,
                               max_size=rows))
        return _with_nulls(draw, [round(v, 3) for v in values], nulls)
    if kind == "int":
        return _with_nulls(draw, draw(st.lists(st.integers(-1000, 1000), min_size=rows, max_size=rows)), True)
    if kind == "bool":
        flags = draw(st.lists(st.booleans(), min_size=rows, max_size=rows))
        spelling = draw(st.sampled_from([None, ("yes", "no"), ("true", "false"), ("Y", "N"),
                                         ("TRUE", "False")]))
        spelled = flags if spelling is None else [spelling[0] if f else spelling[1] for f in flags]
        return _with_nulls(draw, spelled, nulls)
    if kind == "category":
        domain = draw(st.lists(TEXT, min_size=2, max_size=4, unique=True))
        return _with_nulls(draw, draw(st.lists(st.sampled_from(domain), min_size=rows, max_size=rows)), nulls)
    if kind == "code":
        codes = st.from_regex(r"0[0-9]{2,5}", fullmatch=True)
        domain = draw(st.lists(codes, min_size=2, max_size=5, unique=True)) + ["12345"]
        return _with_nulls(draw, draw(st.lists(st.sampled_from(domain), min_size=rows, max_size=rows)), nulls)
    if kind == "thousands":
        values = draw(st.lists(st.floats(-1e7, 1e7, allow_nan=False), min_size=rows, max_size=rows))
        return _with_nulls(draw, [f"{v:,.2f}" for v in values], nulls)
    if kind == "tokens":  # categories among null tokens: missing from a CSV file first, values from Parquet
        domain = draw(st.lists(TEXT, min_size=1, max_size=3, unique=True)) + \
            draw(st.lists(st.sampled_from(["NA", "null", "N/A", "NaN"]), min_size=1, max_size=2, unique=True))
        return _with_nulls(draw, draw(st.lists(st.sampled_from(domain), min_size=rows, max_size=rows)), nulls)
    if kind == "dayfirst":  # 31.12.2026 or 31/12/2026 08:15: one order per column, even when none decides
        days = draw(st.lists(st.dates(dt.date(2001, 1, 1), dt.date(2039, 1, 1)), min_size=rows, max_size=rows))
        separator = draw(st.sampled_from([".", "/", "-"]))
        clock = draw(st.sampled_from(["", " 08:15"]))
        return _with_nulls(draw, [d.strftime(f"%d{separator}%m{separator}%Y") + clock for d in days], nulls)
    instants = draw(st.lists(st.datetimes(dt.datetime(2001, 1, 1), dt.datetime(2039, 1, 1)), min_size=rows,
                             max_size=rows))
    forms = draw(st.lists(st.sampled_from(OFFSETS), min_size=rows, max_size=rows))
    return _with_nulls(draw, [t.replace(microsecond=0).isoformat() + f for t, f in zip(instants, forms)], nulls)


KINDS = ["number", "int", "bool", "category", "code", "thousands", "datetime", "tokens", "dayfirst"]


@st.composite
def tables(draw: Any) -> pd.DataFrame:
    rows = draw(st.integers(24, 40))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=5))
    table = {f"{kind}_{n}": draw(columns(kind, rows)) for n, kind in enumerate(kinds)}
    table["y"] = [n % 2 for n in range(rows)]
    return pd.DataFrame(table)


def _write(frame: pd.DataFrame, path: Path) -> None:
    """As a user would write the table back: pandas, ints with gaps as Int64 (no `1.0`)."""
    frame = frame.copy()
    for name in frame.columns:
        if name.startswith("int_"):
            frame[name] = pd.array(frame[name].tolist(), dtype="Int64")
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)


def _json(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def same_predictions_on_every_path(frame: pd.DataFrame, folder: Path, first: str) -> bool:
    """Ingest `frame` from a `first` file (csv or parquet), train, promote; then score it from CSV, from
    Parquet, over /predict, /invocations (records and CSV) and /v2: every path gives the same P(y=1).
    False when the table does not ingest or train (the property is about tables that do)."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in ("csv", "parquet"):
        _write(frame, folder / f"table.{suffix}")
    body = {"name": "t", "data": {"source": f"table.{first}", "target": "y"},
            "model": {"estimator": "sklearn.linear_model.LogisticRegression",
                      "params": {"C": 100.0, "max_iter": 2000}, "seed": 1},
            "evaluation": {"split": {"holdout": 0.25}, "metric": "roc_auc"},
            "serving": {"compile_trees": False, "log_predictions": False}}
    (folder / "everloop.yaml").write_text(yaml.safe_dump(body))
    spec, store = load_spec(folder), Store.for_project(folder)
    try:
        data.ingest(store, spec, base=folder)
        version = train.train(store, spec).version
    except (DataError, TrainError):
        return False
    registry.promote(store, spec, version, force=True)
    features = data.current_schema(store)[1].feature_names
    scores = {}
    for suffix in ("csv", "parquet"):
        score_file(store, folder / f"table.{suffix}", folder / f"out-{suffix}.parquet")
        scores[suffix] = pd.read_parquet(folder / f"out-{suffix}.parquet")["proba_1"].to_numpy()
    records = [{name: _json(v) for name, v in zip(frame.columns, row) if name != "y"}
               for row in frame.itertuples(index=False)]
    with TestClient(create_app(folder, watch=False)) as running:
        scores["predict"] = np.array(predict(running, records))
        split = invocations(running, records)
        assert split.status_code == 200, split.text
        csv_body = (folder / "table.csv").read_bytes()
        as_csv = running.post("/invocations", content=csv_body, headers={"content-type": "text/csv"})
        assert as_csv.status_code == 200, as_csv.text
        scores["v2"] = np.array(v2_proba(v2_infer(running, records)))
    for path, got in scores.items():
        assert got == pytest.approx(scores["csv"], abs=1e-6), (path, features)
    batch_labels = pd.read_parquet(folder / "out-csv.parquet")["prediction"].astype(int).tolist()
    assert [int(v) for v in split.json()["predictions"]] == batch_labels == \
        [int(v) for v in as_csv.json()["predictions"]]
    return True


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # separable draws: fine here
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tables(), st.sampled_from(["csv", "parquet"]))
def test_any_table_that_ingests_gives_the_same_predictions_on_every_path(frame, first):
    with tempfile.TemporaryDirectory() as folder:
        same_predictions_on_every_path(frame, Path(folder) / "p", first)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_the_property_holds_on_a_table_of_every_kind(tmp_path):
    """One fixed table with every kind at once (the property's draws may not combine them all)."""
    rng = np.random.default_rng(4)
    rows = 48
    frame = pd.DataFrame({
        "number": rng.normal(0, 100, rows).round(2), "int": [None if n % 5 == 0 else int(v) for n, v in
                                                             enumerate(rng.integers(0, 50, rows))],
        "bool": rng.random(rows) < 0.5, "spelled": rng.choice(["Yes", "No"], rows),
        "category": rng.choice(["a b", "c,d", 'e"f'], rows),
        "code": rng.choice(["00123", "04567", "89012"], rows),
        "thousands": [f"{v:,.2f}" for v in rng.uniform(-5e6, 5e6, rows)],
        "seen": [f"2026-0{1 + n % 9}-1{n % 10}T0{n % 10}:30:00{OFFSETS[n % len(OFFSETS)]}"
                 for n in range(rows)],
        "tokens": rng.choice(["a", "NA", "null", "b"], rows),
        "dayfirst": [f"{1 + n % 28:02d}.{1 + n % 12:02d}.2026" for n in range(rows)],
        "y": [n % 2 for n in range(rows)],
    })
    for first in ("csv", "parquet"):
        assert same_predictions_on_every_path(frame, tmp_path / first, first)
        schema = data.current_schema(Store.for_project(tmp_path / first))[1]
        kinds = {c.name: (c.kind, c.dtype) for c in schema.features}
        assert kinds == {"number": ("numeric", "float"), "int": ("numeric", "int"),
                         "bool": ("categorical", "bool"), "spelled": ("categorical", "bool"),
                         "category": ("categorical", "string"), "code": ("categorical", "string"),
                         "thousands": ("numeric", "float"),
                         "seen": ("datetime", "datetime"), "tokens": ("categorical", "string"),
                         "dayfirst": ("datetime", "datetime")}, first
        assert schema.column("dayfirst").date_order == "DMY"
        tokens = schema.column("tokens")  # NA and null: values in Parquet, missing values in a CSV file
        assert (tokens.categories, tokens.not_missing) == ((["NA", "a", "b", "null"], ["NA", "null"])
                                                           if first == "parquet" else (["a", "b"], None))
