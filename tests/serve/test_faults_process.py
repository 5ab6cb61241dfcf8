"""Issue 15, faults 3, 5 and 11 (slow clients): a planted compiled library never runs, workers die with
their parent, and slow clients are cut off without starving the others."""

from __future__ import annotations

import hashlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from everloop.demo import make_churn
from everloop.errors import IntegrityError
from everloop.registry import eval_frame, get_model
from everloop.serve import ServerProcess, free_port
from everloop.serve._compiled import TOLERANCE, CompiledTrees, compile_model
from everloop.serve._process import HEADER_SECONDS, MAX_HEADER_BYTES
from everloop.train import load_artifact
from tests.conftest import feature_rows

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a C compiler")


# --- fault 3: the compiled-tree cache --------------------------------------------------------------

def _planted(tmp_path: Path) -> tuple[Path, Path]:
    """A shared library whose loading writes a marker file (its constructor runs at dlopen): (.so, marker)."""
    marker = tmp_path / "planted-ran"
    source = tmp_path / "planted.c"
    source.write_text('#include <stdio.h>\n__attribute__((constructor)) static void planted(void) {\n'
                      f'  FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}\n}}\n')
    library = tmp_path / "planted.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library, marker


def _mapped(path: Path) -> bool:
    """Is a file under `path` mapped into this process (a loaded shared library)?"""
    return str(path) in Path("/proc/self/maps").read_text()


def _load(store, version: int = 1):
    mv = get_model(store, version)
    model = load_artifact(store, mv.artifact, mv.manifest, mv.version)
    probe = eval_frame(store, model.manifest).head(200)
    assert model.check_fast_path(probe)
    return model, probe


def _recorded(store) -> dict[str, tuple[str, int]]:
    table = store.tables.compiled_libraries
    with store.engine.connect() as conn:
        return {r.key: (r.sha256, r.model_version) for r in conn.execute(sa.select(table))}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_gcc
def test_compiled_trees_refuse_a_file_without_the_expected_hash(tmp_path):
    planted, marker = _planted(tmp_path)
    with pytest.raises(IntegrityError, match="does not have the sha256 recorded"):
        CompiledTrees(planted, True, 2, sha256="0" * 64)
    assert not marker.exists() and not _mapped(planted)


@needs_gcc
def test_a_planted_compiled_library_is_deleted_rebuilt_and_never_loaded(trained, tmp_path, caplog):
    folder, spec, store = trained
    model, probe = _load(store)
    assert compile_model(model, probe, store)
    library = model.compiled.library
    assert library.parent == store.root / "compiled"
    assert _recorded(store) == {library.name: (_sha256(library), 1)}  # recorded by the process that built it

    planted, marker = _planted(tmp_path)
    shutil.copy(planted, library)  # another library under the cached name
    again, _ = _load(store)
    with caplog.at_level(logging.WARNING, logger="everloop.serve"):
        compiled = compile_model(again, probe, store)
    assert not marker.exists() and not _mapped(library.parent)  # never loaded: it was never mapped
    assert f"compiled library {library} does not have the sha256 recorded" in caplog.text
    assert compiled  # built again
    assert _recorded(store) == {library.name: (_sha256(library), 1)} and _sha256(library) != _sha256(planted)

    encoded = again.probe_encoded(probe)  # the rebuilt trees answer as scikit-learn does
    expected = again.pipeline.named_steps["model"].predict_proba(encoded)
    assert np.allclose(again.compiled(encoded), expected, rtol=0, atol=TOLERANCE)

    # a cached library without a recorded hash (made by an older everloop) is not trusted either
    with store.engine.begin() as conn:
        conn.execute(store.tables.compiled_libraries.delete())
    shutil.copy(planted, library)
    third, _ = _load(store)
    compiled = compile_model(third, probe, store)
    assert not marker.exists() and compiled and _recorded(store) == {library.name: (_sha256(library), 1)}


@needs_gcc
def test_batch_scoring_never_loads_a_planted_library(trained, tmp_path):
    from everloop.batch._score import speed_up

    folder, spec, store = trained
    model, probe = _load(store)
    assert compile_model(model, probe, store)
    planted, marker = _planted(tmp_path)
    shutil.copy(planted, model.compiled.library)
    scored, _ = _load(store)
    speed_up(store, scored, compile_trees=True)
    assert not marker.exists() and not _mapped(model.compiled.library.parent)
    assert scored.compiled is not None  # built again
    rows = make_churn(50, seed=4).drop(columns=["customer_id", "event_time", "churned"])
    assert np.allclose(scored.predict(rows).proba, scored.pipeline.predict_proba(rows), rtol=0, atol=1e-9)


@needs_gcc
def test_the_service_never_loads_a_planted_library(trained, tmp_path):
    from fastapi.testclient import TestClient

    from everloop.serve import create_app

    folder, spec, store = trained
    model, probe = _load(store)
    assert compile_model(model, probe, store)
    planted, marker = _planted(tmp_path)
    shutil.copy(planted, model.compiled.library)
    rows = make_churn(20, seed=9)
    with TestClient(create_app(folder)) as client:
        deadline = time.monotonic() + 60
        while client.get("/model").json()["predictor"] != "compiled":
            assert time.monotonic() < deadline, "the compiled trees never took over"
            time.sleep(0.2)
        answer = client.post("/predict", json={"instances": feature_rows(rows)}).json()
    assert not marker.exists() and not _mapped(model.compiled.library.parent)
    features = rows.drop(columns=["customer_id", "event_time", "churned"])
    expected = model.pipeline.predict_proba(features)
    got = np.array([[p["probabilities"][str(c)] for c in model.classes] for p in answer["predictions"]])
    assert np.allclose(got, expected, rtol=0, atol=1e-6)


# --- fault 5: workers die with their parent ---------------------------------------------------------

def _state(pid: int) -> str | None:
    """The process's state letter (R, S, Z...), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _workers(parent: int) -> list[int]:
    """uvicorn's worker processes of `parent` (multiprocessing spawns them: `spawn_main` in the command)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                command = (entry / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == parent and b"spawn_main" in command:
                found.append(int(entry.name))
    return found


def _serve(folder: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-c", "from everloop.cli import main; main()", "serve", "--workers", "2",
               "--port", str(port), "--project", str(folder)]
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def _until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_parent_of_two_workers_stops_them_and_frees_the_port(trained, tmp_path):
    folder, spec, store = trained
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    parent = _serve(folder, port, log)
    workers: list[int] = []
    restarted = None
    try:
        _until(lambda: len(_workers(parent.pid)) == 2 and _healthy(url), 90,
               f"the server never started: {log}")
        workers = _workers(parent.pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        _until(lambda: all(_state(w) in (None, "Z") for w in workers), 30,
               f"workers {workers} outlived their killed parent")  # a zombie has exited
        restarted = _serve(folder, port, log)  # the port is free again
        _until(lambda: _healthy(url), 90, f"no server started again on port {port}: {log}")
        assert restarted.poll() is None
    finally:
        for pid in workers:  # only if the test failed: leave no orphan behind
            if _state(pid) not in (None, "Z"):
                os.kill(pid, signal.SIGKILL)
        for process in (parent, restarted):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=30)


# --- fault 11: slow clients ------------------------------------------------------------------------

def _status(port: int, header_bytes: int) -> bytes:
    """The status line of a GET /health carrying a header of `header_bytes` bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Big: "
                     + b"a" * header_bytes + b"\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.split(b"\r\n", 1)[0]


def test_slow_clients_are_cut_off_and_do_not_starve_the_others(trained):
    """100 connections sending their headers a byte at a time are closed (after HEADER_SECONDS) while
    /predict keeps answering; headers over MAX_HEADER_BYTES answer 400 (one server for both: it is slow
    to start)."""
    folder, spec, store = trained
    rows = feature_rows(make_churn(5, seed=6))
    prefix = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "  # a header that never ends
    with ServerProcess(folder) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        slow = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(100)]
        sent = dict.fromkeys(slow, 0)
        closed: set[socket.socket] = set()
        stop = threading.Event()

        def trickle() -> None:  # one byte per socket every 0.2 s, until the server closes it
            while not stop.is_set() and len(closed) < len(slow):
                for sock in [s for s in slow if s not in closed]:
                    try:
                        sock.send((prefix + b"a" * 1000)[sent[sock]:sent[sock] + 1])
                        sent[sock] += 1
                    except OSError:  # reset by the server
                        closed.add(sock)
                readable, _, _ = select.select([s for s in slow if s not in closed], [], [], 0)
                for sock in readable:
                    try:
                        if sock.recv(1024) == b"":
                            closed.add(sock)
                    except OSError:
                        closed.add(sock)
                time.sleep(0.2)

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        answered = 0
        try:
            deadline = time.monotonic() + HEADER_SECONDS + 50
            while len(closed) < len(slow) and time.monotonic() < deadline:
                response = client.post("/predict", json={"instances": rows})
                assert response.status_code == 200 and len(response.json()["predictions"]) == 5
                answered += 1
                time.sleep(0.2)
        finally:
            stop.set()
            thread.join(timeout=10)
            for sock in slow:
                sock.close()
        assert len(closed) == 100, f"{100 - len(closed)} slow connections still open"
        assert answered > 0
        assert client.get("/health").status_code == 200

        assert _status(server.port, MAX_HEADER_BYTES // 2) == b"HTTP/1.1 200 OK"
        assert _status(server.port, MAX_HEADER_BYTES + 1) == b"HTTP/1.1 400 Bad Request"
        assert _status(server.port, 100) == b"HTTP/1.1 200 OK"  # and the server goes on


def test_a_body_dripped_a_byte_at_a_time_is_cut_off(monkeypatch: pytest.MonkeyPatch):
    """After a tester: only headers had a deadline, so 1,000 clients dripping their bodies held their
    connections for as long as they liked. SlowClientProtocol (in-process, BODY_SECONDS shortened to 1 s)
    closes a connection whose body is not complete in time; a whole body in time is answered."""
    import asyncio

    import uvicorn

    from everloop.serve import _process

    monkeypatch.setattr(_process, "BODY_SECONDS", 1.0)

    async def app(scope, receive, send):  # reads the whole body, then answers its length
        if scope["type"] != "http":
            return
        size, more = 0, True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": str(size).encode()})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=_process.SlowClientProtocol,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as drip:
            drip.sendall(head)
            started, closed = time.monotonic(), False
            for _ in range(60):  # a byte every 0.1 s: 6 s for the whole body, if it were let through
                try:
                    drip.sendall(b"a")
                except OSError:
                    closed = True
                    break
                readable, _, _ = select.select([drip], [], [], 0.1)
                if readable and drip.recv(1024) == b"":
                    closed = True
                    break
            assert closed and time.monotonic() - started < 4, "a dripped body kept its connection"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as whole:
            whole.sendall(head + b"a" * 100)
            assert whole.recv(1024).split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
