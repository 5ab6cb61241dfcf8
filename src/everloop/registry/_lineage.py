"""Lineage: from a prediction or a model back to the data it came from, and from data forward to models."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from everloop.data import get_dataset
from everloop.errors import NotFoundError
from everloop.registry._import import origin_text
from everloop.registry._registry import get_model
from everloop.store import Store, prediction_log


def model_lineage(store: Store, version: int) -> dict[str, Any]:
    """A model version, the dataset chain it was trained on (each with its source and parent), and
    every move of an alias to or from it. `model.origin` says where a pipeline that everloop did not
    build came from ("imported from PATH (sha256 ...)", or the clone it was refit from; None for the
    project file's pipeline), `model.imported_from` the import's record (path, sha256, format, ...)."""
    model = get_model(store, version)
    m = model.manifest
    chain = []
    dataset_version: int | None = model.dataset_version
    while dataset_version is not None:
        d = get_dataset(store, dataset_version)
        chain.append({"version": d.version, "source": d.source, "rows": d.rows, "content_hash": d.content_hash,
                      "created_at": d.created_at, "parent": d.parent})
        dataset_version = d.parent
    t = store.tables.alias_history
    with store.engine.connect() as conn:
        moves = conn.execute(sa.select(t).where(sa.or_(t.c.to_version == version, t.c.from_version == version))
                             .order_by(t.c.id)).all()
    return {"model": {"version": version, "created_at": model.created_at, "metric": model.metric,
                      "value": model.value, "reason": m.get("reason", ""), "spec_hash": m.get("spec_hash"),
                      "git": m.get("git"), "artifact": model.artifact,
                      "pipeline_source": m.get("pipeline_source", "spec"), "origin": origin_text(m),
                      "imported_from": m.get("imported_from"), "template_of": m.get("template_of")},
            "datasets": chain,
            "alias_moves": [dict(r._mapping) for r in moves]}


def prediction_lineage(store: Store, prediction_id: str) -> dict[str, Any]:
    """A logged prediction, the model that made it, and that model's lineage."""
    t = store.tables
    with store.engine.connect() as conn:
        found = prediction_log.find(conn, [prediction_id]).get(prediction_id)
        label = conn.execute(sa.select(t.feedback.c.label)
                             .where(t.feedback.c.prediction_id == prediction_id)).scalar()
    if found is None:
        raise NotFoundError(f"prediction {prediction_id!r} is not in the prediction log")
    seq, created_at, version, table, position = found
    row = prediction_log.to_rows([(seq, created_at, version, table.slice(position, 1))])
    made = {"id": prediction_id, "created_at": float(row.created_at[0]), "model_version": version,
            "features": row.features.iloc[0].to_dict(), "output": row.outputs[0], "label": label}
    return {"prediction": made} | model_lineage(store, version)


def dataset_lineage(store: Store, version: int) -> dict[str, Any]:
    """A dataset version, the versions built from it, and every model trained on any of them."""
    root = get_dataset(store, version)
    t = store.tables
    descendants, frontier = [], [root.version]
    with store.engine.connect() as conn:
        while frontier:
            children = conn.execute(sa.select(t.datasets.c.version, t.datasets.c.source)
                                    .where(t.datasets.c.parent.in_(frontier))).all()
            descendants += [{"version": c.version, "source": c.source} for c in children]
            frontier = [c.version for c in children]
        covered = [root.version] + [d["version"] for d in descendants]
        models = conn.execute(sa.select(t.models.c.version, t.models.c.dataset_version, t.models.c.metric,
                                        t.models.c.value).where(t.models.c.dataset_version.in_(covered))
                              .order_by(t.models.c.version)).all()
    return {"dataset": {"version": root.version, "source": root.source, "rows": root.rows,
                        "content_hash": root.content_hash},
            "derived_datasets": descendants,
            "models": [dict(r._mapping) for r in models]}
