"""Tree ensembles compiled to native code for serving (Treelite imports the model, TL2cgen compiles it).

scikit-learn's HistGradientBoosting walks its trees one Python call per tree: ~0.85 ms for 200 trees
even on 8 rows, most of a micro-batch's cost. The same ensemble compiled to C answers 8 rows in
~25 us. Compiling takes seconds (a C compiler runs), so the service starts on scikit-learn and the
compiled predictor takes over in the background, only once it has answered a probe of real rows
within `TOLERANCE` of scikit-learn's own outputs. The shared library is cached beside the store,
keyed by the imported model's bytes, the machine and the compiler settings; anything that fails (no
compiler, an unsupported model, a mismatch) leaves the model on scikit-learn, which is always correct.

Loading a shared library runs its code, so a cached one is loaded only when its sha256 is the one the
process that built it recorded in the store's metadata (`compiled_libraries`); any other file under its
name (planted, truncated, from an older everloop) is deleted and built again. The verified bytes are
loaded from a private copy, so the file cannot be swapped between the check and the load.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from everloop.errors import IntegrityError
from everloop.store import Store

log = logging.getLogger("everloop.serve")

TOLERANCE = 1e-9  # summing 200 trees in another order moves probabilities by ~1e-15


class CompiledTrees:
    """`predict_proba` / `predict` of a fitted tree ensemble, through a compiled shared library."""

    def __init__(self, library: Path, classification: bool, n_classes: int, nthread: int = 1,
                 sha256: str | None = None):
        """Load `library`; with `sha256`, only if its bytes have that hash (else IntegrityError), and
        from a private copy of the bytes checked. Without it the caller vouches for the file (it wrote
        it itself)."""
        import tl2cgen

        self.library = library  # the shared library's file (a batch job on Ray ships its bytes)
        self.sha256 = sha256
        self._dmatrix = tl2cgen.DMatrix
        if sha256 is None:
            self._predictor = tl2cgen.Predictor(str(library), nthread=nthread)
        else:
            data = library.read_bytes()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise IntegrityError(f"compiled library {library} does not have the sha256 recorded when it "
                                     "was built; not loaded", digest=sha256)
            fd, private = tempfile.mkstemp(prefix="everloop-trees-", suffix=".so")  # mode 0600
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                self._predictor = tl2cgen.Predictor(private, nthread=nthread)
            finally:
                os.unlink(private)  # loaded: the library stays mapped without its file
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
                  nthread: int = 1, store: Store | None = None,
                  version: int | None = None) -> CompiledTrees | None:
    """The estimator compiled, if it is a tree ensemble Treelite can import and the compiled library
    answers `probe` (encoded rows) as the estimator does; else None (and why, in the log). `nthread`:
    threads per call (1 for the service, whose workers share the cores; all of them for a batch job).
    `store`: where the library's hash is recorded (with model `version`) and checked before a cached
    library is loaded; without one, a cached library is never trusted: it is built again."""
    try:
        import tl2cgen  # noqa: F401  (installed with everloop; a broken install only means scikit-learn serves)

        model = _import(estimator)
        if model is None:
            return None
        expected = estimator.predict_proba(probe) if classification else estimator.predict(probe)
        n_classes = expected.shape[1] if classification else 1
        library, digest = _build(model, cache, store, version)
        compiled = CompiledTrees(library, classification, n_classes, nthread, sha256=digest)
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


def _build(model: Any, cache: Path, store: Store | None, version: int | None) -> tuple[Path, str]:
    """Compile once per model and machine: concurrent workers wait on a lock for the first one's library.
    Returns the library's path and sha256: a cached library's when it matches the hash recorded in
    `store`, else one built now (and recorded)."""
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
        if library.exists():
            digest = _sha256(library)
            if store is not None and digest == _recorded(store, library.name):
                return library, digest
            if store is not None:
                log.warning("compiled library %s does not have the sha256 recorded when it was built (or "
                            "none was recorded); not loaded: deleting it and compiling again", library)
            library.unlink()
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = Path(tmp) / library.name
            tl2cgen.export_lib(model, toolchain=_toolchain(), libpath=str(built), nthread=1, params=params)
            digest = _sha256(built)
            if store is not None:  # recorded first: a kill before the rename leaves no unrecorded file
                _record(store, library.name, digest, version)
            os.replace(built, library)  # whole or absent, also if this process dies mid-build
    return library, digest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recorded(store: Store, key: str) -> str | None:
    """The sha256 recorded for the cache file named `key`, or None."""
    table = store.tables.compiled_libraries
    with store.engine.connect() as conn:
        return conn.execute(sa.select(table.c.sha256).where(table.c.key == key)).scalar()


def _record(store: Store, key: str, digest: str, version: int | None) -> None:
    """Record (or replace) the sha256 of the cache file named `key`."""
    table = store.tables.compiled_libraries
    values = {"sha256": digest, "model_version": version, "created_at": time.time()}
    try:
        with store.engine.begin() as conn:
            if not conn.execute(table.update().where(table.c.key == key).values(**values)).rowcount:
                conn.execute(table.insert().values(key=key, **values))
    except sa.exc.IntegrityError:  # another machine sharing the database inserted it first: ours wins
        with store.engine.begin() as conn:
            conn.execute(table.update().where(table.c.key == key).values(**values))


def compile_model(model: Any, probe: Any, store: Store | Path, nthread: int = 1) -> bool:
    """Compile `model`'s (a TrainedModel's) trees checked on `probe` (its evaluation rows) and, once they
    match scikit-learn, use them: one attribute write, so a service's next micro-batch picks them up
    (it calls this off the request path) and a batch job's next chunk. True when compiled.
    `store`: the library is cached in its `compiled/` folder, its hash recorded in its metadata. A
    bare cache folder (no store to check a cached library against) builds the library every time."""
    cache, checked = (store.root / "compiled", store) if isinstance(store, Store) else (Path(store), None)
    compiled = compile_trees(model.pipeline.named_steps["model"], model.task == "classification",
                             model.probe_encoded(probe), cache, nthread, checked, model.version)
    if compiled is None:
        return False
    model.compiled = compiled
    log.info("model v%s: serving its compiled trees", model.version)
    return True
