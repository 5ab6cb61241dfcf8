"""Validation benchmark: everloop against pandera and a plain pandas/numpy check, in one run.

What is compared. A clean reference frame (100k rows) gives the rules; a test frame (1M rows,
`--quick`: 200k) is checked against them. Both have 25 feature columns -- 20 numeric (normal,
lognormal, uniform, Poisson ints, exponential) and 5 categorical strings with 3 to 12 categories --
plus an integer target `label` (0/1), a 26th column that every tool checks too but that is not counted
in "columns": 25. The rules, the same for all three tools, per column: dtype (numeric columns hold
numbers), nulls (a column with none in the reference may have none), range (the reference's min and
max) and category set (the reference's domain; `label` too). Numeric test values are clipped to the
reference range, so the only anomalies are the planted ones, each in a column of its own (the
out-of-range ones far enough out that a tool widening inferred ranges by a tolerance, as everloop
does, must still flag every one):

    nulls           num_00  1% of the rows set to NaN
    out of range    num_06  500 values above the reference maximum (by 0.5-1.5 times its span)
    out of range    num_04  400 values below the reference minimum (by 0.5-1.5 times its span)
    unseen category cat_2   300 rows of "UNSEEN"
    wrong dtype     num_07  200 rows of "n/a", so the whole column is strings

A planted problem counts as found when the tool reports that column with the right kind and the
exact row count. The test frame goes through a Parquet file that every tool reads, so all see the
same data; only the validation is timed (best of 3), never the read.

* plain pandas: a vectorised pandas/numpy pass returning counts per (column, rule);
* everloop: `Schema.infer(reference, spec)` once, then `schema.validate(frame, mode="dataset")` when
  it exists, else `schema.conform(frame, mode="dataset")[1]`;
* pandera: in its own virtualenv (bench/.venvs/pandera, created on first use), a DataFrameSchema of
  Column(dtype, Check.in_range / Check.isin, nullable=...) with coerce=False, validated with
  lazy=True in a subprocess; `SchemaErrors.failure_cases` is counted per column and check (a failure
  without a row index, such as a check that raised on a string column, is shown as "column").

Extra memory is the process's peak RSS during the validation above its RSS before it (Linux).
Without --quick, a 10M-row Parquet file with the same planted problems is written in 1M-row blocks
and `everloop ingest FILE --project TMP --json` runs on it in a fresh project (whose schema is
inferred from that file), and its peak RSS is measured (the child is killed past --rss-cap-mb).

Run: .venv/bin/python bench/validate.py [--quick]    (the last line printed is one JSON object)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers

SEED = 20240601
REF_ROWS = 100_000
BLOCK = 1_000_000  # the 10M-row file is written in blocks of this many rows
DISTS = ["normal", "lognormal", "uniform", "poisson", "exponential"]
NUMERIC = [f"num_{i:02d}" for i in range(20)]
CATEGORICAL = {f"cat_{i}": k for i, k in enumerate([3, 5, 7, 9, 12])}
CAT_PROBS = {c: np.random.default_rng([SEED, i]).dirichlet(np.full(k, 4.0)) for i, (c, k) in enumerate(CATEGORICAL.items())}
NULLS, ABOVE, BELOW, DTYPE, UNSEEN = "num_00", "num_06", "num_04", "num_07", "cat_2"
PANDERA = ["pandera", "pandas<3", "numpy", "pyarrow"]
KIND_RULE = {"type_mismatch": "dtype", "null_values": "nulls", "missing_label": "nulls",
             "out_of_range": "range", "unseen_category": "category"}


def planted(rows: int) -> list[tuple[str, str, int]]:
    """The planted problems of a frame of `rows` rows (made of blocks of at most BLOCK rows)."""
    blocks = [BLOCK] * (rows // BLOCK) + ([rows % BLOCK] if rows % BLOCK else [])
    n = len(blocks)
    return [(NULLS, "nulls", sum(b // 100 for b in blocks)), (ABOVE, "range", 500 * n), (BELOW, "range", 400 * n),
            (UNSEEN, "category", 300 * n), (DTYPE, "dtype", 200 * n)]


# -- data ------------------------------------------------------------------------------------------


def draw(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    cols: dict[str, np.ndarray] = {}
    for i, name in enumerate(NUMERIC):
        kind = DISTS[i % len(DISTS)]
        if kind == "normal":
            cols[name] = rng.normal(10.0 * i, 1.0 + i, n)
        elif kind == "lognormal":
            cols[name] = rng.lognormal(0.0, 0.5 + i / 40, n)
        elif kind == "uniform":
            cols[name] = rng.uniform(-i, i + 1.0, n)
        elif kind == "poisson":
            cols[name] = rng.poisson(1.0 + i, n).astype(np.int64)
        else:
            cols[name] = rng.exponential(1.0 + i, n)
    for name, k in CATEGORICAL.items():
        cols[name] = rng.choice(np.array([f"{name}_v{j}" for j in range(k)], dtype=object), n, p=CAT_PROBS[name])
    cols["label"] = (rng.random(n) < 0.3).astype(np.int64)
    return cols


def reference_stats(ref: pd.DataFrame) -> dict[str, dict]:
    """The rules, learnt from the reference: what the pandas check and pandera get."""
    stats = {}
    for name in ref.columns:
        s = ref[name]
        base = {"dtype": str(s.dtype), "nullable": bool(s.isna().any())}
        if name in NUMERIC:
            stats[name] = {**base, "kind": "numeric", "min": float(s.min()), "max": float(s.max())}
        else:
            stats[name] = {**base, "kind": "categorical", "categories": sorted(s.dropna().unique().tolist())}
    return stats


def make_test(rng: np.random.Generator, n: int, stats: dict[str, dict]) -> pd.DataFrame:
    cols = draw(rng, n)
    for name in NUMERIC:  # inside the reference range, so the planted values are the only ones out of it
        cols[name] = np.clip(cols[name], stats[name]["min"], stats[name]["max"]).astype(cols[name].dtype)
    pick = lambda k: rng.choice(n, k, replace=False)
    span = lambda c: stats[c]["max"] - stats[c]["min"]
    cols[NULLS][pick(n // 100)] = np.nan
    cols[ABOVE][pick(500)] = stats[ABOVE]["max"] + span(ABOVE) * rng.uniform(0.5, 1.5, 500)
    cols[BELOW][pick(400)] = stats[BELOW]["min"] - span(BELOW) * rng.uniform(0.5, 1.5, 400)
    cols[UNSEEN][pick(300)] = "UNSEEN"
    text = cols[DTYPE].astype(str).astype(object)
    text[pick(200)] = "n/a"
    cols[DTYPE] = text
    return pd.DataFrame(cols)


def write_big(path: Path, rows: int, stats: dict[str, dict]) -> None:
    """A Parquet file of `rows` rows, written block by block so that only one block is in memory."""
    writer = None
    for b in range(0, rows, BLOCK):
        table = pa.Table.from_pandas(make_test(np.random.default_rng([SEED, 1, b]), min(BLOCK, rows - b), stats),
                                     preserve_index=False)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


# -- the three checks ----------------------------------------------------------------------------


def pandas_check(frame: pd.DataFrame, stats: dict[str, dict]) -> dict[tuple[str, str], int]:
    out = {}
    for name, s in stats.items():
        col = frame[name]
        null = col.isna()
        nulls = int(null.sum())
        if not s["nullable"]:
            out[(name, "nulls")] = nulls
        if s["kind"] == "numeric":
            if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
                values, bad = col, 0
            else:
                values = pd.to_numeric(col, errors="coerce")
                bad = int(values.isna().sum()) - nulls
            out[(name, "dtype")] = bad
            v = values.to_numpy(dtype="float64", na_value=np.nan)
            out[(name, "range")] = int(np.count_nonzero((v < s["min"]) | (v > s["max"])))
        else:
            out[(name, "category")] = int((~col.isin(s["categories"]) & ~null).sum())
    return out


def everloop_counts(report) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for a in report.anomalies:
        key = (a.column, KIND_RULE.get(a.kind, a.kind))
        out[key] = out.get(key, 0) + int(a.count)
    return out


def run_pandera(python: Path, frame_path: Path, stats: dict, tmp: Path) -> dict:
    stats_path = tmp / "stats.json"
    stats_path.write_text(json.dumps(stats))
    proc = subprocess.run([str(python), str(Path(_peers.__file__)), "pandera", str(frame_path), str(stats_path),
                           "--repeat", "3"], capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pandera worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["counts"] = {(c, r): n for c, r, n in result["counts"]}
    return result


def score(counts: dict | None, plants: list[tuple[str, str, int]]) -> tuple[int, list[str], list[str]]:
    """How many plants were found exactly, what was wrong about the others, and what else was reported."""
    if counts is None:
        return 0, ["crashed"], []
    misses = [f"{c}/{r}: expected {n}, got {counts.get((c, r), 0)}" for c, r, n in plants if counts.get((c, r)) != n]
    keys = {(c, r) for c, r, _ in plants}
    others = [f"{c}/{r}={n}" for (c, r), n in sorted(counts.items()) if n and (c, r) not in keys]
    return len(plants) - len(misses), misses, others


# -- the 10M-row ingest ----------------------------------------------------------------------------


def ingest_big(path: Path, tmp: Path, cap_mb: float) -> dict:
    everloop = Path(sys.executable).with_name("everloop")
    project = tmp / "project"
    project.mkdir()
    (project / "everloop.yaml").write_text(f"name: bench\ndata:\n  source: {path}\n  target: label\n")
    env = {**os.environ, "COLUMNS": "200"}
    usage = subprocess.run([str(everloop), "ingest", "--help"], capture_output=True, text=True, env=env, check=False).stdout
    cmd = [str(everloop), "ingest", str(path), "--project", str(project), "--json"]
    if "--mode" in usage and "quarantine" in usage:
        cmd += ["--mode", "quarantine"]
    print("$", " ".join(cmd), flush=True)
    with open(tmp / "ingest.out", "w+") as out, open(tmp / "ingest.err", "w+") as err:
        start, killed, hwm = time.perf_counter(), False, 0
        child = subprocess.Popen(cmd, stdout=out, stderr=err)
        while True:
            pid, status, usage_ = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            try:
                hwm = max(hwm, _peers._status_kb("VmHWM", child.pid))
            except (OSError, ValueError):
                pass
            if hwm / 1024 > cap_mb and not killed:
                print(f"ingest passed {cap_mb:.0f} MB of RSS; killing it", flush=True)
                child.kill()
                killed = True
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    # VmHWM of the exec'd child only: its ru_maxrss would also count the pages it shared with this
    # (large) benchmark process at fork time, before exec.
    peak = hwm / 1024
    if child.returncode != 0:
        print(f"ingest exited {child.returncode}; stderr (end):\n{stderr[-2000:]}")
    else:
        print(f"ingest output: {stdout.strip()[-1500:]}")
    return {"seconds": seconds, "peak_mb": peak, "rc": child.returncode, "killed": killed}


# -- main ------------------------------------------------------------------------------------------


def machine() -> str:
    cpuinfo, meminfo = Path("/proc/cpuinfo").read_text(), Path("/proc/meminfo").read_text()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    mem = next((int(ln.split()[1]) for ln in meminfo.splitlines() if ln.startswith("MemTotal")), 0)
    return f"machine: {cpu}, {os.cpu_count()} cores, {mem / 1024**2:.1f} GB RAM, {platform.platform()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200k rows and no 10M-row ingest")
    ap.add_argument("--rows", type=int, help="test-frame rows (default 1M, --quick 200k)")
    ap.add_argument("--big-rows", type=int, default=10_000_000, help="rows of the ingested file")
    ap.add_argument("--rss-cap-mb", type=float, default=8000, help="kill the ingest past this RSS")
    args = ap.parse_args()
    rows = args.rows or (200_000 if args.quick else 1_000_000)

    import everloop.data
    from everloop.spec import parse_spec

    print(machine())
    python, install_s = _peers.ensure_venv("pandera", PANDERA, "import pandera.pandas, pyarrow")
    print(f"pandera venv: {python.parent.parent}" + (f" (installed in {install_s:.1f} s)" if install_s else " (cached)"))

    with tempfile.TemporaryDirectory(prefix="everloop-bench-") as tmp_name:
        tmp = Path(tmp_name)
        reference = pd.DataFrame(draw(np.random.default_rng([SEED, 0]), REF_ROWS))
        stats = reference_stats(reference)
        plants = planted(rows)
        frame_path = tmp / "test.parquet"
        make_test(np.random.default_rng([SEED, 1, 0]), rows, stats).to_parquet(frame_path, index=False)
        frame = pd.read_parquet(frame_path)
        print(f"data: reference {REF_ROWS:,} rows, test {rows:,} rows x {frame.shape[1]} columns "
              f"(25 features + label), {len(plants)} planted problems")

        results: dict[str, dict] = {}
        seconds, extra, _, counts = _peers.timed(lambda: pandas_check(frame, stats))
        results["plain pandas"] = {"seconds": seconds, "extra_mb": extra, "counts": counts}

        spec = parse_spec({"name": "bench", "data": {"source": "x.parquet", "target": "label"}})
        schema = everloop.data.Schema.infer(reference, spec)
        wider = [f"{c.name} [{c.min:g}, {c.max:g}] vs [{stats[c.name]['min']:g}, {stats[c.name]['max']:g}]"
                 for c in schema.columns if c.kind == "numeric" and c.name in NUMERIC
                 and (c.min, c.max) != (stats[c.name]["min"], stats[c.name]["max"])]
        if wider:
            print(f"note: everloop's inferred ranges differ from the reference's in {len(wider)} columns, "
                  f"e.g. {'; '.join(wider[:2])}")
        entry = "validate" if hasattr(schema, "validate") else "conform"
        check = ((lambda: schema.validate(frame, mode="dataset")) if entry == "validate"
                 else (lambda: schema.conform(frame, mode="dataset")[1]))
        try:
            seconds, extra, _, report = _peers.timed(check)
            results[f"everloop ({entry})"] = {"seconds": seconds, "extra_mb": extra, "counts": everloop_counts(report)}
            print("everloop report:\n  " + report.summary().replace("\n", "\n  "))
        except Exception as exc:  # noqa: BLE001 - a crash is a result too
            print(f"everloop crashed: {type(exc).__name__}: {exc}")
            results[f"everloop ({entry})"] = {"seconds": None, "extra_mb": None, "counts": None}
        frame = None  # only pandera's own copy from now on
        gc.collect()

        try:
            pandera = run_pandera(python, frame_path, stats, tmp)
            results["pandera (lazy)"] = pandera
            pandera_versions = pandera["versions"]
        except Exception as exc:  # noqa: BLE001
            print(f"pandera failed: {exc}")
            results["pandera (lazy)"], pandera_versions = {"seconds": None, "extra_mb": None, "counts": None}, {}

        big = None
        if not args.quick:
            big_path = tmp / "big.parquet"
            start = time.perf_counter()
            write_big(big_path, args.big_rows, stats)
            print(f"wrote {args.big_rows:,} rows to {big_path.name} ({big_path.stat().st_size / 1e6:.0f} MB) "
                  f"in {time.perf_counter() - start:.1f} s")
            big = ingest_big(big_path, tmp, args.rss_cap_mb)

    print("versions: " + ", ".join([f"python {platform.python_version()}", f"numpy {np.__version__}",
                                    f"pandas {pd.__version__}", f"pyarrow {pa.__version__}",
                                    f"everloop {metadata.version('everloop')}"]
                                   + [f"pandera-venv {k} {v}" for k, v in pandera_versions.items()]))
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    print(f"\n{'tool':<22} {'seconds':>8} {'extra MB':>9}  {'planted found':<14} notes")
    found = {}
    for tool, r in results.items():
        n, misses, others = score(r["counts"], plants)
        found[tool] = n
        notes = "; ".join(misses + (["also: " + ", ".join(others)] if others else []))
        print(f"{tool:<22} {fmt(r['seconds'], '8.3f')} {fmt(r['extra_mb'], '9.0f')}  {f'{n}/{len(plants)}':<14} {notes}")
    if big:
        status = "killed at the RSS cap" if big["killed"] else f"exit {big['rc']}"
        name = f"everloop ingest {args.big_rows / 1e6:g}M"
        print(f"{name:<22} {big['seconds']:8.1f} {big['peak_mb']:9.0f}  (peak RSS, not extra; {status})")

    ev_name = next(t for t in results if t.startswith("everloop"))
    ev, pandas_s, pandera_s = results[ev_name]["seconds"], results["plain pandas"]["seconds"], results["pandera (lazy)"]["seconds"]
    ratio = lambda other: round(other / ev, 2) if ev and other else None
    print(f"\neverloop vs pandera: {ratio(pandera_s)}x faster (bar: >= 5x)")
    print(f"everloop vs plain pandas: {ratio(pandas_s)}x faster (bar: >= 1x)")
    line = {"bench": "validate", "rows": rows, "columns": 25, "speedup_vs_pandera": ratio(pandera_s),
            "speedup_vs_pandas": ratio(pandas_s), "planted_found": f"{found[ev_name]}/{len(plants)}"}
    if big:
        line.update(peak_rss_mb_10m=round(big["peak_mb"]), ingest_seconds_10m=round(big["seconds"], 1))
    print(json.dumps(line))


if __name__ == "__main__":
    main()
