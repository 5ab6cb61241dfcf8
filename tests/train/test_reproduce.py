import json
import subprocess
import sys
import textwrap

import pandas as pd

from everloop import data, registry, train
from everloop.spec import parse_spec
from everloop.store import Store


def test_reproduce_gives_identical_predictions(trained):
    folder, spec, store = trained
    report = train.reproduce(store, 1)
    assert report.identical and report.max_abs_diff == 0.0 and report.rows > 0 and not report.problems


def test_reproduce_uses_the_recorded_spec_not_the_current_file(trained):
    folder, spec, store = trained
    text = (folder / "everloop.yaml").read_text().replace("max_iter: 50", "max_iter: 7")
    (folder / "everloop.yaml").write_text(text)
    assert train.reproduce(store, 1).identical
    assert registry.get_model(store, 1).manifest["spec"]["model"]["params"] == {"max_iter": 50}


def test_reproduce_fails_clearly_on_tampered_data(trained):
    folder, spec, store = trained
    dataset = data.get_dataset(store, 1)
    path = store.artifacts.path(dataset.artifact)
    frame = pd.read_parquet(path)
    frame.loc[0, "age"] = frame.loc[0, "age"] + 1
    frame.to_parquet(path, index=False)
    report = train.reproduce(store, 1)
    assert not report.identical
    assert "was changed on disk" in report.problems[0] and dataset.artifact[:12] in report.problems[0]


def test_reproduce_names_a_changed_user_transformer(tmp_path, project, monkeypatch):
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    source = textwrap.dedent('''
        from sklearn.preprocessing import FunctionTransformer
        import numpy as np

        def make():
            return FunctionTransformer(lambda frame: np.c_[frame["monthly_charges"] / (frame["tenure_months"] + 1)])
    ''')
    (package / "features.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = parse_spec({"name": "c", "data": {"source": "data/customers.csv", "target": "churned",
                                            "id": "customer_id", "timestamp": "event_time"},
                      "features": {"custom": "userpkg.features:make"}, "model": {"params": {"max_iter": 30}}})
    store = Store.for_project(project)
    data.ingest(store, raw, base=project)
    result = train.train(store, raw)
    manifest = registry.get_model(store, result.version).manifest
    assert manifest["custom_code_hash"] and manifest["spec"]["features"]["custom"] == "userpkg.features:make"
    assert train.reproduce(store, result.version).identical
    # The transformer's code travels inside the artifact: a process without the package loads the model.
    check = ("from everloop.store import Store; from everloop import registry; import pandas as pd; "
             f"m = registry.load_model(Store.for_project({str(project)!r}), {result.version}); "
             f"print(m.predict(pd.read_csv({str(project / 'data' / 'customers.csv')!r}).head(2)).labels)")
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=str(project))
    assert loaded.returncode == 0, loaded.stderr
    (package / "features.py").write_text(source + "\n# changed\n")
    report = train.reproduce(store, result.version)
    assert any("features.custom userpkg.features:make: its source changed" in e for e in report.environment)


def test_record_has_what_made_the_model(trained):
    folder, spec, store = trained
    m = registry.get_model(store, 1).manifest
    for key in ("spec", "spec_hash", "packages", "seed", "platform", "python", "threads", "dataset_hash", "git"):
        assert key in m
    assert m["packages"]["scikit-learn"] and m["seed"] == 42


def test_two_trainings_at_once_do_not_corrupt_the_store(trained):
    folder, spec, store = trained
    code = "from everloop.cli import main; main()"
    runs = [subprocess.Popen([sys.executable, "-c", code, "train", "--json", "--project", str(folder)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [r.communicate(timeout=300) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outputs
    versions = sorted(json.loads(out)["version"] for out, _ in outputs)
    assert versions == [2, 3]
    for version in versions:
        assert registry.load_model(store, version).predict(pd.read_csv(folder / "data" / "customers.csv").head(3))
