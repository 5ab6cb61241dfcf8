"""The loop controller: triggers, cooldown, retraining, gate, promotion, and the audit trail."""

from everloop.loop._backtest import BacktestResult, backtest, write_backtest_report
from everloop.loop._controller import CANDIDATE, LoopDecision, audit_trail, recent_labelled, run_once

__all__ = ["BacktestResult", "backtest", "write_backtest_report", "CANDIDATE", "LoopDecision", "audit_trail", "recent_labelled", "run_once"]
