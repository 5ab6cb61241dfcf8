"""Batch scoring on Ray Data (`everloop predict --engine ray`): the same chunks, the same scorer, the same
output as the local engine, with the scoring spread over an actor pool.

The pipeline: one read task, on the driver's node (where the input is), reads the source with
everloop's own reader, by the model's schema, exactly as the local engine does, and passes each chunk
on as one row (the chunk pickled); `map_batches` with a callable class scores one chunk per call on
an actor pool, each actor holding the scorer (model included) from the object store, loaded once per
actor; results come back in input order (`preserve_order`) to the driver, which numbers rows, assigns
prediction ids and writes, as for the local engine. Chunks rather than Ray's own readers: Ray's CSV
reader would infer types where everloop reads by the schema (codes with leading zeros, bool
spellings, dates), and the chunks must be the local engine's for `--resume` and identical output.

Connection: the Ray this process is already connected to (`ray.init` called before), else the cluster
at `address`, else a new local Ray that listens on loopback only (see `start_local`) and is shut down
at the end. Ray is an extra: `pip install 'everloop[ray]'`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import ipaddress
import logging
import os
import pickle
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from everloop.errors import EverloopError, IntegrityError

if TYPE_CHECKING:
    from everloop.batch._score import BatchWriter, ChunkScorer

RAY_HINT = "pip install 'everloop[ray]'"
# Ray's own switch: off ("0"), a new local node takes 127.0.0.1 as its address (rather than the
# machine's network address), and every server of the node (GCS, raylet, object manager, workers,
# agents) binds there; `ray start --head` with it set to 0 starts such a node too. Named for Windows and
# macOS, where it is off by default; it works the same on Linux.
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Environment for a local Ray started by everloop: loopback only, and no usage statistics sent anywhere.
# Each is set only where the environment does not set it. (Ray's token authentication, on by default
# for a new local Ray, stays as Ray sets it: RAY_AUTH_MODE is read when Ray is imported.)
LOCAL_ENV = {LOOPBACK_SWITCH: "0", "RAY_USAGE_STATS_ENABLED": "0"}


class RayUnavailable(EverloopError):
    """Ray (with Ray Data) is not installed in this environment."""


def import_ray() -> ModuleType:
    """The `ray` module with `ray.data` loaded. Raises RayUnavailable (with the install hint) when it is
    not installed or does not import."""
    try:
        import ray
        import ray.data  # noqa: F401 - the extra's second half; `ray` alone lacks it
    except ImportError as exc:
        raise RayUnavailable(f"--engine ray needs Ray Data, which is not installed ({exc}); "
                             f"install everloop[ray]: {RAY_HINT}") from None
    return ray


def start_local(*, num_cpus: int | None = None, object_store_memory: int | None = None,
                temp_dir: str | None = None) -> dict[str, Any]:
    """Start a local Ray in this process whose every socket listens on 127.0.0.1 only: node address,
    GCS, raylet, object manager, workers and agents; no dashboard; no usage statistics.

    By default a local Ray node takes the machine's network address and its servers bind to all
    interfaces, even with `ray.init(_node_ip_address="127.0.0.1")` or `ray start --node-ip-address
    127.0.0.1` (both resolve a loopback address to the network one); with the loopback switch off (see
    `LOOPBACK_SWITCH`) the node's address is 127.0.0.1 and Ray binds its servers there. `num_cpus`
    (default: all), `object_store_memory` in bytes (default: Ray's, 30% of memory) and `temp_dir` (an
    absolute folder for Ray's session files, default /tmp/ray) go to `ray.init`. Returns `ray.init`'s
    address info (`node_ip_address`, `gcs_address`, `session_dir`, ...). Raises RayUnavailable without
    Ray."""
    ray = import_ray()
    for name, value in LOCAL_ENV.items():  # the processes Ray starts inherit them
        os.environ.setdefault(name, value)
    with _loopback(True):
        info = ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
                        include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                        _temp_dir=temp_dir)
    return dict(info.address_info)


@contextlib.contextmanager
def ray_connection(address: str | None = None) -> Iterator[ModuleType]:
    """`ray`, connected for the block: to the Ray this process is already connected to, else to the
    cluster whose GCS is at `address` (`host:port`, as `ray start --head` prints it; this machine must
    be one of its nodes), else to a new loopback-only local Ray (`start_local`); what this opened is
    shut down at the end. Raises RayUnavailable without Ray; EverloopError naming `address` when it is
    malformed or nothing answers there."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address:
        host = _reachable(address)
        # Ray replaces a loopback host by the machine's network address before connecting; a cluster
        # that listens on loopback only (as `start_local` makes one) is reached with the switch off.
        with _loopback(ipaddress.ip_address(host).is_loopback if _is_ip(host) else host == "localhost"):
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            except ConnectionError as exc:  # e.g. refused for want of the cluster's token
                why = " ".join(f"{exc}: {exc.__cause__}".split()) if exc.__cause__ else str(exc)  # one line
                raise EverloopError(f"--address {address}: Ray did not connect ({why}); a cluster with token "
                                    "authentication (Ray's default) needs RAY_AUTH_MODE=token and its token "
                                    "(RAY_AUTH_TOKEN, or ~/.ray/auth_token) in the environment") from None
    else:
        start_local()
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _loopback(on: bool) -> Iterator[None]:
    """With `on`, Ray takes 127.0.0.1 as this node's address for the block (what `LOOPBACK_SWITCH`=0 in
    the environment does, which Ray reads only once, when it is imported)."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    if on and os.environ.get(LOOPBACK_SWITCH, "0").lower() in ("0", "false"):
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def _reachable(address: str) -> str:
    """The host of `address` (`host:port`), once a TCP connection to it succeeds within 5 s: Ray itself
    retries an address where nothing listens for minutes. Raises EverloopError naming `address`."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise EverloopError(f"--address {address}: expected the Ray cluster's GCS address as host:port "
                            "(as 'ray start --head' prints it, e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise EverloopError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); "
                            "start one with 'ray start --head', or leave --address out for a local "
                            "Ray") from None
    return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def score_on_ray(scorer: ChunkScorer, read: Callable[[], Iterable[pd.DataFrame]], writer: BatchWriter, *,
                 address: str | None = None) -> None:
    """Score the chunks of `read()` with `scorer` on Ray Data and hand each `ScoredChunk` to `writer`, in
    input order, as the local engine does; chunks a resumed job finished are read, counted, not scored.

    Ray: as `ray_connection(address)` gives it. A tree ensemble `scorer` uses compiled (its shared
    library) travels as the library's bytes: every actor answers with the same
    native code as the local engine would. Raises what `score_file` raises for the same input,
    RayUnavailable without Ray, EverloopError for an `address` where no Ray answers."""
    shipped = _shippable(scorer)
    with ray_connection(address), contextlib.closing(
            scored_chunks(shipped, read, skip=writer.job.resumed_chunks)) as results:
        for rows, scored in results:
            if scored is not None:
                writer.add(scored)
            elif writer.progress:  # finished by the run that stopped: counted, as the local engine does
                writer.progress(rows)


def _shippable(scorer: ChunkScorer) -> ChunkScorer:
    """`scorer`, or a copy that pickles: its compiled trees (a loaded shared library does not pickle)
    replaced by `_ShippedTrees` carrying the library's bytes."""
    compiled = scorer.trained.compiled
    if compiled is None or isinstance(compiled, _ShippedTrees):
        return scorer
    data = Path(compiled.library).read_bytes()
    if compiled.sha256 is not None and hashlib.sha256(data).hexdigest() != compiled.sha256:
        # the file changed since it was checked and loaded: ship nothing that was not verified
        raise IntegrityError(f"compiled library {compiled.library} no longer has the sha256 recorded when it "
                             "was built; not shipped to the Ray actors", digest=compiled.sha256)
    shipped = copy.copy(scorer)
    shipped.trained = dataclasses.replace(scorer.trained, compiled=_ShippedTrees(
        data, compiled.classification, compiled.n_classes))
    return shipped


class _ShippedTrees:
    """Compiled trees that travel as their shared library's bytes; on first use (on an actor) the bytes
    are written to a temporary file and loaded with one thread (an actor has one CPU). Called like
    `CompiledTrees`: encoded rows (n, features) -> probabilities (n, classes) or values (n,)."""

    def __init__(self, library: bytes, classification: bool, n_classes: int) -> None:
        self.library, self.classification, self.n_classes = library, classification, n_classes
        self._trees: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_trees": None}

    def __call__(self, encoded: np.ndarray) -> np.ndarray:
        if self._trees is None:
            from everloop.serve._compiled import CompiledTrees

            fd, name = tempfile.mkstemp(prefix="everloop-trees-", suffix=".so")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(self.library)
                self._trees = CompiledTrees(Path(name), self.classification, self.n_classes, nthread=1)
            finally:
                os.unlink(name)  # loaded: the library stays mapped without its file
        return self._trees(encoded)


def scored_chunks(scorer: Callable[[pd.DataFrame], Any], read: Callable[[], Iterable[pd.DataFrame]], *,
                  skip: int = 0, actors: int | None = None) -> Iterator[tuple[int, Any]]:
    """`scorer(chunk)` for each chunk of `read()`, on Ray Data, in input order: (rows in the chunk, its
    result); the first `skip` chunks (finished by an earlier run) are read but not scored: (rows, None).

    `scorer` and `read` must pickle (they run on Ray's workers): `read` on the driver's node, `scorer` on
    an actor pool of `actors` actors (default: the cluster's CPUs, at least 1), 1 CPU each, each
    unpickling `scorer` once from the object store. An EverloopError raised by `read` or `scorer`
    (unreadable input, a bad `--keep`) is raised here as itself; anything else comes as Ray's error.
    Ray must be connected (`ray_connection`)."""
    ray = import_ray()
    from ray.data import ActorPoolStrategy, DataContext

    if actors is None:
        actors = max(1, int(ray.cluster_resources().get("CPU", 1)))
    context = DataContext.get_current()
    saved = context.execution_options.preserve_order, context.enable_progress_bars
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # the caller shows progress: two live bars would fight
    quiet = logging.getLogger("ray.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its INFO lines narrate the plan; its full logs are in the session folder
    try:
        # Ray Data plans with one input (the one read task) and warns that it cannot use 2 actors; the
        # read task's rows are spread over them all the same.
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors",
                                category=UserWarning)
        shared = ray.put(scorer)  # once into the object store; each actor fetches it once
        dataset = ray.data.read_datasource(
            _chunk_source(read, skip), num_cpus=0,  # one reader, mostly waiting on the scorers
        ).map_batches(
            _ChunkScoring, fn_constructor_args=([shared],), batch_size=1, batch_format="pyarrow",
            compute=ActorPoolStrategy(size=actors), num_cpus=1)
        expected = 0
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for n, rows, payload in zip(*(batch.column(c).to_pylist() for c in ("n", "rows", "payload"))):
                if n != expected:  # preserve_order promises this; the writer's row numbers depend on it
                    raise RuntimeError(f"Ray Data returned chunk {n} where chunk {expected} was due")
                expected += 1
                result = pickle.loads(payload) if payload else None
                if isinstance(result, _Failed):
                    raise result.error
                yield rows, result
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        quiet.setLevel(level)


class _Failed:
    """An EverloopError raised on a worker, sent back as a result: the driver raises it as itself
    (raised there, Ray would wrap it, log it with a traceback and abort with its own error)."""

    def __init__(self, error: EverloopError) -> None:
        self.error = error


# What a row of the pipeline carries in `payload`: a chunk to score (then its result), nothing (a chunk
# finished by an earlier run), or a pickled _Failed (the reader failed; passed through as the result).
SCORE, SKIP, FAILED = 0, 1, 2


def _row(n: int, rows: int, what: int, payload: bytes) -> pa.Table:
    return pa.table({"n": pa.array([n], pa.int64()), "rows": pa.array([rows], pa.int64()),
                     "what": pa.array([what], pa.int8()), "payload": pa.array([payload], pa.large_binary())})


def _chunk_source(read: Callable[[], Iterable[pd.DataFrame]], skip: int) -> Any:
    """A Ray Data datasource of the chunks of `read()`, one row each (see `_row`), read by one task on
    the driver's node."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def chunks() -> Iterator[pa.Table]:
        n = -1
        try:
            for n, chunk in enumerate(read()):
                if n < skip:
                    yield _row(n, len(chunk), SKIP, b"")
                else:
                    yield _row(n, len(chunk), SCORE, pickle.dumps(chunk, protocol=5))
        except EverloopError as exc:
            yield _row(n + 1, 0, FAILED, pickle.dumps(_Failed(exc), protocol=5))

    class ChunkSource(Datasource):
        @property
        def supports_distributed_reads(self) -> bool:  # the input is where the driver is
            return False

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            return [ReadTask(chunks, BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                                   input_files=None))]

    return ChunkSource()


class _ChunkScoring:
    """Ray Data's callable class: the scorer, unpickled once per actor; each call scores one chunk."""

    def __init__(self, scorer: Any) -> None:
        ray = import_ray()
        self.scorer = ray.get(scorer[0])  # in a list: Ray would not resolve a reference Ray Data holds

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        results = []
        for what, payload in zip(batch.column("what").to_pylist(), batch.column("payload").to_pylist()):
            if what == SCORE:
                try:
                    payload = pickle.dumps(self.scorer(pickle.loads(payload)), protocol=5)
                except EverloopError as exc:
                    payload = pickle.dumps(_Failed(exc), protocol=5)
            results.append(payload)
        return {"n": batch.column("n").to_numpy(), "rows": batch.column("rows").to_numpy(),
                "payload": np.array(results, dtype=object)}
