"""MemoryFile: the allocation state machine.

Lock order (outermost first)
----------------------------
``MemoryFile._mu`` (a ``threading.Lock``), then ``FileMapping``'s lock, then
``MemoryAccounting``'s lock.  ``_mu`` guards every field below the line
"guarded by _mu"; it is held only for bookkeeping, never across a syscall
that can take long (a punch, a scan, an mmap) and never across an ``await``.

The model
---------
Every page of the file is in exactly one of four states:

- *clean*: not allocated and not committed (a gap in ``_usage`` and in
  ``_waste``).  The kernel gives zeros for it.
- *live*: allocated, one or more references (a segment of ``_usage`` with
  ``refs >= 1``).
- *waste*: freed (its references reached zero) but not yet returned to the
  kernel, so it may still hold old bytes and memory (a segment of
  ``_waste``; a gap of ``_usage``).
- *releasing*: waste that the releaser (or a ``decommit``) is punching right
  now (a segment of ``_usage`` with ``refs == 0``): it may be neither
  recycled nor handed out until the punch is over.

The reference (gVisor's pgalloc of 2020) keeps freed pages in its usage set
until they are released, so they are never handed out before the hole punch.
We keep them in a separate set instead, so that first fit over ``_usage``'s
gaps sees clean and waste pages alike, and an allocation that lands on waste
*recycles* it: the pages are zeroed by hand (memset on the mapping, about
20 us per resident MiB) instead of being punched (5 us per call) and then
faulted back in by the user's first write (3.6 us per 4 KiB page here).
Freed pages not known to be committed are first asked about with one
SEEK_DATA, so pages that were never touched are not faulted in only to be
zeroed.
Later gVisor did the same for the same reason.  Recycling also keeps a loop
of allocate / write / free with no ``await`` in it bounded: the releaser
cannot run inside such a loop, but the next allocation reuses the pages the
last one freed.

Large allocations (over ``recycle_max_bytes``) prefer clean pages while the
file has room for them, since zeroing megabytes on the caller's thread costs
more than a user may expect of a synchronous call, and clean pages cost
nothing until touched.  They recycle only when the alternative is to grow
the file.

Accounting
----------
``_known_committed`` is the number of bytes the allocator knows to be
committed: live pages a usage scan found resident (or that recycling
zeroed), and waste pages that were known committed when freed.  The same
bytes are counted per kind in ``accounting`` (waste as ``SYSTEM``).
``update_usage`` skips its scan when fstat's block count equals it.

The file's fds and mappings outlive no call that uses them
---------------------------------------------------------
Closing a file descriptor frees its number, and the next ``open`` anywhere
in the process takes it: a syscall made with a stale number lands in an
unrelated file (a punch there destroys its data).  Every call that uses the
memfd, the scan fd or the mappings outside ``_mu`` therefore holds an *I/O
lease*, taken under ``_mu`` while the file is open (``_io_users``).  Closing
marks the file closed at once, so every later call raises ``ClosedError``,
but the fds are closed and the file unmapped only when the last lease is
returned.  A call whose lease outlived the close finishes its syscalls on
the still-open fds and then raises ``ClosedError``.

Checkpoints
-----------
``save`` writes the books (file size, live segments with kind and refs) and
the non-zero committed live pages; ``load_memory_file`` restores them into a
fresh memfd.  Both live in ``aiopgalloc.checkpoint``, which describes the
format; the method here only forwards.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import anyio.lowlevel

from . import fill, placement, reclaim, usage_scan
from .arguments import MAX_OFFSET, PAGE_MASK, check_kind, check_length, check_range, range_bounds
from .errors import ClosedError, RefCountError
from .host import memfd, syscalls
from .host.mapping import FileMapping
from .options import AccessType, CommitMode, MemoryFileOpts
from .ranges import HUGE_PAGE_SIZE, PAGE_SIZE, EvictableRange, FileRange
from .segments import SegmentSet
from .stats import FileStats, take_stats
from .usage import RELEASING, MemoryAccounting, MemoryKind, UsageInfo, usage_mergeable

if TYPE_CHECKING:
    from .checkpoint import PathType, Progress, Writable
    from .eviction import EvictableMemoryUser, Evictions

__all__ = ["MemoryFile"]

log = logging.getLogger("aiopgalloc")

_SYSTEM = MemoryKind.SYSTEM
_PUNCH_LOG = 8192  # punched ranges remembered for racing usage scans
_RELEASE_RUN = reclaim.RUN_BYTES
_READY_MAX = 1 << 16  # bounds _ready when the releaser cannot run
# The whole file must be mappable (user space is 2**47 bytes on x86-64), and
# the chunk table must stay small: refuse to grow past this.
_MAX_FILE_SIZE = 1 << 47


# How pages found past the file's end (grown by someone else) are freed:
# not known committed, counted nowhere.
_FOREIGN = UsageInfo(MemoryKind.SYSTEM, False, 0)


def _is_last_ref(v: UsageInfo) -> bool:
    return v.refs == 1


class MemoryFile:
    """A memfd whose pages are handed out as reference-counted ranges.

    Made by ``open_memory_file`` (or ``load_memory_file``), which also runs
    its background tasks; do not construct it directly.  The synchronous
    methods (``allocate``, ``inc_ref``, ``dec_ref``, ``map_internal``,
    ``mark_*``) never wait on I/O and are thread-safe.  Every method raises
    ``ClosedError`` once the file's ``async with`` block has ended.
    """

    def __init__(self, fd: int, opts: MemoryFileOpts, *, sealed: bool) -> None:
        """Internal: take over ``fd`` (already truncated to one chunk)."""
        self.opts = opts
        chunk = opts.chunk_size
        self._fd = fd
        self._chunk_size = chunk
        self._sealed = sealed
        self._mappings = FileMapping(fd, chunk)
        self._mappings.set_file_size(chunk)
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # A private read-only description for SEEK_DATA probes, so probing
        # never moves the offset of the fd users see.
        self._scan_fd = memfd.reopen(fd, True)
        self._limiter = anyio.CapacityLimiter(2)
        self.accounting = MemoryAccounting()
        """Committed bytes per kind, as last observed (see ``update_usage``)."""
        self._mu = threading.Lock()
        # ---- guarded by _mu
        self._closed = False
        self._file_size = chunk
        self._max_end = (MAX_OFFSET // chunk) * chunk
        # Releasing segments never merge: each belongs to one batch, which
        # removes exactly the segments it inserted.
        self._usage: SegmentSet[UsageInfo] = SegmentSet(
            usage_mergeable, max_key=self._max_end, granularity=PAGE_SIZE
        )
        self._waste: SegmentSet[bool] = SegmentSet(max_key=self._max_end)
        self._releasing = 0  # bytes in releasing segments
        self._releasing_committed = 0  # of which known committed (still SYSTEM)
        self._known_committed = 0
        self._commit_seq = 0  # bumped whenever pages are punched out
        # (seq, start, end) of recent punches, so a usage scan that raced with
        # them can drop just those pages instead of starting over.
        self._punched: collections.deque[tuple[int, int, int]] = collections.deque()
        self._punched_dropped = 0  # the highest seq no longer in _punched
        self._wake_pending = False
        # Starts of freed ranges that merged with other waste (or are long on
        # their own): where the releaser looks for runs worth punching now.
        self._ready: list[int] = []
        self._ready_overflow = False  # _ready filled up: scan all waste instead
        self._flush = False  # someone waits for all waste to go (wait_for_reclaim)
        self._evictions: Evictions | None = None  # set by the lifecycle code
        # Counters for stats().
        self.releases = 0
        self.bytes_released = 0
        self.recycled_bytes = 0
        self.allocations = 0
        self._pressure_counts: dict[int, int] = {}  # level -> notifications
        self._io_users = 0  # I/O leases out (see the module notes)
        self._close_fd = True  # whether closing closes _fd (not a caller's fd on failed open)
        # ---- set by the lifecycle code (open_memory_file)
        # Set once at open, for stats(): the pressure source's name ("" for
        # none) and, when there is none, why.
        self._pressure_choice: tuple[str, str] = ("", "")
        self._on_progress: Callable[[], None] = lambda: None
        self._progress_event: anyio.Event

    # ------------------------------------------------------------ properties

    @property
    def fd(self) -> int:
        """The memfd (owned by this object; do not close it).  Raises
        ``ClosedError`` after close."""
        if self._closed:
            raise ClosedError("memory file is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        """Whether the file's ``async with`` block has ended."""
        return self._closed

    def _note_punched_locked(self, ranges: list[tuple[int, int]]) -> None:
        """Record that ``ranges`` are (being) punched: bump the sequence
        number usage scans check.  Precondition: _mu held."""
        self._commit_seq += 1
        seq = self._commit_seq
        log_ = self._punched
        for s, e in ranges:
            if len(log_) >= _PUNCH_LOG:
                self._punched_dropped = log_.popleft()[0]
            log_.append((seq, s, e))

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("memory file is closed")

    def _lease_locked(self) -> None:
        """Take an I/O lease: the fds and mappings stay open until the
        matching ``_unlease``.  Precondition: _mu held, the file open."""
        self._io_users += 1

    def _unlease(self) -> None:
        """Return an I/O lease; the last one returned after close closes
        the fds and unmaps (outside the lock: the final close of a memfd
        frees all its pages).  Any thread."""
        with self._mu:
            self._io_users -= 1
            last = self._closed and self._io_users == 0
        if last:
            self._close_resources()

    @contextlib.contextmanager
    def _io(self) -> Iterator[None]:
        """An I/O lease for the body; raises ``ClosedError`` if the file is
        closed.  For calls that make one syscall outside the lock."""
        with self._mu:
            self._check_open()
            self._io_users += 1
        try:
            yield
        finally:
            self._unlease()

    def total_size(self) -> int:
        """The file's size in bytes (a whole number of chunks; it only grows)."""
        self._check_open()
        return self._file_size

    def total_usage(self) -> int:
        """Bytes the kernel holds for the file (fstat blocks x 512), pages
        swapped out included.  Cost: one fstat.  Raises ``ClosedError``."""
        with self._io():
            return syscalls.fstat_blocks_bytes(self._fd)

    # ------------------------------------------------------------ allocation

    def allocate(
        self,
        length: int,
        kind: MemoryKind = MemoryKind.ANONYMOUS,
        *,
        commit: CommitMode = CommitMode.NONE,
    ) -> FileRange:
        """Allocate ``length`` bytes of zeroed pages with one reference.

        First fit, bottom-up: the lowest address where the range fits, among
        clean pages and freed pages not yet released (these are zeroed by
        hand: "recycled").  Requests of ``HUGE_PAGE_SIZE`` or more are aligned
        to ``HUGE_PAGE_SIZE``.  Requests over ``opts.recycle_max_bytes`` skip
        freed pages while the file has clean room for them.  The file grows by
        whole chunks as needed (one ftruncate).  ``commit`` chooses whether
        the pages are committed up front (see ``CommitMode``).

        Cost: O(log n) in the number of segments, plus zeroing recycled pages
        (about 20 us per resident MiB), plus committing when asked.

        Raises ``TypeError`` (length not an int, kind not a MemoryKind),
        ``ValueError`` (length zero, negative or not page-aligned),
        ``OSError(ENOMEM)`` when the range would end past the largest file
        offset, ``OSError`` when the file cannot grow or the pages cannot be
        committed (nothing is allocated then), ``ClosedError``.
        """
        length = check_length(length)
        kind = check_kind(kind)
        if not isinstance(commit, CommitMode):
            raise TypeError(f"commit must be a CommitMode, got {type(commit).__name__}")
        align = HUGE_PAGE_SIZE if length >= HUGE_PAGE_SIZE else PAGE_SIZE
        with self._mu:
            self._check_open()
            start, pieces = placement.find_range_locked(self, length, align)
            end = start + length
            tries = 0
            while end > self._file_size:
                if not self._grow_locked(end):
                    break
                # Pages someone else wrote past our end became freed pages:
                # the range must be chosen again.
                tries += 1
                if tries > 3:
                    raise OSError(errno.EBUSY, "another holder of the fd keeps growing the file")
                start, pieces = placement.find_range_locked(self, length, align)
                end = start + length
            recycled = placement.take_waste_locked(self, start, end, pieces, kind)
            self.allocations += 1
            if not recycled and commit is CommitMode.NONE:
                return FileRange(start, end)
            self._lease_locked()
        try:
            if recycled:
                placement.zero_recycled(self, recycled)
            if commit is not CommitMode.NONE:
                placement.commit_pages(self, start, end, kind, commit)
        except BaseException:
            if commit is not CommitMode.NONE:
                # A failed commit may have committed part of the clean
                # pages: punch them back out so they are clean again.
                placement.punch_clean(self, start, end, recycled)
            placement.undo_allocation(self, start, end, recycled, kind)
            self._unlease()
            raise
        self._unlease()
        if self._closed:
            # Closed while the pages were being zeroed or committed: the
            # range belongs to a file that is gone.
            raise ClosedError("memory file closed during allocate")
        return FileRange(start, end)

    def _grow_locked(self, end: int) -> bool:
        """Grow the file to cover ``end`` (whole chunks).  Precondition: _mu
        held.  Returns whether pages written past our end by someone else
        were taken in as freed pages (the caller's placement is then
        stale).  Raises OSError from fstat or ftruncate with nothing changed.

        Someone holding the fd (``mf.fd``, a read-write share) may have
        grown the file behind our back.  Truncating a file sealed against
        shrinking to less than its real size fails (EPERM) for good, so the
        real size is read first and adopted (rounded up to whole chunks)
        when it is larger.  Cost: one fstat and one ftruncate, once per
        growth."""
        chunk = self._chunk_size
        new_size = (end + chunk - 1) // chunk * chunk
        real = memfd.file_size(self._fd)
        if real > new_size:
            new_size = (real + chunk - 1) // chunk * chunk
        if new_size > _MAX_FILE_SIZE:
            # Checked before ftruncate: a sealed file cannot be shrunk back.
            raise OSError(errno.ENOMEM, f"memory file cannot grow to {new_size:#x} bytes")
        if new_size != real:
            memfd.truncate(self._fd, new_size)
        old_size = self._file_size
        self._mappings.set_file_size(new_size)
        self._file_size = new_size
        if real > old_size:
            # Whatever was written past our end may not be zero: book those
            # pages as freed (not known committed), so an allocation landing
            # there zeroes them and the releaser punches them out.
            self._free_locked(old_size, (real + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1), _FOREIGN)
            self._wake_releaser_locked()
            return True
        return False

    # ------------------------------------------------------------ references

    def _check_live_locked(self, start: int, end: int, what: str) -> None:
        """Raise RefCountError unless live segments cover [start, end)."""
        cur = start
        for s, e, v in self._usage.segments(start, end):
            if s > cur:
                break
            if v.refs == 0:
                raise RefCountError(
                    f"{what}: pages {FileRange(max(s, start), min(e, end))} were freed and "
                    "are being released"
                )
            cur = e
            if cur >= end:
                return
        gap = FileRange(cur, end if cur >= end else min(end, self._next_start(cur, end)))
        freed = self._waste.find(cur) is not None
        raise RefCountError(f"{what}: pages {gap} are {'freed' if freed else 'not allocated'}")

    def _next_start(self, key: int, limit: int) -> int:
        seg = self._usage.lower_bound(key)
        return limit if seg is None else min(limit, seg[0])

    def inc_ref(self, fr: FileRange) -> None:
        """Add one reference to every page of ``fr``.

        ``fr`` may be any page-aligned sub-range of live pages (it may span
        several allocations).  Cost: O(log n + k) for k segments in range.

        Raises ``TypeError``/``ValueError`` for a bad range, ``RefCountError``
        if any page is not allocated or already freed (freed pages are never
        brought back), ``ClosedError``.
        """
        start, end = check_range(fr, "inc_ref")
        with self._mu:
            self._check_open()
            self._check_live_locked(start, end, "inc_ref")
            usage = self._usage
            usage.apply_contiguous(start, end, lambda s, e, v: v._replace(refs=v.refs + 1))
            usage.merge_range(start, end)
            usage.merge_adjacent(start, end)

    def dec_ref(self, fr: FileRange) -> None:
        """Drop one reference from every page of ``fr``.

        Pages whose count reaches zero are freed: they are counted as SYSTEM
        until the releaser returns them to the kernel, and may be recycled by
        a later allocation before that.  Wakes the releaser (from any thread,
        without the event loop), which punches freed runs of 1 MiB or more
        at once and lone shorter ranges once the frees pause (see
        ``aiopgalloc.reclaim``).  Cost: O(log n + k); about 4 us for one
        page on these machines, nearly all of it in the segment sets.

        Raises ``TypeError``/``ValueError`` for a bad range, ``RefCountError``
        if any page is not allocated or has no references (a double free),
        ``ClosedError``.  Nothing changes when it raises.
        """
        # The common argument (a FileRange of two good ints) is checked
        # inline; anything else takes the full check and its exact errors.
        if type(fr) is FileRange:
            start, end = fr
            if (
                type(start) is not int
                or type(end) is not int
                or start < 0
                or end <= start
                or (start | end) & PAGE_MASK
                or end > MAX_OFFSET
            ):
                start, end = check_range(fr, "dec_ref")
        else:
            start, end = check_range(fr, "dec_ref")
        with self._mu:
            if self._closed:
                raise ClosedError("memory file is closed")
            usage = self._usage
            v = usage.carve_if(start, end, _is_last_ref)
            if v is not None:
                # Common case: one segment held it all and it is freed.
                # (_free_locked, inlined: this runs once per page freed.)
                c = v.known_committed
                if c and v.kind != _SYSTEM:
                    self.accounting._move_unchecked(end - start, _SYSTEM, v.kind)
                waste = self._waste
                n = len(waste)
                waste.add(start, end, c)
                if len(waste) <= n or end - start >= _RELEASE_RUN:
                    ready = self._ready
                    if len(ready) < _READY_MAX:
                        ready.append(start)
                    else:
                        self._ready_overflow = True
            else:
                self._check_live_locked(start, end, "dec_ref")
                usage.isolate(start, end)
                freed: list[tuple[int, int, UsageInfo]] = []
                for s, e, v in list(usage.segments(start, end)):
                    if v.refs == 1:
                        freed.append((s, e, v))
                    else:
                        usage.set_value(s, v._replace(refs=v.refs - 1))
                for s, e, v in freed:
                    usage.remove(s)
                    self._free_locked(s, e, v)
                usage.merge_range(start, end)
                usage.merge_adjacent(start, end)
            if not self._wake_pending:
                self._wake_pending = True
                os.eventfd_write(self._wake_fd, 1)

    def _free_locked(self, start: int, end: int, v: UsageInfo) -> None:
        """Move freed pages [start, end) (already out of _usage) to waste.
        Note them for the releaser when they join other waste or are long
        enough to punch at once (see ``reclaim``: lone short frees wait)."""
        if v.known_committed and v.kind != _SYSTEM:
            self.accounting._move_unchecked(end - start, _SYSTEM, v.kind)
        waste = self._waste
        n = len(waste)
        waste.add(start, end, v.known_committed)
        if len(waste) <= n or end - start >= _RELEASE_RUN:
            self._note_ready_locked(start)

    def _note_ready_locked(self, start: int) -> None:
        ready = self._ready
        if len(ready) < _READY_MAX:
            ready.append(start)
        else:
            # No releaser pass for a long while (a loop without await): stop
            # noting; the releaser scans the whole waste set once instead.
            self._ready_overflow = True

    def _release_all_soon(self) -> None:
        """Have the releaser take all waste on its next pass, lone short
        ranges included (which otherwise wait for the frees to pause; see
        ``aiopgalloc.reclaim``).  For host memory pressure: freed memory
        should go back to the kernel at once.  Any thread; O(1)."""
        with self._mu:
            self._flush_locked()

    def _flush_locked(self) -> None:
        """Wake the releaser to take all waste, not just the long runs."""
        if self._waste:
            self._flush = True
            self._wake_releaser_locked()

    def _wake_releaser_locked(self) -> None:
        if not self._wake_pending and not self._closed:
            self._wake_pending = True
            os.eventfd_write(self._wake_fd, 1)

    def _wake_releaser(self) -> None:
        with self._mu:
            self._wake_releaser_locked()

    # --------------------------------------------------------------- mapping

    def map_internal(
        self, fr: FileRange, at: AccessType = AccessType.READ_WRITE
    ) -> list[memoryview]:
        """Memoryviews that together cover exactly ``fr``, one per chunk.

        The pages need not be allocated (as in the reference).  ``READ`` gives
        read-only views; ``WRITE`` or ``READ_WRITE`` writable ones.  Views stay
        valid until dropped, even past the file's close.  Cost: about 1 us per
        chunk crossed, plus one mmap the first time a chunk is used.

        Raises ``TypeError`` for a non-range or a non-``AccessType``,
        ``ValueError`` for an empty or ill-formed range or one past the end of
        the file (touching it would kill the process with SIGBUS),
        ``PermissionError`` for ``EXECUTE``, ``OSError`` if mmap fails,
        ``ClosedError``.
        """
        if not isinstance(at, AccessType):
            raise TypeError(f"at must be an AccessType, got {type(at).__name__}")
        start, end = range_bounds(fr, "map_internal")
        if at is not AccessType.READ_WRITE and at & AccessType.EXECUTE:
            raise PermissionError(errno.EACCES, "execute access to the memory file is refused")
        self._check_open()
        if end > self._file_size:
            raise ValueError(
                f"map_internal: range {fr!r} is past the end of the file "
                f"({self._file_size:#x} bytes)"
            )
        try:
            writable = at is AccessType.READ_WRITE or bool(at & AccessType.WRITE)
            return self._mappings.views(start, end - start, writable)
        except ValueError:
            self._check_open()
            raise

    # --------------------------------------------------------- async calls

    async def decommit(self, fr: FileRange) -> None:
        """Return the memory behind ``fr`` to the kernel; the pages then read
        as zero.  They stay allocated (with or without references; freed
        pages in ``fr`` are released on the way).

        A punch-hole fallocate, in a worker thread unless the range is small;
        if it fails the pages are zeroed by hand instead (the reference's
        fallback: the contents are gone, the memory is not).

        Raises ``TypeError``/``ValueError`` for a bad range, ``RefCountError``
        if any page is not allocated, ``ClosedError``.
        """
        start, end = check_range(fr, "decommit")
        await reclaim.decommit(self, start, end)

    async def update_usage(self) -> None:
        """Bring ``accounting`` up to date with what the kernel holds.

        Skipped (one fstat, about 2 us) when the file's block count equals
        the bytes already known to be committed.  Otherwise the live ranges
        not yet known committed are scanned (mincore) in a worker thread,
        without the lock; a scan that raced with a punch is redone.
        Freed pages are not scanned (assumed uncommitted, as in the
        reference).  See ``aiopgalloc.usage_scan``.

        Raises ``OSError`` from the scan, ``ClosedError``.
        """
        self._check_open()
        await usage_scan.update_usage(self)

    async def allocate_and_fill(self, length: int, kind: MemoryKind, reader: object) -> FileRange:
        """Allocate ``length`` bytes and fill them from ``reader``.

        ``reader`` is an object with ``readinto(buffer)`` (a file object: its
        reads run in a worker thread, 8 MiB at a time, except for
        ``io.BytesIO``, read inline) or an anyio ``ByteReceiveStream``.  At end
        of input before ``length`` bytes, the whole pages filled so far are
        kept and returned (a shorter range; the rest is freed).  If not even
        one page was filled, everything is freed and ``EOFError`` raised.  If
        the reader raises (or the call is cancelled), everything is freed and
        the error propagates.

        Raises what ``allocate`` raises, ``TypeError`` for a reader of
        neither kind, ``EOFError``, ``BlockingIOError`` for a non-blocking
        reader without data, and the reader's own errors.
        """
        return await fill.allocate_and_fill(self, length, kind, reader)

    async def save(
        self,
        target: PathType | Writable,
        progress: Progress | None = None,
        *,
        fsync: bool = True,
    ) -> int:
        """Write a checkpoint of the file to ``target``; return its size in bytes.

        ``target`` is a path (written beside it and renamed over it, so it is
        replaced whole or not at all; flushed to disk first unless ``fsync``
        is False) or a blocking binary stream with ``write()`` (called from
        worker threads).  Saved: the file size, every live segment with its
        kind and refs, and the bytes of the committed live pages that are not
        all zero.  Freed pages are free and not saved.  ``progress(done,
        total)`` is called on the event loop in committed bytes examined;
        ``done`` grows to ``total``.  Load it with ``load_memory_file``.

        Do not write into live pages during the save (a page written
        meanwhile is saved as its old or its new bytes); allocating or
        freeing meanwhile makes the save fail.

        Cost: O(segments) under the lock, a mincore scan of the live pages
        (about 11 ms per GiB), then reading and writing the committed bytes
        in worker threads (a few hundred MiB/s here; see
        ``benchmarks/bench_checkpoint.py``).

        Raises ``TypeError`` for a bad target or progress, ``RuntimeError``
        while evictions are pending (call ``start_evictions()`` and
        ``wait_for_evictions()`` first, as the reference requires) or if the
        allocations changed during the save, ``ClosedError``, ``OSError``.
        """
        # Imported here: checkpoint imports the lifecycle code, which
        # imports this module.
        from .checkpoint import save

        return await save(self, target, progress, fsync=fsync)

    async def wait_for_reclaim(self) -> None:
        """Return once no freed page waits to be returned to the kernel.

        Wakes the releaser if needed.  Raises ``ClosedError`` if the file is
        closed.
        """
        while True:
            event = self._progress_event
            with self._mu:
                self._check_open()
                if not self._waste and self._releasing == 0:
                    return
                self._flush_locked()
            await event.wait()

    def reclaim_pending(self) -> int:
        """Bytes freed but not yet returned to the kernel (waiting, or being
        released right now).  O(1).  Raises ``ClosedError``."""
        with self._mu:
            self._check_open()
            return self._waste.total_length + self._releasing

    def stats(self) -> FileStats:
        """One frozen snapshot of the allocator's figures (see ``FileStats``).

        Cost: one fstat and one pass over the usage set, O(segments).
        Raises ``ClosedError``.
        """
        return take_stats(self)

    def share(self, readonly: bool = True) -> int:
        """A new fd of the same file, for another process (pass it over a
        Unix socket, or with ``pass_fds``).  The caller owns and closes it.
        The fd is close-on-exec.

        ``readonly=True`` opens the file again ``O_RDONLY``; a memfd this
        library created is mode 0444 and sealed against shrinking and
        against new seals.  That stops a holder that runs under another uid
        than the file's owner (the uid this process had when it opened the
        file) and has none of CAP_DAC_OVERRIDE, CAP_FOWNER, or
        CAP_SYS_PTRACE over this process: it can read, but every route to
        write into the pages or grow the file is refused (write calls,
        fallocate, shared writable mappings, mprotect, seals, reopening
        ``/proc/<pid>/fd/N`` read-write, ``/proc/<pid>/mem``,
        ``pidfd_getfd``).  It does not stop root, nor such a capability:
        CAP_DAC_OVERRIDE reopens the fd read-write, CAP_FOWNER (or running
        as the file's owner uid) chmods the file back and reopens it, and
        CAP_SYS_PTRACE (or the same uid, where Yama allows ptrace) takes
        this process's read-write fd; any of them can then write into live
        pages and grow the file.  Hand read-only shares to processes of
        another, unprivileged uid.  ``F_SEAL_FUTURE_WRITE`` would stop root
        as well, but it also refuses the allocator's own hole punching and
        ``MADV_REMOVE`` and any new writable mapping, so it is not used.
        ``tests/test_share_privileges.py`` proves each of these.  A file
        passed in as ``open_memory_file(file=...)`` keeps its own mode and
        seals, which decide instead.

        No fd, read-write ones included, can shrink a memfd this library
        created.  Raises ``OSError``, ``ClosedError``.
        """
        with self._io():
            return memfd.reopen(self._fd, readonly)

    # -------------------------------------------------------------- eviction

    def _ev(self) -> Evictions:
        self._check_open()
        ev = self._evictions
        if ev is None:
            raise ClosedError("memory file is not open")
        return ev

    def mark_evictable(self, user: EvictableMemoryUser, er: EvictableRange) -> None:
        """Allow the file to ask ``user`` to give back ``er`` under pressure
        (by calling ``await user.evict(er)`` later).  Marking an already
        evictable range changes nothing; touching ranges merge.  Thread-safe.

        Raises ``TypeError`` for a non-``EvictableRange`` or a user without an
        async ``evict``, ``ValueError`` for an empty, negative or ill-formed
        range, ``ClosedError``.  Nothing changes when it raises.
        """
        self._ev().mark_evictable(user, er)

    def mark_unevictable(self, user: EvictableMemoryUser, er: EvictableRange) -> None:
        """Withdraw ``er`` (or part of it) from eviction.  An ``evict`` already
        in flight for it may still run once: users must tolerate that.
        Thread-safe.  Raises ``TypeError``/``ValueError``, ``ClosedError``."""
        self._ev().mark_unevictable(user, er)

    def mark_all_unevictable(self, user: EvictableMemoryUser) -> None:
        """Withdraw every range of ``user`` from eviction.  Thread-safe.
        Raises ``TypeError`` for a user without an async ``evict``,
        ``ClosedError``."""
        self._ev().mark_all_unevictable(user)

    def should_cache_evictable(self) -> bool:
        """Whether eviction is really delayed (``MANUAL``, or driven by host
        pressure), so that caching in evictable memory may pay off."""
        return self._ev().should_cache_evictable()

    def start_evictions(self) -> None:
        """Ask every evictable user to give back all its evictable ranges (does
        not wait).  Thread-safe.  Raises ``ClosedError``."""
        self._ev().start_evictions()

    async def wait_for_evictions(self, timeout: float | None = None) -> bool:
        """Wait until every eviction started so far has finished (queued ones
        included).  Returns False if ``timeout`` seconds passed first, else
        True.  Raises ``TypeError``/``ValueError`` for a bad timeout,
        ``RuntimeError`` when called from an ``evict``, ``ClosedError``."""
        return await self._ev().wait_for_evictions(timeout)

    # ------------------------------------------------------------- closing

    def _close(self, close_fd: bool = True) -> None:
        """Close the file (the lifecycle code calls it after the task group
        ended).  Every later call raises ``ClosedError``; the fds are closed
        and the file unmapped now, or when the last I/O lease still out is
        returned.  Views from map_internal stay valid until dropped.  With
        ``close_fd=False`` (opening failed) the caller's fd is left open."""
        with self._mu:
            if self._closed:
                return
            self._closed = True
            self._close_fd = close_fd
            last = self._io_users == 0
        if last:
            self._close_resources()
        # Callers waiting in wait_for_reclaim() wake, see the file closed and
        # raise ClosedError instead of waiting for a releaser that is gone.
        self._on_progress()

    def _close_resources(self) -> None:
        """Unmap and close the fds.  Runs once: closed, and no lease out."""
        busy = self._mappings.close()
        if busy:
            log.warning(
                "memory file closed while memoryviews of %d mapping(s) are still alive; "
                "those mappings are released when the views are dropped",
                busy,
            )
        fds = [self._wake_fd, self._scan_fd]
        if self._close_fd:
            fds.append(self._fd)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    # ----------------------------------------------------------- diagnostics

    def __str__(self) -> str:
        """The usage set, one segment per line, then the freed ranges.  A
        pure function of the allocator's state."""
        with self._mu:
            lines = [f"[{s:#x}, {e:#x}) {v!r}" for s, e, v in self._usage]
            lines += [
                f"[{s:#x}, {e:#x}) freed {'committed' if c else 'uncommitted'}"
                for s, e, c in self._waste
            ]
        return "\n".join(lines) if lines else "(empty)"

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<MemoryFile {state} size={self._file_size:#x}>"

    def check_invariants(self) -> None:
        """Verify the allocator's invariants; raise AssertionError naming the
        first one broken.  O(n): for tests, after every step.

        The usage and waste sets are sorted, disjoint, maximally merged and
        their gap indexes agree with them; refs >= 0 and refs == 0 only for
        releasing pages; usage and waste do not overlap; the file size covers
        every segment and is a whole number of chunks; the accounting per
        kind equals the known-committed bytes per kind; the evictable sets
        are disjoint per user.
        """
        with self._mu:
            usage, waste = self._usage, self._waste
            usage.check()
            waste.check()
            assert usage.is_maximally_merged(), "usage set not maximally merged"
            assert waste.is_maximally_merged(), "waste set not maximally merged"
            per_kind = [0] * len(MemoryKind)
            releasing = 0
            for s, e, v in usage:
                assert v.refs >= 0, f"negative refs at {s:#x}"
                if v.refs == 0:
                    assert v == RELEASING, f"freed pages at {s:#x} still in usage: {v!r}"
                    releasing += e - s
                elif v.known_committed:
                    per_kind[v.kind] += e - s
                for ws, _we, _ in waste.segments(s, e):
                    raise AssertionError(f"waste at {ws:#x} overlaps usage [{s:#x}, {e:#x})")
            for _s, e, c in waste:
                if c:
                    per_kind[_SYSTEM] += e - _s
            assert releasing == self._releasing, "releasing byte count stale"
            # Committed pages being punched right now are still known
            # committed (and counted as SYSTEM) until the batch finishes.
            per_kind[_SYSTEM] += self._releasing_committed
            high = max((usage.last() or (0, 0))[1], (waste.last() or (0, 0))[1])
            assert high <= self._file_size, "a segment lies past the end of the file"
            assert self._file_size % self._chunk_size == 0, "file size not whole chunks"
            assert self._mappings.file_size == self._file_size or self._closed
            assert sum(per_kind) == self._known_committed, "known-committed total stale"
            snap = self.accounting.snapshot()
            for k in MemoryKind:
                if k is MemoryKind.MAPPED:
                    continue
                assert snap[k] == per_kind[k], (
                    f"accounting for {k.name}: {snap[k]} != {per_kind[k]} known committed"
                )
        if self._evictions is not None:
            self._evictions.check()
