"""`everloop models import`: a scikit-learn model fitted elsewhere, adopted into the loop.

A joblib/pickle file, a skops file or an MLflow model directory (sklearn flavor) is read once into
memory, hashed (sha256) and loaded from those same bytes, so what is recorded is what was loaded.
The model is probed with rows of a dataset version: a full pipeline takes the raw columns (so does an
estimator fitted on some of them by name, which is handed those); a bare estimator wants the encoded
features it was fitted on, which everloop cannot rebuild, so it is refused, or with `features=True` a
fresh clone of it (same class, same hyper-parameters) is fitted behind everloop's own feature pipeline.
Either way the result is the usual artifact, a ("features", ...), ("model", ...) Pipeline with the
dataset's schema, so serving, batch scoring, monitoring and the gate treat it like any model everloop
trained, and the loop retrains it as a fresh `sklearn.base.clone` of that pipeline (see
`everloop.train.fit`'s `template`).

The model was fitted on the user's file as pandas read it, and everloop's schema reads some columns
otherwise (a True/False column is the text 'True'/'False' to it, an integer code made categorical is
'1'; a lone request row's missing text is None where a file's column holds NaN): `AsRead`, the
imported pipeline's first step (or the first step of each branch of its ColumnTransformer, where the
pipeline is split there), hands each such column over as pandas read it. Then the import compares
everloop's answers with the model's own `predict_proba`/`predict` on the first rows of the user's
file read with pandas, all at once and some one at a time as one-row requests reach it
(`check_answers`), and refuses the model, naming the columns, when they differ: the safety net for
every mismatch not converted. Nothing is unpickled before the file's bytes say what it is: a `.skops`
name means skops or refusal, and a CSV or text file is named as such.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import pickle
import pickletools
import re
import shlex
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin, clone, is_classifier
from sklearn.compose import ColumnTransformer
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.pipeline import Pipeline

from everloop.data import Schema, get_dataset, get_schema, iter_batches, load_frame
from everloop.data._sources import _expand, sniff_delimiter
from everloop.errors import EverloopError, IntegrityError, TrainError
from everloop.features import build_features
from everloop.spec import ProjectSpec, SqlSource
from everloop.store import STORE_DIR, Store
from everloop.store._artifacts import sha256_bytes
from everloop.train import TrainResult, label_parser, task_of
from everloop.train._artifact import _unusual_rows
from everloop.train._metrics import REGRESSION
from everloop.train._train import (Fitted, _evaluate, _slice_metrics, estimator_name, estimator_params,
                                   final_estimator, fit, register_fitted)

SKOPS_HINT = "pip install 'everloop[import]' (or: pip install skops)"
ZIP_MAGIC = b"PK\x03\x04"  # a zip archive's first bytes: skops files are zip archives
# The first bytes of joblib's compressed files: zlib, gzip, bz2, xz, lzma (its own header), lz4.
JOBLIB_COMPRESSED = (b"\x78\x01", b"\x78\x5e", b"\x78\x9c", b"\x78\xda", b"\x1f\x8b",
                      b"BZh", b"\xfd7zXZ", b"]\x00\x00", b"\x04\x22\x4d\x18")
PROBE_ROWS = 200  # rows of the dataset the model is first tried on
CHECK_ROWS = 1000  # rows of the user's file on which everloop's answers must equal the model's own
ONE_ROWS = 50  # of those, rows also sent one at a time (a lone row is read value by value)
TOLERANCE = 1e-9  # the largest difference allowed between them (floating-point noise only)
# The spellings pandas.read_csv reads as bools (its default true/false values), and bools themselves.
TRUTH = {"True": True, "true": True, "TRUE": True, "False": False, "false": False, "FALSE": False,
         True: True, False: False}
# Where the MLflow signature's column types fit a schema column's kind.
MLFLOW_KINDS = {"double": "numeric", "float": "numeric", "long": "numeric", "integer": "numeric",
                "boolean": "categorical", "string": "categorical", "datetime": "datetime"}


@dataclass(frozen=True)
class ImportResult(TrainResult):
    """A `TrainResult` (the new model version, its metric, baseline and lift) plus what was imported:
    the file, its sha256 and format, what the probe found ("pipeline": takes the raw columns;
    "estimator": wants encoded features), whether everloop refit a clone of it behind its own features
    (`refit`), whether the metrics are in-sample (the model may have seen the dataset's rows), the
    warnings to show (pickles run code, version mismatches, rows it cannot answer), and `serves`: what
    answers requests once the version is promoted (the file's own model, or a clone everloop fitted)."""

    source: str = ""
    sha256: str = ""
    format: str = ""
    found: str = ""
    description: str = ""
    refit: bool = False
    in_sample: bool = True
    warnings: tuple[str, ...] = ()
    serves: str = ""  # one sentence: what answers requests once this version is promoted


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

    A model that takes the raw columns (a full pipeline, or an estimator fitted on some raw columns by
    name) is wrapped as it is, behind `AsRead` where pandas read a column of the dataset's source file
    otherwise than everloop does, and its answers on the file's first `CHECK_ROWS` rows must equal its
    own (`check_answers`). A bare estimator that wants already-encoded features raises TrainError saying
    so, unless `features=True`: then a fresh clone of it is fitted behind everloop's feature pipeline on
    the dataset (a held-out split, as `everloop train` does), since the estimator's fitted state belongs
    to an encoding the file lacks (`ImportResult.serves` says which of the two serves).

    Returns an ImportResult. Raises IntegrityError (hash mismatch), TrainError (a model that cannot be
    read, loaded, probed or used, is not fitted, or would be served with other answers than its own: the
    message says why and what to do), NotFoundError (no such dataset).
    Reference: skops' trusted-types loading (skops.io.get_untrusted_types / loads); MLflow's MLmodel
    format for the sklearn flavor (flavors.sklearn: pickled_model, serialization_format, sklearn_version)."""
    started = time.perf_counter()
    if not isinstance(path, (str, os.PathLike)):  # a fitted object passed where its file was meant
        raise TypeError(f"path: expected a file path, got {type(path).__name__}; save it with "
                        "joblib.dump(model, 'model.joblib') first and pass that path")
    path = Path(path).resolve()  # the reason, card and lineage name the file wherever they are read
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
    notes = list(loaded.warnings)
    fitted_model = _is_fitted(model)
    if not fitted_model and not features:
        what = "pipeline" if isinstance(model, Pipeline) else "model"
        raise TrainError(f"{shown}: the {what} is not fitted (call fit before saving): {describe(model)} holds "
                         "no learned state to serve. Fit it on your training rows, save it again and import "
                         "that" + ("" if isinstance(model, Pipeline) else ", or pass --features to have "
                                   "everloop fit a fresh clone of it behind its own feature pipeline"))
    reading: list[str] = []  # how the user's rows were read: shown only when they are used
    raw, read_from = user_rows(store, spec, dataset, schema, frame, reading)
    reader = reader_for(model, schema, raw)
    if fitted_model:
        takes_raw, found = probe(model, reader, conformed[schema.feature_names], task, schema, frame,
                                 dataset.version)
    else:
        takes_raw, found = False, f"{describe(model)}, not fitted"
    origin = {"path": str(path), "sha256": loaded.sha256, "format": loaded.format,
              "found": "pipeline" if takes_raw else "estimator", "description": found,
              "made_with": loaded.made_with, "name": name}
    if loaded.mlmodel_sha256:
        origin["mlmodel_sha256"] = loaded.mlmodel_sha256
    named = name + " " if name else ""
    if takes_raw:
        why = f"imported {named}from {path} (sha256 {loaded.sha256[:12]})"
        if features:
            notes.append("--features not used: the model already takes the raw columns")
        if reader.array:
            notes.append(f"the model was fitted without column names: it gets the columns in the schema's order "
                         f"({', '.join(schema.feature_names)}); check that this is the order it was fitted on")
        wrapped = wrap(model, conformed[schema.feature_names].head(PROBE_ROWS), reader)
        notes += reading
        origin["checked"] = check_answers(model, wrapped, raw, reader, schema, task, shown, read_from,
                                          probe=frame.head(PROBE_ROWS))
        notes += _unusual_row_check(wrapped, conformed[schema.feature_names], task)
        fitted = _evaluate_as_is(wrapped, task, metric, schema, spec, frame, conformed, held_out, notes)
        in_sample, refit = not held_out, False
        extra = {"pipeline_source": "imported", "in_sample": in_sample, "train_rows": None}
        serves = (f"{describe(model)} from {path.name} as it is, with its own fitted state; its answers equal "
                  f"its own {'predict_proba' if task == 'classification' else 'predict'} on "
                  f"{origin['checked']['rows']} rows of {read_from} ({origin['checked']['one_rows']} of them also "
                  "sent one at a time)")
    elif not features and _raw_named(model, schema):
        raise TrainError(f"{shown}: {found}. Check that it predicts rows of {read_from} read with "
                         "pandas.read_csv: preparation done outside the model (fillna, casts) must be steps of a "
                         "Pipeline saved with it")
    elif not features:
        raise TrainError(f"{shown}: {found}. A bare estimator's fitted state belongs to the encoding it was "
                         "fitted on, which the file does not hold, so everloop cannot serve it as it is. Save "
                         "the whole scikit-learn Pipeline (preprocessing + estimator) and import that, or pass "
                         "--features to fit a fresh clone of this estimator (same class and hyper-parameters) "
                         f"behind everloop's feature pipeline on dataset v{dataset.version}")
    else:
        why = (f"a fresh clone of the estimator {named}in {path} (sha256 {loaded.sha256[:12]}), fitted by "
               f"everloop behind its own features on dataset v{dataset.version}")
        template = Pipeline([("features", build_features(schema, spec)), ("model", model)])
        fitted = fit(frame, schema, spec, template=template)
        in_sample, refit = False, True
        origin["features"] = "everloop"
        extra = {"pipeline_source": "clone", "in_sample": False}
        serves = (f"a fresh clone of {describe(model)} (same class and hyper-parameters; nothing fitted in "
                  f"{path.name} is used), fitted by everloop behind its own feature pipeline on the training rows "
                  f"of dataset v{dataset.version}")
    origin["artifact"] = store.artifacts.put(loaded.data)  # the file itself, kept and verified on every read
    extra |= {"imported_from": origin, "estimator": estimator_name(fitted.pipeline),
              "params": estimator_params(fitted.pipeline), "import_warnings": notes}
    result = register_fitted(store, spec, dataset, schema, frame, fitted, reason=why, started=started,
                             extra=extra)
    return ImportResult(**result.__dict__, source=str(path), sha256=loaded.sha256, format=loaded.format,
                        found=origin["found"], description=found, refit=refit, in_sample=in_sample,
                        warnings=tuple(notes), serves=f"model v{result.version} serves {serves}")


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
    if data.startswith(ZIP_MAGIC) or path.suffix.lower() == ".skops":
        _refuse_not_skops(data, path)  # before anything is loaded: a .skops name promises no pickle
        model, made_with, notes = _load_skops(data, path, trust)
        return LoadedFile(model, "skops", digest, data, made_with, notes)
    _refuse_text(data, path)
    kind = "pickle" if path.suffix.lower() in (".pkl", ".pickle") else "joblib"
    model, made_with, notes = _load_pickle(data, path)
    return LoadedFile(model, kind, digest, data, made_with, notes)


def _checked_digest(data: bytes, expected: str | None, path: Path) -> str:
    """The sha256 of a model file's bytes, checked against `expected`; an empty file refused here too."""
    digest = sha256_bytes(data)
    if expected is not None and digest != expected.strip().lower():
        raise IntegrityError(f"{path}: its sha256 is {digest}, not the expected {expected.strip()}; the file is "
                             "not the one you meant (changed or replaced): it was not loaded", digest=digest)
    if not data:
        raise TrainError(f"{path.name} is empty, not a pickled model: save the model again (joblib.dump(model, PATH) "
                         "or skops.io.dump(model, PATH)) and import that")
    return digest


def _refuse_not_skops(data: bytes, path: Path) -> None:
    """Raise TrainError unless `data` is a whole skops file (a zip archive holding skops' schema.json).
    Nothing is unpickled: a file named .skops that holds a pickle is refused, never loaded."""
    name = path.name
    if not data.startswith(ZIP_MAGIC):
        held = "it holds a pickle" if _looks_pickled(data) else f"it starts with {data[:8]!r}"
        fix = ("; rename it .pkl if you trust it (loading a pickle runs the code it holds)"
               if _looks_pickled(data) else "; save the model with skops.io.dump(model, PATH)")
        raise TrainError(f"{name} is not a skops file ({held}){fix}")
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except (zipfile.BadZipFile, EOFError):
        raise TrainError(f"{name} is not a complete skops file: the zip archive ends early (an interrupted "
                         "copy or save?); save the model again with skops.io.dump(model, PATH)") from None
    if "schema.json" not in names:
        raise TrainError(f"{name} is a zip archive without skops' schema.json, not a skops file (holds "
                         f"{', '.join(names[:5]) or 'nothing'}); an MLflow model is imported as its unzipped "
                         "folder")


def _looks_pickled(data: bytes) -> bool:
    """Whether bytes start as a pickle (protocol 2 and later) or a joblib file compressed by one of its
    compressors (zlib, gzip, bz2, xz, lzma, lz4) does: judged from the first bytes, nothing is loaded."""
    return data[:1] == b"\x80" or data.startswith(JOBLIB_COMPRESSED)


def _refuse_text(data: bytes, path: Path) -> None:
    """Raise TrainError for a text file given as the model (a CSV of the data, a README), before the
    unpickler reads its letters as instructions. A pickle of protocol 0 is text too: one that parses as
    a pickle to its end is let through."""
    head = data[:1 << 16]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if len(data) == len(head) or exc.start < len(head) - 3:  # binary, not a character the sample cut
            return
        text = head[:exc.start].decode("utf-8")
    if "\x00" in text or re.search(r"[\x01-\x08\x0e-\x1f]", text):
        return
    last = None
    try:
        for last in pickletools.genops(data):  # reads opcodes only: no object is built, no code runs
            pass
        if last is not None and last[0].name == "STOP":
            return
    except Exception:  # noqa: BLE001 - not a pickle: whatever genops stumbled on
        pass
    lines = [line for line in text.splitlines()[:6] if line.strip()]
    fix = "pass the file the model was saved to (joblib.dump(model, PATH) or skops.io.dump(model, PATH))"
    first = _short(lines[0] if lines else "")
    if path.suffix.lower() in (".csv", ".tsv"):
        raise TrainError(f"{path.name} is a CSV file, not a pickled model: {fix}; the data go in everloop.yaml's "
                         "data.source")
    what = "CSV text" if len(lines) > 1 and sniff_delimiter(text, "") else "text"
    raise TrainError(f"{path.name} is not a pickle/joblib file: it holds {what} ({first}); {fix}")


def _short(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


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
        except (EOFError, ValueError, pickle.UnpicklingError) as exc:
            if not isinstance(exc, EOFError) and not re.search(r"EOF|exhausted|truncated", str(exc)):
                raise TrainError(_unloadable(data, path, exc)) from None
            raise TrainError(f"{path.name} ends before the pickled model does: the file is truncated (an "
                             "interrupted copy or save?); save the model again") from None
        except Exception as exc:  # any unpickling failure: not a pickle, a missing class
            raise TrainError(_unloadable(data, path, exc)) from None
    made_with, mismatch = _versions(model, caught)
    return model, made_with, notes + mismatch


def _unloadable(data: bytes, path: Path, exc: BaseException) -> str:
    """Why a file could not be unpickled: not a pickle at all, or a pickle that failed."""
    if not _looks_pickled(data):
        return (f"{path.name} is not a pickle/joblib file (reading it as one failed: {_why(exc)}); pass the file "
                "the model was saved to (joblib.dump(model, PATH))")
    return f"{path.name} cannot be loaded as a joblib or pickle file: {_why(exc)}"


def _load_skops(data: bytes, path: Path, trust: list[str], declared: list[str] | None = None,
                shown: str | None = None) -> tuple[Any, dict[str, str], list[str]]:
    try:
        import skops.io as sio
    except ImportError:
        raise TrainError(f"{path.name} is a skops file; reading it needs skops: {SKOPS_HINT}") from None
    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:  # not a readable skops file
        raise TrainError(f"{path.name} cannot be read as a skops file: {_why(exc)}") from None
    refused = [t for t in untrusted if t not in trust]
    if refused:
        flags = " ".join(f"--trust {shlex.quote(t)}" for t in [*trust, *refused])
        saved = (f" (the MLmodel file says whoever saved it trusted {declared}; that is the file speaking "
                 "about itself, so everloop asks you)") if declared else ""
        raise TrainError(f"{path.name} holds types skops does not trust by default: {refused}{saved}. Loading "
                         "such a type can run code or read out-of-bounds memory if the file was tampered "
                         "with. Review each (skops.io.get_untrusted_types explains why), then trust the ones "
                         f"you accept: everloop models import {shlex.quote(str(shown or path))} {flags} "
                         f"(with your other options; Python: trust={[*trust, *refused]!r})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = sio.loads(data, trusted=list(untrusted))
        except Exception as exc:
            raise TrainError(f"{path.name} cannot be loaded with skops: {_why(exc)}") from None
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
        _refuse_not_skops(data, model_file)
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


def probe(model: Any, reader: "AsRead", rows: pd.DataFrame, task: str, schema: Schema, frame: pd.DataFrame,
          dataset_version: int) -> tuple[bool, str]:
    """Try the model on the first `PROBE_ROWS` of the dataset's raw feature columns (`rows`, conformed as
    a request is), handed over by `reader` as the model will get them. Returns (True, what was found) when
    it answers them in the right shape: a full pipeline, or an estimator fitted on these columns or some
    of them. Returns (False, why) when it cannot: it wants encoded features, or it fails on raw columns
    it was fitted on (`_raw_named`). Raises TrainError when it was fitted on columns the dataset has but
    the schema does not use as features, or (a Pipeline) on columns the dataset lacks."""
    names = [str(n) for n in getattr(model, "feature_names_in_", [])]
    shown = f" ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})" if names else ""
    error = None
    try:
        head = reader.transform(rows.head(PROBE_ROWS))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "X has feature names, but ... was fitted without": not our call
            try:
                out = np.asarray(model.predict_proba(head) if task == "classification" else model.predict(head))
            except Exception:  # noqa: BLE001 - a model without an imputer: try the rows without missing values
                complete = rows[rows[list(reader.columns or rows.columns)].notna().all(axis=1)].head(PROBE_ROWS)
                if complete.empty:
                    raise
                head = reader.transform(complete)
                out = np.asarray(model.predict_proba(head) if task == "classification" else model.predict(head))
        if (task == "classification" and out.ndim == 2 and out.shape[0] == len(head)) or \
                (task == "regression" and out.shape == (len(head),)):
            if reader.columns is not None and len(reader.columns) < len(schema.feature_names):
                return True, (f"{describe(model)}, fitted on {len(names)} of the raw columns{shown}, which it "
                              "is given")
            return True, f"{describe(model)}, which takes the raw columns"
        error = f"it answered an array of shape {out.shape} for {len(head)} rows"
    except Exception as exc:  # noqa: BLE001 - whatever the model raises is the finding
        error = _why(exc)
    absent = [n for n in names if n not in schema.feature_names]
    ignored = [n for n in absent if n in schema.ignored]
    if ignored:
        raise TrainError(_ignored_columns(model, ignored, schema, dataset_version))
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
    if _raw_named(model, schema):
        return False, (f"{describe(model)}, fitted on the raw columns{shown}, which fails on dataset "
                       f"v{dataset_version}'s rows as everloop hands them over ({error})")
    fitted_on = getattr(model, "n_features_in_", None)
    wants = f"fitted on {fitted_on} columns{shown}" if fitted_on is not None else "fitted on other inputs"
    return False, (f"a bare estimator, {describe(model)}, that wants already-encoded features: it was {wants}, "
                   f"and answering dataset v{dataset_version}'s {len(schema.feature_names)} raw feature columns "
                   f"failed ({error})")


def _ignored_columns(model: Any, names: list[str], schema: Schema, dataset_version: int) -> str:
    """Why a model fitted with columns the schema left out cannot be imported yet, and how to add them."""
    what = f"the pipeline {describe(model)}" if isinstance(model, Pipeline) else f"the model {describe(model)}"
    why = "; ".join(f"{n}: {schema.ignored[n]}" for n in names[:5])
    add = "" if all("features." in schema.ignored[n] for n in names[:5]) else (
        f"; to use {'it' if len(names) == 1 else 'them'}, name {'it' if len(names) == 1 else 'them'} in "
        f"everloop.yaml under features.categorical: [{', '.join(names)}] (features.numeric for numbers)")
    shown = ", ".join(map(repr, names[:10]))
    return (f"{what} needs the column{'s' if len(names) > 1 else ''} {shown}, which dataset "
            f"v{dataset_version}'s schema ignores ({why}){add}. Then run 'everloop schema accept --from-data "
            "FILE' (your data file) and 'everloop ingest', and import again with the new dataset version")


def _raw_named(model: Any, schema: Schema) -> bool:
    """Whether the model was fitted with column names that are all raw feature columns of the schema."""
    names = [str(n) for n in getattr(model, "feature_names_in_", [])]
    return bool(names) and set(names) <= set(schema.feature_names)


def _is_fitted(model: Any) -> bool:
    """False for a scikit-learn model (or Pipeline ending in one) that was saved before `fit`. Other
    classes keep their state in attributes scikit-learn cannot judge: the probe finds out."""
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    if not type(final_estimator(model)).__module__.startswith("sklearn."):
        return True
    try:
        check_is_fitted(model)
    except NotFittedError:
        return False
    except Exception:  # noqa: BLE001 - not judged here
        return True
    return True


def describe(model: Any) -> str:
    """A model in a few words: a Pipeline's steps joined by '->', else its class."""
    if isinstance(model, Pipeline):
        return "Pipeline(" + " -> ".join(describe(step) for _, step in model.steps) + ")"
    if isinstance(model, ColumnTransformer):
        count = len(model.transformers)
        rest = ", the other columns passed through" if model.remainder == "passthrough" else ""
        return f"ColumnTransformer({count} branch{'es' if count != 1 else ''}{rest})"
    return type(model).__name__


def wrap(model: Any, rows: pd.DataFrame, reader: "AsRead | None" = None) -> Pipeline:
    """The model as everloop's ("features", ...), ("model", ...) Pipeline, predicting exactly as it does.
    A two-step Pipeline whose first step is a ColumnTransformer fitted with column names, given the
    columns in the types everloop reads them (`reader` converts none), is split there, so the service
    may replay the transformer with numpy and compile the estimator's trees (both only after checking
    they give the same outputs); each of its branches reads missing values first (`_branches_as_read`). Anything else sits behind `reader` (default: the schema's columns as
    everloop reads them; a plain array when the model was fitted without column names), fitted on `rows`."""
    if reader is None:
        unnamed = getattr(model, "feature_names_in_", None) is None and getattr(model, "n_features_in_", None)
        reader = AsRead(array=bool(unnamed))
    if not reader.kinds and not reader.array and isinstance(model, Pipeline) and len(model.steps) == 2 \
            and isinstance(model.steps[0][1], ColumnTransformer):
        return Pipeline([("features", _branches_as_read(model.steps[0][1])), ("model", model.steps[1][1])])
    return Pipeline([("features", clone(reader).fit(rows)), ("model", model)])


def _branches_as_read(columns: ColumnTransformer) -> ColumnTransformer:
    """A copy of a fitted ColumnTransformer whose every branch (and remainder) first gets its columns'
    missing values as pandas reads them (`AsRead`): one-row requests hold None where a file's column
    holds NaN, and an encoder fitted on NaN takes None for an unseen category. Unfitted branches are
    wrapped too, so a `clone` (the loop's retraining) keeps the step. Its transformers stay the user's
    own objects, fitted; only the list holding them is new."""
    def read(step: Any) -> Any:
        return step if isinstance(step, str) else ReadMissing(step)

    copied = copy.copy(columns)
    copied.transformers = [(name, read(step), cols) for name, step, cols in columns.transformers]
    copied.remainder = read(columns.remainder)
    copied.transformers_ = [(name, read(step), cols) for name, step, cols in columns.transformers_]
    return copied


class AsRead(TransformerMixin, BaseEstimator):
    """Request rows, as everloop's schema reads them, handed to an imported model as pandas read the file
    it was fitted on: the serving path's first step for a model fitted outside everloop.

    `kinds`: column -> "bool" or "number", for the columns pandas read as true/false values or numbers
    where the schema keeps text (a True/False column's values are 'True'/'False' to everloop; a code
    column such as 1/2/3 or 02139 may be categories). Such a column is converted row by row as pandas
    would have read those values: "bool" gives True/False (missing: NaN, and the column object, as in
    pandas), "number" gives integers or floats (a value that is no number: NaN). Every other missing
    value (None in a text column, as one-row requests hold it) becomes NaN, as pandas reads an empty
    cell: an encoder fitted on NaN would take None for an unseen category. `columns`: the columns
    handed on, in this order (the model's `feature_names_in_`); None: all of them. `array`: hand on a
    numpy array, for a model fitted without column names. Takes a frame, or an array (a branch of a
    ColumnTransformer may get one). Stateless: `fit` learns nothing."""

    def __init__(self, kinds: dict[str, str] | None = None, columns: list[str] | None = None, array: bool = False):
        self.kinds = kinds
        self.columns = columns
        self.array = array

    def fit(self, X: pd.DataFrame, y: Any = None) -> "AsRead":
        return self

    def transform(self, X: pd.DataFrame | np.ndarray) -> pd.DataFrame | np.ndarray:
        if not isinstance(X, pd.DataFrame):
            return _missing_as_nan(np.asarray(X))
        frame = X if self.columns is None else X[list(self.columns)]
        kinds = self.kinds or {}
        changed: dict[Any, Any] = {}
        for name, dtype in zip(frame.columns, frame.dtypes):
            if name in kinds:  # its missing values come out as NaN too
                changed[name] = (_as_bool if kinds[name] == "bool" else _as_number)(frame[name])
            elif dtype == object or _na_string(dtype):  # numbers hold NaN already, and so does the str dtype
                array = frame[name].to_numpy(dtype=object)
                nan = _missing_as_nan(array)
                if nan is not array:
                    changed[name] = nan
        if changed:  # a request's rows are a handful: per-call cost matters more than elegance here
            frame = frame.copy(deep=False)
            for name, values in changed.items():
                frame[name] = values
        return frame.to_numpy() if self.array else frame

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.asarray(self.columns if self.columns is not None else input_features, dtype=object)

    def __sklearn_is_fitted__(self) -> bool:
        return True


class ReadMissing(TransformerMixin, BaseEstimator):
    """A branch of an imported ColumnTransformer behind `AsRead`'s reading of missing values: `step` gets
    NaN where a request row holds None, as in the file it was fitted on. Fitting fits `step` in place
    (as a Pipeline fits its steps), so a clone of the whole pipeline keeps the reading when the loop
    refits it. `steps` lists the reading and the step's own steps, for the service's numpy path."""

    def __init__(self, step: Any):
        self.step = step

    def fit(self, X: Any, y: Any = None, **params: Any) -> "ReadMissing":
        self.step.fit(_READ.transform(X), y, **params)
        return self

    def fit_transform(self, X: Any, y: Any = None, **params: Any) -> Any:
        return self.step.fit_transform(_READ.transform(X), y, **params)

    def transform(self, X: Any) -> Any:
        return self.step.transform(_READ.transform(X))

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return self.step.get_feature_names_out(input_features)

    @property
    def steps(self) -> list[tuple[str, Any]]:
        inner = self.step.steps if isinstance(self.step, Pipeline) else [("step", self.step)]
        return [("as_read", _READ), *inner]

    def __sklearn_is_fitted__(self) -> bool:
        return True


def _na_string(dtype: Any) -> bool:
    """pandas' "string" dtype, whose missing value is pd.NA (its "str" dtype, read_csv's, holds NaN)."""
    return isinstance(dtype, pd.StringDtype) and dtype.na_value is pd.NA


def _missing_as_nan(values: np.ndarray) -> np.ndarray:
    """An object array with its missing values (None, pd.NA, NaT) as NaN, as pandas.read_csv gives an
    empty cell; `values` itself when it has none, or holds no objects."""
    if values.dtype != object:
        return values
    missing = pd.isna(values)
    if not missing.any():
        return values
    out = values.copy()
    out[missing] = np.nan
    return out


def _as_bool(values: pd.Series) -> pd.Series:
    """True/False as pandas.read_csv reads them: bool, or object with NaN where values are missing."""
    column = values.astype(object).map(TRUTH)  # one hash lookup per value; anything else: NaN
    return column.astype(bool) if column.notna().all() else column.astype(object)


def _as_number(values: pd.Series) -> pd.Series:
    """Numbers as pandas.read_csv reads them: int64 when every value is a whole number, else float64."""
    numbers = pd.to_numeric(pd.Series(values.to_numpy(dtype=object), index=values.index), errors="coerce")
    numbers = numbers.astype(float)
    whole = numbers.notna().all() and bool(np.all(np.mod(numbers.to_numpy(), 1) == 0)) \
        and bool(np.all(np.abs(numbers.to_numpy()) < 2**53))
    return numbers.astype(np.int64) if whole else numbers


_READ = AsRead()  # missing values as pandas reads them, nothing else: stateless, shared


def reader_for(model: Any, schema: Schema, raw: pd.DataFrame) -> AsRead:
    """How requests reach `model`: the columns it was fitted on (its `feature_names_in_`, when they are
    schema features in another set or order), as a plain array when it was fitted without names, and
    converted where pandas read the user's file (`raw`, see `user_rows`) as true/false values or numbers
    while the schema reads text."""
    names = [str(n) for n in getattr(model, "feature_names_in_", [])]
    columns = names if _raw_named(model, schema) and names != schema.feature_names else None
    array = not names and getattr(model, "n_features_in_", None) is not None
    used = set(columns or _columns_used(model) or schema.feature_names)  # converting no other keeps the fast path
    kinds = {}
    for col in schema.features:
        if col.name not in raw.columns or col.name not in used or col.kind != "categorical":
            continue  # numbers and dates stay as the schema reads them (an int/float difference is harmless)
        read = _family(raw[col.name])
        if read in ("bool", "number"):
            kinds[col.name] = read
    return AsRead(kinds or None, columns, array)


def _columns_used(model: Any) -> set[str] | None:
    """The columns a Pipeline's first ColumnTransformer reads (its branches and a remainder that is not
    dropped), by name; None when that cannot be told."""
    first = model.steps[0][1] if isinstance(model, Pipeline) else model
    names = getattr(first, "feature_names_in_", None)
    if not isinstance(first, ColumnTransformer) or names is None or not hasattr(first, "transformers_"):
        return None
    used: set[str] = set()
    try:
        for _, step, columns in first.transformers_:
            if isinstance(step, str) and step == "drop":
                continue
            picked = [columns] if isinstance(columns, str) else columns
            if callable(picked):
                return None
            picked = np.asarray(names, dtype=object)[picked] if not all(isinstance(c, str) for c in
                                                                        np.atleast_1d(picked)) else picked
            used.update(str(c) for c in np.atleast_1d(picked))
    except (IndexError, TypeError, ValueError):
        return None
    return used


def _family(values: pd.Series) -> str:
    """What pandas made of a column: "bool", "number", "datetime" or "text"."""
    if pd.api.types.is_bool_dtype(values):
        return "bool"
    if pd.api.types.is_numeric_dtype(values):
        return "number"
    if pd.api.types.is_datetime64_any_dtype(values):
        return "datetime"
    present = values.dropna()
    if len(present) and all(isinstance(v, (bool, np.bool_)) for v in present.tolist()):
        return "bool"  # True/False with missing values: pandas keeps them as objects
    return "text"


# -- the user's own rows, and the check that everloop answers them as the model does -----------------


def user_rows(store: Store, spec: ProjectSpec, dataset: Any, schema: Schema, frame: pd.DataFrame,
              notes: list[str]) -> tuple[pd.DataFrame, str]:
    """The dataset's first `CHECK_ROWS` rows as the user's own code read them to fit the model: its source
    file through pandas (`pandas.read_csv` with the file's delimiter, Parquet through pyarrow, a SQL query
    through `pandas.read_sql`), with every column pandas found there. Where the source cannot be read
    here (moved, or rows that came from feedback), the dataset's stored rows written as CSV and read
    back with `pandas.read_csv`, with a note saying so. Returns (rows, where they were read from)."""
    source = dataset.source
    try:
        if isinstance(spec.data.source, SqlSource) and source == f"sql: {spec.data.source.query}":
            raw = next(iter_batches(spec.data.source, batch_rows=CHECK_ROWS))
            where = "the sql source"
        else:
            path = _source_file(store, source)
            where = path.name
            if path.suffix.lower() in (".parquet", ".pq"):
                raw = next(iter_batches(path, batch_rows=CHECK_ROWS))
            else:
                with open(path, encoding="utf-8-sig", errors="replace") as handle:
                    head = handle.read(1 << 16)
                delimiter = sniff_delimiter(head, "\t" if path.suffix.lower() == ".tsv" else ",")
                raw = pd.read_csv(path, sep=delimiter, nrows=CHECK_ROWS)
        raw = raw.head(CHECK_ROWS).reset_index(drop=True)
        if set(schema.feature_names) <= {str(c) for c in raw.columns} and len(raw):
            return raw, where
        why = "it no longer has the schema's feature columns"
    except (OSError, StopIteration, EverloopError, ValueError, pd.errors.ParserError) as exc:
        why = _why(exc)
    stored = frame.head(CHECK_ROWS)[schema.feature_names].copy()
    for col in schema.features:
        if col.kind == "numeric" and col.dtype == "int":
            try:
                stored[col.name] = stored[col.name].astype("Int64")  # written 3, not 3.0, as in the file
            except (TypeError, ValueError):
                pass
    notes.append(f"dataset v{dataset.version}'s source {source} cannot be read here ({why}): the model's answers "
                 "were checked on the dataset's stored rows, written as CSV and read back with pandas.read_csv")
    return pd.read_csv(io.StringIO(stored.to_csv(index=False))), f"dataset v{dataset.version}"


def _source_file(store: Store, source: str) -> Path:
    """The first file of a dataset's source (a file, folder or glob), relative to the project folder."""
    base = store.root.parent if store.root.name == STORE_DIR else Path.cwd()
    for folder in dict.fromkeys([base, Path.cwd()]):
        try:
            files = _expand(folder, source)
        except EverloopError:
            continue
        if files and files[0].is_file():
            return files[0]
    raise FileNotFoundError(f"no such file: {source}")


def check_answers(model: Any, wrapped: Pipeline, raw: pd.DataFrame, reader: AsRead, schema: Schema,
                  task: str, shown: str, read_from: str, probe: pd.DataFrame | None = None) -> dict[str, Any]:
    """Compare everloop's answers with the model's own on the user's rows (`raw`, as pandas read them):
    the model called as its user calls it (on `raw`'s columns), against `wrapped` called as the service
    calls it (on the same rows conformed by the schema), all rows at once and then up to `ONE_ROWS` of
    them one at a time, as one-row requests reach it (a lone row is read value by value: its missing
    text is None where a column's is NaN). `probe`: dataset rows on which the service would decide its
    numpy feature path (`TrainedModel.check_fast_path`), which one-row requests then take; None: the
    first rows of `raw`. Rows the schema refuses are left out. Returns {"rows": rows compared,
    "one_rows": rows compared alone, "max_difference": largest absolute difference}. Raises TrainError
    when the answers differ by more than `TOLERANCE`, naming the columns whose values reach the model
    otherwise than pandas gave them to it, with examples; or when the model cannot answer the rows."""
    checked = schema.check(raw, mode="request", coerce=True, whole=False)
    valid = np.ones(len(raw), dtype=bool) if checked.bad_rows is None else ~checked.bad_rows
    if not valid.any():
        raise TrainError(f"{shown}: none of the first {len(raw)} rows of {read_from} passes the dataset's schema: "
                         "nothing to check the model's answers on")
    names = list(reader.columns or schema.feature_names)
    call = "predict_proba" if task == "classification" else "predict"

    def answer(fn: Any, data: Any) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = np.asarray(getattr(fn, call)(data), dtype=float)
        return out.reshape(len(data), -1)

    # Every valid row; if the model fails on some, the rows without missing values (a model without an
    # imputer, fitted after a dropna): the unusual-row check warns about the others.
    complete = valid & raw[names].notna().all(axis=1).to_numpy()
    for keep in (valid, complete) if complete.any() and not np.array_equal(valid, complete) else (valid,):
        theirs_in = raw.loc[keep, names].reset_index(drop=True)
        try:
            theirs = answer(model, theirs_in.to_numpy() if reader.array else theirs_in)
            break
        except Exception as exc:  # noqa: BLE001 - the user's model on the user's own rows
            failure = exc
    else:
        raise TrainError(f"{shown}: the model fails on the first {int(valid.sum())} rows of {read_from} as "
                         f"pandas.read_csv reads them ({_why(failure)}), so everloop cannot check that it answers "
                         "as the model does. A model whose rows need preparing outside the pipeline (fillna, "
                         "casts, dropped columns) must carry that preparation as pipeline steps") from None
    rows = raw[keep].reset_index(drop=True)
    number = np.flatnonzero(keep) + 1  # data rows of the file, 1-based
    ours_in = checked.frame[keep].reset_index(drop=True)[schema.feature_names]
    try:
        ours = answer(wrapped, ours_in)
    except Exception as exc:  # noqa: BLE001
        ours, failed = None, _why(exc)
    if ours is not None and ours.shape == theirs.shape:
        gap = np.where(np.isnan(ours) & np.isnan(theirs), 0.0, np.abs(ours - theirs))
        gap = np.where(np.isnan(gap), np.inf, gap).max(axis=1)
        if gap.max() <= TOLERANCE:
            alone = _check_one_rows(wrapped, schema, task, rows, theirs, number,
                                    ours_in if probe is None else probe, call, shown, read_from)
            return {"rows": len(rows), "one_rows": alone, "max_difference": float(gap.max()),
                    "read_from": read_from}
        worst = int(gap.argmax())
        found = (f"by up to {gap.max():.3g} (row {number[worst]}: {_shown_answer(ours[worst])} from everloop, "
                 f"{_shown_answer(theirs[worst])} from the model)")
    else:
        found = f"everloop's call failed: {failed}" if ours is None else f"shapes {ours.shape} and {theirs.shape}"
    given = wrapped.named_steps["features"]
    given_in = given.transform(ours_in) if isinstance(given, AsRead) else ours_in
    culprits = _differing_columns(model, reader, given_in, theirs_in, rows, ours, number, call)
    cause = (f"The model gets {'; '.join(culprits)}" if culprits else
             "No column's values differ between the two: the model answers the same rows differently")
    raise TrainError(f"{shown}: everloop would answer otherwise than the model, so it was not imported: on the "
                     f"first {len(rows)} rows of {read_from} as pandas.read_csv reads them, everloop's answers "
                     f"differ from the model's own {call} {found}. {cause}. Make schema.yaml read such a column as "
                     "the model was fitted on it (its kind; then 'everloop schema accept' and 'everloop ingest'), "
                     "or give the pipeline a step that converts it, and import again")


def _check_one_rows(wrapped: Pipeline, schema: Schema, task: str, rows: pd.DataFrame, theirs: np.ndarray,
                    number: np.ndarray, probe: pd.DataFrame, call: str, shown: str, read_from: str) -> int:
    """Send up to `ONE_ROWS` of the user's rows (those with missing values first) one at a time through
    the service's one-row path: the JSON values a client sends, `Schema.conform_records` when the numpy
    feature path is on, else the schema's full check, then `predict_conformed`. Returns how many rows
    were compared; raises TrainError at the first whose answer differs from the model's own (`theirs`)."""
    from everloop.train._artifact import TrainedModel

    served = TrainedModel(None, wrapped, schema, {"task": task, "classes": list(range(theirs.shape[1]))})
    served.check_fast_path(probe)  # as the service does when it loads the model
    features = schema.feature_names
    missing = rows[features].isna().any(axis=1).to_numpy()
    picked = np.sort(np.r_[np.flatnonzero(missing)[:ONE_ROWS // 2], np.flatnonzero(~missing)][:ONE_ROWS])
    compared = 0
    for n in picked:
        record = {name: _json_value(rows[name].iat[n]) for name in features}
        given = schema.conform_records([record]) if served.fast is not None else None
        if given is None:
            checked = schema.check(pd.DataFrame.from_records([record], columns=features), mode="request",
                                   coerce=True, per_value=True)
            if checked.bad_rows is not None and checked.bad_rows.any():
                continue  # the service refuses this row alone (422): no answer to compare
            given = checked.frame
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            answered = served.predict_conformed(given)
        ours = np.asarray(answered.proba if task == "classification" else answered.labels, dtype=float)
        gap = np.abs(ours.reshape(-1) - theirs[n])
        gap = np.where(np.isnan(ours.reshape(-1)) & np.isnan(theirs[n]), 0.0, gap)
        compared += 1
        if not (np.nan_to_num(gap, nan=np.inf) <= TOLERANCE).all():
            values = ", ".join(f"{name}={_shown_value(_first(given[name]))}" for name in features)
            raise TrainError(
                f"{shown}: everloop would answer a one-row request otherwise than the model, so it was not "
                f"imported: row {number[n]} of {read_from} sent alone gets {_shown_answer(ours.reshape(-1))} "
                f"from everloop and {_shown_answer(theirs[n])} from the model's own {call} (sent with other rows "
                f"it gets the model's answer). everloop hands that row over as {values}. Make schema.yaml "
                "read a column whose value differs from your file's as the model was fitted on it (then "
                "'everloop schema accept' and 'everloop ingest'), or give the pipeline a step that converts "
                "it, and import again")
    return compared


def _json_value(value: Any) -> Any:
    """A value of a pandas-read row as a JSON client sends it: null for missing, plain Python scalars,
    date/times as ISO text."""
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, (pd.Timestamp, np.datetime64)):
        return pd.Timestamp(value).isoformat()
    return value.item() if isinstance(value, np.generic) else value


def _first(values: Any) -> Any:
    return values.iloc[0] if isinstance(values, pd.Series) else values[0]


def _differing_columns(model: Any, reader: AsRead, given: Any, theirs_in: pd.DataFrame, rows: pd.DataFrame,
                       ours: np.ndarray | None, number: np.ndarray, call: str) -> list[str]:
    """The columns whose values reach the model otherwise than pandas read them and which change its
    answers, each as 'NAME as X (type) where pandas.read_csv read Y (type), e.g. row N'."""
    frame = given if isinstance(given, pd.DataFrame) else pd.DataFrame(given, columns=list(theirs_in.columns))
    out = []
    for name in theirs_in.columns:
        a, b = frame[name].tolist(), theirs_in[name].tolist()
        differs = [n for n, (x, y) in enumerate(zip(a, b)) if not _same_value(x, y)]
        if not differs:
            continue
        if ours is not None:  # does handing this one column over as pandas read it change the answers?
            swapped = frame.copy()
            swapped[name] = theirs_in[name].to_numpy()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    data = swapped.to_numpy() if reader.array else swapped
                    out_swapped = np.asarray(getattr(model, call)(data), dtype=float).reshape(len(rows), -1)
                if np.allclose(out_swapped, ours, atol=TOLERANCE, equal_nan=True):
                    continue  # the model does not look at it, or sees no difference
            except Exception:  # noqa: BLE001 - a column whose values make the model fail matters
                pass
        n = differs[0]
        out.append(f"{name} as {_shown_value(a[n])} where pandas.read_csv read {_shown_value(b[n])} "
                   f"(row {number[n]})")
    return out


def _same_value(a: Any, b: Any) -> bool:
    """Whether two values are one: both missing, or equal and of one kind (True is not 1 nor 'True')."""
    missing = [v is None or v is pd.NA or (isinstance(v, float) and v != v) for v in (a, b)]
    if any(missing):
        return all(missing)
    if isinstance(a, (bool, np.bool_)) != isinstance(b, (bool, np.bool_)):
        return False
    if isinstance(a, str) != isinstance(b, str):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are not the same
        return False


def _shown_value(value: Any) -> str:
    """A value and its type as a user would name them: 'True' (str), True (bool), 3 (int)."""
    if isinstance(value, (pd.Timestamp, np.datetime64)):
        return f"{pd.Timestamp(value)} (datetime)"
    if isinstance(value, np.generic):
        value = value.item()
    return f"{value!r} ({type(value).__name__})"


def _shown_answer(row: np.ndarray) -> str:
    """One row's answer: the value, the positive class's probability, or the first class probabilities."""
    if len(row) <= 2:
        return f"{row[-1]:.6g}"
    return "[" + ", ".join(f"{v:.6g}" for v in row[:4]) + (", ..." if len(row) > 4 else "") + "]"


def _unusual_row_check(wrapped: Pipeline, rows: pd.DataFrame, task: str) -> list[str]:
    """A warning when the model cannot answer rows with missing values or unseen categories."""
    unusual = _unusual_rows(rows.head(20))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped.predict_proba(unusual) if task == "classification" else wrapped.predict(unusual)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal: the rows the dataset has work
        return [f"the model fails on rows with missing values or unseen categories ({_why(exc)}); such "
                "requests will be answered with an error"]
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            metrics = _evaluate(wrapped, task, rows[features], y) if len(rows) >= 20 else {}
        except Exception as exc:  # noqa: BLE001 - a model without an imputer: the rows it can answer
            complete = rows[features].notna().all(axis=1).to_numpy()
            if complete.all() or not complete.any():
                raise TrainError(f"the model fails on the dataset's rows: {_why(exc)}") from None
            notes.append(f"{int((~complete).sum())} rows with missing values, which the model cannot answer "
                         f"({_why(exc)}), are left out of its evaluation")
            rows, y = rows[complete].reset_index(drop=True), y[complete]
            metrics = {}
        if len(rows) < 20:
            raise TrainError(f"{len(rows)} rows to evaluate the model on; at least 20 are needed")
        metrics = metrics or _evaluate(wrapped, task, rows[features], y)
        dummy = DummyClassifier(strategy="prior") if task == "classification" else DummyRegressor()
        baseline = _evaluate(dummy.fit(rows[features], y), task, rows[features], y)
        slices = _slice_metrics(wrapped, task, metric, rows, features, y, spec.evaluation.slices)
    if not math.isfinite(metrics[metric]):
        raise TrainError(f"{metric} of the model is undefined on dataset rows (e.g. one class only)")
    trained_on = rows.iloc[:0] if held_out else rows  # every row counts as possibly trained on
    return Fitted(wrapped, task, metric, metrics, {metric: baseline[metric]}, slices, classes, trained_on, rows,
                  y)


def _why(exc: BaseException) -> str:
    """'ErrorType: its first line', or the type alone when it says nothing more."""
    text = _first_line(exc)
    return type(exc).__name__ if text == type(exc).__name__ else f"{type(exc).__name__}: {text}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
