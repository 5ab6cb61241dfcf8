"""`everloop ui`: a real process serving the dashboard on its own port (read-only, or with sign-in when
its admin token variable is set), a busy port refused in one line as `serve` refuses it; and
`everloop serve --ui` handing the flag to its workers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from everloop.serve import free_port
from tests.conftest import wait_for
from tests.ui.test_overview_loop import page

CLI = "from everloop.cli import main; main()"


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_everloop_ui_serves_the_dashboard_until_stopped(trained, tmp_path: Path):
    folder, _spec, _store = trained
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVERLOOP_")} | {"MY_UI_TOKEN": "s3cret"}
    log = (tmp_path / "ui.log").open("wb")
    process = subprocess.Popen([sys.executable, "-c", CLI, "ui", "--port", str(port), "-p", str(folder),
                                "--admin-token-env", "MY_UI_TOKEN"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: process.poll() is not None or _up(url + "/"), "the dashboard answering", timeout=60)
        assert process.poll() is None, (tmp_path / "ui.log").read_text()
        overview = httpx.get(url + "/")
        assert overview.status_code == 200 and "server" not in overview.headers  # no "server: uvicorn"
        shown = page(overview.text)
        assert shown.ids["production-version"]["data-version"] == "1"
        assert 'href="/login"' in overview.text  # a token is set: sign in to change things
        with httpx.Client(base_url=url) as client:
            assert client.post("/login", data={"token": "s3cret"}).status_code == 303
            forms = {f["attrs"]["action"] for f in page(client.get("/").text).forms}
            assert "/actions/promote" in forms
        assert httpx.get(url + "/loop").status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()
    said = (tmp_path / "ui.log").read_text()
    assert f"everloop dashboard of {Path(folder).resolve()} on http://127.0.0.1:{port}/ (sign in with the admin " \
           "token ($MY_UI_TOKEN) to promote and roll back)" in said


def test_everloop_ui_on_a_busy_port_says_so_in_one_line(trained, everloop):
    folder, _spec, _store = trained
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = everloop("ui", "--port", str(port), "-p", str(folder))
    assert run.code == 2
    assert run.err.strip() == (f"error: port {port} on 127.0.0.1 is already in use; stop what listens there or "
                               "choose another with --port")


def test_everloop_ui_outside_a_project_says_where_it_looked(tmp_path: Path, everloop):
    run = everloop("ui", "-p", str(tmp_path))
    assert run.code == 2 and f"no everloop.yaml in {tmp_path.resolve()}" in run.err


@pytest.mark.parametrize("flag, expected", [(["--ui"], "1"), ([], "0")])
def test_serve_hands_the_ui_flag_to_its_workers(trained, everloop, monkeypatch, flag, expected):
    import uvicorn

    from everloop.serve._main import PROJECT_ENV, UI_ENV

    folder, _spec, _store = trained
    started: dict = {}
    monkeypatch.setenv(UI_ENV, "stale")  # whatever the environment said before, the flag decides
    monkeypatch.setenv(PROJECT_ENV, "stale")
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(
        app=app, ui=os.environ[UI_ENV], project=os.environ[PROJECT_ENV], **options))
    run = everloop("serve", *flag, "--port", str(free_port()), "-p", str(folder))
    assert run.code == 0, run.err
    assert (started["app"], started["ui"], started["project"]) == ("everloop.serve._main:app", expected,
                                                                    str(Path(folder).resolve()))
