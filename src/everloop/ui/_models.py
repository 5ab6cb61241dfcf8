"""The models page (being built)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from everloop.ui._web import render

router = APIRouter()


@router.get("/models", response_class=HTMLResponse)
def models(request: Request) -> HTMLResponse:
    return render(request, "models.html")
