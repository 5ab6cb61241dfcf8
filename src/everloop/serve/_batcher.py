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
import logging
import os
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from everloop._jsonable import jsonable
from everloop.data import ColumnSchema, Schema
from everloop.data._schema import _iso  # how the schema writes date/times
from everloop.data._stats import epoch_seconds  # how the schema records date/time ranges
from everloop.serve._log import LogEntry
from everloop.serve._protocols import Rows
from everloop.serve._rollout import BUCKETS, CountCall, Shadow, ShadowJob, Trial, bucket
from everloop.train import TrainedModel

log = logging.getLogger("everloop.serve")


@dataclass
class Outcome:
    outputs: list[dict[str, Any]] = field(default_factory=list)  # one per row: id, prediction (+ probabilities)
    errors: list[dict[str, Any]] = field(default_factory=list)  # 422 details when a row is invalid
    warnings: list[dict[str, Any]] = field(default_factory=list)  # {"row", "column", "why"}: see RowWarnings


@dataclass
class _Job:
    model: TrainedModel
    rows: Rows
    future: asyncio.Future
    started: float  # perf_counter() when the request arrived: the logged latency counts from here
    strict: bool = False  # refuse rows with warnings instead of answering them


@dataclass(frozen=True)
class Warned:
    """One value the schema accepts but warns about, at `row` of a model call."""

    row: int
    position: int  # the column's place among the features: warnings come in row, then schema order
    column: str
    why: str
    value: Any


class RowWarnings:
    """The per-row form of the schema's warnings on request rows: a category not seen in training, a
    number outside the schema's range (the training range widened by `RANGE_MARGIN`, never below 0 for
    data that never was negative), a null in a column that had none in training. `Schema.check` counts
    these per column for reports; a service must say which row of which request has one, so that a
    client can see it (or, strict, have it refused).

    Built once per model. `find` costs a few operations per model call when no value is unusual
    (numbers: one vectorised comparison of all of them with the ranges; categories: one subset test
    per column); rows are only walked in a column where something was found."""

    def __init__(self, schema: Schema):
        features = schema.features
        numeric = [c for c in features if c.kind == "numeric"]
        self.position = {c.name: n for n, c in enumerate(features)}
        # Numbers without a range that may be null cannot warn: left out.
        self.numeric = [c for c in numeric if c.min is not None or c.max is not None or not c.nullable]
        self.lo = np.array([-np.inf if c.min is None else c.min for c in self.numeric])[:, None]
        self.hi = np.array([np.inf if c.max is None else c.max for c in self.numeric])[:, None]
        # Per categorical column, the values that need no look (None: any but a null); a column
        # without a domain that may be null cannot warn: left out.
        self.categorical = [(c, None if c.categories is None else frozenset(c.categories + [None] * c.nullable))
                            for c in features if c.kind == "categorical"
                            and (c.categories is not None or not c.nullable)]
        # Date/times with a range (schemas since date ranges were recorded) or no nulls in training.
        self.times = [c for c in features if c.kind == "datetime"
                      and (c.min is not None or c.max is not None or not c.nullable)]

    def find(self, columns: Any) -> list[Warned]:
        """The warned values of conformed request rows (`Schema.conform_records`' arrays or the frame of
        `Schema.check(mode="request")`), sorted by row, then column."""
        found: list[Warned] = []
        if self.numeric:  # one block of every numeric column, compared with the ranges at once
            arrays = [columns[c.name] for c in self.numeric]
            block = np.concatenate(arrays, dtype=np.float64).reshape(len(arrays), -1)
            usual = block >= self.lo
            usual &= block <= self.hi  # NaN (a null) is unusual too: looked at below
            if not usual.all():
                for n in np.flatnonzero(~usual.all(axis=1)):
                    self._numbers(self.numeric[n], block[n], np.flatnonzero(~usual[n]), found)
        for col, usual_values in self.categorical:
            column = columns[col.name]
            values = (column.to_numpy(dtype=object, na_value=None) if isinstance(column, pd.Series)
                      else column).tolist()  # a list: Python iterates it several times faster than an array
            if usual_values.issuperset(values) if usual_values is not None else None not in set(values):
                continue
            position = self.position[col.name]
            for row, value in enumerate(values):
                if value is None:
                    if not col.nullable:
                        found.append(Warned(row, position, col.name, MISSING, None))
                elif usual_values is not None and value not in usual_values:
                    why = f"category {value!r} not seen in training"
                    found.append(Warned(row, position, col.name, why, value))
        for col in self.times:  # compared in seconds since the epoch, as the schema records the range
            times = pd.Series(columns[col.name])
            if not isinstance(times.dtype, pd.DatetimeTZDtype):  # conformed times are UTC already
                times = pd.to_datetime(times, utc=True, errors="coerce")
            seconds = epoch_seconds(times)
            lo = -np.inf if col.min is None else col.min
            hi = np.inf if col.max is None else col.max
            usual = (seconds >= lo) & (seconds <= hi)
            for row in np.flatnonzero(~usual).tolist():
                value = float(seconds[row])
                if value != value:
                    if not col.nullable:
                        found.append(Warned(row, self.position[col.name], col.name, MISSING, None))
                    continue
                side, bound = ("before the schema's earliest", lo) if value < lo else ("after the schema's latest", hi)
                why = f"date/time {_iso(value)} is {side} {_iso(bound)}"
                found.append(Warned(row, self.position[col.name], col.name, why, _iso(value)))
        if len(found) > 1:
            found.sort(key=lambda w: (w.row, w.position))
        return found

    def _numbers(self, col: ColumnSchema, values: np.ndarray, rows: np.ndarray, found: list[Warned]) -> None:
        position = self.position[col.name]
        for row in rows.tolist():
            value = float(values[row])
            if value != value:  # NaN: a null
                if not col.nullable:
                    found.append(Warned(row, position, col.name, MISSING, None))
            elif col.min is not None and value < col.min:
                why = f"value {value:.15g} is below the schema's minimum {col.min:.15g}"
                found.append(Warned(row, position, col.name, why, value))
            else:
                why = f"value {value:.15g} is above the schema's maximum {col.max:.15g}"
                found.append(Warned(row, position, col.name, why, value))


MISSING = "missing value in a column that had none in training"
STRICT = "(refused: strict checks are on)"


_ID_PREFIX = uuid.uuid4().hex[:16]  # per worker process; a counter makes each id unique within it
_id_counter = itertools.count()


def _new_prefix() -> None:
    """A forked child (gunicorn --preload, multiprocessing) must not reuse its parent's prefix: its ids
    would collide with the parent's and its siblings'."""
    global _ID_PREFIX, _id_counter
    _ID_PREFIX, _id_counter = uuid.uuid4().hex[:16], itertools.count()


os.register_at_fork(after_in_child=_new_prefix)


def id_prefix() -> str:
    """This process's prediction-id prefix (the `worker` of its rows in the prediction log)."""
    return _ID_PREFIX


def ids_for(n: int) -> list[str]:
    """Prediction ids: unique across workers and restarts, far cheaper than a uuid4 per row."""
    return [f"{_ID_PREFIX}{next(_id_counter):x}" for _ in range(n)]


# What the batcher reports of each model call: its answered rows (the service logs them) and their
# outputs (the service counts them in /metrics).
OnPredicted = Callable[[LogEntry, list[dict[str, Any]]], None]


class MicroBatcher:
    def __init__(self, max_rows: int = 1024, on_batch: Any = None, max_wait_s: float = 0.002,
                 on_queue: Any = None, on_predicted: OnPredicted | None = None, *, id_column: str | None = None,
                 count_call: CountCall | None = None, on_shadow: Callable[[LogEntry], None] | None = None,
                 on_shadow_drop: Callable[[int], None] | None = None):
        """Under a rollout (`trial`, set by the holder): `id_column` routes a canary's rows sticky per
        entity; `count_call` counts each model call (rollout_stats); `on_shadow(entry)` gets a shadow
        candidate's rows (in the event loop's thread), `on_shadow_drop(rows)` those it dropped."""
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
        self._warnings: tuple[TrainedModel, RowWarnings] | None = None  # of the latest model called
        self.trial: Trial | None = None  # the active rollout (serve/_rollout.py); None: production only
        self.id_column = id_column
        self.count_call = count_call or (lambda *_: None)
        self.on_shadow = on_shadow
        self.on_shadow_drop = on_shadow_drop
        self.shadow: Shadow | None = None  # started with the first shadowed call
        self._warnings_before: tuple[TrainedModel, RowWarnings] | None = None  # of the model called before it

    def _rules(self, model: TrainedModel) -> RowWarnings:
        if self._warnings is None or self._warnings[0] is not model:  # two kept: a canary alternates two models
            before = self._warnings_before
            self._warnings_before = self._warnings
            self._warnings = (before if before is not None and before[0] is model
                              else (model, RowWarnings(model.schema)))
        return self._warnings[1]

    def submit(self, model: TrainedModel, rows: Rows, started: float,
               strict: bool = False) -> "asyncio.Future[Outcome]":
        """Queue rows for the next model call; await the returned future for their outcome: outputs
        (with their ids) and the rows' warnings, or with `strict` errors (422 details) instead when any
        row has a warning. (A plain function returning the future, not a coroutine: one frame less to
        resume per request.)"""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run())
        job = _Job(model, rows, loop.create_future(), started, strict)
        self.queue.append(job)
        self._wakeup.set()
        return job.future

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def stop_shadow(self, timeout: float = 5.0) -> None:
        """Let the shadow worker score what is queued (up to `timeout`), then end it. Blocks."""
        if self.shadow is not None:
            self.shadow.stop(timeout)

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
        trial = self.trial  # None (no rollout): all a model call pays for rollouts
        if trial is None:
            self._call(jobs, jobs[0].model)
        elif trial.rollout.mode == "canary":
            self._canary(jobs, trial)
        else:
            self._shadowed(jobs, trial)

    def _canary(self, jobs: list[_Job], trial: Trial) -> None:
        """Split the rows between production and the candidate (`share` percent: by the row's id, else
        one draw per request), one model call each, and answer each request in its row order, every
        row naming the version that answered it.

        The candidate failing never fails a request. Not loaded, or its call raising: production
        answers all its rows (one failed call counted). A request it refuses (an invalid row for its
        schema, or a warning under strict checks): production answers the whole request, and the
        refusal counts as a failed call unless production refuses the request too (the client's
        input, not the candidate). A request is answered or refused whole, and its rows are logged
        only when it is answered: the candidate's log entry waits for production's answer to the other
        part of each split request."""
        production, rollout, candidate = jobs[0].model, trial.rollout, trial.candidate
        cut, column = rollout.share * (BUCKETS / 100), self.id_column
        theirs: list[_Job] = []  # production's: whole requests, then the other parts of split ones
        tried: list[_Tried] = []  # the candidate's: per request, a job of the rows routed to it
        for job in jobs:
            draw = None
            picks = []
            for record in job.rows.records:
                value = record.get(column) if column else None
                if value is None:
                    if draw is None:
                        draw = random.random() * BUCKETS < cut
                    picks.append(draw)
                else:
                    picks.append(bucket(value) < cut)
            if all(picks):  # a job of its own: the request is answered once the candidate's answer is good
                part = _Job(job.model, job.rows, _Part(), job.started, job.strict)  # type: ignore[arg-type]
                tried.append(_Tried(job, part))
            elif not any(picks):
                theirs.append(job)
            else:
                split = _Split.of(job, picks)
                tried.append(_Tried(job, split.parts[0][1], split))
        if not tried:
            self._counted(theirs, production, trial, tag=True)
            return
        rows = sum(len(t.part.rows.records) for t in tried)
        held: list[tuple[LogEntry, list[dict[str, Any]]]] = []  # the candidate's log entry, until settled
        if candidate is not None:
            try:
                self._call([t.part for t in tried], candidate, tag=True, held=held)
            except Exception as exc:
                log.debug("canary candidate v%s failed: %s", candidate.version, exc)
                candidate = None
        if candidate is None:  # not loaded, or raised: production answers every request whole
            self.count_call(rollout.id, rollout.candidate, rows, True)
            self._counted(theirs + [t.job for t in tried], production, trial, tag=True)
            return
        kept = [t for t in tried if not t.part.future.outcome.errors]  # answered by the candidate, in order
        back = [t for t in tried if t.part.future.outcome.errors]  # refused by it: production answers them
        for t in kept:
            if t.split is None:
                _resolve(t.job, t.part.future.outcome)
            else:
                theirs.append(t.split.parts[1][1])
        theirs += [t.job for t in back]
        try:
            if theirs:
                self._counted(theirs, production, trial, tag=True)
        finally:  # also when production's call raised: the requests the candidate answered whole stand
            failed = sum(len(t.part.rows.records) for t in back if not _refused(t.job))
            if rows > failed:
                self.count_call(rollout.id, candidate.version, rows - failed, False)
            if failed:
                self.count_call(rollout.id, candidate.version, failed, True)
            if held:
                self._release(held[0], kept)
        for t in kept:
            if t.split is not None:
                t.split.resolve()

    def _release(self, held: tuple[LogEntry, list[dict[str, Any]]], kept: list["_Tried"]) -> None:
        """Log the candidate's rows of the requests that were answered: `held` is its call's entry (the
        rows of `kept`, in order); a split request is answered when production answered its other part."""
        entry, outputs = held
        answered = [t.split is None or _answered(t.split.parts[1][1]) for t in kept]
        if all(answered):
            self.on_predicted(entry, outputs)
            return
        at = np.flatnonzero(np.repeat(answered, [len(t.part.rows.records) for t in kept]))
        if len(at):
            self.on_predicted(_rows_of(entry, at), [outputs[p] for p in at.tolist()])

    def _shadowed(self, jobs: list[_Job], trial: Trial) -> None:
        """Production answers; its answered rows (`sample` percent of them, by their prediction id) are
        then handed to the shadow worker, never waited for."""
        started = time.perf_counter()
        done = self._counted(jobs, jobs[0].model, trial)
        call_ms = (time.perf_counter() - started) * 1000
        if done is None:
            return
        ids, answered, latencies = done
        records = [r for job in jobs for r in job.rows.records]
        if answered is not None:
            records, ids = [records[p] for p in answered], [ids[p] for p in answered]
        lat = np.asarray(latencies, dtype=np.float64)
        sample = trial.rollout.sample
        if sample < 100:
            keep = [n for n, i in enumerate(ids) if bucket(i) < sample * (BUCKETS / 100)]
            if not keep:
                return
            records, ids, lat = [records[k] for k in keep], [ids[k] for k in keep], lat[keep]
        if self.shadow is None:
            loop = asyncio.get_running_loop()
            on_shadow = self.on_shadow
            put = ((lambda entry: loop.call_soon_threadsafe(on_shadow, entry)) if on_shadow
                   else (lambda entry: None))
            self.shadow = Shadow(self.count_call, put, self.on_shadow_drop)
        self.shadow.submit(ShadowJob(trial, records, ids, lat, call_ms))

    def _counted(self, jobs: list[_Job], model: TrainedModel, trial: Trial, tag: bool = False) -> Called | None:
        """`_call`, counted under the rollout."""
        rows = sum(len(job.rows.records) for job in jobs)
        try:
            done = self._call(jobs, model, tag)
        except Exception:
            self.count_call(trial.rollout.id, model.version, rows, True)
            raise
        self.count_call(trial.rollout.id, model.version, rows, False)
        return done

    def _call(self, jobs: list[_Job], model: TrainedModel, tag: bool = False,
              held: list[tuple[LogEntry, list[dict[str, Any]]]] | None = None) -> Called | None:
        """One call of `model` on the jobs' rows; resolves each job. Returns the call's prediction ids,
        the answered rows among them (None: all) and their latencies (ms); None when none was answered.
        `tag`: every output also names the model's version (a canary is on). `held`: the answered rows'
        log entry (and outputs) is appended to it instead of being logged (a canary logs them once
        each request's outcome is known)."""
        report = self.on_predicted
        if held is not None and report is not None:
            report = lambda entry, outputs: held.append((entry, outputs))  # noqa: E731
        records = [r for job in jobs for r in job.rows.records]
        # Well-formed rows take the shortcut; anything unusual goes through the schema's full check.
        columns = model.schema.conform_records(records) if model.fast is not None else None
        if columns is None:
            return self._process_checked(jobs, records, model, tag, report)
        codes: dict[str, Any] | None = {} if report else None  # the encoder's codes, for the log
        predictions = model.predict_conformed(columns, codes)
        ids = ids_for(len(records))
        outputs = predictions.records(ids)
        if tag:
            for output in outputs:
                output["model_version"] = model.version
        if self.on_batch:
            self.on_batch(len(records))
        answered, latencies = _settle(jobs, outputs, self._rules(model).find(columns))
        if answered is not None and not answered:
            return None
        if not report:
            return ids, answered, latencies
        entry = LogEntry(ids, time.time(), model.version, columns, predictions.labels, predictions.proba,
                         predictions.classes, latencies, codes)
        if answered is None:  # the common case: every row answered, logged as it is
            report(entry, outputs)
        else:  # some requests refused (strict): log the others' rows only
            report(_rows_of(entry, np.asarray(answered), latencies), [outputs[p] for p in answered])
        return ids, answered, latencies

    def _process_checked(self, jobs: list[_Job], records: list[dict[str, Any]], model: TrainedModel,
                         tag: bool, report: OnPredicted | None) -> Called | None:
        frame = pd.DataFrame.from_records(records, columns=model.schema.feature_names)
        checked = model.schema.check(frame, mode="request", coerce=True, per_value=True)  # clients apart
        bad = checked.bad_rows if checked.bad_rows is not None else np.zeros(len(frame), dtype=bool)
        outputs: list[dict[str, Any] | None] = [None] * len(frame)
        good = np.flatnonzero(~bad)
        predictions = None
        ids = ids_for(len(frame))
        if len(good):
            features = checked.frame if not bad.any() else checked.frame.iloc[good]
            predictions = model.predict_conformed(features)
            for position, output in zip(good, predictions.records([ids[p] for p in good])):
                if tag:
                    output["model_version"] = model.version
                outputs[position] = output
        if self.on_batch:
            self.on_batch(len(frame))

        def errors(job: _Job, start: int, end: int) -> list[dict[str, Any]] | None:
            # A request with a bad row is refused whole, naming each bad field.
            return _errors(checked.reasons, frame, job.rows, start, end) if bad[start:end].any() else None

        answered, latencies = _settle(jobs, outputs, self._rules(model).find(checked.frame), errors)
        if answered is None:
            answered = list(range(len(frame)))
        if not answered or predictions is None:
            return None
        if report:
            at = np.searchsorted(good, answered)  # the answered rows among the predicted ones
            report(LogEntry([ids[p] for p in answered], time.time(), model.version,
                            checked.frame.iloc[answered].reset_index(drop=True), predictions.labels[at],
                            None if predictions.proba is None else predictions.proba[at],
                            predictions.classes, latencies), [outputs[p] for p in answered])
        return ids, answered, latencies


# What a model call answered: its prediction ids, the answered rows among them (None: all), their
# latencies (ms).
Called = tuple[list[str], "list[int] | None", list[float]]


class _Part:
    """The future of one model's share of a request split between production and a canary candidate
    (not an asyncio future: resolved and read within one `_canary`)."""

    def __init__(self) -> None:
        self.outcome: Outcome | None = None

    def done(self) -> bool:
        return self.outcome is not None

    def set_result(self, outcome: Outcome) -> None:
        self.outcome = outcome


@dataclass
class _Split:
    """A request whose rows two models answer: each part a job of its rows, answered in row order."""

    job: _Job
    # (positions in the request, the job of those rows): the candidate's, then production's
    parts: list[tuple[list[int], _Job]]

    @classmethod
    def of(cls, job: _Job, picks: list[bool]) -> "_Split":
        parts = []
        for side in (True, False):
            at = [n for n, pick in enumerate(picks) if pick is side]
            rows = Rows([job.rows.records[n] for n in at], [job.rows.locs[n] for n in at])
            parts.append((at, _Job(job.model, rows, _Part(), job.started, job.strict)))  # type: ignore[arg-type]
        return cls(job, parts)

    def resolve(self) -> None:
        """Answer the request: both parts' outputs and warnings in its row order, or all their errors
        (then the request is refused as a whole, as any request with an invalid row)."""
        outputs: list[Any] = [None] * len(self.job.rows.records)
        errors: list[dict[str, Any]] = []
        warnings: list[dict[str, Any]] = []
        for at, part in self.parts:
            outcome = part.future.outcome
            errors += outcome.errors
            for position, output in zip(at, outcome.outputs):
                outputs[position] = output
            warnings += [w | {"row": at[w["row"]]} for w in outcome.warnings]
        if errors:
            _resolve(self.job, Outcome(errors=errors))
        else:
            warnings.sort(key=lambda w: w["row"])  # stable: each row's warnings stay in schema order
            _resolve(self.job, Outcome(outputs, warnings=warnings))


@dataclass
class _Tried:
    """A request routed (whole or in part) to a canary candidate: `part` is the job of the rows the
    candidate is called with (its own future: what the request gets is decided after); `split`, when
    production answers its other rows."""

    job: _Job
    part: _Job
    split: _Split | None = None


def _answered(job: _Job) -> bool:
    """A split part resolved with outputs (not refused, not left unanswered by a failed call)."""
    outcome = job.future.outcome  # type: ignore[attr-defined]
    return outcome is not None and not outcome.errors


def _refused(job: _Job) -> bool:
    """A request production refused (422: its own input), as opposed to answered, failed or left."""
    future = job.future
    return (future.done() and not future.cancelled() and future.exception() is None
            and bool(future.result().errors))


def _rows_of(entry: LogEntry, at: np.ndarray, latencies: list[float] | None = None) -> LogEntry:
    """The rows `at` (positions, in order) of a log entry; with `latencies`, those are theirs (else
    the entry's own, taken at `at`)."""
    features = (entry.features.iloc[at].reset_index(drop=True) if isinstance(entry.features, pd.DataFrame)
                else {name: values[at] for name, values in entry.features.items()})
    codes = (None if entry.codes is None else
             {name: (found[at], vocabulary) for name, (found, vocabulary) in entry.codes.items()})
    if latencies is None:
        latencies = [entry.latencies_ms[p] for p in at.tolist()]
    return LogEntry([entry.ids[p] for p in at.tolist()], entry.created_at, entry.model_version, features,
                    entry.labels[at], None if entry.proba is None else entry.proba[at], entry.classes,
                    latencies, codes, entry.rollout)


ErrorsOf = Callable[[_Job, int, int], "list[dict[str, Any]] | None"]


def _settle(jobs: list[_Job], outputs: list[Any], found: list[Warned],
            errors_of: ErrorsOf | None = None) -> tuple[list[int] | None, list[float]]:
    """Resolve each job of a model call, whose rows are `start:end` of the call: refused (422) with
    `errors_of`'s errors, or with its rows' warnings when it is strict and has some; else answered with
    its outputs and warnings. Returns the answered rows (None: all of them) and their latencies (ms)."""
    start, now, latencies, answered, refused, at = 0, time.perf_counter(), [], [], False, 0
    for job in jobs:
        end = start + len(job.rows.records)
        first = at
        while at < len(found) and found[at].row < end:
            at += 1
        mine = found[first:at]
        errors = errors_of(job, start, end) if errors_of is not None else None
        if not errors and job.strict and mine:
            errors = [{"loc": job.rows.locs[w.row - start] + [w.column], "msg": f"{w.why} {STRICT}",
                       "input": jsonable(job.rows.records[w.row - start].get(w.column))}  # as it was sent
                      for w in mine]
        if errors:
            _resolve(job, Outcome(errors=errors))
            refused = True
        else:
            warnings = [{"row": w.row - start, "column": w.column, "why": w.why} for w in mine]
            _resolve(job, Outcome(outputs[start:end], warnings=warnings))
            latencies += [(now - job.started) * 1000] * (end - start)
            answered += range(start, end)
        start = end
    return (answered if refused else None), latencies


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
