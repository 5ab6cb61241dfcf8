"""Hot swap: follow the production alias, load and verify the new model off the request path, swap atomically."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

import pandas as pd

from everloop.errors import EverloopError
from everloop.registry import PRODUCTION, alias_version, eval_frame, load_model
from everloop.serve._compiled import compile_trees
from everloop.store import Store
from everloop.train import TrainedModel

log = logging.getLogger("everloop.serve")


class ModelHolder:
    """Holds the serving model. A request reads `.current` once and finishes on that model,
    so a swap never changes the model under a request in flight."""

    def __init__(self, store: Store, alias: str = PRODUCTION, on_swap: Callable[[TrainedModel], None] | None = None,
                 on_failure: Callable[[int, Exception], None] | None = None, compile_trees: bool = True):
        self.store = store
        self.compile_trees = compile_trees
        self.alias = alias
        self.current: TrainedModel | None = None
        self.last_error: str | None = None
        self._refused: set[int] = set()
        self._on_swap = on_swap
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Load the alias's version if it changed; True when a swap happened."""
        with self._lock:  # one loader at a time; requests never take this lock
            target = alias_version(self.store, self.alias)
            if target is None or (self.current is not None and self.current.version == target):
                return False
            if target in self._refused:
                return False
            try:
                model = load_model(self.store, target)
                _warm(model)
                probe = eval_frame(self.store, model.manifest).head(200)
                model.check_fast_path(probe)
            except (EverloopError, Exception) as exc:  # a broken model must never replace a working one
                self._refused.add(target)
                self.last_error = f"model v{target} refused: {exc}"
                log.error(self.last_error)
                if self._on_failure:
                    self._on_failure(target, exc)
                return False
            self.current = model
            self.last_error = None
            if self._on_swap:
                self._on_swap(model)
            log.info("serving model v%s", target)
            if self.compile_trees and model.fast is not None:
                threading.Thread(target=_compile, args=(model, probe, self.store.root / "compiled"),
                                 name="everloop-compile", daemon=True).start()
            return True

    def start(self, interval: float) -> None:
        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.refresh()
                except Exception as exc:  # a store hiccup must not kill the watcher
                    log.warning("alias check failed: %s", exc)

        self._thread = threading.Thread(target=run, name="everloop-model-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def _compile(model: TrainedModel, probe: pd.DataFrame, cache: Path) -> None:
    """Off the request path: compile the model's trees and, once they match scikit-learn, serve them."""
    compiled = compile_trees(model.pipeline.named_steps["model"], model.task == "classification",
                             model.probe_encoded(probe), cache)
    if compiled is not None:
        model.compiled = compiled  # one attribute write: the next micro-batch picks it up
        log.info("model v%s: serving its compiled trees", model.version)


def _warm(model: TrainedModel) -> None:
    """Predict one synthetic row, so the first real request pays no lazy-initialisation cost
    and a model that cannot predict is caught before it serves."""
    row = {}
    for col in model.schema.features:
        if col.kind == "numeric":
            lo, hi = col.min or 0.0, col.max if col.max is not None else (col.min or 0.0)
            row[col.name] = (lo + hi) / 2
        else:
            row[col.name] = col.categories[0] if col.categories else "x"
    model.predict(pd.DataFrame([row]))
