"""Run the service as a real uvicorn process on a loopback port (used by `demo` and the end-to-end tests),
with the uvicorn settings `everloop serve` uses too (`uvicorn_options`)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from everloop.errors import EverloopError
from everloop.serve._main import PROJECT_ENV, UI_ENV

APP = "everloop.serve._main:app"  # a factory
HEADER_SECONDS = 10.0  # a request's line and headers must arrive within this many seconds of its first byte
MAX_HEADER_BYTES = 64 * 1024  # its URL and headers together, at most
BODY_SECONDS = 30.0  # a request's body must arrive within this many seconds of its headers (64 MB: ~2 MB/s)

log = logging.getLogger("everloop.serve")


class SlowClientProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools, what uvicorn[standard] runs) with the limits it lacks: a
    connection whose request line and headers are not complete `HEADER_SECONDS` after it opened (or,
    on a kept-alive connection, after the request's first byte) is closed, and a request whose URL and
    headers exceed `MAX_HEADER_BYTES` answers 400; a request whose body is not complete `BODY_SECONDS`
    after its headers is closed too. uvicorn times out only idle kept-alive connections, so a client
    sending its headers (or body) a byte at a time (slowloris) held its connection forever."""

    _header_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None
    _header_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._disarm_body()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        if self._header_timer is None:  # a new request on a kept-alive connection
            self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        # then the body: a client dripping it a byte at a time held its connection (and a worker's
        # memory) for as long as it liked
        self._body_timer = self.loop.call_later(BODY_SECONDS, self._body_too_slow)

    def on_message_complete(self) -> None:
        self._disarm_body()
        super().on_message_complete()

    def _disarm_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_too_slow(self) -> None:
        self._body_timer = None
        if not self.transport.is_closing():
            log.debug("closed a connection whose request body took over %gs", BODY_SECONDS)
            self.transport.close()

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:  # httptools turns this into uvicorn's 400 answer
            raise ValueError(f"request line and headers longer than {MAX_HEADER_BYTES} bytes")

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(HEADER_SECONDS, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            log.debug("closed a connection whose request headers took over %gs", HEADER_SECONDS)
            self.transport.close()


def uvicorn_options(workers: int) -> dict[str, Any]:
    """The keyword arguments of `uvicorn.run(APP, factory=True, host=..., port=..., **options)` for
    `everloop serve` and `ServerProcess`: `workers` processes, no access log (the metrics count every
    request), no "server: uvicorn" header, no X-Forwarded-* rewriting (the service never uses the client's
    address), slow clients cut off (`SlowClientProtocol`). No `limit_concurrency`: uvicorn counts open
    connections against it, so a flood of slow clients would turn everyone's requests into 503s."""
    return {"workers": workers, "access_log": False, "server_header": False, "proxy_headers": False,
            "http": f"{__name__}:SlowClientProtocol",  # by name: the workers import it
            "timeout_keep_alive": 5}  # seconds an idle kept-alive connection stays open (uvicorn's default)


def serve(host: str, port: int, workers: int) -> None:
    """Run the service of the project named by `EVERLOOP_PROJECT` until stopped (uvicorn exits the
    process with 1 or 3 when it cannot start)."""
    import uvicorn

    uvicorn.run(APP, factory=True, host=host, port=port, **uvicorn_options(workers))


# `python -m` of this module would import it twice (everloop.serve imports it): a one-line program instead
_SERVE = ("import sys; from everloop.serve._process import serve; "
          "serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`with ServerProcess(project) as server: httpx.get(server.url + "/ready")`; `ui=True`: with the
    dashboard at /ui, as `everloop serve --ui` runs it."""

    def __init__(self, project_dir: str | Path, port: int | None = None, workers: int = 1,
                 log_file: str | Path | None = None, env: dict[str, str] | None = None, ui: bool = False):
        self.project_dir = Path(project_dir).resolve()
        self.port = port or free_port()
        self.workers = workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = Path(log_file) if log_file else self.project_dir / ".everloop" / "server.log"
        self.env = {UI_ENV: "1" if ui else "0"} | (env or {})  # never inherited from this process
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = os.environ | {PROJECT_ENV: str(self.project_dir), "OMP_NUM_THREADS": "1"} | self.env
        if self.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in env:  # /metrics across workers
            env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="everloop-metrics-")
        command = [sys.executable, "-c", _SERVE, "127.0.0.1", str(self.port), str(self.workers)]
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EverloopError(f"the server exited with code {self.process.returncode}; see {self.log_file}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise EverloopError(f"the server did not answer within {timeout:g}s; see {self.log_file}")

    def wait_for_version(self, version: int, timeout: float = 30.0) -> None:
        """Block until the server answers with model `version` (a hot swap has happened)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = httpx.get(self.url + "/ready", timeout=2)
            if response.status_code == 200 and response.json().get("model_version") == version:
                return
            time.sleep(0.1)
        raise EverloopError(f"the server did not switch to model v{version} within {timeout:g}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
