"""The built-in scenario (customer churn with a real shift) and `everloop demo`."""

from everloop.demo._run import (ROLLOUT_MODES, DemoConfig, DemoResult, answered_by, demo_spec, rollout_settings,
                                run_demo)
from everloop.demo._scenario import make_churn

__all__ = ["ROLLOUT_MODES", "DemoConfig", "DemoResult", "answered_by", "demo_spec", "make_churn",
           "rollout_settings", "run_demo"]
