"""Labels (feedback): one validation and one upsert for HTTP and CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from everloop import data, registry, train
from everloop.cli import app as cli
from everloop.demo import make_churn
from everloop.serve import create_app, record_feedback
from everloop.spec import load_spec
from everloop.store import Store
from everloop.train import label_parser, parse_label
from tests.conftest import served_project, write_project

# -- parse_label ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, "1", 1.0, "1.0", " 1 ", "+1", "1e0"])
def test_integer_classes_take_every_spelling_of_the_number(value):
    assert type(parse_label("classification", [0, 1], value)) is int
    assert parse_label("classification", [0, 1], value) == 1


@pytest.mark.parametrize(("value", "why"), [
    (7, "unknown class"), ("2", "unknown class"), (1.5, "unknown class"), ("", "empty"), ("  ", "empty"),
    (None, "missing"), ("expensive", "expected one of the classes [0, 1]"), (math.nan, "not a number"),
    (True, "only when the classes are bools"), ([1], "a list is not a label"), ({"a": 1}, "a dict"),
    ("1_0", "expected one of"), pytest.param(10 ** 5000, "unknown class", id="int-of-5000-digits"),
    pytest.param([10 ** 5000], "a list is not a label", id="list-of-a-long-int"),
])
def test_integer_classes_refuse_what_is_no_class(value, why):
    with pytest.raises(ValueError) as caught:
        parse_label("classification", [0, 1], value)
    assert why in str(caught.value) and "expected one of the classes [0, 1]" in str(caught.value)


def test_bool_and_string_classes():
    assert parse_label("classification", [False, True], True) is True
    assert parse_label("classification", [False, True], " FALSE ") is False
    with pytest.raises(ValueError, match="unknown class"):
        parse_label("classification", [False, True], 1)  # 1 is not True here: True == 1 in Python
    assert parse_label("classification", ["no", "yes"], " yes ") == "yes"
    for value in ("Yes", "true", 1, True, ""):
        with pytest.raises(ValueError, match=r"expected one of the classes \['no', 'yes'\]"):
            parse_label("classification", ["no", "yes"], value)
    assert parse_label("classification", ["1", "a"], 1) == "1"  # mixed string classes: 1 spells "1"
    with pytest.raises(ValueError, match="without classes"):
        label_parser("classification", None)


@pytest.mark.parametrize(("value", "expected"), [(3, 3.0), ("12.5", 12.5), (" -4 ", -4.0), (2.25, 2.25)])
def test_regression_takes_finite_numbers(value, expected):
    parsed = parse_label("regression", None, value)
    assert type(parsed) is float and parsed == expected


@pytest.mark.parametrize("value", ["expensive", "", True, math.nan, math.inf, "nan", "-inf", "1e400", None,
                                   [1.0], 10 ** 400])
def test_regression_refuses_everything_else(value):
    with pytest.raises(ValueError, match="finite number"):
        parse_label("regression", None, value)


def test_label_parser_checks_100k_labels_in_well_under_a_second():
    parse = label_parser("classification", [0, 1])
    values = [0, 1, "1", 1.0, "0.0"] * 20_000
    started = time.perf_counter()
    parsed = [parse(v) for v in values]
    assert time.perf_counter() - started < 1.0  # ~0.05 s measured: the monitor checks every stored label
    assert parsed[:5] == [0, 1, 1, 1, 0]


# -- helpers --------------------------------------------------------------------------------------


def _predict(client, rows: int = 4, seed: int = 11, drop: tuple[str, ...] = ("churned",)) -> list[str]:
    """Ids of `rows` fresh predictions, written to the prediction log."""
    frame = make_churn(rows, seed=seed)
    body = json.loads(frame.drop(columns=["customer_id", "event_time", *drop]).to_json(orient="records"))
    answer = client.post("/predict", json={"instances": body})
    assert answer.status_code == 200, answer.text
    client.app.state.log.flush()
    return [p["id"] for p in answer.json()["predictions"]]


def _stored(store: Store) -> dict[str, object]:
    with store.engine.connect() as conn:
        return dict(conn.execute(store.tables.feedback.select().with_only_columns(
            store.tables.feedback.c.prediction_id, store.tables.feedback.c.label)).all())


def _feedback_file(folder: Path, rows: list[tuple[str, str]]) -> Path:
    path = folder / "labels.csv"
    path.write_text("id,label\n" + "".join(f"{i},{y}\n" for i, y in rows))
    return path


def _run_cli(path: Path, folder: Path, *extra: str):
    return CliRunner().invoke(cli, ["feedback", str(path), "--project", str(folder), *extra])


@pytest.fixture
def regression(tmp_path):
    """A tiny served regression project (target total_charges, a linear model): (client, store)."""
    folder = write_project(tmp_path / "reg", rows=300,
                           data={"source": "data/customers.csv", "target": "total_charges",
                                 "id": "customer_id", "timestamp": "event_time"},
                           model={"estimator": "sklearn.linear_model.Ridge", "params": {}, "seed": 1},
                           evaluation={"split": {"holdout": 0.2}, "metric": "rmse"}, promotion={})
    spec, store = load_spec(folder), Store.for_project(folder)
    data.ingest(store, spec, base=folder)
    registry.promote(store, spec, train.train(store, spec).version)
    with TestClient(create_app(folder, watch=False)) as client:
        client.folder = folder
        yield client, store
    store.close()


# -- HTTP -----------------------------------------------------------------------------------------


def test_http_repeated_ids_last_wins_and_a_later_call_replaces(client):
    a, b, c, d = _predict(client)
    same = client.post("/feedback", json={"labels": [{"id": a, "label": 0}, {"id": b, "label": "1"},
                                                     {"id": a, "label": 1}]})
    assert same.status_code == 200 and same.json() == {"accepted": 2, "unknown_ids": []}
    assert _stored(client.store) == {a: 1, b: 1}  # canonical: "1" is stored as the class 1
    later = client.post("/feedback", json={"id": b, "label": 0.0})
    assert later.status_code == 200 and later.json() == {"accepted": 1, "unknown_ids": []}
    assert _stored(client.store) == {a: 1, b: 0}
    mixed = client.post("/feedback", json={"labels": [{"id": c, "label": 1}, {"id": "0123", "label": 1}]})
    assert mixed.status_code == 200 and mixed.json() == {"accepted": 1, "unknown_ids": ["0123"]}
    twice_unknown = [{"id": "nope", "label": 1}, {"id": "nope", "label": 0}]
    unknown = client.post("/feedback", json={"labels": twice_unknown})
    assert unknown.status_code == 404 and unknown.json() == {"accepted": 0, "unknown_ids": ["nope"]}
    assert _stored(client.store) == {a: 1, b: 0, c: 1} and d not in _stored(client.store)


def test_http_bad_labels_answer_422_naming_each_item_and_store_none(client):
    a, b, c, d = _predict(client)
    bad = client.post("/feedback", json={"labels": [
        {"id": a, "label": 1}, {"id": b, "label": 7}, {"id": c, "label": ""}, {"id": d, "label": None},
        {"id": a, "label": "expensive"}, "not an object", {"id": 5, "label": 1}, {"id": b}]})
    assert bad.status_code == 422
    detail = bad.json()["detail"]
    assert [p["loc"] for p in detail] == [["labels", 1, "label"], ["labels", 2, "label"],
                                          ["labels", 3, "label"], ["labels", 4, "label"], ["labels", 5],
                                          ["labels", 6, "id"], ["labels", 7, "label"]]
    assert detail[0]["msg"] == "label 7: unknown class; expected one of the classes [0, 1]"
    assert "'expensive'" in detail[3]["msg"] and "string 'id'" in detail[4]["msg"]
    assert _stored(client.store) == {}  # one bad item: nothing of the request is kept
    single = client.post("/feedback", json={"id": a, "label": [1]})
    assert single.status_code == 422 and single.json()["detail"][0]["loc"] == ["label"]
    for body in ({"labels": []}, {"labels": "x"}):
        assert client.post("/feedback", json=body).status_code == 422
    # NaN sends the body to the standard parser, which lets a lone surrogate through: refused at the door
    odd = client.post("/feedback", content=b'{"labels": [{"id": "\\ud800", "label": NaN}]}',
                      headers={"content-type": "application/json"})
    assert odd.status_code == 422 and odd.json()["detail"][0]["loc"] == ["labels", 0, "id"]
    assert "lone surrogate" in odd.json()["detail"][0]["msg"]
    assert _stored(client.store) == {}


def test_http_regression_labels_are_finite_numbers(regression):
    client, store = regression
    a, b, c = _predict(client, rows=3, drop=("total_charges",))
    bad = client.post("/feedback", json={"labels": [{"id": a, "label": "expensive"}, {"id": b, "label": ""},
                                                    {"id": c, "label": 12.5}]})
    assert bad.status_code == 422
    assert [p["loc"] for p in bad.json()["detail"]] == [["labels", 0, "label"], ["labels", 1, "label"]]
    assert "expected a finite number" in bad.json()["detail"][0]["msg"] and _stored(store) == {}
    good = client.post("/feedback", json={"labels": [{"id": a, "label": "99.5"}, {"id": c, "label": 12.5}]})
    assert good.status_code == 200 and good.json()["accepted"] == 2
    assert _stored(store) == {a: 99.5, c: 12.5}


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_repeated_id_later_row_wins_and_exits_0(client):
    folder = _folder_of(client)
    a, b, *_ = _predict(client)
    path = _feedback_file(folder, [(a, "0"), (b, "1.0"), (a, "1")])
    result = _run_cli(path, folder)
    assert result.exit_code == 0, result.output
    assert "2 labels recorded from 3 rows (1 replaced by a later row for the same id)" in result.output
    assert _stored(client.store) == {a: 1, b: 1}


def test_cli_stores_good_rows_names_bad_ones_and_exits_1(client):
    folder = _folder_of(client)
    a, b, c, d = _predict(client)
    path = _feedback_file(folder, [(a, "1"), (b, "7"), (c, ""), ("00042", "1"), (d, "expensive"), ("", "1"),
                                   (d, "0")])
    result = _run_cli(path, folder, "--json")
    assert result.exit_code == 1, result.output
    out = json.loads(result.output)
    assert out["accepted"] == 2 and out["unknown_ids"] == ["00042"]  # read as text: leading zeros kept
    assert [(p["where"], p["id"]) for p in out["problems"]] == [("row 2", b), ("row 3", c), ("row 5", d),
                                                                ("row 6", None)]
    assert out["problems"][0]["why"] == "label '7': unknown class; expected one of the classes [0, 1]"
    assert out["problems"][1]["why"] == "label None: missing; expected one of the classes [0, 1]"
    assert _stored(client.store) == {a: 1, d: 0}  # the good rows are kept, including d's later valid row
    text = _run_cli(path, folder)
    assert text.exit_code == 1
    assert "row 2: id " in text.output and "label '7': unknown class" in text.output
    assert "4 rows refused" in text.output and "1 ids match no logged prediction" in text.output
    assert "Traceback" not in text.output


def test_cli_lists_at_most_20_bad_rows_and_missing_columns_exit_2(client, tmp_path):
    folder = _folder_of(client)
    (a,) = _predict(client, rows=1)
    path = _feedback_file(tmp_path, [(a, str(n + 2)) for n in range(25)])
    result = _run_cli(path, folder)
    assert result.exit_code == 1
    assert "25 rows refused" in result.output and "... and 5 more" in result.output
    assert "row 20:" in result.output and "row 21:" not in result.output
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("prediction,label\nx,1\n")
    missing = _run_cli(wrong, folder)
    assert missing.exit_code != 0 and "missing column(s) ['id']" in str(missing.exception)


def test_cli_regression_refuses_text_and_empty(regression):
    client, store = regression
    a, b, c = _predict(client, rows=3, drop=("total_charges",))
    path = _feedback_file(client.folder, [(a, "expensive"), (b, ""), (c, "12.5")])
    result = _run_cli(path, client.folder, "--json")
    assert result.exit_code == 1
    out = json.loads(result.output)
    assert out["accepted"] == 1 and [p["where"] for p in out["problems"]] == ["row 1", "row 2"]
    assert _stored(store) == {c: 12.5}


def _folder_of(client) -> Path:
    return Path(client.store.root).parent  # the store lives in <project>/.everloop


# -- PostgreSQL -----------------------------------------------------------------------------------


def test_upsert_on_postgresql(pg_url, tmp_path, monkeypatch):
    folder, _, store = served_project(tmp_path / "pg", rows=600, db_url=pg_url)
    with TestClient(create_app(folder, store=store, watch=False)) as client:
        a, b, c, d = _predict(client)
        same = client.post("/feedback", json={"labels": [{"id": a, "label": 0}, {"id": a, "label": "1"},
                                                         {"id": b, "label": 0}]})
        assert same.status_code == 200 and same.json() == {"accepted": 2, "unknown_ids": []}
        assert client.post("/feedback", json={"id": b, "label": "1"}).status_code == 200
        bad = client.post("/feedback", json={"labels": [{"id": c, "label": 1}, {"id": d, "label": 7}]})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["labels", 1, "label"]
        nul = client.post("/feedback", json={"id": "a\u0000b", "label": 1})  # PostgreSQL text refuses NUL
        assert nul.status_code == 404
        assert _stored(store) == {a: 1, b: 1}
        monkeypatch.setenv("EVERLOOP_DB_URL", pg_url)  # the CLI opens the same PostgreSQL store
        path = _feedback_file(folder, [(c, "0"), (d, "expensive"), (c, "1")])
        result = _run_cli(path, folder, "--json")
        assert result.exit_code == 1 and json.loads(result.output)["accepted"] == 1
        assert _stored(store) == {a: 1, b: 1, c: 1}
        _concurrent_calls_do_not_collide(store, [a, b, c, d])
    store.close()


def test_concurrent_upserts_on_sqlite(client):
    _concurrent_calls_do_not_collide(client.store, _predict(client, rows=6))


def _concurrent_calls_do_not_collide(store: Store, ids: list[str]) -> None:
    """Threads labelling the same ids (in different orders) at once: no error, every label a class."""
    failures: list[BaseException] = []

    def label(order: list[str], value: int) -> None:
        try:
            for _ in range(5):
                result = record_feedback(store, [{"id": i, "label": value} for i in order], partial=True)
                assert result.accepted == len(order) and result.complete
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)

    threads = [threading.Thread(target=label, args=(ids, 0)),
               threading.Thread(target=label, args=(ids[::-1], 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    stored = _stored(store)
    assert set(ids) <= set(stored) and {stored[i] for i in ids} <= {0, 1}


def test_feedback_result_reports_positions_as_given(client):
    a, *_ = _predict(client, rows=1)
    result = record_feedback(client.store, [{"id": a, "label": "x", "where": "row 9"}, {"id": a, "label": 1},
                                            42], partial=False)
    assert result.accepted == 0 and _stored(client.store) == {}
    assert [(p.where, p.id, p.field) for p in result.problems] == [(2, None, None), ("row 9", a, "label")]
    assert result.to_dict()["problems"][1]["why"] == "label 'x': expected one of the classes [0, 1]"
    assert not result.complete and result.received == 3
