"""The public surface, pinned.

A name that appears in or leaves ``aiopgalloc.__all__``, or a public
attribute that appears on or leaves one of its classes, is an API change:
this test fails so that the change is made on purpose (and this file, the
README and the changelog updated with it), never by accident.

Everything a user may rely on is reachable from ``aiopgalloc`` itself; the
modules below it (``aiopgalloc.host``, ``aiopgalloc.segments``, the
``_``-prefixed ones, ...) are internal and may change in any release.
"""

from __future__ import annotations

import builtins
import inspect

import aiopgalloc

EXPECTED_ALL = {
    # Issue 15: whether the core runs compiled (mypyc) or pure; a bool.
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
    "PressureLevel",
    "RefCountError",
    "load_memory_file",
    "open_memory_file",
    # Issue 16: the pressure names a user of MemoryFileOpts(pressure_source=...)
    # and of open_memory_file's errors needs, and the round-up every
    # allocate(length) of a byte count needs, all from the top.
    "page_round_down",
    "page_round_up",
    # Issue 17: the byte cache a service uses first, its figures, and the
    # pinned handle its get() returns.
    "PageCache",
    "PageCacheStats",
    "PinnedValue",
}

_RANGE = {
    "contains",
    "end",
    "intersect",
    "is_page_aligned",
    "is_superset_of",
    "length",
    "overlaps",
    "start",
    "well_formed",
}

# The public attributes each class adds to what its builtin bases (int,
# tuple, Exception, ...) already have.
EXPECTED_SURFACE: dict[str, set[str]] = {
    "AccessType": {"EXECUTE", "READ", "WRITE"},
    "CheckpointError": set(),
    "ClosedError": set(),
    "CommitMode": {"FALLOCATE", "NONE", "POPULATE"},
    "DelayedEviction": {"DEFAULT", "DISABLED", "ENABLED", "IDLE", "MANUAL"},
    "EvictableMemoryUser": {"evict"},
    "EvictableRange": _RANGE,
    "EvictionStats": {
        "evict_calls",
        "evictable_bytes",
        "evicted_bytes",
        "failed",
        "finished",
        "max_pressure_level",
        "outstanding",
        "pressure_events",
        "started",
        "users",
    },
    "FileRange": _RANGE,
    "FileStats": {
        "allocations",
        "as_dict",
        "bytes_released",
        "committed_bytes",
        "evictions",
        "file_size",
        "freed_bytes",
        "known_committed_bytes",
        "largest_free_gap",
        "live_bytes",
        "make",
        "pressure_critical",
        "pressure_low",
        "pressure_medium",
        "pressure_note",
        "pressure_source",
        "recycled_bytes",
        "release_backlog",
        "releases",
        "releasing_bytes",
        "segments",
        "usage",
    },
    # A pressure source fired by code (tests, custom policies); the rest of
    # PressureSourceBase's surface comes with it.
    "ManualPressure": {"gone_error", "is_open", "notify", "probe"},
    # A tally a user keeps for their own purposes; the allocator's own
    # figures are the read-only ``MemoryFile.accounting``.
    "MemoryAccounting": {"dec", "get", "inc", "move", "snapshot", "total"},
    "MemoryFile": {
        "accounting",
        "allocate",
        "allocate_and_fill",
        "check_invariants",
        "closed",
        "dec_ref",
        "decommit",
        "fd",
        "first_shared_range",
        "has_unique_ref",
        "inc_ref",
        "map_internal",
        "mark_all_unevictable",
        "mark_evictable",
        "mark_unevictable",
        "opts",
        "page_map",
        "reclaim_pending",
        "release_freed_soon",
        "save",
        "share",
        "should_cache_evictable",
        "start_evictions",
        "stats",
        "total_size",
        "total_usage",
        "update_usage",
        "view",
        "wait_for_evictions",
        "wait_for_reclaim",
    },
    "MemoryFileOpts": {
        "chunk_size",
        "delayed_eviction",
        "evict_fraction_low",
        "evict_fraction_medium",
        "pressure_source",
        "recycle_max_bytes",
        "release_inline_max_bytes",
        "release_inline_max_ranges",
        "resolved",
        "use_host_memcg_pressure",
    },
    "MemoryKind": {"ANONYMOUS", "MAPPED", "PAGE_CACHE", "RAMDISKFS", "SYSTEM", "TMPFS"},
    "MemoryStats": {
        "anonymous",
        "as_dict",
        "mapped",
        "page_cache",
        "ramdiskfs",
        "system",
        "tmpfs",
        "total",
    },
    # ``report`` (every source tried, and why not) is set per instance.
    "NoPressureSourceError": set(),
    "PressureLevel": {"CRITICAL", "LOW", "MEDIUM"},
    "RefCountError": set(),
    "PageCache": {
        "check_invariants",
        "clear",
        "delete",
        "evict",
        "get",
        "get_bytes",
        "max_bytes",
        "nbytes",
        "put",
        "stats",
    },
    "PageCacheStats": {
        "as_dict",
        "bytes_held",
        "entries",
        "evicted_by_capacity",
        "evicted_by_pressure",
        "expired",
        "hit_ratio",
        "hits",
        "max_bytes",
        "misses",
        "pinned",
        "value_bytes",
    },
    "PinnedValue": {"nbytes", "release"},
}


def _public(cls: type) -> set[str]:
    inherited: set[str] = set()
    for base in cls.__mro__[1:]:
        if getattr(builtins, base.__name__, None) is base:
            inherited |= set(dir(base))
    return {n for n in dir(cls) if not n.startswith("_")} - inherited


def test_all_is_pinned() -> None:
    assert set(aiopgalloc.__all__) == EXPECTED_ALL
    assert len(aiopgalloc.__all__) == len(EXPECTED_ALL), "a name is listed twice"
    for name in aiopgalloc.__all__:
        assert hasattr(aiopgalloc, name), name


def test_every_public_class_surface_is_pinned() -> None:
    classes = {
        n: getattr(aiopgalloc, n)
        for n in aiopgalloc.__all__
        if inspect.isclass(getattr(aiopgalloc, n))
    }
    assert set(classes) == set(EXPECTED_SURFACE)
    for name, cls in classes.items():
        assert _public(cls) == EXPECTED_SURFACE[name], name


def test_every_public_name_is_documented() -> None:
    for name in aiopgalloc.__all__:
        obj = getattr(aiopgalloc, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        assert inspect.getdoc(obj), name
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for attr in EXPECTED_SURFACE[name]:
                member = inspect.getattr_static(obj, attr)
                if inspect.isfunction(member) or isinstance(member, property):
                    assert inspect.getdoc(member), f"{name}.{attr}"


def test_the_version_is_the_installed_distributions() -> None:
    """``aiopgalloc.__version__`` is the one source of the version:
    pyproject.toml reads it (``[tool.setuptools.dynamic]``), so the installed
    metadata says the same."""
    from importlib.metadata import version

    assert isinstance(aiopgalloc.__version__, str)
    assert aiopgalloc.__version__ == version("aiopgalloc")


def test_the_allocators_accounting_is_read_only() -> None:
    surface = {n for n in dir(aiopgalloc.MemoryFile) if not n.startswith("_")}
    assert "accounting" in surface
    from aiopgalloc.usage import AccountingView

    view_surface = {n for n in dir(AccountingView) if not n.startswith("_")}
    assert view_surface == {"get", "snapshot", "total"}


def test_compiled_is_a_bool_saying_which_build_runs() -> None:
    """``COMPILED`` is True exactly when the books are an extension module
    (mypyc), False for the pure build (and under ``AIOPGALLOC_PURE=1``)."""
    from importlib.machinery import EXTENSION_SUFFIXES

    from aiopgalloc import _books

    assert type(aiopgalloc.COMPILED) is bool
    assert (_books.__file__ or "").endswith(tuple(EXTENSION_SUFFIXES)) == aiopgalloc.COMPILED
