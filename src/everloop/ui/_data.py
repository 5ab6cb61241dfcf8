"""The data page (being built)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from everloop.ui._web import render

router = APIRouter()


@router.get("/data", response_class=HTMLResponse)
def data(request: Request) -> HTMLResponse:
    return render(request, "data.html")
