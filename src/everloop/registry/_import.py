"""`everloop models import`: a scikit-learn model fitted elsewhere, adopted into the loop.

A joblib/pickle file, a skops file or an MLflow model directory (sklearn flavor) is read once into
memory, hashed (sha256) and loaded from those same bytes, so what is recorded is what was loaded.
The model is probed with rows of a dataset version: a full pipeline takes the raw columns; a bare
estimator wants the encoded features it was fitted on, which everloop cannot rebuild, so it is
refused, or with `features=True` a fresh clone of it (same class, same hyper-parameters) is fitted
behind everloop's own feature pipeline. Either way the result is the usual artifact, a
("features", ...), ("model", ...) Pipeline with the dataset's schema, so serving, batch scoring,
monitoring and the gate treat it like any model everloop trained, and the loop retrains it as a
fresh `sklearn.base.clone` of that pipeline (see `everloop.train.fit`'s `template`).
"""

from __future__ import annotations

import io
import json
import math
import re
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from sklearn.base import is_classifier
from sklearn.compose import ColumnTransformer
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from everloop.data import Schema, get_dataset, get_schema, load_frame
from everloop.errors import IntegrityError, TrainError
from everloop.features import build_features
from everloop.spec import ProjectSpec
from everloop.store import Store
from everloop.store._artifacts import sha256_bytes
from everloop.train import TrainResult, label_parser, task_of
from everloop.train._artifact import _unusual_rows
from everloop.train._metrics import REGRESSION
from everloop.train._train import (Fitted, _evaluate, _slice_metrics, estimator_name, estimator_params, fit,
                                   register_fitted)

SKOPS_HINT = "pip install 'everloop[import]' (or: pip install skops)"
PROBE_ROWS = 200  # rows of the dataset the model is first tried on
# Where the MLflow signature's column types fit a schema column's kind.
MLFLOW_KINDS = {"double": "numeric", "float": "numeric", "long": "numeric", "integer": "numeric",
                "boolean": "categorical", "string": "categorical", "datetime": "datetime"}


@dataclass(frozen=True)
class ImportResult(TrainResult):
    """A `TrainResult` (the new model version, its metric, baseline and lift) plus what was imported:
    the file, its sha256 and format, what the probe found ("pipeline": takes the raw columns;
    "estimator": wants encoded features), whether everloop refit a clone of it behind its own features
    (`refit`), whether the metrics are in-sample (the model may have seen the dataset's rows), and the
    warnings to show (pickles run code, version mismatches, rows it cannot answer)."""

    source: str = ""
    sha256: str = ""
    format: str = ""
    found: str = ""
    description: str = ""
    refit: bool = False
    in_sample: bool = True
    warnings: tuple[str, ...] = ()


@dataclass
class LoadedFile:
    """A model file read and loaded: the object, the bytes' sha256, and what the file says about itself."""

    model: Any
    format: str  # joblib, pickle, skops, mlflow (sklearn flavor, skops), mlflow (sklearn flavor, pickle), ...
    sha256: str  # of the model file's bytes, exactly those that were loaded
    data: bytes
    made_with: dict[str, str] = field(default_factory=dict)  # package -> version the file was saved with
    warnings: list[str] = field(default_factory=list)
    signature: list[dict[str, Any]] | None = None  # an MLflow model's column signature (inputs)
    mlmodel_sha256: str | None = None


def import_model(store: Store, spec: ProjectSpec, path: str | Path, dataset_version: int | None = None, *,
                 features: bool = False, trust: Iterable[str] = (), sha256: str | None = None,
                 held_out: bool = False, name: str | None = None) -> ImportResult:
    """Register a model fitted outside everloop as a new model version (not promoted).

    `path`: a joblib or pickle file, a skops file (`.skops`, loaded with skops' trusted-types check:
    types it does not trust by default are refused unless named in `trust`), or an MLflow model
    directory of the sklearn flavor (its `MLmodel` column signature is checked against the schema).
    `dataset_version` (default: the latest) supplies the schema, the monitor's reference profiles and
    the evaluation rows. `sha256`: the hash the file must have; a mismatch refuses it before anything
    is loaded. `held_out=True` says the model never saw the dataset's rows: its metrics are then
    out-of-sample and no row counts as trained on; by default every row counts as possibly trained on
    (the gate never compares on them) and the metrics are marked in-sample. `name`: what to call the
    model in its reason, card and lineage ("imported NAME from PATH (sha256 ...)").

    A model that takes the raw columns (a full pipeline) is wrapped as it is. A bare estimator that
    wants already-encoded features raises TrainError saying so, unless `features=True`: then a fresh
    clone of it is fitted behind everloop's feature pipeline on the dataset (a held-out split, as
    `everloop train` does), since the estimator's fitted state belongs to an encoding the file lacks.

    Returns an ImportResult. Raises IntegrityError (hash mismatch), TrainError (a model that cannot be
    read, loaded, probed or used: the message says why and what to do), NotFoundError (no such dataset).
    Reference: skops' trusted-types loading (skops.io.get_untrusted_types / loads); MLflow's MLmodel
    format for the sklearn flavor (flavors.sklearn: pickled_model, serialization_format, sklearn_version)."""
    started = time.perf_counter()
    path = Path(path)
    loaded = read_model_file(path, trust=trust, sha256=sha256)
    dataset = get_dataset(store, dataset_version)
    schema = get_schema(store, dataset.schema_version)
    frame = load_frame(store, dataset).reset_index(drop=True)
    task = task_of(schema)
    metric = spec.evaluation.metric or ("roc_auc" if task == "classification" else "rmse")
    if (metric in REGRESSION) != (task == "regression"):
        raise TrainError(f"evaluation.metric {metric!r} does not suit a {task} target")
    model, shown = loaded.model, path.name
    _check_kind(model, shown, task, schema)
    if loaded.signature is not None:
        _check_signature(loaded.signature, schema, shown, dataset.version)
    conformed, report = schema.conform(frame, mode="request")
    if not report.ok:  # an ingested dataset always conforms; this guards against a changed schema
        raise TrainError(f"dataset v{dataset.version} does not conform to its schema:\n{report.summary()}")
    takes_raw, found = probe(model, conformed[schema.feature_names], task, schema, frame, dataset.version)
    notes = list(loaded.warnings)
    origin = {"path": str(path.resolve()), "sha256": loaded.sha256, "format": loaded.format,
              "found": "pipeline" if takes_raw else "estimator", "description": found,
              "made_with": loaded.made_with, "name": name}
    if loaded.mlmodel_sha256:
        origin["mlmodel_sha256"] = loaded.mlmodel_sha256
    why = f"imported {name + ' ' if name else ''}from {path} (sha256 {loaded.sha256[:12]})"
    if takes_raw:
        if features:
            notes.append("--features not used: the model already takes the raw columns")
        if getattr(model, "feature_names_in_", None) is None and getattr(model, "n_features_in_", None):
            notes.append(f"the model was fitted without column names: it gets the columns in the schema's order "
                         f"({', '.join(schema.feature_names)}); check that this is the order it was fitted on")
        wrapped = wrap(model, conformed[schema.feature_names].head(PROBE_ROWS))
        notes += _unusual_row_check(wrapped, conformed[schema.feature_names], task)
        fitted = _evaluate_as_is(wrapped, task, metric, schema, spec, frame, conformed, held_out, notes)
        in_sample, refit = not held_out, False
        extra = {"pipeline_source": "imported", "in_sample": in_sample, "train_rows": None}
    elif not features:
        raise TrainError(f"{shown}: {found}. A bare estimator's fitted state belongs to the encoding it was "
                         "fitted on, which the file does not hold, so everloop cannot serve it as it is. Save "
                         "the whole scikit-learn Pipeline (preprocessing + estimator) and import that, or pass "
                         "--features to fit a fresh clone of this estimator (same class and hyper-parameters) "
                         f"behind everloop's feature pipeline on dataset v{dataset.version}")
    else:
        template = Pipeline([("features", build_features(schema, spec)), ("model", model)])
        fitted = fit(frame, schema, spec, template=template)
        in_sample, refit = False, True
        origin["features"] = "everloop"
        extra = {"pipeline_source": "clone", "in_sample": False}
    origin["artifact"] = store.artifacts.put(loaded.data)  # the file itself, kept and verified on every read
    extra |= {"imported_from": origin, "estimator": estimator_name(fitted.pipeline),
              "params": estimator_params(fitted.pipeline), "import_warnings": notes}
    result = register_fitted(store, spec, dataset, schema, frame, fitted, reason=why, started=started,
                             extra=extra)
    return ImportResult(**result.__dict__, source=str(path), sha256=loaded.sha256, format=loaded.format,
                        found=origin["found"], description=found, refit=refit, in_sample=in_sample,
                        warnings=tuple(notes))


def origin_text(manifest: dict[str, Any]) -> str | None:
    """'imported from PATH (sha256 ...)' for an imported model, what its pipeline was cloned from for a
    model refit from one, None for a model of the project file's pipeline."""
    source = manifest.get("pipeline_source")
    origin = manifest.get("imported_from")
    if not origin:
        return None
    named = f"{origin['name']} " if origin.get("name") else ""
    imported = f"imported {named}from {origin['path']} (sha256 {origin['sha256']})"
    if source == "imported":
        return imported
    if manifest.get("template_of") is not None:
        return (f"a fresh clone of model v{manifest['template_of']}'s pipeline, refit; that pipeline was "
                f"{imported}")
    return f"a fresh clone of the estimator {imported}, refit behind everloop's features"


# -- reading the file ------------------------------------------------------------------------------


def read_model_file(path: Path, *, trust: Iterable[str] = (), sha256: str | None = None) -> LoadedFile:
    """Read and load a model file (or MLflow directory). The bytes are read once, hashed, checked against
    `sha256` when given (IntegrityError before anything is loaded), and loaded from memory. Pickles
    (joblib, pickle, MLflow's pickle/cloudpickle) come with a warning that loading them runs code;
    skops files are refused when they hold types skops does not trust and `trust` does not name.
    Raises TrainError for a file that cannot be read or loaded, saying why."""
    trust = list(trust)
    if path.is_dir():
        return _read_mlflow(path, trust, sha256)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TrainError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    digest = _checked_digest(data, sha256, path)
    if _is_skops(data):
        model, made_with, notes = _load_skops(data, path, trust)
        return LoadedFile(model, "skops", digest, data, made_with, notes)
    kind = "pickle" if path.suffix.lower() in (".pkl", ".pickle") else "joblib"
    model, made_with, notes = _load_pickle(data, path)
    return LoadedFile(model, kind, digest, data, made_with, notes)


def _checked_digest(data: bytes, expected: str | None, path: Path) -> str:
    digest = sha256_bytes(data)
    if expected is not None and digest != expected.strip().lower():
        raise IntegrityError(f"{path}: its sha256 is {digest}, not the expected {expected.strip()}; the file is "
                             "not the one you meant (changed or replaced): it was not loaded", digest=digest)
    return digest


def _is_skops(data: bytes) -> bool:
    if not data.startswith(b"PK\x03\x04"):
        return False
    try:
        return "schema.json" in zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile:
        return False


def _pickle_warning(path: Path) -> str:
    return (f"{path.name} is a pickle: loading it ran whatever code it holds. Import only files you made or "
            "trust; prefer skops (skops.io.dump), which everloop loads with its trusted-types check")


def _load_pickle(data: bytes, path: Path) -> tuple[Any, dict[str, str], list[str]]:
    import joblib  # reads plain pickles as well as its own (compressed) format

    notes = [_pickle_warning(path)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = joblib.load(io.BytesIO(data))
        except ModuleNotFoundError as exc:
            raise TrainError(f"{path.name} cannot be loaded: it needs the module {exc.name!r}, which is not "
                             "installed here; install the package that provides it and import again") from None
        except Exception as exc:  # any unpickling failure: not a pickle, truncated, a missing class
            raise TrainError(f"{path.name} cannot be loaded as a joblib or pickle file: {type(exc).__name__}: "
                             f"{_first_line(exc)}") from None
    made_with, mismatch = _versions(model, caught)
    return model, made_with, notes + mismatch


def _load_skops(data: bytes, path: Path, trust: list[str], declared: list[str] | None = None,
                shown: str | None = None) -> tuple[Any, dict[str, str], list[str]]:
    try:
        import skops.io as sio
    except ImportError:
        raise TrainError(f"{path.name} is a skops file; reading it needs skops: {SKOPS_HINT}") from None
    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:  # not a readable skops file
        raise TrainError(f"{path.name} cannot be read as a skops file: {type(exc).__name__}: "
                         f"{_first_line(exc)}") from None
    refused = [t for t in untrusted if t not in trust]
    if refused:
        flags = " ".join(f"--trust {t}" for t in refused)
        saved = (f" (the MLmodel file says whoever saved it trusted {declared}; that is the file speaking "
                 "about itself, so everloop asks you)") if declared else ""
        raise TrainError(f"{path.name} holds types skops does not trust by default: {refused}{saved}. Loading "
                         "such a type can run code or read out-of-bounds memory if the file was tampered "
                         "with. Review each (skops.io.get_untrusted_types explains why), then trust the ones "
                         f"you accept: everloop models import {shown or path} ... {flags} "
                         "(Python: trust=[...])")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = sio.loads(data, trusted=list(untrusted))
        except Exception as exc:
            raise TrainError(f"{path.name} cannot be loaded with skops: {type(exc).__name__}: "
                             f"{_first_line(exc)}") from None
    made_with, mismatch = _versions(model, caught)
    return model, made_with, mismatch


def _read_mlflow(folder: Path, trust: list[str], sha256: str | None) -> LoadedFile:
    import yaml

    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        raise TrainError(f"{folder} is a folder without an MLmodel file: give a joblib or pickle file, a .skops "
                         "file, or an MLflow model directory")
    text = mlmodel.read_bytes()
    try:
        meta = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise TrainError(f"{mlmodel} is not valid YAML: {_first_line(exc)}") from None
    flavors = meta.get("flavors") or {}
    flavor = flavors.get("sklearn")
    if not isinstance(flavor, dict):
        raise TrainError(f"{mlmodel} has the flavors {sorted(flavors)}; only MLflow's sklearn flavor can be "
                         "imported (mlflow.sklearn.save_model / log_model)")
    model_file = (folder / str(flavor.get("pickled_model", "model.pkl"))).resolve()
    if folder.resolve() not in model_file.parents:
        raise TrainError(f"{mlmodel}: pickled_model {flavor.get('pickled_model')!r} points outside the "
                         "model folder")
    try:
        data = model_file.read_bytes()
    except OSError as exc:
        raise TrainError(f"{model_file}: cannot be read: {exc.strerror or exc}") from None
    digest = _checked_digest(data, sha256, model_file)
    serialization = flavor.get("serialization_format", "cloudpickle")
    if serialization == "skops":
        model, made_with, notes = _load_skops(data, model_file, trust, flavor.get("skops_trusted_types"),
                                              shown=str(folder))
    elif serialization in ("pickle", "cloudpickle"):
        model, made_with, notes = _load_pickle(data, model_file)
    else:
        raise TrainError(f"{mlmodel}: serialization_format {serialization!r} is not one of skops, pickle, "
                         "cloudpickle")
    recorded = {"scikit-learn": flavor.get("sklearn_version")} | _requirement_pins(folder)
    for package, version in recorded.items():
        if version and package not in made_with:
            made_with[package] = str(version)
            notes += _mismatch(package, str(version), model_file.name)
    return LoadedFile(model, f"mlflow (sklearn flavor, {serialization})", digest, data, made_with, notes,
                      _signature_columns(meta, mlmodel), sha256_bytes(text))


def _requirement_pins(folder: Path) -> dict[str, str]:
    """numpy and scikit-learn versions pinned (==) in an MLflow model's requirements.txt."""
    pins: dict[str, str] = {}
    try:
        lines = (folder / "requirements.txt").read_text().splitlines()
    except OSError:
        return pins
    for line in lines:
        found = re.match(r"^\s*(numpy|scikit-learn)\s*==\s*([\w.+-]+)", line)
        if found:
            pins[found.group(1)] = found.group(2)
    return pins


def _signature_columns(meta: dict[str, Any], mlmodel: Path) -> list[dict[str, Any]] | None:
    """The named columns of an MLmodel's input signature; None without one or for a tensor signature."""
    inputs = (meta.get("signature") or {}).get("inputs")
    if not inputs:
        return None
    try:
        columns = json.loads(inputs) if isinstance(inputs, str) else inputs
    except json.JSONDecodeError as exc:
        raise TrainError(f"{mlmodel}: signature.inputs is not JSON: {exc}") from None
    if not all(isinstance(c, dict) and "name" in c and c.get("type") in MLFLOW_KINDS for c in columns):
        return None  # tensors, or types a table does not have: nothing to check by name
    return columns


def _versions(model: Any, caught: list[warnings.WarningMessage]) -> tuple[dict[str, str], list[str]]:
    """The scikit-learn version a loaded model was saved with, and a warning naming both versions when it
    is not the running one. scikit-learn records its version in every estimator's pickled state and
    warns (InconsistentVersionWarning) when it differs; no warning for a model with scikit-learn
    estimators means the same version."""
    import sklearn
    from sklearn.exceptions import InconsistentVersionWarning

    saved = sorted({str(w.message.original_sklearn_version) for w in caught
                    if isinstance(w.message, InconsistentVersionWarning)})
    if saved:
        return {"scikit-learn": ", ".join(saved)}, _mismatch("scikit-learn", ", ".join(saved), "the model")
    if _has_sklearn_estimator(model):
        return {"scikit-learn": sklearn.__version__}, []
    return {}, []


def _mismatch(package: str, saved: str, what: str) -> list[str]:
    import numpy
    import sklearn

    running = {"scikit-learn": sklearn.__version__, "numpy": numpy.__version__}[package]
    if saved == running:
        return []
    return [f"{what} was saved with {package} {saved}; this is {package} {running}: a model loaded under "
            f"another version may predict differently or fail. Re-save it under {package} {running}, or install "
            f"{package}=={saved} here"]


def _has_sklearn_estimator(model: Any) -> bool:
    if type(model).__module__.startswith("sklearn."):
        return True
    return isinstance(model, Pipeline) and any(_has_sklearn_estimator(s) for _, s in model.steps)


# -- checking and probing --------------------------------------------------------------------------


def _check_kind(model: Any, name: str, task: str, schema: Schema) -> None:
    """A model with predict (and predict_proba for classes) that is the right kind for the target."""
    if not hasattr(model, "predict"):
        raise TrainError(f"{name} holds a {type(model).__name__}, which has no predict(): not a "
                         "scikit-learn-compatible model")
    target = schema.target.name
    if is_classifier(model) != (task == "classification"):
        has = "a classifier" if is_classifier(model) else "a regressor (or not marked as a classifier)"
        wants = "has classes: a classifier" if task == "classification" else "is numeric: a regressor"
        raise TrainError(f"{name} holds {has} ({describe(model)}), but the target {target!r} {wants} is needed")
    if task == "classification" and not hasattr(model, "predict_proba"):
        raise TrainError(f"{name}: {describe(model)} has no predict_proba(); everloop needs class probabilities "
                         "(ROC AUC, calibration, the monitor's estimates). Wrap it in "
                         "sklearn.calibration.CalibratedClassifierCV, or use probability=True for an SVC")


def _check_signature(columns: list[dict[str, Any]], schema: Schema, name: str, dataset_version: int) -> None:
    """An MLflow signature's columns must be features of the schema, of a compatible kind."""
    kinds = {c.name: c.kind for c in schema.features}
    absent = [c["name"] for c in columns if c["name"] not in kinds]
    if absent:
        raise TrainError(f"{name}'s MLflow signature needs the columns {absent}, which are not features of "
                         f"dataset v{dataset_version}'s schema (features: {list(kinds)})")
    clash = [f"{c['name']} ({c['type']} in the signature, {kinds[c['name']]} in the schema)" for c in columns
             if MLFLOW_KINDS[c["type"]] != kinds[c["name"]]
             and not (MLFLOW_KINDS[c["type"]] == "numeric" and kinds[c["name"]] == "categorical"
                      and c["type"] in ("long", "integer"))]  # integer codes the schema treats as classes
    if clash:
        raise TrainError(f"{name}'s MLflow signature and dataset v{dataset_version}'s schema disagree on "
                         f"{'; '.join(clash)}: fix the column's type in schema.yaml, or re-save the model")


def probe(model: Any, rows: pd.DataFrame, task: str, schema: Schema, frame: pd.DataFrame,
          dataset_version: int) -> tuple[bool, str]:
    """Try the model on the first `PROBE_ROWS` of the dataset's raw feature columns (`rows`, conformed as
    a request is). Returns (True, what was found) when it answers them in the right shape: a full
    pipeline, or an estimator fitted on exactly these columns. Returns (False, why) when it cannot: it
    wants encoded features. Raises TrainError when it was fitted on columns the dataset has but the
    schema does not use as features, or (a Pipeline) on columns the dataset lacks."""
    head = rows.head(PROBE_ROWS)
    error = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "X has feature names, but ... was fitted without": not our call
            out = np.asarray(model.predict_proba(head) if task == "classification" else model.predict(head))
        if task == "classification" and out.ndim == 2 and out.shape[0] == len(head):
            return True, f"{describe(model)}, which takes the raw columns"
        if task == "regression" and out.shape == (len(head),):
            return True, f"{describe(model)}, which takes the raw columns"
        error = f"it answered an array of shape {out.shape} for {len(head)} rows"
    except Exception as exc:  # noqa: BLE001 - whatever the model raises is the finding
        error = f"{type(exc).__name__}: {_first_line(exc)}"
    names = [str(n) for n in getattr(model, "feature_names_in_", [])]
    absent = [n for n in names if n not in schema.feature_names]
    unused = [n for n in absent if n in frame.columns]
    if unused:
        roles = {c.name: c.role for c in schema.columns}
        why = ", ".join(f"{n} ({roles.get(n, 'not in the schema')})" for n in unused)
        raise TrainError(f"the model was fitted with columns that dataset v{dataset_version} has but everloop "
                         f"does not use as features: {why}. Make them features in everloop.yaml (data.id / "
                         "data.timestamp name the columns that are not), or re-fit the model without them")
    if absent and isinstance(model, Pipeline):
        raise TrainError(f"the pipeline {describe(model)} needs the columns {absent[:10]}, which dataset "
                         f"v{dataset_version} does not have")
    fitted_on = getattr(model, "n_features_in_", None)
    shown = f" ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})" if names else ""
    wants = f"fitted on {fitted_on} columns{shown}" if fitted_on is not None else "fitted on other inputs"
    return False, (f"a bare estimator, {describe(model)}, that wants already-encoded features: it was {wants}, "
                   f"and answering dataset v{dataset_version}'s {len(schema.feature_names)} raw feature columns "
                   f"failed ({error})")


def describe(model: Any) -> str:
    """A model in a few words: a Pipeline's steps joined by '->', else its class."""
    if isinstance(model, Pipeline):
        return "Pipeline(" + " -> ".join(describe(step) for _, step in model.steps) + ")"
    if isinstance(model, ColumnTransformer):
        return f"ColumnTransformer({len(model.transformers)} branches)"
    return type(model).__name__


def wrap(model: Any, rows: pd.DataFrame) -> Pipeline:
    """The model as everloop's ("features", ...), ("model", ...) Pipeline, predicting exactly as it does.
    A two-step Pipeline whose first step is a ColumnTransformer fitted with column names is split there,
    so the service may replay the transformer with numpy and compile the estimator's trees (both only
    after checking they give the same outputs); anything else sits behind an identity step, fitted on
    `rows`: one that hands over a plain array when the model was fitted on one (no column names), as its
    user did."""
    unnamed = getattr(model, "feature_names_in_", None) is None and getattr(model, "n_features_in_", None)
    if not unnamed and isinstance(model, Pipeline) and len(model.steps) == 2 \
            and isinstance(model.steps[0][1], ColumnTransformer):
        return Pipeline([("features", model.steps[0][1]), ("model", model.steps[1][1])])
    step = FunctionTransformer(np.asarray) if unnamed else FunctionTransformer()
    return Pipeline([("features", step.fit(rows)), ("model", model)])


def _unusual_row_check(wrapped: Pipeline, rows: pd.DataFrame, task: str) -> list[str]:
    """A warning when the model cannot answer rows with missing values or unseen categories."""
    unusual = _unusual_rows(rows.head(20))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped.predict_proba(unusual) if task == "classification" else wrapped.predict(unusual)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal: the rows the dataset has work
        return [f"the model fails on rows with missing values or unseen categories ({type(exc).__name__}: "
                f"{_first_line(exc)}); such requests will be answered with an error"]
    return []


def _evaluate_as_is(wrapped: Pipeline, task: str, metric: str, schema: Schema, spec: ProjectSpec,
                    frame: pd.DataFrame, conformed: pd.DataFrame, held_out: bool, notes: list[str]) -> Fitted:
    """Metrics and the trivial baseline on all of the dataset's rows (their labels valid for the model),
    scored as requests are (conformed), as a Fitted that `register_fitted` stores."""
    features, target = schema.feature_names, schema.target.name
    rows = frame.copy()
    rows[features] = conformed[features]
    if task == "classification":
        classes = [c.item() if isinstance(c, np.generic) else c for c in wrapped.classes_]
        parse = label_parser(task, classes)
        position = {(type(c).__name__, c): n for n, c in enumerate(classes)}
        codes = np.full(len(rows), -1)
        for n, value in enumerate(rows[target].tolist()):
            try:
                label = parse(value)
                codes[n] = position[(type(label).__name__, label)]
            except ValueError:
                pass
        known = codes >= 0
        if (~known).any():
            unknown = sorted(map(str, pd.unique(rows.loc[~known, target])))[:10]
            notes.append(f"{int((~known).sum())} rows have a label that is none of the model's classes {classes} "
                         f"({unknown}) and are left out of its evaluation")
        rows, y = rows[known].reset_index(drop=True), codes[known]
        if len(np.unique(y)) < 2:
            raise TrainError(f"the dataset's target {target!r} matches fewer than two of the model's classes "
                             f"{classes}: nothing to evaluate it on; is this the model for this data?")
    else:
        classes, y = None, rows[target].to_numpy(dtype=float)
    if len(rows) < 20:
        raise TrainError(f"{len(rows)} rows to evaluate the model on; at least 20 are needed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = _evaluate(wrapped, task, rows[features], y)
        dummy = DummyClassifier(strategy="prior") if task == "classification" else DummyRegressor()
        baseline = _evaluate(dummy.fit(rows[features], y), task, rows[features], y)
        slices = _slice_metrics(wrapped, task, metric, rows, features, y, spec.evaluation.slices)
    if not math.isfinite(metrics[metric]):
        raise TrainError(f"{metric} of the model is undefined on dataset rows (e.g. one class only)")
    trained_on = rows.iloc[:0] if held_out else rows  # every row counts as possibly trained on
    return Fitted(wrapped, task, metric, metrics, {metric: baseline[metric]}, slices, classes, trained_on, rows,
                  y)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
