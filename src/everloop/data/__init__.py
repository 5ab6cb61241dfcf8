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
    load_quarantine,
    validate,
)
from everloop.data._diff import diff_datasets
from everloop.data._profile import ColumnProfile, Profile, numbers
from everloop.data._schema import NULL_TOKENS, Anomaly, ColumnRole, ColumnSchema, Schema, ValidationReport
from everloop.data._schema_file import (
    SCHEMA_FILE,
    accept_schema,
    evolve,
    infer_source,
    load_schema_file,
    schema_changes,
    schema_yaml,
    write_schema_file,
)
from everloop.data._sources import TypedReadFailed, iter_batches, read_file, read_source, source_files
from everloop.data._stats import ColumnStats, DatasetStats
from everloop.data._views import (QUARANTINE_REASON, QUARANTINE_ROW, DatasetPage, anomaly_summary, column_summary,
                                  dataset_page, quarantine_head, schema_view)

__all__ = [
    "NULL_TOKENS", "SCHEMA_FILE", "accept_schema", "diff_datasets", "evolve", "infer_source", "load_schema_file", "schema_changes", "schema_yaml",
    "write_schema_file", "ColumnProfile", "Profile", "numbers",
    "Anomaly", "ColumnRole", "ColumnSchema", "DatasetVersion", "Schema", "ValidationReport", "current_schema",
    "ColumnStats", "DatasetStats", "TypedReadFailed", "get_dataset", "get_schema", "ingest", "ingest_frame",
    "iter_batches", "list_datasets", "source_files", "load_frame", "load_quarantine", "read_file", "read_source", "validate",
    "QUARANTINE_REASON", "QUARANTINE_ROW", "DatasetPage", "anomaly_summary", "column_summary", "dataset_page", "quarantine_head", "schema_view",
]
