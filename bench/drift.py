"""Drift benchmark: everloop's data-drift detection against Evidently's data-drift preset and a plain
scipy KS/chi-square pass, in one run.

The data. A reference frame and a current frame of 1M rows each (`--quick`: 200k + 200k), 25 columns:
20 numeric of mixed distributions (normal, lognormal, uniform, Poisson ints, exponential, in turn)
and 5 categorical strings with 3, 5, 7, 9 and 12 categories. The current frame is drawn from the same
distributions as the reference (other random draws), except for exactly 7 planted shifts:

    num_00  normal       mean +0.2 sd
    num_06  lognormal    mean -0.3 sd (values moved down by 0.3 sd)
    num_12  uniform      scale x1.3 around its centre (mean unchanged)
    num_08  Poisson      mean +0.5 sd (rate 9 -> 10.5; still integers)
    num_19  exponential  scale x1.5 (mean and sd x1.5)
    cat_1   5 categories moderate reweighting: 0.09 of probability moved from the most frequent category
                         to the two rarest (total variation distance 0.09)
    cat_3   9 categories larger reweighting: 0.20 moved from the two most frequent to the three rarest (TV 0.20)

The other 18 columns are stable. Both frames go through Parquet files that every tool reads, so all
see the same data (the reads are never timed).

The tools.
* everloop: `DriftDetector()` with its defaults, `fit(reference, kinds)` then `score(current)`; timed as
  fit + score (the headline), and score alone with the fitted detector (in production the reference
  profile is stored with the model, so a window costs only the score). Its own dataset verdict.
* plain scipy: `scipy.stats.ks_2samp` on each numeric column, `scipy.stats.chi2_contingency` on the
  category counts (pandas `value_counts`) of each categorical column, from the same in-memory frames;
  a column is flagged at p < 0.05. Dataset verdict: share of flagged columns >= 0.2 (scipy has no
  rule of its own; 0.2 is everloop's default share, here with >=; the share is printed too).
* Evidently 0.7 (its own venv bench/.venvs/evidently, pandas<3 there: Evidently 0.7 does not import
  under pandas 3), in a subprocess: `Dataset.from_pandas(frame, data_definition=DataDefinition(
  numerical_columns=..., categorical_columns=...))` for each frame (not in the headline time, printed
  apart), then `Report([DataDriftPreset()], include_tests=True).run(current_data=..., reference_data=...)`
  timed. Its per-column flags are its ValueDrift tests and its dataset verdict the preset's
  DriftedColumnsCount test (drift when the share of drifted columns >= drift_share, 0.5 by default);
  `include_tests=True` only turns those verdicts into test results. Best of 3 when one run takes under
  20 s, else one run.

Each in-process tool is timed best of 3. "Extra MB" is the peak RSS during a run above the RSS before it
(reset through /proc/self/clear_refs), measured for everloop and scipy in one run each in a fresh
subprocess (`--memory-probe`: in the benchmark process, memory freed by earlier runs stays with the
allocator and hides what a later run needs); Evidently's is the largest of its runs in its worker,
whose first run is in a fresh process too. A planted shift is found when the tool flags its column; a
false positive is a stable column flagged. `speedup_vs_*` is the peer's seconds over everloop's fit +
score seconds.

Run: .venv/bin/python bench/drift.py [--quick]    (the last line printed is one JSON object)
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
import scipy
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers

SEED = 20240607
DISTS = ["normal", "lognormal", "uniform", "poisson", "exponential"]
NUMERIC = [f"num_{i:02d}" for i in range(20)]
CATEGORICAL = {f"cat_{i}": k for i, k in enumerate([3, 5, 7, 9, 12])}
CAT_PROBS = {c: np.random.default_rng([SEED, 9, i]).dirichlet(np.full(k, 4.0)) for i, (c, k) in enumerate(CATEGORICAL.items())}
KINDS = {**{c: "numeric" for c in NUMERIC}, **{c: "categorical" for c in CATEGORICAL}}
# column -> (kind of shift, size): numeric "mean" in standard deviations, "scale" as a factor;
# categorical "reweight" as (probability mass moved, from the n most frequent, to the m rarest).
SHIFTS = {
    "num_00": ("mean", 0.2),
    "num_06": ("mean", -0.3),
    "num_12": ("scale", 1.3),
    "num_08": ("mean", 0.5),
    "num_19": ("scale", 1.5),
    "cat_1": ("reweight", (0.09, 1, 2)),
    "cat_3": ("reweight", (0.20, 2, 3)),
}
SCIPY_ALPHA = 0.05
SCIPY_SHARE = 0.2
EVIDENTLY = ["evidently>=0.7,<0.8", "pandas<3", "pyarrow"]
EVIDENTLY_PROBE = "import evidently, pyarrow; from evidently import Report, Dataset, DataDefinition; from evidently.presets import DataDriftPreset"


# -- data ------------------------------------------------------------------------------------------


def dist_of(name: str) -> tuple[str, int]:
    i = int(name.split("_")[1])
    return DISTS[i % len(DISTS)], i


def sd_of(name: str) -> float:
    """The population standard deviation of a numeric column's reference distribution."""
    kind, i = dist_of(name)
    if kind == "normal":
        return 1.0 + i
    if kind == "lognormal":
        s2 = (0.5 + i / 40) ** 2
        return float(np.sqrt((np.exp(s2) - 1) * np.exp(s2)))
    if kind == "uniform":
        return (2 * i + 1) / np.sqrt(12)
    if kind == "poisson":
        return float(np.sqrt(1.0 + i))
    return 1.0 + i


def reweighted(p: np.ndarray, mass: float, n_from: int, n_to: int) -> np.ndarray:
    """`mass` of probability moved from the n_from most frequent categories (in proportion) to the n_to
    rarest (equally): the total variation distance is exactly `mass`."""
    order = np.argsort(p)
    top, bottom = order[-n_from:], order[:n_to]
    q = p.copy()
    q[top] -= mass * p[top] / p[top].sum()
    q[bottom] += mass / n_to
    assert (q > 0).all() and abs(q.sum() - 1) < 1e-12
    return q


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance, natural log (scipy.spatial.distance.jensenshannon's default, as Evidently)."""
    m = 0.5 * (p + q)
    kl = lambda x, y: float(np.sum(x * np.log(x / y)))
    return float(np.sqrt(0.5 * kl(p, m) + 0.5 * kl(q, m)))


def draw(rng: np.random.Generator, n: int, shifted: bool) -> pd.DataFrame:
    cols: dict[str, np.ndarray] = {}
    for name in NUMERIC:
        kind, i = dist_of(name)
        shift = SHIFTS.get(name) if shifted else None
        if kind == "normal":
            x = rng.normal(10.0 * i, 1.0 + i, n)
            centre = 10.0 * i
        elif kind == "lognormal":
            x = rng.lognormal(0.0, 0.5 + i / 40, n)
            centre = float(np.exp((0.5 + i / 40) ** 2 / 2))
        elif kind == "uniform":
            x = rng.uniform(-i, i + 1.0, n)
            centre = 0.5
        elif kind == "poisson":
            lam = 1.0 + i
            if shift and shift[0] == "mean":  # a higher rate, so the values stay integers
                lam += shift[1] * np.sqrt(lam)
                shift = None
            x = rng.poisson(lam, n).astype(np.int64)
            centre = 1.0 + i
        else:
            x = rng.exponential(1.0 + i, n)
            centre = 0.0  # scale changes of an exponential multiply its values
        if shift and shift[0] == "mean":
            x = x + shift[1] * sd_of(name)
        elif shift and shift[0] == "scale":
            x = centre + (x - centre) * shift[1]
        cols[name] = x
    for name, k in CATEGORICAL.items():
        p = CAT_PROBS[name]
        if shifted and name in SHIFTS:
            p = reweighted(p, *SHIFTS[name][1])
        cols[name] = rng.choice(np.array([f"{name}_v{j}" for j in range(k)], dtype=object), n, p=p)
    return pd.DataFrame(cols)


def describe_shift(name: str) -> str:
    kind, size = SHIFTS[name]
    if kind == "reweight":
        mass, n_from, n_to = size
        p = CAT_PROBS[name]
        q = reweighted(p, *size)
        return (f"{len(p)} categories, {mass:.2f} moved from the {n_from} most frequent to the {n_to} rarest: "
                f"TV {0.5 * np.abs(p - q).sum():.3f}, JS {js_distance(p, q):.3f}")
    dist, i = dist_of(name)
    if kind == "mean":
        extra = f" (rate {1 + i:g} -> {1 + i + size * np.sqrt(1 + i):g})" if dist == "poisson" else ""
        return f"{dist}, mean {size:+.1f} sd{extra}"
    return f"{dist}, scale x{size:g}" + (" around its centre" if dist != "exponential" else " (mean and sd too)")


def short_shift(name: str) -> str:
    if name not in SHIFTS:
        return "-" if name in CATEGORICAL else f"- ({dist_of(name)[0]})"
    kind, size = SHIFTS[name]
    if kind == "reweight":
        return f"reweighted, TV {size[0]:.2f}"
    return f"{dist_of(name)[0]} " + (f"mean {size:+.1f} sd" if kind == "mean" else f"scale x{size:g}")


# -- the tools -------------------------------------------------------------------------------------


def everloop_run(reference: pd.DataFrame, current: pd.DataFrame):
    from everloop.monitor import DriftDetector

    return DriftDetector().fit(reference, KINDS).score(current)


def scipy_pass(reference: pd.DataFrame, current: pd.DataFrame) -> dict[str, dict]:
    """KS for numeric, chi-square on the category counts for categorical; flagged at p < 0.05."""
    out = {}
    for name in NUMERIC:
        res = stats.ks_2samp(reference[name].to_numpy(), current[name].to_numpy())
        out[name] = {"statistic": float(res.statistic), "p_value": float(res.pvalue)}
    for name in CATEGORICAL:
        counts = pd.concat([reference[name].value_counts(), current[name].value_counts()], axis=1).fillna(0)
        chi2, p_value, _, _ = stats.chi2_contingency(counts.to_numpy().T)
        out[name] = {"statistic": float(chi2), "p_value": float(p_value)}
    for r in out.values():
        r["drifted"] = r["p_value"] < SCIPY_ALPHA
    return out


def run_evidently(python: Path, ref_path: Path, cur_path: Path, tmp: Path) -> dict:
    columns = tmp / "columns.json"
    columns.write_text(json.dumps({"numerical": NUMERIC, "categorical": list(CATEGORICAL)}))
    proc = subprocess.run([str(python), str(Path(_peers.__file__)), "evidently", str(ref_path), str(cur_path),
                           str(columns), "--repeat-under", "20"], capture_output=True, text=True, timeout=3600,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"Evidently worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_probe(tool: str, ref_path: str, cur_path: str) -> dict:
    """One run of `tool` in this (fresh) process: its extra peak RSS, free of what earlier runs left in the
    allocator (glibc keeps freed memory and raises its mmap threshold, so a second run in a process that
    already ran something big shows less than it needs)."""
    reference, current = pd.read_parquet(ref_path), pd.read_parquet(cur_path)
    fitted = None
    if tool == "everloop_score":
        from everloop.monitor import DriftDetector
        fitted = DriftDetector().fit(reference, KINDS)
    fn = {"everloop": lambda: everloop_run(reference, current), "everloop_score": lambda: fitted.score(current),
          "scipy": lambda: scipy_pass(reference, current)}[tool]
    gc.collect()
    base = _peers.rss_reset()
    fn()
    return {"extra_mb": _peers.rss_extra_mb(base)}


def probe(tool: str, ref_path: Path, cur_path: Path) -> float | None:
    proc = subprocess.run([sys.executable, __file__, "--memory-probe", tool, str(ref_path), str(cur_path)],
                          capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        print(f"memory probe {tool} failed: {proc.stderr[-1500:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["extra_mb"]


# -- main ------------------------------------------------------------------------------------------


def machine() -> str:
    cpuinfo, meminfo = Path("/proc/cpuinfo").read_text(), Path("/proc/meminfo").read_text()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    mem = next((int(ln.split()[1]) for ln in meminfo.splitlines() if ln.startswith("MemTotal")), 0)
    load = os.getloadavg()
    return (f"machine: {cpu}, {os.cpu_count()} cores, {mem / 1024**2:.1f} GB RAM, {platform.platform()}; "
            f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
            + ("\n  note: the machine is not idle (load average above 0.5): the times below will be noisy"
               if load[0] > 0.5 else ""))


def dir_mb(path: Path) -> int:
    out = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=False)
    return int(out.stdout.split()[0]) if out.returncode == 0 else -1


def tally(flags: dict[str, bool] | None) -> tuple[int, list[str], list[str]]:
    """(shifts found, shifted columns missed, stable columns flagged)."""
    if flags is None:
        return 0, list(SHIFTS), []
    missed = [c for c in SHIFTS if not flags.get(c)]
    false = [c for c in KINDS if c not in SHIFTS and flags.get(c)]
    return len(SHIFTS) - len(missed), missed, false


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200k + 200k rows")
    ap.add_argument("--rows", type=int, help="rows of each frame (default 1M, --quick 200k)")
    ap.add_argument("--no-evidently", action="store_true", help="skip Evidently (while developing)")
    ap.add_argument("--memory-probe", nargs=3, metavar=("TOOL", "REF", "CUR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(*args.memory_probe)))
        return
    rows = args.rows or (200_000 if args.quick else 1_000_000)

    print(machine())
    evidently_python, install = None, None
    if not args.no_evidently:
        try:
            evidently_python, install_s = _peers.ensure_venv("evidently", EVIDENTLY, EVIDENTLY_PROBE)
            install = {"install_s": round(install_s, 1) if install_s else None,
                       "mb": dir_mb(evidently_python.parent.parent)}
            print(f"evidently venv: {evidently_python.parent.parent} ({install['mb']} MB"
                  + (f", installed in {install_s:.1f} s)" if install_s else ", cached)"))
        except Exception as exc:  # noqa: BLE001 - the others are still measured
            print(f"Evidently could not be installed: {exc}")

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="everloop-drift-") as tmp_name:
        tmp = Path(tmp_name)
        ref_path, cur_path = tmp / "reference.parquet", tmp / "current.parquet"
        start = time.perf_counter()
        draw(np.random.default_rng([SEED, 0]), rows, shifted=False).to_parquet(ref_path, index=False)
        draw(np.random.default_rng([SEED, 1]), rows, shifted=True).to_parquet(cur_path, index=False)
        reference, current = pd.read_parquet(ref_path), pd.read_parquet(cur_path)
        print(f"data: reference {len(reference):,} + current {len(current):,} rows x {reference.shape[1]} columns "
              f"({len(NUMERIC)} numeric, {len(CATEGORICAL)} categorical), {len(SHIFTS)} planted shifts "
              f"(made in {time.perf_counter() - start:.1f} s)")
        for name in SHIFTS:
            print(f"  {name:<7} {describe_shift(name)}")

        # everloop: fit + score (headline), then score only with a fitted detector
        try:
            seconds, extra, times, report = _peers.timed(lambda: everloop_run(reference, current))
            from everloop.monitor import DriftDetector
            fitted = DriftDetector().fit(reference, KINDS)
            score_s, score_mb, score_times, _ = _peers.timed(lambda: fitted.score(current))
            fitted = None
            per_col = {c.column: c for c in report.columns}
            results["everloop"] = {
                "seconds": seconds, "extra_mb": extra, "times": times, "score_seconds": score_s,
                "score_extra_mb": score_mb, "score_times": score_times,
                "flags": {c: bool(per_col[c].drifted) for c in per_col}, "share": report.drifted_share,
                "dataset_drift": bool(report.dataset_drift), "rule": "share > 0.2 (max_drifted_share)",
                "detail": {c: f"{d.method} {d.effect:.3f}" for c, d in per_col.items()},
                "report": report,
            }
        except Exception as exc:  # noqa: BLE001 - a crash is a result too
            import traceback
            print(f"everloop crashed: {type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}")
            results["everloop"] = {"seconds": None, "extra_mb": None, "flags": None, "share": None,
                                   "dataset_drift": None, "rule": "share > 0.2", "detail": {}}

        seconds, extra, times, sp = _peers.timed(lambda: scipy_pass(reference, current))
        share = sum(r["drifted"] for r in sp.values()) / len(sp)
        results["scipy"] = {"seconds": seconds, "extra_mb": extra, "times": times,
                            "flags": {c: r["drifted"] for c, r in sp.items()}, "share": share,
                            "dataset_drift": share >= SCIPY_SHARE, "rule": f"share >= {SCIPY_SHARE}",
                            "detail": {c: f"p={r['p_value']:.2g}" for c, r in sp.items()}}
        reference = current = None
        gc.collect()
        # extra memory of the in-process tools: one run each in a fresh process (see memory_probe)
        if results["everloop"]["seconds"] is not None:
            results["everloop"]["in_process_mb"] = results["everloop"]["extra_mb"]
            results["everloop"]["extra_mb"] = probe("everloop", ref_path, cur_path)
            results["everloop"]["score_extra_mb"] = probe("everloop_score", ref_path, cur_path)
        results["scipy"]["in_process_mb"] = results["scipy"]["extra_mb"]
        results["scipy"]["extra_mb"] = probe("scipy", ref_path, cur_path)

        ev = None
        if evidently_python is not None:
            try:
                ev = run_evidently(evidently_python, ref_path, cur_path, tmp)
                results["evidently"] = {
                    "seconds": ev["seconds"], "extra_mb": ev["extra_mb"], "times": ev["all_seconds"],
                    "flags": {c: r["drifted"] for c, r in ev["columns"].items()}, "share": ev.get("drifted_share"),
                    "dataset_drift": ev.get("dataset_drift"), "rule": f"share >= {ev.get('drift_share')}",
                    "detail": {c: f"{_short(r['method'])} {r['score']:.3f}" for c, r in ev["columns"].items()},
                }
            except Exception as exc:  # noqa: BLE001
                print(f"Evidently failed: {exc}")
                results["evidently"] = {"seconds": None, "extra_mb": None, "flags": None, "share": None,
                                        "dataset_drift": None, "rule": "share >= 0.5", "detail": {}}

    versions = [f"python {platform.python_version()}", f"numpy {np.__version__}", f"pandas {pd.__version__}",
                f"scipy {scipy.__version__}", f"pyarrow {pa.__version__}", f"everloop {metadata.version('everloop')}"]
    if ev:
        versions += [f"evidently-venv {k} {v}" for k, v in ev["versions"].items()]
    print("versions: " + ", ".join(versions))

    # -- the table per tool --
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    print(f"\n{'tool':<28} {'seconds':>8} {'extra MB':>9}  {'shifts':<7} {'false +':<8} {'share':>6}  {'dataset drift':<14} rule / notes")
    tallies = {}
    for tool, r in results.items():
        found, missed, false = tally(r["flags"])
        tallies[tool] = (found, missed, false)
        notes = [r["rule"]]
        if missed:
            notes.append("missed " + ", ".join(missed))
        if false:
            notes.append("flagged stable " + ", ".join(false))
        if tool == "evidently" and ev:
            runs = len(ev["all_seconds"])
            notes.append(f"{runs} run{'s' if runs > 1 else ''} ({', '.join(f'{t:.1f}' for t in ev['all_seconds'])} s)"
                         + ("; one run, as it takes over 20 s" if runs == 1 else "")
                         + f"; Dataset.from_pandas {ev['from_pandas_seconds']:.2f} s not counted")
        label = {"everloop": "everloop (fit + score)", "scipy": "scipy KS/chi2 (p < 0.05)",
                 "evidently": "Evidently DataDriftPreset"}[tool]
        verdict = "-" if r["dataset_drift"] is None else ("drift" if r["dataset_drift"] else "no drift")
        print(f"{label:<28} {fmt(r['seconds'], '8.3f')} {fmt(r['extra_mb'], '9.0f')}  "
              f"{f'{found}/{len(SHIFTS)}':<7} {len(false) if r['flags'] is not None else '-':<8} "
              f"{fmt(r['share'], '6.2f')}  {verdict:<14} {'; '.join(notes)}")
        if tool == "everloop" and r.get("score_seconds") is not None:
            print(f"{'everloop (score only)':<28} {r['score_seconds']:8.3f} {fmt(r['score_extra_mb'], '9.0f')}  "
                  f"{'':<7} {'':<8} {'':>6}  {'':<14} the same verdicts, with the reference profile fitted beforehand")

    # -- the flags side by side --
    print(f"\n{'column':<7} {'planted shift':<28} {'everloop':<22} {'scipy':<20} {'evidently':<22}")
    for name in KINDS:
        planted = short_shift(name)
        cells = []
        for tool, width in (("everloop", 22), ("scipy", 20), ("evidently", 22)):
            r = results.get(tool)
            if not r or r["flags"] is None or name not in r["flags"]:
                cells.append(f"{'-':<{width}}")
                continue
            flag = r["flags"][name]
            mark = ("DRIFT" if flag else "miss") if name in SHIFTS else ("FP" if flag else ".")
            cells.append(f"{mark + ' ' + r['detail'].get(name, ''):<{width}}")
        print(f"{name:<7} {planted:<28} {' '.join(cells)}")
    if "everloop" in results and results["everloop"].get("report") is not None:
        rep = results["everloop"]["report"]
        print("\neverloop per column (effect: KS statistic or total variation; p-value; Wasserstein in sd; PSI; JS):")
        for c in rep.columns:
            extras = [f"W {c.wasserstein:.3f}" if c.wasserstein is not None else "",
                      f"PSI {c.psi:.4f}" if c.psi is not None else "",
                      f"JS {c.jensen_shannon:.3f}" if c.jensen_shannon is not None else ""]
            print(f"  {c.column:<7} {c.method:<5} effect {c.effect:.4f}  p {c.p_value:.3g}  "
                  f"{' '.join(e for e in extras if e):<26} {'drifted' if c.drifted else ''}")

    ev_s = results.get("evidently", {}).get("seconds")
    el, el_score, sc = results["everloop"]["seconds"], results["everloop"].get("score_seconds"), results["scipy"]["seconds"]
    ratio = lambda other, mine: round(other / mine, 2) if other and mine else None
    print(f"\neverloop vs Evidently: {ratio(ev_s, el)}x faster (bar: >= 50x); score only {ratio(ev_s, el_score)}x")
    print(f"everloop vs scipy: {ratio(sc, el)}x faster (bar: >= 2x); score only {ratio(sc, el_score)}x")

    def peer(tool: str) -> dict | None:
        r = results.get(tool)
        if not r:
            return None
        found, _, false = tallies[tool]
        return {"seconds": None if r["seconds"] is None else round(r["seconds"], 3),
                "extra_mb": None if r["extra_mb"] is None else round(r["extra_mb"]),
                "shifts_found": f"{found}/{len(SHIFTS)}" if r["flags"] is not None else None,
                "false_positives": len(false) if r["flags"] is not None else None,
                "drifted_share": None if r["share"] is None else round(r["share"], 3),
                "dataset_drift": r["dataset_drift"]}

    found, _, false = tallies["everloop"]
    e = results["everloop"]
    line = {"bench": "drift", "rows": rows, "columns": len(KINDS), "quick": args.quick,
            "speedup_vs_evidently": ratio(ev_s, el), "speedup_vs_scipy": ratio(sc, el),
            "shifts_found": f"{found}/{len(SHIFTS)}" if e["flags"] is not None else None,
            "false_positives": len(false) if e["flags"] is not None else None,
            "dataset_drift": e["dataset_drift"],
            "drifted_share": None if e["share"] is None else round(e["share"], 3),
            "everloop_seconds": None if el is None else round(el, 3),
            "everloop_score_seconds": None if el_score is None else round(el_score, 3),
            "everloop_extra_mb": None if e["extra_mb"] is None else round(e["extra_mb"]),
            "speedup_vs_evidently_score_only": ratio(ev_s, el_score), "speedup_vs_scipy_score_only": ratio(sc, el_score),
            "evidently": peer("evidently"), "scipy": peer("scipy")}
    if ev:
        line["evidently"]["runs"] = len(ev["all_seconds"])
    if install:
        line["install"] = {"evidently": install}
    print(json.dumps(line))


def _short(method: str | None) -> str:
    return {"Wasserstein distance (normed)": "wass", "Jensen-Shannon distance": "JS", "K-S p_value": "KS p",
            "chi-square p_value": "chi2 p", "Z-test p_value": "z p", "PSI": "PSI"}.get(method or "", method or "?")


if __name__ == "__main__":
    main()
