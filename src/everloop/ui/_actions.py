"""The dashboard's state-changing forms (promote, rollback, rollouts): admin token and CSRF checked
by `_auth.check_change` (being built)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
