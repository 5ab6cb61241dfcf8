"""Batch-scoring benchmark: `everloop predict` against what users write instead, in one run.

What is compared. One model -- the demo's churn classifier (15 features: 9 numeric, 6 categorical; a
scikit-learn Pipeline of imputation, scaling, one-hot encoding and a 200-tree
HistGradientBoostingClassifier), built with everloop's Python API in a temporary project as
bench/serve.py builds it (ingest, train, promote) -- scores one Parquet file of the demo's columns
(10M rows by default: id, timestamp and the 15 features, no label; made by the scenario's own
generator, `make_churn`, in blocks of 1M rows written one at a time with a ParquetWriter). Each tool
runs alone, as a child process, from its start to its exit (imports, model loading, Ray's start-up:
everything the user waits for), and writes the id, the timestamp, the predicted class and each class's
probability:

    plain          the script a user writes, in everloop's venv: the fitted pipeline (pickled),
                   `pd.read_parquet` of the whole file, `pipeline.predict_proba`, `to_parquet`
    ray_plain      Ray Data with the same pipeline, in its own venv: `read_parquet`, `map_batches` with a
                   callable class that loads the pipeline once per actor (2 actors, pandas batches of
                   --ray-batch-rows), `write_parquet`; a new local Ray of 2 CPUs on 127.0.0.1
    everloop       `everloop predict IN OUT --no-log` (the local engine; the headline)
    everloop_log   `everloop predict IN OUT --log` (the prediction log written too: logging_cost)
    everloop_ray   `everloop predict IN OUT --engine ray --no-log` (everloop's Ray engine)

Before the measured runs, `everloop predict` runs once untimed on the file's first rows: the first run of
a model version compiles its trees to native code and caches them in the store (as `everloop serve`
does), and every measured everloop run should find the same cache (its seconds are printed, `warmup_s`).

The peers get everloop's fitted pipeline, exported as bench/serve.py exports it (its one everloop
function replaced by equivalent fitted SimpleImputers, checked to give identical probabilities), so they
need no everloop. A run counts as agreeing when it scored every row once, its predicted classes equal
the plain script's and its probabilities are within 1e-6 (everloop may use compiled trees: the largest
difference is reported). An option that `everloop predict --help` does not offer yet (--log/--no-log,
--engine) is skipped with a message and its figures are null.

Memory: the peak RSS of each child (its VmHWM, polled; not ru_maxrss, which counts pages shared with
this process at fork time); for the Ray runs also the largest summed RSS of the child and every process
under it (Ray's workers and servers; shared pages count once per process, so it overstates), and the
addresses those processes listened on (from `ss`), which should all be loopback. Children run with this
shell's environment (no OMP_NUM_THREADS unless you set one: scikit-learn's default threads, as a user
gets them); this process trains the model with OMP_NUM_THREADS=1.

Run:
    .venv/bin/python bench/batch.py                 # 10M rows (tens of minutes: each tool scores the file)
    .venv/bin/python bench/batch.py --quick         # 1M rows
    .venv/bin/python bench/batch.py --rows 200000 --tools plain,everloop    # a subset while developing

The last line printed is one JSON object: rows_per_s (everloop's local engine, log off),
speedup_vs_plain and speedup_vs_ray_plain (everloop's rows/s over each peer's), peak_rss_mb (everloop's),
plain_peak_rss_mb, ray_engine_ratio (everloop's Ray engine rows/s over its local engine's) and
logging_cost (1 - rows/s with --log over rows/s without).
"""

from __future__ import annotations

import os

# The children get the environment as it was (see the docstring); only the training in this process is
# pinned to one OpenMP thread (HistGradientBoosting's default threads crawl on a busy 2-core machine).
CHILD_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0"),
             "COLUMNS": "200"}
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers
import serve as serve_bench  # the model fixture, machine and version helpers

BLOCK = 1_000_000  # rows generated and written at a time
SEED = 2026
FIRST = "2026-03-01T00:00:00Z"  # the scored rows' first timestamp, after the training history
KEEP = ["customer_id", "event_time"]  # the id and timestamp columns every tool copies through
TOOLS = ["plain", "ray_plain", "everloop", "everloop_log", "everloop_ray"]
LABELS = {"plain": "plain script (pandas + sklearn)", "ray_plain": "Ray Data map_batches (sklearn)",
          "everloop": "everloop predict (local, log off)", "everloop_log": "everloop predict --log",
          "everloop_ray": "everloop predict --engine ray"}
TOLERANCE = 1e-6


def ray_packages() -> tuple[list[str], str]:
    """The Ray peer's pip packages and import probe: Ray Data pinned to the Ray of everloop's venv when it
    has one (Ray against Ray), and the scikit-learn that fitted the pipeline (it is unpickled there)."""
    sk = metadata.version("scikit-learn")
    try:
        ray = f"ray[data]=={metadata.version('ray')}"
    except metadata.PackageNotFoundError:
        ray = "ray[data]"
    probe = f"import ray, ray.data, pandas, pyarrow, sklearn; assert sklearn.__version__ == {sk!r}"
    if "==" in ray:
        probe += f"; assert ray.__version__ == {ray.split('==')[1]!r}"
    return [ray, "pandas", "pyarrow", f"scikit-learn=={sk}"], probe


# -- the input file -------------------------------------------------------------------------------------


def write_input(path: Path, rows: int) -> None:
    """`rows` rows of the demo's columns (no label), made and written BLOCK rows at a time; customer ids
    are C + the row number (zero-padded), which the agreement check uses to match rows."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from everloop.demo import make_churn

    writer = None
    try:
        for b in range(0, rows, BLOCK):
            frame = make_churn(min(BLOCK, rows - b), seed=SEED + b // BLOCK, id_offset=b,
                               start=pd.Timestamp(FIRST) + pd.Timedelta(minutes=b))
            table = pa.Table.from_pandas(frame.drop(columns=["churned"]), preserve_index=False)
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


# -- agreement with the plain script ----------------------------------------------------------------------


class Reference:
    """The plain script's answers by row (row = the number in the customer id): class index and each
    class's probability; then `compare(output)` checks another tool's output against them."""

    def __init__(self, rows: int, output: Path):
        import numpy as np

        self.rows = rows
        names = _columns(output)
        self.classes = [c[len("proba_"):] for c in names if c.startswith("proba_")]
        self.proba = np.full((rows, len(self.classes)), np.nan)
        self.label = np.full(rows, -1, dtype=np.int16)
        for idx, label, proba in self._batches(output):
            self.label[idx] = label
            self.proba[idx] = proba

    def _batches(self, output: Path):
        """(row numbers, class index of the prediction (-1: not a class), probabilities) per record batch."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        columns = ["customer_id", "prediction"] + [f"proba_{c}" for c in self.classes]
        for batch in ds.dataset(output, format="parquet").to_batches(columns=columns, batch_size=BLOCK):
            ids = batch.column("customer_id")
            idx = pc.cast(pc.utf8_slice_codeunits(ids, 1), pa.int64()).to_numpy()
            if len(idx) and (idx.min() < 0 or idx.max() >= self.rows):
                raise ValueError(f"{output}: customer ids outside the input's rows")
            label = pc.index_in(pc.cast(batch.column("prediction"), pa.string()), value_set=pa.array(self.classes))
            label = label.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int16)
            proba = np.column_stack([batch.column(f"proba_{c}").to_numpy(zero_copy_only=False)
                                     for c in self.classes])
            yield idx, label, proba

    def compare(self, output: Path) -> dict[str, Any]:
        """{"rows": rows read, "missing"/"duplicated": rows scored 0 or 2+ times, "label_mismatches",
        "max_proba_diff", "agrees": every row once, same classes, probabilities within TOLERANCE}."""
        import numpy as np

        seen = np.zeros(self.rows, dtype=np.int64)
        read, mismatches, worst = 0, 0, 0.0
        for idx, label, proba in self._batches(output):
            read += len(idx)
            seen += np.bincount(idx, minlength=self.rows)
            mismatches += int(np.count_nonzero(label != self.label[idx]))
            if len(idx):
                # a NaN on either side (a row the reference lacks, a broken output) is a disagreement
                worst = max(worst, float(np.nan_to_num(np.abs(proba - self.proba[idx]), nan=np.inf).max()))
        missing, duplicated = int(np.count_nonzero(seen == 0)), int(np.count_nonzero(seen > 1))
        return {"rows": read, "missing": missing, "duplicated": duplicated, "label_mismatches": mismatches,
                "max_proba_diff": worst,
                "agrees": not missing and not duplicated and not mismatches and worst <= TOLERANCE}


def _columns(output: Path) -> list[str]:
    import pyarrow.dataset as ds

    return ds.dataset(output, format="parquet").schema.names


# -- the runs ----------------------------------------------------------------------------------------------


def everloop_options() -> str:
    everloop = serve_bench._everloop_bin()
    done = subprocess.run([everloop, "predict", "--help"], capture_output=True, text=True, env=CHILD_ENV,
                          check=False)
    return done.stdout + done.stderr


def commands(work: Path, source: Path, fixture, help_text: str, args, ray_python: Path | None
             ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The command line of each tool to run, and why each other one is skipped."""
    meta = work / "meta.json"
    meta.write_text(json.dumps({"features": fixture.names, "keep": KEEP}))
    model = fixture.model_dir / "model.pkl"
    peers = str(Path(_peers.__file__))
    everloop = [serve_bench._everloop_bin(), "predict", str(source)]
    project = ["--project", str(fixture.project), "--json"]
    has_log = "--no-log" in help_text
    runs: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    runs["plain"] = [sys.executable, peers, "plain", str(model), str(meta), str(source), str(work / "plain.parquet")]
    if ray_python is not None:
        runs["ray_plain"] = [str(ray_python), peers, "ray", str(model), str(meta), str(source),
                             str(work / "ray_plain"), str(args.cpus), str(args.ray_batch_rows), str(work / "ray")]
    runs["everloop"] = everloop + [str(work / "everloop.parquet")] + project + (["--no-log"] if has_log else [])
    if has_log:
        runs["everloop_log"] = everloop + [str(work / "everloop_log.parquet")] + project + ["--log"]
    else:
        # TODO(issue 14): measured once `everloop predict` has --log/--no-log.
        skipped["everloop_log"] = "`everloop predict` has no --log/--no-log yet: logging_cost is null"
    if "--engine" in help_text:
        extra = next(([flag, str(args.cpus)] for flag in ("--num-cpus", "--cpus") if flag in help_text), [])
        runs["everloop_ray"] = (everloop + [str(work / "everloop_ray.parquet")] + project + ["--engine", "ray"]
                                + extra + (["--no-log"] if has_log else []))
    else:
        skipped["everloop_ray"] = "`everloop predict` has no --engine yet: ray_engine_ratio is null"
    return runs, skipped


def check(key: str, output: Path, rows: int, results: dict, checks: dict, reference_box: list, say) -> None:
    """Check `output` against the reference; the first output checked becomes the reference (the plain
    script's when it ran, as it runs first)."""
    if not reference_box:
        reference_box.append(Reference(rows, output))
        results[key]["reference"] = True
        if key != "plain":
            say(f"  (the agreement reference: {LABELS[key]}, since the plain script did not run)")
        return
    try:
        c = checks[key] = reference_box[0].compare(output)
    except (KeyError, ValueError, OSError) as exc:  # a column missing, ids not the input's: no agreement
        checks[key] = {"rows": None, "missing": None, "duplicated": None, "label_mismatches": None,
                       "max_proba_diff": None, "agrees": False,
                       "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        say(f"  cannot compare with the reference: {checks[key]['error']}")
        return
    say(f"  agrees with the reference: {'yes' if c['agrees'] else 'NO'}: max |dp| {c['max_proba_diff']:.2e}, "
        f"{c['label_mismatches']} class differences, {c['missing']} rows missing, {c['duplicated']} twice")


def outputs(work: Path) -> dict[str, Path]:
    return {"plain": work / "plain.parquet", "ray_plain": work / "ray_plain", "everloop": work / "everloop.parquet",
            "everloop_log": work / "everloop_log.parquet", "everloop_ray": work / "everloop_ray.parquet"}


def last_json(text: str) -> Any:
    """The JSON a worker or `everloop --json` printed: the whole output, else its last line that parses."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def run_tool(key: str, command: list[str], work: Path, rows: int, args, say) -> dict[str, Any]:
    say(f"{LABELS[key]}:")
    shown = " ".join(command).replace(str(work), "$TMP").replace(str(Path(__file__).resolve().parent), "bench")
    say(f"  $ {shown}")
    ray = key in ("ray_plain", "everloop_ray")
    env = CHILD_ENV | ({"RAY_TMPDIR": str(work / "ray")} if ray else {})
    result = _peers.run_measured(command, env=env, cap_mb=args.rss_cap_mb, timeout_s=args.timeout_s, tree=ray,
                                 cwd=work)
    result["report"] = last_json(result["stdout"])
    if result["killed"] or result["rc"] != 0:
        why = result["killed"] or f"exit {result['rc']}"
        result["error"] = f"{why}\n{(result['stderr'] or result['stdout']).strip()[-1500:]}"
        say(f"  FAILED ({why}) after {result['seconds']:.1f} s; stderr (end):\n"
            + "\n".join("    " + ln for ln in result["stderr"].strip().splitlines()[-15:]))
        return result
    result["rows_per_s"] = rows / result["seconds"]
    tree = f", tree {result['tree_peak_mb']:,.0f} MB" if ray else ""
    say(f"  {result['seconds']:.1f} s, {result['rows_per_s']:,.0f} rows/s, peak RSS {result['peak_mb']:,.0f} MB{tree}"
        + (f"; {notes(key, result)}" if notes(key, result) else ""))
    return result


def notes(key: str, result: dict[str, Any]) -> str:
    report = result.get("report") or {}
    if key == "plain" and "read_s" in report:
        return (f"load {report['load_s']:.1f} s, read {report['read_s']:.1f} s, predict {report['predict_s']:.1f} s, "
                f"write {report['write_s']:.1f} s")
    if key == "ray_plain" and "init_s" in report:
        return (f"ray.init {report['init_s']:.1f} s, dataset {report['run_s']:.1f} s, "
                f"shutdown {report['shutdown_s']:.1f} s")
    if key.startswith("everloop") and isinstance(report, dict):
        parts = [f"{k} {report[k]:,}" for k in ("rows", "rejected", "logged") if isinstance(report.get(k), int)]
        if "compiled" in report:
            parts.append("compiled trees" if report["compiled"] else "scikit-learn trees")
        return ", ".join(parts)
    return ""


def warm_up(work: Path, fixture, rows: int, no_log: bool, say) -> float | None:
    """Run `everloop predict` once, untimed in the results, on the first rows of the input (enough for it to
    compile the model's trees: it does that once per model version, on inputs of at least COMPILE_ROWS rows,
    and caches the library in the store, as `everloop serve` does), so that every measured everloop run
    finds the same cache. Returns its seconds (None when it failed: the measured runs then say why)."""
    try:
        from everloop.batch._score import COMPILE_ROWS
    except ImportError:  # an everloop without the threshold: compiles whenever it compiles
        COMPILE_ROWS = 200_000
    n = min(rows, max(COMPILE_ROWS, 1000))
    source = work / "warmup.parquet"
    write_input(source, n)
    command = [serve_bench._everloop_bin(), "predict", str(source), str(work / "warmup_out.parquet"),
               "--project", str(fixture.project), "--json"]
    if no_log:
        command.append("--no-log")
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=CHILD_ENV, check=False)
    seconds = time.perf_counter() - start
    source.unlink()
    (work / "warmup_out.parquet").unlink(missing_ok=True)
    if done.returncode != 0:
        say(f"everloop warm-up ({n:,} rows) failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
        return None
    say(f"everloop warm-up: {n:,} rows in {seconds:.1f} s (the first run of a model version compiles its trees "
        "and caches them in the store; the measured runs below reuse them)")
    return seconds


# -- the report ----------------------------------------------------------------------------------------------


def table(results: dict[str, dict], checks: dict[str, dict]) -> str:
    ever = results.get("everloop", {}).get("rows_per_s")
    out = ["| tool | seconds | rows/s | peak RSS MB | tree RSS MB | everloop rows/s / this | agrees | notes |",
           "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for key, r in results.items():
        if "skipped" in r:
            out.append(f"| {LABELS[key]} | skipped | | | | | | {r['skipped']} |")
            continue
        if "error" in r:
            why = r["error"].splitlines()[0][:120]
            out.append(f"| {LABELS[key]} | failed | | {r['peak_mb']:,.0f} | | | | {why} |")
            continue
        tree = f"{r['tree_peak_mb']:,.0f}" if "tree_peak_mb" in r else ""
        ratio = f"{ever / r['rows_per_s']:.2f}x" if ever else "-"
        c = checks.get(key)
        agrees = ("reference" if r.get("reference") else "-" if c is None else
                  f"NO ({c['error'][:80]})" if "error" in c else
                  f"{'yes' if c['agrees'] else 'NO'} (max dp {c['max_proba_diff']:.1e}, "
                  f"{c['label_mismatches']} label diffs"
                  + (f", {c['missing']} missing, {c['duplicated']} twice" if c["missing"] or c["duplicated"] else "")
                  + ")")
        out.append(f"| {LABELS[key]} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} | {r['peak_mb']:,.0f} | {tree} | "
                   f"{ratio} | {agrees} | {notes(key, r)} |")
    return "\n".join(out)


def headline(rows: int, quick: bool, repeat: int, results: dict[str, dict],
             checks: dict[str, dict]) -> dict[str, Any]:
    def rps(key: str) -> float | None:
        return results.get(key, {}).get("rows_per_s")

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    ever = rps("everloop")
    line: dict[str, Any] = {"bench": "batch", "rows": rows, "quick": quick, "repeat": repeat,
                            "rows_per_s": ever and round(ever),
                            "speedup_vs_plain": ratio(ever, rps("plain")),
                            "speedup_vs_ray_plain": ratio(ever, rps("ray_plain")),
                            "peak_rss_mb": _mb(results.get("everloop")),
                            "plain_peak_rss_mb": _mb(results.get("plain")),
                            "ray_engine_ratio": ratio(rps("everloop_ray"), ever),
                            "logging_cost": (round(1 - rps("everloop_log") / ever, 3)
                                             if ever and rps("everloop_log") else None),
                            "rows_per_s_log": rps("everloop_log") and round(rps("everloop_log")),
                            "peer_rows_per_s": {k: rps(k) and round(rps(k)) for k in ("plain", "ray_plain")},
                            "seconds": {k: round(r["seconds"], 1) for k, r in results.items() if "seconds" in r},
                            "peak_rss": {k: _mb(r) for k, r in results.items() if "peak_mb" in r},
                            "tree_rss": {k: round(r["tree_peak_mb"]) for k, r in results.items()
                                         if "tree_peak_mb" in r},
                            "agrees": {k: c["agrees"] for k, c in checks.items()},
                            "max_proba_diff": {k: c["max_proba_diff"] for k, c in checks.items()},
                            "label_mismatches": {k: c["label_mismatches"] for k, c in checks.items()}}
    beyond = sorted({a for r in results.values() for a in r.get("listening", []) if not _peers.loopback_only(a)})
    line["listening_beyond_loopback"] = beyond
    failed = {k: r["error"].splitlines()[0][:200] for k, r in results.items() if "error" in r}
    skipped = {k: r["skipped"] for k, r in results.items() if "skipped" in r}
    if failed:
        line["failed"] = failed
    if skipped:
        line["skipped"] = skipped
    return line


def _mb(result: dict | None) -> int | None:
    return round(result["peak_mb"]) if result and "peak_mb" in result and "error" not in result else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1M rows (default 10M)")
    parser.add_argument("--rows", type=int, help="rows of the scored file (overrides --quick)")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the Ray runs (default 2)")
    parser.add_argument("--ray-batch-rows", type=int, default=100_000,
                        help="rows per map_batches call of the Ray peer (default 100000, everloop's chunk)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every tool, best time kept (default 1; 2+ on a noisy machine)")
    parser.add_argument("--rss-cap-mb", type=float, default=16000, help="a child is killed past this RSS")
    parser.add_argument("--timeout-s", type=float, default=7200, help="a child is killed past this time")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (input, outputs, project)")
    args = parser.parse_args()
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tool(s) {', '.join(sorted(unknown))}; choose from {', '.join(TOOLS)}")
    if args.rows is not None and args.rows < 1:
        parser.error("--rows must be at least 1")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    rows = args.rows or (1_000_000 if args.quick else 10_000_000)

    def say(text: str) -> None:
        print(text, flush=True)

    info = serve_bench.machine()
    say(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM, {info['os']}; "
        f"load average {info['load'][0]:.2f} / {info['load'][1]:.2f} / {info['load'][2]:.2f}")
    if info["load"][0] > 0.5:
        say("  note: the machine is not idle (load average above 0.5): the numbers below will be noisy")
    mine = serve_bench.venv_versions(sys.executable, ["everloop", "pandas", "numpy", "pyarrow", "scikit-learn",
                                                      "treelite", "tl2cgen", "ray"])
    say("everloop venv: " + ", ".join(f"{k} {v}" for k, v in mine.items()))

    install: dict[str, Any] = {}
    ray_python, ray_broken = None, None
    if "ray_plain" in tools:
        packages, probe = ray_packages()
        try:
            ray_python, spent = _peers.ensure_venv("ray", packages, probe)
            install["ray"] = {"install_s": round(spent, 1) if spent else None,
                              "mb": serve_bench.dir_mb(ray_python.parent.parent)}
            versions = serve_bench.venv_versions(ray_python, ["ray", "pandas", "numpy", "pyarrow", "scikit-learn"])
            say(f"ray venv ({f'installed in {spent:.0f} s' if spent else 'cached'}, {install['ray']['mb']} MB): "
                + ", ".join(f"{k} {v}" for k, v in versions.items()))
        except (subprocess.CalledProcessError, OSError) as exc:
            ray_broken = f"install failed: {exc}"
            say(f"ray: install FAILED ({exc})")

    work = Path(tempfile.mkdtemp(prefix="everloop-bench-batch-"))
    (work / "ray").mkdir()
    try:
        started = time.perf_counter()
        say("building the model: demo churn data (10,000 rows), ingest, train, promote ...")
        fixture = serve_bench.build_fixture(work)
        say(f"  model v{fixture.model_version} in {time.perf_counter() - started:.0f} s; exported for the peers "
            f"(identical probabilities); {len(fixture.names)} features; {work}")
        source = work / "input.parquet"
        started = time.perf_counter()
        write_input(source, rows)
        say(f"input: {rows:,} rows x {len(fixture.names) + len(KEEP)} columns (id, timestamp, 15 features), "
            f"{source.stat().st_size / 1e6:,.0f} MB of Parquet, written in {time.perf_counter() - started:.0f} s")

        help_text = everloop_options()
        runs, skipped = commands(work, source, fixture, help_text, args, ray_python)
        warmup = None
        if any(k.startswith("everloop") for k in runs if k in tools):
            warmup = warm_up(work, fixture, rows, "--no-log" in help_text, say)
        if ray_broken:
            skipped["ray_plain"] = ray_broken
        results: dict[str, dict] = {}
        checks: dict[str, dict] = {}
        reference_box: list[Reference] = []  # the reference, once a first tool has run
        order = [t for t in TOOLS if t in tools]
        for key in order:
            if key not in runs:
                results[key] = {"skipped": skipped.get(key, "not run")}
                say(f"{LABELS[key]}: skipped: {results[key]['skipped']}")
        for round_ in range(args.repeat):
            if args.repeat > 1:
                say(f"-- round {round_ + 1} of {args.repeat}")
            for key in [k for k in order if k in runs and "error" not in results.get(k, {})]:
                result = run_tool(key, runs[key], work, rows, args, say)
                output = outputs(work)[key]
                if key in results:  # a later round: the best time, the largest peak
                    best = results[key]
                    if "error" in result:
                        results[key] = result | {"reference": best.get("reference", False)}
                    else:
                        results[key] = min(best, result, key=lambda r: r["seconds"]) | {
                            "peak_mb": max(best["peak_mb"], result["peak_mb"]),
                            **({"tree_peak_mb": max(best["tree_peak_mb"], result["tree_peak_mb"])}
                               if "tree_peak_mb" in result else {}),
                            **({"listening": sorted(set(best["listening"]) | set(result["listening"]))}
                               if "listening" in result else {}),
                            "reference": best.get("reference", False)}
                else:
                    results[key] = result
                    if "error" not in result:
                        check(key, output, rows, results, checks, reference_box, say)
                # the answers are in memory (or checked): free the disk as we go
                shutil.rmtree(output, ignore_errors=True) if output.is_dir() else output.unlink(missing_ok=True)

        results = {k: results[k] for k in order if k in results}
        say("")
        best = f"; best of {args.repeat} rounds" if args.repeat > 1 else ""
        say(f"## Results: {rows:,} rows, each tool from start to exit (rows/s = rows / those seconds{best})")
        say("")
        say(table(results, checks))
        say("")
        line = headline(rows, args.quick, args.repeat, results, checks)
        line["warmup_s"] = warmup and round(warmup, 1)
        line["install"] = install
        if line["listening_beyond_loopback"]:
            say(f"note: the Ray runs listened beyond loopback: {', '.join(line['listening_beyond_loopback'])}")
        bars = [("everloop rows/s >= 2x the plain script's", line["speedup_vs_plain"], lambda v: v >= 2),
                ("everloop peak RSS < 1 GB", line["peak_rss_mb"], lambda v: v < 1024),
                ("logging cost <= 10%", line["logging_cost"], lambda v: v <= 0.10)]
        for text, value, ok in bars:
            say(f"bar: {text}: {'-' if value is None else value} -> "
                f"{'n/a' if value is None else 'PASS' if ok(value) else 'FAIL'}")
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
