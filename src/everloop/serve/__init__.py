"""The HTTP prediction service: validation, hot swap, the prediction log writer, metrics."""

from everloop.serve._app import create_app
from everloop.serve._feedback import FeedbackProblem, FeedbackResult, ids_for_keys, record_feedback
from everloop.serve._process import ServerProcess, free_port

__all__ = ["FeedbackProblem", "FeedbackResult", "ServerProcess", "create_app", "free_port", "ids_for_keys", "record_feedback"]
