"""Sources, schema inference, validation with anomalies, and dataset versions."""

from everloop.data._datasets import (
    DatasetVersion,
    current_schema,
    get_dataset,
    get_schema,
    ingest,
    ingest_frame,
    list_datasets,
    load_frame,
    validate,
)
from everloop.data._schema import Anomaly, ColumnSchema, Schema, ValidationReport
from everloop.data._sources import read_file, read_source

__all__ = [
    "Anomaly", "ColumnSchema", "DatasetVersion", "Schema", "ValidationReport", "current_schema",
    "get_dataset", "get_schema", "ingest", "ingest_frame", "list_datasets", "load_frame", "read_file",
    "read_source", "validate",
]
