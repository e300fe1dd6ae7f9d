"""nox sessions: tests per backend, lint, typecheck, bench.

    nox                      # tests (each Python x each backend), lint, typecheck
    nox -s tests             # the test sessions only
    nox -s tests -p 3.12     # one Python, three backends
    nox -s "tests-3.11(backend='trio')" -- -x   # one session; extra args go to pytest
    nox -s bench             # python -m aiopgalloc bench --quick (the suite, ~1.5 min)

Backends: every async test runs once per backend through the ``anyio_backend``
fixture of tests/conftest.py, whose ids are ``asyncio``, ``asyncio+uvloop``
and ``trio`` (``test_x[asyncio]``, ``test_x[asyncio+uvloop]``, ...).  Each
``tests`` session selects its backend's ids with ``-k``.  Sync tests (no
backend id) run once, in the ``asyncio`` session only: they do not depend on
the event loop, and the hypothesis suites are the slowest part of the run.
``-k`` matches substrings of test and module names, so a test whose own name
mentions ``trio`` or ``uvloop`` runs in that session instead of asyncio's.

The tests run on each supported Python (3.11, 3.12, 3.13: the classifiers in
pyproject.toml) that is installed; nox skips a session whose interpreter it
cannot find (``--error-on-missing-interpreters`` makes that an error, as CI
should).  lint, typecheck and bench use the interpreter running nox.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

# -k expressions selecting each backend's tests (see the module docstring).
BACKENDS = {
    "asyncio": "not uvloop and not trio",  # asyncio ids, plus every sync test
    "uvloop": "asyncio+uvloop",
    "trio": "trio",
}

PYTEST_ARGS = ["-q", "-p", "no:cacheprovider"]

# The supported Pythons, as pyproject.toml's classifiers list them.
PYTHONS = ["3.11", "3.12", "3.13"]


@nox.session(python=PYTHONS)
@nox.parametrize("backend", list(BACKENDS))
def tests(session: nox.Session, backend: str) -> None:
    """The test suite on one Python and one anyio backend."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *PYTEST_ARGS, "-k", BACKENDS[backend], *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package."""
    session.install("-e", ".[lint]")
    session.run("mypy", "--strict", "aiopgalloc")


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark suite, quick mode (about a minute and a half), on every backend.

    Extra args are passed on: ``nox -s bench -- --workloads 1,2 --json out.json``
    (``--workloads 11``: the SegmentSet micro-benchmark alone);
    ``nox -s bench -- --full`` drops ``--quick`` (5-6 minutes)."""
    session.install("-e", ".[bench]")
    args = list(session.posargs)
    quick = [] if "--full" in args else ["--quick"]
    args = [a for a in args if a != "--full"]
    session.run("python", "-m", "aiopgalloc", "bench", *quick, *args)
