"""`everloop demo`: the whole loop on the built-in churn scenario, against a real server.

ingest -> train -> promote -> serve -> stable traffic (healthy) -> shifted traffic with labels
(drift and decay) -> the loop retrains -> gate -> promote -> the server swaps -> the metric on
shifted traffic recovers. Then the retrained model is compared with a model trained directly on
shifted data, on the same held-out shifted rows.

With `rollout="canary"` (or "shadow") the loop does not promote the retrained model directly: it
starts a rollout (`rollout.mode` in the demo's project file), and the demo keeps sending shifted
windows, with labels, one loop turn after each, until the loop promotes or rolls the candidate
back (or `DemoConfig.rollout_windows` windows have passed); requests carry the customer id, so a
canary's split is sticky per customer. The held-out traffic is then the shifted windows after the
promotion.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import pandas as pd
import yaml

from everloop import data, registry, train
from everloop.errors import EverloopError
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
ROLLOUT_MODES = ("direct", "canary", "shadow")
CANARY_STEPS = [20, 50, 100]  # percent of customers the candidate answers, step by step


@dataclass(frozen=True)
class DemoConfig:
    history_rows: int = 10_000
    window_rows: int = 3_000
    stable_windows: int = 2
    shifted_windows: int = 3  # the first triggers retraining; the others measure the recovery
    batch_rows: int = 100
    seed: int = 7
    rollout: str = "direct"  # how the loop puts the retrained model live: direct, canary or shadow
    rollout_windows: int = 6  # canary/shadow: windows sent after the rollout starts before the demo gives up


@dataclass
class DemoResult:
    folder: Path
    windows: list[dict[str, Any]] = field(default_factory=list)
    comparison: dict[str, float] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    report: Path | None = None
    mode: str = "direct"  # DemoConfig.rollout
    # canary/shadow: the loop's rollout (see `_Rollout.to_dict`); None until one started, and in direct mode
    rollout: dict[str, Any] | None = None

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
    def rollout_promoted(self) -> bool:
        """Direct mode: True (no rollout to wait for); canary/shadow: the loop promoted its rollout."""
        return self.mode == "direct" or (self.rollout is not None and self.rollout["outcome"] == "promoted")

    @property
    def passed(self) -> bool:
        return (not self.drift_before_shift and self.drift_first_shifted_window and self.recovered
                and self.versions.get("after", 0) > self.versions.get("before", 0) and self.rollout_promoted)

    def to_dict(self) -> dict[str, Any]:
        out = {"folder": str(self.folder), "passed": self.passed, "drift_before_shift": self.drift_before_shift,
               "drift_first_shifted_window": self.drift_first_shifted_window, "recovered": self.recovered,
               "comparison": self.comparison, "versions": self.versions, "windows": self.windows,
               "report": str(self.report) if self.report else None}
        if self.mode != "direct":  # direct: the output is as it always was
            out |= {"mode": self.mode, "rollout_promoted": self.rollout_promoted, "rollout": self.rollout}
        return out


@dataclass
class _Rollout:
    """The loop's rollout as the demo saw it, turn by turn."""

    id: int
    mode: str
    candidate: int
    production: int
    started_window: int
    shares: list[float]  # canary: the shares it answered, in order (the first step, then each step up)
    sample: float | None  # shadow: percent of production's rows the candidate scores
    # per loop turn from the start on: the window, the decision, the canary's share during that window
    # (at the start: the first step) and the decision's reason
    turns: list[dict[str, Any]] = field(default_factory=list)
    outcome: str = "active"  # promoted, rolled_back, or unfinished (the demo gave up)
    reason: str = ""  # of the latest decision on it
    evidence: dict[str, Any] | None = None  # the numbers of the latest verdict (monitor.judge_rollout's)

    @property
    def active(self) -> bool:
        return self.outcome == "active"

    @property
    def share(self) -> float | None:
        """The canary share the candidate answers now (None: shadow, or not active)."""
        return self.shares[-1] if self.active and self.mode == "canary" else None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "mode": self.mode, "candidate": self.candidate, "production": self.production,
                "started_after_window": self.started_window, "shares": self.shares, "sample": self.sample,
                "windows": len(self.turns), "turns": self.turns, "outcome": self.outcome, "reason": self.reason,
                "evidence": self.evidence}


def answered_by(window: dict[str, Any]) -> str:
    """A window's versions and the share of its rows each answered (`v1 80% · v2 20%`), and a shadow
    candidate scoring beside production (`(v2 shadows)`); "" for a window without `answered`."""
    counts = window.get("answered") or {}
    total = sum(counts.values())
    text = " · ".join(f"{version} {rows / total:.0%}" for version, rows in sorted(
        counts.items(), key=lambda kv: int(kv[0].lstrip("v")))) if total else ""
    rollout = window.get("rollout")
    if rollout and rollout["mode"] == "shadow":
        text += f" (v{rollout['candidate']} shadows)"
    return text


def rollout_settings(mode: str, window_rows: int) -> dict[str, Any]:
    """The project file's `rollout` and `promotion.live` for a rollout mode, as a user of this data would
    set them so that a rollout can finish within a few windows of `window_rows` rows:
    {"rollout": {...}, "live": {...}}. Raises EverloopError for a mode other than canary or shadow."""
    if mode not in ("canary", "shadow"):
        raise EverloopError(f"rollout mode {mode!r}: expected canary or shadow")
    rollout: dict[str, Any] = {"mode": mode}
    if mode == "canary":
        rollout["steps"] = list(CANARY_STEPS)
    else:
        rollout["shadow_sample"] = 100
    # The first canary step answers about 20% of a window's rows, all labelled in the demo: a tenth of a
    # window (half of that) is enough for a verdict, so the canary can move one step per window.
    verdict_rows = max(window_rows // 10, 50)
    return {"rollout": rollout, "live": {"min_rows": verdict_rows, "min_labelled_rows": verdict_rows}}


_LIVE_COMMENT = {  # why the demo's promotion.live thresholds fit its windows, in its project file
    "canary": ("  # judged on live traffic: the first canary step answers ~20% of a {rows}-row window, all of it\n"
               "  # labelled in the demo, so {verdict} rows (a tenth of a window) are enough for a verdict and the\n"
               "  # canary can move one step per window; the other promotion.live thresholds are the defaults\n"),
    "shadow": ("  # judged on live traffic: the shadow scores every row of a {rows}-row window, all of it labelled\n"
               "  # in the demo, so {verdict} rows (a tenth of a window) are enough for a verdict after one window;\n"
               "  # the other promotion.live thresholds are the defaults\n")}
_ROLLOUT_COMMENT = {
    "canary": "# the loop tries a retrained model on live traffic before it replaces production: it answers 20%,\n"
              "# then 50%, then 100% of the customers (sticky per customer_id), one step per passing turn\n",
    "shadow": "# the loop tries a retrained model on live traffic before it replaces production: it scores every\n"
              "# row beside production, off the response path, and is promoted at its first passing turn\n"}


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
             say: Callable[[str], None] = print, progress: Callable[[str, int], Any] | None = None, *,
             rollout: str | None = None) -> DemoResult:
    """Run the whole loop in `folder` (its store is started afresh) and return what happened.

    `rollout` (default: `config.rollout`, "direct"): "direct", the loop promotes the retrained model
    at once; "canary" or "shadow", the loop tries it on live traffic first (steps of 20, 50, 100% of
    the customers, or scoring every row beside production) and the demo keeps sending shifted windows
    until the loop promotes or rolls it back, at most `config.rollout_windows` of them. `say` gets one
    line per step, `progress(label, rows)` a callable advanced by the rows each batch sent.
    Raises EverloopError for an unknown rollout mode, or when the server does not follow a change
    within 30 s."""
    if rollout is not None:
        config = replace(config, rollout=rollout)
    if config.rollout not in ROLLOUT_MODES:
        raise EverloopError(f"rollout {config.rollout!r}: expected one of {', '.join(ROLLOUT_MODES)}")
    mode = config.rollout
    folder = Path(folder).resolve()
    result = DemoResult(folder, mode=mode)
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
    planned = config.stable_windows + config.shifted_windows
    test_rows: list[pd.DataFrame] = []
    live: _Rollout | None = None  # the loop's rollout, once it started one
    focus = None  # the monitor's run of the first shifted window: the drift the loop acted on
    with ServerProcess(folder) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        say(f"serving at {server.url} (log: {server.log_file})")
        n = 0
        while n < planned or _more_windows(mode, live, test_rows, config, say):
            n += 1
            phase = "stable" if n <= config.stable_windows else "shifted"
            rows = make_churn(config.window_rows, shifted=phase == "shifted", seed=rng_seed + n, start=clock,
                              id_offset=next_id)
            next_id += len(rows)
            clock += pd.Timedelta(minutes=len(rows))
            during = live if live is not None and live.active else None
            served_version, answered = _send(client, rows, config.batch_rows, progress, f"window {n} ({phase})",
                                             with_ids=mode != "direct")
            decision = run_once(store, spec)  # monitors the window, then acts on it
            outcome = list_runs(store, limit=1)[-1]
            if n == config.stable_windows + 1:
                focus = outcome
            drift = outcome.get("drift") or {}
            row = {"window": n, "phase": phase, "model": f"v{served_version}", "status": outcome["status"],
                   "drift": bool(drift.get("dataset_drift")), "drifted_share": drift.get("drifted_share", 0.0),
                   "metric": outcome["performance"].get("value"), "loop": decision.action}
            served = f"model v{served_version}"
            if mode != "direct":  # which versions answered, under which rollout, and why the loop did what it did
                row |= {"answered": {f"v{v}": k for v, k in sorted(answered.items())},
                        "rollout": None if during is None else {"id": during.id, "mode": during.mode,
                                                                "candidate": during.candidate,
                                                                "share": during.share},
                        "reason": decision.reason}
                served = f"answered by {answered_by(row)}" + (
                    f" (canary at {during.share:g}%)" if during is not None and during.share is not None else "")
            result.windows.append(row)
            say(f"window {n} ({phase}): {served}, {row['status']}, "
                f"{spec.evaluation.metric} {row['metric'] or float('nan'):.4f}; loop: {decision.reason}")
            if decision.action == "promoted":
                server.wait_for_version(decision.model_version)
                result.versions["after"] = decision.model_version
                say(f"the server swapped to model v{decision.model_version} without a restart")
            elif phase == "shifted" and result.versions.get("after"):
                test_rows.append(rows)
            if mode != "direct":
                live = _follow(decision, live, n, server, client, result, say)
                result.rollout = live.to_dict() if live is not None else None

    result.comparison = _compare(store, spec, config, result.versions, test_rows)
    runs = list_runs(store)  # a fresh store: every window this demo judged
    tables = {"Windows": [_report_row(w) for w in result.windows],
              "On held-out shifted traffic": [_fmt_row(result.comparison)]}
    if live is not None:
        tables["Rollout, turn by turn"] = [_fmt_row(t) for t in live.turns]
    result.report = write_report(folder / "report.html", runs, title=f"everloop demo: {spec.name}", spec=spec,
                                 focus=focus, tables=tables)
    return result


def _more_windows(mode: str, live: _Rollout | None, test_rows: list[pd.DataFrame], config: DemoConfig,
                  say: Callable[[str], None]) -> bool:
    """After the planned windows: another shifted window while the loop's rollout is active (at most
    `config.rollout_windows` after it started; then the demo gives up and says so), and one after its
    promotion when no shifted window has been held out yet."""
    if mode == "direct" or live is None:
        return False
    if live.active:
        sent = len(live.turns) - 1  # the windows sent since it started (the first turn is the start)
        if sent < config.rollout_windows:
            return True
        live.outcome = "unfinished"
        say(f"the {live.mode} rollout {live.id} of model v{live.candidate} did not finish within "
            f"{config.rollout_windows} windows after it started: giving up (it stays active; "
            "'everloop rollout status' in the demo folder says where it stands)")
        return False
    return live.outcome == "promoted" and not test_rows


def _follow(decision: Any, live: _Rollout | None, window: int, server: ServerProcess, client: httpx.Client,
            result: DemoResult, say: Callable[[str], None]) -> _Rollout | None:
    """Track the loop's rollout from this turn's decision, and wait until the server serves what the
    decision changed (the candidate loaded at its share, a new share, the promoted model, or production
    alone after a rollback) before the next window is sent. Returns the rollout (None: none started)."""
    about = decision.rollout or {}
    if decision.action == "rollout_started":
        canary = about["mode"] == "canary"
        live = _Rollout(about["id"], about["mode"], about["candidate"], about["production"], window,
                        [float(about["share"])] if canary else [], None if canary else float(about["sample"]))
        live.turns.append({"window": window, "decision": decision.action, "share": live.share,
                           "reason": decision.reason})
        live.reason = decision.reason
        _wait_for_server(client, f"load candidate v{live.candidate} of rollout {live.id}", lambda r: (
            r is not None and r["id"] == live.id and r["loaded"] and (not canary or r["share"] == live.share)))
        say(f"the server answers {live.share:g}% of the customers with v{live.candidate} (sticky per customer_id)"
            if canary else f"the server scores every row with v{live.candidate} too, off the response path")
        return live
    if live is None or not live.active or about.get("id") != live.id:
        return live
    live.turns.append({"window": window, "decision": decision.action, "share": live.share,
                       "reason": decision.reason})
    live.reason = decision.reason
    live.evidence = {k: v for k, v in about.items() if k not in ("id", "verdict")} or live.evidence
    if decision.action == "rollout_step":
        live.shares.append(float(about["next_share"]))
        _wait_for_server(client, f"step rollout {live.id} to {live.share:g}%",
                         lambda r: r is not None and r["id"] == live.id and r.get("share") == live.share)
        say(f"the server answers {live.share:g}% of the customers with v{live.candidate}")
    elif decision.action == "rollout_promoted":
        live.outcome = "promoted"
        server.wait_for_version(live.candidate)
        result.versions["after"] = live.candidate
        say(f"the server swapped to model v{live.candidate} without a restart")
    elif decision.action == "rollout_rolled_back":
        live.outcome = "rolled_back"
        _wait_for_server(client, f"drop candidate v{live.candidate}", lambda r: r is None or r["id"] != live.id)
        say(f"the server answers with v{live.production} only; v{live.candidate} is served no more")
    return live


def _wait_for_server(client: httpx.Client, what: str, check: Callable[[dict[str, Any] | None], bool],
                     timeout: float = 30.0) -> None:
    """Poll /ready until `check(its "rollout", or None)` holds; EverloopError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        answer = client.get("/ready")
        body = answer.json() if answer.status_code == 200 else {}
        if check(body.get("rollout")):
            return
        if time.monotonic() > deadline:
            raise EverloopError(f"the server did not {what} within {timeout:g}s (/ready: {body})")
        time.sleep(0.1)


def _fresh_project(folder: Path, config: DemoConfig) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder / STORE_DIR, ignore_errors=True)
    (folder / "data").mkdir(exist_ok=True)
    make_churn(config.history_rows, seed=config.seed).to_csv(folder / "data" / "customers.csv", index=False)
    spec = demo_spec()
    spec["monitoring"]["window"]["rows"] = config.window_rows
    spec["retraining"]["data"]["recent_rows"] = config.window_rows
    if config.rollout != "direct":
        settings = rollout_settings(config.rollout, config.window_rows)
        spec["promotion"]["live"] = settings["live"]
        spec["rollout"] = settings["rollout"]
    text = yaml.safe_dump(spec, sort_keys=False)
    if config.rollout != "direct":  # say why, where a user reads the settings
        text = _comment(text, "\nrollout:\n", _ROLLOUT_COMMENT[config.rollout])
        text = _comment(text, "\n  live:\n", _LIVE_COMMENT[config.rollout].format(
            rows=config.window_rows, verdict=spec["promotion"]["live"]["min_rows"]))
    (folder / "everloop.yaml").write_text("# everloop demo project: customer churn with a shift\n" + text,
                                          encoding="utf-8")


def _comment(text: str, before: str, comment: str) -> str:
    """`text` with `comment` (whole lines) inserted before its one line `before` (with its newlines)."""
    assert text.count(before) == 1, f"{before!r} in the demo's project file"
    return text.replace(before, "\n" + comment + before.lstrip("\n"))


def _send(client: httpx.Client, rows: pd.DataFrame, batch: int, progress: Callable[[str, int], Any] | None,
          label: str, with_ids: bool = False) -> tuple[int, Counter]:
    """Send rows to /predict in batches, then their labels to /feedback. `with_ids`: each row carries its
    customer_id (the project's id column), so a canary's split is sticky per customer. Returns the model
    version the last batch names (the one that answered all its rows, else production) and the rows each
    version answered (a canary names the version per row)."""
    dropped = [TARGET, TIME] if with_ids else [TARGET, ID, TIME]
    features = json.loads(rows.drop(columns=dropped).to_json(orient="records"))
    labels = rows[TARGET].tolist()
    tick = progress(label, len(rows)) if progress else None
    version = None
    answered: Counter = Counter()
    for start in range(0, len(features), batch):
        answer = client.post("/predict", json={"instances": features[start:start + batch]})
        answer.raise_for_status()
        body = answer.json()
        version = body["model_version"]
        answered.update(p.get("model_version", version) for p in body["predictions"])
        feedback = [{"id": p["id"], "label": y} for p, y in zip(body["predictions"], labels[start:start + batch])]
        client.post("/feedback", json={"labels": feedback}).raise_for_status()
        if tick:
            tick(len(feedback))
    return version, answered


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


def _report_row(window: dict[str, Any]) -> dict[str, Any]:
    """A window for the report's table: a rollout's versions as one text (`answered_by`), no reason."""
    if "answered" not in window:
        return _fmt_row(window)
    row = {k: v for k, v in window.items() if k not in ("answered", "rollout", "reason", "loop")}
    return _fmt_row(row | {"answered by": answered_by(window), "loop": window["loop"]})
