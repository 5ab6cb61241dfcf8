"""Model versions, aliases and their history, the promotion gate, rollback."""

from everloop.registry._registry import (
    PRODUCTION,
    GateDecision,
    ModelVersion,
    alias_history,
    alias_version,
    check_gate,
    eval_frame,
    get_model,
    list_models,
    load_model,
    promote,
    resolve,
    rollback,
    set_alias,
)

__all__ = ["PRODUCTION", "GateDecision", "ModelVersion", "alias_history", "alias_version", "check_gate",
           "eval_frame", "get_model", "list_models", "load_model", "promote", "resolve", "rollback", "set_alias"]
