"""Batch scoring through the same artifact as the service, streamed in chunks."""

from everloop.batch._score import BatchResult, score_file

__all__ = ["BatchResult", "score_file"]
