"""Request formats: everloop's own `/predict`, MLflow's `/invocations`, and the Open Inference Protocol.

Each parser turns a body into rows by feature name plus, for each row, the location that names it in
errors (`["instances", 3]`); each formatter turns outputs into that protocol's answer. Validation of
the values themselves is the schema's job, done once per gathered batch.
"""

from __future__ import annotations

import csv
import io
import json
import reprlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from everloop.data._sources import sniff_delimiter

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


MAX_DEPTH = 1024  # levels of nested objects and lists orjson reads; no request needs a tenth of it
TOO_DEEP = ("the body nests objects or lists too deeply to be read (a request needs a handful of levels; "
            f"past {MAX_DEPTH} are never read)")


def loads(raw: bytes) -> Any:
    """A JSON body. orjson reads it; what orjson refuses for being strict (NaN/Infinity literals,
    integers past 64 bits, a lone surrogate such as "\\ud800") the standard parser decides.
    Errors: ClientError 400 (not JSON, nested past MAX_DEPTH levels), 422 (a text that is no
    Unicode, naming where it is: it could be neither logged nor answered)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):
            raise ClientError(400, TOO_DEEP) from None
    try:
        body = json.loads(raw)
    except RecursionError:  # nested nearly as deep as orjson's limit, with a NaN: past Python's stack
        raise ClientError(400, TOO_DEEP) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and ints past Python's digit limit
        raise ClientError(400, f"the body is not valid JSON: {exc}") from None
    # The standard parser decodes with surrogatepass: a lone surrogate comes in escaped or as raw bytes
    # (ED A0 80), so every body it reads is looked at (orjson refused it: rare, and never the fast path).
    _refuse_surrogates(body)
    return body


def _refuse_surrogates(body: Any) -> None:
    """Refuse (422) a body with a text (key or value) that cannot be encoded as UTF-8, naming each
    place (`["instances", 3, "plan"]`): only the standard parser lets such text through, and a row
    holding it could not be written to the prediction log. Walks without recursion (a body may nest
    up to MAX_DEPTH levels)."""
    problems: list[dict[str, Any]] = []
    stack: list[tuple[list[Any], Any]] = [([], body)]  # (where, value), the next to look at last
    while stack and len(problems) < _MAX_PROBLEMS:
        loc, value = stack.pop()
        if isinstance(value, dict):
            for key, item in reversed(value.items()):
                if not _encodable(key):
                    problems.append({"loc": loc, "msg": f"the key {_quoted(key)} {_NO_UNICODE}"})
                stack.append((loc + [_shown(key)], item))
        elif isinstance(value, list):
            stack.extend((loc + [n], value[n]) for n in range(len(value) - 1, -1, -1))
        elif isinstance(value, str) and not _encodable(value):
            problems.append({"loc": loc, "msg": f"the text {_quoted(value)} {_NO_UNICODE}"})
    if problems:
        raise ClientError(422, problems)


_MAX_PROBLEMS = 100  # named in one answer: enough to see the pattern
_NO_UNICODE = ("holds a lone surrogate (a \\ud800-\\udfff escape without its pair), which is no "
               "Unicode text; send the character itself, or its escaped pair")


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(text: str) -> str:
    """A text as an answer can hold it: lone surrogates as their escapes (`\\ud800`)."""
    return text if _encodable(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _quoted(text: str, limit: int = 40) -> str:
    """A text quoted in a message: at most `limit` characters, lone surrogates as their escapes."""
    return "'" + _shown(text if len(text) <= limit else text[:limit] + "...") + "'"


def load_body(raw: bytes) -> Any:
    """A prediction request's JSON body, refused (422) when an object in it repeats a key: JSON parsers
    keep one of the values silently (orjson and the standard parser the last), so `{"age": 3, "age": 70}`
    is ambiguous. Errors: ClientError 400 (not JSON), 422 (a repeated key, naming it, its object's
    location and the key positions).

    The check costs one count of a byte on the common path. Each key of a body is followed by a colon,
    so a body with no more colons than its parsed objects hold keys has no repeated key (colons in text
    only add to the count). When there are more (date/times and other text with colons), the colons
    right after a quote are counted the same way, which text rarely has (sound unless a key has space
    before its colon); objects nested deeper than rows are counted only when needed; and only when
    every count differs is the body parsed again with every key kept, which decides exactly."""
    body = loads(raw)
    if type(body) is not dict and type(body) is not list:
        return body
    keys = _flat_key_count(body)
    data = np.frombuffer(raw, dtype=np.uint8) if len(raw) > _LARGE else None  # a vectorised count
    colons = raw.count(b":") if data is None else int(np.count_nonzero(data == _COLON))
    if colons == keys:
        return body
    quoted, spaced = _quoted_colons(raw, data)
    if quoted == keys and not spaced:
        return body
    repeats: list[dict[str, Any]] = []
    try:
        deep = _key_count(body)
        if deep != keys and (colons == deep or (quoted == deep and not spaced)):
            return body
        _locate_repeats(json.loads(raw, object_pairs_hook=_KeptPairs.of), [], repeats)
    except RecursionError:  # orjson reads 1024 levels; no request needs a tenth of that
        raise ClientError(400, TOO_DEEP) from None
    if repeats:
        raise ClientError(422, repeats)
    return body


_LARGE = 4096  # bytes: from here numpy counts faster than bytes.count
_COLON, _QUOTE = ord(":"), ord('"')
_SPACED_COLONS = (b" :", b"\t:", b"\n:", b"\r:")
_WHITESPACE = np.frombuffer(b" \t\n\r", dtype=np.uint8)


def _quoted_colons(raw: bytes, data: np.ndarray | None) -> tuple[int, bool]:
    """How many colons follow a quote, and whether any follows JSON whitespace."""
    if data is None:
        return raw.count(b'":'), any(s in raw for s in _SPACED_COLONS)
    before = data[np.flatnonzero(data[1:] == _COLON)]  # the byte before each colon
    return int(np.count_nonzero(before == _QUOTE)), bool(np.isin(before, _WHITESPACE).any())


def _flat_key_count(body: dict[str, Any] | list[Any]) -> int:
    """The keys of the body's own object and of the objects right inside it (rows, a `features` object,
    v2's inputs): a body's keys but for objects nested deeper."""
    if type(body) is list:
        return sum([len(r) for r in body if type(r) is dict])
    n = len(body)
    for v in body.values():
        if type(v) is dict:
            n += len(v)
        elif type(v) is list:
            n += sum([len(r) for r in v if type(r) is dict])
    return n


def _key_count(value: dict[str, Any] | list[Any]) -> int:
    """The keys of every object in a parsed body (a list's objects are looked for when it holds any)."""
    if type(value) is dict:
        n = len(value)
        types = set(map(type, value.values()))  # in C: most objects hold no object or list
        if dict in types or list in types:
            n += sum([_key_count(v) for v in value.values() if type(v) is dict or type(v) is list])
        return n
    types = set(map(type, value))
    if dict in types or list in types:
        return sum([_key_count(v) for v in value if type(v) is dict or type(v) is list])
    return 0


class _KeptPairs(dict):
    """A parsed JSON object that remembers the keys it was given more than once, with their positions."""

    repeated: dict[str, list[int]]

    @classmethod
    def of(cls, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        kept = dict(pairs)
        if len(kept) == len(pairs):
            return kept
        out = cls(kept)
        positions: dict[str, list[int]] = {}
        for n, (key, _) in enumerate(pairs):
            positions.setdefault(key, []).append(n)
        out.repeated = {k: p for k, p in positions.items() if len(p) > 1}
        return out


def _locate_repeats(value: Any, loc: list[Any], out: list[dict[str, Any]]) -> None:
    if isinstance(value, _KeptPairs):
        for key, positions in value.repeated.items():
            out.append(_ambiguous(loc + [key], repr(key), positions, "keys", " in this object"))
    if isinstance(value, dict):
        for key, v in value.items():
            if isinstance(v, (dict, list)):
                _locate_repeats(v, loc + [key], out)
    elif isinstance(value, list):
        for n, v in enumerate(value):
            if isinstance(v, (dict, list)):
                _locate_repeats(v, loc + [n], out)


def _ambiguous(loc: list[Any], what: str, positions: list[int], label: str, within: str = "",
               note: str = "") -> dict[str, Any]:
    """The 422 item for a name given more than once, e.g. "column 'age' is given 2 times (positions 0
    and 3): which value is meant is ambiguous; send it once"."""
    return {"loc": loc, "msg": f"{what} is given {len(positions)} times{within} ({label} {_positions(positions)}"
                               f"{note}): which value is meant is ambiguous; send it once"}


def _positions(positions: list[int]) -> str:
    """0-based positions as "0 and 3" or "0, 3 and 5"."""
    text = [str(p) for p in positions]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " and " + text[-1]


def _repeated_names(names: list[str]) -> dict[str, list[int]]:
    """Names given more than once in a list, with their 0-based positions; empty when all differ."""
    if len(set(names)) == len(names):
        return {}
    positions: dict[str, list[int]] = {}
    for n, name in enumerate(names):
        positions.setdefault(name, []).append(n)
    return {k: p for k, p in positions.items() if len(p) > 1}


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


def check_nesting(raw: bytes, rows: Rows) -> None:
    """Refuse (422) the rows whose feature value nests lists or objects past MAX_VALUE_DEPTH levels,
    naming each (`["instances", 3, "plan"]`): no feature is a list, and the checks that describe a
    wrong value recurse into it, so one nested deep enough would fail the whole micro-batch it joins,
    other clients' rows too. Costs two byte counts unless the body has more brackets than rows."""
    if raw.count(b"[") + raw.count(b"{") <= len(rows.records) + _WRAPPERS:
        return
    problems = []
    for record, loc in zip(rows.records, rows.locs):
        types = set(map(type, record.values()))  # in C: a row's values are seldom lists or objects
        if list in types or dict in types:
            problems += [{"loc": loc + [name], "msg": _TOO_DEEP_VALUE} for name, value in record.items()
                         if (type(value) is list or type(value) is dict)
                         and _nests_past(value, MAX_VALUE_DEPTH)]
    if problems:
        raise ClientError(422, problems[:_MAX_PROBLEMS])


MAX_VALUE_DEPTH = 32  # levels a feature value may nest (none is right): far from Python's recursion limit
_WRAPPERS = 8  # brackets a body has besides one per row (its object, "features", "columns", v2 inputs)
_TOO_DEEP_VALUE = (f"the value nests lists or objects more than {MAX_VALUE_DEPTH} levels deep; a feature "
                   "takes one value (a number, a text, true/false or null)")


def _nests_past(value: list[Any] | dict[str, Any], limit: int) -> bool:
    """Whether `value` nests lists or objects more than `limit` levels (itself the first); no recursion."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if level > limit:
            return True
        children = item.values() if type(item) is dict else item
        stack.extend((c, level + 1) for c in children if type(c) is list or type(c) is dict)
    return False


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
    body = load_body(raw)
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
        repeated = _repeated_names(columns)
        if repeated:
            raise ClientError(422, [_ambiguous([key, "columns"], f"column {name!r}", p, "positions")
                                    for name, p in repeated.items()])
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
    """A `text/csv` body, read as the same file would be (`everloop.data.iter_batches`): the field
    delimiter (`,`, `;`, tab or `|`) sniffed from its first lines by the file reader's own sniffer, a
    UTF-8 byte-order mark (as Excel and PowerShell write) no part of the first column's name, blank
    lines skipped, empty fields null. Cells stay text: the schema reads them. Locations are
    `["csv", line]`, lines counted from 0 (the header). Errors: ClientError 400 (not UTF-8, malformed),
    422 (no rows, a repeated or missing column, a row of another width than the header), 413."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ClientError(400, f"the CSV body is not UTF-8 text: {exc}") from None
    delimiter = sniff_delimiter(text[:_SNIFF_CHARS])
    header: list[str] | None = None
    data, lines = [], []
    try:
        reader = csv.reader(io.StringIO(text), delimiter=delimiter)
        line = 0
        for fields in reader:
            if fields:  # a blank line is no row (as pyarrow's reader skips it)
                if header is None:
                    header = fields
                else:
                    data.append(fields)
                    lines.append(line)
            line = reader.line_num  # the next row starts here (a quoted value may span lines)
    except csv.Error as exc:
        raise ClientError(400, f"the CSV body is malformed: {exc}") from None
    if header is None or not data:
        raise ClientError(422, [{"loc": ["csv"], "msg": "expected a header line and at least one row"}])
    read_with = "" if delimiter == "," else f" (fields separated by {delimiter!r}, sniffed from its first lines)"
    repeated = _repeated_names(header)
    if repeated:
        raise ClientError(422, [_ambiguous(["csv", 0, name], f"column {name!r}", p, "fields", " in the header",
                                           ", from 0") for name, p in repeated.items()])
    present = set(header)
    missing = [name for name in names if name not in present]
    if len(missing) == len(names):
        shown = ", ".join(map(repr, header[:5])) + (", ..." if len(header) > 5 else "")
        raise ClientError(422, [{"loc": ["csv", 0], "msg": (
            f"none of the header's columns ({shown}) is a feature of the model (read with delimiter "
            f"{delimiter!r}); expected {', '.join(names)} (GET /model lists them)")}])
    if missing:  # once, for the header: not once per row
        raise ClientError(422, [{"loc": ["csv", 0, name],
                                 "msg": f"field required: the header has no column {name!r}{read_with}"}
                                for name in missing])
    _check_size(data, max_rows, "csv")
    width = len(header)
    bad = [{"loc": ["csv", line], "msg": f"expected {width} fields, as the header has, got {len(r)}{read_with}"}
           for r, line in zip(data, lines) if len(r) != width]
    if bad:
        raise ClientError(422, bad)
    rows = [{h: (None if v == "" else v) for h, v in zip(header, r)} for r in data]
    return _by_name(rows, [["csv", line] for line in lines], names)


_SNIFF_CHARS = 1 << 16  # of a CSV body: the sniffer reads its first rows only


def mlflow_answer(labels: list[Any]) -> dict[str, Any]:
    return {"predictions": labels}


IDS_HEADER = b"x-everloop-prediction-ids"
_HEADER_LINE = 4000  # bytes of ids per header line: under every common client's line limit (aiohttp: 8190)


def ids_headers(ids: list[str]) -> list[tuple[bytes, bytes]]:
    """The prediction ids of an answer as `X-Everloop-Prediction-Ids` header lines, comma-separated, in
    row order. A long list is split over several lines of the same name, which HTTP clients join with
    ", " (RFC 9110, section 5.3), so that no line passes a client's line limit."""
    text = ",".join(ids).encode()
    if len(text) <= _HEADER_LINE:
        return [(IDS_HEADER, text)]
    lines, start = [], 0
    while start < len(text):
        last = start + _HEADER_LINE >= len(text)
        end = len(text) if last else text.rfind(b",", start, start + _HEADER_LINE + 1)
        lines.append((IDS_HEADER, text[start:end]))
        start = end + 1
    return lines


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
    repeated = _repeated_names([item["name"] for item in inputs])
    if repeated:
        raise ClientError(422, [_ambiguous(["inputs", p[-1], "name"], f"input {name!r}", p, "inputs")
                                for name, p in repeated.items()])
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
    """The values of nested lists, in order; without recursion (a body may nest 1024 levels)."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()
    return out


def v2_answer(model_name: str, version: int | None, request_id: str | None, labels: list[Any],
              proba: list[list[float]] | None, ids: list[str]) -> dict[str, Any]:
    """An inference response: the outputs `predict` ([rows, 1] labels), `predict_proba` ([rows, classes],
    classifiers only) and `prediction_id` ([rows, 1] BYTES: the ids /feedback takes labels for)."""
    label_type = "INT64" if all(isinstance(v, int) and not isinstance(v, bool) for v in labels) else (
        "FP64" if all(isinstance(v, float) for v in labels) else "BYTES")
    outputs = [{"name": "predict", "shape": [len(labels), 1], "datatype": label_type, "data": labels}]
    if proba is not None:
        outputs.append({"name": "predict_proba", "shape": [len(proba), len(proba[0]) if proba else 0],
                        "datatype": "FP64", "data": [p for row in proba for p in row]})
    outputs.append({"name": "prediction_id", "shape": [len(ids), 1], "datatype": "BYTES", "data": ids})
    answer = {"model_name": model_name, "model_version": str(version), "outputs": outputs}
    if request_id is not None:
        answer["id"] = request_id
    return answer


def strict_option(query: bytes, default: bool) -> bool:
    """Whether a request asks for strict checks: `?strict=true` (or 1, yes) turns them on for it; the
    project's `serving.strict` (`default`) cannot be turned off by a request. Errors: ClientError 422
    for a value that is not a boolean."""
    if not query or b"strict" not in query:
        return default
    from urllib.parse import parse_qs

    values = parse_qs(query.decode("latin-1"), keep_blank_values=True).get("strict")
    if not values:
        return default
    chosen = {_TRUTHS.get(v.strip().lower()) for v in values}
    if None in chosen or len(chosen) > 1:
        raise ClientError(422, [{"loc": ["query", "strict"], "input": values if len(values) > 1 else values[0],
                                 "msg": "expected true or false (also 1/0, yes/no; a bare ?strict is true)"}])
    return default or chosen.pop()


def v2_strict(body: dict[str, Any]) -> bool:
    """An inference request's `parameters.strict` (the protocol's place for per-request options, whose
    values may be strings, numbers or booleans): the spellings `?strict=` takes, as a JSON boolean, a
    string (`"true"`, `"no"`, any case) or 1/0. False when absent. Errors: ClientError 422 naming
    `parameters.strict` for anything else."""
    parameters = body.get("parameters")
    if not isinstance(parameters, dict) or "strict" not in parameters:
        return False
    value = parameters["strict"]
    if type(value) is bool:
        return value
    chosen = None
    if isinstance(value, str) and value.strip():  # "" is no spelling here: a bare ?strict is query syntax
        chosen = _TRUTHS.get(value.strip().lower())
    elif type(value) is int:
        chosen = {0: False, 1: True}.get(value)
    if chosen is None:  # a list or object nested deep is quoted shortened: the answer must stay writable
        deep = (type(value) is list or type(value) is dict) and _nests_past(value, MAX_VALUE_DEPTH)
        shown = reprlib.repr(value) if deep else value
        raise ClientError(422, [{"loc": ["parameters", "strict"], "input": shown,
                                 "msg": "expected true or false (also 1/0, yes/no)"}])
    return chosen


_TRUTHS = {"true": True, "1": True, "yes": True, "": True, "false": False, "0": False, "no": False}


V2_TYPES = {"numeric": "FP64", "categorical": "BYTES", "datetime": "BYTES"}
