"""The HTTP prediction service: validation, hot swap, the prediction log writer, metrics."""

from everloop.serve._app import create_app

__all__ = ["create_app"]
