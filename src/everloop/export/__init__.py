"""Models for devices at the edge: the whole pipeline (features + estimator) as one ONNX file,
checked against everloop's own predictions before it is written (`export_onnx`; docs/export.md).

Needs the `onnx` extra (skl2onnx, onnxruntime; onnxmltools for LightGBM and XGBoost), imported only
when an export runs: everloop without it still imports, and `export_onnx` then raises MissingExtra."""

from everloop.export._convert import ExportError, MissingExtra
from everloop.export._inputs import OnnxInput, graph_inputs, onnx_feed
from everloop.export._onnx import DEFAULT_TOLERANCE, OnnxExport, ParityError, example, export_onnx

__all__ = ["DEFAULT_TOLERANCE", "ExportError", "MissingExtra", "OnnxExport", "OnnxInput", "ParityError", "example",
           "export_onnx", "graph_inputs", "onnx_feed"]
