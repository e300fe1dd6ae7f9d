"""Which build of the core is running, and the guards around it.

The pure, typed core (``COMPILED_MODULES`` below: the page books, the
segment sets, the argument checks) is compiled with
mypyc when the package is built (``setup.py``), from the same ``.py``
files that run interpreted.  The modules are compiled together into one
shared library and call each other natively, so they are one unit: either
all of them run compiled or all of them run as Python, never a mix.

This module is never compiled: the package imports it first, before any
module of the unit, and it does two things.

- ``AIOPGALLOC_PURE=1`` (any value but empty or ``0``) in the environment
  runs the pure build from a compiled install: a meta-path finder loads the
  ``.py`` source of every module of the unit (Python's own finder would
  prefer the extension modules lying next to them).  So one install tests
  both builds.
- Otherwise, where compiled modules lie in the package, it checks them
  against the build record (``_build_record.py``, written by the build,
  never committed): each compiled module must have been built from the
  ``.py`` file next to it (same sha256).  An edited ``.py`` under an older
  compiled module (an editable install, then a change or a checkout) would
  otherwise be silently shadowed; it raises ``ImportError`` instead, saying
  to rebuild (``pip install -e .``) or to run pure.

Cost at ``import aiopgalloc``: one directory listing; with compiled
modules present, also a sha256 of the three sources (about 100 KB, well
under a millisecond).  ``compiled()`` imports the books.
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES, ModuleSpec
from types import ModuleType

# (No ``typing`` import: it costs about 5 ms, a third of ``import
# aiopgalloc``; the constants below are final by convention.)

__all__ = [
    "COMPILED_MODULES",
    "PURE_ENV",
    "PureSourceFinder",
    "StaleBuildError",
    "check_build",
    "compiled",
    "describe",
    "pure_requested",
    "record",
    "stale_modules",
]

# The modules mypyc compiles (setup.py reads this tuple from this file's
# text; it must stay a literal).  Each is a module of this package.
# Not usage.py: its public classes (MemoryAccounting, MemoryStats,
# MemoryKind) are off the hot path, and compiled they would lose their
# docstrings and check argument types differently (mypyc unboxes a bool
# passed as an int; an int passed as a MemoryKind is refused).
COMPILED_MODULES = ("_books", "segments", "arguments")

# The environment variable that runs the pure build from a compiled install.
PURE_ENV = "AIOPGALLOC_PURE"

_PACKAGE = __name__.rpartition(".")[0]
_UNIT = frozenset(f"{_PACKAGE}.{m}" for m in COMPILED_MODULES)
_HERE = os.path.dirname(os.path.abspath(__file__))


class StaleBuildError(ImportError):
    """The compiled modules in the package do not match their ``.py``
    sources (or are incomplete): rebuild, or run pure."""


def pure_requested(environ: dict[str, str] | None = None) -> bool:
    """Whether ``AIOPGALLOC_PURE`` asks for the pure build (set, and
    neither empty nor ``0``)."""
    value = (os.environ if environ is None else environ).get(PURE_ENV, "")
    return value not in ("", "0")


# (Not a subclass of importlib.abc.MetaPathFinder: importing importlib.abc
# costs about 10 ms, half of ``import aiopgalloc``.)
class PureSourceFinder:
    """A meta-path finder that loads each module of the compiled unit (and
    the modules named in ``extra``) from its ``.py`` source in
    ``directory``; every other module is left to the finders after it."""

    def __init__(self, directory: str, extra: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.names = {f"{_PACKAGE}.{m}": m for m in (*COMPILED_MODULES, *extra)}

    def find_spec(
        self,
        fullname: str,
        path: object = None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        """The spec of ``fullname``'s source file, or None when it is not
        one of the compiled unit's modules."""
        short = self.names.get(fullname)
        if short is None:
            return None
        source = os.path.join(self.directory, short + ".py")
        if not os.path.exists(source):
            raise ImportError(
                f"{PURE_ENV} is set but {source} does not exist: this install "
                "carries no Python source for the compiled modules"
            )
        from importlib.util import spec_from_file_location

        return spec_from_file_location(fullname, source)


def _compiled_files(directory: str) -> dict[str, str]:
    """The extension modules lying in ``directory`` next to a ``.py`` of the
    same name (a module of the unit, or one an older build compiled), by
    module name."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return {}
    names = set(entries)
    found: dict[str, str] = {}
    for entry in entries:
        for suffix in EXTENSION_SUFFIXES:
            if entry.endswith(suffix):
                name = entry[: -len(suffix)]
                if name + ".py" in names or name in COMPILED_MODULES:
                    found[name] = os.path.join(directory, entry)
                break
    return found


def _sha256(path: str) -> str | None:
    # The interpreter's own sha256 (a builtin module: _sha256 up to 3.11,
    # _sha2 from 3.12) where there is one: hashlib loads OpenSSL, about 4 ms.
    try:
        from _sha256 import sha256  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        try:
            from _sha2 import sha256  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            from hashlib import sha256
    try:
        with open(path, "rb") as f:
            return str(sha256(f.read()).hexdigest())
    except OSError:
        return None


def record() -> dict[str, object]:
    """The build record (``_build_record.py``, written by the build) as a
    dict: ``BUILD`` (``"compiled"`` or ``"pure"``), ``NOTE`` (why pure, or
    the mypyc version), ``SOURCES`` (module -> sha256 of the source it was
    compiled from).  Empty when there is none (a checkout never built)."""
    try:
        from . import _build_record  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return {}
    return {k: v for k, v in vars(_build_record).items() if k.isupper()}


_REBUILD = (
    "rebuild the compiled modules (`pip install -e .` in the checkout, or "
    "`pip install .`), or run the pure build: {env}=1 in the environment, or "
    "delete the compiled files ({files})"
)


def stale_modules() -> tuple[list[str], dict[str, str]]:
    """The modules whose compiled file in the package was not built from the
    ``.py`` next to it by the last build, and the compiled files found.  A
    module of the unit without a compiled file while others have one counts
    as stale (the unit is compiled whole), and so does a compiled module
    the last build did not make (left by an older build that compiled
    more).  Pure: reads files only."""
    found = _compiled_files(_HERE)
    if not found:
        return [], found
    sources = record().get("SOURCES")
    digests: dict[str, str] = sources if isinstance(sources, dict) else {}
    stale = sorted(set(found) - set(COMPILED_MODULES))
    for name in COMPILED_MODULES:
        if name not in found or name not in digests:
            stale.append(name)
            continue
        digest = _sha256(os.path.join(_HERE, name + ".py"))
        # A compiled install without sources (digest None) has nothing to
        # shadow.
        if digest is not None and digest != digests[name]:
            stale.append(name)
    return stale, found


def check_build() -> None:
    """Run at ``import aiopgalloc``: install the pure finder when
    ``AIOPGALLOC_PURE`` asks for it; otherwise raise ``StaleBuildError``
    (an ``ImportError``) when a compiled module of the unit does not match
    its source.  Does nothing for a pure install."""
    if pure_requested():
        if not any(isinstance(f, PureSourceFinder) for f in sys.meta_path):
            # Any other compiled module lying in the package (an older
            # build's) runs from its source too.
            extra = tuple(sorted(set(_compiled_files(_HERE)) - set(COMPILED_MODULES)))
            sys.meta_path.insert(0, PureSourceFinder(_HERE, extra))
        return
    stale, found = stale_modules()
    if stale:
        files = ", ".join(sorted(os.path.basename(p) for p in found.values()))
        raise StaleBuildError(
            f"aiopgalloc: the compiled module(s) {', '.join(stale)} in {_HERE} "
            "were not built from the .py source(s) next to them by the last build "
            "(edited since, left by an older build, or the build is incomplete), "
            "and Python would silently run them instead of the source; "
            + _REBUILD.format(env=PURE_ENV, files=files)
        )


def compiled() -> bool:
    """Whether the core runs compiled: the books module is an extension
    module (False for a pure install, and under ``AIOPGALLOC_PURE=1``).
    Imports the books (and the segment sets) when not yet imported."""
    from . import _books

    path = getattr(_books, "__file__", None) or ""
    return path.endswith(tuple(EXTENSION_SUFFIXES))


def describe() -> dict[str, object]:
    """Which build runs, for ``python -m aiopgalloc info``: ``compiled``
    (bool, as ``aiopgalloc.COMPILED``), ``build`` (what the install was
    built as: ``"compiled"``, ``"pure"``, or None for a source tree never
    built), ``note`` (the mypyc version, or why the build is pure),
    ``pure_env`` (whether ``AIOPGALLOC_PURE`` asks for the pure build) and
    ``modules`` (the compiled unit).  Imports the books."""
    rec = record()
    build = rec.get("BUILD")
    note = rec.get("NOTE")
    return {
        "compiled": compiled(),
        "build": build if isinstance(build, str) else None,
        "note": note if isinstance(note, str) else None,
        "pure_env": pure_requested(),
        "modules": [f"{_PACKAGE}.{m}" for m in COMPILED_MODULES],
    }
