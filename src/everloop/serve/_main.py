"""Entry point for uvicorn workers: `uvicorn everloop.serve._main:app --factory`."""

from __future__ import annotations

import os

from everloop.serve._app import create_app

PROJECT_ENV = "EVERLOOP_PROJECT"


def app():  # noqa: D103 - uvicorn factory
    return create_app(os.environ.get(PROJECT_ENV, "."))
