"""The model card: one self-contained HTML page per model version, for people deciding whether to trust it."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_curve

from everloop.registry._import import origin_text
from everloop.registry._registry import alias_history, eval_frame, get_model, list_models, load_model
from everloop.store import Store
from everloop.train import as_labels, improvement


def write_card(store: Store, version: int, path: str | Path) -> Path:
    """Write model `version`'s card: purpose and lineage, metrics against the trivial baseline, slices,
    calibration (classifiers) or residuals (regressors), the features, and the reproducibility record.
    An imported model's card says "imported from PATH (sha256 ...)", that its metrics are in-sample when
    it may have seen the rows, and that it has no training record; a clone refit from one names both."""
    model = get_model(store, version)
    m = model.manifest
    aliases = next((mv.aliases for mv in list_models(store) if mv.version == version), [])
    lift = improvement(model.metric, model.value, m["baseline"][model.metric])
    verdict = ("beats" if lift > 0 else "does not beat") + f" the trivial baseline by {lift:+.4f} {model.metric}"
    imported = m.get("pipeline_source") == "imported"
    origin = origin_text(m)
    evaluated_on = "Metrics on held-out rows"
    if imported:
        evaluated_on = (f"Metrics on dataset v{m['dataset_version']}'s rows"
                        + (" (in-sample: the imported model may have seen them)" if m.get("in_sample") else
                           " (never seen by the model, as the import said)"))
    sections = [
        _table("Summary", [
            ("task", m["task"]), ("estimator", m["estimator"]), ("params", json.dumps(m.get("params", {}))),
            ("imported" if imported else "trained", time.strftime("%Y-%m-%d %H:%M:%S",
                                                                  time.localtime(model.created_at))),
            *([("pipeline", origin)] if origin else []),
            *([("import warnings", "; ".join(m["import_warnings"]))] if m.get("import_warnings") else []),
            ("why", m.get("reason") or "-"), ("aliases now", ", ".join(aliases) or "-"),
            ("is a model the right tool?", verdict),
        ]),
        _table(evaluated_on, [(k, f"{v:.4f}" if v is not None else "-") for k, v in m["metrics"].items()]
               + [(f"trivial baseline ({model.metric})", f"{m['baseline'][model.metric]:.4f}")]),
        _slices(m),
        _table("Data", [("dataset version", m["dataset_version"]), ("dataset content hash", m["dataset_hash"]),
                        ("schema version", m["schema_version"]),
                        ("training rows", "unknown: not trained by everloop" if m["train_rows"] is None
                         else m["train_rows"]),
                        ("evaluation rows", m["eval_rows"]), ("target", m["target"]),
                        ("classes", ", ".join(map(str, m.get("classes") or [])) or "-"),
                        ("features", ", ".join(m["features"]))]),
        _table("Reproducibility record", [
            ("seed", m["seed"]), ("spec hash", m.get("spec_hash")), ("user code hash", m.get("custom_code_hash") or "-"),
            ("git", json.dumps(m.get("git")) if m.get("git") else "-"), ("threads", m.get("threads")),
            ("python", m.get("python")), ("platform", m.get("platform")),
            ("packages", ", ".join(f"{k} {v}" for k, v in m.get("packages", {}).items())),
            ("reproduce with", "nothing: an imported model has no training record" if imported
             else f"everloop reproduce {version}")]),
        _table("Alias history", [(f"{h['alias']}: {'v' + str(h['from_version']) if h['from_version'] else 'none'}"
                                  f" -> v{h['to_version']}",
                                  f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(h['created_at']))} by "
                                  f"{h['actor']}: {h['reason']}")
                                 for h in alias_history(store) if version in (h["from_version"], h["to_version"])]),
    ]
    figures = _figures(store, version)
    plots = "".join(f.to_html(full_html=False, include_plotlyjs="inline" if n == 0 else False)
                    for n, f in enumerate(figures))
    title = f"{m['name']} model v{version}"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}} table{{border-collapse:collapse;
margin-bottom:1.5em}} td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left;vertical-align:top}}
th{{background:#f3f3f3}}</style></head><body><h1>Model card: {html.escape(title)}</h1>
{''.join(sections)}{plots}</body></html>"""
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def _table(title: str, rows: list[tuple[Any, Any]]) -> str:
    if not rows:
        return ""
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<h2>{html.escape(title)}</h2><table>{body}</table>"


def _slices(manifest: dict[str, Any]) -> str:
    rows = [(f"{column} = {level}", f"{value:.4f}" if value is not None and np.isfinite(value) else "-")
            for column, levels in manifest.get("slices", {}).items() for level, value in levels.items()]
    return _table(f"{manifest['metric']} by slice", rows)


def _figures(store: Store, version: int) -> list[go.Figure]:
    model = load_model(store, version)
    frame = eval_frame(store, model.manifest)
    features, _ = model.conform(frame)
    predictions = model.predict_conformed(features)
    target = model.manifest["target"]
    if model.task == "regression":
        residuals = frame[target].to_numpy(dtype=float) - predictions.labels
        fig = go.Figure(go.Histogram(x=residuals, nbinsx=50))
        fig.update_layout(title="Residuals on held-out rows (actual - predicted)", height=380)
        return [fig]
    y = as_labels(frame[target])
    figures = []
    if len(model.classes) == 2:
        positive = model.classes[1]
        truth = (y == positive).astype(int)
        fpr, tpr, _ = roc_curve(truth, predictions.proba[:, 1])
        roc = go.Figure([go.Scatter(x=fpr, y=tpr, mode="lines", name="model"),
                         go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line={"dash": "dot"})])
        roc.update_layout(title=f"ROC curve (positive class {positive})", xaxis_title="false positive rate",
                          yaxis_title="true positive rate", height=420, width=520)
        figures.append(roc)
        observed, predicted = calibration_curve(truth, predictions.proba[:, 1], n_bins=10, strategy="quantile")
    else:
        confidence = predictions.proba.max(axis=1)
        correct = (predictions.labels.astype(y.dtype) == y).astype(int)
        observed, predicted = calibration_curve(correct, confidence, n_bins=10, strategy="quantile")
    reliability = go.Figure([go.Scatter(x=predicted, y=observed, mode="lines+markers", name="model"),
                             go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect", line={"dash": "dot"})])
    reliability.update_layout(title="Calibration: predicted probability vs observed frequency", height=420,
                              width=520, xaxis_title="predicted", yaxis_title="observed")
    figures.append(reliability)
    return figures
