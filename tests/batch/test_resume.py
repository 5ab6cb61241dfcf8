"""Batch jobs are resumable, logged and as fast as the service (issue 14): a killed `everloop predict`
continues with `--resume` from its last finished chunk to a byte-identical output; predictions go to
the prediction log under the ids the output carries, so the monitor sees them and labels join them;
the service's fast feature path and compiled trees score the rows, with the same answers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from everloop.batch import score_file
from everloop.batch._job import job_dir
from everloop.demo import make_churn
from everloop.errors import DataError
from everloop.registry import load_model
from everloop.store import prediction_log


class Killed(Exception):
    """Stands for a kill: not a DataError, so the job's finished chunks stay for --resume."""


def churn_file(path: Path, rows: int, seed: int = 5) -> pd.DataFrame:
    frame = make_churn(rows, seed=seed).drop(columns=["churned"])
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return frame


def stop_after(chunks: int, rows: int):
    seen = [0]

    def progress(n: int) -> None:
        seen[0] += n
        if seen[0] >= chunks * rows:
            raise Killed()
    return progress


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_stopped_job_resumes_to_the_same_bytes(trained, tmp_path, suffix):
    folder, spec, store = trained
    churn_file(tmp_path / "in.parquet", 5000)
    whole = score_file(store, tmp_path / "in.parquet", tmp_path / f"whole{suffix}", chunk_rows=700, log=False)
    with pytest.raises(Killed):
        score_file(store, tmp_path / "in.parquet", tmp_path / f"out{suffix}", chunk_rows=700,
                   progress=stop_after(3, 700))
    parts = job_dir(tmp_path / f"out{suffix}")
    assert json.loads((parts / "state.json").read_text())["chunks"] == 3 and not (tmp_path / f"out{suffix}").exists()
    resumed = score_file(store, tmp_path / "in.parquet", tmp_path / f"out{suffix}", chunk_rows=700, resume=True)
    assert (resumed.rows, resumed.resumed_chunks) == (5000, 3)
    assert (tmp_path / f"out{suffix}").read_bytes() == (tmp_path / f"whole{suffix}").read_bytes()
    assert not parts.exists() and whole.rows == 5000


def test_resume_refuses_another_input_or_model_and_a_run_without_resume_starts_afresh(trained, tmp_path):
    folder, spec, store = trained
    churn_file(tmp_path / "in.parquet", 3000)
    nothing = score_file(store, tmp_path / "in.parquet", tmp_path / "out.parquet", resume=True)  # cron-safe
    assert nothing.rows == 3000 and nothing.notes == ["--resume: no unfinished run wrote this output; scored "
                                                      "from the start"]
    with pytest.raises(Killed):
        score_file(store, tmp_path / "in.parquet", tmp_path / "out.parquet", chunk_rows=500,
                   progress=stop_after(2, 500))
    with pytest.raises(DataError, match="chunk_rows"):
        score_file(store, tmp_path / "in.parquet", tmp_path / "out.parquet", chunk_rows=400, resume=True)
    time.sleep(0.01)
    churn_file(tmp_path / "in.parquet", 3000, seed=6)  # the input changed under the unfinished run
    with pytest.raises(DataError, match="input files changed"):
        score_file(store, tmp_path / "in.parquet", tmp_path / "out.parquet", chunk_rows=500, resume=True)
    fresh = score_file(store, tmp_path / "in.parquet", tmp_path / "out.parquet", chunk_rows=500)
    assert (fresh.rows, fresh.discarded_chunks, fresh.resumed_chunks) == (3000, 2, 0)


def test_a_bad_input_leaves_nothing_to_resume(trained, tmp_path):
    folder, spec, store = trained
    churn_file(tmp_path / "in.csv", 50).drop(columns=["age"]).to_csv(tmp_path / "in.csv", index=False)
    with pytest.raises(DataError, match="age"):
        score_file(store, tmp_path / "in.csv", tmp_path / "out.parquet")
    assert not job_dir(tmp_path / "out.parquet").exists() and not (tmp_path / "out.parquet").exists()


def test_the_cli_resumes_after_a_real_kill(trained, tmp_path):
    folder, spec, store = trained
    churn_file(tmp_path / "in.parquet", 20_000)
    command = [str(Path(sys.executable).with_name("everloop")), "predict", str(tmp_path / "in.parquet"),
               "--chunk-rows", "500",
               "--no-log", "-p", str(folder), "--json"]
    whole = subprocess.run([*command[:3], str(tmp_path / "whole.parquet"), *command[3:]], capture_output=True,
                           text=True)
    assert whole.returncode == 0, whole.stderr
    state = job_dir(tmp_path / "out.parquet") / "state.json"
    job = subprocess.Popen([*command[:3], str(tmp_path / "out.parquet"), *command[3:]],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and job.poll() is None:
        if state.exists() and json.loads(state.read_text())["chunks"] >= 3:
            break
        time.sleep(0.005)
    assert job.poll() is None, "the job finished before it could be killed; make the input larger"
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    assert not (tmp_path / "out.parquet").exists()
    resumed = subprocess.run([*command[:3], str(tmp_path / "out.parquet"), *command[3:], "--resume"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["rows"] == 20_000 and report["resumed_chunks"] >= 3
    assert (tmp_path / "out.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()


def test_logged_batch_predictions_carry_the_output_ids_and_replace_a_rerun(trained, tmp_path):
    folder, spec, store = trained
    frame = churn_file(tmp_path / "in.parquet", 2500)
    frame.loc[7, "age"] = None
    result = score_file(store, tmp_path / "in.parquet", tmp_path / "out.parquet", chunk_rows=1000, log=True)
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert result.logged == 2500
    with store.engine.connect() as conn:
        found = prediction_log.find(conn, out["prediction_id"].tolist()[::250])
        assert len(found) == 10
        batches = list(prediction_log.iter_batches(conn))
    logged = prediction_log.to_rows(batches)
    assert logged.ids == out["prediction_id"].tolist()
    assert [o["prediction"] for o in logged.outputs] == out["prediction"].tolist()
    np.testing.assert_allclose([o["probabilities"]["1"] for o in logged.outputs], out["proba_1"], atol=1e-6)
    assert logged.features["tenure_months"].tolist() == frame["tenure_months"].tolist()
    # the same job again replaces its log rows instead of doubling the monitor's data
    score_file(store, tmp_path / "in.parquet", tmp_path / "again.parquet", chunk_rows=600, log=True)
    with store.engine.connect() as conn:
        assert sum(t.num_rows for *_, t in prediction_log.iter_batches(conn)) == 2500
    assert pd.read_parquet(tmp_path / "again.parquet")["prediction_id"].tolist() == out["prediction_id"].tolist()


def test_the_fast_path_and_compiled_trees_give_the_pipelines_answers(trained, tmp_path):
    folder, spec, store = trained
    frame = make_churn(3000, seed=5).drop(columns=["churned"])  # batch-sized: the vectorised lookups
    frame.loc[::7, "plan"] = None  # missing categories
    frame.loc[::11, "contract"] = "lifetime"  # unseen ones
    frame.loc[::13, "age"] = np.nan
    frame.to_parquet(tmp_path / "in.parquet", index=False)
    result = score_file(store, tmp_path / "in.parquet", tmp_path / "out.parquet", compile_trees=True)
    assert result.compiled  # the machine has a C compiler (CI too)
    out = pd.read_parquet(tmp_path / "out.parquet")
    model = load_model(store, "production")
    expected = model.pipeline.predict_proba(model.conform(frame)[0][model.schema.feature_names])
    np.testing.assert_allclose(out[["proba_0", "proba_1"]].to_numpy(), expected, rtol=0, atol=1e-9)
    assert out["prediction"].tolist() == list(np.asarray(model.classes)[expected.argmax(axis=1)])


def test_the_monitor_judges_logged_batch_windows_and_labels_join_by_the_output_ids(trained, tmp_path, everloop):
    from everloop.monitor import monitor

    folder, spec, store = trained
    stable = make_churn(1000, seed=21)
    stable.drop(columns=["churned"]).to_parquet(tmp_path / "stable.parquet", index=False)
    run = everloop("predict", str(tmp_path / "stable.parquet"), str(tmp_path / "stable.out.parquet"),
                   "-p", str(folder), "--json")  # --log is on by default: serving.log_predictions
    assert run.code == 0 and json.loads(run.out)["logged"] == 1000, run
    first = monitor(store, spec)
    assert first.window["rows"] == 1000 and first.drift is not None and not first.drift.drifted

    shifted = make_churn(1000, seed=22, shifted=True)
    shifted.drop(columns=["churned"]).to_parquet(tmp_path / "shifted.parquet", index=False)
    assert everloop("predict", str(tmp_path / "shifted.parquet"), str(tmp_path / "shifted.out.parquet"),
                    "-p", str(folder)).code == 0
    second = monitor(store, spec)
    assert second.window["rows"] == 1000 and "monthly_charges" in second.drift.drifted
    assert second.status.startswith("drift")

    # labels come back as a file keyed by the output's prediction ids
    out = pd.read_parquet(tmp_path / "shifted.out.parquet")
    pd.DataFrame({"id": out["prediction_id"], "label": shifted["churned"]}).to_csv(tmp_path / "labels.csv",
                                                                                     index=False)
    run = everloop("feedback", str(tmp_path / "labels.csv"), "-p", str(folder), "--json")
    assert run.code == 0 and json.loads(run.out)["accepted"] == 1000, run
    labelled = monitor(store, spec)
    from sklearn.metrics import roc_auc_score

    assert labelled.performance["labelled_rows"] == 1000 and labelled.performance["metric"] == "roc_auc"
    expected = roc_auc_score(shifted["churned"], out["proba_1"])
    assert labelled.performance["value"] == pytest.approx(expected, abs=1e-4), labelled.performance


def test_predict_scores_a_sql_query_as_it_scores_the_same_rows_in_a_file(trained, tmp_path, everloop):
    import sqlalchemy as sa

    folder, spec, store = trained
    frame = churn_file(tmp_path / "in.parquet", 1500)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    frame.to_sql("customers", engine, index=False)
    engine.dispose()
    run = everloop("predict", f"sqlite:///{tmp_path / 'warehouse.db'}", str(tmp_path / "sql.parquet"), "--query",
                   "SELECT * FROM customers ORDER BY customer_id", "--chunk-rows", "400", "--no-log",
                   "-p", str(folder), "--json")
    assert run.code == 0 and json.loads(run.out)["rows"] == 1500, run
    assert everloop("predict", str(tmp_path / "in.parquet"), str(tmp_path / "file.parquet"), "--no-log",
                    "-p", str(folder)).code == 0
    from_sql, from_file = pd.read_parquet(tmp_path / "sql.parquet"), pd.read_parquet(tmp_path / "file.parquet")
    from_file = from_file.sort_values("customer_id", ignore_index=True)
    np.testing.assert_allclose(from_sql["proba_1"], from_file["proba_1"], rtol=0, atol=1e-12)
    bad = everloop("predict", f"sqlite:///{tmp_path / 'warehouse.db'}", str(tmp_path / "x.parquet"), "--query",
                   "SELECT * FROM no_such_table", "-p", str(folder))
    assert bad.code == 2 and "no_such_table" in bad.err and not (tmp_path / "x.parquet").exists(), bad


def test_labels_keyed_by_the_inputs_own_id_join_the_newest_batch_prediction(trained, tmp_path, everloop):
    folder, spec, store = trained
    frame = make_churn(600, seed=31)
    frame.drop(columns=["churned"]).to_parquet(tmp_path / "a.parquet", index=False)
    frame.iloc[:200].drop(columns=["churned"]).to_parquet(tmp_path / "b.parquet", index=False)
    for name in ("a", "b"):  # the first 200 customers are scored twice: the newest prediction is b's
        assert everloop("predict", str(tmp_path / f"{name}.parquet"), str(tmp_path / f"{name}.out.parquet"),
                        "-p", str(folder)).code == 0
    labels = frame[[spec.data.id, spec.data.target]].copy()
    labels.loc[len(labels)] = ["never-scored", 1]
    labels.loc[len(labels)] = [None, 0]
    labels.to_csv(tmp_path / "labels.csv", index=False)
    run = everloop("feedback", str(tmp_path / "labels.csv"), "-p", str(folder), "--json")
    result = json.loads(run.out)
    assert run.code == 1 and result["accepted"] == 600 and result["unknown_ids"] == ["never-scored"], run
    assert result["received"] == 602 and "600 labels recorded from 602 rows" in everloop(
        "feedback", str(tmp_path / "labels.csv"), "-p", str(folder)).out
    assert [p["where"] for p in result["problems"]] == ["row 602"]  # the row without an id
    a, b = pd.read_parquet(tmp_path / "a.out.parquet"), pd.read_parquet(tmp_path / "b.out.parquet")
    import sqlalchemy as sa

    with store.engine.connect() as conn:
        stored = dict(conn.execute(sa.select(store.tables.feedback.c.prediction_id,
                                             store.tables.feedback.c.label)).all())
    expected = dict(zip(b["prediction_id"], frame["churned"].iloc[:200])) | \
        dict(zip(a["prediction_id"].iloc[200:], frame["churned"].iloc[200:]))
    assert {k: int(v) for k, v in stored.items()} == {k: int(v) for k, v in expected.items()}


def test_a_csv_output_killed_inside_its_first_chunk_resumes_with_its_header(trained, tmp_path, monkeypatch):
    """A kill after chunk 0's part was written but before the chunk was recorded finished: the part is
    written again on resume, with the header (decided by rows finished, never by the files there)."""
    from everloop.batch import _score

    folder, spec, store = trained
    churn_file(tmp_path / "in.parquet", 3000)
    score_file(store, tmp_path / "in.parquet", tmp_path / "whole.csv", chunk_rows=1000, log=True)

    def killed(*args, **kwargs):
        raise Killed()
    monkeypatch.setattr(_score.BatchWriter, "_log", killed)  # dies between chunk 0's part and its state
    with pytest.raises(Killed):
        score_file(store, tmp_path / "in.parquet", tmp_path / "out.csv", chunk_rows=1000, log=True)
    assert (job_dir(tmp_path / "out.csv") / "part-000000.csv").exists()
    monkeypatch.undo()
    resumed = score_file(store, tmp_path / "in.parquet", tmp_path / "out.csv", chunk_rows=1000, log=True,
                         resume=True)
    assert resumed.resumed_chunks == 0 and resumed.logged == 3000
    assert (tmp_path / "out.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
    assert (tmp_path / "out.csv").read_text().startswith("customer_id,")


def test_csv_input_is_cut_to_chunk_rows_and_a_sql_run_is_never_resumed(trained, tmp_path):
    import sqlalchemy as sa

    folder, spec, store = trained
    churn_file(tmp_path / "in.csv", 2500)
    with pytest.raises(Killed):  # pyarrow reads this CSV as one block: cut into 1000-row chunks all the same
        score_file(store, tmp_path / "in.csv", tmp_path / "out.parquet", chunk_rows=1000,
                   progress=stop_after(1, 1000))
    assert json.loads((job_dir(tmp_path / "out.parquet") / "state.json").read_text())["rows"] == 1000

    frame = churn_file(tmp_path / "in.parquet", 1500)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'w.db'}")
    frame.to_sql("customers", engine, index=False)
    engine.dispose()
    from everloop.spec import SqlSource
    query = SqlSource(url=f"sqlite:///{tmp_path / 'w.db'}", query="SELECT * FROM customers")
    with pytest.raises(Killed):
        score_file(store, query, tmp_path / "sql.parquet", chunk_rows=500, progress=stop_after(1, 500))
    with pytest.raises(DataError, match="SQL query"):
        score_file(store, query, tmp_path / "sql.parquet", chunk_rows=500, resume=True)


def test_a_kept_column_null_in_early_chunks_or_of_mixed_types_is_written(trained, tmp_path):
    folder, spec, store = trained
    frame = make_churn(3000, seed=8).drop(columns=["churned"])
    frame["note"] = pd.array([None] * 1000 + ["vip"] * 2000, dtype=object)
    frame["extra"] = pd.array(list(range(1500)) + ["x"] * 1500, dtype=object)
    frame.to_csv(tmp_path / "in.csv", index=False)
    import sqlalchemy as sa
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'w.db'}")
    frame.to_sql("t", engine, index=False)
    engine.dispose()
    from everloop.spec import SqlSource
    result = score_file(store, SqlSource(url=f"sqlite:///{tmp_path / 'w.db'}", query="SELECT * FROM t"),
                        tmp_path / "out.parquet", chunk_rows=1000, keep=["note", "extra"])
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert result.rows == 3000 and out["note"].isna().sum() == 1000 and (out["note"].iloc[1000:] == "vip").all()
    assert out["extra"].iloc[:1500].tolist() == [str(i) for i in range(1500)] and out["extra"].iloc[-1] == "x"


def test_two_logging_runs_of_one_job_cannot_double_the_log(trained, tmp_path):
    from everloop.batch._score import _job_lease
    from everloop.errors import EverloopError

    folder, spec, store = trained
    churn_file(tmp_path / "in.parquet", 500)
    settings_prefix = None
    first = score_file(store, tmp_path / "in.parquet", tmp_path / "a.parquet", log=True)
    settings_prefix = pd.read_parquet(tmp_path / "a.parquet")["prediction_id"].iloc[0][:16]
    with _job_lease(store, settings_prefix):  # another process logging the same job right now
        with pytest.raises(EverloopError, match="logging the same job"):
            score_file(store, tmp_path / "in.parquet", tmp_path / "b.parquet", log=True)
    assert first.logged == 500 and not (tmp_path / "b.parquet").exists()
    assert not job_dir(tmp_path / "b.parquet").exists()  # refused before any chunk: nothing left behind
    with store.engine.connect() as conn:
        assert sum(t.num_rows for *_, t in prediction_log.iter_batches(conn)) == 500


def test_drift_inside_a_batch_job_alerts_though_its_last_window_is_stable(trained, tmp_path, everloop):
    folder, spec, store = trained  # windows of 1000 rows
    parts = [make_churn(1000, seed=41), make_churn(1000, seed=42, shifted=True), make_churn(1000, seed=43),
             make_churn(400, seed=44)]
    pd.concat(parts, ignore_index=True).drop(columns=["churned"]).to_parquet(tmp_path / "in.parquet", index=False)
    assert everloop("predict", str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"), "-p",
                    str(folder)).code == 0
    from everloop.monitor import monitor

    result = monitor(store, spec, record=False).to_dict()  # as `everloop monitor` judges, recording nothing
    assert result["status"].startswith("drift") and result["window"]["index"] == 3, result["status"]
    assert [w["window"]["index"] for w in result["earlier"]] == [1] and result["earlier"][0]["dataset_drift"]
    assert any(a.startswith("drift: in window 1 ") for a in result["alerts"])
    run = everloop("monitor", "-p", str(folder))  # judges and records them: the next turn will not again
    assert run.code == 1 and "drift: in window 1 " in run.out, run
    loop = everloop("loop", "--once", "-p", str(folder), "--json")  # drift judged since its last turn
    assert "drift" in json.loads(loop.out)["triggers"], loop
    again = everloop("loop", "--once", "-p", str(folder), "--json")  # once: not on every later turn
    assert json.loads(again.out)["action"] == "idle" and json.loads(again.out)["triggers"] == [], again


def test_a_discarded_run_takes_its_logged_rows_with_it(trained, tmp_path):
    import sqlalchemy as sa

    from everloop.spec import SqlSource

    folder, spec, store = trained
    frame = churn_file(tmp_path / "in.parquet", 2000)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'w.db'}")
    frame.to_sql("customers", engine, index=False)
    engine.dispose()
    query = SqlSource(url=f"sqlite:///{tmp_path / 'w.db'}", query="SELECT * FROM customers")
    with pytest.raises(Killed):  # a SQL run logs under a prefix of its own, then dies
        score_file(store, query, tmp_path / "out.parquet", chunk_rows=500, log=True, progress=stop_after(2, 500))
    again = score_file(store, query, tmp_path / "out.parquet", chunk_rows=500, log=True)
    assert (again.discarded_chunks, again.logged) == (2, 2000)
    with store.engine.connect() as conn:
        assert sum(t.num_rows for *_, t in prediction_log.iter_batches(conn)) == 2000  # not 3000


def test_a_column_arrow_cannot_cast_to_text_is_written_as_json_text(tmp_path):
    import pyarrow as pa

    from everloop.batch._job import _cast

    table = pa.table({"js": pa.array([{"a": 1}, None, {"a": 2}])})
    out = _cast(table, pa.schema([pa.field("js", pa.string())]))
    assert out.column("js").to_pylist() == ['{"a": 1}', None, '{"a": 2}']
