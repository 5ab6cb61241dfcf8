"""Hot swap: follow the production alias, load and verify the new model off the request path, swap atomically.

Every replica of a service follows the alias in the shared store on its own, so replicas on several
machines swap within `serving.reload_seconds` of a promotion made anywhere. A version that cannot be
loaded, because the store cannot be reached (object storage or the database down, a share not
mounted) or because its files are broken (a changed or half-restored artifact), is tried again with
a growing wait (1 s doubling to 60 s; reset when it loads or the alias moves) while the model before
it keeps serving: a short outage or a repaired artifact is picked up without a restart, and a broken
model never replaces a working one.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import pandas as pd
import sqlalchemy as sa

from everloop.errors import IntegrityError, NotFoundError, StoreError
from everloop.registry import PRODUCTION, Rollout, active_rollout, alias_version, eval_frame, get_model
from everloop.serve._compiled import compile_model
from everloop.serve._rollout import Trial
from everloop.store import Store
from everloop.train import TrainedModel, load_artifact

log = logging.getLogger("everloop.serve")

RETRY_SECONDS = (1.0, 60.0)  # first and longest wait before loading a version again after a failure


class ModelHolder:
    """Holds the serving model. A request reads `.current` once and finishes on that model,
    so a swap never changes the model under a request in flight."""

    def __init__(self, store: Store, alias: str = PRODUCTION, on_swap: Callable[[TrainedModel], None] | None = None,
                 on_failure: Callable[[int, Exception], None] | None = None, compile_trees: bool = True,
                 on_check: Callable[[int | None], None] | None = None,
                 on_trial: Callable[[Trial | None], None] | None = None):
        """`on_swap(model)` after a swap; `on_failure(version, error)` once per version that fails to
        load; `on_check(version)` after every successful read of the alias (None: the alias is unset);
        `on_trial(trial)` when the active rollout as served changes (None: no rollout)."""
        self.store = store
        self.compile_trees = compile_trees
        self.alias = alias
        self.current: TrainedModel | None = None
        self.last_error: str | None = None  # why the alias's version is not served: "model vN refused: why"
        self.alias_version: int | None = None  # what the alias named at the last check
        self.checked_at: float | None = None  # unix time of the last successful read of the alias
        self.loaded_at: float | None = None  # unix time `current` was swapped in
        self._refused: set[int] = set()  # failed versions whose files are broken (not unreachable)
        self._retry: dict[int, tuple[float, float]] = {}  # failed version -> (monotonic next try, wait)
        self._on_swap = on_swap
        self._on_failure = on_failure
        self._on_check = on_check
        self._on_trial = on_trial
        self.trial: Trial | None = None  # the active rollout and its candidate (serve/_rollout.py)
        self._candidate_retry: tuple[int, float, float] | None = None  # (rollout, monotonic next try, wait)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def retrying(self) -> bool:
        """The alias's version could not be loaded because the store could not be reached (no model
        is at fault), and will be tried again."""
        return self.alias_version in self._retry and self.alias_version not in self._refused

    @property
    def refused(self) -> int | None:
        """The version the alias names that was refused as broken (and is tried again), else None."""
        return self.alias_version if self.alias_version in self._refused else None

    @property
    def rollout(self) -> Rollout | None:
        """The active rollout this replica follows (None: none)."""
        return self.trial.rollout if self.trial is not None else None

    @property
    def candidate(self) -> TrainedModel | None:
        """The active rollout's candidate, once loaded."""
        return self.trial.candidate if self.trial is not None else None

    def refresh(self, force: bool = False) -> bool:
        """Load the alias's version if it changed; True when a swap happened. A version whose load
        failed (the store could not be reached, or its files are broken) is tried again once its
        wait is over, or at once with `force`; until it loads, `last_error` says why and when.
        Then follow the active rollout (`trial`). Raises what reading the alias or the rollout raises
        (the database cannot be reached)."""
        with self._lock:  # one loader at a time; requests never take this lock
            swapped = self._refresh(force)
            self._follow(force)
            return swapped

    def _follow(self, force: bool) -> None:
        """Load the active rollout's candidate beside production as production is loaded; drop it when
        no rollout is active. A candidate that fails to load is tried again (1 s doubling to 60 s) and
        meanwhile never served: the batcher counts its calls as failed (the loop rolls it back)."""
        rollout = active_rollout(self.store)
        trial = self.trial
        if rollout is None:
            if trial is not None:
                log.info("rollout %s is over: serving production only", trial.rollout.id)
                self._set_trial(None)
            self._candidate_retry = None
            return
        if trial is not None and trial.rollout.id == rollout.id and trial.candidate is not None:
            if trial.rollout != rollout:  # stepped: a new share
                self._set_trial(Trial(rollout, trial.candidate))
            return
        retry = self._candidate_retry
        if (retry is not None and retry[0] == rollout.id and not force and time.monotonic() < retry[1]
                and trial is not None):
            if trial.rollout != rollout:
                self._set_trial(Trial(rollout, None, trial.error))
            return
        try:
            model, probe = self._load(rollout.candidate)
        except Exception as exc:
            wait = min(2 * retry[2], RETRY_SECONDS[1]) if retry and retry[0] == rollout.id else RETRY_SECONDS[0]
            self._candidate_retry = (rollout.id, time.monotonic() + wait, wait)
            error = f"candidate model v{rollout.candidate} not loaded: {exc}; trying again in {wait:g}s"
            if trial is None or trial.error is None or trial.rollout.id != rollout.id:
                log.error("rollout %s: %s", rollout.id, error)  # once per rollout, not per try
            self._set_trial(Trial(rollout, None, error))
            return
        self._candidate_retry = None
        log.info("rollout %s: %s candidate model v%s loaded", rollout.id, rollout.mode, model.version)
        self._set_trial(Trial(rollout, model))
        self._compile(model, probe)

    def _set_trial(self, trial: Trial | None) -> None:
        self.trial = trial
        if self._on_trial:
            self._on_trial(trial)

    def _load(self, version: int) -> tuple[TrainedModel, pd.DataFrame]:
        """Model `version` loaded from verified files, warmed and its fast path checked: (model, the
        probe rows checked). Raises what fails (see `_unreachable`)."""
        mv = get_model(self.store, version)
        for digest in (mv.artifact, mv.manifest["eval_artifact"]):
            self.store.artifacts.open(digest)
        model = load_artifact(self.store, mv.artifact, mv.manifest, mv.version)
        _warm(model)
        probe = eval_frame(self.store, model.manifest).head(200)
        model.check_fast_path(probe)
        return model, probe

    def _compile(self, model: TrainedModel, probe: pd.DataFrame) -> None:
        """Compile the trees off the request path (the model serves meanwhile)."""
        if self.compile_trees and model.fast is not None:
            threading.Thread(target=compile_model, args=(model, probe, self.store),
                             name="everloop-compile", daemon=True).start()

    def _refresh(self, force: bool) -> bool:
        """The alias part of `refresh`."""
        target = alias_version(self.store, self.alias)
        if target != self.alias_version:  # a new move of the alias: a version that failed before
            self._refused.discard(target)  # is tried at once (the store may have been repaired)
            self._retry.pop(target, None)
        self.alias_version, self.checked_at = target, time.time()
        if self._on_check:
            self._on_check(target)
        if target is None:
            return False
        if self.current is not None and self.current.version == target:
            self.last_error = None  # the alias is back on the model being served
            return False
        retry = self._retry.get(target)
        if retry is not None and not force and time.monotonic() < retry[0]:
            return False
        trial = self.trial
        if trial is not None and trial.candidate is not None and trial.candidate.version == target:
            # The rollout's candidate was promoted: it is loaded, verified and warm already.
            return self._swap(trial.candidate)
        try:  # first its files into the local cache: this is where an outage of the store shows
            mv = get_model(self.store, target)
            for digest in (mv.artifact, mv.manifest["eval_artifact"]):
                self.store.artifacts.open(digest)
        except Exception as exc:
            return self._wait(target, retry, exc) if _unreachable(exc) else self._refuse(target, retry, exc)
        try:  # then from the verified local copies
            model = load_artifact(self.store, mv.artifact, mv.manifest, mv.version)
            _warm(model)
            probe = eval_frame(self.store, model.manifest).head(200)
            model.check_fast_path(probe)
        except Exception as exc:
            return self._refuse(target, retry, exc)
        self._swap(model)
        self._compile(model, probe)
        return True

    def _swap(self, model: TrainedModel) -> bool:
        self._retry.pop(model.version, None)  # loaded: the next failure waits 1 s again
        self._refused.discard(model.version)
        self.current, self.loaded_at = model, time.time()
        self.last_error = None
        if self._on_swap:
            self._on_swap(model)
        log.info("serving model v%s", model.version)
        return True

    def _wait(self, target: int, retry: tuple[float, float] | None, exc: Exception) -> bool:
        """The store could not be reached: try `target` again later, waiting longer each time."""
        self._refused.discard(target)
        wait = self._again(target, retry, exc)
        self.last_error = f"model v{target} not loaded yet: {exc}; trying again in {wait:g}s"
        (log.warning if retry is None else log.debug)(self.last_error)  # once per version, not per try
        return False

    def _refuse(self, target: int, retry: tuple[float, float] | None, exc: Exception) -> bool:
        """`target` is broken: keep the model being served, and try again later (its files may be
        restored), waiting longer each time."""
        wait = self._again(target, retry, exc)
        self._refused.add(target)
        self.last_error = f"model v{target} refused: {exc}; trying again in {wait:g}s"
        (log.error if retry is None else log.debug)(self.last_error)  # once per version, not per try
        return False

    def _again(self, target: int, retry: tuple[float, float] | None, exc: Exception) -> float:
        """Count a version's first failure, schedule its next try; returns the wait in seconds."""
        if retry is None and self._on_failure:
            self._on_failure(target, exc)
        wait = min(2 * retry[1], RETRY_SECONDS[1]) if retry else RETRY_SECONDS[0]
        self._retry[target] = (time.monotonic() + wait, wait)
        return wait

    def start(self, interval: float) -> None:
        """Check the alias every `interval` seconds in a daemon thread until `stop()`."""
        def run() -> None:
            failing = False
            while not self._stop.wait(interval):
                try:
                    self.refresh()
                except Exception as exc:  # a store hiccup must not kill the watcher
                    # once per outage, not every interval; /metrics shows how old the last check is
                    (log.debug if failing else log.warning)("alias check failed: %s", exc)
                    failing = True
                else:
                    if failing:
                        log.warning("alias check works again")
                    failing = False

        self._thread = threading.Thread(target=run, name="everloop-model-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def _unreachable(exc: Exception) -> bool:
    """Did fetching a model's files fail because the store could not be reached (and may work later)?
    A changed artifact (IntegrityError) is broken instead."""
    if isinstance(exc, IntegrityError):
        return False
    return isinstance(exc, (StoreError, NotFoundError, sa.exc.OperationalError, sa.exc.InterfaceError, OSError))


def _warm(model: TrainedModel) -> None:
    """Predict one row built from the schema's own values (`Schema.example_row`: a value of each column's
    kind, as a request would send it, through the same checks), so the first real request pays no
    lazy-initialisation cost and a model that cannot predict is caught before it serves."""
    model.predict(pd.DataFrame([model.schema.example_row()]))
