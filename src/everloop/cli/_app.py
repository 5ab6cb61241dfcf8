"""The `everloop` command: a thin layer over the Python API.

Exit codes: 0 success; 1 a check failed (validation anomalies, a gate refusal, a monitoring alert,
a demo that did not recover); 2 bad input (project file, arguments, files, store).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Optional, overload

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from everloop._jsonable import jsonable
from everloop.errors import DataError, EverloopError, GateError

app = typer.Typer(help="everloop: keep a production ML model healthy for its whole life, in one tool.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
# Piped output gets wide tables instead of a guessed 80 columns. No markup: what is printed holds user
# text (column names, categories, paths, hints such as `features.numeric: [age]`) that rich would
# otherwise read as tags and drop; styled words are `Text` spans (see `_styled`).
console = Console(width=None if sys.stdout.isatty() else 160, markup=False)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 160, markup=False)


SPEC_FILE = "everloop.yaml"  # as everloop.spec names it (not imported here: the CLI starts without pydantic)


def _find_project(ctx: typer.Context, param: typer.CallbackParam, value: Path) -> Path:
    """`--project` left out: the current folder, or else the nearest folder above it that holds
    everloop.yaml (as git finds its repository; that one as an absolute path). Given: as given. Nothing
    found: "." unchanged, and `_project_folder` says what to do (no error here, so that a group's own
    `-p`, which a sub-command's `-p` does not set, never fails on its own)."""
    source = ctx.get_parameter_source(param.name or "project")
    if source is not None and source.name != "DEFAULT":  # by name: typer may bundle its own click
        return value
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / SPEC_FILE).is_file():
            return value if folder == here else folder
    return value


ProjectOpt = typer.Option(Path("."), "--project", "-p", callback=_find_project,
                          help="project folder (holds everloop.yaml and .everloop/); default: the current "
                               "folder or the nearest one above it with an everloop.yaml")
JsonOpt = typer.Option(False, "--json", help="print machine-readable JSON instead of tables")


class CheckFailed(Exception):
    """A command ran but its check did not pass: exit code 1."""


def _project(project: Path) -> tuple[Any, Any]:
    """(ProjectSpec, Store) of a project folder; EverloopError as `_project_folder` raises it."""
    from everloop.spec import load_spec
    from everloop.store import Store

    spec = load_spec(_project_folder(project))
    return spec, Store.for_project(project)


def _project_folder(project: Path) -> Path:
    """`--project` as given (or as `_find_project` found it), once it is known to be a folder that holds
    everloop.yaml. Raises EverloopError saying where it looked and what to do: a file was given (the
    project is the folder around it), or no project file is there (or, for the default, above)."""
    if project.is_file():
        raise EverloopError(f"--project {project}: is a file; give the folder that holds everloop.yaml "
                            f"(here: {project.parent})")
    if not (project / SPEC_FILE).exists():
        where = (f"no {SPEC_FILE} in {Path.cwd()} (nor above it, when -p is not given)" if project == Path(".")
                 else f"--project {project}: no {SPEC_FILE} in {project.resolve()}")
        raise EverloopError(f"{where}; run everloop inside a project folder, give one with -p/--project "
                            "FOLDER, or create one with 'everloop init FOLDER'")
    return project


def _styled(style: str, word: str, rest: str = "") -> Text:
    """`word` in `style`, then `rest` as it is (never read as markup)."""
    return Text.assemble((word, style), rest)


def _emit(data: Any, as_json: bool, table: Table | None = None, text: str | Text | None = None) -> None:
    if as_json:
        print(json.dumps(jsonable(data), indent=2, default=str, allow_nan=False))
    elif table is not None:
        console.print(table)
    if text and not as_json:
        console.print(text, soft_wrap=True)  # a long line stays one line when piped, for grep and logs


class _RowsPerSecond(ProgressColumn):
    def render(self, task: Any) -> Text:
        return Text("" if task.speed is None else f"{task.speed:,.0f} rows/s")


@contextmanager
def _rows_progress(label: str, quiet: bool, total: int | None = None):
    """A progress line counting rows with their rate and, when the `total` is known, the time left."""
    columns = [TextColumn(label), BarColumn(pulse_style="cyan"), TextColumn("{task.completed:,} rows"),
               _RowsPerSecond(), TimeElapsedColumn()]
    if total is not None:
        columns += [TextColumn("ETA"), TimeRemainingColumn()]
    # not on a pipe: rich has nothing to redraw there and would leave an empty line before the summary
    with Progress(*columns, console=console, disable=quiet or not console.is_terminal, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


@overload
def _user_path(path: Path) -> Path: ...


@overload
def _user_path(path: None) -> None: ...


def _user_path(path: Path | None) -> Path | None:
    """A path typed on the command line, relative to the current directory as for any command (only the
    project file's own data.source is relative to the project). Absolute, not resolved: a glob or a
    symlink stays what the user wrote. None stays None (the spec's source is used)."""
    return None if path is None else Path(os.path.abspath(os.path.expanduser(path)))


# -- commands -------------------------------------------------------------------------------------


def _version(value: bool) -> None:
    if value:
        from everloop import __version__

        console.print(f"everloop {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="print everloop's version and exit")) -> None:
    """everloop: keep a production ML model healthy for its whole life, in one tool."""


def project_name(folder: Path) -> str:
    """The project name `init` gives a folder: its own name (of the absolute path, so "." is the current
    folder's), with every run of characters a project name cannot hold (see ProjectSpec.name) made
    one "-"; "project" when nothing is left. E.g. `my churn (v2)` -> `my-churn-v2`."""
    import re

    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(os.path.abspath(folder)).name).strip("-_.")
    return name or "project"


@app.command()
def init(folder: Path = typer.Argument(Path("."), help="where to create the project (a new folder, or one "
                                                       "that holds your data); its name names the project"),
         example: Optional[str] = typer.Option(None, help="start from an example: 'churn'"),
         name: Optional[str] = typer.Option(None, help="the project's name (default: the folder's name)"),
         data: Optional[str] = typer.Option(None, "--data", help="your data: data.source, a CSV/Parquet file, "
                                            "folder or glob relative to the project folder"),
         target: Optional[str] = typer.Option(None, help="the column to predict: data.target")) -> None:
    """Create a project: an everloop.yaml to edit (and, with --example churn, data to try it on)."""
    import glob
    import re

    import yaml

    from everloop.demo import demo_spec, make_churn

    spec_file = folder / SPEC_FILE
    if spec_file.exists():
        raise EverloopError(f"{spec_file} already exists; not overwriting it")
    if example not in (None, "churn"):
        raise EverloopError(f"--example {example!r}: unknown example; expected 'churn'")
    if example and (data or target):
        raise EverloopError("--example churn brings its own data and target; leave out --data and --target")
    project = name or project_name(folder)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", project):
        raise EverloopError(f"--name {project!r}: a project name is letters, digits, '_', '.' and '-', "
                            "starting with a letter or digit")
    folder.mkdir(parents=True, exist_ok=True)
    spec = demo_spec() | {"name": project}
    if example == "churn":
        (folder / "data").mkdir(exist_ok=True)
        make_churn(10_000, seed=7).to_csv(folder / "data" / "customers.csv", index=False)
    else:
        spec["data"] = {"source": data or "data/train.csv", "target": target or "label"}
        for key in ("evaluation", "monitoring", "retraining", "serving", "promotion"):
            spec.pop(key)
        spec["model"] = {"seed": 42}
    spec_file.write_text("# everloop project file; see docs/project-file.md\n"
                         + yaml.safe_dump(spec, sort_keys=False))
    todo = [] if example else [what for what, given in (("data.source at your data", data),
                                                        ("data.target at the column to predict", target))
                               if not given]
    console.print(f"created project {project!r}: {spec_file}" + (" and data/customers.csv" if example else "")
                  + (f"; point {' and '.join(todo)}" if todo else ""), highlight=False)
    if data and not glob.glob(str(folder / data)):  # a file, folder or glob; an absolute one stays itself
        console.print(f"note: {folder / data} does not exist (yet); data.source is relative to the project "
                      "folder", highlight=False)


@app.command()
def demo(folder: Path = typer.Option(Path("everloop-demo"), "--dir", help="folder for the demo project"),
         quick: bool = typer.Option(False, help="smaller data, for a fast look"),
         rollout: Literal["direct", "canary", "shadow"] = typer.Option(
             "direct", "--rollout", help="how the loop puts the retrained model live: direct (at once), canary "
             "(20%, 50%, 100% of the customers, judged live at each step) or shadow (scored beside production)"),
         as_json: bool = JsonOpt) -> None:
    """Run the whole loop on the built-in churn scenario against a real server."""
    from everloop.demo import DemoConfig, answered_by, run_demo

    config = DemoConfig(history_rows=4000, window_rows=1500) if quick else DemoConfig()
    say = (lambda _msg: None) if as_json else (lambda msg: console.print(_styled("dim", "•", f" {msg}")))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=as_json, transient=True) as bar:
        def progress(label: str, total: int):
            task = bar.add_task(label, total=total)
            return lambda n: bar.advance(task, n)

        result = run_demo(folder, config, say=say, progress=progress, rollout=rollout)
    if as_json:
        _emit((result.to_dict()), True)
    else:
        staged = rollout != "direct"  # a rollout: which versions answered each window, and what share
        table = Table(title="everloop demo: the loop, window by window")
        for column in ("window", "phase", "served by", *(["answered by"] if staged else []), "status",
                       "drifted share", "roc_auc", "loop"):
            table.add_column(column)
        for w in result.windows:
            table.add_row(str(w["window"]), w["phase"], w["model"], *([answered_by(w)] if staged else []),
                          w["status"], f"{w['drifted_share']:.0%}", _num(w["metric"]), w["loop"])
        console.print(table)
        c = result.comparison
        compare = Table(title="on held-out shifted traffic")
        for column in ("old model", "retrained by the loop", "trained directly on shifted data"):
            compare.add_column(column)
        compare.add_row(_num(c["old"]), _num(c["retrained"]), _num(c["direct"]))
        console.print(compare)
        verdict = ("green", "passed") if result.passed else ("red", "did not pass")
        live = ""
        if staged:
            r = result.rollout
            live = (f"; {rollout} rollout: none started" if r is None else
                    f"; {r['mode']} rollout {r['id']} of v{r['candidate']}: {r['outcome']}"
                    + (f" after shares {', '.join(f'{s:g}%' for s in r['shares'])}" if r["shares"] else ""))
        console.print(Text.assemble("demo ", verdict, (
            f": drift before the shift: {result.drift_before_shift}; drift in the first shifted window: "
            f"{result.drift_first_shifted_window}; recovered within 2% of direct: {result.recovered}{live}. "
            f"Report: {result.report}")))
    if not result.passed:
        raise CheckFailed()


class IngestMode(str, Enum):
    reject = "reject"
    quarantine = "quarantine"


@app.command()
def ingest(path: Optional[Path] = typer.Argument(None, help="a file to ingest instead of the spec's data.source"),
           mode: IngestMode = typer.Option(IngestMode.reject, help="reject: any error refuses the whole source; "
                                           "quarantine: rows with errors are set aside with their reasons"),
           project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Validate a source against the schema and store it as an immutable dataset version."""
    from everloop import data

    spec, store = _project(project)
    inferring = data.current_schema(store) is None  # the first ingest: list every column
    with _rows_progress("ingesting", as_json) as progress:
        try:
            version = data.ingest(store, spec, _user_path(path), base=project, mode=mode.value, progress=progress)
        except DataError as exc:
            raise _quarantine_hint(exc, path, mode, project) from None
    written = data.write_schema_file(store, project)  # the first ingest: the inferred schema, to read and edit
    schema = data.get_schema(store, version.schema_version)
    roles, conflicts = schema.column_roles(spec), schema.spec_conflicts(spec)
    text = f"dataset v{version.version}: {version.rows} rows x {version.columns} columns from {version.source}"
    if version.deduplicated:
        text = (f"no new version: {path or _source_arg(spec, project)} read with schema v{version.schema_version} "
                f"gives the rows of {text}")
    text += "".join(f"\nnote: {line}" for line in version.notes)
    quarantined = _quarantined_rows(store, version)
    if version.quarantined:
        shown = ", ".join(map(str, quarantined)) + (", ..." if version.quarantined > len(quarantined) else "")
        text += (f"\n{version.quarantined} rows quarantined: rows {shown} (data rows counted from 1; with their "
                 f"reasons: 'everloop datasets show {version.version}')")
    text += "\n" + _roles_text(roles, version.schema_version, version.source if inferring else None)
    if written:
        text += f"\nschema inferred and written to {written}; edit it and run 'everloop schema accept' to change it"
    text += _anomaly_lines(version.warnings)
    if any(a["kind"] == "unexpected_column" for a in version.warnings):
        source = str(path) if path else _source_arg(spec, project)
        command = _command(project, "schema", "accept", "--from-data", source)
        text += f"\nto add these columns to the schema (inferred as the first ingest would): {command}"
    text += "".join(f"\nwarning: {line}; {_conflict_fix(spec, project)}" for line in conflicts)
    _emit(version.to_dict() | {"quarantined_rows": quarantined, "schema_inferred": inferring,
                               "column_roles": [asdict(r) for r in roles], "schema_conflicts": conflicts},
          as_json, text=text)


QUARANTINE_ROWS_SHOWN = 10


def _quarantined_rows(store: Any, version: Any) -> list[int]:
    """The first QUARANTINE_ROWS_SHOWN rows a dataset version set aside, as data rows counted from 1."""
    from everloop import data

    if not version.quarantined:
        return []
    rows = data.load_quarantine(store, version).get("_everloop_row")
    return [] if rows is None else [int(r) for r in rows.head(QUARANTINE_ROWS_SHOWN)]


def _command(project: Path, *args: str) -> str:
    """`everloop ARGS` as the user can paste it here: quoted where needed, with `-p PROJECT` when the
    current directory is not inside the project (where everloop would not find it by itself)."""
    import shlex

    here, folder = Path.cwd().resolve(), project.resolve()
    where = [] if here == folder or folder in here.parents else ["-p", str(project)]
    return " ".join(shlex.quote(a) for a in ("everloop", *args, *where))


def _source_arg(spec: Any, project: Path) -> str:
    """The project file's data.source as a path the user can type here (it is relative to the project
    folder, command-line paths to the current directory); a placeholder for an SQL source."""
    if not isinstance(spec.data.source, str):
        return "FILE"
    return os.path.relpath(os.path.join(project, os.path.expanduser(spec.data.source)))


def _quarantine_hint(exc: DataError, path: Path | None, mode: IngestMode, project: Path) -> DataError:
    """A source refused in reject mode for errors of its rows (missing labels, bad values) says how to
    store the good rows and set the bad ones aside: the same command with `--mode quarantine`. Errors of
    whole columns (a column missing, no rows) refuse in either mode: those stay as they were."""
    anomalies = exc.report.errors if exc.report is not None else []
    if mode is not IngestMode.reject or not anomalies or any(a.kind in ("missing_column", "empty")
                                                            for a in anomalies):
        return exc
    command = _command(project, "ingest", *([str(path)] if path is not None else []), "--mode", "quarantine")
    return DataError(f"{exc}\nto store the good rows and set these aside with their reasons: {command}",
                     report=exc.report, path=exc.path)


def _conflict_fix(spec: Any, project: Path) -> str:
    """How to make the schema follow the project file's `features` section (see `Schema.spec_conflicts`):
    `schema accept --from-data` with the project's data, which applies it (named kinds, exclude,
    infer_others) as the first ingest did."""
    if not isinstance(spec.data.source, str):  # an SQL source cannot be given as --from-data
        return ("the schema decides until it is changed: edit schema.yaml (move the column between 'columns' "
                f"and 'ignored', or change its kind) and run {_command(project, 'schema', 'accept')}")
    return ("the schema decides until it is changed; to apply the project file's features section: "
            + _command(project, "schema", "accept", "--from-data", _source_arg(spec, project)))


def _roles_text(roles: list[Any], schema_version: int, inferred_from: str | None) -> str:
    """Every column with the role and kind the schema chose, and why (after the first ingest, which
    inferred them); later, one line: how many features, and the columns the schema ignores."""
    if inferred_from is not None:
        return (f"schema v{schema_version} inferred from {inferred_from}, column by column:\n"
                + "\n".join(f"  {r.describe()}" for r in roles))
    features = sum(r.role == "feature" for r in roles)
    ignored = [r.name for r in roles if r.role == "ignored"]
    return (f"checked against schema v{schema_version}: {features} features"
            + (f"; ignored as the schema says: {', '.join(ignored)} (see 'everloop schema show')"
               if ignored else ""))


@app.command()
def validate(path: Optional[Path] = typer.Argument(None, help="a file to check instead of the spec's data.source"),
             project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Check a source against the schema without storing anything; exit 1 on errors."""
    from everloop import data

    spec, store = _project(project)
    report = data.validate(store, spec, _user_path(path), base=project)
    table = Table(title=f"validation: {report.rows} rows")
    for column in ("severity", "column", "kind", "count", "message"):
        table.add_column(column)
    for a in report.anomalies:
        table.add_row(a.severity, a.column, a.kind, str(a.count), a.describe())
    _emit(report.to_dict(), as_json, table if report.anomalies else None,
          text="no anomalies" if not report.anomalies else None)
    if not report.ok:
        raise CheckFailed()


datasets_app = typer.Typer(help="Dataset versions: list (also the default), show one, diff two.",
                           invoke_without_command=True, no_args_is_help=False)
app.add_typer(datasets_app, name="datasets")


@datasets_app.callback()
def datasets(ctx: typer.Context, project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """List dataset versions."""
    if ctx.invoked_subcommand is None:
        datasets_list(project, as_json)


@datasets_app.command("list")
def datasets_list(project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """List dataset versions (what `everloop datasets` alone does)."""
    from everloop import data

    _, store = _project(project)
    rows = data.list_datasets(store)
    table = Table(title="datasets")
    for column in ("version", "created", "rows", "quarantined", "columns", "schema", "parent", "source",
                   "warnings", "hash"):
        table.add_column(column)
    for d in rows:
        table.add_row(str(d.version), _when(d.created_at), str(d.rows), str(d.quarantined), str(d.columns),
                      str(d.schema_version), str(d.parent or "-"), d.source, str(len(d.warnings)), d.content_hash[:12])
    _emit([d.to_dict() for d in rows], as_json, table)


@datasets_app.command("show")
def datasets_show(version: int = typer.Argument(..., help="dataset version"),
                  rows: int = typer.Option(10, help="quarantined rows to show"),
                  project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """One dataset version: lineage, warnings, column statistics and quarantined rows with their reasons."""
    import pandas as pd

    from everloop import data

    _, store = _project(project)
    d = data.get_dataset(store, version)
    quarantine = data.load_quarantine(store, d)
    out = d.to_dict() | {"stats": d.stats, "quarantine_sample": quarantine.head(rows).to_dict(orient="records")}
    if as_json:
        _emit(out, True)
        return
    console.print(f"dataset v{d.version}: {d.rows} rows from {d.source} (parent: {d.parent or '-'}, schema "
                  f"v{d.schema_version}, content {d.content_hash[:12]}, {d.quarantined} rows quarantined)")
    if d.warnings:
        console.print(_anomaly_lines(d.warnings).removeprefix("\n"))
    table = Table(title="columns")
    for column in ("column", "kind", "null rate", "mean", "std", "min", "max", "distinct"):
        table.add_column(column)
    for name, c in d.stats["columns"].items():
        table.add_row(name, c["kind"], f"{c['null_rate']:.2%}", _num(c.get("mean")), _num(c.get("std")),
                      _num(c.get("min")), _num(c.get("max")), _num(c.get("distinct")))
    console.print(table)
    if len(quarantine):
        sample = Table(title=f"quarantined rows (first {min(rows, len(quarantine))} of {d.quarantined})")
        sample.add_column("data row")  # counted from 1, the header not counted
        sample.add_column("reason")
        numbers = quarantine.get("_everloop_row", pd.Series(["-"] * len(quarantine)))
        for number, reason in zip(numbers.head(rows), quarantine.iloc[:, -1].head(rows)):  # reason: last
            sample.add_row(str(number), str(reason))
        console.print(sample)


@datasets_app.command("diff")
def datasets_diff(a: int = typer.Argument(..., help="the earlier dataset version"),
                  b: int = typer.Argument(..., help="the later dataset version"),
                  project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Compare the column statistics of two dataset versions."""
    from everloop import data

    _, store = _project(project)
    da, db = data.get_dataset(store, a), data.get_dataset(store, b)
    rows = data.diff_datasets(da, db)
    table = Table(title=f"dataset v{a} ({da.rows} rows) -> v{b} ({db.rows} rows)")
    for column in ("column", "kind", "null rate", "mean", "std", "min .. max", "shift", "categories"):
        table.add_column(column)
    pair = lambda v: f"{_num(v[0])} -> {_num(v[1])}" if v else ""  # noqa: E731
    for r in rows:
        if "change" in r:
            table.add_row(r["column"], r["kind"], r["change"], "", "", "", "", "")
            continue
        rate = f"{r['null_rate'][0]:.1%} -> {r['null_rate'][1]:.1%}"
        if r["kind"] == "numeric":
            span = f"{_num(r['min'][0])}..{_num(r['max'][0])} -> {_num(r['min'][1])}..{_num(r['max'][1])}"
            shift = f"{r['mean_shift_sd']:+.2f} sd" if "mean_shift_sd" in r else ""
            table.add_row(r["column"], r["kind"], rate, pair(r["mean"]), pair(r["std"]), span, shift, "")
        elif r["kind"] == "categorical":
            moved = f"tvd {r['tvd']:.3f}"
            if r["new_categories"]:
                moved += f", new: {', '.join(r['new_categories'][:5])}"
            if r["vanished_categories"]:
                moved += f", gone: {', '.join(r['vanished_categories'][:5])}"
            table.add_row(r["column"], r["kind"], rate, "", "", "", "", moved)
        else:
            table.add_row(r["column"], r["kind"], rate, "", "", "", "", "")
    _emit(rows, as_json, table)


schema_app = typer.Typer(help="The data schema: show it, accept an edited or evolved one.", no_args_is_help=True)
app.add_typer(schema_app, name="schema")


@schema_app.command("show")
def schema_show(version: Optional[int] = typer.Option(None, help="schema version (default: the current one)"),
                project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Print a schema version: kinds, roles, nullability, ranges and domains."""
    from everloop import data

    spec, store = _project(project)
    found = data.current_schema(store) if version is None else (version, data.get_schema(store, version))
    if found is None:
        raise EverloopError("no schema yet; the first 'everloop ingest' infers one")
    number, schema = found
    roles, conflicts = schema.column_roles(spec), schema.spec_conflicts(spec)
    why = {r.name: r.why for r in roles}
    table = Table(title=f"schema v{number}")
    for column in ("column", "role", "kind", "dtype", "nullable", "max null rate", "range", "categories",
                   "why"):
        table.add_column(column)
    for c in schema.columns:
        span = f"{_num(c.min)} .. {_num(c.max)}" if c.kind == "numeric" else ""
        cats = "" if c.categories is None else (", ".join(c.categories[:6]) + (
            f", ... ({len(c.categories)})" if len(c.categories) > 6 else ""))
        table.add_row(c.name, c.role, c.kind, c.dtype, "yes" if c.nullable else "no",
                      f"{c.max_null_rate:.1%}", span, cats, why[c.name])
    for name, reason in schema.ignored.items():
        table.add_row(name, "ignored", "", "", "", "", "", "", reason)
    text = "\n".join(f"warning: {line}; {_conflict_fix(spec, project)}" for line in conflicts) or None
    _emit({"version": number} | schema.to_dict() | {"ignored": schema.ignored,
                                                    "column_roles": [asdict(r) for r in roles],
                                                    "schema_conflicts": conflicts}, as_json, table, text=text)


@schema_app.command("accept")
def schema_accept(from_data: Optional[Path] = typer.Option(None, "--from-data",
                                                           help="evolve the current schema to admit this file "
                                                                "and follow the project file's features section"),
                  file: Optional[Path] = typer.Option(None, help="schema file (default: schema.yaml in the project)"),
                  reason: str = typer.Option("", help="why, recorded with the version"),
                  project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Make an edited schema.yaml (or a schema evolved from new data) the current schema version.
    With --from-data, the schema admits the file's values (ranges widen, categories join) and follows the
    project file's features section as the first ingest did: new columns inferred (identifiers and
    excluded columns left out, with why), excluded features dropped, named kinds applied."""
    from everloop import data

    spec, store = _project(project)
    current = data.current_schema(store)
    if from_data is not None:
        if current is None:
            raise EverloopError("no schema yet; ingest data first")
        observed = data.infer_source(_user_path(from_data), spec, current[1], base=project)
        schema = data.evolve(current[1], observed, spec)
        why = reason or f"evolved to admit {from_data}"
    else:
        schema = data.load_schema_file(file or project / data.SCHEMA_FILE, spec)
        why = reason or f"accepted from {file or data.SCHEMA_FILE}"
    changes = data.schema_changes(current[1], schema) if current else ["(first schema)"]
    version, changed = data.accept_schema(store, schema, why)
    if changed and from_data is not None:
        data.write_schema_file(store, project, overwrite=True)
    text = (f"schema v{version} is current:\n" + "\n".join(f"  {line}" for line in changes)) if changed \
        else f"no change: schema v{version} is already this one"
    _emit({"version": version, "changed": changed, "changes": changes}, as_json, text=text)


@app.command("train")
def train_cmd(dataset: Optional[int] = typer.Option(None, help="dataset version (default: the latest)"),
              project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Train the spec's pipeline on a dataset version and register a model version."""
    from everloop import train

    spec, store = _project(project)
    with console.status("training...", spinner="dots") if not as_json else nullcontext():
        try:
            result = train.train(store, spec, dataset, reason="everloop train")
        except Exception as exc:  # noqa: BLE001 - only a refused model.params value becomes a message
            raise _bad_param(exc, spec) or exc
    _emit((result.to_dict()), as_json, text=(
        f"model v{result.version}: {result.metric} {result.value:.4f} on held-out rows of dataset "
        f"v{result.dataset_version}; trivial baseline {result.baseline:.4f} (lift {result.lift:+.4f}); "
        f"{result.seconds:.1f}s"))


def _bad_param(exc: Exception, spec: Any) -> EverloopError | None:
    """An estimator's refusal of a `model.params` value (scikit-learn checks them when fitting, e.g.
    `max_iter: lots`) as one line naming the param, its value and the estimator's reason; None when
    the error names no param of model.params, which then is no input problem and stays a traceback."""
    import re

    params = spec.model.params or {}
    text = " ".join(str(exc).split()) or type(exc).__name__
    named = [name for name in params if re.search(rf"(?<![\w.]){re.escape(str(name))}(?![\w])", text)]
    if isinstance(exc, EverloopError) or not named:  # ours already say what is wrong
        return None
    estimator = spec.model.estimator or "the default estimator"
    values = ", ".join(f"model.params.{name}: {params[name]!r}" for name in named)
    return EverloopError(f"{values} is refused by {estimator}: {text} (fix it in everloop.yaml)")


models_app = typer.Typer(help="Model versions: list (also the default), card, import.", invoke_without_command=True)
app.add_typer(models_app, name="models")


@models_app.callback()
def models(ctx: typer.Context, project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """List model versions with their metrics and aliases."""
    if ctx.invoked_subcommand is None:
        models_list(project, as_json)


@models_app.command("list")
def models_list(project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """List model versions with their metrics and aliases (what `everloop models` alone does)."""
    from everloop import registry

    _, store = _project(project)
    rows = registry.list_models(store)
    table = Table(title="models")
    for column in ("version", "created", "dataset", "metric", "value", "baseline", "aliases", "reason"):
        table.add_column(column)
    for m in rows:
        d = m.to_dict()
        table.add_row(str(m.version), _when(m.created_at), f"v{m.dataset_version}", m.metric, _num(m.value),
                      _num(d["baseline"]), ", ".join(m.aliases) or "-", d["reason"])
    _emit([m.to_dict() for m in rows], as_json, table)


@models_app.command("card")
def models_card(version: str = typer.Argument(..., help="model version or alias"),
                output: Optional[Path] = typer.Option(None, "--output", "-o", help="HTML file (default: model-vN.html)"),
                project: Path = ProjectOpt) -> None:
    """Write a model version's card: metrics vs baseline, slices, calibration, lineage, record."""
    from everloop import registry

    _, store = _project(project)
    number = registry.resolve(store, version)
    path = registry.write_card(store, number, output or Path(f"model-v{number}.html"))
    console.print(f"model card: {path}")


@models_app.command("import")
def models_import(path: Path = typer.Argument(..., help="a joblib or pickle file, a .skops file, or an MLflow model "
                                                       "directory (sklearn flavor)"),
                  dataset: Optional[int] = typer.Option(None, help="dataset version: schema, monitoring reference "
                                                                   "and evaluation rows (default: the latest)"),
                  features: bool = typer.Option(False, "--features", help="for a bare estimator that wants encoded "
                                                "features: fit a fresh clone of it behind everloop's features"),
                  trust: Optional[list[str]] = typer.Option(None, "--trust", help="a type the skops file holds that "
                                                            "you reviewed and trust (repeat for each)"),
                  sha256: Optional[str] = typer.Option(None, help="the sha256 the file must have; else refused "
                                                       "before it is loaded"),
                  held_out: bool = typer.Option(False, "--held-out", help="the model never saw the dataset's rows: "
                                                "its metrics are out-of-sample"),
                  name: Optional[str] = typer.Option(None, help="what to call the model in its card and lineage"),
                  project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Adopt a scikit-learn model fitted elsewhere as a new model version (then: everloop promote N)."""
    from everloop import registry

    spec, store = _project(project)
    with console.status("importing...", spinner="dots") if not as_json else nullcontext():
        result = registry.import_model(store, spec, _user_path(path), dataset, features=features,
                                       trust=trust or (), sha256=sha256, held_out=held_out, name=name)
    if not as_json:
        for warning in result.warnings:
            errors.print(f"warning: {warning}", style="yellow", highlight=False, markup=False, soft_wrap=True)
    rows = (f"held-out rows of dataset v{result.dataset_version}" if result.refit else
            f"dataset v{result.dataset_version}'s rows" + ("" if not result.in_sample else
                                                          ", in-sample: the model may have seen them"))
    done = "fitted by everloop from" if result.refit else "imported from"
    text = (f"found: {result.description}\n{result.serves}\n"
            f"model v{result.version} {done} {path} (sha256 {result.sha256[:12]}): {result.metric} "
            f"{result.value:.4f} on {rows}; trivial baseline {result.baseline:.4f} (lift {result.lift:+.4f})\n"
            f"next: everloop promote {result.version}")
    if result.in_sample and not result.refit:
        text += ("\nnote: the monitor compares live performance with these in-sample metrics; if the model never "
                 "saw these rows, import with --held-out")
    _emit(result.to_dict(), as_json, text=text)


@app.command()
def reproduce(version: str = typer.Argument(..., help="model version or alias"),
              project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Retrain a model version from its record and check it predicts identically; exit 1 if not, 2 if it
    has no training record (an imported model)."""
    from everloop import registry, train

    _, store = _project(project)
    number = registry.resolve(store, version)
    with console.status(f"retraining model v{number} from its record...") if not as_json else nullcontext():
        report = train.reproduce(store, number)
    if not report.record:  # imported: nothing to retrain from, so nothing was checked
        _emit(report.to_dict(), as_json, text="\n".join(report.problems))
        raise typer.Exit(2)
    if report.identical:
        text = f"model v{number} reproduced: identical outputs on {report.rows} evaluation rows"
    else:
        text = f"model v{number} was NOT reproduced:\n" + "\n".join(f"  - {p}" for p in report.problems)
    if report.environment:
        text += "\nchanged since training:\n" + "\n".join(f"  - {e}" for e in report.environment)
    _emit(report.to_dict(), as_json, text=text)
    if not report.identical:
        raise CheckFailed()


@app.command()
def lineage(model: Optional[str] = typer.Option(None, help="a model version or alias: back to its data"),
            dataset: Optional[int] = typer.Option(None, help="a dataset version: forward to its models"),
            prediction: Optional[str] = typer.Option(None, help="a prediction id: back to its model and data"),
            project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Where a prediction or a model came from, or what was built from a dataset."""
    from rich.tree import Tree

    from everloop import registry

    _, store = _project(project)
    if sum(x is not None for x in (model, dataset, prediction)) != 1:
        raise EverloopError("give exactly one of --model, --dataset or --prediction")
    if dataset is not None:
        out = registry.dataset_lineage(store, dataset)
        tree = Tree(f"dataset v{out['dataset']['version']} ({out['dataset']['rows']} rows, {out['dataset']['source']})")
        for d in out["derived_datasets"]:
            tree.add(f"derived: dataset v{d['version']} ({d['source']})")
        for m in out["models"]:
            tree.add(f"model v{m['version']} trained on dataset v{m['dataset_version']} ({m['metric']} {m['value']:.4f})")
        _emit(out, as_json, tree)
        return
    out = (registry.prediction_lineage(store, prediction) if prediction is not None
           else registry.model_lineage(store, registry.resolve(store, model)))
    root = Tree(f"prediction {out['prediction']['id']} at {_when(out['prediction']['created_at'])}: "
                f"{out['prediction']['output']} (label: {out['prediction']['label']})") if prediction else None
    node = (root.add if root else Tree)(f"model v{out['model']['version']} ({out['model']['metric']} "
                                        f"{out['model']['value']:.4f}; {out['model']['reason'] or 'no reason'})")
    if out["model"].get("origin"):
        node.add(f"pipeline: {out['model']['origin']}")
    parent = node
    for d in out["datasets"]:
        parent = parent.add(f"dataset v{d['version']}: {d['rows']} rows from {d['source']} ({d['content_hash'][:12]})")
    for move in out["alias_moves"]:
        before = f"v{move['from_version']}" if move["from_version"] else "none"
        node.add(f"{_when(move['created_at'])} {move['alias']}: {before} -> v{move['to_version']} by "
                 f"{move['actor']}: {move['reason']}")
    _emit(out, as_json, root or node)


@app.command()
def promote(version: int = typer.Argument(..., help="the model version to put in production"),
            force: bool = typer.Option(False, help="promote even if the gate refuses (recorded as forced)"),
            reason: str = typer.Option("", help="why, for the alias history"),
            shadow: bool = typer.Option(False, "--shadow", help="do not move production: run the version beside "
                                        "it on live traffic (it scores rollout.shadow_sample percent of the rows, "
                                        "clients get production's answers); see 'everloop rollout'"),
            canary: Optional[float] = typer.Option(None, "--canary", metavar="PERCENT", help="do not move "
                                                   "production: let the version answer this percent of live "
                                                   "traffic; see 'everloop rollout'"),
            project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Move the production alias to a model version through the promotion gate (or, with --shadow or
    --canary, start trying it on live traffic beside production)."""
    from everloop import registry

    if shadow and canary is not None:
        raise EverloopError("--shadow and --canary: choose one (a shadow answers no traffic, a canary answers "
                            "its share)")
    spec, store = _project(project)
    try:
        if shadow or canary is not None:
            mode = "shadow" if shadow else "canary"
            rollout = registry.start_rollout(store, spec, version, mode, share=canary, force=force,
                                             reason=reason or f"everloop promote --{mode}")
            _emit(rollout.to_dict(), as_json, text=_rollout_line(rollout) + "\n" + _rollout_next(rollout))
            return
        decision = registry.promote(store, spec, version, reason=reason or "everloop promote", force=force)
    except GateError as exc:
        if as_json:
            _emit({"candidate": version, "passed": False, "reasons": exc.reasons}, True)
        else:
            errors.print(str(exc), style="red", highlight=False)
        raise CheckFailed() from None
    forced = " (forced past the gate)" if force and not decision.passed else ""
    text = f"model v{version} is in production{forced}"
    if decision.evidence.get("unchanged"):
        text = f"model v{version} is already in production; nothing changed"
    _emit((decision.to_dict()), as_json, text=text)


@app.command()
def rollback(reason: str = typer.Option("rollback", help="why, for the alias history"),
             project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Point production back at the version it served before."""
    from everloop import registry

    _, store = _project(project)
    version = registry.rollback(store, reason=reason)
    _emit({"production": version}, as_json, text=f"production is back on model v{version}")


rollout_app = typer.Typer(help="Shadow and canary rollouts (start one with 'everloop promote V --shadow' or "
                               "'--canary N'): status, step, promote, rollback, abort.", no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")
RolloutReasonOpt = typer.Option("", help="why, recorded with the rollout (and the alias history on promote)")


def _rollout_line(r: Any) -> str:
    """What is live under rollout `r`, in one line."""
    if r.status != "active":
        after = (f"production moved to v{r.candidate}" if r.status == "promoted"
                 else f"production stayed on v{r.production}; v{r.candidate} is no longer served")
        return f"rollout {r.id} ({r.mode} of model v{r.candidate}) {r.status.replace('_', ' ')}: {after}"
    if r.mode == "shadow":
        return (f"rollout {r.id}: model v{r.candidate} in shadow beside production v{r.production}: it also "
                f"scores {r.sample:g}% of the rows, off the response path; clients get v{r.production}'s "
                "answers")
    return (f"rollout {r.id}: model v{r.candidate} in canary: it answers {r.share:g}% of the traffic, "
            f"production v{r.production} the other {100 - r.share:g}%")


def _rollout_next(r: Any) -> str:
    steps = f"; the loop steps it through {_percents(r.steps)}" if r.mode == "canary" else ""
    return (f"judged live by 'everloop loop' (promotion.live){steps}; by hand: everloop rollout status | "
            "step N | promote | rollback | abort")


def _percents(steps: list[float]) -> str:
    return ", ".join(f"{s:g}" for s in steps) + "%"


def _evidence_lines(evidence: Any, prefix: str = "") -> list[str]:
    """`key: value` per number, word or short list in the judgement's evidence, nested keys dotted; only
    what it holds (the loop writes it, from monitor/_live.py)."""
    lines: list[str] = []
    for key, value in (evidence or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            lines += _evidence_lines(value, f"{name}.")
        elif isinstance(value, list):
            lines.append(f"{name}: " + (", ".join(map(_num, value)) if len(value) <= 6 else f"{len(value)} values"))
        else:
            lines.append(f"{name}: {_num(value)}")
    return lines


def _active(store: Any) -> Any:
    from everloop import registry

    rollout = registry.active_rollout(store)
    if rollout is None:
        from everloop.errors import NotFoundError

        latest = registry.latest_rollout(store)
        last = f" (the latest, rollout {latest.id}, was {latest.status.replace('_', ' ')})" if latest else ""
        raise NotFoundError(f"no rollout is active{last}; start one with 'everloop promote V --shadow' or "
                            "'everloop promote V --canary PERCENT'")
    return rollout


@rollout_app.command("status")
def rollout_status(project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """The active rollout (else the latest finished one), with its latest judgement's numbers."""
    from everloop import registry

    _, store = _project(project)
    rollout = registry.latest_rollout(store)
    if rollout is None:
        _emit(None, as_json, text="no rollout yet; start one with 'everloop promote V --shadow' or "
                                  "'everloop promote V --canary PERCENT'")
        return
    lines = [_rollout_line(rollout),
             f"started {_when(rollout.created_at)}; last change {_when(rollout.updated_at)} by "
             f"{rollout.actor}: {rollout.reason}"]
    if rollout.mode == "canary":
        lines.append(f"steps: {_percents(rollout.steps)}")
    evidence = [f"  {line}" for line in _evidence_lines(rollout.evidence)]
    lines += ["evidence:", *evidence] if evidence else ["evidence: none recorded (not judged live yet)"]
    _emit(rollout.to_dict(), as_json, text="\n".join(lines))


@rollout_app.command("step")
def rollout_step(share: float = typer.Argument(..., metavar="PERCENT",
                                               help="the canary's new share of traffic, from 0.01 to 100"),
                 reason: str = RolloutReasonOpt, project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Set the active canary's share of traffic."""
    from everloop import registry

    _, store = _project(project)
    rollout = registry.step_rollout(store, _active(store).id, share,
                                    reason=reason or f"everloop rollout step {share:g}")
    _emit(rollout.to_dict(), as_json, text=_rollout_line(rollout))


def _finish(project: Path, outcome: str, reason: str, as_json: bool) -> None:
    from everloop import registry

    _, store = _project(project)
    rollout = registry.finish_rollout(store, _active(store).id, outcome, reason=reason)
    _emit(rollout.to_dict(), as_json, text=_rollout_line(rollout))


@rollout_app.command("promote")
def rollout_promote(reason: str = RolloutReasonOpt, project: Path = ProjectOpt,
                    as_json: bool = JsonOpt) -> None:
    """Promote the active rollout's candidate: production moves to it, if still on the model it compared with."""
    _finish(project, "promoted", reason or "everloop rollout promote", as_json)


@rollout_app.command("rollback")
def rollout_rollback(reason: str = RolloutReasonOpt, project: Path = ProjectOpt,
                     as_json: bool = JsonOpt) -> None:
    """End the active rollout as worse than production: production stays, the candidate is served no more."""
    _finish(project, "rolled_back", reason or "everloop rollout rollback", as_json)


@rollout_app.command("abort")
def rollout_abort(reason: str = RolloutReasonOpt, project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """End the active rollout without a verdict: production stays, the candidate is served no more."""
    _finish(project, "aborted", reason or "everloop rollout abort", as_json)


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="interface to listen on"),
          port: int = typer.Option(8000, min=0, max=65535, help="TCP port"),
          workers: int = typer.Option(1, min=1, help="worker processes"),
          ui: bool = typer.Option(False, "--ui", help="also serve the dashboard's pages at /ui (read-only; "
                                  "with EVERLOOP_ADMIN_TOKEN set, every page needs a sign-in with it and "
                                  "promote/rollback are enabled): docs/ui.md"),
          project: Path = ProjectOpt) -> None:
    """Serve the production model over HTTP; a new promotion is picked up without a restart."""
    import uvicorn

    from everloop.serve._main import PROJECT_ENV, UI_ENV
    from everloop.spec import load_spec

    load_spec(_project_folder(project))  # fail fast, with the file's errors, before starting workers
    _check_port(host, port)  # uvicorn would log a busy port and exit 3 (1 with workers)
    os.environ[PROJECT_ENV] = str(project.resolve())
    os.environ[UI_ENV] = "1" if ui else "0"  # the workers read it, as the project folder
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    metrics_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # every worker writes its metrics here, and /metrics aggregates them (prometheus multiprocess mode)
        import tempfile

        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="everloop-metrics-")
    from everloop.serve._process import APP, uvicorn_options

    try:  # the settings ServerProcess uses too: no access log, no server header, slow clients cut off
        uvicorn.run(APP, factory=True, host=host, port=port, **uvicorn_options(workers))
    except SystemExit as exc:  # uvicorn exits 1 or 3 when the server could not start; it logged why
        if exc.code not in (0, None):
            raise EverloopError(f"the server on {host}:{port} did not start (exit {exc.code}); "
                                "the line above says why") from None
        raise
    finally:
        if metrics_dir:
            import shutil

            shutil.rmtree(metrics_dir, ignore_errors=True)


@app.command("ui")
def ui_cmd(host: str = typer.Option("127.0.0.1", help="interface to listen on"),
           port: int = typer.Option(8765, min=0, max=65535, help="TCP port"),
           admin_token_env: str = typer.Option("EVERLOOP_ADMIN_TOKEN", "--admin-token-env", metavar="NAME",
                                               help="the environment variable holding the admin token that "
                                               "enables promote and rollback (unset or empty: read-only)"),
           project: Path = ProjectOpt) -> None:
    """The dashboard: the production model, health, models, data, monitoring and the loop's decisions,
    in a browser (docs/ui.md). Read-only unless signed in with the admin token."""
    import uvicorn

    from everloop.serve._process import uvicorn_options
    from everloop.ui import create_ui

    folder = _project_folder(project)
    _check_port(host, port)  # uvicorn would log a busy port and exit 3
    token = os.environ.get(admin_token_env, "")
    dashboard = create_ui(folder, admin_token=token)  # "": none, read-only
    changes = (f"sign in with the admin token (${admin_token_env}) to promote and roll back" if token
               else f"read-only: no admin token in ${admin_token_env}")
    console.print(f"everloop dashboard of {folder.resolve()} on http://{host}:{port}/ ({changes}); "
                  "Ctrl+C stops it", soft_wrap=True, highlight=False)
    options = uvicorn_options(1)  # as `serve`: no access log, no server header, slow clients cut off
    del options["workers"]  # one process: the app is an object here, not a factory the workers import
    try:
        uvicorn.run(dashboard, host=host, port=port, log_level="warning", **options)
    except SystemExit as exc:  # uvicorn exits 1 or 3 when the server could not start; it logged why
        if exc.code not in (0, None):
            raise EverloopError(f"the dashboard on {host}:{port} did not start (exit {exc.code}); "
                                "the line above says why") from None
        raise


def _check_port(host: str, port: int) -> None:
    """Raise EverloopError, in one line naming host and port, when the server could not listen there:
    the port is taken, the host is no address of this machine, or the port needs privileges. Binds the
    way uvicorn does (SO_REUSEADDR), then lets go; a race with another process stays possible."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise EverloopError(f"--host {host}: not an address to listen on ({why})") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise EverloopError(f"port {port} on {host} is already in use; stop what listens there or "
                                    "choose another with --port") from None
            raise EverloopError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


class Engine(str, Enum):
    local = "local"
    ray = "ray"


@app.command()
def predict(source: str = typer.Argument(..., help="CSV or Parquet file (or folder, or glob) to score; with "
                                         "--query, the database URL to run it on"),
            output: Path = typer.Argument(..., help="file to write: .csv, or .parquet/.pq (the extension sets "
                                                    "the format)"),
            model: str = typer.Option("production", help="model version or alias"),
            query: Optional[str] = typer.Option(None, "--query", help="score the rows of this SQL query, run on "
                                                "the database URL given as SOURCE"),
            chunk_rows: int = typer.Option(100_000, min=1, help="rows per chunk"),
            keep: Optional[list[str]] = typer.Option(None, "--keep", help="an input column to copy into the "
                                                     "output (repeatable); id and timestamp columns always are"),
            strict: bool = typer.Option(False, "--strict", help="refuse the whole file when any row has errors "
                                        "(nothing is written) instead of setting those rows aside"),
            resume: bool = typer.Option(False, "--resume", help="continue a killed run of this command from "
                                        "its last finished chunk (the output is the same as an uninterrupted "
                                        "run's)"),
            log: Optional[bool] = typer.Option(None, "--log/--no-log", help="write the predictions to the "
                                               "prediction log, for the monitor and the loop (default: "
                                               "serving.log_predictions of the project file)"),
            engine: Engine = typer.Option(Engine.local, help="local: this process; ray: Ray Data's actors "
                                          "score the chunks (the same output), on a new local Ray (loopback "
                                          "only) or the cluster at --address; needs everloop[ray]"),
            address: Optional[str] = typer.Option(None, help="with --engine ray: the Ray cluster's GCS address "
                                                  "host:port, as 'ray start --head' prints it"),
            project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Batch-score a file or query through the same artifact as the service, in chunks; report what
    validation saw (unseen categories, nulls, values out of range). Rows with errors are set aside with
    their reasons in OUTPUT's `<stem>.rejected` side file while the rest are scored: exit 1 then. A
    missing column, or any bad row with --strict, refuses the whole file (exit 1, nothing written).
    --engine ray without Ray installed exits 3."""
    from everloop.batch import count_rows, score_file
    from everloop.batch._ray import RayUnavailable
    from everloop.spec import SqlSource, redact_url

    spec, store = _project(project)
    try:
        where = SqlSource(url=source, query=query) if query else _user_path(Path(source))
    except ValueError as exc:  # pydantic's ValidationError: a malformed ${NAME} reference in the URL
        why = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
        raise EverloopError(f"SOURCE {redact_url(source)!r} is not a usable database URL: {why}") from None
    if address and engine is not Engine.ray:
        raise EverloopError("--address is the Ray cluster for --engine ray; add --engine ray")
    try:
        with _rows_progress("scoring", as_json, total=count_rows(where)) as progress:
            result = score_file(store, where, _user_path(output), model=model, chunk_rows=chunk_rows,
                                keep=keep or [], progress=progress, strict=strict, resume=resume,
                                log=spec.serving.log_predictions if log is None else log,
                                engine=engine.value, address=address)
    except RayUnavailable as exc:  # the environment lacks an extra (README's exit codes)
        _print_error(str(exc))
        raise SystemExit(3) from None
    text = f"{result.rows} rows scored into {result.output}"
    if result.rejected:
        reasons = "; ".join(f"column {a['column']!r}: {a['message']}" for a in result.errors)
        text += f"; {result.rejected} rows set aside in {result.rejected_output} (reasons: {reasons})"
    rate = f"{result.rows / max(result.seconds, 1e-9):,.0f} rows/s" + (", compiled trees" if result.compiled else "")
    text += (f"\nmodel v{result.model_version}; {result.format}; {rate}; columns: {', '.join(result.columns)}")
    if result.resumed_chunks:
        text += f"\nresumed: {result.resumed_chunks} chunks were finished by the run that stopped"
    if result.discarded_chunks:
        text += (f"\nan unfinished earlier run's {result.discarded_chunks} chunks (and their logged predictions) "
                 "were discarded (--resume continues a run over the same files)")
    if result.logged:
        text += f"\n{result.logged} predictions logged for monitoring (labels join them by prediction_id)"
    text += "".join(f"\nnote: {n}" for n in result.notes)
    _emit(result.to_dict(), as_json, text=text + _anomaly_lines(result.warnings))
    if result.rejected:  # a check failed for some rows (README's exit codes)
        raise CheckFailed()


def _anomaly_lines(anomalies: list[dict[str, Any]]) -> str:
    """Validation anomalies (`ValidationReport.to_dict` form) as indented lines, each with example rows
    (data rows counted from 1); empty when there are none."""
    lines = []
    for a in anomalies:
        where = f" (e.g. rows {', '.join(str(r + 1) for r in a['rows'])})" if a.get("rows") else ""
        lines.append(f"\n  {a['severity']}: column {a['column']!r}: {a['message']}{where}")
    return "".join(lines)


@app.command()
def feedback(source: Path = typer.Argument(..., help="CSV or Parquet file with columns 'id' (prediction ids) "
                                            "and 'label'; or the project's id column and 'label' (or the target)"),
             project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Record ground-truth labels for earlier predictions. Rows name a prediction by its prediction id
    (column `id`), or by the input's own id (the project's `data.id` column) for predictions a batch job
    logged: the newest such prediction gets the label. Each label is checked against the model that
    made its prediction; good rows are stored, bad ones listed. Exit 1 when any row was refused or unknown."""
    import pandas as pd

    from everloop.data import iter_batches
    from everloop.serve import ids_for_keys, record_feedback

    spec, store = _project(project)
    # CSV as text: an id column must keep its leading zeros and never become a float; labels are
    # parsed by the model's rules, where "1" and 1 are one class.
    source = _user_path(source)
    batches = list(iter_batches(source, as_text=True))
    frame = pd.concat(batches, ignore_index=True) if batches else pd.DataFrame()
    key = spec.data.id if "id" not in frame.columns and spec.data.id in frame.columns else None
    label = "label" if "label" in frame.columns or spec.data.target not in frame.columns else spec.data.target
    if key is None and {"id", label} - set(frame.columns):
        by_key = f" (or {spec.data.id!r}, the project's id column)" if spec.data.id else ""
        missing = sorted({"id", label} - set(frame.columns))
        raise EverloopError(f"{source}: missing column(s) {missing}; expected 'id'{by_key} and 'label'")
    if label not in frame.columns:
        raise EverloopError(f"{source}: missing column 'label' (or {spec.data.target!r}, the target)")
    if frame.empty:
        raise EverloopError(f"{source}: no rows; expected one row per label, with columns 'id' and 'label'")

    def cell(value: Any) -> Any:  # a null cell (None, NaN, NA) is a missing value, whatever the column type
        null = value is None or value is pd.NA or (isinstance(value, float) and value != value)
        return None if null else value

    ids = [None if cell(i) is None else str(i) for i in frame[key or "id"].tolist()]
    unmatched: list[str] = []
    if key is not None:  # the input's own ids: each to the newest prediction a batch job logged for it
        found = ids_for_keys(store, [i for i in ids if i is not None])
        unmatched = list(dict.fromkeys(i for i in ids if i is not None and i not in found))
        ids = [found.get(i, "") if i is not None else None for i in ids]  # "": unmatched, reported below
    items = [{"id": i, "label": cell(v), "where": f"row {n}"}
             for n, (i, v) in enumerate(zip(ids, frame[label].tolist()), start=1) if i != ""]
    result = record_feedback(store, items, partial=True)
    result.received = len(frame)  # rows whose own id matched no batch prediction were not passed on
    shown = 20
    lines = [f"{result.accepted} labels recorded from {result.received} rows"
             + (f" ({result.superseded} replaced by a later row for the same id)" if result.superseded else "")]
    if result.problems:
        lines.append(f"{len(result.problems)} rows refused (row numbers count data rows from 1):")
        lines += [f"  {p.where}: id {p.id!r}: {p.why}" for p in result.problems[:shown]]
        if len(result.problems) > shown:
            lines.append(f"  ... and {len(result.problems) - shown} more (--json lists them all)")
    if result.unknown_ids:
        lines.append(f"{len(result.unknown_ids)} ids match no logged prediction, e.g. "
                     + ", ".join(repr(i) for i in result.unknown_ids[:3]))
    if unmatched:
        result.unknown_ids += unmatched
        lines.append(f"{len(unmatched)} {key!r} values match no prediction a batch job logged, e.g. "
                     + ", ".join(repr(i) for i in unmatched[:3]))
    _emit(result.to_dict(), as_json, text="\n".join(lines))
    if not result.complete:
        raise CheckFailed()


@app.command("monitor")
def monitor_cmd(report: Optional[Path] = typer.Option(None, help="also write an HTML report here"),
                project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Check the latest window of predictions: drift, performance, health. Exit 1 on an alert."""
    from everloop.monitor import list_runs, monitor, write_report

    spec, store = _project(project)
    result = monitor(store, spec)
    data = result.to_dict()
    w = result.window
    where = f"window {w['index']} ({w['rows']} of {w['size']:g} {w['kind']}" if "index" in w else "(no rows"
    where += ", complete)" if w.get("complete") else ", filling)" if "index" in w else ")"
    table = Table(title=f"monitor: model v{result.model_version}, {where}: {result.status}")
    for column in ("feature", "kind", "method", "effect", "p-value", "drift"):
        table.add_column(column)
    if result.drift:
        for c in result.drift.columns:
            mark = "ignored" if getattr(c, "ignored", False) else "yes" if c.drifted else ""
            table.add_row(c.column, c.kind, c.method, _num(c.effect), f"{c.p_value:.3g}", mark)
    p = result.performance
    lines = []
    if result.status == "no data":
        lines.append(f"no predictions of model v{result.model_version} in the log yet: nothing to monitor")
    else:
        judged = "performance" not in result.not_judged and p.get("value") is not None
        labelled = (f"{p.get('metric')} {_num(p.get('value'))} on the latest {p.get('labelled_rows')} labelled "
                    f"predictions" if judged else f"{p.get('metric')} on labels: not judged")
        lines.append(f"performance: {labelled} (at training {_num(p.get('expected'))}): {p.get('why', '')}")
        if p.get("estimated") is not None:
            lines.append(f"estimated without labels: {_num(p['estimated'])} (90% interval "
                         f"{_num(p.get('estimated_low'))}..{_num(p.get('estimated_high'))}): "
                         f"{p.get('estimated_why', '')}")
        if result.prediction_drift is not None:
            lines.append(f"prediction drift: effect {_num(result.prediction_drift.effect)}, "
                         f"p={result.prediction_drift.p_value:.3g}")
        if result.skew.get("rows"):
            lines.append(f"skew: {result.skew.get('mismatched', 0)} of {result.skew['rows']} replayed requests "
                         "differ through the batch path")
        h = result.health
        if h.get("latency_ms_p99") is not None:
            lines.append(f"health: {_num(h.get('rows_per_second'))} rows/s, latency p50 {_num(h['latency_ms_p50'])} "
                         f"ms, p99 {_num(h['latency_ms_p99'])} ms, error rate {_num(h.get('error_rate'))}")
    texts = [Text(line) for line in lines]
    texts += [_styled("yellow", "not judged", f": {k}: {v}") for k, v in result.not_judged.items()]
    texts += [Text(f"note: {n}") for n in result.notes]
    texts += [_styled("red", "alert", f": {a}") for a in result.alerts]
    _emit(data, as_json, table if result.drift else None, Text("\n").join(texts))
    if report:
        runs = list_runs(store, model_version=result.model_version)
        if result.status == "no data":  # nothing was stored: the page must not show an older verdict
            runs.append(data)
        write_report(report, runs, title=f"everloop monitoring: {spec.name}, model v{result.model_version}",
                     spec=spec)
        if not as_json:
            console.print(f"report: {report}")
    if not result.ok:
        raise CheckFailed()


@app.command("loop")
def loop_cmd(once: bool = typer.Option(False, "--once", help="one turn, then exit"),
             interval: float = typer.Option(300.0, min=1, help="seconds between turns as a daemon"),
             project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Monitor, and retrain, gate and promote when the spec's triggers fire."""
    from everloop.loop import run_once

    spec, store = _project(project)
    while True:
        try:
            decision = run_once(store, spec)
        except Exception as exc:  # noqa: BLE001 - as in `train`: a refused model.params value is one line
            raise _bad_param(exc, spec) or exc
        _emit((decision.to_dict()), as_json, text=f"{_when(time.time())} loop: {decision.action}: {decision.reason}")
        if once:
            if decision.action in ("failed", "kept_candidate", "rollout_rolled_back"):
                raise CheckFailed()
            return
        time.sleep(interval)


@app.command("backtest")
def backtest_cmd(path: Optional[Path] = typer.Argument(None, help="labelled data (default: the spec's data.source)"),
                 initial_rows: Optional[int] = typer.Option(None, min=1, help="rows of the first training period"),
                 window_rows: Optional[int] = typer.Option(None, min=1,
                                                           help="rows per window (default: monitoring.window.rows)"),
                 report: Optional[Path] = typer.Option(None, help="also write an HTML report here"),
                 project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Replay labelled, time-ordered data through the retraining policy; compare with never and always retraining."""
    from everloop.data import read_source
    from everloop.loop import backtest, write_backtest_report
    from everloop.spec import load_spec
    from everloop.store import STORE_DIR, Store

    folder = _project_folder(project)
    spec = load_spec(folder)
    # with a store: replay what the loop would retrain (a clone of an imported production pipeline)
    store = Store.for_project(folder) if (folder / STORE_DIR).exists() else None
    frame = read_source(_user_path(path) or spec.data.source, project)
    say = (lambda _m: None) if as_json else (lambda m: console.print(_styled("dim", "•", f" {m}")))
    result = backtest(frame, spec, initial_rows=initial_rows, window_rows=window_rows, progress=say, store=store)
    s = result.summary()
    table = Table(title=f"backtest: {s['windows']} windows, {result.metric} per strategy")
    for column in ("strategy", f"mean {result.metric}", "retrainings"):
        table.add_column(column)
    for name, label in (("policy", "the spec's policy"), ("never", "never retrain"), ("every_window", "every window")):
        table.add_row(label, _num(s[f"mean_{name}"]), str(s["retrainings"][name]))
    _emit(result.to_dict(), as_json, table)
    if report:
        write_backtest_report(report, result, title=f"everloop backtest: {spec.name}")
        if not as_json:
            console.print(f"report: {report}")


deploy_app = typer.Typer(help="Deployment files: a Docker build context (the service, or a training image that "
                              "reproduces a run) and Kubernetes manifests.", no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")
ForceOpt = typer.Option(False, "--force", help="write into a folder that is not empty (its files of the same "
                                                "names are replaced)")


@deploy_app.command("docker")
def deploy_docker(output: Optional[Path] = typer.Option(None, "--output", "-o", help="folder for the build context "
                                                        "(default: deploy/docker in the project; deploy/train "
                                                        "with --train)"),
                  train: Optional[str] = typer.Option(None, "--train", metavar="VERSION", help="instead of the "
                                                      "service: a training image that reproduces this model "
                                                      "version (or alias) from its record"),
                  image: Optional[str] = typer.Option(None, help="image reference used in the instructions "
                                                      "(default: everloop-NAME:EVERLOOP_VERSION)"),
                  port: int = typer.Option(8000, min=1, max=65535, help="port the service listens on in the "
                                                                        "container"),
                  workers: int = typer.Option(1, min=1, help="uvicorn worker processes in the container"),
                  force: bool = ForceOpt, project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Write a Docker build context for the service (or, with --train, a training image).

    Dockerfile, pinned requirements and the project file; the image takes its configuration from the
    environment only (EVERLOOP_DB_URL, EVERLOOP_ARTIFACTS_URL; tokens as secrets)."""
    import shlex

    from everloop import deploy
    from everloop.spec import load_spec

    if train is not None:
        spec, store = _project(project)
        target = _user_path(output) or project / "deploy" / "train"
        result = deploy.write_training(project, spec, store, train, target, image=image, force=force)
        what = f"a training image for model v{result.command[-1]}"
    else:
        spec = load_spec(_project_folder(project))
        target = _user_path(output) or project / "deploy" / "docker"
        result = deploy.write_docker(project, spec, target, image=image, port=port, workers=workers, force=force)
        what = "the service's image"
    shown = os.path.relpath(result.output)
    lines = [f"wrote the build context of {what} to {shown}: {', '.join(result.files)}",
             f"command: {shlex.join(result.command)}",
             f"build: docker build -t {result.image} {shlex.quote(shown)} (how to push and run: the Dockerfile's "
             "header)"]
    _emit(result.to_dict(), as_json, text="\n".join(lines + [f"note: {n}" for n in result.notes]))


@deploy_app.command("k8s")
def deploy_k8s(output: Optional[Path] = typer.Option(None, "--output", "-o", help="folder for the manifests "
                                                     "(default: deploy/k8s in the project)"),
               target_rps: Optional[float] = typer.Option(None, "--target-rps", help="one-row requests a second "
                                                          "to size for: measures the production model's cost "
                                                          "here and writes the replicas and CPU it needs"),
               replicas: Optional[int] = typer.Option(None, min=1, help="replicas, when not sized by "
                                                      "--target-rps (default 2)"),
               image: Optional[str] = typer.Option(None, help="the service's image (default: "
                                                   "everloop-NAME:EVERLOOP_VERSION, as deploy docker names it)"),
               artifacts_url: Optional[str] = typer.Option(None, "--artifacts-url", help="the shared artifact "
                                                           "store (default: $EVERLOOP_ARTIFACTS_URL)"),
               schedule: str = typer.Option("*/15 * * * *", help="cron schedule of the loop's CronJob"),
               force: bool = ForceOpt, project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Write Kubernetes manifests for the service and the loop, sized with --target-rps.

    Deployment, Service, autoscaler, disruption budget, ConfigMap, Secret references, a CronJob
    running 'everloop loop --once', and a kustomization that applies them."""
    from everloop import deploy

    if target_rps is not None and replicas is not None:
        raise EverloopError("give --target-rps (the replicas are sized from it) or --replicas, not both")
    if target_rps is not None and not 0 < target_rps < float("inf"):
        raise EverloopError(f"--target-rps {target_rps:g}: expected a rate above 0 (one-row requests a second)")
    fields = schedule.split()
    if len(fields) != 5 and not (len(fields) == 1 and schedule.startswith("@")):
        raise EverloopError(f"--schedule {schedule!r}: expected a cron schedule of 5 fields (minute hour day "
                            "month weekday), e.g. '*/15 * * * *', or a macro such as '@hourly'")
    if target_rps is not None:  # the production model is measured: the store is needed
        spec, store = _project(project)
        with console.status("measuring the production model...") if not as_json else nullcontext():
            sizing = deploy.size(target_rps, deploy.measure(project, spec, store))
    else:
        from everloop.spec import load_spec

        spec, sizing = load_spec(_project_folder(project)), None
    target = _user_path(output) or project / "deploy" / "k8s"
    result = deploy.write_k8s(project, spec, target, image=image, replicas=replicas, sizing=sizing,
                              artifacts_url=artifacts_url, schedule=schedule, force=force)
    shown = os.path.relpath(result.output)
    lines = [f"wrote {len(result.files)} files to {shown}: {', '.join(result.files)}"]
    if sizing is not None:
        m = sizing.measurement
        lines.append(f"sized for {target_rps:g} requests/s: {sizing.replicas} replicas, CPU {sizing.cpu_request_m}m "
                     f"requested, {sizing.cpu_limit_m}m limit each (model v{m.model_version}: {m.request_ms:.3f} ms "
                     "per one-row request here; the arithmetic is in deployment.yaml)")
    lines.append(f"apply: kubectl apply -k {shown} (first the Secret {deploy.k8s_name(spec.name)}-secrets: see "
                 "kustomization.yaml)")
    _emit(result.to_dict(), as_json, text="\n".join(lines + [f"note: {n}" for n in result.notes]))


@app.command("doctor")
def doctor_cmd(repair: bool = typer.Option(False, "--repair", help="delete what is safe to delete: temporary "
                                           "files of killed writers, artifacts no row references, compiled "
                                           "libraries that do not match their recorded hash (rebuilt when "
                                           "needed); never a referenced artifact or a database row"),
               grace: Optional[float] = typer.Option(None, "--grace", min=0, metavar="SECONDS",
                                                     help="leave temporary and unreferenced files younger than "
                                                          "this alone (a writer may be at work); default 3600"),
               project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Check the store's integrity: artifacts and their hashes, references, leftover files, the loop's audit
    rows, compiled libraries, the prediction log. Exit 1 while errors remain."""
    from everloop.store import DB_URL_ENV, STORE_DIR, Store, doctor

    folder = _project_folder(project)
    if not (folder / STORE_DIR).is_dir() and not os.environ.get(DB_URL_ENV):
        raise EverloopError(f"no store in {folder / STORE_DIR}: nothing to check (run 'everloop ingest' first)")
    store = Store.for_project(folder)
    report = doctor(store, repair=repair, **({} if grace is None else {"grace": grace}))
    table = Table(title="doctor: findings")
    for column in ("severity", "check", "where", "finding", "repaired"):
        table.add_column(column, overflow="fold")  # a path cut short could not be found
    for f in report.findings:
        table.add_row(_styled("red" if f.severity == "error" else "yellow", f.severity), f.code, f.where,
                      f.message, f.repaired or "-")
    checked = ", ".join(f"{what}: {n}" for what, n in report.checked.items())
    verdict = (_styled("red", "errors", f": {len(report.errors)}") if report.errors else
               _styled("green", "ok", " (no errors)"))
    lines = [Text.assemble(verdict, f"; warnings: {len(report.warnings)}; repaired: {len(report.repaired)}"),
             Text(f"checked: {checked}")]
    lines += [Text(f"note: {n}") for n in report.notes]
    if not repair and any(f.code in ("temp_file", "artifact_orphan", "compiled_mismatch", "compiled_unrecorded")
                          for f in report.findings):
        lines.append(Text(f"run '{_command(project, 'doctor', '--repair')}' to delete the leftover files"))
    _emit(report.to_dict(), as_json, table if report.findings else None, Text("\n").join(lines))
    store.close()
    if not report.ok:
        raise CheckFailed()


def main() -> None:
    """Entry point: errors become one clean message (no traceback) and the README's exit codes:
    0 success; 1 a check failed (CheckFailed, or rows refused by validation: a DataError carrying a
    report with errors, so `ingest`, `predict` and `validate` exit alike on the same report; or a
    ConflictError: another process changed what the command read, e.g. a concurrent promote); 2 bad
    input (any other EverloopError, and an OSError on a path the user gave: missing, a folder, no
    permission). Click's own usage errors exit 2."""
    try:
        app()  # click handles its own usage errors (exit 2) and exits 0 on success
    except CheckFailed:
        raise SystemExit(1) from None
    except EverloopError as exc:
        _print_error(str(exc))
        raise SystemExit(1 if _refused_by_validation(exc) else 2) from None
    except OSError as exc:
        if exc.filename is None:  # not about a path: a bug or the system, keep the traceback
            raise
        _print_error(f"{exc.filename}: {exc.strerror or exc}")
        raise SystemExit(2) from None


def _print_error(message: str) -> None:
    # soft_wrap: a long line stays one line when piped, for grep and logs
    errors.print(f"error: {message}", style="red", highlight=False, markup=False, soft_wrap=True)


def _refused_by_validation(exc: EverloopError) -> bool:
    """Data read fine but failed the schema's checks (exit 1, like `validate`), as opposed to data that
    could not be read or arguments that make no sense (exit 2)."""
    from everloop.errors import ConflictError, DataError

    if isinstance(exc, ConflictError):  # lost a race: a refusal, retrying may work
        return True
    report = exc.report if isinstance(exc, DataError) else None
    return report is not None and not report.ok


# -- export ---------------------------------------------------------------------------------------

export_app = typer.Typer(help="Models for devices at the edge: the whole pipeline as one ONNX file, "
                              "parity-checked.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("onnx")
def export_onnx(model: str = typer.Argument(..., help="model version or alias (e.g. 3, production)"),
                output: Optional[Path] = typer.Option(None, "--output", "-o", help="the .onnx file to write "
                                                      "(default: NAME-vN.onnx in the current folder)"),
                tolerance: float = typer.Option(1e-5, min=0.0, help="largest accepted difference between "
                                                "onnxruntime's and everloop's answers (probabilities; for "
                                                "regressors relative to the largest prediction); past it "
                                                "nothing is written and the exit code is 1"),
                force: bool = typer.Option(False, "--force", help="replace the output file if it exists"),
                project: Path = ProjectOpt, as_json: bool = JsonOpt) -> None:
    """Export a model (features + estimator) to one ONNX file, checked against everloop's answers.

    Prints the file's size, the parity check (on the model's evaluation rows, with missing values and
    unseen categories), single-row latency in onnxruntime against scikit-learn, the graph's inputs,
    and a Python example that runs the file with onnxruntime and numpy alone (docs/export.md).
    Exit codes: 1 the answers differ past --tolerance (nothing written), 2 a step that cannot be
    converted (named), 3 the `onnx` extra is not installed."""
    from everloop import export, registry

    spec, store = _project(project)
    number = registry.resolve(store, model)
    target = _user_path(output) or Path(os.path.abspath(f"{spec.name}-v{number}.onnx"))
    try:
        with console.status("converting and checking...") if not as_json else nullcontext():
            result = export.export_onnx(store, number, target, tolerance=tolerance, overwrite=force)
    except export.MissingExtra as exc:
        _print_error(str(exc))
        raise SystemExit(3) from None
    except export.ParityError as exc:
        _emit(exc.result.to_dict(), as_json, _export_table(exc.result))
        _print_error(str(exc))
        raise CheckFailed() from None
    lines = [f"wrote {os.path.relpath(result.path)} ({result.bytes:,} bytes): model v{result.model_version}, "
             "features + estimator",
             "run it with onnxruntime and numpy alone (no everloop, no scikit-learn):", "", result.example]
    _emit(result.to_dict(), as_json, _export_table(result), "\n".join(lines))


def _export_table(result: Any) -> Table:
    table = Table(title=f"ONNX export of model v{result.model_version}")
    table.add_column("check")
    table.add_column("value")
    verdict = Text("pass", style="green") if result.passed else Text("refused", style="red")
    table.add_row("parity", verdict)
    table.add_row("rows checked", f"{result.rows_checked:,}: {result.rows_source}")
    if result.labels_equal is not None:
        ties = f" ({result.tied_labels} differ at a tie within the tolerance)" if result.tied_labels else ""
        table.add_row("labels equal", ("yes" if result.labels_equal else "no") + ties)
    what = "probability" if result.task == "classification" else "prediction"
    table.add_row(f"largest {what} difference", f"{result.max_abs_diff:.3g}" + (
        f" ({result.max_diff:.3g} relative)" if result.task != "classification" else "")
        + f"; tolerance {result.tolerance:g}")
    table.add_row("size", f"{result.bytes:,} bytes")
    ms = result.latency_ms
    table.add_row("one-row latency (p50, 1 thread)", f"onnxruntime {ms['onnxruntime']:.3f} ms, scikit-learn "
                  f"{ms['sklearn']:.3f} ms")
    for item in result.inputs:
        detail = item.type + (f", one of {', '.join(map(json.dumps, item.values))}" if item.values else "") + (
            f" ({item.note})" if item.note else "") + f"; missing: {item.missing}"
        table.add_row(f"input {item.name}", detail)
    for item in result.outputs:
        table.add_row(f"output {item['name']}", f"{item['type']} {item['shape']}")
    return table
