"""The distributions: an sdist whose tests pass when unpacked, a wheel with the package
data, and both installable into a fresh virtualenv from the configured package index."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT

# A few real-guest tests, run from the unpacked sdist against the installed package.
SUBSET = ("tests/test_plugin.py::test_guest_file_from_guests_dir",
          "tests/test_plugin.py::test_passing_guest_test",
          "tests/test_cli.py::test_subprocess_hello_streams_console_and_exits_0",
          "examples/real_mode")
INNER = ("-p", "no:cacheprovider", "-q")


def _clean_env() -> dict[str, str]:
    """This process's environment without what would leak the project's venv or the outer pytest."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("PYTEST_")}


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 120) -> str:
    """Run `cmd`; its output, or a test failure that shows it."""
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited with {done.returncode}:\n"
                    f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}", pytrace=False)
    return done.stdout


def _build(dist: Path) -> tuple[Path, Path]:
    """The sdist (setuptools' PEP 517 backend in this venv) and a wheel built from that sdist
    in an isolated build environment (`pip wheel`), as `python -m build` would."""
    dist.mkdir()
    _run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"],
         cwd=ROOT)
    sdist, = dist.glob("minivmm-*.tar.gz")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", dist, sdist])
    wheel, = dist.glob("minivmm-*.whl")
    return sdist, wheel


def _venv_with(requirement: str, venv: Path) -> Path:
    """A fresh virtualenv (no system site-packages) with `requirement` and the test extra
    installed; its python."""
    _run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "--quiet", "--no-compile", f"minivmm[test] @ {Path(requirement).as_uri()}"])
    return python


def _check_installed(python: Path, source: Path) -> None:
    """The venv imports its own copy of minivmm (the plugin and the command line included),
    and the subset of the tests passes when run from the unpacked sdist."""
    where = _run([python, "-c", "import minivmm; print(minivmm.__file__)"], cwd=python.parent)
    assert where.startswith(str(python.parent.parent)), where
    assert "0" == _run([python, "-c", "import minivmm.testing, minivmm.cli; print(0)"], cwd=source.parent).strip()
    out = _run([python.parent / "pytest", *INNER, *SUBSET], cwd=source)
    assert " passed" in out and "skipped" not in out, out


@pytest.mark.slow
@pytest.mark.kvm
def test_sdist_and_wheel_install_and_pass_tests(tmp_path) -> None:
    sdist, wheel = _build(tmp_path / "dist")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        archive.extractall(tmp_path / "src", filter="data")
    for needed in ("LICENSE", "README.md", "tests/conftest.py", "tests/data/broken_configs",
                   "configs/hello_long.yaml", "guests/hello_long.S", "examples/README.md",
                   "benchmarks/c/fuzz.c", "minivmm/guest_include/minivmm_test.h"):
        assert needed in names, needed
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(archive.read(n).decode() for n in archive.namelist() if n.endswith("/METADATA"))
        assert "minivmm/guest_include/guest_test.inc" in archive.namelist()
        assert any(n.endswith("/LICENSE") for n in archive.namelist())
    assert "Description-Content-Type: text/markdown" in metadata and "# minivmm" in metadata
    assert "MIT License" in metadata
    source = tmp_path / "src" / sdist.name.removesuffix(".tar.gz")
    with ThreadPoolExecutor(2) as pool:
        pythons = list(pool.map(_venv_with, (str(wheel), str(sdist)), (tmp_path / "venv-wheel",
                                                                     tmp_path / "venv-sdist")))
        list(pool.map(_check_installed, pythons, (source, source)))
