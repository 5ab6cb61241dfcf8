"""OpenAPI request schemas built from the data schema, so `/docs` shows the real feature names and types."""

from __future__ import annotations

from typing import Any

from everloop.data import Schema

JSON_TYPES = {"numeric": {"type": "number"}, "categorical": {"type": "string"},
              "datetime": {"type": "string", "format": "date-time"}}


def request_schemas(schema: Schema | None) -> dict[str, dict[str, Any]]:
    """`openapi_extra` for each prediction endpoint (generic when no schema exists yet)."""
    if schema is None:
        row: dict[str, Any] = {"type": "object", "description": "feature values by name"}
    else:
        properties = {}
        for col in schema.features:
            entry = dict(JSON_TYPES[col.kind])
            if col.kind == "numeric" and col.min is not None:
                entry["description"] = f"{col.dtype}; schema range {col.min:g} .. {col.max:g}"
            if col.categories is not None:
                entry["examples"] = col.categories[:5]
                entry["description"] = f"one of {len(col.categories)} known categories; others are accepted"
            if col.nullable:
                entry = {"anyOf": [entry, {"type": "null"}]}
            properties[col.name] = entry
        row = {"type": "object", "properties": properties, "required": list(properties)}
    in_order = {"type": "array", "description": "feature values in schema order",
                "items": {"type": ["number", "string", "null"]}}
    predict = {"oneOf": [
        {"type": "object", "properties": {"features": {"oneOf": [row, in_order]}}, "required": ["features"]},
        {"type": "object", "properties": {"instances": {"type": "array", "items": {"oneOf": [row, in_order]},
                                                        "minItems": 1}}, "required": ["instances"]},
    ]}
    invocations = {"type": "object", "description": "MLflow scoring: one of dataframe_split, dataframe_records, "
                   "instances or inputs (a text/csv body with a header line works too)",
                   "properties": {"dataframe_records": {"type": "array", "items": row},
                                  "dataframe_split": {"type": "object", "properties": {
                                      "columns": {"type": "array", "items": {"type": "string"}},
                                      "data": {"type": "array", "items": in_order}}},
                                  "instances": {"type": "array", "items": row}}}
    v2 = {"type": "object", "required": ["inputs"], "properties": {"id": {"type": "string"}, "inputs": {
        "type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype", "data"],
                                   "properties": {"name": {"type": "string"},
                                                  "shape": {"type": "array", "items": {"type": "integer"}},
                                                  "datatype": {"type": "string"}, "data": {"type": "array"}}}}}}
    label = {"type": "object", "required": ["id", "label"],
             "properties": {"id": {"type": "string"}, "label": {"type": ["number", "string"]}}}
    feedback = {"oneOf": [label, {"type": "object", "required": ["labels"],
                                  "properties": {"labels": {"type": "array", "items": label}}}]}
    body = lambda s: {"requestBody": {"required": True, "content": {"application/json": {"schema": s}}}}  # noqa: E731
    return {"predict": body(predict), "invocations": body(invocations), "v2": body(v2), "feedback": body(feedback)}
