"""The loop controller: triggers, cooldown, retraining, gate, promotion, and the audit trail."""

from everloop.loop._controller import CANDIDATE, LoopDecision, audit_trail, recent_labelled, run_once

__all__ = ["CANDIDATE", "LoopDecision", "audit_trail", "recent_labelled", "run_once"]
