"""Read-only views of the registry for people (the dashboard; a command could print them too): a
page of model versions, the latest alias moves, the lineage of a page of models, a model card's
facts, a model's feature importances and two versions compared.

Every query is bounded (a page of versions, the latest N moves); none reads an artifact except
`feature_importances`, which loads the pickled model once per artifact and keeps the answer."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import sqlalchemy as sa
from sklearn.pipeline import Pipeline
from sqlalchemy.dialects.postgresql import JSONB

from everloop.errors import EverloopError, NotFoundError
from everloop.registry._import import origin_text
from everloop.registry._registry import ModelVersion, get_model, load_model
from everloop.store import Store
from everloop.train import higher_is_better, improvement

PAGE_SIZE = 100  # model versions per page
ALIAS_MOVES = 50  # alias moves shown
LINEAGE_DEPTH = 20  # dataset versions followed back from a model, or forward from a dataset
LINEAGE_MODELS = 50  # models listed as trained on a dataset or the versions built from it
IMPORTANCES_KEPT = 256  # models whose importances stay in memory (a few KB each)
# The manifest keys `model_row` reads (with `origin_text`'s): all that a page of versions selects.
ROW_KEYS = ("baseline", "task", "estimator", "reason", "pipeline_source", "imported_from",
            "template_of")


@dataclass(frozen=True)
class ModelPage:
    """One page of model versions, newest first. `models`: `model_row` dicts; `total`: versions in
    the store; `before`: the version to pass as `before` for the next (older) page, None on the
    last."""

    models: list[dict[str, Any]]
    total: int
    before: int | None


def model_row(model: ModelVersion) -> dict[str, Any]:
    """A model version as one table row: `ModelVersion.to_dict()` plus `lift` (how much the metric
    beats the trivial baseline's, in the metric's units; positive is better, None when either is
    missing), `task`, `pipeline_source` ("spec", "imported" or "clone") and `origin` (see
    `origin_text`)."""
    m = model.manifest
    baseline = (m.get("baseline") or {}).get(model.metric)
    lift = (improvement(model.metric, model.value, baseline)
            if baseline is not None and model.value is not None else None)
    return {"version": model.version, "created_at": model.created_at,
            "dataset_version": model.dataset_version, "metric": model.metric, "value": model.value,
            "baseline": baseline, "lift": lift, "aliases": model.aliases, "task": m.get("task"),
            "estimator": m.get("estimator", "-"), "reason": m.get("reason", ""),
            "pipeline_source": m.get("pipeline_source", "spec"), "origin": origin_text(m),
            "artifact": model.artifact}


def model_page(store: Store, *, limit: int = PAGE_SIZE, before: int | None = None) -> ModelPage:
    """The `limit` newest model versions older than version `before` (all when None), newest first,
    each with the aliases that point at it now. Raises ValueError for `limit` < 1."""
    if limit < 1:
        raise ValueError(f"limit: expected at least 1, got {limit}")
    t = store.tables
    c = t.models.c
    # Only the manifest keys a row shows: a manifest is KBs (the spec, the features, the calibration
    # map) and a page of them parsed whole costs more than the rest of the page. PostgreSQL parses a
    # json value again for each key taken from it: there, it is parsed once, as jsonb, per row.
    manifest: Any = c.manifest
    if store.engine.dialect.name == "postgresql":
        manifest = sa.cast(c.manifest, JSONB)
    page = sa.select(c.version, c.created_at, c.dataset_version, c.artifact, c.metric, c.value,
                     manifest.label("manifest")).order_by(c.version.desc()).limit(limit + 1)
    if before is not None:
        page = page.where(c.version < before)
    page = page.subquery()  # the LIMIT keeps PostgreSQL from inlining the cast into each key
    p = page.c
    query = sa.select(p.version, p.created_at, p.dataset_version, p.artifact, p.metric, p.value,
                      *[p.manifest[key].label(key) for key in ROW_KEYS]).order_by(p.version.desc())
    with store.engine.connect() as conn:
        rows = conn.execute(query).all()
        total = conn.execute(sa.select(sa.func.count()).select_from(t.models)).scalar_one()
        shown = [r.version for r in rows[:limit]]
        aliases: dict[int, list[str]] = {}
        if shown:
            for name, version in conn.execute(sa.select(t.aliases.c.name, t.aliases.c.version)
                                              .where(t.aliases.c.version.in_(shown))):
                aliases.setdefault(version, []).append(name)
    models = []
    for r in rows[:limit]:
        keys = {key: r._mapping[key] for key in ROW_KEYS if r._mapping[key] is not None}
        found = ModelVersion(r.version, r.created_at, r.dataset_version, r.artifact, r.metric,
                             r.value, keys, sorted(aliases.get(r.version, [])))
        models.append(model_row(found))
    return ModelPage(models, total, rows[limit - 1].version if len(rows) > limit else None)


def model_summary(store: Store, version: int) -> dict[str, Any]:
    """Model `version` as a `model_row`, with the aliases that point at it now. Raises NotFoundError
    for an unknown version."""
    model = get_model(store, version)
    t = store.tables.aliases
    with store.engine.connect() as conn:
        names = conn.execute(sa.select(t.c.name).where(t.c.version == version)).scalars().all()
    return model_row(replace(model, aliases=sorted(names)))


def latest_alias_moves(store: Store, limit: int = ALIAS_MOVES) -> list[dict[str, Any]]:
    """The `limit` latest moves of any alias, newest first: id, created_at (seconds since the
    epoch), alias, from_version (None: the first move), to_version, actor, reason, forced."""
    t = store.tables.alias_history
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(t).order_by(t.c.id.desc()).limit(limit)).all()
    return [dict(r._mapping) for r in rows]


def lineage_overview(store: Store, models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Dataset version -> models -> promotions, for a page of `model_row`s: one entry per dataset
    version the models were trained on (newest first), `dataset` (version, source, rows, parent;
    None when the dataset row is gone) and its `models` (version, metric, value, and `moves`: the
    alias moves to that version, oldest first). Two queries, bounded by the page."""
    versions = [m["version"] for m in models]
    datasets = sorted({m["dataset_version"] for m in models}, reverse=True)
    t = store.tables
    moves: dict[int, list[dict[str, Any]]] = {}
    found: dict[int, dict[str, Any]] = {}
    h, d = t.alias_history.c, t.datasets.c
    if versions:
        with store.engine.connect() as conn:
            for r in conn.execute(sa.select(t.alias_history).where(h.to_version.in_(versions))
                                  .order_by(h.id)):
                moves.setdefault(r.to_version, []).append(dict(r._mapping))
            for r in conn.execute(sa.select(d.version, d.source, d.rows, d.parent)
                                  .where(d.version.in_(datasets))):
                found[r.version] = dict(r._mapping)
    trained: dict[int, list[dict[str, Any]]] = {}
    for m in sorted(models, key=lambda m: m["version"]):
        trained.setdefault(m["dataset_version"], []).append(
            {"version": m["version"], "metric": m["metric"], "value": m["value"],
             "aliases": m["aliases"], "moves": moves.get(m["version"], [])})
    return [{"dataset": found.get(v), "dataset_version": v, "models": trained[v]} for v in datasets]


def model_lineage_view(store: Store, version: int, depth: int = LINEAGE_DEPTH) -> dict[str, Any]:
    """`model_lineage`, bounded for a page: `datasets`, the chain model `version` was trained on
    (nearest first; version, source, rows, content_hash, created_at, parent) followed back at most
    `depth` versions, `more_datasets` (the chain goes further back), `alias_moves` (the latest
    ALIAS_MOVES moves to or from it, oldest first) and `origin` (see `origin_text`). A loop that
    retrains builds each dataset on the last, so the whole chain grows with every retraining: here
    it is one recursive query, not one per version. Raises NotFoundError for an unknown version."""
    model = get_model(store, version)
    d, h = store.tables.datasets, store.tables.alias_history
    chain = (sa.select(d.c.version, d.c.parent, sa.literal(1).label("depth"))
             .where(d.c.version == model.dataset_version).cte("chain", recursive=True))
    chain = chain.union_all(sa.select(d.c.version, d.c.parent, chain.c.depth + 1)
                            .where(d.c.version == chain.c.parent, chain.c.depth <= depth))
    with store.engine.connect() as conn:
        datasets = conn.execute(
            sa.select(d.c.version, d.c.source, d.c.rows, d.c.content_hash, d.c.created_at,
                      d.c.parent).join(chain, d.c.version == chain.c.version)
            .order_by(chain.c.depth)).all()
        moves = conn.execute(sa.select(h).where(sa.or_(h.c.to_version == version,
                                                       h.c.from_version == version))
                             .order_by(h.c.id.desc()).limit(ALIAS_MOVES)).all()
    return {"datasets": [dict(r._mapping) for r in datasets[:depth]],
            "more_datasets": len(datasets) > depth,
            "alias_moves": [dict(r._mapping) for r in reversed(moves)],
            "origin": origin_text(model.manifest)}


def dataset_lineage_view(store: Store, version: int, depth: int = LINEAGE_DEPTH,
                         limit: int = LINEAGE_MODELS) -> dict[str, Any]:
    """`dataset_lineage`, bounded for a page: `derived_datasets` (version, source, parent: the
    versions built from dataset `version`, then from those, ..., at most `depth` generations and
    `limit` versions, nearest first), `more_derived`, `models` (version, dataset_version, metric,
    value: the first `limit` trained on it or on a version shown) and `more_models`. One recursive
    query and one more. Raises NotFoundError for an unknown version."""
    d, m = store.tables.datasets, store.tables.models
    tree = (sa.select(d.c.version, sa.literal(0).label("depth"))
            .where(d.c.version == version).cte("tree", recursive=True))
    tree = tree.union_all(sa.select(d.c.version, tree.c.depth + 1)
                          .where(d.c.parent == tree.c.version, tree.c.depth < depth))
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(d.c.version, d.c.source, d.c.parent, tree.c.depth)
                            .join(tree, d.c.version == tree.c.version)
                            .order_by(tree.c.depth, d.c.version).limit(limit + 2)).all()
        if not rows:
            raise NotFoundError(f"dataset version {version} does not exist")
        derived = [r for r in rows if r.depth > 0]
        covered = [version] + [r.version for r in derived[:limit]]
        models = conn.execute(sa.select(m.c.version, m.c.dataset_version, m.c.metric, m.c.value)
                              .where(m.c.dataset_version.in_(covered))
                              .order_by(m.c.version).limit(limit + 1)).all()
    deeper = derived and derived[-1].depth == depth  # the last generation shown may have children
    return {"derived_datasets": [{"version": r.version, "source": r.source, "parent": r.parent}
                                 for r in derived[:limit]],
            "more_derived": len(derived) > limit or bool(deeper),
            "models": [dict(r._mapping) for r in models[:limit]],
            "more_models": len(models) > limit}


def model_card(store: Store, version: int) -> list[tuple[str, list[tuple[str, str]]]]:
    """The facts of model `version`'s card (`write_card` writes them as a page, with its ROC and
    calibration figures) as sections: (title, [(label, text), ...]) for the summary, the metrics
    against the trivial baseline, the metric by slice, the data and the reproducibility record.
    Reads the model's row only. Raises NotFoundError for an unknown version."""
    model = get_model(store, version)
    m = model.manifest
    row = model_row(model)
    imported = row["pipeline_source"] == "imported"
    verdict = "-"
    if row["lift"] is not None:
        verdict = (("beats" if row["lift"] > 0 else "does not beat")
                   + f" the trivial baseline by {row['lift']:+.4f} {model.metric}")
    evaluated_on = "Metrics on held-out rows"
    if imported:
        seen = (" (in-sample: the imported model may have seen them)" if m.get("in_sample")
                else " (never seen by the model, as the import said)")
        evaluated_on = f"Metrics on dataset v{m.get('dataset_version')}'s rows{seen}"
    metrics = [(k, _number(v)) for k, v in (m.get("metrics") or {}).items()]
    if row["baseline"] is not None:
        metrics.append((f"trivial baseline ({model.metric})", _number(row["baseline"])))
    slices = [(f"{column} = {level}", _number(value))
              for column, levels in (m.get("slices") or {}).items()
              for level, value in levels.items()]
    train_rows = m.get("train_rows")
    warnings = m.get("import_warnings")
    packages = ", ".join(f"{k} {v}" for k, v in (m.get("packages") or {}).items())
    return [
        ("Summary", [
            ("task", m.get("task", "-")), ("estimator", m.get("estimator", "-")),
            ("params", json.dumps(m.get("params", {}), sort_keys=True)),
            *([("pipeline", row["origin"])] if row["origin"] else []),
            *([("import warnings", "; ".join(warnings))] if warnings else []),
            ("why", m.get("reason") or "-"),
            ("is a model the right tool?", verdict)]),
        (evaluated_on, metrics),
        (f"{model.metric} by slice", slices),
        ("Data", [
            ("dataset version", str(m.get("dataset_version", model.dataset_version))),
            ("dataset content hash", str(m.get("dataset_hash", "-"))),
            ("schema version", str(m.get("schema_version", "-"))),
            ("training rows",
             "unknown: not trained by everloop" if train_rows is None else str(train_rows)),
            ("evaluation rows", str(m.get("eval_rows", "-"))),
            ("target", str(m.get("target", "-"))),
            ("classes", ", ".join(map(str, m.get("classes") or [])) or "-"),
            ("features", ", ".join(m.get("features") or []))]),
        ("Reproducibility record", [
            ("seed", str(m.get("seed", "-"))), ("spec hash", str(m.get("spec_hash") or "-")),
            ("user code hash", str(m.get("custom_code_hash") or "-")),
            ("git", json.dumps(m["git"]) if m.get("git") else "-"),
            ("threads", str(m.get("threads", "-"))), ("python", str(m.get("python", "-"))),
            ("platform", str(m.get("platform", "-"))), ("packages", packages or "-"),
            ("reproduce with", "nothing: an imported model has no training record" if imported
             else f"everloop reproduce {version}")]),
    ]


Importances = list[tuple[str, float]]
# (artifact, features) -> importances: artifacts are content-addressed, an answer never goes stale
_importances: OrderedDict[tuple[str, tuple[str, ...]], Importances | None] = OrderedDict()
_importances_lock = threading.Lock()


def feature_importances(store: Store, version: int) -> Importances | None:
    """The importance of each input feature to model `version`, from its estimator's own
    `feature_importances_` (tree ensembles: the mean decrease in impurity, summing to 1), largest
    first; None when the estimator has none (linear models, histogram gradient boosting, k-NN).

    The estimator sees encoded columns: the importances of the columns made from one input column
    (one-hot categories "plan_basic", date parts "when_hour") are summed into that column's. Loads
    the model artifact the first time and keeps the answer per artifact (artifacts never change).
    Raises NotFoundError for an unknown version, StoreError/IntegrityError when the artifact is
    missing or altered."""
    model = get_model(store, version)
    features = list(model.manifest.get("features") or [])
    key = (model.artifact, tuple(features))
    with _importances_lock:
        if key in _importances:
            _importances.move_to_end(key)
            return _importances[key]
    found = _importances_of(load_model(store, version).pipeline, features)
    with _importances_lock:
        _importances[key] = found
        while len(_importances) > IMPORTANCES_KEPT:
            _importances.popitem(last=False)
    return found


def _importances_of(pipeline: Any, features: list[str]) -> Importances | None:
    steps: list[Any] = []
    estimator = pipeline
    while isinstance(estimator, Pipeline):  # nested pipelines: the transforms, then the model
        steps += [step for _, step in estimator.steps[:-1]]
        estimator = estimator.steps[-1][1]
    values = getattr(estimator, "feature_importances_", None)
    if values is None:
        return None
    values = np.asarray(values, dtype=float).ravel()
    names = _encoded_names(steps, features, estimator, len(values))
    totals: dict[str, float] = {}
    for name, value in zip(names, values):
        source = _input_column(name, features)
        totals[source] = totals.get(source, 0.0) + float(value)
    return sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))


def _encoded_names(steps: list[Any], features: list[str], estimator: Any, count: int) -> list[str]:
    """The names of the columns the estimator was fitted on: its own `feature_names_in_`, else what
    the transforms say they make, else the input features when the counts agree, else x0, x1, ..."""
    own = getattr(estimator, "feature_names_in_", None)
    if own is not None and len(own) == count:
        return [str(n) for n in own]
    names: Any = features
    try:
        for step in steps:
            names = step.get_feature_names_out(names)
        if len(names) == count:
            return [str(n) for n in names]
    except Exception:  # a transform that cannot name its output (a user's, an imported one)
        pass
    return list(features) if len(features) == count else [f"x{i}" for i in range(count)]


def _input_column(name: str, features: list[str]) -> str:
    """The input column an encoded column came from: itself, or the longest feature it is prefixed
    by ("plan_basic" -> "plan"); unknown names stay as they are."""
    if name in features:
        return name
    prefixes = [f for f in features if name.startswith(f + "_")]
    return max(prefixes, key=len) if prefixes else name


def compare_models(store: Store, a: int, b: int) -> dict[str, Any]:
    """Model versions `a` and `b` side by side: `a` and `b` (`model_row`s), `metrics` (one row per
    metric either recorded: a, b, `change` = how much better b is than a in the metric's units,
    positive when better, and `better`: "a", "b", "same" or None when either is missing), `slices`
    (each slice of the main metric: a, b, change), `params` (the estimator and each parameter of
    either: a, b, `differs`), `importances` ({"a": ..., "b": ...}: `feature_importances`, or None
    when the estimator has none, or the error text when the artifact cannot be read),
    `slice_metric`, `same_metric` and `same_dataset`. Raises NotFoundError for an unknown
    version."""
    ma, mb = get_model(store, a), get_model(store, b)
    fa, fb = ma.manifest, mb.manifest
    xa, xb = fa.get("metrics") or {}, fb.get("metrics") or {}
    metrics = [{"metric": name, "a": xa.get(name), "b": xb.get(name)}
               | _change(name, xa.get(name), xb.get(name)) for name in _union(xa, xb)]
    slices = []
    la, lb = fa.get("slices") or {}, fb.get("slices") or {}
    metric = mb.metric
    for column in _union(la, lb):
        in_a, in_b = la.get(column, {}), lb.get(column, {})
        for level in _union(in_a, in_b):
            x, y = in_a.get(level), in_b.get(level)
            slices.append({"slice": f"{column}={level}", "column": column, "level": level,
                           "a": x, "b": y} | _change(metric, x, y))
    pa, pb = fa.get("params") or {}, fb.get("params") or {}
    params = [{"param": "estimator", "a": fa.get("estimator"), "b": fb.get("estimator"),
               "differs": fa.get("estimator") != fb.get("estimator")}]
    for key in sorted(set(pa) | set(pb)):
        x, y = pa.get(key), pb.get(key)
        params.append({"param": key, "a": x, "b": y,
                       "differs": key not in pa or key not in pb or x != y})
    return {"a": model_summary(store, a), "b": model_summary(store, b), "metrics": metrics,
            "slices": slices, "params": params, "slice_metric": metric,
            "same_metric": ma.metric == mb.metric,
            "importances": {"a": _importances_or_error(store, a),
                            "b": _importances_or_error(store, b)},
            "same_dataset": ma.dataset_version == mb.dataset_version}


def _union(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys of `a`, then those only `b` has."""
    return list(a) + [k for k in b if k not in a]


def _importances_or_error(store: Store, version: int) -> Importances | None | str:
    try:
        return feature_importances(store, version)
    except EverloopError as exc:  # a missing or altered artifact: say so beside the other model's
        return str(exc)


def _change(metric: str, a: float | None, b: float | None) -> dict[str, Any]:
    if a is None or b is None or not (np.isfinite(a) and np.isfinite(b)):
        return {"change": None, "better": None, "higher_is_better": higher_is_better(metric)}
    change = improvement(metric, b, a)
    return {"change": change, "better": "same" if change == 0 else ("b" if change > 0 else "a"),
            "higher_is_better": higher_is_better(metric)}


def _number(value: Any) -> str:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "-" if value is None else str(value)
    return f"{x:.4f}" if np.isfinite(x) else "-"

