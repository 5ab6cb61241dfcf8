"""The `everloop` command (Typer + rich), a thin layer over the Python API."""

from everloop.cli._app import app, main

__all__ = ["app", "main"]
