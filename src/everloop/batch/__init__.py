"""Batch scoring through the same artifact as the service, streamed in chunks, resumable."""

from everloop.batch._score import BatchResult, BatchWriter, ChunkScorer, ScoredChunk, count_rows, score_file

__all__ = ["BatchResult", "BatchWriter", "ChunkScorer", "ScoredChunk", "count_rows", "score_file"]
