"""The HTML monitoring report: verdict first, every feature labelled, integer windows, values outside the
training range kept; built from hand-made run dicts (no server)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from everloop.data import Profile
from everloop.monitor._report import ABOVE, BELOW, _bars, coarse_distributions, report_figures, write_report

FEATURES = [f"feature_{i:02d}" for i in range(12)]
T0 = 1_717_236_000.0  # 2024-06-01 10:00 UTC


def _run(index: int, *, drifted: tuple[str, ...] = (), alerts: list[str] | None = None, status: str = "healthy",
         distributions: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    columns = [{"column": name, "kind": "numeric", "method": "ks", "statistic": 0.02 + 0.01 * i,
                "p_value": 1e-6 if name in drifted else 0.4, "effect": 0.5 if name in drifted else 0.02 + 0.005 * i,
                "drifted": name in drifted, "ignored": name == "feature_11", "reasons": ["ks"] if name in drifted
                else [], "wasserstein": 0.1, "psi": 0.01, "jensen_shannon": None} for i, name in enumerate(FEATURES)]
    run = {"status": status, "alerts": alerts or [], "not_judged": {}, "model_version": 2,
           "created_at": T0 + 3600 * index + 60,
           "window": {"index": index, "kind": "rows", "rows": 1000, "complete": True, "from": T0 + 3600 * index,
                      "to": T0 + 3600 * index + 1800, "first_seq": 10 * index, "last_seq": 10 * index + 9},
           "drift": {"columns": columns, "drifted": list(drifted), "drifted_share": len(drifted) / 12,
                     "dataset_drift": len(drifted) / 12 > 0.2, "max_drifted_share": 0.2},
           "prediction_drift": {"column": "prediction", "kind": "numeric", "effect": 0.04, "p_value": 0.3,
                                "drifted": False},
           "performance": {"metric": "roc_auc", "expected": 0.85, "labelled_rows": 400, "value": 0.84,
                           "decayed": False, "why": "within thresholds", "allowed_drop": 0.05, "estimated": 0.83,
                           "estimated_low": 0.8, "estimated_high": 0.86, "estimated_decayed": False},
           "health": {"rows": 1000, "rows_per_second": 0.55, "latency_ms_p50": 1.2, "latency_ms_p95": 3.0,
                      "latency_ms_p99": 4.5, "requests": 40, "error_rate": 0.0, "server_errors": 0},
           "skew": {"rows": 200, "mismatched": 0, "share": 0.0, "features": [], "examples": []},
           "distributions": distributions or {}}
    run |= extra
    return run


def _figures_in(page: str) -> list[tuple[list[Any], dict[str, Any]]]:
    """(data, layout) of every plotly figure in a written page, parsed from its Plotly.newPlot calls."""
    decoder = json.JSONDecoder()
    out = []
    for match in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', page):
        data, end = decoder.raw_decode(page, match.end())
        layout, _ = decoder.raw_decode(page, end + page[end:].index("{"))
        out.append((data, layout))
    return out


def _drifting_runs() -> list[dict[str, Any]]:
    alerts = ["drift: 4 of 12 features drifted (33% > 20%): feature_00, feature_03, feature_07, feature_11",
              "decay: roc_auc 0.7100 on 400 labelled rows; 0.1400 worse than at training (0.8500; allowed drop 0.05)",
              "prediction drift: effect 0.31, p=1e-09 > min_effect 0.1"]
    latest = _run(3, drifted=("feature_00", "feature_03", "feature_07", "feature_11"), alerts=alerts,
                  status="drift+decay+prediction drift",
                  not_judged={"skew": "fewer than 100 logged requests to replay: skew not judged yet"})
    latest["performance"] |= {"value": 0.71, "decayed": True, "why": "0.1400 worse than at training"}
    return [_run(1), _run(2, drifted=("feature_05",)), latest]


def test_verdict_alerts_and_not_judged_reasons_come_before_any_chart(tmp_path: Path) -> None:
    runs = _drifting_runs()
    page = write_report(tmp_path / "r.html", runs, title="t").read_text(encoding="utf-8")
    first_chart = page.index("<script")
    verdict = page.index("Verdict: drift+decay+prediction drift")
    assert verdict < first_chart
    for alert in runs[-1]["alerts"]:
        kind, _, rest = alert.partition(":")
        assert page.index(html.escape(rest)) < first_chart and page.index(html.escape(kind)) < first_chart
    assert page.index("fewer than 100 logged requests to replay") < first_chart
    assert page.count("<script") >= 1 and page.count("Plotly.newPlot") == 2  # two figures, plotly.js once
    assert len(re.findall(r"/\*\*?\s*\n?\s*\* plotly\.js v", page)) <= 1
    # the summary states the labelled metric against training with the threshold, and the interval
    summary = page[page.index("Latest window"):first_chart]
    assert "0.71 vs 0.85 at training; allowed drop 0.05 (threshold 0.8): decayed" in summary
    assert "0.83 (interval 0.8 to 0.86)" in summary
    assert "3 of 11 counted features drifted (33.3%; dataset drift above 20.0%)" in summary
    assert summary.count("state-alert") == 3  # labelled metric, data drift, prediction drift


def test_heatmap_labels_every_one_of_12_features_and_marks_drift_and_ignored(tmp_path: Path) -> None:
    runs = _drifting_runs()
    heatmap = report_figures(runs)["heatmap"]
    assert list(heatmap.layout.yaxis.tickvals) == list(range(12)) and heatmap.layout.yaxis.tickmode == "array"
    assert list(heatmap.layout.yaxis.ticktext) == FEATURES[:11] + ["feature_11 (ignored)"]
    assert heatmap.layout.height >= 12 * 24
    marks = heatmap.data[1]
    assert sorted(zip(marks.x, marks.y)) == [(2, 5), (3, 0), (3, 3), (3, 7), (3, 11)]
    assert heatmap.data[0].z[0][2] == 0.5 and heatmap.data[0].z[1][2] == pytest.approx(0.025)
    # and the written page carries the same labels
    page = write_report(tmp_path / "r.html", runs).read_text(encoding="utf-8")
    layouts = [layout for _, layout in _figures_in(page)]
    ticktexts = [layout.get("yaxis", {}).get("ticktext") for layout in layouts]
    assert FEATURES[:11] + ["feature_11 (ignored)"] in ticktexts


def test_window_ticks_are_integers_labelled_with_index_and_start() -> None:
    runs = _drifting_runs()
    figures = report_figures(runs)
    for fig in (figures["over_time"], figures["heatmap"]):
        axes = [a for name, a in fig.layout.to_plotly_json().items() if name.startswith("xaxis")]
        assert axes and all(a["tickmode"] == "array" and a["tickvals"] == [1, 2, 3] for a in axes)
        assert axes[0]["ticktext"] == ["#1<br>06-01 11:00", "#2<br>06-01 12:00", "#3<br>06-01 13:00"]
    over_time = figures["over_time"]
    threshold = next(t for t in over_time.data if t.name == "decay threshold")
    assert list(threshold.y) == pytest.approx([0.80, 0.80, 0.80])
    band = next(t for t in over_time.data if t.name == "estimate interval")
    assert list(band.y) == [0.8, 0.8, 0.8] and band.fill == "tonexty"
    share = next(t for t in over_time.data if t.name == "max drifted share")
    assert list(share.y) == [0.2, 0.2, 0.2]


def test_threshold_for_a_relative_drop_and_a_lower_is_better_metric() -> None:
    run = _run(1)
    run["performance"] = {"metric": "log_loss", "expected": 0.4, "value": 0.5, "allowed_drop": "10%"}
    line = next(t for t in report_figures([run])["over_time"].data if t.name == "decay threshold")
    assert list(line.y) == pytest.approx([0.44])


def _month_profiles(window_month: int) -> tuple[Profile, Profile]:
    rng = np.random.default_rng(5)
    reference = pd.DataFrame({"month": rng.integers(1, 6, 2000), "amount": rng.normal(100, 15, 2000),
                              "plan": rng.choice(["basic", "pro"], 2000)})
    kinds = {"month": "numeric", "amount": "numeric", "plan": "categorical"}
    profile = Profile.reference(reference, kinds)
    window = pd.DataFrame({"month": np.full(300, window_month), "amount": rng.normal(100, 15, 300),
                           "plan": ["gold"] * 100 + ["basic"] * 200})
    window.loc[:49, "amount"] = np.nan
    return profile, profile.window(window)


def test_a_window_all_outside_the_training_range_has_its_mass_in_the_above_bin() -> None:
    reference, window = _month_profiles(window_month=6)  # training saw months 1..5
    d = coarse_distributions(reference, window, ["month", "amount", "plan", "not_a_column"])
    month = d["month"]
    assert month["above"] == {"reference": 0, "current": 300} and sum(month["current"]) == 0
    assert month["below"]["current"] == 0 and sum(month["reference"]) == 2000
    labels, reference_counts, current_counts, outside = _bars(month)
    assert labels[0].startswith(BELOW) and labels[-1].startswith(ABOVE) and current_counts[-1] == 300
    assert outside == [0, len(labels) - 1]
    amount = d["amount"]  # ~40 bins of about equal reference mass, the nulls kept apart
    assert len(amount["reference"]) == 40 and len(amount["edges"]) == 41
    assert max(amount["reference"]) - min(amount["reference"]) <= 2
    assert amount["missing"] == {"reference": 0, "current": 50}
    assert sum(amount["current"]) + amount["below"]["current"] + amount["above"]["current"] == 250
    plan = d["plan"]
    assert plan["new"] == ["gold"] and plan["categories"][-1] == "gold"
    assert dict(zip(plan["categories"], plan["current"])) == {"basic": 200, "pro": 0, "gold": 100}
    assert "not_a_column" not in d
    assert len(json.dumps(d)) < 4000  # small enough to store with every run


def test_distributions_render_below_above_missing_and_new_categories(tmp_path: Path) -> None:
    reference, window = _month_profiles(window_month=6)
    run = _run(1, drifted=("feature_00",), distributions=coarse_distributions(reference, window, ["month", "plan"]))
    fig = report_figures([run])["distributions"]
    month_current = fig.data[1]
    assert month_current.name == "window" and month_current.y[-1] == 1.0  # all of the window above the range
    assert list(fig.layout.xaxis.ticktext) == [f"{BELOW} (< 1)", "1", "2", "3", "4", "5", f"{ABOVE} (> 5)"]
    assert fig.layout.xaxis2.ticktext[-1] == "gold (new)"
    page = write_report(tmp_path / "r.html", [run]).read_text(encoding="utf-8")
    assert "gold (new)" in page and ABOVE in page


def test_old_format_distributions_and_results_still_render(tmp_path: Path) -> None:
    old = {"status": "drift", "model_version": 1, "window": {"rows": 500, "labelled_rows": 0, "from": T0,
                                                              "to": T0 + 60, "first_seq": 1, "last_seq": 2},
           "alerts": ["drift: 1 of 2 features drifted (50% > 20%): x"],
           "drift": {"columns": [{"column": "x", "kind": "numeric", "method": "ks", "statistic": 0.4,
                                  "p_value": 1e-9, "effect": 0.4, "drifted": True},
                                 {"column": "c", "kind": "categorical", "method": "chi2", "statistic": 3.0,
                                  "p_value": 0.2, "effect": 0.01, "drifted": False}],
                     "drifted": ["x"], "drifted_share": 0.5, "dataset_drift": True},
           "prediction_drift": None, "performance": {"labelled_rows": 0, "metric": "roc_auc", "expected": 0.8,
                                                     "value": None, "why": "fewer than 50 labelled rows"},
           "health": {}, "skew": {"features": [], "columns": {}},
           "distributions": {"x": {"kind": "numeric", "edges": [0.0, 1.0, 2.0], "reference": [50, 50],
                                   "current": [0, 100]},
                             "c": {"kind": "categorical", "categories": ["a", "b"], "reference": [60, 0],
                                   "current": [30, 30]}}}
    fig = report_figures([old])["distributions"]
    assert list(fig.layout.xaxis.ticktext) == ["[0, 1)", "[1, 2]"] and list(fig.data[1].y) == [0.0, 1.0]
    assert list(fig.layout.xaxis2.ticktext) == ["a", "b (new)"]
    page = write_report(tmp_path / "r.html", [old]).read_text(encoding="utf-8")
    assert "Verdict: drift" in page and "(older format)" in page
    assert "not judged: performance</strong>: fewer than 50 labelled rows" in page


def test_a_run_with_no_data_and_missing_keys_renders(tmp_path: Path) -> None:
    empty = {"status": "no data", "model_version": 3, "window": {"rows": 0, "labelled_rows": 0, "from": None,
                                                                  "to": None}, "alerts": [], "drift": None,
             "prediction_drift": None, "performance": {"labelled_rows": 0}, "health": {}}
    page = write_report(tmp_path / "r.html", [_run(1), empty, {"model_version": 3}]).read_text(encoding="utf-8")
    assert "Verdict: no data" in page and "no predictions in this window" in page
    page = write_report(tmp_path / "r.html", [empty]).read_text(encoding="utf-8")
    assert "Verdict: no data" in page and "not measured" in page
    page = write_report(tmp_path / "r.html", []).read_text(encoding="utf-8")
    assert "No verdict" in page and "<script" not in page


def test_text_is_escaped(tmp_path: Path) -> None:
    run = _run(1, alerts=["drift: <script>alert(1)</script> drifted"], status="drift")
    run["drift"]["columns"][0]["column"] = "<b>evil</b>"
    page = write_report(tmp_path / "r.html", [run], title="<i>t</i>").read_text(encoding="utf-8")
    assert "<script>alert(1)" not in page and "<b>evil" not in page and "<i>t</i>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_summary_uses_the_runs_own_threshold_rules_and_shows_notes(tmp_path: Path) -> None:
    run = _run(4, status="not judged", not_judged={"drift": "120 predictions in this window, fewer than "
                                                             "monitoring.min_rows 500: drift not judged yet"},
               notes=["health: latency p99 812 ms > 250 ms (health is not in monitoring.alert_on)"])
    run["performance"] |= {"value": 0.8412345678, "threshold": 0.8075, "decayed": False,
                           "rules": ["allowed drop from training's 0.8500: 5% of 0.85 = 0.0425 roc_auc"]}
    page = write_report(tmp_path / "r.html", [run]).read_text(encoding="utf-8")
    first_chart = page.index("<script")
    assert "Verdict: not judged" in page and f"color:#b26a00'>Verdict" in page
    assert page.index("fewer than monitoring.min_rows 500") < first_chart
    assert page.index("note: health: latency p99 812 ms &gt; 250 ms") < first_chart
    assert ("0.8412 vs 0.85 at training; worst allowed 0.8075 (allowed drop from training&#x27;s 0.8500: "
            "5% of 0.85 = 0.0425 roc_auc): within thresholds") in page
    data_drift_row = page[page.index("<th>data drift</th>"):]
    assert data_drift_row[:data_drift_row.index("</tr>")].endswith("not judged</td>")
