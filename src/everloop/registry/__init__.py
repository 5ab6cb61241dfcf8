"""Model versions, aliases and their history, the promotion gate, rollback, shadow and canary rollouts."""

from everloop.registry._card import write_card
from everloop.registry._import import ImportResult, import_model, origin_text
from everloop.registry._lineage import dataset_lineage, model_lineage, prediction_lineage
from everloop.registry._registry import (
    PRODUCTION,
    AliasMoved,
    RolloutActive,
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
from everloop.registry._views import (ModelPage, compare_models, dataset_lineage_view, feature_importances,
                                      latest_alias_moves, lineage_overview, model_card, model_lineage_view,
                                      model_page, model_row, model_summary)
from everloop.registry._rollout import (Rollout, active_rollout, finish_rollout, get_rollout, latest_rollout,
                                        note_rollout, start_rollout, step_rollout)

__all__ = ["PRODUCTION", "AliasMoved", "RolloutActive", "GateDecision", "ImportResult", "ModelVersion", "import_model", "origin_text",
           "alias_at", "alias_history", "dataset_lineage",
           "model_lineage", "prediction_lineage", "write_card", "alias_version", "check_gate",
           "eval_frame", "get_model", "list_models", "load_model", "promote", "resolve", "rollback", "set_alias",
           "Rollout", "active_rollout", "finish_rollout", "get_rollout", "latest_rollout", "note_rollout", "start_rollout",
           "step_rollout", "ModelPage", "compare_models", "feature_importances", "latest_alias_moves",
           "lineage_overview", "model_card", "model_page", "model_row", "model_summary",
           "dataset_lineage_view", "model_lineage_view"]
