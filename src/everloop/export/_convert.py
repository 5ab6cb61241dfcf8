"""A fitted everloop pipeline (features + model) as one ONNX graph.

skl2onnx converts the scikit-learn steps (onnxmltools the LightGBM and XGBoost estimators), and
`_steps` the ones everloop adds itself. The graph takes one input per feature column (`_inputs`),
computes in float64 like scikit-learn, and answers `prediction` (the class label itself, or the
value) and, for classifiers, `probabilities` (float32, one column per class in the manifest's order).

skl2onnx and onnx are imported inside the functions: everloop without the `onnx` extra still imports.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import FeatureUnion, Pipeline
from sklearn.preprocessing import FunctionTransformer

from everloop.errors import EverloopError
from everloop.export._inputs import graph_inputs
from everloop.export._steps import OPSET, DatetimePartsStep, FillMissingStep, NanImputerStep, register
from everloop.features import fill_missing_category
from everloop.features._pipeline import datetime_parts
from everloop.registry._import import ReadMissing  # what `models import` puts before each branch

INSTALL_HINT = "pip install 'everloop[onnx]' (or: pip install skl2onnx onnxruntime onnxmltools)"


class ExportError(EverloopError):
    """The model cannot be exported; `.step` names the pipeline step when one is to blame
    (`features/categorical/encode`, `model`, ...)."""

    def __init__(self, message: str, *, step: str | None = None):
        self.step = step
        super().__init__(message)


class MissingExtra(ExportError):
    """A package of the `onnx` extra is not installed (the CLI exits 3: the environment)."""


# -- the pipeline, prepared and checked step by step ------------------------------------------------


def _describe(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _function_name(func: Any) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"


def prepare(pipeline: Any) -> tuple[Any, dict[int, str]]:
    """A deep copy of `pipeline` whose everloop steps are replaced by their ONNX stand-ins, and the
    path of every step in it (`id(step)` -> "features/numeric/impute"). Raises ExportError naming the
    first step no converter is registered for, and MissingExtra when a converter's package is absent."""
    try:
        register("everloop")
    except ImportError as exc:
        raise MissingExtra(f"ONNX export needs skl2onnx and onnx ({exc.name} is missing): {INSTALL_HINT}") from None
    prepared = copy.deepcopy(pipeline)
    paths: dict[int, str] = {}
    replaced = _prepare_step(prepared, "", paths)
    return replaced, paths


def _prepare_step(step: Any, path: str, paths: dict[int, str]) -> Any:
    def child(name: str) -> str:
        return f"{path}/{name}" if path else name

    if isinstance(step, str) or step is None:  # "drop", "passthrough"
        return step
    if isinstance(step, ReadMissing):
        # An imported branch reading None as NaN first: in the graph a missing number is NaN already,
        # and a missing text "" reaches the step as an unseen value, as NaN does unless the step was
        # fitted with missing values (then the parity check, which sends missing values, refuses).
        return _prepare_step(step.step, path, paths)
    if isinstance(step, Pipeline):
        steps = []
        for name, inner in step.steps:
            if _float32_trees(inner) and steps:
                # These libraries compare float32 features with their thresholds (scikit-learn's
                # classic trees and XGBoost cast to float32 themselves; LightGBM's converter writes
                # float32 thresholds): the graph gives their answers only on float32 inputs.
                from skl2onnx.sklapi import CastTransformer

                steps.append((f"{name}_as_float32", CastTransformer(dtype=np.float32)))
            steps.append((name, _prepare_step(inner, child(name), paths)))
        step.steps = steps
    elif isinstance(step, ColumnTransformer):
        step.transformers_ = [(name, _prepare_step(t, child(name), paths), cols)
                              for name, t, cols in step.transformers_]
    elif isinstance(step, FeatureUnion):
        step.transformer_list = [(name, _prepare_step(t, child(name), paths)) for name, t in step.transformer_list]
    elif isinstance(step, FunctionTransformer):
        if step.func is fill_missing_category:
            step = FillMissingStep()
        elif step.func is datetime_parts:
            step = DatetimePartsStep()
        elif step.func is not None:
            raise ExportError(f"step {path} (a FunctionTransformer of {_function_name(step.func)}) cannot be "
                              "exported to ONNX: ONNX cannot run arbitrary Python functions", step=path)
    elif isinstance(step, SimpleImputer) and _numeric_nan_imputer(step):
        step = NanImputerStep(step.statistics_)
    else:
        _check_convertible(step, path)
    paths[id(step)] = path
    return step


def _numeric_nan_imputer(imputer: Any) -> bool:
    missing = imputer.missing_values
    return (not imputer.add_indicator and np.asarray(imputer.statistics_).dtype.kind in "fiu"
            and isinstance(missing, float) and np.isnan(missing))


BOOSTERS = {"lightgbm": ("LGBMClassifier", "LGBMRegressor"), "xgboost": ("XGBClassifier", "XGBRegressor")}


SKLEARN_FLOAT32_TREES = {f"{kind}{task}" for kind in ("DecisionTree", "ExtraTree", "RandomForest", "ExtraTrees",
                                                     "GradientBoosting") for task in ("Classifier", "Regressor")}


def _is_booster(step: Any) -> bool:
    module = type(step).__module__.partition(".")[0]
    return module in BOOSTERS and type(step).__name__ in BOOSTERS[module]


def _float32_trees(step: Any) -> bool:
    return _is_booster(step) or (type(step).__module__.startswith("sklearn.")
                                 and type(step).__name__ in SKLEARN_FLOAT32_TREES)


def _check_convertible(step: Any, path: str) -> None:
    from skl2onnx._supported_operators import sklearn_operator_name_map

    module = type(step).__module__.partition(".")[0]
    if _is_booster(step):
        try:
            register(module)
        except ImportError as exc:
            raise MissingExtra(f"step {path} ({_describe(step)}) needs onnxmltools to be exported "
                               f"({exc.name} is missing): {INSTALL_HINT}") from None
    if type(step) not in sklearn_operator_name_map:
        if module == "everloop":
            why = ("it is everloop's reader of an imported model whose columns need converting (true/false or "
                   "numbers kept as text by the schema), which has no ONNX form")
        elif module in ("sklearn", "lightgbm", "xgboost"):
            why = "skl2onnx has no converter for it"
        else:
            why = ("a transformer of your own (features.custom, or an imported pipeline's); ONNX runs only the "
                   "operators skl2onnx knows")
        raise ExportError(f"step {path} ({_describe(step)}) cannot be exported to ONNX: {why}. Export a model "
                          "whose steps skl2onnx supports (the project's own features with a scikit-learn, "
                          "LightGBM or XGBoost estimator)", step=path)


@contextmanager
def _exact_tree_thresholds() -> Iterator[list[np.ndarray]]:
    """While skl2onnx converts tree ensembles: record each ensemble's thresholds in float64 (skl2onnx
    writes them as float32 attributes, which flips rows whose value equals a threshold: HistGradient-
    Boosting's thresholds are often data values), and pass protobuf 0/1 where skl2onnx 1.20 passes a
    Python bool inside an int list (leaves' nodes_missing_value_tracks_true), which recent protobuf
    (7.x) refuses. Yields the list of recorded threshold arrays, filled once the block ends; see
    `_use_exact_thresholds`."""
    from skl2onnx.common import tree_ensemble

    original = tree_ensemble.add_node
    seen: dict[int, tuple[dict[str, Any], list[float]]] = {}
    recorded: list[np.ndarray] = []

    def add_node(attr_pairs: dict[str, Any], *args: Any, nodes_missing_value_tracks_true: Any = 0,
                 **kwargs: Any) -> Any:
        mode, value = args[5], args[6]
        if kwargs.get("dtype") == np.float64:  # float64 inputs only; float32 trees keep skl2onnx's thresholds
            seen.setdefault(id(attr_pairs), (attr_pairs, []))[1].append(0.0 if mode == "LEAF" else float(value))
        return original(attr_pairs, *args, nodes_missing_value_tracks_true=int(nodes_missing_value_tracks_true),
                        **kwargs)

    tree_ensemble.add_node = add_node
    try:
        yield recorded
    finally:
        tree_ensemble.add_node = original
        recorded.extend(np.array(values, dtype=np.float64) for _, values in seen.values())


def _use_exact_thresholds(model: Any, recorded: list[np.ndarray]) -> int:
    """Give each tree ensemble node of `model` whose float32 thresholds are a recorded array cast to
    float32 that array itself (`nodes_values_as_tensor`, ai.onnx.ml opset 3): onnxruntime then compares
    float64 inputs with float64 thresholds, as scikit-learn does. Returns how many nodes changed."""
    from onnx import helper, numpy_helper

    changed = 0
    for node in model.graph.node:
        if node.op_type not in ("TreeEnsembleClassifier", "TreeEnsembleRegressor"):
            continue
        attrs = {a.name: a for a in node.attribute}
        if "nodes_values" not in attrs:
            continue
        written = np.array(attrs["nodes_values"].floats, dtype=np.float32)
        exact = next((r for r in recorded if len(r) == len(written) and np.array_equal(r.astype(np.float32), written)),
                     None)
        if exact is None:  # thresholds skl2onnx adjusted on purpose (float32 trees): keep them
            continue
        node.attribute.remove(attrs["nodes_values"])
        node.attribute.append(helper.make_attribute("nodes_values_as_tensor",
                                                    numpy_helper.from_array(exact)))
        changed += 1
    if changed:  # the *_as_tensor attributes are ai.onnx.ml opset 3
        for entry in model.opset_import:
            if entry.domain == "ai.onnx.ml":
                entry.version = max(entry.version, 3)
    return changed


def _failed_step(exc: BaseException, paths: dict[int, str]) -> str | None:
    """The pipeline step whose converter raised `exc`: the deepest frame of its traceback that holds a
    skl2onnx `operator` whose raw operator is one of the pipeline's steps."""
    found, tb = None, exc.__traceback__
    while tb is not None:
        operator = tb.tb_frame.f_locals.get("operator")
        raw = getattr(operator, "raw_operator", None)
        if raw is not None and id(raw) in paths:
            found = paths[id(raw)]
        tb = tb.tb_next
    return found


def convert(pipeline: Any, schema: Any, task: str, classes: list[Any] | None,
            metadata: dict[str, Any]) -> Any:
    """`pipeline` (fitted: ("features", ...), ("model", ...)) as an onnx.ModelProto with one input per
    feature column of `schema` (see `graph_inputs`) and the outputs `prediction` (rows,) and, when
    `task` is classification, `probabilities` (rows, len(classes)) float32. Raises ExportError naming the
    step that cannot be converted, MissingExtra when skl2onnx/onnx are not installed."""
    prepared, paths = prepare(pipeline)
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DoubleTensorType, StringTensorType

    inputs = graph_inputs(schema)
    taken = {i.name for i in inputs} & {"prediction", "probabilities"}
    if taken:
        raise ExportError(f"feature column {sorted(taken)[0]!r} has the name of an output of the ONNX graph; "
                          "rename the column to export this model")
    types = [(i.name, DoubleTensorType([None, 1]) if i.type == "float64" else StringTensorType([None, 1]))
             for i in inputs]
    estimator = prepared
    while isinstance(estimator, Pipeline):  # the final estimator, in a nested Pipeline too
        estimator = estimator.steps[-1][1]
    options = {id(estimator): {"zipmap": False}} if task == "classification" else None
    try:
        with _exact_tree_thresholds() as thresholds:
            model = convert_sklearn(prepared, initial_types=types, options=options, target_opset=OPSET)
    except ExportError:
        raise
    except Exception as exc:  # any converter failure: name the step when the traceback shows it
        step = _failed_step(exc, paths)
        where = f"step {step} ({_describe(_step_at(prepared, step))})" if step else "the pipeline"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{where} cannot be exported to ONNX: skl2onnx failed: {first[:300]}", step=step) from None
    _use_exact_thresholds(model, thresholds)
    _finish_outputs(model, task, classes)
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    model.producer_name = "everloop"
    return model


def _step_at(pipeline: Any, path: str) -> Any:
    step = pipeline
    for name in path.split("/"):
        if hasattr(step, "named_steps"):
            step = step.named_steps[name]
        elif hasattr(step, "named_transformers_"):
            step = step.named_transformers_[name]
        else:
            step = dict(step.transformer_list)[name]
    return step


def _finish_outputs(model: Any, task: str, classes: list[Any] | None) -> None:
    """Replace skl2onnx's outputs (label, probabilities / variable) by everloop's: `probabilities`
    float32 in class-code order and `prediction` = the class label of the largest probability as the
    estimator computed it (first on ties, as numpy's argmax), or the regression value as float64. Tree ensembles in onnxruntime answer
    float32 whatever skl2onnx declares, so the graph's own declarations are replaced, not trusted."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    old = {o.name for o in graph.output}
    source = "probabilities" if task == "classification" else "variable"
    if source not in old:
        raise ExportError(f"the converted graph has no {source!r} output (it has {sorted(old)})", step="model")
    raw = f"everloop_raw_{source}"
    for node in graph.node:
        for names in (node.input, node.output):
            renamed = [raw if n == source else n for n in names]
            del names[:]
            names.extend(renamed)
    del graph.output[:]
    if task == "classification":
        labels = np.asarray(classes, dtype=object)
        if all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in classes or []):
            table, kind = labels.astype(np.int64), TensorProto.INT64
        else:
            table, kind = np.array([str(c) for c in labels], dtype=object), TensorProto.STRING
        graph.initializer.append(numpy_helper.from_array(table, "everloop_classes"))
        graph.node.extend([
            helper.make_node("Cast", [raw], ["probabilities"], to=TensorProto.FLOAT, name="everloop_proba"),
            helper.make_node("ArgMax", [raw], ["everloop_code"], axis=1, keepdims=0,  # before the cast
                             name="everloop_argmax"),
            helper.make_node("Gather", ["everloop_classes", "everloop_code"], ["prediction"], axis=0,
                             name="everloop_label"),
        ])
        graph.output.extend([helper.make_tensor_value_info("prediction", kind, [None]),
                             helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                                           [None, len(labels)])])
    else:
        graph.node.extend([
            helper.make_node("Cast", [raw], ["everloop_value"], to=TensorProto.DOUBLE, name="everloop_cast"),
            helper.make_node("Reshape", ["everloop_value", "everloop_flat"], ["prediction"], name="everloop_flat"),
        ])
        graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "everloop_flat"))
        graph.output.append(helper.make_tensor_value_info("prediction", TensorProto.DOUBLE, [None]))
