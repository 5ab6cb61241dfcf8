"""Adaptive micro-batching: concurrent requests are validated and predicted together, in one call.

A model call has a fixed cost (validation, features, the trees, the log entry: ~80 us for the demo
model even on the fast path) that a few rows barely add to, so the service gathers whatever requests
arrived while the previous call ran into the next one. There is no fixed timer: a lone request is answered at once. Under load, the
batcher waits briefly (at most half of a recent model call, and `max_wait_s`) until about as many
rows are queued as recent batches had, so that clients answered by the last call can rejoin the
next one; requests already known to be on their way are always waited for.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from everloop._jsonable import jsonable
from everloop.serve._log import LogEntry
from everloop.serve._protocols import Rows
from everloop.train import TrainedModel


@dataclass
class Outcome:
    outputs: list[dict[str, Any]] = field(default_factory=list)  # one per row: id, prediction (+ probabilities)
    errors: list[dict[str, Any]] = field(default_factory=list)  # 422 details when a row is invalid


@dataclass
class _Job:
    model: TrainedModel
    rows: Rows
    future: asyncio.Future
    started: float  # perf_counter() when the request arrived: the logged latency counts from here


_ID_PREFIX = uuid.uuid4().hex[:16]  # per worker process; a counter makes each id unique within it
_id_counter = itertools.count()


def ids_for(n: int) -> list[str]:
    """Prediction ids: unique across workers and restarts, far cheaper than a uuid4 per row."""
    return [f"{_ID_PREFIX}{next(_id_counter):x}" for _ in range(n)]


# What the batcher reports of each model call: its answered rows (the service logs them) and their
# outputs (the service counts them in /metrics).
OnPredicted = Callable[[LogEntry, list[dict[str, Any]]], None]


class MicroBatcher:
    def __init__(self, max_rows: int = 1024, on_batch: Any = None, max_wait_s: float = 0.002,
                 on_queue: Any = None, on_predicted: OnPredicted | None = None):
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.arriving = 0  # requests being read and parsed right now: worth waiting a moment for
        self.active = 0  # prediction requests in the service now (counted by the app's middleware)
        self.recent_active = 1.0  # its moving average at the start of each model call: the clients in play
        self.queue: deque[_Job] = deque()
        self.recent_rows = 1.0  # moving averages of the rows and seconds of recent model calls
        self.recent_seconds = 0.0
        self.on_batch = on_batch  # called with the number of rows of each model call (for metrics)
        self.on_queue = on_queue  # called with the queue's length left after each batch is taken (for metrics)
        self.on_predicted = on_predicted
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def submit(self, model: TrainedModel, rows: Rows, started: float) -> "asyncio.Future[Outcome]":
        """Queue rows for the next model call; await the returned future for their outcome. (A plain
        function returning the future, not a coroutine: one frame less to resume per request.)"""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run())
        job = _Job(model, rows, loop.create_future(), started)
        self.queue.append(job)
        self._wakeup.set()
        return job.future

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._gather()
            while self.queue:
                self.recent_active += 0.2 * (self.active - self.recent_active)
                jobs = self._take()
                started = time.perf_counter()
                try:
                    with np.errstate(all="ignore"):  # extreme inputs (1e308) overflow harmlessly; no log noise
                        self._process(jobs)
                except Exception as exc:  # a bug, not client input: fail these requests, keep serving
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(exc)
                rows = sum(len(job.rows.records) for job in jobs)
                self.recent_rows += 0.2 * (rows - self.recent_rows)
                self.recent_seconds += 0.2 * (time.perf_counter() - started - self.recent_seconds)
                await self._gather()

    async def _gather(self) -> None:
        """Let requests that arrived while the last batch ran get parsed and queued, for at most
        max_wait_s: only while some are known to be on their way, so a lone request never waits."""
        await asyncio.sleep(0)  # read the sockets: new requests become tasks
        await asyncio.sleep(0)  # those tasks start, and count themselves in `arriving`
        now = time.perf_counter()
        deadline = now + self.max_wait_s
        patience = now + min(self.max_wait_s, 0.5 * self.recent_seconds)
        # About as many rows as recent calls had, or as the clients in play send one row each: a
        # client answered by the last call is usually back within a fraction of a millisecond.
        target = 0.8 * max(self.recent_rows, self.recent_active)
        while time.perf_counter() < deadline:
            if not self.arriving and (time.perf_counter() >= patience or self._queued_rows() >= target):
                return
            await asyncio.sleep(0 if self.arriving else 0.0002)

    def _queued_rows(self) -> int:
        return sum(len(job.rows.records) for job in self.queue)

    def _take(self) -> list[_Job]:
        """The next batch: queued jobs for the same model (a swap never mixes models), up to max_rows."""
        first = self.queue.popleft()
        jobs, rows = [first], len(first.rows.records)
        while self.queue and self.queue[0].model is first.model and rows + len(self.queue[0].rows.records) <= self.max_rows:
            job = self.queue.popleft()
            jobs.append(job)
            rows += len(job.rows.records)
        if self.on_queue:
            self.on_queue(len(self.queue))
        return jobs

    def _process(self, jobs: list[_Job]) -> None:
        model = jobs[0].model
        records = [r for job in jobs for r in job.rows.records]
        # Well-formed rows take the shortcut; anything unusual goes through the schema's full check.
        columns = model.schema.conform_records(records) if model.fast is not None else None
        if columns is None:
            self._process_checked(jobs, records)
            return
        predictions = model.predict_conformed(columns)
        ids = ids_for(len(records))
        outputs = predictions.records(ids)
        if self.on_batch:
            self.on_batch(len(records))
        start, now, latencies = 0, time.perf_counter(), []
        for job in jobs:
            end = start + len(job.rows.records)
            _resolve(job, Outcome(outputs[start:end]))
            latencies += [(now - job.started) * 1000] * (end - start)
            start = end
        if self.on_predicted:
            self.on_predicted(LogEntry(ids, time.time(), model.version, columns, predictions.labels.tolist(),
                                       predictions.proba, predictions.classes, latencies), outputs)

    def _process_checked(self, jobs: list[_Job], records: list[dict[str, Any]]) -> None:
        model = jobs[0].model
        frame = pd.DataFrame.from_records(records, columns=model.schema.feature_names)
        checked = model.schema.check(frame, mode="request", coerce=True)
        bad = checked.bad_rows if checked.bad_rows is not None else np.zeros(len(frame), dtype=bool)
        outputs: list[dict[str, Any] | None] = [None] * len(frame)
        good = np.flatnonzero(~bad)
        predictions = None
        ids = ids_for(len(frame))
        if len(good):
            features = checked.frame if not bad.any() else checked.frame.iloc[good]
            predictions = model.predict_conformed(features)
            for position, output in zip(good, predictions.records([ids[p] for p in good])):
                outputs[position] = output
        if self.on_batch:
            self.on_batch(len(frame))
        start, now, latencies, answered = 0, time.perf_counter(), [], []
        for job in jobs:
            end = start + len(job.rows.records)
            if bad[start:end].any():  # the whole request is refused, naming each bad field
                _resolve(job, Outcome(errors=_errors(checked.reasons, frame, job.rows, start, end)))
            else:
                _resolve(job, Outcome(outputs[start:end]))
                latencies += [(now - job.started) * 1000] * (end - start)
                answered += range(start, end)
            start = end
        if self.on_predicted and answered and predictions is not None:
            at = np.searchsorted(good, answered)  # the answered rows among the predicted ones
            self.on_predicted(LogEntry([ids[p] for p in answered], time.time(), model.version,
                                       checked.frame.iloc[answered].reset_index(drop=True),
                                       predictions.labels[at].tolist(),
                                       None if predictions.proba is None else predictions.proba[at],
                                       predictions.classes, latencies), [outputs[p] for p in answered])


def _resolve(job: _Job, outcome: Outcome) -> None:
    if not job.future.done():  # a request cancelled meanwhile must not fail the others of its batch
        job.future.set_result(outcome)


def _errors(reasons: list[tuple[np.ndarray, str, str]], frame: pd.DataFrame, rows: Rows, start: int,
            end: int) -> list[dict[str, Any]]:
    detail = []
    for mask, column, message in reasons:
        for offset in np.flatnonzero(mask[start:end]):
            detail.append({"loc": rows.locs[offset] + [column], "msg": message,
                           "input": jsonable(frame[column].iloc[start + offset])})
    return detail
