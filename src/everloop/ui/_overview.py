"""The overview page (being built)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from everloop.ui._web import render

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
def overview(request: Request) -> HTMLResponse:
    return render(request, "overview.html")
