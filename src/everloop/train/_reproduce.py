"""`reproduce`: retrain a model version from its record and prove it predicts the same, or say why not."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa

from everloop.data import get_dataset, get_schema, load_frame
from everloop.errors import EverloopError, NotFoundError, StoreError
from everloop.features import custom_source_hash
from everloop.spec import missing_env, parse_spec, redact_url
from everloop.store import Store
from everloop.train._artifact import load_artifact
from everloop.train._train import fit, packages


@dataclass
class ReproduceReport:
    model_version: int
    identical: bool
    rows: int = 0  # evaluation rows compared
    max_abs_diff: float | None = None  # largest difference between the two models' outputs
    problems: list[str] = field(default_factory=list)  # why it could not be reproduced, or what differs
    environment: list[str] = field(default_factory=list)  # what changed around it since (may explain a difference)
    record: bool = True  # False: the model has no training record (imported); `problems` says so

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def reproduce(store: Store, version: int) -> ReproduceReport:
    """Retrain model `version` from its record (the recorded spec on the recorded dataset version, with
    the same split, seed and weights) and compare the new model's outputs with the stored model's on
    the stored evaluation rows. Nothing is registered.

    A model refit from a template (`pipeline_source: clone`: the loop's retraining of an imported model,
    or an import with features) is refit as a fresh clone of its own stored pipeline, whose parameters
    are the template's. An imported model (`pipeline_source: imported`) was not trained by everloop: the
    report has `record` False and says so in `problems` (the CLI exits 2).

    The recorded spec holds no secret (see `everloop.spec.scrub_spec`) and needs none: the data is the
    stored dataset version. When that is gone, `problems` names the source and the environment
    variables its URL needs to ingest it again."""
    t = store.tables.models
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(t).where(t.c.version == version)).first()
    if row is None:
        raise NotFoundError(f"model version {version} does not exist")
    m = row.manifest
    report = ReproduceReport(version, identical=False)
    source = m.get("pipeline_source", "spec")
    if source == "imported":
        origin = m.get("imported_from") or {}
        report.record = False
        report.problems.append(
            f"model v{version} was imported from {origin.get('path', 'a file')} "
            f"(sha256 {origin.get('sha256', '?')}): "
            "everloop did not train it, so it has no training record to reproduce it from. A model the loop "
            "retrains from it (a fresh clone of its pipeline, refit) has one, and reproduces")
        return report
    report.environment = _environment_changes(m)
    try:
        stored = load_artifact(store, row.artifact, m, version)
        dataset = get_dataset(store, m["dataset_version"])
        if dataset.content_hash != m["dataset_hash"]:
            report.problems.append(f"dataset v{dataset.version}'s content hash is {dataset.content_hash[:12]}, "
                                   f"the record says {m['dataset_hash'][:12]}")
            return report
        frame = load_frame(store, dataset)
        evaluation = store.get_frame(m["eval_artifact"])
    except StoreError as exc:  # IntegrityError included: an artifact was changed on disk
        report.problems.append(str(exc))
        return report
    except NotFoundError as exc:
        report.problems.append(f"{exc}; the data this model was trained on is gone{_source_hint(m)}")
        return report
    try:
        spec = parse_spec(m["spec"], origin=f"model v{version}'s recorded spec")
        fitted = fit(frame, get_schema(store, dataset.schema_version), spec,
                     recent_from_row=m.get("recent_from_row", 0), recent_weight=m.get("recent_weight", 1.0),
                     template=stored.pipeline if source == "clone" else None)
    except EverloopError as exc:
        report.problems.append(f"retraining failed: {exc}")
        return report
    features, _ = stored.conform(evaluation)
    before = _outputs(stored.pipeline, stored.task, features)
    after = _outputs(fitted.pipeline, stored.task, features)
    report.rows = len(features)
    report.max_abs_diff = float(np.max(np.abs(before - after))) if len(features) else 0.0
    report.identical = bool(np.array_equal(before, after))
    if not report.identical:
        report.problems.append(f"outputs differ on the evaluation rows by up to {report.max_abs_diff:.3g}")
    return report


def _source_hint(manifest: dict[str, Any]) -> str:
    """Where the recorded spec's data came from, to ingest it again, and which environment variables
    its URL needs: the stored spec names secrets (`${NAME}`), never holds them."""
    source = (manifest.get("spec") or {}).get("data", {}).get("source")
    url = source.get("url") if isinstance(source, dict) else source
    if not isinstance(url, str):
        return ""
    hint = f"; its source was {redact_url(url)}"
    missing = missing_env(url)
    if missing:
        plural = "s" if len(missing) > 1 else ""
        hint += f" (to ingest it again, set the environment variable{plural} {', '.join(missing)})"
    return hint


def _outputs(pipeline: Any, task: str, features: Any) -> np.ndarray:
    features = features[list(features.columns)]
    return pipeline.predict_proba(features) if task == "classification" else pipeline.predict(features)


def _environment_changes(manifest: dict[str, Any]) -> list[str]:
    changes = []
    now = packages()
    for name, recorded in sorted(manifest.get("packages", {}).items()):
        if now.get(name) != recorded:
            changes.append(f"package {name}: {recorded} at training, {now.get(name, 'not installed')} now")
    custom = manifest.get("spec", {}).get("features", {}).get("custom")
    if custom:
        try:
            current = custom_source_hash(custom)
        except ImportError:
            current = None
        if current != manifest.get("custom_code_hash"):
            changes.append(f"features.custom {custom}: its source changed since training")
    return changes
