"""Replicas stay in step across machines (issue 13): two project folders that share only
EVERLOOP_DB_URL (PostgreSQL) and EVERLOOP_ARTIFACTS_URL (a real S3-compatible server on loopback).
Machine A trains and promotes; machine B runs two real `everloop serve` processes with an empty local
cache; a promotion on A reaches both replicas under load, and the monitor reads both replicas'
predictions as one window."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest
import sqlalchemy as sa
import yaml

from everloop.demo import make_churn
from everloop.serve import ServerProcess
from everloop.store import ARTIFACTS_URL_ENV, DB_URL_ENV, Store
from tests.conftest import feature_rows, write_project

pytestmark = pytest.mark.e2e

RELOAD_SECONDS = 0.5


class Traffic:
    """A client thread sending 5-row batches to one replica until stopped: the model version of each
    answer (with its row count) and every failure."""

    def __init__(self, url: str, rows: list[dict]):
        self.url, self.rows = url, rows
        self.answers: list[tuple[int, int]] = []  # (model version, rows) per answered request
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            n = 0
            while not self.stop.is_set():
                batch = self.rows[n % 40 * 5:n % 40 * 5 + 5]
                n += 1
                try:
                    answer = client.post("/predict", json={"instances": batch})
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if answer.status_code != 200:
                    self.failures.append(f"{answer.status_code}: {answer.text[:200]}")
                else:
                    body = answer.json()
                    self.answers.append((body["model_version"], len(body["predictions"])))

    def rows_of(self, version: int) -> int:
        return sum(rows for v, rows in self.answers if v == version)


def cached_in(folder) -> set[str]:
    """The artifacts in a project folder's local cache, by digest."""
    return {p.name for p in (folder / ".everloop" / "artifacts").rglob("*") if p.is_file()}


def test_replicas_on_another_machine_follow_a_promotion_and_log_to_one_window(tmp_path, pg_url, s3, everloop,
                                                                               monkeypatch):
    monkeypatch.setenv(DB_URL_ENV, pg_url)
    monkeypatch.setenv(ARTIFACTS_URL_ENV, s3.url)
    a = write_project(tmp_path / "a", serving={"log_predictions": True, "reload_seconds": RELOAD_SECONDS},
                      monitoring={"window": {"rows": 100_000}, "drift": {"max_drifted_share": 0.2}})
    for command in (["ingest"], ["train"], ["promote", "1"], "v2", ["train"]):
        if command == "v2":  # another fit: another blob, that B's cache does not hold yet
            spec = yaml.safe_load((a / "everloop.yaml").read_text())
            spec["model"]["params"]["max_iter"] = 40
            (a / "everloop.yaml").write_text(yaml.safe_dump(spec))
            continue
        run = everloop(*command, cwd=a)
        assert run.code == 0, (command, run.out, run.err)

    b = tmp_path / "b"  # the other machine: the project file and the two URLs, nothing else
    b.mkdir()
    shutil.copy(a / "everloop.yaml", b / "everloop.yaml")
    urls = {DB_URL_ENV: pg_url, ARTIFACTS_URL_ENV: s3.url}
    replicas = [ServerProcess(b, log_file=tmp_path / f"replica{i}.log", env=urls) for i in range(2)]
    traffic: list[Traffic] = []
    assert not (b / ".everloop").exists(), "an empty local cache"
    try:
        for server in replicas:
            server.start()
            server.wait_for_version(1)
        in_bucket = {o["Key"].rsplit("/", 1)[-1] for o in s3.client.list_objects_v2(Bucket=s3.name)["Contents"]}
        cached = cached_in(b)
        assert cached and cached <= in_bucket, "B's cache was filled from the bucket"

        rows = feature_rows(make_churn(200, seed=11))
        traffic = [Traffic(server.url, rows) for server in replicas]
        for t in traffic:
            t.thread.start()
        time.sleep(1.0)
        run = everloop("promote", "2", cwd=a)
        assert run.code == 0, (run.out, run.err)
        deadline = time.monotonic() + RELOAD_SECONDS + 15  # a bound for a busy CI machine, not a timing
        for server in replicas:
            while httpx.get(server.url + "/model").json()["version"] != 2:
                assert time.monotonic() < deadline, f"{server.url} still serves v1"
                time.sleep(0.05)
        assert cached < cached_in(b) <= in_bucket, "v2's artifact came from the bucket too"
        time.sleep(1.0)  # both replicas answer with v2 for a while
        for t in traffic:
            t.stop.set()
            t.thread.join()

        for t in traffic:
            assert not t.failures, t.failures[:3]
            versions = [v for v, _ in t.answers]
            assert versions[0] == 1 and versions[-1] == 2 and set(versions) == {1, 2}
            assert versions == sorted(versions), "a replica never goes back to the old model"
        ids = []
        for server in replicas:
            model = httpx.get(server.url + "/model").json()
            assert model["version"] == 2
            replica = model["replica"]
            assert (replica["alias"], replica["alias_version"], replica["in_step"]) == ("production", 2, True)
            ids.append(replica["prediction_id_prefix"])
            metrics = httpx.get(server.url + "/metrics").text.splitlines()
            assert "everloop_model_version 2.0" in metrics and "everloop_alias_version 2.0" in metrics
        assert len(set(ids)) == 2
    finally:
        for server in replicas:
            server.stop()  # drains each replica's prediction log into PostgreSQL
        for t in traffic:
            t.stop.set()

    store = Store.for_project(b)
    try:
        batches = store.tables.prediction_batches
        with store.engine.connect() as conn:
            per_worker = dict(conn.execute(sa.select(batches.c.worker, sa.func.sum(batches.c.rows))
                                           .where(batches.c.model_version == 2).group_by(batches.c.worker)).all())
    finally:
        store.close()
    assert per_worker == {i: tr.rows_of(2) for i, tr in zip(ids, traffic)}, "each replica logged all it answered"

    run = everloop("monitor", "--json", cwd=b)
    assert run.code in (0, 1), (run.out, run.err)
    result = json.loads(run.out)
    assert result["model_version"] == 2
    assert result["window"]["rows"] == sum(tr.rows_of(2) for tr in traffic) == sum(per_worker.values())
