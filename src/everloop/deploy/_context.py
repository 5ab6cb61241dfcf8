"""What every deployment file shares: the output folder, the pinned dependencies of this
environment, the everloop source to install, and the image's name."""

from __future__ import annotations

import json
import platform
import shutil
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

from everloop.errors import EverloopError

PORT = 8000
UID = 10001  # numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd
APP_DIR = "/app"  # the project folder inside the image; .everloop/ below it is the store's local cache
# Extras never put in an image: the development tools.
SKIPPED_EXTRAS = frozenset({"dev"})
# Debian packages that a distribution's Linux wheels load from the system and that the slim Python
# base lacks (it has libc, libstdc++6, libgcc-s1 and zlib1g). lightgbm's lib_lightgbm.so links the
# system libgomp.so.1 (lightgbm-org/LightGBM#7141); scikit-learn and xgboost bundle theirs.
# tests/deploy/test_system_libraries.py checks the installed wheels against this table with ldd.
SYSTEM_PACKAGES = {"lightgbm": ("libgomp1",)}


def prepare_output(folder: Path, force: bool, project: Path | None = None) -> Path:
    """`folder`, created if missing. Raises EverloopError when it is a file, the project folder
    itself, or a folder that holds anything and `force` is False (a build context must hold only
    what is written into it)."""
    if project is not None and folder.resolve() == project.resolve():
        raise EverloopError(f"{folder}: is the project folder; give a folder of its own with --output")
    if folder.exists() and not folder.is_dir():
        raise EverloopError(f"{folder}: is a file; give a folder with --output")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise EverloopError(f"{folder}: the folder is not empty; give an empty or new one with --output, or "
                            "--force to replace the files written there")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def image_name(project: str) -> str:
    """The default image reference of a project: `everloop-<name>:<everloop version>`, the name in
    the characters an image repository allows (lower-case letters and digits between '-')."""
    import re

    from everloop import __version__

    return f"everloop-{re.sub(r'[^a-z0-9]+', '-', project.lower()).strip('-')}:{__version__}"


def system_packages(pins: dict[str, str]) -> dict[str, list[str]]:
    """The Debian packages the image must install for the pinned distributions (`SYSTEM_PACKAGES`):
    {package: [the distributions that need it]}, sorted."""
    from packaging.utils import canonicalize_name

    needed: dict[str, list[str]] = {}
    for name in pins:
        for package in SYSTEM_PACKAGES.get(canonicalize_name(name), ()):
            needed.setdefault(package, []).append(name)
    return dict(sorted(needed.items()))


def has_registry(image: str) -> bool:
    """Whether an image reference names its registry (`registry.example.com/app:1`, `localhost:5000/app`):
    its first path component has a '.' or a ':', or is `localhost`, as Docker reads it."""
    first, slash, _ = image.partition("/")
    return bool(slash) and ("." in first or ":" in first or first == "localhost")


def pinned_requirements(overrides: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """everloop's dependency closure as installed here: ({distribution name: version}, notes).

    Walks the installed metadata from everloop down (its extras too, but `dev`: e.g. `postgres` and
    `s3` once installed, so that the image reaches the shared store), evaluating environment markers
    for Linux, where the image runs. everloop's own requirements come from its pyproject.toml when it
    runs from a source tree (an editable install's metadata is as old as the install). `overrides`
    pins named packages to other versions (a recorded run's). everloop itself is left out (see
    `everloop_source`). A required package that is not installed here is named in the notes and
    left out."""
    from packaging.requirements import Requirement  # packaging comes with plotly, a core dependency
    from packaging.utils import canonicalize_name

    environment = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                   "platform_machine": {"arm64": "aarch64", "AMD64": "x86_64"}.get(platform.machine(),
                                                                                  platform.machine())}
    pins: dict[str, str] = {}
    notes: list[str] = []
    seen: set[tuple[str, str]] = set()
    todo = [(Requirement(line), label) for line, label in _own_requirements()]
    while todo:
        requirement, wanted_by = todo.pop()
        key = canonicalize_name(requirement.name)
        for extra in sorted(requirement.extras) or [""]:
            if (key, extra) in seen:
                continue
            seen.add((key, extra))
            try:
                dist = distribution(requirement.name)
            except PackageNotFoundError:
                if (key, "") not in seen:
                    seen.add((key, ""))
                    notes.append(f"{requirement.name} (for {wanted_by}) is not installed here: left out of "
                                 "the image")
                continue
            pins[dist.metadata["Name"]] = dist.version
            label = dist.metadata["Name"] + (f"[{extra}]" if extra else "")
            for line in dist.requires or []:
                child = Requirement(line)
                if child.marker is None or child.marker.evaluate(environment | {"extra": extra}):
                    todo.append((child, label))
    for name, version in (overrides or {}).items():
        if canonicalize_name(name) != "everloop":
            found = next((n for n in pins if canonicalize_name(n) == canonicalize_name(name)), name)
            pins[found] = version
    return dict(sorted(pins.items(), key=lambda kv: kv[0].lower())), notes


def _own_requirements() -> list[tuple[str, str]]:
    """everloop's requirements (every extra but the skipped ones) as (requirement, "everloop[extra]")."""
    tree = _source_tree()
    if tree is not None:
        import tomllib

        project = tomllib.loads((tree / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        groups = {"": project.get("dependencies", [])} | project.get("optional-dependencies", {})
        return [(line, f"everloop[{extra}]" if extra else "everloop")
                for extra, lines in groups.items() if extra not in SKIPPED_EXTRAS for line in lines]
    from packaging.requirements import Requirement

    out = []
    for line in distribution("everloop").requires or []:
        marker = Requirement(line).marker
        extra = next((e for e in distribution("everloop").metadata.get_all("Provides-Extra") or []
                      if marker is not None and marker.evaluate({"extra": e})), "")
        if marker is None or (extra and extra not in SKIPPED_EXTRAS):
            out.append((line.split(";")[0], f"everloop[{extra}]" if extra else "everloop"))
    return out


def _source_tree() -> Path | None:
    """The source tree this everloop runs from (an editable or local-folder install), or None."""
    dist = distribution("everloop")
    url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    tree = Path(url.removeprefix("file://")) if url.startswith("file://") else None
    if tree is None or not (tree / "pyproject.toml").is_file() or not (tree / "src" / "everloop").is_dir():
        return None
    return tree


def requirements_text(pins: dict[str, str], header: str) -> str:
    """A pip requirements file: `# header` lines, then `name==version` per package."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    return "\n".join(lines + [f"{name}=={version}" for name, version in pins.items()]) + "\n"


def everloop_source(target: Path) -> str | None:
    """Put what the image installs everloop from into `target`: the source tree when this everloop
    runs from one (an editable or local install), copied to `target` (pyproject, readme, licence,
    src/); returns None then. Otherwise (a release from an index) nothing is copied and the
    requirement `everloop==VERSION` is returned."""
    tree = _source_tree()
    if tree is None:
        return f"everloop=={distribution('everloop').version}"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for pattern in ("pyproject.toml", "setup.cfg", "setup.py", "README*", "LICENSE*", "COPYING*"):
        for path in tree.glob(pattern):
            shutil.copy2(path, target / path.name)
    shutil.copytree(tree / "src", target / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*"))
    return None


def python_minor() -> str:
    """The running Python's `major.minor`, e.g. `3.11`: the tag of the image's base."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def secret_notes(spec: Any) -> list[str]:
    """Notes naming each project-file value that holds a literal secret (a SQL source's password, a
    webhook's key): the deploy files copy everloop.yaml as it is, into an image or a ConfigMap, where a
    secret does not belong. The fix is a `${NAME}` reference and the value in the environment."""
    from everloop.spec import scrub_spec

    body = spec.model_dump(mode="json")
    scrubbed = scrub_spec(body)
    found = []
    source = (body.get("data") or {}).get("source")
    if source != (scrubbed.get("data") or {}).get("source"):
        found.append(("data.source", (scrubbed["data"]["source"] or {}).get("url") if isinstance(source, dict)
                      else scrubbed["data"]["source"]))
    if (body.get("monitoring") or {}).get("webhook") != (scrubbed.get("monitoring") or {}).get("webhook"):
        found.append(("monitoring.webhook", scrubbed["monitoring"]["webhook"]))
    return [f"everloop.yaml's {field} holds a literal secret, and these files copy everloop.yaml as it is: write "
            f"it as {value} and set the variable in the environment (a Secret on Kubernetes)" for field, value in found]
