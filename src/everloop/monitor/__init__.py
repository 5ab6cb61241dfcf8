"""Monitoring: data drift, prediction drift, performance with labels, health, and the HTML report."""

from everloop.monitor._drift import ColumnDrift, DriftDetector, DriftReport
from everloop.data import ColumnProfile, Profile
from everloop.monitor._estimate import estimate_metric
from everloop.monitor._monitor import (
    MonitorResult,
    iter_window,
    list_runs,
    monitor,
    reference_profiles,
    send_alert,
)
from everloop.monitor._report import write_report

__all__ = ["ColumnDrift", "ColumnProfile", "DriftDetector", "DriftReport", "MonitorResult", "Profile", "estimate_metric",
           "iter_window", "list_runs", "monitor", "reference_profiles", "send_alert", "write_report"]
