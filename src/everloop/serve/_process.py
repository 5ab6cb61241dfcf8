"""Run the service as a real uvicorn process on a loopback port (used by `demo` and the end-to-end tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from everloop.errors import EverloopError
from everloop.serve._main import PROJECT_ENV


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`with ServerProcess(project) as server: httpx.get(server.url + "/ready")`"""

    def __init__(self, project_dir: str | Path, port: int | None = None, workers: int = 1,
                 log_file: str | Path | None = None, env: dict[str, str] | None = None):
        self.project_dir = Path(project_dir).resolve()
        self.port = port or free_port()
        self.workers = workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = Path(log_file) if log_file else self.project_dir / ".everloop" / "server.log"
        self.env = env or {}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = os.environ | {PROJECT_ENV: str(self.project_dir), "OMP_NUM_THREADS": "1"} | self.env
        if self.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in env:  # /metrics across workers
            env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="everloop-metrics-")
        command = [sys.executable, "-m", "uvicorn", "everloop.serve._main:app", "--factory", "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", str(self.workers), "--no-access-log", "--no-server-header",
                   "--no-proxy-headers"]
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
