"""The dashboard (`everloop ui`, and `everloop serve --ui` at /ui): server-rendered pages over the same
Python API the CLI uses. Read-only unless the admin token is presented; charts drawn by the plotly.js
that the plotly package ships (no CDN, works offline)."""

from everloop.ui._app import create_ui

__all__ = ["create_ui"]
