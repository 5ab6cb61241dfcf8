"""Load with churn: a real `serve --workers 2` answers 64 concurrent connections of /predict while
promotions and rollbacks happen through the CLI, the SQLite database is locked for a few seconds once,
and 50 slow clients send their headers a byte at a time. Every /predict answers 200, the workers' memory
stays bounded, and after a graceful stop every answered prediction is logged (none lost, none counted lost).

CI: 4 promotions/rollbacks; EVERLOOP_RELIABILITY_FULL=1: 10, and a longer run."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from everloop import train
from everloop.demo import make_churn
from everloop.serve import ServerProcess
from everloop.serve._log import recover_lost
from everloop.spec import load_spec
from tests.conftest import feature_rows
from tests.reliability.conftest import cli, logged_rows, lost_rows, record, scaled, small_project

pytestmark = pytest.mark.e2e

CONNECTIONS = 64
SLOW_CLIENTS = 50
CHANGES = scaled(4, 10)  # promotions and rollbacks, alternating
CALM = scaled(3.0, 20.0)  # seconds of plain traffic before, between and after the changes
LOCK_SECONDS = 4.0


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _service_rss_kb(pid: int) -> int:
    """Resident memory of the uvicorn parent and its workers, in KiB."""
    try:
        children = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        children = []
    return sum(_rss_kb(p) for p in [pid, *children])


class Traffic:
    """CONNECTIONS clients posting 5-row batches to /predict until `stop`: answered rows, requests sent,
    failures (any answer but 200, any transport error) and the model versions seen."""

    def __init__(self, url: str):
        self.url, self.body = url, {"instances": feature_rows(make_churn(5, seed=6))}
        self.requests, self.answered, self.failures, self.versions = 0, 0, [], set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()))

    async def _client(self, http: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            self.requests += 1
            try:
                response = await http.post("/predict", json=self.body)
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
                continue
            if response.status_code != 200:
                self.failures.append(f"{response.status_code} {response.text[:200]}")
                continue
            answer = response.json()
            self.answered += len(answer["predictions"])
            self.versions.add(answer["model_version"])

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
        async with httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits) as http:
            await asyncio.gather(*(self._client(http) for _ in range(CONNECTIONS)))


def _slow_clients(port: int, stop: threading.Event, cut: list[int]) -> None:
    """SLOW_CLIENTS sockets each sending a request's headers one byte at a time (every 0.2 s); a socket
    the server closes is counted in `cut` and replaced, so the flood lasts until `stop`."""
    request = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               + b"X-Slow: a\r\n" * 200)
    sockets: list[tuple[socket.socket, int]] = []
    while not stop.is_set():
        while len(sockets) < SLOW_CLIENTS:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.setblocking(False)
            sockets.append((sock, 0))
        kept = []
        for sock, sent in sockets:
            try:
                if sock.recv(1, socket.MSG_PEEK) == b"":
                    raise ConnectionResetError
            except BlockingIOError:
                pass  # nothing to read: still open
            except OSError:
                cut.append(1)
                sock.close()
                continue
            try:
                sock.send(request[sent % len(request):sent % len(request) + 1])
                kept.append((sock, sent + 1))
            except OSError:
                cut.append(1)
                sock.close()
        sockets = kept
        stop.wait(0.2)
    for sock, _ in sockets:
        sock.close()


def test_load_with_churn(tmp_path: Path):
    folder, store = small_project(tmp_path / "p")
    train.train(store, load_spec(folder))  # v2, to promote and roll back
    database = store.db_url.removeprefix("sqlite:///")
    server = ServerProcess(folder, workers=2, env={"OMP_NUM_THREADS": "1"}).start()
    traffic = Traffic(server.url)
    flood_stop, cut = threading.Event(), []
    flood = threading.Thread(target=_slow_clients, args=(server.port, flood_stop, cut))
    rss: list[int] = []
    sampler_stop = threading.Event()

    def sample() -> None:
        while not sampler_stop.wait(0.5):
            rss.append(_service_rss_kb(server.process.pid))

    sampler = threading.Thread(target=sample)
    changes = []
    try:
        traffic.thread.start()
        flood.start()
        time.sleep(CALM)
        start_rss = _service_rss_kb(server.process.pid)  # warm: both workers have answered
        sampler.start()
        for k in range(CHANGES):
            run = cli("rollback", project=folder) if k % 2 else cli("promote", "2", project=folder)
            changes.append((run.code, run.err[-300:]))
            if k == CHANGES // 2:  # the store locked for a while: the log writer waits, nobody else
                blocker = sqlite3.connect(database, timeout=30)
                blocker.execute("BEGIN EXCLUSIVE")
                time.sleep(LOCK_SECONDS)
                blocker.rollback()
                blocker.close()
            time.sleep(CALM / 3)
        time.sleep(CALM)
    finally:
        traffic.stop.set()
        traffic.thread.join(timeout=180)
        flood_stop.set()
        flood.join(timeout=30)
        sampler_stop.set()
        if sampler.is_alive():
            sampler.join()
        server.stop()  # SIGTERM: a graceful stop
    stopped_cleanly = server.process.returncode == 0
    lost_now = recover_lost(store, store.root / "serving")  # what the next start would count
    logged, lost = logged_rows(store), lost_rows(store)
    record(requests=traffic.requests, requests_failed=len(traffic.failures), predictions_answered=traffic.answered,
           predictions_logged=logged, predictions_lost_counted=lost, slow_clients_cut=len(cut),
           load_rss_start_kb=start_rss, load_rss_max_kb=max(rss, default=0))
    assert changes == [(0, "")] * CHANGES
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.versions == {1, 2}, "the service switched versions under load"
    assert max(rss) <= 1.5 * start_rss + 300 * 1024, (start_rss, max(rss))
    assert stopped_cleanly, f"uvicorn exited with {server.process.returncode} on SIGTERM"
    assert (logged + lost, lost, lost_now) == (traffic.answered, 0, 0)
    assert cut, "the server closes connections whose headers never end"
