"""aiopgalloc: a page allocator for async Python services.

One memfd, page-aligned reference-counted ranges of it, freed memory given
back to the kernel, async eviction callbacks under memory pressure, and
honest per-kind accounting; on asyncio, asyncio + uvloop and trio alike.

Linux only: importing this package elsewhere raises ``ImportError`` saying
so.  ``__version__`` is the package's version (the one source of it:
pyproject.toml reads it from here).  ``COMPILED`` (a bool) says whether the
core (the page books and segment sets) runs compiled with mypyc or as pure
Python: see ``aiopgalloc._native``.

What is stable: the names in ``__all__``, importable from ``aiopgalloc``
itself.  Every module below the package (``aiopgalloc.host``,
``aiopgalloc.segments``, the ``_``-prefixed ones, ...) is internal and may
change in any release; a leading underscore marks a module that only one
other module of the package uses.
"""

# How the names below are loaded (the choice, stated once): lazily, by the
# PEP 562 module ``__getattr__`` at the end of this file.  ``import
# aiopgalloc`` itself loads only the Linux check of ``aiopgalloc.host``; the
# first use of a name imports the module it lives in (and what that module
# imports): ``aiopgalloc.ClosedError`` costs one small module,
# ``aiopgalloc.open_memory_file`` the allocator.  The imports under
# ``TYPE_CHECKING`` are what this package depends on and re-exports; type
# checkers read them, and ``_LAZY`` must name the same modules (a test
# compares the two).

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

# host refuses anything but Linux with memfd_create, with an ImportError.
# Then, before any module of the compiled core is imported: AIOPGALLOC_PURE=1
# runs its .py sources; otherwise a compiled module older than its source
# raises ImportError (never silently shadows it).  See aiopgalloc/_native.py.
from . import _native, host  # noqa: F401

_native.check_build()

if TYPE_CHECKING:
    # Computed on first use by __getattr__, not imported: see _native.compiled.
    COMPILED: bool
    from .checkpoint_format import CheckpointError
    from .errors import ClosedError, RefCountError
    from .eviction_api import EvictableMemoryUser, EvictionStats
    from .host.pressure_sources import ManualPressure, NoPressureSourceError, PressureLevel
    from .lifecycle import load_memory_file, open_memory_file
    from .memory_file import MemoryFile
    from .options import AccessType, CommitMode, DelayedEviction, MemoryFileOpts
    from .page_cache import PageCache, PageCacheStats, PinnedValue
    from .ranges import (
        HUGE_PAGE_SIZE,
        PAGE_SIZE,
        EvictableRange,
        FileRange,
        page_round_down,
        page_round_up,
    )
    from .stats import FileStats
    from .usage import MemoryAccounting, MemoryKind, MemoryStats

__version__ = "0.1.0"

__all__ = [
    "COMPILED",
    "HUGE_PAGE_SIZE",
    "PAGE_SIZE",
    "AccessType",
    "CheckpointError",
    "ClosedError",
    "CommitMode",
    "DelayedEviction",
    "EvictableMemoryUser",
    "EvictableRange",
    "EvictionStats",
    "FileRange",
    "FileStats",
    "ManualPressure",
    "MemoryAccounting",
    "MemoryFile",
    "MemoryFileOpts",
    "MemoryKind",
    "MemoryStats",
    "NoPressureSourceError",
    "PageCache",
    "PageCacheStats",
    "PinnedValue",
    "PressureLevel",
    "RefCountError",
    "load_memory_file",
    "open_memory_file",
    "page_round_down",
    "page_round_up",
]

# Each public name -> the module (relative to this package) that defines it.
_LAZY: dict[str, str] = {
    "CheckpointError": ".checkpoint_format",
    "ClosedError": ".errors",
    "RefCountError": ".errors",
    "EvictableMemoryUser": ".eviction_api",
    "EvictionStats": ".eviction_api",
    "ManualPressure": ".host.pressure_sources",
    "NoPressureSourceError": ".host.pressure_sources",
    "PressureLevel": ".host.pressure_sources",
    "load_memory_file": ".lifecycle",
    "open_memory_file": ".lifecycle",
    "MemoryFile": ".memory_file",
    "AccessType": ".options",
    "CommitMode": ".options",
    "DelayedEviction": ".options",
    "MemoryFileOpts": ".options",
    "PageCache": ".page_cache",
    "PageCacheStats": ".page_cache",
    "PinnedValue": ".page_cache",
    "HUGE_PAGE_SIZE": ".ranges",
    "PAGE_SIZE": ".ranges",
    "EvictableRange": ".ranges",
    "FileRange": ".ranges",
    "page_round_down": ".ranges",
    "page_round_up": ".ranges",
    "FileStats": ".stats",
    "MemoryAccounting": ".usage",
    "MemoryKind": ".usage",
    "MemoryStats": ".usage",
}


def __getattr__(name: str) -> object:
    """The public name ``name``, imported from its module on first use and
    then kept here (later lookups are plain attribute reads).  The first use
    costs that module's import (the allocator's, about 50-100 ms, for
    ``open_memory_file``).  Raises ``AttributeError`` for any other name."""
    if name == "COMPILED":
        # Whether the core (books, segment sets) runs compiled with mypyc:
        # False for a pure build and under AIOPGALLOC_PURE=1.
        compiled = _native.compiled()
        globals()[name] = compiled
        return compiled
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value: object = getattr(import_module(where, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the not yet loaded public ones included."""
    return sorted(set(globals()) | set(__all__))
