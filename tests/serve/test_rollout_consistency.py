"""A candidate that refuses rows production accepts, under a rollout (issue 16), at the batcher level
with real models: a shadow candidate's refusals are counted as failed calls, never dropped; a canary
request is answered or refused whole, logged only when answered, and never failed by the candidate."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from everloop import data, registry, train
from everloop.demo import make_churn
from everloop.registry import Rollout
from everloop.serve._batcher import MicroBatcher, Outcome
from everloop.serve._protocols import Rows
from everloop.serve._rollout import BUCKETS, Trial, bucket
from everloop.spec import load_spec
from everloop.store import Store
from tests.conftest import feature_rows, write_project

PRODUCTION, CANDIDATE, ROLLOUT = 1, 2, 7
REGIONS = {"north": 0, "south": 1, "east": 2, "west": 3}


def _model(folder: Path, numeric_region: bool) -> Any:
    """A model trained on 800 churn rows, loaded as a replica serves it (fast path checked); with
    `numeric_region`, trained where the region is a number (its schema refuses text there)."""
    write_project(folder, rows=800)
    if numeric_region:
        csv = folder / "data" / "customers.csv"
        frame = pd.read_csv(csv)
        frame["region"] = frame["region"].map(REGIONS)
        frame.to_csv(csv, index=False)
    spec, store = load_spec(folder), Store.for_project(folder)
    try:
        data.ingest(store, spec, base=folder)
        model = registry.load_model(store, train.train(store, spec).version)
        model.check_fast_path(registry.eval_frame(store, model.manifest).head(200))
    finally:
        store.close()
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """(production v1: region is a category; candidate v2: region is a number)."""
    root = tmp_path_factory.mktemp("consistency")
    production = _model(root / "production", numeric_region=False)
    candidate = dataclasses.replace(_model(root / "candidate", numeric_region=True), version=CANDIDATE)
    assert production.schema.kinds["region"] == "categorical" and candidate.schema.kinds["region"] == "numeric"
    return production, candidate


def _trial(mode: str, candidate: Any) -> Trial:
    share, sample = (50.0, 0.0) if mode == "canary" else (0.0, 100.0)
    return Trial(Rollout(ROLLOUT, CANDIDATE, PRODUCTION, mode, share, sample, [50.0, 100.0] if share else [],
                         "active", "test", "", 0.0, 0.0, None), candidate)


def _ids(side: str, n: int) -> list[str]:
    """`n` customer ids a 50% canary routes to the candidate ("candidate") or to production."""
    out, k = [], 0
    while len(out) < n:
        value = f"customer-{k}"
        if (bucket(value) < 50 * BUCKETS / 100) == (side == "candidate"):
            out.append(value)
        k += 1
    return out


def _rows(ids: list[str], region: str | int, seed: int) -> list[dict[str, Any]]:
    rows = feature_rows(make_churn(len(ids), seed=seed))
    return [dict(row, customer_id=i, region=region) for row, i in zip(rows, ids)]


class Recorder:
    """The service's side of a batcher: logged rows (id -> version), counted calls, shadow rows."""

    def __init__(self) -> None:
        self.logged: dict[str, int] = {}
        self.calls: list[tuple[int, int, int, bool]] = []
        self.shadowed: dict[str, int] = {}

    def predicted(self, entry: Any, outputs: list[dict[str, Any]]) -> None:
        assert [o["id"] for o in outputs] == entry.ids and len(entry.labels) == len(entry.ids)
        for i in entry.ids:
            assert i not in self.logged, f"{i} logged twice"
            self.logged[i] = entry.model_version

    def shadow(self, entry: Any) -> None:
        assert entry.rollout == ROLLOUT and len(entry.latencies_ms) == len(entry.ids)
        self.shadowed.update(dict.fromkeys(entry.ids, entry.model_version))

    def batcher(self, trial: Trial) -> MicroBatcher:
        batcher = MicroBatcher(max_wait_s=0.0, on_predicted=self.predicted, id_column="customer_id",
                               count_call=lambda *call: self.calls.append(call), on_shadow=self.shadow)
        batcher.trial = trial
        return batcher

    def counted(self, version: int) -> dict[bool, int]:
        """Rows counted per `failed` for model `version` (under ROLLOUT)."""
        out = {False: 0, True: 0}
        for rollout, v, rows, failed in self.calls:
            if (rollout, v) == (ROLLOUT, version):
                out[failed] += rows
        return out


def _serve(batcher: MicroBatcher, production: Any, requests: list[list[dict[str, Any]]]) -> list[Outcome]:
    """Submit every request at once (one model call per model) and return their outcomes; then let
    the shadow worker finish and its rows reach the event loop."""
    async def run() -> list[Outcome]:
        futures = [batcher.submit(production, Rows(rows, [["instances", n] for n in range(len(rows))]),
                                  time.perf_counter()) for rows in requests]
        try:
            return list(await asyncio.gather(*futures))
        finally:
            batcher.stop()
            await asyncio.to_thread(batcher.stop_shadow)  # scores what is queued, then ends
            await asyncio.sleep(0)  # the shadow's rows, handed over with call_soon_threadsafe

    return asyncio.run(run())


def _versions(outcome: Outcome) -> list[int]:
    return [o["model_version"] for o in outcome.outputs]


def test_a_shadow_candidates_refused_rows_are_failed_calls_not_dropped(models) -> None:
    production, candidate = models
    record = Recorder()
    texts = _rows(_ids("candidate", 6) + _ids("production", 6), "north", seed=1)  # refused by v2's schema
    numbers = _rows(_ids("candidate", 4), 2, seed=2)  # a number: v2 scores it, v1 warns (unseen category)
    first, second = _serve(record.batcher(_trial("shadow", candidate)), production, [texts, numbers])
    # production answered every row, as without a rollout
    assert not first.errors and not second.errors and len(first.outputs) == 12 and len(second.outputs) == 4
    answered = [o["id"] for o in first.outputs + second.outputs]
    assert record.logged == dict.fromkeys(answered, PRODUCTION)
    assert record.counted(PRODUCTION) == {False: 16, True: 0}
    # the candidate scored the rows its schema accepts and failed the others: counted, not dropped
    assert record.shadowed == dict.fromkeys([o["id"] for o in second.outputs], CANDIDATE)
    assert record.counted(CANDIDATE) == {False: 4, True: 12}
    assert sorted(c for c in record.calls if c[1] == CANDIDATE) == [(ROLLOUT, CANDIDATE, 4, False),
                                                                   (ROLLOUT, CANDIDATE, 12, True)]


def test_a_canary_request_the_candidate_refuses_is_answered_whole_by_production(models) -> None:
    production, candidate = models
    record = Recorder()
    split = _rows(_ids("candidate", 3) + _ids("production", 2), "north", seed=3)  # v2 refuses its 3 rows
    whole = _rows(_ids("candidate", 4), "south", seed=4)  # every row for v2, which refuses them all
    good = _rows(_ids("candidate", 5), 1, seed=5)  # every row for v2, which answers them
    mixed = _rows(_ids("candidate", 2) + _ids("production", 3), 3, seed=6)  # both answer their part
    outcomes = _serve(record.batcher(_trial("canary", candidate)), production, [split, whole, good, mixed])
    assert [o.errors for o in outcomes] == [[], [], [], []]  # no request failed
    assert _versions(outcomes[0]) == [PRODUCTION] * 5
    assert _versions(outcomes[1]) == [PRODUCTION] * 4
    assert _versions(outcomes[2]) == [CANDIDATE] * 5
    assert _versions(outcomes[3]) == [CANDIDATE] * 2 + [PRODUCTION] * 3  # in the request's row order
    # every answered row logged once, under the version that answered it; nothing else
    assert record.logged == {o["id"]: o["model_version"] for outcome in outcomes for o in outcome.outputs}
    # the candidate: its 7 refused rows one failed call (production answered them), its 7 answered not
    assert record.counted(CANDIDATE) == {False: 7, True: 7}
    assert record.counted(PRODUCTION) == {False: 5 + 4 + 3, True: 0}


def test_a_split_canary_request_production_refuses_logs_none_of_its_rows(models) -> None:
    production, candidate = models
    record = Recorder()
    refused = _rows(_ids("candidate", 3) + _ids("production", 3), 2, seed=7)
    refused[4]["age"] = "forty"  # a production row no schema accepts: the request is refused whole
    answered = _rows(_ids("candidate", 2) + _ids("production", 2), 2, seed=8)
    bad, good = _serve(record.batcher(_trial("canary", candidate)), production, [refused, answered])
    assert bad.outputs == [] and [e["loc"] for e in bad.errors] == [["instances", 4, "age"]]
    assert _versions(good) == [CANDIDATE] * 2 + [PRODUCTION] * 2
    # the candidate answered the refused request's first 3 rows, but they are not logged: only the
    # answered request's rows are
    assert record.logged == {o["id"]: o["model_version"] for o in good.outputs}
    assert record.counted(CANDIDATE) == {False: 5, True: 0}


def test_input_both_models_refuse_is_refused_and_not_the_candidates_failure(models) -> None:
    production, candidate = models
    record = Recorder()
    garbage = _rows(_ids("candidate", 3), 1, seed=9)
    garbage[1]["tenure_months"] = "long"  # refused by both schemas: the client's input
    fine = _rows(_ids("candidate", 2), "west", seed=10)  # refused by the candidate only
    bad, good = _serve(record.batcher(_trial("canary", candidate)), production, [garbage, fine])
    assert bad.outputs == [] and [e["loc"] for e in bad.errors] == [["instances", 1, "tenure_months"]]
    assert _versions(good) == [PRODUCTION] * 2
    assert record.logged == dict.fromkeys([o["id"] for o in good.outputs], PRODUCTION)
    assert record.counted(CANDIDATE) == {False: 3, True: 2}  # only the rows production answered count
