"""`everloop deploy docker`: the build context lints clean, pins this environment, and the image's
command (run here directly, with the environment the Dockerfile sets) serves the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from everloop.serve import create_app, free_port
from tests.deploy.conftest import final_stage, instructions


def _context(everloop, project: Path, output: Path, *args: str) -> dict:
    run = everloop("deploy", "docker", "-p", str(project), "-o", str(output), "--json", *args)
    assert run.code == 0, run.err
    return json.loads(run.out)


def _image_env(stage: dict, store_dir: Path) -> dict[str, str]:
    """This environment as the image would have it: the Dockerfile's ENV (the image's virtualenv is
    this one), no EVERLOOP_* setting but the two URLs of the shared store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVERLOOP_")}
    for key, value in stage["env"].items():
        value = value.replace("/opt/venv/bin", str(Path(sys.executable).parent))
        env[key] = value.replace("$PATH", os.environ["PATH"])
    return env | {"EVERLOOP_DB_URL": f"sqlite:///{store_dir / 'meta.db'}",
                  "EVERLOOP_ARTIFACTS_URL": (store_dir / "artifacts").as_uri()}


def _app_folder(tmp_path: Path, context: Path, stage: dict) -> Path:
    """/app as the Dockerfile builds it: the project file, and the empty store cache."""
    app = tmp_path / "image-app"
    app.mkdir()
    for step in stage["copy"]:
        source, target = step.split()[-2:]
        if not step.startswith("--from") and target.startswith(stage["workdir"]):
            (app / Path(target).relative_to(stage["workdir"])).write_bytes((context / source).read_bytes())
    (app / ".everloop").mkdir()
    return app


def test_dockerfile_lints_clean_and_builds_the_documented_image(everloop, project, tmp_path, hadolint):
    out = _context(everloop, project, tmp_path / "ctx")
    context = tmp_path / "ctx"
    dockerfile = (context / "Dockerfile").read_text()
    lint = subprocess.run([hadolint, str(context / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0 and lint.stdout == "", lint.stdout + lint.stderr

    steps = instructions(dockerfile)
    bases = [rest for keyword, rest in steps if keyword == "FROM"]
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert bases == [f"python:{minor}-slim AS builder", f"python:{minor}-slim"]  # multi-stage, same slim base
    stage = final_stage(dockerfile)
    assert not any("gcc" in r or "build-essential" in r for r in stage["run"])  # no compiler
    assert "--from=builder /opt/venv /opt/venv" in stage["copy"]
    assert stage["user"] == "10001:10001" and stage["workdir"] == "/app" and stage["expose"] == "8000"
    assert stage["env"]["OMP_NUM_THREADS"] == "1"
    assert stage["cmd"] == out["command"] == ["everloop", "serve", "--host", "0.0.0.0", "--port", "8000",
                                               "--workers", "1"]
    assert stage["healthcheck"][:2] == ["python", "-c"]
    assert "http://127.0.0.1:8000/health" in stage["healthcheck"][-1]
    assert "/health" in {r.path for r in create_app(project, watch=False).routes}
    assert f"docker build -t {out['image']}" in dockerfile and "docker push" in dockerfile
    assert (context / "everloop.yaml").read_bytes() == (project / "everloop.yaml").read_bytes()
    assert out["image"] == f"everloop-churn:{version('everloop')}"


def test_requirements_pin_the_running_environment(everloop, project, tmp_path):
    _context(everloop, project, tmp_path / "ctx")
    lines = [line for line in (tmp_path / "ctx" / "requirements.txt").read_text().splitlines()
             if not line.startswith("#")]
    pins = dict(line.split("==") for line in lines)
    assert len(pins) == len(lines)  # every line pinned
    for name in ("numpy", "scikit-learn", "fastapi", "uvicorn", "httptools", "uvloop", "psycopg", "s3fs"):
        assert pins[name] == version(name), name  # uvicorn[standard], and the shared store's extras
    assert not {"pytest", "hypothesis", "schemathesis", "moto"} & set(pins)  # development tools stay out
    source = tmp_path / "ctx" / "everloop-src"  # this everloop runs from a source tree: the image builds it
    assert (source / "pyproject.toml").is_file()
    assert (source / "src" / "everloop" / "deploy" / "_docker.py").is_file()
    assert not list(source.rglob("__pycache__"))


def test_output_folder_is_never_overwritten_unless_forced(everloop, project, tmp_path):
    target = tmp_path / "ctx"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    run = everloop("deploy", "docker", "-p", str(project), "-o", str(target))
    assert run.code == 2 and "not empty" in run.err and "--force" in run.err and str(target) in run.err
    assert not (target / "Dockerfile").exists()
    assert everloop("deploy", "docker", "-p", str(project), "-o", str(target), "--force").code == 0
    assert (target / "Dockerfile").is_file() and (target / "notes.txt").read_text() == "mine"
    run = everloop("deploy", "docker", "-p", str(project), "-o", str(target / "notes.txt"))
    assert run.code == 2 and "is a file" in run.err
    run = everloop("deploy", "docker", "-p", str(project), "-o", str(project), "--force")
    assert run.code == 2 and "is the project folder" in run.err


def test_the_image_command_serves_the_model(everloop, trained, tmp_path):
    """The Dockerfile's CMD, run as the image would run it: in /app with only the project file, the
    Dockerfile's environment, and the shared store's two URLs (here: the trained project's store)."""
    project, _, _ = trained
    port = free_port()
    _context(everloop, project, tmp_path / "ctx", "--port", str(port))
    stage = final_stage((tmp_path / "ctx" / "Dockerfile").read_text())
    app = _app_folder(tmp_path, tmp_path / "ctx", stage)
    env = _image_env(stage, project / ".everloop")
    # the exact CMD, but listening on loopback only (the container listens on all its interfaces)
    command = [("127.0.0.1" if part == "0.0.0.0" else part) for part in stage["cmd"]]
    server = subprocess.Popen(command, cwd=app, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        assert ready.json()["model_version"] == 1  # the model came from the shared store's URLs
        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}
        check = subprocess.run(stage["healthcheck"], env=env, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
    # The service wrote only in the store's cache: /app stays as the image built it (read-only on Kubernetes).
    written = {p.relative_to(app).parts[0] for p in app.rglob("*")}
    assert written == {"everloop.yaml", ".everloop"}
    assert list((app / ".everloop" / "artifacts").rglob("*"))  # the model, read through the cache


def test_training_image_reproduces_the_recorded_run(everloop, trained, tmp_path, hadolint):
    project, _, store = trained
    models = store.tables.models
    with store.engine.begin() as conn:  # as if trained with another scikit-learn than the one here
        manifest = conn.execute(sa.select(models.c.manifest).where(models.c.version == 1)).scalar()
        recorded = manifest["packages"] | {"scikit-learn": "1.4.2"}
        conn.execute(models.update().where(models.c.version == 1)
                     .values(manifest=manifest | {"packages": recorded}))
    out = _context(everloop, project, tmp_path / "train", "--train", "production")
    dockerfile = (tmp_path / "train" / "Dockerfile").read_text()
    assert subprocess.run([hadolint, str(tmp_path / "train" / "Dockerfile")]).returncode == 0
    stage = final_stage(dockerfile)
    assert stage["cmd"] == out["command"] == ["everloop", "reproduce", "1"]
    assert stage["from"] == f"python:{manifest['python']}-slim"  # the recorded Python, to the patch
    pins = dict(line.split("==") for line in (tmp_path / "train" / "requirements.txt").read_text().splitlines()
                if not line.startswith("#"))
    assert pins["scikit-learn"] == "1.4.2" and pins["numpy"] == manifest["packages"]["numpy"]
    # lightgbm's system OpenMP runtime, as in the service's image (test_system_libraries.py)
    assert ("lightgbm" in pins) == any("libgomp1" in step for step in stage["run"])

    # Its command, run here (this scikit-learn is the one that really trained it): the run reproduces.
    with store.engine.begin() as conn:
        conn.execute(models.update().where(models.c.version == 1).values(manifest=manifest))
    app = _app_folder(tmp_path, tmp_path / "train", stage)
    done = subprocess.run(stage["cmd"], cwd=app, env=_image_env(stage, project / ".everloop"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "model v1 reproduced: identical outputs" in done.stdout


def test_training_image_refuses_an_unknown_version(everloop, project, tmp_path):
    run = everloop("deploy", "docker", "-p", str(project), "-o", str(tmp_path / "t"), "--train", "7")
    assert run.code == 2 and "model version 7 does not exist" in run.err
    assert not (tmp_path / "t").exists()


def test_training_image_carries_the_user_transformer(everloop, trained, tmp_path, monkeypatch, hadolint):
    project, _, store = trained
    package = tmp_path / "site" / "myfeatures"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("def make():\n    raise NotImplementedError\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    models = store.tables.models

    def record(custom: str) -> None:  # as if model v1 had been trained with features.custom
        with store.engine.begin() as conn:
            manifest = conn.execute(sa.select(models.c.manifest).where(models.c.version == 1)).scalar()
            manifest["spec"]["features"]["custom"] = custom
            conn.execute(models.update().where(models.c.version == 1).values(manifest=manifest))

    record("myfeatures:make")
    assert everloop("deploy", "docker", "-p", str(project), "-o", str(tmp_path / "t"), "--train", "1").code == 0
    assert (tmp_path / "t" / "code" / "myfeatures" / "__init__.py").read_text().startswith("def make")
    dockerfile = (tmp_path / "t" / "Dockerfile").read_text()
    stage = final_stage(dockerfile)
    assert stage["env"]["PYTHONPATH"] == "/app/code" and "code /app/code" in stage["copy"]
    assert subprocess.run([hadolint, str(tmp_path / "t" / "Dockerfile")]).returncode == 0

    record("no_such_module_here:make")
    run = everloop("deploy", "docker", "-p", str(project), "-o", str(tmp_path / "u"), "--train", "1")
    assert run.code == 2 and "features.custom no_such_module_here:make" in run.err and "PYTHONPATH" in run.err
    assert not (tmp_path / "u").exists()


def test_training_image_refuses_an_imported_model(everloop, trained, tmp_path):
    project, _, store = trained
    models = store.tables.models
    with store.engine.begin() as conn:  # as `everloop models import` records it
        manifest = conn.execute(sa.select(models.c.manifest).where(models.c.version == 1)).scalar()
        conn.execute(models.update().where(models.c.version == 1)
                     .values(manifest=manifest | {"pipeline_source": "imported"}))
    run = everloop("deploy", "docker", "-p", str(project), "-o", str(tmp_path / "t"), "--train", "production")
    assert run.code == 2 and "model v1 was imported" in run.err and "no training record" in run.err
    assert not (tmp_path / "t").exists()


def test_an_everloop_release_is_pinned_not_copied(project, tmp_path, monkeypatch, hadolint):
    from everloop import deploy
    from everloop.deploy import _context
    from everloop.spec import load_spec

    monkeypatch.setattr(_context, "_source_tree", lambda: None)  # as installed from an index
    result = deploy.write_docker(project, load_spec(project), tmp_path / "ctx")
    assert "everloop-src" not in result.files
    assert f"everloop=={version('everloop')}" in (tmp_path / "ctx" / "requirements.txt").read_text().splitlines()
    dockerfile = (tmp_path / "ctx" / "Dockerfile").read_text()
    assert "everloop-src" not in dockerfile
    assert subprocess.run([hadolint, str(tmp_path / "ctx" / "Dockerfile")]).returncode == 0
