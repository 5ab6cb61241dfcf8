"""`--engine ray` (issue 14): the same input scored on Ray Data gives the local engine's output row for
row (the same bytes, ids included), the same side file and the same summary; compiled trees travel to
the actors; errors come back as the local engine raises them; a job stopped on one engine resumes on
the other. Ray runs locally on loopback (the `ray_local` fixture: 2 CPUs)."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from everloop.batch import score_file
from everloop.batch._ray import _shippable, _ShippedTrees, scored_chunks
from everloop.batch._score import ChunkScorer, speed_up
from everloop.demo import make_churn
from everloop.errors import DataError
from everloop.registry import eval_frame, load_model

BAD = {700: ("age", "forty"), 2500: ("monthly_charges", "inf"), 5999: ("age", "[1, 2]")}  # 0-based rows


def churn_file(path: Path, rows: int = 6000) -> pd.DataFrame:
    """A churn file (no target; CSV or Parquet by `path`'s suffix) with the BAD cells (of rows it has)
    written in: rows to set aside. In Parquet, `age` and `monthly_charges` are text columns then."""
    frame = make_churn(rows, seed=13).drop(columns=["churned"]).astype({"age": str, "monthly_charges": str})
    for row, (column, value) in BAD.items():
        if row < rows:
            frame.loc[row, column] = value
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return frame


def comparable(result) -> dict:
    """A BatchResult's fields that must not depend on the engine."""
    return {k: v for k, v in result.to_dict().items() if k not in ("output", "rejected_output", "seconds")}


def test_ray_writes_the_local_engines_bytes(ray_local, trained, tmp_path):
    folder, spec, store = trained
    churn_file(tmp_path / "in.parquet")
    options = dict(chunk_rows=900, keep=["plan"])  # several chunks, over 2 actors
    chunks: dict[str, list[int]] = {"local": [], "ray": []}
    local = score_file(store, tmp_path / "in.parquet", tmp_path / "local.parquet",
                       progress=chunks["local"].append, **options)
    ray = score_file(store, tmp_path / "in.parquet", tmp_path / "ray.parquet", engine="ray",
                     progress=chunks["ray"].append, **options)

    assert comparable(ray) == comparable(local)
    assert (ray.rows, ray.rejected) == (6000 - 3, 3)
    assert chunks["ray"] == chunks["local"] and sum(chunks["ray"]) == 6000 and len(chunks["ray"]) > 2
    # the output and the side file: the same bytes, prediction ids included (the writer is the driver's)
    assert (tmp_path / "ray.parquet").read_bytes() == (tmp_path / "local.parquet").read_bytes()
    side = [(tmp_path / f"{e}.rejected.parquet").read_bytes() for e in ("local", "ray")]
    assert side[0] == side[1]
    out = pd.read_parquet(tmp_path / "ray.parquet")
    assert out["prediction_id"].is_unique and len(out) == 6000 - 3 and "plan" in out.columns
    assert pd.read_parquet(tmp_path / "ray.rejected.parquet")["row"].tolist() == [r + 1 for r in sorted(BAD)]


def test_compiled_trees_travel_to_the_actors_as_their_library(ray_local, trained, tmp_path):
    folder, spec, store = trained
    make_churn(3000, seed=4).drop(columns=["churned"]).to_parquet(tmp_path / "in.parquet", index=False)
    local = score_file(store, tmp_path / "in.parquet", tmp_path / "local.parquet", chunk_rows=1000,
                       compile_trees=True)
    ray = score_file(store, tmp_path / "in.parquet", tmp_path / "ray.parquet", chunk_rows=1000,
                     compile_trees=True, engine="ray")
    assert local.compiled and ray.compiled
    assert (tmp_path / "ray.parquet").read_bytes() == (tmp_path / "local.parquet").read_bytes()


def test_shipped_trees_pickle_and_answer_as_the_compiled_library(trained):
    folder, spec, store = trained
    trained_model = load_model(store, "production")
    speed_up(store, trained_model, compile_trees=True)
    assert trained_model.compiled is not None
    with pytest.raises((TypeError, ValueError, pickle.PicklingError)):
        pickle.dumps(ChunkScorer(trained_model))  # a loaded library does not pickle
    shipped = pickle.loads(pickle.dumps(_shippable(ChunkScorer(trained_model))))
    assert isinstance(shipped.trained.compiled, _ShippedTrees)
    assert trained_model.compiled is not None and not isinstance(trained_model.compiled, _ShippedTrees)
    encoded = trained_model.probe_encoded(eval_frame(store, trained_model.manifest).head(200))
    np.testing.assert_array_equal(shipped.trained.compiled(encoded), trained_model.compiled(encoded))


def test_errors_come_back_as_the_local_engine_raises_them(ray_local, trained, tmp_path):
    folder, spec, store = trained
    churn_file(tmp_path / "in.csv", 2000)
    for engine in ("local", "ray"):  # raised by the scorer, on an actor
        with pytest.raises(DataError, match=r"--keep nope: not a column of the input"):
            score_file(store, tmp_path / "in.csv", tmp_path / f"{engine}.parquet", keep=["nope"],
                       engine=engine)
    lines = (tmp_path / "in.csv").read_text().splitlines()
    lines[1500] += ",extra,fields"  # a row with more fields than the header: the file is unreadable
    (tmp_path / "torn.csv").write_text("\n".join(lines) + "\n")
    messages = []
    for engine in ("local", "ray"):  # raised by the reader, in Ray's read task
        with pytest.raises(DataError) as caught:
            score_file(store, tmp_path / "torn.csv", tmp_path / f"{engine}.parquet", chunk_rows=500,
                       engine=engine)
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and "torn.csv" in messages[0]
    assert not list(tmp_path.glob("*.parquet")) and not list(tmp_path.glob(".*everloop-job"))


class Stop(Exception):
    """Stands for a kill: not a DataError, so the finished chunks stay for --resume."""


def test_a_job_stopped_on_one_engine_resumes_on_the_other(ray_local, trained, tmp_path):
    folder, spec, store = trained
    make_churn(5000, seed=8).drop(columns=["churned"]).to_parquet(tmp_path / "in.parquet", index=False)
    score_file(store, tmp_path / "in.parquet", tmp_path / "whole.parquet", chunk_rows=700)
    seen = []

    def stop_after_three_chunks(rows: int) -> None:
        seen.append(rows)
        if len(seen) == 3:
            raise Stop()

    with pytest.raises(Stop):
        score_file(store, tmp_path / "in.parquet", tmp_path / "out.parquet", chunk_rows=700,
                   progress=stop_after_three_chunks)
    counted = []
    resumed = score_file(store, tmp_path / "in.parquet", tmp_path / "out.parquet", chunk_rows=700,
                         resume=True, engine="ray", progress=counted.append)
    assert (resumed.rows, resumed.resumed_chunks) == (5000, 3)  # progress follows a chunk's keeping
    assert sum(counted) == 5000 and len(counted) == 8  # finished chunks counted too, as locally
    assert (tmp_path / "out.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()


def test_scored_chunks_keep_the_input_order_and_skip_finished_chunks(ray_local):
    def read():
        for i in range(9):
            yield pd.DataFrame({"x": np.arange(i * 100, i * 100 + 10 + i)})

    results = list(scored_chunks(lambda chunk: int(chunk["x"].sum()), read, skip=2))
    expected = [(len(c), None if i < 2 else int(c["x"].sum())) for i, c in enumerate(read())]
    assert results == expected


def test_predict_engine_ray_on_the_cli(ray_local, trained, tmp_path, everloop):
    folder, spec, store = trained
    churn_file(tmp_path / "in.parquet", 2000)
    run = everloop("predict", str(tmp_path / "in.parquet"), str(tmp_path / "ray.parquet"), "--engine", "ray",
                   "--chunk-rows", "500", "--no-log", "-p", str(folder))
    assert run.code == 1, run  # rows were set aside: a check failed
    assert "1999 rows scored" in run.out and "1 rows set aside" in run.out
    score_file(store, tmp_path / "in.parquet", tmp_path / "local.parquet", chunk_rows=500)
    assert (tmp_path / "ray.parquet").read_bytes() == (tmp_path / "local.parquet").read_bytes()


def test_without_ray_the_cli_says_to_install_the_extra_and_exits_3(trained, tmp_path, everloop, monkeypatch):
    folder, spec, store = trained
    make_churn(50, seed=4).drop(columns=["churned"]).to_parquet(tmp_path / "in.parquet", index=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    run = everloop("predict", str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"), "--engine", "ray",
                   "-p", str(folder))
    assert run.code == 3 and "install everloop[ray]" in run.err and "pip install 'everloop[ray]'" in run.err
    assert not (tmp_path / "out.parquet").exists()
