"""Peers for the benchmarks, each in a virtualenv of its own under bench/.venvs/.

Two uses:

* imported by a benchmark script (stdlib only at import time): `ensure_venv(name, packages, probe)`
  creates bench/.venvs/<name> and pip-installs `packages` unless `probe` already imports there;
  `rss_reset()` / `rss_peak_mb()` measure the extra memory of a block of code (Linux);
* run with a peer's interpreter as a worker:
  `bench/.venvs/pandera/bin/python bench/_peers.py pandera FRAME.parquet STATS.json [--repeat 3]`
  reads the frame, builds a pandera DataFrameSchema from the reference stats, validates with
  lazy=True (best of --repeat, the read not timed) and prints one JSON object: seconds, extra memory,
  counts per (column, rule) and versions.
* `python _peers.py evidently REF.parquet CUR.parquet COLUMNS.json [--repeat-under S]` (Evidently 0.7's
  venv): runs `Report([DataDriftPreset()], include_tests=True).run(current, reference)` on the two frames
  (read from Parquet, not timed) with a DataDefinition of the numerical and categorical columns in
  COLUMNS.json, once, or best of 3 when one run takes under S seconds (default 20), and prints one JSON
  object: seconds, extra memory, each column's method, threshold, score and flag, the dataset verdict.
* `python _peers.py plain MODEL.pkl META.json IN.parquet OUT.parquet` (everloop's venv): the batch-scoring
  script a user writes (`pd.read_parquet` + `predict_proba` + `to_parquet`); prints its step times;
* `python _peers.py ray MODEL.pkl META.json IN.parquet OUTDIR CPUS BATCH_ROWS TEMPDIR` (Ray's venv): the
  same with Ray Data (`read_parquet` + `map_batches` with a callable class + `write_parquet`) on a new
  local Ray of CPUS CPUs on 127.0.0.1; prints Ray's start-up and run times.
`run_measured(command, ...)` runs a child to its end and reports its wall time, its own peak RSS and,
optionally, its process tree's and the addresses it listened on.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

VENVS = Path(__file__).resolve().parent / ".venvs"


def venv_python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def ensure_venv(name: str, packages: list[str], probe: str) -> tuple[Path, float]:
    """The interpreter of bench/.venvs/<name>, and the seconds spent installing (0.0 when cached)."""
    python = venv_python(name)
    if python.exists() and subprocess.run([str(python), "-c", probe], capture_output=True, check=False).returncode == 0:
        return python, 0.0
    start = time.perf_counter()
    print(f"installing {' '.join(packages)} into {python.parent.parent} ...", flush=True)
    subprocess.run(["python3", "-m", "venv", str(python.parent.parent)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + packages, check=True)
    subprocess.run([str(python), "-c", probe], check=True)
    return python, time.perf_counter() - start


# -- memory: the high-water mark of this process above a baseline (Linux) ----------------------------


def _status_kb(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_reset() -> int | None:
    """Reset this process's peak RSS to its current RSS (kB), or None when the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS")
    except OSError:
        return None


def rss_extra_mb(baseline_kb: int | None) -> float | None:
    return None if baseline_kb is None else (_status_kb("VmHWM") - baseline_kb) / 1024


# -- a child process, timed and measured: its peak RSS (and its process tree's), its listening sockets --


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids += [int(k) for k in (task / "children").read_text().split()]
    except OSError:
        pass
    return kids


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants alive now (Linux; needs /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _started(pid: int) -> str | None:
    """When `pid` started (field 22 of /proc/<pid>/stat), to tell it from a later process given the same pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _listeners(pids: set[int]) -> set[str]:
    """The local addresses (host:port) on which any of `pids` listens (TCP) or has bound (UDP), read
    from `ss`; an empty set when ss is missing."""
    try:
        text = subprocess.run(["ss", "-Htulnp"], capture_output=True, text=True, check=False, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    found = set()
    for line in text.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        parts = line.split()
        if owners & pids and len(parts) >= 5:
            found.add(parts[4])
    return found


def loopback_only(address: str) -> bool:
    """Whether a local address from `ss` (host:port) is on the loopback interface."""
    host = address.rsplit(":", 1)[0].strip("[]").split("%")[0].removeprefix("::ffff:")  # IPv4-mapped IPv6
    return host.startswith("127.") or host in ("::1", "localhost")


def run_measured(command: list[str], *, env: dict[str, str] | None = None, cap_mb: float = 16000,
                 timeout_s: float = 7200, tree: bool = False, cwd: str | Path | None = None) -> dict:
    """Run `command` to its end and measure it (Linux).

    Returns {"seconds": wall time from start to exit, "rc": exit code, "stdout", "stderr",
    "peak_mb": the child's own peak RSS (its VmHWM, polled every 50 ms: only the exec'd program, not the
    pages it shared with this process at fork time, as ru_maxrss would count), "killed": why it was
    killed or None}. With `tree`, also "tree_peak_mb" (the largest sum over the child and all its
    descendants of their RSS, polled: shared pages, e.g. Ray's object store, count once per process
    that maps them, so this overstates) and "listening" (every address any of them listened on, from
    `ss` every 2 s). The child is killed when its RSS (the tree's with `tree`) passes `cap_mb` or it
    runs past `timeout_s`; any descendant still alive after it exits is killed by its pid."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True)
        hwm_kb, tree_kb, killed, listening, last_ss = 0, 0, None, set(), 0.0
        seen: dict[int, str | None] = {}  # pid -> start time, of every descendant seen
        while True:
            pid, status, _ = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            try:
                hwm_kb = max(hwm_kb, _status_kb("VmHWM", child.pid))
            except (OSError, ValueError):
                pass
            now = time.perf_counter()
            if tree:
                pids = _tree(child.pid)
                seen.update({p: seen.get(p) or _started(p) for p in pids})
                total = 0
                for p in pids:
                    try:
                        total += _status_kb("VmRSS", p)
                    except (OSError, ValueError):
                        pass
                tree_kb = max(tree_kb, total)
                if now - last_ss > 2.0:
                    listening |= _listeners(set(pids))
                    last_ss = now
            if killed is None and max(hwm_kb, tree_kb) / 1024 > cap_mb:
                killed = f"RSS above the cap of {cap_mb:.0f} MB"
            elif killed is None and now - start > timeout_s:
                killed = f"still running after {timeout_s:.0f} s"
            if killed is not None:
                for p in (_tree(child.pid) if tree else [child.pid]):
                    try:
                        os.kill(p, 9)
                    except ProcessLookupError:
                        pass
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        rc = os.waitstatus_to_exitcode(status)
        for p, started in seen.items():  # a process left behind (e.g. a Ray worker) by the child
            if p != child.pid and started is not None and _started(p) == started:  # the same process
                try:
                    os.kill(p, 9)
                except (ProcessLookupError, PermissionError):
                    pass
        out.seek(0)
        err.seek(0)
        result = {"seconds": seconds, "rc": rc, "stdout": out.read(), "stderr": err.read(),
                  "peak_mb": hwm_kb / 1024, "killed": killed}
    if tree:
        result.update(tree_peak_mb=tree_kb / 1024, listening=sorted(listening))
    return result


# -- the pandera worker ----------------------------------------------------------------------------


def _pandera_schema(stats: dict):
    try:
        import pandera.pandas as pa  # pandera >= 0.24
    except ImportError:  # pragma: no cover - older pandera
        import pandera as pa
    columns = {}
    for name, s in stats.items():
        if s["kind"] == "numeric":
            check = pa.Check.in_range(s["min"], s["max"])
        else:
            check = pa.Check.isin(s["categories"])
        dtype = s["dtype"] if s["dtype"] != "str" else "object"  # pandas < 3 reads Parquet strings as object
        columns[name] = pa.Column(dtype, [check], nullable=s["nullable"])
    return pa, pa.DataFrameSchema(columns, coerce=False)


def _pandera_rule(check: str) -> str:
    if check == "not_nullable":
        return "nulls"
    if check.startswith(("in_range", "greater_than", "less_than")):
        return "range"
    if check.startswith("isin"):
        return "category"
    if check.startswith("dtype"):
        return "dtype"
    return check


def pandera_worker(frame_path: str, stats_path: str, repeat: int) -> dict:
    import pandas as pd

    stats = json.loads(Path(stats_path).read_text())
    frame = pd.read_parquet(frame_path)
    pa, schema = _pandera_schema(stats)
    times, extra, failures = [], [], None
    for _ in range(repeat):
        base = rss_reset()
        start = time.perf_counter()
        try:
            schema.validate(frame, lazy=True)
            failures = pd.DataFrame(columns=["column", "check", "index", "failure_case"])
        except pa.errors.SchemaErrors as exc:
            failures = exc.failure_cases
        times.append(time.perf_counter() - start)
        extra.append(rss_extra_mb(base))
    counts: dict[tuple[str, str], int | str] = {}
    for (column, check), group in failures.groupby(["column", "check"], dropna=False, sort=False):
        rule = _pandera_rule(str(check))
        rows = int(group["index"].notna().sum())
        # A failure with no row index is about the whole column (a wrong dtype, or a check that raised).
        counts[(str(column), rule)] = rows if rows else "column"
    import numpy
    import pandera
    import pyarrow
    return {
        "seconds": min(times), "all_seconds": times,
        "extra_mb": max((e for e in extra if e is not None), default=None),
        "counts": [[c, r, n] for (c, r), n in counts.items()],
        "versions": {"pandera": pandera.__version__, "pandas": pd.__version__, "numpy": numpy.__version__,
                     "pyarrow": pyarrow.__version__},
    }


# -- the Evidently worker (Evidently 0.7's API: evidently.Report, evidently.presets) -------------------


def _evidently_parse(snapshot) -> dict:
    """Evidently's own verdicts from a snapshot: each column's ValueDrift test, and the DriftedColumnsCount
    test (share of drifted columns < drift_share) for the dataset."""
    body = snapshot.dict()
    values = {m["id"]: m["value"] for m in body["metrics"]}
    columns, dataset = {}, {}
    for test in body["tests"]:
        params = test["metric_config"]["params"]
        kind = params.get("type", "")
        if kind.endswith(":ValueDrift"):
            columns[params["column"]] = {"method": params.get("method"), "threshold": params.get("threshold"),
                                         "score": values.get(test["metric_config"]["metric_id"]),
                                         "drifted": test["status"] == "FAIL"}
        elif kind.endswith(":DriftedColumnsCount"):
            value = values.get(test["metric_config"]["metric_id"]) or {}
            dataset = {"drift_share": params.get("drift_share"), "drifted_count": value.get("count"),
                       "drifted_share": value.get("share"), "dataset_drift": test["status"] == "FAIL",
                       "test": test.get("description")}
    return {"columns": columns, **dataset}


def evidently_worker(reference_path: str, current_path: str, columns_path: str, repeat_under: float = 20.0) -> dict:
    import gc

    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    spec = json.loads(Path(columns_path).read_text())
    reference, current = pd.read_parquet(reference_path), pd.read_parquet(current_path)
    definition = DataDefinition(numerical_columns=spec["numerical"], categorical_columns=spec["categorical"])
    start = time.perf_counter()
    ref_ds = Dataset.from_pandas(reference, data_definition=definition)
    cur_ds = Dataset.from_pandas(current, data_definition=definition)
    from_pandas_s = time.perf_counter() - start
    times, extra, parsed = [], [], None
    while True:
        snapshot = None
        gc.collect()
        base = rss_reset()
        start = time.perf_counter()
        snapshot = Report([DataDriftPreset()], include_tests=True).run(current_data=cur_ds, reference_data=ref_ds)
        times.append(time.perf_counter() - start)
        extra.append(rss_extra_mb(base))
        parsed = _evidently_parse(snapshot)
        if len(times) >= 3 or times[0] > repeat_under:
            break
    import evidently
    import numpy
    import pyarrow
    import scipy
    return {"seconds": min(times), "all_seconds": times, "from_pandas_seconds": from_pandas_s,
            "extra_mb": max((e for e in extra if e is not None), default=None), **parsed,
            "versions": {"evidently": evidently.__version__, "pandas": pd.__version__, "numpy": numpy.__version__,
                         "scipy": scipy.__version__, "pyarrow": pyarrow.__version__}}


# -- the batch-scoring peers: a plain script, and Ray Data with the plain pipeline ----------------------


def _scored_frame(pipeline, batch, features: list[str], keep: list[str]):
    """What each batch peer writes: the `keep` columns, the predicted class and each class's probability."""
    proba = pipeline.predict_proba(batch[features])
    out = batch[keep].reset_index(drop=True)
    out["prediction"] = pipeline.classes_[proba.argmax(axis=1)]
    for i, cls in enumerate(pipeline.classes_):
        out[f"proba_{cls}"] = proba[:, i]
    return out


def plain_worker(model_path: str, meta_path: str, source: str, output: str) -> dict:
    """The script a user writes instead of a batch tool: the pickled pipeline, the whole file into pandas,
    `predict_proba`, `to_parquet`. META is {"features": [...], "keep": [...]} (the columns copied through)."""
    import pickle

    import pandas as pd

    meta = json.loads(Path(meta_path).read_text())
    marks = [time.perf_counter()]
    with open(model_path, "rb") as f:
        pipeline = pickle.load(f)
    marks.append(time.perf_counter())
    frame = pd.read_parquet(source)
    marks.append(time.perf_counter())
    out = _scored_frame(pipeline, frame, meta["features"], meta["keep"])
    marks.append(time.perf_counter())
    out.to_parquet(output, index=False)
    marks.append(time.perf_counter())
    import numpy
    import pyarrow
    import sklearn
    steps = ("load_s", "read_s", "predict_s", "write_s")
    return {"rows": len(out), **{k: b - a for k, a, b in zip(steps, marks, marks[1:])},
            "versions": {"pandas": pd.__version__, "numpy": numpy.__version__, "pyarrow": pyarrow.__version__,
                         "scikit-learn": sklearn.__version__}}


def ray_worker(model_path: str, meta_path: str, source: str, output_dir: str, cpus: int, batch_rows: int,
               temp_dir: str) -> dict:
    """Ray Data as its batch-inference guide has it: `read_parquet`, `map_batches` with a callable class
    that loads the pipeline once per actor (a pool of `cpus` actors, pandas batches of `batch_rows`),
    `write_parquet` (a folder of files); on a new local Ray of `cpus` CPUs whose every socket is on
    127.0.0.1, without dashboard or usage statistics."""
    # Before Ray is imported: the switch makes a new local node take 127.0.0.1 as its address, so that its
    # servers bind there and not to the machine's network address (see everloop/batch/_ray.py).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import pandas as pd
    import ray

    meta = json.loads(Path(meta_path).read_text())

    class Scorer:
        def __init__(self, path: str, features: list[str], keep: list[str]):
            import pickle

            with open(path, "rb") as f:
                self.pipeline = pickle.load(f)
            self.features, self.keep = features, keep

        def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
            return _scored_frame(self.pipeline, batch, self.features, self.keep)

    start = time.perf_counter()
    ray.init(address="local", num_cpus=cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
             _temp_dir=temp_dir)
    started = time.perf_counter()
    # Each actor asks for less than a whole CPU: actors holding every CPU leave none for the read and write
    # tasks and the dataset hangs (ray-project/ray#44687); the actors still use a core each.
    actor_cpus = (cpus - 1) / cpus if cpus > 1 else 0.5
    (ray.data.read_parquet(source)
     .map_batches(Scorer, fn_constructor_args=(model_path, meta["features"], meta["keep"]), batch_format="pandas",
                  batch_size=batch_rows, compute=ray.data.ActorPoolStrategy(size=cpus), num_cpus=actor_cpus)
     .write_parquet(output_dir))
    done = time.perf_counter()
    ray.shutdown()
    import numpy
    import pyarrow
    import sklearn
    return {"init_s": started - start, "run_s": done - started, "shutdown_s": time.perf_counter() - done,
            "actor_cpus": actor_cpus,
            "versions": {"ray": ray.__version__, "pandas": pd.__version__, "numpy": numpy.__version__,
                         "pyarrow": pyarrow.__version__, "scikit-learn": sklearn.__version__}}


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "evidently":
        under = float(sys.argv[sys.argv.index("--repeat-under") + 1]) if "--repeat-under" in sys.argv else 20.0
        print(json.dumps(evidently_worker(sys.argv[2], sys.argv[3], sys.argv[4], under)))
    elif len(sys.argv) >= 4 and sys.argv[1] == "pandera":
        n = int(sys.argv[sys.argv.index("--repeat") + 1]) if "--repeat" in sys.argv else 3
        print(json.dumps(pandera_worker(sys.argv[2], sys.argv[3], n)))
    elif len(sys.argv) == 6 and sys.argv[1] == "plain":
        print(json.dumps(plain_worker(*sys.argv[2:6])))
    elif len(sys.argv) == 9 and sys.argv[1] == "ray":
        model, meta, source, output, cpus, batch, temp = sys.argv[2:9]
        print(json.dumps(ray_worker(model, meta, source, output, int(cpus), int(batch), temp)))
    else:
        sys.exit(__doc__)


def timed(fn, repeat: int = 3):
    """Best seconds of `repeat` runs, the largest extra peak RSS (MB) of a run, all times, the last result."""
    import gc

    times, extra, result = [], [], None
    for _ in range(repeat):
        result = None
        gc.collect()
        base = rss_reset()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        extra.append(rss_extra_mb(base))
    return min(times), max((e for e in extra if e is not None), default=None), times, result
