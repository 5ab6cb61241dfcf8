"""ONNX converters for the steps everloop adds to a pipeline itself, registered with skl2onnx.

Each step is replaced, in a copy of the pipeline (`_convert.prepare`), by a stand-in class that
skl2onnx knows through `register`: the missing-category token, the date/time parts, and numeric
imputers (onnxruntime's Imputer has no float64 kernel). LightGBM's and XGBoost's converters come
from onnxmltools, registered the same way. skl2onnx and onnx are imported inside the functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from everloop.features import MISSING_CATEGORY
from everloop.features._pipeline import DATETIME_PARTS

# Opset 19: the first where Equal compares strings (the missing-category step); onnxruntime >= 1.16.
OPSET = {"": 19, "ai.onnx.ml": 3}
FLOAT64 = 11  # onnx.TensorProto.DOUBLE, without importing onnx here


class FillMissingStep(TransformerMixin, BaseEstimator):
    """Stands in for `FunctionTransformer(fill_missing_category)`: "" (a missing category) becomes
    MISSING_CATEGORY, as the function turns None/NaN into it."""


class DatetimePartsStep(TransformerMixin, BaseEstimator):
    """Stands in for `FunctionTransformer(datetime_parts)`: seconds since the epoch (UTC) to year,
    month, day, weekday (Monday 0) and hour per column, NaN where missing."""


class NanImputerStep(TransformerMixin, BaseEstimator):
    """Stands in for a numeric `SimpleImputer` (NaN -> its statistics): onnxruntime's Imputer has no
    float64 kernel. Columns whose statistic is NaN are dropped, as scikit-learn drops them."""

    def __init__(self, statistics: np.ndarray):
        self.statistics = statistics


class _Ops:
    """A few ONNX nodes at a time, with fresh names, into skl2onnx's container."""

    def __init__(self, scope: Any, container: Any):
        self.scope, self.container = scope, container

    def const(self, value: Any, dtype: Any = np.float64) -> str:
        from onnx import TensorProto, numpy_helper

        name = self.scope.get_unique_variable_name("c")
        array = np.asarray(value, dtype=dtype)
        if array.dtype == object:  # strings: a raw-data tensor cannot hold them
            self.container.add_initializer(name, TensorProto.STRING, list(array.shape),
                                           [str(v).encode() for v in array.ravel()])
        else:
            self.container.add_initializer(name, None, None, numpy_helper.from_array(array, name))
        return name

    def __call__(self, op: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        name = out or self.scope.get_unique_variable_name(op.lower())
        self.container.add_node(op, list(inputs), [name], name=self.scope.get_unique_operator_name(op),
                                op_version=OPSET[""], **attrs)
        return name


def _fill_shape(operator: Any) -> None:
    from skl2onnx.common.data_types import StringTensorType

    operator.outputs[0].type = StringTensorType(operator.inputs[0].type.shape)


def _fill_convert(scope: Any, operator: Any, container: Any) -> None:
    ops = _Ops(scope, container)
    x = operator.inputs[0].full_name
    empty = ops.const([""], dtype=object)
    ops("Where", ops("Equal", x, empty), ops.const([MISSING_CATEGORY], dtype=object), x,
        out=operator.outputs[0].full_name)


def _parts_shape(operator: Any) -> None:
    from skl2onnx.common.data_types import DoubleTensorType

    rows, columns = operator.inputs[0].type.shape
    width = None if columns is None else len(DATETIME_PARTS) * columns
    operator.outputs[0].type = DoubleTensorType([rows, width])


def _parts_convert(scope: Any, operator: Any, container: Any) -> None:
    """Howard Hinnant's days-to-civil-date arithmetic, in float64 (exact for these integers)."""
    ops = _Ops(scope, container)
    x = operator.inputs[0].full_name
    if operator.inputs[0].type.to_onnx_type().tensor_type.elem_type != FLOAT64:
        x = ops("Cast", x, to=FLOAT64)

    def floor_div(a: str, b: float) -> str:
        return ops("Floor", ops("Div", a, ops.const(b)))

    def mul(a: str, b: float) -> str:
        return ops("Mul", a, ops.const(b))

    days = floor_div(x, 86400.0)
    hour = floor_div(ops("Sub", x, mul(days, 86400.0)), 3600.0)
    shifted = ops("Add", days, ops.const(3.0))  # 1970-01-01 was a Thursday (Monday is 0)
    weekday = ops("Sub", shifted, mul(floor_div(shifted, 7.0), 7.0))
    z = ops("Add", days, ops.const(719468.0))
    era = floor_div(z, 146097.0)
    doe = ops("Sub", z, mul(era, 146097.0))
    yoe = floor_div(ops("Sub", ops("Add", ops("Sub", doe, floor_div(doe, 1460.0)), floor_div(doe, 36524.0)),
                        floor_div(doe, 146096.0)), 365.0)
    doy = ops("Sub", doe, ops("Sub", ops("Add", mul(yoe, 365.0), floor_div(yoe, 4.0)), floor_div(yoe, 100.0)))
    mp = floor_div(ops("Add", mul(doy, 5.0), ops.const(2.0)), 153.0)
    day = ops("Add", ops("Sub", doy, floor_div(ops("Add", mul(mp, 153.0), ops.const(2.0)), 5.0)), ops.const(1.0))
    late = ops("Cast", ops("GreaterOrEqual", mp, ops.const(10.0)), to=FLOAT64)
    month = ops("Sub", ops("Add", mp, ops.const(3.0)), mul(late, 12.0))
    early = ops("Cast", ops("LessOrEqual", month, ops.const(2.0)), to=FLOAT64)
    year = ops("Add", ops("Add", yoe, mul(era, 400.0)), early)
    parts = {"year": year, "month": month, "day": day, "day_of_week": weekday, "hour": hour}
    axis = ops.const([2], dtype=np.int64)
    stacked = ops("Concat", *(ops("Unsqueeze", parts[p], axis) for p in DATETIME_PARTS), axis=2)
    columns = operator.inputs[0].type.shape[1]
    width = -1 if columns is None else len(DATETIME_PARTS) * columns
    ops("Reshape", stacked, ops.const([0, width], dtype=np.int64), out=operator.outputs[0].full_name)


def _imputer_shape(operator: Any) -> None:
    from skl2onnx.common.data_types import DoubleTensorType

    kept = int(np.sum(~np.isnan(np.asarray(operator.raw_operator.statistics, dtype=np.float64))))
    operator.outputs[0].type = DoubleTensorType([operator.inputs[0].type.shape[0], kept])


def _imputer_convert(scope: Any, operator: Any, container: Any) -> None:
    ops = _Ops(scope, container)
    x = operator.inputs[0].full_name
    if operator.inputs[0].type.to_onnx_type().tensor_type.elem_type != FLOAT64:
        x = ops("Cast", x, to=FLOAT64)
    stats = np.asarray(operator.raw_operator.statistics, dtype=np.float64)
    kept = ~np.isnan(stats)
    out = operator.outputs[0].full_name
    filled = ops("Where", ops("IsNaN", x), ops.const(np.where(kept, stats, 0.0).reshape(1, -1)), x,
                 out=out if kept.all() else None)
    if not kept.all():
        ops("Gather", filled, ops.const(np.flatnonzero(kept), dtype=np.int64), axis=1, out=out)


_REGISTERED: set[str] = set()


def register(kind: str) -> None:
    """Register the converters `kind` needs with skl2onnx, once per process."""
    if kind in _REGISTERED:
        return
    from skl2onnx import update_registered_converter

    if kind == "everloop":
        update_registered_converter(FillMissingStep, "EverloopFillMissing", _fill_shape, _fill_convert)
        update_registered_converter(DatetimePartsStep, "EverloopDatetimeParts", _parts_shape, _parts_convert)
        update_registered_converter(NanImputerStep, "EverloopNanImputer", _imputer_shape, _imputer_convert)
    elif kind == "lightgbm":
        from lightgbm import LGBMClassifier, LGBMRegressor
        from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm
        from skl2onnx.common.shape_calculator import (calculate_linear_classifier_output_shapes,
                                                      calculate_linear_regressor_output_shapes)

        update_registered_converter(LGBMClassifier, "LightGbmLGBMClassifier",
                                    calculate_linear_classifier_output_shapes, convert_lightgbm,
                                    options={"nocl": [True, False], "zipmap": [True, False, "columns"]})
        update_registered_converter(LGBMRegressor, "LightGbmLGBMRegressor",
                                    calculate_linear_regressor_output_shapes, convert_lightgbm,
                                    options={"split": None})
    elif kind == "xgboost":
        from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost
        from skl2onnx.common.shape_calculator import (calculate_linear_classifier_output_shapes,
                                                      calculate_linear_regressor_output_shapes)
        from xgboost import XGBClassifier, XGBRegressor

        update_registered_converter(XGBClassifier, "XGBoostXGBClassifier",
                                    calculate_linear_classifier_output_shapes, convert_xgboost,
                                    options={"nocl": [True, False], "zipmap": [True, False, "columns"]})
        update_registered_converter(XGBRegressor, "XGBoostXGBRegressor",
                                    calculate_linear_regressor_output_shapes, convert_xgboost)
    _REGISTERED.add(kind)
