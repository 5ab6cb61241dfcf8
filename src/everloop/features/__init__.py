"""The feature pipeline built from the spec (plus user transformers)."""

from everloop.features._fast import FastFeatures
from everloop.features._pipeline import (
    MISSING_CATEGORY,
    build_features,
    custom_source_hash,
    fill_missing_category,
)

__all__ = ["MISSING_CATEGORY", "FastFeatures", "build_features", "custom_source_hash", "fill_missing_category"]
