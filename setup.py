"""The build: compiles the pure, typed core with mypyc; metadata is in
pyproject.toml.

The modules of ``aiopgalloc._native.COMPILED_MODULES`` (the page books,
the segment sets, the argument checks) are compiled
together, from the same ``.py`` files that run interpreted, into one shared
library (``aiopgalloc/_core__mypyc*.so``) plus one small extension module
each.  They are one unit: all compiled, or none.

The build falls back to the pure-Python package, saying so on stderr, when:

- ``AIOPGALLOC_PURE_BUILD=1`` is set (the documented opt-out);
- mypyc cannot be imported (a build without the build requirements), or
  it refuses the sources;
- the C compiler fails or is missing.

Either way it writes ``aiopgalloc/_build_record.py`` (generated, never
committed): which build this is, why, and the sha256 of each source that
was compiled, which ``aiopgalloc._native`` checks at import so an edited
``.py`` is never silently shadowed by an older compiled module.  An
editable install (``pip install -e .``) builds the extension modules into
the source tree; an editable pure build deletes the ones an earlier build
left there.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import os
import sys
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "aiopgalloc"
PURE_BUILD_ENV = "AIOPGALLOC_PURE_BUILD"
# The shared library of the unit: aiopgalloc/_core__mypyc.<abi>.so.
GROUP = f"{PACKAGE}._core"


def compiled_modules() -> tuple[str, ...]:
    """``COMPILED_MODULES`` of aiopgalloc/_native.py, read from its text (the
    package cannot be imported here)."""
    with open(os.path.join(HERE, PACKAGE, "_native.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == [
            "COMPILED_MODULES"
        ]:
            return tuple(ast.literal_eval(node.value))
    raise RuntimeError("aiopgalloc/_native.py defines no COMPILED_MODULES literal")


MODULES = compiled_modules()


def _say(message: str) -> None:
    print(f"aiopgalloc build: {message}", file=sys.stderr, flush=True)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _pure_build_requested() -> bool:
    return os.environ.get(PURE_BUILD_ENV, "") not in ("", "0")


class OptionalMypycBuildExt(build_ext):
    """build_ext that compiles the unit with mypyc, or falls back to the
    pure package (dropping every extension of the unit) when it cannot."""

    _note: str | None = None
    _inplace = False

    def finalize_options(self) -> None:
        # mypyc generates its C here, not at setup.py's import: pip runs
        # setup.py several times (requirements, metadata) but builds once.
        self.distribution.ext_modules = self._mypycify()
        super().finalize_options()

    def _mypycify(self) -> list[Extension]:
        if _pure_build_requested():
            self._note = f"{PURE_BUILD_ENV} is set"
            return []
        if "sdist" in getattr(self.distribution, "commands", ()):
            return []  # the sdist carries the .py sources only
        try:
            from mypyc.build import mypycify
        except ImportError as exc:
            self._note = f"mypyc is not available ({exc})"
            return []
        paths = [os.path.join(PACKAGE, m + ".py") for m in MODULES]
        try:
            exts: list[Extension] = mypycify(paths, opt_level="3", group_name=GROUP)
        except BaseException as exc:  # mypyc exits on a type error
            if isinstance(exc, KeyboardInterrupt):
                raise
            self._note = f"mypyc refused the sources ({exc!r})"
            return []
        return exts

    def run(self) -> None:
        # setuptools' run() clears inplace while building (and leaves it
        # cleared when the build raises): remember it.
        self._inplace = bool(self.inplace)
        if self._inplace:
            # An editable build: what an earlier build left in the tree
            # (perhaps of a module no longer compiled) goes first.
            self._remove_unit([os.path.join(HERE, PACKAGE)])
        if self._note is None and self.extensions:
            try:
                super().run()
            except Exception as exc:
                # The compiler's whole command line is in the message: keep
                # its head (the verbose log has the rest).
                why = f"{type(exc).__name__}: {exc}"
                self._note = (
                    "compiling failed (" + (why[:160] + " ..." if len(why) > 160 else why) + ")"
                )
                self._remove_unit(self._package_dirs())
        else:
            self._note = self._note or "nothing to compile"
        if self._note is not None:
            self.extensions = []
            self.distribution.ext_modules = []
            _say(f"installing the PURE-PYTHON package: {self._note}.")
            _say("it works the same, only slower; aiopgalloc.COMPILED is False.")
        else:
            _say(f"compiled {', '.join(MODULES)} with mypyc.")
        self._write_record()

    def _package_dirs(self) -> list[str]:
        dirs = [os.path.join(self.build_lib, PACKAGE)]
        if self._inplace:
            dirs.append(os.path.join(HERE, PACKAGE))
        return dirs

    def _remove_unit(self, dirs: list[str]) -> None:
        _remove_compiled(dirs)

    def _write_record(self) -> None:
        _write_record(self._package_dirs(), self._note)


class RecordingBuildPy(build_py):
    """build_py that, for the opt-out (``AIOPGALLOC_PURE_BUILD=1``, where no
    extension is built and so build_ext never runs), says so, writes the
    pure build record, and deletes what an earlier in-place build left."""

    def run(self) -> None:
        super().run()
        if not _pure_build_requested():
            return
        dirs = [os.path.join(self.build_lib, PACKAGE)]
        if getattr(self, "editable_mode", False):
            dirs.append(os.path.join(HERE, PACKAGE))
        _remove_compiled(dirs)
        note = f"{PURE_BUILD_ENV} is set"
        _say(f"installing the PURE-PYTHON package: {note}.")
        _say("it works the same, only slower; aiopgalloc.COMPILED is False.")
        _write_record(dirs, note)


def _remove_compiled(dirs: list[str]) -> None:
    """Delete the compiled modules from ``dirs``: the unit's shared library
    and every extension module lying next to a ``.py`` of the same name (a
    half-built or older unit must not be imported next to the sources)."""
    for d in dirs:
        for path in glob.glob(os.path.join(d, "*.so")):
            name = os.path.basename(path).split(".", 1)[0]
            if name in (*MODULES, "_core__mypyc") or os.path.exists(os.path.join(d, name + ".py")):
                os.remove(path)
                _say(f"removed {os.path.relpath(path, HERE)}")


def _write_record(dirs: list[str], note: str | None) -> None:
    """Write ``_build_record.py`` into each package directory of ``dirs``:
    compiled (``note`` None: with the sha256 of each compiled source) or
    pure (``note`` says why)."""
    compiled = note is None
    sources = (
        {m: _sha256(os.path.join(HERE, PACKAGE, m + ".py")) for m in MODULES} if compiled else {}
    )
    text = (
        '"""Written by setup.py at build time; never edit or commit it."""\n\n'
        f"BUILD = {('compiled' if compiled else 'pure')!r}\n"
        f"NOTE = {(note or _mypyc_version())!r}\n"
        f"SOURCES = {sources!r}\n"
    )
    for d in dirs:
        if os.path.isdir(d):
            with open(os.path.join(d, "_build_record.py"), "w", encoding="utf-8") as f:
                f.write(text)


def _mypyc_version() -> str:
    try:
        from mypy.version import __version__
    except ImportError:
        return "mypyc"
    return f"mypyc {__version__}"


# A placeholder so that setuptools knows the wheel holds extension modules
# (a platform wheel); build_ext replaces it with mypyc's, or with nothing.
_PLACEHOLDER: list[Any] = [Extension(f"{GROUP}__mypyc", sources=[])]

# (setuptools' build backend runs this file as __main__; tests load it under
# another name to reach the commands.)
if __name__ == "__main__":
    setup(
        ext_modules=[] if _pure_build_requested() else _PLACEHOLDER,
        cmdclass={"build_ext": OptionalMypycBuildExt, "build_py": RecordingBuildPy},
    )
