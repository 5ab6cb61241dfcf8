"""Monitoring: data drift, prediction drift, performance with labels, health, and the HTML report."""

from everloop.monitor._drift import ColumnDrift, DriftDetector, DriftReport
from everloop.monitor._monitor import MonitorResult, list_runs, load_window, monitor, reference_frame
from everloop.monitor._report import write_report

__all__ = ["ColumnDrift", "DriftDetector", "DriftReport", "MonitorResult", "list_runs", "load_window", "monitor",
           "reference_frame", "write_report"]
