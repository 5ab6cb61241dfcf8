"""Issue 12, bullet 1: the README's path works literally. `test_the_readme_runs_as_written` takes the
code block of "Using it on your data" from README.md and runs it line by line, as written, in one bash
shell started in a fresh "clone" (a temp folder whose .venv is this checkout's), asserting each line's
exit code and what it leaves behind. The other tests pin each promise on its own, fast: `--version`,
`init NAME` naming the project NAME, commands finding everloop.yaml from a sub-folder (and saying `-p`
when there is none), and an ingest refused for missing labels suggesting `--mode quarantine`.

What the README leaves to the user, the test does, and says so here:
- the user's files: `../myproject/` already holds `train.csv` (churn rows, target `churned`), `more.csv`
  (more rows, 7 without a label), `new.csv` (rows to score, no label) and `history.csv` (labelled rows
  in time order), all generated with fixed seeds;
- `$EDITOR everloop.yaml`: EDITOR is a script that makes the edit a user would (data.source train.csv,
  target/id/timestamp columns, a 500-row monitoring window so that this little data fills one, and
  model.params max_iter 40, for speed);
- `everloop serve --port 8000 --workers 2`: runs in the background on a free port (8000 may be taken on
  a shared machine) and is stopped with SIGTERM at the end, cleanly; once it is ready the test
  plays the user's clients: 600 labelled rows POSTed to /predict, their ids and true labels written to
  `labels.csv`, the file `everloop feedback labels.csv` reads.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import httpx
import pandas as pd
import pytest
import yaml

from everloop.demo import make_churn
from everloop.serve._process import free_port
from tests.conftest import Run, feature_rows, write_project

README = Path(__file__).parents[2] / "README.md"
VENV = Path(sys.executable).parent.parent  # the venv running the tests: the "clone"'s .venv
LINE_TIMEOUT_S = 240.0


def readme_block(section: str) -> list[str]:
    """The lines of the first ```bash block under the README heading `## {section}`, as written."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    found = re.search(r"```bash\n(.*?)```", text[start:end if end > 0 else None], re.S)
    assert found, f"README.md: no ```bash block under '## {section}'"
    return [line for line in found.group(1).splitlines() if line.strip()]


def command_of(line: str) -> str:
    """A README line without its trailing comment (README comments start with ' # ')."""
    return re.split(r"\s+#\s", line, maxsplit=1)[0].strip()


@dataclass
class Ran:
    line: str
    code: int
    out: str
    err: str
    err_file: Path  # where the line's stderr goes (a background process keeps writing to it)


class Shell:
    """One bash process fed lines on stdin, so that `source` and `cd` carry over from line to line as
    in a terminal. Each line runs with stdin from /dev/null (it must not eat the lines after it), its
    output in files, its exit code written by the shell to a file the test waits for."""

    def __init__(self, cwd: Path, env: dict[str, str], logs: Path):
        self.logs, self.count = logs, 0
        logs.mkdir()
        self.process = subprocess.Popen(["bash", "--noprofile", "--norc"], stdin=subprocess.PIPE, text=True,
                                        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def run(self, line: str, timeout: float = LINE_TIMEOUT_S) -> Ran:
        self.count += 1
        out, err, code = (self.logs / f"{self.count}.{kind}" for kind in ("out", "err", "code"))
        assert self.process.stdin is not None
        self.process.stdin.write(f"{{ {line}\n}} </dev/null >{out} 2>{err}\necho $? >{code}.part && "
                                 f"mv {code}.part {code}\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        while not code.exists():
            assert self.process.poll() is None, f"the shell exited while running {line!r}"
            assert time.monotonic() < deadline, f"{line!r} did not finish within {timeout:g}s"
            time.sleep(0.05)
        return Ran(line, int(code.read_text()), out.read_text(), err.read_text(), err)

    def serve(self, command: str, written_port: int, pid_file: Path) -> tuple[Ran, int, int]:
        """Start a documented `everloop serve ... --port N` line in the background on a free loopback port
        instead of `written_port`: (its line, its pid, its port)."""
        port = free_port()
        started = self.run(f"{command.replace(f'--port {written_port}', f'--port {port}')} & echo $! >{pid_file.name}")
        assert started.code == 0, started
        return started, int(pid_file.read_text()), port

    def stop(self, pid: int, started: Ran) -> None:
        """Stop a server this shell started in the background (`started`: its line) with SIGTERM, and check
        it shut down cleanly: uvicorn finishes its requests and, with one worker, then re-raises the
        signal, so `wait` gives 0 or 143 (128 + SIGTERM); its log says it finished."""
        stopped = self.run(f"kill -TERM {pid}; wait {pid}", timeout=60)
        assert stopped.code in (0, 128 + signal.SIGTERM), f"the server exited {stopped.code} on SIGTERM"
        assert "Finished server process" in started.err_file.read_text(), started.err_file.read_text()

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


EDITOR = """#!{python}
# Plays the user editing everloop.yaml: point data.source at their CSV, name the target and columns.
import sys, yaml
path = sys.argv[1]
spec = yaml.safe_load(open(path))
spec["data"] = {{"source": "train.csv", "target": "churned", "id": "customer_id", "timestamp": "event_time"}}
spec["monitoring"] = {{"window": {{"rows": 500}}}}
spec["model"]["params"] = {{"max_iter": 40}}
open(path, "w").write(yaml.safe_dump(spec, sort_keys=False))
"""


def users_files(folder: Path) -> pd.DataFrame:
    """The user's data in `folder` (see the module docstring); returns the rows their clients will send."""
    folder.mkdir()
    make_churn(2000, seed=21).to_csv(folder / "train.csv", index=False)
    more = make_churn(600, seed=22, id_offset=10_000)
    more["churned"] = more["churned"].astype("Int64")  # written 0/1 and empty, as a database export would
    more.loc[more.index[[3, 50, 51, 52, 200, 400, 599]], "churned"] = pd.NA  # 7 rows without a label
    more.to_csv(folder / "more.csv", index=False)
    make_churn(300, seed=23, id_offset=20_000).drop(columns=["churned"]).to_csv(folder / "new.csv", index=False)
    make_churn(1600, seed=24, id_offset=30_000).to_csv(folder / "history.csv", index=False)
    return make_churn(600, seed=25, id_offset=40_000)


def clients(url: str, rows: pd.DataFrame, labels_csv: Path) -> None:
    """The user's clients: wait for model v1, POST `rows` to /predict, and write the ground truth for
    the answered ids to `labels_csv` (columns id,label)."""
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(url + "/ready", timeout=2).json().get("model_version") == 1:
                break
        except (httpx.HTTPError, json.JSONDecodeError):
            pass
        assert time.monotonic() < deadline, "the server did not get ready with model v1 within 90s"
        time.sleep(0.2)
    features, ids = feature_rows(rows), []
    with httpx.Client(base_url=url, timeout=30) as client:
        for start in range(0, len(features), 200):
            answer = client.post("/predict", json={"instances": features[start:start + 200]})
            assert answer.status_code == 200, answer.text
            ids += [p["id"] for p in answer.json()["predictions"]]
    pd.DataFrame({"id": ids, "label": rows["churned"].tolist()}).to_csv(labels_csv, index=False)


def expectations(project: Path) -> dict[str, tuple[int, Callable[[Ran], Any]]]:
    """Per README command: the exit code it must give and a check of what it did."""

    def has(*texts: str, made: str | None = None) -> Callable[[Ran], Any]:
        """The line printed every one of `texts`, and wrote the file `made` in the project folder."""
        def check(ran: Ran) -> None:
            assert all(t in ran.out for t in texts), f"{ran.line!r} printed {ran.out!r}"
            assert made is None or (project / made).stat().st_size > 0, f"{ran.line!r}: no {made}"
        return check

    def spec_named(ran: Ran) -> None:
        assert yaml.safe_load((project / "everloop.yaml").read_text())["name"] == "myproject"

    def edited(ran: Ran) -> None:
        assert yaml.safe_load((project / "everloop.yaml").read_text())["data"]["source"] == "train.csv"

    return {
        "source .venv/bin/activate": (0, lambda ran: None),
        "everloop --version": (0, has(f"everloop {version('everloop')}")),
        "everloop init ../myproject": (0, spec_named),
        "cd ../myproject && $EDITOR everloop.yaml": (0, edited),
        "everloop ingest": (0, has("dataset v1: 2000 rows", "schema inferred and written to")),
        "everloop ingest more.csv --mode quarantine": (0, has("dataset v2: 593 rows", "7 rows quarantined")),
        "everloop datasets diff 1 2": (0, has("dataset v1 (2000 rows) -> v2 (593 rows)")),
        "everloop schema accept": (0, has("no change: schema v1 is already this one")),
        "everloop train": (0, has("model v1: roc_auc")),
        "everloop promote 1": (0, has("model v1 is in production")),
        "everloop reproduce 1": (0, has("model v1 reproduced: identical outputs")),
        "everloop models card 1": (0, has("model card: model-v1.html", made="model-v1.html")),
        "everloop serve --port 8000 --workers 2": (0, lambda ran: None),  # run in the background, see above
        "everloop predict new.csv scored.csv --keep plan": (0, lambda ran: _scored(project / "scored.csv")),
        "everloop feedback labels.csv": (0, has("600 labels recorded from 600 rows")),
        "everloop monitor --report report.html": (0, has(": healthy", made="report.html")),
        "everloop loop --once": (0, has("loop: idle: no trigger fired")),
        "everloop backtest history.csv --report bt.html": (0, has("backtest: 1 windows", made="bt.html")),
        "everloop deploy k8s --output k8s/ --target-rps 200": (0, has("replicas", made="k8s/deployment.yaml")),
        "everloop export onnx production -o model.onnx": (0, has("parity", "pass", "labels equal",
                                                                   made="model.onnx")),
        "everloop doctor": (0, has("ok (no errors)")),
    }


def _scored(path: Path) -> None:
    scored = pd.read_csv(path)
    assert len(scored) == 300 and {"customer_id", "plan", "prediction", "model_version"} <= set(scored.columns)
    assert (scored["model_version"] == 1).all()


@pytest.mark.e2e
def test_the_readme_runs_as_written(tmp_path: Path) -> None:
    lines = readme_block("Using it on your data")
    project = tmp_path / "myproject"
    expected = expectations(project)
    unknown = [line for line in lines if command_of(line) not in expected]
    assert not unknown, f"README lines this test has no expectation for (add them to expectations()): {unknown}"
    assert [command_of(line) for line in lines][:4] == list(expected)[:4], "the README's first lines moved"

    clone = tmp_path / "everloop"  # a fresh clone, after the quickstart: it has .venv/
    clone.mkdir()
    (clone / ".venv").symlink_to(VENV, target_is_directory=True)
    traffic = users_files(project)
    editor = tmp_path / "editor"
    editor.write_text(EDITOR.format(python=sys.executable))
    editor.chmod(0o755)
    bin_dir = str(VENV / "bin")  # not on PATH until the README's `source` line puts it there
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != bin_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVERLOOP_", "PROMETHEUS_", "VIRTUAL_ENV"))}
    env |= {"PATH": path, "EDITOR": str(editor), "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}

    shell = Shell(clone, env, tmp_path / "logs")
    server_pid: int | None = None
    try:
        for line in lines:
            command = command_of(line)
            if command.startswith("everloop serve "):
                server, server_pid, port = shell.serve(command, 8000, project / "server.pid")
                clients(f"http://127.0.0.1:{port}", traffic, project / "labels.csv")
                continue
            ran = shell.run(line)
            code, check = expected[command]
            assert ran.code == code, f"{line!r} exited {ran.code}, expected {code}:\n{ran.out}\n{ran.err}"
            check(ran)
        assert server_pid is not None, "the README starts no server"
        shell.stop(server_pid, server)
        server_pid = None
        assert not (clone / "myproject").exists() and not (clone / ".everloop").exists()  # nothing in the clone
    finally:
        if server_pid is not None:
            try:
                os.kill(server_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        shell.close()


# -- each promise on its own ------------------------------------------------------------------------------


def test_version_prints_the_installed_version(everloop: Callable[..., Run]) -> None:
    run = everloop("--version")
    assert run.code == 0 and run.out.strip() == f"everloop {version('everloop')}"


def test_init_names_the_project_after_its_folder(tmp_path: Path, everloop: Callable[..., Run]) -> None:
    assert everloop("init", str(tmp_path / "myproject")).code == 0
    assert yaml.safe_load((tmp_path / "myproject" / "everloop.yaml").read_text())["name"] == "myproject"
    (tmp_path / "my churn (v2)").mkdir()
    assert everloop("init", "--example", "churn", cwd=tmp_path / "my churn (v2)").code == 0  # ".": its name
    spec = yaml.safe_load((tmp_path / "my churn (v2)" / "everloop.yaml").read_text())
    assert spec["name"] == "my-churn-v2" and spec["data"]["source"] == "data/customers.csv"
    assert everloop("init", str(tmp_path / "x"), "--name", "churn-eu").code == 0
    assert yaml.safe_load((tmp_path / "x" / "everloop.yaml").read_text())["name"] == "churn-eu"
    refused = everloop("init", str(tmp_path / "y"), "--name", "no spaces")
    assert refused.code == 2 and "--name 'no spaces'" in refused.err and not (tmp_path / "y").exists()


def test_commands_find_the_project_in_a_folder_above(tmp_path: Path, everloop: Callable[..., Run]) -> None:
    project = write_project(tmp_path / "proj", rows=300)
    deep = project / "notebooks" / "week1"
    deep.mkdir(parents=True)
    ingested = everloop("ingest", "--json", cwd=deep)  # data.source stays relative to the project folder
    assert ingested.code == 0, ingested.err
    assert json.loads(ingested.out)["rows"] == 300
    assert (project / ".everloop").is_dir() and not (deep / ".everloop").exists()
    listed = everloop("datasets", "--json", cwd=deep)
    assert [d["version"] for d in json.loads(listed.out)] == [1]
    # a path on the command line stays relative to where the command is typed
    make_churn(50, seed=4, id_offset=5000).to_csv(deep / "more.csv", index=False)
    assert json.loads(everloop("ingest", "more.csv", "--json", cwd=deep).out)["rows"] == 50

    nowhere = tmp_path / "elsewhere"
    nowhere.mkdir()
    run = everloop("datasets", cwd=nowhere)
    assert run.code == 2
    assert f"no everloop.yaml in {nowhere}" in run.err and "-p/--project FOLDER" in run.err
    given = everloop("datasets", "-p", str(nowhere))  # an explicit -p is taken as given: no search above
    assert given.code == 2 and f"--project {nowhere}: no everloop.yaml" in given.err


def test_an_ingest_refused_for_missing_labels_suggests_quarantine(tmp_path: Path,
                                                                  everloop: Callable[..., Run]) -> None:
    project = write_project(tmp_path / "proj", rows=300)
    assert everloop("ingest", cwd=project).code == 0
    more = make_churn(100, seed=9, id_offset=9000)
    more["churned"] = more["churned"].astype("Int64")
    more.loc[more.index[:4], "churned"] = pd.NA
    more.to_csv(project / "more.csv", index=False)
    refused = everloop("ingest", "more.csv")
    assert refused.code == 1
    assert "4 missing labels" in refused.err
    assert refused.err.rstrip().endswith("with their reasons: everloop ingest more.csv --mode quarantine")
    stored = everloop("ingest", "more.csv", "--mode", "quarantine", "--json")  # the suggestion works
    assert stored.code == 0
    assert (json.loads(stored.out)["rows"], json.loads(stored.out)["quarantined"]) == (96, 4)
    missing = make_churn(10, seed=9).drop(columns=["age"])  # a whole column: quarantine would not help
    missing.to_csv(project / "bad.csv", index=False)
    column = everloop("ingest", "bad.csv")
    assert column.code == 1 and "--mode quarantine" not in column.err
