"""Hot swap: follow the production alias, load and verify the new model off the request path, swap atomically.

Every replica of a service follows the alias in the shared store on its own, so replicas on several
machines swap within `serving.reload_seconds` of a promotion made anywhere. A model that cannot be
loaded because the store cannot be reached (object storage or the database down, a share not
mounted) is tried again, with a growing wait; a model that is itself broken is refused until the
alias moves to it again.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import pandas as pd
import sqlalchemy as sa

from everloop.errors import IntegrityError, NotFoundError, StoreError
from everloop.registry import PRODUCTION, alias_version, eval_frame, get_model
from everloop.serve._compiled import compile_model
from everloop.store import Store
from everloop.train import TrainedModel, load_artifact

log = logging.getLogger("everloop.serve")

RETRY_SECONDS = (1.0, 60.0)  # first and longest wait before loading a version again after an outage


class ModelHolder:
    """Holds the serving model. A request reads `.current` once and finishes on that model,
    so a swap never changes the model under a request in flight."""

    def __init__(self, store: Store, alias: str = PRODUCTION, on_swap: Callable[[TrainedModel], None] | None = None,
                 on_failure: Callable[[int, Exception], None] | None = None, compile_trees: bool = True,
                 on_check: Callable[[int | None], None] | None = None):
        """`on_swap(model)` after a swap; `on_failure(version, error)` once per version that fails to
        load; `on_check(version)` after every successful read of the alias (None: the alias is unset)."""
        self.store = store
        self.compile_trees = compile_trees
        self.alias = alias
        self.current: TrainedModel | None = None
        self.last_error: str | None = None  # why the alias's version is not served: "model vN refused: why"
        self.alias_version: int | None = None  # what the alias named at the last check
        self.checked_at: float | None = None  # unix time of the last successful read of the alias
        self.loaded_at: float | None = None  # unix time `current` was swapped in
        self._refused: dict[int, str] = {}  # version -> why: tried once per move of the alias to it, reason kept
        self._retry: dict[int, tuple[float, float]] = {}  # version -> (monotonic time of the next try, wait)
        self._on_swap = on_swap
        self._on_failure = on_failure
        self._on_check = on_check
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def retrying(self) -> bool:
        """The alias's version could not be loaded because the store could not be reached, and will
        be tried again."""
        return self.alias_version in self._retry

    def refresh(self, force: bool = False) -> bool:
        """Load the alias's version if it changed; True when a swap happened. A version whose load
        failed because the store could not be reached is tried again once its wait is over, or at
        once with `force`; a version refused as broken is tried again only when the alias moves to it
        anew. Raises what reading the alias raises (the database cannot be reached)."""
        with self._lock:  # one loader at a time; requests never take this lock
            target = alias_version(self.store, self.alias)
            if target != self.alias_version:  # a new move of the alias: a refused version promoted again
                self._refused.pop(target, None)  # is tried again (the store may have been repaired since)
            self.alias_version, self.checked_at = target, time.time()
            if self._on_check:
                self._on_check(target)
            if target is None:
                return False
            if self.current is not None and self.current.version == target:
                self.last_error = None  # the alias is back on the model being served
                return False
            if target in self._refused:
                self.last_error = self._refused[target]  # the alias came back to a refused version
                return False
            retry = self._retry.get(target)
            if retry is not None and not force and time.monotonic() < retry[0]:
                return False
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
            self._retry.pop(target, None)
            self.current, self.loaded_at = model, time.time()
            self.last_error = None
            if self._on_swap:
                self._on_swap(model)
            log.info("serving model v%s", target)
            if self.compile_trees and model.fast is not None:
                threading.Thread(target=compile_model, args=(model, probe, self.store.root / "compiled"),
                                 name="everloop-compile", daemon=True).start()
            return True

    def _wait(self, target: int, retry: tuple[float, float] | None, exc: Exception) -> bool:
        """The store could not be reached: try `target` again later, waiting longer each time."""
        if retry is None and self._on_failure:
            self._on_failure(target, exc)
        wait = min(2 * retry[1], RETRY_SECONDS[1]) if retry else RETRY_SECONDS[0]
        self._retry[target] = (time.monotonic() + wait, wait)
        self.last_error = f"model v{target} not loaded yet: {exc}; trying again in {wait:g}s"
        (log.warning if retry is None else log.debug)(self.last_error)  # once per version, not per try
        return False

    def _refuse(self, target: int, retry: tuple[float, float] | None, exc: Exception) -> bool:
        """`target` is broken: never tried again (a broken model must never replace a working one)."""
        if retry is None and self._on_failure:  # a version that waited was counted then
            self._on_failure(target, exc)
        self._retry.pop(target, None)
        self.last_error = self._refused[target] = f"model v{target} refused: {exc}"
        log.error(self.last_error)
        return False

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
