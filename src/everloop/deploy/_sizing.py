"""`everloop deploy k8s --target-rps R`: how many replicas, and how much CPU, the service needs.

The production model's cost is measured on this machine, through the serving path in-process: the
service's app (parsing, validation, the micro-batcher, the model, the answer, the metrics) called
over ASGI with one-row `/predict` requests built from the model's evaluation rows, one after the
other. Only uvicorn's HTTP parsing is left out; the utilisation target leaves room for it. One
request at a time is the worst case: under load, the micro-batcher answers concurrent requests in
one model call, which costs less per request. Nothing is written to the store (the prediction log
and the request counts are off for the measurement) and no tree ensemble is compiled (the image
has no compiler).
"""

from __future__ import annotations

import asyncio
import math
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from everloop.errors import EverloopError

UTILISATION = 0.6  # busy share a replica is sized for; also the autoscaler's CPU target
WORKER_CORES = 1.0  # one uvicorn worker per pod: one event loop uses at most about one core
MIN_REPLICAS = 2  # so that a node drain or a rollout never leaves the service without a replica
CPU_STEP_M = 50  # CPU requests are rounded up to this many millicores
MIN_CPU_M = 100
MEMORY_STEP_MI = 64


@dataclass(frozen=True)
class Measurement:
    """The serving cost of the production model on this machine."""

    model_version: int
    request_ms: float  # one one-row /predict request, median over rounds
    batch_row_ms: float  # per row of a 100-row /predict request
    requests: int  # one-row requests timed
    rss_mib: float  # peak resident memory of the measuring process, model loaded and serving
    machine: str


@dataclass(frozen=True)
class Sizing:
    """Replicas and per-pod resources for `target_rps` one-row requests a second."""

    target_rps: float
    measurement: Measurement
    cores: float  # CPU the target needs at 100% busy: target_rps x request_ms / 1000
    replicas: int
    cpu_request_m: int
    cpu_limit_m: int
    memory_request_mi: int
    memory_limit_mi: int
    utilisation: float = UTILISATION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def comment(self) -> list[str]:
        """The arithmetic, as lines for the manifest's header."""
        m, u = self.measurement, self.utilisation
        sized = self.cores / u
        return [
            f"Sizing for {self.target_rps:g} one-row requests/s (everloop deploy k8s --target-rps "
            f"{self.target_rps:g}),",
            f"measured with model v{m.model_version} on {m.machine}:",
            f"  one-row /predict through the serving path, in-process: {m.request_ms:.3f} ms per request",
            f"  (median of rounds over {m.requests} requests; 100-row requests: {m.batch_row_ms:.4f} ms per row)",
            f"  CPU at the target: {self.target_rps:g} x {m.request_ms:.3f} ms = {self.cores:.3f} cores",
            f"  sized for {u:.0%} busy (room for HTTP parsing and bursts): {self.cores:.3f} / {u} = "
            f"{sized:.3f} cores",
            f"  replicas = max({MIN_REPLICAS}, ceil({sized:.3f} / {WORKER_CORES:g} core per one-worker pod)) = "
            f"{self.replicas}",
            f"  CPU request per pod = {sized:.3f} / {self.replicas} cores, rounded up to {CPU_STEP_M}m "
            f"(at least {MIN_CPU_M}m) = {self.cpu_request_m}m; limit {self.cpu_limit_m}m (one worker)",
            f"  memory: peak {m.rss_mib:.0f} MiB measured; request {self.memory_request_mi}Mi (x1.25), limit "
            f"{self.memory_limit_mi}Mi",
            f"  the autoscaler adds replicas past {u:.0%} of the CPU request, i.e. past the target rate",
            "One request at a time was measured (the worst case): under load the micro-batcher answers",
            "concurrent requests in one model call, for less CPU each.",
        ]


def size(target_rps: float, measurement: Measurement) -> Sizing:
    """Replicas and resources for `target_rps` (> 0) one-row requests a second at `measurement`'s
    cost: the CPU the rate needs, over `UTILISATION`, spread on one-worker pods of at most one core."""
    cores = target_rps * measurement.request_ms / 1000
    sized = cores / UTILISATION
    replicas = max(MIN_REPLICAS, math.ceil(sized / WORKER_CORES - 1e-9))
    cpu = max(MIN_CPU_M, _round_up(sized / replicas * 1000, CPU_STEP_M))
    memory = max(4 * MEMORY_STEP_MI, _round_up(measurement.rss_mib * 1.25, MEMORY_STEP_MI))
    return Sizing(target_rps, measurement, cores, replicas, min(cpu, int(WORKER_CORES * 1000)),
                  int(WORKER_CORES * 1000), memory, 2 * memory)


def measure(project: Path, spec: Any, store: Any, seconds: float = 2.0) -> Measurement:
    """Time the production model's one-row and 100-row `/predict` requests, in-process, for about
    `seconds`. Raises EverloopError when there is no production model or it cannot answer."""
    from everloop.registry import eval_frame
    from everloop.serve import create_app
    from threadpoolctl import threadpool_limits

    serving = spec.serving.model_copy(update={"log_predictions": False, "compile_trees": False})
    app = create_app(project, spec=spec.model_copy(update={"serving": serving}), store=store, watch=False)
    holder = app.state.holder
    holder.refresh()
    model = holder.current
    if model is None:
        raise EverloopError("--target-rps: no production model to measure"
                            + (f" ({holder.last_error})" if holder.last_error else "")
                            + "; promote one first (everloop promote N), or leave out --target-rps")
    rows = _rows(model, eval_frame(store, model.manifest))
    ones = [_body({"features": row}) for row in rows[:200]]
    batch = _body({"instances": (rows * (100 // len(rows) + 1))[:100]})
    with threadpool_limits(1):  # as a serving worker runs (see serve: one OpenMP thread per worker)
        request_s, count = asyncio.run(_time(app, ones, seconds * 0.7))
        batch_s, _ = asyncio.run(_time(app, [batch], seconds * 0.3))
    # (the app's log writer was never started: stopping it would write request counts to the store)
    return Measurement(model.version, request_s * 1000, batch_s * 1000 / 100, count,
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, _machine())


def _rows(model: Any, frame: Any) -> list[dict[str, Any]]:
    """Request rows: the evaluation rows' features as JSON values (or the schema's example row)."""
    import json

    names = [n for n in model.schema.feature_names if n in frame.columns]
    if len(frame) and len(names) == len(model.schema.feature_names):
        return json.loads(frame[names].head(200).to_json(orient="records", date_format="iso"))
    return [model.schema.example_row()]


def _body(obj: Any) -> bytes:
    import orjson

    return orjson.dumps(obj)


async def _time(app: Any, bodies: list[bytes], seconds: float) -> tuple[float, int]:
    """(median seconds per request over rounds, requests timed), POSTing `bodies` in turn."""
    headers = [(b"content-type", b"application/json")]
    token = os.environ.get("EVERLOOP_API_TOKEN")
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))

    async def call(body: bytes) -> None:
        answer: dict[str, Any] = {}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            answer.setdefault("status", message.get("status"))
            if message["type"] == "http.response.body":
                answer["body"] = message.get("body", b"")

        await app({"type": "http", "method": "POST", "path": "/predict", "headers": headers,
                   "query_string": b"", "scheme": "http", "server": ("127.0.0.1", 80), "client": None,
                   "http_version": "1.1", "root_path": ""}, receive, send)
        if answer.get("status") != 200:
            detail = answer.get("body", b"")[:300].decode(errors="replace")
            raise EverloopError(f"--target-rps: the service answered {answer.get('status')} to a request built "
                                f"from the model's evaluation rows: {detail}")

    start = time.perf_counter()
    warm = 0
    while warm < 20 or time.perf_counter() - start < seconds * 0.1:  # warm up, and estimate the cost
        await call(bodies[warm % len(bodies)])
        warm += 1
    per = (time.perf_counter() - start) / warm
    rounds, per_round = [], max(5, int(seconds * 0.9 / 5 / per))
    for r in range(5):
        begun = time.perf_counter()
        for i in range(per_round):
            await call(bodies[(r * per_round + i) % len(bodies)])
        rounds.append((time.perf_counter() - begun) / per_round)
    return sorted(rounds)[2], 5 * per_round


def _round_up(value: float, step: int) -> int:
    return int(math.ceil(value / step - 1e-9) * step)


def _machine() -> str:
    """This machine in a few words: host, processor, cores."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{platform.node()} ({model}, {os.cpu_count()} cores)"
