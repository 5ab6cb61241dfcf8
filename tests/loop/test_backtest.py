import pandas as pd
import pytest

from everloop.demo import make_churn
from everloop.demo._scenario import START
from everloop.errors import DataError
from everloop.loop import backtest, write_backtest_report
from everloop.spec import parse_spec


def _spec(**retraining):
    return parse_spec({"name": "bt", "data": {"source": "x.csv", "target": "churned", "id": "customer_id",
                                              "timestamp": "event_time"},
                       "model": {"params": {"max_iter": 60}},
                       "monitoring": {"window": {"rows": 1500}, "performance": {"max_drop": 0.03}},
                       "retraining": {"data": {"recent_rows": 1500}, "cooldown_minutes": 0} | retraining})


def _history() -> pd.DataFrame:
    stable = make_churn(6000, seed=21)
    shifted = make_churn(7500, shifted=True, seed=22, start=START + pd.Timedelta(minutes=6000), id_offset=6000)
    return pd.concat([stable, shifted], ignore_index=True)


def test_the_policy_beats_never_retraining_and_costs_less_than_always(tmp_path):
    result = backtest(_history(), _spec(), initial_rows=4500)
    s = result.summary()
    assert s["windows"] == 6
    assert s["mean_policy"] > s["mean_never"] + 0.02
    assert 1 <= s["retrainings"]["policy"] < s["retrainings"]["every_window"] == 5  # none after the last window
    first_shifted = result.windows[1]  # windows 1 is stable (rows 4500-6000), 2 is the first shifted one
    assert first_shifted["triggers"] and first_shifted["action"] == "promoted"
    assert result.windows[0]["action"] == "idle"
    page = write_backtest_report(tmp_path / "bt.html", result).read_text()
    assert "never retrain" in page and "plotly" in page.lower()


def test_too_little_data_is_a_clear_error():
    with pytest.raises(DataError, match="too few to backtest"):
        backtest(make_churn(1000, seed=1), _spec())


def test_backtest_command(tmp_path):
    import json

    from typer.testing import CliRunner

    from everloop.cli import app
    from tests.conftest import write_project

    folder = write_project(tmp_path / "p")
    history = tmp_path / "history.csv"
    _history().to_csv(history, index=False)
    out = CliRunner().invoke(app, ["backtest", str(history), "--initial-rows", "4500", "--window-rows", "3000",
                                   "--json", "--project", str(folder)])
    assert out.exit_code == 0, out.output
    body = json.loads(out.output)
    assert body["summary"]["windows"] == 3 and body["summary"]["retrainings"]["every_window"] == 2


def _slow_history() -> pd.DataFrame:
    """The same history, one row every 20 minutes: a 1500-row window spans about 21 days."""
    history = _history()
    history["event_time"] = START + pd.to_timedelta(range(len(history)), unit="min") * 20
    return history


def test_the_cooldown_is_replayed_in_the_datas_time():
    # a 60-minute cooldown is long over by the end of a 21-day window: never a cooldown
    short = backtest(_slow_history(), _spec(cooldown_minutes=60), initial_rows=4500)
    assert "cooldown" not in [w["action"] for w in short.windows]
    assert short.retrainings["policy"] >= 1
    # a 30-day cooldown holds back the window right after a retraining, and only then
    long = backtest(_slow_history(), _spec(cooldown_minutes=30 * 24 * 60), initial_rows=4500)
    actions = [w["action"] for w in long.windows]
    first = actions.index("promoted")
    assert actions[first + 1] in ("cooldown", "idle") and "promoted" not in actions[first + 1:first + 2]


def test_partly_labelled_history_is_scored_on_its_real_labels_only():
    history = _history()
    unlabelled = history.sample(frac=0.4, random_state=5).index
    history["churned"] = history["churned"].astype("Int64")
    history.loc[unlabelled, "churned"] = pd.NA
    result = backtest(history, _spec(), initial_rows=4500)
    for w in result.windows:
        rows = history.iloc[4500 + (w["window"] - 1) * 1500:4500 + w["window"] * 1500]
        assert w["labelled_rows"] == int(rows["churned"].notna().sum())
        assert 0.5 < w["never"] < 1
    s = result.summary()
    assert s["mean_policy"] > s["mean_never"]


def test_after_an_import_the_backtest_replays_a_clone_of_the_production_pipeline(tmp_path, monkeypatch):
    """The loop retrains an imported model as a fresh clone of its pipeline: so must the backtest, or it
    judges a policy on a model (the project file's HistGradientBoosting) that production never runs."""
    import joblib
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from everloop import data, registry
    from everloop.demo._scenario import FEATURES_CATEGORICAL, FEATURES_NUMERIC
    from everloop.loop import _backtest
    from everloop.spec import load_spec
    from everloop.store import Store
    from everloop.train._train import estimator_name
    from tests.conftest import write_project

    folder = write_project(tmp_path / "p")
    spec, store = load_spec(folder), Store.for_project(folder)
    data.ingest(store, spec, base=folder)
    table = pd.read_csv(folder / "data" / "customers.csv")
    pipeline = Pipeline([("prep", ColumnTransformer([
        ("cat", OneHotEncoder(handle_unknown="ignore"), FEATURES_CATEGORICAL),
        ("num", make_pipeline(SimpleImputer(), StandardScaler()), FEATURES_NUMERIC)])),
        ("clf", LogisticRegression(C=0.3, max_iter=1000))])
    joblib.dump(pipeline.fit(table[FEATURES_NUMERIC + FEATURES_CATEGORICAL], table["churned"]), tmp_path / "m.joblib")
    registry.promote(store, spec, registry.import_model(store, spec, tmp_path / "m.joblib", 1).version)

    fitted = []
    real_fit = _backtest.fit
    monkeypatch.setattr(_backtest, "fit", lambda *a, **k: fitted.append(real_fit(*a, **k)) or fitted[-1])
    heard = []
    result = backtest(_history(), spec, initial_rows=4500, window_rows=3000, store=store, progress=heard.append)
    assert result.replays == ("a fresh clone of model v1's pipeline (in production), as the loop retrains it: "
                              "LogisticRegression with its own preprocessing")
    assert heard[0] == f"replays {result.replays}" and result.summary()["replays"] == result.replays
    assert fitted and {estimator_name(f.pipeline) for f in fitted} == {"sklearn.linear_model.LogisticRegression"}
    assert all(f.pipeline.named_steps["model"].C == 0.3 for f in fitted)  # its hyper-parameters carry over
    assert all(f.pipeline.named_steps["model"] is not pipeline.named_steps["clf"] for f in fitted)  # clones
    page = _backtest.write_backtest_report(tmp_path / "bt.html", result).read_text()
    assert "Each training fits a fresh clone of model v1&#x27;s pipeline (in production)" in page

    fitted.clear()
    plain = backtest(_history(), spec, initial_rows=4500, window_rows=3000)  # no store: the project file's
    assert plain.replays == "the project file's model.estimator (HistGradientBoostingClassifier)"
    assert {estimator_name(f.pipeline) for f in fitted} == {
        "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingClassifier"}
