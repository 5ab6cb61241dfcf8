"""Model versions, aliases with an append-only history, and the promotion gate."""

from __future__ import annotations

import getpass
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from everloop.errors import GateError, NotFoundError
from everloop.spec import ProjectSpec
from everloop.store import Store
from everloop.train import TrainedModel, as_labels, improvement, load_artifact, score

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
    """Would `candidate` be promoted? Beats the trivial baseline, reaches min_metric, and does not
    lose more than max_regression against production, both scored on the candidate's evaluation data."""
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
        frame = eval_frame(store, cand.manifest)
        mine = _Scored(load_model(store, candidate), frame, metric)
        theirs = _Scored(load_model(store, production), frame, metric)
        prod_value = theirs.metric()
        evidence["production"] = prod_value
        evidence["production_version"] = production
        loss = improvement(metric, prod_value, value)
        if loss > spec.promotion.max_regression:
            reasons.append(f"{metric} {value:.4f} is worse than production v{production}'s {prod_value:.4f} "
                           f"on the same evaluation data by {loss:.4f} (allowed: {spec.promotion.max_regression})")
        evidence["slices"] = {}
        for column in spec.evaluation.slices:
            if column not in frame:
                continue
            for level, rows in frame.groupby(column, dropna=False).indices.items():
                if len(rows) < spec.promotion.min_slice_rows:
                    continue
                a, b = mine.metric(rows), theirs.metric(rows)
                if not (np.isfinite(a) and np.isfinite(b)):
                    continue
                evidence["slices"][f"{column}={level}"] = {"candidate": a, "production": b, "rows": len(rows)}
                slice_loss = improvement(metric, b, a)
                if slice_loss <= spec.promotion.slice_tolerance:
                    continue
                low, high = _loss_interval(mine, theirs, rows)
                if low > 0:  # worse beyond the tolerance, and not by the luck of a small slice
                    reasons.append(f"on slice {column}={level} ({len(rows)} rows), {metric} {a:.4f} is worse than "
                                   f"production v{production}'s {b:.4f} by {slice_loss:.4f} (90% interval "
                                   f"{low:.4f}..{high:.4f}; allowed: {spec.promotion.slice_tolerance})")
    return GateDecision(candidate, production, not reasons, reasons, evidence)


def promote(store: Store, spec: ProjectSpec, candidate: int, *, reason: str = "", force: bool = False,
            actor: str | None = None) -> GateDecision:
    """Move the production alias to `candidate` through the gate; `force` overrides and is recorded."""
    decision = check_gate(store, spec, candidate)
    if not decision.passed and not force:
        raise GateError(f"model v{candidate} was not promoted:\n" + "\n".join(f"  - {r}" for r in decision.reasons),
                        reasons=decision.reasons)
    why = reason or "passed the gate"
    if force and not decision.passed:
        why = f"{why} (forced past: {'; '.join(decision.reasons)})"
    set_alias(store, PRODUCTION, candidate, reason=why, forced=force and not decision.passed, actor=actor)
    return decision


def rollback(store: Store, *, reason: str = "rollback", actor: str | None = None) -> int:
    """Point production back at the version it pointed at before its latest move."""
    t = store.tables.alias_history
    with store.engine.connect() as conn:
        last = conn.execute(sa.select(t).where(t.c.alias == PRODUCTION).order_by(t.c.id.desc()).limit(1)).first()
    if last is None or last.from_version is None:
        raise NotFoundError("production has no earlier version to roll back to")
    set_alias(store, PRODUCTION, last.from_version, reason=reason, actor=actor)
    return last.from_version


def set_alias(store: Store, alias: str, version: int, *, reason: str, forced: bool = False,
              actor: str | None = None) -> None:
    get_model(store, version)  # refuse unknown versions
    t = store.tables
    with store.engine.begin() as conn:
        previous = conn.execute(sa.select(t.aliases.c.version).where(t.aliases.c.name == alias)).scalar()
        if previous is None:
            conn.execute(t.aliases.insert().values(name=alias, version=version))
        else:
            conn.execute(t.aliases.update().where(t.aliases.c.name == alias).values(version=version))
        conn.execute(t.alias_history.insert().values(alias=alias, from_version=previous, to_version=version,
                                                     actor=actor or _user(), reason=reason, forced=forced))


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

    def metric(self, rows: np.ndarray | slice = slice(None)) -> float:
        proba = self.proba[rows] if self.proba is not None else None
        return score(self.metric_name, self.y[rows], self.labels[rows], proba, self.classes)


def _loss_interval(mine: _Scored, theirs: _Scored, rows: np.ndarray, draws: int = 200) -> tuple[float, float]:
    """A paired bootstrap 90% interval of how much worse `mine` is than `theirs` on `rows`."""
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(draws):
        sample = rows[rng.integers(0, len(rows), len(rows))]
        loss = improvement(mine.metric_name, theirs.metric(sample), mine.metric(sample))
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
