"""A table of malformed inputs across HTTP bodies and headers (a real uvicorn server), data files, project
files and command-line arguments: each gets its expected HTTP status or exit code and a message naming
the problem; none answers 5xx or shows a traceback. One parametrized test over the table."""

from __future__ import annotations

import json
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from everloop.demo import make_churn
from everloop.serve import ServerProcess
from tests.conftest import feature_rows, write_project
from tests.reliability.conftest import no_traceback, record, small_project

pytestmark = pytest.mark.e2e

ROW = feature_rows(make_churn(1, seed=1))[0]
TOKEN = "reliability-token"
DEEP = "[" * 2000 + "]" * 2000
TOO_DEEP = "nests objects or lists too deeply"
NOT_JSON = "the body is not valid JSON"


def _body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _with_number(text: str) -> bytes:
    """One row by name whose monthly_charges is the JSON number `text` (written as is)."""
    return json.dumps({"features": ROW | {"monthly_charges": "@"}}).replace('"@"', text).encode()


@dataclass(frozen=True)
class Http:
    method: str
    path: str
    body: bytes
    status: int
    fragment: str
    headers: tuple[tuple[str, str | bytes], ...] = ()


@dataclass(frozen=True)
class Raw:
    """Bytes written to the server's socket as they are: what no HTTP client library would send."""

    request: bytes
    status: int
    fragment: str


@dataclass(frozen=True)
class Cli:
    """`everloop ARGS`; `{files}` is the folder of bad files, `{project}` the trained project; `project`
    names a broken project file (under files/) to run in instead."""

    args: tuple[str, ...]
    code: int
    fragment: str
    project: str | None = None


AUTH = (("authorization", f"Bearer {TOKEN}"),)
V2 = "/v2/models/churn/infer"
CASES: dict[str, Http | Raw | Cli] = {
    # HTTP bodies
    "predict: broken JSON": Http("POST", "/predict", b'{"instances": [', 400, NOT_JSON),
    "predict: empty body": Http("POST", "/predict", b"", 400, NOT_JSON),
    "predict: lists nested 2000 deep": Http("POST", "/predict", DEEP.encode(), 400, TOO_DEEP),
    "predict: objects nested 2000 deep in a row": Http(
        "POST", "/predict", ('{"features": ' + '{"a":' * 2000 + "1" + "}" * 2001).encode(), 400, TOO_DEEP),
    "predict: instances is a string": Http("POST", "/predict", _body({"instances": "abc"}), 422,
                                           "expected a non-empty list of rows"),
    "predict: no rows": Http("POST", "/predict", _body({"instances": []}), 422, "expected at least one row"),
    "predict: text in a numeric feature": Http("POST", "/predict", _body({"features": ROW | {"age": "old"}}), 422,
                                               "values are not numbers"),
    "predict: number past float range": Http("POST", "/predict", _with_number("1e999"), 422, "values are infinite"),
    "predict: integer of 5000 digits": Http("POST", "/predict", _with_number("9" * 5000), 400,
                                            "Exceeds the limit (4300 digits)"),
    "predict: NaN literal is a missing value": Http("POST", "/predict", _with_number("NaN"), 200,
                                                    "missing value in a column that had none in training"),
    "predict: lone surrogate in a category": Http(
        "POST", "/predict", _body({"features": ROW | {"plan": "\ud800"}}), 422, "lone surrogate"),
    "predict: unknown top-level key": Http("POST", "/predict", _body({"rows": [ROW]}), 422,
                                           'or {\\"instances\\": [{...}, ...]}'),
    "predict: a feature missing": Http("POST", "/predict", _body({"features": {k: v for k, v in ROW.items()
                                                                             if k != "age"}}),
                                       422, "field required"),
    "predict: row list too short": Http("POST", "/predict", _body({"features": [1, 2]}), 422,
                                        "a row as a list needs 15 values in schema order"),
    "predict: a form instead of JSON": Http("POST", "/predict", b"a=1&b=2", 400, NOT_JSON,
                                            (("content-type", "application/x-www-form-urlencoded"),)),
    "predict: GET": Http("GET", "/predict", b"", 405, "Method Not Allowed"),
    "invocations: no known format": Http("POST", "/invocations", _body({"foo": 1}), 422,
                                         "expected exactly one of dataframe_split"),
    "invocations: split rows longer than columns": Http(
        "POST", "/invocations", _body({"dataframe_split": {"columns": ["age"], "data": [[1, 2]]}}), 422,
        "expected a list of 1 values"),
    "invocations: CSV without the columns": Http("POST", "/invocations", b"age,plan\n1,a\n", 422,
                                                 "the header has no column 'tenure_months'",
                                                 (("content-type", "text/csv"),)),
    "invocations: nested 2000 deep": Http("POST", "/invocations", DEEP.encode(), 400, TOO_DEEP),
    "v2 infer: no inputs": Http("POST", V2, _body({"outputs": []}), 422, "expected a non-empty list of inputs"),
    "v2 infer: unknown model": Http("POST", "/v2/models/nope/infer", _body({"inputs": []}), 404,
                                    "no model named 'nope'"),
    "v2 infer: data does not fill its shape": Http(
        "POST", V2, _body({"inputs": [{"name": "age", "shape": [2, 1], "datatype": "FP64", "data": [1]}]}), 422,
        "1 values do not fill shape [2, 1]"),
    "v2 infer: nested 2000 deep": Http("POST", V2, DEEP.encode(), 400, TOO_DEEP),
    "feedback: unknown prediction id": Http("POST", "/feedback", _body({"labels": [{"id": "nope", "label": 1}]}),
                                            404, '"unknown_ids":["nope"]'),
    "feedback: labels not a list": Http("POST", "/feedback", _body({"labels": "x"}), 422,
                                        "expected a non-empty list of {id, label}"),
    "feedback: label not a class": Http("POST", "/feedback", b'{"labels": [{"id": "{PID}", "label": "maybe"}]}',
                                        422, "label 'maybe': expected one of the classes [0, 1]"),
    "feedback: one id twice in a request (the last label wins)": Http(
        "POST", "/feedback", b'{"labels": [{"id": "{PID}", "label": 0}, {"id": "{PID}", "label": 1}]}', 200,
        '{"accepted":1,"unknown_ids":[]}'),
    "feedback: broken JSON": Http("POST", "/feedback", b"{", 400, NOT_JSON),
    "feedback: nested 2000 deep": Http("POST", "/feedback", DEEP.encode(), 400, TOO_DEEP),
    # headers
    "admin reload: no Authorization": Http("POST", "/admin/reload", b"", 401, "a valid admin bearer token"),
    "admin reload: wrong token": Http("POST", "/admin/reload", b"", 401, "a valid admin bearer token",
                                      (("authorization", "Bearer wrong"),)),
    "admin reload: Basic auth": Http("POST", "/admin/reload", b"", 401, "a valid admin bearer token",
                                     (("authorization", "Basic Zm9vOmJhcg=="),)),
    "admin reload: non-ASCII token": Http("POST", "/admin/reload", b"", 401, "a valid admin bearer token",
                                          (("authorization", "Bearer \xe9t\xe9".encode("latin-1")),)),
    "admin reload: broken JSON body": Http("POST", "/admin/reload", b"{nope", 400, NOT_JSON, AUTH),
    "admin reload: nested 2000 deep": Http("POST", "/admin/reload", DEEP.encode(), 400, TOO_DEEP, AUTH),
    "header: body over 64 MiB declared": Raw(
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n"
        b"Connection: close\r\n\r\n{", 413, "the limit is 67108864"),
    "header: Content-Length not a number": Raw(
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\nConnection: close\r\n\r\n{}", 400,
        "Invalid HTTP request"),
    "header: 100 KB header": Raw(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 +
                                 b"\r\nConnection: close\r\n\r\n", 400, "Invalid HTTP request"),
    "header: broken chunked encoding": Raw(
        b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n", 400,
        "Invalid HTTP request"),
    # data files
    "ingest: UTF-16 file": Cli(("ingest", "{files}/utf16.csv"), 2, "not UTF-8 text"),
    "ingest: binary junk": Cli(("ingest", "{files}/binary.csv"), 2, "not UTF-8 text"),
    "ingest: ragged rows": Cli(("ingest", "{files}/ragged.csv"), 2, "Expected 18 columns (as in the header), got 20"),
    "ingest: empty file": Cli(("ingest", "{files}/empty.csv"), 2, "the file is empty"),
    "ingest: header only": Cli(("ingest", "{files}/header_only.csv"), 2, "the file has a header but no data rows"),
    "ingest: wrong columns": Cli(("ingest", "{files}/wrong_columns.csv"), 1,
                                 "column 'age': required numeric column is missing"),
    "ingest: target column missing": Cli(("ingest", "{files}/no_target.csv"), 1,
                                         "column 'churned': required categorical column is missing"),
    "ingest: text in a numeric column": Cli(("ingest", "{files}/bad_age.csv"), 1,
                                            "column 'age': 20 values are not numbers"),
    "ingest: Parquet junk": Cli(("ingest", "{files}/junk.parquet"), 2, "not a readable parquet file"),
    "ingest: no such file": Cli(("ingest", "{files}/missing.csv"), 2, "missing.csv: no such file"),
    # project files
    "project: YAML syntax error": Cli(("validate",), 2, "not valid YAML at line 3", "syntax"),
    "project: unknown key": Cli(("validate",), 2, "modle: unknown field 'modle'", "unknown_key"),
    "project: wrong type": Cli(("validate",), 2, "model.seed: Input should be a valid integer", "wrong_type"),
    "project: required field missing": Cli(("validate",), 2, "data.target: required field is missing", "no_target"),
    "project: unknown metric": Cli(("validate",), 2, "evaluation.metric: Input should be 'roc_auc'", "bad_metric"),
    "project: holdout out of range": Cli(("validate",), 2, "evaluation.split.holdout: Input should be less than 1",
                                         "bad_holdout"),
    "project: empty file": Cli(("validate",), 2, "expected a mapping of settings at the top", "empty"),
    "project: bad SQL source": Cli(("ingest",), 2, 'near "SELEC": syntax error', "bad_sql"),
    # command-line arguments
    "cli: unknown model version": Cli(("promote", "99"), 2, "model version 99 does not exist"),
    "cli: version not a number": Cli(("promote", "abc"), 2, "Invalid value for 'version'"),
    "cli: unknown dataset version": Cli(("train", "--dataset", "99"), 2, "dataset version 99 does not exist"),
    "cli: loop interval below 1": Cli(("loop", "--interval", "0"), 2, "Input should be greater than or equal to 1"),
    "cli: port not a number": Cli(("serve", "--port", "abc"), 2, "Invalid value for '--port'"),
    "cli: negative grace": Cli(("doctor", "--grace", "-1"), 2, "Input should be greater than or equal to 0"),
    "cli: feedback file missing": Cli(("feedback", "{files}/nofile.csv"), 2, "nofile.csv: no such file"),
    "cli: feedback file without id and label": Cli(("feedback", "{files}/wrong_columns.csv"), 2,
                                                   "missing column(s) ['id', 'label']"),
    "cli: reproduce an unknown version": Cli(("reproduce", "99"), 2, "model version 99 does not exist"),
    "cli: rollback with no earlier version": Cli(("rollback",), 2, "production has no earlier version"),
}


def _broken_projects(files: Path) -> None:
    """Projects under `files/` whose everloop.yaml is broken one way each."""
    edits = {"unknown_key": lambda s: s.update(modle={}),
             "wrong_type": lambda s: s["model"].update(seed="abc"),
             "no_target": lambda s: s["data"].pop("target"),
             "bad_metric": lambda s: s["evaluation"].update(metric="accuracy_of_vibes"),
             "bad_holdout": lambda s: s["evaluation"]["split"].update(holdout=1.5),
             "bad_sql": lambda s: s["data"].update(source={"url": f"sqlite:///{files}/none.db",
                                                           "query": "SELEC * FROM t"})}
    for name, edit in edits.items():
        folder = write_project(files / name, rows=50)
        spec = yaml.safe_load((folder / "everloop.yaml").read_text())
        edit(spec)
        (folder / "everloop.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (write_project(files / "syntax", rows=50) / "everloop.yaml").write_text("name: x\ndata: [unclosed\n")
    (write_project(files / "empty", rows=50) / "everloop.yaml").write_text("")


def _bad_files(files: Path, good_csv: Path) -> None:
    header, *lines = good_csv.read_text().splitlines()
    columns = header.split(",")
    target, age = columns.index("churned"), columns.index("age")
    (files / "utf16.csv").write_bytes(good_csv.read_text().encode("utf-16"))
    (files / "binary.csv").write_bytes(bytes(range(256)) * 20)
    (files / "ragged.csv").write_text(f"{header}\n{lines[0]},extra,more\n{lines[1]}\n")
    (files / "empty.csv").write_text("")
    (files / "header_only.csv").write_text(header + "\n")
    (files / "wrong_columns.csv").write_text("a,b,c\n1,2,3\n")
    (files / "no_target.csv").write_text("".join(",".join(v for i, v in enumerate(line.split(",")) if i != target)
                                                 + "\n" for line in [header, *lines[:50]]))
    bad_age = [",".join("old" if i == age else v for i, v in enumerate(line.split(","))) for line in lines[:20]]
    (files / "bad_age.csv").write_text("\n".join([header, *bad_age]) + "\n")
    (files / "junk.parquet").write_bytes(b"PAR1" + b"\x00\xff" * 100)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """The trained project, the folder of bad files and broken projects, and a real server (admin token
    set) with one prediction id: (project, files, server, prediction id)."""
    root = tmp_path_factory.mktemp("malformed")
    project, store = small_project(root / "p", rows=400)
    files = root / "files"
    files.mkdir()
    _bad_files(files, project / "data" / "customers.csv")
    _broken_projects(files)
    with ServerProcess(project, env={"EVERLOOP_ADMIN_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}) as server:
        answer = httpx.post(server.url + "/predict", json={"features": ROW}, timeout=30).json()
        yield project, files, server, answer["predictions"][0]["id"]
    store.close()
    shutil.rmtree(root, ignore_errors=True)


def _raw(port: int, request: bytes) -> tuple[int, str]:
    """Write `request` to the server and read its answer: (status, the whole answer as text)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    text = answer.decode("latin-1")
    return int(text.split(" ", 2)[1]), text


def _plain(text: str) -> str:
    """Output with rich's box drawing and line wrapping taken out."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", text)


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input(name: str, world, everloop):
    project, files, server, prediction_id = world
    case = CASES[name]
    if isinstance(case, Http):
        headers = {"content-type": "application/json"} | dict(case.headers)
        response = httpx.request(case.method, server.url + case.path, headers=headers, timeout=60,
                                 content=case.body.replace(b"{PID}", prediction_id.encode()))
        got, text, want = response.status_code, response.text, (case.status, case.fragment)
    elif isinstance(case, Raw):
        got, text = _raw(server.port, case.request)
        want = (case.status, case.fragment)
    else:
        where = files / case.project if case.project else project
        args = [a.format(files=files) for a in case.args]
        run = everloop(*args, "-p", str(where), cwd=where)
        got, text, want = run.code, _plain(run.out + run.err), (case.code, case.fragment)
    fragment = want[1].replace("{PID}", prediction_id)
    record(malformed_inputs=1, malformed_5xx=int(isinstance(case, (Http, Raw)) and got >= 500),
           malformed_tracebacks=int(not no_traceback(text)))
    assert got == want[0], text[-1500:]
    assert fragment in text, text[-1500:]
    assert no_traceback(text), text[-3000:]


def test_the_table_is_large_enough():
    kinds = [type(c).__name__ for c in CASES.values()]
    assert len(CASES) >= 40 and {"Http", "Raw", "Cli"} == set(kinds)
