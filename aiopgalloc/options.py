"""Options of a memory file, and the access types of ``map_internal``."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass

from .host.pressure_sources import PressureSource
from .ranges import HUGE_PAGE_SIZE, PAGE_SIZE

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_THRESHOLD_BYTES",
    "MAX_THRESHOLD_RANGES",
    "AccessType",
    "CommitMode",
    "DelayedEviction",
    "MemoryFileOpts",
]

DEFAULT_CHUNK_SIZE = 64 * 1024 * 1024
"""Bytes per mapping chunk, and the step by which the file grows.

64 MiB keeps the number of mappings (VMAs, and one duplicated fd each, which
Python's mmap keeps) small for files up to terabytes, while a small file
stays a small sparse file."""

MAX_THRESHOLD_BYTES = 1 << 47
"""The largest memory file, in bytes: user space is 2**47 bytes on x86-64 and
the whole file must be mappable (``MemoryFile`` refuses to grow past it).
Also the upper bound of the byte thresholds of ``MemoryFileOpts``: no
allocation or release batch can be larger."""

MAX_CHUNK_SIZE = 1 << 46
"""The largest ``chunk_size``: half the 2**47-byte user address space, so one
whole chunk can still be mapped beside the rest of the process (a chunk of
2**47 bytes fails at open with ``ENOMEM``)."""

MAX_THRESHOLD_RANGES = MAX_THRESHOLD_BYTES // PAGE_SIZE
"""The upper bound of ``release_inline_max_ranges``: a batch cannot hold more
ranges than the largest file has pages."""


class DelayedEviction(enum.Enum):
    """When evictable memory is asked back.

    - ``DEFAULT``: becomes ``ENABLED``.
    - ``ENABLED``: only under memory pressure (the host's, when the file
      listens to it, or a ``pressure_source`` such as ``ManualPressure``)
      or when ``start_evictions()`` is called.  Without pressure, evictable
      memory stays cached for as long as the file lives: what a service's
      cache wants.
    - ``IDLE``: the reference's ``ENABLED`` without host pressure: evict as
      soon as the releaser runs out of work, within milliseconds of a range
      being marked evictable whether memory is short or not.  Suits a
      sandbox's page cache that the host must be able to take back at any
      time; not a cache a service wants to keep.  Uses no pressure source.
    - ``DISABLED``: evict as soon as a range is marked evictable.
    - ``MANUAL``: only when ``start_evictions()`` is called.
    """

    DEFAULT = 0
    DISABLED = 1
    ENABLED = 2
    MANUAL = 3
    IDLE = 4


class CommitMode(enum.Enum):
    """How ``allocate`` commits the pages it hands out (later gVisor's
    allocation modes).

    - ``NONE``: leave them uncommitted; the user's first touch of each page
      faults it in (about 3.6 us per 4 KiB page here).  The default.
    - ``FALLOCATE``: ``fallocate(mode 0)`` reserves the memory up front
      (about 1-1.4 us per page); the user's first touch still takes a
      (cheaper, minor) fault.  Where the kernel refuses the pages it fails
      with ``OSError`` (``ENOSPC``, ``ENOMEM``) in the call, not later at a
      touch.
    - ``POPULATE``: ``madvise(MADV_POPULATE_WRITE)`` faults every page in,
      writable, in one syscall (3-6 us per page); the user's writes then take
      no faults at all.  Falls back to touching each page where the kernel
      lacks it.

    Committing costs time in the ``allocate`` call itself (synchronous: call
    it from a worker thread for large ranges).  Committed pages are counted
    as known committed at once.  A commit that fails (with the errors below
    too) leaves nothing allocated: pages it committed are punched back out
    and the allocator's state is as before the call.

    Memory cgroup limits.  The pages are charged to the memory cgroup of the
    process that commits them, and a charge over the cgroup's hard limit
    does not come back as an error: the kernel runs the cgroup's OOM killer
    inside the ``fallocate`` or ``madvise`` and the process is killed.  So
    ``FALLOCATE`` and ``POPULATE`` look at the process's memory cgroup and
    each ancestor up to the root of the hierarchy as mounted here.  When
    some level has a limit (v1 ``memory.limit_in_bytes``, v2 ``memory.max``)
    the pages are committed in steps of at most 64 MiB (a quarter of the
    room when that is less, at least 2 MiB), and before each step every
    limited level must satisfy::

        limit - usage + reclaimable >= left + left / 128 + 8 MiB

    ``left`` is the bytes still to commit; ``usage`` is v1
    ``memory.usage_in_bytes``, v2 ``memory.current``; ``reclaimable`` is the
    inactive clean page cache of the cgroup's subtree from ``memory.stat``
    (v1 ``total_inactive_file - total_dirty - total_writeback``, v2
    ``inactive_file - file_dirty - file_writeback``), read only when
    ``limit - usage`` alone falls short.  ``left / 128`` covers what the
    kernel charges for its own bookkeeping of the pages (page-cache index,
    page tables); 8 MiB stays free for the rest of the process.  A step that
    does not fit raises ``OSError(ENOMEM)`` naming the cgroup directory (as
    ``filename``), its room and the bytes asked, and the call is undone as
    above.  With no limit at any level, or no memory controller, the pages
    are committed in one call as before.

    Guaranteed: while nothing else charges memory to the cgroup during the
    call, a commit that does not fit raises ``OSError(ENOMEM)`` and the
    process lives on, and a commit that is let through had, before each
    step, room for the rest of itself plus 1/128 plus 8 MiB at every
    limited level.  Not guaranteed: the check and the step are not atomic,
    so other processes or threads charging the cgroup meanwhile can still
    bring the OOM killer (steps narrow that window to one step); swap is
    not counted (with swap, a request over the limit is refused though the
    kernel could have swapped); active page cache and other reclaimable
    memory are not counted (a request that reclaim could have made room for
    may be refused); limits above the mount point (a container's host
    side), v1 ``memory.memsw.limit_in_bytes`` and soft limits, and v2
    ``memory.high`` (which throttles, not kills) are not looked at; a level
    whose files cannot be read or parsed counts as unlimited.

    Cost of the check, medians here (cgroup v1, three levels, 2 cores):
    about 45 us per call with no limit (one read of ``/proc/self/cgroup``
    and each level's limit file; the directories are resolved once per
    process and cgroup, 0.75-1.5 ms); with a limit about 70 us per step,
    130 us when ``memory.stat`` is read.  A 64 MiB step itself takes about
    14 ms (``FALLOCATE``) or 42 ms (``POPULATE``).
    """

    NONE = 0
    FALLOCATE = 1
    POPULATE = 2


class AccessType(enum.Flag):
    """The access a caller wants through ``map_internal``."""

    READ = 1
    WRITE = 2
    EXECUTE = 4
    READ_WRITE = READ | WRITE


@dataclass(frozen=True, kw_only=True)
class MemoryFileOpts:
    """Options for ``open_memory_file`` (frozen; every field keyword-only).

    - ``delayed_eviction``: see ``DelayedEviction``.
    - ``use_host_memcg_pressure``: drive evictions from the host's memory
      pressure notifications (only with ``ENABLED``).  ``None`` (the
      default): listen when this host offers a source, and open without one
      when none works, with the reason in ``stats().pressure_note`` (and in
      ``python -m aiopgalloc info``).  ``True``: the file must listen;
      opening fails with ``NoPressureSourceError`` when no source works.
      ``False``: never.  With ``DISABLED``, ``MANUAL`` and ``IDLE`` the file
      listens to no pressure (``True`` is ignored there, as in the
      reference).
    - ``chunk_size``: bytes per mapping and growth step; a power of two from
      ``HUGE_PAGE_SIZE`` to ``MAX_CHUNK_SIZE``.
    - ``recycle_max_bytes``: allocations up to this size may reuse freed pages
      that the releaser has not returned yet (zeroing them by hand); larger
      ones prefer clean pages while the file has room.  See
      ``MemoryFile.allocate``.
    - ``release_inline_max_bytes`` / ``release_inline_max_ranges``: a release
      batch at most this big is punched on the event loop; bigger ones go to
      a worker thread (a thread hop costs far more than a few small punches).
    - ``pressure_source``: a pressure source (``PressureSource``: an async
      context manager that is an async iterator of events with a ``level``;
      see ``aiopgalloc.host.pressure``), listened to instead of the host's
      (``ManualPressure`` fires it from code).  Only with ``ENABLED`` and
      ``use_host_memcg_pressure`` not False: a source the file would not
      listen to is refused, not ignored.
    - ``evict_fraction_low`` / ``evict_fraction_medium``: graded eviction.  On
      a low (medium) pressure notification each evictable user is asked for
      this share of its evictable bytes, from the end; critical pressure
      always evicts everything.  1.0 (the default, and the reference's only
      behaviour) evicts everything at every level.

    Every field is checked when the options are built, so a bad value fails
    here and not when a file is opened:

    ============================  =========  =====================================
    field                         type       allowed
    ============================  =========  =====================================
    delayed_eviction              enum       a ``DelayedEviction``
    use_host_memcg_pressure       bool/None  None, True or False (not 0/1, not a string)
    chunk_size                    int        a power of two in
                                             [``HUGE_PAGE_SIZE``, ``MAX_CHUNK_SIZE``]
    recycle_max_bytes             int        [0, ``MAX_THRESHOLD_BYTES``]
    release_inline_max_bytes      int        [0, ``MAX_THRESHOLD_BYTES``]
    release_inline_max_ranges     int        [0, ``MAX_THRESHOLD_RANGES``]
    pressure_source               object     None, or an instance with
                                             ``__aenter__``, ``__aexit__``,
                                             ``__aiter__``; only where the
                                             file listens to pressure
    evict_fraction_low / _medium  float/int  in (0, 1]
    ============================  =========  =====================================

    Raises ``TypeError`` for a value of the wrong type and ``ValueError`` for
    one out of range, each naming the field and what it allows.
    """

    delayed_eviction: DelayedEviction = DelayedEviction.DEFAULT
    use_host_memcg_pressure: bool | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    recycle_max_bytes: int = 2 * 1024 * 1024
    release_inline_max_bytes: int = 256 * 1024
    release_inline_max_ranges: int = 16
    pressure_source: PressureSource | None = None
    evict_fraction_low: float = 1.0
    evict_fraction_medium: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.delayed_eviction, DelayedEviction):
            raise TypeError(
                "MemoryFileOpts.delayed_eviction must be a DelayedEviction "
                f"({', '.join(m.name for m in DelayedEviction)}), "
                f"got {self.delayed_eviction!r}"
            )
        use_pressure = self.use_host_memcg_pressure
        if use_pressure is not None and type(use_pressure) is not bool:
            raise TypeError(
                "MemoryFileOpts.use_host_memcg_pressure must be None, True or False, "
                f"got {use_pressure!r}"
            )
        cs = self._int_in("chunk_size", HUGE_PAGE_SIZE, MAX_CHUNK_SIZE, "an int, a power of two")
        if cs & (cs - 1) or cs % PAGE_SIZE:
            raise ValueError(
                f"MemoryFileOpts.chunk_size must be an int, a power of two in [{HUGE_PAGE_SIZE}, "
                f"{_num(MAX_CHUNK_SIZE)}], got {cs}"
            )
        self._int_in("recycle_max_bytes", 0, MAX_THRESHOLD_BYTES)
        self._int_in("release_inline_max_bytes", 0, MAX_THRESHOLD_BYTES)
        self._int_in("release_inline_max_ranges", 0, MAX_THRESHOLD_RANGES)
        _check_pressure_source(self.pressure_source)
        if self.pressure_source is not None:
            if self.use_host_memcg_pressure is False:
                raise ValueError(
                    "MemoryFileOpts.pressure_source is given but use_host_memcg_pressure is "
                    "False, so the file would never listen to it: drop one of the two"
                )
            if self.delayed_eviction in _NO_PRESSURE:
                raise ValueError(
                    "MemoryFileOpts.pressure_source is given but delayed_eviction="
                    f"{self.delayed_eviction.name} listens to no pressure: use ENABLED "
                    "(the default) or drop the source"
                )
        for name in ("evict_fraction_low", "evict_fraction_medium"):
            f = getattr(self, name)
            if isinstance(f, bool) or not isinstance(f, int | float):
                raise TypeError(f"MemoryFileOpts.{name} must be a number in (0, 1], got {f!r}")
            if not (math.isfinite(f) and 0.0 < f <= 1.0):
                raise ValueError(f"MemoryFileOpts.{name} must be in (0, 1], got {f!r}")

    def _int_in(self, name: str, low: int, high: int, what: str = "an int") -> int:
        """Check that field ``name`` is an int (not a bool) in [low, high];
        an int subclass is stored as a plain int.  Returns the value."""
        v = getattr(self, name)
        allowed = f"{what} in [{low}, {_num(high)}]"
        if type(v) is not int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"MemoryFileOpts.{name} must be {allowed}, got {v!r}")
            v = int(v)
            object.__setattr__(self, name, v)  # frozen: the one way to normalize
        if not low <= v <= high:
            raise ValueError(f"MemoryFileOpts.{name} must be {allowed}, got {v}")
        return v

    def resolved(self) -> MemoryFileOpts:
        """The options as the file applies them: ``DEFAULT`` becomes
        ``ENABLED``; ``DISABLED``, ``MANUAL`` and ``IDLE`` turn host
        pressure off; ``use_host_memcg_pressure=None`` stays None (decided
        when the file opens)."""
        de = self.delayed_eviction
        use_pressure = self.use_host_memcg_pressure
        if de is DelayedEviction.DEFAULT:
            de = DelayedEviction.ENABLED
        elif de in _NO_PRESSURE:
            use_pressure = False
        return dataclasses.replace(self, delayed_eviction=de, use_host_memcg_pressure=use_pressure)


_NO_PRESSURE = (DelayedEviction.DISABLED, DelayedEviction.MANUAL, DelayedEviction.IDLE)
"""The eviction modes that listen to no memory pressure."""


def _num(n: int) -> str:
    """``n`` as a power of two when it is a big one (``2**47``), else decimal."""
    return f"2**{n.bit_length() - 1}" if n >= 1 << 20 and n & (n - 1) == 0 else str(n)


_SOURCE_METHODS = ("__aenter__", "__aexit__", "__aiter__")


def _check_pressure_source(src: object) -> None:
    """A structural check of ``pressure_source``: None, or an instance whose
    type has the async context manager and async iterator methods (looked up
    on the type, as ``async with`` and ``async for`` do)."""
    if src is None:
        return
    what = (
        "MemoryFileOpts.pressure_source must be None or a pressure source (an async "
        "context manager that is an async iterator of pressure events; see "
        "aiopgalloc.host.pressure)"
    )
    if isinstance(src, type):
        raise TypeError(f"{what}, got the class {src.__name__}: pass an instance")
    missing = [m for m in _SOURCE_METHODS if not callable(getattr(type(src), m, None))]
    if missing:
        raise TypeError(f"{what}, got {src!r}, whose type has no {', '.join(missing)}")
