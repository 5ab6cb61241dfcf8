"""`everloop deploy docker`: a build context for the service's image, or for a training image that
reproduces a recorded run.

The Dockerfile is multi-stage: a builder installs the pinned dependencies (`requirements.txt`,
written from this environment) and everloop into a virtualenv, and the final stage, on the same
slim Python base and without a compiler, copies that virtualenv, the project file and nothing
else, after installing the system libraries that pinned wheels load and the base lacks
(`SYSTEM_PACKAGES`: libgomp1 for LightGBM). It runs as a non-root user, takes its configuration
from the environment only (`EVERLOOP_DB_URL`, `EVERLOOP_ARTIFACTS_URL`, the tokens as secrets), and
keeps its one writable folder, the store's local cache `/app/.everloop`, apart.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from everloop.deploy._context import (APP_DIR, PORT, UID, everloop_source, has_registry, image_name,
                                      pinned_requirements, prepare_output, python_minor, requirements_text,
                                      secret_notes, system_packages)
from everloop.errors import EverloopError

SOURCE_DIR = "everloop-src"  # where the context holds everloop's source, when it runs from one
CODE_DIR = "code"  # a training image's copy of the user transformer's module (features.custom)


@dataclass
class DeployResult:
    """What a deploy command wrote: the folder, its files (relative names), the image reference,
    the container's command, and notes for the user (placeholders to fill, packages left out)."""

    output: Path
    files: list[str]
    image: str
    command: list[str]
    notes: list[str] = field(default_factory=list)
    sizing: dict[str, Any] | None = None  # `deploy k8s --target-rps`: see Sizing.to_dict

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"output": str(self.output)}


def serve_command(port: int = PORT, workers: int = 1) -> list[str]:
    """The service's command in an image: `everloop serve` on every interface of the container."""
    return ["everloop", "serve", "--host", "0.0.0.0", "--port", str(port), "--workers", str(workers)]


def write_docker(project: Path, spec: Any, output: Path, *, image: str | None = None, port: int = PORT,
                 workers: int = 1, force: bool = False) -> DeployResult:
    """Write the service's build context into `output`: Dockerfile, requirements.txt, the project
    file and (when everloop runs from a source tree) everloop's source. Raises EverloopError when
    `output` is not empty and `force` is False."""
    image = image or image_name(spec.name)
    command = serve_command(port, workers)
    probe = (f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=4)")
    tail = [f"EXPOSE {port}",
            "HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \\",
            f"  CMD {json.dumps(['python', '-c', probe])}",
            f"CMD {json.dumps(command)}"]
    header = [f"The everloop service of project '{spec.name}': `everloop serve` on port {port}, {workers} "
              f"worker(s), one OpenMP thread each.",
              "Tree ensembles serve on scikit-learn here: the image has no C compiler to compile them "
              "(serving.compile_trees)."]
    notes = secret_notes(spec) + ([] if workers == 1 else [
        f"{workers} workers in one container: on Kubernetes, prefer one worker per pod and more replicas "
        "(everloop deploy k8s)"])
    prepare_output(output, force, project)
    return _write(project, output, image, command, header, tail, f"python:{python_minor()}-slim",
                  run=f"-p {port}:{port} ", env={"OMP_NUM_THREADS": "1"}, notes=notes)


def write_training(project: Path, spec: Any, store: Any, ref: str, output: Path, *, image: str | None = None,
                   force: bool = False) -> DeployResult:
    """Write a training image's build context into `output`: it runs `everloop reproduce N` for
    model version `ref` (a number or an alias), with the Python and the package versions that run
    recorded (the rest of the dependencies as installed here). Raises NotFoundError for an unknown
    version, EverloopError for an imported model (no training record) or a user transformer
    (features.custom) whose module cannot be found here to copy in."""
    from everloop import registry

    model = registry.get_model(store, ref)
    manifest = model.manifest
    if manifest.get("pipeline_source") == "imported":
        raise EverloopError(f"model v{model.version} was imported, not trained by everloop: it has no training "
                            "record to reproduce; give a version that 'everloop train' or the loop made")
    recorded = {name: v for name, v in (manifest.get("packages") or {}).items() if name != "everloop"}
    python = manifest.get("python") or python_minor()
    image = image or f"{image_name(spec.name).rpartition(':')[0]}-train:v{model.version}"
    command = ["everloop", "reproduce", str(model.version)]
    custom = ((manifest.get("spec") or {}).get("features") or {}).get("custom")
    notes = _version_notes(model.version, manifest, python)
    header = [f"Training image of project '{spec.name}': reproduces model v{model.version} from its record "
              "(`everloop reproduce`; exit 0 when the outputs are identical, 1 when not).",
              "As recorded at training: "
              + ", ".join([f"Python {python}"] + [f"{n} {v}" for n, v in recorded.items()]) + "."]
    module = _module_source(custom) if custom else None
    prepare_output(output, force, project)
    env, extra = {}, []
    if module is not None:
        _copy(module, output / CODE_DIR)
        env["PYTHONPATH"] = f"{APP_DIR}/{CODE_DIR}"
        extra = [f"COPY {CODE_DIR} {APP_DIR}/{CODE_DIR}"]
    return _write(project, output, image, command, header, [f"CMD {json.dumps(command)}"],
                  f"python:{python}-slim", run="", env=env, notes=notes, overrides=recorded, copies=extra)


def _write(project: Path, output: Path, image: str, command: list[str], header: list[str], tail: list[str],
           base: str, *, run: str, env: dict[str, str], notes: list[str],
           overrides: dict[str, str] | None = None, copies: list[str] = ()) -> DeployResult:
    """The context's files into `output` (already checked by `prepare_output`)."""
    from everloop import __version__
    from everloop.spec import SPEC_FILE

    pins, missing = pinned_requirements(overrides)
    release = everloop_source(output / SOURCE_DIR)
    if release:
        pins = pins | {"everloop": release.partition("==")[2]}
    (output / "requirements.txt").write_text(requirements_text(
        pins, f"Pinned by everloop {__version__} from the environment that ran 'everloop deploy docker'."))
    shutil.copyfile(project / SPEC_FILE, output / SPEC_FILE)
    install = ["RUN pip install --no-cache-dir --requirement /tmp/build/requirements.txt"]
    if not release:
        install = [f"COPY {SOURCE_DIR} /tmp/build/{SOURCE_DIR}", install[0] + " \\",
                   f"    && pip install --no-cache-dir --no-deps /tmp/build/{SOURCE_DIR}"]
    push = ([f"#   docker push {image}"] if has_registry(image) else
            [f"#   docker tag {image} registry.example.com/{image}", f"#   docker push registry.example.com/{image}"])
    system = system_packages(pins)
    apt = [] if not system else [
        "# System libraries that pinned wheels load and the slim base lacks: "
        + "; ".join(f"{package} for {', '.join(names)}" for package, names in system.items()) + ".",
        "# Their versions are the base's Debian release's: a pinned Debian version would break the build when",
        "# the python tag moves to a newer release.",
        "# hadolint ignore=DL3008",
        "RUN apt-get update \\",
        f"    && apt-get install --yes --no-install-recommends {' '.join(system)} \\",
        "    && rm -rf /var/lib/apt/lists/*"]
    environment = {"PATH": "/opt/venv/bin:$PATH", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
                   "HOME": "/tmp"} | env
    lines = [
        "# syntax=docker/dockerfile:1",
        *(f"# {line}" for line in header),
        "#",
        f"# Written by `everloop deploy docker` (everloop {__version__}). This folder is the whole build context:",
        f"#   docker build -t {image} {output}",
        "# Push it where your cluster pulls from:",
        *push,
        "# Run it with the configuration in the environment, secrets from a file that is never committed:",
        f"#   docker run {run}-e EVERLOOP_DB_URL=postgresql+psycopg://... \\",
        "#     -e EVERLOOP_ARTIFACTS_URL=s3://bucket/prefix --env-file secrets.env " + image,
        "# secrets.env: EVERLOOP_API_TOKEN, EVERLOOP_ADMIN_TOKEN, and the S3 credentials (AWS_ACCESS_KEY_ID,",
        "# AWS_SECRET_ACCESS_KEY; AWS_ENDPOINT_URL_S3 for a server other than AWS). See docs/deploy.md.",
        "",
        f"FROM {base} AS builder",
        "RUN python -m venv /opt/venv",
        "ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1",
        "COPY requirements.txt /tmp/build/requirements.txt",
        *install,
        "",
        f"FROM {base}",
        *apt,
        "ENV " + " \\\n    ".join(f"{k}={v}" for k, v in environment.items()),
        # --no-log-init: a high uid would otherwise grow /var/log/faillog to gigabytes
        f"RUN groupadd --system --gid {UID} everloop \\",
        f"    && useradd --system --no-log-init --uid {UID} --gid {UID} --home-dir /tmp --shell /sbin/nologin "
        "everloop",
        "COPY --from=builder /opt/venv /opt/venv",
        f"WORKDIR {APP_DIR}",
        f"COPY {SPEC_FILE} {APP_DIR}/{SPEC_FILE}",
        *copies,
        # the store's local cache (artifacts read from the shared store, compiled models): the one
        # folder the service writes, besides /tmp
        f"RUN mkdir {APP_DIR}/.everloop && chown {UID}:{UID} {APP_DIR}/.everloop",
        f"USER {UID}:{UID}",
        *tail,
    ]
    (output / "Dockerfile").write_text("\n".join(lines) + "\n")
    files = sorted(str(p.relative_to(output)) for p in output.iterdir())
    return DeployResult(output, files, image, command, notes + missing)


def _version_notes(version: int, manifest: dict[str, Any], python: str) -> list[str]:
    """Where this environment differs from the run's record (the image follows the record)."""
    import platform

    from everloop import __version__

    notes = []
    recorded = (manifest.get("packages") or {}).get("everloop")
    if recorded and recorded != __version__:
        notes.append(f"model v{version} was trained with everloop {recorded}; the image installs everloop "
                     f"{__version__}")
    if python != platform.python_version():
        notes.append(f"the image runs Python {python}, as recorded; this machine runs {platform.python_version()}")
    return notes


def _module_source(reference: str) -> Path:
    """The file or package folder of the top-level module of `module:attr` (features.custom), to
    copy into a training image. Raises EverloopError when Python cannot find it here."""
    top = reference.partition(":")[0].split(".")[0]
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        found = None
    if found is None or found.origin in (None, "built-in", "frozen"):
        raise EverloopError(f"features.custom {reference}: module {top!r} cannot be found here, so it cannot be "
                            "copied into the training image; make it importable (pip install it, or set "
                            "PYTHONPATH) and run again")
    return Path(found.origin).parent if found.submodule_search_locations else Path(found.origin)


def _copy(source: Path, target: Path) -> None:
    if target.exists():  # left by an earlier run (--force)
        shutil.rmtree(target)
    target.mkdir(parents=True)
    if source.is_dir():
        shutil.copytree(source, target / source.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        shutil.copyfile(source, target / source.name)
