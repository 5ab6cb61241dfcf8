"""`export_onnx`: a model version to one parity-checked ONNX file, for devices at the edge.

The file holds the whole pipeline (features + estimator, see `_convert`). Before it is written, the
graph answers the model's evaluation rows (and copies of them with missing values and unseen
categories) in onnxruntime, and those answers are compared with everloop's own predictions: the
export is refused when they differ by more than the tolerance.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from everloop.errors import NotFoundError, StoreError
from everloop.export._convert import INSTALL_HINT, ExportError, MissingExtra, convert
from everloop.export._inputs import OnnxInput, graph_inputs, onnx_feed
from everloop.store import Store, write_atomic

DEFAULT_TOLERANCE = 1e-5
LATENCY_CALLS = 200


@dataclass
class OnnxExport:
    """What `export_onnx` wrote and measured.

    `max_abs_diff` is the largest |onnxruntime - everloop| over the checked rows: of a class
    probability for classifiers, of the prediction for regressors. The tolerance judges `max_diff`:
    the same for classifiers, and for regressors max_abs_diff / max(1, the largest |prediction|): float32
    trees are exact to about 1e-7 of the sums they add up, whatever the target's unit. `latency_ms` holds the
    median milliseconds of one single-row call in onnxruntime and in scikit-learn's pipeline
    (`predict_proba`, or `predict` for regressors), both on one thread, features already conformed."""

    path: str | None  # None when the export was refused
    model_version: int
    task: str
    bytes: int
    rows_checked: int
    rows_source: str
    labels_equal: bool | None  # classifiers only; labels that differ only at a tie count as equal
    tied_labels: int  # rows whose labels differ at a tie: probabilities of both within the tolerance
    max_abs_diff: float
    max_diff: float
    tolerance: float
    latency_ms: dict[str, float]
    inputs: list[OnnxInput]
    outputs: list[dict[str, str]]
    example: str = ""
    classes: list[Any] | None = field(default=None)

    @property
    def passed(self) -> bool:
        return self.labels_equal is not False and self.max_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "model_version": self.model_version, "task": self.task, "bytes": self.bytes,
                "rows_checked": self.rows_checked, "rows_source": self.rows_source,
                "labels_equal": self.labels_equal, "tied_labels": self.tied_labels,
                "max_abs_diff": self.max_abs_diff, "max_diff": self.max_diff,
                "tolerance": self.tolerance, "passed": self.passed, "latency_ms": self.latency_ms,
                "classes": self.classes, "inputs": [i.to_dict() for i in self.inputs], "outputs": self.outputs,
                "example": self.example}


class ParityError(ExportError):
    """onnxruntime's answers differ from everloop's past the tolerance; nothing was written.
    `.result` holds the measurements (its `path` is None)."""

    def __init__(self, message: str, *, result: OnnxExport):
        self.result = result
        super().__init__(message, step=None)


def export_onnx(store: Store, model: int | str, output: str | Path, *, tolerance: float = DEFAULT_TOLERANCE,
                overwrite: bool = False, latency_calls: int = LATENCY_CALLS) -> OnnxExport:
    """Convert model version (or alias) `model` to one ONNX file at `output`, check it, then write it.

    The graph's inputs are the schema's feature columns, each of shape (rows, 1): float64 for numbers
    and date/times (seconds since 1970-01-01 UTC), NaN where missing; strings for categories and
    true/false columns, "" where missing. Its outputs: `prediction` (rows,) the class label or value,
    and for classifiers `probabilities` (rows, classes) float32 in `OnnxExport.classes` order.

    Parity: the model's evaluation rows (the rows of its training dataset when the store has none),
    plus copies of some with every value missing and every category unseen, are predicted by everloop
    (`TrainedModel.predict_conformed`) and by onnxruntime. The file is written (atomically: a temporary
    file renamed) only when the labels are equal and `max_diff` <= `tolerance`.

    Raises MissingExtra (skl2onnx, onnx or onnxruntime not installed), ExportError (a step that cannot be
    converted, named in `.step`; `output` exists and not `overwrite`), ParityError (answers differ;
    nothing written), NotFoundError (no such model version or alias)."""
    _require()
    from everloop import registry

    if not 0 <= tolerance < 1:  # probabilities are in [0, 1]: 1 or more (or inf, NaN) would check nothing
        raise ExportError(f"tolerance {tolerance!r}: expected a number >= 0 and below 1 (e.g. 1e-5)")
    target = Path(output)
    if target.is_dir():
        raise ExportError(f"output {target}: is a folder; give a file name such as {target / 'model.onnx'}")
    if target.exists() and not overwrite:
        raise ExportError(f"output {target} exists; choose another name or overwrite it (--force)")
    trained = registry.load_model(store, model)
    version = trained.version if trained.version is not None else registry.resolve(store, model)
    manifest = trained.manifest
    metadata = {"everloop.model": f"{manifest.get('name', 'model')} v{version}", "everloop.task": trained.task,
                "everloop.classes": trained.classes, "everloop.features": trained.schema.feature_names}
    graph = convert(trained.pipeline, trained.schema, trained.task, trained.classes, metadata)
    payload = graph.SerializeToString()
    session = _session(payload)

    rows, source = _check_rows(store, trained, version)
    ours = trained.predict_conformed(rows)
    feed = onnx_feed(trained.schema, rows)
    answers = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    labels_equal, ties, mismatched, max_abs, max_diff = _compare(trained.task, answers, ours, tolerance)
    one = rows.iloc[:1]
    result = OnnxExport(
        path=None, model_version=version, task=trained.task, bytes=len(payload), rows_checked=len(rows),
        rows_source=source, labels_equal=labels_equal, tied_labels=ties, max_abs_diff=max_abs, max_diff=max_diff,
        tolerance=tolerance, latency_ms=_latency(trained, session, one, latency_calls),
        inputs=graph_inputs(trained.schema), outputs=_outputs(session), classes=trained.classes)
    if not result.passed:
        why = f"{mismatched} labels differ" if mismatched else ""
        if max_diff > tolerance:
            why = (why + "; " if why else "") + f"largest difference {max_diff:.3g} > tolerance {tolerance:g}"
        raise ParityError(f"model v{version}: onnxruntime's answers differ from everloop's ({why}) on {source}; "
                          "nothing was written. Raise --tolerance to accept the difference", result=result)
    write_atomic(target, payload)  # whole or absent, also when the process is killed
    result.path = str(target)
    result.example = example(str(target), trained.task, _example_row(trained.schema, feed))
    return result


def _compare(task: str, answers: dict[str, np.ndarray], ours: Any,
             tolerance: float) -> tuple[bool | None, int, int, float, float]:
    """onnxruntime's `answers` against everloop's Predictions `ours`: (labels_equal, tied labels,
    differing labels, max_abs_diff, max_diff), as `OnnxExport` describes them."""
    if task != "classification":
        diff = np.abs(answers["prediction"].astype(np.float64) - ours.labels)
        return None, 0, 0, float(diff.max()), float(diff.max() / max(1.0, float(np.abs(ours.labels).max())))
    proba = answers["probabilities"].astype(np.float64)
    max_abs = float(np.max(np.abs(proba - ours.proba)))
    differ = np.flatnonzero(np.asarray(answers["prediction"]).astype(str) != ours.labels.astype(str))
    # A tie (a forest's 0.5/0.5) cannot survive float32: a label that differs where everloop's
    # probabilities of the two labels are within the tolerance is a tie, reported, not a failure.
    gap = np.abs(ours.proba[differ, proba[differ].argmax(axis=1)] - ours.proba[differ].max(axis=1))
    ties = int(np.sum(gap <= 2 * tolerance))
    return len(differ) == ties, ties, len(differ) - ties, max_abs, max_abs


def _require() -> None:
    for module in ("onnx", "onnxruntime", "skl2onnx"):
        try:
            __import__(module)
        except ImportError:
            raise MissingExtra(f"ONNX export needs {module}, which is not installed: {INSTALL_HINT}") from None


def _session(payload: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as a small device runs it; and the latency compares like with like
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types: a graph it cannot run
        raise ExportError(f"onnxruntime cannot load the converted graph: {str(exc).strip()[:300]}") from None


def _check_rows(store: Store, trained: Any, version: int) -> tuple[pd.DataFrame, str]:
    """The rows the parity check predicts: the evaluation rows (else the training dataset's), conformed,
    plus copies of a few with missing values and unseen categories; and where they came from."""
    from everloop import data, registry

    frame, source = None, ""
    if trained.manifest.get("eval_artifact"):
        try:
            frame, source = registry.eval_frame(store, trained.manifest), f"the evaluation rows of model v{version}"
        except (NotFoundError, StoreError):
            frame = None
    if frame is None:
        dataset = data.get_dataset(store, trained.manifest.get("dataset_version"))
        frame, source = data.load_frame(store, dataset), f"the rows of dataset v{dataset.version}"
    rows = trained._probe_rows(frame)  # conformed, plus the unusual copies the fast path is checked on
    if rows is None:
        raise ExportError(f"{source} do not match model v{version}'s schema; no rows to check the export on")
    copies = 40 if len(rows) >= 60 else 2 * len(rows) // 3  # `_unusual_rows`: two copies of the first 20
    return rows, f"{source}: {len(rows) - copies} rows and {copies} copies with missing values or unseen categories"


def _latency(trained: Any, session: Any, one: pd.DataFrame, calls: int) -> dict[str, float]:
    """Median milliseconds of `calls` single-row predictions in onnxruntime and in scikit-learn."""
    feed = onnx_feed(trained.schema, one)
    features = one[trained.schema.feature_names]
    predict = trained.pipeline.predict_proba if trained.task == "classification" else trained.pipeline.predict

    def median_ms(call: Any) -> float:
        for _ in range(5):  # warm up: first calls allocate
            call()
        times = []
        for _ in range(max(1, calls)):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        return round(statistics.median(times) * 1000, 4)

    with threadpool_limits(limits=1):  # one thread each: what a small device gives, and like with like
        return {"onnxruntime": median_ms(lambda: session.run(None, feed)),
                "sklearn": median_ms(lambda: predict(features))}


def _outputs(session: Any) -> list[dict[str, str]]:
    return [{"name": o.name, "type": o.type, "shape": str(o.shape)} for o in session.get_outputs()]


def _example_row(schema: Any, feed: dict[str, np.ndarray]) -> dict[str, Any]:
    """The first checked row, as the graph takes it (name -> float or str)."""
    return {name: values[0, 0] if values.dtype == object else float(values[0, 0]) for name, values in feed.items()}


def example(path: str, task: str, row: dict[str, Any]) -> str:
    """A Python script that runs the exported file with onnxruntime and numpy alone (no everloop, no
    scikit-learn), as a device at the edge would, on `row` (input name -> float or str)."""
    def literal(value: Any) -> str:
        if isinstance(value, float) and value != value:
            return 'float("nan")'
        return repr(value)

    lines = ["import numpy as np", "import onnxruntime as ort", "",
             f"session = ort.InferenceSession({path!r}, providers=[\"CPUExecutionProvider\"])",
             "row = {  # one value per input; missing: float(\"nan\") for numbers and date/times, \"\" for text"]
    lines += [f"    {name!r}: {literal(value)}," for name, value in row.items()]
    lines += ["}",
              "feed = {i.name: np.array([[row[i.name]]], dtype=np.float64 if i.type == \"tensor(double)\" else object)",
              "        for i in session.get_inputs()}"]
    if task == "classification":
        lines += ["prediction, probabilities = session.run([\"prediction\", \"probabilities\"], feed)",
                  "print(prediction[0], probabilities[0].tolist())"]
    else:
        lines += ["(prediction,) = session.run([\"prediction\"], feed)", "print(prediction[0])"]
    return "\n".join(lines)

