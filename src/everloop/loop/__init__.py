"""The loop controller: triggers, cooldown, retraining, gate, promotion, the audit trail, and one leader
at a time (the store's loop lease)."""

from everloop.loop._backtest import BacktestResult, backtest, write_backtest_report
from everloop.loop._controller import (CANDIDATE, LOOP_LEASE, LoopDecision, audit_trail, recent_labelled,
                                       run_once)
from everloop.loop._views import ACTIONS, decisions, setup_state

__all__ = ["BacktestResult", "backtest", "write_backtest_report", "CANDIDATE", "LOOP_LEASE", "LoopDecision",
           "audit_trail", "recent_labelled", "run_once", "ACTIONS", "decisions", "setup_state"]
