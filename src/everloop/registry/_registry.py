"""Model versions, aliases with an append-only history, and the promotion gate."""

from __future__ import annotations

import getpass
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import sqlalchemy as sa
from scipy.stats import rankdata

from everloop.errors import ConflictError, EverloopError, GateError, NotFoundError
from everloop.spec import ProjectSpec
from everloop.store import Store, prediction_log
from everloop.store._lease import Lease
from everloop.train import (TrainedModel, allowed_loss, as_labels, describe_tolerance, improvement,
                            load_artifact, row_hashes, score, training_hashes, valid_labels)

PRODUCTION = "production"


@dataclass(frozen=True)
class ModelVersion:
    version: int
    created_at: float
    dataset_version: int
    artifact: str
    metric: str
    value: float
    manifest: dict[str, Any]
    aliases: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {"version": self.version, "created_at": self.created_at, "dataset_version": self.dataset_version,
                "metric": self.metric, "value": self.value, "baseline": m["baseline"][self.metric],
                "aliases": self.aliases, "estimator": m["estimator"], "reason": m.get("reason", ""),
                "artifact": self.artifact}


@dataclass
class GateDecision:
    candidate: int
    production: int | None
    passed: bool
    reasons: list[str]
    evidence: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "production": self.production, "passed": self.passed,
                "reasons": self.reasons, "evidence": self.evidence}


def list_models(store: Store) -> list[ModelVersion]:
    t = store.tables
    with store.engine.connect() as conn:
        alias_map: dict[int, list[str]] = {}
        for name, version in conn.execute(sa.select(t.aliases.c.name, t.aliases.c.version)):
            alias_map.setdefault(version, []).append(name)
        rows = conn.execute(sa.select(t.models).order_by(t.models.c.version)).all()
    return [_to_version(r, alias_map.get(r.version, [])) for r in rows]


def get_model(store: Store, ref: int | str) -> ModelVersion:
    """A model version by number, or by alias name (e.g. 'production')."""
    version = resolve(store, ref)
    t = store.tables.models
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(t).where(t.c.version == version)).first()
    if row is None:
        raise NotFoundError(f"model version {version} does not exist")
    return _to_version(row, [])


def resolve(store: Store, ref: int | str) -> int:
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
        return int(ref)
    version = alias_version(store, ref)
    if version is None:
        raise NotFoundError(f"alias {ref!r} points at no model yet" + (
            "; promote one with 'everloop promote'" if ref == PRODUCTION else ""))
    return version


def alias_version(store: Store, alias: str) -> int | None:
    t = store.tables.aliases
    with store.engine.connect() as conn:
        return conn.execute(sa.select(t.c.version).where(t.c.name == alias)).scalar()


def load_model(store: Store, ref: int | str) -> TrainedModel:
    """The fitted artifact of a model version or alias, verified against its hash."""
    mv = get_model(store, ref)
    return load_artifact(store, mv.artifact, mv.manifest, mv.version)


def check_gate(store: Store, spec: ProjectSpec, candidate: int) -> GateDecision:
    """Would `candidate` be promoted? It must beat the trivial baseline and reach `promotion.min_metric`
    (both on its own evaluation rows), and lose no more than `promotion.max_regression` against
    production, nor more than `promotion.slice_tolerance` on any slice of `evaluation.slices`.

    Candidate and production are compared on the same rows, and only on rows NEITHER of them trained
    on (`comparison_rows`): the candidate's held-out rows minus every row either model learned from,
    else the latest labelled traffic minus those rows. A model scored on its own training rows looks
    better than it is, so comparing on them would favour whichever model saw them. With fewer than
    `promotion.min_comparison_rows` such rows the gate says so and refuses (`--force` overrides).
    Tolerances are absolute (metric units) or relative ("2%" of production's value on those rows):
    see `everloop.train.allowed_loss`. Evidence: the metric, the candidate's and baseline's values,
    `comparison` (rows_used, rows, both values, loss, allowed_loss, tolerance in words with units,
    the held-out and traffic counts) and `slices`. Reference: evaluating two models on a common
    held-out set they never trained on is the standard paired comparison (Dietterich 1998, "Approximate
    statistical tests for comparing supervised classification learning algorithms"); the slice check's
    paired bootstrap follows Efron & Tibshirani (1993)."""
    cand = get_model(store, candidate)
    metric, value = cand.metric, cand.value
    baseline = cand.manifest["baseline"][metric]
    reasons: list[str] = []
    evidence: dict[str, Any] = {"metric": metric, "candidate": value, "baseline": baseline}
    if not np.isfinite(value):
        reasons.append(f"the candidate's {metric} is undefined on its evaluation data")
    elif improvement(metric, value, baseline) <= 0:
        reasons.append(f"{metric} {value:.4f} does not beat the trivial baseline's {baseline:.4f}")
    floor = spec.promotion.min_metric
    if floor is not None and improvement(metric, value, floor) < 0:
        reasons.append(f"{metric} {value:.4f} is below promotion.min_metric {floor}")
    production = alias_version(store, PRODUCTION)
    if production is not None and production != candidate:
        evidence["production_version"] = production
        reasons += _compare_with_production(store, spec, candidate, production, evidence)
    return GateDecision(candidate, production, not reasons, reasons, evidence)


# Where the comparison rows came from, as recorded in the evidence.
HELD_OUT = "held-out rows neither trained on"
TRAFFIC = "labelled traffic"
# How many of the latest labelled predictions the gate reads when the held-out rows are too few.
TRAFFIC_ROWS = 10_000


@dataclass
class Comparison:
    """The rows the gate compares candidate and production on, and how they were found."""

    frame: pd.DataFrame  # features + target (+ slice columns for held-out rows), rows neither model trained on
    source: str | None  # HELD_OUT, TRAFFIC, or None when neither gave enough rows
    held_out: int  # both models' evaluation rows, each row once
    held_out_unseen: int  # ... of which neither model trained on
    traffic: int | None  # labelled predictions read with a valid label (None: not needed, not read)
    traffic_unseen: int | None  # ... with a valid label, of which neither model trained on

    def to_dict(self) -> dict[str, Any]:
        return {"rows_used": self.source, "rows": len(self.frame) if self.source else 0,
                "held_out": {"rows": self.held_out, "neither_trained_on": self.held_out_unseen},
                "traffic": None if self.traffic is None else {"rows": self.traffic,
                                                               "neither_trained_on": self.traffic_unseen}}


def comparison_rows(store: Store, spec: ProjectSpec, candidate: int, production: int) -> Comparison:
    """The rows to compare `candidate` with `production` on: both models' held-out evaluation rows
    (each row once) minus every row either model trained on (matched by `everloop.train.row_hashes` over each model's
    own features; training rows from `everloop.train.training_hashes`). When fewer than
    `promotion.min_comparison_rows` remain: the latest `TRAFFIC_ROWS` labelled predictions of the
    prediction log (labels parsed for the candidate's task and classes; unparseable ones dropped), minus
    the rows either model trained on. When those are too few as well, `source` is None and `frame` holds
    the held-out rows that remained. Raises NotFoundError for unknown versions, StoreError when a
    stored artifact is missing or altered."""
    cand, prod = get_model(store, candidate), get_model(store, production)
    seen = [(m.manifest["features"], training_hashes(store, m.manifest)) for m in (cand, prod)]
    needed = spec.promotion.min_comparison_rows
    held_out = _held_out_rows(store, cand.manifest, prod.manifest)
    unseen = held_out[_unseen(held_out, seen)].reset_index(drop=True)
    if len(unseen) >= needed:
        return Comparison(unseen, HELD_OUT, len(held_out), len(unseen), None, None)
    traffic, read = _labelled_traffic(store, cand.manifest)
    fresh = traffic[_unseen(traffic, seen)].reset_index(drop=True)
    if len(fresh) >= needed:
        return Comparison(fresh, TRAFFIC, len(held_out), len(unseen), read, len(fresh))
    return Comparison(unseen, None, len(held_out), len(unseen), read, len(fresh))


def _compare_with_production(store: Store, spec: ProjectSpec, candidate: int, production: int,
                             evidence: dict[str, Any]) -> list[str]:
    """The reasons (if any) the candidate loses against production; fills evidence in place."""
    promotion = spec.promotion
    metric = get_model(store, candidate).metric
    rows = comparison_rows(store, spec, candidate, production)
    evidence["comparison"] = rows.to_dict()
    evidence["slices"] = {}
    if rows.source is None:
        best = max(rows.held_out_unseen, rows.traffic_unseen or 0)
        traffic = ("no labelled predictions in the log" if not rows.traffic else
                   f"{rows.traffic_unseen} of the latest {rows.traffic} labelled predictions")
        return [f"only {best} rows neither model trained on (need {promotion.min_comparison_rows}): "
                f"cannot compare with production v{production}; {rows.held_out_unseen} of the two models' "
                f"{rows.held_out} held-out rows and {traffic} are unseen by both; send labels for newer predictions "
                f"(/feedback), lower promotion.min_comparison_rows, promote with --force, or roll back"]
    frame = rows.frame
    where = (f"{len(frame)} held-out rows neither model trained on" if rows.source == HELD_OUT else
             f"{len(frame)} rows of labelled traffic neither model trained on")
    mine = _Scored(load_model(store, candidate), frame, metric)
    theirs = _Scored(load_model(store, production), frame, metric)
    a, b = mine.metric(), theirs.metric()
    evidence["production"] = b
    evidence["comparison"] |= {"candidate": a, "production": b}
    if not (np.isfinite(a) and np.isfinite(b)):
        return [f"cannot compare with production v{production}: {metric} is undefined on the {where} "
                f"(candidate {a:.4f}, production {b:.4f}; e.g. one class only)"]
    loss = improvement(metric, b, a)
    allowed = allowed_loss(promotion.max_regression, b)
    tolerance = describe_tolerance(promotion.max_regression, b, metric)
    evidence["comparison"] |= {"loss": loss, "allowed_loss": allowed,
                               "tolerance": f"promotion.max_regression {tolerance}"}
    reasons = []
    if loss > allowed:
        reasons.append(f"{metric} {a:.4f} is worse than production v{production}'s {b:.4f} on the same "
                       f"evaluation data ({where}) by {loss:.4f} "
                       f"(allowed: promotion.max_regression {tolerance})")
    for column in spec.evaluation.slices:
        if column not in frame:
            continue
        for level, members in frame.groupby(column, dropna=False).indices.items():
            if len(members) < promotion.min_slice_rows:
                continue
            a_slice, b_slice = mine.metric(members), theirs.metric(members)
            if not (np.isfinite(a_slice) and np.isfinite(b_slice)):
                continue
            slice_loss = improvement(metric, b_slice, a_slice)
            slice_allowed = allowed_loss(promotion.slice_tolerance, b_slice)
            evidence["slices"][f"{column}={level}"] = {"candidate": a_slice, "production": b_slice,
                                                       "rows": len(members), "allowed_loss": slice_allowed}
            if slice_loss <= slice_allowed:
                continue
            low, high = _loss_interval(mine, theirs, members)
            if low > 0:  # worse beyond the tolerance, and not by the luck of a small slice
                reasons.append(
                    f"on slice {column}={level} ({len(members)} rows), {metric} {a_slice:.4f} is worse than "
                    f"production v{production}'s {b_slice:.4f} by {slice_loss:.4f} (90% interval "
                    f"{low:.4f}..{high:.4f}; allowed: promotion.slice_tolerance "
                    f"{describe_tolerance(promotion.slice_tolerance, b_slice, metric)})")
    return reasons


def _held_out_rows(store: Store, candidate: dict[str, Any], production: dict[str, Any]) -> pd.DataFrame:
    """Both models' held-out rows, each row once, in the candidate's columns. After a loop retraining
    the new production model trained on all of the old model's data, but its own held-out rows are
    recent ones the old model never saw: rolling back can still be judged on those."""
    mine = eval_frame(store, candidate)
    theirs = eval_frame(store, production)
    if production.get("eval_artifact") == candidate.get("eval_artifact") or not set(mine.columns) <= set(theirs):
        return mine
    both = pd.concat([mine, theirs[list(mine.columns)]], ignore_index=True)
    features = candidate["features"]
    return both[~pd.Series(row_hashes(both, features)).duplicated().to_numpy()].reset_index(drop=True)


def _unseen(frame: pd.DataFrame, seen: list[tuple[list[str], np.ndarray]]) -> np.ndarray:
    """Boolean mask of `frame`'s rows that are in none of the (features, training hashes) pairs. A feature
    `frame` lacks counts as missing, so such rows match no training row (and are kept)."""
    keep = np.ones(len(frame), dtype=bool)
    for features, hashes in seen:
        keep &= ~np.isin(row_hashes(frame.reindex(columns=features), features), hashes)
    return keep


def _labelled_traffic(store: Store, manifest: dict[str, Any]) -> tuple[pd.DataFrame, int]:
    """The latest labelled predictions as a frame of their logged features plus the target (labels
    parsed for the model's task and classes; rows whose label does not parse dropped), and how many
    labelled predictions with a valid label were read."""
    logged, labels = prediction_log.latest_labelled(store.engine, TRAFFIC_ROWS)
    keep, parsed = valid_labels(manifest["task"], manifest.get("classes"), labels)
    frame = logged.features.reset_index(drop=True).iloc[keep].reset_index(drop=True)
    target = pd.Series(parsed, dtype=float if manifest["task"] == "regression" else object)
    return frame.assign(**{manifest["target"]: target}), len(parsed)  # invalid stored labels never count


def promote(store: Store, spec: ProjectSpec, candidate: int, *, reason: str = "", force: bool = False,
            actor: str | None = None) -> GateDecision:
    """Move the production alias to `candidate` through the gate; `force` overrides and is recorded.
    The move happens only if production still points where the gate saw it: raises AliasMoved when a
    promotion or rollback moved it meanwhile (the gate compared against a model no longer live), and
    RolloutActive while a shadow or canary rollout is active (finish it with 'everloop rollout
    promote', 'rollback' or 'abort' first), GateError when the gate refuses, NotFoundError for an
    unknown version."""
    current = alias_version(store, PRODUCTION)
    if current == candidate:  # nothing to move: no gate, and no history row a rollback would "go back" to
        get_model(store, candidate)
        return GateDecision(candidate, current, True, [f"model v{candidate} is already in production"],
                            {"unchanged": True})
    _refuse_under_rollout(store, f"model v{candidate} was not promoted")  # before the gate's work
    decision = check_gate(store, spec, candidate)
    if not decision.passed and not force:
        raise GateError(f"model v{candidate} was not promoted:\n" + "\n".join(f"  - {r}" for r in decision.reasons),
                        reasons=decision.reasons)
    why = reason or "passed the gate"
    if force and not decision.passed:
        why = f"{why} (forced past: {'; '.join(decision.reasons)})"
    set_alias(store, PRODUCTION, candidate, reason=why, forced=force and not decision.passed, actor=actor,
              from_version=decision.production)
    return decision


def rollback(store: Store, *, reason: str = "rollback", actor: str | None = None) -> int:
    """Point production back at the version it pointed at before its latest move. Raises NotFoundError
    when there is none, AliasMoved when another move landed between reading the history and moving,
    RolloutActive while a shadow or canary rollout is active (its candidate is not in production:
    'everloop rollout rollback' stops serving it). Moves from a version to itself (stores from before
    promote refused them) are skipped: going "back" along one would change nothing."""
    _refuse_under_rollout(store, "production was not rolled back")
    t, aliases = store.tables.alias_history, store.tables.aliases
    # One statement, so one snapshot: read separately, a move committing in between (PostgreSQL reads
    # each statement afresh) made the history and the alias disagree and the rollback refuse wrongly.
    now = sa.select(aliases.c.version).where(aliases.c.name == PRODUCTION).scalar_subquery()
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(now.label("current"), sa.select(t.c.id).where(
            t.c.alias == PRODUCTION, t.c.from_version.is_distinct_from(t.c.to_version))
            .order_by(t.c.id.desc()).limit(1).scalar_subquery().label("last_id"))).first()
        current = row.current
        last = (conn.execute(sa.select(t).where(t.c.id == row.last_id)).first()
                if row.last_id is not None else None)  # history rows are never changed: safe to read apart
    if last is None or last.from_version is None or current is None:
        raise NotFoundError("production has no earlier version to roll back to")
    if last.to_version != current:  # the latest real move was not to the model serving now: say so
        raise NotFoundError(f"production is on model v{current}, but its latest recorded move went to "
                            f"v{last.to_version}; promote the version you want instead")
    set_alias(store, PRODUCTION, last.from_version, reason=reason, actor=actor, from_version=current)
    return last.from_version


class AliasMoved(ConflictError):
    """An alias was moved by someone else between reading it and moving it: `.alias`, `.expected` (the
    version the mover saw; None: no version) and `.found` (where it points now)."""

    def __init__(self, alias: str, expected: int | None, found: int | None):
        self.alias, self.expected, self.found = alias, expected, found
        seen = f"v{expected}" if expected is not None else "no model"
        now = f"v{found}" if found is not None else "no model"
        super().__init__(f"{alias} moved from {seen} to {now} meanwhile (another promote, rollback or loop); "
                         f"nothing was changed: check 'everloop models' and retry")


class RolloutActive(ConflictError):
    """Production was not moved: a shadow or canary rollout is active (`.rollout`, its id), and moving
    production under it would leave it comparing its candidate with a model no longer live. Its own
    finish moves production ('everloop rollout promote'); 'rollback' or 'abort' end it without moving."""

    def __init__(self, what: str, row: Any):
        self.rollout = row.id
        super().__init__(
            f"{what}: rollout {row.id} is active ({row.mode} of model v{row.candidate} against production "
            f"v{row.production}, since {_when(row.created_at)}) and production does not move under it. "
            f"Finish it first: 'everloop rollout promote' moves production to v{row.candidate}; "
            f"'everloop rollout rollback' or 'everloop rollout abort' keeps v{row.production} and stops "
            f"serving v{row.candidate}")


def _refuse_under_rollout(store: Store, what: str) -> None:
    """Raise RolloutActive (its message beginning with `what`) when a rollout is active: a fast look
    before a promotion's or rollback's work; `set_alias` looks again in the move's transaction."""
    with store.engine.connect() as conn:
        row = _active_rollout_row(conn, store)
    if row is not None:
        raise RolloutActive(what, row)


def _active_rollout_row(conn: sa.Connection, store: Store) -> Any:
    t = store.tables.rollouts
    return conn.execute(sa.select(t).where(t.c.status == "active").order_by(t.c.id.desc()).limit(1)).first()


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


_READ_NOW: Any = object()  # set_alias's default from_version: whatever the alias points at when called


def set_alias(store: Store, alias: str, version: int, *, reason: str, forced: bool = False,
              actor: str | None = None, from_version: int | None = _READ_NOW, lease: Lease | None = None,
              then: Callable[[sa.Connection], None] | None = None, rollout: int | None = None) -> None:
    """Point `alias` at model `version` and append the move to the alias history, in one transaction;
    `then(conn)`, when given, writes more in that same transaction (the loop's audit row): either all
    of it commits or none of it, and whatever `then` raises undoes the move and propagates.

    A compare-and-set: the alias moves only if it still points at `from_version` (None: at nothing),
    the version the caller decided on; by default, the one read when called. Raises AliasMoved when
    another move landed first (two promotions, a promotion and a rollback, racing: one wins, the other
    is told, none is lost), NotFoundError for an unknown `version`, and with `lease` (the loop's),
    `everloop.store._lease.LeaseLost` when that lease was lost: a stalled loop moves nothing.

    Production never moves under an active shadow or canary rollout other than `rollout` (the one
    this move finishes: `finish_rollout`'s promotion): RolloutActive. The look is in the move's
    transaction, after the alias row is written (locked), as `start_rollout` locks it before it looks
    for an active rollout: of a start and a move racing, the second sees the first."""
    get_model(store, version)  # refuse unknown versions
    t = store.tables
    if from_version is _READ_NOW:
        from_version = alias_version(store, alias)
    moved_here = False  # an IntegrityError before the alias row is written: a concurrent first move
    try:
        with store.engine.begin() as conn:
            if lease is not None:
                lease.check(conn)
            if from_version is None:  # a concurrent first move makes this insert fail on the key
                conn.execute(t.aliases.insert().values(name=alias, version=version))
            else:  # PostgreSQL re-checks the WHERE on a row a concurrent move committed; SQLite runs one writer
                moved = conn.execute(t.aliases.update()
                                     .where(t.aliases.c.name == alias, t.aliases.c.version == from_version)
                                     .values(version=version, updated_at=time.time()))
                if moved.rowcount != 1:
                    found = conn.execute(sa.select(t.aliases.c.version).where(t.aliases.c.name == alias)).scalar()
                    raise AliasMoved(alias, from_version, found)
            moved_here = True
            if alias == PRODUCTION:
                active = _active_rollout_row(conn, store)
                if active is not None and active.id != rollout:
                    raise RolloutActive(f"production was not moved to v{version}", active)
            conn.execute(t.alias_history.insert().values(alias=alias, from_version=from_version, to_version=version,
                                                         actor=actor or _user(), reason=reason, forced=forced))
            if then is not None:
                then(conn)
    except sa.exc.IntegrityError:
        if from_version is not None or moved_here:
            raise
        raise AliasMoved(alias, None, alias_version(store, alias)) from None


def alias_history(store: Store, alias: str = PRODUCTION) -> list[dict[str, Any]]:
    t = store.tables.alias_history
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(t).where(t.c.alias == alias).order_by(t.c.id)).all()
    return [dict(r._mapping) for r in rows]


def eval_frame(store: Store, manifest: dict[str, Any]) -> pd.DataFrame:
    return store.get_frame(manifest["eval_artifact"])


class _Scored:
    """A model's predictions on a set of evaluation rows, and its metric on any subset of them."""

    def __init__(self, model: TrainedModel, frame: pd.DataFrame, metric: str):
        target = model.manifest["target"]
        features, _ = model.conform(frame)
        predictions = model.predict_conformed(features)
        self.classification = model.task == "classification"
        self.y = as_labels(frame[target]) if self.classification else frame[target].to_numpy()
        self.labels = predictions.labels.astype(self.y.dtype) if self.classification else predictions.labels
        self.proba = predictions.proba
        self.classes = model.classes
        self.metric_name = metric

        # Binary ROC AUC for the bootstrap: positives and their scores, for the rank formula below.
        binary_auc = metric == "roc_auc" and self.proba is not None and len(self.classes or []) == 2
        self.positive = (self.y == self.classes[1]) if binary_auc else None

    def metric(self, rows: np.ndarray | slice = slice(None)) -> float:
        proba = self.proba[rows] if self.proba is not None else None
        return score(self.metric_name, self.y[rows], self.labels[rows], proba, self.classes)

    def fast_metric(self, rows: np.ndarray) -> float:
        """`metric` on `rows` (repeats allowed), for bootstrap draws: binary ROC AUC by the Mann-Whitney
        U statistic on mid-ranks (equal to the area under the ROC curve with ties counted half; Hanley &
        McNeil 1982), about 100x faster than scikit-learn's per call; other metrics through `metric`."""
        if self.positive is None:
            return self.metric(rows)
        positive = self.positive[rows]
        n_pos = int(positive.sum())
        n_neg = len(positive) - n_pos
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        ranks = rankdata(self.proba[rows, 1])
        return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _loss_interval(mine: _Scored, theirs: _Scored, rows: np.ndarray, draws: int = 200) -> tuple[float, float]:
    """A paired bootstrap 90% interval of how much worse `mine` is than `theirs` on `rows`."""
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(draws):
        sample = rows[rng.integers(0, len(rows), len(rows))]
        loss = improvement(mine.metric_name, theirs.fast_metric(sample), mine.fast_metric(sample))
        if np.isfinite(loss):
            losses.append(loss)
    if not losses:
        return float("-inf"), float("inf")
    return float(np.quantile(losses, 0.05)), float(np.quantile(losses, 0.95))


def alias_at(store: Store, alias: str, when: float) -> int | None:
    """The version `alias` pointed at, at time `when` (seconds since the epoch), from its history."""
    t = store.tables.alias_history
    with store.engine.connect() as conn:
        return conn.execute(sa.select(t.c.to_version).where(t.c.alias == alias, t.c.created_at <= when)
                            .order_by(t.c.created_at.desc(), t.c.id.desc()).limit(1)).scalar()


def _to_version(row: Any, aliases: list[str]) -> ModelVersion:
    return ModelVersion(row.version, row.created_at, row.dataset_version, row.artifact, row.metric, row.value,
                        row.manifest, sorted(aliases))


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"
