"""MemoryFile: the allocator's public face, orchestrating its parts.

A ``MemoryFile`` owns, for one memfd:

- the page books (``aiopgalloc._books.PageBooks``): every page's state and
  every decision on it, pure bookkeeping;
- the lock ``_mu`` (a ``threading.Lock``) that serialises the books.  It is
  shared with the releaser, which decides under it too;
- the file handle (``aiopgalloc.host.handle.FileHandle``): the fds and the
  mapping, with leases that keep them open under calls in flight;
- the wake-ups (``aiopgalloc._wakeups.Wakeups``): the releaser's eventfd and
  the progress event;
- the evictions (``aiopgalloc.eviction.Evictions``), which own their state.

Every call has the same shape (httpcore's connection pool is the model):
check the arguments; decide with the books under ``_mu`` (the decision comes
back as data: the pages to zero, to punch, to scan); do the system calls
outside the lock, holding a lease on the handle; settle with the books under
``_mu``.  ``_mu`` is never held across a system call that can take long (a
punch, a scan, an mmap) nor across an ``await``; growing the file (one
fstat and one ftruncate, a few microseconds, once per chunk) is the one
syscall made under it, so the books and the file's size never disagree.

Lock order (outermost first): ``_mu``, then the handle's lock, then the
wake-ups' lock.  ``Evictions`` has its own lock, never nested with these.

Recycling
---------
Freed pages stay in the books as waste until the releaser punches them out,
and first fit sees them as free.  An allocation landing on waste zeroes it
by hand: on resident pages a memset costs less than a punch plus the
page faults the user's first writes would take on fresh pages.  Waste not
known to be committed is first probed with one ``SEEK_DATA`` (cheap: on
shmem it skips holes without walking them), so pages never touched are not
faulted in only to be zeroed.  Recycling is also what keeps a loop of
allocate / write / free with no ``await`` in it bounded: the releaser cannot
run inside such a loop, but each allocation reuses what the last one freed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from types import EllipsisType
from typing import TYPE_CHECKING, overload

import anyio
import anyio.lowlevel

from . import checkpoint, fill
from ._books import Piece, Placement
from .arguments import MAX_OFFSET, PAGE_MASK, check_kind, check_length, check_range, range_bounds
from .errors import ClosedError
from .host import cgroup, memfd, syscalls
from .options import AccessType, CommitMode, MemoryFileOpts
from .ranges import HUGE_PAGE_SIZE, PAGE_SIZE, EvictableRange, FileRange
from .stats import FileStats, PageRun, PressureStatus
from .usage import AccountingView, MemoryKind, MemoryStats

if TYPE_CHECKING:
    from ._books import PageBooks
    from ._wakeups import Wakeups
    from .checkpoint import PathType, Progress, Writable
    from .eviction import EvictableMemoryUser, Evictions
    from .host.handle import FileHandle

__all__ = ["MemoryFile"]

log = logging.getLogger(__name__)

_MAX_FILE_SIZE = 1 << 47
"""The whole file must be mappable (user space is 2**47 bytes on x86-64)."""
_GROW_TRIES = 4

STR_SEGMENTS = 16
"""How many segments (and freed ranges) ``str(mf)`` shows at most."""


class MemoryFile:
    """A memfd whose pages are handed out as reference-counted ranges.

    Made by ``open_memory_file`` (or ``load_memory_file``), which also runs
    its background tasks; do not construct it directly.  The synchronous
    methods (``allocate``, ``inc_ref``, ``dec_ref``, ``map_internal``,
    ``view``, ``mark_*``) never wait on I/O and are thread-safe.  Once the
    file's ``async with`` block has ended every method raises
    ``ClosedError``, except the diagnostics ``closed``, ``str()``,
    ``repr()`` and ``check_invariants()``.
    """

    __slots__ = (
        "__weakref__",
        "_books",
        "_closed",
        "_evictions",
        "_handle",
        "_limiter",
        "_mu",
        "_pressure",
        "_wake",
        "accounting",
        "opts",
    )

    def __init__(
        self,
        *,
        opts: MemoryFileOpts,
        lock: threading.Lock,
        books: PageBooks,
        handle: FileHandle,
        wakeups: Wakeups,
        evictions: Evictions,
        pressure: PressureStatus,
        on_close: contextlib.ExitStack,
    ) -> None:
        """Internal: ``open_memory_file`` builds the parts and this front.
        ``on_close`` is where the file registers its own closing; the
        opener closes the stack when the block ends."""
        self.opts = opts
        """The options the file was opened with (as resolved)."""
        self._mu = lock
        # ---- guarded by _mu
        self._books = books
        self._closed = False
        # ---- own locks
        self._handle = handle
        self._wake = wakeups
        self._evictions = evictions
        self._pressure = pressure
        self._limiter = anyio.CapacityLimiter(2)
        self.accounting = AccountingView(self._accounting)
        """Known-committed bytes per kind (read-only; see ``update_usage``)."""
        on_close.callback(self._mark_closed)

    def _accounting(self) -> MemoryStats:
        # Lock-free by the books' promise: a read never waits behind an
        # allocation.
        return self._books.accounting()

    def _mark_closed(self) -> None:
        with self._mu:
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("memory file is closed")

    @contextlib.contextmanager
    def _io(self) -> Iterator[None]:
        """A lease for one syscall outside the lock; ``ClosedError`` if closed.

        Takes no allocator lock (only the handle's own), so ``fstat``-only
        calls such as ``total_usage`` never wait behind an allocation."""
        self._check_open()
        if not self._handle.try_acquire():
            raise ClosedError("memory file is closed")
        try:
            yield
        finally:
            self._handle.release()

    # ------------------------------------------------------------ properties

    @property
    def fd(self) -> int:
        """The memfd (owned by this object; do not close it).  Raises
        ``ClosedError`` after close."""
        self._check_open()
        return self._handle.fd

    @property
    def closed(self) -> bool:
        """Whether the file's ``async with`` block has ended."""
        return self._closed

    def total_size(self) -> int:
        """The file's size in bytes (a whole number of chunks; it only
        grows).  Raises ``ClosedError``."""
        self._check_open()
        return self._books.file_size

    def total_usage(self) -> int:
        """Bytes the kernel holds for the file (fstat blocks x 512), pages
        swapped out included.  Cost: one fstat.  Raises ``ClosedError``."""
        with self._io():
            return syscalls.fstat_blocks_bytes(self._handle.fd)

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
        whole chunks as needed.  ``commit`` chooses whether the pages are
        committed up front (see ``CommitMode``).

        Cost: O(log n) in the number of segments, plus zeroing recycled pages
        (a memset of the resident ones), plus committing when asked.

        Raises ``TypeError`` (length not an int, kind not a MemoryKind),
        ``ValueError`` (length zero, negative or not page-aligned),
        ``OSError(ENOMEM)`` when the range would end past the largest file
        offset or a committing allocation does not fit the memory cgroup,
        ``OSError`` when the file cannot grow or the pages cannot be
        committed (nothing is allocated then), ``ClosedError``.
        """
        length = check_length(length)
        kind = check_kind(kind)
        if not isinstance(commit, CommitMode):
            raise TypeError(f"commit must be a CommitMode, got {type(commit).__name__}")
        align = HUGE_PAGE_SIZE if length >= HUGE_PAGE_SIZE else PAGE_SIZE
        books = self._books
        with self._mu:
            self._check_open()
            p = books.plan_placement(length, align)
            if p.end > books.file_size:
                p = self._grow_locked(p, length, align)
            recycled = books.place(p, kind)
            if not recycled and commit is CommitMode.NONE:
                return FileRange(p.start, p.end)
            self._handle.acquire()
        try:
            if recycled:
                self._zero_recycled(recycled)
            if commit is not CommitMode.NONE:
                self._commit(p.start, p.end, commit)
                with self._mu:
                    books.mark_committed(p.start, p.end, kind)
        except BaseException:
            if commit is not CommitMode.NONE:
                # A failed commit may have committed part of the clean pages:
                # punch them back out so they are clean again.
                self._punch_clean(p, recycled)
            with self._mu:
                books.undo_placement(p.start, p.end, recycled, kind)
                if books.has_waste:
                    self._wake.wake()
            self._handle.release()
            raise
        self._handle.release()
        if self._closed:
            # Closed while the pages were zeroed or committed: the range
            # belongs to a file that is gone.
            raise ClosedError("memory file closed during allocate")
        return FileRange(p.start, p.end)

    def _grow_locked(self, p: Placement, length: int, align: int) -> Placement:
        """Grow the file to hold placement ``p``; return the placement to
        book (planned again when pages found past the old end joined the
        books).  Precondition: _mu held.  Raises ``OSError`` from fstat or
        ftruncate, with nothing changed.

        Someone holding the fd (``mf.fd``, a read-write share) may have
        grown the file behind our back.  Truncating a file sealed against
        shrinking below its real size fails (EPERM) for good, so the real
        size is read first and adopted, rounded up to whole chunks; what
        was written past our end is booked as freed pages (see the books'
        ``grow``)."""
        books, handle = self._books, self._handle
        chunk = self.opts.chunk_size
        for _ in range(_GROW_TRIES):
            new_size = (p.end + chunk - 1) // chunk * chunk
            real = memfd.file_size(handle.fd)
            if real > new_size:
                new_size = (real + chunk - 1) // chunk * chunk
            if new_size > _MAX_FILE_SIZE:
                # Checked before ftruncate: a sealed file cannot shrink back.
                raise OSError(errno.ENOMEM, f"memory file cannot grow to {new_size:#x} bytes")
            if new_size != real:
                memfd.truncate(handle.fd, new_size)
            handle.mapping.set_file_size(new_size)
            if not books.grow(new_size, foreign_end=real if real > books.file_size else 0):
                return p
            self._wake.wake()
            p = books.plan_placement(length, align)
            if p.end <= books.file_size:
                return p
        raise OSError(errno.EBUSY, "another holder of the fd keeps growing the file")

    def _zero_recycled(self, recycled: list[Piece]) -> None:
        """Zero recycled pages (outside the lock, leased).  Pages known
        committed are memset; for the others one SEEK_DATA finds the first
        page holding data, and the holes before it already read as zero.
        (SEEK_HOLE would walk the data run to its end, however far past the
        range that is.)"""
        handle = self._handle
        zero = handle.mapping.zero
        for s, e, known in recycled:
            if not known:
                d = syscalls.seek_data(handle.scan_fd, s)
                if d is None or d >= e:
                    continue
                s = d
            zero(s, e - s)

    def _commit(self, start: int, end: int, mode: CommitMode) -> None:
        """Commit fresh pages (outside the lock, leased), in steps that check
        the memory cgroup's headroom (see ``cgroup.commit_in_steps``)."""
        step: Callable[[int, int], None]
        if mode is CommitMode.FALLOCATE:
            step = functools.partial(syscalls.commit, self._handle.fd)
        else:
            step = self._handle.mapping.populate
        cgroup.commit_in_steps(start, end - start, step)

    def _punch_clean(self, p: Placement, recycled: list[Piece]) -> None:
        """Punch the clean (not recycled) pages of ``p`` back out after a
        failed commit may have committed some.  Logs what fails."""
        clean: list[tuple[int, int]] = []
        cur = p.start
        for s, e, _ in recycled:
            if cur < s:
                clean.append((cur, s))
            cur = e
        if cur < p.end:
            clean.append((cur, p.end))
        for s, e, err in syscalls.punch_holes(self._handle.fd, clean):
            log.warning("could not punch %s after a failed commit: %s", FileRange(s, e), err)

    # ------------------------------------------------------------ references

    def has_unique_ref(self, fr: FileRange) -> bool:
        """Whether every page of ``fr`` has exactly one reference: the
        caller's, so it may change the bytes in place (copy-on-write: else
        copy them to a fresh allocation first).  Upstream's ``HasUniqueRef``.
        A snapshot: another thread may ``inc_ref`` right after.  Cost:
        O(log n + k) for k segments in range.

        Raises ``TypeError``/``ValueError`` for a bad range,
        ``RefCountError`` if any page is not allocated, ``ClosedError``.
        """
        return self.first_shared_range(fr) is None

    def first_shared_range(self, fr: FileRange) -> FileRange | None:
        """The first sub-range of ``fr`` whose pages have more than one
        reference (as long as it runs), or None when every page has
        exactly one.  Upstream's ``FirstSharedRange``.  A snapshot, as
        ``has_unique_ref``.  Cost: O(log n + k).

        Raises ``TypeError``/``ValueError`` for a bad range,
        ``RefCountError`` if any page is not allocated, ``ClosedError``.
        """
        start, end = check_range(fr, "first_shared_range")
        with self._mu:
            self._check_open()
            found = self._books.first_shared(start, end)
        return None if found is None else FileRange(*found)

    def inc_ref(self, fr: FileRange) -> None:
        """Add one reference to every page of ``fr``.

        ``fr`` may be any page-aligned sub-range of live pages (it may span
        several allocations).  Cost: O(log n + k) for k segments in range.

        Raises ``TypeError``/``ValueError`` for a bad range, ``RefCountError``
        if any page is not allocated or already freed (freed pages are never
        brought back), ``ClosedError``.  Nothing changes when it raises.
        """
        start, end = check_range(fr, "inc_ref")
        with self._mu:
            self._check_open()
            self._books.inc_ref(start, end)

    def dec_ref(self, fr: FileRange) -> None:
        """Drop one reference from every page of ``fr``.

        Pages whose count reaches zero are freed: counted as SYSTEM until the
        releaser returns them to the kernel, and recyclable by a later
        allocation before that.  Wakes the releaser (from any thread, without
        the event loop), which punches freed runs of 1 MiB or more at once
        and lone shorter ranges once the frees pause (see
        ``aiopgalloc._releaser``).  Cost: O(log n + k).

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
            self._books.dec_ref(start, end)
            self._wake.wake()

    def release_freed_soon(self) -> None:
        """Ask the releaser to return every freed page to the kernel now,
        lone short ranges included (which otherwise wait for the frees to
        pause), without waiting for it: what host memory pressure does.
        Any thread; O(1).  Raises ``ClosedError``."""
        with self._mu:
            self._check_open()
            if self._books.request_flush():
                self._wake.wake()

    # --------------------------------------------------------------- mapping

    def _view_bounds(self, fr: FileRange, at: AccessType, what: str) -> tuple[int, int, bool]:
        if not isinstance(at, AccessType):
            raise TypeError(f"at must be an AccessType, got {type(at).__name__}")
        start, end = range_bounds(fr, what)
        if at is not AccessType.READ_WRITE and at & AccessType.EXECUTE:
            raise PermissionError(errno.EACCES, "execute access to the memory file is refused")
        self._check_open()
        size = self._books.file_size
        if end > size:
            raise ValueError(f"{what}: range {fr!r} is past the end of the file ({size:#x} bytes)")
        return start, end, at is AccessType.READ_WRITE or bool(at & AccessType.WRITE)

    def map_internal(
        self, fr: FileRange, at: AccessType = AccessType.READ_WRITE
    ) -> list[memoryview]:
        """Memoryviews that together cover exactly ``fr``, one per chunk
        crossed (the reference's shape; ``view`` gives one buffer).

        The pages need not be allocated (as in the reference).  ``READ`` gives
        read-only views; ``WRITE`` or ``READ_WRITE`` writable ones.  Views stay
        valid until dropped, even past the file's close.  Cost: a slice per
        chunk crossed.

        Raises ``TypeError`` for a non-``FileRange`` or a non-``AccessType``,
        ``ValueError`` for an empty or ill-formed range or one past the end
        of the file (touching it would kill the process with SIGBUS),
        ``PermissionError`` for ``EXECUTE``, ``OSError`` if mmap fails,
        ``ClosedError``.
        """
        start, end, writable = self._view_bounds(fr, at, "map_internal")
        try:
            return self._handle.mapping.views(start, end - start, writable)
        except ValueError:
            self._check_open()
            raise

    def view(self, fr: FileRange, at: AccessType = AccessType.READ_WRITE) -> memoryview:
        """One memoryview of exactly ``fr``, whatever chunks it crosses
        (read-only for ``AccessType.READ``).  Like ``map_internal`` otherwise:
        the pages need not be allocated, the view stays valid until dropped,
        even past the file's close.  Cost: one slice of a memoryview.

        Raises what ``map_internal`` raises.
        """
        start, end, writable = self._view_bounds(fr, at, "view")
        try:
            return self._handle.mapping.view(start, end - start, writable)
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
        fallback: the contents are gone, the memory is not).  The punches
        hold a lease on the file, so closing meanwhile never pulls the fd
        from under them; the call then raises ``ClosedError``.

        Raises ``TypeError``/``ValueError`` for a bad range, ``RefCountError``
        if any page is not allocated or being released, ``ClosedError``.
        """
        start, end = check_range(fr, "decommit")
        books, handle = self._books, self._handle
        with self._mu:
            self._check_open()
            plan = books.plan_decommit(start, end)
            handle.acquire()
        ranges = plan.live + plan.waste.ranges
        try:
            try:
                o = self.opts
                if end - start <= o.release_inline_max_bytes and (
                    len(ranges) <= o.release_inline_max_ranges
                ):
                    plan.waste.failed = handle.punch_out(ranges)
                else:
                    plan.waste.failed = await anyio.to_thread.run_sync(
                        handle.punch_out, ranges, limiter=self._limiter
                    )
            except BaseException:
                # Neither punched nor zeroed by hand: the books as they were
                # (a call that raises changes nothing).
                with self._mu:
                    books.abandon_decommit(plan)
                raise
            plan.waste.performed = True
            with self._mu:
                books.finish_decommit(plan)
        finally:
            handle.release()
            self._wake.progress()
        self._check_open()

    async def update_usage(self) -> None:
        """Bring ``accounting`` up to date with what the kernel holds.

        Skipped (one fstat) when the file's block count equals the bytes
        already known to be committed.  Otherwise the live ranges not yet
        known committed are scanned (mincore) in a worker thread, without
        the lock; pages punched during the scan are left out, and a scan
        that raced with more punches than the books remember is redone.
        Freed pages are not scanned (assumed uncommitted, as in the
        reference).

        Raises ``OSError`` from the scan, ``ClosedError`` (also when the file
        closed during the scan).
        """
        books, handle = self._books, self._handle
        with self._io():
            for _attempt in range(8):
                committed = syscalls.fstat_blocks_bytes(handle.fd)
                with self._mu:
                    self._check_open()
                    plan = books.plan_scan(committed)
                if plan is None or not plan.spans:
                    return
                runs = await anyio.to_thread.run_sync(
                    handle.mapping.resident_runs, plan.spans, limiter=self._limiter
                )
                with self._mu:
                    self._check_open()
                    if books.apply_scan(plan.seq, runs):
                        return
                await anyio.lowlevel.checkpoint()
        log.debug("update_usage: pages kept being punched during the scan; gave up")

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
        reader without data, ``ClosedError`` (also when the file closed
        while the reader was read), and the reader's own errors.
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

        Cost: a copy of the books under the lock (O(segments)), a mincore
        scan of the live pages, then reading and writing the committed bytes
        in worker threads (see ``aiopgalloc.checkpoint``).

        Raises ``TypeError`` for a bad target or progress, ``RuntimeError``
        while evictions are pending (call ``start_evictions()`` and
        ``wait_for_evictions()`` first, as the reference requires) or if the
        allocations changed during the save, ``ClosedError``, ``OSError``.
        """
        checkpoint.check_save_args(target, progress)
        self._check_open()
        st = self._evictions.stats()
        if st.users or st.outstanding:
            raise RuntimeError(
                f"cannot save while evictions are pending ({st.users} user(s) with "
                f"evictable ranges, {st.outstanding} eviction(s) running): call "
                "mf.start_evictions() and await mf.wait_for_evictions() first"
            )
        with self._mu:
            self._check_open()
            books = self._books
            saved = checkpoint.SavedBooks(
                books.file_size, self.opts.chunk_size, books.export_live()
            )
            self._handle.acquire()

        def unchanged() -> None:
            with self._mu:
                self._check_open()
                if books.file_size != saved.file_size or books.export_live() != saved.segments:
                    raise RuntimeError(
                        "pages were allocated or freed during save, so the checkpoint would "
                        "not match the pages; nothing usable was written (stop allocating "
                        "and freeing while saving)"
                    )

        def closed() -> bool:
            return self._closed

        try:
            return await checkpoint.save_pages(
                saved,
                self._handle,
                target,
                progress,
                fsync=fsync,
                unchanged=unchanged,
                closed=closed,
            )
        finally:
            self._handle.release()

    async def wait_for_reclaim(self) -> None:
        """Return once no freed page waits to be returned to the kernel.

        Wakes the releaser if needed.  Raises ``ClosedError`` if the file is
        closed (also while waiting).
        """
        while True:
            event = self._wake.progress_event()
            with self._mu:
                self._check_open()
                if not self._books.reclaim_pending:
                    return
                if self._books.request_flush():
                    self._wake.wake()
            await event.wait()

    def reclaim_pending(self) -> int:
        """Bytes freed but not yet returned to the kernel (waiting, or being
        released right now).  O(1).  Raises ``ClosedError``."""
        with self._mu:
            self._check_open()
            return self._books.reclaim_pending

    def stats(self) -> FileStats:
        """One frozen snapshot of the allocator's figures (see ``FileStats``).

        Cost: one fstat, and O(1) in the number of segments under the lock.
        Raises ``ClosedError``.
        """
        with self._io():
            committed = syscalls.fstat_blocks_bytes(self._handle.fd)
        evictions = self._evictions.stats()
        with self._mu:
            self._check_open()
            figures = self._books.figures()
        return FileStats.make(figures, committed, evictions, self._pressure)

    def share(self, readonly: bool = True) -> int:
        """A new fd of the same file, for another process (pass it over a
        Unix socket, or with ``pass_fds``).  The caller owns and closes it.

        What a read-only fd enforces, and against whom: see the README's
        "Sharing with other processes".  In short: it can neither write nor
        grow the file, for a holder without privileges over this process
        (no ``CAP_DAC_OVERRIDE``, ``CAP_FOWNER`` or ``CAP_SYS_PTRACE``, and
        not the file's owner uid); root can reopen the file read-write.  No
        fd can shrink a memfd this library created (it is sealed against
        shrinking).  The fd is close-on-exec.  Raises ``TypeError`` for a
        non-bool ``readonly``, ``OSError``, ``ClosedError``.
        """
        if not isinstance(readonly, bool):
            raise TypeError(f"readonly must be a bool, got {type(readonly).__name__}")
        with self._io():
            return memfd.reopen(self._handle.fd, readonly)

    # -------------------------------------------------------------- eviction

    def _ev(self) -> Evictions:
        self._check_open()
        return self._evictions

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
        pressure), so that caching in evictable memory may pay off.  Raises
        ``ClosedError``."""
        return self._ev().should_cache_evictable()

    def start_evictions(self) -> None:
        """Ask every evictable user to give back all its evictable ranges (does
        not wait).  Thread-safe.  Raises ``ClosedError``."""
        self._ev().start_evictions()

    @overload
    async def wait_for_evictions(self) -> None: ...

    @overload
    async def wait_for_evictions(self, timeout: float | None) -> bool: ...  # noqa: ASYNC109

    async def wait_for_evictions(
        self,
        timeout: float | EllipsisType | None = ...,  # noqa: ASYNC109  (deprecated)
    ) -> bool | None:
        """Wait until every eviction started so far has finished (queued ones
        included, and those started meanwhile).  Returns None.

        Bound the wait with a cancel scope, as anyio and trio take timeouts:
        ``with anyio.fail_after(5): await mf.wait_for_evictions()`` raises
        ``TimeoutError`` after 5 s; under ``anyio.move_on_after(5)`` the scope's
        ``cancelled_caught`` says whether it ran out.  Cancelling the wait
        cancels nothing else: the evictions go on.  Always yields to the event
        loop once; call it on the file's event loop.

        Deprecated: ``wait_for_evictions(timeout)`` (a ``timeout=`` argument,
        ruff's ASYNC109) still works, warns ``DeprecationWarning`` and returns
        False if ``timeout`` seconds passed first, else True (``TypeError``/
        ``ValueError`` for a timeout that is not a number or is NaN).

        Raises ``RuntimeError`` when called from an ``evict`` (it would wait
        for itself forever), ``ClosedError``.
        """
        if timeout is ...:
            await self._ev().wait_for_evictions(None)
            return None
        warnings.warn(
            "wait_for_evictions(timeout) is deprecated: bound the wait with a cancel "
            "scope instead, e.g. `with anyio.fail_after(5): await mf.wait_for_evictions()`",
            DeprecationWarning,
            stacklevel=2,
        )
        return await self._ev().wait_for_evictions(timeout)

    # ----------------------------------------------------------- diagnostics

    def __str__(self) -> str:
        """A bounded summary: the file's figures, then the first
        ``STR_SEGMENTS`` segments of the usage set and of the freed ranges
        (with how many more there are).  O(STR_SEGMENTS) under the lock, so
        printing a file with a million segments is as cheap as printing a
        small one; ``page_map()`` gives the whole map."""
        with self._mu:
            books = self._books
            figures = books.figures()
            lines = books.describe(STR_SEGMENTS)
        head = (
            f"MemoryFile size={figures.file_size:#x} live={figures.live_bytes:#x} "
            f"freed={figures.freed_bytes:#x} releasing={figures.releasing_bytes:#x} "
            f"segments={figures.segments}"
        )
        return "\n".join([head, *lines]) if lines else f"{head}\n(empty)"

    def page_map(self) -> list[PageRun]:
        """The whole page map, in address order: every run of live, freed
        and releasing pages (see ``PageRun``); clean pages are the gaps.  A
        snapshot, taken under the lock: O(n) in the number of segments, so
        for diagnostics and tests, not for a hot path.  Works after close
        (the map as it was at close)."""
        with self._mu:
            runs = self._books.page_map()
        return [PageRun(*r) for r in runs]

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._handle.fd}"
        return f"<MemoryFile {state} size={self._books.file_size:#x}>"

    def check_invariants(self) -> None:
        """Verify the allocator's invariants; raise AssertionError naming the
        first one broken.  O(n): for tests, after every step.  Works after
        close too.

        The books' invariants (see ``aiopgalloc._books``); the file size a
        whole number of chunks, and the mapping's size the books' while
        open; the evictable sets disjoint per user.
        """
        with self._mu:
            books = self._books
            books.check()
            size = books.file_size
            assert size % self.opts.chunk_size == 0, "file size not whole chunks"
            assert self._closed or self._handle.mapping.file_size == size, "mapping size stale"
        self._evictions.check()
