"""A shadow or canary candidate judged on live traffic (monitor/_live.py), from logs written directly:
prediction and shadow batches in the service's format, labels, and the service's per-version call counts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import sqlalchemy as sa
from sklearn.metrics import roc_auc_score

from everloop import registry, train
from everloop.demo import make_churn
from everloop.monitor import LiveVerdict, judge_rollout
from everloop.spec._model import LiveSpec
from everloop.store import prediction_log

from tests.conftest import TEMPLATES, promoted_v1_and_candidates, served_project, write_project

SINCE = 1_800_000_000.0  # the rollout's start
PROD_WORKER, CAND_WORKER = "a" * 16, "b" * 16
LIVE = LiveSpec(min_rows=300, min_labelled_rows=200, max_regression=0.02, max_latency_ratio=1.5,
                max_error_rate=0.05)


def with_live(spec, live: LiveSpec = LIVE):
    return spec.model_copy(update={"promotion": spec.promotion.model_copy(update={"live": live})})


def bad_spec(spec):
    """A model that ignores the features: the class prior for every row."""
    return spec.model_copy(update={"model": spec.model.model_copy(
        update={"estimator": "sklearn.dummy.DummyClassifier", "params": {"strategy": "prior"}})})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """v1 in production, v2 the same model retrained (a good candidate), v3 a constant model (a bad one):
    a copy of the session's template (tests/conftest.py `promoted_v1_and_candidates`)."""
    folder = write_project(tmp_path_factory.mktemp("live") / "proj")
    spec, store = TEMPLATES.clone(folder, None, promoted_v1_and_candidates)
    good, bad = 2, 3
    loaded = {v: registry.load_model(store, v) for v in (1, good, bad)}
    yield SimpleNamespace(spec=with_live(spec), store=store, production=1, good=good, bad=bad, loaded=loaded)
    store.close()


@pytest.fixture
def live(models):
    """The module's models with an empty prediction log, labels and call counts."""
    t = models.store.tables
    with models.store.engine.begin() as conn:
        for table in (t.prediction_batches, t.shadow_batches, t.feedback, t.rollout_stats):
            conn.execute(table.delete())
    return models


def rollout(mode: str, candidate: int, share: float = 0, steps=(10, 50, 100), production: int = 1):
    return SimpleNamespace(id=7, candidate=candidate, production=production, mode=mode, share=share,
                           steps=list(steps), created_at=SINCE)


def ids(worker: str, first: int, n: int) -> list[str]:
    return [f"{worker}{c:x}" for c in range(first, first + n)]


def log(m, version: int, frame, worker: str, first: int, *, latency_ms: float = 2.0, at: float = SINCE + 1,
        shadow: bool = False, proba: np.ndarray | None = None) -> np.ndarray:
    """Log `frame` as scored by `version` (ids worker + first..): in prediction_batches, or in shadow_batches
    under rollout 7. `proba` replaces the model's probabilities. Returns the logged probabilities."""
    model = m.loaded[version]
    if proba is None:
        proba = model.predict(frame).proba
    labels = np.asarray(model.classes)[proba.argmax(axis=1)]
    features = pa.Table.from_pandas(frame[["age", "plan"]], preserve_index=False)
    row = prediction_log.batch_row(worker, first, features, labels, proba, model.classes, at, version,
                                   np.full(len(frame), latency_ms))
    table = m.store.tables.shadow_batches if shadow else m.store.tables.prediction_batches
    with m.store.engine.begin() as conn:
        conn.execute(table.insert(), [row | {"rollout": 7} if shadow else row])
    return np.round(proba, 6)


def label(m, prediction_ids: list[str], truth) -> None:
    with m.store.engine.begin() as conn:
        conn.execute(m.store.tables.feedback.insert(), [{"prediction_id": i, "created_at": SINCE + 2, "label": int(y)}
                                                        for i, y in zip(prediction_ids, truth)])


def calls(m, version: int, *counts: tuple[int, int]) -> None:
    """rollout_stats rows for rollout 7, one per (calls, errors), as two workers would write them."""
    with m.store.engine.begin() as conn:
        conn.execute(m.store.tables.rollout_stats.insert(), [
            {"created_at": SINCE + 1, "rollout": 7, "worker": f"w{n}", "model_version": version, "calls": c,
             "errors": e, "rows": c - e} for n, (c, e) in enumerate(counts)])


def test_a_good_shadow_candidate_waits_for_labels_then_is_promoted(live):
    frame = make_churn(600, seed=11)
    prod = log(live, 1, frame, PROD_WORKER, 0)
    cand = log(live, live.good, frame.iloc[:400], PROD_WORKER, 0, latency_ms=2.5, shadow=True)  # a 2/3 sample
    label(live, ids(PROD_WORKER, 0, 150), frame["churned"][:150])
    calls(live, live.good, (300, 0), (100, 0))

    waiting = judge_rollout(live.store, live.spec, rollout("shadow", live.good))
    assert waiting.action == "wait"
    assert waiting.reason == ("150 of the 200 labelled rows promotion.live.min_labelled_rows needs (rows both "
                              "versions scored that have a valid label)")
    e = waiting.evidence
    assert e["rows"] == {"candidate": 400, "production": 600, "paired": 400}
    assert e["agreement"] == {"rows": 400, "agreed": 400, "rate": 1.0}  # the same model retrained
    assert e["prediction_drift"]["effect"] == 0.0 and e["prediction_drift"]["drifted"] is False
    assert e["errors"]["candidate"] == {"calls": 400, "errors": 0, "rate": 0.0}
    assert e["latency_ms"]["candidate"] == {"rows": 400, "p50": 2.5, "p99": 2.5}
    assert e["latency_ms"]["p99_ratio"] == pytest.approx(1.25)
    assert e["labelled"]["rows"] == {"candidate": 150, "production": 150}
    assert 0.5 < e["estimated"]["candidate"]["value"] < 1

    label(live, ids(PROD_WORKER, 150, 250), frame["churned"][150:400])
    verdict = judge_rollout(live.store, live.spec, rollout("shadow", live.good))
    assert verdict.action == "promote", verdict.reason
    labelled = verdict.evidence["labelled"]
    truth = frame["churned"][:400].to_numpy()
    expected = roc_auc_score(truth, prod[:400, 1] / prod[:400].sum(axis=1))
    assert labelled["candidate"] == pytest.approx(expected) and labelled["production"] == pytest.approx(expected)
    assert labelled["rows"] == {"candidate": 400, "production": 400}
    assert (labelled["loss"], labelled["loss_low"], labelled["loss_high"]) == (0.0, 0.0, 0.0)  # paired draws
    assert labelled["allowed_loss"] == 0.02
    assert verdict.reason == (f"candidate v{live.good} passes on live traffic (shadow): roc_auc {expected:.4f} vs "
                              f"production v1's {expected:.4f} on the 400 labelled rows both versions scored "
                              "(loss 0.0000, 90% interval 0.0000..0.0000; allowed 0.0200)")
    assert np.array_equal(cand, prod[:400])


def test_shadow_agreement_and_drift_are_computed_on_the_same_ids(live):
    frame = make_churn(300, seed=12)
    proba = live.loaded[1].predict(frame).proba
    log(live, 1, frame, PROD_WORKER, 0)
    flipped = proba.copy()
    flipped[:45] = flipped[:45, ::-1]  # the candidate predicts the other class on 45 rows
    assert not (np.abs(proba[:45, 1] - 0.5) < 1e-6).any()
    log(live, live.good, frame, PROD_WORKER, 0, shadow=True, proba=flipped)
    log(live, live.good, frame.iloc[:20], CAND_WORKER, 0, shadow=True)  # ids production never logged
    e = judge_rollout(live.store, live.spec, rollout("shadow", live.good)).evidence
    assert e["rows"] == {"candidate": 320, "production": 300, "paired": 300}
    assert e["agreement"] == {"rows": 300, "agreed": 255, "rate": 0.85}
    reference, current = np.sort(np.round(proba[:, 1], 6)), np.sort(np.round(flipped[:, 1], 6))
    assert e["prediction_drift"]["candidate_rows"] == 300 and e["prediction_drift"]["production_rows"] == 300
    assert e["prediction_drift"]["method"] == "ks"
    assert e["prediction_drift"]["effect"] > 0 and not np.array_equal(reference, current)


@pytest.mark.parametrize("share, action, next_share", [(10, "step", 50), (50, "step", 100), (100, "promote", None)])
def test_a_good_canary_steps_through_its_shares_then_is_promoted(live, share, action, next_share):
    frame = make_churn(1200, seed=13)
    log(live, 1, frame.iloc[:800], PROD_WORKER, 0)
    log(live, live.good, frame.iloc[800:], CAND_WORKER, 0, latency_ms=2.2)
    label(live, ids(PROD_WORKER, 0, 800) + ids(CAND_WORKER, 0, 400), frame["churned"])
    verdict = judge_rollout(live.store, live.spec, rollout("canary", live.good, share=share))
    assert verdict.action == action, verdict.reason
    assert verdict.evidence.get("next_share") == next_share
    assert "agreement" not in verdict.evidence and "paired" not in verdict.evidence["rows"]
    labelled = verdict.evidence["labelled"]
    assert labelled["rows"] == {"candidate": 400, "production": 800} and labelled["paired"] is False
    if action == "step":
        assert verdict.reason.endswith(f"; step to {next_share}%")
        assert verdict.reason.startswith(f"candidate v{live.good} passes at {share}% of traffic: roc_auc ")


def test_a_candidate_that_ignores_the_features_is_rolled_back_on_its_labels(live):
    frame = make_churn(1200, seed=14)
    prod = log(live, 1, frame.iloc[:800], PROD_WORKER, 0)
    log(live, live.bad, frame.iloc[800:], CAND_WORKER, 0)
    label(live, ids(PROD_WORKER, 0, 800) + ids(CAND_WORKER, 0, 400), frame["churned"])
    verdict = judge_rollout(live.store, live.spec, rollout("canary", live.bad, share=10))
    assert verdict.action == "rollback"
    labelled = verdict.evidence["labelled"]
    production = roc_auc_score(frame["churned"][:800], prod[:, 1] / prod.sum(axis=1))
    assert labelled["candidate"] == 0.5  # one score for every row
    assert labelled["production"] == pytest.approx(production)
    assert labelled["loss"] == pytest.approx(production - 0.5)
    assert labelled["loss_low"] > 0.02
    assert verdict.reason == (
        f"roc_auc 0.5000 of candidate v{live.bad} is worse than production v1's {production:.4f} on its 400 "
        f"labelled rows (production v1: 800 of its own): by {production - 0.5:.4f}, 90% interval "
        f"{labelled['loss_low']:.4f}..{labelled['loss_high']:.4f}; more than promotion.live.max_regression "
        "0.02 roc_auc (absolute)")
    assert verdict.evidence["prediction_drift"]["drifted"] is True  # constant scores vs production's


def test_a_candidate_that_fails_its_calls_is_rolled_back_without_labels(live):
    log(live, 1, make_churn(500, seed=15), PROD_WORKER, 0)
    calls(live, live.good, (19, 19))
    waiting = judge_rollout(live.store, live.spec, rollout("shadow", live.good))
    assert waiting.action == "wait"  # 19 calls: too few to judge an error rate
    assert waiting.reason == (f"candidate v{live.good} has scored 0 of the 300 rows promotion.live.min_rows "
                              "needs (production v1: 500 rows since the rollout started)")
    calls(live, live.good, (11, 11))
    calls(live, 1, (500, 0))
    verdict = judge_rollout(live.store, live.spec, rollout("shadow", live.good))
    assert verdict.action == "rollback"
    assert verdict.reason == (f"candidate v{live.good} failed 30 of 30 calls (100.0%), above "
                              "promotion.live.max_error_rate 5.0%: rolled back without waiting for labels")
    assert verdict.evidence["errors"] == {"candidate": {"calls": 30, "errors": 30, "rate": 1.0},
                                          "production": {"calls": 500, "errors": 0, "rate": 0.0}}
    assert verdict.evidence["labelled"]["rows"] == {"candidate": 0, "production": 0}  # no label was needed


def test_a_slow_candidate_is_rolled_back_at_once_and_not_before_enough_timed_rows(live):
    frame = make_churn(400, seed=16)
    log(live, 1, frame, PROD_WORKER, 0, latency_ms=4.0)
    log(live, live.good, frame.iloc[:150], PROD_WORKER, 0, latency_ms=20.0, shadow=True)
    early = judge_rollout(live.store, live.spec, rollout("shadow", live.good))
    assert early.action == "wait"  # 150 timed rows, fewer than min(min_rows 300, 200)
    assert early.evidence["latency_ms"]["p99_ratio"] == 5.0
    log(live, live.good, frame.iloc[150:250], PROD_WORKER, 150, latency_ms=20.0, shadow=True)
    verdict = judge_rollout(live.store, live.spec, rollout("shadow", live.good))
    assert verdict.action == "rollback"
    assert verdict.reason == (f"candidate v{live.good}'s p99 latency 20.0 ms is 5.00x production v1's 4.0 ms, "
                              "above promotion.live.max_latency_ratio 1.5: rolled back without waiting for labels")
    assert verdict.evidence["latency_ms"] == {"candidate": {"rows": 250, "p50": 20.0, "p99": 20.0},
                                              "production": {"rows": 400, "p50": 4.0, "p99": 4.0},
                                              "p99_ratio": 5.0}


def test_too_few_rows_waits_with_the_counts_and_rows_before_the_start_do_not_count(live):
    frame = make_churn(1000, seed=17)
    log(live, 1, frame.iloc[:400], PROD_WORKER, 0, at=SINCE - 60)  # before the rollout: not counted
    log(live, live.bad, frame.iloc[400:500], CAND_WORKER, 0, at=SINCE - 60)
    log(live, 1, frame.iloc[500:900], PROD_WORKER, 400)
    log(live, live.bad, frame.iloc[900:], CAND_WORKER, 100)
    label(live, ids(PROD_WORKER, 0, 900), frame["churned"][:900])
    verdict = judge_rollout(live.store, live.spec, rollout("canary", live.bad, share=10))
    assert verdict == LiveVerdict("wait", f"candidate v{live.bad} has scored 100 of the 300 rows "
                                  "promotion.live.min_rows needs (production v1: 400 rows since the rollout "
                                  "started)", verdict.evidence)
    assert verdict.evidence["rows"] == {"candidate": 100, "production": 400}
    assert verdict.evidence["since"] == SINCE and verdict.evidence["thresholds"]["min_rows"] == 300


def test_the_evidence_is_plain_json(live):
    import json

    frame = make_churn(300, seed=18)
    log(live, 1, frame, PROD_WORKER, 0)
    verdict = judge_rollout(live.store, live.spec, rollout("shadow", live.good))
    assert verdict.action == "wait"
    assert json.loads(json.dumps(verdict.to_dict(), allow_nan=False))["evidence"]["latency_ms"]["candidate"] == {
        "rows": 0, "p50": None, "p99": None}


def test_a_relative_tolerance_is_read_as_the_gate_reads_it_and_untimed_rows_are_not_compared(live):
    frame = make_churn(1200, seed=19)
    prod = log(live, 1, frame.iloc[:800], PROD_WORKER, 0, latency_ms=None)  # e.g. a batch job's rows
    log(live, live.bad, frame.iloc[800:], CAND_WORKER, 0, latency_ms=50.0)
    label(live, ids(PROD_WORKER, 0, 800) + ids(CAND_WORKER, 0, 400), frame["churned"])
    spec = with_live(live.spec, LiveSpec(**LIVE.model_dump() | {"max_regression": "50%"}))
    verdict = judge_rollout(live.store, spec, rollout("canary", live.bad, share=50))
    production = roc_auc_score(frame["churned"][:800], prod[:, 1] / prod.sum(axis=1))
    assert verdict.evidence["latency_ms"]["production"] == {"rows": 0, "p50": None, "p99": None}
    assert verdict.evidence["latency_ms"]["p99_ratio"] is None
    labelled = verdict.evidence["labelled"]
    assert labelled["allowed_loss"] == pytest.approx(production / 2)
    assert labelled["tolerance"] == (f"promotion.live.max_regression 50% of {production:.4f} = "
                                     f"{production / 2:.4f} roc_auc")
    assert verdict.action == "step" and verdict.evidence["next_share"] == 100  # 0.5 is within half of it


def test_a_bad_canary_is_rolled_back_on_postgresql(tmp_path: Path, pg_url: str):
    folder, spec, store = served_project(tmp_path / "proj", db_url=pg_url)
    bad = train.train(store, bad_spec(spec)).version
    m = SimpleNamespace(spec=with_live(spec), store=store,
                        loaded={v: registry.load_model(store, v) for v in (1, bad)})
    try:
        frame = make_churn(1200, seed=20)
        log(m, 1, frame.iloc[:800], PROD_WORKER, 0)
        log(m, bad, frame.iloc[800:], CAND_WORKER, 0)
        label(m, ids(PROD_WORKER, 0, 800) + ids(CAND_WORKER, 0, 400), frame["churned"])
        calls(m, bad, (400, 0))
        verdict = judge_rollout(store, m.spec, rollout("canary", bad, share=10))
        assert verdict.action == "rollback", verdict.reason
        assert verdict.evidence["labelled"]["candidate"] == 0.5
        assert verdict.evidence["rows"] == {"candidate": 400, "production": 800}
        assert verdict.evidence["errors"]["candidate"] == {"calls": 400, "errors": 0, "rate": 0.0}
    finally:
        store.close()


def test_regression_agreement_is_the_mean_absolute_difference_and_classes_drift_by_total_variation(models):
    from everloop.monitor._live import _agreement, _drift, _Scored

    def scored(values, dtype=float):
        n = len(values)
        return _Scored(np.array([f"{PROD_WORKER}{i:x}" for i in range(n)], dtype=object),
                       np.array(values, dtype=dtype), None, np.full(n, 1.0))

    a, b = scored([1.0, 2.0, 4.0, 8.0]), scored([1.5, 2.0, 3.0, 8.0])
    assert _agreement("regression", a, b) == {"rows": 4, "mean_absolute_difference": 0.375}
    cand = scored(["x"] * 300 + ["y"] * 100 + ["z"] * 100, object)
    prod = scored(["x"] * 200 + ["y"] * 200 + ["z"] * 100, object)
    drift = _drift(models.spec, "classification", ["x", "y", "z"], cand, prod)
    assert drift["method"] == "chi2" and drift["effect"] == pytest.approx(0.2)  # 100 of 500 rows moved
    assert drift["drifted"] is True and (drift["candidate_rows"], drift["production_rows"]) == (500, 500)


def test_a_canary_worse_only_by_the_luck_of_its_rows_waits_for_more_labels(live):
    """Different rows per version: a good candidate whose point loss is beyond a zero tolerance but whose
    90% interval reaches it is neither rolled back nor promoted; it waits, and says why."""
    frame = make_churn(1200, seed=13)
    log(live, 1, frame.iloc[:800], PROD_WORKER, 0)
    log(live, live.good, frame.iloc[800:], CAND_WORKER, 0)
    label(live, ids(PROD_WORKER, 0, 800) + ids(CAND_WORKER, 0, 400), frame["churned"])
    strict = with_live(live.spec, LIVE.model_copy(update={"max_regression": 0.0}))
    verdict = judge_rollout(live.store, strict, rollout("canary", live.good, share=100))
    labelled = verdict.evidence["labelled"]
    assert labelled["loss"] > 0 and labelled["loss_low"] <= 0 <= labelled["loss_high"], labelled
    assert verdict.action == "wait", verdict.reason
    assert "is not yet clearly beyond promotion.live.max_regression" in verdict.reason
