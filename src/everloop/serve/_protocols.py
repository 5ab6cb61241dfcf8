"""Request formats: everloop's own `/predict`, MLflow's `/invocations`, and the Open Inference Protocol.

Each parser turns a body into rows by feature name plus, for each row, the location that names it in
errors (`["instances", 3]`); each formatter turns outputs into that protocol's answer. Validation of
the values themselves is the schema's job, done once per gathered batch.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

MAX_BODY_BYTES = 64 * 1024 * 1024


class ClientError(Exception):
    """A request the client must fix; becomes a 4xx naming each bad field."""

    def __init__(self, status: int, detail: list[dict[str, Any]] | str):
        self.status = status
        self.detail = detail


@dataclass
class Rows:
    records: list[dict[str, Any]]
    locs: list[list[Any]]  # where each row is in the body, for error locations


def loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass  # orjson is strict (no NaN/Infinity literals, 64-bit integers): the standard parser decides
    try:
        return json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and ints past Python's digit limit
        raise ClientError(400, f"the body is not valid JSON: {exc}") from None


def _check_size(rows: list[Any], max_rows: int, where: str) -> None:
    if not rows:
        raise ClientError(422, [{"loc": [where], "msg": "expected at least one row"}])
    if len(rows) > max_rows:
        raise ClientError(413, f"the batch has {len(rows)} rows; the limit is {max_rows} (serving.max_batch_rows)")


def _by_name(rows: list[Any], locs: list[list[Any]], names: list[str]) -> Rows:
    """Rows given as objects by name, or as lists in schema order; every feature must be present."""
    records, problems = [], []
    required = set(names)
    for row, loc in zip(rows, locs):
        if isinstance(row, list):
            if len(row) != len(names):
                problems.append({"loc": loc, "msg": f"a row as a list needs {len(names)} values in schema order "
                                                    f"({', '.join(names)}); got {len(row)}"})
                continue
            row = dict(zip(names, row))
        elif not isinstance(row, dict):
            problems.append({"loc": loc, "msg": "expected an object of feature values by name, or a list in schema order"})
            continue
        if not required <= row.keys():  # one set comparison in C; the names only when one is missing
            problems += [{"loc": loc + [name], "msg": "field required"} for name in names if name not in row]
        records.append(row)
    if problems:
        raise ClientError(422, problems)
    return Rows(records, locs)


# -- /predict -------------------------------------------------------------------------------------


def parse_predict(body: Any, names: list[str], max_rows: int) -> Rows:
    if not isinstance(body, dict) or not ({"features", "instances"} & body.keys()):
        raise ClientError(422, [{"loc": [], "msg": "expected {\"features\": {...}}, {\"features\": [...]} "
                                                   "or {\"instances\": [{...}, ...]}"}])
    if "instances" in body:
        rows = body["instances"]
        if not isinstance(rows, list):
            raise ClientError(422, [{"loc": ["instances"], "msg": "expected a non-empty list of rows"}])
        _check_size(rows, max_rows, "instances")
        return _by_name(rows, [["instances", n] for n in range(len(rows))], names)
    return _by_name([body["features"]], [["features"]], names)


# -- MLflow /invocations --------------------------------------------------------------------------


def parse_invocations(raw: bytes, content_type: str, names: list[str], max_rows: int) -> Rows:
    """MLflow's scoring formats: dataframe_split, dataframe_records, instances, inputs; or a CSV body."""
    if content_type.startswith("text/csv"):
        return _csv_rows(raw, names, max_rows)
    body = loads(raw)
    if isinstance(body, list):  # MLflow 1.x: a bare list of records
        body = {"dataframe_records": body}
    if not isinstance(body, dict):
        raise ClientError(422, [{"loc": [], "msg": "expected one of dataframe_split, dataframe_records, "
                                                   "instances or inputs"}])
    keys = [k for k in ("dataframe_split", "dataframe_records", "instances", "inputs") if k in body]
    if len(keys) != 1:
        raise ClientError(422, [{"loc": [], "msg": "expected exactly one of dataframe_split, dataframe_records, "
                                                   f"instances or inputs; got {sorted(body)}"}])
    key = keys[0]
    value = body[key]
    if key == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("data"), list):
            raise ClientError(422, [{"loc": [key], "msg": "expected {\"columns\": [...], \"data\": [[...], ...]}"}])
        columns = value.get("columns", names)
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise ClientError(422, [{"loc": [key, "columns"], "msg": "expected a list of column names"}])
        data = value["data"]
        _check_size(data, max_rows, key)
        rows = [dict(zip(columns, r)) if isinstance(r, list) and len(r) == len(columns) else r for r in data]
        bad = [{"loc": [key, "data", n], "msg": f"expected a list of {len(columns)} values"}
               for n, r in enumerate(data) if not (isinstance(r, list) and len(r) == len(columns))]
        if bad:
            raise ClientError(422, bad)
        return _by_name(rows, [[key, "data", n] for n in range(len(rows))], names)
    if key == "inputs" and isinstance(value, dict):  # columnar: {"col": [values...]}
        lengths = {len(v) if isinstance(v, list) else -1 for v in value.values()}
        if len(lengths) != 1 or -1 in lengths:
            raise ClientError(422, [{"loc": [key], "msg": "expected every column as a list of the same length"}])
        n = lengths.pop()
        _check_size(list(range(n)), max_rows, key)
        rows = [{c: v[i] for c, v in value.items()} for i in range(n)]
        return _by_name(rows, [[key, i] for i in range(n)], names)
    if not isinstance(value, list):
        raise ClientError(422, [{"loc": [key], "msg": "expected a list of rows"}])
    _check_size(value, max_rows, key)
    return _by_name(value, [[key, n] for n in range(len(value))], names)


def _csv_rows(raw: bytes, names: list[str], max_rows: int) -> Rows:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClientError(400, f"the CSV body is not UTF-8 text: {exc}") from None
    try:
        table = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise ClientError(400, f"the CSV body is malformed: {exc}") from None
    if len(table) < 2:
        raise ClientError(422, [{"loc": ["csv"], "msg": "expected a header line and at least one row"}])
    header, data = table[0], table[1:]
    _check_size(data, max_rows, "csv")
    bad = [{"loc": ["csv", n + 1], "msg": f"expected {len(header)} fields, got {len(r)}"}
           for n, r in enumerate(data) if len(r) != len(header)]
    if bad:
        raise ClientError(422, bad)
    rows = [{h: (None if v == "" else v) for h, v in zip(header, r)} for r in data]
    return _by_name(rows, [["csv", n + 1] for n in range(len(rows))], names)


def mlflow_answer(labels: list[Any]) -> dict[str, Any]:
    return {"predictions": labels}


# -- Open Inference Protocol (KServe v2) -----------------------------------------------------------


def parse_v2(body: Any, names: list[str], max_rows: int) -> Rows:
    """An inference request: one input per feature (as MLServer's PandasCodec sends a DataFrame), or one
    2-D input of shape [rows, features] in schema order (as tritonclient sends a tensor)."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise ClientError(422, [{"loc": ["inputs"], "msg": "expected a non-empty list of inputs"}])
    inputs = body["inputs"]
    problems = []
    for n, item in enumerate(inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or "data" not in item:
            problems.append({"loc": ["inputs", n], "msg": "expected an object with 'name', 'shape', 'datatype', 'data'"})
        elif not isinstance(item.get("shape"), list) or not all(isinstance(d, int) and d >= 0 for d in item["shape"]):
            problems.append({"loc": ["inputs", n, "shape"], "msg": "expected a list of non-negative integers"})
    if problems:
        raise ClientError(422, problems)
    if len(inputs) == 1 and inputs[0]["name"] not in names:
        return _v2_tensor(inputs[0], names, max_rows)
    columns: dict[str, list[Any]] = {}
    for n, item in enumerate(inputs):
        data = _flat(item["data"])
        if int(np.prod(item["shape"])) != len(data):
            problems.append({"loc": ["inputs", n, "data"], "msg": f"{len(data)} values do not fill shape {item['shape']}"})
        columns[item["name"]] = data  # BYTES arrive as JSON strings already; numbers as numbers
    if problems:
        raise ClientError(422, problems)
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1:
        raise ClientError(422, [{"loc": ["inputs"], "msg": "every input must have the same number of rows"}])
    rows_count = lengths.pop()
    _check_size(list(range(rows_count)), max_rows, "inputs")
    rows = [{c: v[i] for c, v in columns.items()} for i in range(rows_count)]
    return _by_name(rows, [["inputs", "row", i] for i in range(rows_count)], names)


def _v2_tensor(item: dict[str, Any], names: list[str], max_rows: int) -> Rows:
    shape, data = item["shape"], _flat(item["data"])
    if len(shape) != 2 or shape[1] != len(names) or shape[0] * shape[1] != len(data):
        raise ClientError(422, [{"loc": ["inputs", 0], "msg": f"expected one input per feature ({', '.join(names)}) "
                                                          f"or one tensor of shape [rows, {len(names)}] in that order"}])
    _check_size(list(range(shape[0])), max_rows, "inputs")
    rows = [data[i * shape[1]:(i + 1) * shape[1]] for i in range(shape[0])]
    return _by_name(rows, [["inputs", 0, i] for i in range(shape[0])], names)


def _flat(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for value in data:
        out.extend(_flat(value) if isinstance(value, list) else [value])
    return out


def v2_answer(model_name: str, version: int | None, request_id: str | None, labels: list[Any],
              proba: list[list[float]] | None) -> dict[str, Any]:
    label_type = "INT64" if all(isinstance(v, int) and not isinstance(v, bool) for v in labels) else (
        "FP64" if all(isinstance(v, float) for v in labels) else "BYTES")
    outputs = [{"name": "predict", "shape": [len(labels), 1], "datatype": label_type, "data": labels}]
    if proba is not None:
        outputs.append({"name": "predict_proba", "shape": [len(proba), len(proba[0]) if proba else 0],
                        "datatype": "FP64", "data": [p for row in proba for p in row]})
    answer = {"model_name": model_name, "model_version": str(version), "outputs": outputs}
    if request_id is not None:
        answer["id"] = request_id
    return answer


V2_TYPES = {"numeric": "FP64", "categorical": "BYTES", "datetime": "BYTES"}
