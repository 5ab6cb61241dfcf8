"""Prometheus metrics of the service, in a registry of its own (one per app)."""

from __future__ import annotations

import bisect
import os
import resource
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.process_collector import ProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

KNOWN_PATHS = {"/predict", "/invocations", "/ping", "/feedback", "/health", "/ready", "/metrics", "/model",
               "/admin/reload", "/v2", "/v2/health/live", "/v2/health/ready"}
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServiceMetrics:
    """The service's metrics. With several workers (`everloop serve --workers N`, which sets
    PROMETHEUS_MULTIPROC_DIR), every worker writes its values to that folder and `/metrics`, answered
    by any of them, aggregates all workers (prometheus_client's multiprocess mode)."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.registry = CollectorRegistry()
        r = self.registry
        if not self.multiprocess:
            ProcessCollector(registry=r)  # process CPU seconds, resident memory, open fds
        self.requests = Counter("everloop_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("everloop_request_latency_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("everloop_inflight_requests", "requests being served now", registry=r,
                              multiprocess_mode="livesum")
        # live*: a worker that died (and was restarted) no longer counts. With several workers, max: during a
        # swap the highest version any worker serves; the alias's version and its check time say the rest.
        self.model_version = Gauge("everloop_model_version", "version of the model being served", registry=r,
                                   multiprocess_mode="livemax")
        self.alias_version = Gauge("everloop_alias_version", "version the production alias named at this "
                                   "replica's last check; differs from everloop_model_version while a new "
                                   "model loads or when it was refused", registry=r, multiprocess_mode="livemax")
        self.alias_checked = Gauge("everloop_alias_checked_timestamp_seconds", "unix time of this replica's "
                                   "last read of the alias; an old value means it cannot reach the store and "
                                   "may be out of step", registry=r, multiprocess_mode="livemin")
        self.reload_failures = Counter("everloop_model_reload_failures", "model versions that failed to load "
                                       "(once per version)", registry=r)
        self.predictions = Counter("everloop_predictions", "predicted rows by predicted class", ["prediction"],
                                   registry=r)
        self.predicted_value = Histogram("everloop_predicted_value", "predicted values (regression)", registry=r)
        self.log_queue = Gauge("everloop_prediction_log_queue", "rows waiting to be written to the log", registry=r,
                               multiprocess_mode="livesum")
        self.log_dropped = Counter("everloop_prediction_log_dropped", "rows dropped: the log queue was full",
                                   registry=r)
        self.log_failed = Counter("everloop_prediction_log_failed", "rows the store refused to write", registry=r)
        self.log_lost = Counter("everloop_prediction_log_lost", "rows a killed worker answered but never logged, "
                                "counted when a service starts after it", registry=r)
        self.shadow_dropped = Counter("everloop_shadow_dropped", "rows a shadow candidate did not score: its queue "
                                      "was full (never waited for)", registry=r)
        self.rollout_failures = Counter("everloop_rollout_failed_calls", "model calls under a rollout that failed, "
                                        "or found its candidate not loaded (a candidate's rows are then answered "
                                        "by production, or not scored in shadow)", registry=r)
        self.batch_rows = Histogram("everloop_batch_rows", "rows per model call (micro-batching)", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))
        self.batch_queue = Gauge("everloop_batch_queue", "requests waiting for the next model call", registry=r,
                                 multiprocess_mode="livesum")
        self.cpu = Gauge("everloop_process_cpu_seconds", "CPU seconds used by the service's workers", registry=r,
                         multiprocess_mode="livesum")
        self.memory = Gauge("everloop_process_resident_memory_bytes", "resident memory of the service's workers",
                            registry=r, multiprocess_mode="livesum")

        self.inflight_now = 0  # kept by the request path as a plain int; `sample` copies it to the gauge
        self._pending: dict[tuple[str, int], list[Any]] = {}
        self._bounds = [*LATENCY_BUCKETS, float("inf")]
        self._classes: dict[str, Any] = {}

    def exposition(self) -> bytes:
        self.flush_requests()
        self.sample()
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    def sample(self) -> None:
        """Gauges read off this worker a few times a second (not on every request): requests in flight,
        CPU time and resident memory."""
        self.inflight.set(self.inflight_now)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu.set(usage.ru_utime + usage.ru_stime)
        try:
            with open("/proc/self/statm") as statm:
                self.memory.set(int(statm.read().split()[1]) * PAGE_BYTES)
        except OSError:
            pass

    def worker_exited(self) -> None:
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        """Count and time one request. Kept in plain Python numbers and written to the metrics by
        `flush_requests` (a few times a second, and before every exposition): in multiprocess mode each
        metric update is a locked write to a memory-mapped file, several per request."""
        pending = self._pending.get((path, status))
        if pending is None:
            if len(self._pending) >= 1000:  # bounded label cardinality; unknown paths share "other"
                path = "other"
            pending = self._pending.setdefault((path, status), [self._labelled(path, status), 0, 0.0,
                                                                [0] * len(self._bounds)])
        pending[1] += 1
        pending[2] += seconds
        pending[3][bisect.bisect_left(self._bounds, seconds)] += 1

    def flush_requests(self) -> None:
        """Write the counts kept by `observe_request` (called from the event loop's thread only)."""
        for pending in self._pending.values():
            if not pending[1]:
                continue
            (counter, histogram), count, total, buckets = pending
            pending[1:] = [0, 0.0, [0] * len(buckets)]
            counter.inc(count)
            histogram._sum.inc(total)  # what Histogram.observe does per value, per bucket at once
            for child, n in zip(histogram._buckets, buckets):
                if n:
                    child.inc(n)

    def _labelled(self, path: str, status: int) -> tuple[Any, Any]:
        if path in KNOWN_PATHS:
            endpoint = path
        elif path.startswith("/v2/models/"):
            endpoint = "/v2/models/{name}/" + path.rsplit("/", 1)[-1] if path.count("/") == 4 else "/v2/models/{name}"
        else:
            endpoint = "other"  # bounded label cardinality
        return self.requests.labels(endpoint, str(status)), self.latency.labels(endpoint)

    def observe_predictions(self, outputs: list[dict[str, Any]]) -> None:
        if outputs and "probabilities" in outputs[0]:
            counts: dict[str, int] = {}
            for o in outputs:
                key = str(o["prediction"])
                counts[key] = counts.get(key, 0) + 1
            for key, n in counts.items():
                child = self._classes.get(key)
                if child is None:
                    child = self._classes[key] = self.predictions.labels(key)
                child.inc(n)
        else:
            for o in outputs:
                self.predicted_value.observe(o["prediction"])
