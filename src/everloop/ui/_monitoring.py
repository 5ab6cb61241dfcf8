"""The monitoring page (being built)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from everloop.ui._web import render

router = APIRouter()


@router.get("/monitoring", response_class=HTMLResponse)
def monitoring(request: Request) -> HTMLResponse:
    return render(request, "monitoring.html")
