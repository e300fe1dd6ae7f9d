"""PageCache: a byte cache in the pages of a MemoryFile, bounded in bytes,
shrunk coldest-first by memory pressure, read without copying.

    async with open_memory_file() as mf:
        cache = PageCache(mf, max_bytes=256 << 20)
        cache.put("user:42", payload, ttl=60)
        pinned = cache.get("user:42")       # None when absent
        if pinned is not None:
            with pinned as view:            # read-only memoryview, no copy
                send(view)

Storage
-------
Each value lives in pages of its own, allocated from ``mf`` (kind
``MemoryKind.PAGE_CACHE``) and holding one allocator reference while it is
in the cache.  ``max_bytes`` bounds the *pages* the cache holds
(``nbytes``), not the value bytes: whole-page storage costs a 100-byte value
a whole 4 KiB page (97.6 % waste), a 5000-byte value two pages; values of a
few pages or more waste under one page each (under 25 % from 16 KiB up).
The figure ``stats().value_bytes`` next to ``bytes_held`` shows what a
workload pays.  Small values are not packed into shared pages (see the
README: a cache of many values under ~1 KiB is better served by packing
them, which this version does not do).  An empty value takes no page.

What whole pages buy: every value is one page-aligned range, so it is freed
(and its memory returned to the kernel by the releaser) the moment its last
reference goes, with no fragmentation inside pages and no compaction.

Replacement policy: SIEVE (the decision)
----------------------------------------
Measured with the cache's own policy code (``aiopgalloc._cache_policy``,
simulated by ``aiopgalloc._bench.page_cache.hit_ratio``) on Zipf traces of
1,000,000 requests over a key space 10x the capacity, seed 1; the rows of
capacity 1,000 are what ``python -m aiopgalloc bench --workloads 13`` runs,
where the real PageCache on the same trace gives exactly the simulated
SIEVE figure:

=======  ==========  ==============  ================  ================
alpha    capacity    keys            LRU hit ratio     SIEVE hit ratio
=======  ==========  ==============  ================  ================
0.9      1,000       10,000          0.556             0.647
0.9      10,000      100,000         0.603             0.661
1.0      1,000       10,000          0.675             0.745
1.0      10,000      100,000         0.735             0.775
=======  ==========  ==============  ================  ================

(capacity in one-page entries; a mix of 1-16-page values gives the same
figures within 0.005).  SIEVE wins by 4-9 points and a hit costs it one
attribute store instead of LRU's relinking, so SIEVE ships; LRU stays in
``aiopgalloc._cache_policy`` as the benchmark's reference.  SIEVE (Zhang et
al., NSDI 2024): a FIFO queue with a "visited" bit per entry and a hand;
a hit sets the bit, a victim is found by moving the hand from the oldest
entry towards the newest, clearing set bits, to the first entry whose bit
is clear.

Speed: what a PageCache call costs is mostly the allocator's: ``put`` is an
``allocate`` (plus zeroing recycled pages, which the copy then overwrites)
and a ``dec_ref`` per value pushed out; ``get`` is an ``inc_ref`` and, at
the exit, a ``dec_ref`` (each splits or merges a segment of the usage set).
Workload 13 (``--quick``, this 2-core machine shared and loaded, medians
measured side by side): a 90 % read mix runs at about 0.03x the operations
per second of ``cachetools.LRUCache`` holding ``bytes`` (0.05x with
``get_bytes``), puts alone at about 0.03x.  It is a cache for values whose
memory must go back to the kernel and be read without copies, not for the
fastest lookups of small values.

Shrinking under pressure: coldness decides, not addresses
---------------------------------------------------------
A PageCache is an ``EvictableMemoryUser`` of ``mf``.  The allocator asks a
user for a share of its evictable bytes taken from the *end* of the user's
evictable ranges, which is address order; were the values marked at their
file offsets, a low-pressure event would shed whatever happens to lie
highest in the file, hot values included.  So the cache marks a *ledger*
instead: its evictable set, in its own offset space, is always the single
range ``[0, nbytes)``.  An ``evict(er)`` then means "give back
``er.length`` bytes", and the cache sheds that many bytes of its coldest
values, in the order the policy would evict them (SIEVE's hand), whatever
their addresses; afterwards it marks the ledger ``[0, nbytes)`` again.  A
low (medium) pressure event with ``evict_fraction_low`` (``_medium``) ``f``
thus sheds the coldest ``f`` of the cache (rounded up to whole values);
critical pressure, ``start_evictions()`` and ``f == 1`` shed everything.
Several caches on one file are several users: each sheds its own share.
Keeping the ledger in step costs one ``mark_evictable`` or
``mark_unevictable`` of one range per put or delete that changes
``nbytes`` (the eviction engine's lock, O(1) here).

Mode: meant for the default ``DelayedEviction.ENABLED`` (evictable memory
is kept until pressure or ``start_evictions()``) and ``MANUAL``.  Under
``DISABLED`` or ``IDLE`` the allocator evicts evictable memory right away
(or when its releaser idles), which would empty the cache after every put:
pass ``evictable=False`` there (the cache then never shrinks by itself).

Readers, pins and races
-----------------------
``get`` takes an allocator reference (``inc_ref``) on the value's pages
while it holds the cache's lock, so the lookup and the pin are one step:
whatever removes the value afterwards (``delete``, a replacing ``put``,
capacity or pressure eviction, ``clear``) drops only the cache's own
reference, and the pages stay allocated, unchanged and never recycled until
the reader's ``__exit__`` drops the last one.  Then they are freed, and the
releaser returns them to the kernel.

Locking: one ``threading.Lock`` per cache, held only for the table and the
policy and the allocator's own synchronous calls made in step with them
(``inc_ref``, ``mark_evictable``/``mark_unevictable``).  Allocating,
copying a value in, and freeing (``dec_ref``) happen outside it.  Lock
order: the cache's lock, then the allocator's locks; the allocator never
calls the cache with a lock held (``evict`` runs with none).  A key's
``__hash__`` and ``__eq__`` run under the cache's lock: they must not call
the cache.

Closing: once ``mf`` is closed, ``put``, ``get``, ``get_bytes``,
``delete``, ``clear`` and ``in`` raise ``ClosedError``; ``len``,
``nbytes``, ``stats()`` and ``check_invariants()`` still answer (what the
cache held at the close).  Views handed out before stay valid (the mapping
outlives the file), and their ``__exit__`` never raises.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio.lowlevel

from ._cache_policy import Linked, SievePolicy
from .errors import ClosedError
from .options import AccessType
from .ranges import PAGE_SIZE, EvictableRange, FileRange, page_round_up
from .usage import MemoryKind

if TYPE_CHECKING:
    from .memory_file import MemoryFile

__all__ = ["PageCache", "PageCacheStats", "PinnedValue"]

MAX_CACHE_BYTES = 1 << 47
"""The largest ``max_bytes`` (the largest memory file)."""

COPY_UNDER_LOCK_MAX = 256 * 1024
"""``get_bytes`` copies values up to this size while holding the cache's
lock (a few microseconds; no pin needed); larger ones are pinned, copied
without the lock, and unpinned."""

_EVICT_BATCH = 256
"""``evict`` sheds at most this many values per critical section and yields
to the event loop between batches."""


@dataclass(frozen=True, slots=True)
class PageCacheStats:
    """One snapshot of a ``PageCache``'s figures (``cache.stats()``).

    Counters since the cache was made: ``hits``, ``misses`` (absent or
    expired keys, of ``get`` and ``get_bytes``), ``expired`` (entries found
    expired and freed), ``evicted_by_capacity`` (values a ``put`` pushed
    out), ``evicted_by_pressure`` (values shed by ``evict``: memory
    pressure or ``start_evictions``).  Gauges: ``entries`` (values held,
    expired ones not yet freed included), ``bytes_held`` (pages held:
    ``nbytes``), ``value_bytes`` (the values' own bytes; ``bytes_held -
    value_bytes`` is what whole-page storage costs), ``pinned`` (``get``
    handles not yet released), ``max_bytes``.
    """

    hits: int
    misses: int
    expired: int
    evicted_by_capacity: int
    evicted_by_pressure: int
    entries: int
    bytes_held: int
    value_bytes: int
    pinned: int
    max_bytes: int

    @property
    def hit_ratio(self) -> float:
        """``hits / (hits + misses)``, 0.0 before any lookup."""
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def as_dict(self) -> dict[str, int]:
        """The fields as a plain dict (not ``hit_ratio``)."""
        return asdict(self)


class _Entry(Linked):
    __slots__ = ("expires", "fr", "key", "length")

    def __init__(
        self, key: Hashable, fr: FileRange | None, length: int, expires: float | None
    ) -> None:
        super().__init__()
        self.key = key
        self.fr = fr
        self.length = length
        self.expires = expires

    @property
    def pages(self) -> int:
        fr = self.fr
        return 0 if fr is None else fr.end - fr.start


class PinnedValue:
    """What ``PageCache.get`` returns for a held key: a context manager
    whose ``__enter__`` returns the value as a read-only ``memoryview`` of
    the cache's pages (no copy), pinned.

    The pin (an allocator reference on the value's pages) is taken by
    ``get`` itself and dropped by ``__exit__`` (or ``release()``): in
    between, the bytes cannot change or be recycled, even if the key is
    deleted, replaced or evicted meanwhile.  Do not let the view or any
    slice of it outlive the block: after the exit its pages may hold
    another value (``bytes(view)`` inside the block keeps a copy).  One
    use: a second ``__enter__`` raises ``RuntimeError``.

    ``__exit__`` releases the view, then drops the pin (``dec_ref``, about
    a microsecond).  If the view cannot be released because something still
    exports its buffer (a numpy array over it, say), the pin is kept and
    retried at the cache's next ``put``: the pages are never freed under a
    live export.  After the file's close the pin is simply dropped (the
    pages went with the file; the view stays readable).  A handle dropped
    without ``__exit__`` gives its pin back at the cache's next call.
    ``__exit__`` and ``release`` never raise.
    """

    __slots__ = ("_cache", "_entered", "_fr", "_view")

    def __init__(self, cache: PageCache, fr: FileRange | None, view: memoryview) -> None:
        self._cache: PageCache | None = cache
        self._fr = fr
        self._view = view
        self._entered = False

    @property
    def nbytes(self) -> int:
        """The value's length in bytes (0 once released)."""
        return 0 if self._cache is None else self._view.nbytes

    def __enter__(self) -> memoryview:
        if self._entered or self._cache is None:
            raise RuntimeError("a PinnedValue can be entered once, and not after its release")
        self._entered = True
        return self._view

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        """Release the view and drop the pin (what ``__exit__`` does).
        Idempotent; never raises."""
        cache, self._cache = self._cache, None
        if cache is not None:
            cache._unpin(self._view, self._fr)

    def __del__(self) -> None:
        # Never call the allocator from a finalizer (it may run inside one
        # of its locks): hand the pin to the cache, which drops it at its
        # next call.
        cache = getattr(self, "_cache", None)
        if cache is not None:
            self._cache = None
            cache._orphans.append((self._view, self._fr))


_EMPTY = memoryview(b"")


def _bytes_view(value: object) -> memoryview:
    """``value`` as a flat memoryview of unsigned bytes (the caller
    releases it).  Raises ``TypeError`` for anything without the buffer
    protocol (``str`` included), ``ValueError`` for a non-contiguous one."""
    if isinstance(value, str):
        raise TypeError("PageCache.put: value must be bytes-like, got str (encode it first)")
    try:
        mv = memoryview(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            "PageCache.put: value must be bytes-like (bytes, bytearray, memoryview, ...), "
            f"got {type(value).__name__}"
        ) from None
    try:
        if not mv.c_contiguous:
            raise ValueError(
                "PageCache.put: the value's buffer is not C-contiguous (pass bytes(value))"
            )
        if mv.format == "B" and mv.ndim == 1:
            return mv
        flat = mv.cast("B")
    except BaseException:
        mv.release()
        raise
    mv.release()
    return flat


class PageCache:
    """A cache of byte values kept in the pages of the memory file ``mf``,
    bounded by ``max_bytes`` of pages, replacement by SIEVE, shrunk
    coldest-first under memory pressure (see the module docstring for the
    design and the figures).

    ``max_bytes``: the pages the cache may hold, an int in
    [``PAGE_SIZE``, 2**47] (rounded down to whole pages).  ``kind``: the
    ``MemoryKind`` its pages are counted as (``PAGE_CACHE``).
    ``evictable``: register with ``mf`` as an evictable user so memory
    pressure shrinks the cache (True); False for files in ``DISABLED`` or
    ``IDLE`` mode, which would empty it right away.  ``clock``: the
    monotonic clock TTLs are measured with (seconds; ``time.monotonic``).

    Synchronous and thread-safe; no call waits on I/O.  Raises
    ``TypeError`` for a ``mf`` that is not a ``MemoryFile``, a bad
    ``max_bytes`` type, ``kind`` or ``clock``; ``ValueError`` for
    ``max_bytes`` out of range; ``ClosedError`` if ``mf`` is closed.
    """

    __slots__ = (
        "__weakref__",
        "_by_capacity",
        "_by_pressure",
        "_clock",
        "_evictable",
        "_expired",
        "_held",
        "_hits",
        "_kind",
        "_lingering",
        "_lock",
        "_marked",
        "_max",
        "_mf",
        "_misses",
        "_orphans",
        "_pinned",
        "_policy",
        "_table",
        "_value_bytes",
    )

    def __init__(
        self,
        mf: MemoryFile,
        max_bytes: int,
        *,
        kind: MemoryKind = MemoryKind.PAGE_CACHE,
        evictable: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from .memory_file import MemoryFile

        if not isinstance(mf, MemoryFile):
            raise TypeError(f"PageCache: mf must be a MemoryFile, got {type(mf).__name__}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
            raise TypeError(f"PageCache: max_bytes must be an int, got {type(max_bytes).__name__}")
        if not PAGE_SIZE <= max_bytes <= MAX_CACHE_BYTES:
            raise ValueError(
                f"PageCache: max_bytes must be in [{PAGE_SIZE}, 2**47], got {max_bytes}"
            )
        if not isinstance(kind, MemoryKind):
            raise TypeError(f"PageCache: kind must be a MemoryKind, got {type(kind).__name__}")
        if not isinstance(evictable, bool):
            raise TypeError(f"PageCache: evictable must be a bool, got {type(evictable).__name__}")
        if not callable(clock):
            raise TypeError("PageCache: clock must be a callable returning seconds")
        if mf.closed:
            raise ClosedError("memory file is closed")
        self._mf = mf
        self._max = int(max_bytes) - int(max_bytes) % PAGE_SIZE
        self._kind = kind
        self._evictable = evictable
        self._clock = clock
        self._lock = threading.Lock()
        # ---- guarded by _lock
        self._table: dict[Hashable, _Entry] = {}
        self._policy = SievePolicy()
        self._held = 0  # pages of the entries in the table
        self._value_bytes = 0
        self._marked = 0  # the ledger [0, _marked) as last marked evictable
        self._pinned = 0
        self._hits = self._misses = self._expired = 0
        self._by_capacity = self._by_pressure = 0
        # Pins to drop at the next call: handles collected without an exit
        # (appended by finalizers, lock-free), views whose release failed.
        self._orphans: list[tuple[memoryview, FileRange | None]] = []
        self._lingering: list[tuple[memoryview, FileRange | None]] = []

    # ------------------------------------------------------------ figures

    @property
    def max_bytes(self) -> int:
        """The bound on the pages held, in bytes (whole pages)."""
        return self._max

    @property
    def nbytes(self) -> int:
        """The bytes of the pages the cache holds now (a whole number of
        pages; at most ``max_bytes``).  O(1).  Pages only pinned by readers
        of values the cache dropped are not counted."""
        return self._held

    def __len__(self) -> int:
        """The number of values held (expired ones not yet freed included).
        O(1)."""
        return len(self._table)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is held and not expired (counts no hit or miss,
        frees nothing).  O(1).  Raises ``TypeError`` for an unhashable key,
        ``ClosedError``."""
        self._check_open()
        with self._lock:
            e = self._table.get(key)
            return e is not None and not self._is_expired(e)

    def stats(self) -> PageCacheStats:
        """One consistent snapshot of the figures (see ``PageCacheStats``).
        O(1) under the lock.  Works after the file's close."""
        with self._lock:
            return PageCacheStats(
                hits=self._hits,
                misses=self._misses,
                expired=self._expired,
                evicted_by_capacity=self._by_capacity,
                evicted_by_pressure=self._by_pressure,
                entries=len(self._table),
                bytes_held=self._held,
                value_bytes=self._value_bytes,
                pinned=self._pinned,
                max_bytes=self._max,
            )

    # -------------------------------------------------------------- calls

    def put(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        """Store a copy of ``value`` (any C-contiguous bytes-like object:
        ``bytes``, ``bytearray``, ``memoryview``, ``array``...) under
        ``key``, replacing what ``key`` held.  ``ttl``: seconds until the
        entry expires (a miss from then on, freed lazily), or None.

        The value's pages are allocated and the bytes copied in first, then
        the cache evicts by SIEVE until the new value fits in ``max_bytes``
        and inserts it.  Cost: an ``allocate`` (recycled pages are zeroed
        first), a memcpy of the value, O(1) amortised for the policy, and
        a ``dec_ref`` per value pushed out; a new value's first touch of
        each fresh page faults it in.

        Raises ``TypeError`` for an unhashable key, a value that is not
        bytes-like (``str`` included) or a ttl that is not a number;
        ``ValueError`` for a non-contiguous buffer, a ttl that is not
        positive and finite, or a value whose pages exceed ``max_bytes``;
        what ``mf.allocate`` raises (``OSError``, ``ClosedError``).
        Nothing changes when it raises.
        """
        hash(key)  # TypeError for an unhashable key, before anything
        expires = self._expiry(ttl)
        src = _bytes_view(value)
        try:
            n = src.nbytes
            pages = page_round_up(n) if n else 0
            if pages > self._max:
                raise ValueError(
                    f"PageCache.put: a value of {n} bytes needs {pages} bytes of pages, "
                    f"more than max_bytes ({self._max})"
                )
            self._check_open()
            self._drain()
            mf = self._mf
            fr = None
            if pages:
                fr = mf.allocate(pages, self._kind)
                try:
                    dst = mf.view(FileRange(fr.start, fr.start + n), AccessType.WRITE)
                    dst[:] = src
                    dst.release()
                except BaseException:
                    mf.dec_ref(fr)
                    raise
        finally:
            src.release()
        entry = _Entry(key, fr, n, expires)
        victims: list[_Entry] = []
        with self._lock:
            old = self._table.pop(key, None)
            if old is not None:
                self._unlink_locked(old)
                victims.append(old)
            policy = self._policy
            while self._held + pages > self._max:
                v = policy.victim()
                assert v is not None, "over max_bytes with nothing to evict"
                assert isinstance(v, _Entry)
                del self._table[v.key]
                self._unlink_locked(v)
                self._by_capacity += 1
                victims.append(v)
            self._table[key] = entry
            policy.insert(entry)
            self._held += pages
            self._value_bytes += n
            self._sync_ledger_locked()
        self._free(victims)

    def get(self, key: Hashable) -> PinnedValue | None:
        """The value of ``key``, pinned: None when absent or expired (a
        miss; an expired entry is freed), else a ``PinnedValue``, a context
        manager whose ``__enter__`` gives a read-only memoryview of the
        value's pages (no copy)::

            pinned = cache.get(key)
            if pinned is not None:
                with pinned as view:
                    ...

        The pin is taken here, in the same critical section as the lookup,
        so nothing can free or recycle the pages between the two; exit the
        block promptly (a pin keeps a dropped value's pages allocated).
        Cost: a dict lookup, SIEVE's one-bit hit, an ``inc_ref``
        (O(log n)), one memoryview slice.

        Raises ``TypeError`` for an unhashable key, ``ClosedError``.
        """
        self._check_open()
        if self._orphans or self._lingering:
            self._drain()
        victims: list[_Entry] = []
        fr: FileRange | None = None
        with self._lock:
            e = self._lookup_locked(key, victims)
            if e is not None:
                fr = e.fr
                if fr is not None:
                    self._mf.inc_ref(fr)
                self._pinned += 1
        if victims:
            self._free(victims)
        if e is None:
            return None
        if fr is None:
            return PinnedValue(self, None, _EMPTY[:])
        try:
            view = self._mf.view(FileRange(fr.start, fr.start + e.length), AccessType.READ)
        except BaseException:
            self._unpin(None, fr)
            raise
        return PinnedValue(self, fr, view)

    def get_bytes(self, key: Hashable) -> bytes | None:
        """A copy of the value of ``key`` as ``bytes``, or None when absent
        or expired (a miss; an expired entry is freed).  Values up to
        ``COPY_UNDER_LOCK_MAX`` (256 KiB) are copied under the cache's lock;
        larger ones are pinned, copied without it, and unpinned.  Cost: the
        lookup and a memcpy.  Raises ``TypeError`` for an unhashable key,
        ``ClosedError``."""
        self._check_open()
        victims: list[_Entry] = []
        fr: FileRange | None = None
        with self._lock:
            e = self._lookup_locked(key, victims)
            if e is not None:
                fr = e.fr
                if fr is None:
                    return b""
                if e.length <= COPY_UNDER_LOCK_MAX:
                    view = self._mf.view(FileRange(fr.start, fr.start + e.length), AccessType.READ)
                    try:
                        return view.tobytes()
                    finally:
                        view.release()
                self._mf.inc_ref(fr)
                self._pinned += 1
        if victims:
            self._free(victims)
        if e is None or fr is None:
            return None
        pinned: PinnedValue | None = None
        try:
            view = self._mf.view(FileRange(fr.start, fr.start + e.length), AccessType.READ)
            pinned = PinnedValue(self, fr, view)
            with pinned as v:
                return v.tobytes()
        finally:
            if pinned is None:
                self._unpin(None, fr)

    def delete(self, key: Hashable) -> bool:
        """Drop ``key``; return whether it held an unexpired value.  Its
        pages are freed now, or when the last reader pinning them exits.
        Cost: a dict pop, O(1) for the policy, one ``dec_ref``.  Raises
        ``TypeError`` for an unhashable key, ``ClosedError``."""
        self._check_open()
        with self._lock:
            e = self._table.pop(key, None)
            if e is None:
                return False
            live = not self._is_expired(e)
            if not live:
                self._expired += 1
            self._unlink_locked(e)
            self._sync_ledger_locked()
        self._free([e])
        return live

    def clear(self) -> None:
        """Drop every value (pinned pages are freed when their readers
        exit).  Cost: O(n) and a ``dec_ref`` per value.  Raises
        ``ClosedError``."""
        self._check_open()
        with self._lock:
            victims = list(self._table.values())
            self._table.clear()
            self._policy = SievePolicy()
            self._held = self._value_bytes = 0
            self._sync_ledger_locked()
        self._free(victims)
        self._drain()

    async def evict(self, er: EvictableRange) -> None:
        """Called by ``mf`` under memory pressure (``EvictableMemoryUser``):
        shed the coldest values, in SIEVE's eviction order, until at least
        ``er.length`` bytes of pages are given back (or the cache is
        empty), then mark the ledger ``[0, nbytes)`` evictable again.  The
        range's offsets are the cache's byte ledger, not file offsets (see
        the module docstring).  Sheds at most 256 values per critical
        section and yields to the event loop between batches.  Raises
        nothing of its own."""
        want = er.length
        shed = 0
        try:
            while True:
                victims: list[_Entry] = []
                with self._lock:
                    policy = self._policy
                    while shed < want and len(victims) < _EVICT_BATCH:
                        v = policy.victim()
                        if v is None:
                            break
                        assert isinstance(v, _Entry)
                        del self._table[v.key]
                        self._unlink_locked(v)
                        self._by_pressure += 1
                        shed += v.pages
                        victims.append(v)
                    done = shed >= want or not self._table
                    self._sync_ledger_locked()
                self._free(victims)
                if done:
                    return
                await anyio.lowlevel.checkpoint()
        finally:
            # The allocator took ``er`` out of the evictable set before the
            # call: mark the ledger exactly [0, nbytes) again.
            with self._lock:
                self._resync_ledger_locked()

    def check_invariants(self) -> None:
        """Verify the cache's invariants; raise ``AssertionError`` naming
        the first one broken.  O(n): for tests.

        The table and the policy's queue hold the same entries; ``nbytes``
        and ``value_bytes`` are their sums and ``nbytes <= max_bytes``;
        each value's range is its length rounded up to pages; the ledger
        marked is ``[0, nbytes)``; the pin count is not negative.
        """
        with self._lock:
            queue = self._policy.oldest_first()
            assert len(queue) == len(self._table), "policy queue and table differ in size"
            held = vb = 0
            for e in queue:
                assert isinstance(e, _Entry)
                assert self._table.get(e.key) is e, f"queued entry {e.key!r} not in the table"
                if e.fr is None:
                    assert e.length == 0, "a non-empty value without pages"
                else:
                    assert e.pages == page_round_up(e.length), "pages do not fit the length"
                held += e.pages
                vb += e.length
            assert held == self._held, f"nbytes {self._held} but entries hold {held}"
            assert vb == self._value_bytes, "value_bytes out of step"
            assert self._held <= self._max, "over max_bytes"
            assert not self._evictable or self._marked == self._held, "ledger out of step"
            assert self._pinned >= 0, "negative pin count"

    def __repr__(self) -> str:
        return (
            f"<PageCache entries={len(self._table)} nbytes={self._held:#x} "
            f"max_bytes={self._max:#x}>"
        )

    # ----------------------------------------------------------- internal

    def _check_open(self) -> None:
        if self._mf.closed:
            raise ClosedError("memory file is closed")

    def _expiry(self, ttl: object) -> float | None:
        if ttl is None:
            return None
        if isinstance(ttl, bool) or not isinstance(ttl, int | float):
            raise TypeError(f"PageCache.put: ttl must be a number or None, got {ttl!r}")
        if not (math.isfinite(ttl) and ttl > 0):
            raise ValueError(f"PageCache.put: ttl must be positive and finite, got {ttl!r}")
        return self._clock() + float(ttl)

    def _is_expired(self, e: _Entry) -> bool:
        return e.expires is not None and self._clock() >= e.expires

    def _lookup_locked(self, key: Hashable, victims: list[_Entry]) -> _Entry | None:
        """The live entry of ``key`` (a hit), or None (a miss; an expired
        entry goes to ``victims``)."""
        e = self._table.get(key)
        if e is not None and self._is_expired(e):
            del self._table[key]
            self._unlink_locked(e)
            self._expired += 1
            self._sync_ledger_locked()
            victims.append(e)
            e = None
        if e is None:
            self._misses += 1
            return None
        self._policy.hit(e)
        self._hits += 1
        return e

    def _unlink_locked(self, e: _Entry) -> None:
        self._policy.remove(e)
        self._held -= e.pages
        self._value_bytes -= e.length

    def _sync_ledger_locked(self) -> None:
        """Mark or unmark the ledger's tail so that ``[0, nbytes)`` is what
        the cache has marked evictable."""
        if not self._evictable:
            return
        new, old = self._held, self._marked
        if new == old:
            return
        try:
            if new > old:
                self._mf.mark_evictable(self, EvictableRange(old, new))
            else:
                self._mf.mark_unevictable(self, EvictableRange(new, old))
        except ClosedError:
            pass  # the file's evictions are gone with it
        self._marked = new

    def _resync_ledger_locked(self) -> None:
        if not self._evictable:
            return
        try:
            self._mf.mark_all_unevictable(self)
            if self._held:
                self._mf.mark_evictable(self, EvictableRange(0, self._held))
        except ClosedError:
            pass
        self._marked = self._held

    def _free(self, victims: list[_Entry]) -> None:
        """Drop the cache's reference on each victim's pages (no lock
        held).  After the file's close there is nothing to give back."""
        mf = self._mf
        for v in victims:
            if v.fr is not None:
                try:
                    mf.dec_ref(v.fr)
                except ClosedError:
                    return

    def _unpin(self, view: memoryview | None, fr: FileRange | None) -> None:
        """A reader is done: release its view and drop its pin; keep the
        pin for later if the view is still exported.  Never raises."""
        if view is not None:
            try:
                view.release()
            except BufferError:
                with self._lock:
                    self._lingering.append((view, fr))
                return
        with self._lock:
            self._pinned -= 1
        if fr is not None:
            with contextlib.suppress(ClosedError):
                self._mf.dec_ref(fr)

    def _drain(self) -> None:
        """Drop the pins of handles collected without an exit, and retry
        views whose release failed (no lock held)."""
        orphans = self._orphans
        if not orphans and not self._lingering:
            return
        with self._lock:
            todo, self._lingering = self._lingering, []
        while True:
            try:
                # pop() is atomic: two threads draining never take the same pin.
                todo.append(orphans.pop())
            except IndexError:
                break
        for view, fr in todo:
            self._unpin(view, fr)
