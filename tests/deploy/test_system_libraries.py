"""`everloop deploy docker`: the image holds the system libraries its pinned wheels load. The final
stage is `python:X-slim`, which lacks some (libgomp1, that lightgbm's wheel links: LightGBM#7141);
the Dockerfile installs exactly those, and the table it reads them from is checked against the
installed wheels with ldd."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from everloop.deploy import _docker
from everloop.deploy._context import SYSTEM_PACKAGES, pinned_requirements
from tests.deploy.conftest import final_stage

# What python:3.11-slim (Debian) has of the libraries a wheel may link from the system: glibc's,
# libgcc-s1, libstdc++6 and zlib1g (the manylinux policy's usual ones). Not libgomp1.
SLIM = {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libresolv.so.2", "libutil.so.1",
        "libgcc_s.so.1", "libstdc++.so.6", "libz.so.1"}
# The Debian package of each library SYSTEM_PACKAGES may install.
DEBIAN = {"libgomp.so.1": "libgomp1"}
APT = "apt-get update && apt-get install --yes --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*"


def _dockerfile(project: Path, output: Path, monkeypatch, lightgbm: bool, image: str | None = None) -> str:
    from everloop.spec import load_spec

    pins, notes = pinned_requirements()
    pins = {k: v for k, v in pins.items() if k != "lightgbm"} | ({"lightgbm": "4.6.0"} if lightgbm else {})
    monkeypatch.setattr(_docker, "pinned_requirements", lambda overrides=None: (pins, notes))
    _docker.write_docker(project, load_spec(project), output, image=image)
    return (output / "Dockerfile").read_text()


@pytest.mark.parametrize("lightgbm", [True, False])
def test_libgomp_is_installed_iff_lightgbm_is_pinned(project, tmp_path, monkeypatch, hadolint, lightgbm):
    dockerfile = _dockerfile(project, tmp_path / "ctx", monkeypatch, lightgbm)
    lint = subprocess.run([hadolint, str(tmp_path / "ctx" / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0 and lint.stdout == "", lint.stdout + lint.stderr
    stage = final_stage(dockerfile)
    installs = [" ".join(step.split()) for step in stage["run"] if "apt-get" in step]
    assert installs == ([APT] if lightgbm else [])
    if lightgbm:  # the one ignored rule (no Debian version pin) is said why, above the step
        assert "# hadolint ignore=DL3008" in dockerfile and "libgomp1 for lightgbm" in dockerfile


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("ldd") is None, reason="needs Linux's ldd")
def test_the_wheels_need_no_system_library_the_image_lacks():
    """Every compiled library of every pinned distribution installed here loads with the slim base's
    libraries, the libraries wheels bundle (in site-packages), and the Debian packages SYSTEM_PACKAGES
    installs for it."""
    pins, _ = pinned_requirements()
    lacking = []
    for name in pins:
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        root = Path(dist.locate_file("")).resolve()
        libraries = [str(dist.locate_file(f)) for f in dist.files or [] if ".so" in f.suffixes]
        # a bundled library found through its loader's RPATH, which ldd on the library alone does not see
        bundled = {f.name for f in dist.files or []}
        installed = SYSTEM_PACKAGES.get(canonicalize_name(name), ())
        allowed = SLIM | bundled | {lib for lib, package in DEBIAN.items() if package in installed}
        for start in range(0, len(libraries), 200):
            out = subprocess.run(["ldd", *libraries[start:start + 200]], capture_output=True, text=True).stdout
            for line in out.splitlines():
                if "=>" not in line:
                    continue
                soname, _, where = (part.strip() for part in line.partition("=>"))
                path = where.split(" (")[0]
                if path == "not found" or not Path(path).resolve().is_relative_to(root):
                    if soname not in allowed:
                        lacking.append(f"{name}: {soname} ({path})")
    assert not lacking, "add their Debian packages to SYSTEM_PACKAGES: " + "; ".join(sorted(set(lacking)))


def test_lightgbm_itself_needs_libgomp():
    """The table's one entry is still true of the installed wheel (else it installs a package for nothing)."""
    pytest.importorskip("lightgbm")
    if shutil.which("ldd") is None:
        pytest.skip("needs Linux's ldd")
    library = next(Path(distribution("lightgbm").locate_file("lightgbm")).rglob("lib_lightgbm.so"))
    assert "libgomp.so.1" in subprocess.run(["ldd", str(library)], capture_output=True, text=True).stdout
    assert SYSTEM_PACKAGES["lightgbm"] == ("libgomp1",)


def test_an_image_named_with_its_registry_is_pushed_as_named(project, tmp_path, monkeypatch):
    dockerfile = _dockerfile(project, tmp_path / "ctx", monkeypatch, False,
                             image="registry.example.com/everloop-m1:0.1.0")
    assert "#   docker push registry.example.com/everloop-m1:0.1.0\n" in dockerfile
    assert "registry.example.com/registry.example.com" not in dockerfile and "docker tag" not in dockerfile
    dockerfile = _dockerfile(project, tmp_path / "other", monkeypatch, False)  # no registry: tag, then push
    assert "#   docker tag everloop-churn:" in dockerfile and "#   docker push registry.example.com/everloop-churn:" \
        in dockerfile
