"""The two builds of the core, and the guards between them (issue 15).

The package's typed core (``aiopgalloc._native.COMPILED_MODULES``) is
compiled with mypyc by setup.py, or runs as pure Python.  These tests run
fresh interpreters on a *copy* of the package in a temporary directory
(never touching the checkout, which others may be importing):

- an edited ``.py`` under an older compiled module raises ``ImportError``
  at ``import aiopgalloc`` instead of being silently shadowed; so does an
  incomplete unit or a compiled module the last build did not make;
- ``AIOPGALLOC_PURE=1`` runs the sources of the whole unit from a compiled
  install (never a mix), edited sources included;
- setup.py's build_ext falls back to the pure package, saying so, when the
  C compiler fails or ``AIOPGALLOC_PURE_BUILD=1`` is set, and deletes what
  an earlier in-place build left.

The tests that need a compiled install skip on a pure one.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import aiopgalloc
from aiopgalloc import _native

REPO = Path(__file__).resolve().parent.parent
PACKAGE = Path(aiopgalloc.__file__).resolve().parent
UNIT = _native.COMPILED_MODULES

needs_compiled = pytest.mark.skipif(
    not any((PACKAGE / (m + s)).exists() for m in UNIT for s in EXTENSION_SUFFIXES),
    reason="a pure install: no compiled modules to guard",
)

PROBE = """
import json, sys
import aiopgalloc
from aiopgalloc import _books, arguments, segments
print(json.dumps({
    "file": aiopgalloc.__file__,
    "compiled": aiopgalloc.COMPILED,
    "unit": {m.__name__: m.__file__ for m in (_books, segments, arguments)},
    "shared": any(n.endswith("__mypyc") for n in sys.modules),
    "edited": getattr(segments, "EDITED", None),
}))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AIOPGALLOC_PURE", "PYTHONPATH")}
    env.update(extra)
    return env


def _probe(top: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=top,
        env=_env(PYTHONPATH=str(top), **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _facts(res: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert res.returncode == 0, res.stderr
    facts: dict[str, object] = json.loads(res.stdout.splitlines()[-1])
    return facts


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A copy of the installed package (compiled files and build record
    included) under ``tmp_path``, which the probes import instead."""
    shutil.copytree(PACKAGE, tmp_path / "aiopgalloc", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _so(top: Path, name: str) -> Path:
    return next(
        p
        for p in (top / "aiopgalloc").iterdir()
        if p.name.startswith(name + ".") and p.suffix == ".so"
    )


@needs_compiled
def test_the_copy_runs_compiled(copy: Path) -> None:
    facts = _facts(_probe(copy))
    assert str(facts["file"]).startswith(str(copy)), "the probe imported another aiopgalloc"
    assert facts["compiled"] is True and facts["shared"] is True
    assert all(str(f).endswith(".so") for f in facts["unit"].values())  # type: ignore[attr-defined]


@needs_compiled
def test_an_edited_source_under_its_compiled_module_refuses_to_import(copy: Path) -> None:
    src = copy / "aiopgalloc" / "segments.py"
    src.write_text(src.read_text() + "\nEDITED = 1\n")
    res = _probe(copy)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "aiopgalloc._native.StaleBuildError: aiopgalloc: the compiled module(s) segments "
    )
    assert "pip install -e ." in last and "AIOPGALLOC_PURE=1" in last
    # Undo the edit (same bytes): it imports again.
    src.write_text(src.read_text().removesuffix("\nEDITED = 1\n"))
    assert _facts(_probe(copy))["compiled"] is True


@needs_compiled
def test_pure_env_runs_every_source_of_the_unit_even_edited(copy: Path) -> None:
    src = copy / "aiopgalloc" / "segments.py"
    src.write_text(src.read_text() + "\nEDITED = 1\n")
    facts = _facts(_probe(copy, AIOPGALLOC_PURE="1"))
    assert facts["compiled"] is False
    assert facts["shared"] is False, "the compiled unit's library was loaded"
    unit = facts["unit"]
    assert isinstance(unit, dict) and set(unit) == {f"aiopgalloc.{m}" for m in UNIT}
    for name, path in unit.items():
        assert path == str(copy / "aiopgalloc" / (name.rpartition(".")[2] + ".py")), name
    assert facts["edited"] == 1
    # "0" and empty mean "not set".
    for value in ("0", ""):
        res = _probe(copy, AIOPGALLOC_PURE=value)
        assert res.returncode == 1 and "StaleBuildError" in res.stderr


@needs_compiled
def test_an_incomplete_unit_refuses_to_import(copy: Path) -> None:
    _so(copy, "arguments").unlink()
    res = _probe(copy)
    assert res.returncode == 1
    assert "StaleBuildError: aiopgalloc: the compiled module(s) arguments " in res.stderr
    # The pure build still runs from the same files.
    assert _facts(_probe(copy, AIOPGALLOC_PURE="1"))["compiled"] is False


@needs_compiled
def test_a_compiled_module_the_last_build_did_not_make_refuses_to_import(copy: Path) -> None:
    """An older build compiled ``usage``; this one does not: its leftover
    extension would shadow usage.py."""
    so = _so(copy, "arguments")
    shutil.copy(so, so.with_name("usage" + so.name.removeprefix("arguments")))
    res = _probe(copy)
    assert res.returncode == 1
    assert "StaleBuildError: aiopgalloc: the compiled module(s) usage " in res.stderr
    res = subprocess.run(
        [sys.executable, "-c", "import aiopgalloc.usage as u; print(u.__file__)"],
        cwd=copy,
        env=_env(PYTHONPATH=str(copy), AIOPGALLOC_PURE="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(copy / "aiopgalloc" / "usage.py")


def test_a_pure_copy_runs_pure_without_any_check(tmp_path: Path) -> None:
    """Only the sources (a checkout never built, or a pure install)."""
    shutil.copytree(
        PACKAGE,
        tmp_path / "aiopgalloc",
        ignore=shutil.ignore_patterns("__pycache__", "*.so", "_build_record.py"),
    )
    facts = _facts(_probe(tmp_path))
    assert facts["compiled"] is False and facts["shared"] is False


# --------------------------------------------------------------- setup.py

# A stand-in for mypyc (generating its C takes a minute): one extension
# module of the unit from a C file, so build_ext has something to compile.
FAKE_MYPYC = """
from setuptools import Extension

def mypycify(paths, **kw):
    return [Extension("aiopgalloc._books", sources=["fake.c"])]
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the checkout's build inputs, with a stand-in mypyc."""
    top = tmp_path / "tree"
    top.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "NOTICE"):
        shutil.copy(REPO / name, top / name)
    shutil.copytree(
        REPO / "aiopgalloc",
        top / "aiopgalloc",
        ignore=shutil.ignore_patterns("__pycache__", "*.so", "_build_record.py"),
    )
    (top / "fake.c").write_text("#include <Python.h>\n")
    fake = tmp_path / "fake" / "mypyc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "build.py").write_text(FAKE_MYPYC)
    return top


# setup.py's build_ext run in place on the tree, as an editable install runs
# it, without setup() (the test environment's setuptools may be older than
# the one the build requires, which pip fetches for a real build).
BUILD_INPLACE = """
import runpy, sys
from setuptools import Distribution

ns = runpy.run_path("setup.py", run_name="aiopgalloc_setup")
dist = Distribution(
    {"name": "aiopgalloc", "packages": ["aiopgalloc"], "ext_modules": ns["_PLACEHOLDER"]}
)
cmd = ns["OptionalMypycBuildExt"](dist)
cmd.inplace = True
cmd.ensure_finalized()
cmd.run()
"""


def _build_inplace(top: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BUILD_INPLACE],
        cwd=top,
        env=_env(PYTHONPATH=str(top.parent / "fake"), **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _record(top: Path) -> dict[str, object]:
    scope: dict[str, object] = {}
    exec((top / "aiopgalloc" / "_build_record.py").read_text(), scope)
    return {k: v for k, v in scope.items() if k.isupper()}


def test_a_failing_compiler_falls_back_to_pure_saying_so(tree: Path) -> None:
    stale = tree / "aiopgalloc" / ("segments" + EXTENSION_SUFFIXES[0])
    stale.write_bytes(b"left by an older build")
    res = _build_inplace(tree, CC="/bin/false")
    assert res.returncode == 0, res.stderr
    assert "aiopgalloc build: installing the PURE-PYTHON package: compiling failed" in res.stderr
    assert "aiopgalloc.COMPILED is False" in res.stderr
    assert not stale.exists()
    assert not list((tree / "aiopgalloc").glob("*.so"))
    record = _record(tree)
    assert record["BUILD"] == "pure" and record["SOURCES"] == {}
    assert "compiling failed" in str(record["NOTE"])
    assert _facts(_probe(tree))["compiled"] is False


def test_the_opt_out_builds_pure_without_mypyc(tree: Path) -> None:
    res = _build_inplace(tree, AIOPGALLOC_PURE_BUILD="1")
    assert res.returncode == 0, res.stderr
    assert "PURE-PYTHON package: AIOPGALLOC_PURE_BUILD is set" in res.stderr
    assert _record(tree)["BUILD"] == "pure"
    assert _facts(_probe(tree))["compiled"] is False


def test_setup_reads_the_unit_from_native() -> None:
    """setup.py compiles exactly ``COMPILED_MODULES`` (read from the text of
    aiopgalloc/_native.py, which it cannot import), and builds pure when
    asked to."""
    ns = runpy.run_path(str(REPO / "setup.py"), run_name="aiopgalloc_setup")
    assert ns["MODULES"] == UNIT
    assert ns["PURE_BUILD_ENV"] == "AIOPGALLOC_PURE_BUILD"
