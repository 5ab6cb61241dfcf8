"""The loop retraining from newly ingested labelled datasets (`retraining.data.from: datasets`)."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from everloop import data, registry, train
from everloop.demo import make_churn
from everloop.errors import SpecError
from everloop.loop import audit_trail, run_once
from everloop.loop._controller import _labelled, new_datasets
from everloop.spec import load_spec, parse_spec
from everloop.store import Store
from tests.conftest import send_traffic, write_project


def _project(folder, **retraining):
    """A project reading new data from datasets, one dataset ingested, model v1 in production."""
    write_project(folder, retraining={"triggers": ["drift", "performance"], "cooldown_minutes": 0,
                                      "data": {"from": "datasets"}} | retraining)
    spec, store = load_spec(folder), Store.for_project(folder)
    data.ingest(store, spec, base=folder)
    registry.promote(store, spec, train.train(store, spec).version)
    return spec, store


def _flipped(rows: int, seed: int, id_offset: int) -> pd.DataFrame:
    """Churn rows whose label now follows tenure the other way round: long-standing customers leave."""
    frame = make_churn(rows, seed=seed, id_offset=id_offset, start=pd.Timestamp("2025-06-01", tz="UTC"))
    frame["churned"] = (frame["tenure_months"] > 24).astype(int)
    return frame


def test_the_loop_retrains_from_a_newly_ingested_labelled_dataset(tmp_path, everloop):
    folder = tmp_path / "p"
    spec, store = _project(folder)
    idle = everloop("loop", "--once", "--project", str(folder))
    assert idle.code == 0 and "loop: idle: no trigger fired" in idle.out
    assert "no dataset ingested after dataset v1" in idle.out

    batch = _flipped(1000, seed=7, id_offset=100_000)
    batch.to_csv(folder / "data" / "labels-june.csv", index=False)
    assert everloop("ingest", str(folder / "data" / "labels-june.csv"), "--project", str(folder)).code == 0
    production = registry.load_model(store, registry.PRODUCTION)
    stored = data.load_frame(store, data.get_dataset(store, 2))
    expected = roc_auc_score(stored["churned"], production.pipeline.predict_proba(
        stored[production.manifest["features"]])[:, 1])

    run = everloop("loop", "--once", "--json", "--project", str(folder))
    decision = json.loads(run.out)
    assert run.code == 0 and decision["action"] == "promoted", decision["reason"]
    assert decision["triggers"] == ["performance"]  # no traffic was logged: drift has nothing to judge
    new = decision["datasets"]
    assert new["after"] == 1 and new["versions"] == [2] and new["labelled_rows"] == 1000
    assert new["datasets"][0]["rows"] == 1000 and new["datasets"][0]["skipped"] == 0
    perf = new["performance"]
    assert perf["metric"] == "roc_auc" and perf["labelled_rows"] == 1000 and perf["decayed"]
    assert perf["value"] == pytest.approx(expected, abs=1e-9) and expected < 0.5
    assert new["trained_on"] == {"dataset": 3, "rows": 3000, "new_rows": 1000}
    assert "dataset v2 ingested after dataset v1: 1000 labelled rows" in decision["reason"]
    assert "1000 labelled rows of dataset v2 + dataset v1" in decision["reason"]

    # the new model learned dataset 2's rows on top of the reference, and replaced production
    assert registry.alias_version(store, registry.PRODUCTION) == decision["model_version"] == 2
    model = registry.get_model(store, 2)
    assert model.dataset_version == 3 and model.manifest["recent_from_row"] == 2000
    assert model.manifest["retrained_from"] == {"from": "datasets", "datasets": [2], "after": 1, "rows": 1000}
    trained_on = data.load_frame(store, data.get_dataset(store, 3))
    first = data.load_frame(store, data.get_dataset(store, 1))
    assert trained_on["customer_id"].tolist() == first["customer_id"].tolist() + stored["customer_id"].tolist()
    assert trained_on["churned"].astype(int).tolist()[2000:] == batch["churned"].tolist()
    comparison = decision["gate"]["evidence"]["comparison"]
    assert comparison["candidate"] > 0.8 > 0.5 > comparison["production"]

    row = audit_trail(store)[-1]
    assert row["action"] == "promoted" and row["evidence"]["datasets"]["versions"] == [2]
    assert row["evidence"]["datasets"]["performance"]["value"] == pytest.approx(expected, abs=1e-9)

    # dataset 2 is now in production's data, and the loop's own dataset 3 is never new data
    again = everloop("loop", "--once", "--project", str(folder))
    assert again.code == 0 and "loop: idle" in again.out and "no dataset ingested after dataset v2" in again.out
    store.close()


def test_new_labels_counts_the_labelled_rows_of_new_datasets_not_feedback(tmp_path):
    from fastapi.testclient import TestClient

    from everloop.serve import create_app

    folder = tmp_path / "p"
    spec, store = _project(folder, triggers=["new_labels"], min_new_labels=500)
    with TestClient(create_app(folder, spec=spec, store=store, watch=False)) as client:
        send_traffic(client, make_churn(600, seed=31))  # 600 labels through /feedback: not this project's data
    decision = run_once(store, spec)
    assert decision.action == "idle" and decision.datasets["versions"] == []
    data.ingest_frame(store, spec, make_churn(300, seed=32, id_offset=200_000), source="june.csv")
    decision = run_once(store, spec)
    assert decision.action == "idle" and decision.datasets["labelled_rows"] == 300
    data.ingest_frame(store, spec, make_churn(300, seed=33, id_offset=300_000), source="july.csv")
    decision = run_once(store, spec)
    assert decision.action in ("promoted", "kept_candidate") and decision.triggers == ["new_labels"]
    assert decision.datasets["versions"] == [2, 3] and decision.datasets["labelled_rows"] == 600
    assert decision.datasets["trained_on"]["new_rows"] == 600
    model = registry.get_model(store, decision.model_version)
    assert model.manifest["retrained_from"]["datasets"] == [2, 3]
    assert data.get_dataset(store, model.dataset_version).rows == 2000 + 600
    # the retraining took those labels: no new ones since, whatever production now is
    assert run_once(store, spec).action == "idle"
    store.close()


def test_rows_without_a_readable_label_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "p"
    spec, store = _project(folder)
    batch = make_churn(300, seed=7, id_offset=100_000).astype({"churned": object})
    batch.loc[:9, "churned"] = None  # empty labels: set aside by ingest (--mode quarantine)
    batch.loc[10:14, "churned"] = 2  # a class model v1 never had: stored, but not a label it can be judged on
    batch.to_csv(folder / "data" / "june.csv", index=False)
    data.ingest(store, spec, folder / "data" / "june.csv", base=folder, mode="quarantine")
    new = new_datasets(store, spec)
    (entry,) = new.datasets
    assert (entry["rows"], entry["labelled"], entry["skipped"]) == (290, 285, 5)
    assert (entry["unreadable_labels"], entry["empty_labels"], entry["quarantined"]) == (5, 0, 10)
    assert len(new.frame) == 285 and set(new.frame["churned"]) == {0, 1}
    assert new.frame["customer_id"].tolist() == batch["customer_id"].tolist()[15:]
    assert new.performance["labelled_rows"] == 285
    assert "285 labelled rows (5 rows without a label the model can read, skipped) (10 rows set aside" \
        in new.describe()
    store.close()


def test_labelled_rows_of_a_frame():
    manifest = {"task": "classification", "classes": [0, 1]}
    spec = parse_spec({"name": "t", "data": {"source": "x.csv", "target": "y"}})
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "y": [1, np.nan, 0, 7]})
    rows, skipped = _labelled(frame, spec, manifest)
    assert rows["x"].tolist() == [1.0, 3.0] and rows["y"].tolist() == [1, 0]
    assert skipped == {"empty_labels": 1, "unreadable_labels": 1}
    rows, skipped = _labelled(frame.drop(columns="y"), spec, manifest)
    assert rows.empty and skipped == {"no_target_column": 4}


def test_from_feedback_reads_no_datasets(client):
    """The default: a newly ingested dataset is not the loop's data, and decisions say nothing of datasets."""
    store, spec = client.store, client.spec
    assert spec.retraining.data.from_ == "feedback"
    data.ingest_frame(store, spec, _flipped(1000, seed=7, id_offset=100_000), source="june.csv")
    decision = run_once(store, spec)
    assert decision.action == "idle" and decision.reason == "no trigger fired (status: no data)"
    assert "datasets" not in decision.to_dict() and "datasets" not in audit_trail(store)[-1]["evidence"]
    send_traffic(client, make_churn(1000, shifted=True, seed=12))
    decision = run_once(store, spec)
    assert decision.action == "promoted" and "datasets" not in decision.to_dict()
    assert "retrained_from" not in registry.get_model(store, decision.model_version).manifest


def test_from_takes_feedback_or_datasets():
    base = {"name": "t", "data": {"source": "x.csv", "target": "y"}}
    assert parse_spec(base).retraining.data.from_ == "feedback"
    spec = parse_spec(base | {"retraining": {"data": {"from": "datasets"}}})
    assert spec.retraining.data.from_ == "datasets"
    assert spec.model_dump()["retraining"]["data"]["from"] == "datasets"  # written as in the project file
    assert parse_spec(spec.model_dump()) == spec
    with pytest.raises(SpecError) as refused:
        parse_spec(base | {"retraining": {"data": {"from": "labels"}}})
    assert "retraining.data.from: Input should be 'feedback' or 'datasets' (got 'labels')" in str(refused.value)
