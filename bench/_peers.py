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
"""

from __future__ import annotations

import json
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


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "evidently":
        under = float(sys.argv[sys.argv.index("--repeat-under") + 1]) if "--repeat-under" in sys.argv else 20.0
        print(json.dumps(evidently_worker(sys.argv[2], sys.argv[3], sys.argv[4], under)))
    elif len(sys.argv) >= 4 and sys.argv[1] == "pandera":
        n = int(sys.argv[sys.argv.index("--repeat") + 1]) if "--repeat" in sys.argv else 3
        print(json.dumps(pandera_worker(sys.argv[2], sys.argv[3], n)))
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
