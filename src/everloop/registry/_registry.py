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
        prod_model = load_model(store, production)
        prod_value = _score_on(store, prod_model, cand.manifest, metric)
        evidence["production"] = prod_value
        evidence["production_version"] = production
        loss = improvement(metric, prod_value, value)
        if loss > spec.promotion.max_regression:
            reasons.append(f"{metric} {value:.4f} is worse than production v{production}'s {prod_value:.4f} "
                           f"on the same evaluation data by {loss:.4f} (allowed: {spec.promotion.max_regression})")
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


def _score_on(store: Store, model: TrainedModel, manifest: dict[str, Any], metric: str) -> float:
    frame = eval_frame(store, manifest)
    target = manifest["target"]
    features, _ = model.conform(frame.drop(columns=[target]))
    predictions = model.predict_conformed(features)
    y = as_labels(frame[target]) if model.task == "classification" else frame[target].to_numpy()
    return score(metric, y, predictions.labels.astype(y.dtype) if model.task == "classification" else predictions.labels,
                 predictions.proba, model.classes)


def _to_version(row: Any, aliases: list[str]) -> ModelVersion:
    return ModelVersion(row.version, row.created_at, row.dataset_version, row.artifact, row.metric, row.value,
                        row.manifest, sorted(aliases))


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"
