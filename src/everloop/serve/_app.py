"""The HTTP service, built by an app factory over the store and the project file."""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from everloop.data import Anomaly
from everloop.serve._holder import ModelHolder
from everloop.serve._log import PredictionLog, record_feedback
from everloop.serve._metrics import ServiceMetrics
from everloop.spec import ProjectSpec, load_spec
from everloop.store import Store
from everloop.train import TrainedModel

ADMIN_TOKEN_ENV = "EVERLOOP_ADMIN_TOKEN"
API_TOKEN_ENV = "EVERLOOP_API_TOKEN"
MAX_BODY_BYTES = 64 * 1024 * 1024


class ClientError(Exception):
    """A request the client must fix; becomes a 4xx naming each bad field."""

    def __init__(self, status: int, detail: list[dict[str, Any]] | str):
        self.status = status
        self.detail = detail


def create_app(project_dir: str | Path = ".", *, spec: ProjectSpec | None = None, store: Store | None = None,
               watch: bool = True) -> FastAPI:
    """The prediction service of a project: `/predict`, `/feedback`, `/health`, `/ready`, `/metrics`, `/model`."""
    project_dir = Path(project_dir)
    spec = spec or load_spec(project_dir)
    store = store or Store.for_project(project_dir)
    metrics = ServiceMetrics()
    holder = ModelHolder(store, on_swap=lambda m: metrics.model_version.set(m.version or 0),
                         on_failure=lambda v, e: metrics.reload_failures.inc())
    prediction_log = PredictionLog(store) if spec.serving.log_predictions else None
    metrics.bind_log(prediction_log)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        _limit_threads()
        try:
            holder.refresh()
        except Exception:  # the store may not be ready; the watcher keeps trying and /ready says so
            pass
        if watch:
            holder.start(spec.serving.reload_seconds)
        if prediction_log:
            prediction_log.start()
        yield
        holder.stop()
        if prediction_log:
            prediction_log.stop()

    app = FastAPI(title=f"everloop: {spec.name}", version="1", lifespan=lifespan)
    app.state.holder, app.state.store, app.state.log, app.state.metrics = holder, store, prediction_log, metrics
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    @app.exception_handler(ClientError)
    async def _client_error(_request: Request, exc: ClientError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        started = time.perf_counter()
        model = _require_model(holder)
        _check_api_token(request)
        body = await _json_body(request)
        records, prefix = _records(body, model, spec.serving.max_batch_rows)
        frame = pd.DataFrame.from_records(records, columns=model.schema.feature_names)
        features, report = model.conform(frame)
        if not report.ok:
            raise ClientError(422, _anomaly_detail(report.errors, prefix, len(records)))
        outputs = model.predict_conformed(features).records()
        ids = [uuid.uuid4().hex for _ in outputs]
        latency_ms = (time.perf_counter() - started) * 1000
        metrics.observe_predictions(outputs)
        if prediction_log:
            now = time.time()
            logged = _loggable(features)
            prediction_log.put_many([
                {"id": i, "created_at": now, "model_version": model.version, "features": f, "prediction": o,
                 "latency_ms": latency_ms} for i, f, o in zip(ids, logged, outputs)])
        answers = [{"id": i, **o} for i, o in zip(ids, outputs)]
        return JSONResponse({"model_version": model.version, "predictions": answers})

    @app.post("/feedback")
    async def feedback(request: Request) -> JSONResponse:
        _check_api_token(request)
        model = _require_model(holder)
        body = await _json_body(request)
        items = body.get("labels") if isinstance(body, dict) and "labels" in body else [body]
        if not isinstance(items, list) or not items:
            raise ClientError(422, [{"loc": ["labels"], "msg": "expected a non-empty list of {id, label}"}])
        problems, rows = [], []
        for n, item in enumerate(items):
            loc = ["labels", n] if isinstance(body, dict) and "labels" in body else []
            if not isinstance(item, dict) or not isinstance(item.get("id"), str) or "label" not in item:
                problems.append({"loc": loc, "msg": "expected an object with a string 'id' and a 'label'"})
                continue
            label_problem = _label_problem(model, item["label"])
            if label_problem:
                problems.append({"loc": loc + ["label"], "msg": label_problem})
                continue
            rows.append({"prediction_id": item["id"], "label": item["label"], "created_at": time.time()})
        if problems:
            raise ClientError(422, problems)
        if prediction_log:
            prediction_log.flush(timeout=5)  # a label may arrive right after its prediction
        unknown = record_feedback(store, rows)
        return JSONResponse({"accepted": len(rows) - len(unknown), "unknown_ids": unknown},
                            status_code=200 if len(unknown) < len(rows) else 404)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        model = holder.current
        if model is None:
            return JSONResponse({"ready": False, "reason": holder.last_error or "no model in production yet"},
                                status_code=503)
        return JSONResponse({"ready": True, "model_version": model.version})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/model")
    async def model_info() -> dict[str, Any]:
        model = _require_model(holder)
        m = model.manifest
        return {"name": spec.name, "version": model.version, "task": model.task, "metric": m["metric"],
                "metrics": m["metrics"], "baseline": m["baseline"], "classes": model.classes,
                "schema": model.schema.to_dict(),
                "lineage": {"dataset_version": m["dataset_version"], "dataset_hash": m["dataset_hash"],
                            "reason": m.get("reason", "")}}

    @app.post("/admin/reload")
    async def reload(request: Request) -> dict[str, Any]:
        expected = os.environ.get(ADMIN_TOKEN_ENV)
        if not expected:
            raise ClientError(403, f"admin endpoints are off; set {ADMIN_TOKEN_ENV} to enable them")
        if request.headers.get("authorization") != f"Bearer {expected}":
            raise ClientError(401, "a valid admin bearer token is required")
        swapped = holder.refresh()
        if holder.last_error:
            raise ClientError(409, holder.last_error)
        current = holder.current
        return {"swapped": swapped, "model_version": current.version if current else None}

    return app


# -- request handling -----------------------------------------------------------------------------


def _require_model(holder: ModelHolder) -> TrainedModel:
    model = holder.current
    if model is None:
        raise ClientError(503, "no model is in production yet; promote one with 'everloop promote'")
    return model


def _check_api_token(request: Request) -> None:
    expected = os.environ.get(API_TOKEN_ENV)
    if expected and request.headers.get("authorization") != f"Bearer {expected}":
        raise ClientError(401, "a valid bearer token is required")


async def _json_body(request: Request) -> Any:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise ClientError(413, f"the body is {int(length)} bytes; the limit is {MAX_BODY_BYTES}")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ClientError(413, f"the body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        return json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and ints past Python's digit limit
        raise ClientError(400, f"the body is not valid JSON: {exc}") from None


def _records(body: Any, model: TrainedModel, max_rows: int) -> tuple[list[dict[str, Any]], list[Any]]:
    """The rows of a /predict body, and the location prefix that names them in errors."""
    names = model.schema.feature_names
    if not isinstance(body, dict) or not ({"features", "instances"} & body.keys()):
        raise ClientError(422, [{"loc": [], "msg": "expected {\"features\": {...}}, {\"features\": [...]} "
                                                   "or {\"instances\": [{...}, ...]}"}])
    if "instances" in body:
        rows = body["instances"]
        if not isinstance(rows, list) or not rows:
            raise ClientError(422, [{"loc": ["instances"], "msg": "expected a non-empty list of rows"}])
        if len(rows) > max_rows:
            raise ClientError(413, f"the batch has {len(rows)} rows; the limit is {max_rows} (serving.max_batch_rows)")
        prefix: list[Any] = ["instances"]
    else:
        rows = [body["features"]]
        prefix = ["features"]
    records, problems = [], []
    for n, row in enumerate(rows):
        loc = prefix + [n] if prefix == ["instances"] else prefix
        if isinstance(row, list):
            if len(row) != len(names):
                problems.append({"loc": loc, "msg": f"a row as a list needs {len(names)} values in schema order "
                                                    f"({', '.join(names)}); got {len(row)}"})
                continue
            row = dict(zip(names, row))
        elif not isinstance(row, dict):
            problems.append({"loc": loc, "msg": "expected an object of feature values by name, or a list in schema order"})
            continue
        for name in names:
            if name not in row:
                problems.append({"loc": loc + [name], "msg": "field required"})
        records.append(row)
    if problems:
        raise ClientError(422, problems)
    return records, prefix


def _loggable(features: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts: missing values as None, date/times as ISO text."""
    out = features.copy(deep=False)
    for name in out.columns:
        if pd.api.types.is_datetime64_any_dtype(out[name]):
            out[name] = out[name].map(lambda v: v.isoformat() if pd.notna(v) else None)
    out = out.astype(object)
    return out.where(out.notna(), None).to_dict(orient="records")


def _anomaly_detail(anomalies: list[Anomaly], prefix: list[Any], rows: int) -> list[dict[str, Any]]:
    detail = []
    for a in anomalies:
        for position, value in zip(a.rows, a.values) if a.rows else [(None, None)]:
            loc = prefix + ([position] if prefix == ["instances"] and position is not None else []) + [a.column]
            detail.append({"loc": loc, "msg": a.message.split(" ", 1)[1] if a.count == 1 else a.message,
                           "input": value})
    return detail


def _label_problem(model: TrainedModel, label: Any) -> str | None:
    if model.task == "regression":
        ok = isinstance(label, (int, float)) and not isinstance(label, bool)
        return None if ok else f"expected a number, got {label!r}"
    known = [str(c) for c in model.classes or []]
    if isinstance(label, (dict, list)) or str(label) not in known:
        return f"expected one of the classes {known}, got {label!r}"
    return None


def _limit_threads() -> None:
    # One OpenMP/BLAS thread per worker: concurrent requests otherwise oversubscribe the cores.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


class _MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware overhead): counts, times and catches every request."""

    def __init__(self, app: Any, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.inflight.dec()
            self.metrics.observe_request(scope.get("path", ""), status["code"], time.perf_counter() - started)
