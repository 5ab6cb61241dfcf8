"""The loop page: the audit trail, newest first, 50 decisions a page (`?before=<id>` for older ones,
`?action=<action>` to show one kind), each with its evidence: the triggers, the monitor's numbers, the
gate's comparison of candidate and production, a rollout's verdict and its numbers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from everloop import loop
from everloop.ui._web import MAX_ID, num, render, store, whole

router = APIRouter()

PAGE = 50  # decisions a page


@router.get("/loop", response_class=HTMLResponse)
def loop_page(request: Request, before: str | None = None, action: str | None = None) -> HTMLResponse:
    values: dict[str, Any] = {"actions": loop.ACTIONS, "action": action or "", "before": before or "",
                              "decisions": [], "older": None}
    try:
        newer_than = whole_number("before", before)
    except ValueError as exc:
        return render(request, "loop.html", status_code=422, error=str(exc), **values)
    if action and action not in loop.ACTIONS:
        return render(request, "loop.html", status_code=422, error=f"action={action!r}: not a loop decision; "
                      f"expected one of {', '.join(loop.ACTIONS)}", **values)
    rows, older = loop.decisions(store(request), limit=PAGE, before=newer_than, action=action or None)
    values.update(decisions=[decision_view(r) for r in rows], older=older)
    return render(request, "loop.html", **values)


def whole_number(name: str, text: str | None, minimum: int = 1) -> int | None:
    """A query parameter that must be a whole number from `minimum` to _web.MAX_ID (None when absent or
    empty); raises ValueError naming the parameter and what it holds."""
    if text is None or text == "":
        return None
    try:
        return whole(text, name, minimum)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a whole number from {minimum} to {MAX_ID}") from None


def decision_view(row: dict[str, Any]) -> dict[str, Any]:
    """A loop_events row as the templates show it: the evidence split into the monitor's summary, the
    gate's comparison, a rollout's numbers (flattened) and the new datasets (flattened)."""
    evidence = row.get("evidence") or {}
    return {"id": row["id"], "created_at": row["created_at"], "action": row["action"], "reason": row["reason"],
            "triggers": evidence.get("triggers") or [], "model_version": evidence.get("model_version"),
            "monitor": evidence.get("monitor"), "gate": gate_view(evidence.get("gate")),
            "rollout": flatten(evidence.get("rollout")), "datasets": flatten(evidence.get("datasets")),
            "evidence": evidence}


def gate_view(gate: dict[str, Any] | None) -> dict[str, Any] | None:
    """The gate decision's numbers: metric, candidate vs production on the comparison rows, the
    baseline, the allowed loss, per-slice values; None when the decision ran no gate."""
    if not gate:
        return None
    found = gate.get("evidence") or {}
    comparison = found.get("comparison") or {}
    return {"passed": gate.get("passed"), "reasons": gate.get("reasons") or [], "candidate": gate.get("candidate"),
            "production": gate.get("production"), "metric": found.get("metric"),
            "candidate_value": found.get("candidate"), "baseline": found.get("baseline"),
            "comparison": comparison, "slices": found.get("slices") or {}}


def flatten(evidence: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, text) per number, word or short list of a nested evidence dict, in its order;
    longer lists as "N values" (as `everloop rollout status` prints evidence)."""
    lines: list[tuple[str, Any]] = []
    for key, value in (evidence or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            lines += flatten(value, f"{name}.")
        elif isinstance(value, list) and len(value) > 6:
            lines.append((name, f"{len(value)} values"))
        elif isinstance(value, list):
            lines.append((name, ", ".join(_cell(v) for v in value)))
        else:
            lines.append((name, _cell(value)))
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return num(value)
