"""Tree ensembles compiled to native code for serving (Treelite imports the model, TL2cgen compiles it).

scikit-learn's HistGradientBoosting walks its trees one Python call per tree: ~0.85 ms for 200 trees
even on 8 rows, most of a micro-batch's cost. The same ensemble compiled to C answers 8 rows in
~25 us. Compiling takes seconds (a C compiler runs), so the service starts on scikit-learn and the
compiled predictor takes over in the background, only once it has answered a probe of real rows
within `TOLERANCE` of scikit-learn's own outputs. The shared library is cached beside the store,
keyed by the imported model's bytes, the machine and the compiler settings; anything that fails (no
compiler, an unsupported model, a mismatch) leaves the model on scikit-learn, which is always correct.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("everloop.serve")

TOLERANCE = 1e-9  # summing 200 trees in another order moves probabilities by ~1e-15


class CompiledTrees:
    """`predict_proba` / `predict` of a fitted tree ensemble, through a compiled shared library."""

    def __init__(self, library: Path, classification: bool, n_classes: int, nthread: int = 1):
        import tl2cgen

        self.library = library  # the shared library's file (a batch job on Ray ships its bytes)
        self._dmatrix = tl2cgen.DMatrix
        self._predictor = tl2cgen.Predictor(str(library), nthread=nthread)
        self.classification = classification
        self.n_classes = n_classes

    def __call__(self, encoded: np.ndarray) -> np.ndarray:
        out = self._predictor.predict(self._dmatrix(np.ascontiguousarray(encoded, dtype=np.float64),
                                                    dtype="float64"))
        out = out.reshape(len(encoded), -1)
        if not self.classification:
            return out[:, 0]
        if out.shape[1] == 1 and self.n_classes == 2:  # binary models answer P(class 1) only
            return np.column_stack([1.0 - out[:, 0], out[:, 0]])
        return out


def compile_trees(estimator: Any, classification: bool, probe: np.ndarray, cache: Path,
                  nthread: int = 1) -> CompiledTrees | None:
    """The estimator compiled, if it is a tree ensemble Treelite can import and the compiled library
    answers `probe` (encoded rows) as the estimator does; else None (and why, in the log). `nthread`:
    threads per call (1 for the service, whose workers share the cores; all of them for a batch job)."""
    try:
        import tl2cgen  # noqa: F401  (installed with everloop; a broken install only means scikit-learn serves)

        model = _import(estimator)
        if model is None:
            return None
        expected = estimator.predict_proba(probe) if classification else estimator.predict(probe)
        n_classes = expected.shape[1] if classification else 1
        library = _build(model, cache)
        compiled = CompiledTrees(library, classification, n_classes, nthread)
        got = compiled(probe)
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=0, atol=TOLERANCE):
            log.warning("the compiled %s does not match scikit-learn on the probe rows; keeping scikit-learn",
                        type(estimator).__name__)
            return None
        if classification and not np.array_equal(got.argmax(axis=1), expected.argmax(axis=1)):
            return None
        return compiled
    except Exception as exc:  # no compiler, an unsupported tree type, a full disk: scikit-learn serves
        log.warning("tree ensemble not compiled (%s: %s); scikit-learn serves it", type(exc).__name__, exc)
        return None


def _import(estimator: Any) -> Any:
    """The Treelite model of a scikit-learn, LightGBM or XGBoost tree ensemble; None for anything else."""
    import treelite

    module = type(estimator).__module__
    if module.startswith("lightgbm"):
        return treelite.frontend.from_lightgbm(estimator.booster_)
    if module.startswith("xgboost"):
        return treelite.frontend.from_xgboost(estimator.get_booster())
    if module.startswith("sklearn.ensemble"):
        try:
            return treelite.sklearn.import_model(estimator)
        except Exception:  # not a tree ensemble (a voting or stacking ensemble, say)
            return None
    return None


def _toolchain() -> str:
    for name in ("gcc", "clang"):
        if shutil.which(name):
            return name
    raise RuntimeError("no C compiler (gcc or clang) on the PATH")


def _build(model: Any, cache: Path) -> Path:
    """Compile once per model and machine: concurrent workers wait on a lock for the first one's library."""
    import tl2cgen

    checkpoint = model.serialize_bytes()
    params = {"quantize": 1,  # thresholds as integer indices: ~15% faster, the same answers
              "parallel_comp": max(1, min(8, model.num_tree // 50))}
    key = hashlib.sha256(checkpoint + platform.machine().encode() + tl2cgen.__version__.encode()
                         + repr(sorted(params.items())).encode()).hexdigest()[:32]
    cache.mkdir(parents=True, exist_ok=True)
    library = cache / f"{key}.so"
    with open(cache / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not library.exists():
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                built = Path(tmp) / library.name
                tl2cgen.export_lib(model, toolchain=_toolchain(), libpath=str(built), nthread=1, params=params)
                os.replace(built, library)  # whole or absent, also if this process dies mid-build
    return library


def compile_model(model: Any, probe: Any, cache: Path, nthread: int = 1) -> bool:
    """Compile `model`'s (a TrainedModel's) trees checked on `probe` (its evaluation rows) and, once they
    match scikit-learn, use them: one attribute write, so a service's next micro-batch picks them up
    (it calls this off the request path) and a batch job's next chunk. True when compiled."""
    compiled = compile_trees(model.pipeline.named_steps["model"], model.task == "classification",
                             model.probe_encoded(probe), cache, nthread)
    if compiled is None:
        return False
    model.compiled = compiled
    log.info("model v%s: serving its compiled trees", model.version)
    return True
