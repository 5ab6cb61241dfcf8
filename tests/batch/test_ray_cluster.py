"""`everloop predict --engine ray --address HOST:PORT` on a Ray cluster started apart with `ray start --head`
(as docs/data.md shows it: loopback only, token authentication), from a fresh process as a user types it;
and an address where nothing answers fails at once with a clear message."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from everloop.batch import score_file
from everloop.batch._ray import LOOPBACK_SWITCH, _reachable
from everloop.demo import make_churn
from everloop.errors import EverloopError
from everloop.serve import free_port
from tests.batch.conftest import ray_or_skip
from tests.batch.test_ray_network import is_loopback, sockets


def _ours(folder: str) -> list[int]:
    """The processes whose command line names `folder` (the head's session files): the head's own."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if folder.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head started by `ray start --head` in its own folder, loopback only, with a token of its own:
    (address, environment for its clients, its session folder). Its processes are killed afterwards by
    pid (`ray stop` would stop every Ray of the machine)."""
    ray_or_skip()
    folder = tempfile.mkdtemp(prefix="ray-head-", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    env = dict(os.environ, **{LOOPBACK_SWITCH: "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                              "RAY_AUTH_TOKEN": secrets.token_hex(16)})
    ray = Path(sys.executable).parent / "ray"
    with open(tmp_path / "head.log", "wb") as log:
        subprocess.run([str(ray), "start", "--head", f"--port={port}", "--num-cpus=2",
                        "--object-store-memory=100000000", "--include-dashboard=false",
                        f"--temp-dir={folder}"],
                       env=env, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}", env, folder
    finally:
        for pid in _ours(folder):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while _ours(folder) and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(folder, ignore_errors=True)


def test_predict_on_a_cluster_by_address(ray_head, trained, tmp_path):
    address, env, session = ray_head
    folder, spec, store = trained
    make_churn(3000, seed=9).drop(columns=["churned"]).to_parquet(tmp_path / "in.parquet", index=False)
    gcs = [local for local, *_ in sockets("-l", "-t") if local.endswith(f":{address.rsplit(':', 1)[1]}")]
    assert gcs and all(is_loopback(local) for local in gcs), gcs
    everloop = [sys.executable, "-c", "from everloop.cli import main; main()"]
    run = subprocess.run(everloop + ["predict", str(tmp_path / "in.parquet"), str(tmp_path / "ray.parquet"),
                                     "--engine", "ray", "--address", address, "--chunk-rows", "1000",
                                     "--no-log", "-p", str(folder)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "3000 rows scored" in run.stdout
    score_file(store, tmp_path / "in.parquet", tmp_path / "local.parquet", chunk_rows=1000)
    assert (tmp_path / "ray.parquet").read_bytes() == (tmp_path / "local.parquet").read_bytes()
    listening = [s for s in sockets("-l", "-t") + sockets("-l", "-u") if s[2] & set(_ours(session))]
    assert listening and [line for local, _, _, line in listening if not is_loopback(local)] == []

    # without the cluster's token Ray refuses the connection (and logs its retries): exit 2, ending on
    # one line that says what to set
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"RAY_AUTH_MODE": "disabled"}
    run = subprocess.run(everloop + ["predict", str(tmp_path / "in.parquet"), str(tmp_path / "again.parquet"),
                                     "--engine", "ray", "--address", address, "-p", str(folder)],
                         env=bare, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --address {address}: Ray did not connect")
    assert "RAY_AUTH_MODE=token" in last
    assert not (tmp_path / "again.parquet").exists()


def test_an_address_where_nothing_answers_is_refused_before_ray_tries_it(trained, tmp_path, everloop):
    folder, spec, store = trained
    make_churn(50, seed=4).drop(columns=["churned"]).to_parquet(tmp_path / "in.parquet", index=False)
    with socket.socket() as sock:  # a port nothing listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(EverloopError, match=rf"--address 127.0.0.1:{port}: no Ray cluster answers there"):
            _reachable(f"127.0.0.1:{port}")  # Ray itself would retry such an address for minutes
    with pytest.raises(EverloopError, match="expected the Ray cluster's GCS address as host:port"):
        _reachable("my-cluster")
    run = everloop("predict", str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"), "--address",
                   "10.0.0.5:6379", "-p", str(folder))
    assert run.code == 2 and "--address is the Ray cluster for --engine ray" in run.err
