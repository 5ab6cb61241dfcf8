"""everloop: keep a production ML model healthy for its whole life, in one tool.

The Python API is one subpackage per stage of the loop; the CLI and the HTTP service are thin
layers over it::

    from everloop import data, train, registry
    from everloop.spec import load_spec
    from everloop.store import Store

    spec, store = load_spec("."), Store.for_project(".")
    dataset = data.ingest(store, spec)                  # validate and version the data
    result = train.train(store, spec, dataset.version)  # fit, evaluate against a trivial baseline
    registry.promote(store, spec, result.version)       # through the gate, to production
    model = registry.load_model(store, "production")    # the one artifact every stage uses
    model.predict(frame)

Stages: spec, store, data, features, train, registry, serve, batch, monitor, loop (and demo).
Every error everloop raises on purpose derives from `everloop.errors.EverloopError`.
"""

from importlib.metadata import PackageNotFoundError, version

from everloop.errors import EverloopError

try:
    __version__ = version("everloop")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["EverloopError", "__version__"]
