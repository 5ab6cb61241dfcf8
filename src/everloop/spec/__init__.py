"""The project file `everloop.yaml`: loading, validation, defaults."""

from everloop.spec._load import SPEC_FILE, describe_errors, load_spec, parse_spec
from everloop.spec._model import LOWER_IS_BETTER, METRICS, ProjectSpec, SqlSource

__all__ = ["SPEC_FILE", "describe_errors", "LOWER_IS_BETTER", "METRICS", "ProjectSpec", "SqlSource", "load_spec", "parse_spec"]
