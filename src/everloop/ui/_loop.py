"""The loop page (being built)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from everloop.ui._web import render

router = APIRouter()


@router.get("/loop", response_class=HTMLResponse)
def loop(request: Request) -> HTMLResponse:
    return render(request, "loop.html")
