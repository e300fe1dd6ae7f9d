"""What ``import aiopgalloc`` does: refuse anything but Linux with a clear
``ImportError``, and load almost nothing until a name is used.

Each check runs a fresh interpreter (``sys.modules`` of this one already
holds whatever the other tests imported), so it sees what a user's
``import aiopgalloc`` really loads.  No timing is asserted: the modules
loaded are what decides the cost, and they are checked exactly.
"""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

import aiopgalloc
from aiopgalloc.host import unsupported_platform

REPO = Path(__file__).resolve().parent.parent

# Optional or heavy modules the library must never import on its own (the
# CLI's and the tests' dependencies, and the stdlib ones it has no use for).
HEAVY = (
    "rich",
    "prometheus_client",
    "hypothesis",
    "matplotlib",
    "pyarrow",
    "numpy",
    "pytest",
    "secrets",
    "tempfile",
    "asyncio",
    "trio",
    "uvloop",
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def _modules_after(code: str) -> set[str]:
    res = _run(f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))")
    assert res.returncode == 0, res.stderr
    return set(json.loads(res.stdout.splitlines()[-1]))


# ------------------------------------------------------------- Linux only


@pytest.mark.parametrize("platform", ["darwin", "win32", "freebsd14"])
def test_importing_off_linux_raises_import_error_saying_linux_is_required(platform: str) -> None:
    res = _run(f"import sys\nsys.platform = {platform!r}\nimport aiopgalloc")
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: aiopgalloc requires Linux"), res.stderr
    assert repr(platform) in last
    assert "AttributeError" not in res.stderr


def test_importing_a_host_module_directly_off_linux_is_refused_the_same_way() -> None:
    """``aiopgalloc.host.syscalls`` looks up libc symbols at import (the
    ``AttributeError`` from ctypes a user got on macOS); the package's check
    runs before it."""
    res = _run("import sys\nsys.platform = 'darwin'\nimport aiopgalloc.host.syscalls")
    assert res.returncode == 1
    assert "ImportError: aiopgalloc requires Linux" in res.stderr, res.stderr


def test_a_python_without_memfd_create_is_refused() -> None:
    res = _run("import os\ndel os.memfd_create\nimport aiopgalloc")
    assert res.returncode == 1
    assert "ImportError: aiopgalloc requires Linux 3.17" in res.stderr, res.stderr
    assert "memfd_create" in res.stderr.strip().splitlines()[-1]


def test_unsupported_platform_says_why_or_none() -> None:
    assert unsupported_platform("linux", True) is None
    darwin = unsupported_platform("darwin", True)
    assert darwin is not None and "requires Linux" in darwin and "'darwin'" in darwin
    old = unsupported_platform("linux", False)
    assert old is not None and "memfd_create" in old


# ------------------------------------------------------------ import cost


# What ``import aiopgalloc`` itself loads: the Linux check and the build
# check (aiopgalloc._native, with the build record when the install was
# built by setup.py).
FIRST = {"aiopgalloc", "aiopgalloc.host", "aiopgalloc._native"}


def _ours(loaded: set[str]) -> set[str]:
    return {
        m
        for m in loaded
        if (m == "aiopgalloc" or m.startswith("aiopgalloc.")) and m != "aiopgalloc._build_record"
    }


def test_import_loads_only_the_linux_check() -> None:
    """``import aiopgalloc`` is cheap because it loads nothing else of the
    package (and neither anyio nor ctypes); names are loaded on first use."""
    loaded = _modules_after("import aiopgalloc")
    assert _ours(loaded) == FIRST
    assert not {"anyio", "ctypes", "logging", "dataclasses"} & loaded
    assert not set(HEAVY) & loaded


def test_first_use_loads_what_it_needs_and_nothing_heavy() -> None:
    loaded = _modules_after("import aiopgalloc\naiopgalloc.ClosedError")
    assert _ours(loaded) == FIRST | {"aiopgalloc.errors"}

    code = """
import anyio, aiopgalloc

async def main():
    async with aiopgalloc.open_memory_file() as mf:
        fr = mf.allocate(aiopgalloc.page_round_up(10_000))
        mf.dec_ref(fr)
        mf.stats()

anyio.run(main)
"""
    loaded = _modules_after(code)
    assert "aiopgalloc.lifecycle" in loaded  # the allocator really ran
    assert not (set(HEAVY) - {"asyncio"}) & loaded, sorted(set(HEAVY) & loaded)
    assert not {m for m in loaded if m.startswith("aiopgalloc._cli")}


def test_the_lazy_names_are_the_ones_type_checkers_see() -> None:
    """``_LAZY`` (what ``__getattr__`` imports) and the ``TYPE_CHECKING``
    imports (what mypy and pyright read) name the same modules, for exactly
    ``__all__``; and each name is the object its module defines."""
    tree = ast.parse((REPO / "aiopgalloc" / "__init__.py").read_text())
    checked: dict[str, str] = {}
    computed: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imp in node.body:
                if isinstance(imp, ast.AnnAssign):  # computed by __getattr__
                    computed.add(ast.unparse(imp.target))
                    continue
                assert isinstance(imp, ast.ImportFrom)
                for alias in imp.names:
                    checked[alias.asname or alias.name] = "." * imp.level + (imp.module or "")
    lazy = aiopgalloc._LAZY
    assert checked == lazy
    assert computed == {"COMPILED"}
    assert set(lazy) | computed == set(aiopgalloc.__all__)
    for name, where in lazy.items():
        assert getattr(aiopgalloc, name) is getattr(import_module(where, "aiopgalloc"), name)


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        aiopgalloc.nope  # noqa: B018
    assert "open_memory_file" in dir(aiopgalloc)
    assert "__version__" in dir(aiopgalloc)


# ------------------------------------------------------ what opening says


@pytest.mark.anyio
async def test_opening_a_file_logs_nothing_at_info(caplog: pytest.LogCaptureFixture) -> None:
    """The chooser's report (one line per pressure source tried) is DEBUG:
    a service opening files does not get several INFO lines per open."""
    caplog.set_level(logging.DEBUG, logger="aiopgalloc")
    opts = aiopgalloc.MemoryFileOpts(use_host_memcg_pressure=True)
    try:
        async with aiopgalloc.open_memory_file(opts=opts) as mf:
            source = mf.stats().pressure_source
    except aiopgalloc.NoPressureSourceError:
        pytest.skip("no host pressure source here")
    ours = [r for r in caplog.records if r.name.startswith("aiopgalloc")]
    assert not [r for r in ours if r.levelno >= logging.INFO], [r.getMessage() for r in ours]
    if source:
        report = [r.getMessage() for r in ours if r.getMessage().startswith("pressure source:")]
        assert any(": chosen (" in line for line in report), report
