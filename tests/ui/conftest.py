"""The dashboard's tests run against a store made by the demo scenario (the whole loop: ingest, train,
promote, serve, drift, retrain, promote), built once per session and copied for tests that change it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from everloop.demo import DemoConfig, run_demo
from everloop.ui import create_ui

TOKEN = "ui-test-admin-token"
SMALL = DemoConfig(history_rows=4000, window_rows=1500)


@pytest.fixture(scope="session")
def demo_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder whose store the demo scenario filled (read-only: copy it to change it)."""
    folder = tmp_path_factory.mktemp("ui") / "demo"
    result = run_demo(folder, SMALL, say=lambda _m: None)
    assert result.passed, result.to_dict()  # the pages' assertions rely on the drift and the retraining
    return folder


@pytest.fixture
def demo_copy(demo_project: Path, tmp_path: Path) -> Path:
    """A private copy of the demo project, for tests that promote or roll back."""
    return Path(shutil.copytree(demo_project, tmp_path / "demo"))


@pytest.fixture
def ui(demo_project: Path) -> TestClient:
    """The dashboard over the demo store, read-only (no admin token)."""
    with TestClient(create_ui(demo_project, admin_token="")) as client:
        yield client


@pytest.fixture
def admin_ui(demo_copy: Path) -> TestClient:
    """The dashboard over a copy of the demo store, with an admin token, signed in."""
    with TestClient(create_ui(demo_copy, admin_token=TOKEN)) as client:
        assert client.post("/login", data={"token": TOKEN}, follow_redirects=False).status_code == 303
        yield client
