"""The project file `everloop.yaml`: loading, validation, defaults; secrets kept out of it."""

from everloop.spec._load import SPEC_FILE, describe_errors, load_spec, parse_spec
from everloop.spec._model import LOWER_IS_BETTER, METRICS, ProjectSpec, SqlSource
from everloop.spec._secrets import missing_env, redact_text, redact_url, resolve_env, scrub_spec

__all__ = ["SPEC_FILE", "describe_errors", "LOWER_IS_BETTER", "METRICS", "ProjectSpec", "SqlSource", "load_spec",
           "missing_env", "parse_spec", "redact_text", "redact_url", "resolve_env", "scrub_spec"]
