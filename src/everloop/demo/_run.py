"""`everloop demo`: the whole loop on the built-in churn scenario, against a real server.

ingest -> train -> promote -> serve -> stable traffic (healthy) -> shifted traffic with labels
(drift and decay) -> the loop retrains -> gate -> promote -> the server swaps -> the metric on
shifted traffic recovers. Then the retrained model is compared with a model trained directly on
shifted data, on the same held-out shifted rows.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import pandas as pd
import yaml

from everloop import data, registry, train
from everloop.demo._scenario import START, make_churn
from everloop.loop import run_once
from everloop.monitor import list_runs, write_report
from everloop.serve import ServerProcess
from everloop.spec import load_spec
from everloop.store import STORE_DIR, Store
from everloop.train import score_labels

TARGET = "churned"
ID = "customer_id"
TIME = "event_time"


@dataclass(frozen=True)
class DemoConfig:
    history_rows: int = 10_000
    window_rows: int = 3_000
    stable_windows: int = 2
    shifted_windows: int = 3  # the first triggers retraining; the others measure the recovery
    batch_rows: int = 100
    seed: int = 7


@dataclass
class DemoResult:
    folder: Path
    windows: list[dict[str, Any]] = field(default_factory=list)
    comparison: dict[str, float] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    report: Path | None = None

    @property
    def drift_before_shift(self) -> bool:
        return any(w["drift"] for w in self.windows if w["phase"] == "stable")

    @property
    def drift_first_shifted_window(self) -> bool:
        shifted = [w for w in self.windows if w["phase"] == "shifted"]
        return bool(shifted) and shifted[0]["drift"]

    @property
    def recovered(self) -> bool:
        c = self.comparison
        return (c["retrained"] >= c["direct"] - 0.02 * abs(c["direct"])) and c["retrained"] > c["old"]

    @property
    def passed(self) -> bool:
        return (not self.drift_before_shift and self.drift_first_shifted_window and self.recovered
                and self.versions.get("after", 0) > self.versions.get("before", 0))

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "passed": self.passed, "drift_before_shift": self.drift_before_shift,
                "drift_first_shifted_window": self.drift_first_shifted_window, "recovered": self.recovered,
                "comparison": self.comparison, "versions": self.versions, "windows": self.windows,
                "report": str(self.report) if self.report else None}


def demo_spec() -> dict[str, Any]:
    """The demo's project file: what a user would write for this data."""
    return {
        "name": "churn",
        "data": {"source": "data/customers.csv", "target": TARGET, "id": ID, "timestamp": TIME},
        "model": {"estimator": "sklearn.ensemble.HistGradientBoostingClassifier",
                  "params": {"max_iter": 200, "learning_rate": 0.05}, "seed": 42},
        "evaluation": {"split": {"holdout": 0.2}, "metric": "roc_auc", "slices": ["plan"]},
        "promotion": {"min_metric": 0.7, "max_regression": 0.005},
        "monitoring": {"window": {"rows": 3000}, "drift": {"max_drifted_share": 0.2},
                       "performance": {"max_drop": 0.03}},
        "retraining": {"triggers": ["drift", "performance"], "data": {"recent_rows": 3000},
                       "cooldown_minutes": 60},
        "serving": {"max_batch_rows": 10000, "log_predictions": True, "reload_seconds": 0.5},
    }


def run_demo(folder: str | Path, config: DemoConfig = DemoConfig(),
             say: Callable[[str], None] = print, progress: Callable[[str, int], Any] | None = None) -> DemoResult:
    """Run the whole loop in `folder` (its store is started afresh) and return what happened."""
    folder = Path(folder).resolve()
    result = DemoResult(folder)
    _fresh_project(folder, config)
    spec = load_spec(folder)
    store = Store.for_project(folder)

    dataset = data.ingest(store, spec, base=folder)
    say(f"ingested dataset v{dataset.version}: {dataset.rows} rows x {dataset.columns} columns")
    trained = train.train(store, spec, dataset.version, reason="initial model")
    say(f"trained model v{trained.version}: {trained.metric} {trained.value:.4f} "
        f"(trivial baseline {trained.baseline:.4f}, lift {trained.lift:+.4f})")
    registry.promote(store, spec, trained.version, reason="initial model")
    result.versions["before"] = trained.version
    say(f"promoted model v{trained.version} to production")

    rng_seed = config.seed * 1000
    next_id = config.history_rows
    clock = START + pd.Timedelta(minutes=config.history_rows)
    phases = ["stable"] * config.stable_windows + ["shifted"] * config.shifted_windows
    test_rows: list[pd.DataFrame] = []
    with ServerProcess(folder) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        say(f"serving at {server.url} (log: {server.log_file})")
        for n, phase in enumerate(phases, start=1):
            rows = make_churn(config.window_rows, shifted=phase == "shifted", seed=rng_seed + n, start=clock,
                              id_offset=next_id)
            next_id += len(rows)
            clock += pd.Timedelta(minutes=len(rows))
            served_version = _send(client, rows, config.batch_rows, progress, f"window {n} ({phase})")
            decision = run_once(store, spec)  # monitors the window, then acts on it
            outcome = list_runs(store, limit=1)[-1]
            drift = outcome.get("drift") or {}
            row = {"window": n, "phase": phase, "model": f"v{served_version}", "status": outcome["status"],
                   "drift": bool(drift.get("dataset_drift")), "drifted_share": drift.get("drifted_share", 0.0),
                   "metric": outcome["performance"].get("value"), "loop": decision.action}
            result.windows.append(row)
            say(f"window {n} ({phase}): model v{served_version}, {row['status']}, "
                f"{spec.evaluation.metric} {row['metric'] or float('nan'):.4f}; loop: {decision.reason}")
            if decision.action == "promoted":
                server.wait_for_version(decision.model_version)
                result.versions["after"] = decision.model_version
                say(f"the server swapped to model v{decision.model_version} without a restart")
            elif phase == "shifted" and result.versions.get("after"):
                test_rows.append(rows)

    result.comparison = _compare(store, spec, config, result.versions, test_rows)
    runs = list_runs(store, limit=len(phases))
    first_shift = config.stable_windows  # index of the first shifted window: the drift the loop acted on
    result.report = write_report(
        folder / "report.html", runs, title=f"everloop demo: {spec.name}", spec=spec,
        focus=runs[first_shift] if len(runs) > first_shift else None,
        tables={"Windows": [_fmt_row(w) for w in result.windows],
                "On held-out shifted traffic": [_fmt_row(result.comparison)]})
    return result


def _fresh_project(folder: Path, config: DemoConfig) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder / STORE_DIR, ignore_errors=True)
    (folder / "data").mkdir(exist_ok=True)
    make_churn(config.history_rows, seed=config.seed).to_csv(folder / "data" / "customers.csv", index=False)
    spec = demo_spec()
    spec["monitoring"]["window"]["rows"] = config.window_rows
    spec["retraining"]["data"]["recent_rows"] = config.window_rows
    (folder / "everloop.yaml").write_text("# everloop demo project: customer churn with a shift\n"
                                          + yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")


def _send(client: httpx.Client, rows: pd.DataFrame, batch: int, progress: Callable[[str, int], Any] | None,
          label: str) -> int:
    """Send rows to /predict in batches, then their labels to /feedback; returns the model version that answered."""
    features = json.loads(rows.drop(columns=[TARGET, ID, TIME]).to_json(orient="records"))
    labels = rows[TARGET].tolist()
    tick = progress(label, len(rows)) if progress else None
    version = None
    for start in range(0, len(features), batch):
        answer = client.post("/predict", json={"instances": features[start:start + batch]})
        answer.raise_for_status()
        body = answer.json()
        version = body["model_version"]
        feedback = [{"id": p["id"], "label": y} for p, y in zip(body["predictions"], labels[start:start + batch])]
        client.post("/feedback", json={"labels": feedback}).raise_for_status()
        if tick:
            tick(len(feedback))
    return version


def _compare(store: Store, spec: Any, config: DemoConfig, versions: dict[str, int],
             test_rows: list[pd.DataFrame]) -> dict[str, float]:
    """The old, the retrained and a directly trained model, scored on the same held-out shifted rows."""
    if not test_rows or "after" not in versions:
        return {"old": float("nan"), "retrained": float("nan"), "direct": float("nan")}
    test = pd.concat(test_rows, ignore_index=True)
    direct = _train_direct(spec, make_churn(config.window_rows, shifted=True, seed=config.seed * 1000 + 999,
                                            start=START, id_offset=10_000_000))
    out = {}
    for name, model in (("old", registry.load_model(store, versions["before"])),
                        ("retrained", registry.load_model(store, versions["after"])), ("direct", direct)):
        predictions = model.predict(test)
        out[name] = score_labels(spec.evaluation.metric, test[TARGET], predictions.labels, predictions.proba,
                                 predictions.classes)
    return out


def _train_direct(spec: Any, rows: pd.DataFrame) -> train.TrainedModel:
    """A model trained with the same spec straight on shifted data, in a throwaway store."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp))
        dataset = data.ingest_frame(store, spec, rows, source="shifted data, directly")
        version = train.train(store, spec, dataset.version).version
        model = registry.load_model(store, version)
        store.close()
    return model


def _fmt_row(window: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) and np.isfinite(v) else v) for k, v in window.items()}
