"""The documented project file is a valid one: docs and spec cannot drift apart silently."""

import re
from pathlib import Path

import yaml

from everloop.spec import parse_spec

DOCS = Path(__file__).parents[2] / "docs"


def test_the_documented_project_file_parses_with_its_values():
    block = re.search(r"```yaml\n(.*?)```", (DOCS / "project-file.md").read_text(), re.S).group(1)
    spec = parse_spec(yaml.safe_load(block))
    assert spec.monitoring.performance.max_drop == "5%" and spec.promotion.max_regression == 0.005
    assert spec.monitoring.drift.ignore == ["signup_month"]
    assert spec.monitoring.drift.features["day"].min_effect == 0.2
