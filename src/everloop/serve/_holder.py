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
        self.last_error: str | None = None  # why the alias's version is not served: "model vN refused: why"
        self._refused: dict[int, str] = {}  # version -> why, so a version is tried once and its reason kept
        self._on_swap = on_swap
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Load the alias's version if it changed; True when a swap happened."""
        with self._lock:  # one loader at a time; requests never take this lock
            target = alias_version(self.store, self.alias)
            if target is None:
                return False
            if self.current is not None and self.current.version == target:
                self.last_error = None  # the alias is back on the model being served
                return False
            if target in self._refused:
                self.last_error = self._refused[target]  # the alias came back to a refused version
                return False
            try:
                model = load_model(self.store, target)
                _warm(model)
                probe = eval_frame(self.store, model.manifest).head(200)
                model.check_fast_path(probe)
            except (EverloopError, Exception) as exc:  # a broken model must never replace a working one
                self.last_error = self._refused[target] = f"model v{target} refused: {exc}"
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
    """Predict one row built from the schema's own values (`Schema.example_row`: a value of each column's
    kind, as a request would send it, through the same checks), so the first real request pays no
    lazy-initialisation cost and a model that cannot predict is caught before it serves."""
    model.predict(pd.DataFrame([model.schema.example_row()]))
