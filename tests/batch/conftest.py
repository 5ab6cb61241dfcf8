"""Fixtures for batch scoring on Ray: one local Ray for the session, started the way everloop starts one
(loopback only), with 2 CPUs and a small object store, its session files in a folder of its own."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Iterator

import pytest


def ray_or_skip():
    """`ray` (with Ray Data); a skip without it, except under CI=true, where its absence is a failure."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI") == "true":  # CI installs everloop[ray]: a skip would hide its absence
            pytest.fail(f"ray[data] is required under CI=true: {exc}")
        pytest.skip(f"ray[data] is not installed (pip install -e '.[ray]'): {exc}")
    return ray


@pytest.fixture(scope="session")
def ray_local() -> Iterator[dict[str, Any]]:
    """A local Ray for the whole session, started by everloop's `start_local`: 2 CPUs, a 100 MB object
    store, session files in a new short folder (Ray's socket paths must stay under 108 bytes; /tmp/ray
    may hold other runs'). Yields `ray.init`'s address info; shut down and removed afterwards."""
    ray = ray_or_skip()
    from everloop.batch._ray import start_local

    if ray.is_initialized():
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    try:
        yield start_local(num_cpus=2, object_store_memory=100 * 1024 * 1024, temp_dir=temp_dir)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
