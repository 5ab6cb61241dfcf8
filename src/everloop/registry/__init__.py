"""Model versions, aliases and their history, the promotion gate, rollback, shadow and canary rollouts."""

from everloop.registry._card import write_card
from everloop.registry._import import ImportResult, import_model, origin_text
from everloop.registry._lineage import dataset_lineage, model_lineage, prediction_lineage
from everloop.registry._registry import (
    PRODUCTION,
    AliasMoved,
    alias_at,
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
from everloop.registry._rollout import (Rollout, active_rollout, finish_rollout, get_rollout, latest_rollout,
                                        note_rollout, start_rollout, step_rollout)

__all__ = ["PRODUCTION", "AliasMoved", "GateDecision", "ImportResult", "ModelVersion", "import_model", "origin_text",
           "alias_at", "alias_history", "dataset_lineage",
           "model_lineage", "prediction_lineage", "write_card", "alias_version", "check_gate",
           "eval_frame", "get_model", "list_models", "load_model", "promote", "resolve", "rollback", "set_alias",
           "Rollout", "active_rollout", "finish_rollout", "get_rollout", "latest_rollout", "note_rollout", "start_rollout",
           "step_rollout"]
