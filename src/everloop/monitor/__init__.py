"""Monitoring: data drift, prediction drift, performance with labels, health, and the HTML report."""

from everloop.monitor._drift import ColumnDrift, DriftDetector, DriftReport, unknown_settings
from everloop.data import ColumnProfile, Profile
from everloop.monitor._estimate import Estimate, estimate_interval, estimate_metric
from everloop.monitor._health import health_alerts, service_errors
from everloop.monitor._live import LiveVerdict, judge_rollout
from everloop.monitor._monitor import (
    MonitorResult,
    decay_threshold,
    judge,
    judge_labelled,
    labelled_decay,
    labelled_rows_limit,
    list_runs,
    monitor,
    reference_profiles,
    send_alert,
)
from everloop.monitor._windows import Window
from everloop.monitor._report import (drift_columns, feature_distribution, feature_heatmap, over_time, prediction_over_time,
                                      write_report)
from everloop.monitor._history import MAX_WINDOWS, WindowPage, recent_windows, service_per_minute, window_result
from everloop.monitor._service_views import latest_window, lost_predictions, recent_service
from everloop.monitor._skew import replay_skew, skew_alert

__all__ = ["ColumnDrift", "ColumnProfile", "DriftDetector", "DriftReport", "MonitorResult", "Profile",
           "Estimate", "LiveVerdict", "estimate_interval", "estimate_metric", "judge_rollout",
           "Window", "decay_threshold", "health_alerts", "judge", "judge_labelled", "labelled_decay", "labelled_rows_limit", "list_runs", "monitor", "reference_profiles", "send_alert", "service_errors",
           "replay_skew", "skew_alert", "unknown_settings", "write_report",
           "latest_window", "lost_predictions", "recent_service",
           "MAX_WINDOWS", "WindowPage", "drift_columns", "feature_distribution", "feature_heatmap", "over_time", "prediction_over_time",
           "recent_windows", "service_per_minute", "window_result"]
