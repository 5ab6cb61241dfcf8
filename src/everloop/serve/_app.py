"""The HTTP service, built by an app factory over the store and the project file.

Endpoints: everloop's `/predict`, MLflow's `/invocations` (and `/ping`), the Open Inference Protocol
(`/v2/...`), `/feedback`, `/health`, `/ready`, `/metrics`, `/model`, `/admin/reload`. All prediction
endpoints go through one path: parse the protocol into rows, validate and predict them in a
micro-batch with other concurrent requests, log, answer.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import os
import sys
import time
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable

import orjson
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from prometheus_client import CONTENT_TYPE_LATEST

from everloop.data import current_schema
from everloop.serve._batcher import MicroBatcher, Outcome, id_prefix
from everloop.serve._holder import ModelHolder
from everloop.serve._feedback import record_feedback
from everloop.serve._log import LogEntry, PredictionLog
from everloop.serve._metrics import ServiceMetrics
from everloop.serve._openapi import request_schemas
from everloop.serve._protocols import (
    MAX_BODY_BYTES,
    TOO_DEEP,
    V2_TYPES,
    ClientError,
    Rows,
    check_nesting,
    ids_headers,
    load_body,
    loads,
    mlflow_answer,
    parse_invocations,
    parse_predict,
    parse_v2,
    strict_option,
    v2_answer,
    v2_strict,
)
from everloop.spec import ProjectSpec, load_spec
from everloop.store import Store
from everloop.train import TrainedModel

log = logging.getLogger("everloop.serve")
RawHeaders = list[tuple[bytes, bytes]]  # (name, value) pairs, as ASGI sends them

ADMIN_TOKEN_ENV = "EVERLOOP_ADMIN_TOKEN"
API_TOKEN_ENV = "EVERLOOP_API_TOKEN"
UI_PREFIX = "/ui"  # where `everloop serve --ui` mounts the dashboard


def create_app(project_dir: str | Path = ".", *, spec: ProjectSpec | None = None, store: Store | None = None,
               watch: bool = True, ui: bool = False) -> FastAPI:
    """The prediction service of a project. `ui`: also the dashboard's pages at /ui (everloop.ui), behind
    the admin token when one is set ($EVERLOOP_ADMIN_TOKEN: every page then needs a sign-in)."""
    project_dir = Path(project_dir)
    spec = spec or load_spec(project_dir)
    store = store or Store.for_project(project_dir)
    metrics = ServiceMetrics()

    def checked(version: int | None) -> None:
        metrics.alias_version.set(version or 0)
        metrics.alias_checked.set_to_current_time()

    holder = ModelHolder(store, on_swap=lambda m: metrics.model_version.set(m.version or 0),
                         on_failure=lambda v, e: metrics.reload_failures.inc(),
                         compile_trees=spec.serving.compile_trees, on_check=checked,
                         on_trial=lambda trial: setattr(batcher, "trial", trial))
    # Which replica (and worker) this is: its host and process, and the prefix of the prediction ids it
    # issues (the `worker` of its rows in the prediction log), so any prediction is traced to its replica.
    replica = {"host": os.uname().nodename, "pid": os.getpid(), "prediction_id_prefix": id_prefix()}
    # The writer thread always runs (it also records request counts); predictions only when logged.
    prediction_log = PredictionLog(store, metrics=metrics)
    log_rows = spec.serving.log_predictions
    api_token = os.environ.get(API_TOKEN_ENV)  # read once: the environment of a running service is fixed

    def predicted(entry: LogEntry, outputs: list[dict[str, Any]]) -> None:
        """Once per model call: count the answers in /metrics, and log them (one entry per call)."""
        metrics.observe_predictions(outputs)
        if log_rows:
            prediction_log.put(entry)

    def count_call(rollout: int, version: int, rows: int, failed: bool) -> None:
        """A model call under a rollout (either version), for rollout_stats."""
        prediction_log.count_call(rollout, version, rows, failed)
        if failed:
            metrics.rollout_failures.inc()

    def shadowed(entry: LogEntry) -> None:
        """A shadow candidate's rows (in the event loop's thread, as every put)."""
        if log_rows:
            prediction_log.put(entry)

    gathering = spec.serving.micro_batching  # off: each request is its own model call, at once
    batcher = MicroBatcher(max_rows=max(spec.serving.max_batch_rows, 1024) if gathering else 0,
                           max_wait_s=spec.serving.batch_wait_ms / 1000 if gathering else 0.0,
                           on_batch=metrics.batch_rows.observe, on_queue=metrics.batch_queue.set,
                           on_predicted=predicted, id_column=spec.data.id, count_call=count_call,
                           on_shadow=shadowed, on_shadow_drop=metrics.shadow_dropped.inc)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        _limit_threads()
        try:
            holder.refresh()
        except Exception:  # the store may not be ready; the watcher keeps trying and /ready says so
            pass
        if watch:
            holder.start(spec.serving.reload_seconds)
        # The model, the app and the libraries are long-lived: move them out of the garbage collector's
        # sight, and let it run less often, so that its pauses stop showing in the latency tail.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        # The log writer thread holds the GIL while it encodes a batch: let requests take it back within
        # a millisecond, not the default 5 (which showed as 5-7 ms in the latency tail).
        sys.setswitchinterval(0.001)
        prediction_log.start()
        flusher = asyncio.get_running_loop().create_task(_flush_metrics(metrics))
        yield
        flusher.cancel()
        metrics.flush_requests()
        batcher.stop()
        await run_in_threadpool(batcher.stop_shadow)  # its last rows reach the loop as callbacks:
        await asyncio.sleep(0)  # let them run before the log's last write
        holder.stop()
        prediction_log.stop()
        metrics.worker_exited()

    found = current_schema(store)
    schemas = request_schemas(found[1] if found else None)
    app = Service(title=f"everloop: {spec.name}", version="1", lifespan=lifespan,
                  description="Predictions, feedback and health of the production model of this project.")
    app.state.holder, app.state.store, app.state.log, app.state.metrics = holder, store, prediction_log, metrics
    app.metrics, app.batcher, app.counts = metrics, batcher, prediction_log

    @app.exception_handler(ClientDisconnect)
    async def _client_left(_request: Request, _exc: ClientDisconnect) -> Response:
        # the client closed the connection mid-body: nobody reads this answer; counted as 499, as the
        # prediction endpoints count it, never as a server error
        return Response(status_code=499)

    @app.exception_handler(ClientError)
    async def _client_error(_request: Request, exc: ClientError) -> Response:
        return Response(_dumps({"detail": exc.detail}), status_code=exc.status, media_type="application/json")

    @app.exception_handler(RecursionError)
    async def _too_deep(_request: Request, _exc: RecursionError) -> Response:
        return Response(_dumps({"detail": TOO_DEEP}), status_code=400, media_type="application/json")

    def parsed(scope: dict, raw: bytes, parse: Any) -> Rows:
        """Parse a body; then the request no longer counts as arriving (see Service)."""
        try:
            rows = parse(raw)
            check_nesting(raw, rows)  # before it joins a batch: a deep value would fail the batch
            return rows
        finally:
            if scope.pop(ARRIVING, False):
                batcher.arriving -= 1

    def answered(outcome: Outcome) -> Outcome:
        if outcome.errors:
            raise ClientError(422, outcome.errors)
        return outcome

    # The prediction endpoints, as functions of (scope, headers, body) -> JSON bytes (or JSON bytes and
    # extra headers): the hot path calls them straight from ASGI (see Service), the FastAPI routes below
    # only for /docs. Every answer carries the prediction ids that /feedback takes labels for.
    strict = spec.serving.strict

    async def predict(scope: dict, headers: Headers, raw: bytes) -> bytes:
        started = time.perf_counter()
        model = _require_model(holder)
        _check_api_token(headers, api_token)
        strictly = strict_option(scope.get("query_string", b""), strict)
        rows = parsed(scope, raw, lambda raw: parse_predict(load_body(raw), model.schema.feature_names,
                                                            spec.serving.max_batch_rows))
        outcome = answered(await batcher.submit(model, rows, started, strictly))  # each output carries its id
        version = model.version
        if outcome.outputs and "model_version" in outcome.outputs[0]:  # a canary: each row names its version
            version = _answering(outcome.outputs, version)
        if outcome.warnings:  # only then: a clean answer stays as it was
            return _dumps({"model_version": version, "predictions": outcome.outputs,
                           "warnings": outcome.warnings})
        return _dumps({"model_version": version, "predictions": outcome.outputs})

    if spec.serving.flask_compatible:  # decided here, once: with the flag off the path above is all there is
        predict = _flask_compatible(predict)

    async def invocations(scope: dict, headers: Headers, raw: bytes) -> tuple[bytes, RawHeaders]:
        started = time.perf_counter()
        model = _require_model(holder)
        _check_api_token(headers, api_token)
        strictly = strict_option(scope.get("query_string", b""), strict)
        content_type = headers.get("content-type", "application/json")
        rows = parsed(scope, raw, lambda raw: parse_invocations(raw, content_type, model.schema.feature_names,
                                                                spec.serving.max_batch_rows))
        outcome = answered(await batcher.submit(model, rows, started, strictly))
        # MLflow's answer has room for the labels only: the ids (and the answering versions) go in headers.
        return (_dumps(mlflow_answer([o["prediction"] for o in outcome.outputs])),
                ids_headers([o["id"] for o in outcome.outputs])
                + _version_headers(outcome.outputs, model.version))

    async def v2_infer(scope: dict, headers: Headers, raw: bytes) -> bytes:
        started = time.perf_counter()
        model = _require_model(holder)
        _check_api_token(headers, api_token)
        _check_name(scope["path"].split("/")[3], spec)
        strictly = strict_option(scope.get("query_string", b""), strict)
        bodies: list[Any] = []

        def parse(raw: bytes) -> Rows:
            bodies.append(load_body(raw))
            return parse_v2(bodies[0], model.schema.feature_names, spec.serving.max_batch_rows)

        rows = parsed(scope, raw, parse)
        body = bodies[0]  # a dict: parse_v2 refuses anything else
        outcome = answered(await batcher.submit(model, rows, started, strictly or v2_strict(body)))
        labels = [o["prediction"] for o in outcome.outputs]
        proba = ([list(o["probabilities"].values()) for o in outcome.outputs]
                 if outcome.outputs and "probabilities" in outcome.outputs[0] else None)
        answer = _dumps(v2_answer(spec.name, _answering(outcome.outputs, model.version), body.get("id"), labels,
                                  proba, [o["id"] for o in outcome.outputs]))
        if outcome.outputs and "model_version" in outcome.outputs[0]:  # a canary: per row in a header
            return answer, _version_headers(outcome.outputs, model.version)
        return answer

    app.hot_paths = {"/predict": predict, "/invocations": invocations, V2_INFER: v2_infer}

    def route(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            raw = await _body(request)
            body, extra = _answer_parts(await handler(request.scope, request.headers, raw))
            response = Response(body, media_type="application/json")
            for name, value in extra:
                response.headers.append(name.decode(), value.decode())
            return response
        return endpoint

    app.post("/predict", openapi_extra=schemas["predict"] | STRICT_QUERY, summary="Predict one row or a batch")(
        route(predict))
    app.post("/invocations", openapi_extra=schemas["invocations"] | STRICT_QUERY,
             summary="MLflow scoring protocol")(route(invocations))

    v2_endpoint = route(v2_infer)

    @app.post(V2_INFER, openapi_extra=schemas["v2"] | STRICT_QUERY, summary="Open Inference Protocol")
    async def v2_route(name: str, request: Request) -> Response:  # `name` declared for the OpenAPI schema
        return await v2_endpoint(request)

    @app.get("/version", summary="The server's version, as MLflow's scoring client asks")
    async def version() -> Response:
        from importlib.metadata import version as package_version

        return Response(package_version("everloop"), media_type="text/plain")

    @app.get("/ping", summary="Readiness, as MLflow and SageMaker callers expect")
    async def ping() -> Response:
        return Response(status_code=200 if holder.current is not None else 503)

    @app.get("/v2/models/{name}", summary="Open Inference Protocol: model metadata")
    async def v2_metadata(name: str) -> dict[str, Any]:
        model = _require_model(holder)
        _check_name(name, spec)
        inputs = [{"name": c.name, "datatype": V2_TYPES[c.kind], "shape": [-1, 1]} for c in model.schema.features]
        outputs = [{"name": "predict", "datatype": "BYTES" if model.task == "classification" else "FP64",
                    "shape": [-1, 1]}]
        if model.task == "classification":
            outputs.append({"name": "predict_proba", "datatype": "FP64", "shape": [-1, len(model.classes)]})
        return {"name": spec.name, "versions": [str(model.version)], "platform": "everloop-sklearn",
                "inputs": inputs, "outputs": outputs}

    @app.get("/v2/models/{name}/ready")
    async def v2_model_ready(name: str) -> Response:
        _check_name(name, spec)
        return Response(status_code=200 if holder.current is not None else 503)

    @app.get("/v2")
    async def v2_server() -> dict[str, Any]:
        return {"name": "everloop", "version": "1", "extensions": []}

    @app.get("/v2/health/live")
    async def v2_live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def v2_ready() -> JSONResponse:
        ready = holder.current is not None
        return JSONResponse({"ready": True} if ready else {"ready": False, "reason": _not_ready(holder)},
                            status_code=200 if ready else 503)

    @app.post("/feedback", openapi_extra=schemas["feedback"], summary="Ground-truth labels for earlier predictions")
    async def feedback(request: Request) -> Response:
        # Each label is checked against the model version that made its prediction (not the one serving
        # now), so no model needs to be loaded; a label that fails is never stored (422, nothing kept).
        _check_api_token(request.headers, api_token)
        body = loads(await _body(request))
        listed = isinstance(body, dict) and "labels" in body
        items = body.get("labels") if listed else [body]
        if not isinstance(items, list) or not items:
            raise ClientError(422, [{"loc": ["labels"], "msg": "expected a non-empty list of {id, label}"}])
        located = [dict(item, where=["labels", n] if listed else []) if isinstance(item, dict) else item
                   for n, item in enumerate(items)]
        # Every wait on the database is in a thread: the event loop keeps answering /predict and /health
        # while the store is slow or locked.
        if log_rows:  # a label may arrive right after its prediction
            await run_in_threadpool(prediction_log.flush, 5)
        try:
            result = await run_in_threadpool(record_feedback, store, located, partial=False,
                                             lock_wait=FEEDBACK_LOCK_WAIT_S)
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError) as exc:  # locked past
            # the wait, down, or every pooled connection held by other waiting calls
            log.warning("feedback not stored: %s", _first_line(exc))
            raise ClientError(503, f"the store is busy or cannot be reached ({_first_line(exc)}); "
                                   "no label of this request was stored: send it again") from None
        if result.problems:
            raise ClientError(422, [{"loc": _label_problem(p.where, listed) + ([p.field] if p.field else []),
                                     "msg": p.why} for p in result.problems])
        # _dumps: an unknown id may hold a lone surrogate (the standard parser lets "\ud800" through)
        return Response(_dumps({"accepted": result.accepted, "unknown_ids": result.unknown_ids}),
                        status_code=200 if result.accepted else 404,  # 0 accepted: every id unknown
                        media_type="application/json")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        model = holder.current
        if model is None:
            return JSONResponse({"ready": False, "reason": _not_ready(holder)}, status_code=503)
        # Serving, while the alias names a version that was refused: say so (the old model keeps serving).
        # A rollout's candidate that cannot be loaded is reported, never a reason to be unready.
        return JSONResponse({"ready": True, "model_version": model.version} | _refusal(holder) | _trial(holder))

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/model")
    async def model_info() -> dict[str, Any]:
        model = _require_model(holder)
        m = model.manifest
        return {"name": spec.name, "version": model.version, "task": model.task, "metric": m["metric"],
                "predictor": "compiled" if model.compiled is not None else "scikit-learn",
                "metrics": m["metrics"], "baseline": m["baseline"], "classes": model.classes,
                "features": model.schema.feature_names, "schema": model.schema.to_dict(),
                "lineage": {"dataset_version": m["dataset_version"], "dataset_hash": m["dataset_hash"],
                            "reason": m.get("reason", "")},
                "replica": replica | {"alias": holder.alias, "alias_version": holder.alias_version,
                                      "in_step": holder.alias_version == model.version,
                                      "serving_since": _utc(holder.loaded_at),
                                      "alias_checked_at": _utc(holder.checked_at)}} \
            | _refusal(holder) | _trial(holder)

    if ui:  # its pages go through FastAPI's routing, never the hot path: no request of theirs is a prediction
        from everloop.ui import create_ui

        app.mount(UI_PREFIX, create_ui(project_dir, spec=spec, store=store, require_login=True))

    @app.post("/admin/reload")
    async def reload(request: Request) -> dict[str, Any]:
        expected = os.environ.get(ADMIN_TOKEN_ENV)
        if not expected:
            raise ClientError(403, f"admin endpoints are off; set {ADMIN_TOKEN_ENV} to enable them")
        if not _bearer(request.headers, expected):
            raise ClientError(401, "a valid admin bearer token is required")
        raw = await _body(request)
        if raw.strip():  # no body is needed; one that is sent must be JSON
            loads(raw)
        try:  # in a thread: reading the alias and loading a model may wait on the store
            swapped = await run_in_threadpool(holder.refresh, True)  # now: also a version that failed before
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            raise ClientError(503, f"the production alias could not be read: {_first_line(exc)}") from None
        if holder.last_error:
            raise ClientError(503 if holder.retrying else 409, holder.last_error)
        current = holder.current
        return {"swapped": swapped, "model_version": current.version if current else None}

    return app


# -- request handling -----------------------------------------------------------------------------


def _dumps(content: Any) -> bytes:
    """JSON by orjson (several times faster than the standard encoder); integers past 64 bits, which
    only a client can have sent (and an error may quote), by the standard one."""
    try:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:
        return json.dumps(content, default=str).encode()


def _flask_compatible(predict: Handler) -> Handler:
    """`/predict` answering also as the usual Flask tutorial service does, for its existing clients: that
    service takes `{"features": [v1, v2, ...]}` (which `/predict` takes too) and answers
    `jsonify({"prediction": model.predict([features]).tolist()})`, the most common shape in public
    examples (some add a `"status"`). The answer gets a top-level `"status": "ok"` and `"prediction"`
    (the labels, in row order) in front of everloop's own fields; refusals keep their status code and
    `{"detail": ...}`. Costs one JSON decode of the answer per request, only when the flag is on."""
    async def flask_predict(scope: dict, headers: Headers, raw: bytes) -> bytes:
        answer = orjson.loads(await predict(scope, headers, raw))  # type: ignore[arg-type]
        return _dumps({"status": "ok", "prediction": [p["prediction"] for p in answer["predictions"]]} | answer)

    return flask_predict


def _answer_parts(answer: bytes | tuple[bytes, RawHeaders]) -> tuple[bytes, RawHeaders]:
    """A prediction handler's answer as (JSON body, extra headers)."""
    return (answer, []) if type(answer) is bytes else answer  # type: ignore[return-value]


def _require_model(holder: ModelHolder) -> TrainedModel:
    """The model being served; else 503 saying why: which model was refused and why, or that none is
    in production yet (every endpoint that needs a model answers the same)."""
    model = holder.current
    if model is None:
        raise ClientError(503, _not_ready(holder))
    return model


def _not_ready(holder: ModelHolder) -> str:
    if holder.last_error and holder.retrying:  # the store cannot be reached: no model is at fault
        return holder.last_error
    if holder.last_error:
        return (f"{holder.last_error}; no other model is loaded: promote a fixed version with "
                "'everloop promote', or roll back with 'everloop rollback'")
    return "no model is in production yet; promote one with 'everloop promote'"


def _utc(seconds: float | None) -> str | None:
    """Unix time as ISO 8601 in UTC, to the millisecond."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


def _check_api_token(headers: Headers, expected: str | None) -> None:
    if expected and not _bearer(headers, expected):
        raise ClientError(401, "a valid bearer token is required")


def _bearer(headers: Headers, token: str) -> bool:
    """Whether the request's Authorization header is `Bearer <token>`, compared in constant time (no
    timing tells how much of a guess was right). Header values arrive as latin-1; the token is sent
    as its UTF-8 bytes."""
    given = headers.get("authorization", "").encode("latin-1")
    return hmac.compare_digest(given, b"Bearer " + token.encode("utf-8"))


def _refusal(holder: ModelHolder) -> dict[str, str]:
    """`{"refused": why}` while the alias names a version that could not be loaded (it is tried again;
    the model before it keeps serving), else nothing."""
    return {"refused": holder.last_error} if holder.last_error else {}


def _trial(holder: ModelHolder) -> dict[str, Any]:
    """`{"rollout": {...}}` while a rollout is active (see Trial.to_dict), else nothing."""
    trial = holder.trial
    return {"rollout": trial.to_dict()} if trial is not None else {}


def _answering(outputs: list[dict[str, Any]], production: int | None) -> int | None:
    """The version that answered every row (a canary tags each output), else production's: the per-row
    versions then say which answered what."""
    if not outputs or "model_version" not in outputs[0]:
        return production
    first = outputs[0]["model_version"]
    return first if all(o["model_version"] == first for o in outputs) else production


def _version_headers(outputs: list[dict[str, Any]], production: int | None) -> RawHeaders:
    """`X-Everloop-Model-Version`: the version that answered each row, comma-separated in row order (as
    the ids' header, split over lines when long); one value when no canary is on."""
    if not outputs or "model_version" not in outputs[0]:
        return [(VERSION_HEADER, str(production).encode())]
    return [(VERSION_HEADER, line) for _, line in ids_headers([str(o["model_version"]) for o in outputs])]


def _first_line(exc: Exception) -> str:
    """A database error's own message (the driver's first line), without SQLAlchemy's statement dump."""
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def _check_name(name: str, spec: ProjectSpec) -> None:
    if name != spec.name:
        raise ClientError(404, f"no model named {name!r}; this service serves {spec.name!r}")


async def _body(request: Request) -> bytes:
    return await _read_body(request.headers, request.receive)


def _label_problem(where: Any, listed: bool) -> list[Any]:
    """The `loc` of a refused /feedback item: record_feedback gives back the position each item was
    sent with, or only its index when the item was not an object."""
    if isinstance(where, list):
        return where
    return ["labels", where] if listed else []


async def _flush_metrics(metrics: ServiceMetrics, every: float = 0.25) -> None:
    while True:
        await asyncio.sleep(every)
        metrics.flush_requests()


def _limit_threads() -> None:
    # One OpenMP/BLAS thread per worker: concurrent requests otherwise oversubscribe the cores.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


V2_INFER = "/v2/models/{name}/infer"
STRICT_QUERY = {"parameters": [{"name": "strict", "in": "query", "required": False, "schema": {"type": "boolean"},
                                "description": "refuse (422) rows with a category not seen in training, a value "
                                               "outside the schema's range or an unexpected null"}]}
ARRIVING = "everloop.arriving"
FEEDBACK_LOCK_WAIT_S = 30.0  # longest /feedback waits for a lock on the store, then 503 (as SQLite)
JSON_HEADERS = [(b"content-type", b"application/json")]
VERSION_HEADER = b"x-everloop-model-version"

Handler = Callable[[dict, Headers, bytes], Awaitable["bytes | tuple[bytes, RawHeaders]"]]


def _is_v2_infer(path: str) -> bool:
    return path.startswith("/v2/models/") and path.endswith("/infer") and path.count("/") == 4


class Service(FastAPI):
    """The FastAPI app with a hot path in front of it: the prediction endpoints are called straight
    from ASGI (FastAPI's routing, request objects and middleware cost more than a micro-batched
    prediction), every other path goes through FastAPI. Every request is counted and timed, and a
    prediction request tells the batcher as soon as it starts, so that it can wait for it to join a batch."""

    hot_paths: dict[str, Handler]
    metrics: ServiceMetrics
    batcher: MicroBatcher
    counts: PredictionLog

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]
        handler = None
        if scope["method"] == "POST":
            handler = self.hot_paths.get(path) or (self.hot_paths[V2_INFER] if _is_v2_infer(path) else None)
        if handler is not None:
            scope[ARRIVING] = True
            self.batcher.arriving += 1
            self.batcher.active += 1
        self.metrics.inflight_now += 1  # an int: the gauge is sampled from it (see ServiceMetrics.sample)
        status = [500]
        try:
            if handler is not None:
                status[0] = await _answer(handler, scope, receive, send)
            else:
                async def send_wrapper(message: dict) -> None:
                    if message["type"] == "http.response.start":
                        status[0] = message["status"]
                    await send(message)

                await super().__call__(scope, receive, send_wrapper)
        finally:
            self.metrics.inflight_now -= 1
            if scope.pop(ARRIVING, False):  # ended before its body was parsed (refused early)
                self.batcher.arriving -= 1
            if handler is not None:
                self.batcher.active -= 1
            self.metrics.observe_request(path, status[0], time.perf_counter() - started)
            self.counts.count_request(status[0], handler is not None)


async def _answer(handler: Handler, scope: dict, receive: Any, send: Any) -> int:
    """Read the body, call the handler, send its JSON (or the client error's); returns the status."""
    headers = Headers(scope=scope)
    extra: RawHeaders = []
    try:
        body, status = await handler(scope, headers, await _read_body(headers, receive)), 200
        if type(body) is not bytes:  # (body, headers): /invocations' ids
            body, extra = body
    except ClientError as exc:
        body, status = _dumps({"detail": exc.detail}), exc.status
    except RecursionError:  # only a client's body nests this deep: a check missed it, yet no 500
        body, status = _dumps({"detail": TOO_DEEP}), 400
    except ClientDisconnect:
        return 499  # the client left: nobody to answer (nginx's code for it, in the metrics only)
    except Exception:  # a bug, not the client's input: logged, and answered as FastAPI would
        log.exception("prediction request failed")
        body, status = b'{"detail":"Internal Server Error"}', 500
    await send({"type": "http.response.start", "status": status,
                "headers": JSON_HEADERS + [(b"content-length", str(len(body)).encode())] + extra})
    await send({"type": "http.response.body", "body": body})
    return status


async def _read_body(headers: Headers, receive: Any) -> bytes:
    """The request's body, refused with 413 past MAX_BODY_BYTES (before reading it all, when the
    client declared its length); a client that left raises Starlette's ClientDisconnect."""
    message = await receive()
    if not message.get("more_body", False) and message["type"] == "http.request":
        body = message.get("body", b"")  # the common case: the whole body in one message
        if len(body) > MAX_BODY_BYTES:
            raise ClientError(413, f"the body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
        return body
    length = headers.get("content-length")  # a large body: refuse it before reading the rest
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise ClientError(413, f"the body is {int(length)} bytes; the limit is {MAX_BODY_BYTES}")
    chunks, size = [], 0
    while True:
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ClientError(413, f"the body is over the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        message = await receive()
