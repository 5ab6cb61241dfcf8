"""The built-in scenario (customer churn with a real shift) and `everloop demo`."""

from everloop.demo._run import DemoConfig, DemoResult, demo_spec, run_demo
from everloop.demo._scenario import make_churn

__all__ = ["DemoConfig", "DemoResult", "demo_spec", "make_churn", "run_demo"]
