"""The package ships whole: the license files, one version, the console
script, the classifiers, and an sdist that carries its own test suite.

Read from the files the build reads (pyproject.toml, MANIFEST.in,
aiopgalloc/__init__.py) and, where it is installed, from the installed
metadata.  These tests also run inside an unpacked sdist (no ``.git``
there), which is how the sdist proves it carries what they look at.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

import aiopgalloc
from aiopgalloc.__main__ import main

REPO = Path(__file__).resolve().parent.parent
PYPROJECT: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT: dict[str, Any] = PYPROJECT["project"]

# The directories the sdist must carry whole, and the single files
# MANIFEST.in adds (setuptools adds pyproject.toml and MANIFEST.in itself).
GRAFTED = ("tests", "examples", "benchmarks")
SINGLE = ("LICENSE", "NOTICE", "README.md", "noxfile.py")
_SKIP_DIRS = {"__pycache__", ".hypothesis", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def test_license_is_apache_2_in_full_and_notice_names_the_original_authors() -> None:
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    for section in ("1. Definitions.", "4. Redistribution.", "9. Accepting Warranty"):
        assert section in text, section
    assert "END OF TERMS AND CONDITIONS" in text
    notice = (REPO / "NOTICE").read_text()
    assert "The gVisor Authors" in notice and "aiopgalloc developers" in notice
    assert PROJECT["license"] == "Apache-2.0"
    assert set(PROJECT["license-files"]) == {"LICENSE", "NOTICE"}
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["aiopgalloc"]
    assert (REPO / "aiopgalloc" / "py.typed").exists()


def test_the_version_has_one_source() -> None:
    """pyproject reads ``__version__`` from aiopgalloc/__init__.py, which
    setuptools does without importing the package: it must stay a literal."""
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    dynamic = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "aiopgalloc.__version__"}
    tree = ast.parse((REPO / "aiopgalloc" / "__init__.py").read_text())
    literals = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [ast.unparse(t) for t in node.targets] == ["__version__"]
        and isinstance(node.value, ast.Constant)
    ]
    assert literals == [aiopgalloc.__version__]


def test_installed_metadata_matches() -> None:
    try:
        dist = metadata.distribution("aiopgalloc")
    except metadata.PackageNotFoundError:
        pytest.skip("aiopgalloc is not installed")
    assert dist.version == aiopgalloc.__version__
    scripts = [ep for ep in dist.entry_points if ep.group == "console_scripts"]
    if not scripts:
        pytest.skip("installed before [project.scripts] existed: pip install -e . again")
    assert [(ep.name, ep.value) for ep in scripts] == [("aiopgalloc", "aiopgalloc.__main__:main")]
    assert scripts[0].load() is main


def test_the_console_script_is_the_same_cli() -> None:
    assert PROJECT["scripts"] == {"aiopgalloc": "aiopgalloc.__main__:main"}
    script = Path(sys.executable).parent / "aiopgalloc"
    if not script.exists():
        pytest.skip(f"{script} is not installed here (an editable install made before it)")
    res = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"aiopgalloc {aiopgalloc.__version__}\n"
    res = subprocess.run([str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "usage: aiopgalloc {demo,info,bench}" in res.stderr


def test_classifiers() -> None:
    classifiers = set(PROJECT["classifiers"])
    assert PROJECT["requires-python"] == ">=3.11"
    for version in ("3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in classifiers
    for prefix in ("Development Status :: ", "Topic :: "):
        assert any(c.startswith(prefix) for c in classifiers), prefix
    for c in ("Operating System :: POSIX :: Linux", "Framework :: AnyIO", "Typing :: Typed"):
        assert c in classifiers
    # PEP 639: the SPDX ``license`` is the license metadata; setuptools >= 77
    # refuses a License classifier next to it.
    assert not any(c.startswith("License :: ") for c in classifiers)


def test_nox_tests_every_python_the_classifiers_name() -> None:
    tree = ast.parse((REPO / "noxfile.py").read_text())
    pythons = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["PYTHONS"]
    )
    prefix = "Programming Language :: Python :: 3."
    named = sorted(
        c.removeprefix("Programming Language :: Python :: ")
        for c in PROJECT["classifiers"]
        if c.startswith(prefix)
    )
    assert sorted(pythons) == named


def _files_under(top: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        for name in files:
            if not name.endswith((".pyc", ".pyo")):
                out.append(str((Path(root) / name).relative_to(REPO)))
    return out


def _sdist_files() -> set[str]:
    """What MANIFEST.in adds to the sdist, as setuptools evaluates it."""
    filelist = pytest.importorskip("setuptools._distutils.filelist")
    fl = filelist.FileList()
    fl.allfiles = [f for top in GRAFTED for f in _files_under(REPO / top)]
    fl.allfiles += [p.name for p in REPO.iterdir() if p.is_file()]
    for line in (REPO / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            fl.process_template_line(line)
    return set(fl.files)


def test_the_sdist_carries_its_test_suite_examples_and_benchmarks() -> None:
    """The defect: the sdist had the test files but not ``conftest.py``,
    ``helpers.py``, ``pressure_child.py`` (11 collection errors)."""
    carried = _sdist_files()
    for top in GRAFTED:
        wanted = set(_files_under(REPO / top))
        assert wanted, top
        assert wanted <= carried, sorted(wanted - carried)
    for name in SINGLE:
        assert (REPO / name).exists(), name
        assert name in carried, name
    for helper in ("conftest.py", "helpers.py", "pressure_child.py", "headroom_child.py"):
        assert f"tests/{helper}" in carried
